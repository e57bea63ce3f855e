"""The pipelined copy-and-hash of large files (fsutil), and large ingests through it.

Real files in real folders; the pipeline's threshold is lowered so that the
tests stay small. No timing assertions.
"""

import hashlib
import os
import threading

import pytest

from cloudmanager import fsutil
from cloudmanager.errors import CacheError


@pytest.fixture
def small_pipeline(monkeypatch):
    """Pipeline from 64 KiB, 16 KiB chunks, 3 buffers, 32 KiB writeback windows."""
    monkeypatch.setattr(fsutil, "PIPELINE_MIN", 64 * 1024)
    monkeypatch.setattr(fsutil, "CHUNK", 16 * 1024)
    monkeypatch.setattr(fsutil, "PIPELINE_DEPTH", 3)
    monkeypatch.setattr(fsutil, "WRITEBACK_WINDOW", 32 * 1024)


def copy(src_path, dst_path, **kwargs):
    with open(src_path, "rb", buffering=0) as src:
        fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            return fsutil.copy_and_hash(src, fd, **kwargs)
        finally:
            os.close(fd)


@pytest.mark.parametrize("size", [0, 1, 16 * 1024 - 1, 64 * 1024, 64 * 1024 + 1,
                                  1000 * 1000 + 7])
def test_pipelined_copy_is_exact(tmp_path, small_pipeline, size):
    data = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    digest, n = copy(src, tmp_path / "dst")
    assert (digest, n) == (hashlib.sha256(data).hexdigest(), size)
    assert (tmp_path / "dst").read_bytes() == data


def test_pipeline_is_used_for_large_files(tmp_path, small_pipeline, monkeypatch):
    used = []
    real = fsutil._copy_pipelined
    monkeypatch.setattr(fsutil, "_copy_pipelined",
                        lambda *a: used.append(True) or real(*a))
    (tmp_path / "big").write_bytes(b"b" * (200 * 1024))
    (tmp_path / "small").write_bytes(b"s" * 1024)
    copy(tmp_path / "big", tmp_path / "big.out")
    assert used == [True]
    copy(tmp_path / "small", tmp_path / "small.out")
    assert used == [True]


def test_limit_raises_overflow(tmp_path, small_pipeline):
    (tmp_path / "src").write_bytes(os.urandom(300 * 1024))
    with pytest.raises(OverflowError):
        copy(tmp_path / "src", tmp_path / "dst", limit=100 * 1024)
    assert not any(t.name == "cloudmanager-copy" for t in threading.enumerate())


class FailingReader:
    """A regular file's reader that fails after ``fail_after`` bytes."""

    def __init__(self, path, fail_after, exc):
        self.f = open(path, "rb", buffering=0)
        self.fail_after, self.exc, self.read = fail_after, exc, 0

    def fileno(self):
        return self.f.fileno()

    def readinto(self, buf):
        if self.read >= self.fail_after:
            raise self.exc
        n = self.f.readinto(buf)
        self.read += n
        return n

    def close(self):
        self.f.close()


def test_read_error_mid_copy_is_raised_and_stops_the_thread(tmp_path, small_pipeline):
    (tmp_path / "src").write_bytes(os.urandom(400 * 1024))
    reader = FailingReader(tmp_path / "src", 100 * 1024, OSError(5, "Input/output error"))
    fd = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="Input/output"):
            fsutil.copy_and_hash(reader, fd)
    finally:
        os.close(fd)
        reader.close()
    assert not any(t.name == "cloudmanager-copy" for t in threading.enumerate())


def test_write_error_mid_copy_is_raised(tmp_path, small_pipeline):
    (tmp_path / "src").write_bytes(os.urandom(400 * 1024))
    read_fd = os.open(tmp_path / "src", os.O_RDONLY)  # not writable: every write fails
    try:
        with open(tmp_path / "src", "rb", buffering=0) as src, pytest.raises(OSError):
            fsutil.copy_and_hash(src, read_fd)
    finally:
        os.close(read_fd)
    assert not any(t.name == "cloudmanager-copy" for t in threading.enumerate())


def test_caller_interrupt_stops_the_thread(tmp_path, small_pipeline, monkeypatch):
    # KeyboardInterrupt while hashing: the I/O thread is stopped and joined
    # before copy_and_hash returns, so the caller may close and remove the file.
    (tmp_path / "src").write_bytes(os.urandom(400 * 1024))
    calls = []
    real_sha256 = hashlib.sha256

    class Digest:
        def __init__(self):
            self.real = real_sha256()

        def update(self, data):
            calls.append(len(data))
            if len(calls) == 3:
                raise KeyboardInterrupt
            self.real.update(data)

    monkeypatch.setattr(fsutil, "sha256", Digest)
    with pytest.raises(KeyboardInterrupt):
        copy(tmp_path / "src", tmp_path / "dst")
    assert not any(t.name == "cloudmanager-copy" for t in threading.enumerate())


def test_pipe_source_is_copied_by_the_plain_loop(tmp_path, small_pipeline):
    r, w = os.pipe()
    data = os.urandom(100 * 1024)

    def feed():
        with os.fdopen(w, "wb") as out:
            out.write(data)

    t = threading.Thread(target=feed)
    t.start()
    with os.fdopen(r, "rb", buffering=0) as src:
        fd = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            digest, n = fsutil.copy_and_hash(src, fd)
        finally:
            os.close(fd)
    t.join()
    assert (digest, n) == (hashlib.sha256(data).hexdigest(), len(data))


