"""The ``sources`` table: hashes of local files ``cm upload`` has read, so a run
again skips unchanged files without reading them. Written by
:mod:`cloudmanager.sources` (through this module)."""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

from .connection import Database, json_list

#: ``(size, mtime_ns, ctime_ns, inode, device, hash)``
SourceStat = Tuple[int, int, int, int, int, str]


class Sources:
    """Reads and writes of the remembered source hashes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def lookup(self, paths: Iterable[str]) -> Dict[str, SourceStat]:
        """``{path: (size, mtime_ns, ctime_ns, inode, device, hash)}`` for the
        ones among ``paths`` (absolute) that are remembered."""
        # json_each joined to the table: a key probe per path, never a scan.
        return {row[0]: tuple(row[1:]) for row in self.db.read(  # type: ignore[misc]
            "SELECT s.path, s.size, s.mtime_ns, s.ctime_ns, s.inode, s.device, s.hash"
            " FROM json_each(?) AS j JOIN sources AS s ON s.path = j.value",
            (json_list(paths),))}

    def remember(self, rows: Iterable[tuple]) -> None:
        """Store ``(path, size, mtime_ns, ctime_ns, inode, device, hash)`` rows, in one
        transaction."""
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO sources"
                " (path, size, mtime_ns, ctime_ns, inode, device, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", list(rows))
