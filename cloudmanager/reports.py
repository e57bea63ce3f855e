"""Reports on a pool: statistics, a file's status, listings, host status.

Read-only: nothing here writes. Each report reads running totals and keyed
rows; the few that scan (:func:`unreachable`, :func:`file_count` inside
:func:`stats`) say so.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterable, Iterator, List, Optional

from .db.health import month_key
from .pool import Pool


def status(pool: Pool, file_hash: str) -> Optional[dict]:
    """A file's whole state (``cm info``); see :meth:`cloudmanager.CloudManager.status`."""
    row = pool.db.files.get(file_hash)
    if row is None:
        return None
    entry = pool.db.cache_index.entry(file_hash)
    result = {k: getattr(row, k) for k in ("hash", "filename", "size", "created", "copies",
                                           "verified")}
    uploads = []
    for copy in pool.db.copies.of(file_hash):
        item = copy._asdict()
        item.update(error=copy.error, verified=copy.verified)
        uploads.append(item)
    result.update(cached=pool.cache.contains(file_hash), pinned=bool(entry and entry.pinned),
                  target=pool.redundancy, uploads=uploads)
    return result


def replication(pool: Pool, hashes: Iterable[str]) -> Dict[str, dict]:
    """Where each file stands against the target; see
    :meth:`cloudmanager.CloudManager.replication`."""
    found: Dict[str, dict] = {}
    hashes = list(hashes)
    for start in range(0, len(hashes), 10000):  # one statement per slice
        for h, (copies, verified, error) in pool.db.files.replication_among(
                hashes[start:start + 10000]).items():
            found[h] = {"copies": copies, "verified": verified, "target": pool.redundancy,
                        "last_error": error}
    return found


def files(pool: Pool) -> Iterator[dict]:
    """Every file, by name then hash (``cm ls``), streamed from the database."""
    listing = pool.db.files.listing()
    while True:
        rows = list(itertools.islice(listing, 1000))
        if not rows:
            return
        entries = pool.db.cache_index.entries_among([r.hash for r in rows])
        for row in rows:
            entry = entries.get(row.hash)
            yield {"hash": row.hash, "filename": row.filename, "size": row.size,
                   "cached": bool(entry and entry.cached), "pinned": bool(entry and entry.pinned),
                   "copies": row.copies, "verified": row.verified}


def host_status(pool: Pool) -> Dict[str, dict]:
    """Each configured host's kind, weight, capabilities and health; see
    :meth:`cloudmanager.CloudManager.host_status`."""
    result = {}
    for name, (health, retry_after) in pool.health.status(pool.engine.hosts).items():
        host = pool.engine.hosts[name]
        row = health._asdict()
        row.update(kind=type(host).__name__, weight=host.weight,
                   can_delete=host.can_delete, can_check=host.can_check,
                   state="cooling" if retry_after else "ok", retry_after=retry_after)
        result[name] = row
    return result


def stats(pool: Pool) -> dict:
    """Counts and totals of the pool; see :meth:`cloudmanager.CloudManager.stats`."""
    pool.cache.flush()
    transfers = pool.db.health.transfers()
    by_node = pool.db.health.transfers_by_node()
    this_month = transfers.get(month_key(), (0, 0))
    counter = pool.db.cache_index.counter
    return {
        "files": pool.db.files.count(),
        "cached_files": counter("cached_files"),
        "cached_bytes": counter("cached_bytes"),
        "capacity": pool.cache.capacity,
        "usage_ratio": pool.cache.usage_ratio(),
        "queued": pool.db.queue.length(),
        "below_target": pool.db.files.count_below(pool.redundancy),
        "redundancy": pool.redundancy,
        "uploaded_bytes": {"total": sum(u for u, _ in transfers.values()),
                           "this_month": this_month[0]},
        "downloaded_bytes": {"total": sum(d for _, d in transfers.values()),
                             "this_month": this_month[1]},
        "hits": counter("hits"),
        "misses": counter("misses"),
        "transfers": {m: {"uploaded": u, "downloaded": d} for m, (u, d) in transfers.items()},
        "hosts": host_status(pool),
        "node": pool.cache.node_id,
        "encryption": None if pool.key is None else {
            "recipient": pool.key.recipient, "recipients": list(pool.key.recipients),
            "key_id": pool.key.key_id},
        "nodes": {n.node: {"hostname": n.hostname, "last_seen": n.last_seen,
                           "transfers": {m: {"uploaded": per[n.node][0],
                                             "downloaded": per[n.node][1]}
                                         for m, per in by_node.items() if n.node in per}}
                  for n in pool.db.leases.nodes()},
    }


def unreachable(pool: Pool) -> Dict[str, List[str]]:
    """Files whose every copy believed good is on a host this node has not
    configured; see :meth:`cloudmanager.CloudManager.unreachable`. Reads every
    copy's row: for reports, not hot paths."""
    lost = {}
    for file_hash, rows in itertools.groupby(pool.db.copies.holding(), key=lambda r: r[0]):
        copies = [(h, u) for _, h, u in rows]
        if not pool.engine.reaches(copies) and not pool.cache.contains(file_hash):
            lost[file_hash] = sorted({h for h, _ in copies})
    return lost