class Stream:
    """A network body: ``readinto`` in short reads, no file descriptor."""

    def __init__(self, data, step=5000):
        self.data, self.pos, self.step = data, 0, step

    def readinto(self, buf):
        n = min(len(buf), self.step, len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("announced", [None, 10, 100 * 1024, 10 << 20])
def test_a_stream_is_copied_exactly_whatever_length_it_announces(tmp_path, small_pipeline,
                                                                   monkeypatch, announced):
    # The announced length only picks the way: a large one the pipeline,
    # a wrong one still gets every byte, hashed.
    used = []
    real = fsutil._copy_pipelined
    monkeypatch.setattr(fsutil, "_copy_pipelined", lambda *a: used.append(True) or real(*a))
    data = os.urandom(100 * 1024)
    fd = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        got = fsutil.copy_and_hash(Stream(data), fd, length=announced)
    finally:
        os.close(fd)
    assert got == (hashlib.sha256(data).hexdigest(), len(data))
    assert (tmp_path / "dst").read_bytes() == data
    assert used == ([True] if announced is not None and announced >= 64 * 1024 else [])


@pytest.mark.parametrize("announced", [None, 100 * 1024])
def test_a_stream_longer_than_the_limit_is_stopped(tmp_path, small_pipeline, announced):
    fd = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OverflowError):
            fsutil.copy_and_hash(Stream(os.urandom(400 * 1024)), fd, limit=100 * 1024,
                                 length=announced)
    finally:
        os.close(fd)
    # It stopped within a read of the limit: the rest was never written.
    assert os.path.getsize(tmp_path / "dst") <= 100 * 1024
    assert not any(t.name == "cloudmanager-copy" for t in threading.enumerate())


# -- through the cache -------------------------------------------------------------

@pytest.mark.parametrize("fsync", [False, True])
def test_large_ingest_through_the_pipeline(make_pool, write_file, small_pipeline, fsync):
    cm = make_pool(4 << 20, fsync=fsync)
    data = os.urandom(700 * 1024)
    digest = cm.upload(write_file("big.bin", data), defer=True)
    assert digest == hashlib.sha256(data).hexdigest()
    with open(cm.warm_up(digest), "rb") as f:
        assert f.read() == data
    assert cm.stats()["cached_bytes"] == len(data)
    assert os.listdir(cm.cache.tmp_dir) == []


def test_error_mid_ingest_leaves_no_temp_file(make_pool, write_file, small_pipeline,
                                              monkeypatch):
    cm = make_pool(4 << 20)
    src = write_file("big.bin", os.urandom(500 * 1024))
    real_write_all = fsutil.write_all
    written = []

    def failing_write_all(fd, data):
        written.append(len(data))
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(fsutil, "write_all", failing_write_all)
    assert cm.upload(src, defer=True) is not False  # went to the hosts instead
    monkeypatch.setattr(fsutil, "write_all", real_write_all)
    assert os.listdir(cm.cache.tmp_dir) == []
    assert cm.stats()["cached_bytes"] == 0
    assert cm.db.sessions.reserved_bytes() == 0


def test_source_growing_during_ingest_is_refused(make_pool, write_file, small_pipeline):
    cm = make_pool(4 << 20)
    src = write_file("grows.bin", os.urandom(200 * 1024))
    size = os.path.getsize(src)
    with open(src, "rb", buffering=0) as f, open(src, "ab") as grow:
        grow.write(b"more")
        grow.flush()
        fd = os.open(os.path.join(cm.cache.tmp_dir, "probe"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OverflowError):
                fsutil.copy_and_hash(f, fd, limit=size)
        finally:
            os.close(fd)
            os.unlink(os.path.join(cm.cache.tmp_dir, "probe"))


def test_batch_ingest_of_large_files_uses_the_stream(make_pool, write_file, small_pipeline):
    cm = make_pool(8 << 20)
    datas = [os.urandom(300 * 1024 + i) for i in range(3)]
    files = [write_file("b%d" % i, d) for i, d in enumerate(datas)]
    from cloudmanager.cache import store as cache_module

    old = cache_module.SMALL_FILE
    cache_module.SMALL_FILE = 1024  # force the streaming path
    try:
        results = cm.upload_many(files)
    finally:
        cache_module.SMALL_FILE = old
    assert results == [hashlib.sha256(d).hexdigest() for d in datas]
    for digest, d in zip(results, datas):
        with open(cm.warm_up(digest), "rb") as f:
            assert f.read() == d


def test_cache_error_on_changed_size(make_pool, write_file):
    # _copy_in refuses a file whose size is not the one reserved for it.
    cm = make_pool(1 << 20)
    src = write_file("s", b"12345")
    temp = os.path.join(cm.cache.tmp_dir, "%s-probe.tmp" % cm.cache.token)
    with pytest.raises(CacheError):
        cm.cache._copy_in(str(src), temp, 3)
    fsutil.remove_quietly(temp)
