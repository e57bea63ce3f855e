"""CloudManager end to end: real SQLite, real directories, real subprocesses."""

import json
import logging
import os
import subprocess
import sys
import threading

import pytest

from cloudmanager import CloudManager
from cloudmanager.errors import CloudManagerError
from helpers import record_reads, sha



def plow_hosts(*modules):
    return ["plowshare:%s" % m for m in modules]


# -- upload / exists / on_cache / info -------------------------------------------


def test_upload_returns_hash_and_records_every_host(make_pool, write_file):
    cm = make_pool(redundancy=3)
    data = b"hello pool" * 100
    digest = cm.upload(write_file("a.txt", data))
    assert digest == sha(data)
    assert cm.exists(digest) and cm.on_cache(digest)
    info = cm.info(digest)
    assert info["filename"] == "a.txt" and info["filesize"] == str(len(data))
    assert info["version"] == "0.2" and info["datetime"].isdigit()
    assert len(info["uploads"]) == 3
    assert all(u["url"].startswith("file://") for u in info["uploads"])
    assert cm.stats()["queued"] == 0


def test_upload_of_missing_or_non_regular_file_returns_false_and_logs(make_pool, tmp_path, caplog):
    cm = make_pool()
    assert cm.upload(tmp_path / "nope") is False
    assert cm.upload(tmp_path) is False
    assert "upload of" in caplog.text and "failed" in caplog.text


def test_malformed_and_unknown_hashes(make_pool, caplog):
    cm = make_pool()
    for bad in ("../../etc/passwd", "0" * 63, None, 5):
        assert cm.warm_up(bad) is None
        assert cm.download(bad) is None
        assert cm.exists(bad) is False and cm.on_cache(bad) is False
        assert cm.info(bad) is None
    unknown = "ab" * 32
    assert cm.warm_up(unknown) is None and cm.info(unknown) is None
    assert "not in the pool" in caplog.text


def test_upload_is_deduplicated(make_pool, write_file):
    cm = make_pool()
    a = cm.upload(write_file("a", b"same"))
    b = cm.upload(write_file("b", b"same"))
    assert a == b
    assert cm.stats()["files"] == 1 and cm.stats()["cached_files"] == 1
    assert len(cm.info(a)["uploads"]) == 3
    assert os.listdir(os.path.join(cm.cache.root, "tmp")) == []  # the duplicate is gone


def test_names_with_spaces_and_non_ascii(make_pool, write_file, tmp_path, fake_plowshare):
    cm = make_pool(hosts=plow_hosts("alpha", "beta"), redundancy=2)
    data = "naïve café ☕".encode() * 50
    digest = cm.upload(write_file("my naïve file ☕.txt", data))
    assert digest == sha(data)
    assert cm.info(digest)["filename"] == "my naïve file ☕.txt"
    cm.evict(0)
    out = tmp_path / "out dir"
    out.mkdir()
    written = cm.download(digest, out)
    assert written == str(out / "my naïve file ☕.txt")
    assert (out / "my naïve file ☕.txt").read_bytes() == data


# -- the cache -------------------------------------------------------------------


def test_warm_up_hit_miss_and_usage_ratio(make_pool, write_file):
    cm = make_pool(capacity=1000)
    digest = cm.upload(write_file("f", b"x" * 250))
    assert cm.usage_ratio() == pytest.approx(0.25)
    path = cm.warm_up(digest)
    assert open(path, "rb").read() == b"x" * 250
    assert cm.evict(0) == 1
    assert not cm.on_cache(digest) and cm.usage_ratio() == 0
    again = cm.warm_up(digest)
    assert again == path and open(again, "rb").read() == b"x" * 250
    stats = cm.stats()
    assert stats["hits"] >= 1 and stats["misses"] >= 1
    assert stats["downloaded_bytes"]["total"] == 250


