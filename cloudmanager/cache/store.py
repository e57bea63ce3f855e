"""CacheStore: the storage directory of content-addressed files.

Its paths and temp-file names come from :mod:`~cloudmanager.cache.layout`.
The byte total is a running counter in the database, so usage, admission and
eviction never walk the directory. Space for a write is *reserved* before the
first byte lands, and reservations count against the capacity with the
cached bytes, so temp files cannot push the cache past it.

Eviction takes the least recently used file that is on at least one host and
not pinned, through a partial index: O(log n) per file evicted. Cache hits
update recency in memory and are written in batches; every eviction flushes
this process's first, so its decisions see them (another process's hits of
the last second or so may not be written yet).

A publish (rename into place) and an eviction (unlink) each happen inside the
database's write transaction, so the directory and the rows change together
as far as other processes can see. A crash between the two leaves at worst an
orphan file or a row whose file is gone; the next open finds the dead session
and reconciles.
"""

import contextlib
import functools
import itertools
import logging
import os
import tempfile
import threading
import time
import weakref
from typing import (
    AbstractSet, Any, BinaryIO, Callable, ContextManager, Dict, Iterator, List, Optional,
    Sequence, Set, Tuple, Union, cast,
)

from .. import fsutil
from ..db import FileDatabase
from ..errors import CacheError, CacheFullError, DatabaseError, IntegrityError, NotInPoolError
from ..validation import check_hash
from . import fsck
from .fsck import QueueUploads
from .layout import Layout

log = logging.getLogger(__name__)

#: Deferred recency updates are written after this many hits...
TOUCH_BATCH = 1000
#: ...or once this many seconds have passed since the last write.
TOUCH_INTERVAL_S = 1.0
#: In a batch ingest, files up to this size are read whole (one read, one write).
SMALL_FILE = 1 << 20

#: One file's outcome in :meth:`CacheStore.ingest_many`: ``(hash, size)``, or
#: the exception that stopped it.
Ingested = Union[Tuple[str, int], Exception]

#: ``send(files)`` for :meth:`CacheStore.ingest_many`: sends a batch's files,
#: ``{hash: (temp_path, size)}``, to the hosts before they are published
#: (:meth:`cloudmanager.replication.Replicator.sending`), and yields
#: ``record(conn, in_pool, inserted)``, which the publish calls inside its
#: transaction once the files' rows are in (``inserted``: those it added):
#: it records their copies and returns the hashes those protect.
Send = Callable[[Dict[str, Tuple[str, int]]],
                ContextManager[Callable[[Any, AbstractSet[str], AbstractSet[str]], Set[str]]]]


#: Every store of this process, so that a forked child renumbers their temp
#: names (see :func:`_count_apart_after_fork`).
_STORES: "weakref.WeakSet[CacheStore]" = weakref.WeakSet()


def _count_apart_after_fork() -> None:
    """In a forked child, give each store's temp names a range of their own.

    The child keeps its parent's session (its owner and token), so its
    numbers must not follow the parent's: the parent's stay below 2**32, and
    the child's start at its pid times 2**32 (pids of live processes differ).
    """
    start = (os.getpid() << 32) + 1
    for store in list(_STORES):
        store._temp_numbers = itertools.count(start)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_count_apart_after_fork)


