"""Four nodes, one PostgreSQL catalog: real ``cm`` processes, SIGKILLs and a
server restart.

Four nodes, each with its own ``cloudmanager.toml`` (the same
``postgresql://`` catalog, its own 1 MiB cache and cache index, three shared
folder hosts, redundancy 2), are driven for ``CM_MULTINODE_SECONDS``
(default 30) by one thread per node spawning real ``cm`` processes one after
another (argument lists, no shell): uploads of new files (some with the same
bytes as another node's), downloads of hashes *any* node returned (compared
byte for byte), ``sync``, ``verify --limit``, ``evict``. A killer SIGKILLs a
random running ``cm`` every 0.5-2 s; halfway, the PostgreSQL server is
restarted (every connection cut). A sampler adds up each node's cache
directory (temp files included, each inode once) every ~20 ms.

During the run a ``cm`` may fail because it was killed, because the catalog
was unreachable while the server restarted (a typed, one-line error), or
because a file is not on any host yet (pending on the node that holds it);
it may never serve other bytes, say "malformed", "database is locked" or
print a traceback. At the end, each node runs ``cm fsck --repair`` and
``cm sync``; then every hash any node returned comes back byte for byte
through ``cm download`` on another node, from a host; no cache directory
was ever over its capacity.
"""

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from cloudmanager import CloudManager

from .figures import DATA_LOST, add
from .test_chaos import all_stopped

SECONDS = float(os.environ.get("CM_MULTINODE_SECONDS", "30"))
SEED = int(os.environ.get("CM_MULTINODE_SEED", "20261202"))
NODES = 4
CAPACITY = 1 << 20
HASH_LINE = re.compile(r"([0-9a-f]{64})  (.+)")
ALARMS = ("database is locked", "malformed", "internal error", "Traceback", "disk image")
HANG_S = 90

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def cache_bytes(root):
    """Bytes of the regular files under a cache directory, each inode once."""
    seen = {}
    for path, _, names in os.walk(root):
        for name in names:
            try:
                st = os.lstat(os.path.join(path, name))
            except FileNotFoundError:
                continue
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


