-- cloudmanager database schema, version 3.
--
-- Applied by FileDatabase on a new database and by `cm_setup_db PATH`.
-- Every statement is idempotent, so applying it twice (or from two processes
-- at once) is harmless. Later versions are reached through the migrations in
-- database.py; PRAGMA user_version records where a database stands.

-- One row per file in the pool, addressed by its SHA-256.
CREATE TABLE IF NOT EXISTS files (
    hash        TEXT PRIMARY KEY CHECK (length(hash) = 64),
    filename    TEXT NOT NULL DEFAULT '',       -- a safe basename, for people
    size        INTEGER NOT NULL CHECK (size >= 0),
    created     INTEGER NOT NULL,               -- unix time the pool first saw it
    -- Distinct hosts holding a good copy, and how many of those this node
    -- uploaded or downloaded and verified itself (imported claims are not
    -- trusted to unpin a file). Kept by the uploads_* triggers.
    copies      INTEGER NOT NULL DEFAULT 0,
    verified    INTEGER NOT NULL DEFAULT 0,
    -- Cache state: whether storage/<shard>/<hash> holds the file, and the
    -- LRU clock (unix time of the last use).
    cached      INTEGER NOT NULL DEFAULT 0 CHECK (cached IN (0, 1)),
    last_access REAL NOT NULL DEFAULT 0,
    -- An explicit pin by the user. A file with verified = 0 is pinned implicitly.
    pinned      INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1))
) WITHOUT ROWID;

-- Eviction order: only files that may be evicted, oldest use first. The
-- eviction query repeats this WHERE clause so SQLite picks this index; the
-- first row is found in O(log n).
CREATE INDEX IF NOT EXISTS files_lru ON files (last_access)
    WHERE cached = 1 AND verified > 0 AND pinned = 0;

-- Files below a redundancy target, for sync().
CREATE INDEX IF NOT EXISTS files_copies ON files (copies);

-- Where copies live. A failed upload is a row with error = 1 and url = ''.
-- A copy found bad keeps its url and gets error = 1. `verified` is 1 for a
-- copy this node uploaded, or downloaded and checked; 0 for one only
-- imported from another node's records.
CREATE TABLE IF NOT EXISTS uploads (
    hash      TEXT NOT NULL REFERENCES files (hash) ON DELETE CASCADE,
    host_name TEXT NOT NULL,
    url       TEXT NOT NULL DEFAULT '',
    error     INTEGER NOT NULL DEFAULT 0 CHECK (error IN (0, 1)),
    verified  INTEGER NOT NULL DEFAULT 0 CHECK (verified IN (0, 1)),
    time      INTEGER NOT NULL,
    checked   INTEGER NOT NULL DEFAULT 0,   -- unix time verify() last looked; 0 never
    PRIMARY KEY (hash, host_name, url)
) WITHOUT ROWID;

-- verify() takes the copies checked longest ago first, a slice at a time.
CREATE INDEX IF NOT EXISTS uploads_checked ON uploads (checked) WHERE error = 0;

CREATE TRIGGER IF NOT EXISTS uploads_insert AFTER INSERT ON uploads BEGIN
    UPDATE files SET
        copies = (SELECT count(DISTINCT host_name) FROM uploads
                  WHERE hash = NEW.hash AND error = 0),
        verified = (SELECT count(DISTINCT host_name) FROM uploads
                    WHERE hash = NEW.hash AND error = 0 AND verified = 1)
    WHERE hash = NEW.hash;
END;

CREATE TRIGGER IF NOT EXISTS uploads_update AFTER UPDATE OF error, verified ON uploads BEGIN
    UPDATE files SET
        copies = (SELECT count(DISTINCT host_name) FROM uploads
                  WHERE hash = NEW.hash AND error = 0),
        verified = (SELECT count(DISTINCT host_name) FROM uploads
                    WHERE hash = NEW.hash AND error = 0 AND verified = 1)
    WHERE hash = NEW.hash;
END;

