"""Chaos: many real ``cm`` processes on one pool, SIGKILLed at random.

One pool (a ``cloudmanager.toml`` with a SQLite database, a 16 MiB cache,
three folder hosts, redundancy 2, ``fsync = true`` as the defaults have it)
is driven for ``CM_CHAOS_SECONDS`` (default 60) by roles, each a thread that
spawns real ``cm`` processes one after another (an argument list, no shell):

- **uploaders A and B** run ``cm upload TREE`` (now and then ``--rehash``,
  ``--defer`` or ``--jobs 2``) on two overlapping trees: files of 0 bytes to
  1 MiB, one of 9 MiB, one larger than the cache, and shared files with the
  same bytes in both trees. Between runs they add files and replace some
  (always by rename, so a file is never seen half written). Only a hash a
  process printed (``HASH  PATH``) counts as returned;
- an **evictor** (``cm evict`` to 0, a share or a size), a **syncer**
  (``cm sync``), a **verifier** (``cm verify``, ``--deep`` or ``--limit``;
  ``cm fsck``, sometimes ``--repair``);
- two **readers**: ``cm download HASH DEST`` or ``cm warm HASH`` of a
  returned hash, comparing the bytes with the source. A download killed
  midway must leave no DEST, or a whole one;
- a **remover** that uploads its own victims (content no uploader ever
  writes) and removes them with ``cm remove --yes``.

A killer thread SIGKILLs a random running ``cm`` every 0.5-2 s. Every ~50 ms
a sampler stops every running ``cm`` (SIGSTOP, until each thread shows state
T), adds up the bytes of the regular files in the cache directory (temp files
included), and resumes them: a snapshot, so a file evicted from one shard
while another lands in the next is never counted with it. It keeps the
largest total.

At the end, once every process has ended: ``PRAGMA integrity_check`` is ok,
``cm fsck --repair`` mends what the kills left and ``cm sync`` completes,
then a plain ``cm fsck`` is clean and ``cm verify`` finds every copy good;
``cm evict`` empties the cache, and every returned hash (victims removed or
whose removal began excluded) comes back byte for byte through its own
``cm download`` process, so from a host; every completed removal left no
record; the sampler never saw more than the capacity. During the run, no
``cm`` may say "database is locked", "malformed" or "internal error", exit
non-zero for a reason other than a kill (a refused ``cm warm`` for lack of
room, a ``cm sync`` still short and a ``cm verify`` or ``cm fsck`` finding
are allowed), print a hash for a path that never held those bytes, or serve
other bytes; and ``cm fsck`` may never call a returned file lost.

``CM_CHAOS_SECONDS`` sets the duration (default 60; 10 for a quick local
run) and ``CM_CHAOS_SEED`` the seed (default 20240611, printed; the timing
of processes still varies from run to run). Five seeds at 25 s::

    for s in 1 2 3 4 5; do CM_CHAOS_SEED=$s CM_CHAOS_SECONDS=25 \\
        pytest -q tests/reliability/test_chaos.py || break; done

It needs Linux (pidfds, /proc) and skips elsewhere. The events of a run
(every process, its exit status, the tail of its stderr) are in
``chaos-events.jsonl`` in the test's tmp_path, named when a check fails; a
summary of the counts is printed (``-s``) and left in ``chaos-summary.json``.
"""

import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest

import cloudmanager

from .figures import CHAOS_FILES, CHAOS_KILLS, CHAOS_PROCS, DATA_LOST, add

SECONDS = float(os.environ.get("CM_CHAOS_SECONDS", "60"))
SEED = int(os.environ.get("CM_CHAOS_SEED", "20240611"))
CAPACITY = 16 * 2**20
HOSTS = ("h1", "h2", "h3")
#: A ``cm`` process running longer than this is a hang: killed and reported.
HANG_S = 90
#: Files larger than the cache are uploaded straight to the hosts.
BIG = CAPACITY + 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(cloudmanager.__file__)))
pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and hasattr(os, "pidfd_open")),
    reason="the killer and the sampler use pidfds and /proc (Linux 5.3+)")
