"""The crash harness's child side: a zygote that forks workload processes.

Run as ``python crash_child.py CONFIG_JSON``. It imports cloudmanager once,
then reads commands on stdin, one per line:

- ``run SEED``: fork a child that runs :func:`workload` until it is killed;
  answers ``pid PID``;
- ``reap PID``: wait for that child; answers ``status STATUS``;
- ``quit``.

Forking from this single-threaded process (not from pytest) makes a child
cost a fork, not an interpreter start and an import, so a run can afford
hundreds of kill points.

The workload uploads files whose bytes follow from a seed, and appends
``U <hash> <seed> <size>`` to the log, fsynced, once ``upload()`` returned
the hash; before it removes a file it appends ``R <hash>``. The parent then
knows which hashes must come back, and with which bytes.
"""

import hashlib
import importlib
import json
import os
import random
import sys
import traceback

OPS = ("upload", "upload", "upload", "upload", "warm_up", "warm_up", "warm_up", "download",
       "evict", "sync", "data_load", "remove", "pin", "check")


def content(seed, size):
    """The bytes of the file made from ``seed``."""
    return random.Random(seed).randbytes(size)


def read_log(path):
    """``{hash: (seed, size)}`` of the files that must be in the pool, and the
    hashes ever removed (or whose removal began)."""
    live, removed = {}, set()
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return live, removed
    for line in lines:
        parts = line.split()
        if len(parts) == 4 and parts[0] == "U":
            live[parts[1]] = (int(parts[2]), int(parts[3]))
        elif len(parts) == 2 and parts[0] == "R":
            live.pop(parts[1], None)
            removed.add(parts[1])
        # A torn last line (killed mid-append) is ignored: upload() returned,
        # but the log never said so, and nothing depends on it.
    return live, removed


def _append(fd, line):
    os.write(fd, line.encode() + b"\n")
    os.fsync(fd)


def open_pool(cfg):
    from cloudmanager import CloudManager

    return CloudManager(cfg["db"], cfg["storage"], cfg["capacity"],
                        hosts=["dir:" + h for h in cfg["hosts"]], redundancy=2,
                        fsync=False, host_cooldown=0.0)


def workload(cfg, seed):
    """Run random operations on the pool until killed."""
    rng = random.Random(seed)
    live, _ = read_log(cfg["log"])
    live = dict(live)
    log_fd = os.open(cfg["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    scratch = os.path.join(cfg["scratch"], str(os.getpid()))
    os.makedirs(scratch, exist_ok=True)
    cm = open_pool(cfg)
    capacity = cfg["capacity"]
    while True:
        op = rng.choice(OPS)
        if op == "remove" and len(live) < 12:
            op = "upload"
        if op == "upload" and len(live) > 30:
            op = "remove"
        known = sorted(live)
        if op == "upload":
            cseed = rng.getrandbits(40)
            size = rng.choice((0, rng.randrange(1, 4096), rng.randrange(4096, capacity // 4),
                               rng.randrange(capacity // 4, capacity + capacity // 2)))
            path = os.path.join(scratch, "src")
            with open(path, "wb") as f:
                f.write(content(cseed, size))
            digest = cm.upload(path, defer=rng.random() < 0.3)
            if digest:
                _append(log_fd, "U %s %d %d" % (digest, cseed, size))
                live[digest] = (cseed, size)
        elif op == "remove":
            digest = rng.choice(known)
            _append(log_fd, "R %s" % digest)
            live.pop(digest)
            cm.remove(digest)
        elif not known:
            continue
        elif op == "warm_up":
            cm.warm_up(rng.choice(known))
        elif op == "download":
            cm.download(rng.choice(known), os.path.join(scratch, "out"), overwrite=True)
        elif op == "evict":
            cm.evict(rng.randrange(capacity))
        elif op == "sync":
            cm.sync()
        elif op == "pin":
            digest = rng.choice(known)
            if rng.random() < 0.5:
                cm.pin(digest, False)
            elif cm.warm_up(digest):  # a pin keeps a cached file cached
                cm.pin(digest)
        elif op == "check":
            cm.check()
        elif op == "data_load":
            # Our own records back (a no-op merge), and a record another
            # node might send: a file this pool never had, on our hosts.
            records = json.loads(cm.data_dump())[:5]
            data = content(rng.getrandbits(40), rng.randrange(1, 8192))
            stranger = hashlib.sha256(data).hexdigest()
            obj = os.path.join(cfg["hosts"][0], stranger)
            os.makedirs(cfg["hosts"][0], exist_ok=True)
            with open(obj + ".part", "wb") as f:
                f.write(data)
            os.replace(obj + ".part", obj)
            records.append({"version": "0.2", "datetime": "1391212800", "filename": "x",
                            "filesize": str(len(data)), "filehash": stranger,
                            "uploads": [{"host_name": "dir:" + cfg["hosts"][0],
                                         "url": "file://%s" % obj}]})
            cm.data_load(json.dumps(records))


def main():
    cfg = json.loads(sys.argv[1])
    importlib.import_module("cloudmanager")  # imported once, before any fork

    out = sys.stdout
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "run":
            pid = os.fork()
            if pid == 0:
                # The child: its own pool instance; never returns.
                try:
                    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
                    workload(cfg, int(cmd[1]))
                except BaseException:
                    traceback.print_exc()
                    sys.stderr.flush()
                finally:
                    os._exit(70)
            out.write("pid %d\n" % pid)
        elif cmd[0] == "reap":
            _, status = os.waitpid(int(cmd[1]), 0)
            out.write("status %d\n" % status)
        out.flush()


if __name__ == "__main__":
    main()
