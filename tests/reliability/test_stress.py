"""Four processes run mixed operations on one pool for a bounded time.

While they run, the parent samples the capacity (cached bytes plus bytes
reserved for writes in flight, read in one transaction). At the end: no
exception escaped an operation, no log line spoke of a locked database, the
pool checks clean, holds no more than its capacity on disk, keeps no temp
file, and every file uploaded and not removed comes back with its bytes.

``CM_STRESS_SECONDS`` sets how long the workers run (default 8).
"""

import json
import os
import random
import subprocess
import sys
import time

import cloudmanager
from cloudmanager.db import FileDatabase

from . import stress_worker
from .figures import DATA_LOST, STRESS_OPS, add
from .test_crash import disk_bytes

WORKERS = 4
SECONDS = float(os.environ.get("CM_STRESS_SECONDS", "8"))
CAPACITY = 192 * 1024
WORKER = os.path.join(os.path.dirname(__file__), "stress_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(cloudmanager.__file__)))


def test_four_processes_share_one_pool(tmp_path):
    seed = int(os.environ.get("CM_STRESS_SEED", random.randrange(1 << 31)))
    cfg = {"db": str(tmp_path / "pool" / "db.sqlite3"), "storage": str(tmp_path / "pool" / "cache"),
           "capacity": CAPACITY, "scratch": str(tmp_path / "scratch"), "seed": seed,
           "hosts": [str(tmp_path / "hosts" / "a"), str(tmp_path / "hosts" / "b")]}
    for root in cfg["hosts"]:  # a folder host's folder must exist
        os.makedirs(root, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    procs = []
    for worker in range(WORKERS):
        err = open(tmp_path / ("worker%d.err" % worker), "wb")
        procs.append((subprocess.Popen(
            [sys.executable, WORKER, json.dumps(cfg), str(worker), str(SECONDS)],
            stdout=subprocess.PIPE, stderr=err, env=env), err))
    samples, over = 0, []
    db = None
    deadline = time.monotonic() + SECONDS + 120
    while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
        if db is None and os.path.exists(cfg["db"]):
            try:
                db = FileDatabase(cfg["db"])
            except cloudmanager.CloudManagerError:
                db = None  # still being created by a worker
        if db is not None and db.schema_version():
            with db.transaction():
                held = db.cache_index.counter("cached_bytes") + db.sessions.reserved_bytes()
            samples += 1
            if held > CAPACITY:
                over.append(held)
        time.sleep(0.05)
    if db is not None:
        db.close()
    results = []
    for worker, (proc, err) in enumerate(procs):
        out, _ = proc.communicate(timeout=120)
        err.close()
        stderr = (tmp_path / ("worker%d.err" % worker)).read_text(errors="replace")
        assert proc.returncode == 0, stderr[-4000:]
        results.append(json.loads(out.decode().splitlines()[-1]))
    ops = sum(sum(r["counts"].values()) for r in results)
    add(STRESS_OPS, ops)
    where = "(CM_STRESS_SEED=%d)" % seed
    assert samples > 0 and over == [], "over capacity at %d of %d samples %s" % (
        len(over), samples, where)
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], "%d exceptions escaped %s:\n%s" % (len(errors), where, errors[0])
    alarms = [a for r in results for a in r["alarms"]]
    assert alarms == [], "the database was locked %s: %s" % (where, alarms[:5])
    for r in results:  # every kind of operation ran
        assert {"upload_shared", "upload_private", "warm_up", "evict", "remove"} <= set(
            r["counts"]), r["counts"]

    # The end: invariants on the quiet pool.
    expected = {}
    for r in results:
        for digest, (seed_, size) in r["uploaded"].items():
            expected[digest] = (seed_, size)
    with stress_worker_pool(cfg) as cm:
        report = cm.check()
        assert report["clean"] or report["unrepaired"] == ["pins_without_file"], report
        assert os.listdir(cm.cache.tmp_dir) == []
        assert disk_bytes(cm.cache.root) <= CAPACITY
        lost = []
        dest = str(tmp_path / "verify")
        for digest, (cseed, size) in sorted(expected.items()):
            if cm.download(digest, dest, overwrite=True) != dest:  # one path for all
                lost.append(digest)
                continue
            with open(dest, "rb") as f:
                if f.read() != stress_worker.content(cseed, size):
                    lost.append(digest)
        add(DATA_LOST, len(lost))
        assert lost == [], "%d files lost %s" % (len(lost), where)


def stress_worker_pool(cfg):
    from cloudmanager import CloudManager

    return CloudManager(cfg["db"], cfg["storage"], cfg["capacity"],
                        hosts=["dir:" + h for h in cfg["hosts"]], redundancy=2, fsync=False)
