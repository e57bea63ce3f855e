"""The original cloud-manager's wider API, as methods of :class:`~cloudmanager.CloudManager`.

Storj's cloud-manager had these beyond its README (see the README's "Moving
from cloud-manager"); :class:`OriginalMethods` gives them the original's
names and return values over the core :class:`~cloudmanager.legacy.OriginalApi`,
which raises typed errors. A mixin, so the facade's own module stays the
seed's API and ours; ``help(CloudManager)`` lists these with the rest.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, List, Optional

from .errors import CloudManagerError, InvalidInputError

if TYPE_CHECKING:
    from . import meter
    from .pool import Pool

log = logging.getLogger("cloudmanager")


class OriginalMethods:
    """The original's queue, meter and block-cursor methods (a mixin of
    :class:`~cloudmanager.CloudManager`)."""

    pool: Pool

    if TYPE_CHECKING:  # CloudManager's
        def sync(self, reencrypt: bool = False, *,
                 progress: Optional[meter.Advance] = None) -> Dict[str, int]: ...


    def cloud_sync(self) -> None:
        """Upload what is queued: :meth:`sync`, under the original's name.

        The original uploaded each file no host held yet. This also tops up
        files below the redundancy target, as :meth:`sync` does; a failure
        is logged and the file stays queued.

        :return: None, as the original (:meth:`sync` returns a summary)
        """
        self.sync()

    def sync_status(self) -> Dict[str, List[dict]]:
        """The records waiting in both of the original's queues.

        ``cloud_queue``: the files on the upload queue (cached here and
        waiting for hosts, or short of copies). ``blockchain_queue``: the
        records ``data_dump(limit)`` has yet to export (see
        :meth:`blockchain_queue_info`). Each record is a v0.2 dict, as
        :meth:`info` gives it; the original's lacked ``version`` and, before
        an upload, ``uploads`` and ``datetime``. Reads every record of both
        queues: for reports.

        :return: ``{"cloud_queue": [record], "blockchain_queue": [record]}``
        """
        return self.pool.legacy.sync_status()

    def upload_queue_info(self) -> Dict[str, int]:
        """The upload queue: ``{"size": bytes, "count": files}``, as the original.

        ``size`` sums the queued files' sizes (one statement).
        """
        return self.pool.legacy.upload_queue_info()

    def blockchain_queue_info(self) -> Dict[str, int]:
        """The export backlog: ``{"size": bytes, "count": records}``, as the original.

        It counts the records ``data_dump(limit)`` has not exported: files
        with a copy on a host, neither exported nor loaded with a
        ``blockchain_hash``. ``size`` sums their files' sizes, as the
        original did (not the records' JSON). One statement, over every file.
        """
        return self.pool.legacy.blockchain_queue_info()

    def used_space(self) -> int:
        """Bytes of the files in the local cache, as the original's.

        The original summed the storage directory's files; this reads a
        running total (space reserved for writes in flight is not counted).
        """
        return self.pool.cache.used_bytes()

    def capacity(self) -> int:
        """The local cache's capacity in bytes: the ``storage_size`` the pool
        was opened with, as the original's."""
        return self.pool.cache.capacity

    def total_incoming(self) -> int:
        """Bytes downloaded from hosts, by every node of the pool, ever.

        The original also counted as incoming the bytes of every file added
        with :meth:`upload`; here the meter counts what crosses the network
        to and from hosts only (``stats()["downloaded_bytes"]``).
        """
        return self.pool.legacy.traffic().total_incoming

    def total_outgoing(self) -> int:
        """Bytes uploaded to hosts, by every node of the pool, ever.

        The original also counted as outgoing the bytes :meth:`warm_up`
        served, cache hits included; here only what was sent to hosts
        (``stats()["uploaded_bytes"]``).
        """
        return self.pool.legacy.traffic().total_outgoing

    def current_incoming(self) -> int:
        """Bytes downloaded from hosts this calendar month (UTC; the original
        used local time). See :meth:`total_incoming`."""
        return self.pool.legacy.traffic().current_incoming

    def current_outgoing(self) -> int:
        """Bytes uploaded to hosts this calendar month (UTC; the original used
        local time). See :meth:`total_outgoing`."""
        return self.pool.legacy.traffic().current_outgoing

    def last_known_block(self) -> int:
        """The block height :meth:`visit_block` stored last, 0 before the first.

        Kept in the catalog: it survives a reopen, and the nodes of a shared
        catalog share it.
        """
        return self.pool.legacy.last_known_block()

    def visit_block(self, block_height: int) -> Optional[bool]:
        """Store ``block_height`` as the last known block (the original's
        cursor over the blockchain it read records from).

        Any height may be stored, a lower one too (to rewind).

        :param block_height: an int in [0, 2**63)
        :return: None, as the original; ``False`` (with a logged reason) for
            a height that is not such an int, or if the database failed
        """
        try:
            self.pool.legacy.visit_block(block_height)
        except InvalidInputError as exc:
            log.warning("visit_block: %s", exc)
            return False
        except CloudManagerError as exc:
            log.error("visit_block(%r) failed: %s", block_height, exc)
            return False
        return None
