"""One node-sync operation in a process of its own, so its peak memory is its own.

    python bench/sync_child.py OP POOL_DIR FILE CAPACITY

OP is ``dump_to``, ``load_from`` (streaming, to/from FILE), ``data_dump`` or
``data_load`` (the string API; the string is written to / read from FILE
outside the timing). Prints JSON: records, changed, seconds, rate (records/s)
and peak_growth (bytes of peak resident memory above the level before the
operation).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cloudmanager import CloudManager  # noqa: E402


def memory(field):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in bytes.

    Not getrusage's ru_maxrss: Linux carries it over from the parent across
    fork and exec, so a child of a large process would report its parent's.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no %s in /proc/self/status" % field)


def main():
    op, base, path, capacity = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cm = CloudManager(os.path.join(base, "db.sqlite3"), os.path.join(base, "cache"), capacity,
                      hosts=["memory:sync"], redundancy=1, fsync=False)
    text = None
    if op == "data_load":
        with open(path, encoding="utf-8") as f:
            text = f.read()
    cm.stats()  # warm the connection and the page cache of the database
    before = memory("VmRSS")
    started = time.perf_counter()
    changed = None
    if op == "dump_to":
        with open(path, "w", encoding="utf-8") as f:
            records = cm.dump_to(f)
    elif op == "load_from":
        with open(path, encoding="utf-8") as f:
            changed = cm.load_from(f)
        records = cm.stats()["files"]
    elif op == "data_dump":
        text = cm.data_dump()
        records = None
    elif op == "data_load":
        changed = cm.data_load(text)
        records = cm.stats()["files"]
    else:
        raise SystemExit("unknown op %r" % op)
    seconds = time.perf_counter() - started
    peak = memory("VmHWM")
    if op == "data_dump":
        records = len(json.loads(text))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    cm.close()
    print(json.dumps({"records": records, "changed": changed, "seconds": seconds,
                      "rate": records / seconds,
                      "peak_growth": max(0, peak - before)}))


if __name__ == "__main__":
    main()
