"""upload_many sent at once (Replicator.sending): a batch goes to the hosts from
its temp files and its publish records the copies. What another process does
meanwhile (a removal of the same bytes) must not make the pool believe in a
copy that is gone. Real pools on one SQLite file, real folder hosts; a host
subclass runs the other process's steps right after it took the batch."""
import hashlib
import json
import os
import time

import pytest

from cloudmanager.hosts.folder import FolderHost


def sha(data):
    return hashlib.sha256(data).hexdigest()


def consistent(cm, h, roots):
    """The invariant: a file in the pool is protected only if each good copy
    recorded really exists, and is queued unless it has its target of copies."""
    if not cm.exists(h):
        return "not in pool (removal won)"
    st = cm.status(h)
    good = [u for u in st["uploads"] if u["state"] == "good"]
    real = [u for u in good if os.path.exists(os.path.join(roots[u["host_name"]], h))]
    entry = cm.db.cache_index.entry(h)
    assert len(real) == len(good), ("good copies recorded that do not exist", st, entry)
    assert st["verified"] >= st["target"] or h in cm.db.queue.hashes(), \
        ("short and not queued", st)
    return "ok"


class HookHost(FolderHost):
    """Runs ``hook()`` once, right after the host took a batch (or one file)."""
    hook = None

    def _fire(self):
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()

    def upload_batch(self, items):
        results = super().upload_batch(items)
        self._fire()
        return results

    def upload(self, local_path, name):
        loc = super().upload(local_path, name)
        self._fire()
        return loc


def setup(tmp_path, make_pool, redundancy=1):
    root = tmp_path / "hosts" / "nas"
    root.mkdir(parents=True)
    host = HookHost(str(root), name="nas", fsync=False)
    cm = make_pool(hosts=[host], redundancy=redundancy)
    # Another process on the same node: same catalog, same cache, same host.
    other = make_pool(hosts=[FolderHost(str(root), name="nas", fsync=False)], redundancy=redundancy)
    return root, host, cm, other


def test_a_new_file_added_and_removed_elsewhere_while_sent_is_not_believed_held(make_pool, write_file, tmp_path):
    """A file new to us that another process uploads then removes while our
    batch is on its way: the removal deletes the object we had just sent
    (same name), so the publish must not record it good nor protect it."""
    root, host, cm, other = setup(tmp_path, make_pool)
    data = b"file 0"
    f0 = write_file("f0", data)
    h0 = sha(data)

    def meanwhile():
        assert other.upload(write_file("g0", data)) == h0   # other process: add...
        other.remove(h0)                              # ...and remove it
    host.hook = meanwhile
    digests = cm.upload_many([f0] + [write_file("f%d" % i, b"file %d" % i) for i in (1, 2)])
    assert digests[0] == h0 and host.hook is None
    assert not (root / h0).exists()            # the host holds no copy
    # No good copy believed where the removal deleted it, and the cached
    # file stays pinned (not evictable) until sync sends it again.
    assert cm.db.files.verified(h0) == 0 and not cm.db.cache_index.entry(h0).protected
    assert h0 in cm.db.queue.hashes()


def _new_file_removed_while_sent(make_pool, write_file, tmp_path):
    """A batch whose first file, new to the pool, another process adds and
    removes while the batch is on its way: ``(root, cm, hash, bytes)``."""
    root, host, cm, other = setup(tmp_path, make_pool)
    data = b"precious bytes"
    h0 = sha(data)

    def meanwhile():
        other.upload(write_file("g0", data))
        other.remove(h0)
    host.hook = meanwhile
    assert cm.upload_many([write_file("f0", data), write_file("f1", b"x"), write_file("f2", b"y")])[0] == h0
    return root, cm, h0, data


