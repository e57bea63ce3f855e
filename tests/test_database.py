"""FileDatabase on real SQLite files: schema, triggers, eviction order, merges,
connections, transactions and the busy retry."""

import logging
import sqlite3
import threading
import time

import pytest

from cloudmanager.db import connection as database
from cloudmanager.db import FileDatabase, month_key
from cloudmanager.db.copies import CopyRow
from cloudmanager.db.health import Outcome
from cloudmanager.errors import DatabaseError
from cloudmanager.serializers import Record

H = ["%064x" % (i + 1) for i in range(8)]


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "pool.sqlite3"


@pytest.fixture
def opened(db_path):
    """Factory of FileDatabase instances, all closed at teardown."""
    made = []

    def open_db(path=db_path):
        db = FileDatabase(path)
        made.append(db)
        return db

    yield open_db
    for db in made:
        db.close()


@pytest.fixture
def db(opened):
    return opened()


def raw(path):
    return sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)


def add(db, file_hash, size=10, created=1000, filename="f"):
    with db.transaction() as conn:
        assert db.files.add(conn, file_hash, filename, size, created) == "new"


def mark_bad(db, file_hash, host, url):
    with db.transaction() as conn:
        db.copies.condemn(conn, [(file_hash, host, url, "bad")], 3000, 60, 3600)


def add_transfer(db, uploaded=0, downloaded=0, when=None):
    db.health.record({}, uploaded=uploaded, downloaded=downloaded, when=when)


def host_result(db, host_name, ok, latency_ms=None, error=None):
    db.health.record({host_name: [Outcome(ok, latency_ms, error, time.time())]})


def upload(db, file_hash, host, url, when=2000):
    with db.transaction() as conn:
        db.copies.record_good(conn, [(file_hash, host, url)], when)


# -- schema ---------------------------------------------------------------------


def test_new_database_gets_schema_in_wal_mode(db, db_path):
    assert db.schema_version() == database.SCHEMA_VERSION
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == database.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"files", "uploads", "counters", "reservations", "upload_queue",
                "host_health", "transfers", "sessions"} <= tables
    finally:
        conn.close()
    assert db.cache_index.counter("cached_bytes") == 0 and db.cache_index.counter("hits") == 0


def test_ensure_schema_is_idempotent(opened, db_path):
    db = opened()
    add(db, H[0], size=5)
    assert db.ensure_schema() == database.SCHEMA_VERSION
    assert db.ensure_schema() == database.SCHEMA_VERSION
    db.close()
    db2 = opened()  # reopening runs ensure_schema once more
    assert db2.schema_version() == database.SCHEMA_VERSION
    assert db2.files.get(H[0]).size == 5
    conn = raw(db_path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM counters ORDER BY name")]
    finally:
        conn.close()
    assert names == ["cached_bytes", "cached_files", "hits", "misses"]


def test_newer_schema_version_is_refused(db_path):
    conn = raw(db_path)
    conn.execute("PRAGMA user_version = %d" % (database.SCHEMA_VERSION + 1))
    conn.close()
    with pytest.raises(DatabaseError, match="schema version"):
        FileDatabase(db_path)


def _foreign_db(path):
    conn = raw(path)
    conn.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, blob TEXT)")
    conn.execute("INSERT INTO files (blob) VALUES ('theirs')")
    conn.close()


def test_foreign_files_table_is_refused(db_path):
    _foreign_db(db_path)
    with pytest.raises(DatabaseError, match="refusing"):
        FileDatabase(db_path)
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        assert conn.execute("SELECT blob FROM files").fetchall() == [("theirs",)]
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'uploads'"
                            ).fetchone()[0] == 0
    finally:
        conn.close()


def test_refused_foreign_database_keeps_its_journal_mode(db_path):
    _foreign_db(db_path)
    with pytest.raises(DatabaseError):
        FileDatabase(db_path)
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        conn.close()


NOW = database.SCHEMA_VERSION
NEXT = NOW + 1


