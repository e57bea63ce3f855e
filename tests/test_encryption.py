"""Encrypted pools: hosts hold only age ciphertext, under names that reveal nothing.

Real hosts (folders, moto's S3, a WsgiDAV server), real pools, and the real
``age`` command to open what the hosts hold (skipped without it, a failure
when ``CM_REQUIRE_AGE=1``, as in CI).
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from cloudmanager import CloudManager
from cloudmanager.crypto import AGE_BINARY_MIN, PoolKey, new_identity_file
from cloudmanager.hosts.memory import MemoryHost
from hosts.s3_server import aws_env, bucket, moto_endpoint, s3_admin  # noqa: F401
from hosts.webdav_server import PASSWORD, USER, webdav_server_fixture  # noqa: F401

pytest.importorskip("pyrage")

SENTENCE = b"a sentence only the owner may read. "
NAME = "private-report.txt"


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def age():
    found = shutil.which("age")
    if not found:
        if os.environ.get("CM_REQUIRE_AGE") == "1":
            pytest.fail("the age command is required here (CM_REQUIRE_AGE=1)")
        pytest.skip("no age command (apt-get install age)")
    return found


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "keys" / "pool.key"
    path.parent.mkdir()
    new_identity_file(str(path))
    return str(path)


@pytest.fixture
def folders(tmp_path):
    roots = [tmp_path / "hosts" / n for n in ("h1", "h2")]
    for root in roots:
        root.mkdir(parents=True)
    return roots


def open_with_age(age, key, blob, tmp_path):
    path = tmp_path / ("object-" + uuid.uuid4().hex)
    path.write_bytes(blob)
    return subprocess.run([age, "-d", "-i", key, str(path)], capture_output=True,
                          check=True).stdout


def age_first_on_path(tmp_path, monkeypatch, body):
    """Put a fake ``age`` (a shell script of ``body``) first on PATH: pools made
    after this call take it for the command."""
    fake = tmp_path / "bin" / "age"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n%s\n" % body)
    fake.chmod(0o700)
    monkeypatch.setenv("PATH", "%s%s%s" % (fake.parent, os.pathsep, os.environ["PATH"]))


def objects_in(root):
    """``{name: bytes}`` of a folder host's objects (its marker left out)."""
    return {p.name: p.read_bytes() for p in root.iterdir() if not p.name.startswith(".")}


def assert_reveals_nothing(objects, data, digest):
    assert objects
    for name, blob in objects.items():
        assert SENTENCE not in blob and SENTENCE[:16] not in blob
        assert digest not in name and NAME not in name and len(name) == 64
        assert blob != data


# -- what the hosts hold ------------------------------------------------------------------

def test_folder_hosts_hold_only_ciphertext_that_age_opens(make_pool, folders, key, age,
                                                          write_file, tmp_path):
    data = SENTENCE * 2000
    cm = make_pool(hosts=["dir:%s" % r for r in folders], redundancy=2, encryption_key=key)
    digest = cm.upload(write_file(NAME, data))
    assert digest == sha(data)
    for root in folders:
        objects = objects_in(root)
        assert_reveals_nothing(objects, data, digest)
        (blob,) = objects.values()
        assert open_with_age(age, key, blob, tmp_path) == data
    # The record says what each copy holds; a v0.2 reader sees its usual fields.
    (record,) = json.loads(cm.data_dump())
    for entry in record["uploads"]:
        assert {"host_name", "url", "object_sha256", "object_size", "key_id"} == set(entry)
        assert entry["object_sha256"] == sha(objects_in(folders[0])[entry["url"][-64:]])
    assert cm.evict(0) == 1
    assert open(cm.warm_up(digest), "rb").read() == data
    assert cm.verify(deep=True)["good"] == 2
    assert cm.stats()["encryption"]["recipient"].startswith("age1")


