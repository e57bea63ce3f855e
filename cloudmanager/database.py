"""FileDatabase: every SQL statement of cloudmanager lives here.

The database is SQLite in WAL mode. Each thread gets its own connection (and
a forked child gets new ones). Writes go through :meth:`FileDatabase.transaction`,
which takes the write lock up front with ``BEGIN IMMEDIATE`` and retries a
bounded number of times when another process holds it.

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

import contextlib
import json
import logging
import os
import random
import sqlite3
import statistics
import threading
import time
from importlib import resources

from .errors import DatabaseError

log = logging.getLogger(__name__)

#: The schema version this code writes and expects.
SCHEMA_VERSION = 3

#: WAL pages between automatic checkpoints (SQLite's default is 1,000, or
#: 4 MB); a checkpoint writes each dirty page once, however often it changed.
WAL_AUTOCHECKPOINT = 8000
#: KiB of SQLite page cache per connection (SQLite's default is 2,000 KiB).
CACHE_KIB = 32 * 1024

#: ``{from_version: sql}``: the script that moves a database from
#: ``from_version`` to ``from_version + 1``. Each script ends by setting
#: ``PRAGMA user_version``.
MIGRATIONS = {
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
}

#: How many recent transfer times per host the latency median is taken over.
LATENCY_SAMPLES = 31

#: How long one attempt waits for a lock held by another connection.
BUSY_TIMEOUT_S = 10.0
#: How many times a transaction start is retried when SQLite still says busy.
BUSY_RETRIES = 8


def schema_sql():
    """Return the text of ``schema.sql``."""
    return resources.files(__package__).joinpath("schema.sql").read_text("utf-8")


def _is_busy(exc):
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _rollback(conn):
    """End the transaction on ``conn``, if SQLite has not ended it already.

    After some errors (a full disk, an I/O error) SQLite rolls the
    transaction back itself; a ROLLBACK then would raise "no transaction is
    active" over the error that matters. A ROLLBACK that fails leaves the
    connection as SQLite left it, and the original error is raised.
    """
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def month_key(timestamp=None):
    """Return the ``'YYYY-MM'`` (UTC) of a unix time, for the transfer meter."""
    return time.strftime("%Y-%m", time.gmtime(timestamp))


class FileDatabase:
    """The pool's records in one SQLite file.

    :param path: the database file; it and its directory are created, and
        given the schema, if new
    :raises DatabaseError: if the file cannot be opened, is not a
        cloudmanager database, or is newer than this code
    """

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        self._local = threading.local()
        self._closed = False
        self._all_connections = []
        self._connections_lock = threading.Lock()
        self.ensure_schema()

    # -- connections and transactions ------------------------------------

    @property
    def connection(self):
        """This thread's connection, opened on first use (and after a fork)."""
        if self._closed:
            raise DatabaseError("database %s is closed" % self.path)
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._connect()
            local.conn, local.pid, local.depth = conn, os.getpid(), 0
        return conn

    def _connect(self):
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
                # module docstring: closing one would drop SQLite's locks).
                # The file is still empty here: nothing was readable.
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
    def _enable_wal(conn):
        # WAL is a property of the file: only its first opener switches it.
        # The switch can fail with "locked" while another process creates the
        # database, and SQLite's busy handler does not cover it, so retry here.
        for attempt in range(BUSY_RETRIES * 10):
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
    def transaction(self):
        """A write transaction, as a context manager yielding the connection.

        It starts with ``BEGIN IMMEDIATE``, so the write lock is held from the
        start and the transaction cannot fail later for want of it. When
        another process holds the lock longer than the busy timeout, the start
        is retried with backoff, up to :data:`BUSY_RETRIES` times. Nested use
        on one thread joins the outer transaction.

        :raises DatabaseError: if the lock cannot be had, or a statement fails
        """
        conn = self.connection
        local = self._local
        if local.depth:
            local.depth += 1
            try:
                yield conn
            finally:
                local.depth -= 1
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

    def _read(self, sql, params=()):
        try:
            return self.connection.execute(sql, params)
        except sqlite3.Error as exc:
            raise DatabaseError("query failed on %s: %s" % (self.path, exc)) from exc

    def close(self):
        """Close every connection this instance opened."""
        self._closed = True
        with self._connections_lock:
            conns, self._all_connections = self._all_connections, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # -- schema ------------------------------------------------------------

    def schema_version(self):
        """Return the database's ``PRAGMA user_version``."""
        return self._read("PRAGMA user_version").fetchone()[0]

    def ensure_schema(self):
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

    def _create_or_migrate(self):
        with self.transaction() as conn:
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise DatabaseError(
                    "database %s has schema version %d; this cloudmanager knows up to %d"
                    % (self.path, version, SCHEMA_VERSION))
            if version == 0:
                if conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'files'"
                                ).fetchone()[0]:
                    raise DatabaseError("%s has a 'files' table but no cloudmanager "
                                        "schema version; refusing to touch it" % self.path)
                self._run_script(conn, schema_sql())
                log.info("created schema version %d in %s", SCHEMA_VERSION, self.path)
                version = self.schema_version()
            while version < SCHEMA_VERSION:
                self._run_script(conn, MIGRATIONS[version])
                log.info("migrated %s from schema version %d to %d",
                         self.path, version, version + 1)
                version = self.schema_version()

    def _run_script(self, conn, script):
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

    # -- files ---------------------------------------------------------------

    def file_exists(self, file_hash):
        """Whether the pool has a record of ``file_hash``."""
        return self._read("SELECT 1 FROM files WHERE hash = ?", (file_hash,)).fetchone() is not None

    def is_cached(self, file_hash):
        """Whether the cache holds ``file_hash``, as far as the database knows."""
        row = self._read("SELECT cached FROM files WHERE hash = ?", (file_hash,)).fetchone()
        return bool(row and row[0])

    def get_file(self, file_hash):
        """Return the file's row as a dict, or ``None``.

        Keys: hash, filename, size, created, copies, verified, cached,
        last_access, pinned.
        """
        cur = self._read(
            "SELECT hash, filename, size, created, copies, verified, cached, last_access, pinned"
            " FROM files WHERE hash = ?", (file_hash,))
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cur.description], row))

    def cache_state(self, file_hash):
        """Return ``(size, cached)`` for a known file, or ``None``. The hit path."""
        return self._read("SELECT size, cached FROM files WHERE hash = ?",
                          (file_hash,)).fetchone()

    def add_file(self, conn, file_hash, filename, size, created, size_known=False):
        """Insert a file row if it is new, or fill in a missing filename.

        Call inside :meth:`transaction`.

        :param size_known: the caller hashed the bytes itself, so ``size`` is
            right; it corrects a size that came from an import (the row cannot
            be cached then, since caching records a measured size)
        :return: ``"new"``, ``"named"`` (a filename was filled in), ``"same"``,
            ``"corrected"`` (the size was fixed), or ``"conflict"`` when the
            pool knows this hash with another size
        """
        row = conn.execute("SELECT size, filename, cached FROM files WHERE hash = ?",
                           (file_hash,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO files (hash, filename, size, created) VALUES (?, ?, ?, ?)",
                         (file_hash, filename, size, created))
            return "new"
        if row[0] != size:
            if not size_known or row[2]:
                return "conflict"
            conn.execute("UPDATE files SET size = ? WHERE hash = ?", (size, file_hash))
            log.warning("%s was recorded with %d bytes (from an import); it has %d",
                        file_hash, row[0], size)
            return "corrected"
        if filename and not row[1]:
            conn.execute("UPDATE files SET filename = ? WHERE hash = ?", (filename, file_hash))
            return "named"
        return "same"

    def set_cached(self, conn, file_hash, cached, when=None):
        """Mark a file cached (with its LRU clock set to ``when``) or not."""
        if cached:
            conn.execute("UPDATE files SET cached = 1, last_access = ? WHERE hash = ?",
                         (when if when is not None else time.time(), file_hash))
        else:
            conn.execute("UPDATE files SET cached = 0 WHERE hash = ?", (file_hash,))

    def set_pinned(self, file_hash, pinned):
        """Set or clear the explicit pin of a file. :return: True if it exists."""
        with self.transaction() as conn:
            return conn.execute("UPDATE files SET pinned = ? WHERE hash = ?",
                                (1 if pinned else 0, file_hash)).rowcount == 1

    def touch_many(self, accesses):
        """Apply deferred LRU clock updates: an iterable of ``(hash, when)``."""
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE files SET last_access = max(last_access, ?)"
                " WHERE hash = ? AND cached = 1",
                [(when, h) for h, when in accesses])

    def eviction_candidates(self, conn):
        """Least recently used evictable files, as a cursor of ``(hash, size, last_access)``.

        Evictable means cached, on at least one host this node uploaded to or
        verified a download from, and not pinned. The WHERE clause matches
        the partial index ``files_lru`` (whose entries are ``(last_access,
        hash)``), so this is an index range scan that yields rows as they
        are read: the caller takes as many as it needs, O(log n + taken),
        then closes the cursor.
        """
        return conn.execute(
            "SELECT hash, size, last_access FROM files"
            " WHERE cached = 1 AND verified > 0 AND pinned = 0"
            " ORDER BY last_access, hash")

    def set_uncached_many(self, conn, hashes):
        """Mark files not cached (inside a transaction)."""
        conn.executemany("UPDATE files SET cached = 0 WHERE hash = ?", [(h,) for h in hashes])

    def cached_hashes(self):
        """All ``(hash, size)`` the database says are cached. For reconciliation only."""
        return self._read("SELECT hash, size FROM files WHERE cached = 1").fetchall()

    def below_target(self, target):
        """Hashes of files with fewer than ``target`` good copies, fewest first."""
        return [r[0] for r in self._read(
            "SELECT hash FROM files WHERE copies < ? ORDER BY copies, hash", (target,))]

    # -- uploads -------------------------------------------------------------

    def uploads(self, file_hash):
        """The file's upload rows: ``[{host_name, url, error, verified, time}]``."""
        return [
            {"host_name": h, "url": u, "error": bool(e), "verified": bool(v), "time": t}
            for h, u, e, v, t in self._read(
                "SELECT host_name, url, error, verified, time FROM uploads WHERE hash = ?"
                " ORDER BY time, host_name, url", (file_hash,))
        ]

    def record_upload(self, conn, file_hash, host_name, url, when):
        """Record a good copy this node made, and drop earlier failure rows of that host."""
        # WHERE EXISTS: the file may have been removed (by another process)
        # while it was uploaded; then there is nothing to record.
        conn.execute(
            "INSERT INTO uploads (hash, host_name, url, error, verified, time)"
            " SELECT ?, ?, ?, 0, 1, ? WHERE EXISTS (SELECT 1 FROM files WHERE hash = ?)"
            " ON CONFLICT (hash, host_name, url)"
            " DO UPDATE SET error = 0, verified = 1, time = excluded.time",
            (file_hash, host_name, url, when, file_hash))
        conn.execute("DELETE FROM uploads WHERE hash = ? AND host_name = ? AND url = ''"
                     " AND error = 1", (file_hash, host_name))

    def record_upload_failure(self, conn, file_hash, host_name, when):
        """Record that uploading to ``host_name`` failed (unless it holds a copy)."""
        conn.execute(
            "INSERT INTO uploads (hash, host_name, url, error, time)"
            " SELECT ?, ?, '', 1, ? WHERE NOT EXISTS ("
            "  SELECT 1 FROM uploads WHERE hash = ? AND host_name = ? AND error = 0)"
            " AND EXISTS (SELECT 1 FROM files WHERE hash = ?)"
            " ON CONFLICT (hash, host_name, url) DO UPDATE SET time = excluded.time",
            (file_hash, host_name, when, file_hash, host_name, file_hash))

    def mark_copy_bad(self, file_hash, host_name, url):
        """Flag a copy that failed verification; it is never tried again."""
        with self.transaction() as conn:
            conn.execute("UPDATE uploads SET error = 1 WHERE hash = ? AND host_name = ? AND url = ?",
                         (file_hash, host_name, url))

    def mark_copy_verified(self, file_hash, host_name, url):
        """Note that a download of this copy matched its SHA-256."""
        with self.transaction() as conn:
            conn.execute("UPDATE uploads SET verified = 1 WHERE hash = ? AND host_name = ?"
                         " AND url = ? AND verified = 0", (file_hash, host_name, url))

    def copies_to_verify(self, hashes=None, host_names=None, checked_before=None, limit=None):
        """Good copies for :meth:`~cloudmanager.CloudManager.verify`, least recently checked first.

        :param hashes: only these files
        :param host_names: only copies recorded under these host names
        :param checked_before: only copies last checked before this unix time
        :param limit: at most this many copies
        :return: ``[(hash, host_name, url, size)]``
        """
        sql = ("SELECT u.hash, u.host_name, u.url, f.size FROM uploads AS u"
               " JOIN files AS f ON f.hash = u.hash WHERE u.error = 0 AND u.url != ''")
        params = []
        for column, values in (("u.hash", hashes), ("u.host_name", host_names)):
            if values is not None:  # one JSON parameter: no limit on the list's length
                sql += " AND %s IN (SELECT value FROM json_each(?))" % column
                params.append(json.dumps(list(values)))
        if checked_before is not None:
            sql += " AND u.checked < ?"
            params.append(checked_before)
        sql += " ORDER BY u.checked, u.hash"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self._read(sql, params).fetchall()

    def mark_copy_checked(self, file_hash, host_name, url, when, verified):
        """Note that verify() found this copy good; ``verified`` if its SHA-256 was seen."""
        with self.transaction() as conn:
            conn.execute("UPDATE uploads SET checked = ?, verified = max(verified, ?)"
                         " WHERE hash = ? AND host_name = ? AND url = ?",
                         (int(when), 1 if verified else 0, file_hash, host_name, url))

    def good_copies(self):
        """Yield ``(hash, host_name, url)`` of every good copy, in hash order (one cursor)."""
        return self._read("SELECT hash, host_name, url FROM uploads"
                          " WHERE error = 0 AND url != '' ORDER BY hash")

    def forget_file(self, conn, file_hash):
        """Delete a file's record, its copies' rows and its queue entry.

        :return: True if the pool had the file
        """
        return conn.execute("DELETE FROM files WHERE hash = ?", (file_hash,)).rowcount > 0

    def copies(self, file_hash):
        """Number of distinct hosts holding a good copy of the file."""
        row = self._read("SELECT copies FROM files WHERE hash = ?", (file_hash,)).fetchone()
        return row[0] if row else 0

    def verified_copies(self, file_hash):
        """Number of distinct hosts with a copy this node made or verified."""
        row = self._read("SELECT verified FROM files WHERE hash = ?", (file_hash,)).fetchone()
        return row[0] if row else 0

    # -- the upload queue ----------------------------------------------------

    def enqueue(self, conn, file_hash, when):
        """Queue a file for upload (inside a transaction); a no-op if queued."""
        conn.execute("INSERT OR IGNORE INTO upload_queue (hash, queued) VALUES (?, ?)",
                     (file_hash, when))

    def dequeue(self, conn, file_hash):
        """Take a file off the upload queue."""
        conn.execute("DELETE FROM upload_queue WHERE hash = ?", (file_hash,))

    def queue_failure(self, file_hash, error):
        """Note a failed attempt at a queued upload, and why."""
        with self.transaction() as conn:
            conn.execute("UPDATE upload_queue SET attempts = attempts + 1, last_error = ?"
                         " WHERE hash = ?", (error, file_hash))

    def queued(self):
        """Every queued hash, oldest first."""
        return [r[0] for r in self._read("SELECT hash FROM upload_queue ORDER BY queued")]

    # -- reservations and sessions ------------------------------------------

    def reserved_bytes(self, conn=None):
        """Bytes promised to writes in flight."""
        conn = conn or self.connection
        return conn.execute("SELECT coalesce(sum(size), 0) FROM reservations").fetchone()[0]

    def add_reservation(self, conn, owner, size):
        """Promise ``size`` bytes to a write; return the reservation's id."""
        return conn.execute(
            "INSERT INTO reservations (owner, size, created) VALUES (?, ?, ?)",
            (owner, size, time.time())).lastrowid

    def drop_reservation(self, conn, reservation_id):
        """Release a reservation."""
        conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))

    def open_session(self, owner, node, pid, proc_start):
        """Register an open instance."""
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO sessions (owner, node, pid, proc_start, started)"
                         " VALUES (?, ?, ?, ?, ?)", (owner, node, pid, proc_start, time.time()))

    def sessions(self):
        """``[(owner, node, pid, proc_start)]`` of every registered instance."""
        return self._read("SELECT owner, node, pid, proc_start FROM sessions").fetchall()

    def end_sessions(self, conn, owners):
        """Remove sessions and the reservations they left (inside a transaction)."""
        for owner in owners:
            conn.execute("DELETE FROM reservations WHERE owner = ?", (owner,))
            conn.execute("DELETE FROM sessions WHERE owner = ?", (owner,))

    # -- counters, transfers, hosts -------------------------------------------

    def counter(self, name):
        """Value of a running total: cached_bytes, cached_files, hits, misses."""
        row = self._read("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    def set_counter(self, conn, name, value):
        """Overwrite a running total (reconciliation only)."""
        conn.execute("UPDATE counters SET value = ? WHERE name = ?", (value, name))

    def add_hits(self, hits, misses):
        """Add to the cache hit and miss counters."""
        with self.transaction() as conn:
            conn.executemany("UPDATE counters SET value = value + ? WHERE name = ?",
                             [(hits, "hits"), (misses, "misses")])

    def add_transfer(self, uploaded=0, downloaded=0, when=None):
        """Add bytes to this month's transfer meter."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO transfers (month, uploaded, downloaded) VALUES (?, ?, ?)"
                " ON CONFLICT (month) DO UPDATE SET uploaded = uploaded + excluded.uploaded,"
                " downloaded = downloaded + excluded.downloaded",
                (month_key(when), uploaded, downloaded))

    def transfers(self):
        """``{month: (uploaded, downloaded)}`` for every month on record."""
        return {m: (u, d) for m, u, d in self._read(
            "SELECT month, uploaded, downloaded FROM transfers ORDER BY month")}

    def record_host_result(self, host_name, ok, latency_ms=None, error=None):
        """Update a host's health after one operation."""
        now = time.time()
        with self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO host_health (host_name) VALUES (?)", (host_name,))
            if ok:
                samples = json.loads(conn.execute(
                    "SELECT latency_samples FROM host_health WHERE host_name = ?",
                    (host_name,)).fetchone()[0])
                if latency_ms is not None:
                    samples = (samples + [round(latency_ms, 3)])[-LATENCY_SAMPLES:]
                conn.execute(
                    "UPDATE host_health SET successes = successes + 1,"
                    " consecutive_failures = 0, last_success = ?, latency_samples = ?"
                    " WHERE host_name = ?", (now, json.dumps(samples), host_name))
            else:
                conn.execute(
                    "UPDATE host_health SET failures = failures + 1,"
                    " consecutive_failures = consecutive_failures + 1,"
                    " last_failure = ?, last_error = ? WHERE host_name = ?",
                    (now, (error or "")[:500], host_name))

    def host_health(self):
        """``{host_name: {successes, failures, consecutive_failures, last_error,
        last_success, last_failure, latency_ms}}``; ``latency_ms`` is the median
        of the latest transfers (None before the first success)."""
        cur = self._read(
            "SELECT host_name, successes, failures, consecutive_failures, last_error,"
            " last_success, last_failure, latency_samples FROM host_health ORDER BY host_name")
        health = {}
        for name, *values, samples in cur:
            samples = json.loads(samples)
            row = dict(zip(("successes", "failures", "consecutive_failures", "last_error",
                            "last_success", "last_failure"), values))
            row["latency_ms"] = statistics.median(samples) if samples else None
            health[name] = row
        return health

    def host_breakers(self):
        """``{host_name: {consecutive_failures, last_failure}}``: what the
        circuit breaker needs, without decoding latency samples."""
        return {name: {"consecutive_failures": failures, "last_failure": last}
                for name, failures, last in self._read(
                    "SELECT host_name, consecutive_failures, last_failure FROM host_health")}

    def host_breaker(self, host_name):
        """One host's row of :meth:`host_breakers`, or None."""
        row = self._read("SELECT consecutive_failures, last_failure FROM host_health"
                         " WHERE host_name = ?", (host_name,)).fetchone()
        return {"consecutive_failures": row[0], "last_failure": row[1]} if row else None

    def has_files(self):
        """Whether the pool has any file (one index probe)."""
        return self._read("SELECT 1 FROM files LIMIT 1").fetchone() is not None

    def file_count(self):
        """Number of files in the pool. Counts rows: for stats, not hot paths."""
        return self._read("SELECT count(*) FROM files").fetchone()[0]

    def queue_length(self):
        """Number of files on the upload queue."""
        return self._read("SELECT count(*) FROM upload_queue").fetchone()[0]

    def count_below(self, target):
        """Number of files with fewer than ``target`` good copies (uses an index)."""
        return self._read("SELECT count(*) FROM files WHERE copies < ?", (target,)).fetchone()[0]

    # -- listing: `cm ls` and hash prefixes ------------------------------------

    def list_files(self):
        """Yield ``(hash, filename, size, cached, pinned, copies, verified)`` for
        every file, by filename then hash. Streams from one cursor."""
        return self._read("SELECT hash, filename, size, cached, pinned, copies, verified"
                          " FROM files ORDER BY filename, hash")

    def hashes_with_prefix(self, prefix, limit=2):
        """Up to ``limit`` hashes starting with the hex ``prefix``, in order.

        A range scan on the primary key, so O(log n) however large the pool.
        """
        # 'g' sorts after every hex digit: [prefix, prefix + 'g') is the range.
        return [row[0] for row in self._read(
            "SELECT hash FROM files WHERE hash >= ? AND hash < ? ORDER BY hash LIMIT ?",
            (prefix, prefix + "g", limit))]

    # -- local sources: hashes of files `cm upload` has read --------------------

    def source_hashes(self, paths):
        """``{path: (size, mtime_ns, ctime_ns, inode, device, hash)}`` for the
        ones among ``paths`` (absolute) whose remembered hash is still in the
        pool: cached, or with a good copy on a host."""
        found = {}
        paths = list(paths)
        for start in range(0, len(paths), 500):  # below SQLite's variable limit
            chunk = paths[start:start + 500]
            found.update((row[0], tuple(row[1:])) for row in self._read(
                "SELECT s.path, s.size, s.mtime_ns, s.ctime_ns, s.inode, s.device, s.hash"
                " FROM sources AS s JOIN files AS f ON f.hash = s.hash"
                " WHERE s.path IN (%s) AND (f.cached = 1 OR f.copies > 0)"
                % ",".join("?" * len(chunk)), chunk))
        return found

    def remember_sources(self, rows):
        """Store ``(path, size, mtime_ns, ctime_ns, inode, device, hash)`` rows, in one
        transaction."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO sources"
                " (path, size, mtime_ns, ctime_ns, inode, device, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    # -- batches: CloudManager.upload_many -------------------------------------
    #
    # A few statements per batch instead of several transactions per file:
    # SQLite commits cost far more than the rows they carry.

    def file_states(self, conn, hashes):
        """``{hash: (size, cached, verified)}`` for the known ones among ``hashes``.

        One statement whatever the number (a JSON array parameter).
        """
        return {h: (size, cached, verified) for h, size, cached, verified in conn.execute(
            "SELECT hash, size, cached, verified FROM files"
            " WHERE hash IN (SELECT value FROM json_each(?))", (json.dumps(list(hashes)),))}

    def insert_cached_files(self, conn, rows, when):
        """Record new files as cached, in one statement (inside a transaction).

        :param rows: ``(hash, filename, size, created)`` of files the pool
            does not know yet
        :param when: their LRU clock
        """
        conn.executemany(
            "INSERT INTO files (hash, filename, size, created, cached, last_access)"
            " VALUES (?, ?, ?, ?, 1, ?)", [(h, n, s, c, when) for h, n, s, c in rows])

    def enqueue_many(self, conn, hashes, when):
        """Queue files for upload (inside a transaction); queued ones stay as they are."""
        conn.executemany("INSERT OR IGNORE INTO upload_queue (hash, queued) VALUES (?, ?)",
                         [(h, when) for h in hashes])

    def replication_states(self, hashes):
        """``{hash: (size, verified, cached, holders)}`` for the known ones among
        ``hashes``, where ``holders`` is the set of host names with a good
        copy. Two statements."""
        param = (json.dumps(list(hashes)),)
        states = {h: (size, verified, bool(cached), set()) for h, size, verified, cached
                  in self._read("SELECT hash, size, verified, cached FROM files"
                                " WHERE hash IN (SELECT value FROM json_each(?))", param)}
        for h, host_name in self._read(
                "SELECT hash, host_name FROM uploads WHERE error = 0"
                " AND hash IN (SELECT value FROM json_each(?))", param):
            states[h][3].add(host_name)
        return states

    def record_uploads_many(self, conn, copies, failures, when):
        """:meth:`record_upload` and :meth:`record_upload_failure` for a batch
        (inside a transaction), a few statements in all.

        :param copies: ``[(hash, host_name, url)]`` of good copies made
        :param failures: ``[(hash, host_name)]`` of failed uploads
        """
        if copies:
            conn.executemany(
                "INSERT INTO uploads (hash, host_name, url, error, verified, time)"
                " VALUES (?, ?, ?, 0, 1, ?) ON CONFLICT (hash, host_name, url)"
                " DO UPDATE SET error = 0, verified = 1, time = excluded.time",
                [(h, host, url, when) for h, host, url in copies])
            conn.executemany("DELETE FROM uploads WHERE hash = ? AND host_name = ? AND url = ''"
                             " AND error = 1", [(h, host) for h, host, _ in copies])
        if failures:
            conn.executemany(
                "INSERT INTO uploads (hash, host_name, url, error, time)"
                " SELECT ?, ?, '', 1, ? WHERE NOT EXISTS ("
                "  SELECT 1 FROM uploads WHERE hash = ? AND host_name = ? AND error = 0)"
                " ON CONFLICT (hash, host_name, url) DO UPDATE SET time = excluded.time",
                [(h, host, when, h, host) for h, host in failures])

    def dequeue_many(self, conn, hashes):
        """Take files off the upload queue (inside a transaction)."""
        conn.executemany("DELETE FROM upload_queue WHERE hash = ?", [(h,) for h in hashes])

    def record_host_batch(self, outcomes):
        """Update hosts' health after a batch of operations, in one transaction.

        :param outcomes: ``{host_name: [(ok, latency_ms, error, when)]}``, each
            list in the order the operations ended; the result is the same as
            :meth:`record_host_result` called once for each
        """
        with self.transaction() as conn:
            for host_name, results in outcomes.items():
                if not results:
                    continue
                conn.execute("INSERT OR IGNORE INTO host_health (host_name) VALUES (?)",
                             (host_name,))
                consecutive, samples = conn.execute(
                    "SELECT consecutive_failures, latency_samples FROM host_health"
                    " WHERE host_name = ?", (host_name,)).fetchone()
                samples = json.loads(samples)
                successes = failures = 0
                last_success = last_failure = last_error = None
                for ok, latency_ms, error, when in results:
                    if ok:
                        successes += 1
                        consecutive = 0
                        last_success = when
                        if latency_ms is not None:
                            samples.append(round(latency_ms, 3))
                    else:
                        failures += 1
                        consecutive += 1
                        last_failure, last_error = when, (error or "")[:500]
                conn.execute(
                    "UPDATE host_health SET successes = successes + ?, failures = failures + ?,"
                    " consecutive_failures = ?, latency_samples = ?,"
                    " last_success = coalesce(?, last_success),"
                    " last_failure = coalesce(?, last_failure),"
                    " last_error = coalesce(?, last_error) WHERE host_name = ?",
                    (successes, failures, consecutive, json.dumps(samples[-LATENCY_SAMPLES:]),
                     last_success, last_failure, last_error, host_name))

    def known_records(self, hashes):
        """``{hash: (size, filename, {(host_name, url)})}`` for the known ones among
        ``hashes``: what an import is compared with. Two statements."""
        param = (json.dumps(list(hashes)),)
        # json_each joined to the table: a probe per hash, no temp index.
        known = {h: (size, name, set()) for h, size, name in self._read(
            "SELECT f.hash, f.size, f.filename FROM json_each(?) AS j"
            " JOIN files AS f ON f.hash = j.value", param)}
        for h, host_name, url in self._read(
                "SELECT u.hash, u.host_name, u.url FROM json_each(?) AS j"
                " JOIN uploads AS u ON u.hash = j.value", param):
            known[h][2].add((host_name, url))
        return known

    # -- records: export and import -------------------------------------------

    def iter_records(self, hashes=None):
        """Yield ``(hash, filename, size, created, [(host, url, error)])`` per file.

        Streams from one cursor, in hash order, so memory stays flat however
        large the pool is. ``hashes`` limits it to those files.
        """
        sql = ("SELECT f.hash, f.filename, f.size, f.created, u.host_name, u.url, u.error"
               " FROM files AS f LEFT JOIN uploads AS u ON u.hash = f.hash")
        params = ()
        if hashes is not None:
            hashes = list(hashes)
            sql += " WHERE f.hash IN (%s)" % ",".join("?" * len(hashes))
            params = hashes
        sql += " ORDER BY f.hash, u.time, u.host_name, u.url"
        current = None
        for h, name, size, created, host, url, error in self._read(sql, params):
            if current is None or current[0] != h:
                if current is not None:
                    yield current
                current = (h, name, size, created, [])
            if host is not None:
                current[4].append((host, url, bool(error)))
        if current is not None:
            yield current

    def merge_records(self, records):
        """Merge imported records into the pool, in one transaction.

        A new file is inserted. A known file gains the uploads it lacked (a
        union, so merging twice changes nothing) and a filename if it had none.
        The error flag of an upload this node already knows is kept: local
        knowledge wins over a remote claim. A record whose size disagrees with
        the known size is refused.

        :param records: objects with ``hash``, ``filename``, ``size``,
            ``datetime`` and ``uploads`` (``[(host_name, url, error)]``)
        :return: ``(changed, refused)``: how many records added something, and
            the hashes refused for a size conflict
        """
        records = list(records)
        changed, refused = 0, []
        # A few set-wise statements per batch, not several per record: what
        # the pool knows is read once, compared in memory (under the write
        # lock), and only what is new is written.
        with self.transaction() as conn:
            hashes = json.dumps(list({rec.hash for rec in records}))
            known = {h: [size, name] for h, size, name in conn.execute(
                "SELECT f.hash, f.size, f.filename FROM json_each(?) AS j"
                " JOIN files AS f ON f.hash = j.value", (hashes,))}
            have = set(conn.execute(
                "SELECT u.hash, u.host_name, u.url FROM json_each(?) AS j"
                " JOIN uploads AS u ON u.hash = j.value", (hashes,)))
            new_files, named, new_uploads = [], {}, []
            for rec in records:
                row = known.get(rec.hash)
                if row is None:
                    known[rec.hash] = [rec.size, rec.filename]
                    new_files.append((rec.hash, rec.filename, rec.size, rec.datetime))
                    did = True
                elif row[0] != rec.size:
                    refused.append(rec.hash)
                    continue
                elif rec.filename and not row[1]:
                    row[1] = named[rec.hash] = rec.filename
                    did = True
                else:
                    did = False
                for host_name, url, error in rec.uploads:
                    if (rec.hash, host_name, url) not in have:
                        have.add((rec.hash, host_name, url))
                        new_uploads.append((rec.hash, host_name, url, 1 if error else 0,
                                            rec.datetime))
                        did = True
                changed += did
            # A new file's uploads go in before its row, with the foreign key
            # checked at commit: the uploads_insert trigger finds no row to
            # recount (it did so per upload: half the cost of an import), and
            # the row is inserted with its count. Imported copies are never
            # verified, so that count is the distinct hosts of good copies.
            fresh = {h: set() for h, _, _, _ in new_files}
            for h, host_name, _, error, _ in new_uploads:
                if h in fresh and not error:
                    fresh[h].add(host_name)
            insert_uploads = ("INSERT OR IGNORE INTO uploads (hash, host_name, url, error, time)"
                              " VALUES (?, ?, ?, ?, ?)")
            conn.execute("PRAGMA defer_foreign_keys = ON")  # until this commit
            conn.executemany(insert_uploads, [u for u in new_uploads if u[0] in fresh])
            conn.executemany("INSERT INTO files (hash, filename, size, created, copies)"
                             " VALUES (?, ?, ?, ?, ?)",
                             [row + (len(fresh[row[0]]),) for row in new_files])
            conn.executemany("UPDATE files SET filename = ? WHERE hash = ?",
                             [(name, h) for h, name in named.items()])
            conn.executemany(insert_uploads, [u for u in new_uploads if u[0] not in fresh])
        return changed, refused

    # -- reconciliation -------------------------------------------------------

    def recount_cache(self, conn):
        """Recompute the cached bytes and files totals from the rows."""
        size, count = conn.execute(
            "SELECT coalesce(sum(size), 0), count(*) FROM files WHERE cached = 1").fetchone()
        self.set_counter(conn, "cached_bytes", size)
        self.set_counter(conn, "cached_files", count)
        return size, count

    # -- integrity checks: check.py (CloudManager.check, `cm fsck`) -------------

    def check_cached_rows(self, conn):
        """``[(hash, size)]`` of every file the database says is cached. Scans rows."""
        return conn.execute("SELECT hash, size FROM files WHERE cached = 1").fetchall()

    def check_cached_totals(self, conn):
        """``(bytes, files)`` summed over the cached rows, and the running totals
        ``(cached_bytes, cached_files)``, read in one statement."""
        row = conn.execute(
            "SELECT coalesce(sum(size), 0), count(*),"
            " (SELECT value FROM counters WHERE name = 'cached_bytes'),"
            " (SELECT value FROM counters WHERE name = 'cached_files')"
            " FROM files WHERE cached = 1").fetchone()
        return (row[0], row[1]), (row[2] or 0, row[3] or 0)

    def check_pins_without_file(self, conn):
        """Hashes of files pinned explicitly but not cached."""
        return [r[0] for r in conn.execute(
            "SELECT hash FROM files WHERE pinned = 1 AND cached = 0 ORDER BY hash")]

    def check_no_remote_copy(self, conn):
        """``[(hash, cached, queued)]`` of files no host holds a good copy of.

        A range scan of the ``files_copies`` index.
        """
        return [(h, bool(c), bool(q)) for h, c, q in conn.execute(
            "SELECT f.hash, f.cached, q.hash IS NOT NULL FROM files AS f"
            " LEFT JOIN upload_queue AS q ON q.hash = f.hash"
            " WHERE f.copies = 0 ORDER BY f.hash")]

    def check_reservations(self, conn):
        """``[(id, owner, size)]`` of every reservation (writes in flight)."""
        return conn.execute("SELECT id, owner, size FROM reservations ORDER BY id").fetchall()

    def check_orphan_reservations(self, conn):
        """Ids of reservations whose owner has no session row: no one will release them."""
        return [r[0] for r in conn.execute(
            "SELECT id FROM reservations WHERE owner NOT IN (SELECT owner FROM sessions)")]

    def check_drop_reservations(self, conn, ids):
        """Release reservations by id (inside a transaction)."""
        conn.executemany("DELETE FROM reservations WHERE id = ?", [(i,) for i in ids])

    def check_counters_negative(self, conn):
        """Whether a cache running total is below zero (cheap: two key lookups)."""
        return conn.execute("SELECT count(*) FROM counters WHERE value < 0"
                            " AND name IN ('cached_bytes', 'cached_files')").fetchone()[0] > 0
