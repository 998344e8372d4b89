"""
Several daemons on one PostgreSQL: membership, one router, one sender per service.

Each :class:`~delivery.DeliveryService` on a PostgreSQL store is a *node* of a cluster (a
cluster of one when it runs alone). A node writes a heartbeat row; a node whose heartbeat
is older than ``lease_ttl`` counts as gone. Work is shared through *leases*, rows of the
``leases`` table: ``router`` (the one node that runs the sorter) and ``service:ID`` (the one
node that sends to that service). A lease has an owner, an *epoch* that grows by one each
time it changes hands, and an expiry.

Every ``lease_ttl / 3`` seconds a node renews what it holds, all in one statement, and
then takes or gives back leases so that each live node holds about its share: the
services are ranked for each node by rendezvous hashing, a node above its share
(``ceil(services / live nodes)``) gives back those ranked lowest for it, one below takes
free or expired ones, those ranked highest first. While membership does not change,
nothing moves. A node that sees a lease held elsewhere, or another node's heartbeat, run
out before its next renewal (its holder stopped renewing) looks again just after that
moment, so a dead node's leases are taken over within ``lease_ttl`` of its last renewal;
leases given back (a clean stop) are announced, and taken at once.

A node stops using a lease ``lease_ttl / 3`` before it could expire unless a renewal
succeeded meanwhile (self-fencing: the deadline is counted from when the renewal was
*sent*, on the node's own clock): its sender for that service stops and a request in flight
is cancelled. Every write for a service (storing, completing, failing, splitting or
dead-lettering a transaction, its state) and the sorter's commits carry the epoch
(:class:`~delivery.records.Fence`), and the database refuses them once the epoch is not
current, so a node that was paused past its lease cannot write anything when it wakes.
The new holder starts from the database: the oldest stored transaction is resent, same
id, same body.

Expiry is judged on the clocks of the nodes (each passes its own ``now``), so their clocks
must agree to well within ``lease_ttl / 3`` (NTP does).

A request must fit in a lease: every registration's ``request_timeout`` is at most
``lease_ttl - margin`` (two thirds of ``lease_ttl``; :meth:`Cluster.check`, at start-up
and on reload). A node whose renewals fail from some moment on stops ``lease_ttl - margin``
after the last one that succeeded, so a request that started right after it is answered
or timed out before then; the fence cuts short only requests started later, and the next
holder resends them, same id, same body.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import socket
from collections.abc import Iterable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater

from ._interfaces import IStore
from ._log import Logger
from ._observers import Observers
from .errors import DeliveryError, StoreUnavailableError
from .records import Fence, LeaseInfo, NodeInfo
from .registration import Registration

log = Logger()

#: the name of the router's lease
ROUTER = "router"
#: what a service's lease is named after
SERVICE_PREFIX = "service:"
#: how long after a lease's expiry a node that waits for it looks, seconds
EXPIRY_STEP = 0.01


def default_node_id() -> str:
    """This host's name and this process's id: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _node_id(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise ValueError(
            f"node_id must be a non-empty string of at most 200 characters, not {value!r}"
        )


def _lease_ttl(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 3:
        raise ValueError(f"lease_ttl must be a number of seconds >= 3, not {value!r}")


@attrs.frozen
class Cluster:
    """How this node takes part in a cluster of daemons sharing one PostgreSQL."""

    #: unique among the nodes running at once
    node_id: str = attrs.field(factory=default_node_id, validator=_node_id)
    #: seconds: a lease not renewed for this long expires; a heartbeat this old is gone
    lease_ttl: float = attrs.field(default=15.0, validator=_lease_ttl)

    @property
    def renew_every(self) -> float:
        """How often leases are renewed and shares looked at."""
        return self.lease_ttl / 3

    @property
    def margin(self) -> float:
        """How long before its expiry a lease not renewed stops being used."""
        return self.lease_ttl / 3

    @property
    def longest_request(self) -> float:
        """The longest ``request_timeout`` a registration may have on this node, seconds."""
        return self.lease_ttl - self.margin

    def check(self, registrations: Iterable[Registration]) -> None:
        """
        Refuse a registration whose requests may outlast what a lease guarantees: a
        ValueError names the first such registration.
        """
        for registration in registrations:
            timeout = registration.options.request_timeout
            if timeout > self.longest_request:
                raise ValueError(
                    f"the request_timeout of {registration.id!r} ({timeout:g} s) is longer"
                    f" than a cluster node allows with lease_ttl {self.lease_ttl:g} s: at"
                    f" most {self.longest_request:g} s (two thirds of lease_ttl), so that a"
                    " request started under a lease ends before the node would have to stop"
                    " using it; lower request_timeout or raise cluster.lease_ttl"
                )


def service_lease(service_id: str) -> str:
    return SERVICE_PREFIX + service_id


class Node(Protocol):
    """What a member starts and stops as it takes and gives up leases (the service)."""

    def service_ids(self) -> list[str]:
        """The services this node can send to (its registrations that send)."""

    async def start_sending(self, service_id: str, fence: Fence) -> None:
        """Start sending to the service here, every write under ``fence``."""

    async def stop_sending(self, service_id: str) -> None:
        """Stop sending to it here; done once its loop has ended."""

    async def start_routing(self, fence: Fence) -> None:
        """Start the sorter here, every commit under ``fence``."""

    async def stop_routing(self) -> None:
        """Stop the sorter here."""

    def peers(self, live: list[str]) -> None:
        """The nodes alive now, this one included (a heartbeat's reading)."""


class ClusterError(DeliveryError):
    """This node cannot join its cluster (another running node has its id)."""


def _score(node_id: str, lease: str) -> bytes:
    """Rendezvous hashing: the node with the highest score for a lease prefers it."""
    return hashlib.sha256(f"{node_id}\0{lease}".encode()).digest()


class ClusterMember:
    """
    This node's part in the cluster: its heartbeat, and the leases it takes, renews,
    gives back and stops using in time (see the module's documentation).
    """

    def __init__(
        self,
        store: IStore,
        options: Cluster,
        clock: IReactorTime,
        node: Node,
        observers: Observers,
    ) -> None:
        self._store = store
        self.options = options
        self._clock = clock
        self._node = node
        self._observers = observers
        #: this process, as the leases' rows name their holder
        self.incarnation = secrets.token_hex(8)
        self._me = NodeInfo(options.node_id, socket.gethostname(), os.getpid(), 0.0, 0.0, True)
        #: the leases held and used here, with their epochs
        self.held: dict[str, int] = {}
        #: when the leases held stop being used unless renewed (this node's clock)
        self.valid_until = 0.0
        #: what the last heartbeat read
        self.nodes: list[NodeInfo] = []
        self.leases: dict[str, LeaseInfo] = {}
        self._timer: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._ticking: Deferred[None] | None = None
        #: tick again at once once the one running ends
        self._again = False
        #: when to tick before the next renewal is due: see _next_change
        self._look_at: float | None = None
        self._stopped = True
        store.on_released(self._released)
        #: one change of leases at a time (a tick, a loss, the stop)
        self._lock = DeferredLock()

    # -- starting and stopping --

    async def start(self) -> None:
        """Join: wait out a stale heartbeat of this node id, refuse a live one; then a tick."""
        ttl = self.options.lease_ttl
        seen: float | None = None
        while True:
            now = self._clock.seconds()
            nodes, _ = await self._store.read_cluster(ttl, now)
            same = next((n for n in nodes if n.node_id == self.options.node_id), None)
            if same is None or not same.alive:
                break
            if seen is not None and same.heartbeat_ts != seen:
                raise ClusterError(
                    f"another running daemon has the node id {self.options.node_id!r}"
                    f" (pid {same.pid} on {same.host}): give each daemon its own"
                    " cluster.node_id"
                )
            seen = same.heartbeat_ts
            log.info(
                "node id {node} has a heartbeat {age:.1f} s old: waiting until it is older"
                " than lease_ttl ({ttl:g} s)",
                node=self.options.node_id,
                age=now - same.heartbeat_ts,
                ttl=ttl,
            )
            await deferLater(self._clock, same.heartbeat_ts + ttl - now + 0.1)
        self._me = attrs.evolve(self._me, started_ts=self._clock.seconds())
        self._stopped = False
        await self.tick()
        self._schedule()

    async def stop(self) -> None:
        """Leave: stop sending and routing here, give every lease back, and go."""
        if self._stopped and not self.held:
            return  # never joined, or stopped already
        self._stopped = True
        for call in (self._timer, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._deadline = None
        if self._ticking is not None:
            await self._ticking
        async with self._lock:
            names = list(self.held)
            await self._stop_using(names)
            try:
                await self._store.leave(self.options.node_id, self.incarnation, names)
            except StoreUnavailableError as e:
                log.warn("could not give the leases back ({error}): they expire", error=str(e))
                return
            for name in names:
                self._changed(name, "released")

    # -- the tick: heartbeat, renewal, shares --

    def _schedule(self) -> None:
        if self._stopped:
            return
        if self._again:
            self._again = False
            self._begin()
            return
        delay = self.options.renew_every
        if self._look_at is not None:
            # (just past the moment: expiry and age are judged strictly)
            delay = min(delay, max(0.0, self._look_at - self._clock.seconds()) + EXPIRY_STEP)
        self._timer = self._clock.callLater(delay, self._begin)

    def _released(self) -> None:
        """Another node gave leases back or left: look at the shares now, not later."""
        if self._stopped:
            return
        if self._ticking is not None:
            self._again = True  # (the tick running may have read before)
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._begin()

    def _begin(self) -> None:
        self._timer = None
        ticking = Deferred.fromCoroutine(self._tick_logged())
        if not ticking.called:
            self._ticking = ticking

    async def _tick_logged(self) -> None:
        try:
            await self.tick()
        except StoreUnavailableError as e:
            log.info("cluster: could not renew ({error}); trying again", error=str(e))
        except Exception:
            log.failure("cluster: the heartbeat failed; trying again")
        finally:
            self._ticking = None
            self._schedule()

    async def tick(self) -> None:
        """One heartbeat: renew what is held, then take or give back to match the share."""
        async with self._lock:
            if self._stopped:
                return
            await self._tick()

    async def _tick(self) -> None:
        ttl = self.options.lease_ttl
        sent = self._clock.seconds()
        renewed, nodes, leases = await self._store.heartbeat(
            self._me, self.incarnation, list(self.held), sent, ttl
        )
        self.nodes = nodes
        self.leases = {lease.name: lease for lease in leases}
        lost = [name for name, epoch in self.held.items() if renewed.get(name) != epoch]
        if lost:
            log.warn("cluster: lost {leases}", leases=", ".join(sorted(lost)))
            await self._stop_using(lost, "lost")
        if self._stopped:
            return
        if self.held:
            self._extend(sent + ttl - self.options.margin)
        now = self._clock.seconds()
        self._look_at = self._next_change(now)
        live = sorted(
            {n.node_id for n in nodes if n.alive and not self._gone_here(n)}
            | {self.options.node_id}
        )
        self._node.peers(live)
        wanted = [service_lease(s) for s in self._node.service_ids()]
        missing = [name for name in wanted if name not in self.leases]
        if missing:  # services new to the database: their leases, free
            await self._store.ensure_leases(missing)
            self.leases.update((name, LeaseInfo(name, None, 0, None)) for name in missing)
        share = math.ceil(len(wanted) / len(live)) if wanted else 0
        mine = [name for name in self.held if name != ROUTER]
        me = self.options.node_id

        def preferred_by_me(name: str) -> tuple[bool, bytes]:
            best = max(live, key=lambda n: _score(n, name))
            return best == me, _score(me, name)

        gone = [name for name in mine if name not in wanted]
        if gone:
            await self._give_back(gone)
            mine = [name for name in mine if name in wanted]
        if len(mine) > share:
            # those another node prefers go first, those least preferred here before them
            extra = sorted(mine, key=preferred_by_me)[: len(mine) - share]
            await self._give_back(extra)
        free = [
            name
            for name in [ROUTER, *wanted]
            if name not in self.held and self._takeable(self.leases.get(name), now)
        ]
        router = [ROUTER] if ROUTER in free else []
        room = share - len(mine)
        services = sorted((n for n in free if n != ROUTER), key=preferred_by_me, reverse=True)
        if router or (room > 0 and services):
            await self._take(router + services[: max(room, 0)], sent)

    def _next_change(self, now: float) -> float | None:
        """
        When a lease held elsewhere expires, or another node's heartbeat gets too old, if
        that comes before the next renewal: a node that stopped renewing. The next tick
        comes then, so that its leases are taken over within ``lease_ttl`` of its last
        renewal rather than up to a renewal period later. (A live node renews every
        ``lease_ttl / 3``: its leases and heartbeat stay further ahead than that.)
        """
        ttl = self.options.lease_ttl
        me = self.options.node_id
        ahead = [
            lease.expires_ts
            for lease in self.leases.values()
            if lease.owner not in (None, me) and lease.expires_ts is not None
        ]
        ahead += [n.heartbeat_ts + ttl for n in self.nodes if n.node_id != me and n.alive]
        soon = [t for t in ahead if now <= t < now + self.options.renew_every]
        return min(soon) if soon else None

    def _takeable(self, lease: LeaseInfo | None, now: float) -> bool:
        if lease is None:
            return False
        if lease.owner is None or lease.expires_ts is None or lease.expires_ts < now:
            return True
        return self._died_here(lease)

    def _died_here(self, lease: LeaseInfo) -> bool:
        """
        Whether the lease's holder was a process of this host that is gone (killed, or
        crashed): it cannot write any more, so its leases need not be waited out. (A
        process that is only paused still exists; a pid reused since is waited out.)
        """
        holder = next(
            (n for n in self.nodes if n.incarnation and n.incarnation == lease.incarnation), None
        )
        return holder is not None and self._gone_here(holder)

    def _gone_here(self, node: NodeInfo) -> bool:
        """Whether ``node`` was a process of this host that no longer exists."""
        if node.host != self._me.host or node.pid == os.getpid():
            return False
        try:
            os.kill(node.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # (it exists, another user's)
        return False

    async def _take(self, names: list[str], sent: float) -> None:
        dead = sorted(
            {
                lease.incarnation
                for name in names
                if (lease := self.leases.get(name)) is not None
                and lease.incarnation is not None
                and self._died_here(lease)
            }
        )
        taken = await self._store.acquire_leases(
            self.options.node_id, self.incarnation, names, sent, self.options.lease_ttl, dead
        )
        if not taken:
            return
        self._extend(sent + self.options.lease_ttl - self.options.margin)
        for name, epoch in sorted(taken.items(), key=lambda item: item[0] != ROUTER):
            self.held[name] = epoch
            self._changed(name, "acquired")
            log.info("cluster: took {lease} (epoch {epoch})", lease=name, epoch=epoch)
            try:
                await self._use(name, Fence(name, epoch))
            except Exception:
                log.failure("cluster: could not start {lease}; giving it back", lease=name)
                await self._give_back([name])

    async def _give_back(self, names: list[str]) -> None:
        await self._stop_using(names)
        await self._store.release_leases(self.incarnation, names)
        for name in names:
            self._changed(name, "released")
            log.info("cluster: gave back {lease}", lease=name)

    async def _use(self, name: str, fence: Fence) -> None:
        if name == ROUTER:
            await self._node.start_routing(fence)
        else:
            await self._node.start_sending(name[len(SERVICE_PREFIX) :], fence)

    async def _stop_using(self, names: list[str], change: str | None = None) -> None:
        # (no longer held from now on, whatever the stopping waits for)
        stopping = [name for name in names if self.held.pop(name, None) is not None]
        if not self.held and self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if change is not None:
            for name in stopping:
                self._changed(name, change)
        for name in stopping:
            if name == ROUTER:
                await self._node.stop_routing()
            else:
                await self._node.stop_sending(name[len(SERVICE_PREFIX) :])

    # -- self-fencing --

    def _extend(self, until: float) -> None:
        self.valid_until = until
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(max(0.0, until - self._clock.seconds()))
        else:
            self._deadline = self._clock.callLater(
                max(0.0, until - self._clock.seconds()), self._expired
            )

    def _expired(self) -> None:
        """No renewal in time: stop using every lease before it can expire."""
        self._deadline = None
        names = list(self.held)
        if not names:
            return
        log.warn(
            "cluster: leases not renewed in time; stopped using {leases}",
            leases=", ".join(sorted(names)),
        )
        Deferred.fromCoroutine(self._stop_using(names, "lost")).addErrback(
            lambda f: log.failure("cluster: stopping after the leases ran out failed", f)
        )

    def refused(self, lease: str) -> None:
        """A write under ``lease`` was refused: stop using it now (someone else holds it)."""
        self._observers.write_refused(lease)
        if lease in self.held:
            log.warn("cluster: a write under {lease} was refused; it is lost", lease=lease)
            Deferred.fromCoroutine(self._lose(lease)).addErrback(
                lambda f: log.failure("cluster: stopping {lease} failed", f, lease=lease)
            )

    async def _lose(self, lease: str) -> None:
        async with self._lock:
            await self._stop_using([lease], "lost")

    # -- what it holds --

    def owner_of(self, service_id: str) -> str | None:
        """The node that holds the service's lease, as the last heartbeat saw it."""
        name = service_lease(service_id)
        if name in self.held:
            return self.options.node_id
        lease = self.leases.get(name)
        if lease is None or lease.expires_ts is None or lease.expires_ts < self._clock.seconds():
            return None
        return lease.owner

    def _changed(self, name: str, change: str) -> None:
        self._observers.lease_changed(name, change)
