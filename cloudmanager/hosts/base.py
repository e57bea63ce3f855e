"""The Host interface: one small contract every kind of host implements.

A host stores opaque objects, each named by its SHA-256, and hands back a URL
for each. It knows nothing of the database or the cache. Each method
translates the host's native failures into
:class:`~cloudmanager.errors.HostError` subclasses:
:class:`~cloudmanager.errors.HostUnavailableError` and
:class:`~cloudmanager.errors.TransientHostError` (worth retrying),
:class:`~cloudmanager.errors.HostNotFoundError` and
:class:`~cloudmanager.errors.PermanentHostError` (not).

Cross-cutting concerns (connection limits, health, failover, verification of
the bytes) live in the :class:`~cloudmanager.engine.UploadEngine`, not here.
The shared conformance suite in ``tests/hosts/conformance.py`` states the
contract as tests; every host class passes it.
"""

import os
from typing import IO, Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from .. import fsutil
from ..errors import HostError, HostNotFoundError, PermanentHostError, TransientHostError
from ..validation import is_hash


#: A local path as the hosts take it: a string or an ``os.PathLike``.
PathLike = Union[str, "os.PathLike[str]"]


class Location(NamedTuple):
    """Where one copy lives: what the pool records for it."""

    host_name: str
    url: str


class ObjectInfo(NamedTuple):
    """What a host can tell about an object without sending it."""

    #: The object's size in bytes.
    size: int
    #: The SHA-256 hex digest the host computed and stored itself, when it
    #: keeps one (S3's checksum of a single-part upload); else None.
    sha256: Optional[str] = None


class Received(NamedTuple):
    """What a host wrote into a download's destination, hashed as it was written.

    Returned by :meth:`Host.download` when the bytes went through Python on
    their way to the file: the caller then checks these against the hash it
    asked for instead of reading the file again.
    """

    #: The SHA-256 hex digest of exactly the bytes written.
    sha256: str
    #: How many bytes were written.
    size: int


