"""UploadEngine over real hosts; it writes nothing, so the tests read the facts
and verdicts it returns (a real Health over a real FileDatabase ranks hosts).

Hosts are folder hosts and PlowshareHosts driven through the fake
plowup/plowdown (real subprocesses). A few tiny Host subclasses defined here
fail on purpose: they are hosts, not the layer under test.
"""

import os
import threading
import time
import uuid

import pytest

from cloudmanager import engine as engine_module
from cloudmanager import fsutil
from cloudmanager.db.health import Outcome
from cloudmanager.engine import UploadEngine, UploadResult, Verdict
from cloudmanager.errors import (
    CacheFullError,
    CorruptCopyError,
    DownloadError,
    HostError,
    HostNotFoundError,
    HostUnavailableError,
    IntegrityError,
    InvalidInputError,
    TransientHostError,
)
from cloudmanager.hosts.base import Host, Location
from cloudmanager.hosts.folder import FolderHost
from cloudmanager.hosts.memory import MemoryHost
from cloudmanager.hosts.plowshare import PlowshareHost
from cloudmanager.hosts.s3 import S3Host
from cloudmanager.db.health import month_key
from cloudmanager.health import Health
from helpers import record_reads, sha
from hosts.s3_server import aws_env, bucket, moto_endpoint, s3_admin  # noqa: F401  (fixtures)


@pytest.fixture
def make_engine(db):
    made = []

    def make(hosts, redundancy=3):
        engine = UploadEngine(hosts, redundancy, Health(db))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def source(tmp_path, db):
    """``source(data)`` → (path, hash, size) of a file registered in the database."""

    def make(data, name="src.bin"):
        src_dir = tmp_path / "src"
        src_dir.mkdir(exist_ok=True)
        path = src_dir / name
        path.write_bytes(data)
        digest = sha(data)
        with db.transaction() as conn:
            db.files.add(conn, digest, name, len(data), int(time.time()))
        return str(path), digest, len(data)

    return make


@pytest.fixture
def stored(make_engine, source, db):
    """``stored(hosts, data)`` → ``(engine, digest, size, successes)``: an engine
    over ``hosts`` with ``data`` uploaded to all of them and recorded."""

    def store(hosts, data):
        engine = make_engine(hosts, redundancy=len(hosts))
        path, digest, size = source(data)
        result = engine.upload(path, digest, size)
        record(db, digest, result.successes)
        return engine, digest, size, result.successes

    return store


def folder(tmp_path, name):
    (tmp_path / "hosts" / name).mkdir(parents=True, exist_ok=True)
    return FolderHost(str(tmp_path / "hosts" / name), name=name, fsync=False)


def record(db, file_hash, locations):
    with db.transaction() as conn:
        for loc in locations:
            db.copies.record_good(conn, [(file_hash, loc.host_name, loc.url)], int(time.time()))


def demote(db, *names):
    """Give hosts a recorded failure so that ranked() tries them last."""
    for name in names:
        db.health.record({name: [Outcome(False, None, "seeded by the test", time.time())]})


def verdicts_by_host(verdicts):
    return {v.location.host_name: v.state for v in verdicts}


def facts_by_host(facts):
    found = {}
    for fact in facts:
        found.setdefault(fact.host, []).append(fact)
    return found


class ExplodingHost(Host):
    """A host with a bug: it raises something that is not a HostError."""

    def __init__(self, name):
        self.name = name
        self.calls = 0

    def upload(self, local_path, name):
        self.calls += 1
        raise RuntimeError("host bug")

    def download(self, url, dest_path, max_bytes=None):
        self.calls += 1
        raise RuntimeError("host bug")

    def accepts(self, url):
        return url.startswith("boom://")


# -- construction --------------------------------------------------------------


def test_duplicate_host_names_are_refused(db, tmp_path):
    with pytest.raises(InvalidInputError):
        UploadEngine([folder(tmp_path, "a"), FolderHost(str(tmp_path / "b"), name="a")], 2,
                     Health(db))


# -- uploads -------------------------------------------------------------------


