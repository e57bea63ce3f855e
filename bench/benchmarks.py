"""The benchmarks of issue 5 (and 9, a warm_up miss, of issue 12), each beside its
baseline measured in the same run.

Every function takes ``(ws, cfg)``: a :class:`~common.Workspace` giving
fresh directories, and the scale (:data:`FULL` or :data:`QUICK`), and
returns a list of :class:`~common.Row`.
"""

import hashlib
import json
import os
import random
import subprocess
import sys
import time

from common import (FAKES, REPO, MiB, Row, best_rate, median, rate_row, settle, timed,
                    write_random_file, write_small_files)
import original

from cloudmanager import CloudManager
from cloudmanager.hosts.folder import FolderHost

#: The issue's scale.
FULL = {"large_mib": 512, "small_files": 10000, "small_original": 2000, "lookup_files": 100000,
        "growth_small": 1000, "growth_large": 100000, "lookups": 20000, "evictions": 500,
        "host_seconds": 0.5, "dead_timeout": 1.0, "startup_runs": 15, "repeat": 3,
        "pg_files": 10000, "pg_nodes": 4, "pg_records": 100000,
        "enc_mib": 256, "enc_files": 10000}
#: A smoke run for CI: every benchmark, small data, no claims.
QUICK = {"large_mib": 32, "small_files": 500, "small_original": 200, "lookup_files": 2000,
         "growth_small": 200, "growth_large": 2000, "lookups": 2000, "evictions": 50,
         "host_seconds": 0.3, "dead_timeout": 0.5, "startup_runs": 3, "repeat": 1,
         "pg_files": 400, "pg_nodes": 4, "pg_records": 5000,
         "enc_mib": 32, "enc_files": 500}


def _pool(base, capacity, hosts, **kwargs):
    kwargs.setdefault("fsync", False)
    for host in hosts:  # a folder host's folder must exist (cm init makes it)
        root = host[len("dir:"):] if isinstance(host, str) and host.startswith("dir:") \
            else getattr(host, "root", None)
        if root:
            os.makedirs(root, exist_ok=True)
    return CloudManager(os.path.join(base, "db.sqlite3"), os.path.join(base, "cache"),
                        capacity, hosts=hosts, **kwargs)


# -- 1. large-file ingest --------------------------------------------------------

def large_ingest(ws, cfg):
    size = cfg["large_mib"] * MiB
    work = ws.fresh("large")
    src = write_random_file(os.path.join(work, "source.bin"), size)
    original.sha256_file(src)  # the source is in the page cache for every contender
    mb = size / 1e6
    samples = {"hashlib": [], "ours": {False: [], True: []}, "two_pass": {False: [], True: []}}
    for rep in range(cfg["repeat"]):
        for fsync in (False, True):
            # Interleaved, so drift in the machine's load hits every contender
            # alike; os.sync() first, so none inherits another's dirty pages.
            os.sync()
            t, _ = timed(lambda: original.sha256_file(src))
            samples["hashlib"].append(mb / t)
            base = os.path.join(work, "pool-%d-%d" % (rep, fsync))
            cm = _pool(base, 2 * size, ["dir:" + os.path.join(base, "host")], fsync=fsync,
                       defer_uploads=True)
            try:
                os.sync()
                t, digest = timed(lambda: cm.upload(src))
            finally:
                cm.close()
            if not digest:
                raise RuntimeError("upload of the large file failed")
            samples["ours"][fsync].append(mb / t)
            dst = os.path.join(work, "two-pass-%d-%d.bin" % (rep, fsync))
            os.sync()
            t, _ = timed(lambda: original.two_pass(src, dst, fsync))
            samples["two_pass"][fsync].append(mb / t)
    hashlib_rate = max(samples["hashlib"])
    rows = []
    for fsync in (False, True):
        label = "fsync" if fsync else "no fsync"
        ours = max(samples["ours"][fsync])
        rows.append(rate_row("1. ingest %d MiB, %s, vs hashlib alone" % (cfg["large_mib"], label),
                             ours, hashlib_rate, "MB/s", 0.9, "hashlib sha256 (read+hash)",
                             samples={"ours": samples["ours"][fsync],
                                      "baseline": samples["hashlib"]}))
        rows.append(rate_row("1. ingest %d MiB, %s, vs hash-then-copy" % (cfg["large_mib"], label),
                             ours, max(samples["two_pass"][fsync]), "MB/s", 1.2,
                             "original two passes",
                             samples={"ours": samples["ours"][fsync],
                                      "baseline": samples["two_pass"][fsync]}))
    return rows



