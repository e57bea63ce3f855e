"""Benchmark 11 (issue 14): an encrypted pool beside the same pool without a key,
measured in the same run on the same data.

Every pool has one folder host (fsync off, as in the other groups) and
redundancy 1; the encrypted one has an age identity made for the run
(:func:`cloudmanager.crypto.new_identity_file`), so each copy it sends is the
file's age ciphertext and each download decrypts. The cache is large enough
for the file, its ciphertext on its way out and its ciphertext on its way
in: neither pool's work goes outside the cache.

The figures (issue 14, item 6):

- ``upload()`` of one large file, the host copy included: encrypted ≥ 0.6x;
- ``warm_up()`` of that file after ``evict(0)``, a miss served by the folder
  host: encrypted ≥ 0.6x;
- ``upload_many()`` of many 4 KiB files, the host copies included:
  encrypted ≥ 0.5x.

Skipped, with the reason printed, when pyrage is not installed.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import time

from common import MiB, rate_row, settle, timed, write_random_file, \
    write_small_files

from cloudmanager import CloudManager
from cloudmanager.hosts.folder import FolderHost

#: Issue 14's targets, encrypted over plaintext.
INGEST_TARGET = 0.6
MISS_TARGET = 0.6
SMALL_TARGET = 0.5
SMALL_SIZE = 4096
MODES = ("plain", "encrypted")


def encryption(ws, cfg):
    """Every figure of the group; ``[]`` (the reason printed) without pyrage."""
    try:
        import pyrage  # noqa: F401
    except ImportError as exc:
        reason = "pyrage is not installed (%s; pip install 'cloudmanager[encryption]')" % exc
        print("11. encryption: skipped: %s" % reason, flush=True)
        print("encryption skipped: %s" % reason, file=sys.stderr, flush=True)
        return []
    from cloudmanager.crypto import new_identity_file

    work = ws.fresh("encryption")
    key = os.path.join(work, "identity.txt")
    new_identity_file(key)
    return large_file(work, key, cfg) + small_files(work, key, cfg)


def _pool(base, key, capacity):
    """A fresh pool in ``base`` with one folder host, encrypted when ``key`` is
    an identity file; :return: ``(pool, host)``."""
    host = FolderHost(os.path.join(base, "host"), fsync=False)
    os.makedirs(host.root)
    extra = {"encryption_key": key} if key else {}
    cm = CloudManager(os.path.join(base, "db.sqlite3"), os.path.join(base, "cache"), capacity,
                      hosts=[host], redundancy=1, fsync=False, **extra)
    return cm, host


def _order(rep):
    """The modes in repetition ``rep``'s order: alternated, so neither always
    runs right after the other's writes."""
    return MODES if rep % 2 == 0 else MODES[::-1]


def _read_all(directory):
    """Read every file directly in ``directory`` once (into the page cache)."""
    for entry in os.scandir(directory):
        if entry.is_file():
            with open(entry.path, "rb") as f:
                while f.read(MiB):
                    pass