def test_a_warm_up_miss_reads_the_bytes_once(make_pool, write_file, tmp_path, monkeypatch):
    # Issue 12: the folder host hashes the bytes as it writes them into the
    # cache; nobody reads them again (the engine's tests cover memory and S3).
    cm = make_pool(capacity=1 << 20, redundancy=1)
    data = os.urandom(300_000)
    digest = cm.upload(write_file("f", data))
    assert cm.evict(0) == 1
    reads = record_reads(monkeypatch)

    path = cm.warm_up(digest)
    monkeypatch.undo()

    assert path and open(path, "rb").read() == data
    assert reads.hashed == []
    assert reads.under(tmp_path / "node" / "cache") == []
    assert [p for p in reads.opened if os.path.basename(p) == digest] == [
        cm.info(digest)["uploads"][0]["url"][len("file://"):]]


def test_lru_eviction_keeps_recently_used(make_pool, write_file):
    cm = make_pool(capacity=300)
    a = cm.upload(write_file("a", b"a" * 100))
    b = cm.upload(write_file("b", b"b" * 100))
    c = cm.upload(write_file("c", b"c" * 100))
    assert cm.warm_up(a)  # a becomes the most recently used
    d = cm.upload(write_file("d", b"d" * 100))
    assert [cm.on_cache(h) for h in (a, b, c, d)] == [True, False, True, True]
    assert cm.usage_ratio() == pytest.approx(1.0)


def test_capacity_is_never_exceeded(make_pool, write_file):
    cm = make_pool(capacity=1000)
    for i in range(30):
        assert cm.upload(write_file("f%d" % i, os.urandom(97 + i)))
        assert cm.stats()["cached_bytes"] <= 1000
    cached_on_disk = sum(
        e.stat().st_size for shard in os.scandir(cm.cache.root) if shard.name != "tmp"
        for e in os.scandir(shard.path))
    assert cached_on_disk == cm.stats()["cached_bytes"] <= 1000


def test_pinned_files_are_never_evicted(make_pool, write_file, fake_plowshare, caplog):
    fake_plowshare.faults("dead", down=True)
    cm = make_pool(capacity=300, hosts=plow_hosts("dead"), redundancy=1, host_cooldown=0)
    pinned = [cm.upload(write_file("p%d" % i, bytes([i]) * 100)) for i in range(3)]
    assert all(pinned), "upload returns the hash once the file is pinned and queued"
    assert cm.stats()["queued"] == 3
    # The cache is full of pinned files: a fourth file cannot be cached and
    # no host takes it, so it is not in the pool.
    assert cm.upload(write_file("p3", b"z" * 100)) is False
    assert "no host accepted" in caplog.text
    assert all(cm.on_cache(h) for h in pinned)
    assert cm.evict(0) == 0


def test_file_bigger_than_cache_goes_straight_to_hosts(make_pool, write_file, tmp_path):
    cm = make_pool(capacity=100, redundancy=2)
    data = os.urandom(5000)
    digest = cm.upload(write_file("big.bin", data))
    assert digest == sha(data)
    assert not cm.on_cache(digest) and cm.usage_ratio() == 0
    assert len(cm.info(digest)["uploads"]) == 2
    assert cm.warm_up(digest) is False  # it can never fit
    dest = tmp_path / "big-copy.bin"
    assert cm.download(digest, dest) == str(dest)
    assert dest.read_bytes() == data
    assert not list((tmp_path / "node" / "cache" / "tmp").iterdir())


def test_big_file_with_no_host_is_refused(make_pool, write_file, caplog):
    cm = make_pool(capacity=10, hosts=[])
    assert cm.upload(write_file("big", b"x" * 100)) is False
    assert "no host accepted" in caplog.text


# -- hosts: failures, corruption, sync ------------------------------------------------


def test_corrupt_host_is_never_served_and_is_marked_bad(make_pool, write_file, fake_plowshare):
    fake_plowshare.faults("liar", corrupt_download=True)
    cm = make_pool(hosts=plow_hosts("liar", "honest"), redundancy=2)
    data = b"precious bytes" * 10
    digest = cm.upload(write_file("f", data))
    for _ in range(3):
        cm.evict(0)
        path = cm.warm_up(digest)
        assert open(path, "rb").read() == data
    uploads = {u["host_name"]: u for u in cm.info(digest)["uploads"]}
    # The liar may not have been tried first every time, but once it was,
    # its copy is flagged and never tried again.
    if uploads["liar"].get("error"):
        assert cm.db.files.copies(digest) == 1


