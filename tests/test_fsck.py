"""cloudmanager.cache.fsck: the reconciliation at open and the whole check
(``cm fsck``) walk and judge the storage directory the same way.

(Each finding kind of the check has its own test in
``tests/reliability/test_check.py``; the reconciliation's in ``tests/test_cache.py``.)
"""

import os
import socket
import stat
import subprocess
import sys

import pytest

from cloudmanager.cache import fsck, layout
from helpers import sha

DEAD_TOKEN = "deadbeefdeadbeef"
LIVE_TOKEN = "1111222233334444"


@pytest.fixture
def other_process():
    """Another live process on this machine (a session we must not disturb)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def entries(root):
    """``{relative path: kind}`` of everything under ``root``, links not followed."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            kind = "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "file"
            found[os.path.relpath(path, root)] = kind
    return found


def seed(cm, write_file, outside, other_pid):
    """Damage a pool's storage directory: every kind the walk must judge.

    :return: ``(good hash, wrong-size hash, live temp path)``
    """
    root = cm.cache.root
    good = cm.upload(write_file("good", b"good" * 100))
    resized = cm.upload(write_file("resized", b"resized" * 100))
    with open(os.path.join(root, layout.relpath(resized)), "ab") as f:
        f.write(b"longer now")
    orphan = b"no row claims me"
    with open(os.path.join(root, layout.relpath(sha(orphan))), "wb") as f:
        f.write(orphan)
    with open(os.path.join(root, "ab", "junk"), "wb") as f:
        f.write(b"junk")
    # A symlink as a cached file's name, and one in place of a whole shard.
    os.symlink(outside / "precious", os.path.join(root, layout.relpath("cd" * 32)))
    shard = os.path.join(root, "ef")
    os.rmdir(shard)
    os.symlink(outside, shard, target_is_directory=True)
    # A dead session's temp file, and a live temp of another live process.
    node = cm.cache.node
    pid = dead_pid()
    cm.db.sessions.open("%s:%d:%s" % (node, pid, DEAD_TOKEN), node, pid, "")
    with open(cm.cache.layout.reservation_temp(DEAD_TOKEN, 1), "wb") as f:
        f.write(b"half written")
    cm.db.sessions.open("%s:%d:%s" % (node, other_pid, LIVE_TOKEN), node, other_pid,
                        fsck.process_start(other_pid))
    live_temp = cm.cache.layout.reservation_temp(LIVE_TOKEN, 2)
    with open(live_temp, "wb") as f:
        f.write(b"in flight")
    return good, resized, live_temp


@pytest.fixture
def outside(tmp_path):
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious").write_bytes(b"do not touch")
    (d / ("ef" * 32)).write_bytes(b"a folder host's object")
    return d


def test_reconcile_and_fsck_agree(make_pool, write_file, outside, other_process):
    after = {}
    for how in ("reconcile", "fsck"):
        cm = make_pool(name=how)
        good, resized, live_temp = seed(cm, write_file, outside, other_process.pid)
        root = cm.cache.root
        found = cm.check()  # a look: it changes nothing
        assert found["size_mismatch"] == [resized] and found["missing"] == []
        assert found["orphans"] == sorted([
            layout.relpath(sha(b"no row claims me")), os.path.join("ab", "junk"),
            layout.relpath("cd" * 32), "ef"])
        assert found["stale_temp"] == [os.path.join("tmp", "%s-1.tmp" % DEAD_TOKEN)]
        assert found["dead_sessions"] == 1
        before = entries(root)
        if how == "reconcile":
            report = cm.cache.reconcile(full=True)
            assert report == {"full": True, "dead_sessions": 1,
                              "orphans_removed": len(found["orphans"]),
                              "missing_marked": len(found["size_mismatch"]),
                              "temp_removed": len(found["stale_temp"])}
        else:
            report = cm.check(repair=True)
            assert report["repaired"] == {"orphans": len(found["orphans"]),
                                          "size_mismatch": 1, "stale_temp": 1,
                                          "dead_sessions": 1}
            assert report["unrepaired"] == []
        after[how] = entries(root)
        removed = {path for path, kind in before.items() if after[how].get(path) != kind}
        # Exactly what the look found went, and the wrong-size file with its row.
        assert removed == set(found["orphans"]) | set(found["stale_temp"]) \
            | {layout.relpath(resized)}
        assert after[how]["ef"] == "dir"  # a real shard again
        assert os.path.exists(live_temp) and os.path.exists(cm.cache.path_for(good))
        assert not cm.db.cache_index.is_cached(resized) and cm.db.cache_index.is_cached(good)
        assert (outside / "precious").read_bytes() == b"do not touch"
        assert (outside / ("ef" * 32)).read_bytes() == b"a folder host's object"
        assert LIVE_TOKEN in {s.owner.rsplit(":", 1)[-1] for s in cm.db.sessions.all()}
        assert DEAD_TOKEN not in {s.owner.rsplit(":", 1)[-1] for s in cm.db.sessions.all()}
        assert cm.check()["clean"]
    assert after["reconcile"] == after["fsck"]


def test_a_full_reconcile_keeps_shared_shard_modes(make_pool, write_file):
    cm = make_pool(file_mode=0o640)
    cm.upload(write_file("a", b"alpha"))
    shard = os.path.join(cm.cache.root, "00")
    assert stat.S_IMODE(os.stat(shard).st_mode) == 0o750
    cm.cache.reconcile(full=True)
    assert stat.S_IMODE(os.stat(shard).st_mode) == 0o750


def test_dead_sessions_are_this_machines_and_not_this_process(make_pool, other_process):
    cm = make_pool()
    node = socket.gethostname()
    pid = dead_pid()
    sessions = {
        "dead": (node, pid, ""),
        "reused pid": (node, other_process.pid, "not its start"),
        "live": (node, other_process.pid, fsck.process_start(other_process.pid)),
        "elsewhere": ("another-machine", pid, ""),
    }
    for owner, (host, p, start) in sessions.items():
        cm.db.sessions.open(owner, host, p, start)
    assert sorted(fsck.dead_sessions(cm.cache)) == ["dead", "reused pid"]
