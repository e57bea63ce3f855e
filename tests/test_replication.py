"""The copy state machine and the beliefs it keeps (cloudmanager/replication.py).

One test per false belief the pool used to hold, each a reproduction that
failed before the copy rules moved into replication.py: real SQLite files,
real folder hosts, real second instances standing in for other processes.
"""

import builtins
import io
import json
import os
import threading
import time

import pytest

import cloudmanager.replication as replication
from cloudmanager import CloudManager
from cloudmanager.hosts.base import Location
from cloudmanager.hosts.folder import FolderHost
from helpers import sha


def states(cm, digest):
    return {(u["host_name"], u["state"]) for u in cm.status(digest)["uploads"]}


def folder_spec(tmp_path, name):
    (tmp_path / "hosts" / name).mkdir(parents=True, exist_ok=True)
    return "dir:%s" % (tmp_path / "hosts" / name)


# -- 2. a condemned copy is looked at again ----------------------------------------


def test_a_missing_copy_put_back_is_believed_again(make_pool, tmp_path, write_file,
                                                   monkeypatch):
    cm = make_pool(hosts=[folder_spec(tmp_path, "nas")], redundancy=1)
    data = b"moved away and back"
    digest = cm.upload(write_file("f", data))
    cm.evict(0)
    obj = tmp_path / "hosts" / "nas" / digest
    obj.rename(tmp_path / "aside")
    assert cm.warm_up(digest) is False
    assert states(cm, digest) == {("dir:%s" % (tmp_path / "hosts" / "nas"), "missing")}
    (tmp_path / "aside").rename(obj)
    # A plain verify waits for the back-off; once it is over, the copy is
    # looked at again, by download, and believed.
    assert cm.verify()["checked"] == 0
    monkeypatch.setattr(replication, "RECHECK_BASE", 0.0)
    with cm.db.transaction() as conn:  # the back-off of the copy already condemned: over
        conn.execute("UPDATE uploads SET next_check = 0")
    summary = cm.verify()
    assert summary["checked"] == 1 and summary["good"] == 1
    assert cm.db.files.verified(digest) == 1
    assert open(cm.warm_up(digest), "rb").read() == data
    assert cm.check()["lost"] == []


def test_a_download_tries_condemned_copies_last_and_believes_them_when_right(
        make_pool, tmp_path, write_file):
    cm = make_pool(hosts=[folder_spec(tmp_path, "nas")], redundancy=1)
    data = b"condemned by mistake"
    digest = cm.upload(write_file("f", data))
    cm.evict(0)
    obj = tmp_path / "hosts" / "nas" / digest
    obj.rename(tmp_path / "aside")
    assert cm.warm_up(digest) is False
    (tmp_path / "aside").rename(obj)
    # No copy is believed good, yet the right bytes are there: served, and
    # believed again (every byte is checked, so trying it is safe).
    assert open(cm.warm_up(digest), "rb").read() == data
    assert {s for _, s in states(cm, digest)} == {"good"}
    assert cm.sync()["short"] == 0


def test_verify_of_named_files_looks_at_condemned_copies_at_once(make_pool, tmp_path,
                                                                 write_file):
    cm = make_pool(hosts=[folder_spec(tmp_path, "nas")], redundancy=1)
    digest = cm.upload(write_file("f", b"x" * 100))
    obj = tmp_path / "hosts" / "nas" / digest
    obj.write_bytes(b"y" * 100)  # same size, wrong bytes
    assert cm.verify(deep=True)["bad"] == 1
    obj.write_bytes(b"x" * 100)
    assert cm.verify(hashes=[digest])["good"] == 1  # no back-off for an explicit ask
    assert cm.db.files.verified(digest) == 1