CREATE TRIGGER IF NOT EXISTS uploads_delete AFTER DELETE ON uploads BEGIN
    UPDATE files SET
        copies = (SELECT count(DISTINCT host_name) FROM uploads
                  WHERE hash = OLD.hash AND error = 0),
        verified = (SELECT count(DISTINCT host_name) FROM uploads
                    WHERE hash = OLD.hash AND error = 0 AND verified = 1)
    WHERE hash = OLD.hash;
END;

-- Running totals, so usage and statistics never scan the files table.
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

INSERT OR IGNORE INTO counters (name, value) VALUES
    ('cached_bytes', 0), ('cached_files', 0), ('hits', 0), ('misses', 0);

CREATE TRIGGER IF NOT EXISTS files_cache_insert AFTER INSERT ON files
WHEN NEW.cached = 1 BEGIN
    UPDATE counters SET value = value + NEW.size WHERE name = 'cached_bytes';
    UPDATE counters SET value = value + 1 WHERE name = 'cached_files';
END;

CREATE TRIGGER IF NOT EXISTS files_cache_update AFTER UPDATE OF cached ON files
WHEN OLD.cached != NEW.cached BEGIN
    UPDATE counters SET value = value + (NEW.cached - OLD.cached) * NEW.size
        WHERE name = 'cached_bytes';
    UPDATE counters SET value = value + (NEW.cached - OLD.cached)
        WHERE name = 'cached_files';
END;

CREATE TRIGGER IF NOT EXISTS files_cache_delete AFTER DELETE ON files
WHEN OLD.cached = 1 BEGIN
    UPDATE counters SET value = value - OLD.size WHERE name = 'cached_bytes';
    UPDATE counters SET value = value - 1 WHERE name = 'cached_files';
END;

-- Space promised to writes in flight (a temp file being filled). Counted
-- against the capacity with the cached bytes, so temp files never push the
-- cache over it. `owner` names the session that made it.
CREATE TABLE IF NOT EXISTS reservations (
    -- AUTOINCREMENT: an id is never reused, so neither is a temp file name.
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    owner   TEXT NOT NULL,
    size    INTEGER NOT NULL CHECK (size >= 0),
    hash    TEXT,                                -- set just before the rename
    created REAL NOT NULL
);

-- Files that are in the pool but not yet on enough hosts.
CREATE TABLE IF NOT EXISTS upload_queue (
    hash         TEXT PRIMARY KEY REFERENCES files (hash) ON DELETE CASCADE,
    queued       REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
) WITHOUT ROWID;

-- What each host has done lately; hosts are chosen by this.
CREATE TABLE IF NOT EXISTS host_health (
    host_name            TEXT PRIMARY KEY,
    successes            INTEGER NOT NULL DEFAULT 0,
    failures             INTEGER NOT NULL DEFAULT 0,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    last_error           TEXT,
    last_success         REAL,
    last_failure         REAL,
    -- The latest transfer times in ms, a JSON array; the median is reported.
    latency_samples      TEXT NOT NULL DEFAULT '[]'
) WITHOUT ROWID;

-- The transfer meter: bytes moved to and from hosts, per calendar month (UTC).
CREATE TABLE IF NOT EXISTS transfers (
    month      TEXT PRIMARY KEY,                   -- 'YYYY-MM'
    uploaded   INTEGER NOT NULL DEFAULT 0,
    downloaded INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Open CloudManager instances. A row left by a process that no longer runs
-- means it did not close cleanly, and the next open reconciles the cache.
CREATE TABLE IF NOT EXISTS sessions (
    owner      TEXT PRIMARY KEY,                   -- 'node:pid:token'
    node       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    proc_start TEXT NOT NULL DEFAULT '',           -- tells a reused pid apart
    started    REAL NOT NULL
) WITHOUT ROWID;

-- Hashes of local source files, so `cm upload DIR` run again skips files
-- already in the pool without reading them. A row is trusted only while the
-- file's size, mtime, ctime, inode and device are all unchanged.
CREATE TABLE IF NOT EXISTS sources (
    path     TEXT PRIMARY KEY,                     -- absolute
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode    INTEGER NOT NULL,
    device   INTEGER NOT NULL,
    hash     TEXT NOT NULL CHECK (length(hash) = 64)
) WITHOUT ROWID;

PRAGMA user_version = 3;
