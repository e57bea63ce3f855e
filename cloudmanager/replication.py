"""Replication: the copy state machine, redundancy targets, sync, verify and removal.

This module is the only writer of copy rows (``uploads``, ``tombstones``,
``removals``) and of the upload queue, through :mod:`cloudmanager.db.copies`
and :mod:`cloudmanager.db.queue`. The engine moves bytes and reports facts;
this module decides what they mean and records them, with the host health
they imply, in one transaction per operation.

The states of a copy, and what moves it (see also docs/ARCHITECTURE.md)::

    (none) --upload failed--------------------------> pending
    (none), pending, claimed, condemned --upload----> good
    (none) --import of another node's record--------> claimed
    claimed, suspect --bytes seen matching----------> good
    good, claimed --host errors, SUSPECT_AFTER times> suspect
    good, claimed, suspect --bytes do not match-----> bad
    good, claimed, suspect --host says not there----> missing
    bad, missing --bytes seen matching--------------> good
    any --this node deleted it----------------------> deleted (+ a tombstone)

The guarantees:

- Only ``good`` copies (made or checked by this node) count as holders for
  any decision that could leave a file with no real copy: lifting the
  implicit pin of a cached file, skipping a host on upload, meeting the
  redundancy target.
- A condemned copy (suspect, bad, missing) is looked at again by later
  verifies, after a back-off that doubles per failed look
  (:data:`RECHECK_BASE` up to :data:`RECHECK_MAX`), and downloads try it as a
  last resort; when its bytes match it is good again.
- Only the host a copy is recorded under can condemn it.
- A copy this node deleted is not brought back by another node's older
  claim (tombstones), and :meth:`Replicator.remove` deletes only objects
  named by the file's hash, never a copy made after the removal began.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat as stat_module
import tempfile
import threading
import time
from typing import (
    TYPE_CHECKING,
    AbstractSet,
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from . import fsutil, meter
from .db import FileDatabase
from .db.copies import CopyKey, CopyToCheck, ObjectMeta
from .engine import (
    CheckItem, CheckResult, Streamed, UploadEngine, UploadJob, UploadResult, Verdict, Vet,
)
from .errors import (
    CloudManagerError, HostError, IntegrityError, InvalidInputError, UploadError,
)
from .health import Fact, Health
from .hosts.base import Host, Location, ObjectInfo, Received

if TYPE_CHECKING:
    from .crypto import PoolKey, SealingStream

log = logging.getLogger(__name__)

#: Seconds before a condemned copy is looked at again; doubled per failed look.
RECHECK_BASE = 60.0
#: The longest back-off between looks at a condemned copy.
RECHECK_MAX = 7 * 86400.0
#: Failed looks in a row (host errors) after which a copy is suspect.
SUSPECT_AFTER = 3
#: Copies a verify records per transaction (its looks' verdicts and facts).
VERIFY_BATCH = 256
#: Seconds a lease on a piece of work lasts: past it, another process or
#: node may take the work over (its holder was killed, or is stuck). Longer
#: than a batch of uploads takes; an upload that outlasts it may be sent
#: twice, which costs time, never a copy.
LEASE_S = 600.0
#: Seconds after which a removal still in progress is taken for dead by any
#: node (one on another node that never came back); a day, far beyond any
#: host delete.
REMOVAL_MAX_AGE = 24 * 3600.0


class SyncSummary(NamedTuple):
    """What :meth:`Replicator.sync` did."""

    checked: int
    uploads: int
    complete: int
    short: int


class HashLocks:
    """Per-hash locks of this process: fetches, uploads to hosts and removal of
    one file never interleave. Re-entrant; taken in sorted order, so two
    callers never deadlock; an entry lives only while someone holds or waits."""

    def __init__(self) -> None:
        self._held: Dict[str, Tuple[threading.RLock, int]] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, hashes: Iterable[str]) -> Iterator[None]:
        """Hold the locks of ``hashes`` for the ``with`` block."""
        ordered = sorted(set(hashes))
        with self._guard:
            locks = []
            for file_hash in ordered:
                lock, users = self._held.get(file_hash) or (threading.RLock(), 0)
                self._held[file_hash] = (lock, users + 1)
                locks.append(lock)
        taken = 0
        try:
            for lock in locks:
                lock.acquire()
                taken += 1
            yield
        finally:
            for lock in locks[:taken]:
                lock.release()
            with self._guard:
                for file_hash in ordered:
                    lock, users = self._held[file_hash]
                    if users == 1:
                        del self._held[file_hash]
                    else:
                        self._held[file_hash] = (lock, users - 1)


#: ``source_of(file_hash, size)``: a context manager yielding a local path
#: with the file's verified bytes (the cached copy, or a fetched one).
SourceOf = Callable[[str, int], ContextManager[str]]


class Replicator:
    """The copy rules of a pool, over its database, engine and health.

    :param db: the pool's database
    :param engine: the engine that moves bytes
    :param health: the circuit breaker, which records the engine's facts
    :param redundancy: the target number of good copies per file
    :param owner: this instance's session name (for removals in progress)
    :param cached_paths: ``cached_paths(hashes)``: ``{hash: path}`` of those
        the cache holds (one lookup for a batch)
    :param source_of: see :data:`SourceOf`
    :param key: the pool's :class:`~cloudmanager.crypto.PoolKey`: every copy
        made is its ciphertext, under its keyed name; None for plaintext
    :param scratch: ``scratch(size)``, room for the ciphertext on its way
        (:meth:`cloudmanager.cache.store.CacheStore.scratch`)
    """

    def __init__(self, db: FileDatabase, engine: UploadEngine, health: Health,
                 redundancy: int, owner: str,
                 cached_paths: Callable[[Sequence[str]], Dict[str, str]],
                 source_of: SourceOf, key: Optional[PoolKey] = None,
                 scratch: Optional[Callable[[int], ContextManager[Callable[[int], str]]]] = None
                 ) -> None:
        self.db = db
        self.engine = engine
        self.health = health
        self.redundancy = redundancy
        self.owner = owner
        #: This node's id: the owner name's first part.
        self.node = owner.split(":", 1)[0]
        self.locks = HashLocks()
        self._cached_paths = cached_paths
        self._source_of = source_of
        #: The pool's key: copies are sealed (encrypted) with it, or None.
        self.key = key
        self._scratch = scratch
        #: ``{kind: hashes}`` whose leases a running block holds and has not
        #: released yet (one set per kind; blocks never overlap on a hash, the
        #: hash locks see to that).
        self._unreleased: Dict[str, Set[str]] = {}

    # -- the queue, from the cache's own transactions ------------------------------

    def queue(self, conn, hashes: Iterable[str], when: float, lease: bool = False) -> None:
        """Queue new files for upload, inside the caller's transaction (the one
        that publishes them in the cache and records them).

        :param lease: this process replicates them at once: take their
            ``replicate`` leases in the same transaction, so no other process
            or node sends them meanwhile (and no extra transaction is spent)
        """
        hashes = list(hashes)
        self.db.queue.add(conn, hashes, when, known=True, node=self.node)
        if lease:
            # replicate() reads which leases it holds before it acts.
            self.db.leases.take(conn, "replicate", hashes, self.owner, when + LEASE_S, when,
                                report=False)

    def merge(self, records: Sequence) -> Tuple[int, List[str]]:
        """Merge imported records: new files, and their copies as claims (see
        :meth:`cloudmanager.db.records.Records.merge`); a claim of a copy this
        node deleted or condemned does not change what it knows.

        :return: ``(changed, refused)``
        """
        return self.db.records.merge(records)

    # -- recording --------------------------------------------------------------------

    def _reprotect(self, conn, hashes: Iterable[str]) -> None:
        """Bring the cache index's ``protected`` flags of ``hashes`` in line with
        their good copies (inside the transaction that changed them)."""
        hashes = set(hashes)
        if not hashes:
            return
        protected = self.db.files.protected_among(conn, hashes)
        self._set_protected(protected, True)
        self._set_protected(hashes - protected, False)

    def _set_protected(self, hashes: Set[str], flag: bool) -> None:
        """Set the cache index's ``protected`` flags, from inside the caller's
        catalog transaction.

        In one SQLite file, it is that transaction. With the catalog on a
        server, a file is unprotected at once, but protected only once the
        catalog has committed the good copy that protects it: the index never
        runs ahead of the catalog (eviction also asks the catalog, for what
        other nodes changed; see the cache store). A crash in between leaves
        the file pinned, the safe side.
        """
        if not hashes:
            return

        def write() -> None:
            with self.db.local.transaction() as local:
                self.db.cache_index.set_protected(local, hashes, flag)

        on_commit = getattr(self.db.catalog, "on_commit", None)
        if flag and self.db.shared and on_commit is not None:
            on_commit(write)
        else:
            write()

    def apply(self, verdicts: Iterable[Verdict], facts: Iterable[Fact] = (),
              file_hash: Optional[str] = None, hashes: Optional[Dict[Location, str]] = None,
              when: Optional[float] = None, strike: bool = False,
              unseen: Iterable[CopyKey] = ()) -> None:
        """Record what transfers and checks proved about copies, and the host
        health they imply, in one transaction.

        :param file_hash: the file every verdict is about, or
        :param hashes: ``{location: file_hash}`` when they are about several
        :param strike: count an ``"error"`` verdict (the host did not answer)
            against its copy, toward suspect; only a look made to judge the
            copy (verify) does, not a download that failed for its own reasons
        :param unseen: copies a verify could not look at (no host reaches
            them, or theirs is cooling down): noted as looked at, so that a
            budgeted verify moves on; it proves nothing against them
        """
        when = time.time() if when is None else when
        good: List[CopyKey] = []
        intact: List[CopyKey] = []
        condemned: List[Tuple[str, str, str, str]] = []
        errors: List[CopyKey] = []
        touched: Set[str] = set()
        for verdict in verdicts:
            h = file_hash if hashes is None else hashes[verdict.location]
            if h is None:
                continue
            key = (h, verdict.location.host_name, verdict.location.url)
            touched.add(h)
            if verdict.state == "good":
                good.append(key)
            elif verdict.state == "intact":
                intact.append(key)
            elif verdict.state in ("bad", "missing"):
                condemned.append(key + (verdict.state,))
            elif verdict.state == "error" and strike:
                errors.append(key)
        facts = list(facts)
        with self.db.catalog.transaction() as conn:
            copies = self.db.copies
            copies.record_good(conn, good, int(when), checked=True)
            copies.seen_intact(conn, intact, when)
            copies.condemn(conn, condemned, when, RECHECK_BASE, RECHECK_MAX)
            copies.strike(conn, errors, when, SUSPECT_AFTER, RECHECK_BASE, RECHECK_MAX)
            copies.note_checked(conn, unseen, when)
            if condemned or errors:
                # Fewer good copies now, maybe: sync restores the target.
                self.db.queue.add(conn, {c[0] for c in condemned} | {e[0] for e in errors},
                                  when)
            self._reprotect(conn, touched)
            self.health.record(facts)

    def _record_rounds(self, rounds: Sequence[Tuple[str, Set[str], int, UploadResult]],
                       facts: Iterable[Fact] = (), settled: Iterable[str] = (),
                       release: Iterable[str] = (),
                       objects: Optional[Dict[str, ObjectMeta]] = None,
                       conn: Optional[Any] = None, fresh: AbstractSet[str] = frozenset()
                       ) -> List[Tuple[str, int, int, str]]:
        """Record upload rounds ``[(hash, holders, target, result)]`` in one
        transaction: good copies, pending ones, the queue, protection, health.

        Copies made of a file whose removal is in progress (by another process)
        are not recorded: the removal may be deleting them, so they must not
        unpin the file; it stays queued (and pinned, if cached), and
        :meth:`upload_source` refuses a file it could not keep.

        :param settled: more files to take off the queue (at target already)
        :param release: files whose ``replicate`` leases this round ends
        :param objects: ``{hash: ObjectMeta}``: the ciphertext each file's new
            copies hold (an encrypted pool); None: the copies are the plaintext
        :param conn: record inside this transaction (a publish's, see
            :meth:`sending`) rather than in one of its own
        :param fresh: files the enclosing transaction adds to the pool: none
            was queued, a short one is queued as pending on this node, and
            their cache rows, written after, take their protection from the
            copies recorded here (no flag is set for them)
        :return: ``[(hash, copies, target, why)]`` of files still short; a
            file whose removal is in progress has ``why`` starting with
            ``"removal in progress"``
        """
        now = time.time()
        shorts = []
        settled = list(settled)
        outer = conn is not None
        with contextlib.nullcontext(conn) if conn is not None \
                else self.db.catalog.transaction() as conn:
            removing = self.db.copies.removing(conn, [r[0] for r in rounds])
            good, pending, short_hashes = [], [], []
            for file_hash, holders, target, result in rounds:
                made = [(file_hash, loc.host_name, loc.url) for loc in result.successes]
                if file_hash in removing:
                    log.warning("%s is being removed by another process; its new copies "
                                "are not trusted until that ends", file_hash)
                    short_hashes.append(file_hash)
                    shorts.append((file_hash, len(holders), target,
                                   "removal in progress elsewhere"))
                    continue
                good += made
                pending += [(file_hash, f.host) for f in result.failures]
                copies = len(holders) + len(result.successes)
                if copies >= target:
                    settled.append(file_hash)
                else:
                    short_hashes.append(file_hash)
                    shorts.append((file_hash, copies, target, short_reason(result)))
            # The hosts hold copies now: no marker, no pool.
            for host_name in {loc.host_name for r in rounds for loc in r[3].successes}:
                host = self.engine.hosts.get(host_name)
                if host is not None and host.can_mark:
                    host.require_marker = True
            kept = getattr(objects, "kept", {})
            made_objects = None if objects is None else \
                {g: kept.get(g) or objects[g[0]] for g in good if g in kept or g[0] in objects}
            self.db.copies.record_good(conn, good, int(now), objects=made_objects)
            self.db.copies.record_pending(conn, pending, int(now))
            self.db.queue.remove(conn, [h for h in settled if h not in fresh])
            self.db.queue.add(conn, [h for h in short_hashes if h not in fresh], now)
            self.db.queue.add(conn, [h for h in short_hashes if h in fresh], now, known=True,
                              node=self.node)
            for file_hash, _, _, why in shorts:
                self.db.queue.note_failure(conn, file_hash, why[:500])
            # A good copy made protects its file; a round that made none took
            # nothing away, so no other flag changes.
            self._set_protected({g[0] for g in good if g[0] not in fresh}, True)
            released = list(release)
            self.db.leases.release(conn, "replicate", released, self.owner)
            if not outer:  # else the caller notes them once its transaction commits
                self._released(released)
            self.health.record(list(facts) + [f for r in rounds for f in r[3].facts])
        for file_hash, copies, target, why in shorts:
            log.warning("%s has %d of %d copies: %s", file_hash, copies, target, why)
        return shorts

    # -- leases ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _leases(self, kind: str, hashes: Sequence[str]) -> Iterator[List[str]]:
        """Hold ``kind`` leases on ``hashes``: yields those this process holds
        (taken now, or before: a publish that queued them), in order; another
        live holder's are left to it. Leases the block did not release (by
        :meth:`_record_rounds`) are released at its end, best effort: one
        left behind only runs out."""
        hashes = list(dict.fromkeys(hashes))
        now = time.time()
        mine = self.db.leases.owned(kind, hashes, self.owner, now)
        wanted = [h for h in hashes if h not in mine]
        if wanted:
            with self.db.catalog.transaction() as conn:
                mine |= self.db.leases.take(conn, kind, wanted, self.owner, now + LEASE_S, now)
        others = len(hashes) - len(mine)
        if others:
            log.info("%d of %d files are being worked on by another process or node; "
                     "left to it", others, len(hashes))
        held = [h for h in hashes if h in mine]
        unreleased = self._unreleased.setdefault(kind, set())
        unreleased.update(held)
        try:
            yield held
        finally:
            left = [h for h in held if h in unreleased]
            unreleased.difference_update(held)
            if left:
                try:
                    with self.db.catalog.transaction() as conn:
                        self.db.leases.release(conn, kind, left, self.owner)
                except CloudManagerError as exc:
                    log.info("leases of %d files not released (%s); they run out", len(left),
                             exc)

    def _released(self, hashes: Iterable[str]) -> None:
        """Note ``replicate`` leases released inside a recording transaction."""
        self._unreleased.setdefault("replicate", set()).difference_update(hashes)

    @contextlib.contextmanager
    def _sealed(self, jobs: List[UploadJob]
                ) -> Iterator[Tuple[List[UploadJob], Optional[Dict[str, ObjectMeta]]]]:
        """The jobs as the hosts get them: unchanged without a key (and no
        objects); with one, each file encrypted once, into room the cache
        gives for the purpose, and sent under its keyed name, with
        ``{hash: ObjectMeta}`` of the ciphertexts. The ciphertext files go
        when the block ends."""
        if self.key is None or not jobs:
            yield jobs, None
            return
        assert self._scratch is not None, "an encrypted pool needs room to encrypt in"
        # crypto is imported where a key is used: a pool without one never loads it.
        from .crypto import ciphertext_size_max

        key = self.key
        with self._scratch(sum(ciphertext_size_max(j.size) for j in jobs)) as path_of:
            sealed, objects = [], SealedObjects()
            vet = self._vet(objects)
            for k, job in enumerate(jobs):
                temp = path_of(k)
                digest, size = key.encrypt_file(job.path, temp)
                name = key.object_name(job.file_hash)
                objects.plain[name] = (job.file_hash, job.size)
                sealed.append(job._replace(path=temp, file_hash=name, size=size, vet=vet))
                objects[job.file_hash] = ObjectMeta(digest, size, key.key_id)
            yield sealed, objects

    def _streams(self, jobs: Sequence[UploadJob]) -> bool:
        """Whether a round is one large cached file of an encrypted pool that
        one more host needs, and a host that lacks it can stage: it is then
        sealed as it streams to that host (:meth:`_send_streamed`), with no
        work file and no second copy of the ciphertext."""
        if self.key is None or len(jobs) != 1:
            return False
        from .crypto import AGE_BINARY_MIN

        job = jobs[0]
        return (job.size >= AGE_BINARY_MIN and job.target - len(job.holders) == 1
                and any(h.can_stage for n, h in self.engine.hosts.items()
                        if n not in job.holders))

    def _send_streamed(self, job: UploadJob
                       ) -> Tuple[List[UploadResult], SealedObjects]:
        """Send one cached file to one more host, sealed as the host reads it
        (:class:`~cloudmanager.crypto.SealingStream`; the ``age`` command
        reads the cached file itself, which was verified when it came in, as
        a plain upload sends it unhashed), the ciphertext hashed by the
        engine on the way, then published under the file's keyed name. A
        host holding an object under the name that the vet accepts is kept
        instead (:meth:`_vet`); one that fails is followed by the next.

        :return: ``([result], objects)`` as :meth:`_sealed` gives them
        """
        from .crypto import SealingStream, ciphertext_size_max

        key = self.key
        assert key is not None
        name = key.object_name(job.file_hash)
        objects = SealedObjects()
        objects.plain[name] = (job.file_hash, job.size)
        vet = self._vet(objects)
        failures: List[HostError] = []
        facts: List[Fact] = []
        tried = set(job.holders)
        while True:
            first = self.engine.stream(
                job.path, job.size, exclude=tried,
                transform=lambda raw: SealingStream(key, raw, job.size, hashed=False),
                limit=ciphertext_size_max(job.size), name=name, vet=vet)
            failures += first.failures
            facts += first.facts
            made: List[Location] = []
            if first.kept is not None:
                made = [first.kept]
            elif first.streamed is not None:
                streamed = first.streamed
                tried.add(streamed.host.name)
                try:
                    outcome, fact = self.engine.publish(streamed, name)
                    facts.append(fact)
                    if isinstance(outcome, HostError):
                        failures.append(outcome)
                        continue  # the next host seals it again
                    made = [outcome]
                    objects[job.file_hash] = ObjectMeta(streamed.file_hash, streamed.size,
                                                        key.key_id)
                finally:
                    self.engine.abort(streamed)  # nothing once published
                    self.health.release([streamed.host.name])
            return [UploadResult(made, failures, first.cooling, facts)], objects

    def _vet(self, objects: SealedObjects) -> Vet:
        """The :data:`~cloudmanager.engine.Vet` of an encrypted pool's uploads:
        an object a host holds already under a file's keyed name (made by
        another node with this key, whose catalog we never saw) is kept, not
        sent again over it, if it is a copy of the file. That is proved by
        fetching it once (into room the cache gives), hashing it (the
        ciphertext's SHA-256 and size, as a copy made here records them, so
        that a cheap verify stays what it is) and decrypting it to the
        file's hash and size; the plaintext goes nowhere. Anything else under
        the name (another size, bytes that do not decrypt to the file) is
        replaced by the upload, as before."""
        from .crypto import ciphertext_size_max

        key = self.key
        assert key is not None

        def vet(host: Host, name: str, location: Location, info: ObjectInfo) -> bool:
            file_hash, size = objects.plain[name]
            if not size <= info.size <= ciphertext_size_max(size):
                log.info("%s holds %d bytes under %s's name, not a copy of it; replacing them",
                         host.name, info.size, file_hash)
                return False
            assert self._scratch is not None
            # Room in the cache (or a private temp directory when it is full).
            with self._scratch(info.size) as path_of:
                fetched = path_of(0)
                try:
                    received = host.download(location.url, fetched, max_bytes=info.size)
                    digest, got = received if isinstance(received, Received) \
                        else fsutil.hash_file(fetched)
                    plain = key.decrypt_file(fetched, os.devnull, limit=size)
                except (HostError, IntegrityError, OverflowError, OSError) as exc:
                    log.info("%s holds an object under %s's name that is not a copy of it "
                             "(%s); replacing it", host.name, file_hash, exc)
                    return False
                finally:
                    fsutil.remove_quietly(fetched)
            if plain != (file_hash, size):
                log.info("%s holds an object under %s's name that decrypts to another file; "
                         "replacing it", host.name, file_hash)
                return False
            objects.kept[(file_hash, location.host_name, location.url)] = \
                ObjectMeta(digest, got, key.key_id)
            log.info("%s holds %s already (sealed by a node with this key); not sent again",
                     host.name, file_hash)
            return True

        return vet

    def _plan(self, holders: Set[str]) -> Tuple[Set[str], int, bool]:
        """``(holders, target, settled)`` for a file with good copies on ``holders``:
        settled at the target, or when no configured host lacks a good copy."""
        settled = len(holders) >= self.redundancy or not set(self.engine.hosts) - holders
        return holders, self.redundancy, settled

    def replicate(self, hashes: Sequence[str]) -> int:
        """Upload files until each has its target of good copies.

        Cached files go to the hosts as one engine batch; the others one by
        one, from a copy fetched for the purpose. One transaction records
        the batch. Files at target leave the queue; the others stay on it.

        :return: the number of new copies
        """
        with self.locks.hold(hashes), self._leases("replicate", hashes) as hashes:
            states = self.db.copies.replication_states(hashes)
            cached = self._cached_paths([h for h in hashes if h in states])
            jobs, plans, settled, alone = [], [], [], []
            for file_hash in hashes:
                state = states.get(file_hash)
                if state is None:
                    continue
                holders, target, done = self._plan(set(state.good))
                if done:
                    if holders:
                        settled.append(file_hash)
                    continue
                path = cached.get(file_hash)
                if path is None:
                    alone.append((file_hash, state.size))
                    continue
                jobs.append(UploadJob(path, file_hash, state.size, frozenset(holders), target))
                plans.append((file_hash, holders, target))
            results, objects = self._send(jobs)
            rounds = [(h, holders, target, result)
                      for (h, holders, target), result in zip(plans, results)]
            if rounds or settled:
                self._record_rounds(rounds, settled=settled,
                                    release=set(hashes) - {h for h, _ in alone},
                                    objects=objects)
            made = sum(len(r[3].successes) for r in rounds)
        for file_hash, size in alone:
            try:
                made += self.replicate_from_source(file_hash, size)
            except (OSError, CloudManagerError) as exc:
                # One file with no good copy left must not hold back the rest.
                log.error("cannot top up %s: %s; it stays queued", file_hash, exc)
        return made

    @contextlib.contextmanager
    def sending(self, files: Dict[str, Tuple[str, int]]
                ) -> Iterator[Callable[[Any, AbstractSet[str], AbstractSet[str]], Set[str]]]:
        """Send files not yet published to the hosts, from where they wait
        (a batch's temp files), to be recorded with their publish.

        For an upload that replicates at once: the files are published, and
        their copies, queue rows and cache rows written, in the publish's one
        transaction, so a file sent in full is never queued or leased, and
        its cache row is written once, protected. Files the pool already
        knows follow :meth:`replicate`'s rules (a lease, the good copies
        there are). A file another process holds the lease of is left to it.

        The block runs the publish with ``record(conn, in_pool, inserted)``,
        which records, inside ``conn``'s transaction, the copies of those of
        the files whose rows ``in_pool`` names (``inserted``: the rows the
        publish itself added), queueing the short ones as pending on this
        node, and returns the hashes that now have a good copy. What the
        block does not publish stays on the hosts unrecorded (an object
        named by its hash, which a later upload reuses).

        A removal by another process while the files were on their way may
        have deleted what was sent (the same object name). So no copy made
        is trusted, and the file is queued and left pinned for sync to send
        again, when the file had a removal in progress as the sending began,
        was known then but is added anew by the publish, or when a copy
        made has a tombstone from since then (less :data:`LEASE_S`, for the
        clocks of other nodes).

        :param files: ``{hash: (path, size)}``
        """
        hashes = list(files)
        with self.locks.hold(hashes):
            started = time.time()
            # The states first: a removal that commits between the two reads
            # is then either seen here in progress (it ends only once its
            # deletes returned) or makes the publish insert a known file anew.
            states = self.db.copies.replication_states(hashes)
            removing_then = self.db.copies.removing(None, hashes)
            with self._leases("replicate", [h for h in hashes if h in states]) as leased:
                mine = set(leased)
                jobs, plans, settled = [], [], []
                for file_hash in hashes:
                    state = states.get(file_hash)
                    if state is not None and file_hash not in mine:
                        continue  # another process's work
                    holders, target, done = self._plan(set(state.good) if state else set())
                    if done:
                        if holders:
                            settled.append(file_hash)
                        continue
                    path, size = files[file_hash]
                    jobs.append(UploadJob(path, file_hash, size, frozenset(holders), target))
                    plans.append((file_hash, holders, target))
                try:
                    results, objects = self._send(jobs)
                except (OSError, CloudManagerError) as exc:
                    log.error("uploading %d files to hosts failed: %s; they are queued",
                              len(jobs), exc)
                    results, objects, plans = [], None, []
                fresh = frozenset(hashes) - set(states)
                sent = {h for (h, _, _), r in zip(plans, results) if r.successes}

                def record(conn: Any, in_pool: AbstractSet[str],
                           inserted: AbstractSet[str]) -> Set[str]:
                    # What a removal meanwhile may have deleted (see above).
                    made = {(h, loc.host_name, loc.url) for (h, _, _), r in zip(plans, results)
                            for loc in r.successes}
                    tombs = self.db.copies.tombstones_since(
                        conn, {m[0] for m in made}, started - LEASE_S)
                    untrusted = ((inserted - fresh) | removing_then
                                 | {m[0] for m in made & tombs}) & in_pool
                    fresh_now = (fresh | untrusted) & in_pool
                    rounds = []
                    for (h, holders, target), result in zip(plans, results):
                        if h not in in_pool:
                            continue
                        if h in untrusted:
                            result = UploadResult([], result.failures, result.cooling,
                                                  result.facts)
                            holders = set()
                        rounds.append((h, holders, target, result))
                    shorts = self._record_rounds(
                        rounds, settled=[h for h in settled if h in in_pool - untrusted],
                        release=mine & in_pool, objects=objects, conn=conn, fresh=fresh_now)
                    # Fresh files not sent (no host, or an engine failure):
                    # pending on this node like any short one.
                    planned = {p[0] for p in plans}
                    self.db.queue.add(conn, [h for h in fresh_now if h not in planned],
                                      time.time(), known=True, node=self.node)
                    left = {s[0] for s in shorts if s[3].startswith("removal in progress")}
                    released.update(mine & in_pool)
                    return (sent & in_pool) - left - untrusted

                released: Set[str] = set()
                yield record
                self._released(released)  # the publish committed: they are released

    def _send(self, jobs: List[UploadJob]
              ) -> Tuple[List[UploadResult], Optional[Dict[str, ObjectMeta]]]:
        """Upload ``jobs`` (sealed first in an encrypted pool): a result per
        job, in order, and what the copies hold (see :meth:`_record_rounds`)."""
        if self._streams(jobs):
            try:
                return self._send_streamed(jobs[0])
            except OSError as exc:  # the age command failed, say: the usual way
                log.warning("could not seal %s as it streams (%s); sealing it first",
                            jobs[0].file_hash, exc)
        with self._sealed(jobs) as (jobs, objects):
            if len(jobs) == 1:  # one file: each host's own upload, no group overhead
                job = jobs[0]
                return [self.engine.upload(job.path, job.file_hash, job.size,
                                           holders=job.holders, target=job.target,
                                           vet=job.vet)], objects
            return (self.engine.upload_many(jobs) if jobs else []), objects

    def replicate_logged(self, hashes: Sequence[str]) -> int:
        """:meth:`replicate`, logging instead of raising: the files are already
        safe in the pool (pinned and queued) whatever happens here."""
        try:
            return self.replicate(hashes)
        except (OSError, CloudManagerError) as exc:
            log.error("uploading %d files to hosts failed: %s; they stay queued",
                      len(hashes), exc)
            return 0

    def replicate_from_source(self, file_hash: str, size: int) -> int:
        """Top up a file that is not cached, from a verified copy fetched for it."""
        with self.locks.hold([file_hash]), self._leases("replicate", [file_hash]) as mine:
            state = self.db.copies.replication_states(mine).get(file_hash)
            if state is None:
                return 0
            holders, target, done = self._plan(set(state.good))
            if not done:
                with self._source_of(file_hash, size) as source:
                    # Fetching the source may have proved a copy good.
                    state = self.db.copies.replication_states([file_hash]).get(file_hash)
                    if state is None:
                        return 0
                    holders, target, done = self._plan(set(state.good))
                    if not done:
                        job = UploadJob(source, file_hash, size, frozenset(holders), target)
                        with self._sealed([job]) as ([job], objects):
                            result = self.engine.upload(job.path, job.file_hash, job.size,
                                                        holders=holders, target=target,
                                                        vet=job.vet)
                        self._record_rounds([(file_hash, holders, target, result)],
                                            release=[file_hash], objects=objects)
                        return len(result.successes)
            if holders:
                self._record_rounds([], settled=[file_hash], release=[file_hash])
            return 0

    def upload_source(self, path: str, filename: str, record: Callable,
                      expected: Optional[str] = None) -> str:
        """Upload a file that will not be cached, reading it once.

        The source streams to the healthiest host that can stage
        (:meth:`UploadEngine.stream`), hashed on the way. When the stream
        ends the hash is known; if the source is unchanged (as many bytes as
        it had, the same size, mtime, ctime and inode as before), the staged
        bytes are published under the hash; else they are aborted and the
        upload refused, with nothing recorded. Another host that failed
        before the stream ended gets a new read, hashed afresh.

        Further hosts, up to the target, each read the source again through
        a hashing stream, and a copy is published only if its bytes hash to
        the same value (``rehash``); a source changed by then gives them no
        copy, and the file stays short and queued: sync tops it up from a
        verified copy. Why not always leave them to sync (the source would
        be read exactly once)? A top-up downloads the whole file back from
        the first host into a temp directory (a file larger than the cache,
        so no cache room), costing its transfer (S3 egress) and that disk
        space; another read of a local source costs neither, and each copy
        is still hashed as it streams. Hosts that cannot stage (plowshare:
        ``plowup`` needs a file) are left to sync, which sends them a
        verified copy.

        One transaction records the file, its copies and the hosts' health.
        When no configured host can stage, see :meth:`_upload_source_unstaged`.

        :param record: ``record(conn, file_hash, size)`` adds the file's row
            inside the transaction that records its copies
        :param expected: the SHA-256 the bytes must have: if they hash to
            another, the upload is refused as a changed source is (nothing
            is published or recorded)
        :return: the file's hash
        :raises UploadError: if no host took it, or its removal is in progress
            in another process
        :raises IntegrityError: if the source changed while it was read, or
            does not hash to ``expected``
        :raises OSError: if the source could not be read
        """
        before = os.stat(path)
        if self.key is not None:
            return self._upload_source_sealed(path, record, before, expected)
        if not any(h.can_stage for h in self.engine.hosts.values()):
            return self._upload_source_unstaged(path, record, before, expected)
        size = before.st_size
        failures: List[HostError] = []
        facts: List[Fact] = []
        cooling: List[str] = []
        tried: Set[str] = set()
        while True:
            first = self.engine.stream(path, size, exclude=tried)
            failures += first.failures
            facts += first.facts
            cooling = list(first.cooling)
            streamed = first.streamed
            if streamed is None:
                with self.db.catalog.transaction():
                    self.health.record(facts)
                raise UploadError("no host accepted %s (and it cannot be cached)" % path,
                                  failures, facts)
            tried |= {f.host for f in first.failures} | {streamed.host.name}
            try:
                after = os.stat(path)
                if streamed.size != size or _changed(before, after):
                    raise IntegrityError("%s changed while it was read (%d bytes read of %d); "
                                         "refused (nothing is recorded)"
                                         % (path, streamed.size, size))
                _check_expected(path, streamed.file_hash, expected)
                file_hash = streamed.file_hash
                with self.locks.hold([file_hash]):
                    published = self._publish_first(streamed, failures, facts)
                    if published is None:
                        continue  # that host failed: the next one reads the source again
                    holders, location = published
                    made = [location] if location is not None else []
                    others = self.engine.upload(
                        path, file_hash, size, holders=holders | {loc.host_name for loc in made},
                        rehash=True)
                    result = UploadResult(made + others.successes, failures + others.failures,
                                          sorted(set(cooling) | set(others.cooling)),
                                          facts + others.facts)
                    self._record_source(path, file_hash, size, holders, result, record)
                    return file_hash
            except (IntegrityError, OSError):
                if facts:  # hosts that failed before: their health, and nothing else
                    with self.db.catalog.transaction():
                        self.health.record(facts)
                raise
            finally:
                self.engine.abort(streamed)  # nothing once published
                self.health.release([streamed.host.name])  # its probe, if no fact took it

    def _upload_source_sealed(self, path: str, record: Callable,
                              before: os.stat_result, expected: Optional[str] = None) -> str:
        """:meth:`upload_source` for an encrypted pool: the source is read once
        and sealed as it streams (:class:`~cloudmanager.crypto.SealingStream`)
        to the healthiest host that can stage, the plaintext and the
        ciphertext hashed on the way; when it ends, the staged object is
        published under the file's keyed name if the source is unchanged,
        else aborted and the upload refused.

        No work file holds the ciphertext when one host is wanted (redundancy
        1, or one host). When more are, the ciphertext is also written to a
        private work file outside the cache as it streams, once, and that
        same ciphertext goes from it to the other hosts: a second sealing
        would make another ciphertext, and reading the object back from the
        first host would cost its transfer and the same space. A host that
        fails before the stream ended is followed by the next, which reads
        (and seals) the source afresh, into a work file of its own.
        """
        from .crypto import SealingStream, ciphertext_size_max

        key = self.key
        assert key is not None
        if not any(h.can_stage for h in self.engine.hosts.values()):
            return self._upload_source_spooled(path, record, before, expected)
        size = before.st_size
        wanted = min(self.redundancy, len(self.engine.hosts))
        failures: List[HostError] = []
        facts: List[Fact] = []
        tried: Set[str] = set()
        # The work directory only when more than one host is wanted.
        spooling = tempfile.TemporaryDirectory(prefix="cm-seal-") if wanted > 1 \
            else contextlib.nullcontext(None)
        with spooling as work:

            def seal(raw) -> SealingStream:
                # A work file per attempt: one the engine gave up on may write on.
                spool = None if work is None else \
                    os.path.join(work, "object-%d" % len(os.listdir(work)))
                return SealingStream(key, raw, size, spool)

            while True:
                first = self.engine.stream(path, size, exclude=tried, transform=seal,
                                           limit=ciphertext_size_max(size))
                failures += first.failures
                facts += first.facts
                streamed = first.streamed
                if streamed is None:
                    with self.db.catalog.transaction():
                        self.health.record(facts)
                    raise UploadError("no host accepted %s (and it cannot be cached)" % path,
                                      failures, facts)
                tried |= {f.host for f in first.failures} | {streamed.host.name}
                try:
                    source = streamed.made.source
                    after = os.stat(path)
                    if source.count != size or _changed(before, after):
                        raise IntegrityError("%s changed while it was read (%d bytes read of "
                                             "%d); refused (nothing is recorded)"
                                             % (path, source.count, size))
                    file_hash = source.hexdigest()
                    _check_expected(path, file_hash, expected)
                    name = key.object_name(file_hash)
                    objects = SealedObjects()
                    objects[file_hash] = ObjectMeta(streamed.file_hash, streamed.size,
                                                    key.key_id)
                    objects.plain[name] = (file_hash, size)
                    with self.locks.hold([file_hash]):
                        published = self._publish_first(streamed, failures, facts, name)
                        if published is None:
                            continue  # that host failed: the next one seals the source again
                        holders, location = published
                        made = [location] if location is not None else []
                        others = UploadResult([], [], [], [])
                        spool = streamed.made.spool_path
                        if spool is not None and len(holders) + len(made) < wanted:
                            others = self.engine.upload(
                                spool, name, streamed.size,
                                holders=holders | {loc.host_name for loc in made},
                                vet=self._vet(objects))
                        result = UploadResult(made + others.successes,
                                              failures + others.failures,
                                              sorted(set(first.cooling) | set(others.cooling)),
                                              facts + others.facts)
                        self._record_source(path, file_hash, size, holders, result, record,
                                            objects=objects)
                        return file_hash
                except (IntegrityError, OSError):
                    if facts:
                        with self.db.catalog.transaction():
                            self.health.record(facts)
                    raise
                finally:
                    self.engine.abort(streamed)  # nothing once published
                    self.health.release([streamed.host.name])

    def _upload_source_spooled(self, path: str, record: Callable,
                               before: os.stat_result, expected: Optional[str] = None
                               ) -> str:
        """:meth:`_upload_source_sealed` when no host can stage (lockers only):
        the source is read once, hashed as it is encrypted into a private
        work file outside the cache (the file does not fit it), and that one
        ciphertext goes to every host under the file's keyed name. A source
        changed during the read is refused, with nothing sent.

        The work file takes the file's size on the disk while it is sent
        (see the README's Encryption section).
        """
        key = self.key
        assert key is not None
        with tempfile.TemporaryDirectory(prefix="cm-seal-") as work:
            sealed = os.path.join(work, "object")
            with open(path, "rb") as raw:
                source = fsutil.HashingReader(raw)
                with open(sealed, "xb") as out:
                    os.fchmod(out.fileno(), 0o600)
                    sink = fsutil.HashingWriter(out)
                    key.encrypt(source, sink)
            after = os.stat(path)
            if source.count != before.st_size or _changed(before, after):
                raise IntegrityError("%s changed while it was read (%d bytes read of %d); "
                                     "refused (nothing is sent)"
                                     % (path, source.count, before.st_size))
            file_hash, size = source.hexdigest(), source.count
            _check_expected(path, file_hash, expected)
            meta = ObjectMeta(sink.digest.hexdigest(), sink.size, key.key_id)
            name = key.object_name(file_hash)
            objects = SealedObjects()
            objects[file_hash] = meta
            objects.plain[name] = (file_hash, size)
            with self.locks.hold([file_hash]):
                state = self.db.copies.replication_states([file_hash]).get(file_hash)
                holders = set(state.good) if state else set()
                result = self.engine.upload(sealed, name, meta.size, holders=holders,
                                            vet=self._vet(objects))
                self._record_source(path, file_hash, size, holders, result, record,
                                    objects=objects)
        return file_hash

    def _publish_first(self, streamed: Streamed, failures: List[HostError],
                       facts: List[Fact], name: Optional[str] = None
                       ) -> Optional[Tuple[Set[str], Optional[Location]]]:
        """Publish the first copy of a streamed source (under its hash's lock).

        :return: ``(holders, location)``: the hosts with a good copy before,
            and the new copy's location (None when it was not needed: its host
            or enough others hold one already); None if the publish failed
            (its failure and fact are appended)
        """
        file_hash = streamed.file_hash if name is None else \
            streamed.made.source.hexdigest()
        state = self.db.copies.replication_states([file_hash]).get(file_hash)
        holders = set(state.good) if state else set()
        if streamed.host.name in holders or self._plan(holders)[2]:
            log.info("%s is held already; the bytes staged on %s are not published",
                     file_hash, streamed.host.name)
            return holders, None
        outcome, fact = self.engine.publish(streamed, file_hash if name is None else name)
        facts.append(fact)
        if isinstance(outcome, HostError):
            failures.append(outcome)
            return None
        return holders, outcome

    def _record_source(self, path: str, file_hash: str, size: int, holders: Set[str],
                       result: UploadResult, record: Callable,
                       objects: Optional[Dict[str, ObjectMeta]] = None) -> None:
        """Record a file uploaded from its source, with its copies, in one transaction.

        :raises UploadError: if nothing holds it, or its removal is in
            progress in another process (nothing is recorded but health)
        """
        if not holders and not result.successes:
            with self.db.catalog.transaction():
                self.health.record(result.facts)
            raise UploadError("no host accepted %s (and it cannot be cached)" % path,
                              result.failures, result.facts)
        with self.db.catalog.transaction() as conn:
            record(conn, file_hash, size)
            shorts = self._record_rounds([(file_hash, holders, self.redundancy, result)],
                                         objects=objects)
            if any(why.startswith("removal in progress") for *_, why in shorts):
                # Not cached, and the removal may delete what was just
                # sent: refused (this transaction, the record included,
                # is rolled back), so no hash is returned for a file
                # nothing may hold.
                raise UploadError("%s is being removed by another process; try again "
                                  "once it is" % path, [], result.facts)

    def _upload_source_unstaged(self, path: str, record: Callable,
                                before: os.stat_result, expected: Optional[str] = None
                                ) -> str:
        """:meth:`upload_source` for a pool none of whose hosts can stage (only
        lockers): hashed, then sent from ``path`` by each host, and stat'ed
        again afterwards. A source rewritten between the reads and restored
        to the same size, mtime and ctime would go unseen; nothing better is
        possible when every host reads the file by itself.

        :raises IntegrityError: if the source changed (its copies are deleted
            where the hosts allow it)
        """
        file_hash, size = fsutil.hash_file(path)
        _check_expected(path, file_hash, expected)
        with self.locks.hold([file_hash]):
            state = self.db.copies.replication_states([file_hash]).get(file_hash)
            holders = set(state.good) if state else set()
            result = self.engine.upload(path, file_hash, size, holders=holders)
            after = os.stat(path)
            if _changed(before, after) or size != after.st_size:
                for location in result.successes:
                    self.engine.delete(location)
                raise IntegrityError("%s changed while it was uploaded; refused (nothing is "
                                     "recorded)" % path)
            self._record_source(path, file_hash, size, holders, result, record)
        return file_hash

    # -- sync and verify ----------------------------------------------------------------

    def sync(self, probe: bool = True) -> SyncSummary:
        """Upload queued files and top up files below the target of good copies.

        :param probe: try hosts whose breaker is open at once (an explicit
            command); their first outcome decides whether they stay cooling
        """
        if probe:
            self.health.probe_now(self.engine.hosts)
        todo = self._sync_todo()
        uploads = 0
        for start in range(0, len(todo), 500):
            chunk = todo[start:start + 500]
            try:
                uploads += self.replicate(chunk)
            except (OSError, CloudManagerError) as exc:
                log.error("sync of %d files failed: %s", len(chunk), exc)
            meter.files_done(len(chunk))
        complete = sum(1 for h in todo if self.db.files.verified(h) >= self.redundancy)
        summary = SyncSummary(len(todo), uploads, complete, len(todo) - complete)
        log.info("sync: %s", summary._asdict())
        return summary

    def _sync_todo(self) -> List[str]:
        """The files :meth:`sync` works on: queued ones, then ones below target."""
        reachable = min(self.redundancy, len(self.engine.hosts))
        return list(dict.fromkeys(self.db.queue.hashes() + self.db.files.below_target(reachable)))

    def sync_plan(self) -> List[Dict[str, object]]:
        """What :meth:`sync` would do now, without doing it (``cm sync --dry-run``).

        Reads one row per file to do: for reports and progress bars, not hot paths.

        :return: one dict per file, in the order sync takes them: ``hash``,
            ``filename``, ``size``, ``copies`` (good copies this node made or
            checked), ``wanted`` (new copies sync will try to make, as far as
            the configured hosts allow) and ``queued`` (waiting for its first
            upload)
        """
        queued = set(self.db.queue.hashes())
        reachable = min(self.redundancy, len(self.engine.hosts))
        plan: List[Dict[str, object]] = []
        for file_hash in self._sync_todo():
            row = self.db.files.get(file_hash)
            if row is None:  # removed since the lists were read
                continue
            have = self.db.files.verified(file_hash)
            plan.append({"hash": file_hash, "filename": row.filename, "size": row.size,
                         "copies": have, "wanted": max(0, reachable - have),
                         "queued": file_hash in queued})
        return plan

    def reencrypt(self, limit: int = 1000) -> Dict[str, int]:
        """Rewrite plaintext copies (made before the pool had a key) as
        encrypted ones, then delete the plaintext ones; up to ``limit`` files.

        For each file, under its lease: a verified plaintext is had (the
        cached copy, or one fetched), sealed once, and sent to its target of
        hosts; the new copies are recorded; only then are the plaintext
        copies deleted (where the hosts allow it) and recorded deleted. A
        kill at any point leaves every file with its old copies or its new
        ones, and running it again goes on where it stopped.

        :return: ``{"files", "sealed" (new copies), "deleted", "kept", "failed"}``
        """
        if self.key is None:
            raise InvalidInputError("re-encryption needs the pool's encryption_key")
        key = self.key
        summary = dict.fromkeys(("files", "sealed", "deleted", "kept", "failed"), 0)
        for file_hash in self.db.copies.plaintext_files(limit):
            summary["files"] += 1
            try:
                self._reencrypt_one(file_hash, key, summary)
            except (OSError, CloudManagerError) as exc:
                summary["failed"] += 1
                log.error("cannot re-encrypt %s: %s; its plaintext copies stay", file_hash, exc)
        log.info("reencrypt: %s", summary)
        return summary

    def _reencrypt_one(self, file_hash: str, key: PoolKey, summary: Dict[str, int]) -> None:
        with self.locks.hold([file_hash]), self._leases("replicate", [file_hash]) as mine:
            if not mine:
                summary["failed"] += 1
                return
            row = self.db.files.get(file_hash)
            if row is None:
                return
            copies = self.db.copies.objects(file_hash)
            sealed_on = {c.host_name for c in copies if c.key_id == key.key_id}
            plain = [c for c in copies if not c.encrypted]
            if len(sealed_on) < self.redundancy:
                with self._source_of(file_hash, row.size) as source:
                    job = UploadJob(source, file_hash, row.size, frozenset(sealed_on),
                                    self.redundancy)
                    with self._sealed([job]) as ([job], objects):
                        result = self.engine.upload(job.path, job.file_hash, job.size,
                                                    holders=sealed_on, target=self.redundancy,
                                                    vet=job.vet)
                self._record_rounds([(file_hash, sealed_on, self.redundancy, result)],
                                    release=[file_hash], objects=objects)
                summary["sealed"] += len(result.successes)
                sealed_on |= {loc.host_name for loc in result.successes}
            if len(sealed_on) < min(self.redundancy, len(self.engine.hosts)):
                raise UploadError("only %d hosts took its encrypted copy" % len(sealed_on),
                                  [], [])
            deleted: List[CopyKey] = []
            facts: List[Fact] = []
            for copy in plain:
                location = Location(copy.host_name, copy.url)
                host = self.engine.host_for(copy.host_name, copy.url)
                if host is None or not host.can_delete \
                        or not self.engine.names(location, file_hash):
                    summary["kept"] += 1
                    continue
                gone, delete_facts = self.engine.delete(location)
                facts += delete_facts
                if gone:
                    deleted.append((file_hash, copy.host_name, copy.url))
                else:
                    summary["kept"] += 1
            with self.db.catalog.transaction() as conn:
                self.db.copies.record_deleted(conn, deleted, time.time())
                self.health.record(facts)
            summary["deleted"] += len(deleted)

    def verify(self, hashes: Optional[Sequence[str]] = None,
               hosts: Optional[Sequence[str]] = None, older_than: Optional[float] = None,
               limit: Optional[int] = None, deep: bool = False,
               probe: bool = True) -> Dict[str, int]:
        """Look at remote copies; see :meth:`cloudmanager.CloudManager.verify`.

        Condemned copies whose back-off is over come first (all of those of
        ``hashes``, when given), then the copies believed good, least recently
        checked first. A condemned copy is always looked at by download: a
        size alone cannot clear it. Copies believed good on a host that can
        list are found in its listing when that costs less than a look at
        each (:meth:`UploadEngine.listing_plan`); the others, and those the
        listing does not clear, are looked at one by one, in parallel up to
        each host's ``max_connections``. What the looks prove is recorded
        :data:`VERIFY_BATCH` copies per transaction.
        """
        if probe:
            self.health.probe_now(self.engine.hosts)
        now = time.time()
        checked_before = None if older_than is None else now - older_than
        todo = self.db.copies.to_check(hashes, hosts, checked_before, limit, due=now)
        summary = dict.fromkeys(("checked", "good", "bad", "missing", "error", "unreachable",
                                 "cooling"), 0)
        # Copies of files another process or node is checking are left to it.
        with self._leases("verify", [c.hash for c in todo]) as mine, \
                tempfile.TemporaryDirectory(prefix="cm-verify-",
                                            ignore_cleanup_errors=True) as scratch:
            leased = set(mine)
            chosen = [c for c in todo if c.hash in leased]
            meter.expect(sum(c.object[1] for c in chosen if self._checked_by_download(c, deep)),
                         len(chosen))
            reaching = (self.engine.host_for(c.host_name, c.url) for c in chosen)
            looks = _Looks(self, {host.name for host in reaching if host is not None})
            try:
                for copy, outcome in self._look(chosen, deep, scratch, looks):
                    verdict = "good" if outcome.verdict == "intact" else outcome.verdict
                    if verdict in ("good", "bad", "missing"):
                        summary["checked"] += 1
                    summary[verdict] += 1
                    looks.add(copy, outcome)
                    meter.files_done(1)
            except BaseException:
                # Interrupted (Ctrl-C, a host's bug): what was seen is still
                # recorded, so a verify run again goes on from there.
                try:
                    looks.flush()
                except CloudManagerError as exc:
                    log.warning("verify: the looks before the interruption were not "
                                "recorded (%s)", exc)
                raise
            looks.flush()
        log.info("verify: %s", summary)
        return summary

    def _look(self, chosen: Sequence[CopyToCheck], deep: bool, scratch: str, looks: _Looks
              ) -> Iterator[Tuple[CopyToCheck, CheckResult]]:
        """Look at each copy of ``chosen`` once: ``(copy, outcome)`` in the
        order the looks end. Listings first, host by host, then every copy
        to look at alone, in parallel (the hosts' facts of the listings go
        to ``looks``)."""
        alone: List[CopyToCheck] = []
        listable: Dict[str, List[CopyToCheck]] = {}
        for copy in chosen:
            host = self.engine.host_for(copy.host_name, copy.url)
            condemned = copy.state in ("suspect", "bad", "missing")
            if host is not None and host.name == copy.host_name and host.can_list \
                    and host.can_check and not (deep or condemned) \
                    and host.name not in looks.cooling \
                    and host.listed_name(copy.url) is not None:
                listable.setdefault(host.name, []).append(copy)
            else:
                alone.append(copy)
        counts: Optional[Dict[str, int]] = None
        for host_name, copies in listable.items():
            host = self.engine.hosts[host_name]
            if counts is None:
                counts = self.db.copies.count_by_host()
            names = [host.listed_name(c.url) or "" for c in copies]
            prefixes = self.engine.listing_plan(host, names, counts.get(host_name, 0))
            if prefixes is None:
                alone += copies
                continue
            results, facts = self.engine.check_listed(host, [_item(c, False) for c in copies],
                                                      prefixes)
            looks.facts += facts
            for copy, result in zip(copies, results):
                # Not cleared by the listing: its own look decides. Nor a
                # claimed copy the listing saw only the size of: that leaves
                # it claimed, where a HEAD may find the host's SHA-256 (S3)
                # and make it good.
                if result is None or (result.verdict != "good" and copy.state != "good"):
                    alone.append(copy)
                else:
                    yield copy, result
        items = [_item(c, deep or c.state in ("suspect", "bad", "missing")) for c in alone]
        for index, result in self.engine.check_each(items, scratch,
                                                    lambda host: host.name in looks.cooling):
            yield alone[index], result

    def _checked_by_download(self, copy, deep: bool) -> bool:
        """Whether :meth:`verify` will download ``copy`` (for the bytes a
        progress bar expects): deep, condemned, or a host that cannot stat."""
        if deep or copy.state in ("suspect", "bad", "missing"):
            return True
        host = self.engine.host_for(copy.host_name, copy.url)
        return host is not None and not host.can_check

    # -- removal ------------------------------------------------------------------------

    def remove(self, file_hash: str, forget_cached: Callable[[object], None],
               unlink_cached: Callable[[], None]) -> Dict[str, List[Tuple[str, str]]]:
        """Forget a file and delete its copies where hosts allow it.

        Only objects named by ``file_hash`` are deleted: a record that lists
        another file's object under this hash (a hostile dump) cannot aim a
        delete at it. The record, its tombstones and a removal in progress are
        written first, in one transaction, with ``forget_cached(conn)``; then
        ``unlink_cached()`` removes the cached file, and the hosts' deletes run.
        A process that uploads the same bytes
        meanwhile records its copies as claims (see :meth:`_record_rounds`);
        when the removal ends, copies it deleted under a record made again
        are marked missing and the file is queued, so sync sends it again.

        :return: ``{"deleted": [(host_name, url)], "kept": [(host_name, url)]}``
        """
        deleted: List[Tuple[str, str]] = []
        kept: List[Tuple[str, str]] = []
        with self.locks.hold([file_hash]):
            # Taken once the lock is had: the removal's rows and tombstones say
            # when it began, not when it started waiting (see :meth:`sending`).
            now = time.time()
            rows = [r for r in self.db.copies.of(file_hash) if r.url and r.state != "deleted"]
            ours, foreign, undeletable = [], [], []
            for row in rows:
                location = Location(row.host_name, row.url)
                host = self.engine.host_for(row.host_name, row.url)
                if host is None or not host.can_delete:
                    undeletable.append(row)  # a locker's link, or no host here: kept
                elif self.engine.names(location, file_hash) or (
                        self.key is not None
                        and self.engine.names(location, self.key.object_name(file_hash))):
                    ours.append(row)  # the file's object: plaintext, or sealed by our key
                else:
                    foreign.append(row)
            with self.db.catalog.transaction() as conn:
                self.db.copies.begin_removal(conn, file_hash, self.owner, now)
                self.db.copies.record_deleted(
                    conn, [(file_hash, r.host_name, r.url) for r in ours], now)
                self.db.files.forget(conn, file_hash)
                forget_cached(conn)
            unlink_cached()
            facts: List[Fact] = []
            for row in ours:  # bad copies too: they still take space
                gone, delete_facts = self.engine.delete(Location(row.host_name, row.url))
                facts += delete_facts
                (deleted if gone else kept).append((row.host_name, row.url))
            kept += [(r.host_name, r.url) for r in foreign + undeletable]
            with self.db.catalog.transaction() as conn:
                self.db.copies.end_removals(conn, [file_hash])
                if deleted and self.db.files.exists(file_hash):
                    # Added again meanwhile: its copies where we deleted are gone.
                    self.db.copies.condemn(
                        conn, [(file_hash, h, u, "missing") for h, u in deleted], now,
                        0.0, 0.0)
                    self.db.queue.add(conn, [file_hash], now)
                    self._reprotect(conn, [file_hash])
                    log.warning("%s was added again while it was being removed; the copies "
                                "deleted are marked missing and it is queued for upload",
                                file_hash)
                self.health.record(facts)
        for row in foreign:
            log.warning("not deleting %s for %s: that URL does not name this file's object "
                        "on a configured host", row.url, file_hash)
        for host_name, url in kept:
            log.warning("removed %s from the pool, but its copy on %s stays: %s",
                        file_hash, host_name, url)
        log.info("removed %s (%d copies deleted)", file_hash, len(deleted))
        return {"deleted": deleted, "kept": kept}

    def close(self) -> None:
        """Release whatever leases this process still holds (a deferred upload's)."""
        with self.db.catalog.transaction() as conn:
            self.db.leases.release_all(conn, [self.owner])

    def end_dead_removals(self, conn, live_owners: Iterable[str]) -> List[str]:
        """End removals whose process died (inside a transaction): this node's
        whose session is not among ``live_owners``, and any older than
        :data:`REMOVAL_MAX_AGE`; their files were forgotten already. The
        leases of this node's dead processes end too."""
        live_owners = list(live_owners)
        dead = self.db.copies.removals_of_owners_not_in(
            conn, live_owners, node=self.node, started_before=time.time() - REMOVAL_MAX_AGE)
        if self.db.leases.release_dead(conn, self.node, live_owners):
            log.info("ended the leases of this node's processes that died")
        self.db.copies.end_removals(conn, dead)
        return dead


def _item(copy: CopyToCheck, deep: bool) -> CheckItem:
    """What the engine checks of ``copy``: an encrypted copy as the ciphertext
    it is (its hash and size were recorded when it was made: no key needed)."""
    digest, size = copy.object
    return CheckItem(digest, size, Location(copy.host_name, copy.url), deep)


class _Looks:
    """What a verify's looks proved, recorded :data:`VERIFY_BATCH` copies per
    transaction (:meth:`Replicator.apply`), and the hosts it must not look at."""

    def __init__(self, replicator: Replicator, host_names: Set[str]) -> None:
        self.replicator = replicator
        #: The configured hosts the copies are on (the others' breakers are
        #: not asked: a half-open one would give this verify its probe).
        self.hosts = [name for name in replicator.engine.hosts if name in host_names]
        self.verdicts: List[Verdict] = []
        self.hashes: Dict[Location, str] = {}
        self.facts: List[Fact] = []
        self.unseen: List[CopyKey] = []
        self.pending = 0
        #: Names of the hosts whose breaker keeps them from being looked at:
        #: read here, in the verify's thread, after each batch recorded (the
        #: engine's threads never touch the database).
        self.cooling: Set[str] = set()
        self._refresh()

    def _refresh(self) -> None:
        health = self.replicator.health
        self.cooling = {name for name in self.hosts if health.cooling(name)}

    def add(self, copy: CopyToCheck, outcome: CheckResult) -> None:
        """Note one copy's outcome; record the batch once it is full."""
        if outcome.verdict in ("unreachable", "cooling"):
            self.unseen.append((copy.hash, copy.host_name, copy.url))
        else:
            for verdict in outcome.verdicts:
                self.hashes[verdict.location] = copy.hash
            self.verdicts += outcome.verdicts
            self.facts += outcome.facts
        self.pending += 1
        if self.pending >= VERIFY_BATCH:
            self.flush()

    def flush(self) -> None:
        """Record what is noted, in one transaction (none if nothing is)."""
        if not (self.pending or self.facts):
            return
        self.replicator.apply(self.verdicts, self.facts, hashes=self.hashes, strike=True,
                              unseen=self.unseen)
        self.verdicts, self.hashes, self.facts, self.unseen = [], {}, [], []
        self.pending = 0
        self._refresh()


class SealedObjects(Dict[str, ObjectMeta]):
    """``{file hash: ObjectMeta}`` of the ciphertexts sealed for a round of
    uploads, with what :meth:`Replicator._vet` learns on the way."""

    def __init__(self) -> None:
        super().__init__()
        #: ``{object name: (file hash, size)}`` of the files sealed.
        self.plain: Dict[str, Tuple[str, int]] = {}
        #: ``{(hash, host_name, url): ObjectMeta}``: objects found on hosts
        #: that stand for an upload (their own ciphertext, not the one sealed).
        self.kept: Dict[CopyKey, ObjectMeta] = {}


def short_reason(result: UploadResult) -> str:
    """Why an upload round left a file short of its target, in a line."""
    errors = [f.message for f in result.failures]
    if result.cooling:
        errors.append("cooling down after repeated failures: %s" % ", ".join(result.cooling))
    return "; ".join(errors) or "not enough hosts"


def _check_expected(path: str, file_hash: str, expected: Optional[str]) -> None:
    """Refuse a source whose bytes are not the file it was recorded as.

    :raises IntegrityError: if ``expected`` is given and is not ``file_hash``
    """
    if expected is not None and file_hash != expected:
        raise IntegrityError("%s does not hold the file it is recorded as: its bytes hash to "
                             "%s, not %s; refused (nothing is sent or recorded)"
                             % (path, file_hash, expected))


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether a file changed between two stats (or is not a regular file now)."""
    return (not stat_module.S_ISREG(after.st_mode)
            or (before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino,
                before.st_dev)
            != (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino,
                after.st_dev))