class Cluster:
    def __init__(self, base, url, seed):
        self.base, self.url = base, url
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.running = {}  # Popen -> node
        self.stop = threading.Event()
        self.returned = {}  # hash -> bytes
        self.problems = []
        self.counts = {"procs": 0, "killed": 0, "uploads": 0, "downloads": 0,
                       "catalog_down": 0, "pending": 0}
        self.peak = [0] * NODES
        hosts = []
        for name in ("h1", "h2", "h3"):
            (base / "hosts" / name).mkdir(parents=True)
            hosts.append('[hosts.%s]\nspec = "dir:%s"\n' % (name, base / "hosts" / name))
        for i in range(NODES):
            node = base / ("node%d" % i)
            (node / "src").mkdir(parents=True)
            (node / "out").mkdir()
            (node / "cloudmanager.toml").write_text(
                '[pool]\ndatabase = "%s"\nstorage = "cache"\ncapacity = %d\nredundancy = 2\n'
                'fsync = false\n\n%s' % (url, CAPACITY, "\n".join(hosts)))

    def node(self, i):
        return self.base / ("node%d" % i)

    def cm(self, i, *args, killable=True):
        argv = [sys.executable, "-m", "cloudmanager", "--config",
                str(self.node(i) / "cloudmanager.toml")] + [str(a) for a in args]
        env = dict(os.environ)
        env.pop("CLOUDMANAGER_DATABASE", None)
        with self.lock:  # started and registered at once: the sampler stops it too
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env, cwd=str(self.node(i)))
            proc.killable = killable
            self.running[proc] = i
            self.counts["procs"] += 1
        try:
            out, err = proc.communicate(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            self.problems.append("hang: cm %s on node %d" % (" ".join(map(str, args)), i))
        with self.lock:
            self.running.pop(proc, None)
        killed = proc.returncode == -signal.SIGKILL and killable
        for alarm in ALARMS:
            if alarm in err:
                self.problems.append("node %d, cm %s: %s" % (i, args[0], err.strip()[-800:]))
                break
        return proc.returncode, out, err, killed

    # -- the roles --------------------------------------------------------------------

    def upload(self, i, rng):
        size = rng.choice([0, 1, 900, 20_000, 150_000, 400_000])
        # One in four is content another node may upload too (the same bytes).
        cid = rng.randrange(8) if rng.random() < 0.25 else rng.randrange(1 << 40)
        data = random.Random(cid).randbytes(size)
        path = self.node(i) / "src" / ("f%d" % rng.randrange(1 << 30))
        path.write_bytes(data)
        rc, out, err, killed = self.cm(i, "upload", path)
        for line in out.splitlines():
            match = HASH_LINE.fullmatch(line)
            if match:
                if match.group(1) != hashlib.sha256(data).hexdigest():
                    self.problems.append("node %d printed %s for other bytes" % (i, line))
                with self.lock:
                    self.returned[match.group(1)] = data
                    self.counts["uploads"] += 1
        if rc and not killed:
            self.note_failure(i, "upload", err)

    def download(self, i, rng):
        with self.lock:
            if not self.returned:
                return
            digest = rng.choice(sorted(self.returned))
            data = self.returned[digest]
        dest = self.node(i) / "out" / ("d%d" % rng.randrange(1 << 30))
        rc, _, err, killed = self.cm(i, "download", digest, dest)
        if rc == 0:
            if dest.read_bytes() != data:
                self.problems.append("node %d served other bytes for %s" % (i, digest))
            with self.lock:
                self.counts["downloads"] += 1
        elif not killed:
            self.note_failure(i, "download", err)
        if dest.exists() and dest.read_bytes() != data:  # a killed download: none or whole
            self.problems.append("node %d left a partial %s" % (i, dest))
        if dest.exists():
            dest.unlink()

    def note_failure(self, i, what, err):
        text = err.strip().splitlines()[-1] if err.strip() else "(no message)"
        # libpq's messages span lines ("... failed: Connection refused / Is the
        # server running on that host ..."): the whole of stderr says which.
        if "postgresql://" in err or "cannot start a transaction" in err \
                or "server running on that host" in err:
            with self.lock:
                self.counts["catalog_down"] += 1
        elif "no host" in text or "holds" in text:
            with self.lock:
                self.counts["pending"] += 1
        elif what == "upload" and "no room" in text:
            pass  # the cache is full of files in flight
        else:
            self.problems.append("node %d, cm %s failed: %s" % (i, what, text))

    def role(self, i):
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            roll = rng.random()
            if roll < 0.45:
                self.upload(i, rng)
            elif roll < 0.8:
                self.download(i, rng)
            elif roll < 0.88:
                self.cm(i, "sync")
            elif roll < 0.95:
                self.cm(i, "verify", "--limit", "20")
            else:
                self.cm(i, "evict", "0")

    def killer(self):
        rng = random.Random(self.rng.random())
        while not self.stop.wait(rng.uniform(0.5, 2.0)):
            with self.lock:
                procs = [p for p in self.running if p.killable]
            if procs:
                victim = rng.choice(procs)
                try:
                    victim.send_signal(signal.SIGKILL)
                    with self.lock:
                        self.counts["killed"] += 1
                except ProcessLookupError:
                    pass

    def sampler(self):
        """Each node's cache directory, measured with its processes stopped
        (SIGSTOP, until every thread is), so a walk never adds a file that
        was evicted to one that landed after it."""
        while not self.stop.wait(0.02):
            for i in range(NODES):
                with self.lock:
                    procs = [p for p, node in self.running.items() if node == i]
                    stopped = []
                    for proc in procs:
                        try:
                            proc.send_signal(signal.SIGSTOP)
                            stopped.append(proc)
                        except ProcessLookupError:
                            pass
                    try:
                        if all_stopped([p.pid for p in stopped], timeout=2.0):
                            self.peak[i] = max(self.peak[i],
                                               cache_bytes(self.node(i) / "cache"))
                    finally:
                        for proc in stopped:
                            try:
                                proc.send_signal(signal.SIGCONT)
                            except ProcessLookupError:
                                pass


def test_four_nodes_on_one_catalog_lose_nothing(postgres_server, tmp_path):
    cluster = Cluster(tmp_path, postgres_server.new_database(), SEED)
    print("multi-node seed %d, %.0f s" % (SEED, SECONDS))
    threads = [threading.Thread(target=cluster.role, args=(i,)) for i in range(NODES)]
    threads += [threading.Thread(target=cluster.killer), threading.Thread(target=cluster.sampler)]
    for t in threads:
        t.start()
    try:
        time.sleep(SECONDS / 2)
        postgres_server.restart()  # every node's connections are cut
        time.sleep(SECONDS / 2)
    finally:
        cluster.stop.set()
        for t in threads:
            t.join()
    print(cluster.counts)
    assert cluster.counts["uploads"] > 0 and cluster.counts["killed"] > 0

    # Each node mends what the kills left and sends what it holds; a file
    # pending on a later node is still short for the earlier ones, so a
    # second round must find every file at its target.
    for i in range(NODES):
        rc, out, err, _ = cluster.cm(i, "fsck", "--repair", killable=False)
        assert "Traceback" not in err, err
        cluster.cm(i, "sync", killable=False)
    for i in range(NODES):
        rc, out, err, _ = cluster.cm(i, "sync", killable=False)
        assert rc == 0, err
    # Every returned hash, on each node in turn with its cache emptied first:
    # from a host (a sample through `cm download`, the rest through the API).
    lost = []
    for i in range(NODES):
        rc, _, err, _ = cluster.cm(i, "evict", "0", killable=False)
        assert rc == 0, err
    items = sorted(cluster.returned.items())
    for n, (digest, data) in enumerate(items[:8]):
        i = (n + 1) % NODES
        dest = cluster.node(i) / "out" / ("final-" + digest)
        rc, _, err, _ = cluster.cm(i, "download", digest, dest, killable=False)
        if rc != 0 or dest.read_bytes() != data:
            lost.append((digest, err.strip()[-300:]))
    for i in range(NODES):
        with CloudManager(config=str(cluster.node(i) / "cloudmanager.toml")) as cm:
            for digest, data in items[8:]:
                path = cm.warm_up(digest)
                if not path or open(path, "rb").read() != data:
                    lost.append((digest, "node %d" % i))
            assert cm.stats()["cached_bytes"] <= CAPACITY
    add(DATA_LOST, len(lost))
    assert not lost, lost
    assert not cluster.problems, cluster.problems[:10]
    assert max(cluster.peak) <= CAPACITY, cluster.peak
