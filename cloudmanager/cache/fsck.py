"""Repair: the storage directory and the cache index brought back into agreement.

Three entry points, one walk:

- :func:`reconcile`, run by the cache's own open (:class:`CacheStore`):
  removes the temp files of sessions that no longer run and, after a crash
  or on a new database, compares the whole directory with the index and
  mends it;
- :func:`on_open`, the pool's cheap open-time pass: it reads a few
  counters and the small reservations table, and never walks the directory
  or scans the files table;
- :func:`check`, the whole check (``CloudManager.check()``, ``cm fsck``):
  it reports every finding and, with ``repair``, mends what it can.

A full reconcile is a check with repair that reports counts: both walk the
shards with :meth:`Layout.scan_shards <cloudmanager.cache.layout.Layout.scan_shards>`
and compare the walk with the cached rows in :func:`_compare`, under the
database's write lock, so no other process publishes or evicts meanwhile.

The walks never follow a symlink (see :mod:`~cloudmanager.cache.layout`):
a link planted in the storage directory is reported (and, with repair,
removed as a link) while whatever it points at is neither read nor deleted.
A temp file is removed only when the session its name starts with is not
running: a dead session on this machine, never another live process's.
"""

import logging
import os
import sqlite3
import stat
import time
from typing import (
    TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Set, Tuple,
)

from .. import fsutil
from ..db import FileDatabase
from .layout import relpath

if TYPE_CHECKING:
    from .store import CacheStore

log = logging.getLogger(__name__)

#: The finding kinds of :func:`check`: list-valued ones, then numbers.
LIST_FINDINGS = ("missing", "size_mismatch", "hash_mismatch", "orphans", "stale_temp",
                 "pins_without_file", "unprotected", "lost")
NUMBER_FINDINGS = ("usage_drift", "count_drift", "stale_reservations", "dead_sessions",
                   "over_capacity")

#: ``fetch(hash)``: bring a file back into the cache; true if it did.
Fetch = Callable[[str], bool]


class QueueUploads(Protocol):
    """``queue(conn, hashes, when, lease=False)``: queue files for upload in the
    caller's catalog transaction (:meth:`cloudmanager.replication.Replicator.queue`)."""

    def __call__(self, conn: Any, hashes: List[str], when: float, lease: bool = False) -> None:
        ...


# -- sessions ------------------------------------------------------------------------


def process_start(pid: int) -> str:
    """When a process started, as the kernel tells it (Linux); '' elsewhere.

    With the pid, it tells a live session from a dead one whose pid was reused.
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            # Field 22, counted after the parenthesized command name.
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_sessions(cache: "CacheStore") -> List[str]:
    """Owners of sessions on this machine whose process no longer runs.

    Sessions of other machines sharing the directory count as running: a
    pid cannot be checked from here.
    """
    dead = []
    for owner, node, pid, proc_start in cache.db.sessions.all():
        if node != cache.node:
            continue  # another machine sharing the directory: cannot tell
        if pid == os.getpid() and proc_start == cache.proc_start:
            continue  # this process (another instance, or this one)
        if not pid_alive(pid) or proc_start != process_start(pid):
            dead.append(owner)
    return dead


def _live_tokens(cache: "CacheStore", owners: List[str]) -> Set[str]:
    """The tokens of running sessions' temp files: those of ``owners``
    (``node:pid:token``) and this store's own."""
    return {owner.rsplit(":", 1)[-1] for owner in owners} | {cache.token}


# -- the one walk -------------------------------------------------------------------


class _Comparison(NamedTuple):
    """The shards compared with the cached rows."""

    rows: List[Tuple[str, int]]  # the cached rows: (hash, size)
    missing: List[str]  # cached rows with no file
    size_mismatch: List[str]  # cached rows whose file has another size
    orphans: List[str]  # relative paths of what no cached row claims
    orphans_removed: int