def test_migration_runs_exactly_once(opened, db_path, monkeypatch):
    db = opened()
    add(db, H[0])
    db.close()
    monkeypatch.setattr(database, "SCHEMA_VERSION", NEXT)
    monkeypatch.setattr(database, "MIGRATIONS", {
        **database.MIGRATIONS, NOW: "ALTER TABLE files ADD COLUMN note TEXT NOT NULL DEFAULT 'migrated';"
           " PRAGMA user_version = %d;" % NEXT})
    db = opened()  # runs the migration; a second ALTER would fail on the duplicate column
    assert db.schema_version() == NEXT
    assert db.ensure_schema() == NEXT
    db.close()
    db = opened()
    assert db.schema_version() == NEXT
    conn = raw(db_path)
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(files)")]
        assert cols.count("note") == 1
        assert conn.execute("SELECT note FROM files WHERE hash = ?", (H[0],)).fetchone() == (
            "migrated",)
    finally:
        conn.close()


def test_new_database_is_created_then_migrated(opened, db_path, monkeypatch):
    monkeypatch.setattr(database, "SCHEMA_VERSION", NEXT)
    monkeypatch.setattr(database, "MIGRATIONS", {
        **database.MIGRATIONS, NOW: "ALTER TABLE files ADD COLUMN note TEXT; PRAGMA user_version = %d;" % NEXT})
    db = opened()
    assert db.schema_version() == NEXT
    conn = raw(db_path)
    try:
        assert "note" in [r[1] for r in conn.execute("PRAGMA table_info(files)")]
    finally:
        conn.close()


def test_failed_migration_is_atomic(opened, db_path, monkeypatch):
    opened().close()
    monkeypatch.setattr(database, "SCHEMA_VERSION", NEXT)
    monkeypatch.setattr(database, "MIGRATIONS", {
        **database.MIGRATIONS, NOW: "ALTER TABLE files ADD COLUMN note TEXT; NOT VALID SQL; PRAGMA user_version = %d;" % NEXT})
    with pytest.raises(DatabaseError, match="schema change failed"):
        opened()
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == NOW
        assert "note" not in [r[1] for r in conn.execute("PRAGMA table_info(files)")]
    finally:
        conn.close()


# -- running totals and triggers -------------------------------------------------------


def test_cache_counters_follow_insert_update_delete(db):
    with db.transaction() as conn:
        db.cache_index.put(conn, [(H[2], 7, False)], 1.0, new=True)  # a new cached row
        db.cache_index.pin(conn, H[1], 30, True)  # pinned, not cached: not counted
    assert (db.cache_index.counter("cached_bytes"), db.cache_index.counter("cached_files")) == (7, 1)
    with db.transaction() as conn:
        db.cache_index.put(conn, [(H[0], 100, False)], 5.0)
        db.cache_index.put(conn, [(H[1], 30, False)], 6.0)
        db.cache_index.put(conn, [(H[0], 100, False)], 9.0)  # already cached: not counted twice
    assert (db.cache_index.counter("cached_bytes"), db.cache_index.counter("cached_files")) == (137, 3)
    with db.transaction() as conn:
        db.cache_index.uncache(conn, [H[1]])
        db.cache_index.uncache(conn, [H[1]])  # already not cached: not subtracted twice
    assert (db.cache_index.counter("cached_bytes"), db.cache_index.counter("cached_files")) == (107, 2)
    assert db.cache_index.entry(H[1]).pinned  # the pin outlives the cached copy
    with db.transaction() as conn:
        db.cache_index.forget(conn, [H[0]])
    assert (db.cache_index.counter("cached_bytes"), db.cache_index.counter("cached_files")) == (7, 1)
    with db.transaction() as conn:
        db.cache_index.forget(conn, [H[1]])  # forgetting an uncached file changes nothing
    assert (db.cache_index.counter("cached_bytes"), db.cache_index.counter("cached_files")) == (7, 1)
    with db.transaction() as conn:
        assert db.cache_index.recount(conn) == (7, 1)
        db.cache_index.put(conn, [(H[2], 9, False), (H[3], 4, False)], 2.0)  # a size changed
        assert db.cache_index.totals(conn)[0] == db.cache_index.totals(conn)[1] == (13, 2)


