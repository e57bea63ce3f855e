"""An in-memory host: objects live in a dict of this process.

Spec: ``memory:STORE``. Hosts built with the same store name share their
objects, so two pools in one process can exchange files through it. It exists
for fast engine tests and for trying the library out; nothing survives the
process. Faults can be switched on to rehearse failures: see :attr:`MemoryHost.faults`.
"""

import hashlib
import io
import threading
import time
from typing import Any, Dict, Iterator, Optional, Tuple

from ..errors import (
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    TransientHostError,
)
from ..validation import is_hash
from .base import (
    Host, HostStream, ListedObject, Location, ObjectInfo, PathLike, Received, Staged, Stream,
    check_name_prefix, staging_name,
)

_STORES: Dict[str, Dict[str, bytes]] = {}
_STORES_LOCK = threading.Lock()


def store(store_name: str) -> Dict[str, bytes]:
    """The dict ``hash → bytes`` behind every host of ``store_name`` (created if new).

    :param store_name: the store's name
    :return: the store itself (not a copy)
    """
    with _STORES_LOCK:
        return _STORES.setdefault(store_name, {})


class MemoryHost(Host):
    """Keep copies in memory, under a named store shared within the process.

    :param store_name: which store to use; hosts with the same one share objects
    :param name: the host name recorded with uploads (default ``memory:STORE``)
    :param latency: seconds each transfer sleeps, to model a slow host
    :param timeout: seconds one transfer may take (default: :attr:`Host.timeout`)
    :raises InvalidInputError: if ``store_name`` is not a plain name
    """

    can_delete = True
    can_check = True
    can_list = True
    can_stage = True
    can_stream = True
    url_prefix: str  # set by __init__: every memory host has one

    def __init__(self, store_name: str, name: Optional[str] = None, latency: float = 0.0,
                 timeout: Optional[float] = None) -> None:
        if not isinstance(store_name, str) or not store_name or "/" in store_name:
            raise InvalidInputError("a memory store needs a plain name, not %r" % (store_name,))
        self.store_name = store_name
        self.name = name or "memory:" + store_name
        self.latency = float(latency)
        if timeout is not None:
            self.timeout = float(timeout)
        self.objects = store(store_name)
        #: Fault switches for rehearsals: ``down`` (every call fails as
        #: unreachable), ``corrupt`` (downloads flip one byte).
        self.faults: Dict[str, bool] = {"down": False, "corrupt": False}
        self.url_prefix = "memory://%s/" % store_name

    @classmethod
    def from_spec(cls, scheme: str, target: str, **options: Any) -> "MemoryHost":
        """Build from ``memory:STORE``.

        :param scheme: ``"memory"``
        :param target: the store's name
        :param options: keyword options of :class:`MemoryHost`
        :return: a new :class:`MemoryHost`
        """
        return cls(target, **options)

    def _call(self) -> None:
        if self.faults["down"]:
            raise HostUnavailableError(self.name, "host is down (fault injected)")
        if self.latency:
            time.sleep(self.latency)

    def upload(self, local_path: PathLike, name: str) -> Location:
        """Read the file into the store (over any object already there).

        :param local_path: a readable local file
        :param name: the object's name, a SHA-256 hex digest
        :return: the :class:`Location` of the copy
        :raises InvalidInputError: if ``name`` is not a SHA-256 hex digest
        :raises HostUnavailableError: with the ``down`` fault
        """
        if not is_hash(name):
            raise InvalidInputError("objects are named by SHA-256, not %r" % (name,))
        self._call()
        with open(local_path, "rb") as f:
            self.objects[name] = f.read()
        return Location(self.name, self.url_prefix + name)

    def stage(self, stream: Stream, size: int) -> Staged:
        """Read ``stream`` into the store under a staging name (never listed).

        :param stream: the bytes, read once to their end
        :param size: the bytes expected (unused: the caller checks)
        :return: the :class:`~cloudmanager.hosts.base.Staged` bytes
        :raises HostUnavailableError: with the ``down`` fault
        """
        self._call()
        temp = staging_name()
        self.objects[temp] = stream.read()
        return _MemoryStaged(self, temp)

    def _object(self, url: str) -> bytes:
        name = self.object_name(url)
        self._call()
        try:
            return self.objects[name]
        except KeyError:
            raise HostNotFoundError(self.name, "no object at %s" % url) from None

    def download(self, url: str, dest_path: PathLike,
                 max_bytes: Optional[int] = None) -> Received:
        """Write the object to ``dest_path`` atomically.

        :param url: a ``memory://`` URL this host :meth:`accepts`
        :param dest_path: the destination file; replaced only on success
        :param max_bytes: refuse an object larger than this
        :return: the SHA-256 and size of the bytes written
        :raises HostNotFoundError: if the object is not there
        :raises TransientHostError: if it is larger than ``max_bytes``
        :raises HostError: on any other failure
        """
        return self.receive(self._served(url), url, dest_path, max_bytes, fsync=False)

    def open_stream(self, url: str, max_bytes: Optional[int] = None) -> HostStream:
        """The object's bytes as a stream; see :meth:`Host.open_stream`.

        :raises HostNotFoundError: if the object is not there
        :raises TransientHostError: if it is larger than ``max_bytes``
        """
        served = self._served(url)
        if max_bytes is not None and len(served.getbuffer()) > max_bytes:
            raise TransientHostError(self.name, "%s is %d bytes, more than the %d expected"
                                     % (url, len(served.getbuffer()), max_bytes))
        return HostStream(served, self.name, url)

    def _served(self, url: str) -> io.BytesIO:
        """The object's bytes as a download gets them (the ``corrupt`` fault flips one)."""
        data = self._object(url)
        if self.faults["corrupt"] and data:
            data = bytes([data[0] ^ 1]) + data[1:]
        return io.BytesIO(data)

    def stat(self, url: str) -> ObjectInfo:
        """The object's size and the SHA-256 the store computes for it.

        :param url: a ``memory://`` URL this host :meth:`accepts`
        :return: an :class:`ObjectInfo` with its ``sha256``
        :raises HostNotFoundError: if the object is not there
        """
        data = self._object(url)
        return ObjectInfo(len(data), hashlib.sha256(data).hexdigest())

    def delete(self, url: str) -> None:
        """Drop the object (a missing one is not an error).

        :param url: a ``memory://`` URL this host :meth:`accepts`
        """
        name = self.object_name(url)
        self._call()
        self.objects.pop(name, None)

    def list(self) -> Iterator[Tuple[str, int]]:
        """Yield ``(hash, size)`` of every object in the store.

        :raises HostUnavailableError: with the ``down`` fault
        """
        self._call()
        for name, data in list(self.objects.items()):
            if is_hash(name):  # not staged bytes
                yield name, len(data)

    def list_objects(self, prefix: str = "") -> Iterator[ListedObject]:
        """Yield each object of the store whose name starts with ``prefix``,
        with its size and the SHA-256 the store computes for it (a listing
        that carries a checksum, as :meth:`stat` does).

        :param prefix: lowercase hex digits
        :raises InvalidInputError: if ``prefix`` is not lowercase hex
        :raises HostUnavailableError: with the ``down`` fault
        """
        check_name_prefix(prefix)
        self._call()
        for name, data in list(self.objects.items()):
            if name.startswith(prefix) and is_hash(name):  # not staged bytes
                yield ListedObject(name, len(data), hashlib.sha256(data).hexdigest())


class _MemoryStaged(Staged):
    """Bytes in a memory store under a staging name."""

    host: MemoryHost

    def _publish(self, name: str) -> Location:
        self.host._call()
        try:
            self.host.objects[name] = self.host.objects.pop(self.temp)
        except KeyError:
            raise TransientHostError(self.host.name, "the staged %s is gone" % self.temp) from None
        return Location(self.host.name, self.host.url_prefix + name)

    def _discard(self) -> None:
        self.host.objects.pop(self.temp, None)