def _known_file_removed_while_sent_again(make_pool, write_file, tmp_path):
    """A known file whose copy is condemned (missing), sent again by a batch
    while another process removes it: ``(root, cm, hash, bytes)``."""
    root, host, cm, other = setup(tmp_path, make_pool)
    data = b"known file"
    h0 = cm.upload(write_file("f0", data))
    (root / h0).unlink()
    cm.verify()                                  # -> missing, pinned, queued
    assert cm.db.files.verified(h0) == 0
    host.hook = lambda: other.remove(h0)
    assert cm.upload_many([write_file("f0b", data), write_file("f1", b"a"), write_file("f2", b"b")])[0] == h0
    return root, cm, h0, data


def test_a_new_file_removed_elsewhere_while_sent_still_comes_back(make_pool, write_file, tmp_path):
    root, cm, h0, data = _new_file_removed_while_sent(make_pool, write_file, tmp_path)
    assert cm.evict(0) >= 1
    out = tmp_path / "out"
    got = cm.download(h0, str(out))   # upload_many returned h0: must come back
    assert got and out.read_bytes() == data, "file returned by upload_many is lost"


def test_a_known_file_sent_again_and_removed_meanwhile_still_comes_back(make_pool, write_file, tmp_path):
    """A known file whose copy on the host is condemned (missing): the batch
    sends it there again; another process removes the file meanwhile (it
    deletes the object under the recorded URL, ours). The file returned must
    still come back after an eviction."""
    root, cm, h0, data = _known_file_removed_while_sent_again(make_pool, write_file, tmp_path)
    assert not (root / h0).exists()
    assert cm.evict(0) >= 1
    out = tmp_path / "out"
    got = cm.download(h0, str(out))
    assert got and out.read_bytes() == data, "file returned by upload_many is lost"


def test_a_settled_file_removed_meanwhile_is_queued_when_added_again(
        make_pool, write_file, tmp_path):
    """Known and at target when the batch starts (settled, not sent); removed
    by another process while the batch's other files are sent: the publish
    adds it again, pinned, with no copy, so it must be queued."""
    root, host, cm, other = setup(tmp_path, make_pool)
    data = b"settled file"
    h0 = cm.upload(write_file("f0", data))
    assert cm.db.files.verified(h0) == 1
    host.hook = lambda: other.remove(h0)
    assert cm.upload_many([write_file("f0b", data), write_file("f1", b"a"), write_file("f2", b"b")])[0] == h0
    assert cm.exists(h0)
    assert cm.db.files.verified(h0) == 0
    assert h0 in cm.db.queue.hashes(), "in the pool, no copy, pinned, not queued"


def test_a_short_file_removed_meanwhile_counts_no_stale_holder(make_pool, write_file, tmp_path):
    """Redundancy 2: a known file with a copy on A only is sent to B; another
    process removes it meanwhile (A's copy deleted). The publish must not
    count A as a holder: the file is short and queued."""
    a = tmp_path / "hosts" / "a"
    b = tmp_path / "hosts" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    ha = FolderHost(str(a), name="a", fsync=False)
    hb = HookHost(str(b), name="b", fsync=False)
    cm = make_pool(hosts=[ha, hb], redundancy=2)
    other = make_pool(hosts=[FolderHost(str(a), name="a", fsync=False),
                  FolderHost(str(b), name="b", fsync=False)], redundancy=2)
    data = b"short file"
    # one copy only: b is unusable at first
    os.rename(b, str(b) + ".off")
    h0 = cm.upload(write_file("f0", data))
    os.rename(str(b) + ".off", b)
    assert cm.db.files.verified(h0) == 1
    hb.hook = lambda: other.remove(h0)
    cm.retry_hosts(["b"])
    assert cm.upload_many([write_file("f0b", data), write_file("f1", b"a"), write_file("f2", b"b")])[0] == h0
    assert hb.hook is None and (b / h0).exists() and not (a / h0).exists()
    assert h0 in cm.db.queue.hashes(), "1 of 2 copies and not queued"


# -- the same scenarios, judged by the invariant alone ------------------------------

def _fresh(make_pool, write_file, tmp_path):
    root, cm, h0, _ = _new_file_removed_while_sent(make_pool, write_file, tmp_path)
    return consistent(cm, h0, {"nas": str(root)})


