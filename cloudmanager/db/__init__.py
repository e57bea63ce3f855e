"""The pool's database: every SQL statement of cloudmanager lives in this package.

:class:`FileDatabase` is one SQLite file (see :mod:`.connection` for
connections, transactions, the schema and the descriptor rule), with one
object per table or concern, each the only place its table is written:

==================  ====================================  ===============================
attribute           tables                                written on behalf of
==================  ====================================  ===============================
``files``           ``files``                             the cache (new files), records
``copies``          ``uploads``, ``tombstones``,          :mod:`cloudmanager.replication`
                    ``removals``
``queue``           ``upload_queue``                      :mod:`cloudmanager.replication`
``health``          ``host_health``, ``transfers``        :mod:`cloudmanager.health`
``sessions``        ``sessions``, ``reservations``        :mod:`cloudmanager.cache`
``records``         ``files``, ``uploads`` (imports)      :mod:`cloudmanager.records`
``sources``         ``sources``                           :mod:`cloudmanager.sources`
``cache_index``     ``cache_entries``, ``counters``       :mod:`cloudmanager.cache`
==================  ====================================  ===============================
"""

from __future__ import annotations

import os

from .cache_index import CacheIndex
from .connection import SCHEMA_VERSION, Database, in_list, json_list, schema_sql
from .copies import Copies
from .files import Files
from .health import Health, month_key
from .queue import Queue
from .records import Records
from .sessions import Sessions
from .sources import Sources

__all__ = ["FileDatabase", "SCHEMA_VERSION", "in_list", "json_list", "month_key", "schema_sql"]


class FileDatabase(Database):
    """The pool's records in one SQLite file, one attribute per table.

    :param path: the database file; it and its directory are created, and
        given the schema, if new
    :raises DatabaseError: if the file cannot be opened, is not a
        cloudmanager database, or is newer than this code
    """

    def __init__(self, path: os.PathLike[str] | str) -> None:
        super().__init__(path)
        self.files = Files(self)
        self.copies = Copies(self)
        self.queue = Queue(self)
        self.health = Health(self)
        self.sessions = Sessions(self)
        self.records = Records(self)
        self.sources = Sources(self)
        self.cache_index = CacheIndex(self)
