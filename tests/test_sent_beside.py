"""A large file cached and sent at once goes to its first host as it is cached
(Replicator.sent_beside): real SQLite pools and real folder hosts."""

import hashlib
import os
import threading
import time

import pytest

from cloudmanager import replication
from cloudmanager.errors import IntegrityError
from cloudmanager.hosts.base import is_staging_name
from cloudmanager.hosts.folder import FolderHost

SIZE = replication.STREAM_BESIDE_MIN + 12345  # not a multiple of any chunk


def big_file(tmp_path, name="big.bin", seed=b"a"):
    path = tmp_path / name
    block = hashlib.sha256(seed).digest() * 32768  # 1 MiB
    with open(path, "wb") as f:
        for _ in range(SIZE // len(block)):
            f.write(block)
        f.write(block[:SIZE % len(block)])
    return path


def host_files(tmp_path):
    """{host: [names]} of every entry in the hosts' folders (staging names included)."""
    root = tmp_path / "hosts"
    return {h: sorted(os.listdir(root / h)) for h in sorted(os.listdir(root))}


def test_each_host_gets_the_bytes_and_the_pool_its_copies(make_pool, tmp_path):
    cm = make_pool(1 << 30, redundancy=2)
    path = big_file(tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert cm.upload(path) == digest
    assert cm.on_cache(digest)
    copies = cm.info(digest)["uploads"]
    assert len(copies) == 2
    assert cm.stats()["queued"] == 0
    for host, names in host_files(tmp_path).items():
        if digest in names:
            assert (tmp_path / "hosts" / host / digest).read_bytes() == path.read_bytes()
        # Nothing staged is left behind, on any host.
        assert not [n for n in names if is_staging_name(n)]
    assert sum(digest in names for names in host_files(tmp_path).values()) == 2
    # The copies are good: the cache may let the file go, and it comes back whole.
    assert cm.evict(0) == 1
    assert open(cm.warm_up(digest), "rb").read() == path.read_bytes()


def test_one_host_one_copy_and_the_same_file_twice(make_pool, tmp_path):
    cm = make_pool(1 << 30, redundancy=1, hosts=["dir:%s" % (tmp_path / "hosts" / "only")])
    path = big_file(tmp_path, seed=b"b")
    digest = cm.upload(path)
    assert cm.stats()["queued"] == 0
    assert digest in host_files(tmp_path)["only"]
    # Again: the file is known and held; the bytes streamed beside are dropped.
    assert cm.upload(path) == digest
    names = host_files(tmp_path)["only"]
    assert names.count(digest) == 1 and not [n for n in names if is_staging_name(n)]
    assert len(cm.info(digest)["uploads"]) == 1


def test_deferred_uploads_send_nothing(make_pool, tmp_path):
    cm = make_pool(1 << 30, redundancy=1, hosts=["dir:%s" % (tmp_path / "hosts" / "only")])
    path = big_file(tmp_path, seed=b"c")
    digest = cm.upload(path, defer=True)
    assert digest not in host_files(tmp_path)["only"]
    assert cm.stats()["queued"] == 1
    assert cm.sync()["complete"] == 1
    assert (tmp_path / "hosts" / "only" / digest).read_bytes() == path.read_bytes()


class CountingFolderHost(FolderHost):
    """A real folder host that notes how it was given each file."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def stage(self, stream, size):
        self.calls.append("stage")
        return super().stage(stream, size)

    def upload(self, local_path, name):
        self.calls.append("upload")
        return super().upload(local_path, name)


def test_the_first_host_reads_the_source_as_it_is_cached(make_pool, tmp_path):
    roots = [tmp_path / "hosts" / n for n in ("a", "b")]
    for root in roots:
        root.mkdir(parents=True)
    hosts = [CountingFolderHost(str(root), fsync=False) for root in roots]
    cm = make_pool(1 << 30, redundancy=2, hosts=hosts)
    path = big_file(tmp_path, seed=b"d")
    digest = cm.upload(path)
    # One host staged the source as it was read; the other got the cached copy.
    assert sorted(h.calls[0] for h in hosts) == ["stage", "upload"]
    for root in roots:
        assert (root / digest).read_bytes() == path.read_bytes()
    # A small file goes the usual way: cached, then copied from the cache.
    small = tmp_path / "small.txt"
    small.write_bytes(b"small")
    cm.upload(small)
    assert [h.calls[1:] for h in hosts] == [["upload"], ["upload"]]


def test_upload_many_sends_a_large_file_beside_too(make_pool, tmp_path):
    root = tmp_path / "hosts" / "a"
    root.mkdir(parents=True)
    host = CountingFolderHost(str(root), fsync=False)
    cm = make_pool(1 << 30, redundancy=1, hosts=[host])
    path = big_file(tmp_path, seed=b"e")
    small = tmp_path / "small.txt"
    small.write_bytes(b"small")
    digests = cm.upload_many([small, path])
    assert sorted(host.calls) == ["stage", "upload"]
    assert (root / digests[1]).read_bytes() == path.read_bytes()
    assert cm.stats()["queued"] == 0


def test_a_refused_file_leaves_nothing_on_the_host(make_pool, tmp_path):
    """The caching fails (the bytes are not the file expected): what was staged
    beside it is aborted, and nothing is recorded."""
    root = tmp_path / "hosts" / "a"
    root.mkdir(parents=True)
    host = CountingFolderHost(str(root), fsync=False)
    cm = make_pool(1 << 30, redundancy=1, hosts=[host])
    path = big_file(tmp_path, seed=b"f")
    with open(path, "rb") as src:
        with pytest.raises(IntegrityError):
            cm.pool.add_open_file(src, str(path), "big.bin", 0, "0" * 64)
    # The caller did not wait for the stream; it drops what it staged when it ends.
    for thread in threading.enumerate():
        if thread.name == "cloudmanager-beside":
            thread.join()
    assert host.calls == ["stage"]
    assert [n for n in os.listdir(root) if n != ".cloudmanager-host"] == []
    assert cm.stats()["files"] == 0


class SlowStagingFolderHost(FolderHost):
    """A real folder host that reads what it stages slowly (a slow link)."""

    def stage(self, stream, size):
        class Slow:
            def __init__(self, inner):
                self.inner = inner

            def read(self, n=-1):
                time.sleep(0.02)
                return self.inner.read(n)

            def __getattr__(self, name):
                return getattr(self.inner, name)

        return super().stage(Slow(stream), size)


def test_an_interrupted_caching_leaves_nothing_staged_once_closed(make_pool, tmp_path):
    """Ctrl-C while the file is cached: the caller does not wait for the stream
    beside it, but closing the pool does, and the stream aborts what it staged
    (a process that ended with it running left a staging file behind)."""
    root = tmp_path / "hosts" / "slow"
    root.mkdir(parents=True)
    cm = make_pool(1 << 30, redundancy=1, hosts=[SlowStagingFolderHost(str(root), fsync=False)])
    path = big_file(tmp_path, seed=b"g")
    seen = [0]

    def progress(nbytes):
        seen[0] += nbytes
        if seen[0] > SIZE // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cm.pool.upload(path, progress=progress)
    cm.close()
    assert [n for n in os.listdir(root) if n != ".cloudmanager-host"] == []