# -- 9. warm_up miss ---------------------------------------------------------------

def warm_up_miss(ws, cfg):
    """A miss of a large file from a folder host: its bytes are read once, hashed
    as they are written into the cache, beside one read-and-hash of the same object."""
    size = cfg["large_mib"] * MiB
    work = ws.fresh("miss")
    src = write_random_file(os.path.join(work, "source.bin"), size)
    mb = size / 1e6
    ours, hashlib_rates = [], []
    for rep in range(cfg["repeat"]):
        base = os.path.join(work, "pool-%d" % rep)
        host = FolderHost(os.path.join(base, "host"), fsync=False)
        cm = _pool(base, 2 * size, [host], redundancy=1)
        try:
            digest = cm.upload(src)
            if not digest or cm.evict(0) != 1:
                raise RuntimeError("upload to the folder host failed")
            stored = os.path.join(host.root, digest)
            original.sha256_file(stored)  # the host's object is in the page cache for both
            # Interleaved; os.sync() first, so neither inherits the other's dirty pages.
            os.sync()
            t, _ = timed(lambda: original.sha256_file(stored))
            hashlib_rates.append(mb / t)
            os.sync()
            t, path = timed(lambda: cm.warm_up(digest))
            if not path:
                raise RuntimeError("warm_up of an evicted file failed")
            ours.append(mb / t)
        finally:
            cm.close()
    return [rate_row("9. warm_up miss %d MiB from a folder host, no fsync, vs hashlib alone"
                     % cfg["large_mib"], max(ours), max(hashlib_rates), "MB/s", 0.9,
                     "hashlib sha256 (read+hash)", "the host's object read once",
                     samples={"ours": ours, "baseline": hashlib_rates})]

# -- 2. small-file ingest --------------------------------------------------------

def small_ingest(ws, cfg):
    import diskcache

    n = cfg["small_files"]
    work = ws.fresh("small")
    paths = write_small_files(os.path.join(work, "src"), n, 4096)
    values = []
    for p in paths:
        with open(p, "rb") as f:
            values.append(f.read())
    rates = {"diskcache": [], "defer": [], "hosts": []}
    for rep in range(cfg["repeat"]):
        settle()
        dc = diskcache.Cache(os.path.join(work, "diskcache-%d" % rep))
        try:
            t, _ = timed(lambda: [dc.set("f%06d" % i, v) for i, v in enumerate(values)])
        finally:
            dc.close()
        rates["diskcache"].append(n / t)
        for mode in ("defer", "hosts"):
            base = os.path.join(work, "pool-%s-%d" % (mode, rep))
            host = FolderHost(os.path.join(base, "host"), fsync=False)
            cm = _pool(base, 1 << 40, [host], redundancy=1)
            settle()
            try:
                t, got = timed(lambda: cm.upload_many(paths, defer=(mode == "defer")))
                if not all(got) or (mode == "hosts" and cm.stats()["queued"]):
                    raise RuntimeError("upload_many left files out (%s)" % mode)
            finally:
                cm.close()
            rates[mode].append(n / t)
        settle()
        rates.setdefault("cm upload", []).append(n / _cm_upload_dir(
            os.path.join(work, "cli-%d" % rep), os.path.join(work, "src")))
    # The original design slows as the cache grows (a walk per upload): it is
    # timed on the first files only, which flatters it.
    m = min(n, cfg["small_original"])
    orig_rates = {}
    for mode in ("defer", "hosts"):
        base = os.path.join(work, "original-%s" % mode)
        pool = original.OriginalPool(os.path.join(base, "db.sqlite3"), os.path.join(base, "cache"),
                                     1 << 40,
                                     os.path.join(base, "host") if mode == "hosts" else None)
        try:
            t, _ = timed(lambda: [pool.upload(p) for p in paths[:m]])
        finally:
            pool.close()
        orig_rates[mode] = m / t
    dc_rate = max(rates["diskcache"])
    note_orig = "original timed on its first %d files" % m
    return [
        rate_row("2. %d x 4 KiB upload_many, uploads queued" % n, max(rates["defer"]), dc_rate,
                 "files/s", 1.0, "diskcache set", samples=rates),
        rate_row("2. %d x 4 KiB upload_many + folder host" % n, max(rates["hosts"]), dc_rate,
                 "files/s", 1.0, "diskcache set", samples=rates),
        rate_row("2. %d x 4 KiB `cm upload --defer DIR` (a process)" % n,
                 max(rates["cm upload"]), dc_rate, "files/s", 1.0, "diskcache set",
                 "wall time of the whole command, start-up included"),
        rate_row("2. upload_many, uploads queued, vs original", max(rates["defer"]),
                 orig_rates["defer"], "files/s", 20.0, "original rebuilt", note_orig),
        rate_row("2. upload_many + folder host, vs original", max(rates["hosts"]),
                 orig_rates["hosts"], "files/s", 20.0, "original rebuilt (+ host copy)",
                 note_orig),
    ]


