"""The catalog's conformance suite: every catalog module, on SQLite and on PostgreSQL.

The ``catalog`` fixture (conftest.py) gives a SQLite file, or a fresh
database on a real PostgreSQL server started from the machine's binaries
plus a local cache index file. The same statements must mean the same on
both: these tests run each catalog table's writes and reads, including the
triggers that count copies and the batch statements of an import.
"""

import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from cloudmanager.db import SCHEMA_VERSION, FileDatabase
from cloudmanager.db.connection import schema_sql
from cloudmanager.db.copies import recount
from cloudmanager.db.health import Outcome
from cloudmanager.db.postgres import postgres_schema_sql, redact, translate
from cloudmanager.errors import DatabaseError

H = ["%064x" % (0xA0 + i) for i in range(6)]


@pytest.fixture
def cat(catalog):
    database, index_path = catalog
    db = FileDatabase(database, index_path)
    yield db
    db.close()


def add_files(db, hashes, size=10):
    with db.catalog.transaction() as conn:
        for i, h in enumerate(hashes):
            assert db.files.add(conn, h, "f%d.txt" % i, size, 1000 + i) == "new"


def test_files_rows_and_lookups(cat):
    add_files(cat, H[:4])
    with cat.catalog.transaction() as conn:
        assert cat.files.add(conn, H[0], "other", 10, 5) == "same"
        assert cat.files.add(conn, H[0], "other", 11, 5) == "conflict"
        assert cat.files.add(conn, H[1], "", 12, 5, size_known=True) == "corrected"
        states = cat.files.states(conn, [H[0], H[1], "f" * 64])
    assert set(states) == {H[0], H[1]} and states[H[1]].size == 12
    row = cat.files.get(H[2])
    assert (row.filename, row.size, row.created, row.copies, row.verified) == \
        ("f2.txt", 10, 1002, 0, 0)
    assert cat.files.exists(H[3]) and not cat.files.exists("e" * 64)
    assert cat.files.count() == 4 and cat.files.has_any()
    # Hash order is bytewise on both (the prefix lookup's range relies on it).
    assert cat.files.with_prefix("00", limit=10) == H[:4]
    assert cat.files.with_prefix("0" * 62 + "a1") == [H[1]]
    assert [r.hash for r in cat.files.listing()] == H[:4]  # by filename f0..f3
    with cat.catalog.transaction() as conn:
        assert cat.files.forget(conn, H[3]) and not cat.files.forget(conn, H[3])
    assert cat.files.count() == 3


