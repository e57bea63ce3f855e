"""Connections, transactions and the schema of a pool's SQLite database.

The database is SQLite in WAL mode. Each thread gets its own connection (and
a forked child gets new ones). Writes go through :meth:`Database.transaction`,
which takes the write lock up front with ``BEGIN IMMEDIATE`` and retries a
bounded number of times when another process holds it; nested use on one
thread is a savepoint of the outer transaction.

The schema is in ``schema.sql`` beside this module, versioned with
``PRAGMA user_version``. :data:`MIGRATIONS` lists the steps from each version
to the next.

**The descriptor rule.** Nothing in cloudmanager opens the database file, or
its ``-wal`` or ``-shm`` file, except SQLite. On POSIX, closing *any*
descriptor of a file drops every ``fcntl`` lock the process holds on it,
including the locks SQLite's other connections rely on; another process may
then believe it is the last user, checkpoint and delete the WAL under this
one, and the database is corrupt (SQLite's "How To Corrupt", 2.2). So modes
are set by path (``os.chmod``), sizes are read with ``os.stat``, and copies
and checks go through SQLite connections. ``tests/test_database.py`` holds a
test that another process can never take the locks of a live connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from importlib import resources
from typing import (
    Any, ContextManager, Dict, Iterable, Iterator, List, Protocol, Sequence, Tuple, Union,
)

from ..errors import DatabaseError

log = logging.getLogger(__name__)

#: The schema version this code writes and expects.
SCHEMA_VERSION = 8

#: WAL pages between automatic checkpoints (SQLite's default is 1,000, or
#: 4 MB); a checkpoint writes each dirty page once, however often it changed.
WAL_AUTOCHECKPOINT = 8000
#: KiB of SQLite page cache per connection (SQLite's default is 2,000 KiB).
CACHE_KIB = 32 * 1024

#: How long one attempt waits for a lock held by another connection.
BUSY_TIMEOUT_S = 10.0
#: How many times a transaction start is retried when SQLite still says busy.
BUSY_RETRIES = 8

#: ``{from_version: sql}``: the script that moves a database from
#: ``from_version`` to ``from_version + 1``. A script ends by setting
#: ``PRAGMA user_version``; from version 4 on, a step is a dict of one script
#: per part (``catalog``, ``cache_index``), since a node's cache index can be
#: a file of its own, and the version is set after them. A migration is
#: frozen once released: it must not follow later edits of ``schema.sql``.
MIGRATIONS: Dict[int, Union[str, Dict[str, str]]] = {
    # 2: verify() records when it checked each copy; host latency is kept as
    # recent samples, so a median can be reported instead of a moving average.
    # The old average column stays, unused: DROP COLUMN needs SQLite 3.35.
    1: """
        ALTER TABLE uploads ADD COLUMN checked INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX IF NOT EXISTS uploads_checked ON uploads (checked) WHERE error = 0;
        ALTER TABLE host_health ADD COLUMN latency_samples TEXT NOT NULL DEFAULT '[]';
        UPDATE host_health SET latency_samples = json_array(latency_ms)
            WHERE latency_ms IS NOT NULL;
        PRAGMA user_version = 2;
    """,
    # 3: the hashes of local source files, for `cm upload` to skip known files.
    2: """
        CREATE TABLE IF NOT EXISTS sources (
            path     TEXT PRIMARY KEY,
            size     INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            ctime_ns INTEGER NOT NULL,
            inode    INTEGER NOT NULL,
            device   INTEGER NOT NULL,
            hash     TEXT NOT NULL CHECK (length(hash) = 64)
        ) WITHOUT ROWID;
        PRAGMA user_version = 3;
    """,
    # 4: the copy state machine (a state per copy, with back-off for looking
    # again at condemned ones), tombstones of deleted copies, and the cache
    # index apart from the catalog. uploads is rebuilt (its CHECK and columns
    # change); files keeps its old cache columns, unused: rebuilding a parent
    # table would cascade into its children.
    3: """
        CREATE TABLE uploads_v4 (
            hash       TEXT NOT NULL REFERENCES files (hash) ON DELETE CASCADE,
            host_name  TEXT NOT NULL,
            url        TEXT NOT NULL DEFAULT '',
            state      TEXT NOT NULL DEFAULT 'claimed' CHECK (state IN
                           ('pending', 'good', 'claimed', 'suspect', 'bad', 'missing',
                            'deleted')),
            time       INTEGER NOT NULL,
            checked    INTEGER NOT NULL DEFAULT 0,
            next_check REAL NOT NULL DEFAULT 0,
            strikes    INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (hash, host_name, url)
        ) WITHOUT ROWID;
        INSERT INTO uploads_v4 (hash, host_name, url, state, time, checked)
            SELECT hash, host_name, url,
                   CASE WHEN url = '' THEN 'pending' WHEN error = 1 THEN 'bad'
                        WHEN verified = 1 THEN 'good' ELSE 'claimed' END,
                   time, checked FROM uploads;
        DROP TABLE uploads;
        ALTER TABLE uploads_v4 RENAME TO uploads;
        CREATE INDEX uploads_checked ON uploads (checked) WHERE state IN ('good', 'claimed');
        CREATE INDEX uploads_recheck ON uploads (next_check)
            WHERE state IN ('suspect', 'bad', 'missing');
        CREATE TRIGGER uploads_insert AFTER INSERT ON uploads BEGIN
            UPDATE files SET
                copies = (SELECT count(DISTINCT host_name) FROM uploads
                          WHERE hash = NEW.hash AND state IN ('good', 'claimed', 'suspect')),
                verified = (SELECT count(DISTINCT host_name) FROM uploads
                            WHERE hash = NEW.hash AND state = 'good')
            WHERE hash = NEW.hash;
        END;
        CREATE TRIGGER uploads_update AFTER UPDATE OF state ON uploads
        WHEN OLD.state != NEW.state BEGIN
            UPDATE files SET
                copies = (SELECT count(DISTINCT host_name) FROM uploads
                          WHERE hash = NEW.hash AND state IN ('good', 'claimed', 'suspect')),
                verified = (SELECT count(DISTINCT host_name) FROM uploads
                            WHERE hash = NEW.hash AND state = 'good')
            WHERE hash = NEW.hash;
        END;
        CREATE TRIGGER uploads_delete AFTER DELETE ON uploads BEGIN
            UPDATE files SET
                copies = (SELECT count(DISTINCT host_name) FROM uploads
                          WHERE hash = OLD.hash AND state IN ('good', 'claimed', 'suspect')),
                verified = (SELECT count(DISTINCT host_name) FROM uploads
                            WHERE hash = OLD.hash AND state = 'good')
            WHERE hash = OLD.hash;
        END;
        CREATE TABLE tombstones (
            hash      TEXT NOT NULL CHECK (length(hash) = 64),
            host_name TEXT NOT NULL,
            url       TEXT NOT NULL,
            deleted   REAL NOT NULL,
            PRIMARY KEY (hash, host_name, url)
        ) WITHOUT ROWID;
        CREATE TABLE removals (
            hash    TEXT PRIMARY KEY CHECK (length(hash) = 64),
            owner   TEXT NOT NULL,
            started REAL NOT NULL
        ) WITHOUT ROWID;
        DROP INDEX IF EXISTS files_copies;
        CREATE INDEX files_verified ON files (verified);
        CREATE TABLE cache_entries (
            hash        TEXT PRIMARY KEY CHECK (length(hash) = 64),
            size        INTEGER NOT NULL CHECK (size >= 0),
            cached      INTEGER NOT NULL DEFAULT 0 CHECK (cached IN (0, 1)),
            last_access REAL NOT NULL DEFAULT 0,
            pinned      INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)),
            protected   INTEGER NOT NULL DEFAULT 0 CHECK (protected IN (0, 1))
        ) WITHOUT ROWID;
        INSERT INTO cache_entries (hash, size, cached, last_access, pinned, protected)
            SELECT hash, size, cached, last_access, pinned, verified > 0 FROM files
            WHERE cached = 1 OR pinned = 1;
        DROP INDEX IF EXISTS files_lru;
        DROP TRIGGER IF EXISTS files_cache_insert;
        DROP TRIGGER IF EXISTS files_cache_update;
        DROP TRIGGER IF EXISTS files_cache_delete;
        CREATE INDEX cache_lru ON cache_entries (last_access)
            WHERE cached = 1 AND protected = 1 AND pinned = 0;
        CREATE TRIGGER cache_insert AFTER INSERT ON cache_entries
        WHEN NEW.cached = 1 BEGIN
            UPDATE counters SET value = value + NEW.size WHERE name = 'cached_bytes';
            UPDATE counters SET value = value + 1 WHERE name = 'cached_files';
        END;
        CREATE TRIGGER cache_update AFTER UPDATE OF cached, size ON cache_entries
        WHEN OLD.cached != NEW.cached OR OLD.size != NEW.size BEGIN
            UPDATE counters SET value = value + NEW.cached * NEW.size - OLD.cached * OLD.size
                WHERE name = 'cached_bytes';
            UPDATE counters SET value = value + (NEW.cached - OLD.cached)
                WHERE name = 'cached_files';
        END;
        CREATE TRIGGER cache_delete AFTER DELETE ON cache_entries
        WHEN OLD.cached = 1 BEGIN
            UPDATE counters SET value = value - OLD.size WHERE name = 'cached_bytes';
            UPDATE counters SET value = value - 1 WHERE name = 'cached_files';
        END;
        PRAGMA user_version = 4;
    """,
    # 5: several nodes on one catalog: leases on work, the nodes, the
    # transfer meter per node, and which node's cache holds a queued file.
    4: {
        "catalog": """
            ALTER TABLE upload_queue ADD COLUMN node TEXT NOT NULL DEFAULT '';
            CREATE TABLE leases (
                kind  TEXT NOT NULL,
                hash  TEXT NOT NULL CHECK (length(hash) = 64),
                owner TEXT NOT NULL,
                until REAL NOT NULL,
                PRIMARY KEY (kind, hash)
            ) WITHOUT ROWID;
            CREATE TABLE transfers_v5 (
                month      TEXT NOT NULL,
                node       TEXT NOT NULL DEFAULT '',
                uploaded   INTEGER NOT NULL DEFAULT 0,
                downloaded INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (month, node)
            ) WITHOUT ROWID;
            INSERT INTO transfers_v5 (month, node, uploaded, downloaded)
                SELECT month, '', uploaded, downloaded FROM transfers;
            DROP TABLE transfers;
            ALTER TABLE transfers_v5 RENAME TO transfers;
            CREATE TABLE nodes (
                node       TEXT PRIMARY KEY,
                hostname   TEXT NOT NULL,
                first_seen REAL NOT NULL,
                last_seen  REAL NOT NULL
            ) WITHOUT ROWID;
        """,
        "cache_index": """
            CREATE TABLE this_node (node TEXT NOT NULL);
        """,
    },
    # 6: encrypted copies (what each copy's object is, when not the
    # plaintext); the cache's totals kept per batch by db/cache_index.py, not
    # by triggers per row; and for the original's API of sharing records through a
    # log (a blockchain): which records were exported or loaded from a
    # source, and the pool's named integers (the last known block).
    5: {
        "catalog": """
            ALTER TABLE uploads ADD COLUMN object_sha256 TEXT NOT NULL DEFAULT '';
            ALTER TABLE uploads ADD COLUMN object_size INTEGER NOT NULL DEFAULT -1;
            ALTER TABLE uploads ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
            CREATE TABLE published (
                hash     TEXT PRIMARY KEY REFERENCES files (hash) ON DELETE CASCADE,
                exported REAL,
                source   TEXT,
                CHECK (exported IS NOT NULL OR source IS NOT NULL)
            ) WITHOUT ROWID;
            CREATE TABLE pool_state (
                name  TEXT PRIMARY KEY,
                value INTEGER NOT NULL
            ) WITHOUT ROWID;
        """,
        "cache_index": """
            DROP TRIGGER IF EXISTS cache_insert;
            DROP TRIGGER IF EXISTS cache_update;
            DROP TRIGGER IF EXISTS cache_delete;
        """,
    },
    # 7: copies inserted are counted per batch by db/copies.py (recount),
    # not by a trigger per row; tree manifests by name (cloudmanager/trees.py):
    # which files of the pool are a directory's manifest (existing pools have
    # none).
    6: {
        "catalog": """
            DROP TRIGGER IF EXISTS uploads_insert;
            CREATE TABLE trees (
                hash    TEXT PRIMARY KEY REFERENCES files (hash) ON DELETE CASCADE,
                name    TEXT NOT NULL,
                created INTEGER NOT NULL
            ) WITHOUT ROWID;
        """,
        "cache_index": "",
    },
    # 8: reservations keep no AUTOINCREMENT sequence (temp file names no
    # longer come from their ids); the rows in flight are kept.
    7: {
        "catalog": "",
        "cache_index": """
            CREATE TABLE reservations_v8 (
                id      INTEGER PRIMARY KEY,
                owner   TEXT NOT NULL,
                size    INTEGER NOT NULL CHECK (size >= 0),
                hash    TEXT,
                created REAL NOT NULL
            );
            INSERT INTO reservations_v8 (id, owner, size, hash, created)
                SELECT id, owner, size, hash, created FROM reservations;
            DROP TABLE reservations;
            ALTER TABLE reservations_v8 RENAME TO reservations;
        """,
    },
}


#: The line of ``schema.sql`` where the cache index's part begins.
_CACHE_INDEX_PART = "-- == this node's cache index"


def schema_sql(part: str = "all") -> str:
    """Return the text of ``schema.sql``: ``"all"`` of it, or only its
    ``"catalog"`` or its ``"cache_index"`` part."""
    text = resources.files(__package__).joinpath("schema.sql").read_text("utf-8")
    if part == "all":
        return text
    catalog, marker, cache_index = text.partition(_CACHE_INDEX_PART)
    if not marker or part not in ("catalog", "cache_index"):
        raise ValueError("no schema part %r" % part)
    return catalog if part == "catalog" else marker + cache_index


def in_list(values: Iterable[Any]) -> Tuple[str, str]:
    """``(sql, parameter)`` for ``column IN (...)`` over any number of values.

    One JSON array parameter, so no list is too long for SQLite's variable
    limit and the statement text never changes with its length::

        sql, param = in_list(hashes)
        conn.execute("SELECT ... WHERE hash " + sql, (param,))

    >>> in_list(["a", "b"])
    ('IN (SELECT value FROM json_each(?))', '["a", "b"]')
    """
    return "IN (SELECT value FROM json_each(?))", json_list(values)


def json_list(values: Iterable[Any]) -> str:
    """The JSON array parameter that :func:`in_list` and ``json_each`` joins take."""
    return json.dumps(list(values))


class Conn(Protocol):
    """A connection inside a transaction, on either catalog: ``sqlite3``'s, or
    :class:`~cloudmanager.db.postgres.PostgresConnection`."""

    def execute(self, sql: str, params: Any = ..., /) -> Any:
        """Run one statement."""

    def executemany(self, sql: str, seq: Any, /) -> Any:
        """Run one statement per parameter tuple."""


class Store(Protocol):
    """What the catalog's modules need of a database: :class:`Database` (SQLite)
    or :class:`~cloudmanager.db.postgres.PostgresDatabase`."""

    #: Where it is, as it may be shown.
    path: str

    def transaction(self) -> ContextManager[Any]:
        """A write transaction yielding a connection (``execute``, ``executemany``)."""

    def read(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Rows of a read-only statement."""


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _rollback(conn: sqlite3.Connection) -> None:
    """End the transaction on ``conn``, if SQLite has not ended it already.

    After some errors (a full disk, an I/O error) SQLite rolls the
    transaction back itself; a ROLLBACK then would raise "no transaction is
    active" over the error that matters. A ROLLBACK that fails leaves the
    connection as SQLite left it, and the original error is raised.
    """
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class Database:
    """One SQLite file: connections per thread, transactions, the schema.

    :param path: the database file; it and its directory are created, and
        given the schema, if new
    :param with_catalog: False for a node's cache index alone (its catalog
        is on a server): a new file gets only the cache index's tables
    :raises DatabaseError: if the file cannot be opened, is not a
        cloudmanager database, or is newer than this code
    """

    dialect = "sqlite"

    def __init__(self, path: os.PathLike[str] | str, with_catalog: bool = True) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.with_catalog = with_catalog
        self._local = threading.local()
        self._closed = False
        self._all_connections: List[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self.ensure_schema()

    # -- connections and transactions ------------------------------------

    @property
    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and after a fork)."""
        if self._closed:
            raise DatabaseError("database %s is closed" % self.path)
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._connect()
            local.conn, local.pid, local.depth = conn, os.getpid(), 0
        return conn

    def _connect(self) -> sqlite3.Connection:
        try:
            os.makedirs(os.path.dirname(self.path), 0o700, exist_ok=True)
            is_new = not os.path.exists(self.path)
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,  # we issue BEGIN ourselves
                check_same_thread=False,  # closed from close(), never shared
            )
            if is_new:
                # Private from the start: SQLite gives its -wal and -shm files
                # the database file's mode, and creates the file 0644. chmod
                # by path, never through a descriptor of our own (see the
                # descriptor rule above). The file is still empty here.
                with contextlib.suppress(OSError):  # another process's file
                    os.chmod(self.path, 0o600)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Checkpoint (and fsync) every WAL_AUTOCHECKPOINT pages, not every
            # 1,000: deferred recency writes dirty random pages, and at 100k
            # rows SQLite's default checkpointed on nearly every commit.
            conn.execute("PRAGMA wal_autocheckpoint = %d" % WAL_AUTOCHECKPOINT)
            # A page cache that holds the hot index at 100k+ rows (the default,
            # 2 MB, made every lookup read pages from the OS).
            conn.execute("PRAGMA cache_size = %d" % -CACHE_KIB)
        except (sqlite3.Error, OSError) as exc:
            raise DatabaseError("cannot open database %s: %s" % (self.path, exc)) from exc
        with self._connections_lock:
            self._all_connections.append(conn)
        return conn

    @staticmethod
    def _enable_wal(conn: sqlite3.Connection) -> None:
        # WAL is a property of the file: only its first opener switches it.
        # The switch can fail with "locked" while another process creates the
        # database, and SQLite's busy handler does not cover it, so retry here.
        for _ in range(BUSY_RETRIES * 10):
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                    return
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                time.sleep(0.01 * random.uniform(1, 3))
        conn.execute("PRAGMA journal_mode = WAL")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, as a context manager yielding the connection.

        It starts with ``BEGIN IMMEDIATE``, so the write lock is held from the
        start and the transaction cannot fail later for want of it. When
        another process holds the lock longer than the busy timeout, the start
        is retried with backoff, up to :data:`BUSY_RETRIES` times. Nested use
        on one thread is a savepoint: an exception rolls back the inner block
        only, and the outer transaction decides the rest.

        :raises DatabaseError: if the lock cannot be had, or a statement or
            the commit fails (a full disk among them); nothing of the
            transaction is then written
        """
        conn = self.connection
        local = self._local
        if local.depth:
            yield from self._savepoint(conn, local)
            return
        for attempt in range(BUSY_RETRIES + 1):
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or attempt == BUSY_RETRIES:
                    raise DatabaseError("cannot start a transaction on %s: %s"
                                        % (self.path, exc)) from exc
                log.debug("database busy, retry %d: %s", attempt + 1, exc)
                time.sleep(min(0.05 * 2 ** attempt, 1.0) * random.uniform(0.5, 1.5))
        local.depth = 1
        try:
            yield conn
        except sqlite3.Error as exc:
            # A constraint that failed (a row another process deleted, say)
            # is a DatabaseError like any other, never a bare sqlite3 error.
            local.depth = 0
            _rollback(conn)
            raise DatabaseError("%s on %s" % (exc, self.path)) from exc
        except BaseException:
            local.depth = 0
            _rollback(conn)
            raise
        local.depth = 0
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise DatabaseError("commit failed on %s: %s" % (self.path, exc)) from exc

    def _savepoint(self, conn: sqlite3.Connection, local: Any) -> Iterator[sqlite3.Connection]:
        name = "sp%d" % local.depth
        local.depth += 1
        try:
            conn.execute("SAVEPOINT " + name)
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK TO " + name)
                        conn.execute("RELEASE " + name)
                raise
            conn.execute("RELEASE " + name)
        except sqlite3.Error as exc:
            raise DatabaseError("%s on %s" % (exc, self.path)) from exc
        finally:
            local.depth -= 1

    def read(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run a read-only statement on this thread's connection.

        :raises DatabaseError: if it fails
        """
        try:
            return self.connection.execute(sql, params)
        except sqlite3.Error as exc:
            raise DatabaseError("query failed on %s: %s" % (self.path, exc)) from exc

    def close(self) -> None:
        """Close every connection this instance opened."""
        self._closed = True
        with self._connections_lock:
            conns, self._all_connections = self._all_connections, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # -- schema ------------------------------------------------------------

    def schema_version(self) -> int:
        """Return the database's ``PRAGMA user_version``."""
        return int(self.read("PRAGMA user_version").fetchone()[0])

    def ensure_schema(self) -> int:
        """Create the schema on a new database, or migrate an older one.

        The version is read again under the write lock, so processes opening
        a new database at the same moment create the schema once.

        :return: the version the database had before (0 for a new one)
        :raises DatabaseError: if the database is newer than this code, is not
            a cloudmanager database, or a migration fails
        """
        before = self.schema_version()
        if before != SCHEMA_VERSION:
            self._create_or_migrate()
        # Only now, with the file known to be ours: WAL persists in the file.
        self._enable_wal(self.connection)
        return before

    def _create_or_migrate(self) -> None:
        with self.transaction() as conn:
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise DatabaseError(
                    "database %s has schema version %d; this cloudmanager knows up to %d"
                    % (self.path, version, SCHEMA_VERSION))
            has_files = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'files'"
                                     ).fetchone()[0]
            if version == 0:
                if has_files or conn.execute("SELECT count(*) FROM sqlite_master"
                                             " WHERE name = 'cache_entries'").fetchone()[0]:
                    raise DatabaseError("%s has cloudmanager's tables but no schema "
                                        "version; refusing to touch it" % self.path)
                self._run_script(conn, schema_sql("all" if self.with_catalog else "cache_index"))
                log.info("created schema version %d in %s", SCHEMA_VERSION, self.path)
                version = self.schema_version()
            elif bool(has_files) != self.with_catalog:
                raise DatabaseError(
                    "%s is a %s; it cannot be opened as a %s" % (self.path, *(
                        ("pool database with its catalog", "node's cache index alone")
                        if has_files else
                        ("node's cache index alone", "pool database with its catalog"))))
            while version < SCHEMA_VERSION:
                step = MIGRATIONS[version]
                if isinstance(step, str):  # cache-index-only files begin at 4
                    self._run_script(conn, step)
                else:
                    if self.with_catalog:
                        self._run_script(conn, step["catalog"])
                    self._run_script(conn, step["cache_index"])
                    conn.execute("PRAGMA user_version = %d" % (version + 1))
                log.info("migrated %s from schema version %d to %d",
                         self.path, version, version + 1)
                version = self.schema_version()

    def _run_script(self, conn: sqlite3.Connection, script: str) -> None:
        """Run a script statement by statement inside the current transaction."""
        statement = ""
        try:
            # Grow the statement one ';' at a time: a trigger body holds
            # several, and only complete_statement() knows where it ends.
            for piece in script.split(";"):
                statement += piece + ";"
                if sqlite3.complete_statement(statement):
                    conn.execute(statement)
                    statement = ""
            if statement.strip(" \t\r\n;"):
                conn.execute(statement)
        except sqlite3.Error as exc:
            raise DatabaseError("schema change failed on %s: %s" % (self.path, exc)) from exc
