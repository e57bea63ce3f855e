"""warm_up_many: many files back into the cache, fetched in parallel batches.

Real pools on real files (both catalogs: see ``BOTH_CATALOGS`` in conftest),
real folder hosts; the one host subclass below only observes the real
folder host's downloads (and slows them, so that overlapping calls overlap).
"""

import hashlib
import os
import threading
import time

import pytest

from cloudmanager.crypto import new_identity_file
from cloudmanager.hosts.folder import FolderHost


def sha(data):
    return hashlib.sha256(data).hexdigest()


class WatchedFolder(FolderHost):
    """A real folder host whose downloads are counted while they run: the
    most that ever ran at once, and every call (a test host, not a mock)."""

    def __init__(self, *args, pause=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pause = pause
        self.running = 0
        self.most = 0
        self.calls = 0
        self._count = threading.Lock()

    def download(self, url, dest_path, max_bytes=None):
        with self._count:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.pause)  # a slow channel: overlapping calls overlap
            return super().download(url, dest_path, max_bytes)
        finally:
            with self._count:
                self.running -= 1


def upload_files(cm, write_file, count, size=4096, prefix="f"):
    """``{hash: bytes}`` of ``count`` distinct files uploaded to ``cm``."""
    files = {}
    paths = []
    for i in range(count):
        data = os.urandom(size - i % 7)
        paths.append(write_file("%s%04d" % (prefix, i), data))
        files[sha(data)] = data
    hashes = cm.upload_many(paths)
    assert set(hashes) == set(files)
    return files


def temp_files(cm):
    return sorted(os.listdir(cm.pool.cache.tmp_dir))


def reserved(cm):
    return cm.pool.db.sessions.reserved_bytes()


def assert_cache_is_whole(cm):
    """No temp file, no reservation, and the cache within its capacity."""
    assert temp_files(cm) == []
    assert reserved(cm) == 0
    assert cm.pool.cache.used_bytes() <= cm.pool.cache.capacity


def test_every_file_comes_back_byte_for_byte(make_pool, write_file):
    cm = make_pool(capacity=4 << 20, redundancy=2)
    files = upload_files(cm, write_file, 60)
    assert cm.evict(0) == 60
    hashes = list(files)
    asked = hashes + ["not a hash", "0" * 64, hashes[3]]
    paths = cm.warm_up_many(asked)
    assert len(paths) == len(asked)
    for file_hash, path in zip(hashes, paths):
        with open(path, "rb") as f:
            assert f.read() == files[file_hash]
        assert cm.on_cache(file_hash)
    assert paths[60:] == [None, None, paths[3]]
    assert_cache_is_whole(cm)
    # A second call finds them all cached: the same paths, 60 hits, no miss.
    before = cm.stats()
    assert cm.warm_up_many(hashes) == paths[:60]
    after = cm.stats()
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (60, 0)


def test_landed_tells_each_file_once_with_the_value_returned(make_pool, write_file):
    cm = make_pool(capacity=4 << 20, redundancy=1)
    files = upload_files(cm, write_file, 12)
    hashes = list(files)
    cm.evict(0)
    cm.warm_up(hashes[0])  # one hit among the misses
    told = {}

    def landed(file_hash, value):
        assert file_hash not in told
        told[file_hash] = value

    got = []
    paths = cm.warm_up_many(hashes + ["0" * 64, "zz"], landed=landed,
                            progress=got.append)
    assert told == dict(zip(hashes + ["0" * 64], paths))
    assert paths[-2:] == [None, None]
    assert sum(got) == sum(len(files[h]) for h in hashes[1:])  # the misses' bytes


def test_a_hosts_connection_bound_is_held(make_pool, write_file, tmp_path):
    root = tmp_path / "watched"
    root.mkdir()
    watched = WatchedFolder(str(root), name="watched", fsync=False, max_connections=2,
                            pause=0.05)
    cm = make_pool(hosts=[watched], redundancy=1)
    files = upload_files(cm, write_file, 24)
    cm.evict(0)
    paths = cm.warm_up_many(list(files))
    assert all(open(p, "rb").read() == files[h] for h, p in zip(files, paths))
    assert watched.calls == 24
    # Never more than its two connections; and the two were used at once.
    assert watched.most == 2


