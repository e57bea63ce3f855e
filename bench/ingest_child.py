"""One node's ingest in a process of its own, started together with other nodes'.

    CM_BENCH_DATABASE=DB python bench/ingest_child.py STORAGE HOST_DIR SRC_DIR...

Opens a pool on DB (a SQLite path or a ``postgresql://`` URL: in the
environment, so a password in it is not on a command line) with STORAGE as
its cache and a folder host in HOST_DIR, prints ``ready``, waits for a line
on standard input, then adds every file of the SRC_DIRs with
``upload_many(defer=True)``: each is hashed into the cache, recorded in the
catalog and queued; no host upload runs, so this times ingest alone. Prints
JSON: files, ok (every file added), start and end (``time.monotonic()``,
which on Linux is one clock for all processes, so the parent can take the
span from the first start to the last end).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cloudmanager import CloudManager  # noqa: E402


def main():
    storage, host, sources = sys.argv[1], sys.argv[2], sys.argv[3:]
    paths = [os.path.join(d, name) for d in sources for name in sorted(os.listdir(d))]
    cm = CloudManager(os.environ["CM_BENCH_DATABASE"], storage, 1 << 40,
                      hosts=["dir:" + host], redundancy=1, fsync=False)
    try:
        cm.stats()  # the catalog's connections are open before the start
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.monotonic()
        got = cm.upload_many(paths, defer=True)
        end = time.monotonic()
    finally:
        cm.close()
    print(json.dumps({"files": len(paths), "ok": all(got), "start": start, "end": end}),
          flush=True)


if __name__ == "__main__":
    main()