def test_s3_and_webdav_hold_only_ciphertext(make_pool, key, age, write_file, tmp_path,
                                            moto_endpoint, bucket, s3_admin, webdav_server):
    from cloudmanager.hosts.fsspec import FsspecHost
    from cloudmanager.hosts.s3 import S3Host

    s3 = S3Host(bucket, "pool", endpoint_url=moto_endpoint, region="us-east-1",
                addressing_style="path")
    dav_root = "t" + uuid.uuid4().hex[:12]
    dav = FsspecHost("webdav://%s/pool" % dav_root, base_url=webdav_server.base_url,
                     storage_options={"auth": (USER, PASSWORD)}, timeout=10)
    data = SENTENCE * 500
    cm = make_pool(hosts=[s3, dav], redundancy=2, encryption_key=key)
    digest = cm.upload(write_file(NAME, data))
    s3_objects = {o["Key"].split("/")[-1]: s3_admin.get_object(Bucket=bucket, Key=o["Key"])
                  ["Body"].read()
                  for o in s3_admin.list_objects_v2(Bucket=bucket)["Contents"]}
    dav_dir = webdav_server.root / dav_root / "pool"
    dav_objects = {p.name: p.read_bytes() for p in dav_dir.iterdir()
                   if not p.name.startswith(".")}
    for objects in (s3_objects, dav_objects):
        assert_reveals_nothing(objects, data, digest)
        assert [open_with_age(age, key, b, tmp_path) for b in objects.values()] == [data]
    cm.evict(0)
    assert open(cm.warm_up(digest), "rb").read() == data
    assert cm.verify(deep=True)["good"] == 2


def test_every_recipient_can_read(make_pool, folders, key, age, write_file, tmp_path):
    reader = tmp_path / "keys" / "offline.key"
    recipient = new_identity_file(str(reader))
    cm = make_pool(hosts=["dir:%s" % folders[0]], redundancy=1, encryption_key=key,
                   recipients=[recipient])
    cm.upload(write_file(NAME, SENTENCE))
    (blob,) = objects_in(folders[0]).values()
    for identity in (key, str(reader)):
        assert open_with_age(age, identity, blob, tmp_path) == SENTENCE
    assert cm.stats()["encryption"]["recipients"][1] == recipient


def test_a_file_larger_than_the_cache_is_sealed_as_it_is_read(make_pool, folders, key, age,
                                                              write_file, tmp_path):
    data = os.urandom(300_000) + SENTENCE
    cm = make_pool(capacity=100_000, hosts=["dir:%s" % r for r in folders], redundancy=2,
                   encryption_key=key)
    digest = cm.upload(write_file(NAME, data))
    assert digest == sha(data) and not cm.on_cache(digest)
    for root in folders:
        (blob,) = objects_in(root).values()
        assert open_with_age(age, key, blob, tmp_path) == data
    dest = tmp_path / "back"
    assert cm.download(digest, str(dest)) and dest.read_bytes() == data


def test_a_large_file_streams_sealed_to_its_host_with_no_work_file(
        make_pool, folders, key, age, write_file, tmp_path, monkeypatch):
    """A file larger than the cache, sealed by the ``age`` command as it streams
    straight into the host's staging file: with one host wanted, no work file
    anywhere (the temp directory does not even exist). What the host holds
    opens with ``age -d`` and comes back byte for byte; with two hosts, both
    hold the same ciphertext."""
    from cloudmanager.crypto import AGE_BINARY_MIN

    data = os.urandom(AGE_BINARY_MIN + 100_000) + SENTENCE
    source = write_file(NAME, data)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "no-such-dir"))
    cm = make_pool(capacity=1 << 20, hosts=["dir:%s" % folders[0]], redundancy=1,
                   encryption_key=key)
    digest = cm.upload(source)
    assert digest == sha(data) and not cm.on_cache(digest)
    (blob,) = objects_in(folders[0]).values()
    assert SENTENCE not in blob and open_with_age(age, key, blob, tmp_path) == data
    (entry,) = cm.info(digest)["uploads"]
    assert (entry["object_sha256"], int(entry["object_size"])) == (sha(blob), len(blob))
    monkeypatch.undo()
    dest = tmp_path / "back"
    assert cm.download(digest, str(dest)) and dest.read_bytes() == data
    # Two hosts wanted: the ciphertext is spooled once, and both get the same.
    # A third host is gone (its folder unmounted): tried, it fails before or
    # after the others, whose streams are sealed afresh.
    gone = tmp_path / "hosts" / "gone"
    node = make_pool(name="two", capacity=1 << 20, hosts=["dir:%s" % r for r in folders[1:]]
                     + ["dir:%s" % (tmp_path / "hosts" / "h3"), "dir:%s" % gone],
                     redundancy=2, encryption_key=key)
    gone.rmdir()
    assert node.upload(source) == digest
    blobs = list(objects_in(folders[1]).values()) + list(
        objects_in(tmp_path / "hosts" / "h3").values())
    assert len(blobs) == 2 and blobs[0] == blobs[1] and open_with_age(
        age, key, blobs[0], tmp_path) == data
    assert not gone.exists()


