"""Moving a pool between SQLite and PostgreSQL (``cloudmanager.migrate``), either way.

A pool is built with every kind of row: files cached, evicted, pinned and
queued; copies good, claimed, pending, suspect, bad, missing and deleted
(with strikes and back-off); a tombstone, a removal in progress, host health
with failures, the transfer meter of two nodes, a second node, a remembered
source, published records and the block cursor. It moves to a real PostgreSQL server and back to a new SQLite file;
after each move every catalog and cache index row is compared with the
source's, and the pool opened on the new database finds its cached files
(no download) and downloads the others.
"""

import os
import sqlite3
import time
from types import SimpleNamespace

import pytest

from cloudmanager import CloudManager
from cloudmanager.db import FileDatabase, index_path_for
from cloudmanager.db import migrate as rows
from cloudmanager.db.connection import schema_sql
from cloudmanager.db.health import Outcome
from cloudmanager.errors import DatabaseError
from cloudmanager.migrate import migrate_pool
from conftest import make_folder_roots
from helpers import sha

#: Every table's rows are compared in key order.
ORDER = {
    "files": "hash", "uploads": "hash, host_name, url", "tombstones": "hash, host_name, url",
    "removals": "hash", "upload_queue": "hash", "leases": "kind, hash",
    "host_health": "host_name", "transfers": "month, node", "nodes": "node",
    "this_node": "node", "cache_entries": "hash", "counters": "name", "sources": "path",
    "published": "hash", "pool_state": "name",
}
CATALOG = ["files", "uploads", "tombstones", "removals", "upload_queue", "leases",
           "host_health", "transfers", "nodes", "published", "pool_state"]
INDEX = ["this_node", "cache_entries", "counters", "sources"]
CAPACITY = 1 << 20


def dump(database, storage):
    """Every row of the catalog and the cache index, as plain tuples by table."""
    db = FileDatabase(database, index_path_for(database, storage))
    try:
        out = {}
        for table in CATALOG:
            out[table] = [tuple(r) for r in db.catalog.read(
                "SELECT * FROM %s ORDER BY %s" % (table, ORDER[table]))]
        for table in INDEX:
            out[table] = [tuple(r) for r in db.local.read(
                "SELECT * FROM %s ORDER BY %s" % (table, ORDER[table]))]
        return out
    finally:
        db.close()


