"""verify(), remove(), unreachable() and the circuit breaker, on real pools.

Hosts are folders (real files) and in-memory stores, so lost and corrupted
copies can be staged exactly; sync() then has to repair them.
"""

import json
import os
import time
import uuid

import pytest

from cloudmanager.db.health import Outcome

from cloudmanager.errors import InvalidInputError
from cloudmanager.hosts.memory import MemoryHost


@pytest.fixture
def stores():
    """Three fresh in-memory hosts."""
    return [MemoryHost(uuid.uuid4().hex, name=n) for n in ("m1", "m2", "m3")]


@pytest.fixture
def pool(make_pool, stores):
    return make_pool(capacity=1 << 20, hosts=stores, redundancy=2)


def object_of(host, digest):
    return host.objects.get(digest)


def holders(cm, digest):
    return sorted(u.host_name for u in cm.db.copies.of(digest) if not u.error)


def test_verify_finds_a_lost_copy_and_sync_restores_it(pool, stores, write_file):
    digest = pool.upload(write_file("a", b"keep me safe"))
    first = holders(pool, digest)
    assert len(first) == 2
    lost = next(h for h in stores if h.name == first[0])
    del lost.objects[digest]
    summary = pool.verify()
    assert summary["checked"] == 2 and summary["missing"] == 1 and summary["good"] == 1
    assert pool.db.files.copies(digest) == 1
    assert pool.stats()["below_target"] == 1
    pool.evict(0)  # the repair must come from the remaining host, not the cache
    assert not pool.on_cache(digest)
    result = pool.sync()
    assert result["uploads"] == 1 and result["complete"] == 1
    assert pool.db.files.copies(digest) == 2
    assert pool.verify()["good"] == 2


def test_verify_marks_a_corrupt_copy_bad_by_its_stored_checksum(pool, stores, write_file):
    digest = pool.upload(write_file("a", b"original bytes"))
    bad_host = next(h for h in stores if h.name == holders(pool, digest)[0])
    bad_host.objects[digest] = b"Original bytes"  # same size, other bytes
    summary = pool.verify()
    assert summary["bad"] == 1 and summary["good"] == 1
    assert bad_host.name not in holders(pool, digest)


def test_deep_verify_downloads_and_hashes(make_pool, tmp_path, write_file):
    # Folder hosts report only sizes: a same-size corruption needs deep.
    hosts = ["dir:%s" % (tmp_path / ("h%d" % i)) for i in range(2)]
    cm = make_pool(hosts=hosts, redundancy=2)
    digest = cm.upload(write_file("a", b"x" * 1000))
    victim = tmp_path / "h0" / digest
    victim.write_bytes(b"y" * 1000)
    assert cm.verify()["good"] == 2  # sizes match: the cheap check cannot tell
    summary = cm.verify(deep=True)
    assert summary == dict(summary, checked=2, good=1, bad=1)
    assert holders(cm, digest) == ["dir:%s" % (tmp_path / "h1")]
    assert cm.sync()["uploads"] == 1
    assert victim.read_bytes() == b"x" * 1000  # rewritten from a good copy


def test_verify_limits_by_hash_host_count_and_age(pool, stores, write_file):
    digests = [pool.upload(write_file("f%d" % i, b"file %d" % i)) for i in range(4)]
    # Least recently checked first: budgeted passes move through the pool.
    assert pool.verify(limit=3)["checked"] == 3
    assert pool.verify(older_than=3600)["checked"] == 5  # the 8 copies not yet seen
    assert pool.verify(older_than=3600)["checked"] == 0
    time.sleep(1.1)
    assert pool.verify(older_than=1)["checked"] == 8
    assert pool.verify(hashes=[digests[0]])["checked"] == 2
    on_m1 = [d for d in digests if "m1" in holders(pool, d)]
    assert pool.verify(hosts=["m1"])["checked"] == len(on_m1)
    assert pool.verify(hosts=["nowhere"])["checked"] == 0


def test_verify_reports_hosts_it_cannot_reach_or_are_down(pool, stores, write_file):
    digest = pool.upload(write_file("a", b"data"))
    record = pool.info(digest)
    record["uploads"].append({"host_name": "elsewhere", "url": "s3://other-bucket/" + digest})
    pool.data_load(json.dumps([record]))
    down = next(h for h in stores if h.name in holders(pool, digest))
    down.faults["down"] = True
    summary = pool.verify()
    assert summary["unreachable"] == 1 and summary["error"] == 1 and summary["good"] == 1
    assert pool.db.files.copies(digest) == 3  # an outage is not a lost copy


