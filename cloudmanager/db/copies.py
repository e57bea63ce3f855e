"""The ``uploads`` and ``tombstones`` tables: where each file's copies live, and
what this node knows of each.

Only :mod:`cloudmanager.replication` (through this module) writes these rows;
the rules of the copy state machine are there, the statements here. A copy is
identified by ``(hash, host_name, url)``; its ``state`` is one of
:data:`STATES`. ``files.copies`` (good, claimed or suspect) and
``files.verified`` (good) are kept in step with these rows: for rows
inserted, by :func:`recount` once per batch, which every insert of them
calls (here, in db/records.py and db/migrate.py); for changes of state and
deletes, by the triggers in ``schema.sql``.

Every write takes a batch: a single copy is a batch of one, so the two paths
cannot drift apart. Every write is guarded against a file removed meanwhile
(by another process): its rows are simply not written.
"""

from __future__ import annotations

import sqlite3
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

from .connection import Conn, Store, in_list, json_list

#: Every state a copy can be in (see :mod:`cloudmanager.replication`).
STATES = ("pending", "good", "claimed", "suspect", "bad", "missing", "deleted")
#: States of copies believed to hold the file.
HOLDING = ("good", "claimed")
#: States of copies that failed a look and are looked at again with back-off.
CONDEMNED = ("suspect", "bad", "missing")

_HOLDING_SQL = "('good', 'claimed')"
_CONDEMNED_SQL = "('suspect', 'bad', 'missing')"
#: Sets files' copy counts from their rows (followed by a WHERE, or not).
_RECOUNT = ("UPDATE files SET"
            " copies = (SELECT count(DISTINCT host_name) FROM uploads"
            "           WHERE uploads.hash = files.hash"
            "           AND uploads.state IN ('good', 'claimed', 'suspect')),"
            " verified = (SELECT count(DISTINCT host_name) FROM uploads"
            "             WHERE uploads.hash = files.hash AND uploads.state = 'good')")


class CopyRow(NamedTuple):
    """One row of a file's copies."""

    host_name: str
    url: str
    #: One of :data:`STATES`.
    state: str
    #: Unix time of the upload (or of the import that brought the claim).
    time: int
    #: Unix time of the last look at it; 0 for never.
    checked: int

    @property
    def error(self) -> bool:
        """Whether the JSON format calls it an error (not believed to hold the file)."""
        return self.state not in HOLDING and self.state != "suspect"

    @property
    def verified(self) -> bool:
        """Whether this node made the copy or checked its bytes."""
        return self.state == "good"


class ReplicationState(NamedTuple):
    """What deciding on more copies of a file needs."""

    size: int
    #: Hosts holding a copy this node made or checked.
    good: Set[str]
    #: ``[(host_name, url)]`` of copies only other nodes' records vouch for.
    claimed: List[Tuple[str, str]]


class CopyToCheck(NamedTuple):
    """A copy for verify to look at."""

    hash: str
    host_name: str
    url: str
    size: int
    state: str
    #: What the host holds when it is not the plaintext (see :class:`HeldCopy`).
    object_sha256: str = ""
    object_size: int = -1
    key_id: str = ""

    @property
    def object(self) -> Tuple[str, int]:
        """``(sha256, size)`` of the bytes on the host: the ciphertext's, or the file's."""
        if self.key_id:
            return self.object_sha256, self.object_size
        return self.hash, self.size


class ObjectMeta(NamedTuple):
    """An encrypted copy's object: the ciphertext's SHA-256 and size, and the key's id."""

    sha256: str
    size: int
    key_id: str


class HeldCopy(NamedTuple):
    """A copy to fetch a file from, and what its host holds."""

    host_name: str
    url: str
    #: ``''`` / ``-1`` / ``''`` for the plaintext itself.
    object_sha256: str
    object_size: int
    key_id: str

    @property
    def encrypted(self) -> bool:
        """Whether the host holds ciphertext (for the key ``key_id``)."""
        return bool(self.key_id)


#: (hash, host_name, url)
CopyKey = Tuple[str, str, str]


def recount(conn: Conn, hashes: Optional[Iterable[str]] = None) -> None:
    """Set ``files.copies`` and ``files.verified`` of ``hashes`` (every file if
    None: after ``cm migrate``'s bulk copy) from their rows: one statement
    after a batch of inserts (see the module's docstring)."""
    if hashes is None:
        conn.execute(_RECOUNT)
        return
    hashes = list(hashes)
    if hashes:
        fragment, param = in_list(hashes)
        conn.execute(_RECOUNT + " WHERE hash " + fragment, (param,))