def test_copies_counts_distinct_good_hosts(db):
    add(db, H[0])
    upload(db, H[0], "h1", "http://h1.example/a")
    upload(db, H[0], "h1", "http://h1.example/b")  # second url on the same host
    assert db.files.copies(H[0]) == 1
    with db.transaction() as conn:
        db.copies.record_pending(conn, [(H[0], "h2")], 2100)
    assert db.files.copies(H[0]) == 1
    upload(db, H[0], "h2", "http://h2.example/a")
    assert db.files.copies(H[0]) == 2
    # the good copy replaced the pending row of h2
    assert [u for u in db.copies.of(H[0]) if u.host_name == "h2"] == [
        CopyRow("h2", "http://h2.example/a", "good", time=2000, checked=0)]
    mark_bad(db, H[0], "h1", "http://h1.example/a")
    assert db.files.copies(H[0]) == 2  # h1 still has a good url
    mark_bad(db, H[0], "h1", "http://h1.example/b")
    assert db.files.copies(H[0]) == 1
    mark_bad(db, H[0], "h2", "http://h2.example/a")
    assert db.files.copies(H[0]) == 0
    upload(db, H[0], "h2", "http://h2.example/a")  # re-upload clears the error flag
    assert db.files.copies(H[0]) == 1


def test_upload_failure_not_recorded_over_a_good_copy(db):
    add(db, H[0])
    upload(db, H[0], "h1", "http://h1.example/a")
    with db.transaction() as conn:
        db.copies.record_pending(conn, [(H[0], "h1")], 3000)
    assert db.copies.of(H[0]) == [
        CopyRow("h1", "http://h1.example/a", "good", time=2000, checked=0)]
    assert db.files.copies(H[0]) == 1


# -- eviction order -----------------------------------------------------------------


def _cached(db, file_hash, when, copies=True, size=10):
    add(db, file_hash, size=size)
    with db.transaction() as conn:
        db.cache_index.put(conn, [(file_hash, size, copies)], when)
    if copies:
        upload(db, file_hash, "h1", "http://h1.example/" + file_hash)


def _pin(db, file_hash, pinned):
    with db.transaction() as conn:
        db.cache_index.pin(conn, file_hash, 10, pinned)


def test_eviction_candidates_lru_order_skipping_pinned_and_uncopied(db):
    _cached(db, H[0], when=30.0)
    _cached(db, H[1], when=10.0)
    _cached(db, H[2], when=20.0)
    _cached(db, H[3], when=1.0, copies=False)  # oldest, but on no host
    _cached(db, H[4], when=2.0)
    _pin(db, H[4], True)  # oldest with a copy, but pinned
    add(db, H[5])  # not cached at all
    upload(db, H[5], "h1", "http://h1.example/x")
    candidates = db.cache_index.eviction_candidates(db.connection)
    assert [c[:2] for c in candidates] == [(H[1], 10), (H[2], 10), (H[0], 10)]
    db.cache_index.touch([(H[1], 40.0)])
    assert [c[0] for c in db.cache_index.eviction_candidates(db.connection)] == [H[2], H[0], H[1]]
    _pin(db, H[4], False)
    assert db.cache_index.eviction_candidates(db.connection).fetchone()[:2] == (H[4], 10)


def test_eviction_query_uses_partial_index(db):
    for i, h in enumerate(H[:4]):
        _cached(db, h, when=float(i))
    conn = db.connection
    statements = []
    conn.set_trace_callback(statements.append)
    try:
        db.cache_index.eviction_candidates(conn).fetchone()
    finally:
        conn.set_trace_callback(None)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1
    plan = " ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + selects[0]))
    assert "cache_lru" in plan
    assert "TEMP B-TREE" not in plan.upper()  # the index gives the order: no sort


# -- merges -----------------------------------------------------------------------


def rec(file_hash, size=10, filename="doc.txt", when=1391212800, uploads=()):
    return Record(file_hash, filename, size, when, tuple(uploads))


