"""CloudManager.upload_many: upload() for many files, in batches.

Real SQLite files and real folders; no timing assertions.
"""

import errno
import hashlib
import os

import pytest

from cloudmanager import engine, fsutil
from cloudmanager import manager as manager_module
from cloudmanager.hosts.folder import FolderHost


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_results_in_order_like_upload(make_pool, write_file, tmp_path):
    cm = make_pool(1 << 20)
    files = [write_file("f%d" % i, b"content %d" % i) for i in range(20)]
    missing = tmp_path / "missing"
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    paths = files[:5] + [missing] + files[5:] + [a_dir]
    results = cm.upload_many(paths)
    assert len(results) == len(paths)
    assert results[5] is False and results[-1] is False
    for path, result in zip(paths, results):
        if path in files:
            assert result == sha(path.read_bytes())
            assert cm.exists(result) and cm.on_cache(result)
            assert cm.info(result)["filename"] == path.name
    # Uploaded to the three folder hosts: nothing is left queued.
    assert cm.stats()["queued"] == 0
    for digest in results[:5]:
        assert len(cm.info(digest)["uploads"]) == 3


def test_deferred_files_are_pinned_and_queued_then_synced(make_pool, write_file):
    cm = make_pool(1 << 20)
    files = [write_file("f%d" % i, b"x" * i) for i in range(1, 30)]
    results = cm.upload_many(files, defer=True)
    assert all(results)
    assert cm.stats()["queued"] == len(files)
    assert cm.evict(0) == 0  # pinned until a host holds them
    summary = cm.sync()
    assert summary["complete"] == len(files)
    assert cm.stats()["queued"] == 0
    assert cm.evict(0) == len(files)
    assert cm.usage_ratio() == 0


def test_duplicates_in_one_batch_and_known_files(make_pool, write_file):
    cm = make_pool(1 << 20)
    a = write_file("a", b"same bytes")
    b = write_file("b", b"same bytes")
    c = write_file("c", b"other")
    first = cm.upload(c)
    results = cm.upload_many([a, b, c, a])
    assert results == [sha(b"same bytes"), sha(b"same bytes"), first, sha(b"same bytes")]
    stats = cm.stats()
    assert stats["files"] == 2 and stats["cached_files"] == 2
    assert stats["cached_bytes"] == len(b"same bytes") + len(b"other")
    # No temp file left behind.
    assert os.listdir(cm.cache.tmp_dir) == []


def test_matches_upload_for_a_file_known_from_an_import(make_pool, write_file):
    cm = make_pool(1 << 20)
    data = b"imported elsewhere"
    digest = sha(data)
    cm.data_load('[{"version": "0.2", "datetime": "1", "filename": "", "filesize": "%d",'
                 ' "filehash": "%s", "uploads": []}]' % (len(data), digest))
    assert not cm.on_cache(digest)
    assert cm.upload_many([write_file("named.txt", data)], defer=True) == [digest]
    assert cm.on_cache(digest)
    assert cm.info(digest)["filename"] == "named.txt"
    assert cm.stats()["queued"] == 1


def test_size_conflict_with_a_cached_file_is_refused(make_pool, write_file):
    cm = make_pool(1 << 20)
    data = b"0123456789"
    digest = sha(data)
    cm.data_load('[{"version": "0.2", "datetime": "1", "filename": "x", "filesize": "99",'
                 ' "filehash": "%s", "uploads": []}]' % digest)
    # The import's size was a claim: our measured size corrects it, as upload() does.
    assert cm.upload_many([write_file("x", data)]) == [digest]
    assert cm.info(digest)["filesize"] == str(len(data))


def test_capacity_is_never_exceeded(make_pool, write_file):
    cm = make_pool(10 * 100)  # room for ten 100-byte files
    files = [write_file("f%02d" % i, bytes([i]) * 100) for i in range(25)]
    results = cm.upload_many(files)
    assert all(results)
    assert cm.stats()["cached_bytes"] <= 1000
    assert cm.usage_ratio() <= 1.0
    for digest in results:  # every one is on the hosts
        assert len(cm.info(digest)["uploads"]) == 3