def test_corrupt_upload_is_caught_on_download(make_pool, write_file, fake_plowshare):
    fake_plowshare.faults("badstore", corrupt_upload=True)
    cm = make_pool(hosts=plow_hosts("badstore"), redundancy=1)
    digest = cm.upload(write_file("f", b"data" * 10))
    cm.evict(0)
    assert cm.warm_up(digest) is False
    assert cm.info(digest)["uploads"] == [
        {"host_name": "badstore", "url": cm.db.copies.of(digest)[0].url, "error": True}]


def test_partial_outage_is_repaired_by_sync(make_pool, write_file, fake_plowshare):
    fake_plowshare.faults("b", down=True)
    fake_plowshare.faults("c", down=True)
    cm = make_pool(hosts=plow_hosts("a", "b", "c"), redundancy=3)
    digest = cm.upload(write_file("f", b"payload"))
    info = cm.info(digest)
    assert sorted(u["host_name"] for u in info["uploads"] if not u.get("error")) == ["a"]
    assert sorted(u["host_name"] for u in info["uploads"] if u.get("error")) == ["b", "c"]
    assert cm.stats()["below_target"] == 1 and cm.stats()["queued"] == 1
    fake_plowshare.clear()
    summary = cm.sync()
    assert summary["uploads"] == 2 and summary["complete"] == 1 and summary["short"] == 0
    info = cm.info(digest)
    assert sorted(u["host_name"] for u in info["uploads"]) == ["a", "b", "c"]
    assert not any(u.get("error") for u in info["uploads"])
    assert cm.stats()["queued"] == 0 and cm.stats()["below_target"] == 0


def test_total_outage_keeps_file_pinned_and_queued_until_sync(make_pool, write_file,
                                                              fake_plowshare):
    for m in ("a", "b"):
        fake_plowshare.faults(m, down=True)
    cm = make_pool(capacity=200, hosts=plow_hosts("a", "b"), redundancy=2)
    digest = cm.upload(write_file("f", b"q" * 150))
    assert digest and cm.on_cache(digest)
    assert cm.stats()["queued"] == 1
    assert cm.evict(0) == 0  # pinned
    fake_plowshare.clear()
    assert cm.sync()["complete"] == 1
    assert cm.evict(0) == 1  # no longer pinned


def test_sync_tops_up_from_another_host_when_not_cached(make_pool, write_file, tmp_path):
    hosts = ["dir:%s" % (tmp_path / "hosts" / h) for h in ("h1", "h2", "h3")]
    cm = make_pool(hosts=hosts[:1], redundancy=1)
    digest = cm.upload(write_file("f", b"top me up"))
    cm.evict(0)
    cm.close()
    cm = make_pool(hosts=hosts, redundancy=3)
    assert cm.stats()["below_target"] == 1
    summary = cm.sync()
    assert summary["uploads"] == 2 and summary["complete"] == 1
    for h in ("h1", "h2", "h3"):
        assert (tmp_path / "hosts" / h / digest).read_bytes() == b"top me up"


def test_deferred_uploads_wait_for_sync(make_pool, write_file, tmp_path):
    cm = make_pool(defer_uploads=True, redundancy=2)
    digest = cm.upload(write_file("f", b"later"))
    assert cm.info(digest)["uploads"] == [] and cm.stats()["queued"] == 1
    assert not (tmp_path / "hosts" / "h1" / digest).exists()
    assert cm.sync()["uploads"] == 2
    assert cm.stats()["queued"] == 0


def test_slow_host_times_out_and_others_are_used(make_pool, write_file, fake_plowshare):
    fake_plowshare.faults("slow", slow=30)
    cm = make_pool(hosts=plow_hosts("slow", "quick"), redundancy=1, host_timeout=1)
    digest = cm.upload(write_file("f", b"x"))
    hosts = {u["host_name"] for u in cm.info(digest)["uploads"] if not u.get("error")}
    assert hosts == {"quick"}


# -- node sync: dump and load ---------------------------------------------------------