def _cm_upload_dir(base, src):
    """Seconds ``cm upload --defer DIR`` takes as a process, on a fresh pool
    with a folder host (fsync off, like the library rows)."""
    os.makedirs(os.path.join(base, "host"))
    config = os.path.join(base, "cloudmanager.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write('[pool]\ndatabase = "db.sqlite3"\nstorage = "cache"\ncapacity = "1 TiB"\n'
                'redundancy = 1\nfsync = false\n[hosts.folder]\nspec = "dir:%s"\n'
                % os.path.join(base, "host"))
    t, proc = timed(lambda: subprocess.run(
        [sys.executable, "-m", "cloudmanager", "--config", config, "-q", "upload", "--defer",
         src], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600))
    if proc.returncode != 0:
        raise RuntimeError("cm upload failed: %s" % proc.stderr[-500:])
    return t


# -- 3-6. a large pool: lookups, hits, growth, node sync ---------------------------

class PoolSet:
    """Pools of N records (tiny files, half of them cached), built once per run."""

    FILE_SIZE = 64

    def __init__(self, ws):
        self.ws = ws
        self.pools = {}

    def get(self, n):
        if n not in self.pools:
            self.pools[n] = self._build(n)
        return self.pools[n]

    def _build(self, n):
        """Half the files uploaded here (cached), half learnt from another
        node's dump (on the host only). Not by uploading all and evicting
        half: creating files right after a mass delete in the same tree is
        slow on this disk, and would be timed by the growth benchmark."""
        base = self.ws.fresh("pool-%d" % n)
        paths = write_small_files(os.path.join(base, "src"), n, self.FILE_SIZE)
        store = "bench-%d-%d" % (n, os.getpid())
        half = n // 2
        other = _pool(os.path.join(base, "other-node"), 1 << 40, ["memory:" + store],
                      redundancy=1)
        dump = os.path.join(base, "other-node.json")
        try:
            remote = other.upload_many(paths[half:])
            with open(dump, "w", encoding="utf-8") as f:
                other.dump_to(f)
        finally:
            other.close()
        cm = _pool(base, 1 << 40, ["memory:" + store], redundancy=1)
        try:
            cached = cm.upload_many(paths[:half])
            with open(dump, encoding="utf-8") as f:
                cm.load_from(f)
            if not all(cached + remote) or cm.stats()["files"] != len(set(cached + remote)):
                raise RuntimeError("building the %d-file pool failed" % n)
        finally:
            cm.close()
        return {"base": base, "hashes": cached + remote, "cached": cached, "store": store}

    def open(self, n, capacity=1 << 40):
        pool = self.get(n)
        return _pool(pool["base"], capacity, ["memory:" + pool["store"]], redundancy=1)


