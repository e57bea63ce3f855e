"""CloudManager: the facade of the library.

It keeps the original cloud-manager's API and return values (``hash | False``,
``path | None | False``) and logs the cause of every ``False`` and ``None``
on the ``cloudmanager`` logger. Work is done by the parts below it: the
:class:`~cloudmanager.db.FileDatabase`, the
:class:`~cloudmanager.cache.CacheStore` and the
:class:`~cloudmanager.engine.UploadEngine` with its hosts.
"""

import collections
import contextlib
import errno
import io
import itertools
import json
import logging
import os
import stat
import tempfile
import threading
import time

from . import check as integrity
from . import fsutil, serializers
from .cache import CacheStore
from .config import Config, load_config
from .db import FileDatabase, month_key
from .db.health import HostHealth
from .engine import UploadEngine
from .errors import (
    CacheError,
    CacheFullError,
    CloudManagerError,
    DownloadError,
    InvalidInputError,
    SerializationError,
    UploadError,
)
from .hosts import Location, from_spec
from .validation import check_hash, safe_basename

log = logging.getLogger("cloudmanager")

#: Records merged per transaction by :meth:`CloudManager.load_from`.
LOAD_BATCH = 5000

#: Files per batch of :meth:`CloudManager.upload_many`: one reservation, one
#: transaction and one round of host uploads each.
UPLOAD_BATCH = 500

#: Write errors that mean the cache's disk (or this process's file size
#: limit) is full: :meth:`CloudManager.upload` then goes straight to the hosts.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

#: Settings a pool gets when neither the caller nor the config file sets them.
DEFAULTS = {"redundancy": 3, "defer_uploads": False, "fsync": True, "host_timeout": None,
            "host_cooldown": 60.0, "file_mode": 0o600}


