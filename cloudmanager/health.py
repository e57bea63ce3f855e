"""Host health: the one circuit breaker, and the order hosts are tried in.

Every outcome of a transfer, check or delete on a host arrives here as a
:class:`Fact` (the engine returns them; it writes nothing). :meth:`Health.record`
writes them to the catalog's ``host_health`` and ``transfers`` tables, so
every process and node sharing the catalog sees the same health.

The breaker:

- **Counts one failure per host per operation or batch.** A batch of 40
  files that all fail on one host is one failure, not 40; a batch with any
  success on a host is a success there.
- **Opens** after :attr:`Health.threshold` failures in a row. The host is then
  skipped for ``cooldown`` seconds, doubled for each further failure, up to
  :data:`MAX_COOLDOWN`.
- **Half-opens** when the cool-down ends: one operation in this process may
  try the host (the probe); the others still skip it until the probe's
  outcome is in. A success closes the breaker, a failure opens it again.
- **Runs on monotonic time.** The last failure is stored as a unix time for
  the other processes; each process measures the cool-down it still owes
  with its own monotonic clock from the moment it first saw that failure,
  and never waits longer than one cool-down from then. A step of the wall
  clock cannot stretch a 60 s cool-down into a day.
- **Yields to explicit commands.** :meth:`Health.probe_now` lets a cooling
  host be tried at once (``cm sync``, ``cm verify``, ``cm hosts --retry``).
- **Ignores what says nothing against the host**: a missing or corrupt
  object, a local disk error, a hostile size (facts with ``counts=False``).
  A missing or corrupt object is an answer, though: the host is up, and its
  breaker closes (``answered=True``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from .db import FileDatabase
from .db.health import HostHealth, Outcome

log = logging.getLogger(__name__)

#: The longest a host's breaker stays open, in seconds.
MAX_COOLDOWN = 3600.0
#: Seconds after which a probe whose outcome never came (an operation that
#: took it and then did not use the host) no longer blocks the others.
PROBE_TIMEOUT = 300.0


class Fact(NamedTuple):
    """What one host call did: the engine's report of it."""

    host: str
    ok: bool
    #: How long it took, for the latency median (successes only).
    latency_ms: Optional[float] = None
    #: Why it failed.
    error: Optional[str] = None
    #: Whether a failure counts against the host: False for a missing or
    #: corrupt object and for local errors.
    counts: bool = True
    #: The call failed, but the host answered it (a missing or corrupt
    #: object): it is up, so its breaker closes as on a success. A host that
    #: stayed cooling after answering a verify would be skipped by the sync
    #: that must replace the very copy the verify found bad.
    answered: bool = False
    #: Bytes sent to the host (uploads).
    uploaded: int = 0
    #: Bytes received from it (downloads).
    downloaded: int = 0


class _Seen(NamedTuple):
    """When this process first saw a host's latest failure."""

    last_failure: float
    monotonic: float
    wall: float