def test_failover_under_parallelism_marks_the_bad_copies(make_pool, write_file, tmp_path):
    roots = [tmp_path / "first", tmp_path / "second"]
    for root in roots:
        root.mkdir()
    first = WatchedFolder(str(roots[0]), name="first", fsync=False, max_connections=3)
    first.weight = 10.0  # the healthiest-first order tries it first for every file
    second = FolderHost(str(roots[1]), name="second", fsync=False, max_connections=3)
    cm = make_pool(hosts=[first, second], redundancy=2)
    files = upload_files(cm, write_file, 30)
    hashes = list(files)
    missing, corrupt = hashes[:5], hashes[5:10]
    for file_hash in missing:
        os.unlink(roots[0] / file_hash)
    for file_hash in corrupt:
        (roots[0] / file_hash).write_bytes(b"not the file" + files[file_hash][12:])
    cm.evict(0)
    paths = cm.warm_up_many(hashes)
    for file_hash, path in zip(hashes, paths):
        assert open(path, "rb").read() == files[file_hash]
    assert first.calls == 30  # every file was tried there first
    states = {h: {row.host_name: row.state for row in cm.pool.db.copies.of(h)}
              for h in hashes}
    assert all(states[h] == {"first": "missing", "second": "good"} for h in missing)
    assert all(states[h] == {"first": "bad", "second": "good"} for h in corrupt)
    assert all(states[h] == {"first": "good", "second": "good"} for h in hashes[10:])
    assert_cache_is_whole(cm)


def test_no_host_holds_it_then_the_file_is_false_and_the_rest_come_back(make_pool,
                                                                        write_file, tmp_path):
    root = tmp_path / "only"
    root.mkdir()
    cm = make_pool(hosts=[FolderHost(str(root), name="only", fsync=False)], redundancy=1)
    files = upload_files(cm, write_file, 10)
    hashes = list(files)
    os.unlink(root / hashes[4])
    cm.evict(0)
    paths = cm.warm_up_many(hashes)
    assert paths[4] is False
    assert all(open(p, "rb").read() == files[h]
               for h, p in zip(hashes, paths) if h != hashes[4])
    assert {row.state for row in cm.pool.db.copies.of(hashes[4])} == {"missing"}
    assert_cache_is_whole(cm)


def test_an_interrupted_batch_leaves_nothing_behind(make_pool, write_file):
    cm = make_pool(capacity=1 << 20, redundancy=1)
    files = upload_files(cm, write_file, 80)
    hashes = list(files)
    cm.evict(0)
    chunks = [0]

    def interrupt(nbytes):  # Ctrl-C while bytes arrive, in a host call's thread
        chunks[0] += 1
        if chunks[0] == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cm.warm_up_many(hashes, progress=interrupt)
    assert_cache_is_whole(cm)
    assert sum(cm.on_cache(h) for h in hashes) < 80
    for file_hash in hashes:  # what was published is whole
        if cm.on_cache(file_hash):
            assert open(cm.pool.cache.path_for(file_hash), "rb").read() == files[file_hash]
    paths = cm.warm_up_many(hashes)
    assert all(open(p, "rb").read() == files[h] for h, p in zip(hashes, paths))
    assert_cache_is_whole(cm)


def test_an_exception_mid_batch_keeps_what_was_told_and_leaves_nothing_else(
        make_pool, write_file, tmp_path):
    root = tmp_path / "slow"
    root.mkdir()
    # 80 files through two connections, 30 ms each: at least 1.2 s, so files
    # are published (and told) in several groups while others still arrive.
    slow = WatchedFolder(str(root), name="slow", fsync=False, max_connections=2, pause=0.03)
    cm = make_pool(capacity=1 << 20, hosts=[slow], redundancy=1)
    files = upload_files(cm, write_file, 80)
    hashes = list(files)
    cm.evict(0)
    told = []

    def landed(file_hash, path):
        told.append(file_hash)
        if len(told) == 20:
            raise RuntimeError("the caller failed mid-batch")

    with pytest.raises(RuntimeError):
        cm.warm_up_many(hashes, landed=landed)
    assert_cache_is_whole(cm)
    cached = {h for h in hashes if cm.on_cache(h)}
    assert set(told) <= cached and len(cached) < 80
    for file_hash in cached:
        assert open(cm.pool.cache.path_for(file_hash), "rb").read() == files[file_hash]


def test_stop_finishes_the_files_in_flight_and_starts_no_other(make_pool, write_file,
                                                               tmp_path):
    root = tmp_path / "slow"
    root.mkdir()
    slow = WatchedFolder(str(root), name="slow", fsync=False, max_connections=2, pause=0.05)
    cm = make_pool(hosts=[slow], redundancy=1)
    files = upload_files(cm, write_file, 20)
    hashes = list(files)
    cm.evict(0)
    stop = threading.Event()
    told = {}

    def landed(file_hash, value):
        told[file_hash] = value

    # Set as the first bytes arrive: the two files on the host's two
    # connections are in flight then, and no other starts.
    paths = cm.warm_up_many(hashes, stop=stop, landed=landed,
                            progress=lambda nbytes: stop.set())
    assert slow.calls == 2
    assert sorted(told) == sorted(h for h, p in zip(hashes, paths) if p)
    assert len(told) == 2 and all(open(p, "rb").read() == files[h] for h, p in told.items())
    assert sum(1 for p in paths if p is False) == 18
    assert_cache_is_whole(cm)


