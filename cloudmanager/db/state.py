"""The ``pool_state`` table: small named integers of the pool, in its catalog.

One name so far: ``last_known_block``, the block cursor of the original
cloud-manager's ``last_known_block()`` / ``visit_block(n)``. Written by
:mod:`cloudmanager.legacy` (through this module).
"""

from __future__ import annotations

from typing import Iterable, Tuple

from .connection import Conn, Store


class PoolState:
    """Reads and writes of the pool's named integers."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def get(self, name: str, default: int = 0) -> int:
        """The value stored under ``name``, or ``default`` if none is."""
        row = self.db.read("SELECT value FROM pool_state WHERE name = ?", (name,)).fetchone()
        return default if row is None else int(row[0])

    def set(self, conn: Conn, items: Iterable[Tuple[str, int]]) -> None:
        """Store ``(name, value)`` pairs, replacing what was there, inside the
        caller's transaction."""
        conn.executemany("INSERT INTO pool_state (name, value) VALUES (?, ?)"
                         " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                         [(name, int(value)) for name, value in items])
