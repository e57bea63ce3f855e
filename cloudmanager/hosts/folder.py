"""A folder host: copies live as files in a local or mounted directory.

Spec: ``dir:/absolute/path`` or ``file:///absolute/path``. Objects are stored
as ``ROOT/<hash>`` and recorded with ``file://`` URLs. It needs no account and
no server, so it is the default for demos and tests, and it suits a NAS or a
USB disk.

The root must exist: the host never creates it, since a missing root is most
often a disk that is not mounted, and copies made in its place would land on
the wrong disk. The first successful write leaves a marker file
(:attr:`FolderHost.MARKER_NAME`) in the root. Once the pool has recorded
copies on a folder it sets :attr:`FolderHost.require_marker`: a root without
the marker is then an empty mount point, an outage, not a folder whose every
copy is lost.
"""

import logging
import os
import stat
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import quote, unquote_to_bytes, urlsplit

from .. import fsutil, meter
from ..errors import (
    HostError,
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    PermanentHostError,
    TransientHostError,
)
from ..validation import check_url, is_hash
from .base import (
    STAGING_PREFIX, Host, HostStream, ListedObject, Location, ObjectInfo, PathLike, Received,
    Staged, Stream, check_name_prefix,
)

log = logging.getLogger(__name__)

#: Objects of this many bytes or more are copied by :meth:`FolderHost.download`
#: within a batch (in chunks, pipelined when large) rather than in one read.
BATCH_READ_MAX = 1 << 20

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: How a batch creates a destination: new, private, never through a symlink.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | _CLOEXEC

#: What the marker file says, for whoever finds it.
MARKER_TEXT = (b"cloudmanager folder host\n"
               b"This folder holds the copies of a cloudmanager pool, one file per SHA-256.\n"
               b"Keep this file: without it the pool takes the folder for an unmounted disk.\n")


