"""The local cache: the storage directory of content-addressed files.

- :mod:`~cloudmanager.cache.store`: :class:`CacheStore`, capacity, LRU,
  pins, reservations, ingest and publish.
"""

from .store import (CacheStore, Ingested, Reservation, open_dir, own_dir, remove_entry, scan,
                    unlink_in)

__all__ = ["CacheStore", "Ingested", "Reservation", "open_dir", "own_dir", "remove_entry",
           "scan", "unlink_in"]