def test_copy_states_and_the_counting_triggers(cat):
    add_files(cat, H[:2])
    url = "file:///hosts/h%d/" + H[0]
    with cat.catalog.transaction() as conn:
        cat.copies.record_good(conn, [(H[0], "h1", url % 1), (H[0], "h2", url % 2),
                                      ("f" * 64, "h1", "file:///gone")], when=100)
        cat.copies.record_pending(conn, [(H[0], "h3"), (H[0], "h1"), ("f" * 64, "h1")], when=101)
    assert [(c.host_name, c.state) for c in cat.copies.of(H[0])] == \
        [("h1", "good"), ("h2", "good"), ("h3", "pending")]
    assert (cat.files.get(H[0]).copies, cat.files.get(H[0]).verified) == (2, 2)
    assert cat.files.below_target(2) == [H[1]] and cat.files.count_below(3) == 2
    # Condemn one: the counts follow, and the back-off puts its next look ahead.
    now = time.time()
    with cat.catalog.transaction() as conn:
        cat.copies.condemn(conn, [(H[0], "h1", url % 1, "bad")], now, 60, 3600)
    assert (cat.files.get(H[0]).copies, cat.files.get(H[0]).verified) == (1, 1)
    assert cat.copies.sources(H[0]) == [("h2", url % 2)]
    assert cat.copies.sources(H[0], condemned=True) == [("h1", url % 1)]
    assert [c.host_name for c in cat.copies.to_check(due=now + 30)] == ["h2"]
    assert [c.state for c in cat.copies.to_check(due=now + 61)] == ["bad", "good"]
    # Strikes double the back-off, capped.
    with cat.catalog.transaction() as conn:
        for _ in range(20):
            cat.copies.condemn(conn, [(H[0], "h1", url % 1, "missing")], now, 60, 3600)
    assert [c.state for c in cat.copies.to_check(due=now + 3599)] == ["good"]
    assert [c.state for c in cat.copies.to_check(due=now + 3601)] == ["missing", "good"]
    # Seen matching again: good, counted again, strikes forgiven.
    with cat.catalog.transaction() as conn:
        cat.copies.record_good(conn, [(H[0], "h1", url % 1)], when=200, checked=True)
    assert cat.files.get(H[0]).verified == 2
    # Strikes on a good copy make it suspect at the threshold (counted, not verified).
    with cat.catalog.transaction() as conn:
        for _ in range(3):
            cat.copies.strike(conn, [(H[0], "h2", url % 2)], now, 3, 60, 3600)
    assert {c.host_name: c.state for c in cat.copies.of(H[0])}["h2"] == "suspect"
    assert (cat.files.get(H[0]).copies, cat.files.get(H[0]).verified) == (2, 1)
    with cat.catalog.transaction() as conn:
        cat.copies.seen_intact(conn, [(H[0], "h2", url % 2)], now)
        cat.copies.note_checked(conn, [(H[0], "h1", url % 1)], now)
    assert {c.host_name: c.state for c in cat.copies.of(H[0])}["h2"] == "claimed"
    states = cat.copies.replication_states([H[0], H[1]])
    assert states[H[0]].good == {"h1"} and states[H[0]].claimed == [("h2", url % 2)]
    assert states[H[1]].good == set()
    assert cat.copies.one_url_on("h1") == url % 1 and cat.copies.one_url_on("h9") is None
    assert sorted(tuple(r) for r in cat.copies.holding()) == [(H[0], "h1", url % 1),
                                                        (H[0], "h2", url % 2)]


def test_removals_tombstones_and_the_queue(cat):
    add_files(cat, H[:3])
    url = "file:///hosts/h1/" + H[0]
    with cat.catalog.transaction() as conn:
        cat.queue.add(conn, H[:3], 10.0)
        cat.queue.add(conn, H[:1], 20.0)  # already queued: kept as it was
        cat.copies.record_good(conn, [(H[0], "h1", url)], when=5)
        cat.copies.begin_removal(conn, H[0], "node:1:a", 30.0)
        cat.copies.begin_removal(conn, H[0], "node:2:b", 31.0)  # taken over
        assert cat.copies.removing(conn, H[:2]) == {H[0]}
        assert cat.copies.removals_of_owners_not_in(conn, ["node:1:a"], node="node") == [H[0]]
        assert cat.copies.removals_of_owners_not_in(conn, [], node="other") == []
        assert cat.copies.removals_of_owners_not_in(conn, [], node="other",
                                                    started_before=32.0) == [H[0]]
        cat.copies.record_deleted(conn, [(H[0], "h1", url)], 40.0)
        cat.copies.record_deleted(conn, [(H[0], "h1", url)], 41.0)  # twice: one tombstone
        cat.queue.note_failure(conn, H[1], "no host")
    assert cat.queue.hashes() == H[:3] and cat.queue.length() == 3
    assert cat.files.get(H[0]).copies == 0
    with cat.catalog.transaction() as conn:
        cat.copies.end_removals(conn, [H[0]])
        assert cat.copies.removing(conn, [H[0]]) == set()
        cat.queue.remove(conn, [H[1]])
        cat.files.forget(conn, H[0])  # its queue entry and rows go with it
    assert cat.queue.hashes() == [H[2]]
    # The tombstone outlives the file: an older claim of that copy is dropped.
    rec = SimpleNamespace(hash=H[0], filename="f0.txt", size=10, datetime=1,
                          uploads=[("h1", url, False), ("h2", "file:///hosts/h2/" + H[0], False)])
    assert cat.records.merge([rec]) == (1, [])
    assert [(c.host_name, c.state) for c in cat.copies.of(H[0])] == [("h2", "claimed")]