def test_upload_runs_in_parallel_on_redundancy_hosts(fake_plowshare, make_engine, source):
    for module in ("m1", "m2", "m3"):
        fake_plowshare.faults(module, slow=0.5)
    hosts = [PlowshareHost(m, timeout=30) for m in ("m1", "m2", "m3")]
    engine = make_engine(hosts, redundancy=3)
    data = b"parallel " * 1000
    path, digest, size = source(data)

    started = time.monotonic()
    result = engine.upload(path, digest, size)
    elapsed = time.monotonic() - started

    assert isinstance(result, UploadResult)
    assert result.failures == []
    assert sorted(loc.host_name for loc in result.successes) == ["m1", "m2", "m3"]
    assert elapsed >= 0.5  # the slowness really applied
    assert elapsed < 1.5, "3 x 0.5 s uploads took %.2f s: not parallel" % elapsed
    for module in ("m1", "m2", "m3"):
        objects = fake_plowshare.objects(module)
        assert len(objects) == 1 and objects[0].read_bytes() == data


def test_upload_stops_at_redundancy(make_engine, source, tmp_path):
    hosts = [folder(tmp_path, "h%d" % i) for i in range(5)]
    engine = make_engine(hosts, redundancy=2)
    path, digest, size = source(b"just two")
    result = engine.upload(path, digest, size)
    assert len(result.successes) == 2 and result.failures == []
    held = [h for h in hosts if os.path.exists(os.path.join(h.root, digest))]
    assert sorted(h.name for h in held) == sorted(loc.host_name for loc in result.successes)
    # holders count toward the target: one more host is enough for 3
    more = engine.upload(path, digest, size, holders=[loc.host_name for loc in result.successes],
                         target=3)
    assert len(more.successes) == 1
    assert more.successes[0].host_name not in {loc.host_name for loc in result.successes}


def test_upload_fails_over_to_the_next_host(fake_plowshare, make_engine, source, db, tmp_path):
    good = [folder(tmp_path, n) for n in ("f1", "f2", "f3")]
    down = PlowshareHost("down", timeout=30)
    fake_plowshare.faults("down", down=True)
    engine = make_engine(good + [down], redundancy=3)
    demote(db, "f1", "f2", "f3")  # so the down host is among the first three tried
    data = b"failover"
    path, digest, size = source(data)

    result = engine.upload(path, digest, size)

    assert sorted(loc.host_name for loc in result.successes) == ["f1", "f2", "f3"]
    assert len(result.failures) == 1
    assert isinstance(result.failures[0], TransientHostError)
    assert result.failures[0].host == "down"
    for host in good:
        with open(os.path.join(host.root, digest), "rb") as f:
            assert f.read() == data
    facts = facts_by_host(result.facts)
    assert [(f.ok, f.counts) for f in facts["down"]] == [(False, True)]
    for name in ("f1", "f2", "f3"):
        assert [(f.ok, f.uploaded) for f in facts[name]] == [(True, size)]


def test_ranked_puts_failing_host_last(fake_plowshare, make_engine, source, db, tmp_path):
    hosts = [folder(tmp_path, n) for n in ("f1", "f2", "f3")]
    down = PlowshareHost("down", timeout=30)
    fake_plowshare.faults("down", down=True)
    engine = make_engine(hosts + [down], redundancy=4)
    path, digest, size = source(b"rank me")
    result = engine.upload(path, digest, size)  # target 4: every host is tried
    assert len(result.successes) == 3 and [e.host for e in result.failures] == ["down"]
    engine.health.record(result.facts)
    for _ in range(30):
        usable, cooling = engine.health.ranked(hosts + [down])
        order = usable + cooling
        assert order[-1] is down and cooling == []  # one failure does not trip the breaker
        assert sorted(h.name for h in order) == ["down", "f1", "f2", "f3"]


def test_upload_runs_out_of_hosts(fake_plowshare, make_engine, source, db, tmp_path):
    down = PlowshareHost("down", timeout=30)
    fake_plowshare.faults("down", down=True)
    engine = make_engine([folder(tmp_path, "only"), down], redundancy=3)
    path, digest, size = source(b"not enough hosts")
    result = engine.upload(path, digest, size)
    assert [loc.host_name for loc in result.successes] == ["only"]
    assert [e.host for e in result.failures] == ["down"]


