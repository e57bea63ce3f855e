"""File helpers: atomic writes, and copying while hashing.

Every write into the cache and every download goes through here:
temp file (same filesystem as the target) → write → fsync → ``os.replace``
→ fsync of the directory. On any error the temp file is unlinked, so a
partial file never takes the target's name.
"""

import contextlib
import hashlib
import os
import secrets

#: Read size for copying and hashing. Large enough that hashlib releases the
#: GIL and syscalls are few; small enough to stay in cache.
CHUNK = 1 << 20

#: Mode of files and directories the library creates (private by default).
FILE_MODE = 0o600
DIR_MODE = 0o700


def open_temp(directory, prefix):
    """Create a new, empty, private temp file in ``directory``.

    :return: ``(fd, path)``; the caller owns both
    """
    for _ in range(100):
        path = os.path.join(directory, "%s%s.tmp" % (prefix, secrets.token_hex(6)))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         FILE_MODE)
        except FileExistsError:
            continue
        return fd, path
    raise FileExistsError("cannot create a temp file in %s" % directory)


def fsync_dir(directory):
    """Flush a directory entry change (a rename or create) to disk."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp_path, final_path, fsync=True):
    """Atomically give ``temp_path`` the name ``final_path``."""
    os.replace(temp_path, final_path)
    if fsync:
        fsync_dir(os.path.dirname(final_path))


def remove_quietly(path):
    """Unlink a file if it exists; never follows or raises on a missing one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _chunks(f):
    """Yield memoryviews of successive reads of a binary file object, reusing one buffer.

    A stream without ``readinto`` (a network response body) is read in chunks.
    """
    if not hasattr(f, "readinto"):
        while True:
            data = f.read(CHUNK)
            if not data:
                return
            yield memoryview(data)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = f.readinto(buf)
        if not n:
            return
        yield view[:n]


def copy_and_hash(src, dst_fd, limit=None, hashing=True):
    """Copy a readable binary file object into ``dst_fd``, hashing as it goes.

    The source is read exactly once.

    :param limit: stop with :class:`OverflowError` once more than this many
        bytes have been read (the source grew, or a host sent too much)
    :param hashing: False to only copy (the digest returned is then None)
    :return: ``(sha256_hex, nbytes)``
    """
    digest = hashlib.sha256() if hashing else None
    total = 0
    for chunk in _chunks(src):
        total += len(chunk)
        if limit is not None and total > limit:
            raise OverflowError("more than %d bytes" % limit)
        if digest is not None:
            digest.update(chunk)
        while chunk:
            written = os.write(dst_fd, chunk)
            chunk = chunk[written:]
    return (digest.hexdigest() if digest is not None else None), total


def hash_file(path):
    """Return ``(sha256_hex, size)`` of a file, reading it once."""
    digest = hashlib.sha256()
    total = 0
    with open(path, "rb", buffering=0) as f:
        for chunk in _chunks(f):
            digest.update(chunk)
            total += len(chunk)
    return digest.hexdigest(), total


@contextlib.contextmanager
def atomic_write(final_path, fsync=True):
    """Write ``final_path`` atomically: yields a binary file object on a temp file.

    The temp file sits in the same directory. On a clean exit it is flushed,
    fsynced and renamed over ``final_path``; on an exception it is removed.
    """
    directory = os.path.dirname(os.path.abspath(final_path))
    fd, temp = open_temp(directory, ".%s." % os.path.basename(final_path)[:40])
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        publish(temp, final_path, fsync)
    except BaseException:
        remove_quietly(temp)
        raise
