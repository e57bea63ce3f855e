"""SECURITY.md, "Hosts that read what they store": one test per claim.

A pool with an ``encryption_key`` keeps only age ciphertext on its hosts.
The tests use real folder hosts and, for the interoperability claim, the
real ``age`` command (a failure, not a skip, when ``CM_REQUIRE_AGE=1``).
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess

import pytest

from cloudmanager.crypto import AGE_BINARY_MIN, new_identity_file

pytest.importorskip("pyrage")

SECRET_TEXT = b"the quarterly numbers nobody outside may see "
NAME = "board-minutes.txt"


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "keys" / "pool.key"
    path.parent.mkdir()
    new_identity_file(str(path))
    return str(path)


@pytest.fixture
def nas(tmp_path):
    root = tmp_path / "hosts" / "nas"
    root.mkdir(parents=True)
    return root


def stored(root):
    return {p.name: p.read_bytes() for p in root.iterdir() if not p.name.startswith(".")}


def test_claim_hosts_hold_no_plaintext_and_no_revealing_name(make_pool, key, nas, write_file):
    cm = make_pool(hosts=["dir:%s" % nas], redundancy=1, encryption_key=key)
    data = SECRET_TEXT * 1000
    digest = cm.upload(write_file(NAME, data))
    ((name, blob),) = stored(nas).items()
    # No 16-byte run of the file is in the object; the name is neither the
    # file's hash (which would confirm a known file) nor its name.
    assert all(data[i:i + 16] not in blob for i in range(0, len(SECRET_TEXT), 4))
    assert name != digest and digest not in name and "board" not in name
    assert name != hashlib.sha256(blob).hexdigest()


def test_claim_every_copy_opens_with_the_age_command(make_pool, key, nas, write_file, tmp_path):
    age = shutil.which("age")
    if age is None:
        if os.environ.get("CM_REQUIRE_AGE") == "1":
            pytest.fail("the age command is required here (CM_REQUIRE_AGE=1)")
        pytest.skip("no age command")
    cm = make_pool(hosts=["dir:%s" % nas], redundancy=1, encryption_key=key)
    cm.upload(write_file(NAME, SECRET_TEXT))
    (name,) = stored(nas)
    opened = subprocess.run([age, "-d", "-i", key, str(nas / name)], capture_output=True,
                            check=True).stdout
    assert opened == SECRET_TEXT


def test_claim_a_tampered_ciphertext_is_never_served(make_pool, key, nas, write_file, tmp_path):
    cm = make_pool(hosts=["dir:%s" % nas], redundancy=1, encryption_key=key)
    digest = cm.upload(write_file(NAME, SECRET_TEXT * 100))
    cm.evict(0)
    (name,) = stored(nas)
    blob = bytearray((nas / name).read_bytes())
    blob[-20] ^= 1
    (nas / name).write_bytes(bytes(blob))
    assert cm.warm_up(digest) is False
    assert cm.download(digest, str(tmp_path / "out")) is False
    assert not (tmp_path / "out").exists() and cm.info(digest)["uploads"][0]["error"]


def test_claim_another_key_or_none_produces_no_bytes(make_pool, key, nas, write_file, tmp_path):
    cm = make_pool(hosts=["dir:%s" % nas], redundancy=1, encryption_key=key)
    digest = cm.upload(write_file(NAME, SECRET_TEXT))
    other = tmp_path / "keys" / "other.key"
    new_identity_file(str(other))
    for name, kwargs in (("other", {"encryption_key": str(other)}), ("none", {})):
        node = make_pool(name=name, hosts=["dir:%s" % nas], redundancy=1, **kwargs)
        node.data_load(cm.data_dump())
        assert node.warm_up(digest) is False and not node.on_cache(digest)
        assert os.listdir(node.cache.tmp_dir) == []


def test_claim_a_hostile_ciphertext_size_cannot_overfill_the_cache(make_pool, key, nas,
                                                                   write_file):
    cm = make_pool(hosts=["dir:%s" % nas], redundancy=1, encryption_key=key)
    digest = cm.upload(write_file(NAME, SECRET_TEXT * 50))
    (record,) = json.loads(cm.data_dump())
    (name,) = stored(nas)
    with open(nas / name, "ab") as f:  # the host now serves 4 MiB more...
        f.write(b"x" * (4 << 20))
    for entry in record["uploads"]:  # ...and a record says the ciphertext is that long
        entry["object_size"] = str((nas / name).stat().st_size)
    node = make_pool(name="b", capacity=64 * 1024, hosts=["dir:%s" % nas], redundancy=1,
                     encryption_key=key)
    node.data_load(json.dumps([record]))
    assert node.warm_up(digest) is False
    assert node.stats()["cached_bytes"] == 0 and os.listdir(node.cache.tmp_dir) == []


def test_claim_the_key_never_leaves_its_file(make_pool, key, nas, write_file, tmp_path, caplog,
                                            monkeypatch):
    caplog.set_level(logging.DEBUG)
    secret = [line for line in open(key).read().splitlines()
              if line.startswith("AGE-SECRET-KEY-")][0]
    cm = make_pool(hosts=["dir:%s" % nas], redundancy=1, encryption_key=key)
    digest = cm.upload(write_file(NAME, SECRET_TEXT))
    shown = [cm.data_dump(), json.dumps(cm.stats(), default=str), json.dumps(cm.info(digest)),
             repr(cm.pool.key), caplog.text]
    for path in (tmp_path / "node").rglob("*"):
        if path.is_file():
            shown.append(path.read_bytes().decode("latin-1"))
    for text in shown:
        assert secret not in text and secret[15:45] not in text
    # Large files go through the age command when it is installed: the
    # identity reaches it through a pipe of its own, never its command line.
    real = shutil.which("age")
    if real is None:
        if os.environ.get("CM_REQUIRE_AGE") == "1":
            pytest.fail("the age command is required here (CM_REQUIRE_AGE=1)")
        return
    argv = tmp_path / "age-argv"
    wrapper = tmp_path / "bin" / "age"
    wrapper.parent.mkdir()
    wrapper.write_text('#!/bin/sh\nprintf "%%s\\n" "$@" >> %s\nexec %s "$@"\n' % (argv, real))
    wrapper.chmod(0o700)
    monkeypatch.setenv("PATH", "%s%s%s" % (wrapper.parent, os.pathsep, os.environ["PATH"]))
    big = os.urandom(AGE_BINARY_MIN + 1000)
    node = make_pool(name="big", capacity=64 << 20, hosts=["dir:%s" % nas], redundancy=1,
                     encryption_key=key)
    digest = node.upload(write_file("big.bin", big))
    assert node.evict(0) == 1 and open(node.warm_up(digest), "rb").read() == big
    given = argv.read_text()
    assert "--encrypt" in given and "--decrypt" in given and "/dev/fd/" in given
    assert secret not in given and secret[15:45] not in given and key not in given
