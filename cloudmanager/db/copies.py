"""The ``uploads`` table: where each file's copies live, and what is known of them.

Only :mod:`cloudmanager.replication` (through this module) writes these rows.
A copy is identified by ``(hash, host_name, url)``. A failed upload attempt is
a row with ``url = ''`` and ``error = 1``; a copy found bad keeps its URL and
gets ``error = 1``. ``verified`` is 1 for a copy this node uploaded, or
downloaded or checked and found right; 0 for one only claimed by another
node's records. The triggers in ``schema.sql`` keep ``files.copies`` and
``files.verified`` in step with these rows.

Every write takes a batch: a single copy is a batch of one, so the two paths
cannot drift apart. Every write is guarded against a file removed meanwhile
(by another process): its rows are simply not written.
"""

from __future__ import annotations

import sqlite3
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

from .connection import Database, in_list


class CopyRow(NamedTuple):
    """One row of a file's copies."""

    host_name: str
    url: str
    #: The copy is bad or missing, or the row records a failed upload (url '').
    error: bool
    #: This node made the copy, or checked its bytes.
    verified: bool
    #: Unix time of the upload (or of the import that brought the claim).
    time: int


class ReplicationState(NamedTuple):
    """What deciding on more copies of a file needs."""

    size: int
    verified: int
    cached: bool
    #: Names of the hosts holding a good copy (claimed or verified).
    holders: Set[str]
    #: Names of the hosts holding a copy this node made or checked.
    verified_holders: Set[str]


class CopyToVerify(NamedTuple):
    hash: str
    host_name: str
    url: str
    size: int


#: (hash, host_name, url)
CopyKey = Tuple[str, str, str]


class Copies:
    """Reads and writes of the ``uploads`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reads -------------------------------------------------------------------

    def of(self, file_hash: str) -> List[CopyRow]:
        """The file's rows, oldest first."""
        return [CopyRow(h, u, bool(e), bool(v), t) for h, u, e, v, t in self.db.read(
            "SELECT host_name, url, error, verified, time FROM uploads WHERE hash = ?"
            " ORDER BY time, host_name, url", (file_hash,))]

    def sources(self, file_hash: str) -> List[Tuple[str, str]]:
        """``[(host_name, url)]`` of the file's good copies: where to fetch it from."""
        return [(h, u) for h, u in self.db.read(
            "SELECT host_name, url FROM uploads WHERE hash = ? AND error = 0 AND url != ''"
            " ORDER BY time, host_name, url", (file_hash,))]

    def replication_states(self, hashes: Iterable[str]) -> Dict[str, ReplicationState]:
        """``{hash: ReplicationState}`` for the known ones among ``hashes``. Two statements."""
        sql, param = in_list(hashes)
        states = {h: ReplicationState(size, verified, bool(cached), set(), set())
                  for h, size, verified, cached in self.db.read(
                      "SELECT hash, size, verified, cached FROM files WHERE hash " + sql,
                      (param,))}
        for h, host_name, verified in self.db.read(
                "SELECT hash, host_name, verified FROM uploads WHERE error = 0 AND url != ''"
                " AND hash " + sql, (param,)):
            states[h].holders.add(host_name)
            if verified:
                states[h].verified_holders.add(host_name)
        return states

    def to_verify(self, hashes: Optional[Sequence[str]] = None,
                  host_names: Optional[Sequence[str]] = None,
                  checked_before: Optional[float] = None,
                  limit: Optional[int] = None) -> List[CopyToVerify]:
        """Good copies for :meth:`~cloudmanager.CloudManager.verify`, least recently checked first.

        :param hashes: only these files
        :param host_names: only copies recorded under these host names
        :param checked_before: only copies last checked before this unix time
        :param limit: at most this many copies
        """
        sql = ("SELECT u.hash, u.host_name, u.url, f.size FROM uploads AS u"
               " JOIN files AS f ON f.hash = u.hash WHERE u.error = 0 AND u.url != ''")
        params: List[object] = []
        for column, values in (("u.hash", hashes), ("u.host_name", host_names)):
            if values is not None:
                fragment, param = in_list(values)
                sql += " AND %s %s" % (column, fragment)
                params.append(param)
        if checked_before is not None:
            sql += " AND u.checked < ?"
            params.append(checked_before)
        sql += " ORDER BY u.checked, u.hash"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [CopyToVerify(*row) for row in self.db.read(sql, params)]

    def good(self) -> sqlite3.Cursor:
        """``(hash, host_name, url)`` of every good copy, in hash order (one cursor)."""
        return self.db.read("SELECT hash, host_name, url FROM uploads"
                            " WHERE error = 0 AND url != '' ORDER BY hash")

    # -- writes (inside a transaction) ------------------------------------------------

    def record_good(self, conn: sqlite3.Connection, copies: Iterable[CopyKey],
                    when: int) -> None:
        """Record copies this node made (verified), dropping earlier failure rows of
        their hosts. Copies of files no longer in the pool are not recorded."""
        copies = list(copies)
        if not copies:
            return
        conn.executemany(
            "INSERT INTO uploads (hash, host_name, url, error, verified, time)"
            " SELECT ?, ?, ?, 0, 1, ? WHERE EXISTS (SELECT 1 FROM files WHERE hash = ?)"
            " ON CONFLICT (hash, host_name, url)"
            " DO UPDATE SET error = 0, verified = 1, time = excluded.time",
            [(h, host, url, when, h) for h, host, url in copies])
        conn.executemany("DELETE FROM uploads WHERE hash = ? AND host_name = ? AND url = ''"
                         " AND error = 1", [(h, host) for h, host, _ in copies])

    def record_failures(self, conn: sqlite3.Connection, failures: Iterable[Tuple[str, str]],
                        when: int) -> None:
        """Record failed uploads ``[(hash, host_name)]``, unless the host holds a
        good copy already or the file is gone."""
        conn.executemany(
            "INSERT INTO uploads (hash, host_name, url, error, time)"
            " SELECT ?, ?, '', 1, ? WHERE NOT EXISTS ("
            "  SELECT 1 FROM uploads WHERE hash = ? AND host_name = ? AND error = 0)"
            " AND EXISTS (SELECT 1 FROM files WHERE hash = ?)"
            " ON CONFLICT (hash, host_name, url) DO UPDATE SET time = excluded.time",
            [(h, host, when, h, host, h) for h, host in failures])

    def mark_bad(self, conn: sqlite3.Connection, copies: Iterable[CopyKey]) -> None:
        """Flag copies found missing or corrupt."""
        conn.executemany("UPDATE uploads SET error = 1 WHERE hash = ? AND host_name = ?"
                         " AND url = ?", list(copies))

    def mark_verified(self, conn: sqlite3.Connection, copies: Iterable[CopyKey]) -> None:
        """Note that downloads of these copies matched their SHA-256."""
        conn.executemany("UPDATE uploads SET verified = 1 WHERE hash = ? AND host_name = ?"
                         " AND url = ? AND verified = 0", list(copies))

    def mark_checked(self, conn: sqlite3.Connection,
                     checks: Iterable[Tuple[str, str, str, float, bool]]) -> None:
        """Note checks ``[(hash, host_name, url, when, verified)]``: ``verified``
        if the copy's SHA-256 was seen."""
        conn.executemany("UPDATE uploads SET checked = ?, verified = max(verified, ?)"
                         " WHERE hash = ? AND host_name = ? AND url = ?",
                         [(int(when), 1 if verified else 0, h, host, url)
                          for h, host, url, when, verified in checks])
