"""Metering: the bandwidth limit's arithmetic, and progress from a real pool's transfers."""

import os

import pytest

from cloudmanager import CloudManager
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
        summary = cm.verify(deep=True, progress=lambda b, n: checked.append((b, n)))
        assert summary["good"] == 1
        assert sum(b for b, _ in checked) == len(data) and sum(n for _, n in checked) == 1

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