def test_two_nodes_share_files_by_dump_and_load(make_pool, write_file, tmp_path, fake_plowshare):
    hosts = plow_hosts("m1", "m2")
    node_a = make_pool(name="a", hosts=hosts, redundancy=2)
    node_b = make_pool(name="b", hosts=hosts, redundancy=2)
    data = b"shared between nodes"
    digest = node_a.upload(write_file("shared.txt", data))
    dump = node_a.data_dump()
    assert isinstance(json.loads(dump), list)
    assert node_b.data_load(dump) == 1
    assert node_b.data_load(dump) == 0  # idempotent
    assert node_b.exists(digest) and not node_b.on_cache(digest)
    assert open(node_b.warm_up(digest), "rb").read() == data
    assert node_b.info(digest)["filename"] == "shared.txt"


def test_merge_is_a_union_of_upload_lists(make_pool, write_file, tmp_path):
    hosts = ["dir:%s" % (tmp_path / "hosts" / h) for h in ("h1", "h2")]
    node_a = make_pool(name="a", hosts=hosts[:1], redundancy=1)
    node_b = make_pool(name="b", hosts=hosts[1:], redundancy=1)
    digest = node_a.upload(write_file("f", b"both"))
    assert node_b.upload(write_file("g", b"both")) == digest
    assert node_a.data_load(node_b.data_dump()) == 1
    assert node_b.data_load(node_a.data_dump()) == 1
    for node in (node_a, node_b):
        assert sorted(u["host_name"] for u in node.info(digest)["uploads"]) == sorted(hosts)
    # Each node keeps its own name for the file: local knowledge wins.
    assert node_a.info(digest)["filename"] == "f" and node_b.info(digest)["filename"] == "g"


def test_data_load_bad_input_never_raises(make_pool, caplog):
    cm = make_pool()
    for text in ("", "not json", "42", '"str"', "null", b"\xff\xfe", None, 12):
        assert cm.data_load(text) is None
    assert cm.data_load("[]") == 0
    good = {"version": "0.2", "datetime": "1", "filename": "x", "filesize": "3",
            "filehash": "ab" * 32, "uploads": []}
    bad = [
        {**good, "filehash": "../../etc"},
        {**good, "filesize": "-1"},
        {**good, "version": "9"},
        "string", 5, None, [],
    ]
    assert cm.data_load(json.dumps(bad + [good])) == 1
    assert cm.stats()["files"] == 1
    assert "skipping record" in caplog.text


def test_hostile_records_cannot_escape_or_inject(make_pool, tmp_path, fake_plowshare):
    cm = make_pool(hosts=plow_hosts("m"), redundancy=1)
    marker = tmp_path / "pwned"
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\ntouch %s\n" % marker)
    prog.chmod(0o755)
    digest = "cd" * 32
    record = {"version": "0.2", "datetime": "1", "filename": "../../../../tmp/evil",
              "filesize": "4", "filehash": digest,
              "uploads": [{"host_name": "m", "url": "--run-after=%s" % prog},
                          {"host_name": "m", "url": "-o/"},
                          {"host_name": "m; rm -rf /", "url": "http://x.fake/dl/0"},
                          {"host_name": "m", "url": "file:///etc/passwd"}]}
    assert cm.data_load(json.dumps([record])) == 1
    info = cm.info(digest)
    assert info["filename"] == "evil"
    # Only the file:// URL survived validation; no configured host accepts it.
    assert [u["url"] for u in info["uploads"]] == ["file:///etc/passwd"]
    assert cm.warm_up(digest) is False
    out = tmp_path / "out"
    out.mkdir()
    assert cm.download(digest, out) is False
    assert not marker.exists()
    assert os.listdir(out) == []
    assert not any(e["tool"] == "plowdown" for e in fake_plowshare.log())


def test_v01_records_and_int_fields_are_read(make_pool):
    cm = make_pool()
    old = {"version": "0.1", "datetime": 1391212800, "filesize": 23124,
           "filehash": "6e163442e29ec8d7538bc86fe2c4a48778e8ae2254632f0889da753b1c357b1b",
           "uploads": [{"host_name": "mediafire", "url": "http://www.mediafire.com/?qorncpzfe74s9"},
                       {"host_name": "anonfiles", "error": True}]}
    assert cm.data_load(json.dumps(old)) == 1
    info = cm.info(old["filehash"])
    assert info["filesize"] == "23124" and info["datetime"] == "1391212800"
    assert info["filename"] == ""
    assert {"host_name": "anonfiles", "error": True} in info["uploads"]


