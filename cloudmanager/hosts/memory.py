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

from ..errors import HostNotFoundError, HostUnavailableError, InvalidInputError
from ..validation import is_hash
from .base import Host, Location, ObjectInfo

_STORES = {}
_STORES_LOCK = threading.Lock()


def store(store_name):
    """The dict ``hash → bytes`` behind every host of ``store_name`` (created if new)."""
    with _STORES_LOCK:
        return _STORES.setdefault(store_name, {})


class MemoryHost(Host):
    """Keep copies in memory, under a named store shared within the process.

    :param store_name: which store to use; hosts with the same one share objects
    :param name: the host name recorded with uploads (default ``memory:STORE``)
    :param latency: seconds each transfer sleeps, to model a slow host
    """

    can_delete = True
    can_check = True
    can_list = True

    def __init__(self, store_name, name=None, latency=0.0, timeout=None):
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
        self.faults = {"down": False, "corrupt": False}
        self.url_prefix = "memory://%s/" % store_name

    @classmethod
    def from_spec(cls, scheme, target, **options):
        """Build from ``memory:STORE``."""
        return cls(target, **options)

    def _call(self):
        if self.faults["down"]:
            raise HostUnavailableError(self.name, "host is down (fault injected)")
        if self.latency:
            time.sleep(self.latency)

    def upload(self, local_path, name):
        """Read the file into the store."""
        if not is_hash(name):
            raise InvalidInputError("objects are named by SHA-256, not %r" % (name,))
        self._call()
        with open(local_path, "rb") as f:
            self.objects[name] = f.read()
        return Location(self.name, self.url_prefix + name)

    def _object(self, url):
        name = self.object_name(url)
        self._call()
        try:
            return self.objects[name]
        except KeyError:
            raise HostNotFoundError(self.name, "no object at %s" % url) from None

    def download(self, url, dest_path, max_bytes=None):
        """Write the object to ``dest_path`` atomically."""
        data = self._object(url)
        if self.faults["corrupt"] and data:
            data = bytes([data[0] ^ 1]) + data[1:]
        self.receive(io.BytesIO(data), url, dest_path, max_bytes, fsync=False)

    def stat(self, url):
        """The object's size and the SHA-256 the store computes for it."""
        data = self._object(url)
        return ObjectInfo(len(data), hashlib.sha256(data).hexdigest())

    def delete(self, url):
        """Drop the object."""
        name = self.object_name(url)
        self._call()
        self.objects.pop(name, None)

    def list(self):
        """Yield ``(hash, size)`` of every object in the store."""
        self._call()
        for name, data in list(self.objects.items()):
            yield name, len(data)
