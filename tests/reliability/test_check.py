"""CloudManager.check(): each finding kind, found without repair and mended with it."""

import json
import os

from cloudmanager import CloudManager
from helpers import sha

from .figures import FAULTS, add


def shard_path(cm, digest):
    return os.path.join(cm.cache.root, digest[:2], digest)


def assert_clean(cm, **kwargs):
    report = cm.check(**kwargs)
    assert report["clean"], report
    return report


def test_a_clean_pool_checks_clean_and_the_report_is_json(make_pool, write_file):
    cm = make_pool()
    digest = cm.upload(write_file("a", b"alpha" * 100))
    report = assert_clean(cm, deep=True)
    assert json.loads(json.dumps(report)) == report
    assert report["files_checked"] == 1 and report["unrepaired"] == []
    for key in ("missing", "size_mismatch", "hash_mismatch", "orphans", "stale_temp",
                "pins_without_file", "unprotected", "lost", "usage_drift", "count_drift",
                "stale_reservations", "dead_sessions", "over_capacity", "repaired"):
        assert not report[key], key
    assert cm.on_cache(digest)


def test_missing_file_is_reported_then_marked_not_cached(make_pool, write_file):
    cm = make_pool()
    digest = cm.upload(write_file("a", b"alpha" * 100))
    os.unlink(shard_path(cm, digest))
    add(FAULTS)
    report = cm.check()
    assert report["missing"] == [digest] and not report["clean"]
    assert report["unrepaired"] == ["missing"]
    assert cm.db.cache_index.is_cached(digest)  # a check without repair changes nothing
    report = cm.check(repair=True)
    assert report["repaired"]["missing"] == 1 and report["unrepaired"] == []
    assert not cm.db.cache_index.is_cached(digest)
    assert_clean(cm)
    assert cm.warm_up(digest)  # it comes back from a host


def test_size_mismatch_is_reported_and_the_damaged_file_removed(make_pool, write_file):
    cm = make_pool()
    digest = cm.upload(write_file("a", b"alpha" * 100))
    with open(shard_path(cm, digest), "ab") as f:
        f.write(b"more")
    add(FAULTS)
    assert cm.check()["size_mismatch"] == [digest]
    cm.check(repair=True)
    assert not os.path.exists(shard_path(cm, digest))
    assert_clean(cm)
    assert cm.usage_ratio() == 0


def test_hash_mismatch_needs_deep_and_repair_drops_the_bad_copy(make_pool, write_file):
    cm = make_pool()
    data = b"alpha" * 100
    digest = cm.upload(write_file("a", data))
    with open(shard_path(cm, digest), "r+b") as f:
        f.write(b"X")  # same size, other bytes
    add(FAULTS)
    assert cm.check()["clean"]  # the cheap comparison cannot see it
    report = cm.check(deep=True)
    assert report["hash_mismatch"] == [digest] and not report["clean"]
    assert cm.check(deep=True, repair=True)["repaired"]["hash_mismatch"] == 1
    assert_clean(cm, deep=True)
    path = cm.warm_up(digest)
    with open(path, "rb") as f:
        assert f.read() == data


def test_orphans_and_stale_temp_files_are_found_and_removed(make_pool, write_file):
    cm = make_pool()
    stray = sha(b"nobody")
    with open(shard_path(cm, stray), "wb") as f:
        f.write(b"nobody")
    with open(os.path.join(cm.cache.root, "ab", "junk"), "wb") as f:
        f.write(b"junk")
    with open(os.path.join(cm.cache.tmp_dir, "0123456789abcdef-7.tmp"), "wb") as f:
        f.write(b"half")
    mine = os.path.join(cm.cache.tmp_dir, "%s-99.tmp" % cm.cache.token)
    with open(mine, "wb") as f:  # a live session's temp file is not stale
        f.write(b"in flight")
    add(FAULTS, 3)
    report = cm.check()
    assert report["orphans"] == sorted([os.path.join(stray[:2], stray), "ab/junk"])
    assert report["stale_temp"] == ["tmp/0123456789abcdef-7.tmp"]
    report = cm.check(repair=True)
    assert report["repaired"] == {"orphans": 2, "stale_temp": 1}
    assert not os.path.exists(shard_path(cm, stray))
    assert os.path.exists(mine)
    assert_clean(cm)