def test_streaming_dump_and_load(make_pool, write_file, tmp_path):
    cm = make_pool()
    digests = {cm.upload(write_file("f%d" % i, b"%d" % i)) for i in range(20)}
    path = tmp_path / "dump.json"
    with open(path, "w", encoding="utf-8") as f:
        assert cm.dump_to(f) == 20
    other = make_pool(name="other")
    with open(path, encoding="utf-8") as f:
        assert other.load_from(f) == 20
    assert all(other.exists(h) for h in digests)


# -- lifetime, persistence, concurrency -----------------------------------------------


def test_persistence_across_reopen(make_pool, write_file, tmp_path):
    cm = make_pool(capacity=1000)
    digest = cm.upload(write_file("f", b"persist" * 10))
    cm.warm_up(digest)
    cm.close()
    cm.close()  # twice is harmless
    again = make_pool(capacity=1000)
    assert again.exists(again.info(digest)["filehash"])
    assert again.on_cache(digest)
    assert again.usage_ratio() == pytest.approx(70 / 1000)
    assert again.stats()["hits"] >= 1


def test_context_manager_closes(tmp_path, write_file):
    with CloudManager(tmp_path / "db", tmp_path / "cache", 1000,
                      hosts=["dir:%s" % (tmp_path / "h")], redundancy=1) as cm:
        digest = cm.upload(write_file("f", b"ctx"))
    with pytest.raises(CloudManagerError):
        cm.db.files.exists(digest)


def test_construction_errors_are_clear(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CloudManagerError, match="not a directory"):
        CloudManager(tmp_path / "db", tmp_path / "afile", 100, hosts=[])
    with pytest.raises(CloudManagerError, match="positive"):
        CloudManager(tmp_path / "db", tmp_path / "c", 0, hosts=[])
    with pytest.raises(CloudManagerError, match="unknown host kind"):
        CloudManager(tmp_path / "db", tmp_path / "c", 100, hosts=["ftp:whatever"])
    with pytest.raises(CloudManagerError, match="redundancy"):
        CloudManager(tmp_path / "db", tmp_path / "c", 100, hosts=[], redundancy=0)


def test_default_hosts_are_plowshare_wrapper_modules(tmp_path, fake_plowshare):
    from plowshare import hosts as wrapper_hosts

    with CloudManager(tmp_path / "db", tmp_path / "c", 100) as cm:
        assert sorted(cm.engine.hosts) == sorted(wrapper_hosts.anonymous)


def test_threads_share_one_instance(make_pool, write_file, caplog):
    cm = make_pool(capacity=4000)
    payloads = [os.urandom(100 + i) for i in range(40)]
    paths = [write_file("t%d" % i, p) for i, p in enumerate(payloads)]
    results, errors = {}, []

    def work(i):
        try:
            digest = cm.upload(paths[i])
            results[i] = digest
            got = cm.warm_up(digest)
            # With 40 uploads in flight, the cache (smaller than their sum) may
            # be full of files no host holds yet: then warm_up says so, and
            # returns False (the seed's value); a path it returns is right.
            assert got is False or open(got, "rb").read() == payloads[i]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(results[i] == sha(p) for i, p in enumerate(payloads))
    assert cm.stats()["cached_bytes"] <= 4000
    refused = [r for r in caplog.records if r.message.startswith("warm_up of")]
    assert all("pinned or in flight" in r.message for r in refused)
    for i, p in enumerate(payloads):  # once the uploads are done, every file comes back
        assert open(cm.warm_up(results[i]), "rb").read() == p