def test_merge_records_is_an_idempotent_union(db):
    add(db, H[0], size=10, filename="")
    upload(db, H[0], "h1", "http://h1.example/a")
    records = [
        rec(H[0], uploads=[("h1", "http://h1.example/a", False),
                           ("h2", "http://h2.example/a", False)]),
        rec(H[1], uploads=[("h3", "", True)]),
    ]
    assert db.records.merge(records) == (2, [])
    assert db.files.get(H[0]).filename == "doc.txt"  # a missing name is filled in
    assert db.files.copies(H[0]) == 2
    assert {(u.host_name, u.url) for u in db.copies.of(H[0])} == {
        ("h1", "http://h1.example/a"), ("h2", "http://h2.example/a")}
    assert db.files.get(H[1]).size == 10 and db.files.copies(H[1]) == 0
    assert db.copies.of(H[1])[0].error is True
    before = [(h, db.copies.of(h)) for h in (H[0], H[1])]
    assert db.records.merge(records) == (0, [])
    assert [(h, db.copies.of(h)) for h in (H[0], H[1])] == before
    # a different filename does not replace a known one
    assert db.records.merge([rec(H[0], filename="other.txt")]) == (0, [])
    assert db.files.get(H[0]).filename == "doc.txt"


def recounted(db, file_hash):
    """(copies, verified) as the uploads_* triggers define them, counted afresh."""
    good = [u for u in db.copies.of(file_hash) if not u.error]
    return (len({u.host_name for u in good}),
            len({u.host_name for u in good if u.verified}))


def test_merge_records_counts_copies_of_new_files_as_the_triggers_do(db):
    """New files are inserted with their count (their uploads go in first);
    the count must be what the triggers would have made of them."""
    add(db, H[2])
    upload(db, H[2], "h1", "http://h1.example/mine")
    db.records.merge([
        # two urls on one host, a failed host, a second good host
        rec(H[0], uploads=[("h1", "http://h1.example/a", False),
                           ("h1", "http://h1.example/b", False),
                           ("h2", "", True), ("h3", "http://h3.example/a", False)]),
        rec(H[1], uploads=[("h4", "", True)]),  # only a failure
        # a file new in this batch, seen twice: both records' copies count
        rec(H[3], uploads=[("h1", "http://h1.example/c", False)]),
        rec(H[3], uploads=[("h5", "http://h5.example/c", False)]),
        rec(H[2], uploads=[("h6", "http://h6.example/x", False)]),  # a known file
    ])
    assert [db.files.copies(h) for h in H[:4]] == [2, 0, 2, 2]
    for h in H[:4]:
        row = db.files.get(h)
        assert (row.copies, row.verified) == recounted(db, h)
    with pytest.raises(DatabaseError, match="FOREIGN KEY"):  # deferred, still checked
        with db.transaction() as conn:
            conn.execute("PRAGMA defer_foreign_keys = ON")
            conn.execute("INSERT INTO uploads (hash, host_name, url, time)"
                         " VALUES (?, 'h', 'http://h.example/', 0)", ("e" * 64,))


def test_merge_records_refuses_size_conflicts(db):
    add(db, H[0], size=10)
    changed, refused = db.records.merge([
        rec(H[0], size=11, uploads=[("h9", "http://h9.example/evil", False)]),
        rec(H[1], size=5),
    ])
    assert (changed, refused) == (1, [H[0]])
    assert db.files.get(H[0]).size == 10
    assert db.copies.of(H[0]) == [] and db.files.copies(H[0]) == 0
    assert db.files.get(H[1]).size == 5


def test_merge_records_never_flips_local_error_flags(db):
    add(db, H[0])
    upload(db, H[0], "h1", "http://h1.example/bad")
    upload(db, H[0], "h2", "http://h2.example/good")
    mark_bad(db, H[0], "h1", "http://h1.example/bad")
    assert db.files.copies(H[0]) == 1
    db.records.merge([rec(H[0], uploads=[("h1", "http://h1.example/bad", False),
                                         ("h2", "http://h2.example/good", True)])])
    flags = {(u.host_name, u.url): u.error for u in db.copies.of(H[0])}
    assert flags == {("h1", "http://h1.example/bad"): True,
                     ("h2", "http://h2.example/good"): False}
    assert db.files.copies(H[0]) == 1


