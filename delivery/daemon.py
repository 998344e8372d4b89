"""
The standalone daemon: ``twistd -n delivery --config delivery.yaml``.

The twistd plugin (``twisted/plugins/delivery_plugin.py``) points here: ``Options`` reads
the command line and checks the configuration before anything starts, ``makeService``
builds the daemon: the DeliveryService and the HTTP API, with metrics, and SIGHUP to
reload the registrations.

A daemon that cannot do its work exits non-zero with one line saying why: a configuration
it cannot use (before twistd starts anything), an address it cannot listen on, a store it
cannot open. Once it is stopping, a second SIGTERM or SIGINT only says so.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web import server

from ._http import Connections, LimitedRequest
from ._log import Logger, set_level
from .api import Api, Limits, Tokens, make_site
from .config import Config, check
from .errors import DeliveryError
from .metrics import Metrics
from .records import ReloadResult
from .service import DeliveryService
from .store import open_store, redact_url

log = Logger()


class Listener(Service):
    """
    Serves a site on a Twisted endpoint; ``port`` is the listening port once started.
    When it cannot listen, the process exits non-zero (``where`` names the setting).
    """

    def __init__(
        self, description: str, site: server.Site, reactor: Any, where: str = "listen"
    ) -> None:
        self.description = description
        self.site = site
        self.reactor = reactor
        self.where = where
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        self.listening = endpoint.listen(self.site)
        self.listening.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        log.info(
            "HTTP API listening on {host}:{port}",
            host=getattr(address, "host", address),
            port=getattr(address, "port", ""),
        )
        return port

    def _failed(self, failure: Failure) -> Failure:
        log.critical(
            "cannot listen on {listen} ({where}): {error}; free the address or change it; stopping",
            listen=self.description,
            where=self.where,
            error=failure.getErrorMessage().rstrip("."),
        )
        exit_failed(self.reactor)
        return failure

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def exit_failed(reactor: Any) -> None:
    """
    Stop the reactor, now or as soon as it runs, and exit 1 once it has shut down: twistd
    itself would exit 0, and a supervisor (systemd's Restart=on-failure) must notice.
    """

    def stop() -> None:
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        reactor.stop()

    if reactor.running:
        stop()
    else:
        # twistd starts the services before the reactor runs: a port that is taken
        # fails here, and stop() would raise ReactorNotRunning.
        reactor.callWhenRunning(stop)


class Daemon(MultiService):
    """The DeliveryService and its HTTP API, configured from a file."""

    def __init__(
        self,
        config_path: str | Path,
        *,
        reactor: Any = None,
        environ: Mapping[str, str] | None = None,
        handle_signals: bool = False,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config_path = Path(config_path)
        self.environ = environ
        self.handle_signals = handle_signals
        self._stopping_already = False
        config, registrations = check(self.config_path, environ)
        self.config = config
        set_level(config.log.level)
        self.delivery = DeliveryService(
            open_store(config.database, reactor, timeout=config.database_timeout),
            registrations,
            reactor=reactor,
            poll_interval=config.poll_interval,
            max_event_bytes=config.max_event_bytes,
            server_name=config.server_name,
            start_timeout=config.start_timeout,
            housekeeping=config.housekeeping(),
            cluster=config.node(),
        )
        self.delivery.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.metrics = Metrics(self.delivery.clock)
        self.delivery.observe(self.metrics)
        self.api = Api(
            self.delivery,
            _tokens(config),
            metrics=self.metrics,
            reload=self.reload,
            limits=_limits(config),
        )
        self.site = make_site(
            self.api, config.max_request_bytes, _connections(config), reactor=reactor
        )
        self.web = Listener(config.listen, self.site, reactor, f"key 'listen' of {config.source}")
        self.web.setServiceParent(self)  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        # The API may listen before the store is open: every handler waits until the
        # DeliveryService has started (and answers with why, if it could not).
        super().startService()  # type: ignore[no-untyped-call]
        if self.handle_signals:
            signal.signal(signal.SIGHUP, self._sighup)
            # (the reactor installs its SIGTERM and SIGINT handlers as it starts)
            self.reactor.callWhenRunning(self._guard_stop_signals)
            self.reactor.addSystemEventTrigger("before", "shutdown", self._stopping)
        self.delivery.started().addErrback(self._not_started)
        node = self.config.node()
        log.info(
            "delivery starting: {count} application service(s), database {database}{node}",
            count=len(self.delivery.registrations),
            database=redact_url(self.config.database),
            node=""
            if node is None
            else f", as node {node.node_id} of its cluster (lease_ttl {node.lease_ttl:g} s)",
        )

    def _not_started(self, failure: Failure) -> None:
        log.critical("delivery could not start: {error}; stopping", error=failure.getErrorMessage())
        exit_failed(self.reactor)

    def _guard_stop_signals(self) -> None:
        # The reactor's handlers call reactor.stop(), which raises ReactorNotRunning (a
        # traceback) when the shutdown is under way already: only the first one stops.
        for number in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(number)
            if callable(handler):
                signal.signal(number, functools.partial(self._stop_signal, handler))

    def _stop_signal(self, handler: Callable[[int, Any], None], signum: int, frame: Any) -> None:
        if not self._stopping_already:
            self._stopping_already = True
            handler(signum, frame)
        else:
            self.reactor.callFromThread(
                log.info,
                "{signal} while stopping: already stopping",
                signal=signal.Signals(signum).name,
            )

    def _stopping(self) -> None:
        self._stopping_already = True

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reload_logged)

    def _reload_logged(self) -> None:
        d = Deferred.fromCoroutine(self.reload())
        d.addErrback(
            lambda f: (
                log.error(
                    "reload on SIGHUP failed, nothing changed: {error}", error=f.getErrorMessage()
                )
                if f.check(DeliveryError, ValueError)
                else log.failure("reload on SIGHUP failed", f)
            )
        )

    async def reload(self) -> ReloadResult:
        """
        Read the configuration again: registrations and tokens change at once; other keys
        need a restart (a warning names them).
        """
        config, registrations = check(self.config_path, self.environ)
        needs_restart = [
            key
            for key in ("database", "listen", "poll_interval", "server_name", "max_event_bytes")
            if getattr(config, key) != getattr(self.config, key)
        ]
        if config.node() != self.config.node():
            needs_restart.append("cluster")
        if needs_restart:
            log.warn(
                "changed configuration keys need a restart to apply: {keys}",
                keys=", ".join(needs_restart),
            )
        result = await self.delivery.reload(registrations)
        self.api.tokens = _tokens(config)
        self.api.limits = _limits(config)
        cast(type[LimitedRequest], self.site.requestFactory).max_body = config.max_request_bytes
        self.site.connections = _connections(config)
        set_level(config.log.level)
        return result


def _limits(config: Config) -> Limits:
    return Limits(
        max_events_per_request=config.max_events_per_request,
        max_request_bytes=config.max_request_bytes,
    )


def _connections(config: Config) -> Connections:
    return Connections(
        max_connections=config.http.max_connections, body_timeout=config.http.body_timeout
    )


def _tokens(config: Config) -> Tokens:
    return Tokens(config.ingest_token, config.admin_token, config.metrics_token)


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Runs delivery: reliable event delivery to Matrix application services. "
        "Reads the YAML configuration FILE (see examples/delivery.yaml); SIGHUP or "
        "POST /v1/reload re-reads its registrations."
    )
    optParameters = [
        ["config", "c", "delivery.yaml", "The configuration file."],
    ]

    def postOptions(self) -> None:
        # Check everything now: a mistake is one line and exit 1, not a traceback, nor
        # twistd's usage text (a UsageError prints it), which says nothing about the file.
        try:
            check(self["config"])
        except (DeliveryError, ValueError) as e:
            print(f"delivery: {e}", file=sys.stderr)
            raise SystemExit(1) from None


def makeService(options: Options) -> IService:
    return Daemon(options["config"], handle_signals=True)
