"""This node's cache index: the ``cache_entries`` and ``counters`` tables.

A row per file this node caches or pins: whether the storage directory holds
it, its LRU clock, the user's pin, and whether some host verifiably holds it
(``protected``: only protected files may be evicted). The running totals of
cached bytes and files are kept here, once per write batch, with the hit
and miss counts (no trigger: two counter updates per row cost a batch of
new files a third of its time in the database).

Written only by :mod:`cloudmanager.cache.store` and the repairs of
:mod:`cloudmanager.cache.fsck` (through this module), and, for ``protected``, by
:mod:`cloudmanager.replication`. No statement here reads the catalog, so the
index can live in a file of its own beside the storage directory when the
catalog moves to a server.
"""

from __future__ import annotations

import sqlite3
from typing import Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from .connection import Database, in_list, json_list


class CacheState(NamedTuple):
    size: int
    cached: bool


class CacheEntry(NamedTuple):
    hash: str
    size: int
    cached: bool
    last_access: float
    pinned: bool
    protected: bool


class Totals(NamedTuple):
    bytes: int
    files: int


class CacheIndex:
    """Reads and writes of the cache index."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- the hot path ---------------------------------------------------------------

    def state(self, file_hash: str) -> Optional[CacheState]:
        """``(size, cached)`` of a file this node caches or pins, or ``None``. One
        key lookup."""
        row = self.db.read("SELECT size, cached FROM cache_entries WHERE hash = ?",
                           (file_hash,)).fetchone()
        return None if row is None else CacheState(row[0], bool(row[1]))

    def is_cached(self, file_hash: str) -> bool:
        """Whether the index says the cache holds ``file_hash``."""
        state = self.state(file_hash)
        return bool(state and state.cached)

    def entry(self, file_hash: str) -> Optional[CacheEntry]:
        """The file's whole row, or ``None``."""
        row = self.db.read("SELECT hash, size, cached, last_access, pinned, protected"
                           " FROM cache_entries WHERE hash = ?", (file_hash,)).fetchone()
        return None if row is None else CacheEntry(row[0], row[1], bool(row[2]), row[3],
                                                   bool(row[4]), bool(row[5]))

    def entries_among(self, hashes: Iterable[str]) -> Dict[str, CacheEntry]:
        """``{hash: CacheEntry}`` for those of ``hashes`` this node caches or pins."""
        return {row[0]: CacheEntry(row[0], row[1], bool(row[2]), row[3], bool(row[4]),
                                   bool(row[5])) for row in self.db.read(
            "SELECT c.hash, c.size, c.cached, c.last_access, c.pinned, c.protected"
            " FROM json_each(?) AS j JOIN cache_entries AS c ON c.hash = j.value",
            (json_list(hashes),))}

    def cached_among(self, hashes: Iterable[str],
                     conn: Optional[sqlite3.Connection] = None) -> Set[str]:
        """Those of ``hashes`` the index says are cached."""
        return {h for (h,) in (conn or self.db.connection).execute(
            "SELECT c.hash FROM json_each(?) AS j JOIN cache_entries AS c ON c.hash = j.value"
            " WHERE c.cached = 1", (json_list(hashes),))}

    def counter(self, name: str, conn: Optional[sqlite3.Connection] = None) -> int:
        """A running total: ``cached_bytes``, ``cached_files``, ``hits`` or ``misses``."""
        row = (conn or self.db.connection).execute(
            "SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    # -- writes ----------------------------------------------------------------------

    def put(self, conn: sqlite3.Connection, entries: Iterable[Tuple[str, int, bool]],
            when: float, new: bool = False,
            cached_before: Optional[Dict[str, int]] = None) -> None:
        """Record files ``[(hash, size, protected)]`` as cached, used at ``when``.

        :param new: none of them has a row yet (files the pool just learned
            of): a plain insert, cheaper than an upsert
        :param cached_before: ``{hash: size}`` of those the index says are
            cached, when the caller read that in this transaction (the
            counters follow from it; None: read it here)
        """
        entries = list(entries)
        if not entries:
            return
        if new:
            conn.executemany(
                "INSERT INTO cache_entries (hash, size, cached, last_access, protected)"
                " VALUES (?, ?, 1, ?, ?)",
                [(h, size, when, 1 if protected else 0) for h, size, protected in entries])
            self._count(conn, sum(size for _, size, _ in entries), len(entries))
            return
        before = self._cached_sizes(conn, [h for h, _, _ in entries]) \
            if cached_before is None else cached_before
        conn.executemany(
            "INSERT INTO cache_entries (hash, size, cached, last_access, protected)"
            " VALUES (?, ?, 1, ?, ?) ON CONFLICT (hash) DO UPDATE SET cached = 1,"
            " size = excluded.size, last_access = excluded.last_access,"
            " protected = excluded.protected",
            [(h, size, when, 1 if protected else 0) for h, size, protected in entries])
        after = {h: size for h, size, _ in entries}
        self._count(conn, sum(after.values()) - sum(before.values()),
                    len(after) - len(before))

    def put_new(self, conn: sqlite3.Connection, file_hash: str, size: int, protected: bool,
                when: float) -> bool:
        """Record a file as cached, used at ``when``, if the index has no row
        for it (one statement); :return: False, having written nothing, if it
        has one (then see :meth:`put`)."""
        if conn.execute("INSERT INTO cache_entries (hash, size, cached, last_access, protected)"
                        " VALUES (?, ?, 1, ?, ?) ON CONFLICT (hash) DO NOTHING",
                        (file_hash, size, when, 1 if protected else 0)).rowcount != 1:
            return False
        self._count(conn, size, 1)
        return True

    def _cached_sizes(self, conn: sqlite3.Connection, hashes: Iterable[str]) -> Dict[str, int]:
        """``{hash: size}`` of those of ``hashes`` cached now (before a write
        changes them: the counters follow from the difference)."""
        fragment, param = in_list(hashes)
        return {h: size for h, size in conn.execute(
            "SELECT hash, size FROM cache_entries WHERE cached = 1 AND hash " + fragment,
            (param,))}

    def _count(self, conn: sqlite3.Connection, delta_bytes: int, delta_files: int) -> None:
        """Move the ``cached_bytes`` and ``cached_files`` totals, once per batch
        (this module is the only writer of ``cache_entries``: no trigger pays
        two counter updates per row)."""
        if delta_bytes or delta_files:
            conn.executemany("UPDATE counters SET value = value + ? WHERE name = ?",
                             [(delta_bytes, "cached_bytes"), (delta_files, "cached_files")])

    def uncache(self, conn: sqlite3.Connection, hashes: Iterable[str]) -> None:
        """Mark files not cached; rows that only said that go."""
        rows = [(h,) for h in hashes]
        if not rows:
            return
        before = self._cached_sizes(conn, [h for (h,) in rows])
        conn.executemany("DELETE FROM cache_entries WHERE hash = ? AND pinned = 0", rows)
        conn.executemany("UPDATE cache_entries SET cached = 0 WHERE hash = ?", rows)
        self._count(conn, -sum(before.values()), -len(before))

    def evict(self, conn: sqlite3.Connection, victims: Dict[str, int]) -> None:
        """Drop the rows of evicted files ``{hash: size}``, read in this
        transaction from :meth:`eviction_candidates` (so cached and not
        pinned: nothing of their rows is left to keep)."""
        if victims:
            conn.executemany("DELETE FROM cache_entries WHERE hash = ?",
                             [(h,) for h in victims])
            self._count(conn, -sum(victims.values()), -len(victims))

    def forget(self, conn: sqlite3.Connection, hashes: Iterable[str]) -> None:
        """Drop files' rows, pins included (the pool forgot them)."""
        hashes = list(hashes)
        if not hashes:
            return
        before = self._cached_sizes(conn, hashes)
        conn.executemany("DELETE FROM cache_entries WHERE hash = ?", [(h,) for h in hashes])
        self._count(conn, -sum(before.values()), -len(before))

    def set_protected(self, conn: sqlite3.Connection, hashes: Iterable[str],
                      protected: bool) -> None:
        """Record whether some host verifiably holds these files (only then may
        they be evicted)."""
        fragment, param = in_list(hashes)
        conn.execute("UPDATE cache_entries SET protected = ? WHERE hash " + fragment,
                     (1 if protected else 0, param))

    def touch(self, accesses: Iterable[Tuple[str, float]],
              conn: Optional[sqlite3.Connection] = None) -> None:
        """Apply deferred LRU clock updates ``[(hash, when)]`` (in their own
        transaction unless ``conn`` is given)."""
        rows = [(when, h) for h, when in accesses]
        sql = ("UPDATE cache_entries SET last_access = max(last_access, ?)"
               " WHERE hash = ? AND cached = 1")
        if conn is not None:
            conn.executemany(sql, rows)
            return
        with self.db.transaction() as tx:
            tx.executemany(sql, rows)

    def add_hits(self, hits: int, misses: int) -> None:
        """Add to the cache hit and miss counters."""
        with self.db.transaction() as conn:
            conn.executemany("UPDATE counters SET value = value + ? WHERE name = ?",
                             [(hits, "hits"), (misses, "misses")])

    def pin(self, conn: sqlite3.Connection, file_hash: str, size: int, pinned: bool) -> None:
        """Set or clear the user's pin of a file of ``size`` bytes."""
        if pinned:
            conn.execute("INSERT INTO cache_entries (hash, size, pinned) VALUES (?, ?, 1)"
                         " ON CONFLICT (hash) DO UPDATE SET pinned = 1", (file_hash, size))
        else:
            conn.execute("DELETE FROM cache_entries WHERE hash = ? AND cached = 0", (file_hash,))
            conn.execute("UPDATE cache_entries SET pinned = 0 WHERE hash = ?", (file_hash,))

    def eviction_candidates(self, conn: sqlite3.Connection) -> sqlite3.Cursor:
        """Least recently used evictable files, as a cursor of ``(hash, size, last_access)``.

        Evictable means cached, protected (some host verifiably holds it) and
        not pinned. The WHERE clause matches the partial index ``cache_lru``
        (whose entries are ``(last_access, hash)``), so this is an index range
        scan that yields rows as they are read: the caller takes as many as it
        needs, O(log n + taken), then closes the cursor.
        """
        return conn.execute(
            "SELECT hash, size, last_access FROM cache_entries"
            " WHERE cached = 1 AND protected = 1 AND pinned = 0"
            " ORDER BY last_access, hash")

    # -- reconciliation and checks (scans: never on a hot path) ---------------------

    def cached_rows(self, conn: Optional[sqlite3.Connection] = None) -> List[Tuple[str, int]]:
        """``[(hash, size)]`` of every file the index says is cached. Scans rows."""
        return (conn or self.db.connection).execute(
            "SELECT hash, size FROM cache_entries WHERE cached = 1").fetchall()

    def recount(self, conn: sqlite3.Connection) -> Totals:
        """Recompute the cached bytes and files totals from the rows."""
        size, count = conn.execute(
            "SELECT coalesce(sum(size), 0), count(*) FROM cache_entries WHERE cached = 1"
        ).fetchone()
        conn.executemany("UPDATE counters SET value = ? WHERE name = ?",
                         [(size, "cached_bytes"), (count, "cached_files")])
        return Totals(size, count)

    def totals(self, conn: sqlite3.Connection) -> Tuple[Totals, Totals]:
        """The totals summed over the cached rows, and the running totals, read
        in one statement."""
        row = conn.execute(
            "SELECT coalesce(sum(size), 0), count(*),"
            " (SELECT value FROM counters WHERE name = 'cached_bytes'),"
            " (SELECT value FROM counters WHERE name = 'cached_files')"
            " FROM cache_entries WHERE cached = 1").fetchone()
        return Totals(row[0], row[1]), Totals(row[2] or 0, row[3] or 0)

    def totals_negative(self, conn: sqlite3.Connection) -> bool:
        """Whether a running total is below zero (cheap: two key lookups)."""
        return conn.execute("SELECT count(*) FROM counters WHERE value < 0"
                            " AND name IN ('cached_bytes', 'cached_files')").fetchone()[0] > 0

    def pins_without_file(self, conn: sqlite3.Connection) -> List[str]:
        """Hashes of files pinned explicitly but not cached."""
        return [r[0] for r in conn.execute(
            "SELECT hash FROM cache_entries WHERE pinned = 1 AND cached = 0 ORDER BY hash")]