class CacheStore:
    """A bounded, content-addressed cache directory with LRU eviction.

    :param db: the :class:`~cloudmanager.db.FileDatabase`
    :param storage_path: the directory; created (mode 0700) if missing
    :param capacity: the most bytes it may hold, temp files included
    :param fsync: fsync files and directories on write (turn off only for
        throwaway pools and benchmarks)
    :param reconcile: ``None`` reconciles when a dead session or a new
        database calls for it; True always; False never
    :param file_mode: the mode of cached files (default 0600, private); the
        shard directories get the matching search bits (0640 -> 0750). Temp
        files stay 0600 until they are published.
    :param queue: ``queue(conn, hashes, when)`` queues new files for upload
        inside the transaction that publishes them
        (:meth:`cloudmanager.replication.Replicator.queue`); None queues nothing
    :raises CacheError: if the directory cannot be used, the capacity is not
        a positive number, or the mode is not one a cache file can have
    """

    def __init__(self, db: FileDatabase, storage_path: Union[str, "os.PathLike[str]"],
                 capacity: int, fsync: bool = True, reconcile: Optional[bool] = None,
                 file_mode: int = fsutil.FILE_MODE, queue: Optional[QueueUploads] = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise CacheError("storage_size must be a positive number of bytes, not %r"
                             % (capacity,))
        if isinstance(file_mode, bool) or not isinstance(file_mode, int) \
                or file_mode & ~0o666 or file_mode & 0o600 != 0o600:
            raise CacheError("file_mode must give the owner read and write and nobody "
                             "execute (0600 to 0666), not %r" % (file_mode,))
        self.file_mode = file_mode
        # Search bits wherever read bits are: 0600 -> 0700, 0640 -> 0750.
        self.dir_mode = file_mode | (file_mode & 0o444) >> 2
        self.db = db
        self.queue = queue
        self.root = os.path.abspath(os.fspath(storage_path))
        self.capacity = capacity
        self.fsync = fsync
        #: Every path and temp-file name in the storage directory.
        self.layout = Layout(self.root, self.dir_mode)
        self.tmp_dir = self.layout.tmp_dir
        self.layout.prepare()
        # The machine's name, as socket.gethostname() gives it, without loading socket.
        self.node = os.uname().nodename
        #: This cache's id in the pool (several caches on one machine are
        #: several nodes); sessions' owner names start with it.
        self.node_id = db.sessions.node_id()
        self.token = fsutil.random_hex(8)
        # Numbers the temp names of this session's reservations (a row's id
        # may come again once it is released; a name never does). A child
        # forked from this process counts from a range of its own.
        self._temp_numbers = itertools.count(1)
        _STORES.add(self)
        self.owner = "%s:%d:%s" % (self.node_id, os.getpid(), self.token)
        self._lock = threading.Lock()
        self._touches: Dict[str, float] = {}
        self._hits = self._misses = 0
        self._last_flush = time.monotonic()
        self.proc_start = fsck.process_start(os.getpid())
        self.reconcile(full=reconcile)
        db.sessions.open(self.owner, self.node, os.getpid(), self.proc_start)

    @functools.cached_property
    def batch_sync(self) -> bool:
        """Whether batches are made durable with ``syncfs`` (two per batch), not
        an fsync per file: see :func:`~cloudmanager.fsutil.sync_filesystem`.
        Found on first use: the check loads ctypes, which an open need not."""
        return self.fsync and fsutil.sync_filesystem_available()

    # -- paths ---------------------------------------------------------------

    def path_for(self, file_hash: str) -> str:
        """The path a file with this hash has in the cache (whether or not it is there)."""
        return self.layout.path(check_hash(file_hash))

    def _set_mode(self, temp):
        """Give a temp file about to be published the configured mode."""
        if self.file_mode != fsutil.FILE_MODE:
            os.chmod(temp, self.file_mode)

    def _publish(self, temp: str, path: str, published: List[str]) -> None:
        """Rename a verified temp file into place, noting it in ``published``."""
        self._set_mode(temp)
        fsutil.publish(temp, path, self.fsync)
        published.append(path)

    # -- reading -------------------------------------------------------------

    def lookup(self, file_hash: str) -> Optional[str]:
        """Return the cached file's path on a hit (counted), or ``None``.

        A row whose file has vanished or has the wrong size is marked not
        cached. A miss is not counted here: only the caller knows whether the
        pool has the file at all (:meth:`note_miss`).
        """
        state = self.db.cache_index.state(file_hash)
        if state is None:
            return None
        size, cached = state
        if cached:
            if self.layout.is_file(file_hash, size):
                self._note_use(file_hash, hit=True)
                return self.layout.path(file_hash)
            self.drop(file_hash, only_if_damaged=True)
        return None

    def note_miss(self) -> None:
        """Count a request for a pool file the cache did not hold."""
        self._note_use(None, hit=False)

    @contextlib.contextmanager
    def scratch(self, size: int) -> Iterator[Callable[[int], str]]:
        """Room for work files of ``size`` bytes in all (an encrypted pool's
        ciphertext on its way to or from the hosts): yields ``path(k)``, the
        ``k``-th file's path in ``tmp/``. The files are removed, then the room
        released, on exit.

        When the cache has no room for them (pinned files, writes in flight),
        they go to a private temp directory outside it, which is logged: the
        cache's bound holds, the disk's use is brief.
        """
        try:
            reservation = self.reservation(size)
        except CacheFullError as exc:
            log.info("work files of %d bytes outside the cache: %s", size, exc)
            with tempfile.TemporaryDirectory(prefix="cm-work-") as directory:
                yield lambda k: os.path.join(directory, "%d" % k)
            return
        made: List[str] = []

        def path(k: int) -> str:
            made.append(self.layout.batch_temp(self.token, reservation.number, k))
            return made[-1]

        try:
            yield path
        finally:
            for temp in made:
                fsutil.remove_quietly(temp)
            reservation.release()

    def paths_if_cached(self, hashes: Sequence[str]) -> Dict[str, str]:
        """``{hash: path}`` of those of ``hashes`` the index says are cached: one
        query for the batch, and no look at the files (a check, not a use).

        For reading them to send: a file that vanished behind the index's
        back fails that read, a local error that counts against no host, and
        the next :meth:`contains` or reconciliation marks it not cached.
        """
        return {h: self.layout.path(h) for h in self.db.cache_index.cached_among(hashes)}

    def contains(self, file_hash: str) -> bool:
        """Whether the cache holds this file: its row says so and the file is there.

        A check, not a use: it counts no hit and leaves the LRU order alone.
        A row whose file has vanished is marked not cached.
        """
        state = self.db.cache_index.state(file_hash)
        if not state or not state[1]:
            return False
        if self.layout.is_file(file_hash, state[0]):
            return True
        self.drop(file_hash, only_if_damaged=True)
        return False

    def _note_use(self, file_hash, hit):
        with self._lock:
            if hit:
                self._hits += 1
                self._touches[file_hash] = time.time()
            else:
                self._misses += 1
            due = (len(self._touches) >= TOUCH_BATCH
                   or time.monotonic() - self._last_flush >= TOUCH_INTERVAL_S)
        if due:
            try:
                self.flush()
            except DatabaseError as exc:  # the bookkeeping waits; the hit stands
                log.debug("recency updates deferred: %s", exc)

    def flush(self) -> None:
        """Write deferred recency updates and hit/miss counts to the database."""
        with self._lock:
            touches, self._touches = self._touches, {}
            hits, misses = self._hits, self._misses
            self._hits = self._misses = 0
            self._last_flush = time.monotonic()
        try:
            if touches:
                self.db.cache_index.touch(touches.items())
            if hits or misses:
                self.db.cache_index.add_hits(hits, misses)
        except DatabaseError:
            with self._lock:  # kept for the next flush, newer touches winning
                for file_hash, when in touches.items():
                    self._touches[file_hash] = max(when, self._touches.get(file_hash, 0))
                self._hits += hits
                self._misses += misses
            raise

    # -- space -----------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes held by cached files (the running total; no directory walk)."""
        return self.db.cache_index.counter("cached_bytes")

    def path_if_cached(self, file_hash: str) -> Optional[str]:
        """The cached copy's path if the cache holds it (a check, not a use), else None."""
        return self.layout.path(file_hash) if self.contains(file_hash) else None

    def usage_ratio(self) -> float:
        """Cached bytes over capacity, clamped to [0, 1]."""
        return min(max(self.used_bytes() / self.capacity, 0.0), 1.0)

    def _make_room(self, conn, needed):
        """Evict LRU files so ``needed`` more bytes fit; inside a transaction.

        :return: False, having evicted nothing, if even every evictable file
            is not enough
        """
        used = self.db.cache_index.counter("cached_bytes") + self.db.sessions.reserved_bytes(conn)
        excess = used + needed - self.capacity
        return excess <= 0 or self._evict_bytes(conn, excess, all_or_nothing=True) is not None

    def _evict_bytes(self, conn, excess, all_or_nothing):
        """Evict least recently used files totalling at least ``excess`` bytes.

        Victims are chosen first and files unlinked only once enough are
        found, so a refusal leaves the directory and the rows untouched.

        :return: the number of files evicted, or None if ``all_or_nothing``
            and the evictable files do not add up to ``excess``
        """
        while True:
            victims: Dict[str, int] = {}
            freed = 0
            # Read one candidate at a time: evicting one file reads one row.
            candidates = self.db.cache_index.eviction_candidates(conn)
            try:
                for file_hash, size, _ in candidates:
                    victims[file_hash] = size
                    freed += size
                    if freed >= excess:
                        break
            finally:
                candidates.close()
            # On a shared catalog, another node may have found a victim's only
            # good copy bad since this index last heard: ask the catalog, and
            # choose again without the files it no longer vouches for.
            doubted = set(victims) - self.db.files.protected_among(None, victims) \
                if self.db.shared and victims else set()
            if not doubted:
                break
            log.warning("not evicting %d files: the catalog no longer holds a good copy of "
                        "them", len(doubted))
            self.db.cache_index.set_protected(conn, doubted, False)
        if freed < excess and all_or_nothing:
            return None
        self.db.cache_index.evict(conn, victims)
        for file_hash in victims:
            self.layout.unlink(file_hash)
        log.debug("evicted %d files (%d bytes)", len(victims), freed)
        return len(victims)

    def reservation(self, size: int) -> "Reservation":
        """Reserve room for a ``size``-byte write, evicting LRU files as needed,
        until :meth:`Reservation.release` (or :meth:`commit`).

        Unlike :meth:`reserve`, the room is not bound to a block: its holder
        may hand it to another thread, which releases it when its write ends
        (a download attempt the engine gave up on, see
        :meth:`cloudmanager.engine.UploadEngine.download`).

        :return: a :class:`Reservation`, whose ``temp`` is where to write
        :raises CacheFullError: if pinned files and writes in flight leave no room
        """
        rid = self._reserve_row(size)
        number = next(self._temp_numbers)
        return Reservation(rid, number, self.layout.reservation_temp(self.token, number), self)

    def _reserve_row(self, size: int) -> int:
        """Reserve ``size`` bytes, evicting LRU files as needed: the row's id.

        :raises CacheFullError: if pinned files and writes in flight leave no room
        """
        if size > self.capacity:
            raise CacheFullError("%d bytes do not fit a %d-byte cache" % (size, self.capacity))
        self.flush()  # eviction must see every recent hit
        with self.db.local.transaction() as conn:
            if not self._make_room(conn, size):
                raise CacheFullError(
                    "no room for %d bytes: %d of %d bytes are pinned or in flight"
                    % (size, self.used_bytes() + self.db.sessions.reserved_bytes(conn),
                       self.capacity))
            return self.db.sessions.reserve(conn, self.owner, size)

    def batch_rooms(self, sizes: Sequence[int]) -> "BatchRooms":
        """Reserve room for a batch of downloads of ``sizes`` bytes, in one
        transaction (evicting LRU files as needed), lent out as a room per
        file (:meth:`BatchRooms.room`), until :meth:`BatchRooms.close`.

        :raises CacheFullError: if the batch as a whole does not fit
        """
        return BatchRooms(self, self._reserve_row(sum(sizes)), sizes)

    def _unpublished_on_failure(self) -> "_Unpublished":
        """A context manager yielding a list for the paths a transaction
        renames into the shards; if the block fails (its rows did not go
        in), they are removed again: a file no row counts would hold room
        that no bound sees."""
        return _Unpublished()

    def commit_many(self, items: Sequence[Tuple[str, int, Any]]
                    ) -> Dict[str, Union[str, Exception]]:
        """Publish verified downloads ``[(hash, size, room)]`` (rooms of a
        :class:`BatchRooms`, or :class:`Reservation` objects) as cached files,
        in one transaction, made durable as a batch: with fsync on, one
        ``syncfs`` for the files' bytes before any rename and one for the
        renames (where Linux has it; else an fsync per shard directory, the
        hosts having flushed the files).

        Files of the pool only (a warm-up): one another process removed
        meanwhile is not published and the removal stands. One cached
        already keeps its copy, which counts as used.

        :return: ``{hash: path}``, or ``{hash: exception}`` for a file not
            published (:class:`~cloudmanager.errors.NotInPoolError`,
            :class:`~cloudmanager.errors.IntegrityError`); its temp file is
            removed when its room is released
        """
        outcomes: Dict[str, Union[str, Exception]] = {}
        if not items:
            return outcomes
        if self.batch_sync:
            fsutil.sync_filesystem(self.tmp_dir)  # the files' bytes, before any rename
        now = time.time()
        hashes = [h for h, _, _ in items]
        shards = set()
        committed = []
        with self._unpublished_on_failure() as published, self.db.both() as (conn, local):
            known = self.db.files.states(conn, hashes)
            protected = self.db.files.protected_among(conn, hashes)
            cached = self.db.cache_index.cached_among(hashes, local)
            entries, rows = [], []
            for file_hash, size, room in items:
                state = known.get(file_hash)
                if state is None:
                    outcomes[file_hash] = NotInPoolError("%s was removed while it was fetched"
                                                         % file_hash)
                    continue
                if state.size != size:
                    outcomes[file_hash] = IntegrityError(
                        "%s is recorded with another size than %d" % (file_hash, size))
                    continue
                if file_hash in cached and self.layout.is_file(file_hash, size):
                    self.db.cache_index.touch([(file_hash, now)], local)
                    fsutil.remove_quietly(room.temp)  # a duplicate of the cached copy
                else:
                    self._set_mode(room.temp)
                    fsutil.publish(room.temp, self.layout.path(file_hash), fsync=False)
                    published.append(self.layout.path(file_hash))
                    shards.add(self.layout.shard_dir(file_hash))
                    entries.append((file_hash, size, file_hash in protected))
                if isinstance(room, Reservation):
                    rows.append(room.id)
                committed.append(room)
                outcomes[file_hash] = self.layout.path(file_hash)
            self.db.cache_index.put(local, entries, now)
            self.db.sessions.release(local, rows)
            if self.batch_sync and shards:
                fsutil.sync_filesystem(self.root)
            elif self.fsync:
                for shard in shards:
                    fsutil.fsync_dir(shard)
        for room in committed:
            room.committed = True
        return outcomes

    def lookup_many(self, hashes: Sequence[str]) -> Dict[str, str]:
        """``{hash: path}`` of those of ``hashes`` the cache holds, each a hit
        (as :meth:`lookup`): one query for all, and an ``lstat`` each. A row
        whose file has vanished is marked not cached."""
        found = {}
        for file_hash, entry in self.db.cache_index.entries_among(hashes).items():
            if not entry.cached:
                continue
            if self.layout.is_file(file_hash, entry.size):
                found[file_hash] = self.layout.path(file_hash)
            else:
                self.drop(file_hash, only_if_damaged=True)
        now = time.time()
        with self._lock:
            self._hits += len(found)
            self._touches.update((h, now) for h in found)
            due = (len(self._touches) >= TOUCH_BATCH
                   or time.monotonic() - self._last_flush >= TOUCH_INTERVAL_S)
        if due:
            try:
                self.flush()
            except DatabaseError as exc:  # the bookkeeping waits; the hits stand
                log.debug("recency updates deferred: %s", exc)
        return found

    def reserve(self, size: int) -> "Reservation":
        """Reserve room for a ``size``-byte write, evicting LRU files as needed,
        as a context manager.

        Yields a :class:`Reservation`, whose ``temp`` is where to write. The
        reservation is released on exit; the temp file is removed unless it
        was committed.

        :raises CacheFullError: if pinned files leave no room
        """
        return self.reservation(size)

    def _release(self, reservation: "Reservation") -> None:
        """Remove a reservation's temp file, then give its room back (the
        bytes are gone before the room is)."""
        fsutil.remove_quietly(reservation.temp)
        with self.db.local.transaction() as conn:
            self.db.sessions.release(conn, [reservation.id])

    def evict(self, target_bytes: int) -> int:
        """Evict LRU files until at most ``target_bytes`` are cached.

        :return: the number of files evicted
        """
        self.flush()
        with self.db.local.transaction() as conn:
            excess = self.db.cache_index.counter("cached_bytes") - target_bytes
            return self._evict_bytes(conn, excess, all_or_nothing=False) if excess > 0 else 0

    # -- writing ---------------------------------------------------------------

    def ingest(self, source_path: Union[str, "os.PathLike[str]"], filename: str,
               created: Optional[float] = None, queue: bool = True,
               progress: Optional[Callable[[int], None]] = None,
               lease: bool = False) -> Tuple[str, int]:
        """Copy a file into the cache, hashing it on the way (one read).

        The bytes go to a temp file under a reservation, are fsynced, and are
        renamed to their hash's path in the same transaction that records the
        file as cached (and queued for upload, if ``queue``).

        :param progress: called with the byte count of each chunk copied
        :param lease: this process sends the file to the hosts at once: its
            ``replicate`` lease is taken with it
        :return: ``(hash, size)``
        :raises CacheFullError: if there is no room for it
        :raises OSError: if the source cannot be read
        """
        with open(source_path, "rb", buffering=0) as src:
            return self.ingest_file(src, os.fspath(source_path), filename, created, queue,
                                    progress, lease)

    def ingest_file(self, src: BinaryIO, label: str, filename: str,
                    created: Optional[float] = None, queue: bool = True,
                    progress: Optional[Callable[[int], None]] = None, lease: bool = False,
                    expected: Optional[str] = None) -> Tuple[str, int]:
        """:meth:`ingest` from a file already open (the caller opened it as
        it must, e.g. without following a symlink), read from where it is.

        :param label: how the file is named in errors
        :param expected: the SHA-256 the bytes must have: if they hash to
            another, nothing is recorded or kept and
            :class:`~cloudmanager.errors.IntegrityError` is raised
        :return: ``(hash, size)``
        :raises CacheFullError: if there is no room for it
        :raises IntegrityError: for bytes that do not hash to ``expected``
        :raises OSError: if the source cannot be read
        """
        size = os.fstat(src.fileno()).st_size
        with self.reserve(size) as res:
            fd = os.open(res.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, fsutil.FILE_MODE)
            try:
                file_hash, nbytes = fsutil.copy_and_hash(src, fd, limit=size,
                                                         progress=progress)
                if self.fsync and (expected is None or expected == file_hash):
                    os.fsync(fd)
            except OverflowError:
                raise CacheError("%s grew while it was read" % label) from None
            finally:
                os.close(fd)
            if nbytes != size:
                raise CacheError("%s changed size while it was read" % label)
            if expected is not None and file_hash != expected:
                # The reservation's release removes the temp file.
                raise IntegrityError("%s does not hold the file it is recorded as: its bytes "
                                     "hash to %s, not %s" % (label, file_hash, expected))
            self.commit(res, file_hash, nbytes, filename, created, queue=queue, lease=lease)
        return file_hash, nbytes

    def commit(self, reservation: "Reservation", file_hash: str, size: int, filename: str = "",
               created: Optional[float] = None, queue: bool = False,
               must_exist: bool = False, lease: bool = False) -> str:
        """Publish a reservation's verified temp file as the cached copy of ``file_hash``.

        If the file is already cached, the temp file is dropped and the
        cached copy counts as used.

        :param must_exist: the bytes were fetched for a file of the pool (a
            warm-up): if another process removed it meanwhile, nothing is
            published and the removal stands
        :raises IntegrityError: if the pool knows this hash with another size
        :raises NotInPoolError: with ``must_exist``, if the file was removed
        """
        path = self.path_for(file_hash)
        now = time.time()
        with self._unpublished_on_failure() as published, self.db.both() as (conn, local):
            outcome = self.db.files.add(conn, file_hash, filename, size,
                                       int(created if created is not None else now),
                                       size_known=True)
            if outcome == "conflict":
                raise IntegrityError("%s is recorded with another size than %d" % (file_hash, size))
            if outcome == "new" and must_exist:  # rolled back with the transaction
                raise NotInPoolError("%s was removed while it was fetched" % file_hash)
            # A file the catalog has just learned of has no copy yet.
            protected = outcome != "new" and bool(
                self.db.files.protected_among(conn, [file_hash]))
            # The common case, a file this node has no row for, is one statement.
            if self.db.cache_index.put_new(local, file_hash, size, protected, now):
                self._publish(reservation.temp, path, published)
            else:
                state = self.db.cache_index.state(file_hash)
                cached = state is not None and state.cached
                if cached and self.layout.is_file(file_hash, size):
                    self.db.cache_index.touch([(file_hash, now)], local)
                    fsutil.remove_quietly(reservation.temp)  # a duplicate of the cached copy
                else:
                    self._publish(reservation.temp, path, published)
                    self.db.cache_index.put(local, [(file_hash, size, protected)], now,
                                            cached_before={file_hash: state.size}
                                            if state is not None and cached else {})
            self.db.sessions.release(local, [reservation.id])
            if queue and not protected and self.queue is not None:
                self.queue(conn, [file_hash], now, lease=lease)
        reservation.committed = True
        return path

    def ingest_many(self, sources: Sequence[Tuple[str, str, Optional[float], int]],
                    queue: bool = True,
                    progress: Optional[Callable[[int], None]] = None,
                    lease: bool = False, send: Optional[Send] = None) -> List[Ingested]:
        """Copy several files into the cache under one reservation and one transaction.

        Like :meth:`ingest` for each source, but room is reserved once for
        the whole batch, and the files are published (renamed into place)
        and recorded in one transaction. With fsync on, the batch is made
        durable with two filesystem syncs where Linux has ``syncfs`` (else an
        fsync per file and one per shard directory). A file the pool already
        caches is not copied again.

        :param sources: ``[(source_path, filename, created, size)]``, the size
            as the caller's ``stat`` found it: the room reserved, and the
            bytes the file must hold when it is read
        :param progress: called with each chunk's byte count while the larger
            files are streamed (small ones are read in one go)
        :param send: see :data:`Send`: the files go to the hosts from their
            temp files before they are published, and their copies are
            recorded in the publish's transaction (no lease is taken, and
            only known files no copy protects are queued first)
        :return: a list, one entry per source in order: ``(hash, size)``, or
            the exception (:class:`OSError`, :class:`CacheError`) that
            stopped that file; the others are ingested all the same
        :raises CacheFullError: if the batch as a whole does not fit (nothing
            was written)
        """
        results: List[Optional[Ingested]] = [None] * len(sources)  # None: not done yet
        sizes = [source[3] for source in sources]
        total = sum(sizes)
        if total > self.capacity:
            raise CacheFullError("%d bytes do not fit a %d-byte cache" % (total, self.capacity))
        # Durable as a batch: one syncfs for the files, one for the renames,
        # instead of a flush per file and per shard (see fsutil.sync_filesystem).
        batch_sync = self.fsync and fsutil.sync_filesystem_available()
        temps = {}  # k -> temp path, until published or removed
        try:
            with self.reserve(total) as res:
                for k, (path, _, _, _) in enumerate(sources):
                    temps[k] = self.layout.batch_temp(self.token, res.number, k)
                    try:
                        results[k] = self._copy_in(path, temps[k], sizes[k], progress,
                                                   fsync=self.fsync and not batch_sync)
                    except (OSError, CacheError) as exc:
                        results[k] = exc
                        fsutil.remove_quietly(temps.pop(k))
                if batch_sync and temps:
                    fsutil.sync_filesystem(self.tmp_dir)  # the files, before any rename
                if send is None or not temps:
                    self._publish_many(res, sources, results, temps, queue, batch_sync, lease)
                else:
                    waiting = {cast(Tuple[str, int], results[k])[0]: (temps[k], sizes[k])
                               for k in temps}
                    with send(waiting) as record:
                        self._publish_many(res, sources, results, temps, queue, batch_sync,
                                           record=record)
        finally:
            for temp in temps.values():
                fsutil.remove_quietly(temp)
        return cast(List[Ingested], results)  # every file has its outcome by now

    def _copy_in(self, source_path, temp, size, progress=None, fsync=True):
        """Copy one file of an :meth:`ingest_many` batch to ``temp``, hashing it.

        A small file is read whole (one read, one write); a larger one is
        streamed like :meth:`ingest`. It may not grow past the ``size``
        reserved for it. ``fsync``: flush it before returning.

        :return: ``(hash, size)``
        """
        with open(source_path, "rb", buffering=0) as src:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         fsutil.FILE_MODE)
            try:
                if size <= SMALL_FILE:
                    data = os.read(src.fileno(), size + 1)
                    while len(data) <= size:  # a short read is rare
                        more = os.read(src.fileno(), size + 1 - len(data))
                        if not more:
                            break
                        data += more
                    if len(data) > size:
                        raise CacheError("%s grew while it was read" % source_path)
                    file_hash, nbytes = fsutil.sha256(data).hexdigest(), len(data)
                    fsutil.write_all(fd, data)
                else:
                    try:
                        file_hash, nbytes = fsutil.copy_and_hash(src, fd, limit=size,
                                                                 progress=progress)
                    except OverflowError:
                        raise CacheError("%s grew while it was read" % source_path) from None
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        if nbytes != size:
            raise CacheError("%s changed size while it was read" % source_path)
        return file_hash, nbytes

    def _publish_many(self, reservation, sources, results, temps, queue, batch_sync=False,
                      lease=False, record=None):
        """Publish a batch's temp files and record them, in one transaction.

        ``batch_sync``: the temp files are on disk already; make the renames
        durable with one :func:`~cloudmanager.fsutil.sync_filesystem` rather
        than an fsync per shard directory. ``record``: see :data:`Send`.
        """
        now = time.time()
        done: Dict[str, int] = {}  # hash -> the size published (or found cached) in this batch
        touched: Set[str] = set()  # cached already: their rows stay
        shards = set()
        with self._unpublished_on_failure() as published, self.db.both() as (conn, local):
            hashes = {r[0] for r in results if isinstance(r, tuple)}
            known = self.db.files.states(conn, hashes)
            cached = self.db.cache_index.cached_among(hashes, local)
            new_rows, to_queue, entries, new_entries = [], [], [], []
            for k, (_, filename, created, _) in enumerate(sources):
                if k not in temps:
                    continue
                file_hash, size = results[k]
                if file_hash in done:  # the same content twice in one batch
                    if done[file_hash] != size:  # pragma: no cover - a SHA-256 collision
                        results[k] = IntegrityError("%s twice with two sizes" % file_hash)
                    fsutil.remove_quietly(temps.pop(k))
                    continue
                created = int(created if created is not None else now)
                state = known.get(file_hash)
                if state is None:
                    new_rows.append((file_hash, filename, size, created))
                    new_entries.append((file_hash, size, False))
                    if queue:
                        to_queue.append(file_hash)
                else:
                    # Known already: the per-file rules of commit() apply.
                    outcome = self.db.files.add(conn, file_hash, filename, size, created,
                                               size_known=True)
                    if outcome == "conflict":
                        results[k] = IntegrityError("%s is recorded with another size than %d"
                                                    % (file_hash, size))
                        fsutil.remove_quietly(temps.pop(k))
                        continue
                    if file_hash in cached and self.layout.is_file(file_hash, size):
                        self.db.cache_index.touch([(file_hash, now)], local)
                        fsutil.remove_quietly(temps.pop(k))
                        done[file_hash] = size
                        touched.add(file_hash)
                        continue
                    entries.append((file_hash, size, state.verified > 0))
                    if queue and state.verified == 0:
                        to_queue.append(file_hash)
                temp = temps.pop(k)
                self._set_mode(temp)
                fsutil.publish(temp, self.layout.path(file_hash), fsync=False)
                published.append(self.layout.path(file_hash))
                shards.add(self.layout.shard_dir(file_hash))
                done[file_hash] = size
            self.db.files.insert(conn, new_rows)
            if record is not None:  # the copies made meanwhile, and what they protect
                inserted = {r[0] for r in new_rows}
                # Known files no copy protects are queued as without `record`
                # (which takes off the queue those it brings to their target).
                if self.queue is not None:
                    self.queue(conn, [h for h in to_queue if h not in inserted], now)
                sent = record(conn, set(done), inserted)
                new_entries = [(h, size, h in sent) for h, size, _ in new_entries]
                entries = [(h, size, held or h in sent) for h, size, held in entries]
                if sent & touched:  # cached already, short: their rows exist
                    self.db.cache_index.set_protected(local, sent & touched, True)
            self.db.cache_index.put(local, new_entries, now, new=True)
            self.db.cache_index.put(local, entries, now)
            if to_queue and self.queue is not None and record is None:
                self.queue(conn, to_queue, now, lease=lease)
            if batch_sync and shards:
                fsutil.sync_filesystem(self.root)
            elif self.fsync:
                for shard in shards:  # one fsync per directory, not per file
                    fsutil.fsync_dir(shard)
            self.db.sessions.release(local, [reservation.id])
        reservation.committed = True

    def drop(self, file_hash: str, only_if_damaged: bool = False) -> None:
        """Remove a file from the cache (its record stays).

        :param only_if_damaged: look again under the write lock and drop it
            only if the file is still missing or of the wrong size (another
            process may have replaced it since the caller looked)
        """
        with self.db.local.transaction() as conn:
            if only_if_damaged:
                state = self.db.cache_index.state(file_hash)
                if not state or not state[1] or self.layout.is_file(file_hash, state[0]):
                    return
                log.warning("cached file %s is missing or damaged; marking it not cached",
                            file_hash)
            self.db.cache_index.uncache(conn, [file_hash])
            self.layout.unlink(file_hash)

    def forget_rows(self, hashes: Sequence[str]) -> None:
        """Drop files' cache index rows (pins too), in the caller's transaction
        when the index shares the catalog's file; :meth:`unlink_forgotten`
        removes the files once it commits.

        The row goes first and the file after, so a crash in between leaves an
        orphan file that reconciliation removes, never a row without its file.
        """
        with self.db.local.transaction() as conn:
            self.db.cache_index.forget(conn, hashes)

    def unlink_forgotten(self, hashes: Sequence[str]) -> None:
        """Remove the cached files of rows :meth:`forget_rows` dropped, unless
        another process cached the file again meanwhile: the check and the
        unlink happen under the write lock, as its publish does."""
        with self.db.local.transaction() as conn:
            cached = self.db.cache_index.cached_among(hashes, conn)
            for file_hash in hashes:
                if file_hash not in cached:
                    self.layout.unlink(file_hash)

    # -- reconciliation --------------------------------------------------------

    def reconcile(self, full: Optional[bool] = None) -> Dict[str, Any]:
        """Bring the directory and the database back into agreement; see
        :func:`cloudmanager.cache.fsck.reconcile`.

        :return: ``{"temp_removed", "orphans_removed", "missing_marked",
            "dead_sessions": n, "full": bool}``
        """
        return fsck.reconcile(self, full)

    def close(self) -> None:
        """Flush deferred updates and end this session."""
        self.flush()
        with self.db.local.transaction() as conn:
            self.db.sessions.end(conn, [self.owner])


