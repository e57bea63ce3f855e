"""File helpers: atomic writes, and copying while hashing.

Every write into the cache and every download goes through here:
temp file (same filesystem as the target) → write → fsync → ``os.replace``
→ fsync of the directory. On any error the temp file is unlinked, so a
partial file never takes the target's name.
"""

import contextlib
import contextvars
import errno
import functools
import os
import queue
import re
import stat
import sys
import threading
from typing import TYPE_CHECKING, Optional, Tuple, Union

from . import meter

if TYPE_CHECKING:
    import hashlib

#: Read size for copying and hashing. Large enough that hashlib releases the
#: GIL and syscalls are few; small enough to stay in cache.
CHUNK = 1 << 20

#: Regular files at least this large are copied by a pipeline: a thread reads
#: and writes while the caller hashes. Below it, a thread costs more than it saves.
PIPELINE_MIN = 8 << 20
#: Buffers in flight in the pipeline: how far reading and writing may run
#: ahead of hashing.
PIPELINE_DEPTH = 8
#: The pipeline writes back its destination in windows of this many bytes,
#: and drops a window from the page cache once it is on disk, this many
#: windows behind: a large copy streams through a bounded part of memory
#: and leaves little for the final fsync.
WRITEBACK_WINDOW = 16 << 20
WRITEBACK_LAG = 2

#: Mode of files and directories the library creates (private by default).
FILE_MODE = 0o600
DIR_MODE = 0o700



def sha256(data: bytes = b"") -> "hashlib._Hash":
    """A new SHA-256 digest object (:func:`hashlib.sha256`), fed ``data``.

    hashlib is imported on first use: it starts OpenSSL, a few milliseconds
    that ``import cloudmanager`` (and a command that hashes nothing) need not pay.

    >>> sha256(b"abc").hexdigest()[:16]
    'ba7816bf8f01cfea'
    """
    import hashlib

    return hashlib.sha256(data)


def random_hex(nbytes: int) -> str:
    """``nbytes`` random bytes from the OS, in hex: what :func:`secrets.token_hex`
    gives, without loading :mod:`secrets` (which loads hmac and OpenSSL).

    >>> len(random_hex(6))
    12
    """
    return os.urandom(nbytes).hex()

def open_temp(directory, prefix, readable=False):
    """Create a new, empty, private temp file in ``directory``.

    :param readable: open it for reading too (``O_RDWR``), not only writing
    :return: ``(fd, path)``; the caller owns both
    """
    access = os.O_RDWR if readable else os.O_WRONLY
    for _ in range(100):
        path = os.path.join(directory, "%s%s.tmp" % (prefix, random_hex(6)))
        try:
            fd = os.open(path, access | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         FILE_MODE)
        except FileExistsError:
            continue
        return fd, path
    raise FileExistsError("cannot create a temp file in %s" % directory)


def _temp_beside(final_path, readable=False):
    """:func:`open_temp` in ``final_path``'s directory, named after it (hidden)."""
    return open_temp(os.path.dirname(os.path.abspath(final_path)),
                     ".%s." % os.path.basename(final_path)[:40], readable)


def fsync_dir(directory):
    """Flush a directory entry change (a rename or create) to disk."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp_path, final_path, fsync=True, replace=True):
    """Atomically give ``temp_path`` the name ``final_path``.

    :param replace: if False, never replace a file named ``final_path``:
        :class:`FileExistsError` if one is there, even one that appeared a
        moment ago (a hard link, made only if the name is free; on a file
        system without hard links, a check just before the rename)
    """
    if replace:
        os.replace(temp_path, final_path)
    else:
        try:
            os.link(temp_path, final_path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (FAT, some FUSE file systems)
            if os.path.lexists(final_path):
                raise FileExistsError(errno.EEXIST, "file exists", final_path) from None
            os.replace(temp_path, final_path)
        else:
            os.unlink(temp_path)
    if fsync:
        fsync_dir(os.path.dirname(final_path))


def remove_quietly(path):
    """Unlink a file if it exists; never follows or raises on a missing one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _chunks(f, size=None):
    """Yield memoryviews of successive reads of a binary file object, reusing one buffer.

    A stream without ``readinto`` (a network response body) is read in chunks.

    :param size: the expected size, when known: a small file gets a small
        buffer (one byte more than its size, so that growth is still seen)
    """
    if not hasattr(f, "readinto"):
        while True:
            data = f.read(CHUNK)
            if not data:
                return
            yield memoryview(data)
    buf = bytearray(CHUNK if size is None else max(1, min(CHUNK, size + 1)))
    view = memoryview(buf)
    while True:
        n = f.readinto(buf)
        if not n:
            return
        yield view[:n]


