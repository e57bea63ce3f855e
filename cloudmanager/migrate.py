"""Moving a pool between SQLite and PostgreSQL, either way: ``cm migrate``.

:func:`migrate_pool` copies a pool's catalog (every file with its counts,
every copy in its state with its checks and back-off, tombstones, removals,
the upload queue, host health, the transfer meter per node, the nodes) and
this node's cache index (its entries, running totals, remembered sources
and its node id) into an empty database:

- SQLite → PostgreSQL: the catalog goes to the server; the cache index to a
  new local file beside the storage directory, ``STORAGE.index.sqlite3``
  (:func:`~cloudmanager.db.index_path_for`);
- PostgreSQL → SQLite: both go into the new SQLite file;
- SQLite → SQLite and PostgreSQL → PostgreSQL work too (a copy; the latter
  leaves the node's cache index where it is).

The cached files stay where they are: the storage directory is not touched,
and the pool opened on the new database finds them cached. The old database
is not changed either, so going back is a matter of the config.

**The pool must be idle.** The copy holds the old catalog's write lock from
start to end, so nothing changes it meanwhile, and a move is refused while
another process of this machine has the pool open (its session in the
cache index) or some process holds a work lease in the catalog. On a
catalog several nodes share, the other nodes' sessions are in their own
cache indexes, out of sight: stop them first.

What is not copied: work leases, sessions and reservations (see
:mod:`cloudmanager.db.migrate`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from typing import Any, Dict, Union

from .cache.fsck import pid_alive, process_start
from .db import FileDatabase, index_path_for, is_postgres_url, redact
from .db import migrate as pool_rows
from .errors import DatabaseError

log = logging.getLogger(__name__)


def shown(database: str) -> str:
    """A database as it may be shown: a URL without its password."""
    return redact(database) if is_postgres_url(database) else database


def migrate_pool(database: Union[str, os.PathLike[str]], storage: Union[str, os.PathLike[str]],
                 destination: Union[str, os.PathLike[str]],
                 batch: int = pool_rows.BATCH) -> Dict[str, Any]:
    """Copy a pool's catalog and this node's cache index into an empty database.

    See the module's docstring for what goes where. Everything is written
    in one transaction on the destination's catalog (and one on its cache
    index file, committed just before); if the move fails, nothing of it
    stays there. The source is only read.

    :param database: the pool's database now: a SQLite file or a
        ``postgresql://`` URL (``[pool] database``)
    :param storage: the pool's storage directory (``[pool] storage``)
    :param destination: the new database: a SQLite file (absent, or a
        cloudmanager database with no rows) or a ``postgresql://`` URL of a
        database that is empty or holds an empty cloudmanager catalog
    :param batch: rows per read and per write
    :return: ``{"source", "destination"}`` (as they may be shown: no
        password), ``"index"`` (the file the cache index went to, or None
        when it stayed where it was), ``"rows"`` (``{table: rows copied}``)
        and ``"recounted"`` (files whose copy counts the destination's
        triggers computed otherwise than the source had them: 0 unless the
        source had drifted)
    :raises DatabaseError: if the pool is in use, the destination is not
        empty (or is the source), or a database cannot be read or written
    """
    database, storage = os.fspath(database), os.fspath(storage)
    destination = os.fspath(destination)
    if not is_postgres_url(database):
        database = os.path.abspath(database)
        if not os.path.isfile(database):
            raise DatabaseError("there is no pool database at %s" % database)
    if not is_postgres_url(destination):
        destination = os.path.abspath(destination)
    source_index = index_path_for(database, storage)
    dest_index = index_path_for(destination, storage)
    if _same(destination, database):
        raise DatabaseError("the destination is the pool's own database (%s)"
                            % shown(database))
    if source_index is not None and not os.path.isfile(source_index):
        raise DatabaseError("there is no cache index at %s: is the storage directory right?"
                            % source_index)
    # This node's cache index goes into the new SQLite file, or a file beside
    # the storage directory; between two servers it stays where it is.
    local_target = destination if dest_index is None else dest_index
    copy_index = not _same(local_target, source_index or database)
    new_files = [p for p in [local_target] if copy_index and not os.path.exists(p)]
    if copy_index:
        _check_local_file(local_target, "pool" if dest_index is None else "index")

    source = FileDatabase(database, source_index)
    try:
        try:
            target = FileDatabase(destination, dest_index)
            try:
                report = _copy(source, target, copy_index, batch)
            finally:
                target.close()
        except BaseException:
            for path in new_files:  # made by this move: gone with it
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        os.unlink(path + suffix)
            raise
    finally:
        source.close()
    report.update(source=shown(database), destination=shown(destination),
                  index=local_target if copy_index else None)
    log.info("moved the pool from %s to %s: %s", report["source"], report["destination"],
             ", ".join("%d %s" % (n, t) for t, n in report["rows"].items()))
    return report


def _same(a: str, b: str) -> bool:
    """Whether two databases are one: the same URL, or the same file."""
    if is_postgres_url(a) or is_postgres_url(b):
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def _check_local_file(path: str, kind: str) -> None:
    """Refuse a SQLite file that is there and is not an empty database of
    ``kind`` (``"pool"`` or ``"index"``) to be: opening someone else's
    database would add cloudmanager's schema to it."""
    try:
        found = pool_rows.sqlite_contents(path)
    except (sqlite3.Error, OSError) as exc:
        raise DatabaseError("cannot use %s: %s" % (path, exc)) from exc
    if found not in (None, kind):
        what = {"pool": "a pool database", "index": "a node's cache index alone"}.get(
            found or "", "a database that is not cloudmanager's")
        raise DatabaseError("%s is %s; refusing to write into it" % (path, what))