class _Unpublished:
    """See :meth:`CacheStore._unpublished_on_failure` (a class: it is on the
    path of every upload)."""

    __slots__ = ("published",)

    def __init__(self) -> None:
        self.published: List[str] = []

    def __enter__(self) -> List[str]:
        return self.published

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            for path in self.published:
                fsutil.remove_quietly(path)


class Reservation:
    """Room promised to one write. ``temp`` is the temp file's path.

    Its holder ends it once: by :meth:`CacheStore.commit`, or by
    :meth:`release`.
    """

    __slots__ = ("id", "number", "temp", "committed", "released", "given_up", "_store")

    def __init__(self, reservation_id: int, number: int, temp: str, store: CacheStore) -> None:
        self.id = reservation_id
        #: The session's number for its temp names (``temp``, a batch's items).
        self.number = number
        self.temp = temp
        self.committed = False
        self.released = False
        #: The engine gave up on the call writing here (:meth:`abandoned`).
        self.given_up = False
        self._store = store

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()  # the block's exception, if any, goes on

    def abandoned(self) -> None:
        """The engine gave up on the call writing here, which keeps writing:
        the call's cleanup releases the room when it ends, not the holder
        that lent it (a :class:`BatchRooms` ending before the call)."""
        self.given_up = True

    def release(self) -> None:
        """Remove the temp file, then give the room back. Does nothing once
        committed or released; safe from any thread (one holder at a time).

        :raises DatabaseError: if the room could not be given back (it stays
            reserved, which errs on the safe side, until this session ends)
        """
        if self.committed or self.released:
            return
        self._store._release(self)
        self.released = True


