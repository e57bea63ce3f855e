-- cloudmanager database schema, version 7.
--
-- Applied by FileDatabase on a new database and by `cm_setup_db PATH`.
-- Every statement is idempotent, so applying it twice (or from two processes
-- at once) is harmless. Older databases are brought here by the migrations
-- in db/connection.py; PRAGMA user_version records where a database stands.
--
-- Two parts, which no statement joins (so the catalog can move to a server
-- while the cache index stays in a local file beside the storage directory):
--   the pool's CATALOG: files, uploads, tombstones, removals, upload_queue,
--       leases, host_health, transfers, nodes, published, pool_state, trees;
--   this node's CACHE INDEX: this_node, cache_entries, counters,
--       reservations, sessions, sources.
-- The catalog part is also schema_postgres.sql, in PostgreSQL's types.

-- == the catalog ==============================================================

-- One row per file in the pool, addressed by its SHA-256.
CREATE TABLE IF NOT EXISTS files (
    hash        TEXT PRIMARY KEY CHECK (length(hash) = 64),
    filename    TEXT NOT NULL DEFAULT '',       -- a safe basename, for people
    size        INTEGER NOT NULL CHECK (size >= 0),
    created     INTEGER NOT NULL,               -- unix time the pool first saw it
    -- Distinct hosts believed to hold a copy (state good, claimed or
    -- suspect), and how many of those hold one this node made or checked
    -- itself (state good).
    -- Only `verified` counts for decisions that could lose the file. Kept by
    -- db/copies.py (recount) and the uploads_* triggers.
    copies      INTEGER NOT NULL DEFAULT 0,
    verified    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Files below a redundancy target, for sync() and stats().
CREATE INDEX IF NOT EXISTS files_verified ON files (verified);

-- Where copies live, and what this node knows of each: the copy state
-- machine of cloudmanager/replication.py (docs/ARCHITECTURE.md).
--   pending  an upload to the host failed or is owed (url '')
--   good     this node made the copy, or checked its bytes
--   claimed  another node's records say the host holds it
--   suspect  checks of it failed without proving it bad (host errors)
--   bad      its bytes do not match the hash
--   missing  its host says it is not there
--   deleted  this node deleted it
CREATE TABLE IF NOT EXISTS uploads (
    hash       TEXT NOT NULL REFERENCES files (hash) ON DELETE CASCADE,
    host_name  TEXT NOT NULL,
    url        TEXT NOT NULL DEFAULT '',
    state      TEXT NOT NULL DEFAULT 'claimed' CHECK (state IN
                   ('pending', 'good', 'claimed', 'suspect', 'bad', 'missing', 'deleted')),
    time       INTEGER NOT NULL,             -- unix time of the upload or the import
    checked    INTEGER NOT NULL DEFAULT 0,   -- unix time verify() last looked; 0 never
    -- Condemned and suspect copies are looked at again from this unix time
    -- on, with a back-off that doubles per failed look (`strikes`).
    next_check REAL NOT NULL DEFAULT 0,
    strikes    INTEGER NOT NULL DEFAULT 0,
    -- What the host holds, when it is not the file itself: the ciphertext
    -- of an encrypted pool (cloudmanager/crypto.py), its SHA-256 and size,
    -- and the id of the key it is for. '' / -1 / '': the plaintext.
    object_sha256 TEXT NOT NULL DEFAULT '',
    object_size   INTEGER NOT NULL DEFAULT -1,
    key_id        TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (hash, host_name, url)
) WITHOUT ROWID;

-- verify() takes the copies checked longest ago first, a slice at a time...
CREATE INDEX IF NOT EXISTS uploads_checked ON uploads (checked)
    WHERE state IN ('good', 'claimed');
-- ...and looks again at condemned ones whose back-off has passed.
CREATE INDEX IF NOT EXISTS uploads_recheck ON uploads (next_check)
    WHERE state IN ('suspect', 'bad', 'missing');

-- files.copies and files.verified: a row inserted here is counted by the
-- statement after it, recount in db/copies.py (the one writer of
-- these rows), once per batch; a per-row insert trigger cost 10 us per copy,
-- a tenth of a small file's whole upload. A change of state or a delete is
-- counted by these triggers, row by row (they are rarer and come singly).
CREATE TRIGGER IF NOT EXISTS uploads_update AFTER UPDATE OF state ON uploads
WHEN OLD.state != NEW.state BEGIN
    UPDATE files SET
        copies = (SELECT count(DISTINCT host_name) FROM uploads
                  WHERE hash = NEW.hash AND state IN ('good', 'claimed', 'suspect')),
        verified = (SELECT count(DISTINCT host_name) FROM uploads
                    WHERE hash = NEW.hash AND state = 'good')
    WHERE hash = NEW.hash;
END;

CREATE TRIGGER IF NOT EXISTS uploads_delete AFTER DELETE ON uploads BEGIN
    UPDATE files SET
        copies = (SELECT count(DISTINCT host_name) FROM uploads
                  WHERE hash = OLD.hash AND state IN ('good', 'claimed', 'suspect')),
        verified = (SELECT count(DISTINCT host_name) FROM uploads
                    WHERE hash = OLD.hash AND state = 'good')
    WHERE hash = OLD.hash;
END;

-- Copies this node deleted, kept after their file's record is gone, so an
-- older claim from another node cannot bring them back. A new copy this
-- node makes at the same place lifts its tombstone.
CREATE TABLE IF NOT EXISTS tombstones (
    hash      TEXT NOT NULL CHECK (length(hash) = 64),
    host_name TEXT NOT NULL,
    url       TEXT NOT NULL,
    deleted   REAL NOT NULL,                 -- unix time
    PRIMARY KEY (hash, host_name, url)
) WITHOUT ROWID;

-- Removals in progress: while one lasts, copies another process makes of
-- the file are not trusted to protect it (the removal may delete them).
CREATE TABLE IF NOT EXISTS removals (
    hash    TEXT PRIMARY KEY CHECK (length(hash) = 64),
    owner   TEXT NOT NULL,                       -- the session removing it
    started REAL NOT NULL
) WITHOUT ROWID;

-- Files that are in the pool but not yet on enough hosts.
CREATE TABLE IF NOT EXISTS upload_queue (
    hash         TEXT PRIMARY KEY REFERENCES files (hash) ON DELETE CASCADE,
    queued       REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    -- The node whose cache holds the bytes still waiting for a host ('' if
    -- none is known): until a host verifiably holds the file, it is
    -- "pending on" that node, not lost.
    node         TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;

-- Work a process has taken on (replicating a file, checking its copies),
-- so processes and nodes sharing the pool split a backlog instead of doing
-- it twice. A lease ends when its holder releases it or when `until` (unix
-- time) passes: a killed holder's work goes to whoever asks next.
CREATE TABLE IF NOT EXISTS leases (
    kind  TEXT NOT NULL,                 -- 'replicate' or 'verify'
    hash  TEXT NOT NULL CHECK (length(hash) = 64),
    owner TEXT NOT NULL,                 -- the session holding it
    until REAL NOT NULL,
    PRIMARY KEY (kind, hash)
) WITHOUT ROWID;

-- What each host has done lately; hosts are chosen by this, and its circuit
-- breaker (cloudmanager/health.py) opens on consecutive failures.
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

-- The transfer meter: bytes each node moved to and from hosts, per calendar
-- month (UTC); the pool's total is their sum.
CREATE TABLE IF NOT EXISTS transfers (
    month      TEXT NOT NULL,                      -- 'YYYY-MM'
    node       TEXT NOT NULL DEFAULT '',
    uploaded   INTEGER NOT NULL DEFAULT 0,
    downloaded INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (month, node)
) WITHOUT ROWID;

-- The nodes that use the pool: each cache index is one node.
CREATE TABLE IF NOT EXISTS nodes (
    node       TEXT PRIMARY KEY,                   -- its id, from this_node
    hostname   TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL
) WITHOUT ROWID;

-- Records known to be in the shared log the original cloud-manager wrote
-- to (a blockchain): exported by data_dump(limit) (`exported`), or loaded
-- from one of its entries by data_load(data, source) (`source`, the
-- original's blockchain_hash). A file with a row here is not exported
-- again; files with copies and no row are the "blockchain queue". Apart
-- from `files`, which every lookup reads: most files never get a row until
-- they are exported, the columns are read by the export alone, and this
-- table has one writer (db/published.py) for one concern.
CREATE TABLE IF NOT EXISTS published (
    hash     TEXT PRIMARY KEY REFERENCES files (hash) ON DELETE CASCADE,
    exported REAL,                   -- unix time data_dump(limit) exported it
    source   TEXT,                   -- the first source a load tagged it with
    CHECK (exported IS NOT NULL OR source IS NOT NULL)
) WITHOUT ROWID;

-- Small named integers of the pool: 'last_known_block', the cursor of
-- last_known_block() / visit_block(n).
CREATE TABLE IF NOT EXISTS pool_state (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- Tree manifests (cloudmanager/trees.py): the files of the pool that are a
-- directory's manifest, with the directory's name and when it was made, so
-- `cm trees` reads this small table instead of every file. The manifest
-- itself is an ordinary file of the pool (its row in `files`, its copies);
-- a row goes with its file. One writer, db/trees.py: on behalf of trees.py
-- (an upload) and records.py (a load, from the record's `.cmtree` filename).
CREATE TABLE IF NOT EXISTS trees (
    hash    TEXT PRIMARY KEY REFERENCES files (hash) ON DELETE CASCADE,
    name    TEXT NOT NULL,
    created INTEGER NOT NULL
) WITHOUT ROWID;

-- == this node's cache index ===================================================

-- This node's id in the pool (one row, made with the index): the machine's
-- name and a random suffix, so two caches on one machine are two nodes.
CREATE TABLE IF NOT EXISTS this_node (
    node TEXT NOT NULL
);

-- One row per file this node caches or pins: storage/<shard>/<hash> holds it
-- when `cached` is 1. `protected` mirrors "some copy of it is good" (files
-- .verified > 0): only protected files may be evicted; the others are
-- pinned implicitly until a host verifiably holds them.
CREATE TABLE IF NOT EXISTS cache_entries (
    hash        TEXT PRIMARY KEY CHECK (length(hash) = 64),
    size        INTEGER NOT NULL CHECK (size >= 0),
    cached      INTEGER NOT NULL DEFAULT 0 CHECK (cached IN (0, 1)),
    last_access REAL NOT NULL DEFAULT 0,     -- the LRU clock (unix time of the last use)
    pinned      INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)),   -- by the user
    protected   INTEGER NOT NULL DEFAULT 0 CHECK (protected IN (0, 1))
) WITHOUT ROWID;

-- Eviction order: only files that may be evicted, oldest use first. The
-- eviction query repeats this WHERE clause so SQLite picks this index; the
-- first row is found in O(log n).
CREATE INDEX IF NOT EXISTS cache_lru ON cache_entries (last_access)
    WHERE cached = 1 AND protected = 1 AND pinned = 0;

-- Running totals, so usage and statistics never scan the cache index; kept
-- by db/cache_index.py (the one writer of cache_entries), once per batch.
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

INSERT OR IGNORE INTO counters (name, value) VALUES
    ('cached_bytes', 0), ('cached_files', 0), ('hits', 0), ('misses', 0);

-- Space promised to writes in flight (a temp file being filled). Counted
-- against the capacity with the cached bytes, so temp files never push the
-- cache over it. `owner` names the session that made it. An id may be
-- used again once its row is gone: temp file names come from a number each
-- session counts up itself (cache/layout.py), not from the id, so the insert
-- keeps no sequence (AUTOINCREMENT cost a write of sqlite_sequence a file).
CREATE TABLE IF NOT EXISTS reservations (
    id      INTEGER PRIMARY KEY,
    owner   TEXT NOT NULL,
    size    INTEGER NOT NULL CHECK (size >= 0),
    hash    TEXT,                                -- set just before the rename
    created REAL NOT NULL
);

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

PRAGMA user_version = 8;
