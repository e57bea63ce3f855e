"""Import and export of records: the JSON format at the edge of a pool.

Export streams every file with at least one copy on a host (a record no host
holds is of no use to another node) from one cursor. Import validates every
record (:mod:`cloudmanager.serializers`), passes over the ones that would
change nothing without parsing them, and merges the rest in batches through
:meth:`cloudmanager.replication.Replicator.merge`, which writes the claims.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import logging
from typing import IO, Dict, Iterable, Iterator, List, Optional, Tuple

from . import serializers
from .db import FileDatabase
from .db.records import LOAD_BATCH, KnownRecord
from .engine import UploadEngine
from .errors import SerializationError

log = logging.getLogger(__name__)


class RecordStore:
    """A pool's records, as the JSON format sees them.

    :param db: the pool's database
    :param engine: to tell which imported copies this node can reach
    :param merge: ``merge(records) -> (changed, refused)``, the writer of
        imported claims (:meth:`cloudmanager.replication.Replicator.merge`)
    """

    def __init__(self, db: FileDatabase, engine: UploadEngine, merge) -> None:
        self.db = db
        self.engine = engine
        self._merge_claims = merge

    # -- export ---------------------------------------------------------------------

    def records(self, hashes: Optional[Iterable[str]] = None,
                with_copies_only: bool = True, unpublished: bool = False
                ) -> Iterator[serializers.Record]:
        """The pool's records, in hash order.

        :param unpublished: only those neither exported by
            ``data_dump(limit)`` nor loaded from a source (see
            :mod:`cloudmanager.legacy`)
        """
        for row in self.db.records.iter(hashes, with_copies_only=with_copies_only,
                                        unpublished=unpublished):
            yield serializers.Record(row.hash, row.filename, row.size, row.created,
                                     tuple(row.uploads), tuple(row.objects))

    def dump(self) -> str:
        """Every record with a copy on a host, as a JSON array of v0.2 records."""
        out = io.StringIO()
        serializers.dump_to(self.records(), out)
        return out.getvalue()

    def dump_to(self, fileobj: IO[str]) -> int:
        """Stream the records of :meth:`dump` to a text file object.

        :return: the number of records written
        """
        return serializers.dump_to(self.records(), fileobj)

    def info(self, file_hash: str) -> Optional[dict]:
        """The file's record as a dict, whether or not a host holds it."""
        for record in self.records([file_hash], with_copies_only=False):
            return serializers.record_to_dict(record)
        return None

    # -- import -----------------------------------------------------------------------

    def load(self, text: str | bytes) -> int:
        """Merge the text of a dump.

        :return: how many records were imported or updated
        :raises SerializationError: if the text is not JSON records
        """
        return self._merge(_parse_all(_document(text)))

    def load_tagged(self, text: str | bytes, source: str) -> int:
        """Merge the text of a dump and tag its records with ``source`` (see
        :meth:`cloudmanager.db.published.Published.tag`), each batch's merge
        and tags in one transaction.

        Invalid records are skipped with a logged reason, as :meth:`load`
        does; a record refused for its size is not tagged.

        :param source: where the text came from (checked by the caller)
        :return: how many valid records the text held
        :raises SerializationError: if the text is not JSON records, or holds
            no valid one
        """
        records = list(_parse_all(_document(text)))
        if not records:
            raise SerializationError("no valid record in the text")
        self._merge(records, source=source)
        return len(records)

    def merge_records(self, records: Iterable[serializers.Record],
                      source: Optional[str] = None) -> int:
        """Merge records already parsed and validated
        (:func:`cloudmanager.serializers.parse_record`), tagged with
        ``source`` if given, as :meth:`load_tagged` tags them.

        :return: how many records were imported or updated
        """
        return self._merge(records, source=source)

    def load_from(self, fileobj: IO[str]) -> int:
        """Merge records streamed from a text file object holding a JSON array.

        :return: how many records were imported or updated
        :raises SerializationError: if the document is not JSON records
            (records before the fault stay merged), or holds records and
            none of them is valid
        """
        seen: collections.Counter[str] = collections.Counter()
        merged = self._merge(self._new_records(serializers.iter_documents(fileobj), seen))
        if seen["records"] and seen["invalid"] == seen["records"]:
            # "merged 0" would read as "nothing new": say nothing could be read.
            raise SerializationError(
                "its only record is invalid (the reason is logged)" if seen["records"] == 1
                else "none of its %d records is valid (each reason is logged)" % seen["records"])
        return merged

    def _new_records(self, documents: Iterable, seen: Optional[collections.Counter[str]] = None
                     ) -> Iterator[serializers.Record]:
        """Validate decoded JSON records, passing over those the pool knows already.

        A record of a known file with the same size, a filename if it brings
        one, and only copies the pool has recorded would change nothing: it
        is skipped unparsed, so reloading a dump costs a lookup per record,
        not a validation. Every other record is parsed and validated.
        """
        seen = collections.Counter() if seen is None else seen
        batch: List[Tuple[int, object]] = []
        for item in enumerate(documents):
            batch.append(item)
            if len(batch) >= LOAD_BATCH:
                seen["records"] += len(batch)
                yield from self._parse_unknown(batch, seen)
                batch = []
        seen["records"] += len(batch)
        yield from self._parse_unknown(batch, seen)

    def _parse_unknown(self, batch: List[Tuple[int, object]], seen: collections.Counter[str]
                       ) -> Iterator[serializers.Record]:
        known = self.db.records.known(
            doc["filehash"] for _, doc in batch
            if isinstance(doc, dict) and isinstance(doc.get("filehash"), str))
        for index, doc in batch:
            # (``__class__ is``: a test of the exact types the decoder makes,
            # cheaper than isinstance; anything else is parsed in full.)
            if known and doc.__class__ is dict:
                file_hash = doc.get("filehash")
                if file_hash.__class__ is str and _changes_nothing(doc, known.get(file_hash)):
                    continue
            try:
                record = serializers.parse_record(doc)
            except SerializationError as exc:
                seen["invalid"] += 1
                log.warning("skipping record #%d: %s", index, exc)
                continue
            yield record

    def _merge(self, records: Iterable[serializers.Record], source: Optional[str] = None
               ) -> int:
        changed = 0
        unreachable: collections.Counter[str] = collections.Counter()
        batch: List[serializers.Record] = []
        if not self.db.shared:
            # SQLite works in this process, mostly holding the GIL: a writer
            # thread would only contend with the decoding (measured: 100,000
            # records took 2.5 s in turn, 2.7 s with the thread).
            for record in records:
                batch.append(record)
                if len(batch) >= LOAD_BATCH:
                    changed += self._merge_batch(batch, unreachable, source)
                    batch = []
        else:
            # The next batch is decoded and checked while the last one is
            # written, on a thread of its own, so the server's work overlaps
            # ours; one batch at a time is written, in order.
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cm-load") \
                    as writer:
                writing: Optional[concurrent.futures.Future[int]] = None
                for record in records:
                    batch.append(record)
                    if len(batch) >= LOAD_BATCH:
                        if writing is not None:
                            changed += writing.result()
                        writing = writer.submit(self._merge_batch, batch, unreachable, source)
                        batch = []
                if writing is not None:
                    changed += writing.result()
        if batch:
            changed += self._merge_batch(batch, unreachable, source)
        if unreachable:
            log.warning("%d imported records have copies only on hosts this node has not "
                        "configured (%s); they are kept, and listed by unreachable()",
                        sum(unreachable.values()), ", ".join(sorted(unreachable)))
        return changed

    def _merge_batch(self, batch: List[serializers.Record],
                     unreachable: collections.Counter[str], source: Optional[str] = None
                     ) -> int:
        # Records of tree manifests (``NAME.cmtree``) are named trees here too,
        # in the transaction that merges them: a reload skips known records.
        # (Imported here: the trees module is for loads, not for every pool.)
        from .trees import name_of_record

        trees = [(r.hash, name, r.datetime) for r in batch
                 for name in (name_of_record(r.filename),) if name is not None]
        if source is None and not trees:
            changed, refused = self._merge_claims(batch)
        else:  # the merge a savepoint of the transaction that tags and names
            with self.db.catalog.transaction() as conn:
                changed, refused = self._merge_claims(batch)
                if source is not None:
                    self.db.published.tag(conn, [r.hash for r in batch
                                                 if r.hash not in refused], source)
                if trees:
                    self.db.trees.add(conn, [t for t in trees if t[0] not in refused])
        for file_hash in refused:
            log.warning("refused a record of %s: its size differs from the known one",
                        file_hash)
        # Whether some configured host can fetch a copy: asked once per host
        # name and URL directory (a URL's check costs ~20 us; a batch names a
        # few places many times). For the warning below, nothing else.
        reached: Dict[Tuple[str, str], bool] = {}
        for record in batch:
            hosts = set()  # of its copies, while none is reached
            for host_name, url, error in record.uploads:
                if error:
                    continue
                place = (host_name, url.rsplit("/", 1)[0])
                can = reached.get(place)
                if can is None:
                    can = reached[place] = self.engine.reaches([(host_name, url)])
                if can:
                    break
                hosts.add(host_name)
            else:
                unreachable.update(hosts)
        return changed