def test_a_large_cached_file_streams_sealed_and_an_object_there_is_kept(
        make_pool, folders, key, age, write_file, tmp_path, caplog):
    """A large cached file one host needs is sealed by ``age`` straight into
    that host's staging (no ciphertext in the cache's work room); another
    node with the key finds the object there and keeps it, recording its
    own ciphertext hash, and reads it back."""
    from cloudmanager.crypto import AGE_BINARY_MIN

    data = os.urandom(AGE_BINARY_MIN + 50_000) + SENTENCE
    source = write_file(NAME, data)
    caplog.set_level("DEBUG", logger="cloudmanager")
    node_a = make_pool(name="a", capacity=64 << 20, hosts=["dir:%s" % folders[0]],
                       redundancy=1, encryption_key=key)
    digest = node_a.upload(source)
    assert digest == sha(data) and node_a.on_cache(digest)
    assert re.search(r"streamed \d+ bytes to", caplog.text)  # not sealed into the cache
    (name, blob), = objects_in(folders[0]).items()
    assert SENTENCE not in blob and open_with_age(age, key, blob, tmp_path) == data
    (entry,) = node_a.info(digest)["uploads"]
    assert (entry["object_sha256"], int(entry["object_size"])) == (sha(blob), len(blob))
    caplog.clear()
    node_b = make_pool(name="b", capacity=64 << 20, hosts=["dir:%s" % folders[0]],
                       redundancy=1, encryption_key=key)
    assert node_b.upload(source) == digest
    assert objects_in(folders[0]) == {name: blob} and "not sent again" in caplog.text
    (entry,) = node_b.info(digest)["uploads"]
    assert (entry["object_sha256"], int(entry["object_size"])) == (sha(blob), len(blob))
    assert node_b.evict(0) == 1 and open(node_b.warm_up(digest), "rb").read() == data
    assert node_b.verify(deep=True)["good"] == 1


def test_a_failing_age_command_leaves_the_work_to_pyrage(make_pool, folders, key, age,
                                                          write_file, tmp_path, monkeypatch,
                                                          caplog):
    """An ``age`` on the PATH that fails: large files are still sealed and
    opened (by pyrage), and what the host holds still opens with the real one."""
    from cloudmanager.crypto import AGE_BINARY_MIN

    age_first_on_path(tmp_path, monkeypatch, "echo 'age: error: broken on purpose' >&2\nexit 1")
    caplog.set_level("INFO", logger="cloudmanager")
    data = os.urandom(AGE_BINARY_MIN + 10_000)
    cm = make_pool(capacity=64 << 20, hosts=["dir:%s" % folders[0]], redundancy=1,
                   encryption_key=key)
    digest = cm.upload(write_file(NAME, data))
    assert not cm.stats()["queued"]
    (blob,) = objects_in(folders[0]).values()
    assert open_with_age(age, key, blob, tmp_path) == data
    assert cm.evict(0) == 1 and open(cm.warm_up(digest), "rb").read() == data
    assert "broken on purpose" in caplog.text and "sealing it first" in caplog.text
    assert "using pyrage" in caplog.text and "decrypt it without the command" in caplog.text


# -- fetching encrypted copies ------------------------------------------------------------------

