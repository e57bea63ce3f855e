"""Integrity checks of a pool: the database against the storage directory.

:func:`check` is the whole check (``CloudManager.check()``, ``cm fsck``). It
walks the storage directory, so it costs a pass over every cached file (and
reads every byte with ``deep``). :func:`on_open` is the cheap part that
every open runs; it reads a few counters and the small reservations table,
and never walks the directory or scans the files table.

The walk never follows a symlink: shards and the temp directory are opened
with ``O_NOFOLLOW`` and read through their fds, so a link planted in the
storage directory is reported (and, with ``repair``, removed as a link)
while whatever it points at is neither read nor deleted.
"""

import hashlib
import logging
import os
import sqlite3
import stat
import time
from typing import Any, Callable, Dict, List, Optional

from . import fsutil
from .cache import CacheStore, open_dir, unlink_in
from .db import FileDatabase

log = logging.getLogger(__name__)

#: The finding kinds of :func:`check`: list-valued ones, then numbers.
LIST_FINDINGS = ("missing", "size_mismatch", "hash_mismatch", "orphans", "stale_temp",
                 "pins_without_file", "unprotected", "lost")
NUMBER_FINDINGS = ("usage_drift", "count_drift", "stale_reservations", "dead_sessions",
                   "over_capacity")

_NOFOLLOW = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


#: ``fetch(hash)``: bring a file back into the cache; true if it did.
Fetch = Callable[[str], bool]
#: ``queue(conn, hashes, when)``: queue files for upload in the caller's transaction.
QueueUploads = Callable[[sqlite3.Connection, List[str], float], None]


def check(cache: CacheStore, db: FileDatabase, repair: bool = False, deep: bool = False,
          fetch: Optional[Fetch] = None, queue: Optional[QueueUploads] = None) -> Dict[str, Any]:
    """Compare the database with the storage directory; see :meth:`CloudManager.check`.

    :param cache: the :class:`~cloudmanager.cache.CacheStore`
    :param db: the :class:`~cloudmanager.db.FileDatabase`
    :param fetch: with ``repair``, a callable that brings a file back into
        the cache (``CloudManager.warm_up``); used for pins with no file
    :param queue: with ``repair``, ``queue(conn, hashes, when)`` queues
        unprotected files for upload
        (:meth:`cloudmanager.replication.Replicator.queue`)
    :return: the report dict documented at :meth:`CloudManager.check`
    """
    # Values of every kind: flags, lists of findings, counts, the repaired dict.
    report: Dict[str, Any] = {"clean": True, "repair": bool(repair), "deep": bool(deep),
                              "files_checked": 0}
    report.update({k: [] for k in LIST_FINDINGS})
    report.update(dict.fromkeys(NUMBER_FINDINGS, 0))
    repaired = dict.fromkeys(LIST_FINDINGS + NUMBER_FINDINGS, 0)
    cache.flush()
    dead = cache.dead_sessions()
    # Under the write lock: no other process publishes or evicts mid-walk.
    with db.transaction() as conn:
        live = {owner for owner, *_ in db.sessions.all()} - set(dead)
        live_tokens = {owner.rsplit(":", 1)[-1] for owner in live} | {cache.token}
        walk = cache.layout.scan_shards(remove=repair)
        on_disk = walk.files
        report["orphans"].extend(walk.foreign)
        repaired["orphans"] += walk.removed
        temps = cache.layout.scan_temps(live_tokens.__contains__, remove=repair)
        report["stale_temp"] = temps.stale
        repaired["stale_temp"] += temps.removed
        rows = db.cache_index.cached_rows(conn)
        report["files_checked"] = len(rows)
        for file_hash, size in rows:
            seen = on_disk.pop(file_hash, None)
            if seen is None or seen[0] != size:
                report["missing" if seen is None else "size_mismatch"].append(file_hash)
                if repair:
                    db.cache_index.uncache(conn, [file_hash])
                    unlink_in(os.path.join(cache.root, file_hash[:2]), file_hash)
        for file_hash in sorted(on_disk):  # a hash-named file no cached row claims
            report["orphans"].append(os.path.join(file_hash[:2], file_hash))
            if repair:
                unlink_in(os.path.join(cache.root, file_hash[:2]), file_hash)
        for kind in ("missing", "size_mismatch"):
            repaired[kind] = len(report[kind]) if repair else 0
        repaired["orphans"] += len(on_disk) if repair else 0
        for kind in ("missing", "size_mismatch", "orphans"):
            report[kind].sort()

        (row_bytes, row_files), (total_bytes, total_files) = db.cache_index.totals(conn)
        report["usage_drift"] = total_bytes - row_bytes
        report["count_drift"] = total_files - row_files

        report["dead_sessions"] = len(dead)
        reservations = db.sessions.reservations(conn)
        stale = [rid for rid, owner, _ in reservations if owner not in live]
        report["stale_reservations"] = len(stale)
        reserved = sum(size for rid, owner, size in reservations if owner in live)

        report["pins_without_file"] = db.cache_index.pins_without_file(conn)
        damaged = set(report["missing"]) | set(report["size_mismatch"])
        now = time.time()
        unverified = db.files.unprotected(conn)  # no copy this node verified
        cached = db.cache_index.cached_among([u.hash for u in unverified], conn)
        for file_hash, copies, queued in unverified:
            if file_hash in cached and file_hash not in damaged:
                if not queued:
                    report["unprotected"].append(file_hash)
                    if repair and queue is not None:
                        queue(conn, [file_hash], now)
                        repaired["unprotected"] += 1
            elif not copies:  # claimed copies elsewhere are not lost: verify judges them
                report["lost"].append(file_hash)

        if repair:
            if dead:
                db.sessions.end(conn, dead)
                repaired["dead_sessions"] = len(dead)
            db.sessions.release(conn, stale)
            repaired["stale_reservations"] = len(stale)
            if report["usage_drift"] or report["count_drift"] or damaged:
                db.cache_index.recount(conn)
                repaired["usage_drift"] = int(bool(report["usage_drift"]))
                repaired["count_drift"] = int(bool(report["count_drift"]))
        # What the directory really holds: the cached rows whose file is right.
        held = row_bytes - sum(size for file_hash, size in rows if file_hash in damaged)
        report["over_capacity"] = max(0, held + reserved - cache.capacity)

    if repair and report["over_capacity"]:
        cache.evict(max(0, cache.capacity - reserved))
        repaired["over_capacity"] = 1
    if deep:
        _deep(cache, db, report, repair, repaired)
    if repair and fetch is not None:
        for file_hash in report["pins_without_file"]:
            if fetch(file_hash):
                repaired["pins_without_file"] += 1

    found = [k for k in LIST_FINDINGS + NUMBER_FINDINGS if report[k]]
    report["clean"] = not found
    report["repaired"] = {k: v for k, v in repaired.items() if v}
    report["unrepaired"] = [k for k in found if not repair or _left(k, report, repaired)]
    if found:
        log.warning("check of %s found: %s%s", cache.root,
                    ", ".join("%s %s" % (k, _count(report[k])) for k in found),
                    "; repaired: %s" % report["repaired"] if repair else "")
    return report


