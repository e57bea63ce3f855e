"""Export and import of records: the JSON format's view of ``files`` and ``uploads``.

Reading streams one cursor; merging imported records writes new file rows
and claimed copies (never verified ones) in one transaction per batch.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple

from .connection import Store, json_list
from .copies import recount

#: Records merged per transaction by :meth:`cloudmanager.records.RecordStore.load_from`
#: (here, not there, so that the facade can name it without loading the JSON side).
LOAD_BATCH = 5000

#: Files whose record is neither exported nor loaded from a source.
_UNPUBLISHED = "NOT EXISTS (SELECT 1 FROM published AS p WHERE p.hash = f.hash)"


#: The object columns of a copy that holds the plaintext itself.
_PLAINTEXT = ("", -1, "")
#: A record's encrypted objects when it has none (read only).
_NO_OBJECTS: Dict[Tuple[str, str], Tuple[str, int, str]] = {}


class StoredRecord(NamedTuple):
    """A file's record as the JSON format carries it."""

    hash: str
    filename: str
    size: int
    created: int
    #: ``[(host_name, url, error)]``
    uploads: List[Tuple[str, str, bool]]
    #: ``[(host_name, url, object_sha256, object_size, key_id)]`` of the
    #: copies that are not the plaintext (encrypted ones)
    objects: List[Tuple[str, str, str, int, str]]


class KnownRecord(NamedTuple):
    """What an import is compared with."""

    size: int
    filename: str
    #: ``{(host_name, url)}`` of every row the pool has for the file.
    copies: Set[Tuple[str, str]]