def _regular_size(f):
    """The size of a regular file behind a file object, or None (a pipe, a stream)."""
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def write_all(fd, data):
    """``os.write`` until every byte of ``data`` is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy_and_hash(src, dst_fd, limit=None, hashing=True, progress=None, length=None):
    """Copy a readable binary file object into ``dst_fd``, hashing as it goes.

    The source is read exactly once, and the digest is of exactly the bytes
    written. A regular file of :data:`PIPELINE_MIN` bytes or more, or a
    stream with ``readinto`` that announces as many (``length``), is copied
    by a pipeline (see :func:`_copy_pipelined`): reading and writing overlap
    with hashing, so the copy costs little more than the hash, and the
    destination streams through a bounded window of the page cache.

    :param limit: stop with :class:`OverflowError` once more than this many
        bytes have been read (the source grew, or a host sent too much)
    :param hashing: False to only copy (the digest returned is then None)
    :param progress: called with the number of bytes of each chunk copied
    :param length: the size a stream announced (an HTTP ``Content-Length``),
        for a source that is not a regular file: it only chooses how the
        bytes are copied; ``limit`` is what bounds them
    :return: ``(sha256_hex, nbytes)``
    :raises OverflowError: past ``limit``; ``OSError`` from reading or writing
    """
    size = None
    if hasattr(src, "readinto"):
        size = _regular_size(src)
        if size is None:
            size = length
    if hashing and size is not None and size >= PIPELINE_MIN:
        return _copy_pipelined(src, dst_fd, limit, progress)
    digest = sha256() if hashing else None
    total = 0
    for chunk in _chunks(src, size):
        total += len(chunk)
        if limit is not None and total > limit:
            raise OverflowError("more than %d bytes" % limit)
        if digest is not None:
            digest.update(chunk)
        write_all(dst_fd, chunk)
        meter.tick(len(chunk))  # a host transfer's progress and bandwidth limit
        if progress is not None:
            progress(len(chunk))
    return (digest.hexdigest() if digest is not None else None), total


class _End:
    """The type of :data:`_END`, so that the copy thread's items are told apart by type."""


#: What the copy thread of :func:`_copy_pipelined` sends after the last chunk.
_END = _End()