class Host:
    """Base class of hosts. Subclasses set :attr:`name` and override the methods.

    Capabilities are declared as class attributes, never probed for.
    """

    #: The name recorded with each upload (``host_name`` in the JSON format).
    name: str = "host"
    #: Whether :meth:`delete` works.
    can_delete = False
    #: Whether :meth:`stat` and :meth:`exists` work without downloading.
    can_check = False
    #: Whether :meth:`upload_batch` makes a group of files cheaper than
    #: :meth:`upload` one by one (the engine then hands it whole groups).
    can_batch = False
    #: Whether :meth:`list` works.
    can_list = False
    #: Whether the host keeps a marker in its root that tells it from an
    #: empty mount point: it then implements :meth:`has_marker` and
    #: :meth:`mark`, and honours :attr:`require_marker` (see
    #: :class:`~cloudmanager.hosts.folder.FolderHost`).
    can_mark = False
    #: Only for hosts that :attr:`can_mark`: whether a root without the
    #: marker is an outage (the pool sets it once it has used the host).
    require_marker: bool = False
    #: Only for hosts that :attr:`can_mark`: the folder the marker is kept in.
    root: Optional[str] = None
    #: How many transfers may run against this host at once.
    max_connections: int = 4
    #: Seconds one transfer may take before it is abandoned.
    timeout: float = 600.0
    #: Preference among equally healthy hosts: higher is chosen first.
    weight: float = 1.0
    #: For hosts whose object URLs are this prefix followed by the hash:
    #: :meth:`accepts` and :meth:`object_name` then need no override.
    url_prefix: Optional[str] = None

    @classmethod
    def from_spec(cls, scheme: str, target: str, **options: Any) -> "Host":
        """Build a host from the parts of its spec (``scheme:target``).

        Every host kind of :data:`~cloudmanager.hosts.REGISTRY` overrides it.

        :param scheme: the spec's kind, e.g. ``"dir"``
        :param target: what follows the first ``:``
        :param options: keyword options of the host class
        :return: a new host
        :raises InvalidInputError: for a malformed target or option
        """
        raise NotImplementedError

    def upload(self, local_path: PathLike, name: str) -> Location:
        """Store the file at ``local_path`` under the object name ``name``.

        Storing a name that is already there is not an error.

        :param local_path: a readable local file; the host never modifies it
        :param name: the object's name, a SHA-256 hex digest
        :return: the :class:`Location` of the new copy
        :raises InvalidInputError: if ``name`` is not a SHA-256 hex digest
        :raises HostError: on failure
        """
        raise NotImplementedError

    def upload_batch(self, items: Sequence[Tuple[PathLike, str]]
                     ) -> List[Union[Location, HostError]]:
        """:meth:`upload` several files: ``[(local_path, name)]``.

        Only called when :attr:`can_batch`. This default uploads them one by
        one; a host that can do better as a batch overrides it.

        :param items: ``(local_path, name)`` pairs, as :meth:`upload` takes them
        :return: a list in the order of ``items``: the :class:`Location` of
            each copy, or the :class:`~cloudmanager.errors.HostError` that
            stopped that file
        :raises InvalidInputError: if a name is not a SHA-256 hex digest
        """
        results: List[Union[Location, HostError]] = []
        for local_path, name in items:
            try:
                results.append(self.upload(local_path, name))
            except HostError as exc:
                results.append(exc)
        return results

    def download(self, url: str, dest_path: PathLike,
                 max_bytes: Optional[int] = None) -> Optional[Received]:
        """Fetch the object at ``url`` into ``dest_path``, atomically.

        On success ``dest_path`` holds the bytes the host returned (the caller
        verifies them). On failure nothing is left at ``dest_path`` or beside it.

        A host that copies the bytes itself hashes them as they pass
        (:meth:`receive` does) and returns what it wrote, so that the caller
        verifies them without reading the file again: a download reads the
        bytes once. A host whose bytes are written by something else (an
        external tool) returns None, and the caller hashes the file (as it
        does for any return value that is not a :class:`Received`).

        :param url: a URL this host :meth:`accepts`
        :param dest_path: the destination file; replaced only on success
        :param max_bytes: the expected size; a host that can stop writing
            past it raises :class:`~cloudmanager.errors.TransientHostError`
            instead of filling the disk
        :return: the :class:`Received` SHA-256 and size of exactly the bytes
            now at ``dest_path``, or None if the host did not hash them
        :raises HostNotFoundError: if the host does not hold the object
        :raises HostError: on any other failure
        """
        raise NotImplementedError

    def accepts(self, url: object) -> bool:
        """Whether this host can download ``url`` (one recorded by any node).

        The default accepts exactly :attr:`url_prefix` followed by a SHA-256 hex.

        :param url: any recorded URL (anything at all is answered, never raised on)
        :return: True if :meth:`download` can fetch it
        """
        prefix = self.url_prefix
        return (prefix is not None and isinstance(url, str) and url.startswith(prefix)
                and is_hash(url[len(prefix):]))

    def object_name(self, url: object) -> str:
        """The object name (hash) of a URL this host :meth:`accepts`.

        :param url: a URL of this host
        :return: the SHA-256 hex digest it names
        :raises PermanentHostError: for any other URL
        """
        if not self.accepts(url) or not isinstance(url, str) or self.url_prefix is None:
            shown = url[:200] if isinstance(url, str) else repr(url)
            raise PermanentHostError(self.name, "URL is not an object of this host: %r" % shown)
        return url[len(self.url_prefix):]

    def stat(self, url: str) -> ObjectInfo:
        """Size (and stored checksum, if any) of the object at ``url``.

        Only when :attr:`can_check`.

        :param url: a URL this host :meth:`accepts`
        :return: an :class:`ObjectInfo`
        :raises HostNotFoundError: if the object is not there
        :raises HostError: on any other failure
        """
        raise NotImplementedError

    def exists(self, url: str) -> bool:
        """Whether the object at ``url`` exists. Only when :attr:`can_check`.

        :param url: a URL this host :meth:`accepts`
        :return: False only when the host says the object is not there
        :raises HostError: when the host cannot tell (down, unmounted...)
        """
        try:
            self.stat(url)
        except HostNotFoundError:
            return False
        return True

    def delete(self, url: str) -> None:
        """Delete the object at ``url``; a missing one is not an error.

        Only when :attr:`can_delete`.

        :param url: a URL this host :meth:`accepts`
        :raises HostError: on failure
        """
        raise NotImplementedError

    def list(self) -> Iterator[Tuple[str, int]]:
        """Yield ``(name, size)`` for every object the host holds for us.

        Only when :attr:`can_list`.

        :return: an iterator of ``(sha256 hex, size in bytes)``
        :raises HostError: on failure
        """
        raise NotImplementedError

    def has_marker(self) -> bool:
        """Whether the marker is in the host's root. Only for hosts that :attr:`can_mark`.

        :return: always False here: a host that cannot mark holds no marker
        """
        return False

    def mark(self) -> None:
        """Write the marker into the host's root. Only when :attr:`can_mark`.

        :raises HostError: on failure
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release connections and other resources. Calling it twice is harmless."""

    def __repr__(self) -> str:
        return "<%s %s>" % (type(self).__name__, self.name)

    # -- helpers for subclasses ---------------------------------------------

    def receive(self, stream: IO[bytes], url: str, dest_path: PathLike,
                max_bytes: Optional[int] = None, fsync: bool = True,
                length: Optional[int] = None) -> Received:
        """Copy a readable binary ``stream`` to ``dest_path`` atomically, hashing it.

        For hosts that download by reading a stream: what :meth:`download`
        returns. The bytes are hashed as they are written
        (:func:`~cloudmanager.fsutil.copy_and_hash`), so nobody reads them
        again to verify them. Stops once more than ``max_bytes`` arrive. On
        any failure the temp file is removed and a
        :class:`~cloudmanager.errors.TransientHostError` raised: a failure
        here is about the transfer or the local disk, never proof that the
        object is missing.

        :param stream: a binary stream positioned at the object's first byte
        :param url: the object's URL, for messages
        :param dest_path: the destination file; replaced only on success
        :param max_bytes: refuse (and stop writing) past this many bytes
        :param fsync: fsync the file and its directory before returning
        :param length: the size the stream announced, if any (a large one is
            copied by reading and hashing in two threads)
        :return: the :class:`Received` SHA-256 and size of what was written
        :raises TransientHostError: on any failure
        """
        try:
            with fsutil.atomic_write(dest_path, fsync) as out:
                digest, size = fsutil.copy_and_hash(stream, out.fileno(), limit=max_bytes,
                                                    length=length)
        except OverflowError as exc:
            raise TransientHostError(self.name, "%s is larger than the %s bytes expected"
                                     % (url, max_bytes)) from exc
        except OSError as exc:
            raise TransientHostError(self.name, "cannot copy %s: %s" % (url, exc)) from exc
        return Received(digest, size)