@pytest.mark.parametrize("size", ["small", "large"])
def test_an_encrypted_copy_is_decrypted_as_it_arrives_never_stored(
        make_pool, folders, key, age, write_file, tmp_path, monkeypatch, size):
    """A miss from a host that streams: no room for the ciphertext beside the
    file (the cache holds the file and a few KiB more), no work file (the
    temp directory does not exist), nothing left in the cache but the file.
    A large one goes through the ``age`` command, a small one through pyrage."""
    from cloudmanager.crypto import AGE_BINARY_MIN

    data = os.urandom(AGE_BINARY_MIN + 100_000 if size == "large" else 50_000) + SENTENCE
    cm = make_pool(capacity=len(data) + 4096, hosts=["dir:%s" % folders[0]], redundancy=1,
                   encryption_key=key)
    digest = cm.upload(write_file(NAME, data))
    (blob,) = objects_in(folders[0]).values()
    assert len(blob) > len(data)  # the ciphertext and the file would not fit together
    assert cm.evict(0) == 1
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "no-such-dir"))
    path = cm.warm_up(digest)
    assert path and open(path, "rb").read() == data
    cache = tmp_path / "node" / "cache"
    held = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size >= len(data)]
    assert [p.name for p in held] == [digest]
    assert not list((cache / "tmp").iterdir())
    dest = tmp_path / "back"
    assert cm.evict(0) == 1 and cm.download(digest, str(dest)) and dest.read_bytes() == data


class BreakingStreams(MemoryHost):
    """A memory host whose next ``breaks`` streams fail after their first
    ``after`` bytes, as a connection cut mid-transfer does."""

    def __init__(self, store_name, after):
        super().__init__(store_name, name="breaking")
        self.after = after
        self.breaks = 0

    def open_stream(self, url, max_bytes=None):
        stream = super().open_stream(url, max_bytes)
        if self.breaks:
            self.breaks -= 1
            stream._raw = _CutAfter(stream._raw, self.after)
        return stream


class _CutAfter:
    def __init__(self, raw, after):
        self.raw, self.left = raw, after

    def read(self, size=-1):
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer (on purpose)")
        data = self.raw.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data

    def close(self):
        self.raw.close()


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_transfer_cut_midway_is_not_a_bad_copy(make_pool, key, age, write_file, size,
                                                 caplog):
    """The stream of an encrypted copy breaks after 1 MiB: the warm-up fails
    (one host), the copy is not condemned, and the next warm-up gets the file.
    The ``age`` command's failure on the cut ciphertext is the transfer's."""
    from cloudmanager.crypto import AGE_BINARY_MIN

    data = os.urandom(AGE_BINARY_MIN + 100_000 if size == "large" else 3_000_000)
    host = BreakingStreams("cut-" + uuid.uuid4().hex, after=1 << 20)
    cm = make_pool(capacity=16 << 20, hosts=[host], redundancy=1, encryption_key=key)
    digest = cm.upload(write_file(NAME, data))
    assert cm.evict(0) == 1
    host.breaks = 1
    assert cm.warm_up(digest) is False
    assert "connection reset by peer (on purpose)" in caplog.text
    (entry,) = cm.info(digest)["uploads"]
    assert not entry.get("error")  # still believed good: nothing proved it bad
    assert open(cm.warm_up(digest), "rb").read() == data


@pytest.mark.parametrize("way", ["age", "pyrage"])
def test_a_local_write_failure_is_not_a_bad_copy(make_pool, folders, key, age, write_file,
                                                 monkeypatch, way):
    """The plaintext cannot be written (a file-size limit here, as a full disk
    would): the warm-up fails, the copy is not condemned, and the next one
    gets the file. Through the ``age`` command, and through pyrage without it."""
    import resource

    from cloudmanager.crypto import AGE_BINARY_MIN

    if way == "pyrage":
        monkeypatch.setenv("PATH", "/nonexistent")
    data = os.urandom(AGE_BINARY_MIN + 100_000)
    cm = make_pool(capacity=16 << 20, hosts=["dir:%s" % folders[0]], redundancy=1,
                   encryption_key=key)
    digest = cm.upload(write_file(NAME, data))
    assert cm.evict(0) == 1
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, before[1]))
    try:
        assert cm.warm_up(digest) is False
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, previous)
    (entry,) = cm.info(digest)["uploads"]
    assert not entry.get("error")
    assert open(cm.warm_up(digest), "rb").read() == data


