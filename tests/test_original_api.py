"""The original cloud-manager's wider API, called as its callers called it.

Storj's node fed the records to a blockchain with ``data_dump(limit)`` until
it returned None, read each block back with ``data_load(data, block_hash)``,
kept its place with ``visit_block(n)`` / ``last_known_block()``, and showed
``sync_status()``, the queue infos, the space and the transfer meter on its
status page. These run on both catalogs (SQLite and PostgreSQL: see
``BOTH_CATALOGS`` in conftest.py).
"""

import json
import logging
import threading

import pytest

from cloudmanager import CloudManager
from cloudmanager.db import SCHEMA_VERSION, FileDatabase, index_path_for
from cloudmanager.errors import CloudManagerError, InvalidInputError
from cloudmanager.setup_db import setup_db
from helpers import sha


def compact_size(record):
    """The bytes a record takes in ``data_dump(limit)``'s array."""
    return len(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def drain(cm, limit, most=200):
    """Call ``data_dump(limit)`` until it returns None, as the Storj node did;
    every call's text must be within ``limit``. :return: the calls' records."""
    calls = []
    for _ in range(most):
        text = cm.data_dump(limit)
        if text is None:
            return calls
        assert isinstance(text, str) and len(text.encode("utf-8")) <= limit
        records = json.loads(text)
        assert records, "an empty array is never returned: None is"
        calls.append(records)
    raise AssertionError("data_dump(%d) never returned None" % limit)


def big_record(digest):
    """Another node's record with many copies: larger than a small limit alone."""
    return {"version": "0.2", "datetime": "1391212800", "filename": "big.bin",
            "filesize": "5", "filehash": digest,
            "uploads": [{"host_name": "h%d" % i, "url": "http://h%d.example/%s" % (i, "y" * 100)}
                        for i in range(30)]}


def test_data_dump_with_a_limit_exports_each_record_once_smallest_first(
        make_pool, write_file, caplog):
    cm = make_pool()
    # Names of growing length: records of growing size.
    digests = [cm.upload(write_file("f" + "x" * (i * 7), b"data %d" % i)) for i in range(12)]
    assert all(digests)
    big = "b1" * 32
    assert cm.data_load(json.dumps([big_record(big)])) == 1  # one argument: not tagged
    sizes = {h: compact_size(cm.info(h)) for h in digests}
    limit = 2 * max(sizes.values()) + 3  # two records fit, the big one never does
    assert compact_size(cm.info(big)) + 2 > limit
    assert cm.blockchain_queue_info()["count"] == 13

    calls = drain(cm, limit)
    exported = [r["filehash"] for call in calls for r in call]
    assert sorted(exported) == sorted(digests) and len(set(exported)) == len(exported)
    all_sizes = [compact_size(r) for call in calls for r in call]
    assert all_sizes == sorted(all_sizes), "smallest first, across the calls too"
    assert max(len(call) for call in calls) >= 2
    for call in calls:  # each call as full as the limit allows
        assert all(r["version"] == "0.2" and r["uploads"] for r in call)
    # The big record waits for a larger limit, and is still counted.
    assert "larger than %d bytes alone" % limit in caplog.text
    assert cm.blockchain_queue_info() == {"size": 5, "count": 1}
    assert cm.data_dump(limit) is None

    # Without a limit: today's meaning, everything, nothing stamped.
    assert {r["filehash"] for r in json.loads(cm.data_dump())} == set(digests) | {big}
    assert cm.data_dump(limit) is None

    # A new upload shows up in the next call, alone.
    late = cm.upload(write_file("late.txt", b"late"))
    assert [r["filehash"] for r in json.loads(cm.data_dump(limit))] == [late]
    assert cm.data_dump(limit) is None
    # A larger limit takes the big one; then nothing is left.
    assert [r["filehash"] for r in json.loads(cm.data_dump(10 ** 6))] == [big]
    assert cm.data_dump(10 ** 6) is None
    assert cm.blockchain_queue_info() == {"size": 0, "count": 0}
    assert cm.sync_status()["blockchain_queue"] == []


def test_a_bad_limit_is_refused(make_pool, write_file):
    cm = make_pool()
    cm.upload(write_file("a", b"a"))
    for limit in (1, -5, True, "1000", 10.5):
        with pytest.raises(InvalidInputError):
            cm.data_dump(limit)
    assert cm.data_dump(2) is None  # "[]" fits, no record does
    assert cm.blockchain_queue_info()["count"] == 1


def test_two_instances_draining_at_once_export_each_record_once(make_pool, write_file):
    first = make_pool()
    digests = [first.upload(write_file("f%02d" % i, b"file %d" % i)) for i in range(30)]
    second = make_pool()  # the same database and storage: another instance
    limit = max(compact_size(first.info(h)) for h in digests) + 2  # one record a call
    got = {}

    def run(name, cm):
        got[name] = [r["filehash"] for call in drain(cm, limit, most=100) for r in call]

    threads = [threading.Thread(target=run, args=(n, cm))
               for n, cm in (("first", first), ("second", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    together = got["first"] + got["second"]
    assert sorted(together) == sorted(digests), "each record exactly once"


def test_a_record_another_instance_exported_meanwhile_is_left_out(make_pool, write_file,
                                                                  monkeypatch):
    """Between choosing records and stamping them, another instance exports
    the same ones: they are not returned twice, and the next ones are."""
    first = make_pool()
    digests = [first.upload(write_file("n" * (i + 1), b"file %d" % i)) for i in range(3)]
    second = make_pool()
    limit = max(compact_size(first.info(h)) for h in digests) + 2  # one record a call
    taken = []
    real_choose = first.pool.legacy._choose

    def choose(limit):
        chosen = real_choose(limit)
        if not taken:
            taken.append(json.loads(second.data_dump(limit))[0]["filehash"])
        return chosen

    monkeypatch.setattr(first.pool.legacy, "_choose", choose)
    got = json.loads(first.data_dump(limit))[0]["filehash"]
    assert taken == [digests[0]] and got == digests[1]  # smallest first: shortest name
    assert [r["filehash"] for r in json.loads(second.data_dump(limit))] == [digests[2]]
    assert first.data_dump(limit) is None


def test_data_load_with_a_source_tags_the_records(make_pool, write_file, caplog):
    node_a = make_pool(name="a")
    node_b = make_pool(name="b")  # its own catalog and cache, the same hosts
    mine = [node_a.upload(write_file("a%d" % i, b"node a %d" % i)) for i in range(3)]
    block = node_a.data_dump(10 ** 6)  # into a block, as the node did
    assert {r["filehash"] for r in json.loads(block)} == set(mine)

    # Node B reads the block: it imports and tags the records; they are out
    # there already, so it never exports them.
    assert node_b.data_load(block, "blockhash-1") is True
    assert all(node_b.exists(h) for h in mine)
    assert node_b.blockchain_queue_info() == {"size": 0, "count": 0}
    assert node_b.data_dump(10 ** 6) is None
    tags = node_b.db.published.of(mine)
    assert {t.source for t in tags.values()} == {"blockhash-1"} and len(tags) == 3
    assert node_b.data_load(block.encode(), "blockhash-2") is True  # bytes too; again:
    assert {t.source for t in node_b.db.published.of(mine).values()} == {"blockhash-1"}  # no change
    # Its own upload is exported as usual.
    own = node_b.upload(write_file("b", b"node b"))
    assert [r["filehash"] for r in json.loads(node_b.data_dump(10 ** 6))] == [own]

    # Node A reads its own records back from the chain: tagged, not re-exported.
    assert node_a.data_load(block, "blockhash-1") is True
    assert {t.exported is not None and t.source == "blockhash-1"
            for t in node_a.db.published.of(mine).values()} == {True}
    assert node_a.data_dump(10 ** 6) is None

    # Bad input is None, never an exception; the one-argument form still counts.
    record = json.loads(block)[0]
    bad_record = dict(record, filehash="not a hash")
    for data, source in (("not json", "blockhash-3"), ("[]", "blockhash-3"),
                         ('{"version": "9"}', "blockhash-3"), (b"\xff\xfe", "blockhash-3"),
                         (json.dumps([bad_record]), "blockhash-3"), (None, "blockhash-3"),
                         (json.loads(block), "blockhash-3"),  # decoded: not text
                         (block, ""), (block, 7), (block, b"raw"), (block, "a\nb"),
                         (block, "x" * 257)):
        assert node_b.data_load(data, source) is None, (data, source)
    assert node_b.data_load("not json") is None
    fresh = make_pool(name="c")
    assert fresh.data_load(block) == 3  # how many were imported
    # A text with one bad record among good ones: the good ones load and are tagged.
    other = make_pool(name="d")
    assert other.data_load(json.dumps([bad_record, record]), "blockhash-4") is True
    assert set(other.db.published.of([record["filehash"]])) == {record["filehash"]}
    assert "skipping record #0" in caplog.text


def test_queue_infos_while_a_host_is_dead(make_pool, write_file, fake_plowshare):
    fake_plowshare.faults("dead", down=True)
    cm = make_pool(capacity=10_000, hosts=["plowshare:dead"], redundancy=1, host_cooldown=0)
    data = [bytes([65 + i]) * (100 * (i + 1)) for i in range(3)]
    digests = [cm.upload(write_file("q%d.bin" % i, d)) for i, d in enumerate(data)]
    assert digests == [sha(d) for d in data]

    assert cm.upload_queue_info() == {"size": 600, "count": 3}
    assert cm.blockchain_queue_info() == {"size": 0, "count": 0}  # no host holds them
    status = cm.sync_status()
    assert set(status) == {"cloud_queue", "blockchain_queue"}
    assert sorted(r["filehash"] for r in status["cloud_queue"]) == sorted(digests)
    for record in status["cloud_queue"]:
        assert record["version"] == "0.2" and record["filesize"] in ("100", "200", "300")
        assert record["filename"].startswith("q") and isinstance(record["uploads"], list)
    assert status["blockchain_queue"] == []
    assert cm.used_space() == 600 and cm.capacity() == 10_000
    assert cm.data_dump(10 ** 6) is None

    assert cm.cloud_sync() is None  # still dead: they stay queued
    assert cm.upload_queue_info() == {"size": 600, "count": 3}

    fake_plowshare.clear()
    assert cm.cloud_sync() is None
    assert cm.upload_queue_info() == {"size": 0, "count": 0}
    assert cm.blockchain_queue_info() == {"size": 600, "count": 3}
    status = cm.sync_status()
    assert status["cloud_queue"] == []
    assert sorted(r["filehash"] for r in status["blockchain_queue"]) == sorted(digests)
    assert all(len(r["uploads"]) == 1 and "url" in r["uploads"][0]
               for r in status["blockchain_queue"])

    # The meter: outgoing is what went to hosts, incoming what came back.
    assert cm.total_outgoing() == cm.current_outgoing() == 600
    assert cm.total_incoming() == cm.current_incoming() == 0
    assert cm.evict(0) == 3 and cm.used_space() == 0
    assert cm.warm_up(digests[1])
    assert cm.total_incoming() == cm.current_incoming() == 200
    assert cm.total_outgoing() == 600 and cm.used_space() == 200
    stats = cm.stats()
    assert stats["downloaded_bytes"]["total"] == cm.total_incoming()
    assert stats["uploaded_bytes"]["this_month"] == cm.current_outgoing()


def test_the_meter_is_zero_on_a_new_pool(make_pool):
    cm = make_pool()
    assert (cm.total_incoming(), cm.total_outgoing(), cm.current_incoming(),
            cm.current_outgoing()) == (0, 0, 0, 0)
    assert cm.upload_queue_info() == {"size": 0, "count": 0}
    assert cm.blockchain_queue_info() == {"size": 0, "count": 0}
    assert cm.sync_status() == {"cloud_queue": [], "blockchain_queue": []}
    assert cm.used_space() == 0 and cm.capacity() == 1 << 20


def test_the_block_cursor_persists_across_a_reopen(make_pool, caplog):
    cm = make_pool()
    assert cm.last_known_block() == 0
    assert cm.visit_block(5) is None and cm.last_known_block() == 5
    assert cm.visit_block(2 ** 62) is None and cm.last_known_block() == 2 ** 62
    assert cm.visit_block(3) is None and cm.last_known_block() == 3  # a rewind
    for bad in (-1, True, "7", 7.0, None, 2 ** 63):
        assert cm.visit_block(bad) is False
    assert "block height" in caplog.text and cm.last_known_block() == 3
    cm.close()
    again = make_pool()  # the same database
    assert again.last_known_block() == 3
    assert again.visit_block(4) is None
    again.close()
    assert make_pool().last_known_block() == 4


def test_setup_db_makes_a_database_the_pool_opens(pool_catalog, tmp_path):
    database = pool_catalog.database(tmp_path / "fresh")
    assert setup_db(database) is True
    assert setup_db(database) is True  # again: nothing changes
    db = FileDatabase(database, index_path_for(database, tmp_path / "cache"))
    try:
        assert db.schema_version() == SCHEMA_VERSION
        assert db.files.count() == 0
    finally:
        db.close()
    with CloudManager(database, tmp_path / "cache", 1 << 20, hosts=[]) as cm:
        assert cm.last_known_block() == 0


def test_setup_db_raises_for_what_is_not_a_database(tmp_path):
    (tmp_path / "junk").write_bytes(b"this is not a database at all" * 100)
    for path in (tmp_path, tmp_path / "junk"):
        with pytest.raises(CloudManagerError):
            setup_db(path)
    assert setup_db(tmp_path / "new" / "db.sqlite3") is True  # its directory made


def test_every_method_of_the_original_has_a_docstring_saying_what_it_did():
    for name in ("cloud_sync", "sync_status", "upload_queue_info", "blockchain_queue_info",
                 "used_space", "capacity", "total_incoming", "total_outgoing",
                 "current_incoming", "current_outgoing", "data_dump", "data_load",
                 "last_known_block", "visit_block"):
        doc = getattr(CloudManager, name).__doc__
        assert doc and len(doc.strip()) > 40, name
    assert "original" in CloudManager.data_dump.__doc__
    assert "original" in CloudManager.data_load.__doc__


def test_facade_logs_on_the_cloudmanager_logger(make_pool, caplog):
    cm = make_pool()
    with caplog.at_level(logging.WARNING, logger="cloudmanager"):
        assert cm.data_load("[", "blockhash") is None
    assert any(r.name.startswith("cloudmanager") and "data_load" in r.getMessage()
               for r in caplog.records)
