"""SECURITY.md, "A local user who can write into the storage directory", and
the storage directory's own checks: one test per claim."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

import cloudmanager
from cloudmanager import CloudManager
from cloudmanager.errors import CloudManagerError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(cloudmanager.__file__)))


def reopen_after_crash(cm, tmp_path, capacity=1 << 20):
    """Reopen the pool as if its process had died: the next open reconciles in full."""
    # The session row of a process that is gone, as a crash leaves it.
    cm.db.sessions.open("%s:999999999:0badc0de0badc0de" % cm.cache.node, cm.cache.node,
                       999999999, "1")
    cm.close()
    return CloudManager(tmp_path / "node" / "db.sqlite3", tmp_path / "node" / "cache", capacity,
                        hosts=["dir:%s" % (tmp_path / "hosts" / h) for h in ("h1", "h2", "h3")],
                        fsync=False)


@pytest.fixture
def outside(tmp_path):
    """A directory outside the pool holding a file a planted link will point at."""
    d = tmp_path / "outside"
    d.mkdir()
    return d


def test_claim_a_symlink_in_place_of_a_cached_file_is_never_followed(
        make_pool, write_file, outside, tmp_path):
    cm = make_pool()
    data = b"cached" * 100
    digest = cm.upload(write_file("f", data))
    target = outside / "precious"
    target.write_bytes(data)  # the right bytes: following the link would look fine
    cached = os.path.join(cm.cache.root, digest[:2], digest)
    os.unlink(cached)
    os.symlink(target, cached)
    # check (deep, too) reports the link and does not read through it
    report = cm.check(deep=True)
    assert report["missing"] == [digest] and report["orphans"] == [
        os.path.join(digest[:2], digest)]
    assert report["hash_mismatch"] == []
    # eviction removes the link, not the file it points at
    cm.evict(0)
    assert not os.path.lexists(cached)
    assert target.read_bytes() == data
    os.symlink(target, cached)
    cm = reopen_after_crash(cm, tmp_path)  # reconciliation, too
    assert not os.path.lexists(cached) and target.read_bytes() == data
    assert cm.check(repair=True)["clean"]
    cm.close()


def test_claim_a_symlinked_shard_is_never_entered(make_pool, write_file, outside, tmp_path):
    cm = make_pool()
    data = b"in a shard" * 100
    digest = cm.upload(write_file("f", data))
    shard = os.path.join(cm.cache.root, digest[:2])
    # The link points at a directory holding a file of the same name (a
    # folder host's object, say): an unlink through the link would delete it.
    victim = outside / digest
    victim.write_bytes(data)
    os.unlink(os.path.join(shard, digest))
    os.rmdir(shard)
    os.symlink(outside, shard)
    cm.evict(0)
    assert victim.read_bytes() == data
    report = cm.check()
    assert digest[:2] in report["orphans"]
    assert cm.check(repair=True)["repaired"]["orphans"] >= 1
    assert stat.S_ISDIR(os.lstat(shard).st_mode) and victim.read_bytes() == data
    os.rmdir(shard)
    os.symlink(outside, shard)
    cm = reopen_after_crash(cm, tmp_path)  # the open puts a real shard back
    assert stat.S_ISDIR(os.lstat(shard).st_mode) and victim.read_bytes() == data
    assert cm.check()["clean"]
    cm.close()


def test_claim_a_symlinked_temp_dir_is_never_emptied(make_pool, outside, tmp_path):
    cm = make_pool()
    for i in range(3):
        (outside / ("dead-%d.tmp" % i)).write_bytes(b"keep me")
    tmp_dir = cm.cache.tmp_dir
    os.rmdir(tmp_dir)
    os.symlink(outside, tmp_dir)
    report = cm.check()
    assert report["stale_temp"] == ["tmp"]
    cm = reopen_after_crash(cm, tmp_path)
    assert sorted(os.listdir(outside)) == ["dead-0.tmp", "dead-1.tmp", "dead-2.tmp"]
    assert stat.S_ISDIR(os.lstat(tmp_dir).st_mode)
    assert cm.check()["clean"]
    cm.close()


def test_claim_a_tampered_cached_file_is_never_delivered_by_download(make_pool, write_file,
                                                                     tmp_path):
    cm = make_pool()
    data = b"original" * 100
    digest = cm.upload(write_file("f", data))
    with open(os.path.join(cm.cache.root, digest[:2], digest), "r+b") as f:
        f.write(b"EVIL")  # same size
    assert cm.check(deep=True)["hash_mismatch"] == [digest]
    dest = tmp_path / "dest"
    assert cm.download(digest, dest) is False and not dest.exists()
    assert not cm.on_cache(digest)  # dropped; the next fetch comes from a host
    assert cm.download(digest, dest) == str(dest) and dest.read_bytes() == data


def test_claim_created_files_and_directories_are_private(tmp_path, fake_plowshare):
    # In a child process: the umask is process-wide.
    script = textwrap.dedent("""
        import json, os, stat, sys
        os.umask(0o022)
        from cloudmanager import CloudManager
        base = sys.argv[1]
        src = os.path.join(base, "src")
        with open(src, "wb") as f:
            f.write(b"private" * 100)
        with CloudManager(os.path.join(base, "pool", "db.sqlite3"),
                          os.path.join(base, "pool", "cache"), 2**20,
                          hosts=["plowshare:locker"], redundancy=1) as cm:
            digest = cm.upload(src)
            cm.evict(0)
            cm.warm_up(digest)  # a file plowdown wrote, now in the cache
        modes = {}
        for d, dirs, files in os.walk(os.path.join(base, "pool")):
            for n in dirs + files:
                p = os.path.join(d, n)
                modes[os.path.relpath(p, base)] = stat.S_IMODE(os.lstat(p).st_mode)
        modes["pool"] = stat.S_IMODE(os.lstat(os.path.join(base, "pool")).st_mode)
        print(json.dumps({"digest": digest, "modes": modes}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    digest, modes = out["digest"], out["modes"]
    assert "pool/db.sqlite3" in modes and os.path.join(
        "pool/cache", digest[:2], digest) in modes
    wrong = {}
    for path, mode in modes.items():
        is_dir = stat.S_ISDIR(os.lstat(tmp_path / path).st_mode)
        if mode != (0o700 if is_dir else 0o600):
            wrong[path] = oct(mode)
    assert wrong == {}


def test_claim_a_configured_file_mode_shares_the_cache_and_nothing_else(tmp_path, make_pool,
                                                                         write_file):
    """``file_mode = 0o640`` lets the group read cached files (shards 0750);
    temp files and the database stay private. An unsafe mode is refused."""
    config = tmp_path / "cloudmanager.toml"
    config.write_text('[pool]\ndatabase = "db.sqlite3"\nstorage = "cache"\ncapacity = 65536\n'
                      'file_mode = 0o640\n[hosts.nas]\nspec = "dir:%s"\n' % (tmp_path / "nas"))
    with CloudManager(config=config, fsync=False) as cm:
        digest = cm.upload(write_file("shared.txt", b"for the group"))
        cm.evict(0)
        assert cm.warm_up(digest)  # downloaded into the cache: the same mode
        many = cm.upload_many([write_file("m%d" % i, b"batch %d" % i) for i in range(3)])
        cache = tmp_path / "cache"
        for h in [digest] + many:
            assert stat.S_IMODE(os.lstat(cache / h[:2] / h).st_mode) == 0o640
        assert stat.S_IMODE(os.lstat(cache / digest[:2]).st_mode) == 0o750
        assert stat.S_IMODE(os.lstat(cache).st_mode) == 0o750
        assert stat.S_IMODE(os.lstat(cache / "tmp").st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(tmp_path / "db.sqlite3").st_mode) == 0o600
    for bad in (0o644 | 0o100, 0o400, 0o4600, True, "0640"):
        with pytest.raises(CloudManagerError):
            make_pool(file_mode=bad)
    # Back to the default: the shards are private again.
    with CloudManager(tmp_path / "db.sqlite3", tmp_path / "cache", 65536, hosts=[],
                      fsync=False):
        assert stat.S_IMODE(os.lstat(tmp_path / "cache" / digest[:2]).st_mode) == 0o700


# -- a storage directory that cannot be used: a clear error at construction ----------


def test_storage_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "cache").write_bytes(b"")
    with pytest.raises(CloudManagerError, match="not a directory"):
        CloudManager(tmp_path / "db.sqlite3", tmp_path / "cache", 1 << 20,
                     hosts=["dir:%s" % (tmp_path / "h")])


@pytest.mark.parametrize("capacity", [0, -1, 1.5, "10", None, True])
def test_capacity_that_is_not_a_positive_integer_is_refused(tmp_path, capacity):
    with pytest.raises(CloudManagerError, match="storage_size|capacity"):
        CloudManager(tmp_path / "db.sqlite3", tmp_path / "cache", capacity,
                     hosts=["dir:%s" % (tmp_path / "h")])


def test_unwritable_storage_path_is_refused(tmp_path):
    if os.geteuid() == 0:
        # Permissions do not stop root; a kernel filesystem does.
        locked = "/sys/kernel"
        if not os.path.isdir(locked):
            pytest.skip("no /sys/kernel to stand for an unwritable directory")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        os.chmod(locked, 0o555)
    with pytest.raises(CloudManagerError, match="storage directory"):
        CloudManager(tmp_path / "db.sqlite3", locked, 1 << 20,
                     hosts=["dir:%s" % (tmp_path / "h")])