def test_an_age_command_that_makes_wrong_bytes_condemns_nothing(
        make_pool, folders, key, age, write_file, tmp_path, monkeypatch, caplog):
    """An ``age`` that exits 0 having read nothing and written nothing: what
    it made is not the file, so the copy is fetched again and decrypted
    without it; the copy is good, and the file comes back."""
    from cloudmanager.crypto import AGE_BINARY_MIN

    data = os.urandom(AGE_BINARY_MIN + 100_000)
    cm = make_pool(capacity=16 << 20, hosts=["dir:%s" % folders[0]], redundancy=1,
                   encryption_key=key)
    digest = cm.upload(write_file(NAME, data))
    assert cm.evict(0) == 1
    cm.close()
    age_first_on_path(tmp_path, monkeypatch, "exit 0")
    caplog.set_level("INFO", logger="cloudmanager")
    node = make_pool(capacity=16 << 20, hosts=["dir:%s" % folders[0]], redundancy=1,
                     encryption_key=key)
    assert open(node.warm_up(digest), "rb").read() == data
    assert "decrypt it without the command" in caplog.text
    (entry,) = node.info(digest)["uploads"]
    assert not entry.get("error")


@pytest.mark.parametrize("delta", [1, -1])
@pytest.mark.parametrize("hosted", ["folder", "plowshare"])
def test_a_wrong_file_size_in_a_record_condemns_nothing(request, make_pool, folders, key,
                                                         write_file, delta, hosted):
    """A record that gives the file one byte more, or one less: the copy
    decrypts to the file (or to more than recorded), so the record is what
    is wrong. The node does not use the copy, and does not mark it bad. On
    a host that streams, and on one that cannot (a file locker: its
    ciphertext is fetched whole first); the record as it was then works."""
    if hosted == "plowshare":
        request.getfixturevalue("fake_plowshare")
        hosts = ["plowshare:locker"]
    else:
        hosts = ["dir:%s" % folders[0]]
    data = SENTENCE * 2000
    cm = make_pool(hosts=hosts, redundancy=1, encryption_key=key)
    digest = cm.upload(write_file(NAME, data))
    (record,) = json.loads(cm.data_dump())
    true_size = record["filesize"]
    record["filesize"] = str(len(data) + delta)
    node = make_pool(name="b", hosts=hosts, redundancy=1, encryption_key=key)
    assert node.data_load(json.dumps([record])) == 1
    assert node.warm_up(digest) is False
    (entry,) = node.info(digest)["uploads"]
    assert not entry.get("error")
    record["filesize"] = true_size  # the copy itself was good all along
    other = make_pool(name="c", hosts=hosts, redundancy=1, encryption_key=key)
    assert other.data_load(json.dumps([record])) == 1
    assert open(other.warm_up(digest), "rb").read() == data


# -- bad copies, other keys, hostile records ---------------------------------------------------

def test_a_flipped_ciphertext_byte_is_a_bad_copy_that_sync_replaces(make_pool, folders, key,
                                                                    write_file):
    data = SENTENCE * 3000
    cm = make_pool(hosts=["dir:%s" % r for r in folders], redundancy=2, encryption_key=key)
    digest = cm.upload(write_file(NAME, data))
    (name,) = objects_in(folders[0])
    path = folders[0] / name
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    path.write_bytes(bytes(blob))
    assert cm.verify(deep=True)["bad"] == 1
    assert cm.sync()["uploads"] == 1
    assert cm.verify(deep=True)["good"] == 2
    cm.evict(0)
    assert open(cm.warm_up(digest), "rb").read() == data


def test_a_ciphertext_that_matches_its_record_but_not_the_file_is_refused(
        make_pool, folders, key, write_file, tmp_path, caplog):
    """A record whose ciphertext hash was made up to match other bytes (another
    file's object): the bytes match, the decryption does not."""
    cm = make_pool(hosts=["dir:%s" % folders[0]], redundancy=1, encryption_key=key)
    real = cm.upload(write_file("real", SENTENCE))
    other = cm.upload(write_file("other", b"something else entirely"))
    records = json.loads(cm.data_dump())
    by_hash = {r["filehash"]: r for r in records}
    # Node B is told that `real` lives in `other`'s object.
    forged = dict(by_hash[real], uploads=by_hash[other]["uploads"])
    node_b = make_pool(name="b", hosts=["dir:%s" % folders[0]], redundancy=1,
                       encryption_key=key)
    assert node_b.data_load(json.dumps([forged])) == 1
    assert node_b.warm_up(real) is False
    assert "decrypts to" in caplog.text
    assert node_b.info(real)["uploads"][0]["error"] is True