def test_a_host_that_keeps_failing_cools_down_then_is_tried_again(make_pool, write_file,
                                                                  caplog):
    flaky = MemoryHost(uuid.uuid4().hex, name="flaky")
    steady = MemoryHost(uuid.uuid4().hex, name="steady")
    cm = make_pool(hosts=[flaky, steady], redundancy=2, host_cooldown=60,
                   defer_uploads=True)
    flaky.faults["down"] = True
    digests = [cm.upload(write_file("f%d" % i, b"f%d" % i)) for i in range(5)]
    for _ in range(3):
        cm.sync()  # a batch of 5 that fails on flaky counts once
    status = cm.host_status()["flaky"]
    assert status["state"] == "cooling" and status["consecutive_failures"] == 3
    assert status["retry_after"] > time.time()
    assert cm.db.health.all()["flaky"].failures == 3
    # An upload that is not an explicit command skips the cooling host.
    cm.upload(write_file("later", b"later"), defer=False)
    assert cm.db.health.all()["flaky"].failures == 3
    assert "cooling down after repeated failures: flaky" in caplog.text
    # Fixed, an explicit sync tries it at once (a probe), and it recovers.
    flaky.faults["down"] = False
    cm.sync()
    assert cm.host_status()["flaky"]["state"] == "ok"
    assert all(cm.db.files.verified(d) == 2 for d in digests)
    assert cm.stats()["hosts"]["steady"]["latency_ms"] is not None


def test_cm_hosts_retry_forgets_the_streak_for_every_process(make_pool, write_file):
    flaky = MemoryHost(uuid.uuid4().hex, name="flaky")
    cm = make_pool(hosts=[flaky], redundancy=1, defer_uploads=True)
    flaky.faults["down"] = True
    cm.upload(write_file("f", b"f"))
    for _ in range(3):
        cm.sync()
    assert cm.host_status()["flaky"]["state"] == "cooling"
    assert cm.retry_hosts(["flaky"]) == ["flaky"]
    assert cm.host_status()["flaky"]["consecutive_failures"] == 0
    with pytest.raises(InvalidInputError):
        cm.retry_hosts(["nobody"])


def test_cooling_hosts_are_still_tried_last_for_downloads(make_pool, write_file):
    only = MemoryHost(uuid.uuid4().hex, name="only")
    cm = make_pool(hosts=[only], redundancy=1, host_cooldown=3600)
    digest = cm.upload(write_file("a", b"the only copy"))
    for _ in range(3):
        cm.db.health.record({"only": [Outcome(False, None, "seeded", time.time())]})
    assert cm.host_status()["only"]["state"] == "cooling"
    cm.evict(0)
    assert open(cm.warm_up(digest), "rb").read() == b"the only copy"


def test_remove_deletes_copies_cache_and_record(make_pool, tmp_path, write_file, fake_plowshare):
    from cloudmanager.hosts.plowshare import PlowshareHost

    hosts = ["dir:%s" % (tmp_path / "nas"), PlowshareHost("locker", timeout=30)]
    cm = make_pool(hosts=hosts, redundancy=2)
    digest = cm.upload(write_file("a", b"to be removed"))
    keep = cm.upload(write_file("b", b"to be kept"))
    assert (tmp_path / "nas" / digest).exists() and cm.on_cache(digest)
    used = cm.stats()["cached_bytes"]
    result = cm.remove(digest)
    assert [h for h, _ in result["deleted"]] == ["dir:%s" % (tmp_path / "nas")]
    assert [h for h, _ in result["kept"]] == ["locker"]  # a locker cannot delete
    assert not (tmp_path / "nas" / digest).exists()
    assert not cm.exists(digest) and not cm.on_cache(digest)
    assert not os.path.exists(cm.cache.path_for(digest))
    assert cm.stats()["cached_bytes"] == used - len(b"to be removed")
    assert cm.info(digest) is None and digest not in cm.data_dump()
    assert cm.remove(digest) is None and cm.remove("not a hash") is None
    assert cm.warm_up(keep)


def test_unreachable_lists_imported_files_no_host_here_can_fetch(make_pool, tmp_path,
                                                                  write_file, caplog):
    node_a = make_pool(name="a", hosts=["dir:%s" % (tmp_path / "a-only")], redundancy=1)
    node_b = make_pool(name="b", hosts=[MemoryHost(uuid.uuid4().hex, name="b-mem")],
                       redundancy=1)
    digest = node_a.upload(write_file("a", b"from node a"))
    mine = node_b.upload(write_file("b", b"node b's own"))
    assert node_b.data_load(node_a.data_dump()) == 1
    assert "only on hosts this node has not configured" in caplog.text
    assert node_b.exists(digest)
    assert node_b.unreachable() == {digest: ["dir:%s" % (tmp_path / "a-only")]}
    assert node_b.warm_up(digest) is False  # kept, reported, not fetchable
    # Once node b configures a host of that name, the copy is reachable.
    node_b2 = make_pool(name="b", hosts=["dir:%s" % (tmp_path / "a-only")], redundancy=1)
    assert node_b2.unreachable() == {}
    assert open(node_b2.warm_up(digest), "rb").read() == b"from node a"
    assert mine not in node_b2.unreachable()