HASH_LINE = re.compile(r"([0-9a-f]{64})  (.+)")
#: Words in a ``cm`` stderr that are a bug whatever else happened.
ALARMS = ("database is locked", "malformed", "internal error", "Traceback",
          "cannot rollback", "disk image")


def content(cid, size):
    """The bytes of content ``cid``: deterministic, distinct for distinct ids."""
    return random.Random(cid).randbytes(size) if size else b""


def sha(data):
    return hashlib.sha256(data).hexdigest()


def cm_command():
    """The ``cm`` console script of this Python, else ``python -m cloudmanager``."""
    script = shutil.which("cm", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "cloudmanager"]


def cache_usage(root):
    """``(bytes, files)`` of the regular files under the cache directory.

    ``tmp/`` is walked first and each inode is counted once, so even without
    the sampler's stop a temp file renamed into its shard during the walk
    would not be counted twice.
    """
    seen = {}
    tmp = os.path.join(root, "tmp")
    dirs = [tmp]
    try:
        with os.scandir(root) as it:
            for entry in it:
                if entry.path != tmp:
                    dirs.append(entry.path)
    except FileNotFoundError:
        return 0, 0
    stack = dirs[::-1]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            seen[key] = max(seen.get(key, 0), st.st_size)
        elif stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as it:
                    stack.extend(e.path for e in it)
            except (FileNotFoundError, NotADirectoryError):
                continue
    return sum(seen.values()), len(seen)


