"""
The ``delivery`` command (``.venv/bin/delivery`` in a clone set up by ``scripts/run``):

- ``delivery run [--config] FILE``: run the daemon in the foreground (``twistd -n delivery``);
- ``delivery check-config [--config] FILE``: check a configuration and every registration
  it names, with the environment the command runs in;
- ``delivery status [--config] FILE``: ask the running daemon how its services are doing;
- ``delivery cluster [--config] FILE``: ask the running daemon (on PostgreSQL) which
  daemons share its database and which of them sends to which service;
- ``delivery attempts SERVICE [--config] FILE [--limit N] [--outcome X]``: show the running
  daemon's delivery log of one service, newest first;
- ``delivery replay SERVICE [--config] FILE --from-ts T | --since S | --from-stream-id N``:
  have the running daemon queue recent events again for one service.

Every subcommand takes the configuration both ways, positional or ``--config``, and
``delivery.yaml`` in the current folder when given neither. A mistake on the command line
prints the subcommand's usage and one line; a mistake in the configuration, an unset
``${VARIABLE}``, a refused token or a daemon that does not answer is one line on stderr and
exit 1, never a traceback. Nothing printed holds a secret: tokens are never shown and
database URLs go through :func:`delivery.store.redact_url`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from .config import Config, check, load_config
from .errors import DeliveryError
from .records import OUTCOMES
from .store import redact_url

T = TypeVar("T")

#: the configuration a subcommand reads when it is given none
DEFAULT_CONFIG = "delivery.yaml"

#: seconds ``status`` waits for the daemon's answer
STATUS_TIMEOUT = 10.0


class _Failed(Exception):
    """What went wrong, in the one line the command prints before exiting 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="delivery", description="Reliable event delivery to Matrix application services."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon in the foreground")
    checker = commands.add_parser(
        "check-config", help="check a configuration and the registrations it names"
    )
    status = commands.add_parser("status", help="show the services of a running daemon")
    cluster = commands.add_parser(
        "cluster", help="show the daemons sharing a running daemon's database, and their leases"
    )
    attempts = commands.add_parser(
        "attempts", help="show the delivery log of one service of a running daemon"
    )
    attempts.add_argument("service", metavar="SERVICE", help="the id of the service")
    replay = commands.add_parser(
        "replay", help="queue recent events again for one service of a running daemon"
    )
    replay.add_argument("service", metavar="SERVICE", help="the id of the service")
    for command in (run, checker, status, cluster, attempts, replay):
        command.add_argument(
            "config_file",
            nargs="?",
            metavar="CONFIG",
            help=f"configuration file (default: {DEFAULT_CONFIG})",
        )
        command.add_argument(
            "--config", "-c", metavar="CONFIG", help="the configuration file, as an option"
        )
    for command in (status, cluster):
        command.add_argument(
            "--url", help="the daemon's base URL (default: from the config's listen)"
        )
        command.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    _replay_options(replay)
    _attempts_options(attempts)
    subcommands = {
        "run": run,
        "check-config": checker,
        "status": status,
        "cluster": cluster,
        "attempts": attempts,
        "replay": replay,
    }

    # Unknown arguments are the subcommand's to report, with its own usage.
    args, unknown = parser.parse_known_args(argv)
    command = subcommands[args.command]
    if unknown:
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    config = _config_path(command, args.config_file, args.config)
    try:
        if args.command == "run":
            return _run(config)
        if args.command == "check-config":
            _check_config(config)
        elif args.command == "attempts":
            _attempts(config, args.url, args.service, _attempts_query(args), args.json)
        elif args.command == "replay":
            _replay(config, args.url, args.service, _replay_body(replay, args), args.json)
        elif args.command == "cluster":
            _cluster(config, args.url, args.json)
        else:
            _status(config, args.url, args.json, time.time())
    except _Failed as e:
        print(f"delivery: {e}", file=sys.stderr)
        return 1
    return 0


def _config_path(
    command: argparse.ArgumentParser, positional: str | None, option: str | None
) -> str:
    if positional and option and positional != option:
        command.error(f"two configurations given ({positional}, {option}): give one")
    path = positional or option
    if path:
        return path
    if not Path(DEFAULT_CONFIG).exists():
        command.error(
            f"no {DEFAULT_CONFIG} in this folder: name the configuration,"
            " e.g. --config examples/delivery.yaml"
        )
    return DEFAULT_CONFIG