def test_another_key_gets_a_clear_reason_and_no_bytes(make_pool, folders, key, write_file,
                                                      tmp_path, caplog):
    cm = make_pool(hosts=["dir:%s" % folders[0]], redundancy=1, encryption_key=key)
    digest = cm.upload(write_file(NAME, SENTENCE))
    other_key = tmp_path / "keys" / "other.key"
    new_identity_file(str(other_key))
    for name, kwargs in (("stranger", {"encryption_key": str(other_key)}), ("keyless", {})):
        node = make_pool(name=name, hosts=["dir:%s" % folders[0]], redundancy=1, **kwargs)
        assert node.data_load(cm.data_dump()) == 1
        assert node.exists(digest)  # the record is kept...
        assert node.warm_up(digest) is False  # ...and no bytes come out of it
        assert "encrypted for another key" in caplog.text
        assert node.download(digest, str(tmp_path / ("out-" + name))) is False
        assert not (tmp_path / ("out-" + name)).exists() and not node.on_cache(digest)


def test_hostile_object_sizes_cannot_overfill_the_cache(make_pool, folders, key, write_file,
                                                        tmp_path):
    cm = make_pool(hosts=["dir:%s" % folders[0]], redundancy=1, encryption_key=key)
    digest = cm.upload(write_file(NAME, SENTENCE * 100))
    (record,) = json.loads(cm.data_dump())
    for entry in record["uploads"]:
        entry["object_size"] = str(10 ** 12)  # a terabyte: more than any cache here
    node = make_pool(name="b", capacity=50_000, hosts=["dir:%s" % folders[0]],
                     redundancy=1, encryption_key=key)
    assert node.data_load(json.dumps([record])) == 1
    assert node.warm_up(digest) is False
    assert node.stats()["cached_bytes"] == 0
    leftovers = [p for p in (tmp_path / "b" / "cache" / "tmp").iterdir()]
    assert leftovers == []
    for entry in record["uploads"]:
        entry["object_size"] = str(2 ** 60)  # beyond any real file: refused at import
    node2 = make_pool(name="c", hosts=["dir:%s" % folders[0]], redundancy=1,
                      encryption_key=key)
    node2.data_load(json.dumps([record]))
    assert node2.info(digest)["uploads"] == [] or all(
        "object_size" not in u for u in node2.info(digest)["uploads"])


# -- pools that change -------------------------------------------------------------------

def test_a_pool_that_gains_a_key_keeps_reading_old_copies_and_reencrypts_them(
        make_pool, folders, key, age, write_file, tmp_path):
    hosts = ["dir:%s" % r for r in folders]
    plain = make_pool(hosts=hosts, redundancy=2)
    old = {plain.upload(write_file("old%d" % i, SENTENCE + b"%d" % i)): SENTENCE + b"%d" % i
           for i in range(3)}
    plain.close()
    cm = make_pool(hosts=hosts, redundancy=2, encryption_key=key)
    cm.evict(0)
    for digest, data in old.items():  # still readable: plaintext copies
        assert open(cm.warm_up(digest), "rb").read() == data
    new = cm.upload(write_file("new", SENTENCE + b"new"))
    summary = cm.sync(reencrypt=True)
    assert summary["reencrypted"] == 3 and summary["sealed"] == 6
    assert summary["plaintext_deleted"] == 6 and summary["reencrypt_failed"] == 0
    for root in folders:
        objects = objects_in(root)
        assert len(objects) == 4
        assert not set(old) & set(objects)  # no plaintext object is left
        for blob in objects.values():
            assert SENTENCE not in blob
    cm.evict(0)
    for digest, data in list(old.items()) + [(new, SENTENCE + b"new")]:
        assert open(cm.warm_up(digest), "rb").read() == data
    assert cm.sync(reencrypt=True)["reencrypted"] == 0  # nothing left to do


