"""The original cloud-manager's wider API: what its code had beyond its README.

Storj's 2014 ``cloud-manager`` shared its records through a blockchain: a
node put them in transactions a block at a time with ``data_dump(limit)``
(the records not exported yet, smallest first, as many as fit the limit),
read them back from each block with ``data_load(data, blockchain_hash)``,
and kept the height of the last block it had read (``last_known_block()``,
``visit_block(n)``). It also reported its queues (``sync_status()``,
``upload_queue_info()``, ``blockchain_queue_info()``) and its transfer meter.

:class:`OriginalApi` is that, over the pool's parts; it raises typed errors,
and :class:`~cloudmanager.CloudManager` turns them into the original's
return values. Which records were exported or loaded from a source is kept
in the catalog's ``published`` table (:mod:`cloudmanager.db.published`), the
block cursor in ``pool_state`` (:mod:`cloudmanager.db.state`).
"""

from __future__ import annotations

import heapq
import json
import logging
import time
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

from . import serializers
from .db import FileDatabase, month_key
from .records import RecordStore
from .validation import check_count, check_source

log = logging.getLogger(__name__)

#: The ``pool_state`` name of the block cursor.
LAST_KNOWN_BLOCK = "last_known_block"
#: The bytes of an empty JSON array: the least ``data_dump(limit)`` can take.
_BRACKETS = 2


class Traffic(NamedTuple):
    """The transfer meter as the original named it: bytes received from hosts
    (incoming) and sent to them (outgoing), in total and this month (UTC)."""

    total_incoming: int
    total_outgoing: int
    current_incoming: int
    current_outgoing: int


