"""A folder host: copies live as files in a local or mounted directory.

Spec: ``dir:/absolute/path`` or ``file:///absolute/path``. Objects are stored
as ``ROOT/<hash>`` and recorded with ``file://`` URLs. It needs no account and
no server, so it is the default for demos and tests, and it suits a NAS or a
USB disk.
"""

import os
from urllib.parse import quote, unquote_to_bytes, urlsplit

from .. import fsutil
from ..errors import (
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    PermanentHostError,
    TransientHostError,
)
from ..validation import check_url, is_hash
from .base import Host, Location, ObjectInfo


class FolderHost(Host):
    """Store copies in a directory.

    :param root: an absolute directory path; created if missing
    :param name: the host name recorded with uploads (default ``dir:ROOT``)
    :param fsync: fsync each stored file
    :param max_connections: transfers at once (default: 4 with ``fsync``, 1
        without). Without fsync a folder transfer is a few syscalls run in
        this process (about 36 us for 4 KiB here): parallel ones only
        contend for the GIL. With fsync they overlap the waits on the disk.
    """

    can_delete = True
    can_check = True
    can_list = True
    can_batch = True

    def __init__(self, root, name=None, fsync=True, timeout=None, max_connections=None):
        root = os.fspath(root)
        if not os.path.isabs(root):
            raise InvalidInputError("a folder host needs an absolute path, not %r" % root)
        self.root = os.path.normpath(root)
        self.name = name or "dir:" + self.root
        self.fsync = fsync
        if max_connections is not None:
            self.max_connections = max(1, int(max_connections))
        elif not fsync:
            self.max_connections = 1
        if timeout is not None:
            self.timeout = timeout

    @classmethod
    def from_spec(cls, scheme, target, **options):
        """Build from ``dir:/path`` or ``file:///path``."""
        if scheme == "file":
            parts = urlsplit("file:" + target)
            if parts.netloc not in ("", "localhost"):
                raise InvalidInputError("file: host spec must be local: %r" % target)
            target = os.fsdecode(unquote_to_bytes(parts.path))
        return cls(target, **options)

    def _object_path(self, name):
        if not is_hash(name):
            raise InvalidInputError("folder objects are named by SHA-256, not %r" % (name,))
        return os.path.join(self.root, name)

    def _path_of(self, url):
        check_url(url, schemes={"file"})
        path = os.path.normpath(os.fsdecode(unquote_to_bytes(urlsplit(url).path)))
        if os.path.dirname(path) != self.root or not is_hash(os.path.basename(path)):
            raise PermanentHostError(self.name, "URL is not an object of this folder: %s" % url)
        return path

    def _not_found(self, url):
        # An unmounted disk or a renamed share is an outage, not a lost copy:
        # it must not get every copy on it marked bad.
        if not os.path.isdir(self.root):
            return HostUnavailableError(self.name, "the folder %s is missing (not mounted?)"
                                        % self.root)
        return HostNotFoundError(self.name, "no object at %s" % url)

    def accepts(self, url):
        """Whether ``url`` names an object in this folder."""
        try:
            self._path_of(url)
        except (InvalidInputError, PermanentHostError):
            return False
        return True

    def upload(self, local_path, name):
        """Copy ``local_path`` to ``ROOT/name`` atomically."""
        dest = self._object_path(name)
        try:
            self._in_root(fsutil.copy_file, local_path, dest, self.fsync)
        except OSError as exc:
            raise self._store_failed(name, exc) from exc
        return self._location(dest)

    def upload_batch(self, items):
        """:meth:`upload` several files, made durable together.

        With fsync, where Linux has ``syncfs``, every file is copied to its
        temp file first, one filesystem sync makes them all durable, they are
        renamed into place, and a second sync makes the renames durable: two
        flushes for the batch instead of two per file. Otherwise it is
        :meth:`upload` file by file.

        :param items: ``[(local_path, name)]``
        :return: per item, in order: its :class:`Location`, or the
            :class:`TransientHostError` that stopped it (a failed sync fails
            every file of the batch)
        """
        if not (self.fsync and fsutil.sync_filesystem_available()):
            return super().upload_batch(items)
        results = [None] * len(items)
        temps = {}  # index -> (temp, dest), until renamed
        try:
            for i, (local_path, name) in enumerate(items):
                dest = self._object_path(name)
                try:
                    temps[i] = (self._in_root(fsutil.copy_to_temp, local_path, dest, False), dest)
                except OSError as exc:
                    results[i] = self._store_failed(name, exc)
            if temps:
                fsutil.sync_filesystem(self.root)  # the bytes, before any name points at them
                for i in sorted(temps):
                    temp, dest = temps[i]
                    fsutil.publish(temp, dest, fsync=False)
                    del temps[i]  # renamed: no longer a temp to remove
                    results[i] = self._location(dest)
                fsutil.sync_filesystem(self.root)  # the renames
        except OSError as exc:  # no file of the batch is known to be safe
            failure = self._store_failed("a batch of %d files" % len(items), exc)
            return [failure if isinstance(r, Location) or r is None else r for r in results]
        finally:
            for temp, _ in temps.values():
                fsutil.remove_quietly(temp)
        return results

    def _in_root(self, store, *args):
        """``store(*args)``; if the folder is missing, make it and try once more."""
        try:
            return store(*args)
        except FileNotFoundError:  # no folder yet (or no source: raised again)
            os.makedirs(self.root, exist_ok=True)
            return store(*args)

    def _store_failed(self, what, exc):
        return TransientHostError(self.name, "cannot store %s: %s" % (what, exc))

    def _location(self, path):
        # fsencode: a root that is not valid UTF-8 still gets an exact URL
        return Location(self.name, "file://" + quote(os.fsencode(path)))

    def download(self, url, dest_path, max_bytes=None):
        """Copy the object to ``dest_path`` atomically, stopping past ``max_bytes``."""
        path = self._path_of(url)
        try:
            src = open(path, "rb")
        except FileNotFoundError as exc:
            raise self._not_found(url) from exc
        except OSError as exc:
            raise TransientHostError(self.name, "cannot read %s: %s" % (url, exc)) from exc
        # Errors from here on are about the destination or the copy, not a
        # missing object: they must not get a good copy marked bad.
        with src:
            self.receive(src, url, dest_path, max_bytes, self.fsync)

    def stat(self, url):
        """The object file's size."""
        try:
            st = os.stat(self._path_of(url))
        except FileNotFoundError as exc:
            raise self._not_found(url) from exc
        except OSError as exc:
            raise TransientHostError(self.name, "cannot stat %s: %s" % (url, exc)) from exc
        return ObjectInfo(st.st_size)

    def delete(self, url):
        """Remove the object file (a missing one is not an error)."""
        fsutil.remove_quietly(self._path_of(url))

    def list(self):
        """Yield ``(hash, size)`` for each object file in the folder."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise TransientHostError(self.name, "cannot list %s: %s" % (self.root, exc)) from exc
        for entry in entries:
            if is_hash(entry.name) and entry.is_file(follow_symlinks=False):
                yield entry.name, entry.stat(follow_symlinks=False).st_size
