"""Fault injection: hosts down, hanging, lying, silent; a full disk; a busy
database; an S3 server stopped mid-upload; a remove cut short by SIGKILL.

Each test says what the pool must do, and counts its faults in the
"faults injected" figure.
"""

import errno
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

import cloudmanager
from cloudmanager import CloudManager, engine
from cloudmanager.db import connection as database
from cloudmanager.hosts.memory import MemoryHost
from helpers import sha
from hosts import s3_server
from hosts.s3_server import MotoServer

aws_env = s3_server.aws_env  # a fixture: fake credentials, no real AWS configuration

from .figures import FAULTS, add

REPO = os.path.dirname(os.path.dirname(os.path.abspath(cloudmanager.__file__)))


def memory_hosts(*names):
    tag = uuid.uuid4().hex[:8]
    return [MemoryHost("%s-%s" % (n, tag), name=n) for n in names]


def tmp_entries(cm):
    return os.listdir(cm.cache.tmp_dir)


# -- a host that is down ------------------------------------------------------------


def test_a_host_down_is_skipped_and_sync_catches_up(make_pool, write_file):
    a, b = memory_hosts("a", "b")
    cm = make_pool(hosts=[a, b], redundancy=2)
    b.faults["down"] = True
    add(FAULTS)
    data = b"down" * 300
    digest = cm.upload(write_file("f", data))
    assert digest == sha(data)
    assert cm.db.files.copies(digest) == 1 and cm.db.queue.hashes() == [digest]
    cm.evict(0)
    a.faults["down"], b.faults["down"] = True, False  # now the holder is down
    add(FAULTS)
    assert cm.warm_up(digest) is False  # b never got it, a is down: no copy, no crash
    a.faults["down"] = False
    assert cm.sync()["complete"] == 1
    cm.evict(0)
    a.faults["down"] = True
    add(FAULTS)
    with open(cm.warm_up(digest), "rb") as f:  # from b now
        assert f.read() == data
    assert cm.check()["clean"]


def test_every_host_down_keeps_the_file_pinned_and_queued(make_pool, write_file):
    a, b = memory_hosts("a", "b")
    a.faults["down"] = b.faults["down"] = True
    add(FAULTS, 2)
    cm = make_pool(hosts=[a, b], redundancy=2)
    digest = cm.upload(write_file("f", b"x" * 1000))
    assert digest and cm.db.queue.hashes() == [digest]
    assert cm.evict(0) == 0 and cm.on_cache(digest)  # the only copy: never evicted
    a.faults["down"] = b.faults["down"] = False
    cm.sync()
    assert cm.db.files.copies(digest) == 2 and cm.db.queue.hashes() == []


# -- a host that hangs past its timeout ---------------------------------------------


class HangingHost(MemoryHost):
    """A memory host whose calls block until ``release`` is set (a stuck socket,
    a custom host's bug); its own ``timeout`` does nothing about it."""

    def __init__(self, store, release, timeout):
        super().__init__(store, name="hanging", timeout=timeout)
        self.release = release
        self.downloads_ended = threading.Event()

    def _call(self):
        self.release.wait(60)
        super()._call()

    def download(self, url, dest_path, max_bytes=None):
        try:
            super().download(url, dest_path, max_bytes)
        finally:
            self.downloads_ended.set()


TIMEOUT = 0.5
#: Generous: the machine is shared. The engine itself allows DEADLINE_GRACE.
MARGIN = engine.DEADLINE_GRACE + 4.0


def test_a_hanging_upload_returns_within_the_timeout(make_pool, write_file):
    release = threading.Event()
    hanging = HangingHost("hang-" + uuid.uuid4().hex, release, TIMEOUT)
    (good,) = memory_hosts("good")
    cm = make_pool(hosts=[hanging, good], redundancy=2)
    add(FAULTS)
    started = time.monotonic()
    digest = cm.upload(write_file("f", b"h" * 1000))
    assert time.monotonic() - started < TIMEOUT + MARGIN
    assert digest and cm.db.files.copies(digest) == 1 and cm.db.queue.hashes() == [digest]
    assert "did not end within" in cm.db.health.all()["hanging"].last_error
    release.set()