def test_a_missing_host_folder_is_an_outage_not_lost_copies(make_pool, tmp_path, write_file):
    hosts = ["dir:%s" % (tmp_path / "nas"), "dir:%s" % (tmp_path / "usb")]
    cm = make_pool(hosts=hosts, redundancy=2)
    digests = [cm.upload(write_file("f%d" % i, b"file %d" % i)) for i in range(3)]
    (tmp_path / "nas").rename(tmp_path / "nas-unmounted")
    summary = cm.verify()
    assert summary["missing"] == 0 and summary["error"] == 3 and summary["good"] == 3
    assert all(cm.db.files.copies(d) == 2 for d in digests)
    cm.evict(0)
    assert cm.warm_up(digests[0])  # served by the other host
    assert cm.db.files.copies(digests[0]) == 2


def test_budgeted_verify_moves_past_copies_it_cannot_check(pool, stores, write_file):
    digests = [pool.upload(write_file("f%d" % i, b"file %d" % i)) for i in range(3)]
    for host in stores:
        host.faults["down"] = True
    seen = [pool.verify(limit=2) for _ in range(3)]
    assert [s["error"] + s["cooling"] for s in seen] == [2, 2, 2]
    for host in stores:
        host.faults["down"] = False
    # close the breakers the outage opened
    pool.db.health.record({name: [Outcome(True, None, None, time.time())]
                           for name in ("m1", "m2", "m3")})
    assert pool.verify(older_than=0)["good"] == 6
    assert all(pool.db.files.copies(d) == 2 for d in digests)


def test_verify_takes_any_number_of_hashes(pool, write_file):
    digest = pool.upload(write_file("a", b"needle"))
    haystack = ["%064x" % i for i in range(40_000)] + [digest]
    assert pool.verify(hashes=haystack)["good"] == 2


def test_a_host_of_the_same_kind_never_marks_another_nodes_copy_bad(make_pool, write_file):
    # Node a records copies on its store "a"; node b's host accepts such URLs
    # only if it is that store. A same-named store elsewhere would not; a
    # foreign host that serves a miss must not condemn the record.
    shared = uuid.uuid4().hex
    node_a = make_pool(name="a", hosts=[MemoryHost(shared, name="a-mem")], redundancy=1)
    digest = node_a.upload(write_file("f", b"node a's file"))
    impostor = MemoryHost(shared, name="b-mem")  # accepts a's URLs, lacks the object
    impostor.objects.pop(digest)
    node_b = make_pool(name="b", hosts=[impostor], redundancy=1)
    node_b.data_load(node_a.data_dump())
    assert node_b.warm_up(digest) is False
    assert node_b.verify()["missing"] == 0
    assert node_b.db.files.copies(digest) == 1  # a's record is intact


def test_remove_during_a_warm_up_does_not_bring_the_file_back(make_pool, write_file):
    import threading

    slow = MemoryHost(uuid.uuid4().hex, name="slow")
    cm = make_pool(hosts=[slow], redundancy=1)
    digest = cm.upload(write_file("f", b"going away"))
    cm.evict(0)
    slow.latency = 0.3
    fetch = threading.Thread(target=cm.warm_up, args=(digest,))
    fetch.start()
    time.sleep(0.1)  # the download is in flight
    result = cm.remove(digest)
    fetch.join()
    assert [h for h, _ in result["deleted"]] == ["slow"] and slow.objects == {}
    assert not cm.exists(digest) and not cm.on_cache(digest)
    assert cm.sync()["checked"] == 0 and slow.objects == {}
    assert cm.stats()["cached_bytes"] == 0


def test_remove_deletes_bad_copies_too(pool, stores, write_file):
    digest = pool.upload(write_file("f", b"one good, one bad"))
    names = holders(pool, digest)
    bad = next(h for h in stores if h.name == names[0])
    bad.objects[digest] = b"x"
    pool.verify()
    assert holders(pool, digest) == names[1:]
    result = pool.remove(digest)
    assert sorted(h for h, _ in result["deleted"]) == names
    assert all(digest not in h.objects for h in stores)
