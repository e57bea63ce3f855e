"""Benchmark 10 (issue 13): a pool whose catalog is on PostgreSQL, beside the
same pool on SQLite, measured in the same run.

One throwaway server (``tests/pg_server.py``: Debian's binaries, loopback,
run as ``postgres`` when we are root) serves the whole group and is stopped
at its end; ``CM_TEST_POSTGRES_URL`` names an existing one instead. It is
made as durable as a SQLite catalog is here: its files are fsynced, but a
commit does not wait for its WAL to reach the disk, as SQLite in WAL mode
with ``synchronous = NORMAL`` does not.

The figures:

- ingest of small files by 1 node, then by 4 nodes (4 processes, each with
  its own cache directory, all on one catalog), the files split between them;
- a ``warm_up()`` hit and ``exists()`` on the pools the 1-node ingests made;
- ``data_load()`` of a dump of 100k records into a new pool.
"""

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile

from common import Row, best_rate, rate_row, settle, timed, write_small_files

from cloudmanager import CloudManager, serializers

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
#: ``data_load`` must reach this (issue 13).
LOAD_TARGET = 30000
SMALL_SIZE = 4096


def _server_module():
    """``tests/pg_server.py``, which starts the throwaway server (the tests' own)."""
    if TESTS not in sys.path:
        sys.path.append(TESTS)  # last: nothing of ours is shadowed by a test module
    import pg_server

    return pg_server


def postgres(ws, cfg):
    """Every figure of the group, on one server started here and stopped at the end.

    Skipped, with the reason printed, where there is no server to be had,
    unless ``CM_REQUIRE_POSTGRES=1`` (CI): then it is a failure.
    """
    pg_server = _server_module()
    reason = pg_server.missing_reason()
    if reason:
        if os.environ.get("CM_REQUIRE_POSTGRES") == "1":
            raise RuntimeError("no PostgreSQL server: %s" % reason)
        print("10. postgres: skipped: %s" % reason, flush=True)
        print("postgres skipped: %s" % reason, file=sys.stderr, flush=True)
        return []
    server = pg_server.PostgresServer().start()
    made = []

    def new_database():
        url = server.new_database()
        made.append(url.rsplit("/", 1)[-1])
        return url

    try:
        if not server.external:
            # As durable as the SQLite catalog (see the module's docstring):
            # the test server's fsync = off would flatter every write.
            server.admin("ALTER SYSTEM SET fsync = on")
            server.admin("ALTER SYSTEM SET full_page_writes = on")
            server.admin("SELECT pg_reload_conf()")
        rows, pools = ingest(ws, cfg, new_database)
        rows = hits_and_exists(cfg, pools) + rows
        rows += data_load(ws, cfg, new_database)
        return rows
    finally:
        if server.external:  # the user's server: leave it as it was
            for name in made:
                server.admin('DROP DATABASE IF EXISTS "%s"' % name)
        server.stop()


# -- ingest, 1 node and 4 ---------------------------------------------------------------

def _run_nodes(database, base, host, groups):
    """Ingest each group of source directories in a node process of its own,
    all started at once; return ``(files, seconds from the first start to the
    last end)``."""
    child = os.path.join(HERE, "ingest_child.py")
    env = dict(os.environ, CM_BENCH_DATABASE=database)
    procs = []
    try:
        for i, sources in enumerate(groups):
            err = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(
                [sys.executable, child, os.path.join(base, "node%d" % i, "cache"), host]
                + sources, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                env=env, text=True)
            procs.append((proc, err))
        for proc, err in procs:  # every node has its catalog open
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("an ingest node did not start: %s" % _stderr(proc, err))
        settle()
        for proc, _ in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc, err in procs:
            line = proc.stdout.readline()
            if proc.wait(timeout=600) != 0 or not line:
                raise RuntimeError("an ingest node failed: %s" % _stderr(proc, err))
            results.append(json.loads(line))
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
    if not all(r["ok"] for r in results):
        raise RuntimeError("an ingest node left files out: %r" % (results,))
    files = sum(r["files"] for r in results)
    return files, max(r["end"] for r in results) - min(r["start"] for r in results)


def _stderr(proc, err):
    proc.kill()
    proc.wait()
    err.seek(0)
    return err.read()[-1000:]


def ingest(ws, cfg, new_database):
    """Ingest ``pg_files`` x 4 KiB: by 1 node on PostgreSQL, by ``pg_nodes`` nodes
    on one PostgreSQL catalog (the files split between them: the same work),
    and by 1 node on SQLite. Uploads are deferred: this times hashing into the
    cache, the catalog and the queue, not the folder host.

    :return: ``(rows, pools)``: the pools the last 1-node runs made, for
        :func:`hits_and_exists`
    """
    n, nodes = cfg["pg_files"], cfg["pg_nodes"]
    work = ws.fresh("pg-ingest")
    src = [os.path.join(work, "src", "part%d" % i) for i in range(nodes)]
    for i, directory in enumerate(src):
        count = n // nodes + (1 if i < n % nodes else 0)
        write_small_files(directory, count, SMALL_SIZE, prefix="p%d-" % i)
    rates = {"pg1": [], "pgN": [], "sqlite1": []}
    pools = {}
    for rep in range(cfg["repeat"]):  # interleaved
        for kind in ("pg1", "pgN", "sqlite1"):
            base = os.path.join(work, "%s-%d" % (kind, rep))
            host = os.path.join(base, "host")
            os.makedirs(host)
            database = (os.path.join(base, "db.sqlite3") if kind == "sqlite1"
                        else new_database())
            groups = [[d] for d in src] if kind == "pgN" else [src]
            files, seconds = _run_nodes(database, base, host, groups)
            if files != n:
                raise RuntimeError("ingest saw %d files, not %d" % (files, n))
            rates[kind].append(n / seconds)
            if kind != "pgN":
                pools[kind] = {"database": database, "storage": os.path.join(base, "node0",
                                                                             "cache"),
                               "host": host}
    hashes = []
    for directory in src:
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as f:
                hashes.append(hashlib.sha256(f.read()).hexdigest())
    pools["hashes"] = hashes
    one, many, lite = max(rates["pg1"]), max(rates["pgN"]), max(rates["sqlite1"])
    rows = [
        Row("10. ingest %d x 4 KiB: %d nodes vs 1, one PostgreSQL catalog" % (n, nodes),
            many, one, "files/s", many / one, None, ">=", "1 node, same catalog",
            "ratio = scaling factor; %d processes, the files split between them, each its"
            " own cache; aggregate = all files / first start to last end; uploads"
            " deferred; %d cores" % (nodes, os.cpu_count() or 0), samples=rates),
        rate_row("10. ingest %d x 4 KiB, 1 node: PostgreSQL vs SQLite catalog" % n, one, lite,
                 "files/s", None, "1 node, SQLite catalog", "uploads deferred",
                 samples=rates),
    ]
    return rows, pools