class Pool:
    """A pool on a SQLite file with every kind of row, and what a test checks."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.hosts = ["dir:%s" % (tmp_path / "hosts" / h) for h in ("h1", "h2", "h3")]
        make_folder_roots(self.hosts)
        self.database = str(tmp_path / "pool.sqlite3")
        self.storage = str(tmp_path / "cache")
        self.data = {}

    def open(self, database=None):
        return CloudManager(database or self.database, self.storage, CAPACITY,
                            hosts=self.hosts, fsync=False)

    def file(self, name, data):
        path = self.tmp / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        self.data[sha(data)] = data
        return path

    def build(self):
        now = time.time()
        with self.open() as cm:
            self.node = cm.cache.node_id
            self.evicted = cm.upload(self.file("evicted.bin", b"evicted " * 100))
            assert cm.evict(0) == 1 and not cm.on_cache(self.evicted)
            self.cached = cm.upload(self.file("cached.bin", b"cached " * 100))
            self.pinned = cm.upload(self.file("pinned.bin", b"pinned " * 100))
            assert cm.pin(self.pinned)
            self.queued = cm.upload(self.file("queued.bin", b"queued " * 100), defer=True)
            self.condemned = cm.upload(self.file("condemned.bin", b"condemned " * 100))
            assert cm.warm_up(self.cached)  # a hit, counted
            self.claimed = "c1" * 32
            # The hosts' names (their specs) as h1, h2, h3.
            names = dict(zip(("h1", "h2", "h3"), sorted(cm.engine.hosts)))
            url = {h: {c.host_name: c.url for c in cm.db.copies.of(self.condemned)}[n]
                   for h, n in names.items()}
            db = cm.db
            assert db.records.merge([SimpleNamespace(
                hash=self.claimed, filename="claimed.bin", size=77, datetime=1000,
                uploads=[(names["h1"], "file:///elsewhere/h1/" + self.claimed, False),
                         (names["h2"], "file:///elsewhere/h2/" + self.claimed, True)])]) \
                == (1, [])
            evicted_h3 = {c.host_name: c.url for c in db.copies.of(self.evicted)}[names["h3"]]
            with db.catalog.transaction() as conn:
                db.copies.record_pending(conn, [(self.claimed, names["h3"])], int(now))
                for _ in range(2):  # bad, two strikes, looked at again later
                    db.copies.condemn(conn, [(self.condemned, names["h1"], url["h1"], "bad")],
                                      now, 60, 3600)
                db.copies.strike(conn, [(self.condemned, names["h2"], url["h2"])], now, 1,
                                 60, 3600)
                db.copies.record_deleted(conn, [(self.condemned, names["h3"], url["h3"])], now)
                db.copies.condemn(conn, [(self.evicted, names["h3"], evicted_h3, "missing")],
                                  now, 60, 3600)
                db.copies.begin_removal(conn, self.claimed, "gone-node:1:feed", now)
                db.queue.note_failure(conn, self.queued, "no host answered")
                db.published.mark_exported(conn, [self.cached], now)
                db.published.tag(conn, [self.cached, self.claimed], "block-1")
                db.state.set(conn, [("last_known_block", 2 ** 40 + 1)])
            db.health.record({names["h1"]: [Outcome(False, None, "boom", now),
                                            Outcome(False, None, "boom again", now)],
                              names["h2"]: [Outcome(True, 4.5, None, now)]}, when=now)
            db.health.record({}, uploaded=123, downloaded=45, when=now, node="other-node")
            db.leases.register_node("other-node", "elsewhere", now - 10)
            src = self.tmp / "src" / "cached.bin"
            st = src.stat()
            db.sources.remember([(str(src), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                  st.st_ino, st.st_dev, self.cached)])
        before = dump(self.database, self.storage)
        states = {r[3] for r in before["uploads"]}
        assert states == {"good", "claimed", "pending", "suspect", "bad", "missing",
                          "deleted"}, states
        assert before["tombstones"] and before["removals"] and before["upload_queue"]
        assert {r[1] for r in before["transfers"]} == {self.node, "other-node"}
        assert any(r[2] for r in before["host_health"]) and before["sources"]
        assert len(before["published"]) == 2 and before["pool_state"]
        assert not before["leases"]
        return self

    def check_open(self, database, monkeypatch, hits, fetched):
        """The pool on ``database``: the same node, the cached files ``hits``
        found with no download, ``fetched`` (not cached) downloaded from a host."""
        cm = self.open(database)
        try:
            assert cm.cache.node_id == self.node
            assert all(cm.on_cache(h) for h in hits) and not cm.on_cache(fetched)

            def no_download(*args, **kwargs):
                raise AssertionError("a cached file was downloaded")

            with monkeypatch.context() as m:
                m.setattr(cm.engine, "download", no_download)
                for file_hash in hits:
                    path = cm.warm_up(file_hash)
                    assert path == cm.cache.path_for(file_hash)
                    with open(path, "rb") as f:
                        assert f.read() == self.data[file_hash]
            out = cm.download(fetched, self.tmp / ("out-%d" % time.monotonic_ns()))
            with open(out, "rb") as f:
                assert f.read() == self.data[fetched]
            assert cm.on_cache(fetched) and cm.stats()["queued"] == 1
            cm.evict(0)  # what a host holds may go: the next check fetches one
        finally:
            cm.close()


def test_a_pool_moves_to_postgresql_and_back(tmp_path, pg_url, monkeypatch):
    pool = Pool(tmp_path).build()
    before = dump(pool.database, pool.storage)

    report = migrate_pool(pool.database, pool.storage, pg_url, batch=2)
    assert report["rows"]["files"] == len(before["files"]) == 6
    assert report["rows"]["uploads"] == len(before["uploads"])
    assert report["recounted"] == 0
    assert report["index"] == pool.storage + ".index.sqlite3"
    on_server = dump(pg_url, pool.storage)
    assert on_server == dict(before)
    pool.check_open(pg_url, monkeypatch, [pool.cached, pool.pinned, pool.queued,
                                          pool.condemned], pool.evicted)

    # ...and back, into a new SQLite file, from the pool as it is now.
    before = dump(pg_url, pool.storage)
    back = str(tmp_path / "back" / "pool.sqlite3")
    report = migrate_pool(pg_url, pool.storage, back, batch=3)
    assert report["index"] == back and report["destination"] == back
    assert dump(back, pool.storage) == before
    pool.check_open(back, monkeypatch, [pool.pinned, pool.queued, pool.condemned],
                    pool.cached)
    # The old databases are left as they were.
    assert dump(pool.database, pool.storage)["files"] == before["files"]


def test_sqlite_to_sqlite_and_the_batches_of_a_larger_table(tmp_path):
    db = FileDatabase(tmp_path / "a.sqlite3")
    hashes = ["%064x" % i for i in range(23)]
    with db.catalog.transaction() as conn:
        db.files.insert(conn, [(h, "f", 1, 1) for h in hashes])
        for host in ("h1", "h2", "h3"):
            db.copies.record_good(conn, [(h, host, "u:" + h) for h in hashes], when=5)
    with db.catalog.transaction() as conn:
        got = [r for batch in rows.batches(conn, rows.CATALOG_TABLES[1], 4) for r in batch]
    assert len(got) == 69 and got == sorted(got) and len(set(got)) == 69
    db.close()
    report = migrate_pool(tmp_path / "a.sqlite3", tmp_path / "cache", tmp_path / "b.sqlite3",
                          batch=4)
    assert report["rows"]["uploads"] == 69 and report["index"] == str(tmp_path / "b.sqlite3")
    assert dump(str(tmp_path / "b.sqlite3"), tmp_path / "cache") == \
        dump(str(tmp_path / "a.sqlite3"), tmp_path / "cache")


def test_the_copied_tables_are_the_schemas_tables(tmp_path):
    """Every table of schema.sql is copied (with each of its columns) or named
    as not copied: a new column or table cannot be forgotten silently."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(schema_sql())
    tables = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    copied = rows.CATALOG_TABLES + rows.INDEX_TABLES + (rows.COUNTERS,)
    assert tables == {t.name for t in copied} | set(rows.NOT_COPIED)
    for table in copied:
        assert table.columns == tuple(r[1] for r in conn.execute(
            "PRAGMA table_info(%s)" % table.name)), table.name
        keys = sorted((r[5], r[1]) for r in conn.execute(
            "PRAGMA table_info(%s)" % table.name) if r[5])
        assert table.key == tuple(name for _, name in keys), table.name


