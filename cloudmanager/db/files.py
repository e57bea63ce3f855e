"""The ``files`` table: one row per file in the pool, addressed by its SHA-256.

This module is the only writer of the catalog's file rows (``hash``,
``filename``, ``size``, ``created``). The copy counts on each row are kept
by the triggers on ``uploads`` (see :mod:`cloudmanager.db.copies`). Whether
this node caches a file is not here but in :mod:`cloudmanager.db.cache_index`.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple

from .connection import Conn, Store, in_list, json_list

log = logging.getLogger(__name__)


class FileRow(NamedTuple):
    """A file as the catalog records it."""

    hash: str
    filename: str
    size: int
    created: int
    #: Distinct hosts believed to hold a copy (good, claimed or suspect).
    copies: int
    #: Of those, hosts whose copy this node made or checked itself.
    verified: int


class FileState(NamedTuple):
    """What a batch needs to know of a file it is about to write."""

    size: int
    verified: int


class Unprotected(NamedTuple):
    """A file no copy of which this node has verified."""

    hash: str
    #: Hosts claimed to hold it by other nodes' records.
    copies: int
    queued: bool
    #: The node whose cache holds it, queued ('' if not known).
    queued_on: str = ""


_COLUMNS = "hash, filename, size, created, copies, verified"


class Files:
    """Reads and writes of the ``files`` table."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def exists(self, file_hash: str) -> bool:
        """Whether the pool has a record of ``file_hash``."""
        return self.db.read("SELECT 1 FROM files WHERE hash = ?",
                            (file_hash,)).fetchone() is not None

    def get(self, file_hash: str) -> Optional[FileRow]:
        """The file's row, or ``None``."""
        row = self.db.read("SELECT %s FROM files WHERE hash = ?" % _COLUMNS,
                           (file_hash,)).fetchone()
        return None if row is None else FileRow(*row)

    def states(self, conn: Conn, hashes: Iterable[str]) -> Dict[str, FileState]:
        """``{hash: FileState}`` for the known ones among ``hashes`` (one statement)."""
        sql, param = in_list(hashes)
        return {h: FileState(size, verified) for h, size, verified in conn.execute(
            "SELECT hash, size, verified FROM files WHERE hash " + sql, (param,))}

    def add(self, conn: Conn, file_hash: str, filename: str, size: int,
            created: int, size_known: bool = False) -> str:
        """Insert a file row if it is new, or fill in a missing filename.

        Call inside :meth:`~cloudmanager.db.connection.Database.transaction`.

        :param size_known: the caller hashed the bytes itself, so ``size`` is
            right; it corrects a size that came from an import
        :return: ``"new"``, ``"named"`` (a filename was filled in), ``"same"``,
            ``"corrected"`` (the size was fixed), or ``"conflict"`` when the
            pool knows this hash with another size
        """
        # Insert first: a new file, the common case, is one statement.
        if conn.execute("INSERT INTO files (hash, filename, size, created) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (hash) DO NOTHING",
                        (file_hash, filename, size, created)).rowcount == 1:
            return "new"
        row = conn.execute("SELECT size, filename FROM files WHERE hash = ?",
                           (file_hash,)).fetchone()
        if row[0] != size:
            if not size_known:
                return "conflict"
            conn.execute("UPDATE files SET size = ? WHERE hash = ?", (size, file_hash))
            log.warning("%s was recorded with %d bytes (from an import); it has %d",
                        file_hash, row[0], size)
            return "corrected"
        if filename and not row[1]:
            conn.execute("UPDATE files SET filename = ? WHERE hash = ?", (filename, file_hash))
            return "named"
        return "same"

    def insert(self, conn: Conn, rows: Iterable[tuple]) -> None:
        """Record new files, in one statement (inside a transaction).

        :param rows: ``(hash, filename, size, created)`` of files the pool
            does not know yet
        """
        conn.executemany("INSERT INTO files (hash, filename, size, created) VALUES (?, ?, ?, ?)",
                         list(rows))

    def forget(self, conn: Conn, file_hash: str) -> bool:
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
        """Hashes of files with fewer than ``target`` copies this node verified,
        fewest first (a range scan of the ``files_verified`` index)."""
        return [r[0] for r in self.db.read(
            "SELECT hash FROM files WHERE verified < ? ORDER BY verified, hash", (target,))]

    def count_below(self, target: int) -> int:
        """Number of files with fewer than ``target`` verified copies (uses an index)."""
        return int(self.db.read("SELECT count(*) FROM files WHERE verified < ?",
                                (target,)).fetchone()[0])

    def unprotected(self, conn: Optional[Any]) -> List[Unprotected]:
        """Files with no copy this node verified, by hash (in the transaction of
        ``conn``, or, with None, as committed).

        A range scan of the ``files_verified`` index.
        """
        run = self.db.read if conn is None else conn.execute
        return [Unprotected(h, c, bool(q), node or "") for h, c, q, node in run(
            "SELECT f.hash, f.copies, q.hash IS NOT NULL, q.node FROM files AS f"
            " LEFT JOIN upload_queue AS q ON q.hash = f.hash"
            " WHERE f.verified = 0 ORDER BY f.hash")]

    def protected_among(self, conn: Optional[Any], hashes: Iterable[str]) -> Set[str]:
        """Those of ``hashes`` with at least one copy this node verified (in the
        transaction of ``conn``, or, with None, as committed)."""
        run = self.db.read if conn is None else conn.execute
        return {h for (h,) in run(
            "SELECT f.hash FROM json_each(?) AS j JOIN files AS f ON f.hash = j.value"
            " WHERE f.verified > 0", (json_list(hashes),))}

    def sizes(self, hashes: Iterable[str], batch: int = 5000) -> Dict[str, int]:
        """``{hash: size}`` for the known ones among ``hashes``: one statement
        per ``batch`` of them (a tree's files, checked before a restore)."""
        found: Dict[str, int] = {}
        hashes = list(dict.fromkeys(hashes))
        for start in range(0, len(hashes), batch):
            found.update(self.db.read(  # (hash, size) rows
                "SELECT f.hash, f.size FROM json_each(?) AS j JOIN files AS f"
                " ON f.hash = j.value", (json_list(hashes[start:start + batch]),)))
        return found

    def replication_among(self, hashes: Iterable[str]) -> Dict[str, Tuple[int, int, Optional[str]]]:
        """``{hash: (copies, verified, last upload error or None)}`` for the known
        ones among ``hashes`` (one statement); the error is the queue's, for a
        file still queued after a failed attempt."""
        return {h: (int(c), int(v), e) for h, c, v, e in self.db.read(
            "SELECT f.hash, f.copies, f.verified, q.last_error FROM json_each(?) AS j"
            " JOIN files AS f ON f.hash = j.value LEFT JOIN upload_queue AS q"
            " ON q.hash = f.hash", (json_list(hashes),))}

    def in_pool(self, hashes: Iterable[str]) -> Set[str]:
        """Those of ``hashes`` the pool knows with a copy on a host."""
        return {h for (h,) in self.db.read(
            "SELECT f.hash FROM json_each(?) AS j JOIN files AS f ON f.hash = j.value"
            " WHERE f.copies > 0", (json_list(hashes),))}

    def listing(self) -> Iterator[FileRow]:
        """Every file, by filename then hash, streamed from one cursor."""
        for row in self.db.read("SELECT %s FROM files ORDER BY filename, hash" % _COLUMNS):
            yield FileRow(*row)

    def with_prefix(self, prefix: str, limit: int = 2) -> List[str]:
        """Up to ``limit`` hashes starting with the hex ``prefix``, in order.

        A range scan on the primary key, so O(log n) however large the pool.
        """
        # 'g' sorts after every hex digit: [prefix, prefix + 'g') is the range.
        return [row[0] for row in self.db.read(
            "SELECT hash FROM files WHERE hash >= ? AND hash < ? ORDER BY hash LIMIT ?",
            (prefix, prefix + "g", limit))]
