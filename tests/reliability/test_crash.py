"""The crash harness: SIGKILL a random workload at random moments, reopen, check.

A zygote process (``crash_child.py``) forks workload children; this test
kills each one after a random delay, then reopens the pool and checks that:

- the open left no temp file;
- ``check()`` is clean without repair;
- the cache holds no more than its capacity (the running total with the
  reservations, and the bytes really on disk);
- every hash ``upload()`` returned (and the workload logged, fsynced) comes
  back with the right bytes, unless its removal had begun.

``CM_CRASH_KILLS`` sets the number of kill points (default 200) and
``CM_CRASH_SEED`` replays a run; the seed is printed when a check fails.
"""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time

import pytest

import cloudmanager

from . import crash_child
from .figures import CRASH_FILES, DATA_LOST, KILL_POINTS, add

KILLS = int(os.environ.get("CM_CRASH_KILLS", "200"))
CAPACITY = 96 * 1024
CHILD = os.path.join(os.path.dirname(__file__), "crash_child.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(cloudmanager.__file__)))


class Zygote:
    def __init__(self, cfg, stderr_path):
        self.stderr_path = stderr_path
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, CHILD, json.dumps(cfg)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, env=env)

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        if len(answer) != 2:
            pytest.fail("the zygote died:\n" + self.stderr())
        return int(answer[1])

    def stderr(self):
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-4000:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(10)


def disk_bytes(root):
    """Bytes of every regular file under the storage directory (lstat, no links)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def verify(cfg, kill, seed):
    where = "after kill #%d (CM_CRASH_SEED=%d)" % (kill, seed)
    live, _ = crash_child.read_log(cfg["log"])
    with crash_child.open_pool(cfg) as cm:
        left = os.listdir(cm.cache.tmp_dir)
        assert left == [], "temp files survived the open %s: %s" % (where, left)
        report = cm.check()
        assert report["clean"], "check not clean %s: %s" % (where, report)
        with cm.db.transaction():
            held = cm.db.cache_index.counter("cached_bytes") + cm.db.sessions.reserved_bytes()
        assert held <= CAPACITY, where
        assert disk_bytes(cm.cache.root) <= CAPACITY, where
        lost = []
        dest = os.path.join(cfg["scratch"], "verify")
        for digest, (cseed, size) in sorted(live.items()):
            got = cm.download(digest, dest, overwrite=True)  # one scratch path for all
            if got != dest:
                lost.append(digest)
                continue
            with open(dest, "rb") as f:
                if f.read() != crash_child.content(cseed, size):
                    lost.append(digest)
        add(CRASH_FILES, len(live) - len(lost))
        add(DATA_LOST, len(lost))
        assert not lost, "%d files lost %s: %s" % (len(lost), where, lost)


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    seed = int(os.environ.get("CM_CRASH_SEED", random.randrange(1 << 31)))
    rng = random.Random(seed)
    cfg = {"db": str(tmp_path / "pool" / "db.sqlite3"), "storage": str(tmp_path / "pool" / "cache"),
           "capacity": CAPACITY, "log": str(tmp_path / "uploads.log"),
           "scratch": str(tmp_path / "scratch"),
           "hosts": [str(tmp_path / "hosts" / "a"), str(tmp_path / "hosts" / "b")]}
    for root in cfg["hosts"]:  # a folder host's folder must exist
        os.makedirs(root, exist_ok=True)
    os.makedirs(cfg["scratch"])
    add(DATA_LOST, 0)
    zygote = Zygote(cfg, str(tmp_path / "zygote.err"))
    try:
        for kill in range(1, KILLS + 1):
            pid = zygote.ask("run %d" % rng.getrandbits(32))
            # Short delays land in the open and its reconciliation; longer
            # ones in the middle of the workload.
            time.sleep(rng.uniform(0, 0.03) if rng.random() < 0.3 else rng.uniform(0.03, 0.15))
            os.kill(pid, signal.SIGKILL)
            status = zygote.ask("reap %d" % pid)
            if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                pytest.fail("the workload ended by itself (status %d) before kill #%d "
                            "(CM_CRASH_SEED=%d):\n%s" % (status, kill, seed, zygote.stderr()))
            verify(cfg, kill, seed)
            add(KILL_POINTS)
    finally:
        zygote.close()
    live, removed = crash_child.read_log(cfg["log"])
    assert live and removed  # the workload did upload and remove
