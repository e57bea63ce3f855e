"""One process of the multi-process stress test.

Run as ``python stress_worker.py CONFIG_JSON WORKER_ID SECONDS``. It runs
random operations on the shared pool until the time is up, and prints one
JSON line: how many operations of each kind it ran, every exception that
escaped an operation, every log message that speaks of a locked or busy
database, and the files it uploaded and removed.

Files come from two spaces: *shared* contents (any worker uploads them,
none removes them) and the worker's *private* contents (only it removes
them), so the parent knows which hashes must come back at the end.
"""

import hashlib
import json
import logging
import os
import random
import sys
import time
import traceback

SHARED = 16


def content(seed, size):
    """The bytes of the file made from ``seed``."""
    return random.Random(seed).randbytes(size)


def shared_file(index, capacity):
    return index, random.Random(index).randrange(0, capacity // 6)


class Alarms(logging.Handler):
    """Collects log messages that say the database was locked or busy."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        # Retries inside the database layer log at DEBUG: those are the
        # mechanism working. Anything louder means a caller saw the lock.
        text = record.getMessage().lower()
        if record.levelno >= logging.INFO and ("locked" in text or "busy" in text):
            self.messages.append(text[:300])


def main():
    cfg, worker, seconds = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    alarms = Alarms()
    logging.getLogger("cloudmanager").addHandler(alarms)
    logging.getLogger("cloudmanager").setLevel(logging.INFO)
    from cloudmanager import CloudManager

    rng = random.Random(cfg["seed"] * 100 + worker)
    capacity = cfg["capacity"]
    scratch = os.path.join(cfg["scratch"], "w%d" % worker)
    os.makedirs(scratch, exist_ok=True)
    counts, errors = {}, []
    uploaded, removed = {}, []
    shared_hashes = {}
    mine = []
    cm = CloudManager(cfg["db"], cfg["storage"], capacity,
                      hosts=["dir:" + h for h in cfg["hosts"]], redundancy=2, fsync=False,
                      host_cooldown=0.0)
    ops = ["upload_shared", "upload_private", "upload_private", "warm_up", "warm_up",
           "download", "evict", "pin", "sync", "data_load", "remove", "check", "stats",
           "verify"]
    deadline = time.monotonic() + seconds
    serial = 0
    while time.monotonic() < deadline:
        op = rng.choice(ops)
        try:
            if op == "upload_shared":
                seed, size = shared_file(rng.randrange(SHARED), capacity)
            elif op == "upload_private":
                serial += 1
                seed, size = worker * 10**6 + serial, rng.randrange(0, capacity // 5)
            if op.startswith("upload"):
                data = content(seed, size)
                path = os.path.join(scratch, "src")
                with open(path, "wb") as f:
                    f.write(data)
                digest = cm.upload(path, defer=rng.random() < 0.25)
                if digest != hashlib.sha256(data).hexdigest():
                    raise AssertionError("upload returned %r" % (digest,))
                uploaded[digest] = (seed, size)
                (mine.append(digest) if op == "upload_private"
                 else shared_hashes.__setitem__(digest, True))
            elif op in ("warm_up", "download", "pin"):
                known = mine + list(shared_hashes)
                if not known:
                    continue
                digest = rng.choice(known)
                if op == "warm_up":
                    path = cm.warm_up(digest)
                    if path:  # another process may evict it at once: a path, not a lease
                        pass
                elif op == "download":
                    dest = os.path.join(scratch, "out")
                    if cm.download(digest, dest, overwrite=True) != dest:
                        raise AssertionError("download of %s failed" % digest)
                    with open(dest, "rb") as f:
                        if hashlib.sha256(f.read()).hexdigest() != digest:
                            raise AssertionError("download of %s: wrong bytes" % digest)
                elif digest in mine:  # pins only on its own files, so removal clears them
                    if rng.random() < 0.5:
                        cm.pin(digest, False)
                    elif cm.warm_up(digest):
                        cm.pin(digest)
            elif op == "evict":
                cm.evict(rng.randrange(capacity))
            elif op == "sync":
                cm.sync()
            elif op == "data_load":
                records = [r for r in json.loads(cm.data_dump()) if r["filehash"] in shared_hashes]
                cm.data_load(json.dumps(records))
            elif op == "remove" and mine:
                digest = mine.pop(rng.randrange(len(mine)))
                removed.append(digest)
                uploaded.pop(digest, None)
                cm.remove(digest)
            elif op == "check":
                cm.check()
            elif op == "stats":
                if not 0 <= cm.stats()["usage_ratio"] <= 1:
                    raise AssertionError("usage ratio out of [0, 1]")
            elif op == "verify":
                cm.verify(limit=3)
            counts[op] = counts.get(op, 0) + 1
        except Exception:
            errors.append(traceback.format_exc()[-2000:])
    cm.close()
    print(json.dumps({"counts": counts, "errors": errors, "alarms": alarms.messages,
                      "uploaded": uploaded, "removed": removed}))


if __name__ == "__main__":
    main()