def _condemned(make_pool, write_file, tmp_path):
    root, cm, h0, _ = _known_file_removed_while_sent_again(make_pool, write_file, tmp_path)
    return consistent(cm, h0, {"nas": str(root)})


def _settled(make_pool, write_file, tmp_path):
    root, host, cm, other = setup(tmp_path, make_pool)
    data = b"settled file"
    h0 = cm.upload(write_file("f0", data))
    host.hook = lambda: other.remove(h0)
    assert cm.upload_many([write_file("f0b", data), write_file("f1", b"a"), write_file("f2", b"b")])[0] == h0
    assert host.hook is None
    return consistent(cm, h0, {"nas": str(root)})


@pytest.mark.parametrize("scenario", [_fresh, _condemned, _settled])
def test_every_copy_believed_good_exists_and_a_short_file_is_queued(scenario, make_pool,
                                                                   write_file, tmp_path):
    assert scenario(make_pool, write_file, tmp_path) in ("ok", "not in pool (removal won)")


def test_an_interrupt_after_recording_leaves_no_lease_held(make_pool, write_file, tmp_path,
                                                           monkeypatch):
    """record() releases the leases inside the publish's transaction; an
    interrupt after it rolls that back with the rest, so they are released
    when the sending ends, not left to run out."""
    from cloudmanager.db.cache_index import CacheIndex
    a = tmp_path / "hosts" / "a"
    a.mkdir(parents=True)
    cm = make_pool(hosts=[FolderHost(str(a), name="a", fsync=False),
                          "dir:%s" % (tmp_path / "hosts" / "missing")],
                   redundancy=2, make_roots=False)
    h0 = cm.upload(write_file("f0", b"short one"))       # 1 of 2: known, short
    assert cm.db.files.verified(h0) == 1
    real_put = CacheIndex.put

    def put(self, conn, entries, when, new=False, cached_before=None):
        if new:
            raise KeyboardInterrupt
        return real_put(self, conn, entries, when, new, cached_before)
    monkeypatch.setattr(CacheIndex, "put", put)
    with pytest.raises(KeyboardInterrupt):
        cm.upload_many([write_file("f0b", b"short one"), write_file("f1", b"new one")])
    monkeypatch.setattr(CacheIndex, "put", real_put)
    rows = cm.db.connection.execute("SELECT hash, kind, owner FROM leases").fetchall()
    assert not rows, "leases left held after the interrupted publish"


def test_duplicates_known_and_conflict_in_one_batch(make_pool, write_file, tmp_path):
    root = tmp_path / "hosts" / "nas"
    root.mkdir(parents=True)
    cm = make_pool(hosts=[FolderHost(str(root), name="nas", fsync=False)], redundancy=1)
    hk = cm.upload(write_file("k", b"known complete"))
    hc = cm.upload(write_file("c", b"conflicting"))
    cm.evict(0)                                  # known, not cached
    cm.db.connection.execute("UPDATE files SET size = 999 WHERE hash = ?", (hc,))
    out = cm.upload_many([write_file("a", b"dup"), write_file("a2", b"dup"), write_file("k2", b"known complete"),
                          write_file("c2", b"conflicting"), write_file("n", b"new")])
    assert out[0] == out[1] == sha(b"dup") and out[2] == hk and out[4] == sha(b"new")
    assert out[3] == hc and cm.db.files.get(hc).size == len(b"conflicting")  # corrected
    for h in (out[0], hk, hc, out[4]):
        assert cm.db.files.verified(h) == 1 and cm.db.cache_index.entry(h).protected
    assert cm.db.queue.hashes() == []
    assert cm.db.connection.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
    assert cm.evict(0) == 4
    assert os.listdir(cm.cache.tmp_dir) == []