def test_a_batch_bigger_than_the_cache(make_pool, write_file):
    cm = make_pool(capacity=64 * 1024, redundancy=1)
    # A file no host holds yet: pinned until one does, never evicted.
    kept = write_file("kept", b"only here " * 400)
    kept_hash = cm.upload(kept, defer=True)
    files = upload_files(cm, write_file, 40)  # 160 KiB: more than the cache
    hashes = list(files)
    cm.evict(0)
    assert cm.on_cache(kept_hash)
    delivered = {}

    def landed(file_hash, path):
        delivered[file_hash] = open(path, "rb").read()  # whole when it is told

    paths = cm.warm_up_many(hashes, landed=landed)
    assert all(paths)
    assert delivered == files
    assert cm.on_cache(kept_hash)
    assert cm.on_cache(hashes[-1])  # the last batch stays
    assert_cache_is_whole(cm)
    # A file larger than the whole cache is refused, alone.
    big = cm.upload(write_file("big", os.urandom(80 * 1024)))
    assert cm.warm_up_many([hashes[0], big]) [1] is False


def test_an_encrypted_pool(make_pool, write_file, tmp_path):
    pytest.importorskip("pyrage")
    key = tmp_path / "keys" / "pool.key"
    key.parent.mkdir()
    new_identity_file(str(key))
    cm = make_pool(capacity=4 << 20, redundancy=2, encryption_key=str(key))
    files = upload_files(cm, write_file, 12, size=3000)
    cm.evict(0)
    paths = cm.warm_up_many(list(files))
    assert all(open(p, "rb").read() == files[h] for h, p in zip(files, paths))
    assert_cache_is_whole(cm)


def test_restore_brings_a_trees_files_in_through_the_parallel_batches(make_pool, tmp_path):
    root = tmp_path / "watched"
    root.mkdir()
    watched = WatchedFolder(str(root), name="watched", fsync=False, max_connections=2,
                            pause=0.02)
    cm = make_pool(capacity=1 << 20, hosts=[watched], redundancy=1)
    tree = tmp_path / "tree"
    contents = {}
    for i in range(30):
        data = os.urandom(2000 + i)
        path = tree / ("d%d" % (i % 3)) / ("f%02d.bin" % i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        contents[path.relative_to(tree).as_posix()] = data
    tree_hash = cm.upload_tree(tree)
    assert tree_hash
    cm.evict(0)
    watched.calls = watched.most = 0
    moved = []
    summary = cm.restore_tree(tree_hash, tmp_path / "out", jobs=4,
                              progress=lambda nbytes, nfiles: moved.append((nbytes, nfiles)))
    assert summary["ok"] and summary["fetched"] == 30
    for relative, data in contents.items():
        assert (tmp_path / "out" / relative).read_bytes() == data
    # The manifest, then each file once, never more than two at a time.
    assert watched.calls == 31 and watched.most == 2
    assert sum(n for n, _ in moved) == sum(len(d) for d in contents.values())
    assert sum(f for _, f in moved) == 30
    assert_cache_is_whole(cm)


class HangingFolder(FolderHost):
    """A real folder host whose download of some objects hangs past the
    engine's deadline (a dead mount, say), then goes on and ends."""

    def __init__(self, *args, hang=(), hang_seconds=2.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.hang = set(hang)
        self.hang_seconds = hang_seconds
        self.ended = threading.Event()

    def download(self, url, dest_path, max_bytes=None):
        if url.rsplit("/", 1)[-1] in self.hang:
            time.sleep(self.hang_seconds)
            try:
                return super().download(url, dest_path, max_bytes)
            finally:
                self.ended.set()
        return super().download(url, dest_path, max_bytes)


def test_a_call_given_up_keeps_its_room_until_it_ends(make_pool, write_file, tmp_path):
    roots = [tmp_path / "hanging", tmp_path / "fine"]
    for root in roots:
        root.mkdir()
    hanging = HangingFolder(str(roots[0]), name="hanging", fsync=False, timeout=0.2,
                            max_connections=4, hang_seconds=6.0)
    hanging.weight = 10.0  # tried first
    fine = FolderHost(str(roots[1]), name="fine", fsync=False)
    cm = make_pool(capacity=1 << 20, hosts=[hanging, fine], redundancy=2)
    files = upload_files(cm, write_file, 10)
    hashes = list(files)
    hanging.hang = {hashes[3]}
    cm.evict(0)
    paths = cm.warm_up_many(hashes)
    # The engine gave up on the hung call and took the file from the other host.
    assert all(open(p, "rb").read() == files[h] for h, p in zip(hashes, paths))
    assert not hanging.ended.is_set()
    # The batch has ended; the call still runs, within a room of its own.
    assert reserved(cm) == len(files[hashes[3]])
    assert cm.pool.cache.used_bytes() + reserved(cm) <= cm.pool.cache.capacity
    assert hanging.ended.wait(30)
    for _ in range(300):  # its cleanup runs once the call has returned
        if reserved(cm) == 0:
            break
        time.sleep(0.05)
    assert_cache_is_whole(cm)