def test_iter_records_streams_files_with_uploads(db):
    db.records.merge([rec(H[1], size=3, uploads=[("h2", "http://h2.example/1", False)]),
                      rec(H[0], size=4)])
    assert list(db.records.iter()) == [
        (H[0], "doc.txt", 4, 1391212800, [], []),
        (H[1], "doc.txt", 3, 1391212800, [("h2", "http://h2.example/1", False)], []),
    ]
    assert [r[0] for r in db.records.iter([H[1]])] == [H[1]]


# -- connections and transactions ------------------------------------------------------


def test_each_thread_gets_its_own_connection(db):
    main = db.connection
    assert db.connection is main
    seen = []

    def worker():
        seen.append(db.connection)
        seen.append(db.connection)
        with db.transaction() as conn:
            db.files.add(conn, H[0], "t", 1, 1)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen[0] is seen[1]
    assert seen[0] is not main
    assert db.files.exists(H[0])  # committed from the other thread, seen here


def test_transaction_rolls_back_on_exception(db):
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            db.files.add(conn, H[0], "x", 1, 1)
            with db.transaction() as inner:  # nested use joins the outer transaction
                assert inner is conn
                db.files.add(inner, H[1], "y", 1, 1)
            raise RuntimeError("boom")
    assert not db.files.exists(H[0]) and not db.files.exists(H[1])
    assert not db.connection.in_transaction
    add(db, H[2])  # the connection is usable afterwards
    assert db.files.exists(H[2])


def test_closed_database_refuses_use(opened):
    db = opened()
    db.close()
    with pytest.raises(DatabaseError, match="closed"):
        db.files.exists(H[0])


def test_busy_transaction_is_retried_until_the_lock_is_released(db_path, opened,
                                                                 monkeypatch, caplog):
    monkeypatch.setattr(database, "BUSY_TIMEOUT_S", 0.05)
    db = opened()
    blocker = raw(db_path)
    blocker.execute("BEGIN IMMEDIATE")
    blocker.execute("INSERT INTO transfers (month, uploaded, downloaded) VALUES ('1999-01', 1, 2)")
    timer = threading.Timer(0.3, lambda: blocker.execute("COMMIT"))
    started = time.monotonic()
    timer.start()
    try:
        with db.transaction() as conn:
            db.files.add(conn, H[0], "x", 1, 1)
    finally:
        timer.join()
        blocker.close()
    assert time.monotonic() - started >= 0.25
    assert db.files.exists(H[0])
    assert db.health.transfers()["1999-01"] == (1, 2)
    assert any("database busy, retry" in r.getMessage() for r in caplog.records)