def _diskcache_with(path, keys, **settings):
    import diskcache

    dc = diskcache.Cache(path, **settings)
    with dc.transact():
        for key in keys:
            dc.set(key, b"x" * PoolSet.FILE_SIZE)
    return dc


def lookups_and_hits(ws, cfg, pools):
    n = cfg["lookup_files"]
    pool = pools.get(n)
    rng = random.Random(5)
    sample = [rng.choice(pool["hashes"]) for _ in range(cfg["lookups"])]
    hits = [rng.choice(pool["cached"]) for _ in range(cfg["lookups"])]
    work = ws.fresh("diskcache-%d" % n)
    dc = _diskcache_with(os.path.join(work, "plain"), pool["hashes"])
    lru = _diskcache_with(os.path.join(work, "lru"), pool["hashes"],
                          eviction_policy="least-recently-used")
    cm = pools.open(n)
    rows = []
    try:
        count, r = len(sample), cfg["repeat"]
        dc_in, dc_in_all = best_rate(lambda: [h in dc for h in sample], count, r)
        ex, ex_all = best_rate(lambda: [cm.exists(h) for h in sample], count, r)
        oc, oc_all = best_rate(lambda: [cm.on_cache(h) for h in sample], count, r)
        dc_get, dc_get_all = best_rate(lambda: [lru.get(h) for h in hits], count, r)
        wu, wu_all = best_rate(lambda: [cm.warm_up(h) for h in hits], count, r)
        rows.append(rate_row("3. exists() at %d records" % n, ex, dc_in, "ops/s", 1.0,
                             "diskcache `key in cache`", samples={"ours": ex_all,
                                                                  "baseline": dc_in_all}))
        rows.append(rate_row("3. on_cache() at %d records, half cached" % n, oc, dc_in, "ops/s",
                             1.0, "diskcache `key in cache`", samples={"ours": oc_all,
                                                                       "baseline": dc_in_all}))
        rows.append(rate_row("4. warm_up() hit at %d records" % n, wu, dc_get, "ops/s", 2.0,
                             "diskcache get (LRU)", samples={"ours": wu_all,
                                                             "baseline": dc_get_all}))
    finally:
        cm.close()
        dc.close()
        lru.close()
    return rows


def _growth_figures(pools, n, cfg):
    """Seconds per operation on the pool of ``n`` records."""
    pool = pools.get(n)
    rng = random.Random(n)
    m = min(cfg["lookups"], 5000)
    sample = [rng.choice(pool["hashes"]) for _ in range(m)]
    hits = [rng.choice(pool["cached"]) for _ in range(m)]
    out = {}
    cm = pools.open(n)
    try:
        for name, fn in (("usage_ratio()", lambda: [cm.usage_ratio() for _ in sample]),
                         ("exists()", lambda: [cm.exists(h) for h in sample]),
                         ("warm_up() hit", lambda: [cm.warm_up(h) for h in hits])):
            rate, _ = best_rate(fn, m, cfg["repeat"])
            out[name] = 1 / rate
        used = cm.stats()["cached_bytes"]
    finally:
        cm.close()
    # Upload with eviction: the cache is exactly full; each upload evicts the
    # least recently used file. Uploads are deferred: this times the cache.
    k = cfg["evictions"]
    new = write_small_files(os.path.join(pool["base"], "new-%d" % time.time_ns()), k,
                            PoolSet.FILE_SIZE, prefix="n")
    cm = pools.open(n, capacity=used)
    try:
        t, got = timed(lambda: [cm.upload(p, defer=True) for p in new])
        if not all(got) or cm.stats()["cached_bytes"] > used:
            raise RuntimeError("upload with eviction failed")
        # Let the next run evict these too: put them on the host.
        cm.sync()
    finally:
        cm.close()
    out["upload with eviction"] = t / k
    return out