def test_host_bug_during_upload_is_a_failure_not_a_crash(make_engine, source, db, tmp_path):
    broken = ExplodingHost("broken")
    engine = make_engine([broken, folder(tmp_path, "ok")], redundancy=2)
    path, digest, size = source(b"survive a host bug")
    result = engine.upload(path, digest, size)
    assert broken.calls == 1
    assert [loc.host_name for loc in result.successes] == ["ok"]
    assert len(result.failures) == 1 and isinstance(result.failures[0], HostError)
    assert result.failures[0].host == "broken"
    assert [f.ok for f in facts_by_host(result.facts)["broken"]] == [False]


# -- downloads -----------------------------------------------------------------


@pytest.mark.parametrize("fault", ["corrupt_download", "truncate_download"])
def test_download_skips_bad_copy_and_marks_it(fake_plowshare, stored, db, out_dir, fault):
    good, bad = PlowshareHost("good", timeout=30), PlowshareHost("bad", timeout=30)
    data = os.urandom(200_000)
    engine, digest, size, successes = stored([good, bad], data)
    assert len(successes) == 2
    assert db.files.copies(digest) == 2
    fake_plowshare.faults("bad", **{fault: True})
    demote(db, "good")  # so the bad copy is tried first
    assert [h.name for h in engine.health.ranked([good, bad])[0]] == ["bad", "good"]
    sources = [(loc.host_name, loc.url) for loc in successes]
    dest = out_dir / "dest.bin"

    got = engine.download(digest, size, sources, str(dest))

    assert got.location.host_name == "good"
    assert dest.read_bytes() == data
    assert [p.name for p in out_dir.iterdir()] == ["dest.bin"]  # no temp left
    bad_url = next(loc.url for loc in successes if loc.host_name == "bad")
    assert Verdict(Location("bad", bad_url), "bad") in got.verdicts
    assert verdicts_by_host(got.verdicts) == {"bad": "bad", "good": "good"}
    # A bad object says nothing about the host being up: no breaker count.
    assert [(f.ok, f.counts) for f in facts_by_host(got.facts)["bad"]] == [(False, False)]
    # the bad host really was asked
    assert any(e["tool"] == "plowdown" and any("bad.fake" in a for a in e["argv"])
               for e in fake_plowshare.log())


def test_download_verifies_even_a_single_source(fake_plowshare, make_engine, source, db,
                                                out_dir):
    bad = PlowshareHost("bad", timeout=30)
    engine = make_engine([bad], redundancy=1)
    data = b"only copy " * 100
    path, digest, size = source(data)
    [loc] = engine.upload(path, digest, size).successes
    record(db, digest, [loc])
    fake_plowshare.faults("bad", corrupt_download=True)
    dest = out_dir / "dest.bin"
    dest.write_bytes(b"previous content")
    with pytest.raises(DownloadError):
        engine.download(digest, size, [(loc.host_name, loc.url)], str(dest))
    assert dest.read_bytes() == b"previous content"  # never replaced by bad bytes
    assert [p.name for p in out_dir.iterdir()] == ["dest.bin"]


def test_download_not_found_marks_copy_bad(stored, db, tmp_path, out_dir):
    gone, kept = folder(tmp_path, "gone"), folder(tmp_path, "kept")
    data = b"one copy will vanish"
    engine, digest, size, successes = stored([gone, kept], data)
    urls = {loc.host_name: loc.url for loc in successes}
    gone.delete(urls["gone"])
    demote(db, "kept")  # try the vanished copy first
    dest = out_dir / "dest.bin"

    got = engine.download(digest, size, sorted(urls.items()), str(dest))

    assert got.location == Location("kept", urls["kept"])
    assert dest.read_bytes() == data
    assert verdicts_by_host(got.verdicts) == {"gone": "missing", "kept": "good"}
    assert [f.counts for f in facts_by_host(got.facts)["gone"]] == [False]


def test_download_dead_plowshare_link_marks_copy_bad(fake_plowshare, make_engine, source, db,
                                                     tmp_path, out_dir):
    locker, disk = PlowshareHost("locker", timeout=30), folder(tmp_path, "disk")
    engine = make_engine([locker, disk], redundancy=2)
    data = b"dead link"
    path, digest, size = source(data)
    [disk_loc] = engine.upload(path, digest, size, holders=["locker"], target=2).successes
    dead = Location("locker", "http://locker.fake/dl/0123456789abcdef")
    record(db, digest, [disk_loc, dead])
    demote(db, "disk")
    got = engine.download(digest, size, [tuple(dead), tuple(disk_loc)],
                          str(out_dir / "dest.bin"))
    assert got.location.host_name == "disk"
    assert (out_dir / "dest.bin").read_bytes() == data
    assert verdicts_by_host(got.verdicts)["locker"] == "missing"


