"""
The daemon's configuration file (YAML).

Every key is checked: an unknown key or a bad value is an error that names the file, the
key and the fix. Secrets may come from the environment: a value ``${NAME}`` is replaced by
the variable ``NAME``, so tokens need not sit in the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import attrs

from ._log import LEVELS as LOG_LEVELS
from ._yaml import UnreadableYAML, read_yaml
from .cluster import Cluster
from .errors import DeliveryError, InvalidStoreURLError
from .events import DEFAULT_MAX_EVENT_BYTES, shorten
from .housekeeping import Housekeeping
from .registration import DeliveryOptions, InvalidOptionError, Registration, parse_options
from .store import open_store

DEFAULT_LISTEN = "tcp:8008:interface=127.0.0.1"

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(DeliveryError, ValueError):
    """The configuration file cannot be used; the message says where and why."""

    def __init__(self, source: str, key: str | None, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: key {key!r}" if key else source
        super().__init__(f"invalid configuration {where}: {reason}")


@attrs.frozen
class LogConfig:
    #: the least important level ``delivery`` logs (debug, info, warn, error, critical);
    #: where logs go is twistd's business (--logfile, --logger)
    level: str = "info"


@attrs.frozen
class HttpConfig:
    """What the HTTP API allows its clients."""

    #: connections open at once; one more is answered 503 and closed
    max_connections: int = 512
    #: seconds a request body may take to arrive once its headers are in
    body_timeout: float = 30.0


_CLUSTER_TTL = cast(float, attrs.fields(Cluster).lease_ttl.default)


@attrs.frozen
class ClusterConfig:
    """
    How this daemon takes part in a cluster of daemons sharing one PostgreSQL (the
    ``cluster:`` section; see :class:`~delivery.cluster.Cluster`).
    """

    #: unique among the daemons running at once; None: ``host:pid``
    node_id: str | None = None
    #: seconds: a lease not renewed for this long expires, a heartbeat this old is gone
    lease_ttl: float = _CLUSTER_TTL


_HOUSEKEEPING = Housekeeping()


@attrs.frozen
class Config:
    """A checked configuration; relative paths in the file are taken from the file's folder."""

    source: str
    database: str
    listen: str
    ingest_token: str = attrs.field(repr=False)
    admin_token: str = attrs.field(repr=False)
    #: the token Prometheus sends to /metrics (the admin token when not set)
    metrics_token: str = attrs.field(repr=False)
    app_service_config_files: tuple[Path, ...]
    poll_interval: float = 1.0
    server_name: str | None = None
    max_events_per_request: int = 1000
    max_request_bytes: int = 10 * 1024 * 1024
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    #: how long start-up keeps trying to reach the database, seconds
    start_timeout: float = 60.0
    #: how long a PostgreSQL operation may go unanswered before the database counts as
    #: unavailable, seconds
    database_timeout: float = 60.0
    #: housekeeping (see :class:`~delivery.Housekeeping`), seconds and rows
    retention: float = _HOUSEKEEPING.retention
    dedupe_window: float = _HOUSEKEEPING.dedupe_window
    attempt_retention: float = _HOUSEKEEPING.attempt_retention
    attempts_per_service: int = _HOUSEKEEPING.attempts_per_service
    housekeeping_batch_size: int = _HOUSEKEEPING.batch_size
    housekeeping_pace: float = _HOUSEKEEPING.pace
    housekeeping_interval: float = _HOUSEKEEPING.interval
    defaults: DeliveryOptions = attrs.Factory(DeliveryOptions)
    log: LogConfig = attrs.Factory(LogConfig)
    http: HttpConfig = attrs.Factory(HttpConfig)
    #: the ``cluster:`` section as written (None when there is none); see :meth:`node`
    cluster: ClusterConfig | None = None

    @property
    def single_process(self) -> bool:
        """Whether the database is SQLite, which one process uses at a time."""
        return urlsplit(self.database).scheme == "sqlite"

    def node(self) -> Cluster | None:
        """
        How this daemon joins the cluster of its database: None on SQLite (no cluster); on
        PostgreSQL the ``cluster:`` section, or the defaults without one (a daemon on
        PostgreSQL alone is a cluster of one).
        """
        if self.single_process:
            return None
        section = self.cluster or ClusterConfig()
        if section.node_id is None:
            return Cluster(lease_ttl=section.lease_ttl)
        return Cluster(node_id=section.node_id, lease_ttl=section.lease_ttl)

    def housekeeping(self) -> Housekeeping:
        """The housekeeping these keys describe."""
        return Housekeeping(
            retention=self.retention,
            dedupe_window=self.dedupe_window,
            attempt_retention=self.attempt_retention,
            attempts_per_service=self.attempts_per_service,
            batch_size=self.housekeeping_batch_size,
            pace=self.housekeeping_pace,
            interval=self.housekeeping_interval,
        )

    def registrations(self) -> list[Registration]:
        """
        Read every registration file.

        :raises InvalidRegistrationError: for the first file that is not valid.
        :raises ConfigError: when two files use the same id.
        """
        found: dict[str, Path] = {}
        result = []
        for path in self.app_service_config_files:
            registration = Registration.from_file(path, self.defaults)
            if registration.id in found:
                raise ConfigError(
                    self.source,
                    "app_service_config_files",
                    f"{path} and {found[registration.id]} both use the id {registration.id!r}",
                )
            found[registration.id] = path
            result.append(registration)
        node = self.node()
        if node is not None:
            try:
                node.check(result)
            except ValueError as e:
                raise ConfigError(self.source, "cluster.lease_ttl", str(e)) from None
        return result