def test_import_and_export_records(cat):
    add_files(cat, H[:1])
    url = "file:///hosts/h1/"
    records = [
        SimpleNamespace(hash=H[0], filename="x", size=10, datetime=1,
                        uploads=[("h1", url + H[0], False)]),
        SimpleNamespace(hash=H[1], filename="new.bin", size=7, datetime=2,
                        uploads=[("h1", url + H[1], False), ("h2", url + H[1], True),
                                 ("h3", "", True)]),
        SimpleNamespace(hash=H[2], filename="", size=99, datetime=3, uploads=[]),
        SimpleNamespace(hash=H[0], filename="", size=11, datetime=1, uploads=[]),
    ]
    changed, refused = cat.records.merge(records)
    assert refused == [H[0]] and changed == 3
    assert cat.records.merge(records[:3]) == (0, [])  # a union: nothing new twice
    assert {(c.host_name, c.state) for c in cat.copies.of(H[1])} == \
        {("h1", "claimed"), ("h2", "bad"), ("h3", "pending")}
    assert (cat.files.get(H[1]).copies, cat.files.get(H[1]).verified) == (1, 0)
    known = cat.records.known([H[1], "f" * 64])
    assert set(known) == {H[1]} and known[H[1]].size == 7
    exported = list(cat.records.iter(with_copies_only=True))
    assert [r.hash for r in exported] == [H[0], H[1]]
    assert sorted(exported[1].uploads) == [("h1", url + H[1], False), ("h2", url + H[1], True),
                                           ("h3", "", True)]
    assert [r.hash for r in cat.records.iter()] == H[:3]
    assert cat.files.in_pool(H[:3]) == {H[0], H[1]}


def test_published_records_and_the_pool_state(cat):
    """The original's export backlog: files with a copy and no published row;
    stamps once, tags keep their first source, rows go with their file."""
    add_files(cat, H[:5])
    with cat.catalog.transaction() as conn:
        cat.copies.record_good(conn, [(h, "h1", "file:///h1/" + h) for h in H[:4]], 1)
        cat.queue.add(conn, [H[4]], 5.0)
    assert cat.queue.totals() == (1, 10)
    assert cat.records.unpublished_totals() == (4, 40)
    assert [r.hash for r in cat.records.iter(with_copies_only=True, unpublished=True)] == H[:4]
    with cat.catalog.transaction() as conn:
        assert cat.published.mark_exported(conn, [H[1], H[0], H[1], "f" * 64], 100.0) \
            == [H[1], H[0]]
        assert cat.published.mark_exported(conn, [H[0]], 101.0) == []  # once
        cat.published.tag(conn, [H[0], H[2], "f" * 64], "block-a")
        cat.published.tag(conn, [H[2]], "block-b")  # the first source stays
    assert cat.published.of(H + ["f" * 64]) == {
        H[0]: (100.0, "block-a"), H[1]: (100.0, None), H[2]: (None, "block-a")}
    assert [r.hash for r in cat.records.iter(with_copies_only=True, unpublished=True)] == [H[3]]
    assert cat.records.unpublished_totals() == (1, 10)
    with cat.catalog.transaction() as conn:
        assert cat.files.forget(conn, H[0])
        assert cat.published.mark_exported(conn, [H[0]], 102.0) == []  # gone: not stamped
    assert cat.published.of(H[:1]) == {}
    assert cat.state.get("last_known_block") == 0 and cat.state.get("x", 7) == 7
    with cat.catalog.transaction() as conn:
        cat.state.set(conn, [("last_known_block", 2 ** 40), ("other", 3)])
        cat.state.set(conn, [("other", 4)])
    assert (cat.state.get("last_known_block"), cat.state.get("other")) == (2 ** 40, 4)


