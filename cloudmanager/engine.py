"""UploadEngine: moving bytes to and from hosts. It writes nothing.

Uploads go to hosts in parallel threads, healthiest first (the order comes
from :class:`~cloudmanager.health.Health`). When one fails, the next
candidate starts, until the target is met or the hosts run out.

Downloads try the copies in the health order of their hosts. Each attempt
writes a temp file beside the destination and is verified against the
SHA-256 (and size) before it is renamed into place: the digest the host
computed as it wrote the bytes, or, from a host that cannot hash them
(plowdown writes its file itself), a hash of the temp file.

Every call returns facts, never writes them: which host, which URL, how long,
which error (:class:`~cloudmanager.health.Fact`), and what an attempt proved
about a copy (:class:`Verdict`). The caller (:mod:`cloudmanager.replication`)
records them, with the rest of what the operation changed, in one transaction.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import itertools
import logging
import math
import os
import queue
import threading
import time
from urllib.parse import urlsplit
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
    TypedDict,
    Union,
)

from . import fsutil, meter
from .cache import layout
from .errors import (
    CloudManagerError,
    CorruptCopyError,
    DownloadError,
    HostError,
    HostNotFoundError,
    HostUnavailableError,
    IntegrityError,
    InvalidInputError,
    TransientHostError,
    UnconfirmedIntegrityError,
)
from .health import Fact, Health
from .hosts.base import Host, ListedObject, Location, ObjectInfo, Received, Staged

log = logging.getLogger(__name__)

#: Files a batch sends to one host in a row, with one thread (see
#: :meth:`UploadEngine.upload_many`): a thread per file costs more than a
#: small file's upload.
BATCH_GROUP = 16
#: The same for hosts that take a group in one call (``can_batch``): a group
#: has a fixed cost there (two filesystem syncs for a folder host), so it is
#: larger; a batch of 500 still spreads over four connections.
BATCH_GROUP_WHOLE = 128
#: Groups of a batch queued or running at once: enough to keep every
#: connection busy, few enough that a failing host stops getting the batch
#: soon. Hosts whose connections add up to more get that many (see _Batch).
BATCH_IN_FLIGHT = 16
#: The most threads of the engine's worker pool. A batch's group holds one
#: while it runs, so the pool has one per connection of every host, up to this.
MAX_WORKERS = 64

#: Files of :meth:`UploadEngine.download_many` below this many bytes go to
#: a host that :attr:`~cloudmanager.hosts.base.Host.can_batch` in groups,
#: one call per group (:meth:`Host.download_batch`): for a small file the
#: call costs more than its bytes. Larger ones go one by one.
GROUP_FILE_MAX = 1 << 20
#: The most files of a group, and the most bytes (with one file at least).
#: Fewer when the batch is small, so that every connection gets a group.
DOWNLOAD_GROUP = 64
DOWNLOAD_GROUP_BYTES = 4 << 20

#: Seconds without a download ending after which :meth:`UploadEngine.download_many`
#: tells its caller (``idle``).
IDLE_AFTER = 0.2

#: Seconds the engine waits past a host's own ``timeout`` before it gives up
#: on a call: the host's own timeout, with its better error, fires first.
DEADLINE_GRACE = 1.0
#: Bytes per second a transfer is allowed on top of the host's ``timeout``,
#: so that a large file on a slow link is not mistaken for a hang.
DEADLINE_RATE = 64 * 1024

#: Copies of one host due for a check below which each is looked at alone
#: (a HEAD each, in parallel) rather than found in a listing of the host.
LIST_MIN = 16
#: Objects a listing may read per copy it checks. A listing request reads
#: up to a page (1,000 on S3) for about the cost of one HEAD; past this
#: many objects per copy, looking at each copy alone costs less.
LIST_READ_PER_COPY = 8
#: The longest name prefix a listing plan narrows to (hosts that
#: :attr:`~cloudmanager.hosts.base.Host.list_narrows`): 16**4 prefixes.
LIST_PREFIX_MAX = 4


class Verdict(NamedTuple):
    """What a transfer or a check proved about one copy.

    ``state`` is ``"good"`` (its bytes matched the hash), ``"intact"`` (its
    host reports the right size, bytes unseen), ``"bad"`` (its bytes do not
    match), ``"missing"`` (its host says it is not there) or ``"error"`` (the
    host did not answer: nothing proved). Only the host a copy is recorded
    under can prove it bad or missing; another host that merely accepts the
    URL may be a different server.
    """

    location: Location
    state: str


class UploadJob(NamedTuple):
    """One file for :meth:`UploadEngine.upload_many`."""

    path: str
    file_hash: str
    size: int
    #: Hosts that already hold a good copy: not sent to again.
    holders: FrozenSet[str]
    #: Hosts wanted in all, holders included.
    target: int
    #: See :data:`Vet`: keep an object already on a host under this name.
    vet: Optional[Vet] = None


#: ``vet(host, name, location, info)``: whether an object a host holds already
#: under the name an upload would give (``host.find(name)``) may stand for
#: the upload, which is then not sent. Called in the transfer's thread; the
#: caller's business (an encrypted pool fetches it once and decrypts it).
Vet = Callable[[Host, str, Location, ObjectInfo], bool]


class UploadResult(NamedTuple):
    """What one round of uploads of a file achieved."""

    successes: List[Location]
    failures: List[HostError]
    #: Names of hosts skipped because their circuit breaker is open.
    cooling: Sequence[str] = ()
    #: What each host call did, for :meth:`Health.record`.
    facts: List[Fact] = []


class Streamed(NamedTuple):
    """A source streamed to one host by :meth:`UploadEngine.stream`: staged
    there under a private name, waiting for :meth:`UploadEngine.publish`."""

    host: Host
    staged: Staged
    #: The SHA-256 hex of exactly the bytes the host received.
    file_hash: str
    #: How many bytes it received.
    size: int
    #: ``time.monotonic()`` when the attempt began (for the fact of the publish).
    started: float
    #: With :meth:`UploadEngine.stream`'s ``transform``: what it made of the
    #: source (the stream the host read, closed), for the caller to ask.
    made: Any = None


class StreamResult(NamedTuple):
    """What :meth:`UploadEngine.stream` achieved."""

    #: The staged source, or None if no host took it.
    streamed: Optional[Streamed]
    failures: List[HostError]
    #: Names of hosts skipped because their circuit breaker is open.
    cooling: Sequence[str]
    #: The facts of the failed attempts (a staged one's fact comes with its publish).
    facts: List[Fact]
    #: With ``name`` and ``vet``: where an object already there was kept
    #: instead (nothing staged; its fact is in ``facts``).
    kept: Optional[Location] = None


class _SourceFailure(Exception):
    """Raised by a staging call when the source failed, not the host: it could
    not be read, or it grew past its size. Internal to the engine: callers
    get :attr:`error` (an OSError, or an IntegrityError for a size change)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Room(Protocol):
    """Room reserved for one download attempt where space is bounded (the
    cache: a :class:`~cloudmanager.cache.store.Reservation`).

    A room may also have an ``abandoned()`` method: the engine calls it when
    it gives up on the attempt writing there, whose call then keeps the room
    until it ends (a share of a batch's reservation must then outlive the
    batch: :class:`~cloudmanager.cache.store.BatchRooms`).
    """

    @property
    def temp(self) -> str:
        """Where the attempt's verified bytes go; its temp files go beside it."""

    def release(self) -> None:
        """Remove the file at :attr:`temp`, then give the room back (once; never
        after the caller committed it)."""


class DownloadResult(NamedTuple):
    """Where a verified copy came from, and what every attempt found."""

    location: Location
    facts: List[Fact]
    verdicts: List[Verdict]
    #: With :meth:`UploadEngine.download`'s ``room``: the room whose ``temp``
    #: holds the verified copy, now the caller's (to commit, or release).
    room: Optional[Room] = None


class DownloadJob(NamedTuple):
    """One file for :meth:`UploadEngine.download_many`: what :meth:`UploadEngine.download`
    takes for it, into a ``room``."""

    file_hash: str
    size: int
    #: ``(host_name, url)`` of the copies believed good.
    sources: Sequence[Tuple[str, str]]
    #: Reserves the room of an attempt (see :meth:`UploadEngine.download`).
    room: Callable[[], Room]
    #: Condemned copies, tried after every source failed.
    last_resort: Sequence[Tuple[str, str]] = ()


class SealedObject(NamedTuple):
    """What :meth:`UploadEngine.download` needs to fetch a file from its
    encrypted copies: the ciphertext each holds, and how to decrypt it."""

    #: ``decrypt(stream, out_fd, limit, length, use_binary)``: decrypt a
    #: ciphertext stream into ``out_fd``, writing at most ``limit`` bytes; the
    #: plaintext's ``(sha256 hex, size)``
    #: (:meth:`cloudmanager.crypto.PoolKey.decrypt_stream`)
    decrypt: Callable[[Any, int, Optional[int], Optional[int], bool], Tuple[str, int]]
    #: The recorded SHA-256 hex digest of the ciphertext.
    sha256: str
    #: Its recorded size.
    size: int


class _Attempt(NamedTuple):
    """One download attempt's outcome (:meth:`UploadEngine._download_one`)."""

    #: None if it delivered the verified copy.
    error: Optional[HostError]
    fact: Fact
    verdict: Optional[Verdict]
    #: The engine gave up on the call: its room is the call's until it ends.
    abandoned: bool = False


class _Tries:
    """One file's download attempts so far: what :meth:`UploadEngine.download`
    (or a group of :meth:`UploadEngine.download_many`) found, and the room
    the next attempt writes into."""

    __slots__ = ("failures", "facts", "verdicts", "tried", "held", "abandoned")

    def __init__(self) -> None:
        self.failures: List[HostError] = []
        self.facts: List[Fact] = []
        self.verdicts: List[Verdict] = []
        #: Names of the hosts tried.
        self.tried: Set[str] = set()
        #: The room the next attempt writes into, if it has one yet.
        self.held: Optional[Room] = None
        #: Attempts the engine gave up on (their calls keep their rooms).
        self.abandoned = 0


class _Member:
    """One file of a group of :meth:`UploadEngine.download_many`."""

    __slots__ = ("index", "job", "plan", "believed", "unreachable", "tries", "outcome",
                 "delivered")

    def __init__(self, index: int, job: DownloadJob) -> None:
        self.index = index
        self.job = job
        #: ``[(host, location)]``: the sources, then the last resorts.
        self.plan: List[Tuple[Host, Location]] = []
        #: How many of :attr:`plan` are sources (the rest are last resorts).
        self.believed = 0
        self.unreachable: List[str] = []
        self.tries = _Tries()
        #: A DownloadResult, or the CloudManagerError that stopped it, once known.
        self.outcome: Any = None
        #: Handed over by the group's call as it landed: no longer the group's.
        self.delivered = False