# -- a cache hit and exists() -------------------------------------------------------------

def _open(pool):
    return CloudManager(pool["database"], pool["storage"], 1 << 40,
                        hosts=["dir:" + pool["host"]], redundancy=1, fsync=False)


def hits_and_exists(cfg, pools):
    """``warm_up()`` of cached files and ``exists()``, on the 1-node ingests'
    pools: the same files on either catalog, every one cached."""
    rng = random.Random(13)
    sample = [rng.choice(pools["hashes"]) for _ in range(cfg["lookups"])]
    count, repeat = len(sample), cfg["repeat"]
    pg, lite = _open(pools["pg1"]), _open(pools["sqlite1"])
    try:
        for cm in (pg, lite):  # warm: every row read once, the connections open
            if not all(cm.warm_up(h) for h in sample) or not all(cm.exists(h) for h in sample):
                raise RuntimeError("a pool lacks the files it ingested")
        hits = {"ours": [], "baseline": []}
        exists = {"ours": [], "baseline": []}
        for _ in range(repeat):  # interleaved
            hits["ours"] += best_rate(lambda: [pg.warm_up(h) for h in sample], count, 1)[1]
            hits["baseline"] += best_rate(lambda: [lite.warm_up(h) for h in sample], count,
                                          1)[1]
            exists["ours"] += best_rate(lambda: [pg.exists(h) for h in sample], count, 1)[1]
            exists["baseline"] += best_rate(lambda: [lite.exists(h) for h in sample], count,
                                            1)[1]
    finally:
        pg.close()
        lite.close()
    n = len(pools["hashes"])
    return [
        rate_row("10. warm_up() hit, PostgreSQL pool vs SQLite (%d files)" % n,
                 max(hits["ours"]), max(hits["baseline"]), "ops/s", 0.9,
                 "same pool, SQLite catalog", "the hit reads the local cache index only",
                 samples=hits),
        rate_row("10. exists(), PostgreSQL vs SQLite (%d files)" % n, max(exists["ours"]),
                 max(exists["baseline"]), "ops/s", None, "same pool, SQLite catalog",
                 "a round trip to the server per call (loopback)", samples=exists),
    ]


# -- data_load -------------------------------------------------------------------------------

def synthetic_dump(n, store):
    """A dump of ``n`` records, as a pool with one ``memory:STORE`` host and
    redundancy 1 writes it (benchmark 6's shape): a name, a size, a time and
    one good copy each."""
    records = []
    for i in range(n):
        digest = hashlib.sha256(b"record %d" % i).hexdigest()
        records.append(serializers.Record(
            digest, "file-%07d.bin" % i, 4096 + i % 65536, 1391212800 + i,
            (("memory:" + store, "memory://%s/%s" % (store, digest), False),)))
    out = io.StringIO()
    serializers.dump_to(records, out)
    return out.getvalue()


def data_load(ws, cfg, new_database):
    """``data_load()`` of ``pg_records`` records into a new pool: PostgreSQL,
    and SQLite as the baseline."""
    n = cfg["pg_records"]
    store = "bench-load-%d" % os.getpid()
    text = synthetic_dump(n, store)
    work = ws.fresh("pg-load")
    rates = {"ours": [], "baseline": []}
    for rep in range(cfg["repeat"]):  # interleaved
        for key, database in (("ours", new_database()),
                              ("baseline", os.path.join(work, "db-%d.sqlite3" % rep))):
            cm = CloudManager(database, os.path.join(work, "%s-%d" % (key, rep)), 1 << 30,
                              hosts=["memory:" + store], redundancy=1, fsync=False)
            try:
                cm.stats()  # the catalog's connections are open
                settle()
                seconds, changed = timed(lambda: cm.data_load(text))
                if changed != n or cm.stats()["files"] != n:
                    raise RuntimeError("data_load into %s merged %r of %d records"
                                       % (key, changed, n))
            finally:
                cm.close()
            rates[key].append(n / seconds)
    ours, base = max(rates["ours"]), max(rates["baseline"])
    return [Row("10. data_load %d records into PostgreSQL (new pool)" % n, ours, base, "rec/s",
                ours / LOAD_TARGET, 1.0, ">=", "same into SQLite",
                "target: >= 30,000 rec/s (ratio to that); PostgreSQL/SQLite %.2f; one copy"
                " per record" % (ours / base), samples=rates)]