def test_drifted_copy_counts_are_recounted(tmp_path, pg_url):
    pool = Pool(tmp_path)
    with pool.open() as cm:
        digest = cm.upload(pool.file("a", b"a" * 10))
        with cm.db.catalog.transaction() as conn:
            conn.execute("UPDATE files SET copies = 7 WHERE hash = ?", (digest,))
    report = migrate_pool(pool.database, pool.storage, pg_url)
    assert report["recounted"] == 1
    on_server = FileDatabase(pg_url, index_path_for(pg_url, pool.storage))
    try:
        assert (on_server.files.get(digest).copies, on_server.files.get(digest).verified) == \
            (3, 3)
    finally:
        on_server.close()


# -- refusals --------------------------------------------------------------------------


def small_pool(tmp_path):
    pool = Pool(tmp_path)
    with pool.open() as cm:
        pool.digest = cm.upload(pool.file("a", b"a" * 10))
    return pool


def test_a_destination_that_is_not_empty_is_refused(tmp_path, postgres_server):
    pool = small_pool(tmp_path)
    url = postgres_server.new_database()
    migrate_pool(pool.database, pool.storage, url)
    # The catalog on the server holds the pool now: refused, nothing changed.
    before = dump(url, pool.storage)
    with pytest.raises(DatabaseError, match="not empty.*files"):
        migrate_pool(pool.database, pool.storage, url)
    assert dump(url, pool.storage) == before
    # An empty catalog, but this storage directory's index file is taken.
    other = postgres_server.new_database()
    with pytest.raises(DatabaseError, match="already holds a cache index"):
        migrate_pool(pool.database, pool.storage, other)
    assert dump(url, pool.storage) == before
    # A SQLite pool with rows, and a SQLite file that is not cloudmanager's.
    taken = small_pool(tmp_path / "other")
    with pytest.raises(DatabaseError, match="not empty"):
        migrate_pool(url, pool.storage, taken.database)
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE mine (x)")
    with pytest.raises(DatabaseError, match="not cloudmanager's"):
        migrate_pool(url, pool.storage, foreign)
    with sqlite3.connect(foreign) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["mine"]
    with pytest.raises(DatabaseError, match="own database"):
        migrate_pool(pool.database, pool.storage, pool.database)