def test_lock_never_released_gives_database_error(db_path, opened, monkeypatch):
    monkeypatch.setattr(database, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(database, "BUSY_RETRIES", 1)
    db = opened()
    blocker = raw(db_path)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseError, match="cannot start a transaction"):
            with db.transaction() as conn:
                db.files.add(conn, H[0], "x", 1, 1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert not db.files.exists(H[0])
    add(db, H[1])  # once the lock is gone the database works again
    assert db.files.exists(H[1])


# -- transfers and host health --------------------------------------------------------


def test_add_transfer_accumulates_per_month(db):
    jan, feb = 1388534400 + 5, 1391212800 + 5  # 2014-01-01, 2014-02-01 UTC
    assert (month_key(jan), month_key(feb), month_key(jan - 10)) == (
        "2014-01", "2014-02", "2013-12")
    add_transfer(db, uploaded=100, when=jan)
    add_transfer(db, downloaded=7, when=jan + 86400)
    add_transfer(db, uploaded=1, downloaded=2, when=feb)
    add_transfer(db, uploaded=10, when=jan)
    assert db.health.transfers() == {"2014-01": (110, 7), "2014-02": (1, 2)}


def test_host_health_updates(db):
    host_result(db, "h1", True, latency_ms=100.0)
    host_result(db, "h1", True, latency_ms=200.0)
    h1 = db.health.all()["h1"]
    assert h1.successes == 2 and h1.failures == 0
    assert h1.latency_ms == pytest.approx(150)  # the median of 100 and 200
    assert h1.last_success is not None and h1.last_failure is None
    host_result(db, "h1", False, error="x" * 1000)
    host_result(db, "h1", False, error="timeout")
    h1 = db.health.all()["h1"]
    assert (h1.failures, h1.consecutive_failures, h1.last_error) == (2, 2, "timeout")
    host_result(db, "h1", True, latency_ms=120.0)
    h1 = db.health.all()["h1"]
    assert (h1.successes, h1.failures, h1.consecutive_failures) == (3, 2, 0)
    assert h1.latency_ms == pytest.approx(120)
    host_result(db, "h2", False, error="y" * 1000)
    h2 = db.health.all()["h2"]
    assert h2.last_error == "y" * 500 and h2.successes == 0
    assert list(db.health.all()) == ["h1", "h2"]


def test_latency_is_the_median_of_recent_samples(db):
    from cloudmanager.db.health import LATENCY_SAMPLES

    assert db.health.all() == {}
    host_result(db, "h", True, latency_ms=None)
    assert db.health.all()["h"].latency_ms is None
    for _ in range(LATENCY_SAMPLES):
        host_result(db, "h", True, latency_ms=10.0)
    host_result(db, "h", True, latency_ms=60_000.0)  # one stall does not move it
    assert db.health.all()["h"].latency_ms == 10.0
    for _ in range(LATENCY_SAMPLES):
        host_result(db, "h", True, latency_ms=500.0)  # old samples age out
    assert db.health.all()["h"].latency_ms == 500.0


def test_a_version_1_database_is_migrated_keeping_its_data(tmp_path):
    import sqlite3
    from pathlib import Path

    from cloudmanager.db import SCHEMA_VERSION, FileDatabase, schema_sql

    path = tmp_path / "v1.sqlite3"
    v1 = (Path(__file__).parent / "data" / "schema_v1.sql").read_text()
    conn = sqlite3.connect(path)
    conn.executescript(v1)
    conn.execute("INSERT INTO files (hash, size, created) VALUES (?, 3, 1)", ("a" * 64,))
    conn.execute("INSERT INTO uploads (hash, host_name, url, verified, time)"
                 " VALUES (?, 'h', 'http://x.example/1', 1, 1)", ("a" * 64,))
    conn.execute("INSERT INTO host_health (host_name, successes, latency_ms) VALUES ('h', 4, 9.5)")
    conn.execute("INSERT INTO reservations (id, owner, size, created) VALUES (41, 'n:1:t', 9, 1.0)")
    # A cached file with a bad copy, a failed upload and another node's claim;
    # a pinned file that is not cached.
    b, c = "b" * 64, "c" * 64
    conn.execute("INSERT INTO files (hash, size, created, cached, last_access)"
                 " VALUES (?, 5, 1, 1, 77.0)", (b,))
    conn.execute("INSERT INTO files (hash, size, created, pinned) VALUES (?, 6, 1, 1)", (c,))
    conn.executemany("INSERT INTO uploads (hash, host_name, url, error, verified, time)"
                     " VALUES (?, ?, ?, ?, ?, 1)",
                     [(b, "h", "http://x.example/b", 1, 1), (b, "h2", "", 1, 0),
                      (b, "h3", "http://y.example/b", 0, 0)])
    conn.commit()
    conn.close()

    db = FileDatabase(path)
    try:
        assert db.schema_version() == SCHEMA_VERSION == 8
        assert db.files.copies("a" * 64) == 1
        assert db.files.verified("a" * 64) == 1
        # v4: each copy's state from its old flags; the counts are the same.
        assert {(r.host_name, r.state) for r in db.copies.of(b)} == {
            ("h", "bad"), ("h2", "pending"), ("h3", "claimed")}
        assert (db.files.copies(b), db.files.verified(b)) == (1, 0)
        # v4: the cache index moved apart, with its totals kept.
        assert db.cache_index.entry(b) == (b, 5, True, 77.0, False, False)
        assert db.cache_index.entry(c).pinned and not db.cache_index.entry(c).cached
        assert db.cache_index.entry("a" * 64) is None
        assert (db.cache_index.counter("cached_bytes"), db.cache_index.counter("cached_files")) \
            == (5, 1)
        with db.transaction() as tx:
            assert db.cache_index.totals(tx)[0] == db.cache_index.totals(tx)[1]
            db.copies.record_good(tx, [(b, "h", "http://x.example/b")], 2)  # triggers work
        assert db.files.verified(b) == 1
        assert db.health.all()["h"].successes == 4
        assert db.health.all()["h"].latency_ms == 9.5  # the old average seeds the samples
        # The migrated tables have every column a new database gets (the
        # old latency_ms stays behind, unused).
        fresh = sqlite3.connect(":memory:")
        fresh.executescript(schema_sql())
        for table in ("uploads", "host_health", "sources", "cache_entries", "tombstones",
                      "removals", "upload_queue", "transfers", "leases", "nodes", "this_node",
                      "published", "pool_state", "trees"):
            columns = {r[1] for r in db.connection.execute("PRAGMA table_info(%s)" % table)}
            assert columns >= {r[1] for r in fresh.execute("PRAGMA table_info(%s)" % table)}
        host_result(db, "h", True, latency_ms=20.5)
        assert db.health.all()["h"].latency_ms == 15.0
        db.sources.remember([("/a", 3, 1, 1, 7, 8, "a" * 64)])  # the v3 table works
        assert db.sources.lookup(["/a", "/b"]) == {"/a": (3, 1, 1, 7, 8, "a" * 64)}
        # v5: the transfer meter has a node column, the old months under ''.
        db.health.record({}, uploaded=3, when=0, node="n1")
        assert db.health.transfers_by_node()["1970-01"] == {"n1": (3, 0)}
        # v6: what was published (a file's row goes with it) and the block cursor.
        with db.transaction() as tx:
            assert db.published.mark_exported(tx, ["a" * 64, b], 9.0) == ["a" * 64, b]
            db.published.tag(tx, [c], "block")
            db.state.set(tx, [("last_known_block", 12)])
        assert set(db.published.of(["a" * 64, b, c])) == {"a" * 64, b, c}
        assert db.state.get("last_known_block") == 12
        assert [r.hash for r in db.records.iter(with_copies_only=True, unpublished=True)] == []
        with db.transaction() as tx:
            db.files.forget(tx, b)
        assert set(db.published.of(["a" * 64, b, c])) == {"a" * 64, c}
        # v7: no insert trigger; a copy recorded is counted by its batch.
        names = {r[0] for r in db.connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        assert "uploads_insert" not in names and "uploads_update" in names
        with db.transaction() as tx:
            db.copies.record_good(tx, [(c, "h", "http://x.example/c")], 3)
        assert (db.files.copies(c), db.files.verified(c)) == (1, 1)
        # v7: trees by name (a tree's row goes with its file).
        with db.transaction() as tx:
            db.trees.add(tx, [(c, "photos", 5), ("f" * 64, "not a file", 6)])
        assert db.trees.all() == [(c, "photos", 5)]
        with db.transaction() as tx:
            db.files.forget(tx, c)
        assert db.trees.get(c) is None
        # v8: reservations keep their rows in flight, and no AUTOINCREMENT.
        assert db.connection.execute("SELECT id, owner, size FROM reservations").fetchall() \
            == [(41, "n:1:t", 9)]
        table = db.connection.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'reservations'").fetchone()[0]
        assert "AUTOINCREMENT" not in table.upper()
    finally:
        db.close()


# -- the descriptor rule: nothing but SQLite opens the database file -------------

# SQLite's unix VFS locks these bytes of the database file (os_unix.c): every
# connection in WAL mode holds a read lock on the shared range for as long as
# it is open, which is how a closing process learns it is not the last user.
_PENDING_BYTE = 0x40000000
_SHARED_FIRST, _SHARED_SIZE = _PENDING_BYTE + 2, 510

_HOLDER = """
import sys, threading
from cloudmanager.db import FileDatabase
db = FileDatabase(sys.argv[1])
with db.transaction() as conn:
    conn.execute("INSERT INTO counters (name, value) VALUES ('first', 1)")
# Another thread's first connection: the old code opened and closed a
# descriptor of the file here, which dropped every lock the process held.
t = threading.Thread(target=lambda: db.files.exists("0" * 64)); t.start(); t.join()
print("ready", flush=True)
sys.stdin.readline()          # the parent opens and closes its own connection
with db.transaction() as conn:
    conn.execute("INSERT INTO counters (name, value) VALUES ('second', 2)")
print("wrote", flush=True)
sys.stdin.readline()
db.close()
"""


def _shared_range_is_free(path):
    import fcntl
    import os

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _SHARED_SIZE, _SHARED_FIRST)
    except OSError:
        return False
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, _SHARED_SIZE, _SHARED_FIRST)
        return True
    finally:
        os.close(fd)  # this test process holds no SQLite connection to the file


