"""The pool's catalog on a PostgreSQL server, shared by several nodes.

:class:`PostgresDatabase` has the interface of
:class:`~cloudmanager.db.connection.Database` (``transaction()``, ``read()``,
``close()``, the schema), so the catalog's modules (files, copies, queue,
health, records) run on either. Their statements are written for SQLite;
:func:`translate` turns each into PostgreSQL once (the few differences are
listed there), and the tests run every catalog module on both.

**Writers take turns, as in SQLite.** Every write transaction starts by
taking one transaction-scoped advisory lock, so catalog writes from all
nodes are serialized exactly like ``BEGIN IMMEDIATE`` serializes them in
SQLite, and every rule the code relies on there holds here: a check and the
write it guards cannot interleave with another node's. Reads take no lock
and see what was committed. Writes are short (no transfer ever runs inside
one), so the lock is held for milliseconds.

**Connections** come from a ``psycopg_pool.ConnectionPool``. A transaction
holds one for its length; a read borrows one per statement. A connection the
server dropped (a restart, a network cut) is discarded, and the operation is
retried once on a fresh one when nothing of it can have happened yet; past
that, the caller gets a :class:`~cloudmanager.errors.DatabaseError`.

**Secrets.** A password in the URL never reaches a log, an error or a
report: :func:`redact` replaces it wherever the URL is shown, and error texts
are scrubbed of it. libpq's other sources (``~/.pgpass``, ``PGPASSWORD``,
``PGSERVICE``...) work as usual, since the URL is handed to libpq as is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import threading
from importlib import resources
from typing import (
    Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple,
)

from ..errors import DatabaseError
# Re-exported: the URL helpers were born here, and callers import them from here.
from .urls import INSTALL_HINT, URL_SCHEMES, is_postgres_url, passwords_in, redact  # noqa: F401

log = logging.getLogger(__name__)

#: The advisory lock every catalog write transaction takes (any fixed 64-bit number).
WRITE_LOCK = 0x636D5F706F6F6C  # "cm_pool"
#: Connections kept per process, and the most it opens.
POOL_MIN, POOL_MAX = 1, 16
#: Seconds to wait for a pooled connection (or for the server to accept one).
CONNECT_TIMEOUT_S = 15.0


# -- the dialect ------------------------------------------------------------------------

_JSON_EACH = re.compile(r"json_each\(\?\)(?:\s+AS\s+(\w+))?", re.IGNORECASE)
_INSERT_OR_IGNORE = re.compile(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO\b", re.IGNORECASE)
_SCALAR_MIN_MAX = re.compile(r"\b(min|max)\(", re.IGNORECASE)


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """One of the catalog's SQLite statements, in PostgreSQL.

    The differences the catalog's statements use, and nothing more:

    - ``?`` placeholders become ``%s`` (and a literal ``%`` becomes ``%%``);
    - ``json_each(?) AS j`` (a JSON array parameter as a table) becomes
      ``json_array_elements_text(%s::json) AS j(value)``;
    - ``INSERT OR IGNORE INTO ...`` becomes ``INSERT INTO ... ON CONFLICT DO NOTHING``;
    - scalar ``min(a, b)`` / ``max(a, b)`` become ``LEAST`` / ``GREATEST``
      (the one-argument aggregates stay).

    - ``PRAGMA defer_foreign_keys = ON`` becomes ``SET CONSTRAINTS ALL
      DEFERRED`` (the catalog's foreign keys are deferrable).

    ``INSERT OR REPLACE`` has no faithful translation (it deletes, then
    inserts), so it is refused: catalog statements use ``ON CONFLICT``.

    >>> translate("SELECT f.hash FROM json_each(?) AS j JOIN files AS f ON f.hash = j.value")
    ... # doctest: +NORMALIZE_WHITESPACE
    'SELECT f.hash FROM json_array_elements_text(%s::json) AS j(value)
     JOIN files AS f ON f.hash = j.value'
    >>> translate("UPDATE t SET n = ? + min(?, 2 * max(a, 1)) WHERE x LIKE 'a%'")
    "UPDATE t SET n = %s + LEAST(%s, 2 * GREATEST(a, 1)) WHERE x LIKE 'a%%'"
    """
    if re.search(r"\bINSERT\s+OR\s+REPLACE\b", sql, re.IGNORECASE):
        raise ValueError("INSERT OR REPLACE has no PostgreSQL form; use ON CONFLICT: %s" % sql)
    if re.fullmatch(r"\s*PRAGMA\s+defer_foreign_keys\s*=\s*ON\s*;?\s*", sql, re.IGNORECASE):
        return "SET CONSTRAINTS ALL DEFERRED"
    out = sql.replace("%", "%%")
    out = _JSON_EACH.sub(lambda m: "json_array_elements_text(?::json) AS %s(value)"
                         % (m.group(1) or "_each"), out)
    if _INSERT_OR_IGNORE.match(out):
        out = _INSERT_OR_IGNORE.sub("INSERT INTO", out, count=1).rstrip().rstrip(";")
        out += " ON CONFLICT DO NOTHING"
    out = _scalar_min_max(out)
    return out.replace("?", "%s")


#: Rows per statement when :meth:`PostgresConnection.executemany` sends an INSERT in bulk.
INSERT_ROWS = 5000
_PLAIN_INSERT = re.compile(r"\s*INSERT\s+(OR\s+IGNORE\s+)?INTO\s+(\w+)\s*\(([\w\s,]+)\)"
                           r"\s*VALUES\s*\(((?:\s*\?\s*,)*\s*\?\s*)\)\s*;?\s*",
                           re.IGNORECASE)


class BulkInsert(NamedTuple):
    """How :meth:`PostgresConnection.executemany` sends a plain INSERT of many rows."""

    #: ``INSERT ... SELECT ... FROM json_populate_recordset(...)``: one JSON
    #: parameter of :data:`INSERT_ROWS` rows
    statement: str
    table: str
    columns: Tuple[str, ...]
    #: ``COPY table (columns) FROM STDIN``, for an INSERT without OR IGNORE
    #: (COPY has no ON CONFLICT); None otherwise
    copy: Optional[str]


@functools.lru_cache(maxsize=64)
def bulk_insert(sql: str) -> Optional[BulkInsert]:
    """How to insert many rows of a plain INSERT at once, or None.

    Only ``INSERT [OR IGNORE] INTO t (columns) VALUES (?, ...)`` (placeholders
    only, nothing after) qualifies. Either way each value is converted to its
    column's type, columns not named keep their defaults, and one statement
    does what the single-row ones would do in turn: row triggers fire once
    per row, and a duplicate key fails the statement.

    - Without OR IGNORE, the rows go by ``COPY``, PostgreSQL's bulk load: the
      fastest path there is, for the client (psycopg formats the rows in C)
      and for the server.
    - With it, as one JSON array of objects per :data:`INSERT_ROWS` rows,
      read by ``json_populate_recordset`` with the table's own row type, and
      ``ON CONFLICT DO NOTHING`` skips a row repeated within it. One round
      trip and one plan, not one per row: the inserts of a ``data_load`` of
      100k records took half the time of psycopg's pipelined
      ``executemany``.

    >>> bulk = bulk_insert("INSERT OR IGNORE INTO q (a, B) VALUES (?, ?)")
    >>> bulk.statement  # doctest: +NORMALIZE_WHITESPACE
    'INSERT INTO q (a, b) SELECT a, b FROM json_populate_recordset(NULL::q, %s::json)
     ON CONFLICT DO NOTHING'
    >>> bulk.table, bulk.columns, bulk.copy
    ('q', ('a', 'b'), None)
    >>> bulk_insert("INSERT INTO q (a) VALUES (?)").copy
    'COPY q (a) FROM STDIN'
    >>> bulk_insert("INSERT INTO t (a) VALUES (?) ON CONFLICT (a) DO UPDATE SET a = 1")
    """
    match = _PLAIN_INSERT.fullmatch(sql)
    if match is None:
        return None
    ignore, table, names, marks = match.groups()
    # Folded as PostgreSQL folds unquoted names: they are the JSON keys.
    columns = tuple(c.strip().lower() for c in names.split(","))
    if len(columns) != marks.count("?"):
        return None
    listed = ", ".join(columns)
    statement = ("INSERT INTO %s (%s) SELECT %s FROM json_populate_recordset(NULL::%s, %%s::json)"
                 % (table, listed, listed, table))
    if ignore:
        statement += " ON CONFLICT DO NOTHING"
    return BulkInsert(statement, table, columns,
                      None if ignore else "COPY %s (%s) FROM STDIN" % (table, listed))


def _bulk_safe(seq: Sequence[Sequence[Any]], width: int, doubles: Sequence[bool]) -> bool:
    """Whether every row has ``width`` values that JSON and COPY carry as the
    row-at-a-time insert would: None, a str, an int, or a finite float where
    ``doubles`` says the column is ``double precision`` (a JSON number with a
    fraction fails in an integer column, where a float parameter is rounded;
    a bool, JSON's ``true``, is no integer column's 1).
    """
    for row in seq:
        if len(row) != width:
            return False
        for value, double in zip(row, doubles):
            kind = type(value)
            if not (value is None or kind is str or kind is int
                    or (kind is float and double and math.isfinite(value))):
                return False
    return True


def _scalar_min_max(sql: str) -> str:
    """Rename ``min(``/``max(`` calls that have two or more arguments."""
    pieces, pos = [], 0
    for match in _SCALAR_MIN_MAX.finditer(sql):
        depth, i, commas = 1, match.end(), 0
        while i < len(sql) and depth:
            char = sql[i]
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
            elif char == "," and depth == 1:
                commas += 1
            i += 1
        if commas:
            pieces.append(sql[pos:match.start()])
            pieces.append("LEAST(" if match.group(1).lower() == "min" else "GREATEST(")
            pos = match.end()
    pieces.append(sql[pos:])
    return "".join(pieces)


# -- connections --------------------------------------------------------------------------

class Rows:
    """The rows of a finished statement: iterate, or ``fetchone()``/``fetchall()``."""

    def __init__(self, rows: List[tuple], rowcount: int = -1) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[tuple]:
        while self._next < len(self._rows):
            self._next += 1
            yield self._rows[self._next - 1]

    def fetchone(self) -> Optional[tuple]:
        """The next row, or None after the last."""
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> List[tuple]:
        """The rows not fetched yet."""
        rest, self._next = self._rows[self._next:], len(self._rows)
        return rest


class PostgresConnection:
    """A psycopg connection that takes the catalog's SQLite-dialect statements."""

    def __init__(self, conn: Any, database: PostgresDatabase) -> None:
        self.raw = conn
        self._database = database

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        """Run one statement; its rows are fetched at once."""
        with self._database.errors("query"):
            cur = self.raw.execute(translate(sql), tuple(params) if params else None)
            return Rows(cur.fetchall() if cur.description else [], cur.rowcount)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Rows:
        """Run the statement once per parameter tuple.

        A plain ``INSERT ... VALUES (?, ...)`` of many rows goes in bulk (see
        :func:`bulk_insert`) when every value goes as the row-at-a-time
        insert would take it; anything else goes once per tuple, pipelined
        by psycopg.
        """
        seq = [tuple(p) for p in seq]
        if not seq:
            return Rows([], 0)
        with self._database.errors("query"):
            with self.raw.cursor() as cur:
                bulk = bulk_insert(sql) if len(seq) > 1 else None
                doubles = self._doubles(bulk.table, bulk.columns) if bulk else None
                if bulk is None or doubles is None or not _bulk_safe(seq, len(bulk.columns),
                                                                     doubles):
                    cur.executemany(translate(sql), seq)
                    return Rows([], cur.rowcount)
                if bulk.copy is not None:
                    with cur.copy(bulk.copy) as copy:
                        for params in seq:
                            copy.write_row(params)
                    return Rows([], len(seq))
                count = 0
                for start in range(0, len(seq), INSERT_ROWS):
                    rows = [dict(zip(bulk.columns, params))
                            for params in seq[start:start + INSERT_ROWS]]
                    cur.execute(bulk.statement, (json.dumps(rows),))
                    count += max(cur.rowcount, 0)
                return Rows([], count)

    def _doubles(self, table: str, columns: Tuple[str, ...]) -> Optional[Tuple[bool, ...]]:
        """Which of ``table``'s ``columns`` are ``double precision`` (the table's
        columns are asked once); None if one is not the table's, or there is
        no such table (the row-at-a-time insert then says what is wrong)."""
        known = self._database.column_types
        if table not in known:
            known[table] = dict(self.raw.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod)"
                " FROM pg_catalog.pg_attribute AS a JOIN pg_catalog.pg_class AS c"
                " ON c.oid = a.attrelid WHERE c.relname = %s AND c.relkind = 'r'"
                " AND pg_catalog.pg_table_is_visible(c.oid)"
                " AND a.attnum > 0 AND NOT a.attisdropped", (table.lower(),)).fetchall())
        types = known[table]
        if not all(c in types for c in columns):
            return None
        return tuple(types[c] == "double precision" for c in columns)


class PostgresDatabase:
    """A catalog on a PostgreSQL server; see the module's docstring.

    :param url: a ``postgresql://`` (or ``postgres://``) URL, as libpq takes it
    :raises DatabaseError: if psycopg is missing (with the install hint), the
        server cannot be reached, or its schema is newer than this code
    """

    dialect = "postgresql"

    def __init__(self, url: str, pool_max: int = POOL_MAX) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError as exc:
            raise DatabaseError(INSTALL_HINT) from exc
        self._psycopg = psycopg
        self.url = url
        #: The URL as it may be shown: no password.
        self.path = redact(url)
        self._secrets = passwords_in(url)
        self._local = threading.local()
        self._writer = threading.Lock()
        #: ``{table: {column: type}}``, read when a bulk insert first needs it.
        self.column_types: Dict[str, Dict[str, str]] = {}
        with self.errors("connect"):
            # One connection first, outside the pool: a wrong password or host
            # is reported as libpq says it, at once (the pool would retry, then
            # say only that it timed out).
            psycopg.connect(url, autocommit=True).close()
            self._pool = psycopg_pool.ConnectionPool(
                url, min_size=POOL_MIN, max_size=pool_max, open=False,
                kwargs={"autocommit": True}, timeout=CONNECT_TIMEOUT_S,
                name="cloudmanager")
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        try:
            self.ensure_schema()
        except BaseException:
            self._pool.close()
            raise

    # -- errors --------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """``text`` with this catalog's password(s) replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn psycopg's and the pool's errors into a scrubbed DatabaseError."""
        try:
            yield
        except DatabaseError:
            raise
        except Exception as exc:
            if not _is_driver_error(exc):
                raise
            raise DatabaseError(self.scrub("%s failed on %s: %s" % (what, self.path, exc))) \
                from None

    def _broken(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection is gone (retry on a new one)."""
        return isinstance(exc, (self._psycopg.OperationalError, self._psycopg.InterfaceError))

    # -- transactions and reads ------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PostgresConnection]:
        """A write transaction that holds the catalog's write lock; nested use
        is a savepoint. Yields a :class:`PostgresConnection`.

        :raises DatabaseError: if the server cannot be reached, or a
            statement or the commit fails; nothing of it is then written
        """
        local = self._local
        current = getattr(local, "conn", None)
        if current is not None:
            yield from self._savepoint(current, local)
            return
        # One writer per process at a time: writers queue for the catalog's
        # lock anyway, and a thread waiting for it must not hold one of the
        # pool's connections, which the readers (eviction's check among
        # them, under the cache index's lock) need.
        with self._writer, self._begin() as raw:
            wrapped = PostgresConnection(raw, self)
            local.conn, local.depth, local.after = wrapped, 1, []
            try:
                yield wrapped
            except BaseException as exc:
                local.conn, local.depth, local.after = None, 0, []
                with contextlib.suppress(Exception):
                    raw.execute("ROLLBACK")
                if _is_driver_error(exc):
                    raise DatabaseError(self.scrub("%s on %s" % (exc, self.path))) from None
                raise
            after, local.conn, local.depth, local.after = local.after, None, 0, []
            with self.errors("commit"):
                raw.execute("COMMIT")
        for action in after:
            action()

    def on_commit(self, action: Callable[[], None]) -> None:
        """Run ``action()`` once this thread's transaction has committed (not at
        all if it rolls back); at once outside a transaction."""
        if getattr(self._local, "conn", None) is None:
            action()
        else:
            self._local.after.append(action)

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Any]:
        """A pooled connection in a transaction that holds the write lock.

        Starting is retried once on a fresh connection if the first was cut:
        nothing has happened in the transaction yet.
        """
        for attempt in (1, 2):
            with self.errors("connect"):
                cm = self._pool.connection()
                raw = cm.__enter__()
            try:
                raw.execute("BEGIN")
                raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            except Exception as exc:
                cm.__exit__(type(exc), exc, exc.__traceback__)
                if attempt == 1 and self._broken(exc):
                    log.info("catalog connection lost (%s); reconnecting", self.scrub(str(exc)))
                    continue
                if _is_driver_error(exc):
                    raise DatabaseError(self.scrub("cannot start a transaction on %s: %s"
                                                   % (self.path, exc))) from None
                raise
            try:
                yield raw
            except BaseException as exc:
                cm.__exit__(type(exc), exc, exc.__traceback__)
                raise
            cm.__exit__(None, None, None)
            return

    def _savepoint(self, conn: PostgresConnection, local: Any) -> Iterator[PostgresConnection]:
        name = "sp%d" % local.depth
        local.depth += 1
        try:
            with self.errors("savepoint"):
                conn.raw.execute("SAVEPOINT " + name)
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.raw.execute("ROLLBACK TO SAVEPOINT " + name)
                    conn.raw.execute("RELEASE SAVEPOINT " + name)
                raise
            with self.errors("savepoint"):
                conn.raw.execute("RELEASE SAVEPOINT " + name)
        finally:
            local.depth -= 1

    def read(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        """Run a read-only statement (inside this thread's transaction, if any).

        A read cut by a lost connection is retried once on a fresh one.

        :raises DatabaseError: if it fails
        """
        current = getattr(self._local, "conn", None)
        if current is not None:
            return current.execute(sql, params)
        statement = translate(sql)
        for attempt in (1, 2):
            try:
                with self._pool.connection() as raw:
                    cur = raw.execute(statement, tuple(params) if params else None)
                    return Rows(cur.fetchall() if cur.description else [], cur.rowcount)
            except Exception as exc:
                if attempt == 1 and self._broken(exc):
                    log.info("catalog connection lost (%s); reconnecting", self.scrub(str(exc)))
                    continue
                if _is_driver_error(exc):
                    raise DatabaseError(self.scrub("query failed on %s: %s" % (self.path, exc))) \
                        from None
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the pool's connections."""
        with contextlib.suppress(Exception):
            self._pool.close()

    # -- schema ----------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The catalog's schema version (0 for an empty database)."""
        if not self._has_table("cloudmanager_schema"):
            return 0
        row = self.read("SELECT version FROM cloudmanager_schema").fetchone()
        return int(row[0]) if row else 0

    def _has_table(self, name: str) -> bool:
        # pg_tables, not to_regclass(): a name looked up in vain earlier on
        # the same connection can stay cached as missing until the backend
        # next takes a lock, and a node that waited for another's schema
        # creation would not see it.
        return self.read("SELECT 1 FROM pg_catalog.pg_tables WHERE tablename = ?"
                         " AND schemaname = current_schema()", (name,)).fetchone() is not None

    def ensure_schema(self) -> int:
        """Create the catalog's schema on an empty database, or migrate it.

        It runs under the write lock and reads the version again there, so
        nodes opening (or ``cm_setup_db``-ing) a new catalog at the same
        moment create it once.

        :return: the version before (0 for a new catalog)
        :raises DatabaseError: if the catalog is newer than this code, or the
            database holds tables that are not a cloudmanager catalog
        """
        from .connection import SCHEMA_VERSION

        before = self.schema_version()
        if before == SCHEMA_VERSION:
            return before
        with self.transaction() as conn:
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise DatabaseError("catalog %s has schema version %d; this cloudmanager "
                                    "knows up to %d" % (self.path, version, SCHEMA_VERSION))
            if version == 0:
                if self._has_table("files"):
                    raise DatabaseError("%s has a 'files' table but no cloudmanager schema "
                                        "version; refusing to touch it" % self.path)
                with self.errors("schema creation"):
                    conn.raw.execute(postgres_schema_sql())
                log.info("created catalog schema version %d in %s", SCHEMA_VERSION, self.path)
            # Later versions: the steps of POSTGRES_MIGRATIONS, as in connection.py.
            while version and version < SCHEMA_VERSION:
                with self.errors("migration"):
                    conn.raw.execute(POSTGRES_MIGRATIONS[version])
                version = self.schema_version()
        return before


#: The copy-count triggers of version 6 (frozen here, as every migration is).
_STATEMENT_TRIGGERS = """
CREATE FUNCTION cloudmanager_recount(hashes TEXT[]) RETURNS void LANGUAGE sql AS $$
    UPDATE files AS f SET
        copies = (SELECT count(DISTINCT u.host_name) FROM uploads AS u
                  WHERE u.hash = f.hash AND u.state IN ('good', 'claimed', 'suspect')),
        verified = (SELECT count(DISTINCT u.host_name) FROM uploads AS u
                    WHERE u.hash = f.hash AND u.state = 'good')
    WHERE f.hash = ANY (hashes);
$$;
CREATE FUNCTION cloudmanager_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cloudmanager_recount(ARRAY(SELECT DISTINCT hash FROM inserted_rows));
    RETURN NULL;
END
$$;
CREATE FUNCTION cloudmanager_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cloudmanager_recount(ARRAY(SELECT DISTINCT hash FROM deleted_rows));
    RETURN NULL;
END
$$;
CREATE FUNCTION cloudmanager_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cloudmanager_recount(ARRAY(
        SELECT DISTINCT n.hash FROM new_rows AS n JOIN old_rows AS o
            ON o.hash = n.hash AND o.host_name = n.host_name AND o.url = n.url
        WHERE o.state IS DISTINCT FROM n.state));
    RETURN NULL;
END
$$;
CREATE TRIGGER uploads_insert AFTER INSERT ON uploads
    REFERENCING NEW TABLE AS inserted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cloudmanager_count_inserted();
CREATE TRIGGER uploads_update AFTER UPDATE ON uploads
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cloudmanager_count_updated();
CREATE TRIGGER uploads_delete AFTER DELETE ON uploads
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cloudmanager_count_deleted();
"""

#: ``{from_version: sql}`` for catalogs on PostgreSQL, as
#: :data:`~cloudmanager.db.connection.MIGRATIONS` is for SQLite (its
#: ``catalog`` part). PostgreSQL catalogs begin at version 4. Each script
#: ends by setting the version.
POSTGRES_MIGRATIONS: Dict[int, str] = {
    4: """
        ALTER TABLE upload_queue ADD COLUMN node TEXT NOT NULL DEFAULT '';
        CREATE TABLE leases (
            kind  TEXT COLLATE "C" NOT NULL,
            hash  TEXT COLLATE "C" NOT NULL CHECK (length(hash) = 64),
            owner TEXT NOT NULL,
            until DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (kind, hash)
        );
        ALTER TABLE transfers ADD COLUMN node TEXT COLLATE "C" NOT NULL DEFAULT '';
        ALTER TABLE transfers DROP CONSTRAINT transfers_pkey;
        ALTER TABLE transfers ADD PRIMARY KEY (month, node);
        CREATE TABLE nodes (
            node       TEXT COLLATE "C" PRIMARY KEY,
            hostname   TEXT NOT NULL,
            first_seen DOUBLE PRECISION NOT NULL,
            last_seen  DOUBLE PRECISION NOT NULL
        );
        UPDATE cloudmanager_schema SET version = 5;
    """,
    # 6: encrypted copies' objects; the copy counts kept once per statement
    # (statement triggers with transition tables), not once per row; the
    # original API's published records and named integers.
    5: """
        ALTER TABLE uploads ADD COLUMN object_sha256 TEXT NOT NULL DEFAULT '';
        ALTER TABLE uploads ADD COLUMN object_size BIGINT NOT NULL DEFAULT -1;
        ALTER TABLE uploads ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
        DROP TRIGGER uploads_insert ON uploads;
        DROP TRIGGER uploads_update ON uploads;
        DROP TRIGGER uploads_delete ON uploads;
        DROP FUNCTION cloudmanager_count_copies();
    """ + _STATEMENT_TRIGGERS + """
        CREATE TABLE published (
            hash     TEXT COLLATE "C" PRIMARY KEY REFERENCES files (hash) ON DELETE CASCADE,
            exported DOUBLE PRECISION,
            source   TEXT,
            CHECK (exported IS NOT NULL OR source IS NOT NULL)
        );
        CREATE TABLE pool_state (
            name  TEXT COLLATE "C" PRIMARY KEY,
            value BIGINT NOT NULL
        );
        UPDATE cloudmanager_schema SET version = 6;
    """,
    # 7: copies inserted are counted by db/copies.py (recount); tree
    # manifests by name (cloudmanager/trees.py).
    6: """
        DROP TRIGGER uploads_insert ON uploads;
        DROP FUNCTION cloudmanager_count_inserted();
        CREATE TABLE trees (
            hash    TEXT COLLATE "C" PRIMARY KEY REFERENCES files (hash) ON DELETE CASCADE,
            name    TEXT NOT NULL,
            created BIGINT NOT NULL
        );
        UPDATE cloudmanager_schema SET version = 7;
    """,
    # 8: a change to the cache index alone (reservations, in SQLite).
    7: """
        UPDATE cloudmanager_schema SET version = 8;
    """,
}


def postgres_schema_sql() -> str:
    """The text of ``schema_postgres.sql``."""
    return resources.files(__package__).joinpath("schema_postgres.sql").read_text("utf-8")


def _is_driver_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("psycopg", "psycopg_pool"))