def growth(ws, cfg, pools):
    small, large = cfg["growth_small"], cfg["growth_large"]
    pools.get(small), pools.get(large)  # both built before any timing
    # Alternate, and keep each pool's best: writeback of whatever was written
    # just before (a pool being built) slows whichever is timed first.
    a, b = {}, {}
    for _ in range(2):
        for n, best in ((small, a), (large, b)):
            for name, seconds in _growth_figures(pools, n, cfg).items():
                best[name] = min(seconds, best.get(name, seconds))
    rows = []
    for name in ("upload with eviction", "usage_ratio()", "exists()", "warm_up() hit"):
        rows.append(Row("5. growth %d -> %d: %s" % (small, large, name), b[name] * 1e6,
                        a[name] * 1e6, "us/op", b[name] / a[name], 1.5, "<=",
                        "same op at %d" % small))
    return rows


def node_sync(ws, cfg, pools):
    n = cfg["lookup_files"]
    pool = pools.get(n)
    work = ws.fresh("sync")
    dump = os.path.join(work, "dump.json")
    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sync_child.py")

    def run(op, base, path, capacity=1 << 40):
        out = subprocess.run([sys.executable, child, op, base, path, str(capacity)],
                             capture_output=True, text=True, check=True, timeout=600)
        return json.loads(out.stdout)

    target_base = os.path.join(work, "other-node")
    dumped = run("dump_to", pool["base"], dump)
    loaded = run("load_from", target_base, dump)
    reloaded = run("load_from", target_base, dump)
    s_dumped = run("data_dump", pool["base"], os.path.join(work, "dump-string.json"))
    s_loaded = run("data_load", os.path.join(work, "other-node-strings"),
                   os.path.join(work, "dump-string.json"))
    n = dumped["records"]  # the growth benchmark may have added a few
    if not (n >= cfg["lookup_files"] and loaded["records"] == s_dumped["records"] == n
            and loaded["changed"] == n and s_loaded["changed"] == n
            and reloaded["changed"] == 0):
        raise RuntimeError("node sync lost records: %r" % ([dumped, loaded, reloaded,
                                                            s_dumped, s_loaded],))
    mb = 1e6
    rows = [
        Row("6. dump_to %d records" % n, dumped["rate"], s_dumped["rate"], "rec/s",
            dumped["rate"] / 50000, 1.0, ">=", "data_dump() string",
            "target: >= 50,000 rec/s (ratio to that); peak growth %.1f MB (string: %.1f MB)"
            % (dumped["peak_growth"] / mb, s_dumped["peak_growth"] / mb)),
        Row("6. load_from %d records (new node)" % n, loaded["rate"], s_loaded["rate"], "rec/s",
            loaded["rate"] / 50000, 1.0, ">=", "data_load() string",
            "target: >= 50,000 rec/s (ratio to that); peak growth %.1f MB (string: %.1f MB)"
            % (loaded["peak_growth"] / mb, s_loaded["peak_growth"] / mb)),
        Row("6. load_from again (all known)", reloaded["rate"], None, "rec/s",
            reloaded["rate"] / 100000, 1.0, ">=", "",
            "target: >= 100,000 rec/s (ratio to that)"),
        Row("6. peak memory growth, dump_to / load_from",
            max(dumped["peak_growth"], loaded["peak_growth"]) / mb,
            max(s_dumped["peak_growth"], s_loaded["peak_growth"]) / mb, "MB",
            max(dumped["peak_growth"], loaded["peak_growth"]) / mb / 100, 1.0, "<=",
            "data_dump/data_load", "target: <= 100 MB (ratio to that)"),
    ]
    return rows


# -- 7. parallel hosts and failover ----------------------------------------------------

def _fake_env(state):
    sys.path.insert(0, FAKES)
    import fakeplow

    os.environ["PATH"] = FAKES + os.pathsep + os.environ.get("PATH", "")
    os.environ["FAKE_PLOWSHARE_DIR"] = state
    return fakeplow


