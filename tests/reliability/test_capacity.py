"""The cache's capacity holds on disk while downloads are abandoned (issue 11).

A download attempt the engine gives up on (past its deadline) keeps running
and writing into the storage directory. Every byte any attempt writes there
must be covered by a reservation, so that the cached files plus every temp
file never exceed the capacity, at any instant: a sampler thread walks the
storage directory every few milliseconds while the downloads run, and
until the abandoned calls end, and the most it saw is compared with the
capacity. At the end everything is released: no reservation, no temp file.
"""

import os
import threading
import time
import uuid

import pytest

from cloudmanager import engine
from cloudmanager.hosts.memory import MemoryHost
from cloudmanager.hosts.plowshare import PlowshareHost

from .figures import FAULTS, add

#: The reviewer's numbers: two attempts fit, a third does not.
CAPACITY = 60_100
SIZE = 28_000
#: A cached file (on a host, so evictable) that a second room must evict.
OTHER = 20_000
#: Seconds a host gets before the engine gives up on a call (see the fixture).
TIMEOUT = 0.15


class TricklingHost(MemoryHost):
    """A memory host whose downloads write slowly: ``piece`` bytes every
    ``delay`` seconds, so they go on writing long after the engine gave up.
    Calls in flight are counted, so a test can wait for abandoned ones to end."""

    weight = 10.0  # tried before the healthy host

    def __init__(self, name, piece=1000, delay=0.02):
        super().__init__("%s-%s" % (name, uuid.uuid4().hex[:8]), name=name, timeout=TIMEOUT)
        self.piece, self.delay = piece, delay
        self.lock = threading.Lock()
        self.running = 0
        self.calls = 0

    def download(self, url, dest_path, max_bytes=None):
        with self.lock:
            self.running += 1
            self.calls += 1
        try:
            data = self._object(url)
            return self.receive(_Trickle(data, self.piece, self.delay), url, dest_path,
                                max_bytes, fsync=False)
        finally:
            with self.lock:
                self.running -= 1


class _Trickle:
    """A network body that arrives slowly (no ``readinto``: read in chunks)."""

    def __init__(self, data, piece, delay):
        self.data, self.piece, self.delay = data, piece, delay
        self.offset = 0

    def read(self, n=-1):
        time.sleep(self.delay)
        chunk = self.data[self.offset:self.offset + min(self.piece, n if n > 0 else self.piece)]
        self.offset += len(chunk)
        return chunk


def disk_bytes(root):
    """Bytes of every regular file under ``root``, each inode once (a file
    renamed from tmp/ into its shard during the walk is not counted twice)."""
    seen = {}
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # removed during the walk
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


class Sampler:
    """Measures the storage directory every ``interval`` seconds, in a thread."""

    def __init__(self, root, interval=0.002):
        self.root, self.interval = root, interval
        self.peak = self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, disk_bytes(self.root))
            self.samples += 1
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.fixture
def short_deadlines(monkeypatch):
    """A host's deadline is its ``timeout``: no grace, no time per byte."""
    monkeypatch.setattr(engine, "DEADLINE_GRACE", 0.0)
    monkeypatch.setattr(engine, "DEADLINE_RATE", 1e12)


