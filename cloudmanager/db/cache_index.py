"""This node's cache index: which files are cached, their LRU clock, pins, and
the running totals of cached bytes and files (kept by triggers).

Written only by :mod:`cloudmanager.cache` and the checks of
:mod:`cloudmanager.fsck` (through this module). The columns live on the
``files`` rows today (``cached``, ``last_access``, ``pinned``) and the totals
in ``counters``; nothing outside this module names them in SQL, so they can
move to a file of their own beside the storage directory when the catalog
moves to a server.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Iterable, List, NamedTuple, Optional, Tuple

from .connection import Database


class CacheState(NamedTuple):
    size: int
    cached: bool


class Totals(NamedTuple):
    bytes: int
    files: int


class CacheIndex:
    """Reads and writes of the cache index."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- the hot path ---------------------------------------------------------------

    def state(self, file_hash: str) -> Optional[CacheState]:
        """``(size, cached)`` for a known file, or ``None``. One key lookup."""
        row = self.db.read("SELECT size, cached FROM files WHERE hash = ?",
                           (file_hash,)).fetchone()
        return None if row is None else CacheState(row[0], bool(row[1]))

    def is_cached(self, file_hash: str) -> bool:
        """Whether the index says the cache holds ``file_hash``."""
        state = self.state(file_hash)
        return bool(state and state.cached)

    def counter(self, name: str, conn: Optional[sqlite3.Connection] = None) -> int:
        """A running total: ``cached_bytes``, ``cached_files``, ``hits`` or ``misses``."""
        row = (conn or self.db.connection).execute(
            "SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    # -- writes ----------------------------------------------------------------------

    def set_cached(self, conn: sqlite3.Connection, hashes: Iterable[str], cached: bool,
                   when: Optional[float] = None) -> None:
        """Mark files cached (with their LRU clock set to ``when``) or not."""
        if cached:
            when = time.time() if when is None else when
            conn.executemany("UPDATE files SET cached = 1, last_access = ? WHERE hash = ?",
                             [(when, h) for h in hashes])
        else:
            conn.executemany("UPDATE files SET cached = 0 WHERE hash = ?",
                             [(h,) for h in hashes])

    def touch(self, accesses: Iterable[Tuple[str, float]],
              conn: Optional[sqlite3.Connection] = None) -> None:
        """Apply deferred LRU clock updates ``[(hash, when)]`` (in their own
        transaction unless ``conn`` is given)."""
        rows = [(when, h) for h, when in accesses]
        sql = ("UPDATE files SET last_access = max(last_access, ?)"
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

    def pin(self, file_hash: str, pinned: bool) -> bool:
        """Set or clear the explicit pin of a file. :return: True if it exists."""
        with self.db.transaction() as conn:
            return conn.execute("UPDATE files SET pinned = ? WHERE hash = ?",
                                (1 if pinned else 0, file_hash)).rowcount == 1

    def eviction_candidates(self, conn: sqlite3.Connection) -> sqlite3.Cursor:
        """Least recently used evictable files, as a cursor of ``(hash, size, last_access)``.

        Evictable means cached, on at least one host this node uploaded to or
        verified a download from, and not pinned. The WHERE clause matches
        the partial index ``files_lru`` (whose entries are ``(last_access,
        hash)``), so this is an index range scan that yields rows as they
        are read: the caller takes as many as it needs, O(log n + taken),
        then closes the cursor.
        """
        return conn.execute(
            "SELECT hash, size, last_access FROM files"
            " WHERE cached = 1 AND verified > 0 AND pinned = 0"
            " ORDER BY last_access, hash")

    # -- reconciliation and checks (scans: never on a hot path) ---------------------

    def cached_rows(self, conn: Optional[sqlite3.Connection] = None) -> List[Tuple[str, int]]:
        """``[(hash, size)]`` of every file the index says is cached. Scans rows."""
        return (conn or self.db.connection).execute(
            "SELECT hash, size FROM files WHERE cached = 1").fetchall()

    def recount(self, conn: sqlite3.Connection) -> Totals:
        """Recompute the cached bytes and files totals from the rows."""
        size, count = conn.execute(
            "SELECT coalesce(sum(size), 0), count(*) FROM files WHERE cached = 1").fetchone()
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
            " FROM files WHERE cached = 1").fetchone()
        return Totals(row[0], row[1]), Totals(row[2] or 0, row[3] or 0)

    def totals_negative(self, conn: sqlite3.Connection) -> bool:
        """Whether a running total is below zero (cheap: two key lookups)."""
        return conn.execute("SELECT count(*) FROM counters WHERE value < 0"
                            " AND name IN ('cached_bytes', 'cached_files')").fetchone()[0] > 0

    def pins_without_file(self, conn: sqlite3.Connection) -> List[str]:
        """Hashes of files pinned explicitly but not cached."""
        return [r[0] for r in conn.execute(
            "SELECT hash FROM files WHERE pinned = 1 AND cached = 0 ORDER BY hash")]
