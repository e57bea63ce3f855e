"""CacheStore with a FileDatabase, on real files: layout, capacity, LRU
eviction, pins, reservations and reconciliation."""

import io
import os
import socket
import sqlite3
import stat
import subprocess
import threading
import time

import pytest

import cloudmanager.cache.store as cache_mod
from cloudmanager.cache import fsck
from cloudmanager.cache import CacheStore
from cloudmanager.db import FileDatabase
from cloudmanager.errors import CacheError, CacheFullError, DatabaseError
from helpers import sha




@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def make_store(db, root):
    """``make_store(capacity, db=..., **kw)``; every store is closed at teardown."""
    made = []

    def make(capacity=300, database=None, **kwargs):
        kwargs.setdefault("fsync", False)
        target = database or db
        # What the pool wires in: new files are queued for upload.
        kwargs.setdefault("queue", lambda conn, hashes, when, lease=False:
                          target.queue.add(conn, hashes, when))
        store = CacheStore(target, root, capacity, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def src(tmp_path):
    """``src(name, data)`` → path of a source file."""
    base = tmp_path / "src"
    base.mkdir()

    def write(name, data):
        path = base / name
        path.write_bytes(data)
        return str(path)

    return write


def ingest(store, src, name, data):
    file_hash, size = store.ingest(src(name, data), name)
    assert (file_hash, size) == (sha(data), len(data))
    return file_hash


def give_copy(db, file_hash, host="h1"):
    """A good copy on a host, as replication records it: the file may be evicted."""
    with db.transaction() as conn:
        db.copies.record_good(conn, [(file_hash, host, "http://%s.example/%s" % (host, file_hash))],
                              int(time.time()))
        db.cache_index.set_protected(conn, [file_hash], True)


def pin(db, file_hash, pinned):
    with db.transaction() as conn:
        db.cache_index.pin(conn, file_hash, db.files.get(file_hash).size, pinned)


def cached_on_disk(root):
    """``{hash: size}`` of the regular files in the shards."""
    found = {}
    for shard in os.listdir(root):
        if len(shard) != 2:
            continue
        for name in os.listdir(os.path.join(root, shard)):
            st = os.lstat(os.path.join(root, shard, name))
            if stat.S_ISREG(st.st_mode):
                found[name] = st.st_size
    return found


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant_dead_session(db, token="deadbeefdeadbeef"):
    node = socket.gethostname()
    pid = dead_pid()
    db.sessions.open("%s:%d:%s" % (node, pid, token), node, pid, "")
    return token


# -- writing ---------------------------------------------------------------------


def test_ingest_reads_source_once_and_lays_out_private_files(make_store, src, root,
                                                             monkeypatch):
    data = os.urandom(3000)
    path = src("a.bin", data)
    reads = []

    class CountingFile(io.FileIO):
        def readinto(self, b):
            n = super().readinto(b)
            reads.append(n)
            return n

    opens = []
    real_open = open

    def counting_open(file, mode="r", *args, **kwargs):
        if os.fspath(file) == path:
            opens.append(mode)
            return CountingFile(file, "rb")
        return real_open(file, mode, *args, **kwargs)

    store = make_store(10_000)
    monkeypatch.setattr(cache_mod, "open", counting_open, raising=False)
    file_hash, size = store.ingest(path, "a.bin")
    monkeypatch.undo()
    assert (file_hash, size) == (sha(data), 3000)
    assert opens == ["rb"]
    assert sum(reads) == 3000  # every byte read exactly once
    cached = root / file_hash[:2] / file_hash
    assert store.path_for(file_hash) == str(cached)
    assert cached.read_bytes() == data
    assert stat.S_IMODE(os.stat(cached).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / file_hash[:2]).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o700
    assert os.listdir(root / "tmp") == []
    assert store.lookup(file_hash) == str(cached)
    row = store.db.files.get(file_hash)
    assert (row.filename, row.size, store.db.cache_index.is_cached(file_hash)) == ("a.bin", 3000, True)
    assert store.db.queue.hashes() == [file_hash]  # on no host yet: queued for upload


def test_usage_counter_is_sum_of_cached_sizes(make_store, src, db, root):
    store = make_store(10_000)
    sizes = [0, 1, 123, 4000]
    for i, n in enumerate(sizes):
        ingest(store, src, "f%d" % i, bytes([i]) * n)
    ingest(store, src, "again", b"\x03" * 4000)  # already cached: not counted twice
    assert store.used_bytes() == sum(sizes) == sum(cached_on_disk(root).values())
    assert db.cache_index.counter("cached_files") == len(sizes)
    assert store.usage_ratio() == pytest.approx(sum(sizes) / 10_000)


# -- eviction --------------------------------------------------------------------


def test_lru_eviction_sees_deferred_hits(make_store, src, db, monkeypatch):
    monkeypatch.setattr(cache_mod, "TOUCH_INTERVAL_S", 3600.0)  # hits stay in memory
    store = make_store(300)
    a, b, c = (ingest(store, src, n, n.encode() * 100) for n in "abc")
    for h in (a, b, c):
        give_copy(db, h)
    assert store.lookup(a) is not None  # a hit, kept in memory for now
    assert db.cache_index.entry(a).last_access < db.cache_index.entry(b).last_access  # deferred
    d = ingest(store, src, "d", b"d" * 100)
    assert not db.cache_index.is_cached(b), "b is the least recently used"
    assert not os.path.exists(store.path_for(b))
    assert all(db.cache_index.is_cached(h) and os.path.exists(store.path_for(h)) for h in (a, c, d))
    assert store.used_bytes() == 300


def test_pinned_by_no_copies_are_never_evicted(make_store, src, db, root):
    store = make_store(300)
    hashes = [ingest(store, src, n, n.encode() * 100) for n in "abc"]
    with pytest.raises(CacheFullError):
        store.ingest(src("d", b"d" * 100), "d")
    assert all(db.cache_index.is_cached(h) for h in hashes)
    assert cached_on_disk(root) == {h: 100 for h in hashes}
    assert db.sessions.reserved_bytes() == 0
    assert os.listdir(root / "tmp") == []
    assert not db.files.exists(sha(b"d" * 100))
    with pytest.raises(CacheFullError):  # not one more byte fits
        with store.reserve(1):
            pass
    assert store.evict(0) == 0


def test_explicit_pin_is_honoured(make_store, src, db):
    store = make_store(300)
    a, b, c = (ingest(store, src, n, n.encode() * 100) for n in "abc")
    for h in (a, b, c):
        give_copy(db, h)
    pin(db, a, True)
    d = ingest(store, src, "d", b"d" * 100)
    assert db.cache_index.is_cached(a) and not db.cache_index.is_cached(b) and db.cache_index.is_cached(c)
    give_copy(db, d)
    assert store.evict(0) == 2  # c and d go; a stays
    assert db.cache_index.is_cached(a) and store.used_bytes() == 100
    pin(db, a, False)
    assert store.evict(0) == 1 and store.used_bytes() == 0


def test_reservations_count_against_capacity(make_store, src, db):
    store = make_store(300)
    a, b = (ingest(store, src, n, n.encode() * 100) for n in "ab")
    for h in (a, b):
        give_copy(db, h)

    def total():
        return store.used_bytes() + db.sessions.reserved_bytes()

    with store.reserve(100) as r1:
        assert total() == 300 and db.cache_index.is_cached(a) and db.cache_index.is_cached(b)
        with store.reserve(100):
            assert not db.cache_index.is_cached(a) and db.cache_index.is_cached(b)  # LRU made room
            assert total() == 300
            with store.reserve(100):
                assert not db.cache_index.is_cached(b)
                assert total() == 300 and store.used_bytes() == 0
                with pytest.raises(CacheFullError):
                    with store.reserve(1):
                        pass  # pragma: no cover
                assert total() == 300
            assert total() == 200
        assert total() == 100
        assert r1.temp.startswith(str(store.tmp_dir))
    assert total() == 0


def test_a_reservation_id_given_again_never_gives_a_temp_name_again(make_store):
    """SQLite gives a released row's id to the next reservation (the table
    keeps no AUTOINCREMENT sequence): temp names come from the session's own
    count, so a name is never used twice in a session."""
    store = make_store(300)
    with store.reserve(10) as first:
        pass
    with store.reserve(10) as second:
        pass
    rooms = store.batch_rooms([5, 5])
    rooms.close()
    later = store.batch_rooms([5, 5])
    later.close()
    assert second.id == first.id and later.id == rooms.id  # the ids came again
    names = [first.temp, second.temp] + [s.temp for s in rooms.shares + later.shares]
    assert len(set(names)) == len(names) == 6
    assert all(os.path.dirname(n) == store.tmp_dir for n in names)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_and_its_parent_never_share_a_temp_name(make_store):
    """A forked child may go on using the pool, as the same session: its
    temp names must not follow its parent's count (helper-33's test)."""
    store = make_store(300)
    with store.reserve(10):
        pass  # the count has moved: the fork copies it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reserve, report the temp name, leave the row in flight
        try:
            os.close(read)
            room = store.reservation(10)
            open(room.temp, "wb").close()
            os.write(write, room.temp.encode())
        finally:
            os._exit(0)
    os.close(write)
    child_temp = b""
    while True:
        chunk = os.read(read, 4096)
        if not chunk:
            break
        child_temp += chunk
    os.close(read)
    os.waitpid(pid, 0)
    assert child_temp
    with store.reserve(10) as mine:  # the child's reservation is still in flight
        assert os.fsdecode(child_temp) != mine.temp


def test_a_reservation_outside_a_block_holds_until_released_from_any_thread(make_store, src,
                                                                            db):
    """The engine hands a download attempt's room to the call it gave up on,
    which releases it from its own thread when it ends (issue 11)."""
    store = make_store(300)
    first, second = store.reservation(100), store.reservation(100)
    assert db.sessions.reserved_bytes() == 200
    with pytest.raises(CacheFullError):
        store.reservation(101)
    with open(first.temp, "wb") as f:
        f.write(b"partial")
    worker = threading.Thread(target=first.release)
    worker.start()
    worker.join()
    assert first.released and not os.path.exists(first.temp)  # the file went first
    assert db.sessions.reserved_bytes() == 100
    first.release()  # a second release does nothing
    assert db.sessions.reserved_bytes() == 100
    with open(second.temp, "wb") as f:
        f.write(b"s" * 100)
    store.commit(second, sha(b"s" * 100), 100, "s")
    second.release()  # nothing once committed
    assert db.sessions.reserved_bytes() == 0 and store.used_bytes() == 100
    assert store.contains(sha(b"s" * 100))


def test_file_larger_than_capacity_is_refused_without_evicting(make_store, src, db):
    store = make_store(300)
    a = ingest(store, src, "a", b"a" * 100)
    give_copy(db, a)
    with pytest.raises(CacheFullError):
        with store.reserve(301):
            pass  # pragma: no cover
    assert db.cache_index.is_cached(a) and db.sessions.reserved_bytes() == 0
    with pytest.raises(CacheFullError):
        store.ingest(src("big", b"x" * 301), "big")
    assert db.cache_index.is_cached(a) and store.used_bytes() == 100


def test_failed_make_room_leaves_directory_and_rows_in_agreement(make_store, src, db, root):
    store = make_store(300)
    a = ingest(store, src, "a", b"a" * 100)
    give_copy(db, a)  # evictable
    ingest(store, src, "b", b"b" * 100)  # pinned: no copy
    ingest(store, src, "c", b"c" * 100)  # pinned: no copy
    with pytest.raises(CacheFullError):
        with store.reserve(200):
            pass  # pragma: no cover
    rows = dict(db.cache_index.cached_rows())
    assert rows == cached_on_disk(root)
    assert store.used_bytes() == sum(cached_on_disk(root).values())


PROC_FILE = "/proc/self/status"  # st_size 0, but reading it yields bytes


@pytest.mark.skipif(not os.path.exists(PROC_FILE), reason="needs /proc")
def test_source_growing_while_read_leaves_nothing_behind(make_store, db, root):
    store = make_store(10_000)
    with pytest.raises((CacheError, OverflowError)):
        store.ingest(PROC_FILE, "status")
    assert db.sessions.reserved_bytes() == 0 and store.used_bytes() == 0
    assert os.listdir(root / "tmp") == [] and cached_on_disk(root) == {}
    assert db.files.count() == 0


@pytest.mark.skipif(not os.path.exists(PROC_FILE), reason="needs /proc")
def test_source_growing_while_read_is_a_cache_error(make_store):
    store = make_store(10_000)
    with pytest.raises(CacheError, match="grew while it was read"):
        store.ingest(PROC_FILE, "status")


# -- reading ---------------------------------------------------------------------


def test_missing_cached_file_is_a_miss_and_marked_not_cached(make_store, src, db):
    store = make_store(1000)
    a = ingest(store, src, "a", b"a" * 100)
    assert store.lookup(a) is not None
    os.unlink(store.path_for(a))
    assert store.lookup(a) is None
    store.note_miss()  # the pool counts the miss: only it knows the file is in the pool
    assert not db.cache_index.is_cached(a) and db.files.exists(a)
    assert store.used_bytes() == 0
    store.flush()
    assert (db.cache_index.counter("hits"), db.cache_index.counter("misses")) == (1, 1)


def test_symlink_in_place_of_cached_file_is_not_served(make_store, src, db, tmp_path):
    store = make_store(1000)
    data = b"a" * 100
    a = ingest(store, src, "a", data)
    outside = tmp_path / "outside"
    outside.write_bytes(data)
    os.unlink(store.path_for(a))
    os.symlink(outside, store.path_for(a))
    assert store.lookup(a) is None
    assert not os.path.lexists(store.path_for(a))
    assert outside.read_bytes() == data


def test_flush_writes_hit_and_miss_counters(make_store, src, db, monkeypatch):
    monkeypatch.setattr(cache_mod, "TOUCH_INTERVAL_S", 3600.0)
    store = make_store(1000)
    a = ingest(store, src, "a", b"a" * 10)
    with db.transaction() as conn:
        db.files.add(conn, "e" * 64, "e", 5, 1)  # known, not cached
    for _ in range(3):
        assert store.lookup(a)
    assert store.lookup("e" * 64) is None
    store.note_miss()  # as the pool does for a known file the cache lacks
    assert (db.cache_index.counter("hits"), db.cache_index.counter("misses")) == (0, 0)  # still in memory
    before = db.cache_index.entry(a).last_access
    store.flush()
    assert (db.cache_index.counter("hits"), db.cache_index.counter("misses")) == (3, 1)
    assert db.cache_index.entry(a).last_access > before
    store.flush()  # nothing new: nothing added
    assert (db.cache_index.counter("hits"), db.cache_index.counter("misses")) == (3, 1)


# -- reconciliation -----------------------------------------------------------------


def test_dead_sessions_temp_files_are_removed_on_open(make_store, db, root):
    make_store().close()
    token = plant_dead_session(db)
    dead_temp = root / "tmp" / ("%s-1.tmp" % token)
    dead_temp.write_bytes(b"partial")
    live_token = "0123456789abcdef"  # a session of this (running) process
    db.sessions.open("%s:%d:%s" % (socket.gethostname(), os.getpid(), live_token),
                    socket.gethostname(), os.getpid(), fsck.process_start(os.getpid()))
    live_temp = root / "tmp" / ("%s-2.tmp" % live_token)
    live_temp.write_bytes(b"in flight")
    store = make_store()
    assert not dead_temp.exists()
    assert live_temp.exists()
    assert token not in {o.rsplit(":", 1)[-1] for o, *_ in db.sessions.all()}
    assert store.owner in {o for o, *_ in db.sessions.all()}


def test_orphan_in_shard_removed_after_dead_session(make_store, src, db, root):
    store = make_store(1000)
    keep = ingest(store, src, "keep", b"k" * 50)
    store.close()
    orphan_data = b"orphan" * 10
    orphan = root / sha(orphan_data)[:2] / sha(orphan_data)
    orphan.write_bytes(orphan_data)
    misplaced = root / "00" / ("ff" * 32)  # a hash name in the wrong shard
    misplaced.write_bytes(b"x")
    junk = root / "ab" / "not-a-hash"
    junk.write_bytes(b"x")
    plant_dead_session(db)
    store = make_store(1000)
    assert not orphan.exists() and not misplaced.exists() and not junk.exists()
    assert cached_on_disk(root) == {keep: 50}
    assert store.used_bytes() == 50 and db.cache_index.is_cached(keep)


def test_no_walk_without_a_reason(make_store, src, db, root):
    store = make_store(1000)
    ingest(store, src, "keep", b"k" * 50)
    store.close()
    stray = root / "ab" / ("ab" * 32)
    stray.write_bytes(b"x")
    make_store(1000)  # clean close, known database: no full reconcile
    assert stray.exists()


def test_reconcile_removes_symlinks_without_following_them(make_store, db, root, tmp_path):
    make_store().close()
    outside = tmp_path / "precious"
    outside.write_bytes(b"do not touch")
    link = root / "cd" / ("cd" * 32)
    os.symlink(outside, link)
    dir_link = root / "ef" / ("ef" * 32)
    os.symlink(tmp_path, dir_link, target_is_directory=True)
    plant_dead_session(db)
    make_store()
    assert not os.path.lexists(link) and not os.path.lexists(dir_link)
    assert outside.read_bytes() == b"do not touch"
    assert (tmp_path / "db.sqlite3").exists()


def test_full_reconcile_marks_missing_and_resized_rows(make_store, src, db, root):
    store = make_store(1000)
    a = ingest(store, src, "a", b"a" * 100)
    b = ingest(store, src, "b", b"b" * 100)
    c = ingest(store, src, "c", b"c" * 100)
    store.close()
    os.unlink(store.path_for(a))
    with open(store.path_for(b), "ab") as f:
        f.write(b"extra")
    report = make_store(1000).reconcile(full=True)
    assert report["full"] and report["missing_marked"] == 2
    assert not db.cache_index.is_cached(a) and not db.cache_index.is_cached(b) and db.cache_index.is_cached(c)
    assert not os.path.exists(store.path_for(b))
    assert cached_on_disk(root) == {c: 100}
    assert (db.cache_index.counter("cached_bytes"), db.cache_index.counter("cached_files")) == (100, 1)


def test_existing_directory_with_new_database_is_reconciled(make_store, src, root, tmp_path):
    store = make_store(1000)
    a = ingest(store, src, "a", b"a" * 100)
    store.close()
    assert cached_on_disk(root) == {a: 100}
    fresh = FileDatabase(tmp_path / "fresh.sqlite3")
    try:
        store2 = CacheStore(fresh, root, 1000, fsync=False)
        assert cached_on_disk(root) == {}  # no row vouches for it
        assert store2.used_bytes() == 0 and fresh.cache_index.counter("cached_files") == 0
        assert store2.lookup(a) is None
        store2.close()
    finally:
        fresh.close()


def test_full_reconcile_spares_a_file_published_during_the_walk(make_store, db, root,
                                                                tmp_path):
    store = make_store(1000)
    data = b"published by another process"
    h = sha(data)
    other = sqlite3.connect(str(tmp_path / "db.sqlite3"), isolation_level=None,
                            check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # like another process's commit() in progress
    thread = threading.Thread(target=store.reconcile, kwargs={"full": True})
    thread.start()
    time.sleep(0.5)  # the walk (256 small shards) is over; the reconcile waits for the lock
    (root / h[:2] / h).write_bytes(data)
    other.execute("INSERT INTO files (hash, filename, size, created) VALUES (?, 'p', ?, 1)",
                  (h, len(data)))
    other.execute("INSERT INTO cache_entries (hash, size, cached, last_access)"
                  " VALUES (?, ?, 1, ?)", (h, len(data), time.time()))
    other.execute("COMMIT")
    other.close()
    thread.join()
    assert db.cache_index.is_cached(h)
    assert (root / h[:2] / h).read_bytes() == data


# -- bad arguments -----------------------------------------------------------------


def test_storage_path_that_is_a_file_is_refused(db, tmp_path):
    path = tmp_path / "a-file"
    path.write_bytes(b"x")
    with pytest.raises(CacheError, match="not a directory"):
        CacheStore(db, path, 100, fsync=False)
    assert path.read_bytes() == b"x"


@pytest.mark.parametrize("capacity", [0, -1, -(1 << 40), True, 1.5, "100", None])
def test_capacity_must_be_a_positive_int(db, root, capacity):
    with pytest.raises(CacheError, match="storage_size"):
        CacheStore(db, root, capacity, fsync=False)
    assert db.sessions.all() == []


# -- regressions from review ------------------------------------------------------------


def test_drop_if_damaged_spares_a_healthy_file(make_store, src, db):
    store = make_store(1000)
    digest, _ = store.ingest(src("a", b"healthy"), "a")
    store.drop(digest, only_if_damaged=True)
    assert store.contains(digest) and os.path.exists(store.path_for(digest))


def test_a_reused_pid_is_recognised_as_a_dead_session(make_store, db, root):
    make_store().close()
    node = socket.gethostname()
    token = "feedfacefeedface"
    # Same pid as this process, but another process start: a previous life.
    db.sessions.open("%s:%d:%s" % (node, os.getpid(), token), node, os.getpid(), "1")
    (root / "tmp" / ("%s-7.tmp" % token)).write_bytes(b"left by the dead")
    make_store()
    assert not (root / "tmp" / ("%s-7.tmp" % token)).exists()
    assert token not in {o.rsplit(":", 1)[-1] for o, *_ in db.sessions.all()}


def test_in_flight_temp_names_of_a_live_session_survive_another_open(make_store, db, root):
    store = make_store(1000)
    with store.reserve(10) as res:
        # The names the engine and the hosts derive from the reservation's.
        derived = [res.temp + ".abc123.tmp", os.path.join(
            os.path.dirname(res.temp), "." + os.path.basename(res.temp) + ".x.tmp")]
        for path in derived:
            open(path, "wb").close()
        make_store(1000)  # another instance opens and reconciles
        assert all(os.path.exists(p) for p in derived)


# -- a transaction that fails after its renames ---------------------------------------


def _fail_cache_writes(db):
    """Make this thread's connection refuse every new cache row, as a full disk
    or a broken database would at that point of a publish (a real SQLite
    error, raised by a temporary trigger)."""
    db.connection.execute("CREATE TEMP TRIGGER fail_cache_writes BEFORE INSERT ON"
                          " main.cache_entries BEGIN SELECT RAISE(ABORT, 'injected'); END")


def _allow_cache_writes(db):
    db.connection.execute("DROP TRIGGER temp.fail_cache_writes")


@pytest.mark.parametrize("how", ["ingest", "ingest_many", "commit_many"])
def test_a_publish_whose_transaction_fails_leaves_no_unindexed_file(how, make_store, src, db,
                                                                     root):
    """The renames into the shards happen inside the transaction that indexes
    them; when it fails, the files go again: a file no row counts would take
    room that the cache's bound never sees."""
    store = make_store(capacity=1000)
    data = [b"published %d" % n * 5 for n in range(3)]
    if how == "commit_many":  # a warm-up: files of the pool, evicted, fetched again
        hashes = [ingest(store, src, "w%d" % n, d) for n, d in enumerate(data)]
        for file_hash in hashes:
            give_copy(db, file_hash)
        assert store.evict(0) == 3
        rooms = []
        for file_hash, d in zip(hashes, data):
            room = store.reservation(len(d))
            with open(room.temp, "wb") as f:
                f.write(d)
            rooms.append((file_hash, len(d), room))
    before = db.cache_index.counter("cached_bytes")
    _fail_cache_writes(db)
    with pytest.raises(DatabaseError, match="injected"):
        if how == "ingest":
            store.ingest(src("one", data[0]), "one")
        elif how == "ingest_many":
            store.ingest_many([(src("m%d" % n, d), "m%d" % n, None, len(d))
                               for n, d in enumerate(data)])
        else:
            store.commit_many(rooms)
    _allow_cache_writes(db)
    if how == "commit_many":
        for _, _, room in rooms:
            room.release()
    assert cached_on_disk(root) == {}
    assert db.cache_index.counter("cached_bytes") == before == 0
    # Nothing is left half done: the same files go in once writes work again.
    for n, d in enumerate(data):
        ingest(store, src, "again%d" % n, d)
    assert sorted(cached_on_disk(root).values()) == sorted(len(d) for d in data)
    assert db.cache_index.counter("cached_bytes") == sum(len(d) for d in data)
