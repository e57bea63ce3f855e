"""Pool: the core of a pool of files, below the :class:`~cloudmanager.CloudManager` facade.

It wires the parts together and holds the data paths of the public API; it
raises typed exceptions (:mod:`cloudmanager.errors`) where the facade returns
the seed's ``False`` and ``None``. The parts:

- :class:`~cloudmanager.db.FileDatabase`: every SQL statement;
- :class:`~cloudmanager.cache.CacheStore`: the storage directory;
- :class:`~cloudmanager.engine.UploadEngine`: moving bytes (writes nothing);
- :class:`~cloudmanager.health.Health`: the circuit breaker;
- :class:`~cloudmanager.replication.Replicator`: copies, the queue, sync, verify;
- :class:`~cloudmanager.records.RecordStore`: import and export;
- :class:`~cloudmanager.legacy.OriginalApi`: the original's wider API;
- :class:`~cloudmanager.trees.TreeStore`: trees, recorded and restored;
- :mod:`cloudmanager.reports`: statistics and status.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import tempfile
import threading
import time
from typing import (
    TYPE_CHECKING, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple,
    Union,
)

from . import fsutil, meter
from .cache import CacheStore, Reservation, fsck
from .cache.store import Send
from .db import FileDatabase, index_path_for
from .db.copies import HeldCopy
from .engine import DownloadJob, DownloadResult, SealedObject, UploadEngine, Verdict
from .errors import (
    CacheError,
    CacheFullError,
    CloudManagerError,
    CorruptCopyError,
    DestinationError,
    DestinationExistsError,
    DownloadError,
    HostError,
    IntegrityError,
    InvalidInputError,
    NotInPoolError,
    NotStartedError,
    TransientHostError,
)
from .health import Fact, Health
from .hosts.base import Host
from .replication import Replicator, SyncSummary
from .validation import check_hash, safe_basename

if TYPE_CHECKING:
    from .crypto import PoolKey
    from .legacy import OriginalApi
    from .records import RecordStore
    from .trees import TreeStore

log = logging.getLogger(__name__)

#: Files per batch of :meth:`Pool.upload_many`: one reservation, one
#: transaction and one round of host uploads each.
UPLOAD_BATCH = 500

#: Files per batch of :meth:`Pool.warm_up_many`: one reservation, one round
#: of parallel downloads and two write transactions each.
WARM_BATCH = 500
#: Files landed in a batch of :meth:`Pool.warm_up_many` are recorded and
#: published in groups of up to this many...
WARM_PUBLISH = 500
#: ...or as many as landed in this many seconds, so that files from slow
#: hosts show up (and stay, if the caller is interrupted) as they come.
WARM_PUBLISH_S = 0.5

#: How many candidates an ambiguous hash prefix's error names.
AMBIGUOUS_SHOWN = 10

#: Write errors that mean the cache's disk (or this process's file size
#: limit) is full: :meth:`Pool.upload` then goes straight to the hosts.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class Pool:
    """A pool's parts, opened together; see :class:`~cloudmanager.CloudManager`.

    :raises CloudManagerError: if a part cannot be opened
    """

    def __init__(self, database: str, storage: str, capacity: int, hosts: Sequence[Host],
                 redundancy: int = 3, defer_uploads: bool = False, fsync: bool = True,
                 host_cooldown: float = 60.0, file_mode: int = fsutil.FILE_MODE,
                 key: Optional[PoolKey] = None, bwlimit: Optional[float] = None) -> None:
        self.redundancy = redundancy
        #: The pool's encryption key, or None: copies are the plaintext.
        self.key = key
        self.defer_uploads = defer_uploads
        self.db = FileDatabase(database, index_path_for(database, storage))
        try:
            self.health = Health(self.db, cooldown=host_cooldown)
            self.engine = UploadEngine(hosts, redundancy, self.health, bwlimit=bwlimit)
        except BaseException:
            self.db.close()
            raise
        try:
            self.cache = CacheStore(self.db, storage, capacity, fsync=fsync,
                                    file_mode=file_mode)
        except BaseException:
            self.engine.close()
            self.db.close()
            raise
        try:
            self.replication = Replicator(self.db, self.engine, self.health, redundancy,
                                          owner=self.cache.owner,
                                          cached_paths=self.cache.paths_if_cached,
                                          source_of=self._source_of, key=key,
                                          scratch=self.cache.scratch)
            self.cache.queue = self.replication.queue
            #: What the cheap open-time check (:func:`cloudmanager.cache.fsck.on_open`) mended.
            self.open_check = fsck.on_open(self.cache, self.db)
            self.health.node = self.cache.node_id
            self.db.leases.register_node(self.cache.node_id, self.cache.node, time.time())
            self._end_dead_removals()
            self._guard_folders()
        except BaseException:
            self.close()
            raise

    # The parts only some operations use are made on first use, so that opening
    # a pool (and importing cloudmanager) does not load their modules.

    @functools.cached_property
    def records(self) -> RecordStore:
        """Import and export of records (:mod:`cloudmanager.records`)."""
        from .records import RecordStore

        return RecordStore(self.db, self.engine, self.replication.merge)

    @functools.cached_property
    def legacy(self) -> OriginalApi:
        """The original cloud-manager's wider API (queues, meter, block cursor)."""
        from .legacy import OriginalApi

        return OriginalApi(self.db, self.records)

    @functools.cached_property
    def trees(self) -> TreeStore:
        """Trees: directories recorded by name (:mod:`cloudmanager.trees`)."""
        from .trees import TreeStore

        return TreeStore(self)

    def _end_dead_removals(self) -> None:
        live = [s.owner for s in self.db.sessions.all()]
        with self.db.catalog.transaction() as conn:
            ended = self.replication.end_dead_removals(conn, live)
        if ended:
            log.info("ended %d removals whose process died", len(ended))

    def _guard_folders(self) -> None:
        """Tell folder hosts the pool has used to insist on their marker, so an
        unmounted disk (an empty mount point) is an outage, not lost copies.

        A folder used before markers existed, whose root has none, is marked
        once one copy the catalog records is seen there (the right disk is
        mounted). If none is seen, the host still insists, and reports an
        outage until the folder is remounted or marked by hand.
        """
        health = self.db.health.all()
        for host in self.engine.hosts.values():
            if not host.can_mark:
                continue
            if host.has_marker():
                host.require_marker = True
                continue
            record = health.get(host.name)
            if record is None or not record.successes:
                continue  # never used: an empty folder is simply adopted
            url = self.db.copies.one_url_on(host.name)
            try:
                if url is not None and host.accepts(url) and host.exists(url):
                    host.mark()
                    log.info("marked %s as a folder of this pool", host.root)
            except HostError as exc:
                log.warning("could not mark %s: %s", host.name, exc)
            host.require_marker = True
            if not host.has_marker():
                log.warning("%s holds no marker and none of the copies recorded there was "
                            "found: it is treated as unmounted until it is", host.name)

    def close(self) -> None:
        """Flush the cache's bookkeeping, stop transfers, close the database."""
        try:
            self.engine.close()
            replication = getattr(self, "replication", None)  # None: init failed before
            if replication is not None:
                try:
                    replication.close()
                except CloudManagerError as exc:  # they run out by themselves
                    log.info("leases not released at close: %s", exc)
            self.cache.close()
        finally:
            self.db.close()

    # -- adding files ---------------------------------------------------------------

    def upload(self, path: os.PathLike[str] | str, defer: Optional[bool] = None,
               progress: Optional[Callable[[int], None]] = None) -> str:
        """Add a file; see :meth:`cloudmanager.CloudManager.upload`.

        :return: the file's SHA-256 hex
        :raises CloudManagerError, OSError: if it could not be added
        """
        defer = self.defer_uploads if defer is None else defer
        try:
            path = os.fspath(path)
        except TypeError as exc:
            raise InvalidInputError("not a path: %r (%s)" % (path, exc)) from None
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInputError("%s is not a regular file" % path)
        filename = safe_basename(os.path.basename(path))
        if st.st_size <= self.cache.capacity:
            try:
                file_hash, _ = self.cache.ingest(path, filename, created=int(time.time()),
                                                 progress=progress, lease=not defer)
            except CacheFullError as exc:
                log.info("not caching %s: %s; uploading it from its source", path, exc)
            except OSError as exc:
                if exc.errno not in _NO_SPACE:
                    raise
                # The cache's disk is full: the reservation's temp file is
                # gone already; the hosts may still take the file.
                log.warning("cannot cache %s: %s; uploading it from its source", path, exc)
            else:
                if not defer:
                    self.replication.replicate_logged([file_hash])
                return file_hash  # in the pool: on a host, or pinned and queued
        return self.replication.upload_source(path, filename, self._record_new(filename))

    def _record_new(self, filename: str) -> Callable:
        def record(conn, file_hash: str, size: int) -> None:
            if self.db.files.add(conn, file_hash, filename, size, int(time.time()),
                                 size_known=True) == "conflict":
                raise CacheError("%s is known with another size than %d" % (file_hash, size))
        return record

    def add_open_file(self, src: BinaryIO, label: str, filename: str, created: float,
                      expected: str, defer: Optional[bool] = None) -> str:
        """Add a file already open for reading (opened as the caller must, e.g.
        without following a symlink) whose bytes must hash to ``expected``.

        It is read once: into the cache if it fits (then uploaded unless
        deferred), else streamed to the hosts as :meth:`upload` streams a
        file larger than the cache, through ``/proc/self/fd`` so that every
        read is of the file opened, whatever its name points to meanwhile.
        Bytes that hash otherwise are refused: nothing is recorded, kept or
        published.

        :param label: how the file is named in errors
        :return: ``expected``, once the file is in the pool
        :raises IntegrityError: if the bytes do not hash to ``expected``, or
            changed while they were read
        :raises CacheError: if it does not fit the cache and this system has
            no ``/proc/self/fd`` to stream it from
        :raises CloudManagerError, OSError: if it could not be added
        """
        defer = self.defer_uploads if defer is None else defer
        size = os.fstat(src.fileno()).st_size
        if size <= self.cache.capacity:
            try:
                file_hash, _ = self.cache.ingest_file(src, label, filename, created=created,
                                                      lease=not defer, expected=expected)
            except CacheFullError as exc:
                log.info("not caching %s: %s; uploading it from its source", label, exc)
            else:
                if not defer:
                    self.replication.replicate_logged([file_hash])
                return file_hash
        pinned = "/proc/self/fd/%d" % src.fileno()
        if not os.path.exists(pinned):
            raise CacheError("%s does not fit the cache (%d bytes) and cannot be streamed "
                             "from here: run again with a larger capacity"
                             % (label, self.cache.capacity))
        return self.replication.upload_source(pinned, filename, self._record_new(filename),
                                              expected=expected)

    def upload_many(self, paths: Iterable, defer: Optional[bool] = None,
                    progress: Optional[Callable[[int], None]] = None
                    ) -> List[Union[str, BaseException]]:
        """Add several files in batches; see :meth:`cloudmanager.CloudManager.upload_many`.

        :return: per path, in order: its hash, or the exception that stopped it
        """
        defer = self.defer_uploads if defer is None else defer
        paths = list(paths)
        results: List[Union[str, BaseException, None]] = [None] * len(paths)
        # Sent at once, a batch goes to the hosts from its temp files, and its
        # publish records the copies too (Replicator.sending): one transaction,
        # no queue row or lease for a file sent in full. With the catalog on a
        # server, the index may not run ahead of it: publish, then replicate.
        send = None if defer or self.db.shared else self.replication.sending
        for start in range(0, len(paths), UPLOAD_BATCH):
            ingested, alone = self._ingest_batch(
                paths, range(start, min(start + UPLOAD_BATCH, len(paths))), results, progress,
                lease=not defer, send=send)
            # The batch goes to the hosts before the next one is read: uploads
            # to slow hosts overlap in the engine, and a fast local one would
            # only contend with the reading for the GIL (measured: 10,000 small
            # files to a folder host went 10-30 % slower with a thread for it).
            if ingested and not defer and send is None:
                self.replication.replicate_logged(ingested)
            for i in alone:
                try:
                    results[i] = self.upload(paths[i], defer=defer, progress=progress)
                except (OSError, CloudManagerError) as exc:
                    results[i] = exc
        return results  # type: ignore[return-value]

    def _ingest_batch(self, paths: list, indexes: Iterable[int], results: list,
                      progress: Optional[Callable[[int], None]] = None, lease: bool = False,
                      send: Optional[Send] = None) -> Tuple[List[str], List[int]]:
        """Cache ``paths[i] for i in indexes`` as one batch; fills ``results``.

        :return: ``(hashes, alone)``: the distinct hashes cached, and the
            indexes of paths that must go through :meth:`upload` on their own
        """
        batch, alone = [], []  # (index, path, filename, size); indexes for upload()
        now = int(time.time())
        for i in indexes:
            try:
                path = os.fspath(paths[i])
                st = os.stat(path)
            except (TypeError, OSError):
                alone.append(i)  # upload() says why
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size > self.cache.capacity:
                alone.append(i)
                continue
            batch.append((i, path, safe_basename(os.path.basename(path)), st.st_size))
        ingested = []
        if batch:
            try:
                outcomes = self.cache.ingest_many([(p, name, now, size)
                                                   for _, p, name, size in batch],
                                                  progress=progress, lease=lease,
                                                  send=send)
            except (OSError, CloudManagerError) as exc:  # the batch does not fit, or a
                log.info("batch of %d files: %s; uploading them one by one", len(batch), exc)
                outcomes = [exc] * len(batch)  # database error: one by one says more
            for (i, _, _, _), outcome in zip(batch, outcomes):
                if isinstance(outcome, tuple):
                    results[i] = outcome[0]
                    ingested.append(outcome[0])
                else:
                    alone.append(i)
        return list(dict.fromkeys(ingested)), sorted(alone)

    # -- getting files ----------------------------------------------------------------

    def size_of(self, file_hash: str) -> int:
        """The recorded size of a pool file.

        :raises NotInPoolError: if the pool does not have it
        """
        row = self.db.files.get(file_hash)
        if row is None:
            raise NotInPoolError("%s is not in the pool" % file_hash)
        return row.size

    def warm_up(self, file_hash: str, progress: Optional[meter.Progress] = None) -> str:
        """Put a file in the cache; see :meth:`cloudmanager.CloudManager.warm_up`.

        :param progress: told of the bytes received from a host
        :return: the cached file's path
        :raises InvalidInputError: for a malformed hash
        :raises NotInPoolError: for a file the pool does not have
        :raises CloudManagerError: if it cannot be cached
        """
        file_hash = check_hash(file_hash)
        path = self.cache.lookup(file_hash)
        if path is not None:
            return path
        size = self.size_of(file_hash)
        self.cache.note_miss()
        with meter.reporting(meter.bytes_only(progress)):
            return self._fetch_into_cache(file_hash, size)

    def warm_up_many(self, hashes: Iterable[str], progress: Optional[meter.Progress] = None,
                     stop: Optional[threading.Event] = None,
                     landed: Optional[Callable[[str, Union[str, BaseException]], None]] = None
                     ) -> List[Union[str, BaseException]]:
        """Put several files in the cache; see :meth:`cloudmanager.CloudManager.warm_up_many`.

        Hits are found with one query. Misses are fetched in batches of up
        to :data:`WARM_BATCH` files that fit the cache together: per batch,
        one reservation, the downloads in parallel through the engine
        (:meth:`UploadEngine.download_many`, each host within its
        connections); as they land, what they proved (verdicts, host health)
        is recorded in one transaction and the files published in another,
        made durable together (:meth:`CacheStore.commit_many`), for up to
        :data:`WARM_PUBLISH` files or :data:`WARM_PUBLISH_S` seconds' worth
        at a time. A batch the cache cannot take whole (pinned files, writes
        in flight) is split in halves, down to single files. Files with only
        encrypted copies, or whose plaintext copies all failed while
        encrypted ones remain, are then fetched one by one as
        :meth:`warm_up` does.

        :param progress: told of the bytes received from hosts, from the
            threads that move them
        :param stop: once set, no further file starts: those in flight are
            finished (and cached); the others get a :class:`NotStartedError`
        :param landed: ``landed(hash, outcome)``, called in this thread as each
            file's outcome is known (once per distinct hash)
        :return: per hash, in order: the cached file's path, or the
            exception that stopped it (:class:`InvalidInputError`,
            :class:`NotInPoolError`, :class:`CacheFullError`,
            :class:`DownloadError`, :class:`NotStartedError`...)
        :raises KeyboardInterrupt: (or any exception that is not a
            :class:`CloudManagerError` or an :class:`OSError`) from
            ``progress`` or ``landed``: the files not published yet are
            dropped, their temp files and their reservation with them;
            the files published stay cached
        """
        hashes = list(hashes)
        outcomes: Dict[str, Union[str, BaseException]] = {}

        def settle(file_hash: str, outcome: Union[str, BaseException]) -> None:
            outcomes[file_hash] = outcome
            if landed is not None:
                landed(file_hash, outcome)

        results: List[Union[str, BaseException, None]] = [None] * len(hashes)
        for i, text in enumerate(hashes):
            try:
                hashes[i] = check_hash(text)
            except InvalidInputError as exc:
                results[i] = exc
        wanted = list(dict.fromkeys(h for i, h in enumerate(hashes) if results[i] is None))
        hits = self.cache.lookup_many(wanted)
        for file_hash in wanted:
            if file_hash in hits:
                settle(file_hash, hits[file_hash])
        misses = [h for h in wanted if h not in hits]
        sizes = self.db.files.sizes(misses)
        fetch = []
        for file_hash in misses:
            if file_hash not in sizes:
                settle(file_hash, NotInPoolError("%s is not in the pool" % file_hash))
                continue
            self.cache.note_miss()
            if sizes[file_hash] > self.cache.capacity:
                settle(file_hash, CacheFullError("%d bytes do not fit a %d-byte cache"
                                                 % (sizes[file_hash], self.cache.capacity)))
            else:
                fetch.append(file_hash)
        with meter.reporting(meter.bytes_only(progress)):
            for batch in self._warm_batches(fetch, sizes):
                self._warm_batch(batch, sizes, stop, settle)
        for i, file_hash in enumerate(hashes):
            if results[i] is None:
                results[i] = outcomes[file_hash]
        return results  # type: ignore[return-value]

    def _warm_batches(self, hashes: List[str], sizes: Dict[str, int]) -> Iterator[List[str]]:
        """``hashes`` in batches of up to :data:`WARM_BATCH` files whose sizes
        add up to no more than the cache's capacity."""
        batch: List[str] = []
        total = 0
        for file_hash in hashes:
            if batch and (len(batch) >= WARM_BATCH
                          or total + sizes[file_hash] > self.cache.capacity):
                yield batch
                batch, total = [], 0
            batch.append(file_hash)
            total += sizes[file_hash]
        if batch:
            yield batch

    def _warm_batch(self, batch: List[str], sizes: Dict[str, int],
                    stop: Optional[threading.Event], settle: Callable) -> None:
        """Fetch one batch of :meth:`warm_up_many` into the cache; ``settle(hash,
        outcome)`` each of its files."""
        if stop is not None and stop.is_set():
            for file_hash in batch:
                settle(file_hash, NotStartedError("%s: stopped before it started" % file_hash))
            return
        with self.replication.locks.hold(batch):
            # Another thread may have fetched some while we waited for the locks.
            cached = self.cache.paths_if_cached(batch)
            copies = self.db.copies.objects_among(h for h in batch if h not in cached)
            plain, alone = [], []
            for file_hash in batch:
                held, condemned = copies.get(file_hash, ([], []))
                if file_hash in cached:
                    settle(file_hash, cached[file_hash])
                elif not held and not condemned:
                    settle(file_hash, DownloadError("no host holds a copy of %s" % file_hash))
                elif any(not c.encrypted for c in held + condemned):
                    plain.append(file_hash)
                else:
                    alone.append(file_hash)
            if plain:
                failed = self._warm_plain(plain, sizes, copies, stop, settle)
                alone += [h for h in failed if any(c.encrypted for c in sum(copies[h], []))]
                for file_hash in failed:
                    if file_hash not in alone:
                        settle(file_hash, failed[file_hash])
            for file_hash in alone:  # as warm_up does it, one by one
                if stop is not None and stop.is_set():
                    settle(file_hash, NotStartedError("%s: stopped before it started"
                                                      % file_hash))
                    continue
                try:
                    settle(file_hash, self._fetch_into_cache(file_hash, sizes[file_hash]))
                except (OSError, CloudManagerError) as exc:
                    settle(file_hash, exc)

    def _warm_plain(self, hashes: List[str], sizes: Dict[str, int],
                    copies: Dict[str, Tuple[List[HeldCopy], List[HeldCopy]]],
                    stop: Optional[threading.Event], settle: Callable
                    ) -> Dict[str, BaseException]:
        """Fetch files from their plaintext copies into one batch of rooms;
        as they land, record what the attempts proved and publish the files
        (two transactions per group of them); ``settle`` each file published
        or refused.

        :return: ``{hash: DownloadError}`` of the files no plaintext copy delivered
        """
        try:
            rooms = self.cache.batch_rooms([sizes[h] for h in hashes])
        except CacheFullError as exc:
            if len(hashes) == 1:
                settle(hashes[0], exc)
                return {}
            half = len(hashes) // 2
            first = self._warm_plain(hashes[:half], sizes, copies, stop, settle)
            first.update(self._warm_plain(hashes[half:], sizes, copies, stop, settle))
            return first
        failed: Dict[str, BaseException] = {}
        waiting: List[Tuple[str, object]] = []  # landed, not recorded yet
        last = [time.monotonic()]

        def publish() -> None:
            # A room's CacheFullError has neither: nothing was tried.
            verdicts = [(v, h) for h, r in waiting for v in getattr(r, "verdicts", [])]
            self.replication.apply([v for v, _ in verdicts],
                                   [f for _, r in waiting for f in getattr(r, "facts", [])],
                                   hashes={v.location: h for v, h in verdicts})
            good = [(h, sizes[h], r.room) for h, r in waiting if isinstance(r, DownloadResult)]
            published = self.cache.commit_many(good)
            for file_hash, result in waiting:
                if isinstance(result, DownloadError):
                    failed[file_hash] = result
                else:
                    settle(file_hash, published.get(file_hash, result))
            waiting.clear()
            last[0] = time.monotonic()

        def landed(k: int, result: object) -> None:
            waiting.append((hashes[k], result))
            if len(waiting) >= WARM_PUBLISH or time.monotonic() - last[0] >= WARM_PUBLISH_S:
                publish()

        try:
            jobs = []
            for k, file_hash in enumerate(hashes):
                held, condemned = copies[file_hash]
                jobs.append(DownloadJob(
                    file_hash, sizes[file_hash],
                    [(c.host_name, c.url) for c in held if not c.encrypted], rooms.room(k),
                    [(c.host_name, c.url) for c in condemned if not c.encrypted]))
            got = self.engine.download_many(jobs, durable=not self.cache.batch_sync, stop=stop,
                                            landed=landed,
                                            idle=lambda: publish() if waiting else None)
            if waiting:
                publish()
        finally:
            rooms.close()
        for file_hash, result in zip(hashes, got):
            if result is None:
                settle(file_hash, NotStartedError("%s: stopped before it started" % file_hash))
        return failed

    def _fetch_into_cache(self, file_hash: str, size: int) -> str:
        # One download per hash at a time in this process; later callers find
        # it cached.
        with self.replication.locks.hold([file_hash]):
            path = self.cache.path_if_cached(file_hash)
            if path is not None:  # another thread fetched it while we waited
                return path
            if not self.db.copies.objects(file_hash) \
                    and not self.db.copies.objects(file_hash, condemned=True):
                raise DownloadError("no host holds a copy of %s" % file_hash)
            # Each attempt writes under a reservation of its own (issue 11):
            # one the engine gave up on keeps writing, so it keeps its room
            # until its call ends, and the next attempt takes a new one.
            rooms: List[Reservation] = []

            def room() -> Reservation:
                rooms.append(self.cache.reservation(size))
                return rooms[-1]

            result = self._download(file_hash, size, room=room)
            reservation = next(r for r in rooms if r is result.room)
            try:
                return self.cache.commit(reservation, file_hash, size, must_exist=True)
            finally:
                reservation.release()  # nothing once committed

    def _download(self, file_hash: str, size: int, dest: Optional[str] = None,
                  room: Optional[Callable[[], Reservation]] = None) -> DownloadResult:
        """Fetch a verified copy to ``dest`` (or into a ``room`` of the cache,
        see :meth:`UploadEngine.download`), from the copies believed good and
        then, as a last resort, from condemned ones; what the attempts proved
        is recorded."""
        held = self.db.copies.objects(file_hash)
        condemned = self.db.copies.objects(file_hash, condemned=True)
        plain = [(c.host_name, c.url) for c in held if not c.encrypted]
        plain_last = [(c.host_name, c.url) for c in condemned if not c.encrypted]
        sealed = [c for c in held + condemned if c.encrypted]
        failure: Optional[DownloadError] = None
        if plain or plain_last or not sealed:
            try:
                result = self.engine.download(file_hash, size, plain, dest,
                                              last_resort=plain_last, room=room)
            except DownloadError as exc:
                self.replication.apply(exc.verdicts, exc.facts, file_hash=file_hash)
                if not sealed:
                    raise
                failure = exc
            else:
                self.replication.apply(result.verdicts, result.facts, file_hash=file_hash)
                return result
        try:
            return self._download_sealed(file_hash, size, sealed, dest, room)
        except DownloadError as exc:
            if failure is not None:
                exc.failures[:0] = failure.failures
            raise

    def _download_sealed(self, file_hash: str, size: int, sealed: Sequence[HeldCopy],
                         dest: Optional[str], room: Optional[Callable[[], Reservation]]
                         ) -> DownloadResult:
        """Fetch a file from its encrypted copies into ``dest`` (or ``room()``).

        From a host that can stream, the ciphertext is decrypted as it
        arrives, hashed on its way in (against its record) and out (against
        the file): it is never stored. From the others (a tool that writes
        files), it is fetched first, checked against its recorded hash (into
        room of its own in the cache), then decrypted. Either way a
        ciphertext that is not the recorded one, or does not decrypt to the
        file, is a bad copy."""
        key = self.key
        if key is None or not any(c.key_id == key.key_id for c in sealed):
            raise DownloadError("%s is only on hosts encrypted for another key (%s); this "
                                "node %s" % (file_hash, ", ".join(sorted({c.host_name for c in
                                                                          sealed})),
                                             "has another key" if key else "has no key"))
        groups: Dict[Tuple[str, int], List[HeldCopy]] = {}
        for copy in sealed:
            if copy.key_id == key.key_id:
                groups.setdefault((copy.object_sha256, copy.object_size), []).append(copy)
        failures: List[HostError] = []
        facts: List[Fact] = []
        verdicts: List[Verdict] = []
        for (digest, osize), copies in groups.items():
            sources = [(c.host_name, c.url) for c in copies]
            streamed = [s for s in sources if self.engine.streams(*s)]
            if streamed:
                try:
                    result = self.engine.download(
                        file_hash, size, streamed, dest, room=room,
                        sealed=SealedObject(key.decrypt_stream, digest, osize))
                except DownloadError as exc:
                    self.replication.apply(exc.verdicts, exc.facts, file_hash=file_hash)
                    failures += exc.failures
                    facts += exc.facts
                    verdicts += exc.verdicts
                else:
                    self.replication.apply(result.verdicts, result.facts, file_hash=file_hash)
                    return DownloadResult(result.location, facts + result.facts,
                                          verdicts + result.verdicts, room=result.room)
                sources = [s for s in sources if s not in streamed]
                if not sources:
                    continue
            with contextlib.ExitStack() as stack:
                try:
                    got, ciphertext = self._fetch_ciphertext(digest, osize, sources, stack)
                except DownloadError as exc:
                    self.replication.apply(exc.verdicts, exc.facts, file_hash=file_hash)
                    failures += exc.failures
                    facts += exc.facts
                    continue
                self.replication.apply(got.verdicts, got.facts, file_hash=file_hash)
                facts += got.facts
                target = room() if room is not None else None
                out = target.temp if target is not None else dest
                assert out is not None
                try:
                    plain_hash, plain_size = key.decrypt_file(ciphertext, out, limit=size)
                    if plain_hash != file_hash:  # the age command may be what is broken
                        plain_hash, plain_size = key.decrypt_file(ciphertext, out, limit=size,
                                                                  use_binary=False)
                    if plain_hash != file_hash:
                        raise IntegrityError("it decrypts to %d bytes hashing to %s"
                                             % (plain_size, plain_hash))
                    if plain_size != size:
                        raise OverflowError("the file has %d bytes but %d are recorded"
                                            % (plain_size, size))
                except (IntegrityError, OverflowError, OSError) as exc:
                    fsutil.remove_quietly(out)
                    if target is not None:
                        target.release()
                    if not isinstance(exc, IntegrityError):  # the record, or this disk
                        failures.append(TransientHostError(
                            got.location.host_name, "cannot use its encrypted copy: %s" % exc))
                        log.warning("not using the encrypted copy of %s on %s: %s", file_hash,
                                    got.location.host_name, exc)
                        continue
                    bad = [Verdict(got.location, "bad")]
                    self.replication.apply(bad, file_hash=file_hash)
                    verdicts += bad
                    failures.append(CorruptCopyError(got.location.host_name,
                                                     "encrypted copy: %s" % exc))
                    log.warning("the encrypted copy of %s on %s is bad: %s", file_hash,
                                got.location.host_name, exc)
                    continue
                return DownloadResult(got.location, facts, verdicts + got.verdicts, room=target)
        raise DownloadError("no host delivered a good copy of %s" % file_hash, failures, facts,
                            verdicts)

    def _fetch_ciphertext(self, digest: str, size: int, sources: List[Tuple[str, str]],
                          stack: contextlib.ExitStack) -> Tuple[DownloadResult, str]:
        """Fetch an encrypted copy's ciphertext, checked against its recorded
        hash, into room of its own in the cache (released when ``stack``
        closes), or, when it does not fit, into a private temp directory.

        :return: the download's result, and the ciphertext's path
        :raises DownloadError: if no source delivered it
        """
        rooms: List[Reservation] = []

        def ciphertext_room() -> Reservation:
            rooms.append(self.cache.reservation(size))
            return rooms[-1]

        if size <= self.cache.capacity:
            try:
                got = self.engine.download(digest, size, sources, room=ciphertext_room)
            except CacheFullError as exc:
                log.info("not fetching an encrypted copy into the cache: %s", exc)
            else:
                assert got.room is not None
                stack.callback(got.room.release)
                return got, got.room.temp
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="cm-sealed-"))
        path = os.path.join(directory, digest)
        return self.engine.download(digest, size, sources, path), path

    @contextlib.contextmanager
    def _source_of(self, file_hash: str, size: int) -> Iterator[str]:
        """Yield a local path holding the file's verified bytes, for a top-up.

        Reading the cached copy is not a use: no hit is counted and the LRU
        order stays as it was.
        """
        path = self.cache.path_if_cached(file_hash)
        if path is not None:
            yield path
            return
        if size <= self.cache.capacity:
            try:
                path = self._fetch_into_cache(file_hash, size)
            except CacheFullError as exc:
                log.info("not caching %s for a top-up: %s", file_hash, exc)
            else:
                yield path
                return
        # Too big for the cache (or no room): a private temp dir, removed after.
        with tempfile.TemporaryDirectory(prefix="cm-sync-") as scratch:
            dest = os.path.join(scratch, file_hash)
            self._download(file_hash, size, dest)
            yield dest

    def download(self, file_hash: str, destination: os.PathLike[str] | str,
                 progress: Optional[meter.Progress] = None, overwrite: bool = False) -> str:
        """Write a file to ``destination``; see :meth:`cloudmanager.CloudManager.download`.

        :param progress: told of the bytes written: received from a host, or
            copied from the cache when the file was cached already
        :return: the path written (or found holding the file already)
        :raises DestinationExistsError: if the destination holds other bytes
            and ``overwrite`` is false, or is not a regular file
        :raises DestinationError: naming the destination (never a temp
            file), if it cannot be written
        """
        with meter.reporting(meter.bytes_only(progress)):
            return self._download_checked(file_hash, destination, progress, overwrite)

    def _download_checked(self, file_hash: str, destination: os.PathLike[str] | str,
                          progress: Optional[meter.Progress], overwrite: bool) -> str:
        file_hash = check_hash(file_hash)
        row = self.db.files.get(file_hash)
        if row is None:
            raise NotInPoolError("%s is not in the pool" % file_hash)
        dest = self._destination(os.fspath(destination), row.filename or file_hash)
        if os.path.lexists(dest):
            st = os.lstat(dest)
            if not stat.S_ISREG(st.st_mode):
                # A rename would replace the link, device, FIFO or directory itself.
                raise DestinationExistsError("%s exists and is not a regular file; it is left "
                                             "as it is" % dest)
            if st.st_size == row.size and fsutil.hash_file(dest)[0] == file_hash:
                log.info("%s already holds %s; left as it is", dest, file_hash)
                return dest
            if not overwrite:
                raise DestinationExistsError(
                    "%s exists and holds other bytes; it is left as it is (pass "
                    "overwrite=True, or cm download --force, to replace it)" % dest)
        # The bytes go to a private name beside the destination, then take its
        # name at the end, with no replace unless asked: a file that appears
        # there meanwhile is not clobbered either.
        try:
            fd, part = fsutil.open_temp(os.path.dirname(dest), ".%s." % os.path.basename(dest)[:40])
        except OSError as exc:
            raise DestinationError("cannot write %s: %s" % (dest, exc.strerror)) from None
        os.close(fd)
        try:
            self._write_copy(file_hash, row.size, part, progress)
            fsutil.publish(part, dest, self.cache.fsync, replace=overwrite)
        except FileExistsError:
            raise DestinationExistsError("%s appeared while %s was downloaded; it is left as "
                                         "it is" % (dest, file_hash)) from None
        except OSError as exc:
            raise DestinationError("cannot write %s: %s" % (dest, exc.strerror)) from None
        finally:
            fsutil.remove_quietly(part)
        return dest

    @staticmethod
    def _destination(text: str, name: str) -> str:
        """The file a download to ``text`` writes: ``text`` itself, or ``name``
        in it when it is a directory (a trailing separator says it must be
        one, made if missing).

        :raises DestinationError: naming ``text``, if its directory does not exist
        """
        dest = os.path.abspath(text)
        if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
            if os.path.lexists(dest) and not os.path.isdir(dest):
                raise DestinationError("cannot write into %s: it is not a directory" % text)
            try:
                os.makedirs(dest, exist_ok=True)
            except OSError as exc:
                raise DestinationError("cannot make the directory %s: %s"
                                       % (text, exc.strerror)) from None
        if os.path.isdir(dest):
            return os.path.join(dest, name)
        if not os.path.isdir(os.path.dirname(dest)):
            raise DestinationError("cannot write %s: the directory %s does not exist"
                                   % (text, os.path.dirname(dest)))
        return dest

    def _write_copy(self, file_hash: str, size: int, dest: str,
                    progress: Optional[meter.Progress]) -> None:
        """Write a verified copy to ``dest``: from the cache, else fetched into
        the cache if it fits, else streamed from a host."""
        cached = self.cache.lookup(file_hash)
        fetched = False
        if cached is None and size <= self.cache.capacity:
            self.cache.note_miss()
            try:
                cached = self._fetch_into_cache(file_hash, size)
                progress = None  # its bytes were counted as they arrived
                fetched = True
            except (CacheError, DownloadError) as exc:
                log.info("not caching %s (%s); streaming it to %s", file_hash, exc, dest)
        src = None
        if cached is not None:
            try:
                src = open(cached, "rb")
            except FileNotFoundError:  # another process evicted it since the lookup
                log.info("%s left the cache while it was looked up; fetching it", file_hash)
        if src is not None:
            with src, fsutil.atomic_write(dest, self.cache.fsync) as out:
                if fetched:
                    # Its bytes were hashed as they arrived, just now (a cached
                    # file is written once, verified, under its hash): the
                    # kernel copies them, with no second pass of SHA-256.
                    fsutil.kernel_copy(src.fileno(), out.fileno())
                    return
                try:
                    got, _ = fsutil.copy_and_hash(src, out.fileno(), limit=size,
                                                  progress=progress)
                except OverflowError:
                    got = None  # the cached file grew: it cannot be the file
                if got != file_hash:  # bit rot or tampering in the cache
                    self.cache.drop(file_hash)
                    raise CacheError("cached copy of %s is corrupt; dropped it" % file_hash)
            return
        self._download(file_hash, size, dest)

    # -- questions ------------------------------------------------------------------------

    def exists(self, file_hash: str) -> bool:
        """Whether the pool has a record of the file."""
        return self.db.files.exists(check_hash(file_hash))

    def on_cache(self, file_hash: str) -> bool:
        """Whether the local cache holds the file (a check, not a use)."""
        return self.cache.contains(check_hash(file_hash))

    def expand_hash(self, prefix: str) -> Optional[str]:
        """The file hash starting with ``prefix``; see
        :meth:`cloudmanager.CloudManager.expand_hash`."""
        text = prefix.lower() if isinstance(prefix, str) else ""
        if len(text) < 4 or len(text) > 64 or text.strip("0123456789abcdef"):
            raise InvalidInputError("not a SHA-256 or a prefix of one (4 to 64 hex digits): %r"
                                    % (prefix,))
        found = self.db.files.with_prefix(text, limit=AMBIGUOUS_SHOWN + 1)
        if len(found) > 1:
            shown = ", ".join(found[:AMBIGUOUS_SHOWN]) + (
                ", ..." if len(found) > AMBIGUOUS_SHOWN else "")
            raise InvalidInputError("%s is ambiguous: %s start with it: %s"
                                    % (text, "more than %d files' hashes" % AMBIGUOUS_SHOWN
                                       if len(found) > AMBIGUOUS_SHOWN
                                       else "%d files' hashes" % len(found), shown))
        return found[0] if found else None

    def complete_hash(self, prefix: str, limit: int = 100) -> List[str]:
        """Hashes starting with ``prefix``; see :meth:`cloudmanager.CloudManager.complete_hash`."""
        text = prefix.lower() if isinstance(prefix, str) else ""
        if len(text) > 64 or text.strip("0123456789abcdef"):
            return []
        return self.db.files.with_prefix(text, limit=max(1, int(limit)))

    # -- keeping the pool -----------------------------------------------------------------

    def sync(self, progress: Optional[meter.Advance] = None) -> SyncSummary:
        """Upload queued files and top up files below target.

        :param progress: told of bytes sent and of files done, as they are
        """
        self.cache.flush()
        with meter.reporting(progress):
            return self.replication.sync()

    def sync_plan(self) -> List[Dict[str, object]]:
        """What :meth:`sync` would do; see :meth:`Replicator.sync_plan`."""
        self.cache.flush()
        return self.replication.sync_plan()

    def reencrypt(self, limit: int = 1000) -> dict:
        """Rewrite plaintext copies encrypted; see :meth:`Replicator.reencrypt`.

        :raises InvalidInputError: if the pool has no key
        """
        self.cache.flush()
        return self.replication.reencrypt(limit)

    def verify(self, hashes: Optional[Sequence[str]] = None,
               hosts: Optional[Sequence[str]] = None, older_than: Optional[float] = None,
               limit: Optional[int] = None, deep: bool = False,
               progress: Optional[meter.Advance] = None) -> dict:
        """Look at remote copies; see :meth:`cloudmanager.CloudManager.verify`."""
        if hashes is not None:
            hashes = [check_hash(h) for h in hashes]
        with meter.reporting(progress):
            return self.replication.verify(hashes, hosts, older_than, limit, deep)

    def check(self, repair: bool = False, deep: bool = False) -> dict:
        """Compare the database with the storage directory (``cm fsck``)."""
        def fetch(file_hash: str) -> bool:
            try:
                return bool(self.warm_up(file_hash))
            except (OSError, CloudManagerError) as exc:
                log.warning("could not fetch pinned %s back: %s", file_hash, exc)
                return False
        return fsck.check(self.cache, self.db, repair=repair, deep=deep, fetch=fetch,
                          queue=self.replication.queue)

    def remove(self, file_hash: str) -> dict:
        """Forget a file and delete its copies; see :meth:`cloudmanager.CloudManager.remove`.

        :raises NotInPoolError: if the pool does not have it
        """
        file_hash = check_hash(file_hash)
        if not self.db.files.exists(file_hash):
            raise NotInPoolError("%s is not in the pool" % file_hash)
        # Under the hash's lock: a warm_up in flight finishes first, and one
        # that starts later finds no record, so nothing brings the file back.
        return self.replication.remove(
            file_hash, forget_cached=lambda conn: self.cache.forget_rows([file_hash]),
            unlink_cached=lambda: self.cache.unlink_forgotten([file_hash]))

    def pin(self, file_hash: str, pinned: bool = True) -> bool:
        """Keep a file in the cache whatever the LRU order says (or stop).

        :return: True if the file is in the pool
        """
        file_hash = check_hash(file_hash)
        row = self.db.files.get(file_hash)
        if row is None:
            return False
        with self.db.local.transaction() as conn:
            self.db.cache_index.pin(conn, file_hash, row.size, pinned)
        return True

    def evict(self, target_bytes: int = 0) -> int:
        """Evict LRU files down to ``target_bytes``; returns how many."""
        return self.cache.evict(target_bytes)

    def import_legacy(self, database: Union[str, os.PathLike[str]],
                      storage: Union[str, os.PathLike[str]]) -> dict:
        """Import an original cloud-manager pool; see
        :meth:`cloudmanager.CloudManager.import_legacy` and
        :mod:`cloudmanager.legacy_import`.

        :raises LegacyPoolError: for a missing database or storage folder, or
            a database that is not an original pool
        :raises CloudManagerError: if a database fails
        """
        from .legacy_import import import_legacy  # only this command reads an original pool

        self.cache.flush()
        return import_legacy(self, database, storage)

    def retry_hosts(self, names: Iterable[str]) -> List[str]:
        """Forget hosts' failure streaks so every process tries them again now.

        :return: the names reset
        :raises InvalidInputError: for a name no configured host has
        """
        names = list(names)
        unknown = [n for n in names if n not in self.engine.hosts]
        if unknown:
            raise InvalidInputError("no host named %s" % ", ".join(map(repr, unknown)))
        self.health.reset(names)
        return names
