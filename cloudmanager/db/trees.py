"""The ``trees`` table: which files of the pool are a directory's tree manifest.

A tree manifest (:mod:`cloudmanager.trees`) is an ordinary file of the pool;
this table only names it, so ``cm trees`` reads a small table instead of
every file's row. A row goes with its file (``ON DELETE CASCADE``).

The only writer of the table. Rows are added on behalf of
:mod:`cloudmanager.trees` (a tree uploaded here) and of
:mod:`cloudmanager.records` (a record loaded from another node whose
filename marks it as a manifest).
"""

from __future__ import annotations

from typing import Iterable, List, NamedTuple, Optional, Tuple

from .connection import Conn, Store


class TreeRow(NamedTuple):
    """A tree manifest the catalog knows."""

    #: The manifest's SHA-256 (a file of the pool).
    hash: str
    #: The name of the directory it was made from (its basename).
    name: str
    #: Unix time it was made (for a loaded one, its record's ``datetime``).
    created: int


class Trees:
    """Reads and writes of the ``trees`` table."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def add(self, conn: Conn, rows: Iterable[Tuple[str, str, int]]) -> None:
        """Name files as tree manifests, inside the caller's transaction.

        A hash the pool has no file for is passed over; a tree already named
        keeps its first name and time (the same manifest made twice, or
        loaded again).

        :param rows: ``(hash, name, created)`` tuples
        """
        conn.executemany(
            "INSERT INTO trees (hash, name, created)"
            " SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM files WHERE hash = ?)"
            " ON CONFLICT (hash) DO NOTHING",
            [(h, name, int(created), h) for h, name, created in rows])

    def get(self, tree_hash: str) -> Optional[TreeRow]:
        """The tree named by ``tree_hash``, or None if it is not one."""
        row = self.db.read("SELECT hash, name, created FROM trees WHERE hash = ?",
                           (tree_hash,)).fetchone()
        return None if row is None else TreeRow(row[0], row[1], int(row[2]))

    def all(self) -> List[TreeRow]:
        """Every tree, oldest first (then by name)."""
        return [TreeRow(h, name, int(created)) for h, name, created in self.db.read(
            "SELECT hash, name, created FROM trees ORDER BY created, name, hash")]
