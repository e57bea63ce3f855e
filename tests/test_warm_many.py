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
from cloudmanager.engine import DOWNLOAD_GROUP, GROUP_FILE_MAX
from cloudmanager.hosts.folder import FolderHost


def sha(data):
    return hashlib.sha256(data).hexdigest()


class WatchedFolder(FolderHost):
    """A real folder host whose calls are counted while they run: the most
    that ever ran at once (a group of downloads is one call, on one
    connection), every object asked for, and the groups (a test host, not a
    mock). With a ``pause``, each object takes that long (a slow channel),
    and a group is fetched object by object through the folder's own loop."""

    def __init__(self, *args, pause=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pause = pause
        self.running = 0
        self.most = 0
        self.calls = 0
        self.batches = 0
        self.singles = 0
        self._count = threading.Lock()

    def _enter(self, objects, batch):
        with self._count:
            self.running += 1
            self.calls += objects
            self.batches += batch
            self.singles += not batch
            self.most = max(self.most, self.running)

    def _leave(self):
        with self._count:
            self.running -= 1

    def download(self, url, dest_path, max_bytes=None):
        self._enter(1, False)
        try:
            time.sleep(self.pause)  # a slow channel: overlapping calls overlap
            return super().download(url, dest_path, max_bytes)
        finally:
            self._leave()

    def download_batch(self, items, landed=None):
        self._enter(len(items), True)
        try:
            if not self.pause:
                return super().download_batch(items, landed)
            results = []
            for k, item in enumerate(items):
                time.sleep(self.pause)
                results += super().download_batch([item])
                if landed is not None:
                    landed(k, results[-1])
            return results
        finally:
            self._leave()


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
    # Never more than its two connections; and the two were used at once,
    # by two groups of twelve (one per connection).
    assert watched.most == 2
    assert (watched.batches, watched.singles) == (2, 0)


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
    # Two groups through one connection, 10 ms per file: the first group
    # is published (and told) while the second still arrives.
    slow = WatchedFolder(str(root), name="slow", fsync=False, max_connections=1, pause=0.01)
    cm = make_pool(capacity=1 << 20, hosts=[slow], redundancy=1)
    files = upload_files(cm, write_file, 2 * DOWNLOAD_GROUP)
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
    assert set(told) <= cached and len(cached) < len(hashes)
    for file_hash in cached:
        assert open(cm.pool.cache.path_for(file_hash), "rb").read() == files[file_hash]


def test_stop_finishes_the_groups_in_flight_and_starts_no_other(make_pool, write_file,
                                                                tmp_path):
    root = tmp_path / "slow"
    root.mkdir()
    slow = WatchedFolder(str(root), name="slow", fsync=False, max_connections=2, pause=0.01)
    cm = make_pool(hosts=[slow], redundancy=1)
    # Five groups for two connections: two in flight, three not started.
    files = upload_files(cm, write_file, 4 * DOWNLOAD_GROUP + 10, size=600)
    hashes = list(files)
    cm.evict(0)
    stop = threading.Event()
    told = {}

    def landed(file_hash, value):
        told[file_hash] = value

    # Set as the first bytes arrive: the groups on the host's two
    # connections are in flight then (each object takes 10 ms), and no
    # other starts.
    paths = cm.warm_up_many(hashes, stop=stop, landed=landed,
                            progress=lambda nbytes: stop.set())
    assert slow.batches == 2 and slow.calls == 2 * DOWNLOAD_GROUP
    assert sorted(told) == sorted(h for h, p in zip(hashes, paths) if p)
    assert len(told) == 2 * DOWNLOAD_GROUP
    assert all(open(p, "rb").read() == files[h] for h, p in told.items())
    assert sum(1 for p in paths if p is False) == len(hashes) - 2 * DOWNLOAD_GROUP
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
    engine's deadline (a dead mount, say), then goes on and ends; a group
    holding one of them hangs whole (its objects are noted in ``hung``)."""

    def __init__(self, *args, hang=(), hang_seconds=2.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.hang = set(hang)
        self.hang_seconds = hang_seconds
        self.hung = []
        self.ended = threading.Event()

    def download(self, url, dest_path, max_bytes=None):
        if url.rsplit("/", 1)[-1] in self.hang:
            self.hung.append(url.rsplit("/", 1)[-1])
            time.sleep(self.hang_seconds)
            try:
                return super().download(url, dest_path, max_bytes)
            finally:
                self.ended.set()
        return super().download(url, dest_path, max_bytes)

    def download_batch(self, items, landed=None):
        names = [url.rsplit("/", 1)[-1] for url, _, _ in items]
        if self.hang.isdisjoint(names):
            return super().download_batch(items, landed)
        self.hung += names
        time.sleep(self.hang_seconds)
        try:
            return super().download_batch(items, landed)
        finally:
            self.ended.set()


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
    # The engine gave up on a group of files (two: 10 files for 5 lanes),
    # which all came from the other host.
    assert hashes[3] in hanging.hung and len(hanging.hung) == 2
    states = {h: {row.host_name: row.state for row in cm.pool.db.copies.of(h)}
              for h in hanging.hung}
    assert all(s == {"hanging": "good", "fine": "good"} for s in states.values())
    # The batch has ended; the call still runs, within rooms of its own
    # (one per file of its group).
    assert reserved(cm) == sum(len(files[h]) for h in hanging.hung)
    assert cm.pool.cache.used_bytes() + reserved(cm) <= cm.pool.cache.capacity
    assert hanging.ended.wait(30)
    for _ in range(300):  # its cleanup runs once the call has returned
        if reserved(cm) == 0:
            break
        time.sleep(0.05)
    assert_cache_is_whole(cm)


def test_groups_of_small_files_and_large_ones_alone(make_pool, write_file, tmp_path):
    root = tmp_path / "watched"
    root.mkdir()
    watched = WatchedFolder(str(root), name="watched", fsync=False, max_connections=1)
    cm = make_pool(capacity=8 << 20, hosts=[watched], redundancy=1)
    # 150 small files for one connection: groups of 64, 64 and 22; two
    # files of GROUP_FILE_MAX bytes or more, each alone (download()).
    files = upload_files(cm, write_file, 150, size=3000)
    big = {}
    for i in range(2):
        data = os.urandom(GROUP_FILE_MAX + i)
        big[cm.upload(write_file("big%d" % i, data))] = data
    hashes = list(files)[:70] + list(big) + list(files)[70:]
    cm.evict(0)
    watched.calls = 0
    paths = cm.warm_up_many(hashes)
    everything = dict(files, **big)
    for file_hash, path in zip(hashes, paths):
        with open(path, "rb") as f:
            assert f.read() == everything[file_hash]
    assert (watched.batches, watched.singles, watched.calls) == (3, 2, 152)
    assert watched.most == 1
    assert_cache_is_whole(cm)


def test_a_group_with_missing_bad_and_grown_objects(make_pool, write_file, tmp_path):
    roots = [tmp_path / "first", tmp_path / "second"]
    for root in roots:
        root.mkdir()
    first = WatchedFolder(str(roots[0]), name="first", fsync=False, max_connections=1)
    first.weight = 10.0  # tried first for every file
    second = WatchedFolder(str(roots[1]), name="second", fsync=False, max_connections=1)
    cm = make_pool(hosts=[first, second], redundancy=2)
    files = upload_files(cm, write_file, 40)
    hashes = list(files)
    missing, corrupt, short, grown = hashes[1:4], hashes[10:13], hashes[20:22], hashes[30:32]
    for file_hash in missing:
        os.unlink(roots[0] / file_hash)
    for file_hash in corrupt:
        (roots[0] / file_hash).write_bytes(b"not the file" + files[file_hash][12:])
    for file_hash in short:
        (roots[0] / file_hash).write_bytes(files[file_hash][:-1])
    for file_hash in grown:
        (roots[0] / file_hash).write_bytes(files[file_hash] + b"more")
    cm.evict(0)
    first.calls = second.calls = 0
    paths = cm.warm_up_many(hashes)
    for file_hash, path in zip(hashes, paths):
        assert open(path, "rb").read() == files[file_hash]
    # Two lanes, groups of 20: every file's first attempt was in a group on
    # the first host; only the failed ones went on to the second, alone.
    assert (first.batches, first.singles, first.calls) == (2, 0, 40)
    failed = missing + corrupt + short + grown
    assert second.calls == len(failed) and second.batches == 0
    states = {h: {row.host_name: row.state for row in cm.pool.db.copies.of(h)}
              for h in hashes}
    assert all(states[h] == {"first": "missing", "second": "good"} for h in missing)
    assert all(states[h] == {"first": "bad", "second": "good"} for h in corrupt + short)
    # More bytes than recorded: refused, but not proof the copy is bad.
    assert all(states[h] == {"first": "good", "second": "good"} for h in grown)
    assert all(states[h] == {"first": "good", "second": "good"}
               for h in hashes if h not in failed)
    assert_cache_is_whole(cm)


def test_an_interruption_mid_group_leaves_nothing(make_pool, write_file, tmp_path):
    root = tmp_path / "only"
    root.mkdir()
    only = WatchedFolder(str(root), name="only", fsync=False, max_connections=1)
    cm = make_pool(capacity=1 << 20, hosts=[only], redundancy=1)
    files = upload_files(cm, write_file, 30)  # one group of 30
    hashes = list(files)
    cm.evict(0)
    arrived = [0]

    def interrupt(nbytes):  # Ctrl-C at the tenth file of the group
        arrived[0] += 1
        if arrived[0] == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cm.warm_up_many(hashes, progress=interrupt)
    assert only.batches == 1
    # Ten files were written, none landed: no temp file, no reservation.
    assert_cache_is_whole(cm)
    assert not any(cm.on_cache(h) for h in hashes)
    paths = cm.warm_up_many(hashes)
    assert all(open(p, "rb").read() == files[h] for h, p in zip(hashes, paths))
    assert_cache_is_whole(cm)


def test_a_group_fails_over_when_its_host_is_unmounted(make_pool, write_file, tmp_path):
    roots = [tmp_path / "first", tmp_path / "second"]
    for root in roots:
        root.mkdir()
    first = WatchedFolder(str(roots[0]), name="first", fsync=False, max_connections=2)
    first.weight = 10.0
    second = WatchedFolder(str(roots[1]), name="second", fsync=False, max_connections=2)
    cm = make_pool(hosts=[first, second], redundancy=2)
    files = upload_files(cm, write_file, 24)
    hashes = list(files)
    cm.evict(0)
    first.require_marker = True
    os.unlink(roots[0] / FolderHost.MARKER_NAME)  # an empty mount point, say
    paths = cm.warm_up_many(hashes)
    assert all(open(p, "rb").read() == files[h] for h, p in zip(hashes, paths))
    # An outage condemns nothing.
    assert all({row.state for row in cm.pool.db.copies.of(h)} == {"good"} for h in hashes)
    assert first.batches >= 1 and second.calls == 24
    assert_cache_is_whole(cm)


def test_an_object_hanging_mid_group_holds_up_no_file_before_it(make_pool, write_file,
                                                                  tmp_path):
    roots = [tmp_path / "first", tmp_path / "second"]
    for root in roots:
        root.mkdir()
    first = WatchedFolder(str(roots[0]), name="first", fsync=False, max_connections=2,
                          timeout=0.3)
    first.weight = 10.0  # tried first for every file
    second = WatchedFolder(str(roots[1]), name="second", fsync=False, max_connections=1)
    cm = make_pool(hosts=[first, second], redundancy=2)
    files = upload_files(cm, write_file, 20)
    hashes = list(files)
    # Three lanes, groups of 7, 7 and 6 on the first host (two at a time);
    # the fifth object of the first group hangs (a FIFO no one writes yet:
    # a dead mount, say).
    hung = hashes[4]
    os.unlink(roots[0] / hung)
    os.mkfifo(roots[0] / hung)
    cm.evict(0)
    first.calls = second.calls = 0
    told = []
    paths = cm.warm_up_many(hashes, landed=lambda h, path: told.append(h))
    assert all(open(p, "rb").read() == files[h] for h, p in zip(hashes, paths))
    # The four files before it came from the first host, as did the other
    # groups; the engine gave up on its group then: it and the two after it
    # came from the second host, one by one.
    assert second.calls == 3 and second.batches == 0
    assert set(told) == set(hashes)
    # The call given up on still holds the rooms of its files not delivered.
    assert reserved(cm) == sum(len(files[h]) for h in hashes[4:7])
    assert cm.pool.cache.used_bytes() + reserved(cm) <= cm.pool.cache.capacity
    with open(roots[0] / hung, "wb") as fifo:  # the mount comes back
        fifo.write(files[hung])
    for _ in range(300):  # the calls end, and their cleanups run
        if reserved(cm) == 0 and not temp_files(cm):
            break
        time.sleep(0.05)
    assert_cache_is_whole(cm)
    assert all({row.state for row in cm.pool.db.copies.of(h)} == {"good"} for h in hashes)


def test_a_second_attempt_given_up_keeps_its_room_too(make_pool, write_file, tmp_path):
    """A file whose first two hosts both hang: its second attempt writes in a
    reservation of its own, which the end of the batch leaves to the call (the
    review of the merged round found it given back while the call wrote)."""
    roots = [tmp_path / "h1", tmp_path / "h2", tmp_path / "fine"]
    for root in roots:
        root.mkdir()
    h1 = HangingFolder(str(roots[0]), name="h1", fsync=False, timeout=0.2,
                       max_connections=4, hang_seconds=6.0)
    h2 = HangingFolder(str(roots[1]), name="h2", fsync=False, timeout=0.2,
                       max_connections=4, hang_seconds=6.0)
    h1.weight, h2.weight = 10.0, 9.0  # tried in this order
    fine = FolderHost(str(roots[2]), name="fine", fsync=False)
    cm = make_pool(capacity=1 << 20, hosts=[h1, h2, fine], redundancy=3)
    files = upload_files(cm, write_file, 10)
    hashes = list(files)
    h1.hang = h2.hang = {hashes[3]}
    cm.evict(0)
    paths = cm.warm_up_many(hashes)
    assert all(open(p, "rb").read() == files[h] for h, p in zip(hashes, paths))
    assert hashes[3] in h1.hung and hashes[3] in h2.hung
    assert not h2.ended.is_set()
    # Both given-up calls still write, each within room of its own.
    assert reserved(cm) == sum(len(files[h]) for h in h1.hung + h2.hung)
    assert cm.pool.cache.used_bytes() + reserved(cm) <= cm.pool.cache.capacity
    assert h1.ended.wait(30) and h2.ended.wait(30)
    for _ in range(300):  # their cleanups run once the calls have returned
        if reserved(cm) == 0:
            break
        time.sleep(0.05)
    assert_cache_is_whole(cm)