def _copy_pipelined(src, dst_fd, limit, progress=None):
    """Copy and hash with reading and writing in a thread, hashing in the caller's.

    hashlib and the file syscalls release the GIL, so on two cores the copy
    hides behind the hash. The I/O thread reads a chunk into a free buffer,
    writes it, and hands it to the caller, who hashes it and gives the buffer
    back; :data:`PIPELINE_DEPTH` buffers bound how far it runs ahead. Buffers
    are hashed in read order, so the digest is of exactly the bytes written.

    Written windows are sent to disk and then dropped from the page cache
    (:class:`_WriteBehind`): a copy larger than memory does not push out the
    pages other work needs, and new pages are recycled rather than found
    afresh (which on some virtual machines costs more than the write: on
    this project's 2-vCPU VM, 1 GiB written into kept pages took 3.5-5.6 s,
    through recycled ones 0.55 s, and a read back of the dropped pages
    0.6-2.3 s, so they are dropped even when the file is read again next).

    An error on either side stops both: an I/O error is raised in the caller,
    and a caller's exception (KeyboardInterrupt included) stops the thread
    before this returns, so the caller may then close and remove the
    destination.
    """
    # Empty buffers; None tells the I/O thread to stop.
    free: queue.SimpleQueue[Optional[bytearray]] = queue.SimpleQueue()
    # (buffer, n) written, to hash; _END; or an exception.
    full: queue.SimpleQueue[Union[Tuple[bytearray, int], _End, BaseException]] = \
        queue.SimpleQueue()
    for _ in range(PIPELINE_DEPTH):
        free.put(bytearray(CHUNK))
    stop = threading.Event()

    def pump():
        total = 0
        behind = _WriteBehind(dst_fd)
        try:
            while not stop.is_set():
                buf = free.get()
                if buf is None:
                    return
                n = src.readinto(buf)
                if not n:
                    break
                total += n
                if limit is not None and total > limit:
                    raise OverflowError("more than %d bytes" % limit)
                write_all(dst_fd, memoryview(buf)[:n])
                behind.wrote(total)
                full.put((buf, n))
            full.put(_END)
        except BaseException as exc:  # handed to the caller, who raises it
            full.put(exc)

    worker = threading.Thread(target=pump, name="cloudmanager-copy", daemon=True)
    digest = sha256()
    total = 0
    worker.start()
    try:
        while True:
            item = full.get()
            if isinstance(item, _End):
                break
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            digest.update(memoryview(buf)[:n])
            total += n
            free.put(buf)
            meter.tick(n)  # here, not in the I/O thread: the meter is this thread's
            if progress is not None:
                progress(n)
    finally:
        stop.set()
        free.put(None)  # wakes the thread if it waits for a buffer
        worker.join()
    return digest.hexdigest(), total