WORKER = r"""
import os, sys
from cloudmanager import CloudManager
base, hosts, idx, database = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
with CloudManager(database, os.path.join(base, "cache"), 3000,
                  hosts=hosts, redundancy=2, fsync=False) as cm:
    for i in range(15):
        data = ("%d-%d" % (idx, i)).encode() * 20
        src = os.path.join(base, "src-%d-%d" % (idx, i))
        with open(src, "wb") as f:
            f.write(data)
        digest = cm.upload(src)
        assert digest, "upload failed"
        got = cm.warm_up(digest)
        assert got and open(got, "rb").read() == data, "bad bytes"
        print(digest)
"""


def test_two_processes_share_one_pool(tmp_path, pool_catalog):
    base = tmp_path / "shared"
    base.mkdir()
    database = pool_catalog.database(base)
    hosts = ",".join("dir:%s" % (tmp_path / h) for h in ("h1", "h2"))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(base), hosts, str(i), database],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    digests = {line for out, _ in outs for line in out.split()}
    assert len(digests) == 30
    with CloudManager(database, base / "cache", 3000,
                      hosts=hosts.split(","), redundancy=2) as cm:
        stats = cm.stats()
        assert stats["files"] == 30 and stats["cached_bytes"] <= 3000
        assert all(cm.exists(d) for d in digests)
        on_disk = sum(e.stat().st_size for s in os.scandir(cm.cache.root) if s.name != "tmp"
                      for e in os.scandir(s.path))
        assert on_disk == stats["cached_bytes"]


def test_failures_are_logged_with_a_cause(make_pool, write_file, caplog, fake_plowshare):
    fake_plowshare.faults("x", down=True)
    cm = make_pool(hosts=plow_hosts("x"), redundancy=1, capacity=10)
    caplog.clear()
    assert cm.upload(write_file("f", b"y" * 50)) is False
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and "no host accepted" in errors[-1].getMessage()
    assert "exited with 3" in caplog.text


def test_stats_has_every_figure(make_pool, write_file):
    cm = make_pool()
    cm.upload(write_file("f", b"s" * 10))
    stats = cm.stats()
    for key in ("files", "cached_files", "cached_bytes", "capacity", "usage_ratio", "queued",
                "below_target", "uploaded_bytes", "downloaded_bytes", "hits", "misses",
                "transfers", "hosts"):
        assert key in stats
    assert stats["uploaded_bytes"]["total"] == stats["uploaded_bytes"]["this_month"] == 30
    assert len(stats["hosts"]) == 3


def test_help_documents_the_api():
    import pydoc

    text = pydoc.render_doc(CloudManager, renderer=pydoc.plaintext)
    for name in ("upload", "warm_up", "download", "exists", "on_cache", "usage_ratio",
                 "info", "sync", "data_dump", "data_load", "close", "stats"):
        assert name in text
        assert getattr(CloudManager, name).__doc__, name


def test_a_cached_file_deleted_behind_our_back_is_noticed(make_pool, write_file):
    cm = make_pool(capacity=1000)
    digest = cm.upload(write_file("f", b"gone soon"))
    os.unlink(cm.cache.path_for(digest))
    assert cm.on_cache(digest) is False
    assert cm.stats()["cached_bytes"] == 0
    assert open(cm.warm_up(digest), "rb").read() == b"gone soon"  # fetched again


# -- trust in imported records (regressions from review) ------------------------------


def test_an_imported_claim_does_not_unpin_a_file_no_host_of_ours_holds(make_pool, write_file,
                                                                       fake_plowshare):
    fake_plowshare.faults("dead", down=True)
    cm = make_pool(capacity=300, hosts=plow_hosts("dead"), redundancy=1, host_cooldown=0)
    data = b"only copy" * 10
    digest = cm.upload(write_file("f", data))
    claim = {"version": "0.2", "datetime": "1", "filename": "f", "filesize": str(len(data)),
             "filehash": digest,
             "uploads": [{"host_name": "evil", "url": "http://example.invalid/x"}]}
    assert cm.data_load(json.dumps([claim])) == 1
    assert cm.evict(0) == 0, "an unverified claim must not make the only copy evictable"
    cm.sync()  # the dead host still fails: the file stays pinned and queued
    assert cm.stats()["queued"] == 1 and cm.evict(0) == 0
    for i in range(3):  # pressure: other files cannot push it out
        cm.upload(write_file("g%d" % i, bytes([i]) * 100))
    assert open(cm.warm_up(digest), "rb").read() == data
    fake_plowshare.clear()
    cm.sync()  # one copy of our own: now it may go
    assert cm.db.files.verified(digest) == 1 and cm.stats()["queued"] == 0