class OriginalApi:
    """The original's queues, meter, block cursor and limited export.

    :param db: the pool's database
    :param records: the pool's records (export and import)
    """

    def __init__(self, db: FileDatabase, records: RecordStore) -> None:
        self.db = db
        self.records = records

    # -- queues ---------------------------------------------------------------------

    def upload_queue_info(self) -> Dict[str, int]:
        """``{"size": bytes, "count": files}`` of the upload queue."""
        count, size = self.db.queue.totals()
        return {"size": size, "count": count}

    def blockchain_queue_info(self) -> Dict[str, int]:
        """``{"size": bytes, "count": records}`` of the export backlog: files
        with a copy on a host whose record was neither exported by
        :meth:`export` nor loaded from a source; ``size`` sums their files'
        sizes, as the original did."""
        count, size = self.db.records.unpublished_totals()
        return {"size": size, "count": count}

    def sync_status(self) -> Dict[str, List[dict]]:
        """Both queues' records, as v0.2 dicts: ``{"cloud_queue": [...],
        "blockchain_queue": [...]}``. Reads every queued record: for reports."""
        queued = self.db.queue.hashes()
        cloud = [serializers.record_to_dict(r)
                 for r in self.records.records(queued, with_copies_only=False)]
        backlog = [serializers.record_to_dict(r)
                   for r in self.records.records(unpublished=True)]
        return {"cloud_queue": cloud, "blockchain_queue": backlog}

    # -- the transfer meter ----------------------------------------------------------

    def traffic(self) -> Traffic:
        """The transfer meter of every node of the pool, in the original's terms."""
        months = self.db.health.transfers()
        up, down = months.get(month_key(), (0, 0))
        return Traffic(total_incoming=sum(d for _, d in months.values()),
                       total_outgoing=sum(u for u, _ in months.values()),
                       current_incoming=down, current_outgoing=up)

    # -- the block cursor -------------------------------------------------------------

    def last_known_block(self) -> int:
        """The height :meth:`visit_block` stored last; 0 before the first."""
        return self.db.state.get(LAST_KNOWN_BLOCK, 0)

    def visit_block(self, height: int) -> None:
        """Store ``height`` as the last known block (lower than before too: a
        caller may rewind after a reorganisation of the chain).

        :raises InvalidInputError: if it is not an integer in [0, 2**63)
        """
        height = check_count(height, "a block height")
        with self.db.catalog.transaction() as conn:
            self.db.state.set(conn, [(LAST_KNOWN_BLOCK, height)])

    def carry_block(self, height: int) -> int:
        """Keep the later of the pool's block cursor and ``height`` (another
        pool's cursor, carried by ``cm import-legacy``): the blocks before
        either were read already. Carrying it twice changes nothing.

        :return: the cursor now
        :raises InvalidInputError: if it is not an integer in [0, 2**63)
        """
        height = check_count(height, "a block height")
        with self.db.catalog.transaction() as conn:
            now = max(self.db.state.get(LAST_KNOWN_BLOCK, 0), height)
            self.db.state.set(conn, [(LAST_KNOWN_BLOCK, now)])
        return now

    # -- export and import ------------------------------------------------------------

    def export(self, limit: int) -> Optional[str]:
        """The records not exported before, smallest first, as many as fit in
        a JSON array of ``limit`` bytes (UTF-8), stamped as exported.

        Each record is exported once: they are stamped in the transaction
        that picks them, and one another process stamped meanwhile is left
        out. A record larger than ``limit`` on its own is never chosen; it
        stays in the backlog for a call with a larger limit.

        :param limit: the most bytes the JSON text may have (at least 2)
        :return: the JSON array (compact, ``","`` and ``":"`` separators), or
            None when no record not exported yet fits
        :raises InvalidInputError: for a limit that is not an integer >= 2
        :raises DatabaseError: if the database fails (nothing is stamped)
        """
        limit = check_count(limit, "data_limit", minimum=_BRACKETS)
        while True:
            chosen, too_large = self._choose(limit)
            if not chosen:
                if too_large:
                    log.warning("%d records not exported yet are each larger than %d bytes "
                                "alone; they wait for a larger limit", too_large, limit)
                return None
            with self.db.catalog.transaction() as conn:
                stamped = set(self.db.published.mark_exported(
                    conn, [h for h, _ in chosen], time.time()))
            texts = [text for h, text in chosen if h in stamped]
            if texts:
                return "[" + ",".join(texts) + "]"
            # Another process exported every one of them meanwhile: choose again
            # (there are fewer left each time).

    def _choose(self, limit: int) -> Tuple[List[Tuple[str, str]], int]:
        """The smallest records not published that fit in ``limit`` together.

        One pass over the backlog, keeping a heap of the smallest so far whose
        array fits: memory grows with the limit, not with the backlog.

        :return: ``([(hash, text)]`` smallest first, ties by hash; the number
            of records too large alone)
        """
        # A max-heap on (bytes, arrival): records arrive in hash order, so
        # the later of two of one size is the larger hash.
        heap: List[Tuple[int, int, str, str]] = []
        used = too_large = 0
        for seq, record in enumerate(self.records.records(unpublished=True)):
            text = json.dumps(serializers.record_to_dict(record), ensure_ascii=False,
                              separators=(",", ":"))
            size = len(text.encode("utf-8"))
            if _BRACKETS + size > limit:
                too_large += 1
                continue
            heapq.heappush(heap, (-size, -seq, record.hash, text))
            used += size
            # The array: the records, a comma between each two, the brackets.
            while used + len(heap) - 1 + _BRACKETS > limit:
                dropped = heapq.heappop(heap)
                used += dropped[0]
        chosen = sorted(heap, key=lambda item: (-item[0], -item[1]))
        return [(h, text) for _, _, h, text in chosen], too_large

    def stamp_exported(self, stamps: List[Tuple[str, float]]) -> None:
        """Keep when records were exported by another pool (an original
        pool's ``exported_timestamp``): such records are out there, so
        :meth:`export` never exports them again. A stamp or tag already there
        stays; files the pool does not have are passed over.

        :param stamps: ``(hash, unix time)`` pairs
        """
        if stamps:
            with self.db.catalog.transaction() as conn:
                self.db.published.stamp(conn, stamps)

    def load(self, text: Union[str, bytes], source: str) -> int:
        """Merge the records of ``text`` and tag them with ``source``, so they
        are not exported again (they are out there already).

        :return: how many valid records the text held
        :raises InvalidInputError: for a source that is not 1 to 256
            characters of text without control characters
        :raises SerializationError: if the text is not JSON records, or holds
            no valid one
        """
        return self.records.load_tagged(text, check_source(source))