class Records:
    """Reads and merges of whole records."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def iter(self, hashes: Optional[Iterable[str]] = None,
             with_copies_only: bool = False, unpublished: bool = False
             ) -> Iterator[StoredRecord]:
        """Yield each file's record, in hash order, streamed from one cursor.

        :param hashes: only these files
        :param with_copies_only: only files with at least one good copy on a
            host (what a dump exports: a record no host holds is of no use
            to another node)
        :param unpublished: only files neither exported nor loaded from a
            source (no ``published`` row; see :mod:`.published`)
        """
        # Deleted copies are not exported; suspect ones are (a host that did
        # not answer proves nothing against the copy).
        columns = ("SELECT f.hash, f.filename, f.size, f.created, u.host_name, u.url,"
                   " u.state NOT IN ('good', 'claimed', 'suspect'),"
                   " u.object_sha256, u.object_size, u.key_id")
        joined = " LEFT JOIN uploads AS u ON u.hash = f.hash AND u.state != 'deleted'"
        sql = columns + " FROM files AS f" + joined
        where: List[str] = []
        params: List[object] = []
        if hashes is not None:
            sql = columns + " FROM json_each(?) AS j JOIN files AS f ON f.hash = j.value" + joined
            params.append(json_list(hashes))
        if with_copies_only:
            where.append("f.copies > 0")
        if unpublished:
            where.append(_UNPUBLISHED)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY f.hash, u.time, u.host_name, u.url"
        # Per row, only locals: this loop is most of an export's time.
        current: Optional[StoredRecord] = None
        current_hash = None
        uploads: List[Tuple[str, str, bool]] = []
        objects: List[Tuple[str, str, str, int, str]] = []
        for h, name, size, created, host, url, error, osha, osize, key_id in self.db.read(
                sql, params):
            if h != current_hash:
                if current is not None:
                    yield current
                uploads, objects, current_hash = [], [], h
                current = StoredRecord(h, name, size, created, uploads, objects)
            if host is not None:
                uploads.append((host, url, error == 1))
                if key_id and url:
                    objects.append((host, url, osha, int(osize), key_id))
        if current is not None:
            yield current

    def unpublished_totals(self) -> Tuple[int, int]:
        """``(count, bytes)`` of the files with a copy on a host that are not
        published: the export backlog (the records :meth:`iter` yields with
        ``with_copies_only`` and ``unpublished``), and their files' sizes."""
        count, size = self.db.read(
            "SELECT count(*), coalesce(sum(f.size), 0) FROM files AS f"
            " WHERE f.copies > 0 AND " + _UNPUBLISHED).fetchone()
        return int(count), int(size)

    def known(self, hashes: Iterable[str]) -> Dict[str, KnownRecord]:
        """``{hash: KnownRecord}`` for the known ones among ``hashes``. Two statements."""
        param = (json_list(hashes),)
        # json_each joined to the table: a probe per hash, no temp index.
        make = tuple.__new__  # KnownRecord(...) without its Python-level __new__
        known = {h: make(KnownRecord, (size, name, set())) for h, size, name in self.db.read(
            "SELECT f.hash, f.size, f.filename FROM json_each(?) AS j"
            " JOIN files AS f ON f.hash = j.value", param)}
        for h, host_name, url in self.db.read(
                "SELECT u.hash, u.host_name, u.url FROM json_each(?) AS j"
                " JOIN uploads AS u ON u.hash = j.value", param):
            if h in known:  # else added by another process between the two reads
                known[h].copies.add((host_name, url))
        return known

    def merge(self, records: Iterable) -> Tuple[int, List[str]]:
        """Merge imported records into the pool, in one transaction.

        A new file is inserted. A known file gains the uploads it lacked (a
        union, so merging twice changes nothing) and a filename if it had none.
        The error flag of an upload this node already knows is kept: local
        knowledge wins over a remote claim. A record whose size disagrees with
        the known size is refused. Imported copies are claims (an error entry
        with a URL is taken as a bad copy, to be looked at again, and one
        without as a pending upload); a claim of a copy this node deleted
        (a tombstone) is dropped.

        :param records: objects with ``hash``, ``filename``, ``size``,
            ``datetime``, ``uploads`` (``[(host_name, url, error)]``) and
            ``objects`` (``[(host_name, url, object_sha256, object_size,
            key_id)]``, for encrypted copies)
        :return: ``(changed, refused)``: how many records added something, and
            the hashes refused for a size conflict
        """
        records = list(records)
        changed, refused = 0, []
        # A few set-wise statements per batch, not several per record: what
        # the pool knows is read once, compared in memory (under the write
        # lock), and only what is new is written.
        with self.db.transaction() as conn:
            hashes = json_list({rec.hash for rec in records})
            known = {h: [size, name] for h, size, name in conn.execute(
                "SELECT f.hash, f.size, f.filename FROM json_each(?) AS j"
                " JOIN files AS f ON f.hash = j.value", (hashes,))}
            # Only known files can have copies (a copy's row needs its file's).
            have = set(conn.execute(
                "SELECT u.hash, u.host_name, u.url FROM json_each(?) AS j"
                " JOIN uploads AS u ON u.hash = j.value", (json_list(known),))) if known else set()
            have.update(conn.execute(
                "SELECT t.hash, t.host_name, t.url FROM json_each(?) AS j"
                " JOIN tombstones AS t ON t.hash = j.value", (hashes,)))
            # A new file's row is inserted with its count: the distinct hosts
            # of its claimed copies (imported copies are never verified).
            # Files known before are recounted after their copies went in.
            new_files: List[Tuple[str, str, int, int, int]] = []
            named: Dict[str, str] = {}
            new_uploads: List[Tuple[object, ...]] = []
            older: List[Tuple[object, ...]] = []
            for rec in records:
                row = known.get(rec.hash)
                fresh = row is None
                if row is None:
                    known[rec.hash] = [rec.size, rec.filename]
                    did = True
                elif row[0] != rec.size:
                    refused.append(rec.hash)
                    continue
                elif rec.filename and not row[1]:
                    row[1] = named[rec.hash] = rec.filename
                    did = True
                else:
                    did = False
                objects = {(o[0], o[1]): tuple(o[2:]) for o in rec.objects} \
                    if getattr(rec, "objects", None) else _NO_OBJECTS
                claimed_hosts: Set[str] = set()
                adding = new_uploads if fresh else older
                for host_name, url, error in rec.uploads:
                    key = (rec.hash, host_name, url)
                    if key not in have:
                        have.add(key)
                        if error:
                            state = "bad" if url else "pending"
                        else:
                            state = "claimed"
                            claimed_hosts.add(host_name)
                        adding.append((rec.hash, host_name, url, state, rec.datetime,
                                       *objects.get((host_name, url), _PLAINTEXT)))
                        did = True
                if fresh:
                    new_files.append((rec.hash, rec.filename, rec.size, rec.datetime,
                                      len(claimed_hosts)))
                changed += did
            conn.executemany("INSERT INTO files (hash, filename, size, created, copies)"
                             " VALUES (?, ?, ?, ?, ?)", new_files)
            conn.executemany("UPDATE files SET filename = ? WHERE hash = ?",
                             [(name, h) for h, name in named.items()])
            columns = ("uploads (hash, host_name, url, state, time, object_sha256, object_size,"
                       " key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
            # A new file has no copies to collide with (this transaction holds
            # the write lock, and `have` took out repeats): plain inserts, which
            # go by COPY on PostgreSQL. No trigger counts an insert.
            conn.executemany("INSERT INTO " + columns, new_uploads)
            conn.executemany("INSERT OR IGNORE INTO " + columns, older)
            recount(conn, {str(u[0]) for u in older})
        return changed, refused
