"""The local cache: the storage directory of content-addressed files.

- :mod:`~cloudmanager.cache.layout`: the directory's layout, the one owner
  of shard paths and temp-file names, and its walks (never through a symlink);
- :mod:`~cloudmanager.cache.store`: :class:`CacheStore`, capacity, LRU,
  pins, reservations, ingest and publish;
- :mod:`~cloudmanager.cache.fsck`: repair, one walk for all of it: the
  reconciliation at the cache's open, the pool's cheap open-time pass, and
  the whole check (``cm fsck``).
"""

from . import fsck, layout
from .layout import Layout, open_dir, own_dir, remove_entry, scan, unlink_in
from .store import CacheStore, Ingested, Reservation

__all__ = ["CacheStore", "Ingested", "Layout", "Reservation", "fsck", "layout", "open_dir",
           "own_dir", "remove_entry", "scan", "unlink_in"]