class _Share:
    """One file's room in a :class:`BatchRooms`: a share of the batch's
    reservation, with a temp file of its own (a :class:`~cloudmanager.engine.Room`)."""

    __slots__ = ("batch", "size", "temp", "committed", "released", "given_up", "own_id",
                 "_lock")

    def __init__(self, batch: "BatchRooms", size: int, temp: str) -> None:
        self.batch = batch
        self.size = size
        self.temp = temp
        self.committed = False
        self.released = False
        #: The engine gave up on the attempt writing here: its call holds the room.
        self.given_up = False
        #: The reservation of its own it got when the batch ended before its call.
        self.own_id: Optional[int] = None
        self._lock = threading.Lock()

    def abandoned(self) -> None:
        """The engine gave up on the attempt writing here (see
        :class:`~cloudmanager.engine.Room`): its call holds the room until it ends."""
        with self._lock:
            self.given_up = True

    def release(self) -> None:
        """Remove the temp file, then give the room back: to the batch, or,
        once the batch has ended, the reservation of its own (once; never
        after a commit)."""
        with self._lock:
            if self.committed or self.released:
                return
            self.released = True
            own = self.own_id
        fsutil.remove_quietly(self.temp)
        if own is not None:
            store = self.batch.store
            with store.db.local.transaction() as conn:
                store.db.sessions.release(conn, [own])