class _WriteBehind:
    """Write a file back to disk behind a sequential writer, and drop what is on disk.

    Every :data:`WRITEBACK_WINDOW` bytes, writeback of the new window starts
    (without waiting); the window :data:`WRITEBACK_LAG` windows back is then
    waited for and dropped from the page cache. Only hints: durability still
    comes from the caller's fsync. Linux only (``sync_file_range``); elsewhere,
    and on files that do not support it, it does nothing.
    """

    def __init__(self, fd):
        self.fd = fd
        self.start = 0
        self.windows = []
        self.sync = _sync_range()

    def wrote(self, total):
        if self.sync is None or total - self.start < WRITEBACK_WINDOW:
            return
        try:
            self.sync(self.fd, self.start, total - self.start, _SFR_WRITE)
            self.windows.append((self.start, total - self.start))
            self.start = total
            if len(self.windows) > WRITEBACK_LAG:
                offset, length = self.windows.pop(0)
                self.sync(self.fd, offset, length, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            self.sync = None  # not a file this works on: stop trying


_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


def _sync_range():
    """``sync_file_range(fd, offset, nbytes, flags)`` raising OSError, or None."""
    if not hasattr(os, "posix_fadvise"):
        return None
    return _libc("sync_file_range", "int", "longlong", "longlong", "uint")


@functools.cache
def sync_filesystem_available():
    """Whether :func:`sync_filesystem` works here: Linux 5.8 or later (``syncfs``
    reports write-back errors only since 5.8; before, it would hide them)."""
    if not sys.platform.startswith("linux"):
        return False
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if release is None or tuple(map(int, release.groups())) < (5, 8):
        return False
    return _libc("syncfs", "int") is not None


def sync_filesystem(path):
    """Write every change to the filesystem holding ``path`` to disk (``syncfs``).

    One flush for a whole batch of new files and renames, where an fsync of
    each would cost a flush apiece (measured here: 500 files of 4 KiB, 5-10 ms
    against 150 ms). It also writes back other programs' changes to that
    filesystem, so it suits batches of small files, not one large file.
    Check :func:`sync_filesystem_available` first.

    :raises OSError: if writing back failed
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _libc("syncfs", "int")(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc(name, *argtypes):
    """The C library's ``name`` as a function raising OSError when it returns
    non-zero, or None where there is no such function."""
    try:
        import ctypes  # only here: it costs start-up time, and few callers need it

        func = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (ImportError, OSError, AttributeError):
        return None
    func.argtypes = [getattr(ctypes, "c_" + t) for t in argtypes]
    func.restype = ctypes.c_int

    def call(*args):
        if func(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return call


def hash_file(path):
    """Return ``(sha256_hex, size)`` of a file, reading it once."""
    digest = sha256()
    total = 0
    with open(path, "rb", buffering=0) as f:
        for chunk in _chunks(f):
            digest.update(chunk)
            total += len(chunk)
    return digest.hexdigest(), total


class HashingReader:
    """A forward-only view of a binary file that hashes every byte read through it.

    For a source streamed to a host (:meth:`~cloudmanager.hosts.base.Host.stage`):
    :meth:`hexdigest` is the SHA-256 of exactly the bytes handed out, in
    order. It cannot seek (:meth:`seekable` is False), so a reader such as
    boto3 buffers what it may send again instead of reading it twice.

    The first exception met (from the file, or :class:`OverflowError` past
    ``limit``) is kept in :attr:`error`, so that the caller can tell a
    failure of its source from the host's, whatever the host turned it into.

    >>> import io
    >>> reader = HashingReader(io.BytesIO(b"abc"), limit=3)
    >>> reader.read(2) + reader.read(), reader.count, reader.eof
    (b'abc', 3, True)
    >>> reader.hexdigest()[:16]
    'ba7816bf8f01cfea'

    :param raw: a readable binary file object, positioned at the first byte
    :param limit: refuse (:class:`OverflowError`) to hand out more than this
        many bytes: the source grew
    """

    def __init__(self, raw, limit: Optional[int] = None) -> None:
        self._raw = raw
        self._limit = limit
        self._digest = sha256()
        #: Bytes handed out so far.
        self.count = 0
        #: Whether the end of the file was reached.
        self.eof = False
        #: The first exception reading raised, if any.
        self.error: Optional[BaseException] = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        """The SHA-256 hex digest of the bytes read so far."""
        return self._digest.hexdigest()

    def read(self, size: Optional[int] = -1) -> bytes:
        """Up to ``size`` bytes (fewer only at the end); all the rest when negative."""
        chunks = []
        wanted = -1 if size is None or size < 0 else size
        got = 0
        while wanted < 0 or got < wanted:
            step = CHUNK if wanted < 0 else min(CHUNK, wanted - got)
            data = self._pass(self._raw.read, step)
            if not data:
                break
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def readinto(self, buffer) -> int:
        """Read into ``buffer``; return how many bytes (0 at the end)."""
        view = memoryview(buffer).cast("B")
        n = self._pass(self._raw.readinto, view)
        return n

    def _pass(self, method, arg):
        """One read from the file, hashed and counted; remembers its failure."""
        if self.error is not None:
            raise self.error
        try:
            result = method(arg)
            n = result if isinstance(result, int) else len(result or b"")
            if n == 0:
                self.eof = True
                return result
            if self._limit is not None and self.count + n > self._limit:
                raise OverflowError("more than the %d bytes expected" % self._limit)
        except BaseException as exc:
            self.error = exc
            raise
        chunk = arg[:n] if isinstance(result, int) else result
        self._digest.update(chunk)
        self.count += n
        meter.tick(n)  # a staged upload's progress and bandwidth limit
        return result


def copy_file(src_path, final_path, fsync=True):
    """Copy a file to ``final_path`` atomically, the bytes moved by the kernel.

    Like :func:`atomic_write` (a temp file beside ``final_path``, fsync,
    rename) with a few syscalls in all, which matters when the files are
    small and many: ``sendfile`` where the platform has it, else reads and
    writes through one buffer.
    """
    temp = copy_to_temp(src_path, final_path, fsync)
    try:
        publish(temp, final_path, fsync)
    except BaseException:
        remove_quietly(temp)
        raise


def copy_to_temp(src_path, final_path, fsync=True):
    """The first half of :func:`copy_file`: copy to a new temp file beside
    ``final_path`` (fsynced if ``fsync``) and return its path, for the
    caller to :func:`publish` or remove."""
    src = os.open(src_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        fd, temp = _temp_beside(final_path)
        try:
            try:
                kernel_copy(src, fd)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            remove_quietly(temp)
            raise
    finally:
        os.close(src)
    return temp


def kernel_copy(src_fd: int, dst_fd: int) -> None:
    """Copy from ``src_fd``'s start to its end into ``dst_fd``: ``sendfile``
    where the platform has it (no pass through this process), else a buffer."""
    sendfile = getattr(os, "sendfile", None)
    if sendfile is not None and sys.platform.startswith("linux"):
        offset = 0
        while True:
            try:
                sent = sendfile(dst_fd, src_fd, offset, CHUNK)
            except OSError as exc:
                # A filesystem without splice support: copy through a buffer.
                if offset or exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                break
            if not sent:
                return
            offset += sent
            meter.tick(sent)
    while True:
        data = os.read(src_fd, CHUNK)
        if not data:
            return
        write_all(dst_fd, data)
        meter.tick(len(data))


#: Set by :func:`syncs_deferred`: whether this thread's :func:`atomic_write`
#: calls leave durability to their caller.
_SYNCS_DEFERRED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "cloudmanager_syncs_deferred", default=False)


@contextlib.contextmanager
def syncs_deferred():
    """Within the block (in this thread), :func:`atomic_write` neither fsyncs
    the file nor its directory: the caller makes a whole batch durable at
    once with :func:`sync_filesystem` before it depends on the files (a
    batch of downloads into the cache, see
    :meth:`cloudmanager.pool.Pool.warm_up_many`), where a host's download
    would flush each file and its directory."""
    token = _SYNCS_DEFERRED.set(True)
    try:
        yield
    finally:
        _SYNCS_DEFERRED.reset(token)


def syncs_are_deferred() -> bool:
    """Whether this thread runs within :func:`syncs_deferred` (a host that
    writes its files without :func:`atomic_write` obeys it through this)."""
    return _SYNCS_DEFERRED.get()


@contextlib.contextmanager
def atomic_write(final_path, fsync=True, readable=False):
    """Write ``final_path`` atomically: yields a binary file object on a temp file.

    The temp file sits in the same directory. On a clean exit it is flushed,
    fsynced and renamed over ``final_path``; on an exception it is removed.
    Inside :func:`syncs_deferred`, nothing is fsynced. With ``readable``,
    its descriptor can also be read (``os.pread``).
    """
    fsync = fsync and not _SYNCS_DEFERRED.get()
    fd, temp = _temp_beside(final_path, readable)
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


class HashingWriter:
    """A binary writer that hashes what it passes on to ``raw`` (a file object).

    >>> import io
    >>> out = io.BytesIO(); writer = HashingWriter(out, limit=4)
    >>> writer.write(b"abc"), writer.size, writer.digest.hexdigest()[:16]
    (3, 3, 'ba7816bf8f01cfea')

    The first exception a write raised is kept in :attr:`error`, so that a
    caller whose writer was driven by someone else (pyrage, which reports
    it as an error of its own) can raise it as it was.

    :param limit: refuse to pass on more than this many bytes (a recorded size)
    :param overflow: the exception class raised past ``limit``
        (:class:`~cloudmanager.errors.IntegrityError` when None)
    """

    def __init__(self, raw, limit: Optional[int] = None, overflow: Optional[type] = None) -> None:
        self.raw = raw
        self.limit = limit
        self.overflow = overflow
        #: The SHA-256 of the bytes written so far.
        self.digest = sha256()
        #: Bytes written so far.
        self.size = 0
        #: The first exception a write raised, if any.
        self.error: Optional[BaseException] = None

    def write(self, data) -> int:
        """Hash ``data`` and pass it on; :return: its length."""
        try:
            if self.limit is not None and self.size + len(data) > self.limit:
                if self.overflow is None:
                    from .errors import IntegrityError

                    raise IntegrityError("more than the %d bytes recorded" % self.limit)
                raise self.overflow("more than the %d bytes recorded" % self.limit)
            self.digest.update(data)
            self.size += len(data)
            self.raw.write(data)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise
        return len(data)

    def flush(self) -> None:
        """Flush ``raw``."""
        self.raw.flush()