def test_transient_failure_does_not_mark_copy_bad(fake_plowshare, stored, db, tmp_path,
                                                  out_dir):
    locker, disk = PlowshareHost("locker", timeout=30), folder(tmp_path, "disk")
    engine, digest, size, successes = stored([locker, disk], b"temporarily down")
    fake_plowshare.faults("locker", down=True)
    demote(db, "disk")
    got = engine.download(digest, size, [tuple(loc) for loc in successes],
                          str(out_dir / "dest.bin"))
    assert got.location.host_name == "disk"
    assert verdicts_by_host(got.verdicts)["locker"] == "error"  # it may come back
    assert [(f.ok, f.counts) for f in facts_by_host(got.facts)["locker"]] == [(False, True)]


def test_all_sources_bad_raises_download_error(fake_plowshare, stored, db, tmp_path, out_dir):
    locker, disk = PlowshareHost("locker", timeout=30), folder(tmp_path, "disk")
    engine, digest, size, successes = stored([locker, disk], b"nobody has a good copy")
    urls = {loc.host_name: loc.url for loc in successes}
    fake_plowshare.faults("locker", corrupt_download=True)
    disk.delete(urls["disk"])
    dest = out_dir / "dest.bin"

    with pytest.raises(DownloadError) as info:
        engine.download(digest, size, sorted(urls.items()), str(dest))

    err = info.value
    assert digest in str(err)
    assert sorted(f.host for f in err.failures) == ["disk", "locker"]
    assert all(isinstance(f, HostError) for f in err.failures)
    assert any(isinstance(f, HostNotFoundError) for f in err.failures)
    assert not dest.exists()
    assert list(out_dir.iterdir()) == []
    assert verdicts_by_host(err.verdicts) == {"locker": "bad", "disk": "missing"}
    assert sum(f.downloaded for f in err.facts) == 0


def test_transfer_meter_counts_bytes(make_engine, source, db, tmp_path, out_dir):
    hosts = [folder(tmp_path, n) for n in ("a", "b", "c")]
    engine = make_engine(hosts, redundancy=3)
    data = os.urandom(12_345)
    path, digest, size = source(data)
    result = engine.upload(path, digest, size)
    assert len(result.successes) == 3
    assert sum(f.uploaded for f in result.facts) == 3 * size
    downloads = [engine.download(digest, size, [tuple(loc) for loc in result.successes],
                                 str(out_dir / name)) for name in ("d1", "d2")]
    assert [sum(f.downloaded for f in d.facts) for d in downloads] == [size, size]
    # Health writes the meter, one month on record.
    engine.health.record(result.facts + downloads[0].facts + downloads[1].facts)
    assert db.health.transfers() == {month_key(): (3 * size, 2 * size)}


def test_failed_upload_is_not_metered(fake_plowshare, make_engine, source, db):
    down = PlowshareHost("down", timeout=30)
    fake_plowshare.faults("down", down=True)
    engine = make_engine([down], redundancy=1)
    path, digest, size = source(b"goes nowhere")
    result = engine.upload(path, digest, size)
    assert result.successes == [] and len(result.failures) == 1
    assert sum(f.uploaded for f in result.facts) == 0


def test_host_for_falls_back_to_any_accepting_host(make_engine, source, db, tmp_path,
                                                    out_dir):
    here, other = folder(tmp_path, "here"), folder(tmp_path, "other")
    engine = make_engine([here, other], redundancy=1)
    data = b"recorded by another node"
    path, digest, size = source(data)
    loc = here.upload(path, digest)

    assert engine.host_for("here", loc.url) is here
    assert engine.host_for("not-configured-here", loc.url) is here
    assert engine.host_for("other", loc.url) is here  # named host cannot reach this URL
    assert engine.host_for("here", "ftp://nowhere.example/x") is None

    record(db, digest, [Location("old-node-disk", loc.url)])
    dest = out_dir / "d.bin"
    got = engine.download(digest, size, [("old-node-disk", loc.url)], str(dest))
    assert got.location == Location("old-node-disk", loc.url)
    assert dest.read_bytes() == data
    assert [(f.host, f.ok) for f in got.facts] == [("here", True)]