class BatchRooms:
    """One reservation for a batch of downloads into the cache, lent out as a
    room per file (:meth:`CacheStore.batch_rooms`): one transaction reserves
    the batch, and :meth:`CacheStore.commit_many` publishes it.

    The capacity's rule holds as for single rooms (see ``docs/ARCHITECTURE.md``,
    "Rooms of abandoned downloads"): every byte an attempt writes lies in a
    reservation for as long as it exists. A file's first attempt writes in its
    share; an attempt after one the engine gave up on gets a
    :class:`Reservation` of its own (:meth:`CacheStore.reservation`), and
    when the batch ends while a call it gave up on still runs, that call's
    share becomes a reservation of its own in the transaction that releases
    the batch's, and the call's cleanup releases it.
    """

    def __init__(self, store: CacheStore, reservation_id: int, sizes: Sequence[int]) -> None:
        self.store = store
        self.id = reservation_id
        number = next(store._temp_numbers)
        self.shares = [_Share(self, size, store.layout.batch_temp(store.token, number, k))
                       for k, size in enumerate(sizes)]
        self._extra: List[Reservation] = []
        self._lock = threading.Lock()

    def room(self, k: int) -> Callable[[], Any]:
        """The ``room()`` of file ``k``'s download (see
        :meth:`cloudmanager.engine.UploadEngine.download`): its share first,
        then a reservation of its own per further room asked for.

        :raises CacheFullError: (a further room) if there is no room for it
        """
        asked = [False]

        def room() -> Any:
            if not asked[0]:
                asked[0] = True
                return self.shares[k]
            extra = self.store.reservation(self.shares[k].size)
            with self._lock:
                self._extra.append(extra)
            return extra
        return room

    def close(self) -> None:
        """End the batch: remove the temp files of shares not committed and
        give their room back, in one transaction that gives a share still
        held by a call the engine gave up on a reservation of its own; then
        release the further reservations not committed, but those of calls
        the engine gave up on, which their calls' cleanups release."""
        store = self.store
        for share in self.shares:
            with share._lock:
                if not (share.committed or share.given_up):
                    share.released = True
            if share.released and not share.committed:
                fsutil.remove_quietly(share.temp)
        with store.db.local.transaction() as conn:
            for share in self.shares:
                with share._lock:
                    if share.given_up and not (share.released or share.committed):
                        share.own_id = store.db.sessions.reserve(conn, store.owner, share.size)
            store.db.sessions.release(conn, [self.id])
        with self._lock:
            extra, self._extra = self._extra, []
        for reservation in extra:
            if not reservation.given_up:  # else its call's cleanup releases it
                reservation.release()
