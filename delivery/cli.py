"""
The ``delivery`` command:

- ``delivery run --config FILE``: run the daemon in the foreground (``twistd -n delivery``);
- ``delivery check-config FILE``: check a configuration and every registration it names;
- ``delivery status --config FILE``: ask the running daemon how its services are doing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from .errors import DeliveryError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="delivery", description="Reliable event delivery to Matrix application services."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", default="delivery.yaml", help="configuration file")
    checker = commands.add_parser("check-config", help="check a configuration file")
    checker.add_argument("config", help="configuration file")
    status = commands.add_parser("status", help="show the services of a running daemon")
    status.add_argument("--config", "-c", default="delivery.yaml", help="configuration file")
    status.add_argument("--url", help="the daemon's base URL (default: from the config)")
    status.add_argument("--json", action="store_true", help="print the JSON answer")
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args.config)
    if args.command == "check-config":
        return _check_config(args.config)
    return _status(args.config, args.url, args.json)


def _run(config: str) -> int:
    from twisted.scripts import twistd

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "delivery", "--config", config]
    twistd.run()
    return 0


def _check_config(path: str) -> int:
    from .config import check

    try:
        config, registrations = check(path)
    except (DeliveryError, ValueError) as e:
        print(f"delivery: {e}", file=sys.stderr)
        return 1
    print(f"{path}: valid; database {config.database}; listening on {config.listen}")
    for registration in registrations:
        namespaces = len(registration.users) + len(registration.rooms) + len(registration.aliases)
        url = registration.url or "(no url: receives nothing)"
        print(f"  {registration.id}: {url}, {namespaces} namespace(s)")
    return 0


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


def _status(path: str, url: str | None, raw: bool) -> int:
    from .config import load_config

    try:
        config = load_config(path)
    except (DeliveryError, ValueError) as e:
        print(f"delivery: {e}", file=sys.stderr)
        return 1
    url = url or base_url(config.listen)
    if url is None:
        print(
            f"delivery: cannot tell a URL from listen: {config.listen}; pass --url", file=sys.stderr
        )
        return 1
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/services",
        headers={"Authorization": f"Bearer {config.admin_token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            body: Any = json.load(answer)
    except urllib.error.HTTPError as e:
        print(f"delivery: {url} answered HTTP {e.code}: {e.read()[:300]!r}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        print(f"delivery: cannot reach the daemon at {url}: {reason}", file=sys.stderr)
        return 1
    if raw:
        print(json.dumps(body, indent=2))
        return 0
    print(f"{'service':<24} {'state':<11} {'queued':>8} {'stored':>7} {'oldest':>9}  last error")
    for s in body["services"]:
        age = s["oldest_pending_age"]
        print(
            f"{s['service_id']:<24} {s['state']:<11} {s['queued_events']:>8}"
            f" {s['stored_transactions']:>7} {'-' if age is None else f'{age:.0f}s':>9}"
            f"  {s['last_error'] or ''}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
