"""The ``upload_queue`` table: files in the pool that still need copies.

Only :mod:`cloudmanager.replication` (through this module) writes it.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

from .connection import Conn, Store, in_list


class Queue:
    """Reads and writes of the upload queue."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def add(self, conn: Conn, hashes: Iterable[str], when: float,
            known: bool = False, node: str = "") -> None:
        """Queue files for upload; queued ones keep their place. Files no longer
        in the pool are not queued.

        :param known: the files were recorded in this same transaction, so
            the check that they still exist is skipped (the foreign key
            would refuse one that did not)
        :param node: the node whose cache holds the files' bytes, if any
        """
        if known:
            conn.executemany("INSERT OR IGNORE INTO upload_queue (hash, queued, node)"
                             " VALUES (?, ?, ?)", [(h, when, node) for h in hashes])
            return
        conn.executemany("INSERT OR IGNORE INTO upload_queue (hash, queued, node)"
                         " SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM files WHERE hash = ?)",
                         [(h, when, node, h) for h in hashes])

    def remove(self, conn: Conn, hashes: Iterable[str]) -> None:
        """Take files off the queue: one statement for the batch."""
        hashes = list(hashes)
        if hashes:
            fragment, param = in_list(hashes)
            conn.execute("DELETE FROM upload_queue WHERE hash " + fragment, (param,))

    def note_failure(self, conn: Conn, file_hash: str, error: str) -> None:
        """Count a failed attempt at a queued upload, and keep why."""
        conn.execute("UPDATE upload_queue SET attempts = attempts + 1, last_error = ?"
                     " WHERE hash = ?", (error, file_hash))

    def hashes(self) -> List[str]:
        """Every queued hash, oldest first."""
        return [r[0] for r in self.db.read("SELECT hash FROM upload_queue ORDER BY queued, hash")]

    def length(self) -> int:
        """Number of files on the queue."""
        return int(self.db.read("SELECT count(*) FROM upload_queue").fetchone()[0])

    def totals(self) -> Tuple[int, int]:
        """``(count, bytes)``: the files on the queue and their sizes."""
        count, size = self.db.read(
            "SELECT count(*), coalesce(sum(f.size), 0) FROM upload_queue AS q"
            " JOIN files AS f ON f.hash = q.hash").fetchone()
        return int(count), int(size)
