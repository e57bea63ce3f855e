"""The pool's database: every SQL statement of cloudmanager lives in this package.

:class:`FileDatabase` is one SQLite file (see :mod:`.connection` for
connections, transactions, the schema and the descriptor rule), or a
catalog on a PostgreSQL server (:mod:`.postgres`) with a local SQLite file
for the node's cache index. It has one object per table or concern, each the
only place its table is written:

==================  ====================================  ===============================
attribute           tables                                written on behalf of
==================  ====================================  ===============================
``files``           ``files``                             the cache (new files), records
``copies``          ``uploads``, ``tombstones``,          :mod:`cloudmanager.replication`
                    ``removals``
``queue``           ``upload_queue``                      :mod:`cloudmanager.replication`
``leases``          ``leases``, ``nodes``                 :mod:`cloudmanager.replication`,
                                                          the cache (its node)
``health``          ``host_health``, ``transfers``        :mod:`cloudmanager.health`
``sessions``        ``sessions``, ``reservations``,       :mod:`cloudmanager.cache`
                    ``this_node``
``records``         ``files``, ``uploads`` (imports)      :mod:`cloudmanager.records`
``published``       ``published``                         :mod:`cloudmanager.legacy`
``state``           ``pool_state``                        :mod:`cloudmanager.legacy`
``sources``         ``sources``                           :mod:`cloudmanager.sources`
``trees``           ``trees``                             :mod:`cloudmanager.trees`,
                                                          records (imports)
``cache_index``     ``cache_entries``, ``counters``       :mod:`cloudmanager.cache`
==================  ====================================  ===============================
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Optional, Sequence, Tuple, Union

from ..errors import DatabaseError
from .cache_index import CacheIndex
from .connection import SCHEMA_VERSION, Database, in_list, json_list, schema_sql
from .copies import Copies
from .files import Files
from .health import Health, month_key
from .leases import Leases
from .published import Published
from .queue import Queue
from .records import Records
from .sessions import Sessions
from .sources import Sources
from .state import PoolState
from .trees import Trees
from .urls import is_postgres_url, redact

if TYPE_CHECKING:
    from .postgres import PostgresDatabase

__all__ = ["FileDatabase", "INDEX_SUFFIX", "SCHEMA_VERSION", "in_list", "index_path_for",
           "is_postgres_url", "json_list", "month_key", "redact", "schema_sql"]


#: What a node's cache index file adds to its storage directory's path, for
#: a pool whose catalog is on a server: ``cache/`` has ``cache.index.sqlite3``
#: beside it.
INDEX_SUFFIX = ".index.sqlite3"


def index_path_for(database: os.PathLike[str] | str,
                   storage: os.PathLike[str] | str) -> Optional[str]:
    """Where a node keeps its cache index: inside the database file when it
    is SQLite (None), else beside the storage directory (the catalog is on a
    server): ``STORAGE.index.sqlite3``.

    >>> index_path_for("postgresql://db.example/pool", "/var/cache/cm")
    '/var/cache/cm.index.sqlite3'
    """
    if is_postgres_url(database):
        return os.path.abspath(os.fspath(storage)) + INDEX_SUFFIX
    return None


class FileDatabase:
    """The pool's records, one attribute per table (see the table above).

    Two parts: the pool's **catalog** (files, copies, the queue, host health,
    published records, the block cursor) and this node's **cache index**
    (cache entries, reservations, sessions, remembered sources). By default
    both are in one SQLite file, and one transaction covers both. With a
    ``postgresql://`` URL, the catalog is on the server (:mod:`.postgres`),
    shared by every node, and the cache index is the local SQLite file
    ``index_path``: a cache hit never crosses the network.

    :param database: a SQLite file path, or a ``postgresql://`` /
        ``postgres://`` URL
    :param index_path: the local cache index file, for a catalog on a server
    :raises DatabaseError: if a part cannot be opened, is not a cloudmanager
        database, or is newer than this code
    """

    def __init__(self, database: os.PathLike[str] | str,
                 index_path: Optional[os.PathLike[str] | str] = None) -> None:
        self.catalog: Union[Database, PostgresDatabase]
        if is_postgres_url(database):
            if index_path is None:
                raise DatabaseError("a catalog on a server needs a local file for the "
                                    "cache index")
            # Imported here: a SQLite pool never loads the PostgreSQL catalog's module.
            from .postgres import PostgresDatabase

            self.catalog = PostgresDatabase(str(database))
            try:
                self.local = Database(index_path, with_catalog=False)
            except BaseException:
                self.catalog.close()
                raise
        else:
            self.local = Database(database)
            self.catalog = self.local
        #: Where the catalog is, as it may be shown (a URL without its password).
        self.path = self.catalog.path
        self.files = Files(self.catalog)
        self.copies = Copies(self.catalog)
        self.queue = Queue(self.catalog)
        self.health = Health(self.catalog)
        self.records = Records(self.catalog)
        self.leases = Leases(self.catalog)
        self.published = Published(self.catalog)
        self.state = PoolState(self.catalog)
        self.trees = Trees(self.catalog)
        self.sessions = Sessions(self.local)
        self.sources = Sources(self.local)
        self.cache_index = CacheIndex(self.local)

    @property
    def shared(self) -> bool:
        """Whether the catalog is apart from this node's cache index (on a server)."""
        return self.catalog is not self.local

    def transaction(self) -> ContextManager[Any]:
        """A transaction over both parts, when they are one SQLite file.

        :raises DatabaseError: for a catalog on a server: there, a caller
            names the part, ``catalog.transaction()`` or ``local.transaction()``
        """
        if self.shared:
            raise DatabaseError("a transaction must name its part: the catalog is on a "
                                "server, the cache index local")
        return self.local.transaction()

    def both(self) -> ContextManager[Tuple[Any, Any]]:
        """A write transaction on each part: yields ``(catalog_conn, local_conn)``.

        In one SQLite file they are one transaction (the same connection).
        With the catalog on a server, the cache index's commits first, then
        the catalog's: a crash between them leaves this node with more than
        the catalog knows (which fsck can restore), never the catalog
        promising a file this node does not hold.
        """
        if not self.shared:  # one file: one transaction, no savepoint
            return _Twice(self.local.transaction())
        return self._both_parts()

    @contextlib.contextmanager
    def _both_parts(self) -> Iterator[Tuple[Any, Any]]:
        with self.catalog.transaction() as catalog_conn:
            with self.local.transaction() as local_conn:
                yield catalog_conn, local_conn

    def read(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """A read of the single-file database (see :meth:`transaction`)."""
        if self.shared:
            raise DatabaseError("a read must name its part")
        return self.local.read(sql, params)

    @property
    def connection(self) -> Any:
        """This thread's connection to the single-file database (tests, tools)."""
        if self.shared:
            raise DatabaseError("a connection must name its part")
        return self.local.connection

    def schema_version(self) -> int:
        """The catalog's schema version."""
        return self.catalog.schema_version()

    def ensure_schema(self) -> int:
        """Create or migrate both parts; :return: the catalog's version before."""
        before = self.catalog.ensure_schema()
        if self.shared:
            self.local.ensure_schema()
        return before

    def close(self) -> None:
        """Close both parts' connections."""
        try:
            self.local.close()
        finally:
            if self.shared:
                self.catalog.close()


class _Twice:
    """One SQLite transaction yielded as both parts, ``(conn, conn)``: a class,
    not a generator, on the path of every upload."""

    __slots__ = ("_transaction",)

    def __init__(self, transaction: ContextManager[Any]) -> None:
        self._transaction = transaction

    def __enter__(self) -> Tuple[Any, Any]:
        conn = self._transaction.__enter__()
        return conn, conn

    def __exit__(self, *exc_info: Any) -> Optional[bool]:
        return self._transaction.__exit__(*exc_info)