REENCRYPT_WORKER = r"""
import sys
from cloudmanager import CloudManager
database, storage, key, hosts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
with CloudManager(database, storage, 1 << 24, hosts=hosts, redundancy=2, encryption_key=key,
                  fsync=False) as cm:
    cm.sync(reencrypt=True)
"""


def test_reencryption_under_sigkills_loses_nothing(make_pool, folders, key, write_file,
                                                   tmp_path):
    hosts = ["dir:%s" % r for r in folders]
    plain = make_pool(hosts=hosts, redundancy=2)
    files = {}
    for i in range(400):
        data = os.urandom(2000 + i) + SENTENCE
        files[plain.upload(write_file("f%d" % i, data))] = data
    database, storage = plain.settings()["database"], plain.settings()["storage"]
    plain.close()
    argv = [sys.executable, "-c", REENCRYPT_WORKER, database, storage, key] + hosts
    def objects_made():  # encrypted objects: names that are not a file's hash
        return len({n for n in os.listdir(folders[0]) if not n.startswith(".")} - set(files))

    # Each worker is killed as soon as it has sealed a few more copies: mid-work,
    # however fast the machine.
    killed = 0
    for _ in range(6):
        before = objects_made()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and objects_made() < before + 5:
            time.sleep(0.005)
        if proc.poll() is not None:
            break  # it finished: the kills are over
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += 1
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    with CloudManager(database, storage, 1 << 24, hosts=hosts, redundancy=2,
                      encryption_key=key, fsync=False) as cm:
        cm.check(repair=True)
        assert cm.sync(reencrypt=True)["reencrypted"] == 0
        cm.evict(0)
        for digest, data in files.items():
            assert open(cm.warm_up(digest), "rb").read() == data, digest
        for root in folders:
            assert not set(files) & set(objects_in(root))
            assert all(SENTENCE not in blob for blob in objects_in(root).values())
    assert killed >= 3, "the workers ended before their kill: nothing was tested"


def test_a_folder_host_copy_needs_no_key_to_be_verified(make_pool, folders, key, write_file):
    """verify checks an encrypted copy as the ciphertext it is: a node without
    the key can still tell good copies from bad ones."""
    cm = make_pool(hosts=["dir:%s" % folders[0]], redundancy=1, encryption_key=key)
    digest = cm.upload(write_file(NAME, SENTENCE * 10))
    keyless = make_pool(name="keyless", hosts=["dir:%s" % folders[0]], redundancy=1)
    keyless.data_load(cm.data_dump())
    assert keyless.exists(digest)
    assert keyless.verify(deep=True)["good"] == 1
    (name,) = objects_in(folders[0])
    (folders[0] / name).write_bytes(b"x" * (folders[0] / name).stat().st_size)
    assert keyless.verify(deep=True)["bad"] == 1