def test_batch_that_does_not_fit_goes_one_by_one(make_pool, write_file):
    # Pinned files (deferred) fill the cache; the next batch does not fit as
    # a whole, and each file goes through upload() on its own (straight to
    # the hosts), with upload()'s result.
    cm = make_pool(300)
    pinned = [write_file("p%d" % i, bytes([i]) * 100) for i in range(3)]
    assert all(cm.upload_many(pinned, defer=True))
    more = [write_file("m%d" % i, bytes([100 + i]) * 100) for i in range(3)]
    results = cm.upload_many(more)
    assert results == [sha(p.read_bytes()) for p in more]
    for digest in results:
        assert not cm.on_cache(digest)
        assert len(cm.info(digest)["uploads"]) == 3
    assert cm.stats()["cached_bytes"] <= 300


def test_file_larger_than_cache_goes_to_hosts(make_pool, write_file):
    cm = make_pool(100)
    big = write_file("big", b"b" * 500)
    small = write_file("small", b"s" * 10)
    results = cm.upload_many([big, small])
    assert results == [sha(b"b" * 500), sha(b"s" * 10)]
    assert not cm.on_cache(results[0]) and cm.on_cache(results[1])


def test_several_batches(make_pool, write_file, monkeypatch):
    monkeypatch.setattr(manager_module, "UPLOAD_BATCH", 7)
    cm = make_pool(1 << 20)
    files = [write_file("f%03d" % i, b"batch %d" % i) for i in range(40)]
    results = cm.upload_many(iter(files))
    assert results == [sha(f.read_bytes()) for f in files]
    assert cm.stats()["queued"] == 0
    assert cm.stats()["files"] == 40


def test_a_failing_host_leaves_files_queued_and_counts_once_per_batch(make_pool, write_file,
                                                                      tmp_path):
    good = tmp_path / "hosts" / "good"
    bad = tmp_path / "hosts" / "bad"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("a file where the folder should be")  # every upload to it fails
    cm = make_pool(1 << 20, hosts=["dir:%s" % good, "dir:%s" % bad], redundancy=2)
    files = [write_file("f%d" % i, b"data %d" % i) for i in range(10)]
    results = cm.upload_many(files)
    assert all(results)
    stats = cm.stats()
    assert stats["queued"] == 10  # short of the target: still queued
    for digest in results:
        hosts = {u["host_name"]: u.get("error", False) for u in cm.info(digest)["uploads"]}
        assert hosts.get("dir:%s" % good) is False
    health = cm.host_status()["dir:%s" % bad]
    assert health["successes"] == 0 and health["failures"] >= 1
    # The breaker trips inside the batch: the bad host is not tried for every file.
    assert health["failures"] <= 10
    good_health = cm.host_status()["dir:%s" % good]
    assert good_health["successes"] == 10 and good_health["consecutive_failures"] == 0
    # The cached copies can be evicted: one host holds each.
    assert cm.evict(0) == 10


def test_failover_to_the_next_host(make_pool, write_file, tmp_path):
    bad = tmp_path / "hosts" / "bad"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("not a folder")
    hosts = ["dir:%s" % bad, "dir:%s" % (tmp_path / "hosts" / "h2")]
    cm = make_pool(1 << 20, hosts=hosts, redundancy=1)
    cm.engine.hosts["dir:%s" % bad].weight = 10.0  # tried first
    results = cm.upload_many([write_file("f%d" % i, b"v%d" % i) for i in range(5)])
    assert all(results)
    assert cm.stats()["queued"] == 0
    for digest in results:
        good = [u for u in cm.info(digest)["uploads"] if not u.get("error")]
        assert [u["host_name"] for u in good] == [hosts[1]]


def test_empty_list(make_pool):
    assert make_pool().upload_many([]) == []


