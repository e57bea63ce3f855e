"""The ``sessions`` and ``reservations`` tables: open instances, and the cache
space promised to their writes in flight; and ``this_node``, the node's id.
Written by :mod:`cloudmanager.cache` (through this module): the store opens
sessions and reserves space, and :mod:`cloudmanager.cache.fsck` ends dead
sessions and releases what they held."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Iterable, List, NamedTuple, Optional

from .connection import Database


class Session(NamedTuple):
    owner: str
    node: str
    pid: int
    proc_start: str


class ReservationRow(NamedTuple):
    id: int
    owner: str
    size: int


class Sessions:
    """Reads and writes of sessions and reservations."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def node_id(self) -> str:
        """This node's id in the pool, made on first use: the machine's name and
        a random suffix (two caches on one machine are two nodes)."""
        row = self.db.read("SELECT node FROM this_node").fetchone()
        if row is not None:
            return str(row[0])
        with self.db.transaction() as conn:
            row = conn.execute("SELECT node FROM this_node").fetchone()
            if row is None:
                # The machine's name (socket.gethostname()'s) and secrets.token_hex(4),
                # without loading socket or secrets (hmac, OpenSSL) at every open.
                node = "%s-%s" % (os.uname().nodename[:64], os.urandom(4).hex())
                conn.execute("INSERT INTO this_node (node) VALUES (?)", (node,))
                return node
            return str(row[0])

    def open(self, owner: str, node: str, pid: int, proc_start: str) -> None:
        """Register an open instance."""
        with self.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO sessions (owner, node, pid, proc_start, started)"
                         " VALUES (?, ?, ?, ?, ?)", (owner, node, pid, proc_start, time.time()))

    def all(self) -> List[Session]:
        """Every registered instance."""
        return [Session(*row) for row in self.db.read(
            "SELECT owner, node, pid, proc_start FROM sessions")]

    def end(self, conn: sqlite3.Connection, owners: Iterable[str]) -> None:
        """Remove sessions and the reservations they left."""
        params = [(o,) for o in owners]
        conn.executemany("DELETE FROM reservations WHERE owner = ?", params)
        conn.executemany("DELETE FROM sessions WHERE owner = ?", params)

    def reserved_bytes(self, conn: Optional[sqlite3.Connection] = None) -> int:
        """Bytes promised to writes in flight."""
        conn = conn or self.db.connection
        return int(conn.execute("SELECT coalesce(sum(size), 0) FROM reservations"
                                ).fetchone()[0])

    def reserve(self, conn: sqlite3.Connection, owner: str, size: int) -> int:
        """Promise ``size`` bytes to a write; return the reservation's id."""
        row_id = conn.execute("INSERT INTO reservations (owner, size, created)"
                              " VALUES (?, ?, ?)", (owner, size, time.time())).lastrowid
        assert row_id is not None  # an INSERT always sets it
        return int(row_id)

    def release(self, conn: sqlite3.Connection, ids: Iterable[int]) -> None:
        """Release reservations by id."""
        conn.executemany("DELETE FROM reservations WHERE id = ?", [(i,) for i in ids])

    def reservations(self, conn: sqlite3.Connection) -> List[ReservationRow]:
        """Every reservation (writes in flight)."""
        return [ReservationRow(*row) for row in conn.execute(
            "SELECT id, owner, size FROM reservations ORDER BY id")]

    def orphan_reservations(self, conn: sqlite3.Connection) -> List[int]:
        """Ids of reservations whose owner has no session row: no one will release them."""
        return [r[0] for r in conn.execute(
            "SELECT id FROM reservations WHERE owner NOT IN (SELECT owner FROM sessions)")]