def _run(config: str) -> int:
    from twisted.scripts import twistd

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "delivery", "--config", config]
    twistd.run()
    return 0


@attrs.define(eq=False)
class _Environment(Mapping[str, str]):
    """
    The environment a configuration is read with, noting every ``${VARIABLE}`` it uses that
    is not set; such a variable reads as its own ``${NAME}``, so that the rest is checked.
    """

    environ: Mapping[str, str]
    unset: list[str] = attrs.Factory(list)

    def __getitem__(self, name: str) -> str:
        if name in self.environ:
            return self.environ[name]
        if name not in self.unset:
            self.unset.append(name)
        return f"${{{name}}}"

    def __contains__(self, name: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.environ)

    def __len__(self) -> int:
        return len(self.environ)


def _unset(path: str, names: Sequence[str]) -> _Failed:
    variables = " ".join(f"{name}=..." for name in names)
    hint = f"export {variables}"
    tokens = tokens_file(path)
    if tokens.exists():
        hint += f", or `. {tokens}` (the tokens scripts/run made)"
    uses = "uses the environment variable" if len(names) == 1 else "uses the environment variables"
    these = "which is" if len(names) == 1 else "which are"
    return _Failed(f"{path} {uses} {', '.join(names)}, {these} not set here: {hint}")


def tokens_file(config: str | Path) -> Path:
    """Where ``scripts/run`` keeps the tokens it made for ``config``: beside it, ``NAME.tokens``."""
    path = Path(config)
    return path.with_name(f"{path.stem}.tokens")


def _check_config(path: str) -> None:
    environment = _Environment(os.environ)
    try:
        config, registrations = check(path, environment)
    except (DeliveryError, ValueError) as e:
        if environment.unset:
            raise _unset(path, environment.unset) from None
        raise _Failed(str(e)) from None
    if environment.unset:
        raise _unset(path, environment.unset)
    database = redact_url(config.database)
    print(f"{path}: valid; database {database}; listening on {config.listen}")
    node = config.node()
    if node is not None:
        print(f"  cluster node {node.node_id}, lease_ttl {node.lease_ttl:g} s")
    for registration in registrations:
        namespaces = len(registration.users) + len(registration.rooms) + len(registration.aliases)
        url = redact_url(registration.url) if registration.url else "(no url: receives nothing)"
        print(f"  {registration.id}: {url}, {namespaces} namespace(s)")