def _refuse_if_in_use(source: FileDatabase, catalog: Any) -> None:
    """Refuse while a process of this machine has the pool open, or some
    process holds work leases in its catalog (read in the move's transaction)."""
    here = os.uname().nodename  # as the cache names its node (CacheStore.node)
    for _, node, pid, started in source.sessions.all():
        if node == here and not (pid_alive(pid) and started == process_start(pid)):
            continue  # a process that died: its session is ended at the next open
        where = "pid %d" % pid if node == here else "pid %d on %s" % (pid, node)
        raise DatabaseError("the pool is open in another process (%s): close it first, "
                            "the pool must be idle while it moves" % where)
    leases = pool_rows.live_leases(catalog, time.time())
    if leases:
        raise DatabaseError("%d pieces of work are leased in the catalog (by %s, until %s): "
                            "stop every process and node using the pool first"
                            % (len(leases), leases[0][2],
                               time.strftime("%H:%M:%S", time.localtime(leases[0][3]))))


def _copy(source: FileDatabase, target: FileDatabase, copy_index: bool,
          batch: int) -> Dict[str, Any]:
    copied: Dict[str, int] = {}
    # The source's write lock, on both its parts, for the whole copy: nothing
    # changes the pool meanwhile (its readers go on).
    with source.both() as (src_catalog, src_local):
        _refuse_if_in_use(source, src_catalog)
        index_committed = False
        try:
            with contextlib.ExitStack() as stack:
                dst_catalog: Any = stack.enter_context(target.catalog.transaction())
                # Entered second, so it commits first (see index_committed).
                dst_local = stack.enter_context(target.local.transaction()) if copy_index \
                    else None
                full = pool_rows.nonempty(dst_catalog, pool_rows.CATALOG_TABLES)
                if full:
                    raise DatabaseError("%s is not empty (it has %s): a pool moves only into "
                                        "an empty database" % (target.path, ", ".join(full)))
                if dst_local is not None and not pool_rows.index_is_empty(dst_local):
                    raise DatabaseError("%s already holds a cache index (an earlier move's?): "
                                        "move it away first" % target.local.path)
                for table in pool_rows.CATALOG_TABLES:
                    copied[table.name] = pool_rows.copy_table(src_catalog, dst_catalog, table,
                                                         batch)
                pool_rows.recount_copies(dst_catalog)
                differ = pool_rows.count_differences(src_catalog, dst_catalog, batch)
                if differ:
                    log.warning("%d files had copy counts that disagree with their copies "
                                "(%s first); the new catalog has them recounted",
                                len(differ), differ[0])
                if dst_local is not None:
                    for table in pool_rows.INDEX_TABLES:
                        copied[table.name] = pool_rows.copy_table(src_local, dst_local, table,
                                                             batch)
                    pool_rows.copy_counters(src_local, dst_local)
                # The index's transaction (a file apart) commits as this
                # block ends, just before the catalog's.
                index_committed = copy_index and target.shared
        except BaseException:
            if index_committed:
                # The index committed, the catalog did not: empty the index
                # again, so the move can be run again as it was.
                with contextlib.suppress(DatabaseError):
                    with target.local.transaction() as conn:
                        pool_rows.clear_index(conn)
            raise
    return {"rows": copied, "recounted": len(differ)}