def parallel_hosts(ws, cfg):
    from plowshare.plowshare import Plowshare

    from cloudmanager.hosts.plowshare import PlowshareHost

    work = ws.fresh("plowshare")
    state = os.path.join(work, "state")
    fakeplow = _fake_env(state)
    seconds = cfg["host_seconds"]
    modules = ["bench_a", "bench_b", "bench_c"]
    for m in modules:
        fakeplow.set_faults(state, m, duration=seconds)
    ours, theirs = [], []
    for rep in range(cfg["repeat"]):
        src = os.path.join(work, "file-%d.bin" % rep)
        write_random_file(src, 64 * 1024)
        base = os.path.join(work, "pool-%d" % rep)
        cm = _pool(base, 1 << 30, ["plowshare:" + m for m in modules], redundancy=3)
        try:
            t, digest = timed(lambda: cm.upload(src))
            if not digest or cm.info(digest) is None or len(cm.info(digest)["uploads"]) != 3:
                raise RuntimeError("upload to 3 plowshare hosts failed")
        finally:
            cm.close()
        ours.append(t)
        t, got = timed(lambda: Plowshare(modules).upload(src, 3))
        if len(got) != 3:
            raise RuntimeError("plowshare-wrapper's upload failed: %r" % (got,))
        theirs.append(t)
    # Failover: the first host hangs; its timeout ends the attempt.
    timeout = cfg["dead_timeout"]
    added = []
    for rep in range(cfg["repeat"]):
        base = os.path.join(work, "failover-%d" % rep)
        dead = PlowshareHost("bench_dead%d" % rep, timeout=timeout)
        dead.weight = 10.0  # tried first while it is healthy
        good = PlowshareHost("bench_good%d" % rep, timeout=timeout)
        src = os.path.join(work, "failover-%d.bin" % rep)
        write_random_file(src, 64 * 1024)
        cm = _pool(base, 1 << 30, [dead, good], redundancy=2)
        try:
            digest = cm.upload(src)
            cm.evict(0)  # from the hosts, not the cache
            healthy_t, got = timed(lambda: cm.download(digest, os.path.join(base, "a.bin")))
            fakeplow.set_faults(state, dead.module, slow=60.0)
            cm.evict(0)
            dead_t, got2 = timed(lambda: cm.download(digest, os.path.join(base, "b.bin")))
            if not got or not got2:
                raise RuntimeError("download failover failed")
        finally:
            cm.close()
        added.append(dead_t - healthy_t)
    wall = min(ours)
    return [
        Row("7. upload to 3 hosts of %.1f s each" % seconds, wall, seconds, "s",
            wall / seconds, 1.2, "<=", "one host's time",
            "wall time over one host's time"),
        Row("7. upload to 3 hosts vs plowshare-wrapper", wall, min(theirs), "s",
            min(theirs) / wall, 1.0, ">=", "plowshare-wrapper upload()",
            "ratio = their time / ours", samples={"ours": ours, "baseline": theirs}),
        Row("7. failover: time added by a dead first host", min(added), timeout, "s",
            min(added) / timeout, 1.0, "<=", "its timeout",
            "download with the first host hanging, minus with it healthy",
            samples={"added": added}),
    ]


# -- 8. start-up -----------------------------------------------------------------

def startup(ws, cfg):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def once(code):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        return time.perf_counter() - started

    ours, bare = [], []
    for _ in range(cfg["startup_runs"]):  # interleaved
        ours.append(once("import cloudmanager"))
        bare.append(once("pass"))
    ours_ms, bare_ms = median(ours) * 1000, median(bare) * 1000
    return [Row("8. python -c 'import cloudmanager' (median)", ours_ms, bare_ms, "ms",
                ours_ms / 150, 1.0, "<=", "python -c pass",
                "target: <= 150 ms (ratio to that); import alone: %.0f ms"
                % (ours_ms - bare_ms), samples={"ours": ours, "baseline": bare})]


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
