"""Metering: the bandwidth limit's arithmetic, and progress from a real pool's transfers."""

import hashlib
import os

import pytest
from hosts.s3_server import aws_env, bucket, moto_endpoint, s3_admin  # noqa: F401  (fixtures)
from hosts.webdav_server import PASSWORD, USER, webdav_server_fixture  # noqa: F401

from cloudmanager import CloudManager
from cloudmanager.hosts.fsspec import FsspecHost
from cloudmanager.meter import TokenBucket, parse_rate


class Clock:
    """A clock that moves only when the bucket sleeps: the limit's
    arithmetic, without measuring time."""

    def __init__(self):
        self.now = 100.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_a_token_bucket_lets_a_burst_through_then_holds_the_rate():
    clock = Clock()
    bucket = TokenBucket(parse_rate("1M"), clock=clock, sleep=clock.sleep)
    for _ in range(4):  # 4 MiB: the first second's worth passes at once
        bucket.take(1 << 20)
    assert clock.slept == [pytest.approx(1.0)] * 3
    clock.now += 10  # a pause refills the bucket, but only up to one second's worth
    bucket.take(1 << 20)
    bucket.take(1 << 20)
    assert sum(clock.slept) == pytest.approx(4.0)
    bucket.take(8 << 20)  # a chunk larger than the burst passes once paid for
    assert clock.slept[-1] == pytest.approx(8.0)


def test_rates_are_read_as_rclone_writes_them():
    assert parse_rate("10M") == parse_rate("10MiB/s") == 10 * 2**20
    assert parse_rate("1.5G") == 1.5 * 2**30 and parse_rate("64") == 64 * 1024
    assert parse_rate("off") == 0
    for bad in ("fast", "10X", "-1M"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_downloads_report_their_bytes_as_they_move_and_once(tmp_path):
    """Progress from a folder host (through the engine's call threads), from
    the cache, and nothing twice for a file fetched into the cache on the way."""
    host = tmp_path / "host"
    host.mkdir()
    data = os.urandom(9 * 2**20 + 5)  # above the pipelined copy's threshold
    (tmp_path / "f.bin").write_bytes(data)
    with CloudManager(str(tmp_path / "db.sqlite3"), str(tmp_path / "cache"), 64 << 20,
                      hosts=["dir:%s" % host], redundancy=1, bwlimit="256M") as cm:
        assert cm.settings()["bwlimit"] == 256 * 2**20
        digest = cm.upload(str(tmp_path / "f.bin"))
        cm.evict(0)
        fetched = []
        assert cm.download(digest, str(tmp_path / "a.bin"), progress=fetched.append)
        assert sum(fetched) == len(data) and len(fetched) > 1  # chunk by chunk
        copied = []
        assert cm.download(digest, str(tmp_path / "b.bin"), progress=copied.append)
        assert sum(copied) == len(data)  # from the cache this time
        cm.evict(0)
        warmed = []
        assert cm.warm_up(digest, progress=warmed.append)
        assert sum(warmed) == len(data)
        assert cm.warm_up(digest, progress=warmed.append) and sum(warmed) == len(data)  # a hit

        checked = []

        class Told:
            """A progress callback that also takes the totals to expect."""

            def __call__(self, nbytes, ncopies):
                checked.append((nbytes, ncopies))

            def expect(self, total_bytes, total_copies):
                checked.append(("expect", total_bytes, total_copies))

        summary = cm.verify(deep=True, progress=Told())
        assert summary["good"] == 1
        assert checked[0] == ("expect", len(data), 1)
        assert sum(b for b, _ in checked[1:]) == len(data)
        assert sum(n for _, n in checked[1:]) == 1

        (tmp_path / "g.bin").write_bytes(data[::-1])
        deferred = cm.upload(str(tmp_path / "g.bin"), defer=True)
        plan = cm.sync_plan()
        assert [(p["hash"], p["size"], p["copies"], p["wanted"], p["queued"]) for p in plan] \
            == [(deferred, len(data), 0, 1, True)]
        assert cm.sync_plan() == plan  # a plan changes nothing
        synced = []
        assert cm.sync(progress=lambda b, n: synced.append((b, n)))["uploads"] == 1
        assert sum(b for b, _ in synced) == len(data) and sum(n for _, n in synced) == 1
        assert cm.sync_plan() == []
    with pytest.raises(Exception, match="bwlimit"):
        CloudManager(str(tmp_path / "db.sqlite3"), str(tmp_path / "cache"), 64 << 20,
                     hosts=[], bwlimit=-5)


def test_the_limit_holds_on_s3_where_boto3_moves_the_bytes(tmp_path, bucket, moto_endpoint):
    """boto3 reads files and streams on threads of its own: the meter goes
    with each call (a callback, a subscriber), so a streamed upload, a sync
    from the cache and a download all pay the bucket for their bytes."""
    data = os.urandom(6 * 2**20)
    (tmp_path / "f.bin").write_bytes(data)
    spec = "s3://%s/p?endpoint_url=%s&addressing_style=path" % (bucket, moto_endpoint)
    clock = Clock()
    # 1 MiB of cache: the 6 MiB file streams to the host as it is hashed (staged).
    with CloudManager(str(tmp_path / "db.sqlite3"), str(tmp_path / "cache"), 1 << 20,
                      hosts=[spec], redundancy=1, bwlimit="1M") as cm:
        cm.engine.bucket = TokenBucket(2**20, clock=clock, sleep=clock.sleep)
        streamed = cm.upload(str(tmp_path / "f.bin"))
        assert streamed == hashlib.sha256(data).hexdigest()
        assert sum(clock.slept) == pytest.approx(5.0, abs=0.01)  # 6 MiB at 1 MiB/s, 1 free
        got = []
        assert cm.download(streamed, str(tmp_path / "back.bin"), progress=got.append)
        assert sum(got) == len(data) and sum(clock.slept) == pytest.approx(11.0, abs=0.01)
    with CloudManager(str(tmp_path / "db2.sqlite3"), str(tmp_path / "cache2"), 64 << 20,
                      hosts=[spec.replace("/p?", "/q?")], redundancy=1, bwlimit="1M") as cm:
        cm.engine.bucket = TokenBucket(2**20, clock=clock, sleep=clock.sleep)
        cm.upload(str(tmp_path / "f.bin"), defer=True)
        sent = []
        assert cm.sync(progress=lambda b, n: sent.append(b))["uploads"] == 1
        assert sum(sent) == len(data) and sum(clock.slept) == pytest.approx(16.0, abs=0.01)  # a new bucket: 1 free again


def test_the_limit_holds_on_webdav_where_the_client_reads_the_file(tmp_path, webdav_server):
    """An upload from the cache to a WebDAV host: webdav4 reads the file
    itself, and is handed the call's meter as its callback."""
    data = os.urandom(3 * 2**20)
    (tmp_path / "f.bin").write_bytes(data)
    dav = FsspecHost("webdav://meter-%s/pool" % os.getpid(), base_url=webdav_server.base_url,
                     storage_options={"auth": (USER, PASSWORD)}, timeout=30)
    clock = Clock()
    with CloudManager(str(tmp_path / "db.sqlite3"), str(tmp_path / "cache"), 64 << 20,
                      hosts=[dav], redundancy=1) as cm:
        cm.engine.bucket = TokenBucket(2**20, clock=clock, sleep=clock.sleep)
        cm.upload(str(tmp_path / "f.bin"), defer=True)
        sent = []
        assert cm.sync(progress=lambda b, n: sent.append(b))["uploads"] == 1
        assert sum(sent) == len(data) and sum(clock.slept) == pytest.approx(2.0, abs=0.01)