def all_stopped(pids, timeout):
    """Wait until every thread of every process in ``pids`` is stopped (or
    gone); False if one still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pending = set(pids)
    while pending:
        for pid in list(pending):
            try:
                tids = os.listdir("/proc/%d/task" % pid)
            except FileNotFoundError:  # it ended
                pending.discard(pid)
                continue
            for tid in tids:
                try:
                    with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                        text = f.read()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if text[text.rfind(")") + 2] not in "TtZX":
                    break  # this thread still runs
            else:
                pending.discard(pid)
        if pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
    return True


Result = collections.namedtuple("Result", "rc out err killed")


class Chaos:
    """The pool, the trees, what was returned, and every process run."""

    def __init__(self, base, seed, seconds):
        self.base = base
        self.seed = seed
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()  # the roles stop spawning
        self.stop_killer = threading.Event()
        self.stop_sampler = threading.Event()
        # Every running cm: Popen -> (pidfd, role, killable). A pidfd, not the
        # pid, is signalled: a pid may be reaped and reused meanwhile.
        self.running = {}
        # Held to spawn a process and while the sampler has them all stopped.
        self.spawn_lock = threading.Lock()
        self.counts = collections.Counter()
        self.problems = []
        self.notes = collections.Counter()
        self.known = {}  # hash -> (cid, size): every content written into a tree
        self.at_path = collections.defaultdict(set)  # path -> hashes ever there
        self.returned = {}  # hash -> the role that printed it
        self.victims = {}  # hash -> state
        self.victim_content = {}  # hash -> (cid, size)
        self.max_cache = (0, 0)
        self.over = []
        self.samples = 0
        self.pause = 0.0  # the longest the sampler kept the processes stopped
        self.cid = 0
        pool = base / "pool"
        pool.mkdir()
        self.cache_dir = str(pool / "cache")
        self.db_path = str(pool / "pool.sqlite3")
        self.hosts = [str(base / "hosts" / h) for h in HOSTS]
        for path in self.hosts:  # a folder host's folder must exist (as cm init makes it)
            os.makedirs(path)
        lines = ["[pool]", 'database = "pool.sqlite3"', 'storage = "cache"',
                 "capacity = %d" % CAPACITY, "redundancy = 2", "fsync = true"]
        for name, path in zip(HOSTS, self.hosts):
            lines += ["", "[hosts.%s]" % name, "spec = %s" % json.dumps("dir:" + path)]
        self.config = str(pool / "cloudmanager.toml")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.work = base / "work"
        self.staging = base / "staging"
        self.scratch = base / "scratch"
        self.tmpdir = base / "proc-tmp"
        for d in (self.work, self.staging, self.scratch, self.tmpdir):
            d.mkdir()
        self.trees = {"A": base / "trees" / "A", "B": base / "trees" / "B"}
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
            CLOUDMANAGER_CONFIG=self.config, TMPDIR=str(self.tmpdir),
            XDG_CONFIG_HOME=str(base / "xdg" / "config"),
            XDG_DATA_HOME=str(base / "xdg" / "data"),
            XDG_CACHE_HOME=str(base / "xdg" / "cache"))
        self.command = cm_command() + ["--config", self.config]
        self.events_path = base / "chaos-events.jsonl"
        self.events = open(self.events_path, "w")
        self.t0 = time.monotonic()

    # -- bookkeeping -----------------------------------------------------------

    def problem(self, text):
        with self.lock:
            self.problems.append("[%.1fs] %s" % (time.monotonic() - self.t0, text))

    def event(self, **fields):
        with self.lock:
            self.events.write(json.dumps(dict(t=round(time.monotonic() - self.t0, 3),
                                              **fields)) + "\n")

    def where(self):
        return "(CM_CHAOS_SEED=%d, CM_CHAOS_SECONDS=%g; events in %s)" % (
            self.seed, self.seconds, self.events_path)

    # -- processes -------------------------------------------------------------

    def cm(self, role, *args, killable=True):
        """Run ``cm ARGS`` to its end (or its SIGKILL); a :class:`Result`."""
        args = [str(a) for a in args]
        started = time.monotonic()
        with self.spawn_lock:  # not while the sampler has every process stopped
            proc = subprocess.Popen(self.command + args, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=self.work, env=self.env)
            pidfd = os.pidfd_open(proc.pid)  # not reaped yet: only communicate() reaps
            with self.lock:
                self.running[proc] = (pidfd, role, killable)
                self.counts["spawned"] += 1
        hung = False
        try:
            out, err = proc.communicate(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            hung = True
            proc.kill()
            out, err = proc.communicate()
        finally:
            with self.spawn_lock, self.lock:  # nobody is signalling through the pidfd
                del self.running[proc]
                os.close(pidfd)
        out = out.decode("utf-8", "replace")
        err = err.decode("utf-8", "replace")
        killed = proc.returncode == -signal.SIGKILL and not hung
        if killed:
            with self.lock:
                self.counts["killed"] += 1
                self.counts["killed " + role] += 1
        if hung:
            self.problem("%s: cm %s hung for more than %d s; stderr: %s"
                         % (role, " ".join(args), HANG_S, err[-2000:]))
        for alarm in ALARMS:
            if alarm.lower() in err.lower():
                self.problem("%s: cm %s said %r (exit %s): %s"
                             % (role, " ".join(args), alarm, proc.returncode, err[-2000:]))
                break
        self.event(role=role, args=args[:6], rc=proc.returncode,
                   s=round(time.monotonic() - started, 3), out=out[:300], err=err[-600:])
        return Result(proc.returncode, out, err, killed)

    def unexpected(self, role, args, result):
        self.problem("%s: cm %s exited %s: %s"
                     % (role, " ".join(str(a) for a in args), result.rc, result.err[-1500:]))

    # -- trees -----------------------------------------------------------------

    def new_content(self, rng, size=None, prefix="u"):
        """A new content id and a size (drawn from the mix when not given)."""
        if size is None:
            r = rng.random()
            size = (rng.randrange(0, 64) if r < 0.3 else rng.randrange(64, 16384) if r < 0.6
                    else rng.randrange(16384, 256 * 1024) if r < 0.9
                    else rng.randrange(256 * 1024, 2**20))
        with self.lock:
            self.cid += 1
            cid = "%s:%d:%d" % (prefix, self.seed, self.cid)
        return cid, size

    def place(self, path, cid, size):
        """Write content at ``path`` by rename: a tree never shows half a file."""
        data = content(cid, size)
        digest = sha(data)
        with self.lock:
            self.known[digest] = (cid, size)
            self.at_path[str(path)].add(digest)
            self.cid += 1
            temp = self.staging / ("t%d" % self.cid)
        temp.write_bytes(data)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, path)
        return digest

    def make_trees(self):
        rng = self.rng
        shared = [0, 1, 17, 100, 4096, 10000, 65536, 200000, 700000, 2**20, 9 * 2**20, BIG]
        for i, size in enumerate(shared):
            cid, _ = self.new_content(rng, size, "shared")
            # Some at the same relative path in both trees, some elsewhere.
            self.place(self.trees["A"] / "shared" / ("s%d" % i), cid, size)
            other = "shared/s%d" % i if i % 2 else "common/deep/c%d" % i
            self.place(self.trees["B"] / other, cid, size)
        for name in "AB":
            for i in range(15):
                cid, size = self.new_content(rng)
                self.place(self.trees[name] / ("own/d%d" % (i % 3)) / ("f%d" % i), cid, size)
        # One larger than the cache in A only.
        cid, _ = self.new_content(rng, BIG + 12345, "bigA")
        self.place(self.trees["A"] / "own" / "big", cid, BIG + 12345)

    def grow(self, name, rng, round_):
        tree = self.trees[name]
        if rng.random() < 0.5:
            cid, size = self.new_content(rng)
            self.place(tree / "new" / ("n%d" % round_), cid, size)
        if name == "A" and rng.random() < 0.25:
            cid, size = self.new_content(rng, prefix="shared")
            self.place(self.trees["A"] / "new-shared" / ("x%d" % round_), cid, size)
            self.place(self.trees["B"] / "from-a" / ("y%d" % round_), cid, size)
        if rng.random() < 0.1:
            own = sorted(p for p in (tree / "own").rglob("f*"))
            if own:
                cid, size = self.new_content(rng)
                self.place(rng.choice(own), cid, size)

    # -- roles -----------------------------------------------------------------

    def role(self, name, body):
        """A thread running ``body(rng)`` until the end, reporting any crash of its own."""
        rng = random.Random("%d:%s" % (self.seed, name))

        def run():
            try:
                body(name, rng)
            except Exception:
                self.problem("the %s role crashed (a bug in the test):\n%s"
                             % (name, traceback.format_exc()))
                self.stop.set()

        return threading.Thread(target=run, name="chaos-" + name, daemon=True)

    def take_hash_lines(self, role, result, own):
        """Hashes a process printed as ``HASH  PATH``, checked against what was there."""
        text = result.out
        if not text.endswith("\n"):  # a line cut by the kill counts for nothing
            text = text[:text.rfind("\n") + 1]
        printed = []
        for line in text.splitlines():
            match = HASH_LINE.fullmatch(line)
            if not match:
                continue
            digest, path = match.groups()
            if path.endswith("/"):  # a directory's tree (its manifest), not a file of it
                continue
            path = os.path.join(str(self.work), path)
            with self.lock:
                ever = self.at_path.get(os.path.normpath(path), ())
                mine = own(digest)
            if digest not in ever or not mine:
                self.problem("%s printed %s for %s, which never held those bytes"
                             % (role, digest, path))
                continue
            printed.append(digest)
        return printed

    def uploader(self, name, rng):
        tree_name = name[-1]
        round_ = 0
        while not self.stop.is_set():
            round_ += 1
            self.grow(tree_name, rng, round_)
            flags = rng.choice([[], [], [], ["--rehash"], ["--defer"], ["--jobs", "2"]])
            args = ["upload"] + flags + [self.trees[tree_name]]
            result = self.cm(name, *args)
            printed = self.take_hash_lines(name, result, lambda h: h in self.known)
            with self.lock:
                for digest in printed:
                    self.returned.setdefault(digest, name)
                self.counts["hashes printed"] += len(printed)
            if result.rc == 0:
                self.counts["uploads ok"] += 1
            elif not result.killed:
                self.unexpected(name, args, result)

    def reader(self, name, rng):
        mine = self.scratch / name
        mine.mkdir()
        n = 0
        while not self.stop.is_set():
            with self.lock:
                pool = sorted(self.returned)
            if not pool:
                time.sleep(0.1)
                continue
            digest = rng.choice(pool)
            cid, size = self.known[digest]
            n += 1
            if size > CAPACITY or rng.random() < 0.6:
                dest = mine / ("%d" % n)
                result = self.cm(name, "download", digest, dest)
                if dest.exists():  # whole, even if the process was killed
                    if dest.read_bytes() != content(cid, size):
                        self.problem("%s: cm download %s wrote other bytes (exit %s)"
                                     % (name, digest, result.rc))
                    dest.unlink()
                    self.counts["reads compared"] += 1
                elif result.rc == 0:
                    self.problem("%s: cm download %s exited 0 and wrote nothing"
                                 % (name, digest))
                if result.rc != 0 and not result.killed:
                    self.unexpected(name, ["download", digest, dest], result)
                for leftover in mine.iterdir():  # a killed download's temp file
                    leftover.unlink()
            else:
                result = self.cm(name, "warm", digest)
                if result.rc == 0:
                    match = HASH_LINE.fullmatch(result.out.strip())
                    if not match or match.group(1) != digest:
                        self.problem("%s: cm warm %s printed %r" % (name, digest, result.out))
                        continue
                    try:
                        with open(match.group(2), "rb") as f:
                            got = f.read()
                    except FileNotFoundError:
                        self.notes["warmed file evicted before it was read"] += 1
                        continue
                    if got != content(cid, size):
                        self.problem("%s: cm warm %s: the cached file %s has other bytes"
                                     % (name, digest, match.group(2)))
                    self.counts["reads compared"] += 1
                elif not result.killed:
                    if result.rc == 1 and re.search(r"fit|room|full", result.err):
                        self.notes["warm refused: no room (pinned files)"] += 1
                    else:
                        self.unexpected(name, ["warm", digest], result)

    def remover(self, name, rng):
        n = 0
        while not self.stop.is_set():
            n += 1
            cid = "victim:%d:%d" % (self.seed, n)
            size = rng.choice([64, 1000, 5000, 70000, 300000])
            data = content(cid, size)
            digest = sha(data)
            with self.lock:
                if digest in self.known:  # never: victims are disjoint by content
                    raise AssertionError("victim content collides with a tree's")
                self.victim_content[digest] = (cid, size)
                self.victims[digest] = "written"
            path = self.staging / ("victim%d" % n)
            path.write_bytes(data)
            mine = self.scratch.parent / "victims" / ("v%d" % n)
            mine.parent.mkdir(exist_ok=True)
            os.replace(path, mine)
            with self.lock:
                self.at_path[str(mine)].add(digest)
            result = self.cm(name, "upload", mine)
            printed = self.take_hash_lines(name, result, lambda h: h in self.victim_content)
            returned = digest in printed
            if result.rc != 0 and not result.killed:
                self.unexpected(name, ["upload", mine], result)
            if returned:
                with self.lock:
                    self.victims[digest] = "returned"
            if self.stop.is_set():
                break
            time.sleep(rng.uniform(0, 0.5))
            with self.lock:
                self.victims[digest] = "removing" if returned else "removing unreturned"
            result = self.cm(name, "remove", "--yes", digest)
            with self.lock:
                if result.rc == 0:
                    self.victims[digest] = "removed"
                    self.counts["removed"] += 1
                elif result.killed:
                    self.victims[digest] = "remove killed"
                elif result.rc == 1 and "no file in the pool" in result.err:
                    self.victims[digest] = "not in the pool"
                    if returned:
                        self.problems.append("%s: victim %s was returned by cm upload, then "
                                             "cm remove found no such file" % (name, digest))
                else:
                    self.victims[digest] = "remove failed"
                    self.problems.append("%s: cm remove %s exited %s: %s"
                                         % (name, digest, result.rc, result.err[-1500:]))
            mine.unlink()

    def evictor(self, name, rng):
        while not self.stop.is_set():
            target = rng.choice(["0", "0", "25%", "50%", "90%", "4 MiB"])
            result = self.cm(name, "evict", target)
            if result.rc != 0 and not result.killed:
                self.unexpected(name, ["evict", target], result)
            self.stop.wait(rng.uniform(0.1, 1.0))

    def syncer(self, name, rng):
        while not self.stop.is_set():
            result = self.cm(name, "sync", "--json")
            if result.rc == 1 and "below the target" in result.err:
                self.notes["sync: still short (mid-run)"] += 1
            elif result.rc != 0 and not result.killed:
                self.unexpected(name, ["sync"], result)
            self.stop.wait(rng.uniform(0.2, 1.5))

    def verifier(self, name, rng):
        while not self.stop.is_set():
            r = rng.random()
            if r < 0.5:
                args = ["verify", "--json"] + rng.choice([[], ["--deep"], ["--limit", "20"]])
            else:
                args = ["fsck", "--json"] + (["--repair"] if r > 0.85 else [])
            result = self.cm(name, *args)
            if result.killed:
                continue
            try:
                report = json.loads(result.out)
            except ValueError:
                self.unexpected(name, args, result)
                continue
            if args[0] == "verify":
                for key in ("bad", "missing", "error"):
                    if report[key]:
                        self.notes["verify (mid-run): %s copies" % key] += report[key]
            else:
                with self.lock:
                    lost = set(report["lost"]) & set(self.returned)
                if lost:
                    self.problem("%s: cm %s: files returned by cm upload are lost: %s"
                                 % (name, " ".join(args), sorted(lost)))
                for key in report["unrepaired"]:
                    self.notes["fsck (mid-run) found %s" % key] += 1
            self.stop.wait(rng.uniform(0.2, 1.0))

    # -- the killer and the sampler ---------------------------------------------

    def killer(self):
        rng = random.Random("%d:killer" % self.seed)
        while not self.stop_killer.wait(rng.uniform(0.5, 2.0)):
            with self.lock:
                running = sorted((p.pid, fd) for p, (fd, _, killable) in self.running.items()
                                 if killable)
                if not running:
                    continue
                try:
                    signal.pidfd_send_signal(rng.choice(running)[1], signal.SIGKILL)
                except ProcessLookupError:  # it has just ended
                    continue
                self.counts["SIGKILLs sent"] += 1

    def sampler(self):
        """Every ~50 ms: stop every cm, add up the cache directory, resume them.

        With every writer stopped (each thread of each process seen in state
        T), the walk is a snapshot: no file is evicted from one shard while
        another lands in the next, so the total is what the directory held
        at that moment, temp files included.
        """
        while not self.stop_sampler.wait(0.05):
            began = time.monotonic()
            with self.spawn_lock:
                with self.lock:
                    pids = [(p.pid, fd) for p, (fd, _, _) in self.running.items()]
                stopped = []
                try:
                    for pid, fd in pids:
                        try:
                            signal.pidfd_send_signal(fd, signal.SIGSTOP)
                            stopped.append((pid, fd))
                        except ProcessLookupError:
                            pass
                    if not all_stopped([pid for pid, _ in stopped], timeout=2.0):
                        self.notes["samples skipped (a process would not stop)"] += 1
                        continue
                    used, files = cache_usage(self.cache_dir)
                finally:
                    for _, fd in stopped:
                        try:
                            signal.pidfd_send_signal(fd, signal.SIGCONT)
                        except ProcessLookupError:
                            pass
            with self.lock:
                self.samples += 1
                self.pause = max(self.pause, time.monotonic() - began)
                if used > self.max_cache[0]:
                    self.max_cache = (used, files)
                if used > CAPACITY and len(self.over) < 20:
                    self.over.append((round(time.monotonic() - self.t0, 2), used, files))

    # -- the end -------------------------------------------------------------------

    def integrity(self):
        """``PRAGMA integrity_check``'s rows (``["ok"]``), or the error."""
        try:
            conn = sqlite3.connect(self.db_path)
            try:
                return [row[0] for row in conn.execute("PRAGMA integrity_check")]
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            return ["%s: %s" % (type(exc).__name__, exc)]

    def final_json(self, *args):
        result = self.cm("final", *args, killable=False)
        assert not result.killed
        try:
            report = json.loads(result.out)
        except ValueError:
            report = None
        return result, report