def _compare(cache: "CacheStore", conn: sqlite3.Connection, repair: bool) -> _Comparison:
    """Walk the shards and compare them with the cached rows; with ``repair``,
    mend the directory and the rows to agree. Inside the caller's write
    transaction, so no other process publishes or evicts meanwhile.

    Mending: what does not belong in a shard is removed (symlinks as links),
    a file no cached row claims is removed, and a cached row whose file is
    missing or of another size is marked not cached (and its file removed).
    """
    layout, db = cache.layout, cache.db
    walk = layout.scan_shards(remove=repair)
    on_disk = walk.files
    rows = db.cache_index.cached_rows(conn)
    missing, resized = [], []
    for file_hash, size in rows:
        seen = on_disk.pop(file_hash, None)
        if seen is None:
            missing.append(file_hash)
        elif seen.size != size:
            resized.append(file_hash)
    orphans = walk.foreign + [relpath(h) for h in on_disk]  # hash-named, no cached row
    removed = walk.removed
    if repair:
        damaged = missing + resized
        db.cache_index.uncache(conn, damaged)
        for file_hash in damaged + list(on_disk):
            layout.unlink(file_hash)
        removed += len(on_disk)
    return _Comparison(rows, sorted(missing), sorted(resized), sorted(orphans), removed)


# -- at open ------------------------------------------------------------------------------


def reconcile(cache: "CacheStore", full: Optional[bool] = None) -> Dict[str, Any]:
    """Bring the directory and the database back into agreement (the cache's open).

    Always: remove temp files left by sessions that no longer run, and end
    those sessions. When ``full`` (or, with ``full=None``, when a session
    died without closing or the database is new): walk the shards under the
    write lock, remove orphan, misplaced and foreign entries (symlinks are
    removed, never followed), mark rows whose file is missing or the wrong
    size as not cached, and recount the usage totals.

    :param cache: the :class:`~cloudmanager.cache.CacheStore`
    :return: ``{"temp_removed", "orphans_removed", "missing_marked",
        "dead_sessions": n, "full": bool}``
    """
    db = cache.db
    dead = dead_sessions(cache)
    live = _live_tokens(cache, [s.owner for s in db.sessions.all() if s.owner not in dead])
    report: Dict[str, Any] = {"temp_removed": 0, "orphans_removed": 0, "missing_marked": 0,
                              "dead_sessions": len(dead), "full": False}
    report["temp_removed"] = cache.layout.scan_temps(live.__contains__, remove=True).removed
    if full is None:
        # A new (or emptied) index beside a directory that holds files.
        full = bool(dead) or not db.cache_index.counter("cached_files") \
            and cache.layout.has_any_file()
    if full:
        with db.local.transaction() as conn:
            found = _compare(cache, conn, repair=True)
            db.cache_index.recount(conn)
        report.update(full=True, orphans_removed=found.orphans_removed,
                      missing_marked=len(found.missing) + len(found.size_mismatch))
    if dead:
        with db.local.transaction() as conn:
            db.sessions.end(conn, dead)
    if any(report[k] for k in ("temp_removed", "orphans_removed", "missing_marked")):
        log.info("reconciled %s: %s", cache.root, report)
    return report


def on_open(cache: "CacheStore", db: FileDatabase) -> Dict[str, Any]:
    """The cheap part of :func:`check`, run by every open of a pool.

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
    open (:func:`reconcile`).

    :return: ``{"orphan_reservations": n, "recounted": bool, "evicted": n}``
    """
    report: Dict[str, Any] = {"orphan_reservations": 0, "recounted": False, "evicted": 0}
    with db.local.transaction() as conn:
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


# -- the whole check -------------------------------------------------------------------