def load_config(
    path: str | Path, environ: Mapping[str, str] | None = None, reactor: Any = None
) -> Config:
    """
    Read and check a configuration file.

    :param reactor: what the ``listen`` endpoint is checked against (the global reactor
        if None).
    :raises ConfigError: naming the file and the key.
    """
    source = str(path)
    try:
        data = read_yaml(path)
    except UnreadableYAML as e:
        raise ConfigError(source, None, str(e)) from None
    return parse_config(
        data,
        source,
        Path(path).resolve().parent,
        os.environ if environ is None else environ,
        reactor,
    )


def parse_config(
    data: object, source: str, base: Path, environ: Mapping[str, str], reactor: Any = None
) -> Config:
    """
    Check a parsed configuration mapping; relative paths are taken from ``base``, and the
    ``listen`` endpoint is checked against ``reactor`` (the global reactor if None).
    """

    def fail(key: str | None, reason: str) -> ConfigError:
        return ConfigError(source, key, reason)

    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise fail(None, f"expected a mapping of keys, found {type(data).__name__}")
    known = {a.name for a in attrs.fields(Config)} - {"source"}
    for key in data:
        if key not in known:
            raise fail(str(key), f"is not a known key (known: {', '.join(sorted(known))})")

    def expand(key: str, value: object) -> object:
        if not isinstance(value, str):
            return value

        def variable(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise fail(key, f"uses the environment variable {name}, which is not set")
            return environ[name]

        return _VARIABLE.sub(variable, value)

    def get(key: str, default: Any = None) -> Any:
        return expand(key, data.get(key)) if data.get(key) is not None else default

    def string(key: str, default: str | None = None, secret: bool = False) -> str:
        value = get(key, default)
        if not isinstance(value, str):
            found = type(value).__name__ if secret else repr(value)
            raise fail(key, f"must be a string, not {found}")
        return value

    def token(key: str) -> str:
        value = string(key, "", secret=True)
        if not value.strip():
            raise fail(
                key,
                "is empty: set a long random token (or ${VARIABLE} to read it from the"
                " environment); delivery does not run without one",
            )
        return value

    def positive(key: str, value: object, integer: bool = False) -> Any:
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
            noun = "a positive integer" if integer else "a positive number"
            raise fail(key, f"must be {noun}, not {value!r}")
        return value

    def number(key: str, default: float, integer: bool = False) -> Any:
        return positive(key, get(key, default), integer)

    database = string("database", f"sqlite:///{base / 'delivery.db'}", secret=True)
    if database.startswith("sqlite:///") and not database.startswith("sqlite:////"):
        relative = database.removeprefix("sqlite:///")
        if relative and relative != ":memory:":
            database = f"sqlite:///{base / relative}"
    try:
        open_store(database)  # parses the URL; connects only when started
    except InvalidStoreURLError as e:
        raise fail("database", str(e)) from None

    files = get("app_service_config_files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise fail("app_service_config_files", "must be a list of registration file paths")
    paths = tuple(base / expand("app_service_config_files", f) for f in files)  # type: ignore[operator]

    raw_defaults = get("defaults", {})
    if not isinstance(raw_defaults, Mapping):
        raise fail("defaults", "must be a mapping of delivery options")
    try:
        defaults = parse_options(raw_defaults, DeliveryOptions())
    except InvalidOptionError as e:
        raise fail(f"defaults.{e.option}" if e.option else "defaults", str(e)) from None

    raw_log = get("log", {})
    if not isinstance(raw_log, Mapping):
        raise fail("log", "must be a mapping, such as {level: info}")
    for key in raw_log:
        if key != "level":
            raise fail(f"log.{key}", "is not a known key (known: level)")
    level = raw_log.get("level", "info")
    if level not in LOG_LEVELS:
        raise fail("log.level", f"must be one of {', '.join(LOG_LEVELS)}, not {level!r}")

    raw_http = get("http", {})
    if not isinstance(raw_http, Mapping):
        raise fail("http", "must be a mapping, such as {max_connections: 512, body_timeout: 30}")
    http_keys = {a.name for a in attrs.fields(HttpConfig)}
    for key in raw_http:
        if key not in http_keys:
            raise fail(f"http.{key}", f"is not a known key (known: {', '.join(sorted(http_keys))})")

    http_defaults = HttpConfig()
    http = HttpConfig(
        max_connections=positive(
            "http.max_connections",
            raw_http.get("max_connections", http_defaults.max_connections),
            integer=True,
        ),
        body_timeout=positive(
            "http.body_timeout", raw_http.get("body_timeout", http_defaults.body_timeout)
        ),
    )

    cluster = _cluster_section(get("cluster"), database, fail, expand)

    admin_token = token("admin_token")
    listen = string("listen", DEFAULT_LISTEN)
    problem = _endpoint_problem(listen, reactor)
    if problem:
        raise fail(
            "listen",
            f"is not a Twisted endpoint description ({problem}): {listen!r};"
            " for example tcp:8008:interface=127.0.0.1",
        )

    server_name = get("server_name")
    if server_name is not None and (not isinstance(server_name, str) or not server_name):
        raise fail("server_name", f"must be a homeserver name, not {server_name!r}")

    pace = get("housekeeping_pace", _HOUSEKEEPING.pace)
    if isinstance(pace, bool) or not isinstance(pace, (int, float)) or pace < 0:
        raise fail("housekeeping_pace", f"must be a number of seconds >= 0, not {pace!r}")
    housekeeping = {
        "retention": number("retention", _HOUSEKEEPING.retention),
        "dedupe_window": number("dedupe_window", _HOUSEKEEPING.dedupe_window),
        "attempt_retention": number("attempt_retention", _HOUSEKEEPING.attempt_retention),
        "attempts_per_service": number(
            "attempts_per_service", _HOUSEKEEPING.attempts_per_service, integer=True
        ),
        "housekeeping_batch_size": number(
            "housekeeping_batch_size", _HOUSEKEEPING.batch_size, integer=True
        ),
        "housekeeping_pace": pace,
        "housekeeping_interval": number("housekeeping_interval", _HOUSEKEEPING.interval),
    }
    if housekeeping["dedupe_window"] < housekeeping["retention"]:
        raise fail(
            "dedupe_window",
            f"must be at least retention ({housekeeping['retention']:g} s), not"
            f" {housekeeping['dedupe_window']:g} s: an event's id must be recognised while"
            " the event is kept",
        )

    return Config(
        source=source,
        database=database,
        listen=listen,
        ingest_token=token("ingest_token"),
        admin_token=admin_token,
        metrics_token=token("metrics_token")
        if data.get("metrics_token") is not None
        else admin_token,
        app_service_config_files=paths,
        poll_interval=number("poll_interval", 1.0),
        server_name=server_name,
        max_events_per_request=number("max_events_per_request", 1000, integer=True),
        max_request_bytes=number("max_request_bytes", 10 * 1024 * 1024, integer=True),
        max_event_bytes=number("max_event_bytes", DEFAULT_MAX_EVENT_BYTES, integer=True),
        start_timeout=number("start_timeout", 60.0),
        database_timeout=number("database_timeout", 60.0),
        **housekeeping,
        defaults=defaults,
        log=LogConfig(level),
        http=http,
        cluster=cluster,
    )


def _cluster_section(
    raw: object,
    database: str,
    fail: Callable[[str | None, str], ConfigError],
    expand: Callable[[str, object], object],
) -> ClusterConfig | None:
    """The ``cluster:`` section, checked; None when the file has none."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise fail("cluster", "must be a mapping, such as {node_id: delivery-1, lease_ttl: 15}")
    known = {a.name for a in attrs.fields(ClusterConfig)}
    for key in raw:
        if key not in known:
            raise fail(f"cluster.{key}", f"is not a known key (known: {', '.join(sorted(known))})")
    if urlsplit(database).scheme == "sqlite":
        raise fail(
            "cluster",
            "SQLite is single-process: one daemon has the file at a time; use PostgreSQL to"
            " run several daemons (or remove the cluster section)",
        )
    node_id = raw.get("node_id")
    if node_id is not None:
        node_id = expand("cluster.node_id", node_id)
        if not isinstance(node_id, str) or not node_id.strip() or len(node_id) > 200:
            raise fail(
                "cluster.node_id",
                "must be a name of 1 to 200 characters, unique among the daemons, not"
                f" {shorten(repr(node_id))}",
            )
    lease_ttl = raw.get("lease_ttl", _CLUSTER_TTL)
    if (
        isinstance(lease_ttl, bool)
        or not isinstance(lease_ttl, (int, float))
        or not 3 <= lease_ttl < float("inf")
    ):
        raise fail("cluster.lease_ttl", f"must be a number of seconds >= 3, not {lease_ttl!r}")
    return ClusterConfig(node_id=node_id, lease_ttl=lease_ttl)


def _endpoint_problem(description: str, reactor: Any) -> str | None:
    """Why ``description`` is not an endpoint to listen on; None if it is one."""
    from twisted.internet import endpoints

    if reactor is None:
        from twisted.internet import reactor
    try:
        endpoints.serverFromString(reactor, description)
    except Exception as e:  # any way the description cannot be used is the answer
        return str(e) or type(e).__name__
    return None


def check(
    path: str | Path, environ: Mapping[str, str] | None = None, reactor: Any = None
) -> tuple[Config, list[Registration]]:
    """
    Load the configuration and every registration (``reactor``: as for :func:`load_config`).

    :raises ConfigError: or :class:`InvalidRegistrationError`, for the first problem.
    """
    config = load_config(path, environ, reactor)
    return config, config.registrations()
