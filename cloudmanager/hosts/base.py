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

Staged uploads (:meth:`Host.stage`) let a caller send a stream whose hash it
learns only at the end: the host receives the bytes under a private staging
name (see :func:`staging_name`), and the caller then publishes them under
their object name or aborts them (:class:`Staged`).
"""

import logging
import os
import re
from typing import (
    IO, Any, Callable, Iterator, List, NamedTuple, Optional, Protocol, Sequence, Tuple, Union,
)

from .. import fsutil
from ..errors import (
    HostError,
    HostNotFoundError,
    InvalidInputError,
    PermanentHostError,
    TransientHostError,
)
from ..validation import is_hash

log = logging.getLogger(__name__)

#: A local path as the hosts take it: a string or an ``os.PathLike``.
PathLike = Union[str, "os.PathLike[str]"]

#: How every staging name begins (:func:`staging_name`). It is not a SHA-256,
#: so a staged object is never listed, accepted or taken for a copy; a
#: leftover of a crash can be found (and, on S3, expired by a lifecycle rule
#: on this key prefix) by it.
STAGING_PREFIX = ".cloudmanager-staging-"
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"[0-9a-f]{8,64}\.tmp")


def staging_name() -> str:
    """A new, random staging name: :data:`STAGING_PREFIX`, hex digits, ``.tmp``.

    >>> is_staging_name(staging_name()), is_hash(staging_name())
    (True, False)

    :return: a name that no object name (a SHA-256 hex digest) can equal
    """
    return "%s%s.tmp" % (STAGING_PREFIX, fsutil.random_hex(8))


def is_staging_name(name: object) -> bool:
    """Whether ``name`` (a base name, not a path) is a staging name.

    >>> is_staging_name(".cloudmanager-staging-0123abcd.tmp"), is_staging_name("0" * 64)
    (True, False)

    :param name: anything (answered, never raised on)
    :return: True for a name :func:`staging_name` (or ``fsutil.open_temp``
        with :data:`STAGING_PREFIX`) makes
    """
    return isinstance(name, str) and _STAGING_NAME.fullmatch(name) is not None


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


class ListedObject(NamedTuple):
    """One object of a host's listing (:meth:`Host.list_objects`): what a
    check can learn of it without asking about it alone."""

    #: The object's name: a SHA-256 hex digest (a file's hash, or an
    #: encrypted pool's keyed name).
    name: str
    #: Its size in bytes, as the listing gives it.
    size: int
    #: A SHA-256 hex digest of the whole object that the host computed and
    #: the listing carries, or None (most listings carry none: S3's gives an
    #: ETag, folders and WebDAV only sizes).
    sha256: Optional[str] = None


_HEX_PREFIX = re.compile(r"[0-9a-f]{0,64}")


def check_name_prefix(prefix: object) -> str:
    """``prefix`` if it can begin an object name: at most 64 lowercase hex digits.

    >>> check_name_prefix("0a"), check_name_prefix("")
    ('0a', '')

    :param prefix: what a caller passes to :meth:`Host.list_objects`
    :return: the prefix itself
    :raises InvalidInputError: for anything else (a path, a key fragment, a
        wildcard: a prefix never leaves the host's own names)
    """
    if not isinstance(prefix, str) or _HEX_PREFIX.fullmatch(prefix) is None:
        raise InvalidInputError("an object name prefix is lowercase hex, not %r"
                                % (str(prefix)[:80],))
    return prefix


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


class Stream(Protocol):
    """What :meth:`Host.stage` reads: a binary stream, read once, forward only."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (all the rest when negative); ``b""`` at the end."""
        ...


class HostStream:
    """What :meth:`Host.open_stream` returns: a host's readable binary stream
    whose read errors are :class:`~cloudmanager.errors.HostError`, never a
    :class:`~cloudmanager.errors.HostNotFoundError` (the object was there
    when it was opened); by default a
    :class:`~cloudmanager.errors.TransientHostError`.

    :param raw: the host's own stream (a file, an HTTP body)
    :param host_name: the host's name, for errors
    :param url: the object's URL, for errors
    :param translate: the host's own translation of a read's exception (one
        that hides secrets, say); it must return a transient error
    """

    def __init__(self, raw: Any, host_name: str, url: str,
                 translate: Optional[Callable[[Exception], HostError]] = None) -> None:
        self._raw = raw
        self.host_name = host_name
        self.url = url
        self._translate = translate

    def readable(self) -> bool:
        """Always True."""
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (the rest when negative); ``b""`` at the end.

        :raises HostError: if the transfer fails
        """
        try:
            data: bytes = self._raw.read(size)
        except HostError:
            raise
        except Exception as exc:  # whatever the host's library raises mid-transfer
            if self._translate is not None:
                raise self._translate(exc) from exc
            raise TransientHostError(self.host_name, "cannot read %s: %s"
                                     % (self.url, exc)) from exc
        return data

    def close(self) -> None:
        """Close the host's stream (ending its transfer, if not read to the end)."""
        try:
            self._raw.close()
        except Exception as exc:  # a connection already gone: nothing left to release
            log.debug("closing the stream of %s: %s", self.url, exc)

    def __enter__(self) -> "HostStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Staged:
    """Bytes a host received under a private staging name (:meth:`Host.stage`),
    waiting for their object name (:meth:`publish`) or removal (:meth:`abort`).

    Each host kind subclasses it, implementing :meth:`_publish` and
    :meth:`_discard`; this class keeps the state, so that a staged object is
    published at most once and an abort after a publish does nothing.

    :param host: the host that holds the staged bytes
    :param temp: their staging name, path or key (for messages)
    """

    def __init__(self, host: "Host", temp: str) -> None:
        self.host = host
        #: Where the staged bytes are on the host (a path, a key...).
        self.temp = temp
        self._done: Optional[str] = None  # "published" or "aborted"

    def publish(self, name: str) -> Location:
        """Give the staged bytes the object name ``name``, as an upload would have.

        Where the host can, the object appears whole under its name (a rename,
        a server-side copy): a reader never sees a partial object there. A
        name already there is replaced.

        :param name: the object's name: the SHA-256 hex digest of the bytes
            the caller streamed (the host does not check it)
        :return: the :class:`Location` of the copy
        :raises InvalidInputError: if ``name`` is not a SHA-256 hex digest
        :raises PermanentHostError: if it was published or aborted already
        :raises HostError: on failure; the staged bytes then stay until
            :meth:`abort`
        """
        if not is_hash(name):
            raise InvalidInputError("objects are named by SHA-256, not %r" % (name,))
        if self._done is not None:
            raise PermanentHostError(self.host.name, "the staged %s was %s already"
                                     % (self.temp, self._done))
        location = self._publish(name)
        self._done = "published"
        return location

    def abort(self) -> None:
        """Remove the staged bytes, best effort: it never raises.

        Nothing happens after a :meth:`publish` or a first abort. A failure
        is logged; what stays behind keeps its staging name, which no
        listing, check or download takes for a copy.
        """
        if self._done is not None:
            return
        self._done = "aborted"
        try:
            self._discard()
        except Exception as exc:  # best effort: a stray staged object is harmless
            log.warning("%s: could not remove the staged %s: %s", self.host.name, self.temp,
                        exc)

    def _publish(self, name: str) -> Location:
        """The host's publish (``name`` is checked already)."""
        raise NotImplementedError

    def _discard(self) -> None:
        """The host's removal of the staged bytes (errors are logged by :meth:`abort`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return "<%s %s on %s>" % (type(self).__name__, self.temp, self.host.name)


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
    #: Whether :meth:`upload_batch` and :meth:`download_batch` make a group
    #: of files cheaper than :meth:`upload` and :meth:`download` one by one
    #: (the engine then hands it whole groups of small files).
    can_batch = False
    #: Whether :meth:`list` and :meth:`list_objects` work.
    can_list = False
    #: Only for hosts that :attr:`can_list`: whether :meth:`list_objects`
    #: with a name prefix reads only the objects under it (an S3 key
    #: prefix), rather than the whole directory anyway (a folder, WebDAV).
    list_narrows: bool = False
    #: Only for hosts that :attr:`can_list`: objects one listing request
    #: returns at most (S3's ``MaxKeys``); a check plans its requests by it.
    list_page: int = 1000
    #: Whether :meth:`stage` works: the host can receive a stream under a
    #: staging name and give it its object name afterwards.
    can_stage = False
    #: Whether :meth:`open_stream` works: the host can hand over an object's
    #: bytes as a stream (an encrypted copy is then decrypted as it
    #: arrives, its ciphertext never stored).
    can_stream = False
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

    def stage(self, stream: Stream, size: int) -> Staged:
        """Receive ``stream`` under a new private staging name. Only when :attr:`can_stage`.

        For a caller that learns the object's name (the hash) only once the
        stream ends: it then calls :meth:`Staged.publish` with it, or
        :meth:`Staged.abort`. The host reads ``stream`` once, forward, to its
        end, and stores exactly the bytes it read (a caller may hash them as
        they are read). The staging name (:func:`staging_name`) is inside
        the host's own area (its root, its key prefix), never a SHA-256, so
        a staged object that a crash leaves behind is never listed, checked
        or downloaded as a copy.

        :param stream: the bytes (see :class:`Stream`)
        :param size: how many bytes the caller expects; a hint for the
            transfer (the caller checks what was read)
        :return: the :class:`Staged` bytes
        :raises HostError: on failure; nothing stays behind (best effort). An
            exception the stream raises may come out as it is, or as a
            HostError: the caller knows its own stream's failures
        """
        raise NotImplementedError

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

    def open_stream(self, url: str, max_bytes: Optional[int] = None) -> "HostStream":
        """The object at ``url`` as a readable binary stream, from its first
        byte. Only when :attr:`can_stream`.

        The caller reads as much as it wants and closes it. Nothing is
        written locally: the caller decides where the bytes go (and checks
        them). Opening fails with the host's errors, as :meth:`download`
        does; a failure while reading is a
        :class:`~cloudmanager.errors.HostError` of the transfer (see
        :class:`HostStream`), never proof that the object is missing or bad.

        :param url: a URL this host :meth:`accepts`
        :param max_bytes: the expected size; an object the host knows to be
            larger is refused before its bytes are read (the caller still
            bounds what it reads)
        :raises HostNotFoundError: if the object is not there
        :raises TransientHostError: if it is larger than ``max_bytes``
        :raises HostError: on any other failure
        """
        raise NotImplementedError

    def download_batch(self, items: Sequence[Tuple[str, str, Optional[int]]],
                       landed: Optional[Callable[[int, Union[Received, None, HostError]],
                                                 None]] = None
                       ) -> List[Union[Received, None, HostError]]:
        """:meth:`download` several objects: ``[(url, dest_path, max_bytes)]``.

        For a caller that fetches many small objects from this host at once
        (:meth:`cloudmanager.engine.UploadEngine.download_many` sends a host
        that :attr:`can_batch` groups of them in one call). Each ``dest_path`` is a new name the
        caller owns in a directory of its own: the host may write it in
        place rather than through a temp file and a rename; on a failure it
        may leave a partial file there, which the caller removes. One item
        failing does not stop the others. This default calls
        :meth:`download` item by item; a host that does better as a batch
        overrides it (see :class:`~cloudmanager.hosts.folder.FolderHost`).

        :param items: ``(url, dest_path, max_bytes)``, as :meth:`download` takes them
        :param landed: ``landed(k, outcome)``, called as item ``k`` ends
            (before the next begins), with what the list will hold for it: the
            caller may take a file before the batch ends (one object that
            hangs then holds up no file before it)
        :return: per item, in order, what :meth:`download` returned for it
            (a :class:`Received`, or None if the host did not hash the
            bytes), or the :class:`~cloudmanager.errors.HostError` that
            stopped it (a missing object stays a
            :class:`~cloudmanager.errors.HostNotFoundError`)
        """
        results: List[Union[Received, None, HostError]] = []
        for k, (url, dest_path, max_bytes) in enumerate(items):
            try:
                results.append(self.download(url, dest_path, max_bytes))
            except HostError as exc:
                results.append(exc)
            if landed is not None:
                landed(k, results[-1])
        return results

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

    def find(self, name: str) -> Optional[Tuple[Location, ObjectInfo]]:
        """The object this host holds under ``name``, if any. Only when :attr:`can_check`.

        For a caller that would not send an object already there (an
        encrypted pool's keyed names: every node with the key makes the same
        name). The default asks :meth:`stat` about :attr:`url_prefix` +
        ``name``; a host whose URLs are made otherwise overrides it.

        :param name: an object name, a SHA-256 hex digest
        :return: ``(location, info)``, or None when the host says there is
            no such object (or can make no URL for it)
        :raises InvalidInputError: if ``name`` is not a SHA-256 hex digest
        :raises HostError: when the host cannot tell
        """
        if not is_hash(name):
            raise InvalidInputError("objects are named by SHA-256, not %r" % (name,))
        if self.url_prefix is None:
            return None
        url = self.url_prefix + name
        try:
            return Location(self.name, url), self.stat(url)
        except HostNotFoundError:
            return None

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

    def list_objects(self, prefix: str = "") -> Iterator[ListedObject]:
        """Yield every object the host holds for us whose name starts with
        ``prefix``, with what the listing tells of it. Only when :attr:`can_list`.

        What a check of many copies reads instead of asking about each one.
        Only object names (SHA-256 hex) are yielded: a staging name, a temp
        file, a marker, a key deeper under the prefix or any foreign name
        is skipped, never yielded. A listing is a snapshot: an object that
        it does not show may still be there (a listing that lags behind a
        write), so callers do not take an absence for proof.
        This default filters :meth:`list`; a host whose listing carries more
        (a checksum), or that can narrow it to the prefix, overrides it.

        :param prefix: lowercase hex digits that every name yielded starts with
        :return: an iterator of :class:`ListedObject`, in no particular order
        :raises InvalidInputError: if ``prefix`` is not lowercase hex
        :raises HostError: on failure (a folder not mounted, a bucket that is
            not there: an outage, never an empty listing)
        """
        check_name_prefix(prefix)
        for name, size in self.list():
            if name.startswith(prefix):
                yield ListedObject(name, size)

    def listed_name(self, url: object) -> Optional[str]:
        """The name under which :meth:`list_objects` shows the object at ``url``.

        The default is :meth:`object_name` for a URL this host :meth:`accepts`.

        :param url: any recorded URL (answered, never raised on)
        :return: its object name, or None when it is no object of this host
        """
        if not self.accepts(url):
            return None
        try:
            return self.object_name(url)
        except HostError:
            return None

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