def base_url(listen: str) -> str | None:
    """The http:// URL of a ``tcp:PORT[:interface=HOST]`` endpoint, if it is one."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", listen)]
    if parts[0] != "tcp" or len(parts) < 2 or not parts[1].isdigit():
        return None
    host = "127.0.0.1"
    for part in parts[2:]:
        key, _, value = part.partition("=")
        if key == "interface" and value not in ("", "0.0.0.0", "::"):
            host = f"[{value}]" if ":" in value else value
    return f"http://{host}:{parts[1]}"


def _status_config(path: str) -> Config:
    """The configuration as far as ``status`` needs it: the admin token and the address."""
    environment = _Environment(os.environ)
    try:
        config = load_config(path, environment)
    except (DeliveryError, ValueError) as e:
        if environment.unset:
            raise _unset(path, environment.unset) from None
        raise _Failed(str(e)) from None
    needed = [n for n in environment.unset if f"${{{n}}}" in config.admin_token + config.listen]
    if needed:
        raise _unset(path, needed)
    return config


def _admin_token_source(path: str) -> str:
    """Where the admin token of a configuration comes from, for a person to check."""
    blank = _Environment({})
    try:
        admin_token = load_config(path, blank).admin_token
    except (DeliveryError, ValueError):
        admin_token = ""
    variables = [name for name in blank.unset if f"${{{name}}}" in admin_token]
    return " / ".join([*variables, f"admin_token in {path}"])


def _status(path: str, url: str | None, raw: bool, now: float) -> None:
    body, services = _ask(path, url, "/v1/services", lambda body: body["services"])
    if raw:
        print(json.dumps(body, indent=2))
        return
    print(status_table(services, now), end="")


def _ask(
    path: str,
    url: str | None,
    route: str,
    read: Callable[[Any], T],
    *,
    data: Any = None,
    timeout: float = STATUS_TIMEOUT,
    explained: Sequence[int] = (),
) -> tuple[Any, T]:
    """
    Ask the daemon of the configuration at ``path`` (at its ``listen``, or ``url``) for
    ``route`` with the admin token (a POST of ``data`` as JSON when given): its answer,
    and what ``read`` takes from it. Every failure is one line: a refused token, an answer
    of a status in ``explained`` (the daemon's error says what is wrong with the request),
    another status, no daemon, or an answer not shaped as a daemon's.
    """
    config = _status_config(path)
    url = (url or base_url(config.listen) or "").rstrip("/")
    if not url:
        raise _Failed(f"cannot tell a URL from listen: {config.listen} in {path}; pass --url")
    headers = {"Authorization": f"Bearer {config.admin_token}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(
        f"{url}{route}",
        data=None if data is None else json.dumps(data).encode(),
        method="GET" if data is None else "POST",
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body: Any = json.load(answer)
        return body, read(body)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise _Failed(
                f"the admin token was refused (HTTP {e.code}): check {_admin_token_source(path)}"
            ) from None
        if e.code in explained:
            raise _Failed(_error_text(e.read())) from None
        raise _Failed(f"{url} answered HTTP {e.code}: {_error_text(e.read())}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise _Failed(f"no daemon answers at {url}: is it running? ({reason})") from None
    except (ValueError, KeyError, TypeError):
        raise _Failed(f"{url} did not answer as a delivery daemon does: is it one?") from None


def _error_text(body: bytes) -> str:
    """The ``error`` of an error answer, or the start of whatever it is, on one line."""
    try:
        text = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode("utf-8", errors="replace")
    return " ".join(text.split()) or "(no explanation)"


#: the columns of ``delivery status``: heading, and whether it is right-aligned (the
#: owner's only when some service has one: several daemons on one PostgreSQL)
_COLUMNS = (
    ("service", False),
    ("state", False),
    ("owner", False),
    ("queued", True),
    ("stored", True),
    ("oldest", True),
    ("failures", True),
    ("next retry", False),
    ("last error", False),
)


def status_table(services: Sequence[Mapping[str, Any]], now: float) -> str:
    """
    The services of a ``GET /v1/services`` answer as a table: a line each, with the next
    retry as a time from ``now`` and a clock time, the failures in a row and the last error;
    and the node that sends to each, when some service has one (on PostgreSQL).
    """
    rows = [[heading for heading, _ in _COLUMNS]]
    for s in services:
        age = s.get("oldest_pending_age")
        rows.append(
            [
                str(s["service_id"]),
                str(s["state"]),
                str(s.get("owner") or "-"),
                str(s["queued_events"]),
                str(s["stored_transactions"]),
                "-" if age is None else duration(age),
                str(s.get("attempts") or 0),
                next_retry(s.get("next_retry"), now),
                " ".join(str(s.get("last_error") or "").split()),
            ]
        )
    if not any(s.get("owner") for s in services):
        owner = [heading for heading, _ in _COLUMNS].index("owner")
        columns = [c for i, c in enumerate(_COLUMNS) if i != owner]
        return _table([[c for i, c in enumerate(row) if i != owner] for row in rows], columns)
    return _table(rows, _COLUMNS)


# -- cluster --

#: the columns of ``delivery cluster``'s nodes and services
_NODE_COLUMNS = (
    ("node", False),
    ("host", False),
    ("pid", True),
    ("heartbeat", True),
    ("alive", False),
    ("router", False),
    ("services", True),
)
_LEASE_COLUMNS = (
    ("service", False),
    ("owner", False),
    ("epoch", True),
    ("expires in", True),
)


def _cluster(path: str, url: str | None, raw: bool) -> None:
    body, text = _ask(path, url, "/v1/cluster", cluster_text, explained=(404,))
    if raw:
        print(json.dumps(body, indent=2))
        return
    print(text, end="")


def cluster_text(cluster: Mapping[str, Any]) -> str:
    """
    A ``GET /v1/cluster`` answer as text: a line naming the node that answered, the lease
    time and the router; a table of the nodes (how long ago each wrote its heartbeat,
    whether it counts as alive, whether it routes, how many services it sends to); and one
    of the services (the node sending to each, its lease's epoch and how long the lease
    has left).
    """
    router = cluster["router"] or "none (no node holds the router lease)"
    lines = [
        f"node {cluster['node_id']} answered; lease_ttl {cluster['lease_ttl']:g}s;"
        f" router: {router}\n",
        "\n",
    ]
    nodes = [[heading for heading, _ in _NODE_COLUMNS]]
    for n in cluster["nodes"]:
        nodes.append(
            [
                str(n["node_id"]),
                str(n["host"]),
                str(n["pid"]),
                f"{duration(float(n['heartbeat_age']))} ago",
                "yes" if n["alive"] else "no",
                "yes" if n["router"] else "no",
                str(len(n["leases"])),
            ]
        )
    lines.append(_table(nodes, _NODE_COLUMNS))
    services = [[heading for heading, _ in _LEASE_COLUMNS]]
    for s in cluster["services"]:
        expires = s["expires_in"]
        services.append(
            [
                str(s["service_id"]),
                str(s["owner"] or "-"),
                str(s["epoch"]),
                "-" if expires is None else duration(float(expires)),
            ]
        )
    if len(services) > 1:
        lines += ["\n", _table(services, _LEASE_COLUMNS)]
    else:
        lines += ["\n", "(no services)\n"]
    return "".join(lines)


def _table(rows: Sequence[Sequence[str]], columns: Sequence[tuple[str, bool]]) -> str:
    """Rows of cells as aligned text, each column padded to its widest cell (right: ``True``)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, right) in zip(row, widths, columns, strict=True)
        ]
        lines.append("  ".join(cells).rstrip() + "\n")
    return "".join(lines)


