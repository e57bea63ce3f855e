-- cloudmanager catalog schema on PostgreSQL, version 8.
--
-- The catalog part of schema.sql (same tables, columns, keys, indexes and
-- copy-count triggers), in PostgreSQL's types; tests/test_catalog.py checks
-- that the two define the same columns. Each node's cache index stays in a
-- local SQLite file (schema.sql's second part). Applied once, under the
-- catalog's write lock, by PostgresDatabase.ensure_schema (and cm_setup_db).
--
-- Text keys use the "C" collation: hashes and names sort bytewise, as in
-- SQLite, whatever the database's locale (a prefix lookup relies on it).

CREATE TABLE files (
    hash        TEXT COLLATE "C" PRIMARY KEY CHECK (length(hash) = 64),
    filename    TEXT COLLATE "C" NOT NULL DEFAULT '',
    size        BIGINT NOT NULL CHECK (size >= 0),
    created     BIGINT NOT NULL,
    copies      INTEGER NOT NULL DEFAULT 0,
    verified    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX files_verified ON files (verified);

CREATE TABLE uploads (
    -- Deferrable: an import inserts a new file's copies before its row.
    hash       TEXT COLLATE "C" NOT NULL REFERENCES files (hash) ON DELETE CASCADE
                   DEFERRABLE INITIALLY IMMEDIATE,
    host_name  TEXT COLLATE "C" NOT NULL,
    url        TEXT COLLATE "C" NOT NULL DEFAULT '',
    state      TEXT NOT NULL DEFAULT 'claimed' CHECK (state IN
                   ('pending', 'good', 'claimed', 'suspect', 'bad', 'missing', 'deleted')),
    time       BIGINT NOT NULL,
    checked    BIGINT NOT NULL DEFAULT 0,
    next_check DOUBLE PRECISION NOT NULL DEFAULT 0,
    strikes    INTEGER NOT NULL DEFAULT 0,
    object_sha256 TEXT NOT NULL DEFAULT '',
    object_size   BIGINT NOT NULL DEFAULT -1,
    key_id        TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (hash, host_name, url)
);
CREATE INDEX uploads_checked ON uploads (checked) WHERE state IN ('good', 'claimed');
CREATE INDEX uploads_recheck ON uploads (next_check)
    WHERE state IN ('suspect', 'bad', 'missing');

-- files.copies and files.verified, kept in step with the file's copies:
-- once per statement, for the files it touched. Inserted rows are counted
-- by the statement after them, recount in db/copies.py, as on SQLite;
-- changes of state and deletes by these triggers.
CREATE FUNCTION cloudmanager_recount(hashes TEXT[]) RETURNS void LANGUAGE sql AS $$
    UPDATE files AS f SET
        copies = (SELECT count(DISTINCT u.host_name) FROM uploads AS u
                  WHERE u.hash = f.hash AND u.state IN ('good', 'claimed', 'suspect')),
        verified = (SELECT count(DISTINCT u.host_name) FROM uploads AS u
                    WHERE u.hash = f.hash AND u.state = 'good')
    WHERE f.hash = ANY (hashes);
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
CREATE TRIGGER uploads_update AFTER UPDATE ON uploads
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cloudmanager_count_updated();
CREATE TRIGGER uploads_delete AFTER DELETE ON uploads
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cloudmanager_count_deleted();

CREATE TABLE tombstones (
    hash      TEXT COLLATE "C" NOT NULL CHECK (length(hash) = 64),
    host_name TEXT COLLATE "C" NOT NULL,
    url       TEXT COLLATE "C" NOT NULL,
    deleted   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (hash, host_name, url)
);

CREATE TABLE removals (
    hash    TEXT COLLATE "C" PRIMARY KEY CHECK (length(hash) = 64),
    owner   TEXT NOT NULL,
    started DOUBLE PRECISION NOT NULL
);

CREATE TABLE upload_queue (
    hash         TEXT COLLATE "C" PRIMARY KEY REFERENCES files (hash) ON DELETE CASCADE,
    queued       DOUBLE PRECISION NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    node         TEXT NOT NULL DEFAULT ''
);

CREATE TABLE leases (
    kind  TEXT COLLATE "C" NOT NULL,
    hash  TEXT COLLATE "C" NOT NULL CHECK (length(hash) = 64),
    owner TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, hash)
);

CREATE TABLE host_health (
    host_name            TEXT COLLATE "C" PRIMARY KEY,
    successes            BIGINT NOT NULL DEFAULT 0,
    failures             BIGINT NOT NULL DEFAULT 0,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    last_error           TEXT,
    last_success         DOUBLE PRECISION,
    last_failure         DOUBLE PRECISION,
    latency_samples      TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE transfers (
    month      TEXT COLLATE "C" NOT NULL,
    node       TEXT COLLATE "C" NOT NULL DEFAULT '',
    uploaded   BIGINT NOT NULL DEFAULT 0,
    downloaded BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (month, node)
);

CREATE TABLE nodes (
    node       TEXT COLLATE "C" PRIMARY KEY,
    hostname   TEXT NOT NULL,
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen  DOUBLE PRECISION NOT NULL
);

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

CREATE TABLE trees (
    hash    TEXT COLLATE "C" PRIMARY KEY REFERENCES files (hash) ON DELETE CASCADE,
    name    TEXT NOT NULL,
    created BIGINT NOT NULL
);

-- The catalog's schema version (SQLite keeps it in PRAGMA user_version).
CREATE TABLE cloudmanager_schema (
    version INTEGER NOT NULL
);
INSERT INTO cloudmanager_schema (version) VALUES (8);