def test_an_empty_cloudmanager_database_is_a_fine_destination(tmp_path):
    pool = small_pool(tmp_path)
    FileDatabase(tmp_path / "made.sqlite3").close()  # as cm_setup_db makes one
    migrate_pool(pool.database, pool.storage, tmp_path / "made.sqlite3")
    assert dump(str(tmp_path / "made.sqlite3"), pool.storage) == \
        dump(pool.database, pool.storage)


def test_a_pool_in_use_is_not_moved(tmp_path, pg_url):
    pool = small_pool(tmp_path)
    target = tmp_path / "new.sqlite3"
    with pool.open():
        with pytest.raises(DatabaseError, match=r"open in another process \(pid %d\)"
                           % os.getpid()):
            migrate_pool(pool.database, pool.storage, target)
    assert not target.exists()  # made for the move, gone with it
    # A lease some process holds on work (maybe another node): refused too.
    with pool.open() as cm:
        with cm.db.catalog.transaction() as conn:
            cm.db.leases.take(conn, "verify", [pool.digest], "elsewhere:1:ab",
                              time.time() + 600, time.time())
    with pytest.raises(DatabaseError, match="leased"):
        migrate_pool(pool.database, pool.storage, target)
    assert not target.exists()
    # No pool there at all.
    with pytest.raises(DatabaseError, match="no pool database"):
        migrate_pool(tmp_path / "nothing.sqlite3", pool.storage, target)
    with pytest.raises(DatabaseError, match="no cache index"):
        migrate_pool(pg_url, tmp_path / "elsewhere", target)


def test_a_failed_move_leaves_the_destination_as_it_was(tmp_path, pg_url, monkeypatch):
    """A catalog whose commit fails after the index file's committed: the
    index is emptied again, so the move can simply be run again."""
    from cloudmanager.db.connection import Database

    pool = small_pool(tmp_path)
    index = index_path_for(pg_url, pool.storage)
    Database(index, with_catalog=False).close()  # there already, empty
    original = rows.count_differences

    def break_the_commit(source, destination, batch):
        # A copy of a file that is not there, its check deferred to the commit.
        destination.execute("PRAGMA defer_foreign_keys = ON")
        destination.execute("INSERT INTO uploads (hash, host_name, url, state, time)"
                            " VALUES (?, 'h9', 'x', 'good', 1)", ("f" * 64,))
        return original(source, destination, batch)

    monkeypatch.setattr(rows, "count_differences", break_the_commit)
    with pytest.raises(DatabaseError, match="commit"):
        migrate_pool(pool.database, pool.storage, pg_url)
    monkeypatch.undo()
    emptied = Database(index, with_catalog=False)
    try:
        assert rows.index_is_empty(emptied.connection)
    finally:
        emptied.close()
    report = migrate_pool(pool.database, pool.storage, pg_url)
    assert report["rows"]["files"] == 1
    assert dump(pg_url, pool.storage) == dump(pool.database, pool.storage)