def test_a_verified_download_makes_an_imported_copy_trusted(make_pool, write_file, tmp_path):
    hosts = ["dir:%s" % (tmp_path / "hosts" / "shared")]
    node_a = make_pool(name="a", hosts=hosts, redundancy=1)
    node_b = make_pool(name="b", hosts=hosts, redundancy=1)
    digest = node_a.upload(write_file("f", b"from a"))
    node_b.data_load(node_a.data_dump())
    assert node_b.db.files.verified(digest) == 0
    assert node_b.warm_up(digest)
    assert node_b.db.files.verified(digest) == 1
    assert node_b.evict(0) == 1


def test_a_poisoned_size_is_corrected_by_the_real_file(make_pool, write_file, tmp_path):
    cm = make_pool(capacity=100, redundancy=1)
    data = os.urandom(5000)
    digest = sha(data)
    lie = {"version": "0.2", "datetime": "1", "filename": "x", "filesize": "7",
           "filehash": digest, "uploads": []}
    assert cm.data_load(json.dumps([lie])) == 1
    assert cm.upload(write_file("big", data)) == digest  # bigger than the cache
    assert cm.info(digest)["filesize"] == "5000"
    dest = tmp_path / "copy"
    assert cm.download(digest, dest) == str(dest) and dest.read_bytes() == data
    assert not any(u.get("error") for u in cm.info(digest)["uploads"])


def test_a_lying_size_does_not_get_good_copies_marked_bad(make_pool, write_file, tmp_path):
    hosts = ["dir:%s" % (tmp_path / "hosts" / "h")]
    node_a = make_pool(name="a", hosts=hosts, redundancy=1)
    node_b = make_pool(name="b", hosts=hosts, redundancy=1, capacity=1000)
    digest = node_a.upload(write_file("f", b"z" * 600))
    record = json.loads(node_a.data_dump())[0]
    record["filesize"] = "10"
    node_b.data_load(json.dumps([record]))
    assert node_b.warm_up(digest) is False
    assert node_b.db.files.copies(digest) == 1, "the copy is fine: the record lied"
    leftovers = list((tmp_path / "b" / "cache" / "tmp").iterdir())
    assert leftovers == []


def test_load_from_never_raises_on_deep_nesting(make_pool):
    import io

    cm = make_pool()
    assert cm.load_from(io.StringIO("[" * 100000 + "]" * 100000)) is None
    assert cm.data_load("[" * 100000 + "]" * 100000) is None


def test_upload_of_a_non_path_returns_false(make_pool, caplog):
    cm = make_pool()
    assert cm.upload(None) is False and "not a path" in caplog.text


def test_pin_keeps_a_file_through_eviction(make_pool, write_file):
    cm = make_pool(capacity=200)
    keep = cm.upload(write_file("keep", b"k" * 100))
    assert cm.pin(keep) is True
    cm.upload(write_file("a", b"a" * 100))
    cm.upload(write_file("b", b"b" * 100))
    assert cm.on_cache(keep)
    assert cm.pin(keep, False) is True and cm.evict(0) == 2
    assert cm.pin("ab" * 32) is False and cm.pin("nonsense") is False


def test_hits_and_misses_count_each_request_once(make_pool, write_file, tmp_path):
    hosts = ["dir:%s" % (tmp_path / "hosts" / h) for h in ("h1", "h2")]
    cm = make_pool(capacity=1000, hosts=hosts[:1], redundancy=1)
    digest = cm.upload(write_file("f", b"count me"))
    cm.evict(0)
    before = cm.stats()
    assert cm.warm_up(digest)  # one miss, fetched from the host
    assert cm.warm_up(digest)  # one hit
    after = cm.stats()
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 1)
    cm.close()
    # A top-up reads the cached copy but is not a use of it.
    cm = make_pool(capacity=1000, hosts=hosts, redundancy=2)
    last_access = cm.db.cache_index.entry(digest).last_access
    assert cm.sync()["uploads"] == 1
    stats = cm.stats()
    assert (stats["hits"], stats["misses"]) == (after["hits"], after["misses"])
    assert cm.db.cache_index.entry(digest).last_access == last_access