# -- an object already on a host ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_an_object_another_node_sealed_is_kept_not_sent_again(
        kind, make_pool, folders, key, write_file, tmp_path, caplog, request):
    """Two nodes with the same key and catalogs of their own agree on names:
    the second does not send (and overwrite) an object the first made, one
    by one or in a batch; it records that object's own ciphertext hash and
    size, so that its verifies and downloads check what the host holds. An
    object under the name that is not the file is replaced."""
    if kind == "s3":
        from cloudmanager.hosts.s3 import S3Host

        endpoint, bucket, s3_admin = (request.getfixturevalue(n) for n in
                                      ("moto_endpoint", "bucket", "s3_admin"))

        def host():
            return S3Host(bucket, "pool", endpoint_url=endpoint, region="us-east-1",
                          addressing_style="path")

        def held():
            listed = s3_admin.list_objects_v2(Bucket=bucket).get("Contents", [])
            return {o["Key"].split("/")[-1]: s3_admin.get_object(Bucket=bucket, Key=o["Key"])
                    ["Body"].read() for o in listed}

        def plant(name, blob):
            s3_admin.put_object(Bucket=bucket, Key="pool/" + name, Body=blob)
    else:
        def host():
            return "dir:%s" % folders[0]

        def held():
            return objects_in(folders[0])

        def plant(name, blob):
            (folders[0] / name).write_bytes(blob)

    files = {n: os.urandom(5000) + SENTENCE + n.encode() for n in ("one", "two", "three")}
    paths = {n: write_file(n, data) for n, data in files.items()}
    node_a = make_pool(name="a", hosts=[host()], redundancy=1, encryption_key=key)
    assert node_a.upload(paths["one"]) and node_a.upload_many([paths["two"]])[0]
    before = held()
    assert len(before) == 2
    node_b = make_pool(name="b", hosts=[host()], redundancy=1, encryption_key=key)
    # One object under a name the pool will use that is not a copy of the file.
    junk_name = PoolKey(key).object_name(sha(files["three"]))
    plant(junk_name, os.urandom(6000))
    caplog.set_level("INFO", logger="cloudmanager")
    assert node_b.upload(paths["one"]) == sha(files["one"])
    assert node_b.upload_many([paths["two"], paths["three"]]) == \
        [sha(files["two"]), sha(files["three"])]
    after = held()
    assert {n: after[n] for n in before} == before  # not sent again: the same bytes
    assert caplog.text.count("not sent again") == 2 and "replacing it" in caplog.text
    assert after[junk_name] != before.get(junk_name)
    for name, data in files.items():
        (entry,) = node_b.info(sha(data))["uploads"]
        blob = after[entry["url"].rsplit("/", 1)[-1]]
        assert (entry["object_sha256"], int(entry["object_size"])) == (sha(blob), len(blob))
    summary = node_b.verify()
    assert summary["checked"] == summary["good"] == 3
    assert node_b.verify(deep=True)["good"] == 3
    assert node_b.evict(0) == 3
    for data in files.values():
        assert open(node_b.warm_up(sha(data)), "rb").read() == data


# -- upload_many sent at once: what each copy holds is recorded with the publish ------


def _objects_in(root):
    return {p.name: p.read_bytes() for p in root.iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("big", [False, True])
def test_encrypted_upload_many_records_object_meta(make_pool, write_file, key, tmp_path, big):
    roots = [tmp_path / "hosts" / n for n in ("h1", "h2")]
    for r in roots:
        r.mkdir(parents=True)
    extra = os.urandom(AGE_BINARY_MIN + 10) if big else b""
    node_a = make_pool(name="a", capacity=64 << 20, hosts=["dir:%s" % roots[0]],
                       redundancy=1, encryption_key=key)
    datas = [extra + b"secret %d" % i for i in range(3 if not big else 1)]
    files = [write_file("f%d" % i, d) for i, d in enumerate(datas)]
    digests = node_a.upload_many(files)
    assert digests == [sha(d) for d in datas]
    objs = _objects_in(roots[0])
    assert len(objs) == len(datas)
    for d in digests:
        (e,) = node_a.info(d)["uploads"]
        assert e["key_id"] and e["url"][-64:] in objs
        assert e["object_sha256"] == sha(objs[e["url"][-64:]])
        assert int(e["object_size"]) == len(objs[e["url"][-64:]])
    assert node_a.evict(0) == len(datas)
    for d, data in zip(digests, datas):
        assert open(node_a.warm_up(d), "rb").read() == data
    assert node_a.verify(deep=True)["good"] == len(datas)
    # another node with the key: the objects are kept (vet), their meta recorded
    node_b = make_pool(name="b", capacity=64 << 20, hosts=["dir:%s" % roots[0]],
                       redundancy=1, encryption_key=key)
    files_b = [write_file("g%d" % i, d) for i, d in enumerate(datas)]
    assert node_b.upload_many(files_b) == digests
    assert _objects_in(roots[0]) == objs
    for d in digests:
        (e,) = node_b.info(d)["uploads"]
        assert e["object_sha256"] == sha(objs[e["url"][-64:]])
    assert node_b.evict(0) == len(datas)
    for d, data in zip(digests, datas):
        assert open(node_b.warm_up(d), "rb").read() == data