def test_not_a_path(make_pool, write_file):
    cm = make_pool()
    f = write_file("ok", b"ok")
    assert cm.upload_many([None, f, 42]) == [False, sha(b"ok"), False]


def test_has_a_docstring():
    from cloudmanager import CloudManager

    doc = CloudManager.upload_many.__doc__
    assert ":return:" in doc and "defer" in doc


@pytest.mark.parametrize("fsync", [False, True])
def test_reopen_after_batch_is_consistent(make_pool, write_file, tmp_path, fsync):
    cm = make_pool(1 << 20, fsync=fsync, name="n%d" % fsync)
    files = [write_file("r%d" % i, b"reopen %d" % i) for i in range(12)]
    results = cm.upload_many(files, defer=True)
    cm.close()
    again = make_pool(1 << 20, fsync=fsync, name="n%d" % fsync)
    report = again.cache.reconcile(full=True)
    assert report["orphans_removed"] == 0 and report["missing_marked"] == 0
    for digest, f in zip(results, files):
        assert again.on_cache(digest)
        with open(again.cache.path_for(digest), "rb") as cached:
            assert cached.read() == f.read_bytes()


# -- durable batches (fsync on): a few filesystem syncs, not one per file -------------


@pytest.fixture
def syncs(monkeypatch):
    """The paths fsutil.sync_filesystem was called on (it still runs)."""
    calls = []
    real = fsutil.sync_filesystem
    monkeypatch.setattr(fsutil, "sync_filesystem", lambda path: (calls.append(path), real(path)))
    return calls


