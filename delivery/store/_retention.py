"""
What housekeeping does to the database, as ``_sql`` operations (see
``delivery.housekeeping`` for when and how often).

An event's row may go once all of these hold: the sorter is past it; no ``service_queue``
row holds it; no stored transaction's range (``first_stream_id`` to ``last_stream_id``)
holds it, so that a transaction stored before positions were kept with it can still be
split; no dead letter holds it (a redriven dead letter is queued again, and queue reads
join ``events``); and it is older than the retention. Its id then moves to
``seen_events`` (replay copies have no id of a producer's, and do not), so ingest stays
idempotent for the dedupe window.

Each batch is one short transaction under the ingest lock: ingest, which looks an id up
in ``events`` and then in ``seen_events``, never sees an id in neither while it moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._schema import Dialect
from ._sql import INGEST_LOCK, Insert, Lock, Query, Steps

#: the most parameters one statement is given
_CHUNK = 500

#: ``PRAGMA auto_vacuum``'s value for incremental vacuuming
_INCREMENTAL = 2

#: the tables whose rows are counted for the metrics
TABLES = (
    "events",
    "seen_events",
    "service_queue",
    "transactions",
    "dead_letters",
    "attempts",
)


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def forget_events(rows: Sequence[tuple[int, str, float]]) -> Steps[None]:
    """
    Delete events' rows, keeping their ids in ``seen_events``: ``rows`` are
    ``(stream_id, event_id, received_ts)``. The caller holds the ingest lock.
    """
    if not rows:
        return
    yield Insert(
        "seen_events",
        ("event_id", "stream_id", "received_ts"),
        ("text", "bigint", "float8"),
        [(event_id, stream_id, ts) for stream_id, event_id, ts in rows],
        conflict="ON CONFLICT DO NOTHING",
    )
    for chunk in _chunks([stream_id for stream_id, _, _ in rows]):
        yield Query(
            f"DELETE FROM events WHERE stream_id IN ({','.join('?' * len(chunk))})",
            list(chunk),
            fetch="count",
        )


def delete_events(
    after: int, limit: int, cutoff_ts: float, dedupe_cutoff_ts: float
) -> Steps[tuple[int, int | None]]:
    """
    One batch: look at up to ``limit`` events the sorter is past, above position
    ``after``, and delete those no one needs that arrived before ``cutoff_ts`` (their ids
    kept unless they arrived before ``dedupe_cutoff_ts``). How many were deleted, and the
    position to go on from, or None when the pass is over (nothing left to look at, or an
    event too young: those after it are younger still).
    """
    yield Lock(INGEST_LOCK)
    rows = yield Query(
        "SELECT stream_id, event_id, received_ts, replay_for FROM events"
        " WHERE stream_id > ? AND stream_id <= (SELECT stream_id FROM sorter_position)"
        " ORDER BY stream_id LIMIT ?",
        (after, limit),
    )
    if not rows:
        return 0, None
    lo, hi = rows[0][0], rows[-1][0]
    # What holds an event in the range, read in one statement (one snapshot): an event
    # moves from a queue to a stored transaction to a dead letter and back to a queue in
    # transactions of their own, and reads one after the other could miss it in between.
    # Each service's queue rows are found through the (service_id, stream_id) key.
    holders = yield Query(
        "SELECT stream_id, stream_id FROM service_queue WHERE service_id IN (SELECT"
        " service_id FROM services) AND stream_id BETWEEN ? AND ?"
        " UNION ALL SELECT stream_id, stream_id FROM dead_letters"
        " WHERE stream_id BETWEEN ? AND ?"
        " UNION ALL SELECT first_stream_id, last_stream_id FROM transactions"
        " WHERE first_stream_id <= ? AND last_stream_id >= ?",
        (lo, hi, lo, hi, hi, lo),
    )
    needed = {a for a, b in holders if a == b}
    ranges = [(a, b) for a, b in holders if a != b]
    doomed: list[tuple[int, str, float]] = []
    copies: list[int] = []
    cursor: int | None = hi if len(rows) == limit else None
    for stream_id, event_id, received_ts, replay_for in rows:
        if received_ts >= cutoff_ts:
            cursor = None
            break
        if stream_id in needed or any(a <= stream_id <= b for a, b in ranges):
            continue
        if replay_for is not None:
            copies.append(stream_id)
        else:
            doomed.append((stream_id, event_id, received_ts))
    kept_ids = [row for row in doomed if row[2] >= dedupe_cutoff_ts]
    yield from forget_events(kept_ids)
    expired = [row[0] for row in doomed if row[2] < dedupe_cutoff_ts]
    for chunk in _chunks(expired + copies):
        yield Query(
            f"DELETE FROM events WHERE stream_id IN ({','.join('?' * len(chunk))})",
            list(chunk),
            fetch="count",
        )
    if doomed:
        top = max(doomed)  # the highest position (and, nearly always, the latest time)
        latest = max(ts for _, _, ts in doomed)
        yield Query(
            "UPDATE housekeeping SET deleted_stream_id = ? WHERE deleted_stream_id < ?",
            (top[0], top[0]),
            fetch="count",
        )
        yield Query(
            "UPDATE housekeeping SET deleted_ts = ? WHERE deleted_ts IS NULL OR deleted_ts < ?",
            (latest, latest),
            fetch="count",
        )
    return len(doomed) + len(copies), cursor


def prune_seen(cutoff_ts: float, limit: int) -> Steps[int]:
    """Forget up to ``limit`` ids of events that arrived before ``cutoff_ts``; how many."""
    count = yield Query(
        "DELETE FROM seen_events WHERE event_id IN (SELECT event_id FROM seen_events"
        " WHERE received_ts < ? ORDER BY received_ts LIMIT ?)",
        (cutoff_ts, limit),
        fetch="count",
    )
    return int(count)


def free_pages(dialect: Dialect) -> Steps[int]:
    """
    Pages of the database file that hold nothing and that :func:`reclaim_pages` can give
    back to the file system: SQLite's free list, when the database vacuums incrementally
    (``auto_vacuum = INCREMENTAL``, which every database created since schema 5 does); 0
    for one that does not, and for PostgreSQL, whose autovacuum frees space.
    """
    if dialect.name != "sqlite":
        return 0
    (mode,) = yield Query("PRAGMA auto_vacuum", fetch="one")
    if int(mode) != _INCREMENTAL:
        return 0
    (pages,) = yield Query("PRAGMA freelist_count", fetch="one")
    return int(pages)


def reclaim_pages(dialect: Dialect, pages: int) -> Steps[int]:
    """
    Give up to ``pages`` free pages back to the file system (SQLite moves pages from the
    file's end into free ones and truncates it); how many went.
    """
    before = yield from free_pages(dialect)
    for _ in range(min(pages, before)):
        # Python's sqlite3 steps a statement once when it returns no columns, and this
        # one frees a page per step: one page per statement
        yield Query("PRAGMA incremental_vacuum(1)")
    after = yield from free_pages(dialect)
    return before - after


def database_stats(dialect: Dialect) -> Steps[tuple[int, dict[str, int]]]:
    """
    The database's size in bytes and the rows of each table of :data:`TABLES`: counted
    in SQLite (the file's pages, free ones included: they are reused, or given back by
    :func:`reclaim_pages`), PostgreSQL's estimates from its statistics
    (``pg_stat_user_tables.n_live_tup``).
    """
    if dialect.name == "sqlite":
        (pages,) = yield Query("PRAGMA page_count", fetch="one")
        (page_size,) = yield Query("PRAGMA page_size", fetch="one")
        rows = {}
        for table in TABLES:
            (count,) = yield Query(f"SELECT COUNT(*) FROM {table}", fetch="one")
            rows[table] = int(count)
        return int(pages) * int(page_size), rows
    (size,) = yield Query("SELECT pg_database_size(current_database())", fetch="one")
    found = yield Query(
        "SELECT relname, n_live_tup FROM pg_stat_user_tables"
        f" WHERE relname IN ({','.join('?' * len(TABLES))})",
        list(TABLES),
    )
    counts = {name: int(count) for name, count in found}
    return int(size), {table: counts.get(table, 0) for table in TABLES}