def test_many_cm_processes_sigkilled_at_random(tmp_path):
    chaos = Chaos(tmp_path, SEED, SECONDS)
    print("chaos: CM_CHAOS_SEED=%d CM_CHAOS_SECONDS=%g, cm is %s"
          % (SEED, SECONDS, " ".join(chaos.command[:-2])))
    where = chaos.where()
    # The children must run this checkout's code.
    probe = subprocess.run(
        [sys.executable, "-c", "import cloudmanager; print(cloudmanager.__file__)"],
        env=chaos.env, cwd=chaos.work, capture_output=True, text=True)
    assert probe.stdout.strip() == os.path.join(REPO, "cloudmanager", "__init__.py"), probe
    chaos.make_trees()

    roles = [chaos.role("uploader-A", chaos.uploader), chaos.role("uploader-B", chaos.uploader),
             chaos.role("evictor", chaos.evictor), chaos.role("syncer", chaos.syncer),
             chaos.role("verifier", chaos.verifier), chaos.role("reader-1", chaos.reader),
             chaos.role("reader-2", chaos.reader), chaos.role("remover", chaos.remover)]
    killer = threading.Thread(target=chaos.killer, name="chaos-killer", daemon=True)
    sampler = threading.Thread(target=chaos.sampler, name="chaos-sampler", daemon=True)
    sampler.start()
    for thread in roles:
        thread.start()
    killer.start()
    try:
        chaos.stop.wait(SECONDS)
    finally:
        chaos.stop.set()
        for thread in roles:  # each finishes the process it is running
            thread.join(HANG_S + 30)
        chaos.stop_killer.set()
        killer.join(10)
    try:
        assert not any(t.is_alive() for t in roles), "a role did not stop " + where
        chaos.counts["chaos seconds"] = round(time.monotonic() - chaos.t0)
        check_the_end(chaos, where)
    finally:
        chaos.stop_sampler.set()
        sampler.join(10)
        chaos.events.close()
        add(CHAOS_PROCS, chaos.counts["spawned"])
        add(CHAOS_KILLS, chaos.counts["killed"])
        summary = {"seed": SEED, "seconds": SECONDS, "counts": dict(chaos.counts),
                   "max_cache_bytes": chaos.max_cache[0], "capacity": CAPACITY,
                   "cache_samples": chaos.samples,
                   "longest_sampler_stop_ms": round(chaos.pause * 1000, 1), "returned": len(chaos.returned),
                   "victims": dict(collections.Counter(chaos.victims.values())),
                   "notes": dict(chaos.notes), "problems": len(chaos.problems)}
        print("chaos summary: " + json.dumps(summary, sort_keys=True))
        with open(tmp_path / "chaos-summary.json", "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)


def check_the_end(chaos, where):
    """The checks on the quiet pool. Each failure is noted and the checks go
    on (a broken database should still show how much data it lost); the
    test fails at the end with every failure."""
    counts = chaos.counts
    failures = ["%d problems during the run:\n  %s" % (len(chaos.problems), "\n  ".join(
        p[:3000] for p in chaos.problems[:10]))] if chaos.problems else []

    def expect(ok, text):
        if not ok:
            failures.append(text)
        return ok

    def report_of(*args):
        result, report = chaos.final_json(*args)
        expect(report is not None, "cm %s printed no JSON (exit %s): %s"
               % (" ".join(args), result.rc, result.err[-2000:]))
        return result, report or {}

    expect(counts["killed"] > 0 and counts["uploads ok"] > 0,
           "the run killed nothing or uploaded nothing: %s" % dict(counts))
    # The database survived, as SQLite sees it.
    integrity = chaos.integrity()
    expect(integrity == ["ok"], "PRAGMA integrity_check after the run: %s" % integrity[:10])

    # Mend what the kills left, send what is queued; then all is well.
    result, report = report_of("fsck", "--repair", "--json")
    expect(result.rc == 0 and not report.get("lost"),
           "cm fsck --repair exited %s: %s %s" % (result.rc, report, result.err[-2000:]))
    result, report = report_of("sync", "--json")
    expect(result.rc == 0 and report.get("short") == 0,
           "cm sync exited %s: %s %s" % (result.rc, report, result.err[-2000:]))
    result, report = report_of("fsck", "--json")
    expect(result.rc == 0 and report.get("clean"),
           "cm fsck after repair and sync exited %s: %s" % (result.rc, report))
    result, report = report_of("verify", "--json")
    expect(result.rc == 0 and report.get("bad") == report.get("missing") == report.get(
        "error") == 0, "cm verify exited %s: %s %s" % (result.rc, report, result.err[-2000:]))

    # Empty the cache: every file must now come from a host.
    result = chaos.cm("final", "evict", "0", killable=False)
    expect(result.rc == 0, "cm evict 0 exited %s: %s" % (result.rc, result.err[-2000:]))
    result, status = report_of("status", "--json")
    expect(status.get("cached_bytes") == 0 and status.get("cached_files") == 0,
           "after sync and evict 0, the cache still holds files: %s"
           % {k: status.get(k) for k in ("cached_bytes", "cached_files", "queued")})
    expect(cache_usage(chaos.cache_dir) == (0, 0), "after sync and evict 0, the cache "
           "directory holds %s (bytes, files)" % (cache_usage(chaos.cache_dir),))

    result, listing = chaos.final_json("ls", "--json")
    in_pool = {f["hash"] for f in listing or ()}
    expect(result.rc == 0 and listing is not None, "cm ls exited %s: %s"
           % (result.rc, result.err[-2000:]))
    expected = dict((h, chaos.known[h]) for h in chaos.returned)
    for digest, state in chaos.victims.items():
        if state == "returned":  # its removal never began
            expected[digest] = chaos.victim_content[digest]
        elif state == "removed" and listing is not None:
            expect(digest not in in_pool, "victim %s, removed by cm remove (exit 0), is in "
                   "the pool again" % digest)
    leftovers = sum(1 for d, s in chaos.victims.items() if s == "removed"
                    for h in chaos.hosts if os.path.exists(os.path.join(h, d)))
    if leftovers:
        chaos.notes["copies of removed victims left on hosts"] = leftovers

    lost = []
    checks = chaos.scratch / "final"
    checks.mkdir()

    def fetch(item):
        i, (digest, (cid, size)) = item
        dest = checks / ("f%d" % i)
        result = chaos.cm("final", "download", digest, dest, killable=False)
        ok = result.rc == 0 and dest.exists() and dest.read_bytes() == content(cid, size)
        if dest.exists():
            dest.unlink()
        return digest, ok, result

    with ThreadPoolExecutor(min(4, max(2, os.cpu_count() or 2))) as pool:
        for digest, ok, result in pool.map(fetch, enumerate(sorted(expected.items()))):
            if not ok:
                lost.append((digest, result.rc, result.err[-300:]))
    counts["files checked at the end"] = len(expected) - len(lost)
    add(CHAOS_FILES, len(expected) - len(lost))
    add(DATA_LOST, len(lost))
    expect(not lost, "%d of %d returned files did not come back byte for byte: %s"
           % (len(lost), len(expected), lost[:5]))

    result, report = report_of("fsck", "--json")
    expect(result.rc == 0 and report.get("clean"), "the last cm fsck exited %s: %s"
           % (result.rc, report))
    integrity = chaos.integrity()
    expect(integrity == ["ok"], "PRAGMA integrity_check at the end: %s" % integrity[:10])
    expect(cache_usage(chaos.cache_dir)[0] <= CAPACITY, "over capacity at the end")
    expect(chaos.samples > 0, "the sampler took no sample")
    expect(chaos.over == [] and chaos.max_cache[0] <= CAPACITY,
           "the cache directory held more than its %d bytes: max %s (bytes, files); "
           "first samples over (s, bytes, files): %s" % (CAPACITY, chaos.max_cache,
                                                         chaos.over[:5]))
    assert not failures, "%d checks failed %s:\n%s" % (len(failures), where,
                                                        "\n".join(failures))