def test_a_live_connection_keeps_its_locks_when_another_thread_connects(tmp_path):
    """A process using the pool keeps SQLite's locks whatever its threads do, so
    another process that closes can never take it for the last user, checkpoint
    and delete the WAL under it (the corruption behind SQLite's "How To
    Corrupt", 2.2), and every write it commits reaches the file."""
    import subprocess
    import sys

    path = tmp_path / "pool.sqlite3"
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert not _shared_range_is_free(path), "the holder's SQLite locks were dropped"
        other = raw(path)  # another user comes and goes while the holder is live
        assert other.execute("SELECT value FROM counters WHERE name = 'first'").fetchone() == (1,)
        other.close()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "wrote"
        reader = raw(path)
        try:
            assert reader.execute("SELECT value FROM counters WHERE name = 'second'"
                                  ).fetchone() == (2,)
            assert reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            reader.close()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_new_database_and_its_wal_are_private(tmp_path):
    import os
    import stat

    db = FileDatabase(tmp_path / "new" / "pool.sqlite3")
    try:
        with db.transaction() as conn:
            conn.execute("INSERT INTO counters (name, value) VALUES ('x', 1)")
        for name in ("pool.sqlite3", "pool.sqlite3-wal", "pool.sqlite3-shm"):
            mode = stat.S_IMODE(os.stat(tmp_path / "new" / name).st_mode)
            assert mode == 0o600, (name, oct(mode))
    finally:
        db.close()