def duration(seconds: float) -> str:
    """A span of time to the second, in its two largest units: ``45s``, ``2m05s``, ``3h07m``."""
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def next_retry(when: float | None, now: float) -> str:
    """``in 12s (14:03:07)``: when a DOWN service is tried next, from ``now`` and by the clock."""
    if when is None:
        return "-"
    moment = time.localtime(when)
    same_day = moment[:3] == time.localtime(now)[:3]
    clock = time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", moment)
    relative = f"in {duration(when - now)}" if when - now >= 0.5 else "now"
    return f"{relative} ({clock})"


# -- replay --

#: seconds ``replay`` waits for the daemon's answer (a large replay takes a while)
REPLAY_TIMEOUT = 300.0


def _replay_options(replay: argparse.ArgumentParser) -> None:
    replay.add_argument("--url", help="the daemon's base URL (default: from the config's listen)")
    replay.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    start = replay.add_mutually_exclusive_group(required=True)
    start.add_argument(
        "--from-ts", type=float, metavar="T", help="from the events ingested at unix time T on"
    )
    start.add_argument(
        "--since", type=float, metavar="SECONDS", help="from the events ingested SECONDS ago on"
    )
    start.add_argument("--from-stream-id", type=int, metavar="N", help="from stream position N on")
    end = replay.add_mutually_exclusive_group()
    end.add_argument(
        "--to-ts", type=float, metavar="T", help="up to the events ingested at unix time T"
    )
    end.add_argument("--to-stream-id", type=int, metavar="N", help="up to stream position N")