@pytest.mark.skipif(not fsutil.sync_filesystem_available(), reason="needs Linux 5.8+ syncfs")
def test_a_durable_batch_syncs_per_batch_and_group_not_per_file(make_pool, write_file,
                                                                tmp_path, syncs):
    host = FolderHost(str(tmp_path / "nas"), fsync=True)
    cm = make_pool(1 << 20, hosts=[host], redundancy=1, fsync=True)
    files = [write_file("d%d" % i, b"durable %d" % i) for i in range(200)]
    results = cm.upload_many(files)
    assert all(results) and cm.stats()["queued"] == 0
    cache_syncs = [p for p in syncs if p.startswith(cm.cache.root)]
    host_syncs = [p for p in syncs if p == host.root]
    groups = -(-len(files) // engine.BATCH_GROUP_WHOLE)
    assert len(cache_syncs) == 2 and len(host_syncs) == 2 * groups  # data, then renames
    for digest, f in zip(results, files):
        assert (tmp_path / "nas" / digest).read_bytes() == f.read_bytes()
    assert os.listdir(cm.cache.tmp_dir) == [] and cm.check()["clean"]


@pytest.mark.skipif(not fsutil.sync_filesystem_available(), reason="needs Linux 5.8+ syncfs")
def test_a_failed_batch_sync_falls_back_to_file_by_file(make_pool, write_file, tmp_path,
                                                        monkeypatch, caplog):
    def failing(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsutil, "sync_filesystem", failing)
    host = FolderHost(str(tmp_path / "nas"), fsync=True)
    cm = make_pool(1 << 20, hosts=[host], redundancy=1, fsync=True)
    files = [write_file("e%d" % i, b"eio %d" % i) for i in range(5)]
    results = cm.upload_many(files)  # one by one through upload(): an fsync per file
    assert results == [sha(f.read_bytes()) for f in files]
    assert "one by one" in caplog.text and cm.stats()["queued"] == 0
    assert os.listdir(cm.cache.tmp_dir) == [] and cm.check()["clean"]


@pytest.mark.parametrize("bug", ["raises", "short list", "not a result"])
def test_a_batch_host_bug_leaves_the_files_queued(make_pool, write_file, tmp_path, bug):
    class BuggyBatchHost(FolderHost):
        def upload_batch(self, items):
            if bug == "raises":
                raise RuntimeError("a bug in a host")
            if bug == "short list":
                return super().upload_batch(items)[:-1]
            return [None] * len(items)

    cm = make_pool(1 << 20, hosts=[BuggyBatchHost(str(tmp_path / "buggy"))], redundancy=1)
    files = [write_file("b%d" % i, b"bug %d" % i) for i in range(3)]
    results = cm.upload_many(files)
    assert all(results) and sorted(cm.db.queue.hashes()) == sorted(results)
    health = cm.db.health.all()["dir:" + str(tmp_path / "buggy")]
    assert "upload_batch" in health.last_error or "a bug in a host" in health.last_error


# -- a batch sent at once is recorded in its publish ------------------------------------


def traced(cm):
    """The statements every connection of ``cm`` runs from now on."""
    statements = []
    for conn in cm.db.local._all_connections:
        conn.set_trace_callback(statements.append)
    cm.db.connection.set_trace_callback(statements.append)
    return statements


def test_a_batch_sent_at_once_is_recorded_in_its_publish_and_never_queued_or_leased(
        make_pool, write_file):
    cm = make_pool(1 << 20, redundancy=3)
    cm.upload(write_file("warm", b"first upload opens everything"))
    files = [write_file("f%d" % i, b"sent at once %d" % i) for i in range(40)]
    statements = traced(cm)
    results = cm.upload_many(files)
    assert all(results)
    writes = [s for s in statements if s.lstrip().upper().startswith(("INSERT", "DELETE",
                                                                       "UPDATE"))]
    assert not [s for s in writes if "upload_queue" in s or "leases" in s], writes
    # The reservation, then the publish with the copies and the health: two.
    assert len([s for s in statements if s.lstrip().upper().startswith("BEGIN")]) == 2
    assert cm.stats()["queued"] == 0
    for digest in results:
        assert cm.db.files.verified(digest) == 3
        assert len(cm.info(digest)["uploads"]) == 3
    # Written once, protected: every one of them may be evicted.
    assert cm.evict(0) == len(files) + 1


def test_files_of_a_sent_batch_that_no_host_took_are_pending_on_this_node(make_pool,
                                                                          write_file, tmp_path):
    down = tmp_path / "hosts" / "down"
    down.parent.mkdir(parents=True, exist_ok=True)
    down.write_text("a file where the folder should be")  # every upload to it fails
    cm = make_pool(1 << 20, hosts=["dir:%s" % down], redundancy=1)
    files = [write_file("f%d" % i, b"kept here %d" % i) for i in range(12)]
    results = cm.upload_many(files)
    assert all(results)
    assert cm.stats()["queued"] == len(files)
    node = cm.pool.replication.node
    assert {row.queued_on for row in cm.db.files.unprotected(None)} == {node}
    assert cm.evict(0) == 0  # no host holds them: pinned
    down.unlink()
    down.mkdir()
    assert cm.sync()["complete"] == len(files)
    assert cm.evict(0) == len(files)


def test_a_batch_interrupted_between_its_uploads_and_its_publish_records_nothing(
        make_pool, write_file, tmp_path, monkeypatch):
    """The hosts hold the batch's objects, unrecorded; the pool is as before,
    its cache holds no temp file, and the next upload records the same objects."""
    from cloudmanager.cache import store

    cm = make_pool(1 << 20, redundancy=3)
    files = [write_file("f%d" % i, b"interrupted %d" % i) for i in range(8)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(store.CacheStore, "_publish_many", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cm.upload_many(files)
    assert cm.stats()["files"] == 0 and cm.usage_ratio() == 0
    assert os.listdir(cm.cache.tmp_dir) == []
    assert cm.db.sessions.reserved_bytes() == 0
    on_host = tmp_path / "hosts" / "h1"
    assert {p.name for p in on_host.iterdir() if not p.name.startswith(".")} \
        == {sha(f.read_bytes()) for f in files}
    results = cm.upload_many(files)
    assert results == [sha(f.read_bytes()) for f in files]
    assert all(cm.db.files.verified(d) == 3 for d in results)
    assert cm.verify(deep=True)["good"] == 3 * len(files)
