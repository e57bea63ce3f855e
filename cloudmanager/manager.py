"""CloudManager: the facade of the library.

It keeps the original cloud-manager's API and return values (``hash | False``,
``path | None | False``), the wider API its code had too (queues, transfer
meter, block cursor, ``data_dump(limit)``: see :mod:`cloudmanager.legacy`),
and logs the cause of every ``False`` and ``None``
on the ``cloudmanager`` logger. The work is done by the core
:class:`~cloudmanager.pool.Pool` below it, which raises typed exceptions
(:mod:`cloudmanager.errors`) for callers who want them.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import (
    IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union,
    overload,
)

from . import meter, reports
from .config import Config, load_config
from .db.records import LOAD_BATCH  # noqa: F401  (570c729's manager had it)
from .db.urls import is_postgres_url
from .errors import (
    CloudManagerError, InvalidInputError, NotInPoolError, NotStartedError, SerializationError,
)
from .hosts import from_spec
from .original_methods import OriginalMethods
from .pool import Pool, UPLOAD_BATCH, WARM_BATCH  # noqa: F401  (the batch sizes: part of the API)
from .validation import check_hash

log = logging.getLogger("cloudmanager")

#: Settings a pool gets when neither the caller nor the config file sets them.
DEFAULTS: Dict[str, Any] = {
    "redundancy": 3, "defer_uploads": False, "fsync": True, "host_timeout": None,
    "host_cooldown": 60.0, "file_mode": 0o600, "encryption_key": None, "recipients": [],
    "bwlimit": None,
}

#: What the facade turns into the seed's return values, with a logged reason.
_FAILURES = (OSError, CloudManagerError)


class CloudManager(OriginalMethods):
    """A pool of files kept on several hosts, with a bounded local cache.

    Each file is addressed by its SHA-256 and recorded in a SQLite database
    with every host and URL that holds a copy. Uploads go to ``redundancy``
    hosts; the cache keeps the most recently used files and evicts by LRU,
    but never a file that no host holds yet.

    :param database_path: the SQLite file, created with the schema if new; or
        a ``postgresql://`` (``postgres://``) URL of a catalog that several
        nodes share, each with its own cache (its index is then the local
        file ``STORAGE_PATH.index.sqlite3``, beside the cache directory). A
        password in the URL is
        never logged or shown; libpq's ``~/.pgpass`` and ``PG*`` variables work
        too. Needs ``pip install 'cloudmanager[postgres]'``
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
    :param encryption_key: an age identity file (``age-keygen``): the hosts
        then hold only age ciphertext of each file, under a name that is a
        keyed HMAC of its hash (see :mod:`cloudmanager.crypto`). Losing the
        key loses the files it encrypts. Copies made before stay readable.
    :param recipients: more ``age1...`` recipients every new copy is
        encrypted to (other nodes' keys, a person's offline key)
    :param bwlimit: a bandwidth limit that every transfer to and from hosts
        shares, in bytes per second, or as rclone writes it (``"10M"`` is
        10 MiB/s; see :func:`cloudmanager.meter.parse_rate`); None for no
        limit. Bytes that external tools move (plowshare) are not limited
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
                 host_timeout=None, host_cooldown=None, file_mode=None, encryption_key=None,
                 recipients=None, bwlimit=None) -> None:
        settings = self._settings(config, dict(
            database=database_path, storage=storage_path, capacity=storage_size,
            redundancy=redundancy, defer_uploads=defer_uploads, fsync=fsync,
            host_timeout=host_timeout, host_cooldown=host_cooldown, file_mode=file_mode,
            encryption_key=encryption_key, recipients=recipients, bwlimit=bwlimit))
        redundancy = settings["redundancy"]
        if isinstance(redundancy, bool) or not isinstance(redundancy, int) or redundancy < 1:
            raise InvalidInputError("redundancy must be a positive integer, not %r" % (redundancy,))
        self.config = settings["config"]
        self._closed = False
        #: The core this facade speaks for (raises typed exceptions).
        self.pool = Pool(settings["database"], settings["storage"], settings["capacity"],
                         self._build_hosts(hosts, self.config, settings["host_timeout"]),
                         redundancy=redundancy, defer_uploads=settings["defer_uploads"],
                         fsync=settings["fsync"], host_cooldown=settings["host_cooldown"],
                         file_mode=settings["file_mode"],
                         key=self._key(settings["encryption_key"], settings["recipients"]),
                         bwlimit=meter.rate_setting(settings["bwlimit"]))
        #: The parts, for tools and tests that look inside.
        self.db, self.cache, self.engine = self.pool.db, self.pool.cache, self.pool.engine
        self.redundancy = redundancy
        self.defer_uploads = settings["defer_uploads"]
        #: What the cheap open-time check (:func:`cloudmanager.cache.fsck.on_open`) mended.
        self.open_check = self.pool.open_check

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
    def _key(path, recipients):
        if not path and not recipients:
            return None  # no key: crypto (and subprocess, for age) is never loaded
        from .crypto import key_from_settings
        return key_from_settings(path, recipients)

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

    def __enter__(self) -> CloudManager:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Flush pending cache bookkeeping, stop transfers and close the database.

        Calling it twice is harmless. Files queued for upload stay queued in
        the database for the next :meth:`sync`.
        """
        if self._closed:
            return
        self._closed = True
        self.pool.close()

    # -- the seed's API ------------------------------------------------------

    def upload(self, path, *, defer: Optional[bool] = None,
               progress: Optional[Callable[[int], None]] = None) -> Union[str, bool]:
        """Add a file to the pool.

        The file is copied into the cache while it is hashed (one read),
        pinned and queued; then, unless uploads are deferred, it is uploaded
        to ``redundancy`` hosts in parallel. Once one host holds it, the pin
        is lifted. A file larger than the cache, or one that finds the cache
        full of pinned files, is read once from ``path``, hashed while it
        streams to the first host, and refused if ``path`` changed meanwhile
        (see ``docs/ARCHITECTURE.md``).

        :param path: a regular file
        :param defer: override the instance's ``defer_uploads`` for this call
        :param progress: called with the number of bytes of each chunk read
            into the cache (for progress bars); not called for a file that is
            not cached
        :return: the file's SHA-256 hex once it is in the pool (on a host, or
            pinned in the cache and queued); ``False`` if neither was possible
        """
        try:
            return self.pool.upload(path, defer=defer, progress=progress)
        except _FAILURES as exc:
            log.error("upload of %s failed: %s", path, exc)
            return False

    def upload_many(self, paths: Iterable, *, defer: Optional[bool] = None,
                    progress: Optional[Callable[[int], None]] = None) -> List[Union[str, bool]]:
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
        paths = list(paths)
        results: List[Union[str, bool]] = []
        for path, outcome in zip(paths, self.pool.upload_many(paths, defer=defer,
                                                              progress=progress)):
            if isinstance(outcome, str):
                results.append(outcome)
            else:
                log.error("upload of %s failed: %s", path, outcome)
                results.append(False)
        return results

    def warm_up(self, file_hash: str, *, progress: Optional[meter.Progress] = None
                ) -> Union[str, None, bool]:
        """Put a file in the cache and return its local path.

        A hit only updates the LRU order. A miss downloads the file from its
        healthiest host, verifies its SHA-256, and evicts least recently used
        files to make room.

        :param file_hash: the file's SHA-256 hex
        :param progress: called with the byte count of each chunk received
            from a host, from the thread that moves it (for progress bars).
            A failed attempt's bytes are counted too: the next host starts
            over. Not called on a hit, nor for hosts whose bytes an external
            tool writes (plowshare)
        :return: the cached file's path; ``None`` for a malformed or unknown
            hash; ``False`` if it cannot be cached (larger than the cache, no
            room, or no host delivered a good copy)
        """
        return self._path_call("warm_up", file_hash, self.pool.warm_up, file_hash, progress)

    def warm_up_many(self, hashes: Iterable[str], *,
                     progress: Optional[meter.Progress] = None,
                     stop: Optional[threading.Event] = None,
                     landed: Optional[Callable[[str, Union[str, None, bool]], None]] = None
                     ) -> List[Union[str, None, bool]]:
        """Put several files in the cache: :meth:`warm_up` for each, in batches.

        The result is the same as calling :meth:`warm_up` on each hash, but
        many times faster for many small files: the files already cached are
        found with one query, and the others are fetched in batches of up to
        :data:`~cloudmanager.pool.WARM_BATCH` files, each under one
        reservation, downloaded in parallel (each host within its
        ``max_connections``, failing over per file as :meth:`warm_up` does,
        every file checked against its hash), then recorded, published and
        made durable in groups as they land. Files that do not all fit the
        cache are fetched in batches that do: a later batch may evict files
        of an earlier one (least recently used first, never a file no host
        verifiably holds), so a path returned may be gone by the time the
        call returns, as after as many :meth:`warm_up` calls.

        :param hashes: files' SHA-256 hex (a repeated one is fetched once)
        :param progress: called with the byte count of each chunk received
            from a host, from the threads that move them (see :meth:`warm_up`)
        :param stop: an event; once it is set, no further file starts: the
            files in flight are finished and cached (small files are
            fetched in groups: the whole groups in flight, at most
            :data:`~cloudmanager.engine.DOWNLOAD_GROUP` files per
            connection), and the others are ``False`` (not logged one by
            one) and never given to ``landed``
        :param landed: ``landed(hash, value)``, called in the caller's thread
            as each distinct file's outcome is known (hits first, then as
            they are cached), with the value the list will hold for it; not
            for a malformed hash, nor for a file not started
        :return: a list with one entry per hash, in order, as :meth:`warm_up`
            returns: the cached file's path; ``None`` for a malformed or
            unknown hash; ``False`` if it could not be cached (larger than the
            cache, no room, or no host delivered a good copy; the reason
            logged), or was not started (``stop``)
        """
        hashes = list(hashes)
        tell = None if landed is None else (
            lambda h, outcome: None if isinstance(outcome, NotStartedError)
            else landed(h, _seed_path(h, outcome, quiet=True)))
        outcomes = self.pool.warm_up_many(hashes, progress, stop, tell)
        return [_seed_path(h, outcome) for h, outcome in zip(hashes, outcomes)]

    def download(self, file_hash: str, destination=None, *,
                 progress: Optional[meter.Progress] = None, overwrite: bool = False
                 ) -> Union[str, None, bool]:
        """Get a file: into the cache, or to ``destination``.

        An existing file at the destination is never replaced unless
        ``overwrite``: one that already holds the file is left as it is (and
        its path returned), one that holds other bytes is a failure. Nor is
        a symbolic link, directory, device or FIFO ever replaced.

        :param file_hash: the file's SHA-256 hex
        :param destination: ``None`` to behave like :meth:`warm_up`; a
            directory to write the file there under its recorded name (or its
            hash if it has none), made if missing when the path ends with a
            separator (``"restore/"``); or a file path, whose directory must
            exist. The file is written atomically and verified, from the
            cache or streamed from a host, whether or not it fits in the cache,
            and fsynced unless the pool's ``fsync`` is off. A file fetched into
            the cache for it is hashed once, as it arrives, and then copied by
            the kernel.
        :param overwrite: replace a regular file that holds other bytes
        :param progress: called with the byte count of each chunk written
            (received from a host, or copied from the cache when the file
            was cached already), as for :meth:`warm_up`
        :return: like :meth:`warm_up` without a destination; with one, the
            path written, ``None`` for a malformed or unknown hash, or
            ``False`` on failure (the destination holds other bytes, cannot
            be written, or no host delivered a good copy), with the reason
            logged; it names the destination, never a temp file
        """
        if destination is None:
            return self.warm_up(file_hash, progress=progress)
        return self._path_call("download", file_hash, self.pool.download, file_hash,
                               destination, progress, overwrite)

    def _path_call(self, what: str, file_hash: Any, call: Callable, *args: Any
                   ) -> Union[str, None, bool]:
        """The seed's ``path | None | False`` around a core call that raises."""
        try:
            return call(*args)
        except (InvalidInputError, NotInPoolError) as exc:
            log.warning("%s: %s", what, exc)
            return None
        except _FAILURES as exc:
            log.error("%s of %s failed: %s", what, file_hash, exc)
            return False

    def exists(self, file_hash: str) -> bool:
        """Whether the pool has a record of the file (on a host or in the cache).

        :return: bool; False for a malformed hash
        """
        try:
            return self.pool.exists(file_hash)
        except InvalidInputError:
            return False
        except CloudManagerError as exc:
            log.error("exists(%s) failed: %s", file_hash, exc)
            return False

    def on_cache(self, file_hash: str) -> bool:
        """Whether the file is in the local cache (a check, not a use).

        :return: bool; False for a malformed hash
        """
        try:
            return self.pool.on_cache(file_hash)
        except InvalidInputError:
            return False
        except CloudManagerError as exc:
            log.error("on_cache(%s) failed: %s", file_hash, exc)
            return False

    def usage_ratio(self) -> float:
        """Cached bytes over capacity, in [0, 1]. Reads a running total."""
        return self.pool.cache.usage_ratio()

    def info(self, file_hash: str) -> Optional[dict]:
        """The file's record in the v0.2 JSON format (as a dict), or ``None``."""
        checked = _checked(file_hash, "info")
        if checked is None:
            return None
        try:
            return self.pool.records.info(checked)
        except CloudManagerError as exc:
            log.error("info(%s) failed: %s", checked, exc)
            return None

    def sync(self, reencrypt: bool = False, *,
             progress: Optional[meter.Advance] = None) -> Dict[str, int]:
        """Upload queued files and top up files below the redundancy target.

        Every queued or short file is tried, whatever its retry time; the
        queue's attempt counts and last errors show in :meth:`stats`. Only
        copies this node made or checked count toward the target. Hosts
        cooling down after failures are tried once at the start (an explicit
        sync probes them).

        With ``reencrypt`` (a pool with an ``encryption_key``), copies made
        before the pool had its key are then rewritten encrypted, and the
        plaintext ones deleted where the hosts allow it, a batch of files at
        a time: resumable, and never leaving a file without its old copies or
        its new ones.

        :param progress: called as ``progress(nbytes, nfiles)`` while it
            runs: with the byte count of each chunk sent to a host, and with
            the number of files done after each group of them (for progress
            bars; :meth:`sync_plan` gives the totals to expect). Bytes that
            external tools send (plowshare) are not counted
        :return: a summary dict: ``checked``, ``uploads`` (new copies),
            ``complete`` (files now at target), ``short`` (still below it);
            with ``reencrypt`` also ``reencrypted`` (files), ``sealed`` (new
            encrypted copies), ``plaintext_deleted``, ``plaintext_kept``
            (copies no host here could delete) and ``reencrypt_failed``
        :raises InvalidInputError: with ``reencrypt``, on a pool without a key
        """
        summary = self.pool.sync(progress)._asdict()
        if reencrypt:
            done = self.pool.reencrypt()
            summary.update(reencrypted=done["files"] - done["failed"], sealed=done["sealed"],
                           plaintext_deleted=done["deleted"], plaintext_kept=done["kept"],
                           reencrypt_failed=done["failed"])
        return summary

    def sync_plan(self) -> List[Dict[str, Any]]:
        """What :meth:`sync` would do now, without doing it (``cm sync --dry-run``).

        Nothing is sent and nothing is written. Reads a row per file to do:
        for reports and progress bars, not hot paths.

        :return: one dict per file, in the order sync takes them: ``hash``,
            ``filename``, ``size``, ``copies`` (good copies this node made or
            checked), ``wanted`` (new copies sync will try to make, as far as
            the configured hosts allow) and ``queued`` (True for a file
            waiting for its first upload)
        """
        return self.pool.sync_plan()

    def verify(self, hashes: Optional[Sequence[str]] = None,
               hosts: Optional[Sequence[str]] = None, older_than: Optional[float] = None,
               limit: Optional[int] = None, deep: bool = False, *,
               progress: Optional[meter.Advance] = None) -> Dict[str, int]:
        """Check that remote copies are still there and intact.

        A host that can answer cheaply is asked for the object's size (and
        the SHA-256 it stores, as S3 does for single-part uploads); other
        hosts, or every host with ``deep``, send the copy to a temp directory
        to be hashed. Where a host can list (folders, S3, fsspec) and many of
        its copies are due, they are found in its listing instead (sizes,
        and a SHA-256 where the listing carries one); a copy the listing
        does not clear is then asked about alone, so a listing never marks a
        copy by itself. Looks at single copies run in parallel, up to each
        host's ``max_connections``. Missing and bad copies are marked bad, and the next
        :meth:`sync` restores the redundancy target from a good copy.

        Copies checked longest ago go first, so a large pool can be verified
        a slice at a time with ``limit`` or ``older_than``.

        :param hashes: only these files
        :param hosts: only copies recorded under these host names
        :param older_than: only copies not checked in this many seconds
        :param limit: check at most this many copies
        :param deep: download and hash every copy, even where a cheap check exists
        :param progress: called as ``progress(nbytes, ncopies)`` while it
            runs: with the byte count of each chunk downloaded for a check,
            and with 1 after each copy looked at (for progress bars). If it
            has a method ``expect(total_bytes, total_copies)``, that is
            called first, once the copies to look at are chosen
        :return: counts: ``checked``, ``good``, ``bad``, ``missing``,
            ``error`` (the host failed; try again later), ``unreachable`` (no
            configured host can reach the URL) and ``cooling`` (the host's
            circuit breaker is open). Hosts cooling down are tried once at
            the start (an explicit verify probes them), and condemned copies
            (suspect, bad, missing) whose back-off is over are looked at
            again, by download
        """
        return self.pool.verify(hashes, hosts, older_than, limit, deep, progress)

    def check(self, repair: bool = False, deep: bool = False) -> dict:
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
        return self.pool.check(repair=repair, deep=deep)

    def remove(self, file_hash: str) -> Optional[dict]:
        """Forget a file: delete its copies where hosts allow it, its cached
        copy and its record.

        Every recorded copy is deleted where a configured host can delete it,
        bad ones included, but only objects named by this hash: a record
        listing another file's object under it cannot aim a delete there.
        A copy another process makes while the removal runs is not lost: its
        file is queued again. Copies on hosts that cannot delete (file lockers),
        or whose delete failed, stay where they are; their URLs are logged and
        returned, since the record that knew them is gone.

        :return: ``{"deleted": [(host_name, url)], "kept": [(host_name, url)]}``;
            ``None`` for a malformed or unknown hash
        """
        try:
            return self.pool.remove(file_hash)
        except (InvalidInputError, NotInPoolError) as exc:
            log.warning("remove: %s", exc)
            return None

    def unreachable(self) -> Dict[str, List[str]]:
        """Files whose every good copy is on a host this node has not configured.

        Records imported from other nodes may name hosts (or schemes) this
        node cannot reach; they are kept, not treated as errors, and become
        downloadable as soon as a matching host is configured. Cached files
        are not listed. Reads every copy's row: for reports, not hot paths.

        :return: ``{hash: sorted host names of its copies}``
        """
        return reports.unreachable(self.pool)

    # -- node sync -----------------------------------------------------------

    @overload
    def data_dump(self) -> str: ...

    @overload
    def data_dump(self, data_limit: int) -> Optional[str]: ...

    def data_dump(self, data_limit: Optional[int] = None) -> Optional[str]:
        """Export records as a JSON array of v0.2 records (a str).

        Without ``data_limit``: every file's record with at least one copy
        on a host. A file no host holds yet (pinned here, queued) is left
        out: another node could do nothing with it. Nothing is stamped: call
        it as often as you like.

        With ``data_limit`` (the original's form, which fed a blockchain a
        transaction at a time): only records not exported by an earlier
        such call nor loaded with a source (:meth:`data_load`), smallest
        first, as many as fit in ``data_limit`` bytes of JSON (UTF-8, no
        spaces between items); they are stamped as exported and never
        returned again. Call it until it returns ``None``. A record larger
        than ``data_limit`` on its own is skipped, as the original did, and
        stays counted by :meth:`blockchain_queue_info` until a call with a
        larger limit takes it. Unlike the original, an export is not
        offered again a day later if no load confirmed it.

        :param data_limit: the most bytes the returned text may have (>= 2)
        :return: the JSON text; with ``data_limit``, ``None`` once no record
            that fits is left
        :raises InvalidInputError: for a ``data_limit`` that is not an int >= 2
        :raises DatabaseError: if the database fails (nothing is stamped)
        """
        if data_limit is None:
            return self.pool.records.dump()
        return self.pool.legacy.export(data_limit)

    def dump_to(self, fileobj: IO[str]) -> int:
        """Stream every record as a JSON array to a text file object.

        :return: the number of records written
        """
        return self.pool.records.dump_to(fileobj)

    @overload
    def data_load(self, data: Union[str, bytes]) -> Optional[int]: ...

    @overload
    def data_load(self, data: Union[str, bytes], blockchain_hash: str) -> Optional[bool]: ...

    def data_load(self, data: Union[str, bytes], blockchain_hash: Optional[str] = None
                  ) -> Union[int, bool, None]:
        """Merge records exported by another node (the text of :meth:`data_dump`).

        Upload lists are merged as a union; loading the same text twice
        changes nothing. Invalid records are skipped with a logged reason.

        With ``blockchain_hash`` (the original's form: the hash of the block
        or transaction the text was read from), every valid record is also
        tagged with it, in the transaction that merges it; a tagged record is
        out there already, so ``data_dump(limit)`` never exports it, nor
        counts it in :meth:`blockchain_queue_info`. A record keeps the first
        tag it gets. The original refused the whole text if one record could
        not be read; here invalid records are skipped and the rest load.

        :param data: JSON text (or UTF-8 bytes): an array of records, or one
        :param blockchain_hash: where ``data`` came from: 1 to 256
            characters, no control characters
        :return: with one argument, how many records were imported or
            updated, ``None`` if the text is not JSON records. With
            ``blockchain_hash``, ``True`` (as the original), ``None`` if the
            text is not JSON records or holds no valid one, or for a bad
            ``blockchain_hash``. Never raises on bad data.
        """
        if blockchain_hash is not None:
            try:
                self.pool.legacy.load(data, blockchain_hash)
            except (SerializationError, InvalidInputError) as exc:
                log.error("data_load: %s", exc)
                return None
            except CloudManagerError as exc:
                log.error("data_load failed: %s", exc)
                return None
            return True
        try:
            return self.pool.records.load(data)
        except SerializationError as exc:
            log.error("data_load: %s", exc)
            return None
        except CloudManagerError as exc:  # the database: what merged before stays
            log.error("data_load failed: %s", exc)
            return None

    def load_from(self, fileobj: IO[str]) -> Optional[int]:
        """Merge records streamed from a text file object holding a JSON array.

        :return: how many records were imported or updated; ``None`` if the
            document is not JSON records, or holds records and none of them
            is valid (records before a fault stay merged). The logged reason
            names the file (its ``name``, e.g. ``<stdin>``).
        """
        name = getattr(fileobj, "name", None)
        name = name if isinstance(name, str) else "load_from"
        try:
            return self.pool.records.load_from(fileobj)
        except SerializationError as exc:
            log.error("%s: %s", name, exc)
            return None
        except CloudManagerError as exc:
            log.error("loading %s failed: %s", name, exc)
            return None

    # -- trees -----------------------------------------------------------------
    # A directory by name: a manifest stored in the pool (cloudmanager/trees.py).

    def upload_tree(self, path, *, defer: Optional[bool] = None,
                    follow_symlinks: bool = False) -> Union[str, bool]:
        """Upload a directory and record it as a tree; return the tree's hash.

        Every regular file below ``path`` is uploaded (as :meth:`upload_many`
        does), then a **tree manifest** (each file's path relative to
        ``path``, hash, size, permission bits and mtime; canonical JSON, see
        :mod:`cloudmanager.trees`) is stored in the pool as an ordinary file
        named ``NAME.cmtree``, ``NAME`` being the directory's name. It
        replicates, verifies, dumps and loads like any file, and a node that
        loads its record knows it as a tree (:meth:`trees`). Symbolic links
        inside are skipped unless ``follow_symlinks``; empty directories are
        not recorded.

        :param path: a directory
        :param defer: as for :meth:`upload_many`
        :param follow_symlinks: upload what links inside point to
        :return: the manifest's SHA-256 hex (the tree's hash); ``False`` if
            a file could not be uploaded (those that were stay in the pool)
            or the tree could not be recorded; the reason is logged
        """
        try:
            return self.pool.trees.upload(path, defer=defer, follow_symlinks=follow_symlinks)
        except _FAILURES as exc:
            log.error("upload_tree of %s failed: %s", path, exc)
            return False

    def record_tree(self, path, files: Iterable[Tuple[Any, str]], *,
                    defer: Optional[bool] = None) -> Union[str, bool]:
        """Record files already uploaded from under ``path`` as its tree (``cm upload DIR``).

        :param path: the directory the files were found in
        :param files: ``(SourceFile, hash)`` pairs for every regular file
            below it (:func:`cloudmanager.sources.walk` gives the
            :class:`~cloudmanager.sources.SourceFile`, with the stat taken
            before the file was read)
        :param defer: as for :meth:`upload`, for the manifest itself
        :return: the tree's hash; ``False`` (logged) if it cannot be recorded
        """
        from .trees import entries_for, tree_name

        try:
            return self.pool.trees.record(tree_name(path),
                                          entries_for(path, files),
                                          defer=defer)
        except _FAILURES as exc:
            log.error("no tree recorded for %s: %s", path, exc)
            return False

    def restore_tree(self, tree_hash: str, dest, *, jobs: int = 4, force: bool = False,
                     dry_run: bool = False, checksum: bool = False,
                     progress: Optional[Callable[[int, int], None]] = None
                     ) -> Union[dict, None, bool]:
        """Recreate a tree under ``dest`` on any node that has its records.

        The manifest is checked whole first (it may come from another node):
        a path that could leave ``dest`` (``..``, absolute, a device name, a
        duplicate, a file where a directory must be) refuses the tree before
        anything is written. Files are fetched ``jobs`` at a time, each
        verified against its hash and the size the catalog records, written to
        a temp name in its directory with its mode and mtime, and renamed in
        place; a symbolic link met inside ``dest`` is never followed. A file
        already there with the same content is kept (its mode and mtime set),
        so an interrupted restore resumes and a finished one is a no-op; one
        that differs is a conflict and is left alone unless ``force``.

        :param tree_hash: the tree's hash (from :meth:`upload_tree` or :meth:`trees`)
        :param dest: the directory to restore into; created if missing
        :param jobs: files fetched at the same time (1 to 16)
        :param force: replace files that differ (never a directory)
        :param dry_run: only say what would be done
        :param checksum: hash files already there even when size and mtime match
        :param progress: ``progress(nbytes, nfiles)``, from worker threads
        :return: a summary dict: ``files``, ``fetched``, ``fetched_bytes``,
            ``unchanged``, ``conflicts`` and ``failed`` (lists of ``[path,
            reason]``), ``actions`` (``[action, path]``: fetch, keep, touch,
            conflict, fail) and ``ok`` (every file in place); ``None`` for a
            malformed or unknown hash; ``False`` (logged) if the manifest is
            refused or cannot be fetched, or ``dest`` cannot be used
        """
        checked = _checked(tree_hash, "restore_tree")
        if checked is None:
            return None
        try:
            summary = self.pool.trees.restore(checked, dest, jobs=jobs, force=force,
                                              dry_run=dry_run, checksum=checksum,
                                              progress=progress)
        except NotInPoolError as exc:
            log.warning("restore_tree: %s", exc)
            return None
        except _FAILURES as exc:
            log.error("restore of %s failed: %s", tree_hash, exc)
            return False
        result = summary._asdict()
        result["ok"] = summary.ok
        return result

    def tree_entries(self, tree_hash: str) -> Union[List[dict], None, bool]:
        """The files of a tree (``cm ls TREE``), in path order.

        :return: dicts with ``path``, ``hash``, ``size``, ``mode`` and
            ``mtime_ns``; ``None`` for a malformed or unknown hash; ``False``
            (logged) if the file is not a tree manifest, is refused, or
            cannot be fetched
        """
        checked = _checked(tree_hash, "tree_entries")
        if checked is None:
            return None
        try:
            return [e._asdict() for e in self.pool.trees.read(checked)]
        except NotInPoolError as exc:
            log.warning("tree_entries: %s", exc)
            return None
        except _FAILURES as exc:
            log.error("cannot read tree %s: %s", checked, exc)
            return False

    def trees(self) -> List[dict]:
        """Every tree the pool knows, oldest first (``cm trees``).

        Trees uploaded here and trees whose records were loaded from another
        node (:meth:`data_load`). Reads the catalog's small ``trees`` table.

        :return: dicts with ``hash``, ``name`` (the directory's) and
            ``created`` (unix time)
        """
        return self.pool.trees.list()

    def import_legacy(self, database: Union[str, os.PathLike[str]],
                      storage: Union[str, os.PathLike[str]]) -> Optional[Dict[str, Any]]:
        """Import an original cloud-manager pool: its records, and the files
        in its storage folder that no host got (``cm import-legacy``).

        The original's database (its SQLite file, or a ``postgres://`` URL)
        is only read. Each row's payload is merged as :meth:`data_load`
        merges records, after the same validation: a bad record is skipped
        with its reason and the rest load. Names lose the original's
        ``<hash7>_`` prefix when it is that file's. A ``blockchain_hash``
        tags its record as loaded from that source and an
        ``exported_timestamp`` stamps it as exported, so
        ``data_dump(limit)`` never exports it again; the transfer meter's
        months are carried under a node of their own, and the block cursor
        if the original's is further on.

        A file that was never uploaded (or that no host took) and whose
        bytes are in ``storage`` under ``<hash7>_<name>`` is added to the
        pool and uploaded: read once, and refused, with nothing recorded, if
        its bytes do not hash to its recorded hash. A symbolic link there is
        refused, never followed; nothing in ``storage`` is changed or
        deleted. A file larger than the cache streams to the hosts, checked
        the same way before anything is published (on Linux; elsewhere it is
        refused: run again with a larger capacity).

        Running it again changes nothing and reads no file again.

        :param database: the original's SQLite file or ``postgres://`` URL
            (a password in it is never logged or returned)
        :param storage: the original's storage folder
        :return: a summary: ``database`` (as it may be shown), ``storage``,
            ``rows`` read; ``records`` valid, ``changed`` (imported or
            updated), ``tagged``, ``stamped``; ``skipped``
            (``[{hash, name, reason}]``, bad records); ``uploaded`` (hashes
            added from the folder); ``present`` (files that needed bytes and
            that the pool had already); ``refused`` (``[{hash, name,
            reason}]``) and ``missing`` (``[{hash, name}]``: never uploaded,
            not in the folder); ``meter`` (``{node, months, uploaded,
            downloaded}``, or None without one) and ``last_known_block``
            (the pool's cursor now, or None); ``notes`` (fields not
            carried). ``None`` (logged) if the import could not run: a
            missing database or folder, a database that is not an original
            pool, or a database failure (what was imported stays; run again)
        """
        try:
            return self.pool.import_legacy(database, storage)
        except _FAILURES as exc:
            log.error("import-legacy failed: %s", exc)
            return None

    # -- beyond the seed -----------------------------------------------------

    def status(self, file_hash: str) -> Optional[dict]:
        """A file's whole state, for people and scripts (``cm info``).

        :return: a dict with ``hash``, ``filename``, ``size``, ``created``,
            ``cached``, ``pinned`` (explicitly), ``copies`` (hosts with a good
            copy), ``verified`` (of those, copies this node uploaded or
            checked), ``target`` (the redundancy) and ``uploads``
            (``[{host_name, url, error, verified, time}]``); ``None`` for a
            malformed or unknown hash
        """
        checked = _checked(file_hash, "status")
        return None if checked is None else reports.status(self.pool, checked)

    def files(self) -> Iterator[dict]:
        """Iterate over every file, by name then hash (``cm ls``).

        Yields dicts with ``hash``, ``filename``, ``size``, ``cached``,
        ``pinned``, ``copies`` and ``verified``, streamed from the database.
        ``cached`` is what the database records; :meth:`on_cache` also looks
        at the file.
        """
        return reports.files(self.pool)

    def replication(self, hashes: Iterable[str]) -> Dict[str, dict]:
        """Where each file stands against the redundancy target (``cm upload``
        says which files it left short, and which no host took).

        :param hashes: SHA-256 hex digests
        :return: ``{hash: {"copies", "verified", "target", "last_error"}}`` for
            those of ``hashes`` in the pool: hosts believed to hold a copy,
            those of them whose copy this node made or checked (what counts
            toward ``target``), and why the last upload attempt fell short
            (None if the file is not queued after a failed attempt)
        """
        return reports.replication(self.pool, hashes)

    def expand_hash(self, prefix: str) -> Optional[str]:
        """The file hash starting with ``prefix`` (4 to 64 hex digits).

        :return: the full hash, or ``None`` if no file's hash starts with it
        :raises InvalidInputError: if ``prefix`` is not 4 to 64 hex digits, or
            more than one file's hash starts with it
        """
        return self.pool.expand_hash(prefix)

    def complete_hash(self, prefix: str, limit: int = 100) -> List[str]:
        """Up to ``limit`` file hashes starting with ``prefix``, in order (shell completion).

        A range scan on the hashes, however large the pool.

        :param prefix: 0 to 64 hex digits; anything else matches nothing
        :return: full hashes, sorted
        """
        return self.pool.complete_hash(prefix, limit)

    def stats(self) -> dict:
        """Counts and totals of the pool, as a dict.

        Keys: ``files``, ``cached_files``, ``cached_bytes``, ``capacity``,
        ``usage_ratio``, ``queued``, ``below_target``, ``redundancy``,
        ``uploaded_bytes``/``downloaded_bytes`` (``total`` and ``this_month``),
        ``hits``, ``misses``, ``transfers`` (per month, all nodes together),
        ``hosts`` (:meth:`host_status`), ``encryption`` (None, or the key's
        public ``recipient``, every ``recipients`` and ``key_id``: never the
        key itself), ``node`` (this node's id) and
        ``nodes`` (every node that used the pool: ``hostname``, ``last_seen``
        and its own ``transfers`` per month).
        """
        return reports.stats(self.pool)

    def host_status(self) -> Dict[str, dict]:
        """Each configured host's kind, weight, capabilities and health.

        :return: ``{host_name: {...}}`` with the health counters of
            :class:`~cloudmanager.db.health.HostHealth` (``latency_ms`` is a median),
            ``state`` (``"ok"``, or ``"cooling"`` while its circuit breaker
            is open) and ``retry_after`` (unix time, or None)
        """
        return reports.host_status(self.pool)

    def retry_hosts(self, names: Iterable[str]) -> List[str]:
        """Try hosts again now, whatever their circuit breaker says (``cm hosts --retry``).

        Their failure streaks are forgotten, for every process sharing the
        pool; the next transfer tries them, and its outcome counts as usual.

        :return: the names reset
        :raises InvalidInputError: for a name no configured host has
        """
        return self.pool.retry_hosts(names)

    def pin(self, file_hash: str, pinned: bool = True) -> bool:
        """Keep a file in the cache whatever the LRU order says (or stop keeping it).

        Files that no host holds yet are pinned anyway; this pins any file.

        :return: True if the file is in the pool
        """
        try:
            return self.pool.pin(file_hash, pinned)
        except InvalidInputError as exc:
            log.warning("pin: %s", exc)
            return False

    def evict(self, target_bytes: int = 0) -> int:
        """Evict least recently used files until at most ``target_bytes`` are cached.

        Pinned files (not yet on any host) stay.

        :return: the number of files evicted
        """
        return self.pool.evict(target_bytes)

    # -- for the command line (added by the CLI restructure) --

    def settings(self) -> Dict[str, Any]:
        """The settings this pool runs with (``cm status``, ``cm ls``, ``cm evict``).

        :return: a dict: ``database`` (the SQLite file, absolute),
            ``storage`` (the cache directory, absolute), ``capacity`` (the
            cache's size in bytes), ``redundancy`` (the target number of
            hosts for each file), ``defer_uploads`` and ``bwlimit`` (bytes
            per second, or None)
        """
        bucket = self.pool.engine.bucket
        return {"database": self.pool.db.path, "storage": self.pool.cache.root,
                "capacity": self.pool.cache.capacity, "redundancy": self.redundancy,
                "defer_uploads": self.defer_uploads,
                "bwlimit": None if bucket is None else bucket.rate}

    @staticmethod
    def cached_bytes_at(database_path: Union[str, os.PathLike[str]],
                        storage_path: Optional[Union[str, os.PathLike[str]]] = None) -> int:
        """What the cache of a pool holds, read from its database without opening the pool.

        For sizing a cache before the pool is opened (as
        :func:`~cloudmanager.config.default_capacity` wants): only the
        database is opened, not the storage directory or the hosts.

        :param database_path: the pool's SQLite file (or its catalog's URL)
        :param storage_path: the cache directory; needed for a catalog on a
            server, whose cache index is a file in it
        :return: the cached bytes; 0 if there is no cache index there yet
        :raises CloudManagerError: if the cache index cannot be read
        """
        from .db import index_path_for
        from .db.connection import Database
        from .db.cache_index import CacheIndex

        path = database_path
        if storage_path is not None:
            path = index_path_for(database_path, storage_path) or database_path
        if is_postgres_url(path) or not os.path.exists(path):
            return 0
        db = Database(path, with_catalog=path == database_path)
        try:
            return CacheIndex(db).counter("cached_bytes")
        finally:
            db.close()

    def remembered(self, files: Iterable[Any]) -> Dict[str, str]:
        """The hashes remembered for source files that have not changed since
        they were uploaded, so ``cm upload`` can skip them without reading them.

        A hash counts only while the file's size, mtime, ctime, inode and
        device are those remembered, and while the pool still holds it
        (cached here, or with a copy on a host). See :mod:`cloudmanager.sources`.

        :param files: :class:`~cloudmanager.sources.SourceFile` objects
        :return: ``{path: hash}`` for those of ``files`` that are unchanged
        """
        from .sources import SourceIndex

        return SourceIndex(self.pool.db).known(files)

    def remember(self, entries: Iterable[Sequence[Any]]) -> None:
        """Remember the hashes of uploaded source files, keyed by their stat.

        Remember only files that did not change while they were read and
        were not modified just before (see
        :meth:`cloudmanager.sources.SourceIndex.rememberable`, and
        :attr:`cloudmanager.scheduler.Uploaded.rememberable`); a later
        :meth:`remembered` then trusts the hash without reading the file.

        :param entries: ``(SourceFile, hash)`` pairs
        """
        from .sources import SourceIndex

        SourceIndex(self.pool.db).remember(list(entries))


def _checked(file_hash: Any, operation: str) -> Optional[str]:
    """``file_hash`` as a lowercase SHA-256 hex, or None (with a logged reason)."""
    try:
        return check_hash(file_hash)
    except InvalidInputError as exc:
        log.warning("%s: %s", operation, exc)
        return None



def _seed_path(file_hash: str, outcome: Union[str, BaseException],
               quiet: bool = False) -> Union[str, None, bool]:
    """The seed's ``path | None | False`` for one outcome of a core batch,
    logged as :meth:`CloudManager.warm_up` logs it (unless ``quiet``); an
    item not started (:class:`NotStartedError`) is False, not logged."""
    if isinstance(outcome, str):
        return outcome
    if isinstance(outcome, (InvalidInputError, NotInPoolError)):
        if not quiet:
            log.warning("warm_up: %s", outcome)
        return None
    if not quiet and not isinstance(outcome, NotStartedError):
        log.error("warm_up of %s failed: %s", file_hash, outcome)
    return False
