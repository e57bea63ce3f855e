"""The ``files`` table: one row per file in the pool, addressed by its SHA-256.

This module is the only writer of the catalog's file rows (``hash``,
``filename``, ``size``, ``created``). The copy counts on each row are kept
by the triggers on ``uploads`` (see :mod:`cloudmanager.db.copies`); the
cache columns are written by :mod:`cloudmanager.db.cache_index`.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional

from .connection import Database, in_list

log = logging.getLogger(__name__)


class FileRow(NamedTuple):
    """A file as the pool records it."""

    hash: str
    filename: str
    size: int
    created: int
    #: Distinct hosts holding a good copy (claimed or verified).
    copies: int
    #: Of those, hosts whose copy this node uploaded or checked itself.
    verified: int
    cached: bool
    last_access: float
    #: Pinned explicitly by the user.
    pinned: bool


class FileState(NamedTuple):
    """What a batch needs to know of a file it is about to write."""

    size: int
    cached: bool
    verified: int


_COLUMNS = "hash, filename, size, created, copies, verified, cached, last_access, pinned"


def _row(values: tuple) -> FileRow:
    h, name, size, created, copies, verified, cached, last_access, pinned = values
    return FileRow(h, name, size, created, copies, verified, bool(cached), last_access,
                   bool(pinned))


class Files:
    """Reads and writes of the ``files`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def exists(self, file_hash: str) -> bool:
        """Whether the pool has a record of ``file_hash``."""
        return self.db.read("SELECT 1 FROM files WHERE hash = ?",
                            (file_hash,)).fetchone() is not None

    def get(self, file_hash: str) -> Optional[FileRow]:
        """The file's row, or ``None``."""
        row = self.db.read("SELECT %s FROM files WHERE hash = ?" % _COLUMNS,
                           (file_hash,)).fetchone()
        return None if row is None else _row(row)

    def states(self, conn: sqlite3.Connection, hashes: Iterable[str]) -> Dict[str, FileState]:
        """``{hash: FileState}`` for the known ones among ``hashes`` (one statement)."""
        sql, param = in_list(hashes)
        return {h: FileState(size, bool(cached), verified)
                for h, size, cached, verified in conn.execute(
                    "SELECT hash, size, cached, verified FROM files WHERE hash " + sql,
                    (param,))}

    def add(self, conn: sqlite3.Connection, file_hash: str, filename: str, size: int,
            created: int, size_known: bool = False) -> str:
        """Insert a file row if it is new, or fill in a missing filename.

        Call inside :meth:`~cloudmanager.db.connection.Database.transaction`.

        :param size_known: the caller hashed the bytes itself, so ``size`` is
            right; it corrects a size that came from an import (the row cannot
            be cached then, since caching records a measured size)
        :return: ``"new"``, ``"named"`` (a filename was filled in), ``"same"``,
            ``"corrected"`` (the size was fixed), or ``"conflict"`` when the
            pool knows this hash with another size
        """
        row = conn.execute("SELECT size, filename, cached FROM files WHERE hash = ?",
                           (file_hash,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO files (hash, filename, size, created) VALUES (?, ?, ?, ?)",
                         (file_hash, filename, size, created))
            return "new"
        if row[0] != size:
            if not size_known or row[2]:
                return "conflict"
            conn.execute("UPDATE files SET size = ? WHERE hash = ?", (size, file_hash))
            log.warning("%s was recorded with %d bytes (from an import); it has %d",
                        file_hash, row[0], size)
            return "corrected"
        if filename and not row[1]:
            conn.execute("UPDATE files SET filename = ? WHERE hash = ?", (filename, file_hash))
            return "named"
        return "same"

    def insert_cached(self, conn: sqlite3.Connection, rows: Iterable[tuple], when: float) -> None:
        """Record new files as cached, in one statement (inside a transaction).

        :param rows: ``(hash, filename, size, created)`` of files the pool
            does not know yet
        :param when: their LRU clock
        """
        conn.executemany(
            "INSERT INTO files (hash, filename, size, created, cached, last_access)"
            " VALUES (?, ?, ?, ?, 1, ?)", [(h, n, s, c, when) for h, n, s, c in rows])

    def forget(self, conn: sqlite3.Connection, file_hash: str) -> bool:
        """Delete a file's record; its copies' rows and queue entry go with it.

        :return: True if the pool had the file
        """
        return conn.execute("DELETE FROM files WHERE hash = ?", (file_hash,)).rowcount > 0

    def has_any(self) -> bool:
        """Whether the pool has any file (one index probe)."""
        return self.db.read("SELECT 1 FROM files LIMIT 1").fetchone() is not None

    def count(self) -> int:
        """Number of files in the pool. Counts rows: for stats, not hot paths."""
        return int(self.db.read("SELECT count(*) FROM files").fetchone()[0])

    def copies(self, file_hash: str) -> int:
        """Number of distinct hosts holding a good copy of the file (0 if unknown)."""
        row = self.db.read("SELECT copies FROM files WHERE hash = ?", (file_hash,)).fetchone()
        return row[0] if row else 0

    def verified(self, file_hash: str) -> int:
        """Number of distinct hosts with a copy this node made or verified."""
        row = self.db.read("SELECT verified FROM files WHERE hash = ?", (file_hash,)).fetchone()
        return row[0] if row else 0

    def below_target(self, target: int) -> List[str]:
        """Hashes of files with fewer than ``target`` good copies, fewest first."""
        return [r[0] for r in self.db.read(
            "SELECT hash FROM files WHERE copies < ? ORDER BY copies, hash", (target,))]

    def count_below(self, target: int) -> int:
        """Number of files with fewer than ``target`` good copies (uses an index)."""
        return int(self.db.read("SELECT count(*) FROM files WHERE copies < ?",
                                (target,)).fetchone()[0])

    def without_remote_copy(self, conn: sqlite3.Connection) -> List[tuple]:
        """``[(hash, cached, queued)]`` of files no host holds a good copy of.

        A range scan of the ``files_copies`` index.
        """
        return [(h, bool(c), bool(q)) for h, c, q in conn.execute(
            "SELECT f.hash, f.cached, q.hash IS NOT NULL FROM files AS f"
            " LEFT JOIN upload_queue AS q ON q.hash = f.hash"
            " WHERE f.copies = 0 ORDER BY f.hash")]

    def listing(self) -> Iterator[FileRow]:
        """Every file, by filename then hash, streamed from one cursor."""
        for row in self.db.read("SELECT %s FROM files ORDER BY filename, hash" % _COLUMNS):
            yield _row(row)

    def with_prefix(self, prefix: str, limit: int = 2) -> List[str]:
        """Up to ``limit`` hashes starting with the hex ``prefix``, in order.

        A range scan on the primary key, so O(log n) however large the pool.
        """
        # 'g' sorts after every hex digit: [prefix, prefix + 'g') is the range.
        return [row[0] for row in self.db.read(
            "SELECT hash FROM files WHERE hash >= ? AND hash < ? ORDER BY hash LIMIT ?",
            (prefix, prefix + "g", limit))]
