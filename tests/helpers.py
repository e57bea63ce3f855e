"""Small helpers shared by the test modules."""

import hashlib
import os


def sha(data):
    """The SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


class Reads:
    """Every file opened for reading, and every ``fsutil.hash_file`` call, from
    :func:`record_reads` on (directories, and opens for writing, are left out)."""

    def __init__(self):
        self.opened = []
        self.hashed = []

    def under(self, directory):
        """The recorded opens of paths inside ``directory``."""
        directory = os.path.join(os.path.abspath(directory), "")
        return [p for p in self.opened if os.path.abspath(p).startswith(directory)]


def record_reads(monkeypatch):
    """Record, through ``monkeypatch``, what is opened for reading (``open``,
    ``os.open``) and hashed by :func:`cloudmanager.fsutil.hash_file`.

    :return: a :class:`Reads`, filled as the test runs
    """
    import builtins

    from cloudmanager import fsutil

    reads = Reads()
    real_open, real_os_open, real_hash_file = builtins.open, os.open, fsutil.hash_file
    writing = os.O_WRONLY | os.O_RDWR | getattr(os, "O_DIRECTORY", 0)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and not set(mode) & set("wax+"):
            reads.opened.append(os.fsdecode(file))
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if not flags & writing:
            reads.opened.append(os.fsdecode(path))
        return real_os_open(path, flags, *args, **kwargs)

    def hash_file(path):
        reads.hashed.append(os.fsdecode(path))
        return real_hash_file(path)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(fsutil, "hash_file", hash_file)
    return reads