class Health:
    """The circuit breaker and ranking of the hosts, over the catalog's health rows.

    :param db: the pool's database
    :param threshold: consecutive failures that open a breaker
    :param cooldown: seconds a host is skipped once its breaker opens
    :param clock: the monotonic clock (tests pass their own)
    :param wall_clock: the wall clock (tests pass their own)
    """

    def __init__(self, db: FileDatabase, threshold: int = 3, cooldown: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.db = db
        #: The node whose transfers this records (set once its cache is open).
        self.node = ""
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._seen: Dict[str, _Seen] = {}
        #: Hosts half-open with a probe in flight in this process: when it began.
        self._probing: Dict[str, float] = {}
        #: Hosts an explicit command asked to try at once.
        self._forced: set = set()

    # -- the breaker -------------------------------------------------------------

    def _remaining(self, name: str, breaker: Optional[Tuple[int, Optional[float]]]) -> float:
        """Seconds of cool-down this process still owes ``name`` (0 if closed)."""
        failures, last_failure = breaker or (0, None)
        if failures < self.threshold or not last_failure:
            return 0.0
        with self._lock:
            if name in self._forced:
                return 0.0
            seen = self._seen.get(name)
            if seen is None or seen.last_failure != last_failure:
                seen = self._seen[name] = _Seen(last_failure, self._clock(), self._wall())
        window = min(self.cooldown * 2 ** min(failures - self.threshold, 16), MAX_COOLDOWN)
        # What was left of the window when this process saw the failure, as
        # the wall clock told it then, but never more than the window itself:
        # a failure stamped in the future (a clock stepped back) waits one
        # window, not until the clock catches up.
        left_then = min(max(seen.last_failure + window - seen.wall, 0.0), window)
        return max(seen.monotonic + left_then - self._clock(), 0.0)

    def retry_after(self, name: str) -> Optional[float]:
        """When ``name`` may be tried again (unix time), or None if it may now."""
        remaining = self._remaining(name, self.db.health.breakers().get(name))
        return self._wall() + remaining if remaining > 0 else None

    def cooling(self, name: str) -> bool:
        """Whether ``name``'s breaker keeps it from being tried now."""
        return not self.admit([name], self.db.health.breakers())

    def admit(self, names: Sequence[str],
              breakers: Dict[str, Tuple[int, Optional[float]]]) -> List[str]:
        """Those of ``names`` that may be tried now: closed breakers, and
        half-open ones whose probe this call takes."""
        allowed = []
        for name in names:
            breaker = breakers.get(name)
            if breaker is None or breaker[0] < self.threshold:
                allowed.append(name)
            elif self._remaining(name, breaker) <= 0:
                with self._lock:
                    began = self._probing.get(name)
                    if began is not None and self._clock() - began < PROBE_TIMEOUT:
                        continue  # another operation is probing it
                    self._probing[name] = self._clock()
                allowed.append(name)
        return allowed

    def ranked(self, hosts: Iterable, weight: Callable = lambda h: h.weight
               ) -> Tuple[list, list]:
        """Split hosts into ``(usable, cooling)``, each ordered healthiest first.

        Usable hosts sort by fewest consecutive failures, then highest weight,
        then at random (spreading load among equals). A half-open host is
        usable for the one operation that takes its probe.
        """
        hosts = list(hosts)
        breakers = self.db.health.breakers()
        allowed = set(self.admit([h.name for h in hosts], breakers))
        usable = [h for h in hosts if h.name in allowed]
        cooling = [h for h in hosts if h.name not in allowed]

        def key(h):
            return (breakers.get(h.name, (0, None))[0], -weight(h), random.random())

        return sorted(usable, key=key), sorted(cooling, key=key)

    def release(self, names: Iterable[str]) -> None:
        """Give back probes taken by :meth:`admit` that were not used."""
        with self._lock:
            for name in names:
                self._probing.pop(name, None)

    def probe_now(self, names: Iterable[str]) -> None:
        """Let cooling hosts be tried at once by this process, as an explicit
        command asks: their breakers half-open now."""
        with self._lock:
            self._forced.update(names)

    def gives_up(self, failures_in_a_row: int) -> bool:
        """Whether an operation should stop sending a host more of its work after
        this many failures in a row there (the same threshold as the breaker)."""
        return failures_in_a_row >= self.threshold

    # -- recording ------------------------------------------------------------------

    def record(self, facts: Iterable[Fact]) -> None:
        """Write one operation's (or batch's) facts: health and the transfer meter.

        Per host, the facts become one outcome: a success if any call there
        succeeded or was answered (with every success's latency), else one
        failure if any failure counts. Call inside the caller's transaction to make it one
        with the rest of what the operation writes.
        """
        per_host: Dict[str, List[Fact]] = {}
        uploaded = downloaded = 0
        for fact in facts:
            per_host.setdefault(fact.host, []).append(fact)
            uploaded += fact.uploaded
            downloaded += fact.downloaded
        now = self._wall()
        outcomes: Dict[str, List[Outcome]] = {}
        for host, host_facts in per_host.items():
            successes = [f for f in host_facts if f.ok or f.answered]
            if successes:
                outcomes[host] = [Outcome(True, f.latency_ms, None, now) for f in successes]
            else:
                counted = [f for f in host_facts if f.counts]
                if counted:
                    outcomes[host] = [Outcome(False, None, counted[-1].error, now)]
        if outcomes or uploaded or downloaded:
            self.db.health.record(outcomes, uploaded=uploaded, downloaded=downloaded,
                                  node=self.node)
        with self._lock:
            for host, outcome in outcomes.items():
                self._probing.pop(host, None)
                self._forced.discard(host)  # an explicit retry is tried once
                if outcome[0].ok:
                    self._seen.pop(host, None)

    def carry_meter(self, node: str, months: Iterable[Tuple[str, int, int]]) -> None:
        """Carry another meter's months (an original pool's, ``cm
        import-legacy``) under the node name ``node``: its totals join the
        pool's, and carrying them again changes nothing.

        :param months: ``(month 'YYYY-MM', uploaded, downloaded)`` triples
        """
        self.db.health.set_transfers(node, months)

    def reset(self, names: Iterable[str]) -> None:
        """Forget hosts' failure streaks, for every process (``cm hosts --retry``)."""
        names = list(names)
        self.db.health.reset(names)
        self.probe_now(names)

    def status(self, names: Iterable[str]) -> Dict[str, Tuple[HostHealth, Optional[float]]]:
        """``{name: (HostHealth, retry_after)}`` for reports."""
        health = self.db.health.all()
        breakers = self.db.health.breakers()
        result = {}
        for name in names:
            remaining = self._remaining(name, breakers.get(name))
            result[name] = (health.get(name) or HostHealth(),
                            self._wall() + remaining if remaining > 0 else None)
        return result