def test_a_bad_copy_is_not_cleared_by_a_size_alone(make_pool, tmp_path, write_file):
    cm = make_pool(hosts=[folder_spec(tmp_path, "nas")], redundancy=1)
    digest = cm.upload(write_file("f", b"x" * 100))
    (tmp_path / "hosts" / "nas" / digest).write_bytes(b"y" * 100)
    assert cm.verify(deep=True)["bad"] == 1
    # Looked at again (by download, since a folder stores no checksum): still bad.
    assert cm.verify(hashes=[digest])["bad"] == 1
    assert cm.db.files.verified(digest) == 0
    assert cm.sync()["uploads"] == 1  # rewritten from the cached copy
    assert (tmp_path / "hosts" / "nas" / digest).read_bytes() == b"x" * 100


# -- 5. only this node's copies count ------------------------------------------------


def test_claims_of_another_node_do_not_let_an_upload_skip_every_host(tmp_path, write_file):
    shared = folder_spec(tmp_path, "shared")
    a = CloudManager(tmp_path / "a" / "db", tmp_path / "a" / "cache", 1 << 20,
                     hosts=[shared], redundancy=1, fsync=False)
    b = CloudManager(tmp_path / "b" / "db", tmp_path / "b" / "cache", 1000,
                     hosts=[shared], redundancy=1, fsync=False)
    try:
        data = os.urandom(5000)  # larger than b's cache: uploaded from the source
        digest = a.upload(write_file("big", data))
        assert b.data_load(a.data_dump()) == 1
        assert b.db.files.verified(digest) == 0  # a claim, not b's own copy
        (tmp_path / "hosts" / "shared" / digest).unlink()  # the claim is false
        assert b.upload(write_file("big", data)) == digest
        assert b.db.files.verified(digest) == 1  # b sent it, and knows it
        assert (tmp_path / "hosts" / "shared" / digest).read_bytes() == data
    finally:
        a.close()
        b.close()


def test_a_cached_file_with_only_claimed_copies_stays_pinned(tmp_path, write_file):
    shared = folder_spec(tmp_path, "shared")
    a = CloudManager(tmp_path / "a" / "db", tmp_path / "a" / "cache", 1 << 20,
                     hosts=[shared], redundancy=1, fsync=False)
    b = CloudManager(tmp_path / "b" / "db", tmp_path / "b" / "cache", 1 << 20,
                     hosts=[], redundancy=1, fsync=False)
    try:
        digest = a.upload(write_file("f", b"claimed elsewhere"))
        b.data_load(a.data_dump())
        assert b.upload(write_file("f", b"claimed elsewhere")) == digest
        assert b.evict(0) == 0  # b verified no copy: its cached one is the only sure one
        assert b.on_cache(digest)
    finally:
        a.close()
        b.close()


# -- 6. remove deletes only objects named by the hash: SECURITY.md's claim, in
# tests/security/test_imported_records.py::test_claim_remove_cannot_be_aimed_at_another_files_copy


# -- 7. remove never deletes a copy made after it began --------------------------------


def test_an_upload_and_eviction_racing_remove_loses_nothing(make_pool, write_file, tmp_path):
    """Another instance uploads the same bytes while remove() deletes the copies,
    and then evicts: its cached copy must stay (pinned), since the removal may
    have deleted the host copy it made."""
    spec = folder_spec(tmp_path, "h1")
    cm = make_pool(hosts=[spec], redundancy=1)
    # Another instance on the same database and cache, as another process would be.
    other = CloudManager(tmp_path / "node" / "db.sqlite3", tmp_path / "node" / "cache",
                         1 << 20, hosts=[spec], redundancy=1, fsync=False)
    data = b"uploaded twice, removed once"
    source = write_file("raced.txt", data)
    digest = cm.upload(source)
    real_delete = cm.engine.delete

    def delete_after_a_concurrent_upload(location):
        assert other.upload(source) == digest  # lands between forget and delete
        assert other.evict(0) == 0  # not trusted while the removal runs: stays
        return real_delete(location)

    cm.engine.delete = delete_after_a_concurrent_upload
    try:
        assert cm.remove(digest)["deleted"]
    finally:
        cm.engine.delete = real_delete
    assert not (tmp_path / "hosts" / "h1" / digest).exists()  # the removal's delete ran
    assert cm.exists(digest) and other.evict(0) == 0
    assert other.sync()["uploads"] == 1
    assert (tmp_path / "hosts" / "h1" / digest).read_bytes() == data
    other.evict(0)
    assert open(other.warm_up(digest), "rb").read() == data
    other.close()