class FolderHost(Host):
    """Store copies in a directory.

    The root is never created: a missing root is an outage
    (:class:`~cloudmanager.errors.HostUnavailableError`) for every operation.
    The first successful upload writes the marker file :attr:`MARKER_NAME`
    into the root, so an existing empty folder given as a new host is
    simply adopted. :meth:`has_marker` tells whether it is there (one
    ``stat``).

    With :attr:`require_marker` set, a root without the marker is an outage
    too: download, stat, exists, list and delete raise
    :class:`~cloudmanager.errors.HostUnavailableError` (not
    :class:`~cloudmanager.errors.HostNotFoundError`), and uploads write
    nothing. The pool sets it once it has recorded copies on the host, so
    that an unmounted disk, whose empty mount point is still a folder, is
    not taken for a folder that lost every copy, nor filled with new ones.

    :param root: an absolute directory path; it must exist when used
    :param name: the host name recorded with uploads (default ``dir:ROOT``)
    :param fsync: fsync each stored file
    :param timeout: seconds one transfer may take (default: :attr:`Host.timeout`)
    :param max_connections: transfers at once (default: 4 with ``fsync``, 1
        without). Without fsync a folder transfer is a few syscalls run in
        this process (about 36 us for 4 KiB here): parallel ones only
        contend for the GIL. With fsync they overlap the waits on the disk.
    :param require_marker: treat a root without the marker as an outage
        (also settable later through the attribute)
    :raises InvalidInputError: if ``root`` is not an absolute path
    """

    can_delete = True
    can_check = True
    can_list = True
    can_batch = True
    can_mark = True
    can_stage = True
    can_stream = True

    #: The marker file written into the root on the first successful write.
    #: Its name is not a SHA-256, so it is never taken for an object.
    MARKER_NAME = ".cloudmanager-host"

    def __init__(self, root: PathLike, name: Optional[str] = None, fsync: bool = True,
                 timeout: Optional[float] = None, max_connections: Optional[int] = None,
                 require_marker: bool = False) -> None:
        root = os.fspath(root)
        if not os.path.isabs(root):
            raise InvalidInputError("a folder host needs an absolute path, not %r" % root)
        self.root: str = os.path.normpath(root)
        self.name = name or "dir:" + self.root
        self.fsync = fsync
        #: What the URL of every object of this folder starts with.
        self._url_root: str = self._location(os.path.join(self.root, "")).url
        #: The marker file's path.
        self.marker_path: str = os.path.join(self.root, self.MARKER_NAME)
        #: Whether a root without the marker is an outage. The pool sets it
        #: once the catalog records copies on this host.
        self.require_marker: bool = bool(require_marker)
        if max_connections is not None:
            self.max_connections = max(1, int(max_connections))
        elif not fsync:
            self.max_connections = 1
        if timeout is not None:
            self.timeout = timeout

    @classmethod
    def from_spec(cls, scheme: str, target: str, **options: Any) -> "FolderHost":
        """Build from ``dir:/path`` or ``file:///path``.

        :param scheme: ``"dir"`` or ``"file"``
        :param target: what follows the scheme's ``:``
        :param options: keyword options of :class:`FolderHost`
        :return: a new :class:`FolderHost`
        :raises InvalidInputError: for a relative or remote path
        """
        if scheme == "file":
            parts = urlsplit("file:" + target)
            if parts.netloc not in ("", "localhost"):
                raise InvalidInputError("file: host spec must be local: %r" % target)
            target = os.fsdecode(unquote_to_bytes(parts.path))
        return cls(target, **options)

    # -- the root and its marker ----------------------------------------------

    def has_marker(self) -> bool:
        """Whether the marker file is in the root.

        One ``stat``: cheap enough to ask before each operation. The pool
        can ask it to decide when to set :attr:`require_marker`.

        :return: True if :attr:`marker_path` is a regular file
        """
        try:
            return stat.S_ISREG(os.stat(self.marker_path).st_mode)
        except OSError:  # no root, no marker, or no access: not marked
            return False

    def mark(self) -> None:
        """Write the marker into the existing root, if it is not there yet.

        For a folder that holds copies from before markers existed: once the
        pool has checked that the folder holds copies it recorded (so the
        right disk is mounted), it marks it and then sets
        :attr:`require_marker`. Uploads mark the root by themselves.

        :raises HostUnavailableError: if the root is missing (it is never created)
        :raises TransientHostError: if the marker cannot be written
        """
        if self.has_marker():
            return
        if not os.path.isdir(self.root):
            raise HostUnavailableError(self.name, "the folder %s is missing (not mounted?)"
                                       % self.root)
        try:
            self._write_marker(self.fsync)
        except OSError as exc:
            raise (self._outage() or TransientHostError(
                self.name, "cannot write the marker into %s: %s" % (self.root, exc))) from exc

    def _outage(self) -> Optional[HostUnavailableError]:
        """The outage that explains a failure in the root, or None if the root looks fine."""
        if not os.path.isdir(self.root):
            return HostUnavailableError(self.name, "the folder %s is missing (not mounted?)"
                                        % self.root)
        if self.require_marker and not self.has_marker():
            return HostUnavailableError(
                self.name, "the folder %s has no %s marker: it looks unmounted or emptied"
                % (self.root, self.MARKER_NAME))
        return None

    def _check_marker(self) -> None:
        """With :attr:`require_marker`, refuse to work in a root without its marker."""
        if self.require_marker and not self.has_marker():
            outage = self._outage()
            if outage is not None:  # else the marker came back meanwhile
                raise outage

    def _before_write(self) -> bool:
        """Check that the root may be written; return whether it is marked already.

        :raises HostUnavailableError: if the root is missing, or unmarked
            while :attr:`require_marker` is set
        """
        if self.has_marker():
            return True
        outage = self._outage()
        if outage is not None:
            raise outage
        return False

    def _write_marker(self, fsync: bool) -> None:
        """Write the marker file atomically (several writers at once are harmless)."""
        with fsutil.atomic_write(self.marker_path, fsync) as f:
            f.write(MARKER_TEXT)
        log.info("%s: marked %s as a cloudmanager folder (%s)", self.name, self.root,
                 self.MARKER_NAME)

    # -- names and URLs ---------------------------------------------------------

    def _object_path(self, name: str) -> str:
        if not is_hash(name):
            raise InvalidInputError("folder objects are named by SHA-256, not %r" % (name,))
        return os.path.join(self.root, name)

    def _path_of(self, url: object) -> str:
        # The URLs this host makes (its own root, quoted, then a SHA-256):
        # a prefix and a name check, without parsing (a warm-up of many
        # files asks for every one of them twice).
        if isinstance(url, str) and url.startswith(self._url_root):
            name = url[len(self._url_root):]
            if is_hash(name):
                return os.path.join(self.root, name)
        checked: str = check_url(url, schemes={"file"})  # refuses a non-string too
        path = os.path.normpath(os.fsdecode(unquote_to_bytes(urlsplit(checked).path)))
        if os.path.dirname(path) != self.root or not is_hash(os.path.basename(path)):
            raise PermanentHostError(self.name, "URL is not an object of this folder: %s" % url)
        return path

    def _failed(self, action: str, url: str, exc: OSError) -> HostError:
        """The HostError for an OSError met while reading the object at ``url``."""
        # An unmounted disk or a renamed share is an outage, not a lost copy:
        # it must not get every copy on it marked bad.
        outage = self._outage()
        if outage is not None:
            return outage
        if isinstance(exc, FileNotFoundError):
            return HostNotFoundError(self.name, "no object at %s" % url)
        return TransientHostError(self.name, "cannot %s %s: %s" % (action, url, exc))

    def accepts(self, url: object) -> bool:
        """Whether ``url`` names an object in this folder.

        :param url: any recorded URL
        :return: True for a ``file://`` URL of a SHA-256 named file directly in the root
        """
        try:
            self._path_of(url)
        except (InvalidInputError, PermanentHostError):
            return False
        return True

    # -- operations ---------------------------------------------------------------

    def upload(self, local_path: PathLike, name: str) -> Location:
        """Copy ``local_path`` to ``ROOT/name`` atomically.

        The first successful upload into an unmarked root writes the marker.

        :param local_path: a readable local file
        :param name: the object's name, a SHA-256 hex digest
        :return: the :class:`Location` of the copy
        :raises InvalidInputError: if ``name`` is not a SHA-256 hex digest
        :raises HostUnavailableError: if the root is missing, or unmarked
            while :attr:`require_marker` is set (nothing is written)
        :raises TransientHostError: if the copy failed
        """
        dest = self._object_path(name)
        marked = self._before_write()
        try:
            fsutil.copy_file(local_path, dest, self.fsync)
            if not marked:
                self._write_marker(self.fsync)
        except OSError as exc:
            raise self._store_failed(name, exc) from exc
        return self._location(dest)

    def upload_batch(self, items: Sequence[Tuple[PathLike, str]]
                     ) -> List[Union[Location, HostError]]:
        """:meth:`upload` several files, made durable together.

        With fsync, where Linux has ``syncfs``, every file is copied to its
        temp file first, one filesystem sync makes them all durable, they are
        renamed into place, and a second sync makes the renames durable: two
        flushes for the batch instead of two per file. Otherwise it is
        :meth:`upload` file by file.

        :param items: ``[(local_path, name)]``
        :return: per item, in order: its :class:`Location`, or the
            :class:`~cloudmanager.errors.HostError` that stopped it (a failed
            sync fails every file of the batch; a missing or, with
            :attr:`require_marker`, unmarked root fails them all as
            :class:`~cloudmanager.errors.HostUnavailableError`)
        :raises InvalidInputError: if a name is not a SHA-256 hex digest
        """
        if not (self.fsync and fsutil.sync_filesystem_available()):
            return super().upload_batch(items)
        try:
            marked = self._before_write()
        except HostUnavailableError as exc:
            return [exc] * len(items)
        results: List[Union[Location, HostError, None]] = [None] * len(items)
        temps = {}  # index -> (temp, dest), until renamed
        try:
            for i, (local_path, name) in enumerate(items):
                dest = self._object_path(name)
                try:
                    temps[i] = (fsutil.copy_to_temp(local_path, dest, False), dest)
                except OSError as exc:
                    results[i] = self._store_failed(name, exc)
            if temps:
                fsutil.sync_filesystem(self.root)  # the bytes, before any name points at them
                if not marked:
                    self._write_marker(fsync=False)  # made durable by the second sync
                for i in sorted(temps):
                    temp, dest = temps[i]
                    fsutil.publish(temp, dest, fsync=False)
                    del temps[i]  # renamed: no longer a temp to remove
                    results[i] = self._location(dest)
                fsutil.sync_filesystem(self.root)  # the renames
        except OSError as exc:  # no file of the batch is known to be safe
            failure = self._store_failed("a batch of %d files" % len(items), exc)
            return [failure if r is None or isinstance(r, Location) else r for r in results]
        finally:
            for temp, _ in temps.values():
                fsutil.remove_quietly(temp)
        # Every item has its Location or its error by now.
        return [r for r in results if r is not None]

    def stage(self, stream: Stream, size: int) -> Staged:
        """Write ``stream`` to a new staging file in the root, fsynced.

        The staging file (``ROOT/.cloudmanager-staging-<random>.tmp``) is in
        the root itself, so :meth:`Staged.publish` is one rename on the same
        filesystem (and an fsync of the root), and it is never listed: its
        name is not a SHA-256. The root follows the upload rules: it is
        never created, and with :attr:`require_marker` it must hold the
        marker. The marker is written by the first publish.

        :param stream: the bytes, read once to their end
        :param size: the bytes expected (unused: the caller checks)
        :return: the :class:`~cloudmanager.hosts.base.Staged` file
        :raises HostUnavailableError: if the root is missing, or unmarked
            while :attr:`require_marker` is set (nothing is written)
        :raises TransientHostError: if the file could not be written (it is
            removed); an exception of ``stream`` itself comes out as it is
        """
        self._before_write()
        try:
            fd, temp = fsutil.open_temp(self.root, STAGING_PREFIX)
        except OSError as exc:
            raise self._store_failed("a staged file", exc) from exc
        try:
            try:
                fsutil.copy_and_hash(stream, fd, hashing=False)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            fsutil.remove_quietly(temp)
            raise self._store_failed("a staged file", exc) from exc
        except BaseException:
            fsutil.remove_quietly(temp)
            raise
        return _FolderStaged(self, temp)

    def _store_failed(self, what: str, exc: OSError) -> HostError:
        # A root that went away mid-copy is an outage, like one missing before.
        outage = self._outage()
        if outage is not None:
            return outage
        return TransientHostError(self.name, "cannot store %s: %s" % (what, exc))

    def _location(self, path: str) -> Location:
        # fsencode: a root that is not valid UTF-8 still gets an exact URL
        return Location(self.name, "file://" + quote(os.fsencode(path)))

    def download(self, url: str, dest_path: PathLike,
                 max_bytes: Optional[int] = None) -> Received:
        """Copy the object to ``dest_path`` atomically, stopping past ``max_bytes``.

        :param url: a ``file://`` URL this host :meth:`accepts`
        :param dest_path: the destination file; replaced only on success
        :param max_bytes: the expected size; a larger object is refused
        :return: the SHA-256 and size of the bytes copied, hashed as they were
            read (:meth:`~cloudmanager.hosts.base.Host.receive`)
        :raises PermanentHostError: if ``url`` is not an object of this folder
        :raises HostUnavailableError: if the root is missing, or unmarked
            while :attr:`require_marker` is set
        :raises HostNotFoundError: if the object is not there
        :raises TransientHostError: if it is larger than ``max_bytes``, or
            the copy failed
        """
        src = self._open_object(url)
        # Errors from here on are about the destination or the copy, not a
        # missing object: they must not get a good copy marked bad.
        with src:
            return self.receive(src, url, dest_path, max_bytes, self.fsync)

    def open_stream(self, url: str, max_bytes: Optional[int] = None) -> HostStream:
        """The object's file, open for reading; see :meth:`Host.open_stream`.

        :raises TransientHostError: if it is larger than ``max_bytes``
        :raises HostError: as :meth:`download` does, for opening it
        """
        src = self._open_object(url)
        try:
            size = os.fstat(src.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise TransientHostError(self.name, "%s is %d bytes, more than the %d expected"
                                         % (url, size, max_bytes))
        except BaseException:
            src.close()
            raise
        return HostStream(src, self.name, url)

    def _open_object(self, url: str) -> Any:
        """The object's file, open for reading."""
        path = self._path_of(url)
        self._check_marker()
        try:
            return open(path, "rb")
        except OSError as exc:
            raise self._failed("read", url, exc) from exc

    def download_batch(self, items: Sequence[Tuple[str, str, Optional[int]]],
                       landed: Optional[Callable[[int, Union[Received, None, HostError]],
                                                 None]] = None
                       ) -> List[Union[Received, None, HostError]]:
        """:meth:`download` several objects, each written in place; see
        :meth:`Host.download_batch`.

        A tight loop for many small files: per object, an open, a read of
        its bytes (one read for a small file) hashed as they are written to
        ``dest_path``, created new (``O_EXCL``, never through a symlink).
        With fsync each file and its directory are flushed; within
        :func:`~cloudmanager.fsutil.syncs_deferred`, nothing is. An object
        of :data:`BATCH_READ_MAX` bytes or more (or of no expected size)
        goes through :meth:`download`.

        :param items: ``[(url, dest_path, max_bytes)]``
        :param landed: see :meth:`Host.download_batch`
        :return: per item, in order: the :class:`Received` SHA-256 and size
            of what was written, or the HostError that stopped it
            (:class:`~cloudmanager.errors.HostNotFoundError` for a missing
            object; :class:`~cloudmanager.errors.HostUnavailableError` for
            all of them if the root is missing, or unmarked while
            :attr:`require_marker` is set; a ``PermanentHostError`` for a
            URL not of this folder; a TransientHostError for an object
            larger than ``max_bytes`` or a failed copy, whose partial file
            is removed)
        """
        try:
            self._check_marker()
        except HostUnavailableError as exc:
            outage: List[Union[Received, None, HostError]] = [exc] * len(items)
            if landed is not None:
                for k in range(len(items)):
                    landed(k, exc)
            return outage
        fsync = self.fsync and not fsutil.syncs_are_deferred()
        results: List[Union[Received, None, HostError]] = []
        for k, (url, dest_path, max_bytes) in enumerate(items):
            results.append(self._fetch_one(url, dest_path, max_bytes, fsync))
            if landed is not None:
                landed(k, results[-1])
        return results

    def _fetch_one(self, url: str, dest_path: str, max_bytes: Optional[int],
                   fsync: bool) -> Union[Received, None, HostError]:
        """One item of :meth:`download_batch`: its outcome."""
        if max_bytes is None or max_bytes >= BATCH_READ_MAX:
            try:
                return self.download(url, dest_path, max_bytes)
            except HostError as exc:
                return exc
        try:
            path = self._path_of(url)
            src = os.open(path, os.O_RDONLY | _CLOEXEC)
        except PermanentHostError as exc:
            return exc
        except InvalidInputError as exc:
            return PermanentHostError(self.name, str(exc))
        except OSError as exc:
            return self._failed("read", url, exc)
        try:
            return self._copy_small(src, url, dest_path, max_bytes, fsync)
        finally:
            os.close(src)

    def _copy_small(self, src: int, url: str, dest_path: str, max_bytes: int,
                    fsync: bool) -> Union[Received, HostError]:
        """Copy the open object ``src`` (at most ``max_bytes`` bytes) into a
        new file at ``dest_path``, hashing it: its :class:`Received`, or the
        TransientHostError that stopped it (its partial file removed)."""
        try:
            # One read more than expected tells an object that grew.
            data = os.read(src, max_bytes + 1)
            while 0 < len(data) <= max_bytes:
                more = os.read(src, max_bytes + 1 - len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            return TransientHostError(self.name, "cannot copy %s: %s" % (url, exc))
        if len(data) > max_bytes:
            return TransientHostError(self.name, "%s is larger than the %s bytes expected"
                                      % (url, max_bytes))
        try:
            dst = os.open(dest_path, _NEW_FILE, fsutil.FILE_MODE)
        except OSError as exc:
            return TransientHostError(self.name, "cannot copy %s: %s" % (url, exc))
        try:
            try:
                fsutil.write_all(dst, data)
                if fsync:
                    os.fsync(dst)
            finally:
                os.close(dst)
            if fsync:
                fsutil.fsync_dir(os.path.dirname(os.path.abspath(dest_path)))
        except OSError as exc:
            fsutil.remove_quietly(dest_path)
            return TransientHostError(self.name, "cannot copy %s: %s" % (url, exc))
        except BaseException:
            fsutil.remove_quietly(dest_path)
            raise
        meter.tick(len(data))  # the transfer's progress and bandwidth limit
        return Received(fsutil.sha256(data).hexdigest(), len(data))

    def find(self, name: str) -> Optional[Tuple[Location, ObjectInfo]]:
        """The object file ``ROOT/name``, if there; see :meth:`Host.find`.

        :raises InvalidInputError: if ``name`` is not a SHA-256 hex digest
        :raises HostUnavailableError: if the root is missing, or unmarked
            while :attr:`require_marker` is set
        :raises TransientHostError: if it cannot be looked at
        """
        path = self._object_path(name)
        self._check_marker()
        location = self._location(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._failed("stat", location.url, exc) from exc
        return location, ObjectInfo(st.st_size)

    def stat(self, url: str) -> ObjectInfo:
        """The object file's size.

        :param url: a ``file://`` URL this host :meth:`accepts`
        :return: an :class:`ObjectInfo` (a folder keeps no checksum)
        :raises PermanentHostError: if ``url`` is not an object of this folder
        :raises HostUnavailableError: if the root is missing, or unmarked
            while :attr:`require_marker` is set
        :raises HostNotFoundError: if the object is not there
        :raises TransientHostError: on any other failure
        """
        path = self._path_of(url)
        self._check_marker()
        try:
            st = os.stat(path)
        except OSError as exc:
            raise self._failed("stat", url, exc) from exc
        return ObjectInfo(st.st_size)

    def delete(self, url: str) -> None:
        """Remove the object file (a missing one is not an error).

        :param url: a ``file://`` URL this host :meth:`accepts`
        :raises PermanentHostError: if ``url`` is not an object of this folder
        :raises HostUnavailableError: if the root is missing, or unmarked
            while :attr:`require_marker` is set
        :raises TransientHostError: if the file could not be removed
        """
        path = self._path_of(url)
        self._check_marker()
        try:
            os.unlink(path)
        except OSError as exc:
            error = self._failed("delete", url, exc)
            if not isinstance(error, HostNotFoundError):
                raise error from exc

    def list(self) -> Iterator[Tuple[str, int]]:
        """Yield ``(hash, size)`` for each object file in the folder.

        The marker and any other file not named by a SHA-256 are skipped.

        :raises HostUnavailableError: if the root is missing, or unmarked
            while :attr:`require_marker` is set
        :raises TransientHostError: if the folder cannot be read
        """
        self._check_marker()
        try:
            entries = list(os.scandir(self.root))
        except OSError as exc:
            raise (self._outage() or TransientHostError(
                self.name, "cannot list %s: %s" % (self.root, exc))) from exc
        for entry in entries:
            if is_hash(entry.name) and entry.is_file(follow_symlinks=False):
                yield entry.name, entry.stat(follow_symlinks=False).st_size

    def list_objects(self, prefix: str = "") -> Iterator[ListedObject]:
        """Yield each object file of the folder whose name starts with
        ``prefix``, with its size (a folder keeps no checksum).

        One directory scan whatever the prefix (:attr:`list_narrows` is
        False); only regular files named by a SHA-256 are yielded, never
        the marker, a temp or staging file, a symlink or a subdirectory.

        :param prefix: lowercase hex digits
        :raises InvalidInputError: if ``prefix`` is not lowercase hex
        :raises HostUnavailableError: if the root is missing, or unmarked
            while :attr:`require_marker` is set
        :raises TransientHostError: if the folder cannot be read
        """
        check_name_prefix(prefix)
        self._check_marker()
        try:
            with os.scandir(self.root) as scan:
                for entry in scan:
                    if entry.name.startswith(prefix) and is_hash(entry.name) \
                            and entry.is_file(follow_symlinks=False):
                        yield ListedObject(entry.name, entry.stat(follow_symlinks=False).st_size)
        except OSError as exc:
            raise (self._outage() or TransientHostError(
                self.name, "cannot list %s: %s" % (self.root, exc))) from exc

    def listed_name(self, url: object) -> Optional[str]:
        """The object name of a ``file://`` URL of this folder, else None.

        :param url: any recorded URL (answered, never raised on)
        """
        try:
            return os.path.basename(self._path_of(url))
        except (InvalidInputError, PermanentHostError):
            return None


class _FolderStaged(Staged):
    """A staging file in a folder host's root: renamed into place by :meth:`publish`."""

    host: FolderHost

    def _publish(self, name: str) -> Location:
        host = self.host
        dest = host._object_path(name)
        marked = host._before_write()  # still mounted, still ours
        try:
            fsutil.publish(self.temp, dest, host.fsync)
            if not marked:
                host._write_marker(host.fsync)
        except OSError as exc:
            raise host._store_failed(name, exc) from exc
        return host._location(dest)

    def _discard(self) -> None:
        fsutil.remove_quietly(self.temp)