def test_interrupt_during_sending_releases_leases(make_pool, write_file, tmp_path, monkeypatch):
    a = tmp_path / "hosts" / "a"
    a.mkdir(parents=True)

    class Boom(FolderHost):
        boom = False

        def upload_batch(self, items):
            if self.boom:
                raise KeyboardInterrupt
            return super().upload_batch(items)

        def upload(self, p, n):
            if self.boom:
                raise KeyboardInterrupt
            return super().upload(p, n)
    host = Boom(str(a), name="a", fsync=False)
    cm = make_pool(hosts=[host, "dir:%s" % (tmp_path / "hosts" / "missing")], redundancy=2,
                   make_roots=False)
    h0 = cm.upload(write_file("f0", b"short one"))
    from cloudmanager.replication import Replicator
    real = Replicator._send

    def send(self, jobs):
        real(self, jobs)
        raise KeyboardInterrupt  # Ctrl-C in the main thread, the uploads made
    monkeypatch.setattr(Replicator, "_send", send)
    with pytest.raises(KeyboardInterrupt):
        cm.upload_many([write_file("f0b", b"short one"), write_file("f1", b"new one")])
    assert cm.db.connection.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
    assert os.listdir(cm.cache.tmp_dir) == [] and cm.db.sessions.reserved_bytes() == 0
    assert not cm.exists(sha(b"new one")) and h0 in cm.db.queue.hashes()


def test_a_settled_file_removed_meanwhile_leaves_check_clean(make_pool, write_file, tmp_path):
    root, host, cm, other = setup(tmp_path, make_pool)
    h0 = cm.upload(write_file("f0", b"settled file"))
    host.hook = lambda: other.remove(h0)
    cm.upload_many([write_file("f0b", b"settled file"), write_file("f1", b"a"), write_file("f2", b"b")])
    assert cm.check()["unprotected"] == [], cm.check()["unprotected"]


@pytest.mark.parametrize("stale", [False, True], ids=["tombstone-now", "tombstone-old"])
def test_a_removal_begun_as_the_sending_starts_is_not_missed(make_pool, write_file,
                                                             tmp_path, stale, monkeypatch):
    """Another process's removal commits its first transaction (begin, tombstones,
    forget) just before the sending reads the files' states (the file looks
    new), and deletes the host's object after our upload, ending before our
    publish. Its tombstones may carry
    an old time (a remover that waited on its lock): the file must still not be
    believed held."""
    root, host, cm, other = setup(tmp_path, make_pool)
    data = b"X bytes"
    h = sha(data)
    assert other.upload(write_file("g", data)) == h
    replication = cm.pool.replication
    real_states = replication.db.copies.replication_states
    when = 1000.0 if stale else time.time()

    def removal_begins_then_states(hashes):
        db = other.db
        with db.catalog.transaction() as conn:
            db.copies.begin_removal(conn, h, "node:p3", when)
            db.copies.record_deleted(conn, [(h, "nas", u["url"])
                                            for u in other.status(h)["uploads"]], when)
            db.files.forget(conn, h)
            db.cache_index.forget(conn, [h])
        return real_states(hashes)
    monkeypatch.setattr(replication.db.copies, "replication_states", removal_begins_then_states)

    def removal_deletes_and_ends():
        os.remove(root / h)
        with other.db.catalog.transaction() as conn:
            other.db.copies.end_removals(conn, [h])
    host.hook = removal_deletes_and_ends
    cm.upload_many([write_file("f", data), write_file("f1", b"other 1")])
    assert consistent(cm, h, {"nas": str(root)}) in ("ok", "not in pool (removal won)")


def test_a_known_file_sent_nowhere_stays_queued(make_pool, write_file):
    """A file the pool knows with no good copy (learned from another node's
    records) that the batch sends nowhere (no host is configured yet) stays
    queued, pending here."""
    cm = make_pool(hosts=[], redundancy=1)
    data = b"known from a record"
    h = sha(data)
    cm.data_load(json.dumps([{"version": "0.2", "datetime": "1700000000", "filename": "k",
                              "filesize": str(len(data)), "filehash": h, "uploads": []}]))
    assert cm.exists(h) and h not in cm.db.queue.hashes()
    assert cm.upload_many([write_file("k", data)]) == [h]
    assert h in cm.db.queue.hashes()
    assert cm.evict(0) == 0  # pinned: no host holds it