def _changes_nothing(doc: dict, known: Optional[KnownRecord]) -> bool:
    """Whether merging the raw record ``doc`` would change nothing."""
    if known is None or doc.get("version") not in serializers.READABLE_VERSIONS:
        return False
    size, filename, copies = known
    raw_size = doc.get("filesize")
    if isinstance(raw_size, bool) or raw_size not in (size, str(size)):
        return False
    if not filename and doc.get("version") != "0.1" and doc.get("filename"):
        return False
    uploads = doc.get("uploads", [])
    if not isinstance(uploads, list):
        return False
    try:
        for entry in uploads:  # a loop: cheaper than all() over one or two entries
            if entry.__class__ is not dict \
                    or (entry.get("host_name"), entry.get("url", "")) not in copies:
                return False
    except TypeError:  # unhashable junk (a list as a URL): parsed, and refused there
        return False
    return True


def _document(text: str | bytes) -> list:
    """The decoded JSON array of a dump (an object alone is an array of one).

    :raises SerializationError: if the text is not a JSON array or object
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SerializationError("not UTF-8 text: %s" % exc) from exc
    if not isinstance(text, str):
        raise SerializationError("expected JSON text, got %s" % type(text).__name__)
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SerializationError("not JSON: %s" % exc) from exc
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list):
        raise SerializationError("expected a JSON array of records, got %s"
                                 % type(document).__name__)
    return document


def _parse_all(document: list) -> Iterator[serializers.Record]:
    for index, obj in enumerate(document):
        try:
            yield serializers.parse_record(obj)
        except SerializationError as exc:
            log.warning("data_load: skipping record #%d: %s", index, exc)