def test_unreachable_source_is_named_in_download_error(make_engine, source, db, tmp_path,
                                                       out_dir):
    engine = make_engine([folder(tmp_path, "local")], redundancy=1)
    path, digest, size = source(b"unreachable")
    dest = out_dir / "d.bin"
    with pytest.raises(DownloadError) as info:
        engine.download(digest, size, [("mystery-locker", "ftp://mystery.example/f")],
                        str(dest))
    assert "mystery-locker" in str(info.value)
    assert info.value.failures == []
    assert not dest.exists()
    assert list(out_dir.iterdir()) == []


def test_download_with_no_sources_raises(make_engine, source, out_dir, tmp_path):
    engine = make_engine([folder(tmp_path, "local")], redundancy=1)
    path, digest, size = source(b"no sources")
    with pytest.raises(DownloadError):
        engine.download(digest, size, [], str(out_dir / "d.bin"))
    assert list(out_dir.iterdir()) == []


def test_host_bug_during_download_fails_over(make_engine, source, db, tmp_path, out_dir):
    # Regression: an exception other than HostError/IntegrityError/OSError
    # from host.download aborted the download; upload already tolerated it.
    broken, disk = ExplodingHost("broken"), folder(tmp_path, "disk")
    engine = make_engine([broken, disk], redundancy=1)
    data = b"should still arrive"
    path, digest, size = source(data)
    loc = disk.upload(path, digest)
    demote(db, "disk")  # the broken host is tried first
    dest = out_dir / "d.bin"
    got = engine.download(digest, size, [("broken", "boom://x"), tuple(loc)], str(dest))
    assert got.location.host_name == "disk"
    assert dest.read_bytes() == data


def test_host_bug_during_download_leaves_no_temp(make_engine, source, db, tmp_path, out_dir):
    """Whatever the engine does with a host bug, it leaves no temp file behind."""
    broken = ExplodingHost("broken")
    engine = make_engine([broken], redundancy=1)
    path, digest, size = source(b"x")
    with pytest.raises(Exception):
        engine.download(digest, size, [("broken", "boom://x")], str(out_dir / "d.bin"))
    assert broken.calls == 1
    assert list(out_dir.iterdir()) == []


# -- a download reads the bytes once (issue 12) --------------------------------------

MiB = 1 << 20


@pytest.fixture(params=["folder", "memory", "s3"])
def streaming(request, tmp_path):
    """``(host, tamper)``: a host whose bytes pass through Python on the way
    down, and ``tamper(location, data)`` to replace an object behind its back."""
    kind = request.param
    if kind == "folder":
        host = folder(tmp_path, "disk")

        def tamper(location, data):
            with open(os.path.join(host.root, location.url.rsplit("/", 1)[1]), "wb") as f:
                f.write(data)

        return host, tamper
    if kind == "memory":
        host = MemoryHost("engine-" + uuid.uuid4().hex, name="ram")

        def tamper(location, data):
            host.objects[host.object_name(location.url)] = data

        return host, tamper
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("bucket")
    admin = request.getfixturevalue("s3_admin")
    host = S3Host(bucket, "pool", endpoint_url=endpoint, region="us-east-1",
                  addressing_style="path", multipart_threshold=5 * MiB,
                  multipart_chunksize=5 * MiB)
    request.addfinalizer(host.close)

    def tamper(location, data):
        admin.put_object(Bucket=bucket, Key="pool/" + host.object_name(location.url), Body=data)

    return host, tamper


class LegacyFolderHost(FolderHost):
    """A host written before downloads returned what they wrote."""

    def download(self, url, dest_path, max_bytes=None):
        super().download(url, dest_path, max_bytes)


# Above fsutil.PIPELINE_MIN (8 MiB), the copy runs in two threads: both ways are covered.
@pytest.mark.parametrize("size", [100_000, 9 * MiB])
def test_a_download_reads_the_bytes_once(streaming, make_engine, source, db, out_dir,
                                         monkeypatch, size):
    host, _ = streaming
    engine = make_engine([host], redundancy=1)
    data = os.urandom(size)
    path, digest, size = source(data)
    [loc] = engine.upload(path, digest, size).successes
    dest = out_dir / "dest.bin"
    reads = record_reads(monkeypatch)

    got = engine.download(digest, size, [tuple(loc)], str(dest))
    monkeypatch.undo()

    assert got.verdicts == [Verdict(loc, "good")]
    assert dest.read_bytes() == data
    # The host hashed the bytes as it wrote them: neither the temp file nor
    # the destination is read again, and nothing is hashed afterwards.
    assert reads.hashed == []
    assert reads.under(out_dir) == []
    if isinstance(host, FolderHost):  # the one read: the host's object
        assert reads.opened.count(os.path.join(host.root, digest)) == 1