def test_no_module_opens_the_database_file_itself():
    """The rule in database.py's docstring, checked where it is easiest to break."""
    import inspect

    source = inspect.getsource(database)
    assert "os.open(" not in source and "os.close(" not in source


def test_a_full_database_is_a_typed_error_and_loses_nothing(db, db_path):
    """When the disk (here: SQLite's page limit) is full, a write fails with a
    DatabaseError, never a raw sqlite3 error or "cannot rollback"; what was
    committed before stays, and the database works again once there is room."""
    add(db, H[0])
    conn = db.connection
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute("PRAGMA max_page_count = %d" % (pages + 1))
    failures = 0
    for round_ in range(40):
        try:
            with db.transaction() as tx:
                tx.executemany("INSERT INTO sources (path, size, mtime_ns, ctime_ns, inode,"
                               " device, hash) VALUES (?, 1, 1, 1, 1, 1, ?)",
                               [("/p/%d/%d/%s" % (round_, i, "x" * 200), H[1])
                                for i in range(50)])
        except DatabaseError as exc:
            failures += 1
            assert "full" in str(exc)
            assert not conn.in_transaction
    assert failures > 0
    assert db.files.exists(H[0])
    conn.execute("PRAGMA max_page_count = 1073741823")
    add(db, H[2])
    assert db.files.exists(H[2])
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)



def test_schema_sql_stands_at_the_schema_version(tmp_path, caplog):
    """schema.sql makes every new database: it must say SCHEMA_VERSION, so a
    new pool is not created at an older version and migrated (helper-33)."""
    from cloudmanager.db.connection import SCHEMA_VERSION, schema_sql

    for part in ("all", "cache_index"):
        conn = sqlite3.connect(":memory:")
        conn.executescript(schema_sql(part))
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION, part
    with caplog.at_level(logging.INFO, logger="cloudmanager.db.connection"):
        FileDatabase(tmp_path / "new.sqlite3").close()
    assert not [r for r in caplog.records if "migrated" in r.getMessage()]