class _GaveUp(HostUnavailableError):
    """Raised by :meth:`UploadEngine._call` when the deadline passed: the call
    runs on, and its ``cleanup`` runs when it ends. Internal: :meth:`_failed`
    hands callers a plain :class:`HostUnavailableError`."""


class CheckResult(NamedTuple):
    """The outcome of :meth:`UploadEngine.check`.

    ``verdict`` is a :class:`Verdict` state, or ``"unreachable"`` when no
    configured host can reach the URL.
    """

    verdict: str
    facts: List[Fact]
    verdicts: List[Verdict]


class CheckItem(NamedTuple):
    """One copy for :meth:`UploadEngine.check_listed` and :meth:`UploadEngine.check_each`."""

    #: The SHA-256 hex of the bytes the host should hold (an encrypted
    #: copy's ciphertext, or the file itself).
    digest: str
    #: Their size in bytes.
    size: int
    location: Location
    #: Look at its bytes (a download), not only at what the host says of it.
    deep: bool = False


class UploadEngine:
    """Parallel, health-ordered uploads and verified, failing-over downloads.

    Downloads still try a host whose breaker is open, last: a slow answer
    beats no file.

    :param hosts: :class:`~cloudmanager.hosts.base.Host` objects; names must be unique
    :param redundancy: the target number of hosts per file
    :param health: the :class:`~cloudmanager.health.Health` that ranks hosts
        (read only: the engine records nothing)
    :raises InvalidInputError: if two hosts share a name
    """

    def __init__(self, hosts: Iterable[Host], redundancy: int, health: Health,
                 bwlimit: Optional[float] = None) -> None:
        self.redundancy = redundancy
        self.health = health
        #: The bandwidth limit every host transfer shares (None: no limit).
        self.bucket = meter.TokenBucket(bwlimit) if bwlimit else None
        self.hosts: Dict[str, Host] = {}
        for host in hosts:
            if host.name in self.hosts:
                raise InvalidInputError("two hosts are named %r" % host.name)
            self.hosts[host.name] = host
        self._slots = {h.name: threading.BoundedSemaphore(max(1, h.max_connections))
                       for h in self.hosts.values()}
        workers = max(4, sum(h.max_connections for h in self.hosts.values()))
        #: Threads of the worker pool: groups of a batch in flight take one each.
        self.workers = min(workers, MAX_WORKERS)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="cloudmanager")
        #: Long-lived threads that run host calls under a deadline (see :meth:`_call`).
        self._calls = _CallPool()
        #: Whether checks of many copies list their hosts (:meth:`listing_plan`):
        #: None decides by cost, True lists whenever the host can, False never.
        self.listing: Optional[bool] = None

    # -- metering: progress and the bandwidth limit ------------------------------

    def _meter(self) -> Optional[meter.Meter]:
        """The meter for a host call started now: the caller's progress
        (:func:`cloudmanager.meter.reporting`) and the bandwidth limit."""
        progress = meter.reported()
        if progress is None and self.bucket is None:
            return None
        return meter.Meter(progress, self.bucket)

    def _metered(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` to run on a call thread, metered as the caller asked
        (decided here, in the caller's thread)."""
        chosen = self._meter()
        if chosen is None:
            return fn

        def run() -> Any:
            with meter.metering(chosen):
                return fn()
        return run

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """``fn(*args)`` on the engine's worker pool, in a copy of the
        caller's context, so that its host calls report to the caller's progress."""
        return self._pool.submit(contextvars.copy_context().run, fn, *args)

    # -- choosing hosts --------------------------------------------------------

    def host_for(self, host_name: str, url: str) -> Optional[Host]:
        """The configured host that can fetch ``url``: the one named
        ``host_name``, else any host that accepts the URL. None if there is none."""
        host = self.hosts.get(host_name)
        if host is not None and host.accepts(url):
            return host
        for candidate in self.hosts.values():
            if candidate.accepts(url):
                return candidate
        return None

    def streams(self, host_name: str, url: str) -> bool:
        """Whether the host that would fetch ``url`` can hand its bytes over as
        a stream (:attr:`~cloudmanager.hosts.base.Host.can_stream`)."""
        host = self.host_for(host_name, url)
        return host is not None and host.can_stream

    def reaches(self, copies: Iterable[Tuple[str, str]]) -> bool:
        """Whether a configured host can fetch any of ``copies`` (``(host_name, url)`` pairs)."""
        return any(self.host_for(host_name, url) is not None for host_name, url in copies)

    def names(self, location: Location, file_hash: str) -> bool:
        """Whether ``location`` names the object of ``file_hash``: its URL is one
        a configured host can reach, and the object it names is that hash.
        A record cannot aim a delete at another file's object this way."""
        host = self.host_for(location.host_name, location.url)
        if host is None:
            return False
        try:
            if host.url_prefix is not None:
                return host.object_name(location.url) == file_hash
        except (HostError, InvalidInputError, ValueError):
            return False
        # Hosts with URLs of their own form (a folder's file:// URL): the host
        # accepts the URL, and its last path segment is the object's name.
        return urlsplit(location.url).path.rsplit("/", 1)[-1] == file_hash

    # -- uploads ---------------------------------------------------------------

    def upload(self, path: str, file_hash: str, size: int,
               holders: Iterable[str] = (), target: Optional[int] = None,
               rehash: bool = False, vet: Optional[Vet] = None) -> UploadResult:
        """Upload a file until ``target`` hosts beyond ``holders`` hold it.

        :param path: the local file (the cached copy, or the source itself)
        :param holders: names of hosts that already hold a good copy
        :param target: total hosts wanted (default: the engine's redundancy)
        :param rehash: for a source that may change under us: only hosts that
            :attr:`~cloudmanager.hosts.base.Host.can_stage` are used, each
            gets its own read of ``path`` through a hashing stream, and a copy
            is published only if its bytes hash to ``file_hash`` (see
            :meth:`_rehash_one`). Once one does not, the source has changed:
            no further host is tried
        :param vet: see :data:`Vet`: a host that holds an object under
            ``file_hash`` already, which ``vet`` accepts, is not sent it again
        """
        target = self.redundancy if target is None else target
        holders = set(holders)
        needed = target - len(holders)
        candidates, cooling = self.health.ranked(
            [h for n, h in self.hosts.items() if n not in holders and (h.can_stage or not rehash)])
        for host in cooling:
            log.info("not uploading %s to %s: it failed too often lately; cooling down",
                     file_hash, host.name)
        changed = threading.Event()  # set by a rehash that found other bytes
        successes: List[Location] = []
        failures: List[HostError] = []
        facts: List[Fact] = []
        unused: List[Host] = []
        running: Set[concurrent.futures.Future] = set()
        while needed > len(successes) and (candidates or running):
            if changed.is_set():
                unused += candidates
                candidates = []
            while candidates and len(running) + len(successes) < needed:
                host = candidates.pop(0)
                if rehash:
                    running.add(self._spawn(self._rehash_one, host, path, file_hash, size,
                                                  changed))
                else:
                    running.add(self._spawn(self._upload_one, host, path, file_hash, size,
                                            vet))
            if not running:
                break
            done, running = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                outcome, fact = future.result()
                facts.append(fact)
                (successes if isinstance(outcome, Location) else failures).append(outcome)
        self.health.release(h.name for h in candidates + unused)  # probes not used
        return UploadResult(successes, failures, [h.name for h in cooling], facts)

    def _upload_one(self, host: Host, path: str, file_hash: str,
                    size: int, vet: Optional[Vet] = None) -> Tuple[object, Fact]:
        started = time.monotonic()
        what = "upload of %s" % file_hash
        try:
            location = self._call(host, what, self.deadline(host, size),
                                  self._send, host, path, file_hash, vet)
        except HostError as exc:
            return self._failed(host, exc, what)
        except Exception as exc:  # a host bug must not take the engine down
            return self._failed(host, TransientHostError(host.name, repr(exc)), what)
        log.info("uploaded %s to %s", file_hash, host.name)
        return location, Fact(host.name, True, (time.monotonic() - started) * 1000,
                              uploaded=size)

    @staticmethod
    def _send(host: Host, path: str, name: str, vet: Optional[Vet]) -> Location:
        """``host.upload(path, name)``, unless ``vet`` accepts an object the
        host holds under ``name`` already (see :data:`Vet`)."""
        kept = UploadEngine._kept(host, name, vet)
        return kept if kept is not None else host.upload(path, name)

    @staticmethod
    def _kept(host: Host, name: str, vet: Optional[Vet]) -> Optional[Location]:
        """The location of an object ``host`` holds under ``name`` that ``vet``
        accepts in place of an upload, or None."""
        if vet is None or not host.can_check:
            return None
        try:
            found = host.find(name)
        except HostError as exc:
            # Only a saving: a host that cannot tell (a pool folder not made
            # yet, say) gets the upload, which succeeds or fails on its own.
            log.debug("%s: cannot tell whether %s is there (%s); sending it", host.name, name,
                      exc.message)
            return None
        if found is None or not vet(host, name, *found):
            return None
        return found[0]

    # -- staged uploads (a source read once per host, hashed as it streams) ------

    def stream(self, path: str, size: int, exclude: Iterable[str] = (),
               transform: Optional[Callable[[IO[bytes]], Any]] = None,
               limit: Optional[int] = None, name: Optional[str] = None,
               vet: Optional[Vet] = None) -> StreamResult:
        """Stream a source to the healthiest host that can stage it, hashing it on the way.

        The file at ``path`` is read once, through a hashing stream, by the
        host's :meth:`~cloudmanager.hosts.base.Host.stage`; the hash is
        known when the stream ends. Nothing is published: the caller checks
        the source and then calls :meth:`publish` or :meth:`abort`. When a
        host fails, the next one gets a new read of the source (that read is
        hashed afresh).

        :param path: the source, a regular file
        :param size: its size when the caller looked: more bytes than that
            are refused as they come
        :param exclude: names of hosts not to try (tried already)
        :param transform: ``transform(source)``: the stream the host reads in
            place of the source (an encrypted pool's
            :class:`~cloudmanager.crypto.SealingStream`), with ``close()``;
            each attempt makes its own. Its failures are the source's. The
            hash and size are then of what it made (``Streamed.made``)
        :param limit: with ``transform``: the most bytes it may make
        :param name: the object's name, when the caller knows it already,
            and ``vet`` (see :data:`Vet`): a host holding an object under
            ``name`` that ``vet`` accepts is not streamed to
            (:attr:`StreamResult.kept`)
        :return: a :class:`StreamResult`; its ``streamed`` is None if no
            host that can stage took the source
        :raises IntegrityError: if the source grew past ``size`` while it was read
        :raises OSError: if the source could not be read
        """
        exclude = set(exclude)
        candidates, cooling = self.health.ranked(
            [h for n, h in self.hosts.items() if h.can_stage and n not in exclude])
        failures: List[HostError] = []
        facts: List[Fact] = []
        try:
            while candidates:
                host = candidates.pop(0)
                outcome = self._stage_one(host, path, size, transform, limit, name, vet)
                if isinstance(outcome, Streamed):
                    return StreamResult(outcome, failures, [h.name for h in cooling], facts)
                if isinstance(outcome[0], Location):  # kept: an object there already
                    return StreamResult(None, failures, [h.name for h in cooling],
                                        facts + [outcome[1]], kept=outcome[0])
                failures.append(outcome[0])
                facts.append(outcome[1])
        except _SourceFailure as exc:
            if isinstance(exc.error, OverflowError):
                raise IntegrityError("%s grew while it was read (more than the %d bytes it "
                                     "had); refused" % (path, size)) from exc.error
            raise exc.error from None  # the source's own error, as reading it raised it
        finally:
            self.health.release(h.name for h in candidates)  # probes not used
        return StreamResult(None, failures, [h.name for h in cooling], facts)

    def _stage_one(self, host: Host, path: str, size: int,
                   transform: Optional[Callable[[IO[bytes]], Any]] = None,
                   limit: Optional[int] = None, name: Optional[str] = None,
                   vet: Optional[Vet] = None
                   ) -> Union[Streamed, Tuple[Union[HostError, Location], Fact]]:
        """One staging of ``path`` on ``host``: a :class:`Streamed`, or ``(error, fact)``.

        A staging that worked has no fact of its own: the publish's (or the
        failure's) stands for the whole attempt, so that the breaker never
        counts a host that took the bytes and then failed to publish them
        as a success.

        The source is opened, read and closed in the call's own thread, so
        a call the engine gives up on never shares it with the next attempt;
        if such a call stages its bytes after all, they are aborted.

        :raises _SourceFailure: if the source, not the host, failed
        """
        what = "staged upload to %s" % host.name
        started = time.monotonic()
        late: Dict[str, Staged] = {}

        def run() -> Union[Streamed, Location]:
            kept = self._kept(host, name, vet) if name is not None else None
            if kept is not None:
                return kept
            try:
                source = open(path, "rb")
            except OSError as exc:
                raise _SourceFailure(exc) from exc
            with contextlib.ExitStack() as stack:
                stack.enter_context(source)
                made = None
                if transform is not None:
                    try:
                        made = transform(source)
                    except OSError as exc:
                        raise _SourceFailure(exc) from exc
                    stack.callback(made.close)
                reader = fsutil.HashingReader(made if made is not None else source,
                                              limit=limit if made is not None else size)
                try:
                    staged = host.stage(reader, size)
                except BaseException as exc:
                    if reader.error is not None:
                        raise _SourceFailure(reader.error) from exc
                    if made is None and reader.eof and reader.count < size:  # a host that
                        raise _SourceFailure(IntegrityError(  # wanted them all
                            "%s shrank while it was read (%d bytes of %d)"
                            % (path, reader.count, size))) from exc
                    raise
                late["staged"] = staged
                if reader.error is not None:  # a host that swallowed the source's error
                    staged.abort()
                    raise _SourceFailure(reader.error)
            return Streamed(host, staged, reader.hexdigest(), reader.count, started, made)

        def cleanup() -> None:  # the engine gave up on the call, which ended after all
            staged = late.get("staged")
            if staged is not None:
                staged.abort()

        try:
            streamed = self._call(host, what, self.deadline(host, size), run, cleanup=cleanup)
        except _SourceFailure:
            raise
        except HostError as exc:
            return self._failed(host, exc, what)
        except Exception as exc:  # a host bug must not take the engine down
            return self._failed(host, TransientHostError(host.name, repr(exc)), what)
        if isinstance(streamed, Location):
            return streamed, Fact(host.name, True, (time.monotonic() - started) * 1000)
        log.debug("streamed %d bytes to %s (SHA-256 %s)", streamed.size, host.name,
                  streamed.file_hash)
        return streamed

    def publish(self, streamed: Streamed, file_hash: str
                ) -> Tuple[Union[Location, HostError], Fact]:
        """Give staged bytes their object name (see :meth:`stream`).

        :param file_hash: the object's name: ``streamed.file_hash``, checked
            by the caller against whatever else it knows
        :return: ``(Location, fact)``, or ``(HostError, fact)`` when the host
            failed; the staged bytes then stay until :meth:`abort`
        """
        host = streamed.host
        what = "upload of %s" % file_hash
        try:
            location = self._call(host, what, self.deadline(host, streamed.size),
                                  streamed.staged.publish, file_hash)
        except HostError as exc:
            return self._failed(host, exc, what)
        except Exception as exc:  # a host bug must not take the engine down
            return self._failed(host, TransientHostError(host.name, repr(exc)), what)
        log.info("uploaded %s to %s", file_hash, host.name)
        return location, Fact(host.name, True, (time.monotonic() - streamed.started) * 1000,
                              uploaded=streamed.size)

    @staticmethod
    def abort(streamed: Streamed) -> None:
        """Remove staged bytes, best effort (never raises; nothing after a publish)."""
        streamed.staged.abort()

    def _rehash_one(self, host: Host, path: str, file_hash: str, size: int,
                    changed: threading.Event) -> Tuple[object, Fact]:
        """One host of :meth:`upload` with ``rehash``: stream ``path`` to it
        hashing it, publish if the bytes hash to ``file_hash``, else abort and
        set ``changed``. A source that changed is not the host's fault: its
        fact does not count against the host."""
        try:
            outcome = self._stage_one(host, path, size)
        except _SourceFailure as exc:
            return self._source_changed(host, file_hash, str(exc.error), changed)
        if not isinstance(outcome, Streamed):
            return outcome
        if outcome.file_hash != file_hash or outcome.size != size:
            self.abort(outcome)
            return self._source_changed(host, file_hash, "%d bytes hashing to %s" % (
                outcome.size, outcome.file_hash), changed)
        location, fact = self.publish(outcome, file_hash)
        if not isinstance(location, Location):
            self.abort(outcome)
        return location, fact

    @staticmethod
    def _source_changed(host: Host, file_hash: str, found: str,
                        changed: threading.Event) -> Tuple[HostError, Fact]:
        changed.set()
        error = TransientHostError(host.name, "%s not sent: its source changed since it was "
                                   "hashed (read again: %s)" % (file_hash, found))
        log.warning("%s", error)
        return error, Fact(host.name, False, error=error.message, counts=False)

    # -- batches (CloudManager.upload_many) --------------------------------------

    def upload_many(self, jobs: Sequence[UploadJob]) -> List[UploadResult]:
        """Upload several files, each until its target, all hosts working at once.

        Each job is handled as :meth:`upload` would: healthiest hosts first,
        and the next candidate when one fails. What differs is the overhead:
        files go to each host in groups of up to :data:`BATCH_GROUP`
        (:data:`BATCH_GROUP_WHOLE` for hosts that take a group in one call), one
        thread per group, under the same per-file deadline as :meth:`_call`
        (a group gives up on the rest once one file overruns it); and a host
        that fails as often in a row as would open its breaker
        (:meth:`Health.gives_up`) gets no more of this batch.

        :return: an :class:`UploadResult` per job, in order; the facts of the
            whole batch are on the first (the batch is one operation)
        """
        return _Batch(self, jobs).run()

    def _upload_group(self, host: Host,
                      items: Sequence[Tuple[int, str, str, int, Optional[Vet]]]
                      ) -> List[_GroupOutcome]:
        """Upload ``[(index, path, file_hash, size, vet)]`` to one host, one after another.

        One daemon thread does the uploads, under one connection slot; the
        caller waits for each file no longer than :meth:`deadline` would let
        a single call run. When one overruns, the caller gives up on it and
        on the rest of the group (the thread stops after the file it is on).
        A host that :attr:`~cloudmanager.hosts.base.Host.can_batch` gets the
        group in one :meth:`~cloudmanager.hosts.base.Host.upload_batch` call,
        within the sum of the files' deadlines. No database writes: the batch
        records them.

        :return: ``[(index, Location or HostError, latency_ms or None)]`` for every item
        """
        done: List[_GroupOutcome] = []
        cond = threading.Condition()
        # "current": the item being uploaded, when it started and its
        # deadline. The caller is woken only at the end (a wake-up per file
        # costs more than a small file's copy); its deadline follows "current".
        state: _GroupState = {"finished": False, "abandoned": False,
                              "current": (time.monotonic(), self.deadline(host, items[0][3]))}

        def finish(index, file_hash, outcome, latency_ms, then=None):
            if isinstance(outcome, Location):
                log.debug("uploaded %s to %s", file_hash, host.name)
            else:
                log.warning("upload of %s failed on %s: %s", file_hash, host.name,
                            outcome.message)
                latency_ms = None
            with cond:
                done.append((index, outcome, latency_ms))
                if then is not None:  # the next item's clock starts now
                    state["current"] = then

        def one_by_one():
            for position, (index, path, file_hash, size, vet) in enumerate(items):
                started = time.monotonic()
                with cond:
                    if state["abandoned"]:
                        return
                    state["current"] = (started, self.deadline(host, size))
                outcome = self._guarded(host, lambda: self._send(host, path, file_hash, vet))
                ended = time.monotonic()
                then = (ended, self.deadline(host, items[position + 1][3])) \
                    if position + 1 < len(items) else None
                finish(index, file_hash, outcome, (ended - started) * 1000, then)

        def as_batch():
            limits = [self.deadline(host, size) for _, _, _, size, _ in items]
            started = time.monotonic()
            with cond:
                state["current"] = (started, None if None in limits else sum(limits))
            # Objects already there that the job's vet accepts are not sent.
            kept = [self._guarded(host, lambda: self._kept(host, file_hash, vet))
                    for _, _, file_hash, _, vet in items]
            send = [item for item, k in zip(items, kept) if k is None]
            outcomes = self._guarded(host, lambda: host.upload_batch(
                [(path, file_hash) for _, path, file_hash, _, _ in send])) if send else []
            if isinstance(outcomes, HostError):
                outcomes = [outcomes] * len(send)
            elif not isinstance(outcomes, list) or len(outcomes) != len(send):  # a host's bug
                outcomes = [TransientHostError(host.name, "upload_batch returned %.60r for %d "
                                               "files" % (outcomes, len(send)))] * len(send)
            outcomes = [o if isinstance(o, (Location, HostError)) else TransientHostError(
                host.name, "upload_batch gave %.60r for a file" % (o,)) for o in outcomes]
            sent = iter(outcomes)
            outcomes = [next(sent) if k is None else k for k in kept]
            latency_ms = (time.monotonic() - started) * 1000 / len(items)
            for (index, _, file_hash, _, _), outcome in zip(items, outcomes):
                finish(index, file_hash, outcome, latency_ms)

        def run():
            try:
                with self._slots[host.name]:
                    (as_batch if host.can_batch else one_by_one)()
            finally:
                with cond:
                    state["finished"] = True
                    cond.notify()

        self._calls.submit(self._metered(run))
        with cond:
            while not state["finished"]:
                started, limit = state["current"]
                if limit is None:
                    cond.wait()
                    continue
                remaining = started + limit - time.monotonic()
                if remaining <= 0:
                    state["abandoned"] = True
                    break
                cond.wait(remaining)
            results = list(done)
        for index, _, file_hash, _, _ in items[len(results):]:
            exc = HostUnavailableError(host.name, "upload of %s did not end within %.1f s; "
                                       "gave up" % (file_hash, self.deadline(host, 0)))
            log.warning("%s", exc.message)
            results.append((index, exc, None))
        return results

    @staticmethod
    def _guarded(host, call):
        """``call()``, or the :class:`HostError` it raised; a host's bug (any
        other exception) becomes a TransientHostError: it must not take the
        engine down."""
        try:
            return call()
        except HostError as exc:
            return exc
        except Exception as exc:
            return TransientHostError(host.name, repr(exc))

    # -- deadlines -------------------------------------------------------------

    @staticmethod
    def deadline(host, size=0):
        """Seconds the engine lets one call to ``host`` run, or None for no limit.

        It is the host's ``timeout``, plus :data:`DEADLINE_GRACE`, plus one
        second per :data:`DEADLINE_RATE` bytes transferred. A host whose
        ``timeout`` is None or not positive gets no deadline. It never exceeds
        what a thread can wait for (``threading.TIMEOUT_MAX``): an absurd
        size is a local matter, never an ``OverflowError`` counted against
        the host.
        """
        timeout = getattr(host, "timeout", None)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            return None
        return min(timeout + DEADLINE_GRACE + size / DEADLINE_RATE, threading.TIMEOUT_MAX / 2)

    def _call(self, host, what, deadline, fn, *args, cleanup=None):
        """Run ``fn(*args)`` under the host's connection slot, within ``deadline`` seconds.

        The call runs on one of the engine's call threads (see
        :class:`_CallPool`), so a host that never returns holds that thread,
        not the caller, and a new thread serves the next call. If the deadline passes, the
        caller gets :class:`~cloudmanager.errors.HostUnavailableError`; when
        the abandoned call ends at last, ``cleanup()`` runs (to remove what
        it wrote after the caller gave up, and give back its room). Exactly
        one of the two happens: the caller gets the call's outcome, or
        ``cleanup`` runs. A caller interrupted while it waits (a
        KeyboardInterrupt) gives the call up too.

        :raises HostUnavailableError: if the deadline passed (a :class:`_GaveUp`,
            which :meth:`_failed` turns into a plain one)
        """
        if deadline is None:
            with self._slots[host.name], meter.metering(self._meter()):
                return fn(*args)
        box = {}
        lock = threading.Lock()

        def run():
            try:
                with self._slots[host.name]:
                    box["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc
            with lock:
                abandoned = box.setdefault("done", True) == "abandoned"
            finished.set()
            if abandoned:
                log.info("%s on %s ended after the engine gave up on it", what, host.name)
                if cleanup is not None:
                    cleanup()

        finished = threading.Event()
        self._calls.submit(self._metered(run))
        try:
            finished.wait(deadline)
        except BaseException:
            with lock:  # unless it ended already, the call's cleanup is its own now
                box.setdefault("done", "abandoned")
            raise
        with lock:
            if box.setdefault("done", "abandoned") == "abandoned":
                raise _GaveUp(host.name, "%s did not end within %.1f s; gave up"
                              % (what, deadline))
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _failed(self, host: Host, exc: HostError, what: str,
                counts: bool = True) -> Tuple[HostError, Fact]:
        """Log a failure and return it with its fact; it ``counts`` toward the
        host's health unless it says nothing against the host (a missing or
        bad object, a local disk error). A missing or bad object was the
        host's answer: the fact says it is up (:attr:`Fact.answered`)."""
        if isinstance(exc, _GaveUp):  # internal to the engine
            exc = HostUnavailableError(exc.host, exc.message)
        log.warning("%s failed on %s: %s", what, host.name, exc.message)
        answered = isinstance(exc, (CorruptCopyError, HostNotFoundError))
        return exc, Fact(host.name, False, error=exc.message, counts=counts, answered=answered)

    # -- downloads -------------------------------------------------------------

    def download(self, file_hash: str, size: int, sources: Iterable[Tuple[str, str]],
                 dest_path: Optional[str] = None, last_resort: Iterable[Tuple[str, str]] = (),
                 ranked: bool = True, room: Optional[Callable[[], Room]] = None,
                 durable: bool = True, sealed: Optional[SealedObject] = None
                 ) -> DownloadResult:
        """Fetch a verified copy into ``dest_path`` from the first source that has one.

        :param sources: copies as ``(host_name, url)`` pairs; tried healthiest
            host first (at random among equals), hosts cooling down last
        :param dest_path: where the verified copy goes; each attempt writes a
            temp file beside it. None when ``room`` is given
        :param last_resort: copies to try, in the same order, only after every
            source failed (condemned ones: every byte is checked anyway)
        :param size: the recorded size; hosts stop writing past it, and a
            copy whose hash matches but size does not is refused without
            being called bad (the record, not the copy, is wrong)
        :param ranked: False keeps the given order and takes no probe (a check)
        :param room: for a destination whose space is bounded (the cache), in
            place of ``dest_path``: ``room()`` reserves ``size`` bytes and
            returns a :class:`Room`; an attempt writes beside its
            ``temp`` and renames the verified bytes to it. It is called
            before the first attempt, and again after each attempt the engine
            gave up on (past its deadline): that attempt keeps its room
            until its call ends at last and its files are removed (see
            :meth:`_download_one`). An attempt that failed otherwise has
            removed its files: its room serves the next one. The engine
            releases the rooms it holds when it fails; the one holding the
            copy is returned (:attr:`DownloadResult.room`)
        :param durable: False: hosts that write the file through
            :func:`~cloudmanager.fsutil.atomic_write` do not flush it; the
            caller makes its batch durable at once
            (:func:`~cloudmanager.fsutil.sync_filesystem`)
        :param sealed: for copies that are the file's encrypted object (every
            source on a host that :attr:`~cloudmanager.hosts.base.Host.can_stream`):
            each attempt decrypts the host's stream as it arrives into the
            temp file, and checks the ciphertext against this record and the
            plaintext against ``file_hash`` and ``size``
        :raises DownloadError: if no source delivered a good copy; its
            ``failures`` list each attempt's error, and its ``facts`` and
            ``verdicts`` what they found. Also when ``room()`` fails after an
            attempt was given up on (chained from its error)
        :raises CloudManagerError: what ``room()`` raised before the first
            attempt (:class:`~cloudmanager.errors.CacheFullError`): nothing was tried
        """
        if (dest_path is None) == (room is None):
            raise InvalidInputError("a download needs either a destination or a room")
        unreachable: List[str] = []
        plan = (self._plan_sources(sources, unreachable, ranked)
                + self._plan_sources(last_resort, unreachable, ranked))
        tries = _Tries()
        try:
            result = self._try_sources(file_hash, size, plan, dest_path, room, durable, tries,
                                       sealed)
            if result is not None:
                return result
        finally:
            if tries.held is not None:
                self._give_back(tries.held, "download of %s" % file_hash)
                tries.held = None
            if ranked:  # probes of hosts not tried go back
                self.health.release({h.name for h, _ in plan} - tries.tried)
        raise self._no_copy(file_hash, unreachable, tries)

    @staticmethod
    def _no_copy(file_hash: str, unreachable: Sequence[str], tries: _Tries) -> DownloadError:
        """The DownloadError of a file no attempt delivered."""
        reason = "no host delivered a good copy of %s" % file_hash
        if unreachable:
            reason += " (no configured host can reach copies on %s)" % ", ".join(
                sorted(set(unreachable)))
        return DownloadError(reason, tries.failures, tries.facts, tries.verdicts)

    def _try_sources(self, file_hash: str, size: int, plan: Sequence[Tuple[Host, Location]],
                     dest_path: Optional[str], room: Optional[Callable[[], Room]],
                     durable: bool, tries: _Tries, sealed: Optional[SealedObject] = None
                     ) -> Optional[DownloadResult]:
        """Attempt ``plan``'s copies in turn, as :meth:`download` does, adding
        to ``tries``: the result of the first that delivers, or None. The
        room the next attempt would have used is left in ``tries.held``.

        :raises CloudManagerError: what ``room()`` raised before anything was
            tried; :class:`DownloadError` if it failed after an attempt was
            given up on
        """
        for host, location in plan:
            if room is not None and tries.held is None:
                try:
                    tries.held = room()
                except CloudManagerError as exc:
                    if not tries.tried:  # nothing tried: the caller's own error
                        raise
                    raise DownloadError(
                        "no room for another download of %s while %d abandoned attempts "
                        "still hold theirs: %s" % (file_hash, tries.abandoned, exc),
                        tries.failures, tries.facts, tries.verdicts) from exc
            dest = tries.held.temp if tries.held is not None else dest_path
            assert dest is not None  # checked by download()
            # Temp names start with the destination's name, which in the
            # cache starts with the session token: reconciliation knows
            # whose they are.
            fd, temp = fsutil.open_temp(os.path.dirname(os.path.abspath(dest)),
                                        layout.download_prefix(dest))
            os.close(fd)
            # The attempt's room is its own until it returns, and stays
            # its call's if the engine gives up on it.
            attempt_room, tries.held = tries.held, None
            tries.tried.add(host.name)
            outcome = self._download_one(file_hash, size, host, location, dest, temp,
                                         attempt_room, durable, sealed)
            if outcome.abandoned:
                tries.abandoned += 1
                self._note_abandoned(attempt_room)
            else:
                tries.held = attempt_room
            tries.facts.append(outcome.fact)
            if outcome.verdict is not None:
                tries.verdicts.append(outcome.verdict)
            if outcome.error is None:
                log.info("downloaded %s from %s", file_hash, host.name)
                result = DownloadResult(location, tries.facts, tries.verdicts, tries.held)
                tries.held = None  # the caller's now
                return result
            tries.failures.append(outcome.error)
        return None

    @staticmethod
    def _note_abandoned(room: Optional[Room]) -> None:
        """Tell a room that the engine gave up on the attempt writing there: a
        room that lends part of a larger reservation learns that it must
        outlive its lender (see :class:`Room`)."""
        note = getattr(room, "abandoned", None)
        if callable(note):
            note()

    @staticmethod
    def _undurable(fetch: Callable[..., Any]) -> Callable[..., Any]:
        """``fetch`` run with :func:`~cloudmanager.fsutil.syncs_deferred`, in
        the thread that runs it (the call's own)."""
        def run(*args: Any) -> Any:
            with fsutil.syncs_deferred():
                return fetch(*args)
        return run

    def download_many(self, jobs: Sequence[DownloadJob], durable: bool = True,
                      stop: Optional[threading.Event] = None,
                      landed: Optional[Callable[[int, Any], None]] = None,
                      idle: Optional[Callable[[], None]] = None
                      ) -> List[Union[DownloadResult, CloudManagerError, None]]:
        """Fetch several files, each as :meth:`download` fetches one into its
        ``room``, several at once.

        Each job fails over from host to host on its own, its bytes checked
        against its hash. The hosts' connection slots bound the transfers to
        each host (``max_connections``) as for any call; the units of work
        in flight are as many as all the hosts' connections together (at
        most the engine's workers). A unit is one file, fetched as
        :meth:`download` fetches it, or a group of files below
        :data:`GROUP_FILE_MAX` bytes whose first copy is on a host that
        :attr:`~cloudmanager.hosts.base.Host.can_batch` (up to
        :data:`DOWNLOAD_GROUP` files and :data:`DOWNLOAD_GROUP_BYTES`),
        whose first attempts go to each host in one call
        (:meth:`~cloudmanager.hosts.base.Host.download_batch`, under one
        deadline that grows with the group's bytes), each file handed over
        as it lands; a file that fails there fails over alone. Nothing is written but the files: the
        caller records the results' facts and verdicts.

        If a job is interrupted (an exception that is not a
        :class:`~cloudmanager.errors.CloudManagerError`, such as a
        ``KeyboardInterrupt`` raised by the caller's progress callback), or
        the caller is while it waits, or ``landed`` raises, no further job
        starts; the running ones end (a hung call at its deadline), the rooms
        of the results not handed to ``landed`` are given back, and the
        exception is raised.

        :param durable: see :meth:`download`
        :param stop: once set, no further unit starts (the files of those
            running finish: a group's files all)
        :param landed: ``landed(index, result)``, called in the caller's
            thread as each job ends, with what the list will hold for it
        :param idle: called in the caller's thread when no job has ended for
            :data:`IDLE_AFTER` seconds while some run (to act on what landed
            so far without waiting for the next)
        :return: per job, in order: a :class:`DownloadResult` (its ``room``
            holds the verified copy, now the caller's), the
            :class:`~cloudmanager.errors.DownloadError` (or the room's
            :class:`~cloudmanager.errors.CacheFullError`) that stopped it, or
            None for a job not started because ``stop`` was set
        """
        results: List[Any] = [None] * len(jobs)
        # Lanes: as many workers as the hosts have connections in all, each
        # taking the next unit of work when it is done with one (no task
        # per file): a large file, or a group of small ones.
        lanes = max(1, min(sum(h.max_connections for h in self.hosts.values()),
                           self.workers))
        units = self._units(jobs, lanes)
        done: queue.SimpleQueue = queue.SimpleQueue()
        following = iter(units)
        take = threading.Lock()
        halt = threading.Event()  # a job was interrupted, or the caller was

        def lane() -> None:
            try:
                while not halt.is_set() and not (stop is not None and stop.is_set()):
                    with take:
                        unit = next(following, None)
                    if unit is None:
                        return
                    try:
                        if len(unit) > 1:
                            outcomes = self._download_group(
                                [(i, jobs[i]) for i in unit], durable,
                                lambda i, result: done.put((i, result, None)))
                        else:
                            outcomes = [(unit[0], self._download_job(jobs[unit[0]], durable))]
                    except BaseException as exc:
                        halt.set()
                        done.put((unit[0], None, exc))
                        return
                    for index, outcome in outcomes:
                        done.put((index, outcome, None))
            finally:
                done.put(None)  # this lane has ended

        running = 0
        for _ in range(min(lanes, len(units))):
            self._spawn(lane)
            running += 1
        handed: Set[int] = set()
        failure: Optional[BaseException] = None
        try:
            while running:
                try:
                    item = done.get(timeout=None if idle is None else IDLE_AFTER)
                except queue.Empty:
                    assert idle is not None
                    idle()
                    continue
                if item is None:
                    running -= 1
                    continue
                index, outcome, error = item
                if error is not None:
                    failure = failure or error
                    continue
                results[index] = outcome
                if failure is None and landed is not None:
                    handed.add(index)
                    landed(index, outcome)
        except BaseException as exc:  # interrupted while it waited, or landed() failed
            failure = failure or exc
            halt.set()
            while running:  # lanes end after their job (a hung call at its deadline)
                try:
                    item = done.get()
                except KeyboardInterrupt:
                    # Another Ctrl-C: the rooms must outlive the lanes writing
                    # in them (the caller frees them once this returns), and
                    # the process waits for the lanes' threads anyway.
                    continue
                if item is None:
                    running -= 1
                elif item[2] is None:
                    results[item[0]] = item[1]
        if failure is not None:
            for index, result in enumerate(results):
                if isinstance(result, DownloadResult) and result.room is not None \
                        and index not in handed:
                    self._give_back(result.room, "download of %s" % jobs[index].file_hash)
            raise failure
        return results

    def _groupable(self, job: DownloadJob) -> bool:
        """Whether ``job`` goes in a group: a file below :data:`GROUP_FILE_MAX`
        bytes whose first copy is on a host that takes groups cheaply
        (:attr:`~cloudmanager.hosts.base.Host.can_batch`: a folder). Files
        on other hosts (the network's: S3, WebDAV, plowshare) go one per
        call, so that each one hanging holds up no other file and ``stop``
        stops between files."""
        if job.size >= GROUP_FILE_MAX or not job.sources:
            return False
        host = self.hosts.get(job.sources[0][0])
        return host is not None and host.can_batch

    def _units(self, jobs: Sequence[DownloadJob], lanes: int) -> List[List[int]]:
        """The indexes of ``jobs`` in units of work for :meth:`download_many`'s
        lanes: a file that is not :meth:`_groupable` alone; the others in
        groups of consecutive files, up to :data:`DOWNLOAD_GROUP` files and
        :data:`DOWNLOAD_GROUP_BYTES` bytes, and no more files than spread
        them over every lane."""
        groupable = [self._groupable(job) for job in jobs]
        most = max(1, min(DOWNLOAD_GROUP, -(-sum(groupable) // lanes)))
        units: List[List[int]] = []
        group: List[int] = []
        total = 0
        for index, job in enumerate(jobs):
            if not groupable[index]:
                units.append([index])
                continue
            if group and (len(group) >= most or total + job.size > DOWNLOAD_GROUP_BYTES):
                units.append(group)
                group, total = [], 0
            group.append(index)
            total += job.size
        if group:
            units.append(group)
        return units

    def _download_job(self, job: DownloadJob, durable: bool
                      ) -> Union[DownloadResult, CloudManagerError]:
        """One job of :meth:`download_many` alone: its result or its error."""
        try:
            return self.download(job.file_hash, job.size, job.sources, None, job.last_resort,
                                 True, job.room, durable)
        except CloudManagerError as exc:
            return exc

    def _download_group(self, group: Sequence[Tuple[int, DownloadJob]], durable: bool,
                        deliver: Callable[[int, DownloadResult], None]
                        ) -> List[Tuple[int, Union[DownloadResult, CloudManagerError]]]:
        """Jobs of :meth:`download_many` as a group: each file's first attempt
        in one call per host (:meth:`Host.download_batch`), the files that
        failed there failing over one by one as :meth:`download` does.

        The hosts are ranked once for the group. Each file writes straight
        into its room's ``temp`` (a name nobody else uses), checked against
        its hash as :meth:`download` checks it, and is handed over as soon
        as it is (``deliver(index, result)``, from the call's thread), so
        that an object that hangs holds up no file before it in the group. A
        call the engine gives up on keeps the rooms of the files it had not
        delivered until it ends (its cleanup removes their files, then gives
        the rooms back).

        :return: ``[(index, outcome)]`` of the files not delivered: a
            :class:`DownloadResult` (its room the caller's) or the error
            that stopped the file
        :raises BaseException: an interruption (not a CloudManagerError):
            the files' rooms held here are given back first, except those
            of a call still running (the caller's rooms give them back)
        """
        members = [_Member(index, job) for index, job in group]
        for m in members:
            m.plan = self._plan_sources(m.job.sources, m.unreachable, False)
            m.believed = len(m.plan)
            m.plan += self._plan_sources(m.job.last_resort, m.unreachable, False)
        ranked: Set[str] = set()
        if any(len({h.name for h, _ in m.plan}) > 1 for m in members):
            # One ranking for the group, not a look at the breakers per file.
            hosts = {h.name: h for m in members for h, _ in m.plan}
            usable, cooling = self.health.ranked(hosts.values())
            order = {h.name: i for i, h in enumerate(usable + cooling)}
            ranked = set(order)
            for m in members:  # the believed copies first, then the last resorts
                m.plan = (sorted(m.plan[:m.believed], key=lambda p: order[p[0].name])
                          + sorted(m.plan[m.believed:], key=lambda p: order[p[0].name]))
        try:
            first: Dict[str, List[_Member]] = {}
            for m in members:
                if not m.plan:
                    continue
                try:
                    m.tries.held = m.job.room()
                except CloudManagerError as exc:  # nothing tried: the caller's own error
                    m.outcome = exc
                    continue
                first.setdefault(m.plan[0][0].name, []).append(m)
            for batch in first.values():
                self._group_attempt(batch[0].plan[0][0], batch, durable, deliver)
            for m in members:
                if m.outcome is not None or m.delivered:
                    continue
                tried = 1 if m.tries.tried else 0  # the group's attempt, if it made one
                try:
                    result = self._try_sources(m.job.file_hash, m.job.size, m.plan[tried:],
                                               None, m.job.room, durable, m.tries)
                except CloudManagerError as exc:
                    m.outcome = exc
                    continue
                if m.tries.held is not None:
                    self._give_back(m.tries.held, "download of %s" % m.job.file_hash)
                    m.tries.held = None
                m.outcome = result if result is not None else self._no_copy(
                    m.job.file_hash, m.unreachable, m.tries)
        except BaseException:
            for m in members:
                if m.delivered:  # the caller's
                    continue
                if isinstance(m.outcome, DownloadResult) and m.outcome.room is not None:
                    self._give_back(m.outcome.room, "download of %s" % m.job.file_hash)
                if m.tries.held is not None:
                    self._give_back(m.tries.held, "download of %s" % m.job.file_hash)
            raise
        finally:
            if ranked:  # probes of hosts not tried go back
                self.health.release(ranked - {n for m in members for n in m.tries.tried})
        return [(m.index, m.outcome) for m in members if not m.delivered]

    def _group_attempt(self, host: Host, members: Sequence[_Member], durable: bool,
                       deliver: Callable[[int, DownloadResult], None]) -> None:
        """The first attempt of ``members`` on ``host``, in one call. Each
        file verified as it lands is delivered (``deliver(index, result)``)
        at once, from the call's thread, and marked ``delivered``; every
        other member's ``tries`` learns what its attempt found. A member
        whose attempt failed keeps its room in ``tries.held`` (its file
        removed); one whose call the engine gave up on leaves it to the call.
        """
        rooms: List[Room] = []
        for m in members:
            assert m.tries.held is not None  # taken by _download_group
            rooms.append(m.tries.held)
            m.tries.held = None  # the attempt's own until it returns
            m.tries.tried.add(host.name)
        items = [(m.plan[0][1].url, room.temp, m.job.size) for m, room in zip(members, rooms)]
        what = "download of %d files" % len(members)
        lock = threading.Lock()
        given_up = [False]  # the engine gave up on the call: what is left is its cleanup's
        clock = [time.monotonic()]  # when the last file landed

        def landed(k: int, received: Any) -> None:  # in the call's thread
            m, room = members[k], rooms[k]
            now = time.monotonic()
            latency_ms, clock[0] = (now - clock[0]) * 1000, now
            try:
                self._verified(host, m.job.file_hash, m.job.size, room.temp, received)
            except Exception:  # told after the call, from the list it returns
                return
            location = m.plan[0][1]
            fact = Fact(host.name, True, latency_ms, downloaded=m.job.size)
            result = DownloadResult(location, m.tries.facts + [fact],
                                    m.tries.verdicts + [Verdict(location, "good")], room)
            with lock:
                if given_up[0]:
                    return
                m.delivered = True
            log.debug("downloaded %s from %s", m.job.file_hash, host.name)
            deliver(m.index, result)

        def cleanup() -> None:  # the engine gave up on the call, which ended at last
            for m, room in zip(members, rooms):
                if not m.delivered:
                    fsutil.remove_quietly(room.temp)
                    self._give_back(room, "download of %s" % m.job.file_hash)

        fetch = host.download_batch if durable else self._undurable(host.download_batch)
        try:
            got: Any = self._call(host, what, self.deadline(host, sum(i[2] for i in items)),
                                  fetch, items, landed, cleanup=cleanup)
        except _GaveUp as exc:
            with lock:
                given_up[0] = True
            # The call writes on: its files, and its rooms, are its cleanup's.
            for m, room in zip(members, rooms):
                if not m.delivered:
                    m.tries.abandoned += 1
                    self._note_abandoned(room)
                    self._tell(m, *self._download_failed(m.job.file_hash, host, m.plan[0][1],
                                                         exc))
            return
        except HostError as exc:
            got = [exc] * len(items)
        except Exception as exc:  # a host bug must not stop the failover
            got = [TransientHostError(host.name, repr(exc))] * len(items)
        except BaseException:
            # Interrupted: the rooms stay reserved (as download() leaves its
            # attempt's), given back by whoever lent them.
            for m, room in zip(members, rooms):
                if not m.delivered:
                    fsutil.remove_quietly(room.temp)
            raise
        if not isinstance(got, list) or len(got) != len(items):  # a host's bug
            got = [TransientHostError(host.name, "download_batch returned %.60r for %d files"
                                      % (got, len(items)))] * len(items)
        for m, room, received in zip(members, rooms, got):
            if m.delivered:
                continue
            location = m.plan[0][1]
            try:
                self._verified(host, m.job.file_hash, m.job.size, room.temp, received)
                # Right bytes the host did not report as they landed.
                m.tries.facts.append(Fact(host.name, True, 0.0, downloaded=m.job.size))
                m.tries.verdicts.append(Verdict(location, "good"))
                m.outcome = DownloadResult(location, m.tries.facts, m.tries.verdicts, room)
                continue
            except (HostError, IntegrityError, OSError) as exc:
                error: Exception = exc
            except Exception as exc:  # a host bug must not stop the failover
                error = TransientHostError(host.name, repr(exc))
            fsutil.remove_quietly(room.temp)
            m.tries.held = room  # for the next attempt
            self._tell(m, *self._download_failed(m.job.file_hash, host, location, error))

    @staticmethod
    def _tell(member: _Member, error: HostError, fact: Fact, verdict: Optional[Verdict]) -> None:
        """Add a failed attempt's findings to ``member``'s tries."""
        member.tries.failures.append(error)
        member.tries.facts.append(fact)
        if verdict is not None:
            member.tries.verdicts.append(verdict)

    @staticmethod
    def _verified(host: Host, file_hash: str, size: int, path: str, received: Any) -> None:
        """Check what a download wrote at ``path`` (``received``: what the host
        said of it, or its error) against ``file_hash`` and ``size``, and
        make the file private.

        :raises HostError: the host's own error for the file
        :raises IntegrityError: if the bytes are not the file's
        :raises TransientHostError: if they are, but not of the recorded size
        """
        if isinstance(received, HostError):
            raise received
        if isinstance(received, Received):
            # The host hashed the bytes as it wrote them: they are read once.
            got_hash, got_size = received
        else:
            # It could not (an external tool wrote the file), or it is a
            # host written before downloads returned a digest: a second read.
            got_hash, got_size = fsutil.hash_file(path)
        if got_hash != file_hash:
            raise IntegrityError("%s sent %d bytes hashing to %s" % (
                host.name, got_size, got_hash))
        if got_size != size:  # the right bytes: the recorded size is wrong
            raise TransientHostError(host.name, "the copy has %d bytes but %d are "
                                     "recorded; not using it" % (got_size, size))
        # Private, whatever mode the host's tool gave the file.
        os.chmod(path, fsutil.FILE_MODE)

    @staticmethod
    def _give_back(room: Room, what: str) -> None:
        """Release a room; a failure leaves it reserved (the safe side) until
        the cache's session ends, and is logged, never raised."""
        try:
            room.release()
        except Exception as exc:
            log.warning("could not give back the room of a %s: %s", what, exc)

    def _plan_sources(self, sources: Iterable[Tuple[str, str]], unreachable: List[str],
                      ranked: bool) -> List[Tuple[Host, Location]]:
        """``[(host, location)]`` for the sources a configured host can reach,
        healthiest first, cooling hosts last (unless not ``ranked``)."""
        plan = []
        for host_name, url in sources:
            host = self.host_for(host_name, url)
            if host is None:
                unreachable.append(host_name)
            else:
                plan.append((host, Location(host_name, url)))
        if ranked and len(plan) > 1:
            usable, cooling = self.health.ranked({h for h, _ in plan})
            order = {h.name: i for i, h in enumerate(usable + cooling)}
            plan.sort(key=lambda item: order[item[0].name])
        return plan

    def _download_one(self, file_hash: str, size: int, host: Host, location: Location,
                      dest_path: str, temp: str, room: Optional[Room] = None,
                      durable: bool = True, sealed: Optional[SealedObject] = None
                      ) -> _Attempt:
        """One attempt, written to ``temp`` (an empty file beside ``dest_path``),
        renamed to ``dest_path`` once verified.

        If the engine gives up on the call, the call's cleanup (when it ends
        at last) removes the temp file and then releases ``room``: the bytes
        it wrote stay within that room for as long as they exist, and the
        outcome says ``abandoned``.
        """
        what = "download of %s" % file_hash

        def cleanup() -> None:  # the engine gave up on the call, which ended at last
            fsutil.remove_quietly(temp)  # the host's own temp files are gone already
            if room is not None:
                self._give_back(room, what)

        fetch: Callable[..., Any] = host.download
        if sealed is not None:
            def fetch(url: str, into: str, max_bytes: int) -> Received:
                return self._fetch_sealed(host, sealed, file_hash, url, into, max_bytes)
        started = time.monotonic()
        try:
            received = self._call(host, what, self.deadline(host, size),
                                  fetch if durable else self._undurable(fetch),
                                  location.url, temp, size, cleanup=cleanup)
            self._verified(host, file_hash, size, temp, received)
            os.replace(temp, dest_path)
        except _GaveUp as exc:
            # The call writes on: its files, and its room, are its cleanup's.
            fsutil.remove_quietly(temp)
            return _Attempt(*self._download_failed(file_hash, host, location, exc),
                            abandoned=True)
        except (HostError, IntegrityError, OSError) as exc:
            fsutil.remove_quietly(temp)
            return _Attempt(*self._download_failed(file_hash, host, location, exc))
        except Exception as exc:  # a host bug must not stop the failover
            fsutil.remove_quietly(temp)
            return _Attempt(*self._download_failed(file_hash, host, location,
                                                   TransientHostError(host.name, repr(exc))))
        except BaseException:
            # Interrupted: ``room`` stays reserved (the caller does not get it
            # back), released by the call's cleanup if the call was given up.
            fsutil.remove_quietly(temp)
            raise
        fact = Fact(host.name, True, (time.monotonic() - started) * 1000, downloaded=size)
        # Bytes that match prove the copy good, whichever host served them.
        return _Attempt(None, fact, Verdict(location, "good"))

    @classmethod
    def _fetch_sealed(cls, host: Host, sealed: SealedObject, file_hash: str, url: str,
                      temp: str, size: int) -> Received:
        """An attempt's fetch of an encrypted copy: the host's stream, hashed as
        it is read, decrypted into ``temp`` (the attempt's empty temp file) as
        it arrives. The ciphertext is never stored. What the ``age`` command
        refuses is fetched again and decrypted without it before the copy is
        condemned (the command may be the broken part).

        :return: the plaintext's :class:`~cloudmanager.hosts.base.Received`
        :raises HostError: the host's, opening or reading (a broken transfer
            is not a bad copy); TransientHostError when the ciphertext is the
            recorded one but of another size (the record is wrong)
        :raises IntegrityError: if the ciphertext is not the recorded one, does
            not decrypt with the pool's key, or does not decrypt to the file
        """
        try:
            return cls._unseal(host, sealed, file_hash, url, temp, size, use_binary=True)
        except UnconfirmedIntegrityError as exc:
            log.info("%s: %s; fetching it again to decrypt it without the command", url, exc)
            return cls._unseal(host, sealed, file_hash, url, temp, size, use_binary=False)

    @staticmethod
    def _unseal(host: Host, sealed: SealedObject, file_hash: str, url: str, temp: str,
                size: int, use_binary: bool) -> Received:
        """One fetch and decryption of :meth:`_fetch_sealed`.

        Only what this process proves condemns the copy: the host's bytes
        hashed here differ from the recorded ciphertext, or pyrage refuses
        them, or they decrypt to another file without the ``age`` command.
        What the command alone refuses or makes is
        :class:`~cloudmanager.errors.UnconfirmedIntegrityError`.
        """
        flags = os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) \
            | getattr(os, "O_CLOEXEC", 0)
        with host.open_stream(url, sealed.size) as stream:
            reader = fsutil.HashingReader(stream, limit=sealed.size)
            fd = os.open(temp, flags)
            try:
                try:
                    plain_hash, plain_size = sealed.decrypt(reader, fd, size, sealed.size,
                                                            use_binary)
                    # All of the object is hashed, however much the decryption read.
                    while reader.read(fsutil.CHUNK):
                        pass
                except OverflowError:
                    if isinstance(reader.error, OverflowError):
                        raise TransientHostError(host.name, "%s is larger than the %d bytes "
                                                 "recorded for its ciphertext"
                                                 % (url, sealed.size)) from None
                    raise TransientHostError(host.name, "%s decrypts to more than the %d bytes "
                                             "recorded; not using it" % (url, size)) from None
                if getattr(host, "fsync", True) and not fsutil.syncs_are_deferred():
                    os.fsync(fd)
            finally:
                os.close(fd)
        digest = reader.hexdigest()
        if digest != sealed.sha256:  # hashed here: proof, whatever decrypted it
            raise IntegrityError("%s sent %d bytes of ciphertext hashing to %s, not the "
                                 "recorded %s" % (host.name, reader.count, digest, sealed.sha256))
        if reader.count != sealed.size:  # the right bytes: the recorded size is wrong
            raise TransientHostError(host.name, "the ciphertext has %d bytes but %d are "
                                     "recorded; not using it" % (reader.count, sealed.size))
        if plain_hash != file_hash:
            wrong = UnconfirmedIntegrityError if use_binary else IntegrityError
            raise wrong("it decrypts to %d bytes hashing to %s" % (plain_size, plain_hash))
        if plain_size != size:  # the file itself: its recorded size is wrong
            raise TransientHostError(host.name, "the file has %d bytes but %d are recorded; "
                                     "not using it" % (plain_size, size))
        return Received(plain_hash, plain_size)

    def _download_failed(self, file_hash: str, host: Host, location: Location,
                         exc: Exception) -> Tuple[HostError, Fact, Optional[Verdict]]:
        what = "download of %s" % file_hash
        if isinstance(exc, IntegrityError):
            exc = CorruptCopyError(host.name, str(exc))
        elif isinstance(exc, OSError):
            error, fact = self._failed(host, TransientHostError(host.name, "local error: %s"
                                                                % exc), what, counts=False)
            return error, fact, None
        if isinstance(exc, (CorruptCopyError, HostNotFoundError)):
            error, fact = self._failed(host, exc, what, counts=False)
            return error, fact, self._condemnation(file_hash, host, location, exc)
        assert isinstance(exc, HostError)
        error, fact = self._failed(host, exc, what)
        return error, fact, Verdict(location, "error")

    @staticmethod
    def _condemnation(file_hash: str, host: Host, location: Location,
                      exc: HostError) -> Optional[Verdict]:
        """The verdict a missing or corrupt object gives, on the word of the host
        that recorded the copy only."""
        state = "missing" if isinstance(exc, HostNotFoundError) else "bad"
        if host.name != location.host_name:
            log.warning("%s could not serve %s recorded by %s (%s); leaving the record as it is",
                        host.name, file_hash, location.host_name, exc.message)
            return None
        log.warning("the copy of %s on %s (%s) is %s", file_hash, host.name, location.url, state)
        return Verdict(location, state)

    # -- checks and deletes ----------------------------------------------------

    def check(self, file_hash: str, size: int, location: Location, deep: bool = False,
              scratch: Optional[str] = None) -> CheckResult:
        """Check one remote copy: cheaply if its host can, else by download.

        The cheap check compares the size the host reports, and the SHA-256
        when the host stores one. A deep check (or a host that cannot stat)
        downloads the copy into ``scratch`` and hashes it.

        :param location: the copy, a :class:`~cloudmanager.hosts.base.Location`
        :param scratch: a directory for deep checks' downloads
        """
        host = self.host_for(location.host_name, location.url)
        if host is None:
            return CheckResult("unreachable", [], [])
        if deep or not host.can_check:
            if scratch is None:
                raise InvalidInputError("a deep check needs a scratch directory")
            dest = os.path.join(scratch, file_hash)
            try:
                result = self.download(file_hash, size, [location], dest, ranked=False)
            except DownloadError as exc:
                verdict = exc.verdicts[0].state if exc.verdicts else "error"
                return CheckResult(verdict, exc.facts, exc.verdicts)
            finally:
                fsutil.remove_quietly(dest)
            return CheckResult("good" if result.verdicts else "error", result.facts,
                               result.verdicts)
        what = "check of %s" % file_hash
        started = time.monotonic()
        try:
            info = self._call(host, what, self.deadline(host), host.stat, location.url)
        except HostNotFoundError as exc:
            _, fact = self._failed(host, exc, what, counts=False)
            verdict = self._condemnation(file_hash, host, location, exc)
            return CheckResult(verdict.state if verdict else "error", [fact],
                               [verdict] if verdict else [])
        except HostError as exc:
            _, fact = self._failed(host, exc, what)
            return CheckResult("error", [fact], [Verdict(location, "error")])
        fact = Fact(host.name, True, (time.monotonic() - started) * 1000)
        if info.sha256 == file_hash and info.size != size:
            log.warning("%s holds %s with %d bytes, but %d are recorded: the record is wrong, "
                        "not the copy", host.name, file_hash, info.size, size)
            return CheckResult("error", [fact], [])
        if info.size != size or info.sha256 not in (None, file_hash):
            verdict = self._condemnation(file_hash, host, location, CorruptCopyError(
                host.name, "%d bytes, SHA-256 %s" % (info.size, info.sha256 or "not stored")))
            return CheckResult(verdict.state if verdict else "error", [fact],
                               [verdict] if verdict else [])
        if host.name != location.host_name:
            return CheckResult("intact", [fact], [])
        state = "good" if info.sha256 == file_hash else "intact"
        return CheckResult(state, [fact], [Verdict(location, state)])

    def listing_plan(self, host: Host, names: Sequence[str], objects: int
                     ) -> Optional[List[str]]:
        """The name prefixes whose listings check the copies named ``names``
        on ``host``, or None when looking at each copy alone costs less.

        A listing reads every object under its prefix, ``host.list_page`` per
        request. The plan takes the shortest prefix (so the fewest requests)
        at which the listings read at most :data:`LIST_READ_PER_COPY` objects
        per copy and take fewer requests than one look per copy; prefixes
        only where the host :attr:`~cloudmanager.hosts.base.Host.list_narrows`
        (a folder is read whole anyway). Fewer than :data:`LIST_MIN` copies
        are looked at alone. :attr:`listing` can force either way.

        :param host: the host the copies are on (one that :attr:`can_list`)
        :param names: the copies' object names (:meth:`Host.listed_name`)
        :param objects: about how many objects the host holds (the catalog's
            count of copies on it)
        :return: sorted prefixes of one length (``[""]``: the whole host), or None
        """
        if not host.can_list or not names or self.listing is False:
            return None
        if self.listing is None and len(names) < LIST_MIN:
            return None
        page = max(1, host.list_page)
        budget = LIST_READ_PER_COPY * len(names)
        for length in range((LIST_PREFIX_MAX if host.list_narrows else 0) + 1):
            prefixes = sorted({name[:length] for name in names})
            per_prefix = max(objects, 0) / 16 ** length
            reads = len(prefixes) * per_prefix
            requests = len(prefixes) * max(1, math.ceil(per_prefix / page))
            if self.listing or (reads <= budget and requests < len(names)):
                return prefixes
        return None

    def _list_prefix(self, host: Host, prefix: str) -> Tuple[Dict[str, ListedObject], Fact]:
        """Every object ``host`` lists under ``prefix``, a page per call (each
        under the host's connection slot and deadline), and the listing's fact.

        :raises HostError: if the listing failed (a :class:`_GaveUp` past the deadline)
        """
        what = "listing of %s%s*" % (host.url_prefix or host.name + ":", prefix)
        page = max(1, host.list_page)
        objects = host.list_objects(prefix)
        found: Dict[str, ListedObject] = {}
        while True:
            chunk = self._call(host, what, self.deadline(host), lambda: list(
                itertools.islice(objects, page)))
            found.update((o.name, o) for o in chunk)
            if len(chunk) < page:
                break
        # No latency: a listing's time (pages of a thousand objects) says
        # nothing of a transfer's, which the host's latency median ranks.
        return found, Fact(host.name, True)

    def check_listed(self, host: Host, items: Sequence[CheckItem], prefixes: Sequence[str]
                     ) -> Tuple[List[Optional[CheckResult]], List[Fact]]:
        """Check copies on ``host`` by listing it under ``prefixes``
        (:meth:`listing_plan`), in parallel up to its ``max_connections``.

        A copy the listing shows with its size (and its SHA-256, when the
        listing carries one) gets what :meth:`check` gives for the same
        answer to a HEAD: ``"good"`` when the listed SHA-256 is the copy's,
        else ``"intact"`` (its bytes unseen). A listing never condemns: a
        copy it does not show, or shows with another size or checksum, and
        every copy of a prefix whose listing failed, gets None, to be looked
        at alone (:meth:`check_each`), which condemns it or not exactly as
        a verify without listings would. Writes nothing.

        :param host: the host every item's copy is recorded under
        :param items: copies whose URLs ``host`` lists (:meth:`Host.listed_name`)
        :param prefixes: name prefixes covering every item's name
        :return: ``(results, facts)``: a :class:`CheckResult` or None per
            item, in order; the listings' facts (a failed listing's does not
            count against the host: a key may be allowed to read, not to list)
        """
        futures = {p: self._spawn(self._list_prefix, host, p) for p in dict.fromkeys(prefixes)}
        listed: Dict[str, Dict[str, ListedObject]] = {}
        facts: List[Fact] = []
        for prefix, future in futures.items():
            try:
                listed[prefix], fact = future.result()
            except Exception as exc:  # a host's bug too: its copies are looked at alone
                error = exc if isinstance(exc, HostError) else TransientHostError(host.name,
                                                                                 repr(exc))
                _, fact = self._failed(host, error, "listing of %r" % prefix, counts=False)
            facts.append(fact)
        lengths = sorted({len(p) for p in listed})
        results: List[Optional[CheckResult]] = []
        for item in items:
            name = host.listed_name(item.location.url)
            entry = None
            if name is not None and item.location.host_name == host.name:
                for length in lengths:
                    entry = listed.get(name[:length], {}).get(name)
                    if entry is not None:
                        break
            if entry is None or entry.size != item.size \
                    or entry.sha256 not in (None, item.digest):
                results.append(None)
                continue
            state = "good" if entry.sha256 == item.digest else "intact"
            results.append(CheckResult(state, [], [Verdict(item.location, state)]))
        return results, facts

    def check_each(self, items: Sequence[CheckItem], scratch: str,
                   skip: Callable[[Host], bool] = lambda host: False
                   ) -> Iterator[Tuple[int, CheckResult]]:
        """:meth:`check` each copy, in parallel: on each host, up to its
        ``max_connections`` at once (never more: each call also holds one of
        the host's connection slots), every host at the same time.

        Writes nothing; its threads never touch the database (``skip`` must
        not either: the caller's own answer, e.g. a set it keeps).

        :param items: the copies; a ``deep`` one is downloaded into ``scratch``
        :param scratch: a directory for downloads (each thread its own subdirectory)
        :param skip: ``skip(host)``: whether not to look at a copy on it now
            (its breaker opened): the copy gets ``"cooling"``
        :return: an iterator of ``(index in items, CheckResult)`` in the order
            the checks end; a copy no configured host reaches is
            ``"unreachable"``. Closing it early stops the threads after the
            checks they are on.
        """
        # (index, result), or an exception that is not a host's answer (a
        # KeyboardInterrupt from the caller's progress callback), to raise.
        done: queue.SimpleQueue[Union[Tuple[int, CheckResult], BaseException]] = \
            queue.SimpleQueue()
        per_host: Dict[str, Tuple[Host, queue.SimpleQueue[int]]] = {}
        for index, item in enumerate(items):
            host = self.host_for(item.location.host_name, item.location.url)
            if host is None:
                done.put((index, CheckResult("unreachable", [], [])))
                continue
            per_host.setdefault(host.name, (host, queue.SimpleQueue()))[1].put(index)
        stopped = threading.Event()

        def work(host: Host, todo: queue.SimpleQueue[int], room: str) -> None:
            while not stopped.is_set():
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                item = items[index]
                if item.deep:  # made while a result is owed: the caller's scratch lasts
                    with contextlib.suppress(OSError):  # else the download says why
                        os.makedirs(room, exist_ok=True)
                try:
                    if skip(host):
                        result = CheckResult("cooling", [], [])
                    else:
                        result = self.check(item.digest, item.size, item.location,
                                            deep=item.deep, scratch=room)
                except Exception as exc:  # a bug must not lose the other results
                    log.warning("check of %s failed: %r", item.location.url, exc)
                    result = CheckResult("error", [], [])
                except BaseException as exc:  # the caller's, raised where it waits
                    stopped.set()
                    done.put(exc)
                    return
                done.put((index, result))

        workers = []
        for number, (host, todo) in enumerate(per_host.values()):
            for k in range(min(max(1, host.max_connections), todo.qsize())):
                workers.append(self._spawn(work, host, todo,
                                           os.path.join(scratch, "%d-%d" % (number, k))))
        try:
            for _ in range(len(items)):
                got = done.get()
                if isinstance(got, BaseException):
                    raise got
                yield got
        finally:
            # Every result is in, or the caller stopped early: the threads end
            # after the checks they are on. Wait for them, so that none writes
            # into ``scratch`` after the caller removes it (a second Ctrl-C
            # stops the wait).
            stopped.set()
            concurrent.futures.wait(workers)

    def delete(self, location: Location) -> Tuple[bool, List[Fact]]:
        """Delete one remote copy if a configured host can.

        :return: ``(gone, facts)``: gone is True if it is deleted or was
            already missing; False if no configured host can delete it or the
            delete failed (logged)
        """
        host = self.host_for(location.host_name, location.url)
        if host is None or not host.can_delete:
            return False, []
        started = time.monotonic()
        what = "delete of %s" % location.url
        try:
            self._call(host, what, self.deadline(host), host.delete, location.url)
        except HostError as exc:
            _, fact = self._failed(host, exc, what)
            return False, [fact]
        return True, [Fact(host.name, True, (time.monotonic() - started) * 1000)]

    def close(self) -> None:
        """Wait for running transfers, then close every host."""
        self._pool.shutdown(wait=True)
        self._calls.close()
        for host in self.hosts.values():
            try:
                host.close()
            except Exception as exc:  # closing must not fail the caller
                log.debug("closing %s: %s", host.name, exc)


class _Plan:
    """One job of a batch: where it stands."""

    __slots__ = ("job", "needed", "running", "candidates", "successes", "failures")

    def __init__(self, job: UploadJob, usable: Sequence[Host]) -> None:
        self.job = job
        self.needed = job.target - len(job.holders)
        self.running = 0
        self.candidates = [h for h in usable if h.name not in job.holders]
        self.successes: List[Location] = []
        self.failures: List[HostError] = []


class _Batch:
    """One run of :meth:`UploadEngine.upload_many`: plans, groups per host, and
    the failures in a row that make it give up on a host."""

    def __init__(self, engine: UploadEngine, jobs: Sequence[UploadJob]) -> None:
        self.engine = engine
        self.usable, cooling = engine.health.ranked(list(engine.hosts.values()))
        self.cooling = [h.name for h in cooling]
        if self.cooling and jobs:
            log.info("not uploading %d files to %s: failed too often lately; cooling down",
                     len(jobs), ", ".join(self.cooling))
        self.plans = [_Plan(job, self.usable) for job in jobs]
        self.done = _CompletionQueue()
        self.pending: Dict[str, Tuple[Host, List[int]]] = {}  # groups being formed
        self.facts: List[Fact] = []
        self.streak: Dict[str, int] = {}  # failures in a row per host, in this batch
        self.given_up: Set[str] = set()
        self.in_flight = 0
        # Every connection of every host busy at once, within the pool's threads.
        self.most_in_flight = max(BATCH_IN_FLIGHT, min(
            engine.workers, sum(h.max_connections for h in self.usable)))
        self.scan = iter(range(len(self.plans)))

    def run(self) -> List[UploadResult]:
        self.fill()
        while self.in_flight:
            host, future = self.done.get()
            self.in_flight -= 1
            for index, outcome, latency_ms in future.result():
                self.settle(host, self.plans[index], index, outcome, latency_ms)
            for name in self.given_up & set(self.pending):  # not sent yet: elsewhere
                for index in self.pending.pop(name)[1]:
                    self.plans[index].running -= 1
                    self.want(index)
            self.fill()
        used = {f.host for f in self.facts}
        self.engine.health.release(h.name for h in self.usable if h.name not in used)
        cooling = self.cooling + sorted(self.given_up)
        results = [UploadResult(p.successes, p.failures, cooling, []) for p in self.plans]
        if results:
            results[0] = results[0]._replace(facts=self.facts)
        return results

    def settle(self, host: Host, plan: _Plan, index: int, outcome: object,
               latency_ms: Optional[float]) -> None:
        plan.running -= 1
        if isinstance(outcome, Location):
            plan.successes.append(outcome)
            self.facts.append(Fact(host.name, True, latency_ms, uploaded=plan.job.size))
            self.streak[host.name] = 0
            return
        assert isinstance(outcome, HostError)
        plan.failures.append(outcome)
        self.facts.append(Fact(host.name, False, error=outcome.message))
        self.streak[host.name] = self.streak.get(host.name, 0) + 1
        if self.engine.health.gives_up(self.streak[host.name]) \
                and host.name not in self.given_up:
            self.given_up.add(host.name)
            log.warning("%s failed %d times in a row; no more uploads to it in this batch",
                        host.name, self.streak[host.name])
        self.want(index)  # the next candidate

    def want(self, index: int) -> None:
        plan = self.plans[index]
        while plan.candidates and plan.running + len(plan.successes) < plan.needed:
            host = plan.candidates.pop(0)
            if host.name not in self.given_up:
                plan.running += 1
                self.pending.setdefault(host.name, (host, []))[1].append(index)

    def submit(self, partial: bool) -> None:
        for name in list(self.pending):
            host, indexes = self.pending[name]
            size = BATCH_GROUP_WHOLE if host.can_batch else BATCH_GROUP
            while indexes and (partial or len(indexes) >= size) \
                    and self.in_flight < self.most_in_flight:
                group, indexes[:] = indexes[:size], indexes[size:]
                items = [(i, self.plans[i].job.path, self.plans[i].job.file_hash,
                          self.plans[i].job.size, self.plans[i].job.vet) for i in group]
                self.done.watch(self.engine._spawn(self.engine._upload_group, host, items),
                                host)
                self.in_flight += 1
            if not indexes:
                del self.pending[name]

    def fill(self) -> None:
        for index in self.scan:
            self.want(index)
            self.submit(partial=False)
            if self.in_flight >= self.most_in_flight:
                return
        self.submit(partial=True)  # every job is planned: send the partial groups too


#: One file's outcome in :meth:`UploadEngine._upload_group`:
#: ``(index, Location or HostError, latency_ms or None)``.
_GroupOutcome = Tuple[int, Union[Location, HostError], Optional[float]]


class _GroupState(TypedDict):
    """What :meth:`UploadEngine._upload_group`'s thread and its caller share."""

    #: The thread is done with the group.
    finished: bool
    #: The caller gave up waiting; the thread stops after the file it is on.
    abandoned: bool
    #: ``(started, deadline in seconds or None)`` of the item being uploaded.
    current: Tuple[float, Optional[float]]


class _CompletionQueue:
    """Futures' results in the order they end: one queue, not a wait() over every
    future (which costs O(n) per call, O(n²) for a batch)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[
            Tuple[Host, concurrent.futures.Future[List[_GroupOutcome]]]] = queue.SimpleQueue()

    def watch(self, future: concurrent.futures.Future[List[_GroupOutcome]], tag: Host) -> None:
        def put(f: concurrent.futures.Future[List[_GroupOutcome]]) -> None:
            self._queue.put((tag, f))

        future.add_done_callback(put)

    def get(self) -> Tuple[Host, concurrent.futures.Future[List[_GroupOutcome]]]:
        return self._queue.get()


class _CallPool:
    """Long-lived daemon threads for host calls run under a deadline.

    A thread per call cost more than a small file's upload (a start and a
    join each time). Here a call goes to an idle thread if there is one, and
    to a new thread otherwise: a call the engine gave up on (a hung host)
    keeps its thread, and never makes a later call wait for one. Threads
    idle for :attr:`IDLE_SECONDS` end, so the pool shrinks back after a burst.
    """

    IDLE_SECONDS = 30.0

    def __init__(self) -> None:
        #: Calls for idle threads; None tells a thread to end.
        self._tasks: queue.SimpleQueue[Optional[Callable[[], object]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a task, not yet promised one
        self._closed = False

    def submit(self, fn):
        """Run ``fn()`` on a call thread; its exceptions are the caller's to catch."""
        with self._lock:
            if self._idle:
                self._idle -= 1  # promised to this task
                self._tasks.put(fn)
                return
        threading.Thread(target=self._work, args=(fn,), name="cloudmanager-call",
                         daemon=True).start()

    def _work(self, fn):
        while fn is not None:
            try:
                fn()
            except BaseException:  # pragma: no cover - callers catch their own
                log.exception("a host call failed outside its handler")
            fn = None
            with self._lock:
                if self._closed:
                    return
                self._idle += 1
            while True:
                try:
                    fn = self._tasks.get(timeout=self.IDLE_SECONDS)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._idle:  # not promised a task: end
                            self._idle -= 1
                            return
                    # promised a task that is on its way: wait for it

    def close(self):
        """Let idle threads end (busy ones end after their call)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._tasks.put(None)