class Copies:
    """Reads and writes of copies and tombstones."""

    def __init__(self, db: Store) -> None:
        self.db = db

    # -- reads -------------------------------------------------------------------

    def of(self, file_hash: str) -> List[CopyRow]:
        """The file's rows, oldest first."""
        return [CopyRow(*row) for row in self.db.read(
            "SELECT host_name, url, state, time, checked FROM uploads WHERE hash = ?"
            " ORDER BY time, host_name, url", (file_hash,))]

    def sources(self, file_hash: str, condemned: bool = False) -> List[Tuple[str, str]]:
        """``[(host_name, url)]`` to fetch the file from: the copies believed to
        hold it, or (``condemned``) the suspect, missing and bad ones, a last
        resort that is safe because every byte fetched is checked."""
        states = _CONDEMNED_SQL if condemned else _HOLDING_SQL
        return [(h, u) for h, u in self.db.read(
            "SELECT host_name, url FROM uploads WHERE hash = ? AND url != ''"
            " AND state IN %s ORDER BY time, host_name, url" % states, (file_hash,))]

    def objects(self, file_hash: str, condemned: bool = False) -> List[HeldCopy]:
        """Like :meth:`sources`, with what each copy's host holds."""
        states = _CONDEMNED_SQL if condemned else _HOLDING_SQL
        return [HeldCopy(*row) for row in self.db.read(
            "SELECT host_name, url, object_sha256, object_size, key_id FROM uploads"
            " WHERE hash = ? AND url != '' AND state IN %s ORDER BY time, host_name, url"
            % states, (file_hash,))]

    def objects_among(self, hashes: Iterable[str]
                      ) -> Dict[str, Tuple[List[HeldCopy], List[HeldCopy]]]:
        """``{hash: (held, condemned)}``: :meth:`objects` and ``objects(condemned=True)``
        of each of ``hashes`` that has any, in one statement (a batch of warm-ups)."""
        found: Dict[str, Tuple[List[HeldCopy], List[HeldCopy]]] = {}
        for row in self.db.read(
                "SELECT u.hash, u.state IN " + _CONDEMNED_SQL + ", u.host_name, u.url,"
                " u.object_sha256, u.object_size, u.key_id FROM json_each(?) AS j"
                " JOIN uploads AS u ON u.hash = j.value WHERE u.url != ''"
                " AND u.state IN ('good', 'claimed', 'suspect', 'bad', 'missing')"
                " ORDER BY u.hash, u.time, u.host_name, u.url", (json_list(hashes),)):
            held, condemned = found.setdefault(row[0], ([], []))
            (condemned if row[1] else held).append(HeldCopy(*row[2:]))
        return found

    def plaintext_files(self, limit: int) -> List[str]:
        """Up to ``limit`` hashes of files with a copy believed good that is the
        plaintext (made before the pool had a key). Scans the copies: for
        ``sync(reencrypt=True)``, not hot paths."""
        return [r[0] for r in self.db.read(
            "SELECT DISTINCT hash FROM uploads WHERE key_id = '' AND url != ''"
            " AND state IN " + _HOLDING_SQL + " ORDER BY hash LIMIT ?", (limit,))]

    def replication_states(self, hashes: Iterable[str]) -> Dict[str, ReplicationState]:
        """``{hash: ReplicationState}`` for the known ones among ``hashes``. Two statements."""
        param = (json_list(hashes),)
        states = {h: ReplicationState(size, set(), []) for h, size in self.db.read(
            "SELECT f.hash, f.size FROM json_each(?) AS j JOIN files AS f ON f.hash = j.value",
            param)}
        for h, host_name, url, state in self.db.read(
                "SELECT u.hash, u.host_name, u.url, u.state FROM json_each(?) AS j"
                " JOIN uploads AS u ON u.hash = j.value"
                " WHERE u.state IN " + _HOLDING_SQL + " AND u.url != ''", param):
            found = states.get(h)
            if found is None:  # added by another process between the two reads:
                continue       # the next look sees it whole
            if state == "good":
                found.good.add(host_name)
            else:
                found.claimed.append((host_name, url))
        return states

    def to_check(self, hashes: Optional[Sequence[str]] = None,
                 host_names: Optional[Sequence[str]] = None,
                 checked_before: Optional[float] = None,
                 limit: Optional[int] = None,
                 due: Optional[float] = None) -> List[CopyToCheck]:
        """Copies for :meth:`~cloudmanager.CloudManager.verify`.

        First the condemned copies (suspect, bad, missing) whose back-off ends
        by ``due`` (all of them when ``hashes`` names the files), then the
        copies believed good, least recently checked first.

        :param hashes: only these files
        :param host_names: only copies recorded under these host names
        :param checked_before: only copies last checked before this unix time
        :param limit: at most this many copies
        :param due: the unix time against which back-offs are measured
        """
        base = ("SELECT u.hash, u.host_name, u.url, f.size, u.state, u.object_sha256,"
                " u.object_size, u.key_id FROM uploads AS u"
                " JOIN files AS f ON f.hash = u.hash WHERE u.url != ''")
        params: List[object] = []
        for column, values in (("u.hash", hashes), ("u.host_name", host_names)):
            if values is not None:
                fragment, param = in_list(values)
                base += " AND %s %s" % (column, fragment)
                params.append(param)
        if checked_before is not None:
            base += " AND u.checked < ?"
            params.append(checked_before)
        condemned_sql = base + " AND u.state IN " + _CONDEMNED_SQL
        condemned_params = list(params)
        if hashes is None and due is not None:
            condemned_sql += " AND u.next_check <= ?"
            condemned_params.append(due)
        condemned_sql += " ORDER BY u.next_check, u.hash"
        if limit is not None:
            condemned_sql += " LIMIT ?"
            condemned_params.append(limit)
        found = [CopyToCheck(*row) for row in self.db.read(condemned_sql, condemned_params)]
        if limit is not None and len(found) >= limit:
            return found
        holding_sql = base + " AND u.state IN " + _HOLDING_SQL + " ORDER BY u.checked, u.hash"
        if limit is not None:
            holding_sql += " LIMIT ?"
            params.append(limit - len(found))
        return found + [CopyToCheck(*row) for row in self.db.read(holding_sql, params)]

    def count_by_host(self) -> Dict[str, int]:
        """``{host_name: copies}``: how many copies with a URL (in any state but
        deleted) each host has, about how many objects a listing of it reads.
        One scan of the table (no index by host): once per verify."""
        return {host: int(count) for host, count in self.db.read(
            "SELECT host_name, count(*) FROM uploads WHERE url != '' AND state != 'deleted'"
            " GROUP BY host_name")}

    def holding(self) -> sqlite3.Cursor:
        """``(hash, host_name, url)`` of every copy believed good, in hash order."""
        return self.db.read("SELECT hash, host_name, url FROM uploads"
                            " WHERE state IN " + _HOLDING_SQL + " AND url != '' ORDER BY hash")

    def one_url_on(self, host_name: str) -> Optional[str]:
        """The URL of one copy believed good on ``host_name``, or None. May scan
        the table (no index by host): for a one-time check at open."""
        row = self.db.read("SELECT url FROM uploads WHERE host_name = ? AND url != ''"
                           " AND state IN " + _HOLDING_SQL + " LIMIT 1", (host_name,)).fetchone()
        return None if row is None else row[0]

    def removing(self, conn: Optional[Conn], hashes: Iterable[str]) -> Set[str]:
        """Those of ``hashes`` whose removal is in progress (in the transaction
        of ``conn``, or, with None, as committed)."""
        run = self.db.read if conn is None else conn.execute
        return {h for (h,) in run(
            "SELECT r.hash FROM json_each(?) AS j JOIN removals AS r ON r.hash = j.value",
            (json_list(hashes),))}

    def tombstones_since(self, conn: Conn, hashes: Iterable[str],
                         since: float) -> Set[CopyKey]:
        """``(hash, host_name, url)`` of the copies of ``hashes`` deleted at or
        after ``since`` (a removal that may have deleted an object sent meanwhile)."""
        hashes = list(hashes)
        if not hashes:
            return set()
        return {(h, host, url) for h, host, url in conn.execute(
            "SELECT t.hash, t.host_name, t.url FROM json_each(?) AS j"
            " JOIN tombstones AS t ON t.hash = j.value WHERE t.deleted >= ?",
            (json_list(hashes), since))}

    # -- writes (inside a transaction) ------------------------------------------------

    def begin_removal(self, conn: Conn, file_hash: str, owner: str,
                      when: float) -> None:
        """Note that ``owner`` is removing the file (see :meth:`removing`)."""
        conn.execute("INSERT INTO removals (hash, owner, started) VALUES (?, ?, ?)"
                     " ON CONFLICT (hash) DO UPDATE SET owner = excluded.owner,"
                     " started = excluded.started", (file_hash, owner, when))

    def end_removals(self, conn: Conn, hashes: Iterable[str]) -> None:
        """The removals of these files are over."""
        conn.executemany("DELETE FROM removals WHERE hash = ?", [(h,) for h in hashes])

    def removals_of_owners_not_in(self, conn: Conn, owners: Iterable[str],
                                  node: str = "", started_before: float = 0.0) -> List[str]:
        """Hashes of removals that died: this ``node``'s whose owner is none of
        its live ``owners``, and anyone's started before ``started_before``
        (a node that never came back). Other nodes judge their own."""
        live = set(owners)
        return [h for h, owner, started in conn.execute(
                    "SELECT hash, owner, started FROM removals")
                if (owner.startswith(node + ":") and owner not in live)
                or started < started_before]

    def record_good(self, conn: Conn, copies: Iterable[CopyKey],
                    when: int, checked: bool = False,
                    objects: Optional[Dict[CopyKey, ObjectMeta]] = None) -> None:
        """Copies this node made or checked are good: insert or update them, drop
        the pending rows of their hosts and any tombstone at their place.
        Copies of files no longer in the pool are not recorded.

        :param checked: the copies' bytes were looked at now (a verify or a
            download), so a budgeted verify can leave them for later; a copy
            just made keeps its place in the verify order
        :param objects: what the copies just made hold, for those that are
            not the plaintext (the others are recorded as plaintext); None
            leaves what is recorded (a look at a copy proves it as it is)
        """
        copies = list(copies)
        if not copies:
            return
        # Which files are still in the pool: a count for the batch, and their
        # hashes only when one is gone (rare: a removal meanwhile).
        hashes = {c[0] for c in copies}
        param = json_list(hashes)
        if conn.execute("SELECT count(*) FROM json_each(?) AS j JOIN files AS f"
                        " ON f.hash = j.value", (param,)).fetchone()[0] != len(hashes):
            hashes = {h for (h,) in conn.execute(
                "SELECT f.hash FROM json_each(?) AS j JOIN files AS f ON f.hash = j.value",
                (param,))}
            copies = [c for c in copies if c[0] in hashes]
            param = json_list(hashes)
        if objects is None:  # looked at: what the copy holds stays as recorded
            conn.executemany(
                "INSERT INTO uploads (hash, host_name, url, state, time, checked)"
                " VALUES (?, ?, ?, 'good', ?, ?)"
                " ON CONFLICT (hash, host_name, url) DO UPDATE SET state = 'good',"
                " time = CASE WHEN ? THEN uploads.time ELSE excluded.time END,"
                " checked = CASE WHEN ? THEN excluded.checked ELSE uploads.checked END,"
                " strikes = 0, next_check = 0",
                [(h, host, url, when, when if checked else 0, checked, checked)
                 for h, host, url in copies])
        else:  # made: what the host now holds under that URL
            plain = ObjectMeta("", -1, "")
            conn.executemany(
                "INSERT INTO uploads (hash, host_name, url, state, time, checked,"
                " object_sha256, object_size, key_id)"
                " VALUES (?, ?, ?, 'good', ?, ?, ?, ?, ?)"
                " ON CONFLICT (hash, host_name, url) DO UPDATE SET state = 'good',"
                " time = CASE WHEN ? THEN uploads.time ELSE excluded.time END,"
                " checked = CASE WHEN ? THEN excluded.checked ELSE uploads.checked END,"
                " strikes = 0, next_check = 0, object_sha256 = excluded.object_sha256,"
                " object_size = excluded.object_size, key_id = excluded.key_id",
                [(h, host, url, when, when if checked else 0)
                 + tuple(objects.get((h, host, url), plain)) + (checked, checked)
                 for h, host, url in copies])
        # Pending rows are few (uploads that failed): one probe for the batch
        # spares a delete per copy when there are none.
        pending = {(h, host) for h, host in conn.execute(
            "SELECT u.hash, u.host_name FROM json_each(?) AS j JOIN uploads AS u"
            " ON u.hash = j.value WHERE u.url = '' AND u.state = 'pending'",
            (param,))} if copies else set()
        if pending:
            conn.executemany("DELETE FROM uploads WHERE hash = ? AND host_name = ? AND url = ''"
                             " AND state = 'pending'",
                             [(h, host) for h, host, _ in copies if (h, host) in pending])
        recount(conn, hashes)
        # Tombstones are few (removed files' copies): one probe spares a
        # delete per copy when there are none.
        if conn.execute("SELECT 1 FROM tombstones LIMIT 1").fetchone() is not None:
            conn.executemany("DELETE FROM tombstones WHERE hash = ? AND host_name = ?"
                             " AND url = ?", copies)

    def record_pending(self, conn: Conn, failures: Iterable[Tuple[str, str]],
                       when: int) -> None:
        """Record failed uploads ``[(hash, host_name)]`` as copies owed, unless the
        host holds a good copy already or the file is gone."""
        conn.executemany(
            "INSERT INTO uploads (hash, host_name, url, state, time)"
            " SELECT ?, ?, '', 'pending', ? WHERE NOT EXISTS ("
            "  SELECT 1 FROM uploads WHERE hash = ? AND host_name = ? AND state = 'good')"
            " AND EXISTS (SELECT 1 FROM files WHERE hash = ?)"
            " ON CONFLICT (hash, host_name, url) DO UPDATE SET time = excluded.time",
            [(h, host, when, h, host, h) for h, host in failures])

    def condemn(self, conn: Conn, copies: Iterable[Tuple[str, str, str, str]],
                when: float, backoff_base: float, backoff_max: float) -> None:
        """Set copies ``[(hash, host_name, url, state)]`` to a condemned state
        (suspect, bad or missing), counting a strike and putting the next look
        ``backoff_base * 2 ** strikes`` seconds away, at most ``backoff_max``."""
        conn.executemany(
            "UPDATE uploads SET state = ?, checked = ?, strikes = strikes + 1,"
            " next_check = ? + min(?, ? * (1 << min(strikes, 30)))"
            " WHERE hash = ? AND host_name = ? AND url = ? AND state != 'deleted'",
            [(state, int(when), when, backoff_max, backoff_base, h, host, url)
             for h, host, url, state in copies])

    def strike(self, conn: Conn, copies: Iterable[CopyKey], when: float,
               suspect_after: int, backoff_base: float, backoff_max: float) -> None:
        """A look at copies failed for want of an answer (a host error): count a
        strike, and make a copy believed good suspect at ``suspect_after``."""
        conn.executemany(
            "UPDATE uploads SET checked = ?, strikes = strikes + 1,"
            " state = CASE WHEN state IN " + _HOLDING_SQL + " AND strikes + 1 >= ?"
            " THEN 'suspect' ELSE state END,"
            " next_check = ? + min(?, ? * (1 << min(strikes, 30)))"
            " WHERE hash = ? AND host_name = ? AND url = ? AND state != 'deleted'",
            [(int(when), suspect_after, when, backoff_max, backoff_base, h, host, url)
             for h, host, url in copies])

    def seen_intact(self, conn: Conn, copies: Iterable[CopyKey],
                    when: float) -> None:
        """A look found copies of the right size, their bytes unseen: the look is
        noted and strikes forgiven; a suspect copy is believed again (as
        claimed); a good or claimed one stays as it is; bad and missing ones
        stay condemned until their bytes are seen."""
        conn.executemany(
            "UPDATE uploads SET checked = ?,"
            " strikes = CASE WHEN state IN ('bad', 'missing') THEN strikes ELSE 0 END,"
            " state = CASE state WHEN 'suspect' THEN 'claimed' ELSE state END"
            " WHERE hash = ? AND host_name = ? AND url = ?",
            [(int(when), h, host, url) for h, host, url in copies])

    def note_checked(self, conn: Conn, copies: Iterable[CopyKey],
                     when: float) -> None:
        """Note that a look at copies was due but could not be made (no host can
        reach them, or theirs is cooling down): a budgeted verify moves on."""
        conn.executemany("UPDATE uploads SET checked = ? WHERE hash = ? AND host_name = ?"
                         " AND url = ?", [(int(when), h, host, url) for h, host, url in copies])

    def record_deleted(self, conn: Conn, copies: Iterable[CopyKey],
                       when: float) -> None:
        """Copies this node deleted: their rows say so (while the file's record
        lasts) and tombstones keep them from coming back in an import."""
        copies = list(copies)
        conn.executemany("UPDATE uploads SET state = 'deleted', checked = ?"
                         " WHERE hash = ? AND host_name = ? AND url = ?",
                         [(int(when), h, host, url) for h, host, url in copies])
        conn.executemany("INSERT INTO tombstones (hash, host_name, url, deleted)"
                         " VALUES (?, ?, ?, ?) ON CONFLICT (hash, host_name, url)"
                         " DO UPDATE SET deleted = excluded.deleted",
                         [(h, host, url, when) for h, host, url in copies])