def test_a_hanging_download_returns_within_the_timeout_and_leaves_nothing(make_pool,
                                                                         write_file):
    release = threading.Event()
    release.set()
    hanging = HangingHost("hang-" + uuid.uuid4().hex, release, TIMEOUT)
    cm = make_pool(hosts=[hanging], redundancy=1)
    data = b"slow" * 500
    digest = cm.upload(write_file("f", data))
    cm.evict(0)
    release.clear()
    hanging.downloads_ended.clear()
    add(FAULTS)
    started = time.monotonic()
    assert cm.warm_up(digest) is False
    assert time.monotonic() - started < TIMEOUT + MARGIN
    # The abandoned call may still write: it keeps its room (issue 11).
    assert cm.db.sessions.reserved_bytes() == len(data)
    release.set()  # the abandoned call ends now; what it writes is removed
    # The caller removed its temp file already: wait for the abandoned call
    # to end (it writes a temp file of its own first) and its cleanup to
    # run, which removes that file and then gives the room back.
    deadline = time.monotonic() + 10
    while ((not hanging.downloads_ended.is_set() or tmp_entries(cm)
            or cm.db.sessions.reserved_bytes())
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert tmp_entries(cm) == [] and cm.db.sessions.reserved_bytes() == 0
    assert cm.check()["clean"]
    with open(cm.warm_up(digest), "rb") as f:
        assert f.read() == data


def test_a_hanging_host_in_a_batch_upload_returns_within_the_timeout(make_pool, write_file):
    release = threading.Event()
    hanging = HangingHost("hang-" + uuid.uuid4().hex, release, TIMEOUT)
    (good,) = memory_hosts("good")
    cm = make_pool(hosts=[hanging, good], redundancy=2)
    paths = [write_file("f%d" % i, b"%03d" % i * 100) for i in range(40)]  # 3 groups
    add(FAULTS)
    started = time.monotonic()
    digests = cm.upload_many(paths)
    assert time.monotonic() - started < TIMEOUT + MARGIN
    release.set()
    assert all(digests) and sorted(cm.db.queue.hashes()) == sorted(digests)
    assert all(cm.db.files.copies(d) == 1 for d in digests)
    assert "did not end within" in cm.db.health.all()["hanging"].last_error


def test_a_hanging_batch_host_returns_within_its_files_deadlines(make_pool, write_file):
    """A host that takes a group in one call gets the sum of its files' deadlines."""
    class HangingBatchHost(HangingHost):
        can_batch = True

    release = threading.Event()
    hanging = HangingBatchHost("hang-" + uuid.uuid4().hex, release, TIMEOUT)
    (good,) = memory_hosts("good")
    cm = make_pool(hosts=[hanging, good], redundancy=2)
    paths = [write_file("g%d" % i, b"%03d" % i * 10) for i in range(2)]  # one group
    add(FAULTS)
    started = time.monotonic()
    digests = cm.upload_many(paths)
    assert time.monotonic() - started < 2 * engine.UploadEngine.deadline(hanging) + MARGIN
    release.set()
    assert all(digests) and sorted(cm.db.queue.hashes()) == sorted(digests)
    assert "did not end within" in cm.db.health.all()["hanging"].last_error


def test_a_slow_host_in_a_batch_upload_gets_its_deadline_per_file(make_pool, write_file):
    """A group of files, each well within the deadline, may take longer in
    all than one deadline: nothing is given up."""
    slow = MemoryHost("slow-" + uuid.uuid4().hex, name="slow", latency=0.1, timeout=0.2)
    cm = make_pool(hosts=[slow], redundancy=1)
    files = 16  # one group, 1.6 s in all; the deadline is 1.2 s per file
    assert files * slow.latency > engine.DEADLINE_GRACE + slow.timeout
    digests = cm.upload_many([write_file("f%d" % i, b"%03d" % i * 10) for i in range(files)])
    assert all(digests) and cm.db.queue.hashes() == []
    assert all(cm.db.files.copies(d) == 1 for d in digests)


def test_a_hanging_check_and_delete_return_within_the_timeout(make_pool, write_file):
    release = threading.Event()
    release.set()
    hanging = HangingHost("hang-" + uuid.uuid4().hex, release, TIMEOUT)
    cm = make_pool(hosts=[hanging], redundancy=1)
    digest = cm.upload(write_file("f", b"c" * 100))
    release.clear()
    add(FAULTS, 2)
    started = time.monotonic()
    assert cm.verify()["error"] == 1
    assert cm.remove(digest)["kept"]
    assert time.monotonic() - started < 2 * (TIMEOUT + MARGIN)
    release.set()


# -- hosts that return wrong data, or nothing -------------------------------------


@pytest.mark.parametrize("fault", ["corrupt_download", "truncate_download"])
def test_a_lying_tool_is_never_served_and_its_copy_is_marked_bad(make_pool, write_file,
                                                                  fake_plowshare, fault):
    fake_plowshare.faults("liar", **{fault: True})
    cm = make_pool(hosts=["plowshare:liar", "plowshare:honest"], redundancy=2)
    data = os.urandom(3000)
    digest = cm.upload(write_file("f", data))
    served = 0
    while cm.db.files.copies(digest) == 2 and served < 20:  # until the liar was tried
        cm.evict(0)
        add(FAULTS)
        with open(cm.warm_up(digest), "rb") as f:
            assert f.read() == data
        served += 1
    assert [u.host_name for u in cm.db.copies.of(digest) if u.error] == ["liar"]
    assert tmp_entries(cm) == []


def test_a_lying_memory_host_alone_gives_false_not_bad_bytes(make_pool, write_file):
    (liar,) = memory_hosts("liar")
    cm = make_pool(hosts=[liar], redundancy=1)
    digest = cm.upload(write_file("f", b"truth" * 100))
    cm.evict(0)
    liar.faults["corrupt"] = True
    add(FAULTS)
    assert cm.warm_up(digest) is False
    assert not cm.on_cache(digest) and tmp_entries(cm) == []
    assert cm.check()["lost"] == [digest]  # the only copy was bad: reported, not hidden


def test_a_tool_that_exits_0_but_writes_nothing(make_pool, write_file, fake_plowshare):
    fake_plowshare.faults("silent", empty_download=True)
    cm = make_pool(hosts=["plowshare:silent"], redundancy=1)
    data = b"quiet" * 100
    digest = cm.upload(write_file("f", data))
    cm.evict(0)
    add(FAULTS)
    assert cm.warm_up(digest) is False
    assert tmp_entries(cm) == [] and cm.db.sessions.reserved_bytes() == 0
    # Transient: the copy is not condemned, and serves once the tool behaves.
    assert cm.db.files.copies(digest) == 1
    fake_plowshare.clear()
    with open(cm.warm_up(digest), "rb") as f:
        assert f.read() == data


# -- the cache's disk is full -----------------------------------------------------


def test_enospc_while_fetching_into_the_cache_leaves_no_partial_file(make_pool, write_file,
                                                                     monkeypatch):
    (host,) = memory_hosts("h")
    cm = make_pool(hosts=[host], redundancy=1)
    data = os.urandom(200_000)
    digest = cm.upload(write_file("f", data))
    cm.evict(0)
    real_write = os.write
    storage = os.path.realpath(cm.cache.root)

    def full_disk(fd, chunk):
        # Only writes into the storage directory fail, at the OS boundary.
        if os.path.realpath("/proc/self/fd/%d" % fd).startswith(storage + os.sep):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, chunk)

    monkeypatch.setattr(os, "write", full_disk)
    add(FAULTS)
    assert cm.warm_up(digest) is False
    path = os.path.join(cm.cache.root, "dest")
    assert cm.download(digest, path) is False
    assert not os.path.exists(path)
    monkeypatch.undo()
    assert tmp_entries(cm) == [] and cm.db.sessions.reserved_bytes() == 0
    report = cm.check()
    assert not cm.on_cache(digest) and report["clean"], {k: v for k, v in report.items() if v}
    with open(cm.warm_up(digest), "rb") as f:
        assert f.read() == data