def test_health_and_the_transfer_meter(cat):
    now = time.time()
    cat.health.record({"h1": [Outcome(True, 12.0, None, now), Outcome(False, None, "boom", now)],
                       "h2": [Outcome(True, 5.0, None, now)]}, uploaded=100, downloaded=7,
                      when=now)
    cat.health.record({"h1": [Outcome(False, None, "again", now)]}, uploaded=1, when=now)
    health = cat.health.all()
    assert (health["h1"].successes, health["h1"].failures, health["h1"].consecutive_failures,
            health["h1"].last_error) == (1, 2, 2, "again")
    assert health["h2"].latency_ms == 5.0
    assert cat.health.breakers()["h1"][0] == 2
    (month, (up, down)), = cat.health.transfers().items()
    assert (up, down) == (101, 7) and re.fullmatch(r"\d{4}-\d\d", month)
    cat.health.reset(["h1"])
    assert cat.health.all()["h1"].consecutive_failures == 0


def test_nested_writes_are_savepoints(cat):
    add_files(cat, H[:1])
    with cat.catalog.transaction() as conn:
        with pytest.raises(RuntimeError):
            with cat.catalog.transaction() as inner:
                cat.files.add(inner, H[1], "", 1, 1)
                raise RuntimeError("roll the inner block back")
        cat.files.add(conn, H[2], "", 1, 1)
    assert not cat.files.exists(H[1]) and cat.files.exists(H[2])
    with pytest.raises(DatabaseError):  # a constraint: typed, and nothing written
        with cat.catalog.transaction() as conn:
            cat.files.add(conn, H[3], "", 1, 1)
            cat.files.insert(conn, [(H[0], "", 10, 1)])
    assert not cat.files.exists(H[3])


# -- PostgreSQL only ------------------------------------------------------------------

