"""UploadEngine: moving bytes to and from hosts.

Uploads go to ``redundancy`` hosts in parallel threads, healthiest first
(fewest consecutive failures, then random). When one fails, the next
candidate starts, until the target is met or the hosts run out.

Downloads try the copies in the health order of their hosts. Each attempt
writes a temp file beside the destination and is verified against the
SHA-256 (and size) before it is renamed into place; a copy that does not
match, or that the host no longer has, is marked bad in the database and is
never tried again. Every outcome updates the host's health and the monthly
transfer meter.
"""

import concurrent.futures
import logging
import os
import queue
import random
import threading
import time
from typing import List, NamedTuple, Sequence

from . import fsutil
from .errors import (
    CorruptCopyError,
    DownloadError,
    HostError,
    HostNotFoundError,
    HostUnavailableError,
    IntegrityError,
    InvalidInputError,
    TransientHostError,
)
from .db.health import Outcome
from .hosts.base import Location

log = logging.getLogger(__name__)

#: The longest a host's breaker stays open, in seconds.
MAX_COOLDOWN = 3600.0

#: Files a batch sends to one host in a row, with one thread (see
#: :meth:`UploadEngine.upload_many`): a thread per file costs more than a
#: small file's upload.
BATCH_GROUP = 16
#: The same for hosts that take a group in one call (``can_batch``): a group
#: has a fixed cost there (two filesystem syncs for a folder host), so it is
#: larger; a batch of 500 still spreads over four connections.
BATCH_GROUP_WHOLE = 128
#: Groups of a batch queued or running at once: enough to keep every
#: connection busy, few enough that a host's breaker stops the batch soon.
BATCH_IN_FLIGHT = 16

#: Seconds the engine waits past a host's own ``timeout`` before it gives up
#: on a call: the host's own timeout, with its better error, fires first.
DEADLINE_GRACE = 1.0
#: Bytes per second a transfer is allowed on top of the host's ``timeout``,
#: so that a large file on a slow link is not mistaken for a hang.
DEADLINE_RATE = 64 * 1024


class UploadResult(NamedTuple):
    """What one round of uploads achieved."""

    successes: List[Location]
    failures: List[HostError]
    #: Names of hosts skipped because their circuit breaker is open.
    cooling: Sequence[str] = ()


