"""The ``host_health`` and ``transfers`` tables: what hosts have done lately.

Only :mod:`cloudmanager.health` (through this module) writes host health;
the transfer meter is written with it, once per operation or batch.
"""

from __future__ import annotations

import json
import time
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from .connection import Store

#: How many recent transfer times per host the latency median is taken over.
LATENCY_SAMPLES = 31



def median(samples: Sequence[Union[int, float]]) -> Union[int, float]:
    """The median of ``samples`` (not empty), as :func:`statistics.median` gives
    it; written out because the statistics module (with decimal and
    fractions) costs a pool's open more than the few samples take to sort.

    >>> median([30, 10, 20]), median([40, 10, 20, 30])
    (20, 25.0)
    """
    ordered = sorted(samples)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2

class HostHealth(NamedTuple):
    """A host's record: counters, the last outcomes, and a latency median."""

    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: Optional[str] = None
    last_success: Optional[float] = None
    last_failure: Optional[float] = None
    #: The median of the latest transfer times, or None before the first success.
    latency_ms: Optional[float] = None


class Outcome(NamedTuple):
    """One operation's result on one host, as the health record takes it."""

    ok: bool
    latency_ms: Optional[float] = None
    error: Optional[str] = None
    when: float = 0.0


def month_key(timestamp: Optional[float] = None) -> str:
    """Return the ``'YYYY-MM'`` (UTC) of a unix time, for the transfer meter."""
    return time.strftime("%Y-%m", time.gmtime(timestamp))


class Health:
    """Reads and writes of host health and the transfer meter."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def record(self, outcomes: Dict[str, List[Outcome]], uploaded: int = 0,
               downloaded: int = 0, when: Optional[float] = None, node: str = "") -> None:
        """Update hosts' health after operations, and the transfer meter, in one
        transaction.

        :param outcomes: ``{host_name: [Outcome]}``, each list in the order the
            operations ended
        :param node: the node that moved the bytes (its share of the meter)
        :param uploaded: bytes sent to hosts, for this month's meter
        :param downloaded: bytes received from hosts
        :param when: the unix time whose month the bytes count in (default: now)
        """
        with self.db.transaction() as conn:
            for host_name, results in outcomes.items():
                if not results:
                    continue
                conn.execute("INSERT OR IGNORE INTO host_health (host_name) VALUES (?)",
                             (host_name,))
                consecutive, samples = conn.execute(
                    "SELECT consecutive_failures, latency_samples FROM host_health"
                    " WHERE host_name = ?", (host_name,)).fetchone()
                samples = json.loads(samples)
                successes = failures = 0
                last_success = last_failure = last_error = None
                for ok, latency_ms, error, when in results:
                    if ok:
                        successes += 1
                        consecutive = 0
                        last_success = when
                        if latency_ms is not None:
                            samples.append(round(latency_ms, 3))
                    else:
                        failures += 1
                        consecutive += 1
                        last_failure, last_error = when, (error or "")[:500]
                conn.execute(
                    "UPDATE host_health SET successes = successes + ?, failures = failures + ?,"
                    " consecutive_failures = ?, latency_samples = ?,"
                    " last_success = coalesce(?, last_success),"
                    " last_failure = coalesce(?, last_failure),"
                    " last_error = coalesce(?, last_error) WHERE host_name = ?",
                    (successes, failures, consecutive, json.dumps(samples[-LATENCY_SAMPLES:]),
                     last_success, last_failure, last_error, host_name))
            if uploaded or downloaded:
                conn.execute(
                    "INSERT INTO transfers (month, node, uploaded, downloaded)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (month, node) DO UPDATE SET"
                    " uploaded = transfers.uploaded + excluded.uploaded,"
                    " downloaded = transfers.downloaded + excluded.downloaded",
                    (month_key(when), node, uploaded, downloaded))

    def set_transfers(self, node: str, months: Iterable[Tuple[str, int, int]]) -> None:
        """Set a node's transfer meter for some months, replacing what it had
        there (so setting it twice is setting it once), in one transaction.

        :param months: ``(month 'YYYY-MM', uploaded, downloaded)`` triples
        """
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO transfers (month, node, uploaded, downloaded) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (month, node) DO UPDATE SET uploaded = excluded.uploaded,"
                " downloaded = excluded.downloaded",
                [(month, node, int(up), int(down)) for month, up, down in months])

    def reset(self, host_names: Iterable[str]) -> None:
        """Forget hosts' consecutive failures (an explicit retry succeeded)."""
        with self.db.transaction() as conn:
            conn.executemany("UPDATE host_health SET consecutive_failures = 0"
                             " WHERE host_name = ?", [(n,) for n in host_names])

    def all(self) -> Dict[str, HostHealth]:
        """``{host_name: HostHealth}`` of every host on record."""
        health = {}
        for (name, successes, failures, consecutive_failures, last_error, last_success,
             last_failure, samples_json) in self.db.read(
                "SELECT host_name, successes, failures, consecutive_failures, last_error,"
                " last_success, last_failure, latency_samples FROM host_health"
                " ORDER BY host_name"):
            samples = json.loads(samples_json)
            health[name] = HostHealth(
                successes=successes, failures=failures,
                consecutive_failures=consecutive_failures, last_error=last_error,
                last_success=last_success, last_failure=last_failure,
                latency_ms=median(samples) if samples else None)
        return health

    def breakers(self) -> Dict[str, Tuple[int, Optional[float]]]:
        """``{host_name: (consecutive_failures, last_failure)}``: what the
        circuit breaker needs, without decoding latency samples."""
        return {name: (failures, last) for name, failures, last in self.db.read(
            "SELECT host_name, consecutive_failures, last_failure FROM host_health")}

    def transfers(self) -> Dict[str, Tuple[int, int]]:
        """``{month: (uploaded, downloaded)}`` for every month on record, all
        nodes together."""
        totals: Dict[str, Tuple[int, int]] = {}
        for month, up, down in self.db.read(
                "SELECT month, uploaded, downloaded FROM transfers ORDER BY month, node"):
            before = totals.get(month, (0, 0))
            totals[month] = (before[0] + int(up), before[1] + int(down))
        return totals

    def transfers_by_node(self) -> Dict[str, Dict[str, Tuple[int, int]]]:
        """``{month: {node: (uploaded, downloaded)}}`` for every month on record."""
        found: Dict[str, Dict[str, Tuple[int, int]]] = {}
        for month, node, up, down in self.db.read(
                "SELECT month, node, uploaded, downloaded FROM transfers ORDER BY month, node"):
            found.setdefault(month, {})[node] = (int(up), int(down))
        return found