def test_usage_drift_is_reported_and_recounted(make_pool, write_file):
    cm = make_pool()
    cm.upload(write_file("a", b"alpha" * 100))
    with cm.db.transaction() as conn:
        conn.execute("UPDATE counters SET value = 12345 WHERE name = 'cached_bytes'")
    add(FAULTS)
    report = cm.check()
    assert report["usage_drift"] == 12345 - 500 and report["count_drift"] == 0
    cm.check(repair=True)
    assert cm.db.cache_index.counter("cached_bytes") == 500
    assert_clean(cm)


def test_a_pin_with_no_file_is_repaired_by_fetching_the_file(make_pool, write_file):
    cm = make_pool()
    digest = cm.upload(write_file("a", b"alpha" * 100))
    cm.evict(0)
    assert cm.pin(digest)
    report = cm.check()
    assert report["pins_without_file"] == [digest]
    assert cm.check(repair=True)["repaired"]["pins_without_file"] == 1
    assert cm.on_cache(digest)
    assert_clean(cm)


def test_unprotected_files_get_queued_and_lost_files_are_reported(make_pool, write_file):
    cm = make_pool()
    kept = cm.upload(write_file("a", b"kept" * 100), defer=True)
    gone = cm.upload(write_file("b", b"gone" * 100), defer=True)
    assert_clean(cm)  # pinned and queued: waiting for sync, not a finding
    with cm.db.transaction() as conn:
        cm.db.queue.remove(conn, [kept])
    os.unlink(shard_path(cm, gone))
    add(FAULTS, 2)
    report = cm.check()
    assert report["unprotected"] == [kept]
    assert report["lost"] == [gone] and report["missing"] == [gone]
    report = cm.check(repair=True)
    assert report["repaired"]["unprotected"] == 1
    assert report["unrepaired"] == ["lost"]
    assert kept in cm.db.queue.hashes()
    assert cm.check()["lost"] == [gone]


def test_dead_sessions_and_their_reservations(make_pool, write_file):
    cm = make_pool()
    cm.db.sessions.open("%s:999999999:feedfacefeedface" % cm.cache.node, cm.cache.node,
                       999999999, "1")
    with cm.db.transaction() as conn:
        cm.db.sessions.reserve(conn, "%s:999999999:feedfacefeedface" % cm.cache.node, 100)
    add(FAULTS)
    report = cm.check()
    assert report["dead_sessions"] == 1 and report["stale_reservations"] == 1
    cm.check(repair=True)
    assert cm.db.sessions.reserved_bytes() == 0
    assert_clean(cm)


def test_reopening_with_a_smaller_capacity_evicts_down_to_it(make_pool, write_file, tmp_path):
    cm = make_pool(capacity=10_000)
    for i in range(5):
        cm.upload(write_file("f%d" % i, bytes([i]) * 1500))
    assert cm.db.cache_index.counter("cached_bytes") == 7500
    cm.close()
    with CloudManager(tmp_path / "node" / "db.sqlite3", tmp_path / "node" / "cache", 4000,
                      hosts=["dir:%s" % (tmp_path / "hosts" / "h1")], fsync=False) as small:
        assert small.open_check["evicted"] == 3
        assert small.db.cache_index.counter("cached_bytes") == 3000
        assert_clean(small)


def test_orphan_reservations_are_released_on_open(make_pool, tmp_path):
    cm = make_pool()
    with cm.db.transaction() as conn:
        cm.db.sessions.reserve(conn, "no-such-session", 4096)
    cm.close()
    with CloudManager(tmp_path / "node" / "db.sqlite3", tmp_path / "node" / "cache", 1 << 20,
                      hosts=["dir:%s" % (tmp_path / "hosts" / "h1")], fsync=False) as again:
        assert again.open_check["orphan_reservations"] == 1
        assert again.db.sessions.reserved_bytes() == 0


def test_a_clean_open_does_not_walk_the_storage_directory(make_pool, write_file, tmp_path,
                                                           monkeypatch):
    cm = make_pool()
    for i in range(20):
        cm.upload(write_file("f%d" % i, b"%d" % i * 50))
    cm.close()
    listed = []
    real_scandir = os.scandir

    def counting_scandir(*args):
        listed.append(args)
        return real_scandir(*args)

    # Counted at the OS boundary: a walk of the 256 shards would list each.
    monkeypatch.setattr(os, "scandir", counting_scandir)
    with CloudManager(tmp_path / "node" / "db.sqlite3", tmp_path / "node" / "cache", 1 << 20,
                      hosts=["dir:%s" % (tmp_path / "hosts" / "h1")], fsync=False):
        pass
    assert len(listed) <= 1  # the temp directory only