def wait_for(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def tmp_entries(cm):
    return os.listdir(cm.cache.tmp_dir)


def assert_all_released(cm, hosts):
    """Once the abandoned calls end: no reservation, no temp file, a clean check."""
    assert wait_for(lambda: all(h.running == 0 for h in hosts))
    assert wait_for(lambda: not tmp_entries(cm) and cm.db.sessions.reserved_bytes() == 0), \
        (tmp_entries(cm), cm.db.sessions.reserved_bytes())
    report = cm.check()
    assert report["clean"], report


def pool_with_evictable(make_pool, write_file, hosts, redundancy, size=SIZE, other=OTHER,
                        capacity=CAPACITY, data=None):
    """A pool holding the file to fetch on every host (not cached), and another
    file, cached and on a host (evictable)."""
    cm = make_pool(capacity=capacity, hosts=hosts, redundancy=redundancy)
    data = os.urandom(size) if data is None else data
    digest = cm.upload(write_file("wanted", data))
    kept = cm.upload(write_file("other", os.urandom(other)))
    assert cm.db.files.copies(digest) == redundancy and cm.db.files.copies(kept) == redundancy
    assert cm.evict(other) == 1 and not cm.on_cache(digest) and cm.on_cache(kept)
    return cm, digest, kept, data


def test_failover_after_an_abandoned_attempt_stays_within_capacity(
        make_pool, write_file, short_deadlines):
    slow = TricklingHost("slow")
    good = MemoryHost("good-" + uuid.uuid4().hex[:8], name="good")
    cm, digest, kept, data = pool_with_evictable(make_pool, write_file, [slow, good], 2)
    add(FAULTS)
    with Sampler(cm.cache.root) as sampler:
        path = cm.warm_up(digest)
        assert path, "the file must still arrive, from the healthy host"
        with open(path, "rb") as f:
            assert f.read() == data
        assert slow.calls == 1
        assert_all_released(cm, [slow])
    assert sampler.samples > 10
    assert sampler.peak <= CAPACITY, "%d bytes on disk, capacity %d" % (sampler.peak, CAPACITY)
    # The abandoned attempt's room and the next one's did not fit beside the
    # other file: it was evicted to make room.
    assert not cm.on_cache(kept) and cm.on_cache(digest)


def test_every_attempt_abandoned_fails_within_capacity(make_pool, write_file, short_deadlines,
                                                      caplog):
    hosts = [TricklingHost("slow%d" % i) for i in range(3)]
    cm, digest, kept, _ = pool_with_evictable(make_pool, write_file, hosts, 3)
    add(FAULTS, 3)
    with Sampler(cm.cache.root) as sampler:
        assert cm.warm_up(digest) is False
        assert_all_released(cm, hosts)
    assert sampler.samples > 10
    assert sampler.peak <= CAPACITY, "%d bytes on disk, capacity %d" % (sampler.peak, CAPACITY)
    # Two rooms fit (the other file evicted for the second); the third
    # attempt found none and was never started: the download failed cleanly.
    assert sum(h.calls for h in hosts) == 2
    assert not cm.on_cache(digest) and not cm.on_cache(kept)
    assert any("no room for another download" in r.getMessage() for r in caplog.records)


def test_an_abandoned_plowdown_stays_within_capacity(make_pool, write_file, short_deadlines,
                                                     monkeypatch, fake_plowshare):
    """plowdown writes the file itself, in a work directory in tmp/: an
    abandoned one goes on writing until it ends (or its host's own timeout
    kills it)."""
    size, other = 1_000_000, 700_000  # plowdown writes 256 KiB every 10 ms
    capacity = 2 * size + 100
    plow = PlowshareHost("slowplow", name="plow", timeout=3.0)
    plow.weight = 10.0
    # The engine gives up after 0.3 s; plowdown's own timeout is 3 s.
    monkeypatch.setattr(engine, "DEADLINE_GRACE", 0.3 - plow.timeout)
    good = MemoryHost("good-" + uuid.uuid4().hex[:8], name="good")
    cm, digest, kept, data = pool_with_evictable(
        make_pool, write_file, [plow, good], 2, size=size, other=other, capacity=capacity,
        data=bytes(size))  # zeros: what grow_download writes
    running = []  # plowdown runs in flight, through the host's download
    real = plow.download

    def download(url, dest_path, max_bytes=None):
        running.append(1)
        try:
            return real(url, dest_path, max_bytes)
        finally:
            running.pop()

    monkeypatch.setattr(plow, "download", download)
    fake_plowshare.faults("slowplow", slow=0.5, grow_download=size)
    add(FAULTS)
    with Sampler(cm.cache.root) as sampler:
        path = cm.warm_up(digest)
        assert path
        with open(path, "rb") as f:
            assert f.read() == data
        assert wait_for(lambda: not running)
        assert wait_for(lambda: not tmp_entries(cm) and cm.db.sessions.reserved_bytes() == 0)
    assert cm.check()["clean"]
    assert [e["tool"] for e in fake_plowshare.log()].count("plowdown") == 1
    assert sampler.samples > 10
    assert sampler.peak <= capacity, "%d bytes on disk, capacity %d" % (sampler.peak, capacity)
    assert not cm.on_cache(kept) and cm.on_cache(digest)