def test_a_host_that_returns_no_digest_is_hashed_afterwards(make_engine, source, db, tmp_path,
                                                            out_dir, monkeypatch):
    # The way plowdown's downloads are verified, and the counter's own check.
    (tmp_path / "legacy").mkdir()
    host = LegacyFolderHost(str(tmp_path / "legacy"), name="legacy", fsync=False)
    engine = make_engine([host], redundancy=1)
    path, digest, size = source(os.urandom(50_000))
    [loc] = engine.upload(path, digest, size).successes
    reads = record_reads(monkeypatch)

    engine.download(digest, size, [tuple(loc)], str(out_dir / "dest.bin"))
    monkeypatch.undo()

    assert len(reads.hashed) == 1 and reads.under(out_dir) == reads.hashed
    with open(os.path.join(host.root, digest), "r+b") as f:  # one byte changed
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    with pytest.raises(DownloadError) as info:
        engine.download(digest, size, [tuple(loc)], str(out_dir / "again.bin"))
    assert isinstance(info.value.failures[0], CorruptCopyError)


def test_wrong_bytes_from_a_streaming_host_are_refused(streaming, make_engine, source, db,
                                                       out_dir):
    host, tamper = streaming
    engine = make_engine([host], redundancy=1)
    data = os.urandom(100_000)
    path, digest, size = source(data)
    [loc] = engine.upload(path, digest, size).successes
    tamper(loc, os.urandom(size))  # the same size, other bytes
    dest = out_dir / "dest.bin"

    with pytest.raises(DownloadError) as info:
        engine.download(digest, size, [tuple(loc)], str(dest))

    [failure] = info.value.failures
    assert isinstance(failure, CorruptCopyError) and failure.host == host.name
    assert info.value.verdicts == [Verdict(loc, "bad")]
    assert list(out_dir.iterdir()) == []  # neither the destination nor a temp file


def test_a_streaming_host_stops_at_the_recorded_size(streaming, make_engine, source, db,
                                                     out_dir, monkeypatch):
    host, tamper = streaming
    engine = make_engine([host], redundancy=1)
    data = os.urandom(100_000)
    path, digest, size = source(data)
    [loc] = engine.upload(path, digest, size).successes
    tamper(loc, data + os.urandom(3 * MiB))  # more than the reservation holds
    written = []
    real_write_all = fsutil.write_all
    monkeypatch.setattr(fsutil, "write_all",
                        lambda fd, chunk: written.append(len(chunk)) or real_write_all(fd, chunk))

    with pytest.raises(DownloadError) as info:
        engine.download(digest, size, [tuple(loc)], str(out_dir / "dest.bin"))

    [failure] = info.value.failures
    assert isinstance(failure, TransientHostError)  # too large: not proof of a bad copy
    assert sum(written) <= size  # not a byte past the recorded size was written
    assert list(out_dir.iterdir()) == []
# -- staged uploads: a source streamed, hashed on the way ---------------------------


class SlowStager(FolderHost):
    """A folder host whose staging ends ``delay`` seconds late (after the deadline)."""

    delay = 0.0

    def stage(self, stream, size):
        staged = super().stage(stream, size)
        time.sleep(self.delay)
        return staged


def test_stream_goes_to_a_host_that_can_stage_and_fails_over(make_engine, tmp_path, source,
                                                             fake_plowshare, db):
    gone = FolderHost(str(tmp_path / "unmounted"), name="gone", fsync=False)
    disk = folder(tmp_path, "disk")
    locker = PlowshareHost("locker", timeout=30)
    engine = make_engine([locker, gone, disk], redundancy=1)
    demote(db, "disk")  # tried after the unmounted folder
    path, digest, size = source(os.urandom(50_000))
    result = engine.stream(path, size)
    assert [f.host for f in result.failures] == ["gone"]  # the locker is never tried
    assert [f.host for f in result.facts] == ["gone"]  # a staging's fact comes with its publish
    streamed = result.streamed
    assert streamed.host is disk and streamed.file_hash == digest and streamed.size == size
    assert os.listdir(disk.root)[0].startswith(".cloudmanager-staging-")
    location, fact = engine.publish(streamed, digest)
    assert location == Location("disk", "file://%s/%s" % (disk.root, digest))
    assert fact.ok and fact.uploaded == size
    engine.abort(streamed)  # nothing, once published
    assert sorted(os.listdir(disk.root)) == sorted([digest, FolderHost.MARKER_NAME])