def test_a_file_size_limit_while_caching_sends_the_upload_straight_to_hosts(tmp_path):
    # A real kernel limit in a child process: writes past RLIMIT_FSIZE fail
    # with EFBIG, like ENOSPC on a full disk.
    script = textwrap.dedent("""
        import json, os, resource, signal, sys
        from cloudmanager import CloudManager
        from cloudmanager.hosts.memory import MemoryHost
        base = sys.argv[1]
        src = os.path.join(base, "big")
        with open(src, "wb") as f:
            f.write(os.urandom(3 * 2**20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        host = MemoryHost("disk-full")
        with CloudManager(os.path.join(base, "db.sqlite3"), os.path.join(base, "cache"),
                          10 * 2**20, hosts=[host], redundancy=1, fsync=False) as cm:
            digest = cm.upload(src)
            out = {"digest": digest, "cached": cm.on_cache(digest) if digest else None,
                   "copies": cm.db.files.copies(digest) if digest else None,
                   "tmp": os.listdir(cm.cache.tmp_dir), "reserved": cm.db.sessions.reserved_bytes(),
                   "clean": cm.check()["clean"], "held": host.objects.get(digest) is not None}
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    add(FAULTS)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["digest"] and out["held"] and out["copies"] == 1
    assert out["cached"] is False and out["tmp"] == [] and out["reserved"] == 0
    assert out["clean"]


# -- SQLite busy under contention ---------------------------------------------------


def hold_write_lock(path, seconds, started):
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    started.set()
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()


def test_a_busy_database_is_waited_for(make_pool, write_file, monkeypatch):
    monkeypatch.setattr(database, "BUSY_TIMEOUT_S", 0.2)  # retries, not one long wait
    cm = make_pool()
    started = threading.Event()
    holder = threading.Thread(target=hold_write_lock,
                              args=(cm.db.path, 1.5, started))
    holder.start()
    started.wait(10)
    add(FAULTS)
    digest = cm.upload(write_file("f", b"busy" * 100))
    holder.join()
    assert digest == sha(b"busy" * 100) and cm.check()["clean"]


def test_a_database_locked_for_too_long_fails_cleanly(make_pool, write_file, monkeypatch,
                                                      caplog):
    monkeypatch.setattr(database, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(database, "BUSY_RETRIES", 2)
    cm = make_pool()
    started = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(cm.db.path, 3.0, started))
    holder.start()
    started.wait(10)
    add(FAULTS)
    assert cm.upload(write_file("f", b"locked" * 100)) is False  # logged, not raised
    holder.join()
    assert "cannot start a transaction" in caplog.text
    assert tmp_entries(cm) == [] and cm.db.sessions.reserved_bytes() == 0
    assert cm.check()["clean"]
    assert cm.upload(write_file("f", b"locked" * 100))


# -- a remove cut short --------------------------------------------------------------


def test_a_remove_killed_midway_never_leaves_a_record_of_deleted_copies(tmp_path):
    # The child deletes both hosts' copies, then dies by SIGKILL.
    script = textwrap.dedent("""
        import os, signal, sys
        from cloudmanager import CloudManager
        from cloudmanager.hosts.folder import FolderHost
        deleted = []
        class DyingHost(FolderHost):
            def delete(self, url):
                super().delete(url)
                deleted.append(url)
                if len(deleted) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
        base = sys.argv[1]
        for name in ("a", "b"):
            os.makedirs(os.path.join(base, name), exist_ok=True)
        hosts = [DyingHost(os.path.join(base, "a"), name="a"),
                 DyingHost(os.path.join(base, "b"), name="b")]
        cm = CloudManager(os.path.join(base, "db.sqlite3"), os.path.join(base, "cache"),
                          2**20, hosts=hosts, redundancy=2, fsync=False)
        src = os.path.join(base, "src")
        with open(src, "wb") as f:
            f.write(b"remove me" * 100)
        digest = cm.upload(src)
        print(digest, flush=True)
        cm.remove(digest)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    add(FAULTS)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == -9, proc.stderr
    digest = proc.stdout.split()[0]
    src = tmp_path / "src2"
    src.write_bytes(b"remove me" * 100)
    hosts = ["dir:%s" % (tmp_path / "a"), "dir:%s" % (tmp_path / "b")]
    with CloudManager(tmp_path / "db.sqlite3", tmp_path / "cache", 2**20, hosts=hosts,
                      redundancy=2, fsync=False) as cm:
        assert cm.check()["clean"]
        # Uploaded again: the pool must not trust a record of copies it deleted.
        assert cm.upload(src) == digest
        cm.sync()
        cm.evict(0)
        with open(cm.warm_up(digest), "rb") as f:
            assert f.read() == b"remove me" * 100


# -- an S3 server stopped in the middle of an upload --------------------------------


@pytest.mark.usefixtures("aws_env")
def test_an_s3_server_stopped_mid_upload(tmp_path):
    pytest.importorskip("boto3")
    pytest.importorskip("moto")
    import boto3
    from botocore.config import Config

    from cloudmanager.hosts.s3 import S3Host

    MiB = 2**20

    def s3_host(url):
        return S3Host("mid-upload", "pool", endpoint_url=url, region="us-east-1",
                      addressing_style="path", multipart_threshold=5 * MiB,
                      multipart_chunksize=5 * MiB, timeout=5, max_attempts=2)

    def start_server(log_name):
        server = MotoServer(tmp_path / log_name)
        url = server.start()
        boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                     config=Config(s3={"addressing_style": "path"})).create_bucket(
                         Bucket="mid-upload")
        return server, url

    data = os.urandom(40 * MiB)
    src = tmp_path / "big"
    src.write_bytes(data)
    folder = "dir:%s" % (tmp_path / "nas")
    (tmp_path / "nas").mkdir()
    server, url = start_server("moto1.log")
    try:
        cm = CloudManager(tmp_path / "db.sqlite3", tmp_path / "cache", 64 * MiB,
                          hosts=[s3_host(url), folder], redundancy=2, fsync=False)
        result = {}
        uploader = threading.Thread(target=lambda: result.update(digest=cm.upload(src)))
        uploader.start()
        deadline = time.monotonic() + 60
        while "partNumber=" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.01)
        server.process.kill()  # mid-upload: the first parts are in, the rest never will be
        add(FAULTS)
        uploader.join(120)
        assert not uploader.is_alive()
    finally:
        server.stop()
    digest = result["digest"]
    assert digest == sha(data)  # in the pool: on the folder, and queued for S3
    assert [u.host_name for u in cm.db.copies.of(digest) if not u.error] == [
        "dir:%s" % (tmp_path / "nas")]
    assert cm.db.queue.hashes() == [digest] and cm.check()["clean"]
    cm.close()
    # The server comes back (empty, at a new address); sync completes the upload.
    server, url = start_server("moto2.log")
    try:
        with CloudManager(tmp_path / "db.sqlite3", tmp_path / "cache", 64 * MiB,
                          hosts=[s3_host(url), folder], redundancy=2, fsync=False) as cm:
            assert cm.sync()["complete"] == 1
            os.remove(tmp_path / "nas" / digest)  # only S3 can serve it now
            cm.evict(0)
            with open(cm.warm_up(digest), "rb") as f:
                assert f.read() == data
            assert cm.check(deep=True)["clean"]
    finally:
        server.stop()
