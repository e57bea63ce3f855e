"""The ``leases`` and ``nodes`` tables: who is doing which piece of work, and
which nodes use the pool.

Processes and nodes that share a pool split its backlog with leases: before
replicating a file (or checking its copies), a process takes the lease of
that piece of work; a piece another live holder has is left to it. A lease
ends when its holder releases it, or when its time runs out, so the work of
a killed process goes to whoever asks next. Leases are taken and released
in the caller's transaction, which on either catalog holds the write lock:
two takers never both get one.

Only :mod:`cloudmanager.replication` takes and releases leases; the cache
registers its node.
"""

from __future__ import annotations

from typing import Iterable, List, NamedTuple, Set

from .connection import Conn, Store, in_list

#: The kinds of work a lease is for.
KINDS = ("replicate", "verify")


class NodeRow(NamedTuple):
    """A node that uses the pool."""

    node: str
    hostname: str
    first_seen: float
    last_seen: float


class Leases:
    """Reads and writes of leases and nodes."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def take(self, conn: Conn, kind: str, hashes: Iterable[str], owner: str, until: float,
             now: float, report: bool = True) -> Set[str]:
        """Take ``kind`` leases on ``hashes`` for ``owner`` until ``until``;
        those held by another owner whose lease has not run out by ``now`` are
        left to them.

        :param report: read back which ones ``owner`` holds (a caller that
            looks again before it acts can spare that read)
        :return: the hashes whose lease ``owner`` holds now (an empty set
            without ``report``)
        """
        if kind not in KINDS:
            raise ValueError("no lease kind %r" % kind)
        hashes = list(dict.fromkeys(hashes))
        if not hashes:
            return set()
        fragment, param = in_list(hashes)
        # One statement for the batch ("WHERE true": SQLite's parser needs it
        # before ON CONFLICT in an INSERT ... SELECT).
        conn.execute(
            "INSERT INTO leases (kind, hash, owner, until)"
            " SELECT ?, value, ?, ? FROM json_each(?) WHERE true"
            " ON CONFLICT (kind, hash) DO UPDATE SET owner = excluded.owner,"
            " until = excluded.until"
            " WHERE leases.owner = excluded.owner OR leases.until < ?",
            (kind, owner, until, param, now))
        if not report:
            return set()
        return {h for (h,) in conn.execute(
            "SELECT hash FROM leases WHERE kind = ? AND owner = ? AND hash " + fragment,
            (kind, owner, param))}

    def owned(self, kind: str, hashes: Iterable[str], owner: str, now: float) -> Set[str]:
        """Those of ``hashes`` whose ``kind`` lease ``owner`` holds, not run out
        by ``now`` (a read: no transaction)."""
        # IN (...), not a join on json_each: SQLite would scan the leases per
        # element (it cannot tell how long the JSON list is).
        fragment, param = in_list(hashes)
        return {h for (h,) in self.db.read(
            "SELECT hash FROM leases WHERE kind = ? AND owner = ? AND until >= ?"
            " AND hash " + fragment, (kind, owner, now, param))}

    def release(self, conn: Conn, kind: str, hashes: Iterable[str], owner: str) -> None:
        """End ``owner``'s ``kind`` leases on ``hashes`` (others' stay)."""
        hashes = list(hashes)
        if not hashes:
            return
        fragment, param = in_list(hashes)
        conn.execute("DELETE FROM leases WHERE kind = ? AND owner = ? AND hash " + fragment,
                     (kind, owner, param))

    def release_dead(self, conn: Conn, node: str, live_owners: Iterable[str]) -> int:
        """End the leases of ``node``'s sessions that are not among its
        ``live_owners`` (processes that were killed): their work goes to the
        next taker at once, not when the leases run out. Other nodes judge
        their own. :return: how many ended."""
        live = set(live_owners)
        dead = {owner for (owner,) in conn.execute(
            "SELECT DISTINCT owner FROM leases WHERE owner >= ? AND owner < ?",
            (node + ":", node + ";")) if owner not in live}
        self.release_all(conn, dead)
        return len(dead)

    def release_all(self, conn: Conn, owners: Iterable[str]) -> None:
        """End every lease of ``owners`` (sessions that closed or died)."""
        conn.executemany("DELETE FROM leases WHERE owner = ?", [(o,) for o in owners])

    def held(self, kind: str, now: float) -> List[tuple]:
        """``[(hash, owner, until)]`` of the ``kind`` leases not run out by ``now``."""
        return [tuple(r) for r in self.db.read(
            "SELECT hash, owner, until FROM leases WHERE kind = ? AND until >= ?"
            " ORDER BY hash", (kind, now))]

    # -- nodes -------------------------------------------------------------------------

    def register_node(self, node: str, hostname: str, now: float) -> None:
        """Note that ``node`` uses the pool (first and last seen)."""
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO nodes (node, hostname, first_seen, last_seen)"
                         " VALUES (?, ?, ?, ?) ON CONFLICT (node) DO UPDATE SET"
                         " hostname = excluded.hostname, last_seen = excluded.last_seen",
                         (node, hostname, now, now))

    def nodes(self) -> List[NodeRow]:
        """Every node that used the pool, by id."""
        return [NodeRow(*r) for r in self.db.read(
            "SELECT node, hostname, first_seen, last_seen FROM nodes ORDER BY node")]