def _replay_body(command: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The body of ``POST /v1/services/{id}/replay`` the options ask for."""
    for option in ("from_ts", "since", "from_stream_id", "to_ts", "to_stream_id"):
        value = getattr(args, option)
        if value is not None and not 0 <= value < float("inf"):
            command.error(f"--{option.replace('_', '-')} must be 0 or more, not {value}")
    body: dict[str, Any] = {}
    if args.since is not None:
        body["from_ts"] = time.time() - args.since
    for option in ("from_ts", "from_stream_id", "to_ts", "to_stream_id"):
        if getattr(args, option) is not None:
            body[option] = getattr(args, option)
    return body


def _replay(path: str, url: str | None, service: str, body: dict[str, Any], raw: bool) -> None:
    result, (queued, first, last, partly_deleted) = _ask(
        path,
        url,
        f"/v1/services/{urllib.parse.quote(service, safe='')}/replay",
        lambda r: (r["queued"], r["first_stream_id"], r["last_stream_id"], r["partly_deleted"]),
        data=body,
        timeout=REPLAY_TIMEOUT,
        explained=(400, 404, 409),
    )
    if raw:
        print(json.dumps(result, indent=2))
        return
    done = (
        f"{queued} event(s) queued again (stream positions {first} to {last})"
        if queued
        else "no event in that range to replay"
    )
    warning = "; part of the range may have been deleted by retention already"
    print(f"{service}: {done}{warning if partly_deleted else ''}")


# -- attempts --

#: the most attempts one ``attempts`` asks for (the API's limit)
MAX_ATTEMPTS = 1000


def _attempt_limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_ATTEMPTS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_ATTEMPTS}")
    return int(text)


def _attempt_id(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 2**62:
        raise argparse.ArgumentTypeError("must be the id of an attempt, a whole number from 1")
    return int(text)


def _attempts_options(attempts: argparse.ArgumentParser) -> None:
    attempts.add_argument("--url", help="the daemon's base URL (default: from the config's listen)")
    attempts.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    attempts.add_argument(
        "--limit",
        type=_attempt_limit,
        default=100,
        metavar="N",
        help=f"show the newest N attempts (default 100, at most {MAX_ATTEMPTS})",
    )
    attempts.add_argument("--outcome", choices=OUTCOMES, help="only the attempts with this outcome")
    attempts.add_argument(
        "--before", type=_attempt_id, metavar="ID", help="only attempts older than attempt ID"
    )


def _attempts_query(args: argparse.Namespace) -> dict[str, Any]:
    """The query of ``GET /v1/services/{id}/attempts`` the options ask for."""
    query: dict[str, Any] = {"limit": args.limit}
    if args.outcome is not None:
        query["outcome"] = args.outcome
    if args.before is not None:
        query["before"] = args.before
    return query


def _attempts(path: str, url: str | None, service: str, query: dict[str, Any], raw: bool) -> None:
    body, (found, older, table) = _ask(
        path,
        url,
        f"/v1/services/{urllib.parse.quote(service, safe='')}/attempts"
        f"?{urllib.parse.urlencode(query)}",
        lambda b: (b["attempts"], b["next_before"], attempts_table(b["attempts"])),
        explained=(400, 404),
    )
    if raw:
        print(json.dumps(body, indent=2))
        return
    if not found:
        which = f" with the outcome {query['outcome']}" if "outcome" in query else ""
        print(f"{service}: no attempts logged{which}")
        return
    print(table, end="")
    if older is not None:
        print(f"(older attempts: --before {older})")


#: the columns of ``delivery attempts``: heading, and whether it is right-aligned
_ATTEMPT_COLUMNS = (
    ("time", False),
    ("txn id", True),
    ("events", True),
    ("status", True),
    ("outcome", False),
    ("duration", True),
    ("resend", False),
    ("error", False),
)


def attempts_table(attempts: Sequence[Mapping[str, Any]]) -> str:
    """
    The attempts of a ``GET /v1/services/{id}/attempts`` answer as a table, a line each
    in the answer's order (newest first): the local time the request started, the
    transaction, its events, the answer's status (``-``: none came), the outcome, how
    long the answer took in milliseconds, whether it was a resend, and the error.
    """
    rows = [[heading for heading, _ in _ATTEMPT_COLUMNS]]
    for a in attempts:
        rows.append(
            [
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(a["started"]))),
                str(a["txn_id"]),
                str(a["events"]),
                "-" if a["status"] is None else str(a["status"]),
                str(a["outcome"]),
                f"{round(float(a['duration']) * 1000)} ms",
                "yes" if a["resend"] else "no",
                " ".join(str(a.get("error") or "").split()),
            ]
        )
    return _table(rows, _ATTEMPT_COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
