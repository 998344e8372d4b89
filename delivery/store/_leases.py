"""
What the nodes of a cluster (``delivery.cluster``) do to the database, as ``_sql``
operations: heartbeats, and taking, renewing and giving back leases. Every time is the
calling node's clock (``now``).

A lease is taken by raising its epoch, which waits for any write still running under the
old epoch (each takes a share lock on the lease's row: ``_sql.Fenced``) and makes every
later one fail.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..records import LeaseInfo, NodeInfo
from ._sql import RELEASED_CHANNEL, Insert, Notify, Query, Steps

#: the most names one statement is given
_CHUNK = 500


def _marks(names: Sequence[str]) -> str:
    return ",".join("?" * len(names))


def _chunks(names: Sequence[str]) -> list[list[str]]:
    return [list(names[i : i + _CHUNK]) for i in range(0, len(names), _CHUNK)]


def ensure_leases(names: Sequence[str]) -> Steps[None]:
    """A row for each lease not known yet: free, at epoch 0."""
    if names:
        yield Insert(
            "leases", ("name",), ("text",), [(n,) for n in names], "ON CONFLICT DO NOTHING"
        )


def read_cluster(ttl: float, now: float) -> Steps[tuple[list[NodeInfo], list[LeaseInfo]]]:
    """Every node (alive: a heartbeat younger than ``ttl``) and every lease."""
    rows = yield Query(
        "SELECT node_id, host, pid, started_ts, heartbeat_ts, incarnation FROM nodes"
        " ORDER BY node_id"
    )
    nodes = [NodeInfo(n, h, int(p), s, b, now - b < ttl, i) for n, h, p, s, b, i in rows]
    rows = yield Query(
        "SELECT name, owner, epoch, expires_ts, incarnation FROM leases ORDER BY name"
    )
    leases = [LeaseInfo(n, o, int(e), x, i) for n, o, e, x, i in rows]
    return nodes, leases


def heartbeat(
    node: NodeInfo,
    incarnation: str,
    held: Sequence[str],
    now: float,
    ttl: float,
) -> Steps[tuple[dict[str, int], list[NodeInfo], list[LeaseInfo]]]:
    """
    This node's heartbeat, and the renewal of the leases ``held`` (until ``now + ttl``):
    those still this process's, with their epochs; then every node and lease. Nodes gone
    for ten times ``ttl`` are forgotten.
    """
    yield Query(
        "INSERT INTO nodes (node_id, incarnation, host, pid, started_ts, heartbeat_ts)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
        " incarnation = excluded.incarnation, host = excluded.host, pid = excluded.pid,"
        " started_ts = excluded.started_ts, heartbeat_ts = excluded.heartbeat_ts",
        (node.node_id, incarnation, node.host, node.pid, node.started_ts, now),
        fetch="none",
    )
    yield Query("DELETE FROM nodes WHERE heartbeat_ts < ?", (now - 10 * ttl,), fetch="none")
    renewed: dict[str, int] = {}
    for chunk in _chunks(held):
        rows = yield Query(
            "UPDATE leases SET expires_ts = ?"
            f" WHERE incarnation = ? AND name IN ({_marks(chunk)}) RETURNING name, epoch",
            (now + ttl, incarnation, *chunk),
        )
        renewed.update((name, int(epoch)) for name, epoch in rows)
    nodes, leases = yield from read_cluster(ttl, now)
    return renewed, nodes, leases


def acquire_leases(
    owner: str,
    incarnation: str,
    names: Sequence[str],
    now: float,
    ttl: float,
    dead: Sequence[str] = (),
) -> Steps[dict[str, int]]:
    """
    Take those of ``names`` that are free, expired, this process's already, or held by one
    of the processes ``dead`` (known to be gone): each at a new epoch, until ``now +
    ttl``. The ones taken, with their epochs.
    """
    taken: dict[str, int] = {}
    holders = [incarnation, *dead]
    for chunk in _chunks(names):
        rows = yield Query(
            "UPDATE leases SET owner = ?, incarnation = ?, epoch = epoch + 1, expires_ts = ?"
            f" WHERE name IN ({_marks(chunk)}) AND (incarnation IS NULL"
            f" OR expires_ts IS NULL OR expires_ts < ? OR incarnation IN ({_marks(holders)}))"
            " RETURNING name, epoch",
            (owner, incarnation, now + ttl, *chunk, now, *holders),
        )
        taken.update((name, int(epoch)) for name, epoch in rows)
    return taken


def _release(incarnation: str, names: Sequence[str]) -> Steps[int]:
    released = 0
    for chunk in _chunks(names):
        released += yield Query(
            "UPDATE leases SET owner = NULL, incarnation = NULL, expires_ts = NULL"
            f" WHERE incarnation = ? AND name IN ({_marks(chunk)})",
            (incarnation, *chunk),
            fetch="count",
        )
    return released


def release_leases(incarnation: str, names: Sequence[str]) -> Steps[None]:
    """
    Give back those of ``names`` this process holds: free at once, for any node, and the
    other nodes are told (they look at their shares at once, not at their next renewal).
    """
    if (yield from _release(incarnation, names)):
        yield Notify(RELEASED_CHANNEL)


def leave(node_id: str, incarnation: str, held: Sequence[str]) -> Steps[None]:
    """
    This node stops: it gives back the leases it ``held`` and its heartbeat row goes, in
    one transaction, so that the others see it gone when they are told.
    """
    released = yield from _release(incarnation, held)
    deleted = yield Query(
        "DELETE FROM nodes WHERE node_id = ? AND incarnation = ?",
        (node_id, incarnation),
        fetch="count",
    )
    if released or deleted:
        yield Notify(RELEASED_CHANNEL)
