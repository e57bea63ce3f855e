"""Reading an original cloud-manager pool's database, read-only: ``cm import-legacy``.

Storj's 2014 cloud-manager kept its pool in a SQLite file or a PostgreSQL
database with these tables (its ``schema.sql`` and yoyo migrations):

- ``files(name, size, hash, payload, blockchain_hash, exported_timestamp)``:
  one row per file. ``name`` is the file's name in the storage folder,
  ``<first 7 hex of the hash>_<basename>``; ``payload`` is the file's v0.2
  (earlier v0.1) JSON record, NULL until the file was uploaded;
  ``blockchain_hash`` the source a ``data_load`` tagged it with;
  ``exported_timestamp`` when ``data_dump`` last exported it. The last two
  came with its third migration, so an older pool lacks them.
- ``transfer_meter(uploaded, downloaded, month)``: bytes per month
  (``'YYYY-MM'``, ``'YYYY-M'`` in one version, NULL on the row older than
  months).
- ``blockchain_state(last_known_block)``: one row, the block cursor.

:class:`LegacyPool` opens such a database so that it cannot be written:
SQLite by a ``mode=ro`` URI, PostgreSQL in read-only transactions. Every
statement that reads it is here. Column and table names in the SQL come
from the fixed lists below, never from the database read.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple
from urllib.parse import quote

from ..errors import DatabaseError, LegacyPoolError
from .urls import INSTALL_HINT, is_postgres_url, passwords_in, redact

#: The columns of the original's ``files`` table: those every version had,
#: and those its third migration added.
FILES_REQUIRED = ("name", "size", "hash", "payload")
FILES_OPTIONAL = ("blockchain_hash", "exported_timestamp")
#: Rows read per batch.
BATCH = 1000


class LegacyFileRow(NamedTuple):
    """One row of the original's ``files`` table, as stored (unchecked)."""

    name: Any
    size: Any
    hash: Any
    payload: Any
    #: None when the pool predates the column, or the row has none.
    blockchain_hash: Any
    #: A ``datetime`` (PostgreSQL), text (SQLite) or None.
    exported_timestamp: Any


def shown(database: str) -> str:
    """The database as it may be shown: a URL without its password."""
    return redact(database) if is_postgres_url(database) else database


class LegacyPool:
    """An original cloud-manager database, opened read-only.

    :param database: its SQLite file or ``postgres://`` URL
    :raises LegacyPoolError: if there is no such file, or it is not a
        database with the original's ``files`` table
    :raises DatabaseError: if it cannot be read (a server that refuses, a
        missing driver); the message never holds a password
    """

    def __init__(self, database: str) -> None:
        self.database = database
        #: As it may be shown (no password).
        self.path = shown(database)
        self.dialect = "postgresql" if is_postgres_url(database) else "sqlite"
        self._secrets = passwords_in(database) if self.dialect == "postgresql" else []
        self._conn: Any = None
        if self.dialect == "sqlite":
            self._open_sqlite()
        else:
            self._open_postgres()
        try:
            self.files_columns = self._columns("files")
            missing = [c for c in FILES_REQUIRED if c not in self.files_columns]
            if missing:
                raise LegacyPoolError(
                    "%s is not an original cloud-manager pool: %s" % (
                        self.path, "it has no files table" if not self.files_columns else
                        "its files table has no %s column" % ", ".join(missing)))
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------------

    def _open_sqlite(self) -> None:
        path = os.path.abspath(self.database)
        if not os.path.isfile(path):
            raise LegacyPoolError("there is no database file at %s" % path)
        try:
            # mode=ro: SQLite itself refuses every write, whatever we run.
            self._conn = sqlite3.connect("file:%s?mode=ro" % quote(path), uri=True,
                                         check_same_thread=False)
            self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            self.close()
            raise LegacyPoolError("%s is not a SQLite database (%s)" % (path, exc)) from None

    def _open_postgres(self) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise DatabaseError(INSTALL_HINT) from exc
        with self._errors("connect"):
            self._conn = psycopg.connect(self.database, autocommit=False)
            # Every transaction of this session is READ ONLY: the server
            # refuses any write.
            self._conn.read_only = True

    def close(self) -> None:
        """Close the connection (a read-only one: nothing to commit)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.rollback()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> LegacyPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Driver errors as a DatabaseError that names the database, no password."""
        try:
            yield
        except DatabaseError:
            raise
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) or type(exc).__module__.startswith("psycopg"):
                # One line (libpq's messages have several), without the password.
                text = " ".join(str(exc).split())
                raise DatabaseError(self._scrub("%s failed on %s: %s" % (what, self.path, text))) \
                    from None
            raise

    def _rows(self, sql: str, params: Tuple[Any, ...] = ()) -> List[tuple]:
        if self.dialect == "postgresql":
            sql = sql.replace("?", "%s")
        with self._errors("reading"):
            cur = self._conn.execute(sql, params)
            return list(cur.fetchall())

    # -- the schema ------------------------------------------------------------------

    def _columns(self, table: str) -> List[str]:
        """The lowercase column names of ``table``; [] if there is no such table."""
        if self.dialect == "sqlite":
            if not self._rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                              (table,)):
                return []
            # PRAGMA takes no parameter; ``table`` is one of this module's names.
            return [str(row[1]).lower() for row in self._rows("PRAGMA table_info(%s)" % table)]
        return [str(row[0]).lower() for row in self._rows(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = ? AND table_schema = current_schema()"
            " ORDER BY ordinal_position", (table,))]

    # -- the rows ------------------------------------------------------------------------

    def count(self) -> int:
        """How many rows the ``files`` table has."""
        return int(self._rows("SELECT count(*) FROM files")[0][0])

    def files(self, batch: int = BATCH) -> Iterator[List[LegacyFileRow]]:
        """Every row of ``files``, in batches, ordered by hash (then name).

        A column the pool predates reads as NULL.
        """
        picked = ", ".join(c if c in self.files_columns else "NULL"
                           for c in FILES_REQUIRED + FILES_OPTIONAL)
        sql = "SELECT %s FROM files ORDER BY hash, name" % picked
        if self.dialect == "postgresql":
            # A server-side cursor: the rows stream, in the read-only transaction.
            with self._errors("reading"):
                with self._conn.cursor(name="cm_import_legacy") as cur:
                    cur.execute(sql)
                    while True:
                        rows = cur.fetchmany(batch)
                        if not rows:
                            break
                        yield [LegacyFileRow(*row) for row in rows]
            return
        with self._errors("reading"):
            cur = self._conn.execute(sql)
            while True:
                rows = cur.fetchmany(batch)
                if not rows:
                    break
                yield [LegacyFileRow(*row) for row in rows]

    def meter(self) -> Optional[List[Tuple[Any, Any, Any]]]:
        """The ``transfer_meter`` rows as ``(month, uploaded, downloaded)``
        (month None when the pool had no month column, or on the row older
        than months); None if the pool has no meter."""
        columns = self._columns("transfer_meter")
        if "uploaded" not in columns or "downloaded" not in columns:
            return None
        month = "month" if "month" in columns else "NULL"
        return [tuple(row) for row in self._rows(  # type: ignore[misc]
            "SELECT %s, uploaded, downloaded FROM transfer_meter" % month)]

    def last_known_block(self) -> Optional[List[Any]]:
        """The ``blockchain_state`` cursor values (one row in a sound pool);
        None if the pool has no such table."""
        if "last_known_block" not in self._columns("blockchain_state"):
            return None
        return [row[0] for row in self._rows("SELECT last_known_block FROM blockchain_state")]