def test_download_to_a_relative_path(make_pool, write_file, tmp_path, monkeypatch):
    cm = make_pool()
    digest = cm.upload(write_file("rel.txt", b"relative"))
    monkeypatch.chdir(tmp_path)
    for cached in (True, False):  # from the cache, and streamed from a host
        if not cached:
            cm.evict(0)
        assert cm.download(digest, "copy.txt") == str(tmp_path / "copy.txt")
        assert (tmp_path / "copy.txt").read_bytes() == b"relative"


def test_upload_reports_the_bytes_it_reads_for_progress_bars(make_pool, write_file):
    cm = make_pool(capacity=64 << 20)
    for size in (5000, 9 << 20):  # the plain copy, and the pipelined one
        seen = []
        data = os.urandom(size)
        assert cm.upload(write_file("p%d" % size, data), progress=seen.append)
        assert sum(seen) == size and len(seen) >= 1
    seen = []
    big = write_file("batch-big", os.urandom(9 << 20))
    assert all(cm.upload_many([write_file("b1", b"small"), big], progress=seen.append))
    assert sum(seen) == 9 << 20  # the large file, chunk by chunk; the small one in one go


def test_an_upload_racing_remove_is_not_lost(make_pool, write_file, tmp_path, pool_catalog):
    """Another instance (as another process would) uploads the same bytes
    while remove() deletes the copies: the re-added file must survive."""
    cm = make_pool(hosts=["dir:%s" % (tmp_path / "h1")], redundancy=1)
    other = CloudManager(pool_catalog.database(tmp_path / "node"), tmp_path / "node" / "cache",
                         1 << 20,
                         hosts=["dir:%s" % (tmp_path / "h1")], redundancy=1, fsync=False)
    source = write_file("raced.txt", b"uploaded twice, removed once")
    digest = cm.upload(source)
    real_delete = cm.engine.delete

    def delete_after_a_concurrent_upload(location):
        assert other.upload(source) == digest  # lands between forget and delete
        return real_delete(location)

    cm.engine.delete = delete_after_a_concurrent_upload
    try:
        assert cm.remove(digest)["deleted"]
    finally:
        cm.engine.delete = real_delete
    assert cm.exists(digest)
    assert cm.evict(0) == 0  # the cached copy is the only one: pinned
    assert cm.sync()["uploads"] == 1
    assert (tmp_path / "h1" / digest).read_bytes() == b"uploaded twice, removed once"
    cm.evict(0)
    assert open(cm.warm_up(digest), "rb").read() == b"uploaded twice, removed once"
    other.close()


def test_download_never_replaces_other_bytes_unless_asked(make_pool, write_file, tmp_path,
                                                          caplog):
    cm = make_pool()
    data = b"the pool's bytes"
    digest = cm.upload(write_file("kept.txt", data))
    assert cm.replication([digest, "0" * 64]) == {  # three hosts; the unknown hash left out
        digest: {"copies": 3, "verified": 3, "target": 3, "last_error": None}}
    theirs = tmp_path / "theirs.txt"
    theirs.write_bytes(b"someone else's")
    with caplog.at_level(logging.ERROR, logger="cloudmanager"):
        assert cm.download(digest, theirs) is False
    assert "holds other bytes" in caplog.text and str(theirs) in caplog.text
    assert theirs.read_bytes() == b"someone else's"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    # The same bytes: left as they are, and a success.
    assert cm.download(digest, theirs, overwrite=True) == str(theirs)
    assert theirs.read_bytes() == data
    assert cm.download(digest, theirs) == str(theirs)
    # A trailing separator makes the directory; a missing parent is named.
    assert cm.download(digest, str(tmp_path / "made") + os.sep) == str(tmp_path / "made" /
                                                                       "kept.txt")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="cloudmanager"):
        assert cm.download(digest, tmp_path / "no" / "where.txt") is False
    assert "no/where.txt" in caplog.text and ".tmp" not in caplog.text