def _count(value):
    return len(value) if isinstance(value, list) else value


def _left(kind, report, repaired):
    """Whether a finding is still there after repair."""
    if kind == "lost":
        return True  # no copy anywhere: nothing to mend from
    if kind in ("usage_drift", "count_drift", "over_capacity"):
        return not repaired[kind]
    return repaired[kind] < _count(report[kind])


def _hash_nofollow(shard_path, name):
    """``(sha256, ino, mtime_ns)`` of a file read through its shard's fd, or None."""
    with open_dir(shard_path) as dfd:
        if dfd is None:
            return None
        try:
            fd = os.open(name, _NOFOLLOW, dir_fd=dfd)
        except OSError:
            return None
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        digest = hashlib.sha256()
        while True:
            chunk = f.read(fsutil.CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest(), st.st_ino, st.st_mtime_ns


def _deep(cache, db, report, repair, repaired):
    """Hash every cached file whose size was right; outside the write lock,
    so a long read does not stall other processes."""
    damaged = set(report["missing"]) | set(report["size_mismatch"])
    bad = []
    for file_hash, _ in db.cache_index.cached_rows():
        if file_hash in damaged:
            continue
        got = _hash_nofollow(os.path.join(cache.root, file_hash[:2]), file_hash)
        if got is not None and got[0] != file_hash:
            bad.append((file_hash, got[1], got[2]))
    report["hash_mismatch"] = sorted(h for h, _, _ in bad)
    if not (repair and bad):
        return
    with db.transaction() as conn:
        for file_hash, ino, mtime_ns in bad:
            shard_path = os.path.join(cache.root, file_hash[:2])
            try:  # the same file we hashed, still cached: no one replaced it meanwhile
                st = os.lstat(os.path.join(shard_path, file_hash))
            except FileNotFoundError:
                continue
            if (st.st_ino, st.st_mtime_ns) != (ino, mtime_ns) \
                    or not db.cache_index.is_cached(file_hash):
                continue
            db.cache_index.uncache(conn, [file_hash])
            unlink_in(shard_path, file_hash)
            repaired["hash_mismatch"] += 1


def on_open(cache, db):
    """The cheap part of :func:`check`, run by every open.

    It never walks the storage directory or scans the files table. It reads
    the running totals and the reservations (writes in flight, a handful of
    rows), and mends:

    - reservations whose session row is gone (nothing would ever release
      them, and they count against the capacity): released;
    - a running total below zero: recounted from the rows (a scan, but only
      when the total is already known to be wrong);
    - cached bytes over the capacity (the pool was reopened with a smaller
      one): least recently used files evicted down to it.

    Temp files and the full reconciliation after a crash are the cache's own
    open (:meth:`~cloudmanager.cache.CacheStore.reconcile`).

    :return: ``{"orphan_reservations": n, "recounted": bool, "evicted": n}``
    """
    report = {"orphan_reservations": 0, "recounted": False, "evicted": 0}
    with db.transaction() as conn:
        orphans = db.sessions.orphan_reservations(conn)
        if orphans:
            db.sessions.release(conn, orphans)
            report["orphan_reservations"] = len(orphans)
        if db.cache_index.totals_negative(conn):
            db.cache_index.recount(conn)
            report["recounted"] = True
    if cache.used_bytes() > cache.capacity:
        report["evicted"] = cache.evict(cache.capacity)
        if cache.used_bytes() > cache.capacity:
            log.warning("%s holds %d bytes, over its %d-byte capacity, and the rest is "
                        "pinned or not yet on any host", cache.root, cache.used_bytes(),
                        cache.capacity)
    if any(report.values()):
        log.info("open check of %s: %s", cache.root, report)
    return report