def test_both_schemas_define_the_same_catalog(pg_url, tmp_path):
    """schema_postgres.sql is schema.sql's catalog part in PostgreSQL's types."""
    lite = FileDatabase(tmp_path / "pool.sqlite3")
    pg = FileDatabase(pg_url, tmp_path / "index.sqlite3")
    try:
        tables = re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", schema_sql("catalog"))
        assert tables == re.findall(r"CREATE TABLE (\w+)", postgres_schema_sql())[:-1]
        for table in tables:
            lite_columns = [r[1] for r in lite.read("PRAGMA table_info(%s)" % table)]
            pg_columns = [r[0] for r in pg.catalog.read(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?"
                " ORDER BY ordinal_position", (table,))]
            assert lite_columns == pg_columns, table
        # The node's index file holds the cache index alone.
        local_tables = {r[0] for r in pg.local.read(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "files" not in local_tables and "cache_entries" in local_tables
    finally:
        lite.close()
        pg.close()


def test_schema_creation_is_idempotent_and_safe_at_once(pg_url, tmp_path):
    """Several processes creating one new catalog at the same moment: it is
    created once, and every one of them opens it."""
    code = ("import sys; from cloudmanager.db import FileDatabase\n"
            "db = FileDatabase(sys.argv[1], sys.argv[2]); print(db.schema_version()); db.close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url,
                               str(tmp_path / ("index%d.sqlite3" % i))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert {o[0].strip() for o in outs} == {str(SCHEMA_VERSION)}


def test_a_password_never_reaches_an_error(postgres_server, tmp_path, caplog):
    from pg_server import PASSWORD

    url = postgres_server.password_url()
    db = FileDatabase(url, tmp_path / "index.sqlite3")  # the right password works
    assert PASSWORD not in db.path and "***" in db.path
    db.close()
    wrong = url.replace(PASSWORD, PASSWORD[::-1])
    with pytest.raises(DatabaseError) as info:
        FileDatabase(wrong, tmp_path / "index2.sqlite3")
    assert PASSWORD[::-1] not in str(info.value) and "password" in str(info.value).lower()
    assert PASSWORD not in caplog.text and PASSWORD[::-1] not in caplog.text


def test_the_catalog_survives_a_server_restart(postgres_server, pg_url, tmp_path):
    """Connections cut by a restart are replaced: reads and writes go on."""
    db = FileDatabase(pg_url, tmp_path / "index.sqlite3")
    try:
        add_files(db, H[:1])
        postgres_server.restart()
        assert db.files.exists(H[0])  # a read on a fresh connection
        add_files(db, H[1:2])  # and a write
        assert db.files.count() == 2
    finally:
        db.close()


def test_an_unreachable_catalog_is_a_typed_error(tmp_path):
    from pg_server import _free_port

    pytest.importorskip("psycopg")
    url = "postgresql://nobody:pw@127.0.0.1:%d/none?connect_timeout=2" % _free_port()
    started = time.monotonic()
    with pytest.raises(DatabaseError) as info:
        FileDatabase(url, tmp_path / "index.sqlite3")
    assert "pw@" not in str(info.value) and time.monotonic() - started < 60


def test_translation_of_the_dialect():
    assert translate("INSERT OR IGNORE INTO q (hash) VALUES (?)") == \
        "INSERT INTO q (hash) VALUES (%s) ON CONFLICT DO NOTHING"
    assert translate("SELECT value FROM json_each(?)") == \
        "SELECT value FROM json_array_elements_text(%s::json) AS _each(value)"
    assert translate("SELECT max(x), min(a, (b)) FROM t") == \
        "SELECT max(x), LEAST(a, (b)) FROM t"
    with pytest.raises(ValueError):
        translate("INSERT OR REPLACE INTO t VALUES (?)")
    assert redact("postgres://u@h/db") == "postgres://u@h/db"
    assert redact("postgresql://u:p%40ss@h/db") == "postgresql://u:***@h/db"


V4_TRIGGERS = """CREATE FUNCTION cloudmanager_count_copies() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    h TEXT;
BEGIN
    IF TG_OP = 'DELETE' THEN h := OLD.hash; ELSE h := NEW.hash; END IF;
    UPDATE files SET
        copies = (SELECT count(DISTINCT host_name) FROM uploads
                  WHERE hash = h AND state IN ('good', 'claimed', 'suspect')),
        verified = (SELECT count(DISTINCT host_name) FROM uploads
                    WHERE hash = h AND state = 'good')
    WHERE hash = h;
    RETURN NULL;
END
$$;
CREATE TRIGGER uploads_insert AFTER INSERT ON uploads
    FOR EACH ROW EXECUTE FUNCTION cloudmanager_count_copies();
CREATE TRIGGER uploads_update AFTER UPDATE OF state ON uploads
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION cloudmanager_count_copies();
CREATE TRIGGER uploads_delete AFTER DELETE ON uploads
    FOR EACH ROW EXECUTE FUNCTION cloudmanager_count_copies();
"""


def test_a_version_4_postgresql_catalog_is_migrated(pg_url, tmp_path):
    """A catalog made at version 4 (this series' first) gains what 5 and 6
    add, keeping its rows."""
    import psycopg

    from cloudmanager.db.postgres import POSTGRES_MIGRATIONS

    v5 = postgres_schema_sql()
    v4 = v5.replace("VALUES (%d)" % SCHEMA_VERSION, "VALUES (4)")
    # Version 4's copy counts: a row trigger.
    v4 = re.sub(r"CREATE FUNCTION cloudmanager_recount.*?cloudmanager_count_deleted\(\);\n",
                V4_TRIGGERS, v4, flags=re.S)
    v4 = re.sub(r"\n    (object_sha256|object_size|key_id) .*,", "", v4)  # version 6's
    v4 = re.sub(r"CREATE TABLE (leases|nodes|published|pool_state|trees) \(.*?\n\);", "", v4,
                flags=re.S)
    v4 = v4.replace("    last_error   TEXT,\n    node         TEXT NOT NULL DEFAULT ''",
                    "    last_error   TEXT")
    v4 = v4.replace("""    month      TEXT COLLATE "C" NOT NULL,
    node       TEXT COLLATE "C" NOT NULL DEFAULT '',""", """    month      TEXT COLLATE "C" NOT NULL,""")
    v4 = v4.replace("PRIMARY KEY (month, node)", "PRIMARY KEY (month)")
    assert 4 in POSTGRES_MIGRATIONS and v4 != v5
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(v4)
        conn.execute("INSERT INTO transfers (month, uploaded, downloaded) VALUES ('2026-01', 5, 6)")
    db = FileDatabase(pg_url, tmp_path / "index.sqlite3")
    try:
        assert db.schema_version() == SCHEMA_VERSION
        assert db.health.transfers_by_node() == {"2026-01": {"": (5, 6)}}
        db.health.record({}, uploaded=1, when=time.mktime((2026, 1, 15, 0, 0, 0, 0, 0, -1)),
                         node="n1")
        assert db.health.transfers() == {"2026-01": (6, 6)}
        add_files(db, H[:1])  # the copy counts are kept (a recount since version 7)
        with db.catalog.transaction() as conn:
            db.copies.record_good(conn, [(H[0], "a", "u1"), (H[0], "b", "u2")], when=1)
        assert (db.files.get(H[0]).copies, db.files.get(H[0]).verified) == (2, 2)
        # 6: the published records and the pool's named integers.
        with db.catalog.transaction() as conn:
            assert db.published.mark_exported(conn, H[:1], 5.0) == H[:1]
            db.state.set(conn, [("last_known_block", 9)])
        assert db.published.of(H[:1]) == {H[0]: (5.0, None)}
        assert db.state.get("last_known_block") == 9
    finally:
        db.close()


def test_leases_split_work_and_expire(cat):
    """Two owners asking for the same work: one gets each piece; a lease
    that ran out goes to whoever asks next; a release frees it at once."""
    now = 1000.0
    with cat.catalog.transaction() as conn:
        got_a = cat.leases.take(conn, "replicate", H[:3], "a", now + 60, now)
        got_b = cat.leases.take(conn, "replicate", H[1:5], "b", now + 60, now)
        again_a = cat.leases.take(conn, "replicate", H[:3], "a", now + 120, now)  # renewed
        verify_b = cat.leases.take(conn, "verify", H[:1], "b", now + 60, now)  # another kind
    assert got_a == set(H[:3]) and got_b == set(H[3:5]) and again_a == set(H[:3])
    assert verify_b == {H[0]}
    with cat.catalog.transaction() as conn:  # a's leases run out at now + 120
        assert cat.leases.take(conn, "replicate", H[:3], "b", now + 200, now + 100) == set()
        assert cat.leases.take(conn, "replicate", H[:3], "b", now + 200, now + 121) == set(H[:3])
        cat.leases.release(conn, "replicate", H[:2], "b")
        cat.leases.release(conn, "replicate", H[2:3], "a")  # not a's any more: no effect
        assert cat.leases.take(conn, "replicate", H[:3], "c", now + 300, now + 122) == set(H[:2])
        cat.leases.release_all(conn, ["b"])
    assert [h for h, _, _ in cat.leases.held("replicate", now + 122)] == H[:2]
    with pytest.raises(ValueError):
        with cat.catalog.transaction() as conn:
            cat.leases.take(conn, "nonsense", H[:1], "a", now, now)


def test_nodes_and_the_meter_per_node(cat):
    cat.leases.register_node("n1", "alpha", 10.0)
    cat.leases.register_node("n2", "beta", 11.0)
    cat.leases.register_node("n1", "alpha", 12.0)
    assert [(n.node, n.first_seen, n.last_seen) for n in cat.leases.nodes()] == \
        [("n1", 10.0, 12.0), ("n2", 11.0, 11.0)]
    when = time.mktime((2026, 3, 15, 0, 0, 0, 0, 0, -1))
    cat.health.record({}, uploaded=10, downloaded=1, when=when, node="n1")
    cat.health.record({}, uploaded=5, when=when, node="n2")
    cat.health.record({}, uploaded=1, when=when, node="n1")
    assert cat.health.transfers() == {"2026-03": (16, 1)}
    assert cat.health.transfers_by_node() == {"2026-03": {"n1": (11, 1), "n2": (5, 0)}}
    node = cat.sessions.node_id()
    assert node == cat.sessions.node_id() and re.fullmatch(r".+-[0-9a-f]{8}", node)


def test_a_missing_driver_names_the_extra(monkeypatch, tmp_path):
    import cloudmanager
    from cloudmanager.errors import CloudManagerError

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    with pytest.raises(DatabaseError) as info:
        FileDatabase("postgresql://cm@db.example/pool", tmp_path / "index.sqlite3")
    assert str(info.value) == ("PostgreSQL catalogs need psycopg: "
                               "pip install 'cloudmanager[postgres]'")
    with pytest.raises(CloudManagerError, match=r"pip install 'cloudmanager\[postgres\]'"):
        cloudmanager.CloudManager("postgres://cm@db.example/pool", tmp_path / "cache", 1 << 20,
                                  hosts=["dir:%s" % tmp_path])
    assert not (tmp_path / "postgres:").exists() and not os.path.exists("postgres:")


def test_host_health_is_shared_by_the_nodes_of_a_catalog(make_pool, pg_url, fake_plowshare,
                                                          write_file):
    """A host that fails for one node is avoided by the others; retried and
    healthy on one, it is healthy for all."""
    fake_plowshare.faults("flaky", down=True)
    hosts = ["plowshare:flaky", "plowshare:steady"]
    node_a = make_pool(name="a", hosts=hosts, redundancy=2, database=pg_url)
    node_b = make_pool(name="b", hosts=hosts, redundancy=2, database=pg_url)
    for i in range(3):
        assert node_a.upload(write_file("f%d" % i, b"file %d" % i))
    assert node_b.pool.health.cooling("flaky") and not node_b.pool.health.cooling("steady")
    fake_plowshare.clear()
    assert node_b.retry_hosts(["flaky"]) == ["flaky"]
    assert not node_a.pool.health.cooling("flaky")
    assert node_a.sync()["complete"] == 3  # A's cached files reach the host again
    assert node_b.stats()["below_target"] == 0


def test_stats_show_the_nodes_and_their_transfers(make_pool, pg_url, tmp_path, write_file):
    hosts = ["dir:%s" % (tmp_path / "hosts" / "h1")]
    node_a = make_pool(name="a", hosts=hosts, redundancy=1, database=pg_url)
    node_b = make_pool(name="b", hosts=hosts, redundancy=1, database=pg_url)
    digest = node_a.upload(write_file("f", b"x" * 1000))
    assert open(node_b.warm_up(digest), "rb").read() == b"x" * 1000
    stats = node_b.stats()
    assert set(stats["nodes"]) == {node_a.stats()["node"], stats["node"]}
    (month, total), = stats["transfers"].items()
    assert total == {"uploaded": 1000, "downloaded": 1000}
    assert stats["nodes"][stats["node"]]["transfers"][month] == \
        {"uploaded": 0, "downloaded": 1000}


def test_bulk_inserts_on_postgresql_mean_what_row_by_row_would(pg_url, tmp_path):
    """executemany of a plain INSERT goes in bulk on PostgreSQL (COPY, or one
    statement per batch with OR IGNORE): the same rows, the same conflicts,
    the same triggers."""
    db = FileDatabase(pg_url, tmp_path / "index.sqlite3")
    try:
        # Names COPY's text format must escape come back as they went.
        names = ["tab\there", "new\nline", "back\\slash", "\\N", "é ü 🙂"]
        rows = [(h, names[i], 10, 1) for i, h in enumerate(H[:4])]
        with db.catalog.transaction() as conn:
            db.files.insert(conn, rows)
        assert [db.files.get(h).filename for h in H[:4]] == names[:4]
        with db.catalog.transaction() as conn:
            # OR IGNORE skips a row repeated within the batch and one already there.
            conn.executemany("INSERT OR IGNORE INTO upload_queue (hash, queued, node)"
                             " VALUES (?, ?, ?)", [(H[0], 1.5, "n"), (H[0], 2.5, "n"),
                                                   (H[1], 3.0, "")])
            conn.executemany("INSERT OR IGNORE INTO upload_queue (hash, queued, node)"
                             " VALUES (?, ?, ?)", [(H[1], 9.0, "x"), (H[2], 4.0, "")])
        assert db.queue.hashes() == [H[0], H[1], H[2]]
        # A duplicate key without OR IGNORE fails the whole statement.
        with pytest.raises(DatabaseError):
            with db.catalog.transaction() as conn:
                db.files.insert(conn, [(H[4], "", 1, 1), (H[0], "", 1, 1)])
        assert not db.files.exists(H[4])
        # A float into an integer column takes the row-by-row path (rounded as before).
        with db.catalog.transaction() as conn:
            conn.executemany("INSERT INTO files (hash, filename, size, created)"
                             " VALUES (?, ?, ?, ?)", [(H[4], "", 7, 2.0), (H[5], "", 8, 3.0)])
        assert (db.files.get(H[4]).created, db.files.get(H[5]).size) == (2, 8)
        # Copies inserted in bulk are counted by one recount after them; a
        # change of state or a delete by the triggers, however many rows.
        with db.catalog.transaction() as conn:
            conn.executemany("INSERT INTO uploads (hash, host_name, url, state, time)"
                             " VALUES (?, ?, ?, ?, ?)",
                             [(H[0], "a", "u1", "good", 1), (H[0], "b", "u2", "claimed", 1),
                              (H[1], "a", "u3", "good", 1)])
            recount(conn, [H[0], H[1]])
        assert (db.files.get(H[0]).copies, db.files.get(H[0]).verified) == (2, 1)
        with db.catalog.transaction() as conn:
            conn.execute("UPDATE uploads SET state = 'good' WHERE host_name = 'b'")
            conn.execute("DELETE FROM uploads WHERE hash = ?", (H[1],))
        assert (db.files.get(H[0]).copies, db.files.get(H[0]).verified) == (2, 2)
        assert (db.files.get(H[1]).copies, db.files.get(H[1]).verified) == (0, 0)
    finally:
        db.close()


def test_two_statement_reads_ignore_a_file_added_between_them(catalog):
    """replication_states and known read the files, then their copies; on a
    server each read may be a snapshot of its own, so a file another node
    adds in between (copies and all) is left for the next look, never a
    KeyError (seen once in the chaos test)."""
    database, index_path = catalog
    db = FileDatabase(database, index_path)
    other = FileDatabase(database, str(index_path) + "-other" if index_path else None)
    real_read = db.catalog.read
    calls = []

    def read(sql, params=()):
        calls.append(sql)
        if len(calls) == 2:  # between the two statements
            add_files(other, H[:1])
            with other.catalog.transaction() as conn:
                other.copies.record_good(conn, [(H[0], "h", "http://h.example/x")], 1)
        return real_read(sql, params)

    db.catalog.read = read
    try:
        assert H[0] not in db.copies.replication_states([H[0]]) or calls
        assert len(calls) == 2
        with other.catalog.transaction() as conn:
            other.files.forget(conn, H[0])
        calls.clear()
        db.records.known([H[0]])
        assert len(calls) == 2
    finally:
        del db.catalog.read
        db.close()
        other.close()