# -- 8. a file larger than the cache is read once, hashed as it streams ---------------------


def folder_host(tmp_path, name, cls=FolderHost, weight=1.0):
    """A folder host named ``name``; the heaviest of equally healthy hosts is tried first."""
    root = tmp_path / "hosts" / name
    root.mkdir(parents=True, exist_ok=True)
    host = cls(str(root), name=name, fsync=False)
    host.weight = weight
    return host


def leftovers(host):
    """What a folder host's root holds besides its marker: objects, staging files."""
    return sorted(set(os.listdir(host.root)) - {FolderHost.MARKER_NAME})


@pytest.fixture
def opens_of(monkeypatch):
    """``opens_of(path)``: a list that gets one entry per open of ``path`` from now on
    (``open`` and ``os.open``, whoever calls them)."""
    watched = {}
    real_open, real_os_open = builtins.open, os.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) in watched:
            watched[os.path.abspath(file)].append("open")
        return real_open(file, *args, **kwargs)

    def counting_os_open(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(path) in watched:
            watched[os.path.abspath(path)].append("os.open")
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(os, "open", counting_os_open)

    def opens_of(path):
        return watched.setdefault(os.path.abspath(path), [])

    return opens_of


def test_a_file_larger_than_the_cache_is_read_once(make_pool, tmp_path, write_file, opens_of):
    host = folder_host(tmp_path, "nas")
    cm = make_pool(capacity=1000, hosts=[host], redundancy=1)
    data = os.urandom(3 * (1 << 20) + 5)  # larger than the cache: sent from its source
    source = write_file("big", data)
    opens = opens_of(source)
    digest = cm.upload(source)
    assert digest == sha(data)
    assert opens == ["open"]  # no read to hash it first: hashed as it streamed
    assert leftovers(host) == [digest]  # published under its hash; no staging file left
    assert cm.db.files.verified(digest) == 1
    cm.download(digest, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


def test_each_further_host_gets_one_hashed_read(make_pool, tmp_path, write_file, opens_of):
    hosts = [folder_host(tmp_path, name) for name in ("a", "b", "c")]
    cm = make_pool(capacity=1000, hosts=hosts, redundancy=3)
    data = os.urandom(5000)
    source = write_file("big", data)
    opens = opens_of(source)
    digest = cm.upload(source)
    assert digest == sha(data) and cm.db.files.verified(digest) == 3
    assert len(opens) == 3  # one read per host, each hashed; none only to hash
    for host in hosts:
        assert leftovers(host) == [digest]
        assert (tmp_path / "hosts" / host.name / digest).read_bytes() == data


class MidStreamHost(FolderHost):
    """A folder host while it reads whose stream the source changes: ``change(path)``
    runs once half the stream is read."""

    source = ""
    change = staticmethod(lambda path: None)

    def stage(self, stream, size):
        head = stream.read(size // 2)
        self.change(self.source)
        rest = stream.read()
        return super().stage(io.BytesIO(head + rest), size)


def rewrite_both_ends(path):  # same size: a byte already read, and one still to come
    with open(path, "r+b") as f:
        f.write(b"Z")
        f.seek(-1, os.SEEK_END)
        f.write(b"Z")


def grow(path):
    with open(path, "ab") as f:
        f.write(b"more")


def shrink(path):
    os.truncate(path, os.path.getsize(path) - 10)


@pytest.mark.parametrize("change", [rewrite_both_ends, grow, shrink])
def test_a_source_changed_mid_stream_is_refused_and_leaves_nothing(make_pool, tmp_path,
                                                                   write_file, change):
    first = folder_host(tmp_path, "first", MidStreamHost, weight=10.0)  # chosen first
    other = folder_host(tmp_path, "other")
    cm = make_pool(capacity=1000, hosts=[first, other], redundancy=2)
    data = b"a" * 5000  # larger than the cache: sent from its source
    first.source, first.change = str(write_file("big", data)), change
    assert cm.upload(first.source) is False
    assert not cm.exists(sha(data))
    assert cm.db.files.with_prefix("", limit=10) == []
    # No object, no staging file, on any host; not even the marker of a first copy.
    assert os.listdir(first.root) == [] and os.listdir(other.root) == []
    assert cm.sync()["checked"] == 0


class RewritingHost(FolderHost):
    """A folder host that rewrites the source (same size) before it reads its stream."""

    source = ""

    def stage(self, stream, size):
        with open(self.source, "r+b") as f:
            f.write(b"Z" * 10)
        return super().stage(stream, size)


def test_a_source_changed_before_a_further_host_reads_it_gives_that_host_no_copy(
        make_pool, tmp_path, write_file):
    first = folder_host(tmp_path, "first", weight=10.0)
    late = folder_host(tmp_path, "late", RewritingHost)
    cm = make_pool(capacity=1000, hosts=[first, late], redundancy=2)
    data = os.urandom(5000)
    late.source = str(write_file("big", data))
    digest = cm.upload(late.source)
    # The first copy was hashed as it streamed, from a source unchanged meanwhile.
    assert digest == sha(data) and cm.db.files.verified(digest) == 1
    assert leftovers(first) == [digest] and leftovers(late) == []  # aborted, not published
    # Short and queued: sync sends the second copy from the verified first one.
    assert cm.sync()["uploads"] == 1 and cm.db.files.verified(digest) == 2
    assert (tmp_path / "hosts" / "late" / digest).read_bytes() == data
    cm.download(digest, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


def test_a_host_that_fails_to_stage_hands_the_source_to_the_next(make_pool, tmp_path,
                                                                 write_file):
    gone = FolderHost(str(tmp_path / "unmounted"), name="gone", fsync=False)
    gone.weight = 10.0
    other = folder_host(tmp_path, "other")
    cm = make_pool(capacity=1000, hosts=[gone, other], redundancy=1, make_roots=False)
    data = os.urandom(5000)
    digest = cm.upload(write_file("big", data))
    assert digest == sha(data) and leftovers(other) == [digest]
    assert not (tmp_path / "unmounted").exists()  # a folder host never creates its root
    assert cm.db.files.verified(digest) == 1


def test_a_locker_is_never_the_first_host_and_gets_its_copy_from_sync(
        make_pool, tmp_path, write_file, fake_plowshare):
    nas = folder_host(tmp_path, "nas")
    cm = make_pool(capacity=1000, hosts=["plowshare:locker", nas], redundancy=2)
    data = os.urandom(5000)
    digest = cm.upload(write_file("big", data))
    assert digest == sha(data) and leftovers(nas) == [digest]
    assert cm.db.files.verified(digest) == 1 and fake_plowshare.objects("locker") == []
    assert cm.sync()["uploads"] == 1  # from a verified copy, fetched from the folder
    assert cm.db.files.verified(digest) == 2 and len(fake_plowshare.objects("locker")) == 1
    cm.evict(0)
    nas_copy = tmp_path / "hosts" / "nas" / digest
    nas_copy.unlink()  # only the locker's copy is left
    cm.download(digest, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


def test_a_pool_of_lockers_only_still_takes_a_large_file(make_pool, tmp_path, write_file,
                                                          fake_plowshare):
    cm = make_pool(capacity=1000, hosts=["plowshare:locker"], redundancy=1)
    data = os.urandom(5000)
    digest = cm.upload(write_file("big", data))  # hashed, then sent: nothing can stage
    assert digest == sha(data) and cm.db.files.verified(digest) == 1
    cm.download(digest, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


# -- 11. a dump holds only records some host holds ----------------------------------


def test_a_dump_leaves_out_files_no_host_holds(make_pool, tmp_path, write_file):
    cm = make_pool(hosts=[folder_spec(tmp_path, "nas")], redundancy=1)
    on_host = cm.upload(write_file("a", b"on a host"))
    queued = cm.upload(write_file("b", b"only cached, queued"), defer=True)
    dumped = {r["filehash"] for r in json.loads(cm.data_dump())}
    assert dumped == {on_host}
    assert cm.info(queued)["uploads"] == []  # info still shows it


# -- 12. a stale dump does not resurrect deleted copies ---------------------------------


def test_a_stale_dump_does_not_bring_back_copies_this_node_deleted(make_pool, tmp_path,
                                                                   write_file):
    hosts = [folder_spec(tmp_path, n) for n in ("a", "b")]
    cm = make_pool(hosts=hosts, redundancy=2)
    data = b"removed, then added again"
    digest = cm.upload(write_file("f", data))
    stale = cm.data_dump()
    assert cm.remove(digest)["deleted"]
    cm.close()
    # Added again while host b is away: one copy, on a.
    cm = make_pool(hosts=hosts[:1], redundancy=2)
    assert cm.upload(write_file("f", data)) == digest
    cm.data_load(stale)  # another node's older record: a and b hold it
    assert cm.db.files.copies(digest) == 1  # b's deleted copy is not believed
    cm.close()
    cm = make_pool(hosts=hosts, redundancy=2)
    assert cm.sync()["uploads"] == 1  # b gets its copy back
    assert (tmp_path / "hosts" / "b" / digest).read_bytes() == data
    assert cm.db.files.verified(digest) == 2


# -- 13. a batch whose file another process removed still records the rest -----------------


class RemovingHost(FolderHost):
    """A folder host whose upload of one file coincides with its removal elsewhere."""

    victim = None
    remover = None

    def upload_batch(self, items):
        results = super().upload_batch(items)
        if self.remover is not None:
            self.remover.remove(self.victim)
            self.remover = None
        return results


def test_a_batch_records_its_copies_when_another_process_removed_one_file(tmp_path,
                                                                          write_file):
    (tmp_path / "hosts" / "nas").mkdir(parents=True)
    host = RemovingHost(str(tmp_path / "hosts" / "nas"), name="nas", fsync=False)
    cm = CloudManager(tmp_path / "node" / "db", tmp_path / "node" / "cache", 1 << 20,
                      hosts=[host], redundancy=1, fsync=False, defer_uploads=True)
    other = CloudManager(tmp_path / "node" / "db", tmp_path / "node" / "cache", 1 << 20,
                         hosts=[], redundancy=1, fsync=False)
    try:
        files = [write_file("f%d" % i, b"file %d" % i) for i in range(20)]
        digests = cm.upload_many(files)
        host.victim, host.remover = digests[0], other
        cm.sync()
        assert not cm.exists(digests[0])
        assert all(cm.db.files.verified(d) == 1 for d in digests[1:])
    finally:
        cm.close()
        other.close()


# -- the engine's facts: which host, which URL, how long, which error ------------------


def test_upload_of_one_small_file_to_three_hosts_takes_three_write_transactions(
        make_pool, tmp_path, write_file):
    cm = make_pool(hosts=[folder_spec(tmp_path, n) for n in ("a", "b", "c")], redundancy=3)
    cm.upload(write_file("warm", b"first upload opens everything"))
    statements = []
    for conn in cm.db.local._all_connections:
        conn.set_trace_callback(statements.append)
    cm.db.connection.set_trace_callback(statements.append)
    digest = cm.upload(write_file("f", b"one small file"))
    begins = [s for s in statements if s.strip().upper().startswith("BEGIN")]
    assert cm.db.files.verified(digest) == 3
    assert len(begins) <= 3, begins


def test_a_removal_of_a_file_on_a_host_that_cannot_delete_keeps_it(make_pool, fake_plowshare,
                                                                   write_file):
    cm = make_pool(hosts=["plowshare:locker"], redundancy=1)
    digest = cm.upload(write_file("f", b"on a locker"))
    result = cm.remove(digest)
    assert result["deleted"] == [] and len(result["kept"]) == 1
    assert not cm.exists(digest)


def test_remove_is_refused_by_no_host_when_the_url_is_unreachable(make_pool, tmp_path,
                                                                  write_file):
    cm = make_pool(hosts=[folder_spec(tmp_path, "nas")], redundancy=1)
    digest = cm.upload(write_file("f", b"x"))
    record = cm.info(digest)
    record["uploads"].append({"host_name": "elsewhere", "url": "s3://other/" + digest})
    cm.data_load(json.dumps([record]))
    result = cm.remove(digest)
    assert ("elsewhere", "s3://other/" + digest) in result["kept"]
    assert not cm.exists(digest)


def test_engine_names_only_the_hashs_own_object(make_pool, tmp_path, write_file):
    spec = folder_spec(tmp_path, "nas")
    cm = make_pool(hosts=[spec], redundancy=1)
    digest = cm.upload(write_file("f", b"mine"))
    url = cm.status(digest)["uploads"][0]["url"]
    assert cm.engine.names(Location(spec, url), digest)
    assert not cm.engine.names(Location(spec, url), "0" * 64)
    assert not cm.engine.names(Location("nowhere", "ftp://x/" + digest), digest)


# -- 3. a folder host never makes its root; an empty mount point is an outage -------------


def test_an_unmounted_disk_is_an_outage_and_nothing_lands_on_the_mount_point(
        make_pool, tmp_path, write_file):
    nas, usb = tmp_path / "hosts" / "nas", tmp_path / "hosts" / "usb"
    cm = make_pool(hosts=["dir:%s" % nas, "dir:%s" % usb], redundancy=2)
    digests = [cm.upload(write_file("f%d" % i, b"file %d" % i)) for i in range(3)]
    assert (nas / ".cloudmanager-host").is_file()
    cm.close()
    nas.rename(tmp_path / "nas-disk")  # unmounted: the mount point is an empty folder
    nas.mkdir()
    cm = make_pool(hosts=["dir:%s" % nas, "dir:%s" % usb], redundancy=2)
    summary = cm.verify()
    assert summary["missing"] == 0 and summary["error"] == 3 and summary["good"] == 3
    late = cm.upload(write_file("late", b"uploaded while the disk is away"))
    assert list(nas.iterdir()) == []  # nothing written onto the system disk
    assert cm.db.files.verified(late) == 1 and late in cm.db.queue.hashes()  # usb only
    nas.rmdir()
    (tmp_path / "nas-disk").rename(nas)  # remounted
    summary = cm.verify(hashes=digests)
    assert summary["good"] == 6 and summary["missing"] == 0
    cm.sync()
    assert (nas / late).read_bytes() == b"uploaded while the disk is away"
    assert all(cm.db.files.verified(d) == 2 for d in digests + [late])


def test_a_missing_folder_takes_no_copy_and_the_file_stays_pinned(make_pool, tmp_path,
                                                                  write_file):
    gone = tmp_path / "hosts" / "gone"
    cm = make_pool(hosts=["dir:%s" % gone], redundancy=1, make_roots=False)
    digest = cm.upload(write_file("f", b"nowhere to go yet"))
    assert digest and not gone.exists()
    assert cm.evict(0) == 0 and cm.on_cache(digest)  # pinned: no host holds it
    assert cm.stats()["queued"] == 1


def test_a_folder_from_before_markers_is_marked_once_its_copies_are_seen(make_pool, tmp_path,
                                                                         write_file):
    nas = tmp_path / "hosts" / "nas"
    cm = make_pool(hosts=["dir:%s" % nas], redundancy=1)
    digest = cm.upload(write_file("f", b"old pool"))
    cm.close()
    (nas / ".cloudmanager-host").unlink()  # as a folder used before markers existed
    cm = make_pool(hosts=["dir:%s" % nas], redundancy=1)
    assert (nas / ".cloudmanager-host").is_file()
    assert cm.engine.hosts["dir:%s" % nas].require_marker
    assert cm.verify()["good"] == 1 and cm.db.files.verified(digest) == 1


def test_one_file_with_no_good_copy_left_does_not_hold_back_sync(make_pool, tmp_path,
                                                                 write_file):
    """Found by the copy-beliefs state machine: a file that could not be fetched
    stopped sync() before the other files of its chunk were topped up."""
    hosts = [folder_spec(tmp_path, n) for n in ("a", "b", "c")]
    cm = make_pool(hosts=hosts[:2], redundancy=2)
    lost = cm.upload(write_file("lost", b"every copy of this is gone"))
    kept = cm.upload(write_file("kept", b"this one has a good copy"))
    cm.evict(0)
    for name in ("a", "b"):
        (tmp_path / "hosts" / name / lost).unlink()
    (tmp_path / "hosts" / "b" / kept).unlink()
    cm.close()
    cm = make_pool(hosts=hosts, redundancy=2)
    cm.verify()
    cm.pool.replication.replicate([lost, kept])  # the one that cannot be had first
    assert cm.db.files.verified(kept) == 2  # topped up from a, whatever happened to lost
    assert cm.db.files.verified(lost) == 0


# -- removals racing other processes (found in review) ------------------------------------


def two_instances(tmp_path, capacity):
    """Two instances on one database and cache, as two processes of one pool
    (each has its own in-process locks, as processes do)."""
    hosts = [folder_spec(tmp_path, "h1"), folder_spec(tmp_path, "h2")]
    args = (tmp_path / "node" / "db.sqlite3", tmp_path / "node" / "cache", capacity)
    return (CloudManager(*args, hosts=hosts, redundancy=2, fsync=False),
            CloudManager(*args, hosts=hosts, redundancy=2, fsync=False))


def slow_down(cm, method, seconds):
    for host in cm.engine.hosts.values():
        real = getattr(host, method)

        def slow(*args, real=real, **kwargs):
            result = real(*args, **kwargs)
            time.sleep(seconds)
            return result

        setattr(host, method, slow)


def test_a_large_upload_during_a_removal_elsewhere_is_refused_not_lost(tmp_path, write_file):
    remover, uploader = two_instances(tmp_path, capacity=1000)
    try:
        data = os.urandom(5000)  # larger than the cache: sent from its source
        digest = remover.upload(write_file("big", data))
        slow_down(remover, "delete", 0.5)
        removal = threading.Thread(target=remover.remove, args=(digest,))
        removal.start()
        time.sleep(0.2)
        result = uploader.upload(write_file("big", data))
        removal.join()
        if result:  # it landed before the removal began, or after it ended
            assert result == digest and uploader.sync()["short"] == 0
            assert uploader.download(digest, tmp_path / "out") and \
                (tmp_path / "out").read_bytes() == data
        else:  # refused: the hash was not returned, so nothing was promised
            assert not uploader.exists(digest)
    finally:
        remover.close()
        uploader.close()


def test_a_warm_up_elsewhere_does_not_bring_a_removed_file_back(tmp_path, write_file):
    remover, reader = two_instances(tmp_path, capacity=100_000)
    try:
        digest = remover.upload(write_file("f", os.urandom(5000)))
        remover.evict(0)
        slow_down(reader, "download", 0.5)
        warm = threading.Thread(target=reader.warm_up, args=(digest,))
        warm.start()
        time.sleep(0.2)
        assert remover.remove(digest)["deleted"]
        warm.join()
        assert not remover.exists(digest) and not reader.on_cache(digest)
        assert remover.sync()["checked"] == 0  # nothing to send back to the hosts
    finally:
        remover.close()
        reader.close()


# -- leases: processes and nodes split the work ---------------------------------------


def test_sync_leaves_files_another_process_is_replicating_to_it(make_pool, tmp_path,
                                                                 write_file):
    """Two instances on one pool (as two processes would be): while one holds
    a file's lease, the other's sync leaves the file alone; once released,
    or once the lease has run out (its holder was killed), sync takes it."""
    hosts = [folder_spec(tmp_path, n) for n in ("a", "b")]
    one = make_pool(hosts=hosts, redundancy=2, defer_uploads=True)
    other = CloudManager(one.settings()["database"], one.settings()["storage"], 1 << 20,
                         hosts=hosts, redundancy=2, fsync=False)
    try:
        first = one.upload(write_file("one", b"leased by one"))
        second = one.upload(write_file("two", b"nobody's"))
        replicator = one.pool.replication
        with replicator._leases("replicate", [first]) as held:
            assert held == [first]
            assert other.sync()["uploads"] == 2  # the second file's two copies only
            assert one.info(first)["uploads"] == [] and len(one.info(second)["uploads"]) == 2
        # Released at the end of the block: now anyone may.
        assert other.sync()["uploads"] == 2
        assert len(one.info(first)["uploads"]) == 2
        # A lease whose holder died runs out; until then the work waits for it.
        third = one.upload(write_file("three", b"its holder was killed"))
        db = one.pool.db
        with db.catalog.transaction() as conn:
            db.leases.take(conn, "replicate", [third], "gone:1:dead", time.time() + 60,
                           time.time())
        assert other.sync()["uploads"] == 0
        with db.catalog.transaction() as conn:
            db.leases.take(conn, "replicate", [third], "gone:1:dead", time.time() - 1,
                           time.time())
        assert other.sync()["uploads"] == 2
        # Verify leases likewise: copies of a leased file are left to its holder.
        with replicator._leases("verify", [first]) as held:
            checked = other.verify(deep=True)
        assert checked["checked"] == 4  # second's and third's copies, not first's
        assert db.leases.held("verify", time.time()) == []
    finally:
        other.close()


def test_a_deferred_upload_is_leased_only_while_its_process_runs(make_pool, tmp_path,
                                                                 write_file):
    """An upload that replicates at once holds its file's lease from the
    publish on; a deferred one takes none, so another process's sync sends it."""
    hosts = [folder_spec(tmp_path, n) for n in ("a",)]
    one = make_pool(hosts=hosts, redundancy=1)
    digest = one.upload(write_file("f", b"sent at once"), defer=True)
    db = one.pool.db
    assert db.leases.held("replicate", time.time()) == []
    assert one.upload(write_file("g", b"sent at once, leased meanwhile"))
    assert db.leases.held("replicate", time.time()) == []  # released as it recorded
    assert one.sync()["uploads"] == 1 and one.info(digest)["uploads"]


def test_the_leases_of_a_killed_process_end_when_its_node_next_opens(make_pool, tmp_path,
                                                                     write_file):
    hosts = [folder_spec(tmp_path, "a")]
    one = make_pool(hosts=hosts, redundancy=1, defer_uploads=True)
    digest = one.upload(write_file("f", b"its uploader was killed"))
    db, node = one.pool.db, one.stats()["node"]
    with db.catalog.transaction() as conn:  # as a killed `cm upload` of this node left it
        db.leases.take(conn, "replicate", [digest], "%s:999999:dead" % node,
                       time.time() + 600, time.time())
        db.leases.take(conn, "verify", [digest], "elsewhere-1234:1:live", time.time() + 600,
                       time.time())
    assert one.sync()["uploads"] == 0  # leased to a process this one cannot judge yet
    other = CloudManager(one.settings()["database"], one.settings()["storage"], 1 << 20,
                         hosts=hosts, redundancy=1, fsync=False)
    try:  # opening the node again ends its dead processes' leases, not other nodes'
        assert [o for _, o, _ in db.leases.held("replicate", time.time())] == []
        assert [o for _, o, _ in db.leases.held("verify", time.time())] == \
            ["elsewhere-1234:1:live"]
        assert other.sync()["uploads"] == 1
    finally:
        other.close()
