"""Importing an original cloud-manager pool: ``cm import-legacy DATABASE STORAGE``.

Storj's 2014 cloud-manager kept a database (SQLite, or PostgreSQL) and a
storage folder (its cache). :func:`import_legacy` brings both into a pool:

- **Records.** Each row's ``payload`` (the file's v0.2 or v0.1 JSON record,
  NULL until the file was uploaded) goes through the validation every
  import gets (:func:`cloudmanager.serializers.parse_record`) and is merged
  as :meth:`~cloudmanager.CloudManager.data_load` merges records: a bad one
  is skipped with its reason, the rest load. A payload must describe its own
  row's file (the same hash and size).
- **Names.** The original named its files ``<first 7 hex of the hash>_<basename>``
  and put that name in its records. The prefix is taken off when it really is
  the first 7 hex digits of that row's hash, and kept otherwise.
- **Tags and stamps.** A row's ``blockchain_hash`` tags its record as loaded
  from that source (as ``data_load(data, blockchain_hash)`` does), and its
  ``exported_timestamp`` stamps it as exported then: either way
  ``data_dump(limit)`` never exports it again. A record with no copy on a
  host gets neither: its file is added from the folder, and the record
  naming the new copies has not been published.
- **The meter and the block cursor.** The original's ``transfer_meter``
  months join this pool's meter under a node of their own
  (:func:`meter_node`), and its ``last_known_block`` becomes the pool's
  cursor if it is further on.
- **Bytes.** A file that no host got (no payload, or a record with no copy)
  and whose bytes are in the storage folder is added to the pool: read once,
  hashed, and refused, with nothing recorded, unless its bytes hash to the
  row's hash (:meth:`cloudmanager.pool.Pool.add_open_file`: into the cache,
  or streamed to the hosts if it does not fit). The folder is only read:
  nothing in it is followed out of it (a symbolic link is refused, not
  opened), changed or deleted.

Running it twice changes nothing the second time: records merge as a union,
tags and stamps keep what they had, the meter is set (not added), and a file
the pool has already is not read again.

The original's database is opened read-only (:mod:`cloudmanager.db.legacy_pool`).
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import re
import stat
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from . import serializers
from .db.legacy_pool import LegacyFileRow, LegacyPool, shown
from .db.urls import is_postgres_url
from .errors import CloudManagerError, InvalidInputError, LegacyPoolError, SerializationError
from .validation import check_count, check_hash, check_source, safe_basename

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger(__name__)

#: The month the original's meter row older than months is carried under.
NO_MONTH = "0000-00"
#: The original's month keys: ``YYYY-MM`` (``YYYY-M`` in one version).
_MONTH = re.compile(r"(\d{4})-(\d{1,2})")
#: How the original's SQLite wrote ``exported_timestamp`` (``datetime('now')``, UTC).
_STAMP_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S",
                  "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%d")
#: The most bytes a name in the storage folder can have.
_NAME_MAX = 255


def check_source_pool(database: Union[str, os.PathLike], storage: Union[str, os.PathLike]
                      ) -> Tuple[str, str]:
    """Check that ``database`` is an original pool and ``storage`` a folder,
    without importing anything.

    :return: ``(database, storage)`` as :func:`import_legacy` takes them
        (a SQLite path made absolute)
    :raises LegacyPoolError: for a missing database or storage folder, or a
        database that is not an original cloud-manager pool
    :raises DatabaseError: if the database cannot be read (a server down)
    """
    database, storage = _paths(database, storage)
    with LegacyPool(database):
        pass
    return database, storage


def _paths(database: Union[str, os.PathLike], storage: Union[str, os.PathLike]
           ) -> Tuple[str, str]:
    database = os.fspath(database)
    if not is_postgres_url(database):
        database = os.path.abspath(os.path.expanduser(database))
    storage = os.path.abspath(os.path.expanduser(os.fspath(storage)))
    if not os.path.isdir(storage):
        raise LegacyPoolError("the storage folder %s is not a directory" % storage)
    return database, storage


def meter_node(database: str) -> str:
    """The node name an original pool's transfer meter is carried under:
    ``cloud-manager:`` and 12 hex digits of its database's identity (its
    real path, or its URL without password), so importing it again replaces
    its months and two original pools keep theirs apart."""
    identity = shown(database) if is_postgres_url(database) else os.path.realpath(database)
    return "cloud-manager:" + hashlib.sha256(identity.encode("utf-8", "replace")).hexdigest()[:12]


def strip_prefix(name: str, file_hash: str) -> str:
    """``name`` without the original's ``<hash7>_`` prefix, if it is that of
    ``file_hash``; else ``name`` as it is.

    >>> strip_prefix("6e16344_README.md", "6e163442" + "0" * 56)
    'README.md'
    >>> strip_prefix("deadbee_README.md", "6e163442" + "0" * 56)
    'deadbee_README.md'
    """
    prefix = file_hash[:7] + "_"
    return name[len(prefix):] if name.startswith(prefix) and len(name) > len(prefix) else name


def parse_stamp(value: Any) -> Optional[float]:
    """An ``exported_timestamp`` as a unix time (UTC), or None if it is none
    or cannot be read.

    >>> parse_stamp("2014-04-24 10:00:00")
    1398333600.0
    >>> parse_stamp("yesterday") is None
    True
    """
    if value is None or isinstance(value, bool):
        return None
    when: Optional[datetime.datetime] = None
    if isinstance(value, datetime.datetime):
        when = value
    elif isinstance(value, (int, float)):
        return float(value) if 0 <= value < 2 ** 40 else None
    elif isinstance(value, str):
        for fmt in _STAMP_FORMATS:
            try:
                when = datetime.datetime.strptime(value.strip(), fmt)
                break
            except ValueError:
                continue
    if when is None:
        return None
    if when.tzinfo is None:  # the original stamped in UTC (SQLite's datetime('now'))
        when = when.replace(tzinfo=datetime.timezone.utc)
    stamp = when.timestamp()
    return stamp if stamp >= 0 else None


class _Row:
    """One checked row of the original's ``files`` table."""

    def __init__(self, file_hash: str, size: int, name: str) -> None:
        self.hash, self.size, self.name = file_hash, size, name
        #: The name shown for the file: the original's, without its prefix.
        self.filename = strip_prefix(name, file_hash)


