"""A rebuild of the original (2014) cloud-manager's ingest, as a baseline.

Not its code: its design, as its README and our DESIGN.md describe it.

- ``upload(path)`` reads the file twice: once to hash it, once to copy it
  into the storage directory (flat, one file per hash).
- The space in use is found by walking the storage directory and adding up
  file sizes, on every upload.
- Each file's row is inserted in autocommit mode with SQLite's default
  rollback journal: one commit, with its syncs, per file.
- With a host folder, the copy to the host is a third read (the original
  handed the path to plowshare-wrapper, which ran ``plowup`` on it).
"""

import hashlib
import os
import shutil
import sqlite3

CHUNK = 1 << 20


def sha256_file(path):
    """The original's first pass: hash the whole file."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def copy_file(src, dst, fsync=False):
    """The original's second pass: copy the file (``shutil.copyfile``, as ``cp``)."""
    shutil.copyfile(src, dst)
    if fsync:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def two_pass(src, dst, fsync=False):
    """Hash, then copy: the original's ingest of one file."""
    digest = sha256_file(src)
    copy_file(src, dst, fsync)
    return digest


class OriginalPool:
    """The original design's pool: flat storage, a walk per upload, a commit per file."""

    def __init__(self, database_path, storage_path, capacity, host_dir=None):
        self.storage = storage_path
        self.capacity = capacity
        self.host_dir = host_dir
        os.makedirs(storage_path, exist_ok=True)
        if host_dir:
            os.makedirs(host_dir, exist_ok=True)
        self.conn = sqlite3.connect(database_path, isolation_level=None)  # autocommit
        self.conn.execute("CREATE TABLE IF NOT EXISTS files (hash TEXT PRIMARY KEY,"
                          " name TEXT, size INTEGER, is_cached INTEGER)")

    def used(self):
        """Bytes in the storage directory, by walking it (as the original did)."""
        total = 0
        for directory, _, names in os.walk(self.storage):
            for name in names:
                total += os.path.getsize(os.path.join(directory, name))
        return total

    def upload(self, path):
        file_hash = sha256_file(path)
        if self.conn.execute("SELECT 1 FROM files WHERE hash = ?", (file_hash,)).fetchone():
            return False
        size = os.path.getsize(path)
        if self.used() + size > self.capacity:
            return False
        if self.host_dir:
            shutil.copyfile(path, os.path.join(self.host_dir, file_hash))
        shutil.copyfile(path, os.path.join(self.storage, file_hash))
        self.conn.execute("INSERT INTO files (hash, name, size, is_cached) VALUES (?, ?, ?, 1)",
                          (file_hash, os.path.basename(path), size))
        return file_hash

    def close(self):
        self.conn.close()