def large_file(work, key, cfg):
    """``upload()`` of one ``enc_mib`` file, then ``warm_up()`` of it after
    ``evict(0)``, in each pool: the miss is timed on the pool the upload made."""
    size = cfg["enc_mib"] * MiB
    os.makedirs(os.path.join(work, "large"))
    src = write_random_file(os.path.join(work, "large", "source.bin"), size)
    _read_all(os.path.dirname(src))  # the source is in the page cache for both pools
    mb = size / 1e6
    ingest = {m: [] for m in MODES}
    miss = {m: [] for m in MODES}
    floor = []
    for rep in range(cfg["repeat"]):
        for mode in _order(rep):
            base = os.path.join(work, "large-%s-%d" % (mode, rep))
            # Room for the file and a ciphertext each way: nothing goes outside the cache.
            cm, host = _pool(base, key if mode == "encrypted" else None, 4 * size)
            try:
                settle()
                seconds, digest = timed(lambda: cm.upload(src))
                if not digest or cm.stats()["queued"]:
                    raise RuntimeError("upload of the large file to the folder host failed"
                                       " (%s)" % mode)
                ingest[mode].append(mb / seconds)
                if cm.evict(0) != 1:
                    raise RuntimeError("evict(0) left the large file cached (%s)" % mode)
                _read_all(host.root)  # the host's object is in the page cache for both
                settle()
                seconds, path = timed(lambda: cm.warm_up(digest))
                if not path:
                    raise RuntimeError("warm_up of the evicted file failed (%s)" % mode)
                miss[mode].append(mb / seconds)
                if mode == "encrypted" and shutil.which("age"):
                    settle()
                    floor.append(mb / _decrypt_and_hash(key, _only_object(host.root), digest))
            finally:
                cm.close()
    mib = cfg["enc_mib"]
    floor_rows = [] if not floor else [
        rate_row("11. floor of that miss: `age -d` + SHA-256 of its output, vs not",
                 max(floor), max(miss["plain"]), "MB/s", None, "same pool's plain miss",
                 "the least an encrypted miss must do, and nothing else: the age command"
                 " decrypts the host's object (read from its file) into a pipe that this"
                 " process reads and hashes; no ciphertext check, no cache file. An"
                 " encrypted miss cannot beat this ratio on this machine",
                 samples={"ours": floor, "baseline": miss["plain"]})]
    return floor_rows + [
        rate_row("11. ingest %d MiB + folder host, encrypted vs not" % mib,
                 max(ingest["encrypted"]), max(ingest["plain"]), "MB/s", INGEST_TARGET,
                 "same pool, no key",
                 "upload() of one file, defer off: copy into the cache + (encrypt into a"
                 " cache work file) + copy to the host; MB/s = plaintext MB / wall time;"
                 " fsync off, redundancy 1",
                 samples={"ours": ingest["encrypted"], "baseline": ingest["plain"]}),
        rate_row("11. warm_up miss %d MiB, decrypting vs not" % mib,
                 max(miss["encrypted"]), max(miss["plain"]), "MB/s", MISS_TARGET,
                 "same pool, no key",
                 "warm_up() after evict(0), on the pool the ingest row made; host object in"
                 " the page cache; encrypted: ciphertext fetched and hash-checked into the"
                 " cache, then decrypted while hashed; MB/s = plaintext MB / wall time",
                 samples={"ours": miss["encrypted"], "baseline": miss["plain"]}),
    ]


def _only_object(directory):
    """The path of the one object file in a folder host's root."""
    objects = [e.path for e in os.scandir(directory)
               if e.is_file() and not e.name.startswith(".")]
    if len(objects) != 1:
        raise RuntimeError("expected one object in %s, found %d" % (directory, len(objects)))
    return objects[0]


def _decrypt_and_hash(key, ciphertext, digest):
    """Seconds for ``age -d -i KEY < ciphertext``, its output read and
    SHA-256-hashed here in 1 MiB reads; checks the hash is ``digest``."""
    started = time.perf_counter()
    with open(ciphertext, "rb") as src:
        proc = subprocess.Popen(["age", "--decrypt", "--identity", key], stdin=src,
                                stdout=subprocess.PIPE, bufsize=0)
        sha = hashlib.sha256()
        while True:
            chunk = proc.stdout.read(MiB)
            if not chunk:
                break
            sha.update(chunk)
        proc.stdout.close()
        if proc.wait() != 0:
            raise RuntimeError("age could not decrypt %s" % ciphertext)
    seconds = time.perf_counter() - started
    if sha.hexdigest() != digest:
        raise RuntimeError("age decrypted %s to other bytes" % ciphertext)
    return seconds


def small_files(work, key, cfg):
    """``upload_many()`` of ``enc_files`` x 4 KiB to a folder host."""
    n = cfg["enc_files"]
    paths = write_small_files(os.path.join(work, "small"), n, SMALL_SIZE)
    _read_all(os.path.join(work, "small"))
    rates = {m: [] for m in MODES}
    for rep in range(cfg["repeat"]):
        for mode in _order(rep):
            base = os.path.join(work, "small-%s-%d" % (mode, rep))
            cm, _ = _pool(base, key if mode == "encrypted" else None, 1 << 40)
            try:
                cm.stats()  # the catalog is open before the clock starts
                settle()
                seconds, got = timed(lambda: cm.upload_many(paths, defer=False))
                if not all(got) or cm.stats()["queued"]:
                    raise RuntimeError("upload_many left files out (%s)" % mode)
            finally:
                cm.close()
            rates[mode].append(n / seconds)
    return [rate_row("11. %d x 4 KiB upload_many + host, encrypted vs not" % n,
                     max(rates["encrypted"]), max(rates["plain"]), "files/s", SMALL_TARGET,
                     "same pool, no key",
                     "upload_many(), defer off, every file on the host when it returns;"
                     " encrypted: one age ciphertext per file (its own X25519 stanza);"
                     " fsync off, redundancy 1",
                     samples={"ours": rates["encrypted"], "baseline": rates["plain"]})]