class LegacyImport:
    """One import of an original pool into ``pool``; :meth:`run` does it.

    :param pool: the pool to import into
    :param database: the original's SQLite file or ``postgres://`` URL
    :param storage: the original's storage folder
    """

    def __init__(self, pool: Pool, database: Union[str, os.PathLike],
                 storage: Union[str, os.PathLike]) -> None:
        self.pool = pool
        self.database, self.storage = _paths(database, storage)
        self.summary: Dict[str, Any] = {
            "database": shown(self.database), "storage": self.storage, "rows": 0,
            "records": 0, "changed": 0, "tagged": 0, "stamped": 0,
            "skipped": [], "uploaded": [], "present": 0, "refused": [], "missing": [],
            "meter": None, "last_known_block": None, "notes": [],
        }

    # -- reporting -------------------------------------------------------------------

    def _skip(self, row: LegacyFileRow, reason: str) -> None:
        self.summary["skipped"].append({"hash": _text(row.hash), "name": _text(row.name),
                                        "reason": reason})
        log.warning("import-legacy: skipping the record of %s (%s): %s",
                    _text(row.hash), _text(row.name), reason)

    def _refuse(self, row: _Row, reason: str) -> None:
        self.summary["refused"].append({"hash": row.hash, "name": row.name, "reason": reason})
        log.warning("import-legacy: refused %s (%s): %s", row.name, row.hash, reason)

    def _note(self, text: str) -> None:
        self.summary["notes"].append(text)
        log.warning("import-legacy: %s", text)

    # -- the import --------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        """Import the records, then the files no host got, the meter and the cursor.

        :return: the summary (see :meth:`cloudmanager.CloudManager.import_legacy`)
        :raises LegacyPoolError: for a missing database or folder, or a
            database that is not an original pool
        :raises CloudManagerError: if this pool's database fails (what was
            imported before stays; running it again goes on)
        """
        dir_fd = os.open(self.storage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with LegacyPool(self.database) as legacy:
                for batch in legacy.files():
                    self._batch(batch, dir_fd)
                self._meter(legacy.meter())
                self._block(legacy.last_known_block())
        finally:
            os.close(dir_fd)
        summary = self.summary
        log.info("import-legacy from %s: %d rows, %d records (%d changed), %d skipped, "
                 "%d files uploaded, %d refused, %d missing", summary["database"],
                 summary["rows"], summary["records"], summary["changed"],
                 len(summary["skipped"]), len(summary["uploaded"]), len(summary["refused"]),
                 len(summary["missing"]))
        return summary

    def _batch(self, batch: List[LegacyFileRow], dir_fd: int) -> None:
        self.summary["rows"] += len(batch)
        by_source: Dict[Optional[str], List[serializers.Record]] = {}
        stamps: List[Tuple[str, float]] = []
        needs_bytes: Dict[str, Tuple[_Row, bool]] = {}  # hash -> (row, must be there)
        for raw in batch:
            row = self._check_row(raw)
            if row is None:
                continue
            if raw.payload is None:
                needs_bytes.setdefault(row.hash, (row, True))
                continue
            record = self._record(raw, row)
            if record is None:  # skipped: its bytes, if the folder has them, still count
                needs_bytes.setdefault(row.hash, (row, False))
                continue
            self.summary["records"] += 1
            if not any(not error for _, _, error in record.uploads):
                # No host got it: the bytes are added from the folder below,
                # and the record that names the new copies is yet to be
                # published, whatever the original's tags and stamps said.
                by_source.setdefault(None, []).append(record)
                needs_bytes.setdefault(row.hash, (row, False))
                continue
            source = self._source(raw, row)
            by_source.setdefault(source, []).append(record)
            if source is not None:
                self.summary["tagged"] += 1
            stamp = parse_stamp(raw.exported_timestamp)
            if stamp is not None:
                stamps.append((row.hash, stamp))
            elif raw.exported_timestamp is not None:
                self._note("%s: exported_timestamp %r cannot be read; not carried"
                           % (row.hash, _text(raw.exported_timestamp)))
        for source, records in by_source.items():
            self.summary["changed"] += self.pool.records.merge_records(records, source)
        if stamps:
            self.pool.legacy.stamp_exported(stamps)
            self.summary["stamped"] += len(stamps)
        if needs_bytes:
            self._add_files(needs_bytes, dir_fd)

    def _check_row(self, raw: LegacyFileRow) -> Optional[_Row]:
        """The row's hash, size and name, checked; None (skipped) if they are bad."""
        try:
            file_hash = check_hash(raw.hash)
            size = check_count(raw.size, "size")
        except InvalidInputError as exc:
            self._skip(raw, str(exc))
            return None
        name = raw.name if isinstance(raw.name, str) else ""
        return _Row(file_hash, size, name)

    def _record(self, raw: LegacyFileRow, row: _Row) -> Optional[serializers.Record]:
        """The row's payload as a validated record, its name stripped; None
        (skipped, with its reason) if it is not one."""
        payload = raw.payload
        if isinstance(payload, (bytes, memoryview)):
            try:
                payload = bytes(payload).decode("utf-8")
            except UnicodeDecodeError:
                self._skip(raw, "its payload is not UTF-8 text")
                return None
        if isinstance(payload, str):
            try:
                payload = json.loads(payload)
            except (ValueError, RecursionError) as exc:
                self._skip(raw, "its payload is not JSON (%s)" % exc)
                return None
        if not isinstance(payload, dict):
            self._skip(raw, "its payload is not a JSON record")
            return None
        if payload.get("filehash") != row.hash and not (
                isinstance(payload.get("filehash"), str)
                and payload["filehash"].lower() == row.hash):
            self._skip(raw, "its payload describes another file (%s)"
                       % _text(payload.get("filehash")))
            return None
        doc = dict(payload)
        if isinstance(doc.get("filename"), str):
            doc["filename"] = strip_prefix(doc["filename"], row.hash)
        try:
            record = serializers.parse_record(doc)
        except SerializationError as exc:
            self._skip(raw, str(exc))
            return None
        if record.size != row.size:
            self._skip(raw, "its payload says %d bytes, its row %d" % (record.size, row.size))
            return None
        if not record.filename:  # a v0.1 record has no name: the row has one
            record = record._replace(filename=safe_basename(row.filename))
        return record

    def _source(self, raw: LegacyFileRow, row: _Row) -> Optional[str]:
        if raw.blockchain_hash is None:
            return None
        try:
            return check_source(raw.blockchain_hash)
        except InvalidInputError as exc:
            self._note("%s: blockchain_hash not carried: %s" % (row.hash, exc))
            return None

    # -- bytes -------------------------------------------------------------------------

    def _add_files(self, wanted: Dict[str, Tuple[_Row, bool]], dir_fd: int) -> None:
        """Add the files of ``wanted`` that no host holds, from the storage folder."""
        held = self.pool.db.files.in_pool(wanted)
        added = []
        for file_hash, (row, required) in wanted.items():
            if file_hash in held or self.pool.cache.contains(file_hash):
                self.summary["present"] += 1  # a host has it, or it is pinned and queued here
                continue
            got = self._add_file(row, required, dir_fd)
            if got is not None:
                added.append(got)
        # The batch goes to the hosts in one round, as upload_many sends its
        # batches (each file is pinned and queued meanwhile).
        if added and not self.pool.defer_uploads:
            self.pool.replication.replicate_logged(added)
        self.summary["uploaded"] += added

    def _add_file(self, row: _Row, required: bool, dir_fd: int) -> Optional[str]:
        """Ingest one file from the storage folder; None if it is not there or refused."""
        name = row.name if row.name.startswith(row.hash[:7] + "_") \
            else row.hash[:7] + "_" + row.name
        if "/" in name or "\0" in name or len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX:
            self._refuse(row, "its name %r cannot be a file of the storage folder" % name)
            return None
        try:
            # O_NOFOLLOW: a symbolic link is refused, never followed (out of
            # the folder or anywhere); O_NONBLOCK: a FIFO cannot hang the open.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            if required:
                self.summary["missing"].append({"hash": row.hash, "name": row.name})
                log.warning("import-legacy: %s (%s) was never uploaded and is not in %s: it "
                            "cannot be imported", row.name, row.hash, self.storage)
            return None
        except OSError as exc:
            self._refuse(row, "is a symbolic link; not followed" if exc.errno == errno.ELOOP
                         else "cannot be opened: %s" % exc.strerror)
            return None
        with os.fdopen(fd, "rb", buffering=0) as src:
            st = os.fstat(src.fileno())
            if not stat.S_ISREG(st.st_mode):
                self._refuse(row, "is not a regular file")
                return None
            if st.st_size != row.size:
                self._refuse(row, "holds %d bytes; its record says %d" % (st.st_size, row.size))
                return None
            label = os.path.join(self.storage, name)
            try:
                file_hash = self.pool.add_open_file(
                    src, label, safe_basename(row.filename), created=max(0, int(st.st_mtime)),
                    expected=row.hash, defer=True)
            except (OSError, CloudManagerError) as exc:
                self._refuse(row, str(exc))
                return None
        return file_hash

    # -- the meter and the cursor ------------------------------------------------------

    def _meter(self, rows: Optional[List[Tuple[Any, Any, Any]]]) -> None:
        if rows is None:
            return
        months: Dict[str, List[int]] = {}
        for month, uploaded, downloaded in rows:
            try:
                key = _month(month)
                up = check_count(0 if uploaded is None else uploaded, "uploaded")
                down = check_count(0 if downloaded is None else downloaded, "downloaded")
            except InvalidInputError as exc:
                self._note("a transfer_meter row not carried: %s" % exc)
                continue
            total = months.setdefault(key, [0, 0])
            total[0] += up
            total[1] += down
        node = meter_node(self.database)
        self.pool.health.carry_meter(node, [(m, u, d) for m, (u, d) in months.items()])
        self.summary["meter"] = {"node": node, "months": len(months),
                                 "uploaded": sum(u for u, _ in months.values()),
                                 "downloaded": sum(d for _, d in months.values())}

    def _block(self, values: Optional[List[Any]]) -> None:
        if values is None:
            return
        heights = []
        for value in values:
            try:
                heights.append(check_count(value, "last_known_block"))
            except InvalidInputError as exc:
                self._note("blockchain_state not carried: %s" % exc)
        if heights:
            self.summary["last_known_block"] = self.pool.legacy.carry_block(max(heights))


def _month(value: Any) -> str:
    """An original meter month as ``YYYY-MM`` (:data:`NO_MONTH` for none).

    :raises InvalidInputError: if it is not a month
    """
    if value is None:
        return NO_MONTH
    match = _MONTH.fullmatch(value) if isinstance(value, str) else None
    if match is None or not 1 <= int(match.group(2)) <= 12:
        raise InvalidInputError("not a month: %r" % (_text(value),))
    return "%s-%02d" % (match.group(1), int(match.group(2)))


def _text(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def import_legacy(pool: Pool, database: Union[str, os.PathLike],
                  storage: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Import an original cloud-manager pool into ``pool``; see the module's docstring.

    :return: the summary (see :meth:`cloudmanager.CloudManager.import_legacy`)
    :raises LegacyPoolError: for a missing database or storage folder, or a
        database that is not an original pool
    :raises CloudManagerError: if a database fails
    """
    return LegacyImport(pool, database, storage).run()