class UploadEngine:
    """Parallel, health-ordered uploads and verified, failing-over downloads.

    A host that fails ``breaker_threshold`` times in a row is skipped for a
    cool-down (a circuit breaker): ``cooldown`` seconds, doubled for each
    further failure up to :data:`MAX_COOLDOWN`. After it, transfers try the
    host again; a success closes the breaker. Failures that say nothing about
    the host being up (a missing or corrupt object, a local disk error) do
    not count. Downloads still try a cooling host, last.

    :param db: the :class:`~cloudmanager.db.FileDatabase` (for host
        health, bad copies and the transfer meter)
    :param hosts: :class:`~cloudmanager.hosts.base.Host` objects; names must be unique
    :param redundancy: the target number of hosts per file
    :param breaker_threshold: consecutive failures that open a host's breaker
    :param cooldown: seconds a host is skipped once its breaker opens
    :raises InvalidInputError: if two hosts share a name
    """

    def __init__(self, db, hosts, redundancy, breaker_threshold=3, cooldown=60.0):
        self.db = db
        self.redundancy = redundancy
        self.breaker_threshold = breaker_threshold
        self.cooldown = cooldown
        self.hosts = {}
        for host in hosts:
            if host.name in self.hosts:
                raise InvalidInputError("two hosts are named %r" % host.name)
            self.hosts[host.name] = host
        self._slots = {h.name: threading.BoundedSemaphore(max(1, h.max_connections))
                       for h in self.hosts.values()}
        workers = max(4, sum(h.max_connections for h in self.hosts.values()))
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(workers, 32), thread_name_prefix="cloudmanager")
        #: Long-lived threads that run host calls under a deadline (see :meth:`_call`).
        self._calls = _CallPool()

    # -- choosing hosts --------------------------------------------------------

    def retry_after(self, breaker, now=None):
        """When a host's breaker lets it be tried again (unix time), or None if closed.

        :param breaker: the host's ``(consecutive_failures, last_failure)``, or None
        """
        failures, last_failure = breaker or (0, None)
        if failures < self.breaker_threshold or not last_failure:
            return None
        extra = min(failures - self.breaker_threshold, 16)
        until = last_failure + min(self.cooldown * 2 ** extra, MAX_COOLDOWN)
        return until if until > (time.time() if now is None else now) else None

    def cooling(self, host):
        """Whether ``host``'s circuit breaker is open now."""
        return self.retry_after(self.db.health.breakers().get(host.name)) is not None

    def ranked(self, hosts):
        """Split hosts into ``(usable, cooling)``, each ordered healthiest first.

        Usable hosts sort by fewest consecutive failures, then highest weight,
        then at random (spreading load among equals). ``cooling`` holds the
        hosts whose breaker is open.
        """
        health = self.db.health.breakers()
        now = time.time()
        usable, cooling = [], []
        for host in hosts:
            row = health.get(host.name)
            (cooling if self.retry_after(row, now) else usable).append(host)
        key = lambda h: (health.get(h.name, (0, None))[0],  # noqa: E731
                         -h.weight, random.random())
        return sorted(usable, key=key), sorted(cooling, key=key)

    def host_for(self, host_name, url):
        """The configured host that can fetch ``url``: the one named
        ``host_name``, else any host that accepts the URL. None if there is none."""
        host = self.hosts.get(host_name)
        if host is not None and host.accepts(url):
            return host
        for candidate in self.hosts.values():
            if candidate.accepts(url):
                return candidate
        return None

    # -- uploads ---------------------------------------------------------------

    def upload(self, path, file_hash, size, holders=(), target=None):
        """Upload a file until ``target`` hosts beyond ``holders`` hold it.

        :param path: the local file (the cached copy, or the source itself)
        :param holders: names of hosts that already hold a good copy
        :param target: total hosts wanted (default: the engine's redundancy)
        :return: an :class:`UploadResult`
        """
        target = self.redundancy if target is None else target
        needed = target - len(set(holders))
        candidates, cooling = self.ranked([h for n, h in self.hosts.items() if n not in holders])
        for host in cooling:
            log.info("not uploading %s to %s: it failed too often lately; cooling down",
                     file_hash, host.name)
        successes, failures = [], []
        running = set()
        while needed > len(successes) and (candidates or running):
            while candidates and len(running) + len(successes) < needed:
                host = candidates.pop(0)
                running.add(self._pool.submit(self._upload_one, host, path, file_hash, size))
            done, running = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                outcome = future.result()
                (successes if isinstance(outcome, Location) else failures).append(outcome)
        for future in running:  # pragma: no cover - only when target shrank
            outcome = future.result()
            (successes if isinstance(outcome, Location) else failures).append(outcome)
        return UploadResult(successes, failures, [h.name for h in cooling])

    def _upload_one(self, host, path, file_hash, size):
        started = time.monotonic()
        try:
            location = self._call(host, "upload of %s" % file_hash, self.deadline(host, size),
                                  host.upload, path, file_hash)
        except HostError as exc:
            return self._failed(host, exc, "upload of %s" % file_hash)
        except Exception as exc:  # a host bug must not take the engine down
            return self._failed(host, TransientHostError(host.name, repr(exc)),
                                "upload of %s" % file_hash)
        self.db.health.record({host.name: [Outcome(True, (time.monotonic() - started) * 1000,
                                                   None, time.time())]}, uploaded=size)
        log.info("uploaded %s to %s", file_hash, host.name)
        return location

    # -- batches (CloudManager.upload_many) --------------------------------------

    def upload_many(self, jobs):
        """Upload several files, each until its target, all hosts working at once.

        Each job is handled as :meth:`upload` would: healthiest hosts first,
        and the next candidate when one fails. What differs is the overhead:
        files go to each host in groups of up to :data:`BATCH_GROUP`
        (:data:`BATCH_GROUP_WHOLE` for hosts that take a group in one call), one
        thread per group, under the same per-file deadline as :meth:`_call`
        (a group gives up on the rest once one file overruns it); host
        health and the transfer meter are written once per batch; and a
        host that fails ``breaker_threshold`` times in a row during the batch
        gets no more of it.

        :param jobs: ``[(path, file_hash, size, holders, target)]``
        :return: an :class:`UploadResult` per job, in order
        """
        usable, cooling = self.ranked(list(self.hosts.values()))
        cooling_names = [h.name for h in cooling]
        if cooling_names and jobs:
            log.info("not uploading %d files to %s: failed too often lately; cooling down",
                     len(jobs), ", ".join(cooling_names))
        plans = [{"job": job, "needed": job[4] - len(set(job[3])), "running": 0,
                  "candidates": [h for h in usable if h.name not in set(job[3])],
                  "successes": [], "failures": []} for job in jobs]
        done_queue = _CompletionQueue()
        pending = {}  # host name -> (host, [plan index]) waiting to form a group
        outcomes = {}  # host name -> [(ok, latency_ms, error, when)], for record_host_batch
        streak = {}  # host name -> failures in a row within this batch
        tripped = set()
        counts = {"in_flight": 0, "uploaded": 0}

        def want(index):
            plan = plans[index]
            while plan["candidates"] and plan["running"] + len(plan["successes"]) < plan["needed"]:
                host = plan["candidates"].pop(0)
                if host.name not in tripped:
                    plan["running"] += 1
                    pending.setdefault(host.name, (host, []))[1].append(index)

        def submit(partial):
            for name in list(pending):
                host, indexes = pending[name]
                size = BATCH_GROUP_WHOLE if host.can_batch else BATCH_GROUP
                while indexes and (partial or len(indexes) >= size) \
                        and counts["in_flight"] < BATCH_IN_FLIGHT:
                    group, indexes[:] = indexes[:size], indexes[size:]
                    items = [(i,) + tuple(plans[i]["job"][:3]) for i in group]
                    done_queue.watch(self._pool.submit(self._upload_group, host, items), host)
                    counts["in_flight"] += 1
                if not indexes:
                    del pending[name]

        scan = iter(range(len(plans)))

        def fill():
            for index in scan:
                want(index)
                submit(partial=False)
                if counts["in_flight"] >= BATCH_IN_FLIGHT:
                    return
            submit(partial=True)  # every job is planned: send the partial groups too

        fill()
        while counts["in_flight"]:
            host, future = done_queue.get()
            counts["in_flight"] -= 1
            for index, outcome, latency_ms in future.result():
                plan = plans[index]
                plan["running"] -= 1
                ok = isinstance(outcome, Location)
                outcomes.setdefault(host.name, []).append(
                    Outcome(ok, latency_ms, None if ok else outcome.message, time.time()))
                if ok:
                    plan["successes"].append(outcome)
                    counts["uploaded"] += plan["job"][2]
                    streak[host.name] = 0
                    continue
                plan["failures"].append(outcome)
                streak[host.name] = streak.get(host.name, 0) + 1
                if streak[host.name] >= self.breaker_threshold and host.name not in tripped:
                    tripped.add(host.name)
                    log.warning("%s failed %d times in a row; no more uploads to it in this "
                                "batch", host.name, streak[host.name])
                want(index)  # the next candidate
            for name in tripped & set(pending):  # not sent yet: to other hosts instead
                for index in pending.pop(name)[1]:
                    plans[index]["running"] -= 1
                    want(index)
            fill()
        if outcomes or counts["uploaded"]:
            self.db.health.record(outcomes, uploaded=counts["uploaded"])
        cooling_names += sorted(tripped)
        return [UploadResult(p["successes"], p["failures"], cooling_names) for p in plans]

    def _upload_group(self, host, items):
        """Upload ``[(index, path, file_hash, size)]`` to one host, one after another.

        One daemon thread does the uploads, under one connection slot; the
        caller waits for each file no longer than :meth:`deadline` would let
        a single call run. When one overruns, the caller gives up on it and
        on the rest of the group (the thread stops after the file it is on).
        A host that :attr:`~cloudmanager.hosts.base.Host.can_batch` gets the
        group in one :meth:`~cloudmanager.hosts.base.Host.upload_batch` call,
        within the sum of the files' deadlines. No database writes: the batch
        records them.

        :return: ``[(index, Location or HostError, latency_ms or None)]`` for every item
        """
        done = []
        cond = threading.Condition()
        # "current": the item being uploaded, when it started and its
        # deadline. The caller is woken only at the end (a wake-up per file
        # costs more than a small file's copy); its deadline follows "current".
        state = {"finished": False, "abandoned": False,
                 "current": (time.monotonic(), self.deadline(host, items[0][3]))}

        def finish(index, file_hash, outcome, latency_ms, then=None):
            if isinstance(outcome, Location):
                log.debug("uploaded %s to %s", file_hash, host.name)
            else:
                log.warning("upload of %s failed on %s: %s", file_hash, host.name,
                            outcome.message)
                latency_ms = None
            with cond:
                done.append((index, outcome, latency_ms))
                if then is not None:  # the next item's clock starts now
                    state["current"] = then

        def one_by_one():
            for position, (index, path, file_hash, size) in enumerate(items):
                started = time.monotonic()
                with cond:
                    if state["abandoned"]:
                        return
                    state["current"] = (started, self.deadline(host, size))
                outcome = self._guarded(host, lambda: host.upload(path, file_hash))
                ended = time.monotonic()
                then = (ended, self.deadline(host, items[position + 1][3])) \
                    if position + 1 < len(items) else None
                finish(index, file_hash, outcome, (ended - started) * 1000, then)

        def as_batch():
            limits = [self.deadline(host, size) for _, _, _, size in items]
            started = time.monotonic()
            with cond:
                state["current"] = (started, None if None in limits else sum(limits))
            outcomes = self._guarded(host, lambda: host.upload_batch(
                [(path, file_hash) for _, path, file_hash, _ in items]))
            if isinstance(outcomes, HostError):
                outcomes = [outcomes] * len(items)
            elif not isinstance(outcomes, list) or len(outcomes) != len(items):  # a host's bug
                outcomes = [TransientHostError(host.name, "upload_batch returned %.60r for %d "
                                               "files" % (outcomes, len(items)))] * len(items)
            outcomes = [o if isinstance(o, (Location, HostError)) else TransientHostError(
                host.name, "upload_batch gave %.60r for a file" % (o,)) for o in outcomes]
            latency_ms = (time.monotonic() - started) * 1000 / len(items)
            for (index, _, file_hash, _), outcome in zip(items, outcomes):
                finish(index, file_hash, outcome, latency_ms)

        def run():
            try:
                with self._slots[host.name]:
                    (as_batch if host.can_batch else one_by_one)()
            finally:
                with cond:
                    state["finished"] = True
                    cond.notify()

        self._calls.submit(run)
        with cond:
            while not state["finished"]:
                started, limit = state["current"]
                if limit is None:
                    cond.wait()
                    continue
                remaining = started + limit - time.monotonic()
                if remaining <= 0:
                    state["abandoned"] = True
                    break
                cond.wait(remaining)
            results = list(done)
        for index, _, file_hash, _ in items[len(results):]:
            exc = HostUnavailableError(host.name, "upload of %s did not end within %.1f s; "
                                       "gave up" % (file_hash, self.deadline(host, 0)))
            log.warning("%s", exc.message)
            results.append((index, exc, None))
        return results

    @staticmethod
    def _guarded(host, call):
        """``call()``, or the :class:`HostError` it raised; a host's bug (any
        other exception) becomes a TransientHostError: it must not take the
        engine down."""
        try:
            return call()
        except HostError as exc:
            return exc
        except Exception as exc:
            return TransientHostError(host.name, repr(exc))

    # -- deadlines -------------------------------------------------------------

    @staticmethod
    def deadline(host, size=0):
        """Seconds the engine lets one call to ``host`` run, or None for no limit.

        It is the host's ``timeout``, plus :data:`DEADLINE_GRACE`, plus one
        second per :data:`DEADLINE_RATE` bytes transferred. A host whose
        ``timeout`` is None or not positive gets no deadline.
        """
        timeout = getattr(host, "timeout", None)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            return None
        return timeout + DEADLINE_GRACE + size / DEADLINE_RATE

    def _call(self, host, what, deadline, fn, *args, cleanup=None):
        """Run ``fn(*args)`` under the host's connection slot, within ``deadline`` seconds.

        The call runs on one of the engine's call threads (see
        :class:`_CallPool`), so a host that never returns holds that thread,
        not the caller, and a new thread serves the next call. If the deadline passes, the
        caller gets :class:`~cloudmanager.errors.HostUnavailableError`; when
        the abandoned call ends at last, ``cleanup()`` runs (to remove what
        it wrote after the caller gave up).

        :raises HostUnavailableError: if the deadline passed
        """
        if deadline is None:
            with self._slots[host.name]:
                return fn(*args)
        box = {}
        lock = threading.Lock()

        def run():
            try:
                with self._slots[host.name]:
                    box["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc
            with lock:
                abandoned = box.setdefault("done", True) == "abandoned"
            finished.set()
            if abandoned:
                log.info("%s on %s ended after the engine gave up on it", what, host.name)
                if cleanup is not None:
                    cleanup()

        finished = threading.Event()
        self._calls.submit(run)
        finished.wait(deadline)
        with lock:
            if box.setdefault("done", "abandoned") == "abandoned":
                raise HostUnavailableError(host.name, "%s did not end within %.1f s; gave up"
                                           % (what, deadline))
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _failed(self, host, exc, what, counts=True):
        """Log a failure and return it; ``counts`` toward the host's health
        unless it says nothing about the host being up (a missing or bad
        object, a local disk error)."""
        log.warning("%s failed on %s: %s", what, host.name, exc.message)
        if counts:
            self.db.health.record({host.name: [Outcome(False, None, exc.message, time.time())]})
        return exc

    # -- downloads -------------------------------------------------------------

    def download(self, file_hash, size, sources, dest_path):
        """Fetch a verified copy into ``dest_path`` from the first source that has one.

        :param sources: good copies as ``(host_name, url)`` pairs
        :param size: the recorded size; hosts stop writing past it, and a
            copy whose hash matches but size does not is refused without
            being marked bad (the record, not the copy, is wrong)
        :return: the :class:`Location` the bytes came from
        :raises DownloadError: if no source delivered a good copy; its
            ``failures`` list each attempt's error
        """
        plan = []
        unreachable = []
        for host_name, url in sources:
            host = self.host_for(host_name, url)
            if host is None:
                unreachable.append(host_name)
            else:
                plan.append((host, Location(host_name, url)))
        # Hosts cooling down are tried last: a slow answer beats no file.
        usable, cooling = self.ranked({h for h, _ in plan})
        order = {h.name: i for i, h in enumerate(usable + cooling)}
        plan.sort(key=lambda item: order[item[0].name])
        failures = []
        directory = os.path.dirname(os.path.abspath(dest_path))
        # Temp names start with the destination's name, which in the cache
        # starts with the session token: reconciliation knows whose they are.
        prefix = os.path.basename(dest_path) + "."
        for host, location in plan:
            fd, temp = fsutil.open_temp(directory, prefix)
            os.close(fd)
            started = time.monotonic()
            try:
                self._call(host, "download of %s" % file_hash, self.deadline(host, size),
                           host.download, location.url, temp, size,
                           cleanup=lambda temp=temp: fsutil.remove_quietly(temp))
                got_hash, got_size = fsutil.hash_file(temp)
                if got_hash != file_hash:
                    raise IntegrityError("%s sent %d bytes hashing to %s" % (
                        host.name, got_size, got_hash))
                if got_size != size:  # the right bytes: the recorded size is wrong
                    raise TransientHostError(host.name, "the copy has %d bytes but %d are "
                                             "recorded; not caching it" % (got_size, size))
                # Private, whatever mode the host's tool gave the file.
                os.chmod(temp, fsutil.FILE_MODE)
                os.replace(temp, dest_path)
            except (HostError, IntegrityError, OSError) as exc:
                fsutil.remove_quietly(temp)
                failures.append(self._download_failed(file_hash, host, location, exc))
                continue
            except Exception as exc:  # a host bug must not stop the failover
                fsutil.remove_quietly(temp)
                failures.append(self._download_failed(
                    file_hash, host, location, TransientHostError(host.name, repr(exc))))
                continue
            except BaseException:
                fsutil.remove_quietly(temp)
                raise
            self.db.health.record({host.name: [Outcome(True, (time.monotonic() - started) * 1000,
                                                       None, time.time())]}, downloaded=size)
            with self.db.transaction() as conn:
                self.db.copies.mark_verified(conn, [(file_hash, location.host_name, location.url)])
            log.info("downloaded %s from %s", file_hash, host.name)
            return location
        reason = "no host delivered a good copy of %s" % file_hash
        if unreachable:
            reason += " (no configured host can reach copies on %s)" % ", ".join(
                sorted(set(unreachable)))
        raise DownloadError(reason, failures)

    def _download_failed(self, file_hash, host, location, exc):
        if isinstance(exc, IntegrityError):
            exc = CorruptCopyError(host.name, str(exc))
        elif isinstance(exc, OSError):
            return self._failed(host, TransientHostError(host.name, "local error: %s" % exc),
                                "download of %s" % file_hash, counts=False)
        if isinstance(exc, (CorruptCopyError, HostNotFoundError)):
            self._mark_bad(file_hash, host, location, exc)
            return self._failed(host, exc, "download of %s" % file_hash, counts=False)
        return self._failed(host, exc, "download of %s" % file_hash)

    def _mark_bad(self, file_hash, host, location, exc):
        """Mark a copy bad, but only on the word of the host that recorded it.

        A host that merely accepts the URL (another node's host of the same
        kind) may be a different server holding a different set of objects.
        """
        if host.name != location.host_name:
            log.warning("%s could not serve %s recorded by %s (%s); leaving the record as it is",
                        host.name, file_hash, location.host_name, exc.message)
            return
        log.warning("the copy of %s on %s (%s) is %s; marking it bad", file_hash, host.name,
                    location.url, "missing" if isinstance(exc, HostNotFoundError) else "corrupt")
        with self.db.transaction() as conn:
            self.db.copies.mark_bad(conn, [(file_hash, location.host_name, location.url)])

    # -- checks and deletes ----------------------------------------------------

    def check(self, file_hash, size, location, deep=False, scratch=None):
        """Check one remote copy: cheaply if its host can, else by download.

        The cheap check compares the size the host reports, and the SHA-256
        when the host stores one. A deep check (or a host that cannot stat)
        downloads the copy into ``scratch`` and hashes it. Bad and missing
        copies are marked bad, so :meth:`~cloudmanager.CloudManager.sync`
        replaces them.

        :param location: the copy, a :class:`~cloudmanager.hosts.base.Location`
        :param scratch: a directory for deep checks' downloads
        :return: ``"good"``, ``"bad"``, ``"missing"``, ``"unreachable"`` (no
            configured host can reach the URL) or ``"error"`` (the host
            failed; try later)
        """
        host = self.host_for(location.host_name, location.url)
        if host is None:
            return "unreachable"
        if deep or not host.can_check:
            dest = os.path.join(scratch, file_hash)
            try:
                self.download(file_hash, size, [location], dest)
            except DownloadError as exc:
                return self._verdict(host, location, exc.failures[0] if exc.failures else None)
            finally:
                fsutil.remove_quietly(dest)
            with self.db.transaction() as conn:
                self.db.copies.mark_checked(
                    conn, [(file_hash, location.host_name, location.url, time.time(), True)])
            return "good"
        started = time.monotonic()
        try:
            info = self._call(host, "check of %s" % file_hash, self.deadline(host),
                              host.stat, location.url)
        except HostNotFoundError as exc:
            self._mark_bad(file_hash, host, location, exc)
            self._failed(host, exc, "check of %s" % file_hash, counts=False)
            return self._verdict(host, location, exc)
        except HostError as exc:
            self._failed(host, exc, "check of %s" % file_hash)
            return "error"
        self.db.health.record({host.name: [Outcome(True, (time.monotonic() - started) * 1000,
                                                   None, time.time())]})
        if info.sha256 == file_hash and info.size != size:
            log.warning("%s holds %s with %d bytes, but %d are recorded: the record is wrong, "
                        "not the copy", host.name, file_hash, info.size, size)
            return "error"
        if info.size != size or info.sha256 not in (None, file_hash):
            exc = CorruptCopyError(host.name, "%d bytes, SHA-256 %s" % (
                info.size, info.sha256 or "not stored"))
            self._mark_bad(file_hash, host, location, exc)
            return self._verdict(host, location, exc)
        with self.db.transaction() as conn:
            self.db.copies.mark_checked(conn, [(file_hash, location.host_name, location.url,
                                                time.time(), info.sha256 == file_hash)])
        return "good"

    @staticmethod
    def _verdict(host, location, failure):
        """What a failed check says of the copy; only its own host can condemn it."""
        if host.name == location.host_name:
            if isinstance(failure, HostNotFoundError):
                return "missing"
            if isinstance(failure, CorruptCopyError):
                return "bad"
        return "error"

    def reaches(self, copies):
        """Whether a configured host can fetch any of ``copies`` (``(host_name, url)`` pairs)."""
        return any(self.host_for(host_name, url) is not None for host_name, url in copies)

    def delete(self, location):
        """Delete one remote copy if a configured host can.

        :return: True if it is gone (deleted, or already missing); False if no
            configured host can delete it or the delete failed (logged)
        """
        host = self.host_for(location.host_name, location.url)
        if host is None or not host.can_delete:
            return False
        try:
            self._call(host, "delete of %s" % location.url, self.deadline(host),
                       host.delete, location.url)
        except HostError as exc:
            self._failed(host, exc, "delete of %s" % location.url)
            return False
        return True

    def close(self):
        """Wait for running transfers, then close every host."""
        self._pool.shutdown(wait=True)
        self._calls.close()
        for host in self.hosts.values():
            try:
                host.close()
            except Exception as exc:  # closing must not fail the caller
                log.debug("closing %s: %s", host.name, exc)


class _CompletionQueue:
    """Futures' results in the order they end: one queue, not a wait() over every
    future (which costs O(n) per call, O(n²) for a batch)."""

    def __init__(self):
        self._queue = queue.SimpleQueue()

    def watch(self, future, tag):
        future.add_done_callback(lambda f, tag=tag: self._queue.put((tag, f)))

    def get(self):
        return self._queue.get()


class _CallPool:
    """Long-lived daemon threads for host calls run under a deadline.

    A thread per call cost more than a small file's upload (a start and a
    join each time). Here a call goes to an idle thread if there is one, and
    to a new thread otherwise: a call the engine gave up on (a hung host)
    keeps its thread, and never makes a later call wait for one. Threads
    idle for :attr:`IDLE_SECONDS` end, so the pool shrinks back after a burst.
    """

    IDLE_SECONDS = 30.0

    def __init__(self):
        self._tasks = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a task, not yet promised one
        self._closed = False

    def submit(self, fn):
        """Run ``fn()`` on a call thread; its exceptions are the caller's to catch."""
        with self._lock:
            if self._idle:
                self._idle -= 1  # promised to this task
                self._tasks.put(fn)
                return
        threading.Thread(target=self._work, args=(fn,), name="cloudmanager-call",
                         daemon=True).start()

    def _work(self, fn):
        while fn is not None:
            try:
                fn()
            except BaseException:  # pragma: no cover - callers catch their own
                log.exception("a host call failed outside its handler")
            fn = None
            with self._lock:
                if self._closed:
                    return
                self._idle += 1
            while True:
                try:
                    fn = self._tasks.get(timeout=self.IDLE_SECONDS)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._idle:  # not promised a task: end
                            self._idle -= 1
                            return
                    # promised a task that is on its way: wait for it

    def close(self):
        """Let idle threads end (busy ones end after their call)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._tasks.put(None)