def check(cache: "CacheStore", db: FileDatabase, repair: bool = False, deep: bool = False,
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
    #: ``{node: [hash]}``: files no host holds yet that another node's cache
    #: holds, queued there (not a finding: that node uploads them).
    report["pending_elsewhere"] = {}
    repaired = dict.fromkeys(LIST_FINDINGS + NUMBER_FINDINGS, 0)
    cache.flush()
    dead = dead_sessions(cache)
    to_queue: List[str] = []
    # Under the write lock: no other process publishes or evicts mid-walk.
    # The cache index's lock only: a catalog on a server is read as committed.
    with db.local.transaction() as conn:
        live = {s.owner for s in db.sessions.all()} - set(dead)
        found = _compare(cache, conn, repair)
        temps = cache.layout.scan_temps(_live_tokens(cache, list(live)).__contains__,
                                        remove=repair)
        rows = found.rows
        report["files_checked"] = len(rows)
        report.update(missing=found.missing, size_mismatch=found.size_mismatch,
                      orphans=found.orphans, stale_temp=temps.stale)
        if repair:
            repaired.update(missing=len(found.missing), size_mismatch=len(found.size_mismatch),
                            orphans=found.orphans_removed, stale_temp=temps.removed)

        (row_bytes, row_files), (total_bytes, total_files) = db.cache_index.totals(conn)
        report["usage_drift"] = total_bytes - row_bytes
        report["count_drift"] = total_files - row_files

        report["dead_sessions"] = len(dead)
        reservations = db.sessions.reservations(conn)
        stale = [rid for rid, owner, _ in reservations if owner not in live]
        report["stale_reservations"] = len(stale)
        reserved = sum(size for rid, owner, size in reservations if owner in live)

        report["pins_without_file"] = db.cache_index.pins_without_file(conn)
        damaged = set(found.missing) | set(found.size_mismatch)
        now = time.time()
        unverified = db.files.unprotected(None if db.shared else conn)  # no good copy
        cached = db.cache_index.cached_among([u.hash for u in unverified], conn)
        node = cache.node_id
        for file_hash, copies, queued, queued_on in unverified:
            if file_hash in cached and file_hash not in damaged:
                if not queued:
                    report["unprotected"].append(file_hash)
                    if repair and queue is not None:
                        to_queue.append(file_hash)
            elif copies:  # claimed copies elsewhere are not lost: verify judges them
                continue
            elif queued and queued_on not in ("", node):
                # Another node's cache holds it until a host does: pending there.
                report["pending_elsewhere"].setdefault(queued_on, []).append(file_hash)
            else:
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
    if to_queue and queue is not None:
        with db.catalog.transaction() as catalog_conn:
            queue(catalog_conn, to_queue, now)
        repaired["unprotected"] += len(to_queue)

    if repair and report["over_capacity"]:
        cache.evict(max(0, cache.capacity - reserved))
        repaired["over_capacity"] = 1
    if deep:
        _deep(cache, db, report, repair, repaired)
    if repair and fetch is not None:
        for file_hash in report["pins_without_file"]:
            if fetch(file_hash):
                repaired["pins_without_file"] += 1

    kinds = [k for k in LIST_FINDINGS + NUMBER_FINDINGS if report[k]]
    report["clean"] = not kinds
    report["repaired"] = {k: v for k, v in repaired.items() if v}
    report["unrepaired"] = [k for k in kinds if not repair or _left(k, report, repaired)]
    if kinds:
        log.warning("check of %s found: %s%s", cache.root,
                    ", ".join("%s %s" % (k, _count(report[k])) for k in kinds),
                    "; repaired: %s" % report["repaired"] if repair else "")
    return report


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else value


def _left(kind: str, report: Dict[str, Any], repaired: Dict[str, int]) -> bool:
    """Whether a finding is still there after repair."""
    if kind == "lost":
        return True  # no copy anywhere: nothing to mend from
    if kind in ("usage_drift", "count_drift", "over_capacity"):
        return not repaired[kind]
    return repaired[kind] < _count(report[kind])


def _hash_cached(cache: "CacheStore", file_hash: str) -> Optional[Tuple[str, int, int]]:
    """``(sha256, ino, mtime_ns)`` of a cached file read without following a
    symlink, or None if there is no regular file to read."""
    with cache.layout.open_cached(file_hash) as fd:
        if fd is None:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        digest = fsutil.sha256()
        while True:
            chunk = os.read(fd, fsutil.CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest(), st.st_ino, st.st_mtime_ns


def _deep(cache: "CacheStore", db: FileDatabase, report: Dict[str, Any], repair: bool,
          repaired: Dict[str, int]) -> None:
    """Hash every cached file whose size was right; outside the write lock,
    so a long read does not stall other processes."""
    damaged = set(report["missing"]) | set(report["size_mismatch"])
    bad = []
    for file_hash, _ in db.cache_index.cached_rows():
        if file_hash in damaged:
            continue
        got = _hash_cached(cache, file_hash)
        if got is not None and got[0] != file_hash:
            bad.append((file_hash, got[1], got[2]))
    report["hash_mismatch"] = sorted(h for h, _, _ in bad)
    if not (repair and bad):
        return
    with db.local.transaction() as conn:
        for file_hash, ino, mtime_ns in bad:
            # The same file we hashed, still cached: no one replaced it meanwhile.
            now = cache.layout.file_stat(file_hash)
            if now is None or (now.ino, now.mtime_ns) != (ino, mtime_ns) \
                    or not db.cache_index.is_cached(file_hash):
                continue
            db.cache_index.uncache(conn, [file_hash])
            cache.layout.unlink(file_hash)
            repaired["hash_mismatch"] += 1
