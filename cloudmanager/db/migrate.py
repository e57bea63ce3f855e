"""Copying a pool's rows from one database to another: ``cm migrate``.

Not the schema's migrations (those are :data:`~cloudmanager.db.connection.MIGRATIONS`):
this moves a whole pool between SQLite and PostgreSQL, either way, by copying
every row of its catalog and of this node's cache index into an empty
database of the same schema version. :mod:`cloudmanager.migrate` opens the
databases and decides what goes where; the statements are here.

Rows are read in batches in primary-key order (keyset pagination: each batch
starts after the last key of the one before), so neither side holds a large
table in memory and no read slows down as it goes, and each batch is
written with one ``executemany``. The statements are in SQLite's dialect;
on PostgreSQL :func:`~cloudmanager.db.postgres.translate` turns them over.

What is not copied, and why:

- ``leases``: each names a session (a running process) that holds a piece of
  work for a few minutes. A pool is moved while no process uses it, so
  every lease is of a process that is gone; it could only delay that work
  on the new catalog until it ran out.
- ``sessions`` and ``reservations``: the open instances of this node and the
  space promised to their writes in flight; none is open (see above).
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import urllib.parse
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

from .connection import Conn
from .copies import recount

#: Rows per batch read from the source and written to the destination.
BATCH = 5000


class Table(NamedTuple):
    """A table as it is copied: its columns, and its primary key (the order of
    the batches; empty for a table of one row)."""

    name: str
    columns: Tuple[str, ...]
    key: Tuple[str, ...]


#: The catalog's tables that are copied, in the order they are: a file's row
#: comes before its copies' and its queue entry's (foreign keys).
CATALOG_TABLES = (
    Table("files", ("hash", "filename", "size", "created", "copies", "verified"), ("hash",)),
    Table("uploads", ("hash", "host_name", "url", "state", "time", "checked", "next_check",
                      "strikes", "object_sha256", "object_size", "key_id"),
          ("hash", "host_name", "url")),
    Table("tombstones", ("hash", "host_name", "url", "deleted"), ("hash", "host_name", "url")),
    Table("removals", ("hash", "owner", "started"), ("hash",)),
    Table("upload_queue", ("hash", "queued", "attempts", "last_error", "node"), ("hash",)),
    Table("host_health", ("host_name", "successes", "failures", "consecutive_failures",
                          "last_error", "last_success", "last_failure", "latency_samples"),
          ("host_name",)),
    Table("transfers", ("month", "node", "uploaded", "downloaded"), ("month", "node")),
    Table("nodes", ("node", "hostname", "first_seen", "last_seen"), ("node",)),
    Table("published", ("hash", "exported", "source"), ("hash",)),
    Table("pool_state", ("name", "value"), ("name",)),
    Table("trees", ("hash", "name", "created"), ("hash",)),
)
#: The cache index's tables that are copied; ``counters`` (a fixed set of
#: rows the schema makes) is copied last, over what the triggers summed.
INDEX_TABLES = (
    Table("this_node", ("node",), ()),
    Table("cache_entries", ("hash", "size", "cached", "last_access", "pinned", "protected"),
          ("hash",)),
    Table("sources", ("path", "size", "mtime_ns", "ctime_ns", "inode", "device", "hash"),
          ("path",)),
)
COUNTERS = Table("counters", ("name", "value"), ("name",))
#: Tables that are not copied (see the module's docstring).
NOT_COPIED = ("leases", "sessions", "reservations")


def batches(conn: Conn, table: Table, batch: int = BATCH) -> Iterator[List[tuple]]:
    """The rows of ``table`` on ``conn``, in batches of at most ``batch``, in key order.

    Each batch is one statement that starts after the last key of the one
    before (a range scan of the primary key), so memory stays bounded by a
    batch on either kind of database.
    """
    columns = ", ".join(table.columns)
    if not table.key:
        rows = [tuple(r) for r in conn.execute("SELECT %s FROM %s" % (columns, table.name))]
        if rows:
            yield rows
        return
    key = ", ".join(table.key)
    positions = [table.columns.index(k) for k in table.key]
    first = "SELECT %s FROM %s ORDER BY %s LIMIT ?" % (columns, table.name, key)
    after = "SELECT %s FROM %s WHERE (%s) > (%s) ORDER BY %s LIMIT ?" % (
        columns, table.name, key, ", ".join("?" * len(table.key)), key)
    last: Optional[tuple] = None
    while True:
        if last is None:
            rows = [tuple(r) for r in conn.execute(first, (batch,))]
        else:
            rows = [tuple(r) for r in conn.execute(after, (*last, batch))]
        if not rows:
            return
        yield rows
        if len(rows) < batch:
            return
        last = tuple(rows[-1][i] for i in positions)


def insert_sql(table: Table) -> str:
    """The statement that inserts one row of ``table``."""
    return "INSERT INTO %s (%s) VALUES (%s)" % (
        table.name, ", ".join(table.columns), ", ".join("?" * len(table.columns)))


def copy_table(source: Conn, destination: Conn, table: Table, batch: int = BATCH) -> int:
    """Copy every row of ``table``; :return: how many."""
    sql = insert_sql(table)
    copied = 0
    for rows in batches(source, table, batch):
        destination.executemany(sql, rows)
        copied += len(rows)
    return copied


def copy_counters(source: Conn, destination: Conn) -> int:
    """Set the destination's running totals to the source's (the triggers
    summed the cache entries as they went in; the source's own values are
    kept, drift and all, as fsck would find them there)."""
    rows = [tuple(r) for r in source.execute("SELECT name, value FROM counters ORDER BY name")]
    destination.executemany("INSERT INTO counters (name, value) VALUES (?, ?)"
                            " ON CONFLICT (name) DO UPDATE SET value = excluded.value", rows)
    return len(rows)


def nonempty(conn: Conn, tables: Sequence[Table]) -> List[str]:
    """The names of those of ``tables`` that hold a row."""
    return [t.name for t in tables
            if conn.execute("SELECT 1 FROM %s LIMIT 1" % t.name).fetchone() is not None]


def index_is_empty(conn: Conn) -> bool:
    """Whether a cache index holds nothing but what its schema made: no row
    in its copied tables, and every running total at zero."""
    return not nonempty(conn, INDEX_TABLES) and conn.execute(
        "SELECT count(*) FROM counters WHERE value != 0").fetchone()[0] == 0


def clear_index(conn: Conn) -> None:
    """Empty a cache index again (a move whose catalog did not commit)."""
    for table in reversed(INDEX_TABLES):
        conn.execute("DELETE FROM %s" % table.name)
    conn.execute("UPDATE counters SET value = 0")


def live_leases(conn: Conn, now: float) -> List[tuple]:
    """``[(kind, hash, owner, until)]`` of the leases not run out by ``now``:
    work some process (maybe on another node) is doing."""
    return [tuple(r) for r in conn.execute(
        "SELECT kind, hash, owner, until FROM leases WHERE until >= ? ORDER BY until DESC",
        (now,))]


def recount_copies(conn: Conn) -> None:
    """Recount every file's ``copies``/``verified`` on the destination from
    its copies, which went in as plain rows (see :mod:`~cloudmanager.db.copies`)."""
    recount(conn)


def count_differences(source: Conn, destination: Conn, batch: int = BATCH) -> List[str]:
    """Hashes of files whose ``copies``/``verified`` differ between the two.

    The destination's counts were recomputed from its copies
    (:func:`recount_copies`); the same counts on both sides mean the source's
    were right. Both are read in hash order, a batch at a time.
    """
    table = Table("files", ("hash", "copies", "verified"), ("hash",))
    pairs = itertools.zip_longest(_rows(source, table, batch), _rows(destination, table, batch))
    return [(ours or theirs)[0] for ours, theirs in pairs if ours != theirs]


def _rows(conn: Conn, table: Table, batch: int) -> Iterator[tuple]:
    for rows in batches(conn, table, batch):
        yield from rows


def sqlite_contents(path: str) -> Optional[str]:
    """What an existing SQLite file is, read without changing it: ``None`` if
    it does not exist or is empty, ``"pool"`` (a pool database, catalog and
    cache index), ``"index"`` (a node's cache index alone), ``"other"`` (not
    cloudmanager's).

    Opened read-only through SQLite (the descriptor rule of
    :mod:`~cloudmanager.db.connection`).

    :raises sqlite3.Error: if it is not a SQLite file
    """
    try:
        if os.path.getsize(path) == 0:
            return None
    except FileNotFoundError:
        return None
    uri = "file:%s?mode=ro" % urllib.parse.quote(path)
    conn = sqlite3.connect(uri, uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()
    if not names:
        return None
    if not version:
        return "other"
    return "pool" if "files" in names else "index" if "cache_entries" in names else "other"