def test_a_staging_the_engine_gave_up_on_is_aborted_when_it_ends(make_engine, tmp_path, source):
    (tmp_path / "hosts" / "slow").mkdir(parents=True)
    slow = SlowStager(str(tmp_path / "hosts" / "slow"), name="slow", fsync=False, timeout=0.1)
    slow.weight, slow.delay = 10.0, 2.0  # tried first; ends after its deadline (1.1 s)
    disk = folder(tmp_path, "disk")
    engine = make_engine([slow, disk], redundancy=1)
    path, digest, size = source(b"slow bytes")
    result = engine.stream(path, size)
    assert [f.host for f in result.failures] == ["slow"]
    assert result.streamed.host is disk  # the next host read the source afresh
    deadline = time.monotonic() + 10
    while os.listdir(slow.root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(slow.root) == []  # the late staging was aborted
    engine.abort(result.streamed)
    assert os.listdir(disk.root) == []


def test_stream_refuses_a_source_that_grows_and_stages_nothing(make_engine, tmp_path, source):
    disk = folder(tmp_path, "disk")
    engine = make_engine([disk], redundancy=1)
    path, _, size = source(b"x" * 1000)
    with open(path, "ab") as f:
        f.write(b"grown")
    with pytest.raises(IntegrityError, match="grew"):
        engine.stream(path, size)
    assert os.listdir(disk.root) == []


def test_a_rehash_that_finds_other_bytes_publishes_nothing_and_stops(make_engine, tmp_path,
                                                                    source):
    hosts = [folder(tmp_path, name) for name in ("a", "b", "c")]
    engine = make_engine(hosts, redundancy=3)
    path, digest, size = source(b"the bytes hashed first")
    with open(path, "r+b") as f:
        f.write(b"THE")  # the source changed since it was hashed
    result = engine.upload(path, digest, size, target=1, rehash=True)
    # One host read other bytes: the others are not sent a source that changed.
    assert result.successes == [] and len(result.failures) == 1
    assert "source changed" in result.failures[0].message
    assert not any(f.counts for f in result.facts)  # not the hosts' fault
    for host in hosts:
        assert os.listdir(host.root) == []


# -- downloads into rooms (a bounded directory: the cache) ----------------------------


class FakeRoom:
    """A room as the cache gives one: a destination, released once."""

    def __init__(self, directory, n, log):
        self.temp = str(directory / ("room%d.tmp" % n))
        self.n, self.log = n, log
        self.released = False

    def release(self):
        assert not self.released, "released twice"
        fsutil.remove_quietly(self.temp)
        self.released = True
        self.log.append(("released", self.n))


class Rooms:
    """``room()`` for :meth:`UploadEngine.download`, failing once ``limit`` are out."""

    def __init__(self, directory, limit=None):
        self.directory, self.limit = directory, limit
        self.made, self.log = [], []

    def __call__(self):
        if self.limit is not None and sum(not r.released for r in self.made) >= self.limit:
            raise CacheFullError("no room (test)")
        self.made.append(FakeRoom(self.directory, len(self.made), self.log))
        return self.made[-1]


class HangingDownloads(MemoryHost):
    """Downloads block until ``go`` is set, then write the object; tried first."""

    weight = 10.0

    def __init__(self, name, go):
        super().__init__("%s-%s" % (name, uuid.uuid4().hex[:8]), name=name, timeout=0.1)
        self.go = go
        self.ended = threading.Event()

    def download(self, url, dest_path, max_bytes=None):
        try:
            self.go.wait(30)
            return super().download(url, dest_path, max_bytes)
        finally:
            self.ended.set()


@pytest.fixture
def no_grace(monkeypatch):
    monkeypatch.setattr(engine_module, "DEADLINE_GRACE", 0.0)
    monkeypatch.setattr(engine_module, "DEADLINE_RATE", 1e12)


def stored_in_memory(make_engine, source, db, hosts, data):
    engine = make_engine(hosts, redundancy=len(hosts))
    path, digest, size = source(data)
    result = engine.upload(path, digest, size)
    assert len(result.successes) == len(hosts)
    return engine, digest, size, [(loc.host_name, loc.url) for loc in result.successes]


def test_a_download_needs_a_destination_or_a_room(make_engine, tmp_path, out_dir):
    engine = make_engine([folder(tmp_path, "a")])
    with pytest.raises(InvalidInputError):
        engine.download("0" * 64, 1, [])
    with pytest.raises(InvalidInputError):
        engine.download("0" * 64, 1, [], str(out_dir / "d"), room=Rooms(out_dir))


def test_a_failed_attempts_room_serves_the_next(make_engine, source, db, out_dir):
    down = MemoryHost("down-" + uuid.uuid4().hex[:8], name="down")
    down.weight = 10.0  # tried first
    good = MemoryHost("good-" + uuid.uuid4().hex[:8], name="good")
    data = b"roomy" * 1000
    engine, digest, size, sources = stored_in_memory(make_engine, source, db, [down, good], data)
    down.faults["down"] = True
    rooms = Rooms(out_dir)
    got = engine.download(digest, size, sources, room=rooms)
    assert [f.host for f in got.facts] == ["down", "good"]
    assert len(rooms.made) == 1 and got.room is rooms.made[0] and not rooms.log
    with open(got.room.temp, "rb") as f:
        assert f.read() == data
    assert os.listdir(out_dir) == ["room0.tmp"]  # no attempt's temp file left


def test_an_abandoned_attempt_keeps_its_room_until_its_call_ends(make_engine, source, db,
                                                                 out_dir, no_grace):
    go = threading.Event()
    hanging = HangingDownloads("hanging", go)
    good = MemoryHost("good-" + uuid.uuid4().hex[:8], name="good")
    data = b"late" * 1000
    engine, digest, size, sources = stored_in_memory(make_engine, source, db,
                                                     [hanging, good], data)
    rooms = Rooms(out_dir)
    got = engine.download(digest, size, sources, room=rooms)
    assert got.location.host_name == "good"
    assert len(rooms.made) == 2 and got.room is rooms.made[1]
    assert "did not end within" in got.facts[0].error
    assert rooms.log == []  # the hanging call still holds the first room
    go.set()
    assert hanging.ended.wait(10)
    deadline = time.monotonic() + 10
    while not rooms.log and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rooms.log == [("released", 0)]  # by the call's cleanup, once its file was gone
    assert os.listdir(out_dir) == ["room1.tmp"]


def test_no_room_for_another_attempt_fails_the_download_cleanly(make_engine, source, db,
                                                                out_dir, no_grace):
    go = threading.Event()
    hanging = HangingDownloads("hanging", go)
    good = MemoryHost("good-" + uuid.uuid4().hex[:8], name="good")
    engine, digest, size, sources = stored_in_memory(make_engine, source, db,
                                                     [hanging, good], b"x" * 5000)
    rooms = Rooms(out_dir, limit=1)
    with pytest.raises(DownloadError, match="no room for another download") as caught:
        engine.download(digest, size, sources, room=rooms)
    assert isinstance(caught.value.__cause__, CacheFullError)
    assert [f.host for f in caught.value.facts] == ["hanging"]  # good was never tried
    assert len(caught.value.failures) == 1
    assert type(caught.value.failures[0]) is HostUnavailableError  # the engine's own kind stays in
    assert len(rooms.made) == 1 and rooms.log == []
    go.set()
    assert hanging.ended.wait(10)
    deadline = time.monotonic() + 10
    while not rooms.log and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rooms.log == [("released", 0)] and os.listdir(out_dir) == []


def test_no_room_before_the_first_attempt_is_the_rooms_own_error(make_engine, source, db,
                                                                 out_dir):
    good = MemoryHost("good-" + uuid.uuid4().hex[:8], name="good")
    engine, digest, size, sources = stored_in_memory(make_engine, source, db, [good], b"y" * 10)
    with pytest.raises(CacheFullError):
        engine.download(digest, size, sources, room=Rooms(out_dir, limit=0))
    assert os.listdir(out_dir) == []