class CloudManager:
    """A pool of files kept on several hosts, with a bounded local cache.

    Each file is addressed by its SHA-256 and recorded in a SQLite database
    with every host and URL that holds a copy. Uploads go to ``redundancy``
    hosts; the cache keeps the most recently used files and evicts by LRU,
    but never a file that no host holds yet.

    :param database_path: the SQLite file; created with the schema if new
    :param storage_path: the cache directory; created if missing
    :param storage_size: the cache capacity in bytes (> 0)
    :param config: a ``cloudmanager.toml`` path (or a parsed
        :class:`~cloudmanager.config.Config`) supplying the arguments above
        and the hosts; arguments given explicitly win over the file
    :param hosts: host specs (``"dir:/path"``, ``"s3://bucket/prefix"``,
        ``"plowshare:MODULE"``...) or :class:`~cloudmanager.hosts.base.Host`
        objects; ``None`` means the config file's enabled hosts, or without
        one the plowshare-wrapper's default module list
    :param redundancy: the target number of hosts for each file
    :param defer_uploads: if True, :meth:`upload` only caches and queues the
        file and :meth:`sync` uploads it; if False (the default, as in the
        original) :meth:`upload` uploads to hosts before it returns
    :param fsync: fsync cache writes (turn off only for throwaway pools)
    :param host_timeout: seconds one transfer may take, for hosts built from
        specs
    :param host_cooldown: seconds a host is skipped after it failed three
        times in a row (the circuit breaker); doubled for each further failure
    :param file_mode: the mode of cached files: 0o600 (private, the default),
        or e.g. 0o640 to let the group read the cache; directories get the
        matching search bits
    :raises CloudManagerError: if the database, the directory, the capacity,
        the config file or a host spec cannot be used; the message says which

    Use it as a context manager, or call :meth:`close`::

        with CloudManager("pool.sqlite3", "cache/", 20 * 2**30,
                          hosts=["dir:/mnt/nas/pool"]) as cm:
            digest = cm.upload("photo.jpg")
            path = cm.warm_up(digest)

        with CloudManager(config="cloudmanager.toml") as cm:
            cm.sync()
    """

    def __init__(self, database_path=None, storage_path=None, storage_size=None, *,
                 config=None, hosts=None, redundancy=None, defer_uploads=None, fsync=None,
                 host_timeout=None, host_cooldown=None, file_mode=None):
        settings = self._settings(config, dict(
            database=database_path, storage=storage_path, capacity=storage_size,
            redundancy=redundancy, defer_uploads=defer_uploads, fsync=fsync,
            host_timeout=host_timeout, host_cooldown=host_cooldown, file_mode=file_mode))
        redundancy = settings["redundancy"]
        if isinstance(redundancy, bool) or not isinstance(redundancy, int) or redundancy < 1:
            raise InvalidInputError("redundancy must be a positive integer, not %r" % (redundancy,))
        self.redundancy = redundancy
        self.defer_uploads = settings["defer_uploads"]
        self.config = settings["config"]
        self._closed = False
        self._fetch_locks_held = {}  # hash -> (RLock, users)
        self._fetch_locks_guard = threading.Lock()
        host_objects = self._build_hosts(hosts, self.config, settings["host_timeout"])
        self.db = FileDatabase(settings["database"])
        try:
            self.engine = UploadEngine(self.db, host_objects, redundancy,
                                       cooldown=settings["host_cooldown"])
        except BaseException:
            self.db.close()
            raise
        try:
            self.cache = CacheStore(self.db, settings["storage"], settings["capacity"],
                                    fsync=settings["fsync"], file_mode=settings["file_mode"])
        except BaseException:
            self.engine.close()
            self.db.close()
            raise
        try:
            #: What the cheap open-time check (:func:`cloudmanager.check.on_open`) mended.
            self.open_check = integrity.on_open(self.cache, self.db)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _settings(config, explicit):
        """Merge explicit arguments over the config file's ``[pool]`` and the defaults."""
        if config is not None and not isinstance(config, Config):
            config = load_config(config)
        settings = dict(DEFAULTS)
        if config is not None:
            settings.update(config.pool)
        settings.update({k: v for k, v in explicit.items() if v is not None})
        missing = [k for k in ("database", "storage", "capacity") if settings.get(k) is None]
        if missing:
            raise InvalidInputError("no %s given (pass it, or a config file that sets it)"
                                    % " or ".join(missing))
        settings["config"] = config
        return settings

    @staticmethod
    def _build_hosts(hosts, config, timeout):
        if hosts is None and config is not None:
            return [h.build(timeout) for h in config.enabled_hosts()]
        options = {} if timeout is None else {"timeout": timeout}
        if hosts is None:
            from .hosts.plowshare import default_modules

            hosts = ["plowshare:" + module for module in default_modules()]
        return [from_spec(spec, **options) if isinstance(spec, str) else spec for spec in hosts]

    # -- context manager and lifetime ----------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Flush pending cache bookkeeping, stop transfers and close the database.

        Calling it twice is harmless. Files queued for upload stay queued in
        the database for the next :meth:`sync`.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.engine.close()
            self.cache.close()
        finally:
            self.db.close()

    # -- the seed's API ------------------------------------------------------

    def upload(self, path, *, defer=None, progress=None):
        """Add a file to the pool.

        The file is copied into the cache while it is hashed (one read),
        pinned and queued; then, unless uploads are deferred, it is uploaded
        to ``redundancy`` hosts in parallel. Once one host holds it, the pin
        is lifted. A file larger than the cache, or one that finds the cache
        full of pinned files, is uploaded straight from ``path``.

        :param path: a regular file
        :param defer: override the instance's ``defer_uploads`` for this call
        :param progress: called with the number of bytes of each chunk read
            into the cache (for progress bars); not called for a file that is
            not cached
        :return: the file's SHA-256 hex once it is in the pool (on a host, or
            pinned in the cache and queued); ``False`` if neither was possible
        """
        defer = self.defer_uploads if defer is None else defer
        try:
            path = os.fspath(path)
        except TypeError as exc:
            log.error("upload: not a path: %r (%s)", path, exc)
            return False
        try:
            st = os.stat(path)
            if not os.path.isfile(path):
                raise InvalidInputError("%s is not a regular file" % path)
            filename = safe_basename(os.path.basename(path))
            if st.st_size <= self.cache.capacity:
                try:
                    file_hash, _ = self.cache.ingest(path, filename, created=int(time.time()),
                                                     progress=progress)
                except CacheFullError as exc:
                    log.info("not caching %s: %s; uploading it from its source", path, exc)
                except OSError as exc:
                    if exc.errno not in _NO_SPACE:
                        raise
                    # The cache's disk is full: the reservation's temp file
                    # is gone already; the hosts may still take the file.
                    log.warning("cannot cache %s: %s; uploading it from its source", path, exc)
                else:
                    if not defer:
                        self._replicate_logged(file_hash)
                    return file_hash  # in the pool: on a host, or pinned and queued
            return self._upload_uncached(path, filename)
        except (OSError, CloudManagerError) as exc:
            log.error("upload of %s failed: %s", path, exc)
            return False

    def upload_many(self, paths, *, defer=None, progress=None):
        """Add several files to the pool: :meth:`upload` for each, in batches.

        The result is the same as calling :meth:`upload` on each path, and so
        are the guarantees (each file is pinned and queued until a host holds
        it), but it is many times faster for many small files: each batch of
        up to :data:`UPLOAD_BATCH` files is copied into the cache under one
        reservation and recorded in one transaction, and its host uploads run
        concurrently through the engine, with host health written once per
        batch. A file that cannot go with its batch (too large for the cache,
        unreadable, changed while read, or a batch that does not fit) goes
        through :meth:`upload` on its own, so it gets the same result and the
        same logged reason.

        :param paths: an iterable of regular files' paths (str or path-like)
        :param defer: override the instance's ``defer_uploads`` for this call:
            if True, files are only cached and queued, and :meth:`sync`
            uploads them
        :param progress: called with each chunk's byte count while larger
            files are read into the cache (small ones are read in one go)
        :return: a list with one entry per path, in order: the file's SHA-256
            hex, or ``False`` where :meth:`upload` would return ``False``
        """
        defer = self.defer_uploads if defer is None else defer
        paths = list(paths)
        results = [False] * len(paths)
        for start in range(0, len(paths), UPLOAD_BATCH):
            ingested, alone = self._ingest_batch(
                paths, range(start, min(start + UPLOAD_BATCH, len(paths))), results, progress)
            # The batch goes to the hosts before the next one is read: uploads
            # to slow hosts overlap in the engine, and a fast local one would
            # only contend with the reading for the GIL (measured: 10,000 small
            # files to a folder host went 10-30 % slower with a thread for it).
            if ingested and not defer:
                self._replicate_many_logged(ingested)
            for i in alone:
                results[i] = self.upload(paths[i], defer=defer, progress=progress)
        return results

    def _ingest_batch(self, paths, indexes, results, progress=None):
        """Cache ``paths[i] for i in indexes`` as one batch; fills ``results``.

        :return: ``(hashes, alone)``: the distinct hashes cached, and the
            indexes of paths that must go through :meth:`upload` on their own
        """
        batch, alone = [], []  # (index, path, filename); indexes for upload()
        now = int(time.time())
        for i in indexes:
            try:
                path = os.fspath(paths[i])
                st = os.stat(path)
            except (TypeError, OSError):
                alone.append(i)  # upload() logs why
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size > self.cache.capacity:
                alone.append(i)
                continue
            batch.append((i, path, safe_basename(os.path.basename(path))))
        ingested = []
        if batch:
            try:
                outcomes = self.cache.ingest_many([(p, name, now) for _, p, name in batch],
                                                  progress=progress)
            except (OSError, CloudManagerError) as exc:  # the batch does not fit, or a
                log.info("batch of %d files: %s; uploading them one by one", len(batch), exc)
                outcomes = [exc] * len(batch)  # database error: one by one says more
            for (i, _, _), outcome in zip(batch, outcomes):
                if isinstance(outcome, tuple):
                    results[i] = outcome[0]
                    ingested.append(outcome[0])
                else:
                    alone.append(i)
        return list(dict.fromkeys(ingested)), sorted(alone)

    def _replicate_many_logged(self, hashes):
        """:meth:`_replicate_many`, logging instead of raising: the files are
        already safe in the pool (pinned and queued) whatever happens here."""
        try:
            self._replicate_many(hashes)
        except (OSError, CloudManagerError) as exc:
            log.error("uploading a batch of %d files to hosts failed: %s; they stay queued",
                      len(hashes), exc)

    def _replicate_many(self, hashes):
        """:meth:`_replicate` for freshly cached files, as one engine batch
        recorded in one transaction.

        A file no longer in the cache is replicated on its own, from wherever
        :meth:`_replicate` finds it.
        """
        with self._fetch_locks(hashes):
            self._replicate_many_locked(hashes)

    def _replicate_many_locked(self, hashes):
        states = self.db.copies.replication_states(hashes)
        jobs, plans, settled, alone = [], [], [], []
        for file_hash in hashes:
            if file_hash not in states:
                continue
            size, verified, cached, holders, _ = states[file_hash]
            holders, target = self._replication_target(verified, holders)
            if len(holders) >= target or not set(self.engine.hosts) - holders:
                if holders:
                    settled.append(file_hash)
            elif not cached:
                alone.append(file_hash)
            else:
                jobs.append((self.cache.path_for(file_hash), file_hash, size, holders, target))
                plans.append((file_hash, holders, target))
        results = self.engine.upload_many(jobs) if jobs else []
        now = time.time()
        copies, failures, shorts = [], [], []
        for (file_hash, holders, target), result in zip(plans, results):
            copies += [(file_hash, loc.host_name, loc.url) for loc in result.successes]
            failures += [(file_hash, f.host) for f in result.failures]
            if len(holders) + len(result.successes) >= target:
                settled.append(file_hash)
            else:
                shorts.append((file_hash, (len(holders) + len(result.successes), target,
                                           self._short_reason(result))))
        with self.db.transaction() as conn:
            self.db.copies.record_good(conn, copies, int(now))
            self.db.copies.record_failures(conn, failures, int(now))
            self.db.queue.remove(conn, settled)
            self.db.queue.add(conn, [h for h, _ in shorts], now)
        for file_hash, short in shorts:
            self._note_short(file_hash, *short)
        for file_hash in alone:
            self._replicate_logged(file_hash)

    def _upload_uncached(self, path, filename):
        """Upload a file that will not be cached straight from its source."""
        file_hash, size = fsutil.hash_file(path)
        holders = self._holders(file_hash)
        result = self.engine.upload(path, file_hash, size, holders=holders)
        if not holders and not result.successes:
            raise UploadError("no host accepted %s (and it cannot be cached)" % path,
                              result.failures)
        now = int(time.time())
        with self.db.transaction() as conn:
            if self.db.files.add(conn, file_hash, filename, size, now,
                                size_known=True) == "conflict":
                raise CacheError("%s is cached with another size than %d" % (file_hash, size))
            self._record_result(conn, file_hash, result, now)
        return file_hash

    def _replicate_logged(self, file_hash):
        """:meth:`_replicate`, logging instead of raising: the file is already
        safe in the pool (pinned and queued) whatever happens here."""
        try:
            return self._replicate(file_hash)
        except (OSError, CloudManagerError) as exc:
            log.error("uploading %s to hosts failed: %s; it stays queued", file_hash, exc)
            return 0

    def _holders(self, file_hash):
        return {u.host_name for u in self.db.copies.of(file_hash) if not u.error}

    def _record_result(self, conn, file_hash, result, now):
        for location in result.successes:
            self.db.copies.record_good(conn, [(file_hash, location.host_name, location.url)], now)
        for failure in result.failures:
            self.db.copies.record_failures(conn, [(file_hash, failure.host)], now)

    def _replicate(self, file_hash):
        """Upload a pool file until it reaches the redundancy target.

        The source is the cached copy, or a verified copy fetched from a host.
        The queue entry is kept until the target is met.

        :return: the number of new copies
        """
        with self._fetch_lock(file_hash):  # not while remove() deletes its copies
            return self._replicate_locked(file_hash)

    def _replicate_locked(self, file_hash):
        record = self.db.files.get(file_hash)
        if record is None:
            return 0
        holders, target = self._replication_target(record.verified,
                                                   self._holders(file_hash))
        if len(holders) >= target or not set(self.engine.hosts) - holders:
            if holders:  # at target, or as close as the configured hosts allow
                with self.db.transaction() as conn:
                    self.db.queue.remove(conn, [file_hash])
            return 0
        with self._source_of(file_hash, record.size) as source:
            result = self.engine.upload(source, file_hash, record.size, holders=holders,
                                        target=target)
        now = time.time()
        with self.db.transaction() as conn:
            short = self._settle(conn, file_hash, result, holders, target, now)
        if short:
            self._note_short(file_hash, *short)
        return len(result.successes)

    def _replication_target(self, verified, holders):
        """``(holders, target)`` for a file with ``verified`` copies of this
        node's own and good copies on the hosts named ``holders``."""
        if verified == 0 and holders:
            # Only other nodes' claims vouch for it: make one copy of our own,
            # so the cached copy can be unpinned.
            return set(), 1
        return holders, self.redundancy

    def _settle(self, conn, file_hash, result, holders, target, now):
        """Record an upload round (inside a transaction); the file stays queued
        while it is short of ``target``.

        :return: None at target; else ``(copies, target, why)`` for :meth:`_note_short`
        """
        copies = len(holders) + len(result.successes)
        self._record_result(conn, file_hash, result, int(now))
        if copies >= target:
            self.db.queue.remove(conn, [file_hash])
            return None
        self.db.queue.add(conn, [file_hash], now)
        return copies, target, self._short_reason(result)

    @staticmethod
    def _short_reason(result):
        """Why an upload round left a file short of its target, in a line."""
        errors = [f.message for f in result.failures]
        if result.cooling:
            errors.append("cooling down after repeated failures: %s" % ", ".join(result.cooling))
        return "; ".join(errors) or "not enough hosts"

    def _note_short(self, file_hash, copies, target, errors):
        with self.db.transaction() as conn:
            self.db.queue.note_failure(conn, file_hash, errors[:500])
        log.warning("%s has %d of %d copies: %s", file_hash, copies, target, errors)

    @contextlib.contextmanager
    def _source_of(self, file_hash, size):
        """Yield a local path holding the file's verified bytes.

        Reading the cached copy for a top-up is not a use: no hit is counted
        and the LRU order stays as it was.
        """
        if self.cache.contains(file_hash):
            yield self.cache.path_for(file_hash)
            return
        if size <= self.cache.capacity:
            path = self.warm_up(file_hash)
            if path:
                yield path
                return
        # Too big for the cache (or no room): a private temp dir, removed after.
        with tempfile.TemporaryDirectory(prefix="cm-sync-") as scratch:
            dest = os.path.join(scratch, file_hash)
            self.engine.download(file_hash, size, self._sources(file_hash), dest)
            yield dest

    def _sources(self, file_hash):
        return self.db.copies.sources(file_hash)

    def warm_up(self, file_hash):
        """Put a file in the cache and return its local path.

        A hit only updates the LRU order. A miss downloads the file from its
        healthiest host, verifies its SHA-256, and evicts least recently used
        files to make room.

        :param file_hash: the file's SHA-256 hex
        :return: the cached file's path; ``None`` for a malformed or unknown
            hash; ``False`` if it cannot be cached (larger than the cache, no
            room, or no host delivered a good copy)
        """
        file_hash = _checked(file_hash, "warm_up")
        if file_hash is None:
            return None
        path = self.cache.lookup(file_hash)
        if path is not None:
            return path
        record = self.db.files.get(file_hash)
        if record is None:
            log.warning("warm_up: %s is not in the pool", file_hash)
            return None
        try:
            return self._fetch_into_cache(file_hash, record.size)
        except (OSError, CloudManagerError) as exc:
            log.error("warm_up of %s failed: %s", file_hash, exc)
            return False

    def _fetch_into_cache(self, file_hash, size):
        # One download per hash at a time in this process; later callers find
        # it cached.
        with self._fetch_lock(file_hash):
            # Another thread may have fetched it while we waited; the caller
            # already counted this request's hit or miss.
            if self.cache.contains(file_hash):
                return self.cache.path_for(file_hash)
            sources = self._sources(file_hash)
            if not sources:
                raise DownloadError("no host holds a good copy of %s" % file_hash)
            with self.cache.reserve(size) as reservation:
                self.engine.download(file_hash, size, sources, reservation.temp)
                return self.cache.commit(reservation, file_hash, size)

    def _fetch_lock(self, file_hash):
        """Hold this process's lock on one hash: fetches, uploads to hosts and
        removal take it, so a removal never interleaves with the others.

        Re-entrant: an upload may fetch its source while holding it.
        """
        return self._fetch_locks((file_hash,))

    @contextlib.contextmanager
    def _fetch_locks(self, hashes):
        """:meth:`_fetch_lock` on several hashes at once, taken in sorted
        order so two callers never deadlock; one pass over the lock table."""
        hashes = sorted(set(hashes))
        with self._fetch_locks_guard:
            locks = []
            for file_hash in hashes:
                lock, users = self._fetch_locks_held.get(file_hash) or (threading.RLock(), 0)
                self._fetch_locks_held[file_hash] = (lock, users + 1)
                locks.append(lock)
        taken = 0
        try:
            for lock in locks:
                lock.acquire()
                taken += 1
            yield
        finally:
            for lock in locks[:taken]:
                lock.release()
            with self._fetch_locks_guard:
                for file_hash in hashes:
                    lock, users = self._fetch_locks_held[file_hash]
                    if users == 1:
                        del self._fetch_locks_held[file_hash]
                    else:
                        self._fetch_locks_held[file_hash] = (lock, users - 1)

    def download(self, file_hash, destination=None):
        """Get a file: into the cache, or to ``destination``.

        :param file_hash: the file's SHA-256 hex
        :param destination: ``None`` to behave like :meth:`warm_up`; a
            directory to write the file there under its recorded name (or its
            hash if it has none); or a file path. The file is written
            atomically and verified, from the cache or streamed from a host,
            whether or not it fits in the cache.
        :return: like :meth:`warm_up` without a destination; with one, the
            path written, ``None`` for a malformed or unknown hash, or
            ``False`` on failure
        """
        if destination is None:
            return self.warm_up(file_hash)
        file_hash = _checked(file_hash, "download")
        if file_hash is None:
            return None
        record = self.db.files.get(file_hash)
        if record is None:
            log.warning("download: %s is not in the pool", file_hash)
            return None
        try:
            dest = os.path.abspath(os.fspath(destination))
            if os.path.isdir(dest):
                dest = os.path.join(dest, record.filename or file_hash)
            return self._deliver(file_hash, record.size, dest)
        except (OSError, CloudManagerError) as exc:
            log.error("download of %s to %s failed: %s", file_hash, destination, exc)
            return False

    def _deliver(self, file_hash, size, dest):
        cached = self.cache.lookup(file_hash)
        if cached is None and size <= self.cache.capacity:
            try:
                cached = self._fetch_into_cache(file_hash, size)
            except (CacheError, DownloadError) as exc:
                log.info("not caching %s (%s); streaming it to %s", file_hash, exc, dest)
        src = None
        if cached is not None:
            try:
                src = open(cached, "rb")
            except FileNotFoundError:  # another process evicted it since the lookup
                log.info("%s left the cache while it was looked up; fetching it", file_hash)
        if src is not None:
            with src, fsutil.atomic_write(dest) as out:
                try:
                    got, _ = fsutil.copy_and_hash(src, out.fileno(), limit=size)
                except OverflowError:
                    got = None  # the cached file grew: it cannot be the file
                if got != file_hash:  # bit rot or tampering in the cache
                    self.cache.drop(file_hash)
                    raise CacheError("cached copy of %s is corrupt; dropped it" % file_hash)
            return dest
        self.engine.download(file_hash, size, self._sources(file_hash), dest)
        return dest

    def exists(self, file_hash):
        """Whether the pool has a record of the file (on a host or in the cache).

        :return: bool; False for a malformed hash
        """
        try:
            return self.db.files.exists(check_hash(file_hash))
        except InvalidInputError:
            return False

    def on_cache(self, file_hash):
        """Whether the file is in the local cache (a check, not a use).

        :return: bool; False for a malformed hash
        """
        try:
            return self.cache.contains(check_hash(file_hash))
        except InvalidInputError:
            return False

    def usage_ratio(self):
        """Cached bytes over capacity, in [0, 1]. Reads a running total."""
        return self.cache.usage_ratio()

    def info(self, file_hash):
        """The file's record in the v0.2 JSON format (as a dict), or ``None``."""
        file_hash = _checked(file_hash, "info")
        if file_hash is None:
            return None
        for record in self._records([file_hash]):
            return serializers.record_to_dict(record)
        return None

    def sync(self):
        """Upload queued files and top up files below the redundancy target.

        Every queued or short file is tried, whatever its retry time; the
        queue's attempt counts and last errors show in :meth:`stats`.

        :return: a summary dict: ``checked``, ``uploads`` (new copies),
            ``complete`` (files now at target), ``short`` (still below it)
        """
        self.cache.flush()
        # A target above the number of hosts would list every file, every time.
        reachable = min(self.redundancy, len(self.engine.hosts))
        todo = list(dict.fromkeys(self.db.queue.hashes() + self.db.files.below_target(reachable)))
        summary = {"checked": len(todo), "uploads": 0, "complete": 0, "short": 0}
        for file_hash in todo:
            try:
                summary["uploads"] += self._replicate(file_hash)
            except (OSError, CloudManagerError) as exc:
                log.error("sync of %s failed: %s", file_hash, exc)
            if self.db.files.copies(file_hash) >= self.redundancy:
                summary["complete"] += 1
            else:
                summary["short"] += 1
        log.info("sync: %s", summary)
        return summary

    def verify(self, hashes=None, hosts=None, older_than=None, limit=None, deep=False):
        """Check that remote copies are still there and intact.

        A host that can answer cheaply is asked for the object's size (and
        the SHA-256 it stores, as S3 does for single-part uploads); other
        hosts, or every host with ``deep``, send the copy to a temp directory
        to be hashed. Missing and bad copies are marked bad, and the next
        :meth:`sync` restores the redundancy target from a good copy.

        Copies checked longest ago go first, so a large pool can be verified
        a slice at a time with ``limit`` or ``older_than``.

        :param hashes: only these files
        :param hosts: only copies recorded under these host names
        :param older_than: only copies not checked in this many seconds
        :param limit: check at most this many copies
        :param deep: download and hash every copy, even where a cheap check exists
        :return: counts: ``checked``, ``good``, ``bad``, ``missing``,
            ``error`` (the host failed; try again later), ``unreachable`` (no
            configured host can reach the URL) and ``cooling`` (the host's
            circuit breaker is open)
        """
        if hashes is not None:
            hashes = [check_hash(h) for h in hashes]
        checked_before = None if older_than is None else time.time() - older_than
        copies = self.db.copies.to_verify(hashes, hosts, checked_before, limit)
        summary = dict.fromkeys(("checked", "good", "bad", "missing", "error", "unreachable",
                                 "cooling"), 0)
        with tempfile.TemporaryDirectory(prefix="cm-verify-") as scratch:
            for file_hash, host_name, url, size in copies:
                host = self.engine.host_for(host_name, url)
                if host is not None and self.engine.cooling(host):  # may open mid-run
                    outcome = "cooling"
                else:
                    outcome = self.engine.check(file_hash, size, Location(host_name, url),
                                                deep=deep, scratch=scratch)
                if outcome in ("good", "bad", "missing"):
                    summary["checked"] += 1
                else:  # tried: the next budgeted pass moves on to other copies
                    with self.db.transaction() as conn:
                        self.db.copies.mark_checked(
                            conn, [(file_hash, host_name, url, time.time(), False)])
                summary[outcome] += 1
        log.info("verify: %s", summary)
        return summary

    def check(self, repair=False, deep=False):
        """Compare the database with the storage directory (``cm fsck``).

        It walks the storage directory once (and reads every cached byte
        with ``deep``), under the database's write lock except for the deep
        reads. It never follows a symlink: one planted in the storage
        directory is reported as an orphan, and removed as a link with
        ``repair``; what it points at is neither read nor deleted.

        Every open already runs the cheap part (no walk, no scan of the files
        table): it releases reservations no session owns, recounts a negative
        usage total, and evicts down to the capacity if the pool was reopened
        with a smaller one; after a crash the cache's open also reconciles the
        directory in full. So a pool that reopened is expected to check clean.

        :param repair: mend what can be mended: mark missing and damaged files
            not cached (and remove the damaged ones), remove orphans and stale
            temp files, recount the usage totals, end dead sessions and release
            their reservations, queue unprotected files for upload, evict down
            to the capacity, and fetch pinned files back into the cache
        :param deep: also hash every cached file whose size is right
        :return: a JSON-serialisable dict:

            - ``clean`` (bool): nothing below was found;
            - ``missing``: hashes the database says are cached, with no file;
            - ``size_mismatch``: cached files whose size differs from the record;
            - ``hash_mismatch``: cached files whose bytes do not match their
              hash (only with ``deep``; always empty without it);
            - ``orphans``: paths (relative to the storage directory) of entries
              no cached row claims: stray files, symlinks, directories, and
              shards that are not real directories;
            - ``stale_temp``: temp files left by sessions that no longer run;
            - ``pins_without_file``: files pinned explicitly but not cached
              (:meth:`pin` does not fetch; a pin set on a file that is not
              cached, or more pinned than fits, shows here);
            - ``unprotected``: cached files no host holds a good copy of that
              are not queued for upload;
            - ``lost``: files no host holds a good copy of and the cache does
              not hold either (nothing can bring them back);
            - ``usage_drift`` / ``count_drift`` (ints): the running totals of
              cached bytes / files minus the sums over the cached rows;
            - ``stale_reservations`` (int): space reserved by sessions that no
              longer run; ``dead_sessions`` (int): such sessions;
            - ``over_capacity`` (int): bytes held plus bytes reserved beyond the
              capacity;
            - ``files_checked`` (int): cached rows compared with the directory;
            - ``repair`` / ``deep`` (bool): the arguments;
            - ``repaired``: ``{finding: how many were mended}``;
            - ``unrepaired``: the findings still there (all of them without
              ``repair``; ``lost`` always stays).
        """
        return integrity.check(self.cache, self.db, repair=repair, deep=deep,
                               fetch=self.warm_up)

    def remove(self, file_hash):
        """Forget a file: delete its copies where hosts allow it, its cached
        copy and its record.

        Every recorded copy is deleted where a configured host can delete it,
        bad ones included. Copies on hosts that cannot delete (file lockers),
        or whose delete failed, stay where they are; their URLs are logged and
        returned, since the record that knew them is gone.

        :return: ``{"deleted": [(host_name, url)], "kept": [(host_name, url)]}``;
            ``None`` for a malformed or unknown hash
        """
        file_hash = _checked(file_hash, "remove")
        if file_hash is None:
            return None
        if not self.db.files.exists(file_hash):
            log.warning("remove: %s is not in the pool", file_hash)
            return None
        deleted, kept = [], []
        # Under the fetch lock: a warm_up in flight finishes first, and one
        # that starts later finds no record, so nothing brings the file back.
        with self._fetch_lock(file_hash):
            copies = [(u.host_name, u.url) for u in self.db.copies.of(file_hash) if u.url]
            # The record goes first. A crash after it leaves copies no record
            # knows (garbage on the hosts); the other order would leave a
            # record of copies already deleted, and an upload of the same
            # bytes would trust it and never send them again.
            self.cache.forget(file_hash)
            for host_name, url in copies:  # bad copies too: they still take space
                (deleted if self.engine.delete(Location(host_name, url)) else kept).append(
                    (host_name, url))
            self._after_removal(file_hash, deleted)
        for host_name, url in kept:
            log.warning("removed %s from the pool, but its copy on %s stays: %s",
                        file_hash, host_name, url)
        log.info("removed %s (%d copies deleted)", file_hash, len(deleted))
        return {"deleted": deleted, "kept": kept}

    def _after_removal(self, file_hash, deleted):
        """If the file was added again while its copies were being deleted
        (another process uploaded the same bytes), its record may name copies
        that are gone: mark them bad and queue the file, so it stays pinned if
        cached and :meth:`sync` sends it again."""
        if not deleted or not self.db.files.exists(file_hash):
            return
        with self.db.transaction() as conn:
            self.db.copies.mark_bad(conn, [(file_hash, h, u) for h, u in deleted])
            self.db.queue.add(conn, [file_hash], time.time())
        log.warning("%s was added again while it was being removed; the copies deleted are "
                    "marked bad and it is queued for upload", file_hash)

    def unreachable(self):
        """Files whose every good copy is on a host this node has not configured.

        Records imported from other nodes may name hosts (or schemes) this
        node cannot reach; they are kept, not treated as errors, and become
        downloadable as soon as a matching host is configured. Cached files
        are not listed. Reads every copy's row: for reports, not hot paths.

        :return: ``{hash: sorted host names of its copies}``
        """
        lost = {}
        for file_hash, rows in itertools.groupby(self.db.copies.good(), key=lambda r: r[0]):
            rows = list(rows)
            if not self.engine.reaches((h, u) for _, h, u in rows) \
                    and not self.cache.contains(file_hash):
                lost[file_hash] = sorted({h for _, h, _ in rows})
        return lost

    # -- node sync -----------------------------------------------------------

    def _records(self, hashes=None):
        for h, name, size, created, uploads in self.db.records.iter(hashes):
            yield serializers.Record(h, name, size, created, tuple(uploads))

    def data_dump(self):
        """Every file's record, as a JSON array of v0.2 records (a str)."""
        out = io.StringIO()
        serializers.dump_to(self._records(), out)
        return out.getvalue()

    def dump_to(self, fileobj):
        """Stream every record as a JSON array to a text file object.

        :return: the number of records written
        """
        return serializers.dump_to(self._records(), fileobj)

    def data_load(self, text):
        """Merge records exported by another node (the text of :meth:`data_dump`).

        Upload lists are merged as a union; loading the same text twice
        changes nothing. Invalid records are skipped with a logged reason.

        :return: how many records were imported or updated; ``None`` if the
            text is not JSON records. Never raises on bad data.
        """
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                log.error("data_load: not UTF-8 text: %s", exc)
                return None
        if not isinstance(text, str):
            log.error("data_load: expected JSON text, got %s", type(text).__name__)
            return None
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:
            log.error("data_load: not JSON: %s", exc)
            return None
        if isinstance(document, dict):
            document = [document]
        if not isinstance(document, list):
            log.error("data_load: expected a JSON array of records, got %s",
                      type(document).__name__)
            return None
        return self._merge(_parse_all(document))

    def load_from(self, fileobj):
        """Merge records streamed from a text file object holding a JSON array.

        :return: how many records were imported or updated; ``None`` if the
            document is not JSON records (records before the fault stay merged)
        """
        try:
            return self._merge(self._new_records(serializers.iter_documents(fileobj)))
        except SerializationError as exc:
            log.error("load_from: %s", exc)
            return None

    def _new_records(self, documents):
        """Validate decoded JSON records, passing over those the pool knows already.

        A record of a known file with the same size, a filename if it brings
        one, and only copies the pool has recorded would change nothing: it
        is skipped unparsed, so reloading a dump costs a lookup per record,
        not a validation. Every other record is parsed and validated.
        """
        batch = []
        for item in enumerate(documents):
            batch.append(item)
            if len(batch) >= LOAD_BATCH:
                yield from self._parse_unknown(batch)
                batch = []
        yield from self._parse_unknown(batch)

    def _parse_unknown(self, batch):
        known = self.db.records.known(
            doc["filehash"] for _, doc in batch
            if isinstance(doc, dict) and isinstance(doc.get("filehash"), str))
        for index, doc in batch:
            if isinstance(doc, dict) and _changes_nothing(doc, known.get(doc.get("filehash"))):
                continue
            try:
                yield serializers.parse_record(doc)
            except SerializationError as exc:
                log.warning("skipping record #%d: %s", index, exc)

    def _merge(self, records):
        changed = 0
        unreachable = collections.Counter()  # host names of records we cannot fetch
        batch = []
        for record in records:
            batch.append(record)
            if len(batch) >= LOAD_BATCH:
                changed += self._merge_batch(batch, unreachable)
                batch = []
        if batch:
            changed += self._merge_batch(batch, unreachable)
        if unreachable:
            log.warning("%d imported records have copies only on hosts this node has not "
                        "configured (%s); they are kept, and listed by unreachable()",
                        sum(unreachable.values()), ", ".join(sorted(unreachable)))
        return changed

    def _merge_batch(self, batch, unreachable):
        changed, refused = self.db.records.merge(batch)
        for file_hash in refused:
            log.warning("refused a record of %s: its size differs from the known one",
                        file_hash)
        for record in batch:
            copies = [(h, u) for h, u, error in record.uploads if not error]
            if copies and not self.engine.reaches(copies):
                unreachable.update({h for h, _ in copies})
        return changed

    # -- beyond the seed -----------------------------------------------------

    def status(self, file_hash):
        """A file's whole state, for people and scripts (``cm info``).

        :return: a dict with ``hash``, ``filename``, ``size``, ``created``,
            ``cached``, ``pinned`` (explicitly), ``copies`` (hosts with a good
            copy), ``verified`` (of those, copies this node uploaded or
            checked), ``target`` (the redundancy) and ``uploads``
            (``[{host_name, url, error, verified, time}]``); ``None`` for a
            malformed or unknown hash
        """
        file_hash = _checked(file_hash, "status")
        if file_hash is None:
            return None
        row = self.db.files.get(file_hash)
        if row is None:
            return None
        status = {k: getattr(row, k) for k in ("hash", "filename", "size", "created", "copies",
                                               "verified")}
        status.update(cached=self.cache.contains(file_hash), pinned=row.pinned,
                      target=self.redundancy,
                      uploads=[u._asdict() for u in self.db.copies.of(file_hash)])
        return status

    def files(self):
        """Iterate over every file, by name then hash (``cm ls``).

        Yields dicts with ``hash``, ``filename``, ``size``, ``cached``,
        ``pinned``, ``copies`` and ``verified``, streamed from the database.
        ``cached`` is what the database records; :meth:`on_cache` also looks
        at the file.
        """
        for row in self.db.files.listing():
            yield {"hash": row.hash, "filename": row.filename, "size": row.size,
                   "cached": row.cached, "pinned": row.pinned, "copies": row.copies,
                   "verified": row.verified}

    def expand_hash(self, prefix):
        """The file hash starting with ``prefix`` (4 to 64 hex digits).

        :return: the full hash, or ``None`` if no file's hash starts with it
        :raises InvalidInputError: if ``prefix`` is not 4 to 64 hex digits, or
            more than one file's hash starts with it
        """
        text = prefix.lower() if isinstance(prefix, str) else ""
        if len(text) < 4 or len(text) > 64 or text.strip("0123456789abcdef"):
            raise InvalidInputError("not a SHA-256 or a prefix of one (4 to 64 hex digits): %r"
                                    % (prefix,))
        found = self.db.files.with_prefix(text, limit=2)
        if len(found) > 1:
            raise InvalidInputError("%s is ambiguous: more than one file's hash starts with it"
                                    % text)
        return found[0] if found else None

    def stats(self):
        """Counts and totals of the pool, as a dict.

        Keys: ``files``, ``cached_files``, ``cached_bytes``, ``capacity``,
        ``usage_ratio``, ``queued``, ``below_target``, ``redundancy``,
        ``uploaded_bytes``/``downloaded_bytes`` (``total`` and ``this_month``),
        ``hits``, ``misses``, ``transfers`` (per month) and ``hosts``
        (:meth:`host_status`).
        """
        self.cache.flush()
        transfers = self.db.health.transfers()
        this_month = transfers.get(month_key(), (0, 0))
        return {
            "files": self.db.files.count(),
            "cached_files": self.db.cache_index.counter("cached_files"),
            "cached_bytes": self.db.cache_index.counter("cached_bytes"),
            "capacity": self.cache.capacity,
            "usage_ratio": self.usage_ratio(),
            "queued": self.db.queue.length(),
            "below_target": self.db.files.count_below(self.redundancy),
            "redundancy": self.redundancy,
            "uploaded_bytes": {"total": sum(u for u, _ in transfers.values()),
                               "this_month": this_month[0]},
            "downloaded_bytes": {"total": sum(d for _, d in transfers.values()),
                                 "this_month": this_month[1]},
            "hits": self.db.cache_index.counter("hits"),
            "misses": self.db.cache_index.counter("misses"),
            "transfers": {m: {"uploaded": u, "downloaded": d} for m, (u, d) in transfers.items()},
            "hosts": self.host_status(),
        }

    def host_status(self):
        """Each configured host's kind, weight, capabilities and health.

        :return: ``{host_name: {...}}`` with the health counters of
            :class:`~cloudmanager.db.health.HostHealth` (``latency_ms`` is a median),
            ``state`` (``"ok"``, or ``"cooling"`` while its circuit breaker
            is open) and ``retry_after`` (unix time, or None)
        """
        health = self.db.health.all()
        status = {}
        for name, host in self.engine.hosts.items():
            record = health.get(name) or HostHealth()
            row = record._asdict()
            retry_after = self.engine.retry_after((record.consecutive_failures,
                                                   record.last_failure))
            row.update(kind=type(host).__name__, weight=host.weight,
                       can_delete=host.can_delete, can_check=host.can_check,
                       state="cooling" if retry_after else "ok", retry_after=retry_after)
            status[name] = row
        return status

    def pin(self, file_hash, pinned=True):
        """Keep a file in the cache whatever the LRU order says (or stop keeping it).

        Files that no host holds yet are pinned anyway; this pins any file.

        :return: True if the file is in the pool
        """
        try:
            return self.db.cache_index.pin(check_hash(file_hash), pinned)
        except InvalidInputError as exc:
            log.warning("pin: %s", exc)
            return False

    def evict(self, target_bytes=0):
        """Evict least recently used files until at most ``target_bytes`` are cached.

        Pinned files (not yet on any host) stay.

        :return: the number of files evicted
        """
        return self.cache.evict(target_bytes)


def _changes_nothing(doc, known):
    """Whether merging the raw record ``doc`` would change nothing.

    :param known: ``(size, filename, {(host_name, url)})`` of the pool's
        record of that hash, or None
    """
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
    return all(isinstance(entry, dict) and (entry.get("host_name"), entry.get("url", "")) in copies
               for entry in uploads)


def _checked(file_hash, operation):
    """``file_hash`` as a lowercase SHA-256 hex, or None (with a logged reason)."""
    try:
        return check_hash(file_hash)
    except InvalidInputError as exc:
        log.warning("%s: %s", operation, exc)
        return None


def _parse_all(document):
    for index, obj in enumerate(document):
        try:
            yield serializers.parse_record(obj)
        except SerializationError as exc:
            log.warning("data_load: skipping record #%d: %s", index, exc)

