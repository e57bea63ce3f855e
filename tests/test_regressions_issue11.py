"""Issue 11's reproductions, one per numbered point, on the public API alone.

Each failed on the code before that issue (570c729: checked by running this
module against it, with the editable install's finder removed) and passes
now. They complement the unit tests in test_replication.py, test_health.py
and the hosts' suites, which the old code cannot import.
"""
import builtins
import hashlib
import io
import json
import os
import time

import pytest

from cloudmanager import CloudManager
from cloudmanager.hosts.folder import FolderHost


@pytest.fixture
def pool(tmp_path):
    """``pool(hosts, name="node", capacity=1 MiB, **kw)``: a CloudManager on real
    files, folder roots made (as `cm init` makes them); closed at teardown."""
    made = []

    def make(hosts, name="node", capacity=1 << 20, make_roots=True, **kw):
        for h in hosts:
            if make_roots and isinstance(h, str) and h.startswith("dir:"):
                os.makedirs(h[4:], exist_ok=True)
        kw.setdefault("fsync", False)
        cm = CloudManager(str(tmp_path / name / "db.sqlite3"), str(tmp_path / name / "cache"),
                          capacity, hosts=hosts, **kw)
        made.append(cm)
        return cm

    yield make
    for cm in made:
        cm.close()


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()

    def write(name, data):
        p = d / name
        p.write_bytes(data)
        return p

    return write


def sha(data):
    return hashlib.sha256(data).hexdigest()


def spec(tmp_path, name):
    return "dir:%s" % (tmp_path / "hosts" / name)


# -- 1. S3: a same-size corruption is repaired -------------------------------------
from hosts.s3_server import aws_env, bucket, moto_endpoint, s3_admin  # noqa: E402,F401


def test_p01_s3_same_size_corruption_is_repaired(moto_endpoint, bucket, s3_admin, pool, src):
    from cloudmanager.hosts.s3 import S3Host

    host = S3Host(bucket, "pool", endpoint_url=moto_endpoint, region="us-east-1",
                  addressing_style="path")
    cm = pool([host], redundancy=1)
    data = b"the right bytes " * 100
    digest = cm.upload(src("f", data))
    key = "pool/" + digest
    s3_admin.put_object(Bucket=bucket, Key=key, Body=b"X" * len(data))  # same size
    assert cm.verify(deep=True)["bad"] == 1
    cm.sync()
    assert s3_admin.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert cm.verify(deep=True)["good"] == 1


# -- 2. a condemned copy is re-examined and believed when right ----------------------

def test_p02_condemned_copy_put_back_is_believed_again(pool, src, tmp_path):
    cm = pool([spec(tmp_path, "nas")], redundancy=1)
    data = b"condemned by mistake"
    digest = cm.upload(src("f", data))
    cm.evict(0)
    obj = tmp_path / "hosts" / "nas" / digest
    obj.rename(tmp_path / "aside")
    assert cm.warm_up(digest) is False  # marks the copy bad/missing
    (tmp_path / "aside").rename(obj)  # the right bytes are back on the host
    assert cm.verify(hashes=[digest])["good"] == 1
    path = cm.warm_up(digest)
    assert path and open(path, "rb").read() == data
    assert cm.check()["lost"] == []


# -- 3. a folder host never creates its root; an empty mount point is an outage ------

def test_p03a_missing_root_is_not_created_and_file_stays_pinned(pool, src, tmp_path):
    gone = tmp_path / "hosts" / "gone"
    cm = pool(["dir:%s" % gone], redundancy=1, make_roots=False)
    digest = cm.upload(src("f", b"nowhere to go yet"))
    assert digest
    assert not gone.exists()
    assert cm.evict(0) == 0 and cm.on_cache(digest)


def test_p03b_empty_mount_point_does_not_condemn_copies(pool, src, tmp_path):
    nas, usb = tmp_path / "hosts" / "nas", tmp_path / "hosts" / "usb"
    hosts = ["dir:%s" % nas, "dir:%s" % usb]
    cm = pool(hosts, redundancy=2)
    digests = [cm.upload(src("f%d" % i, b"file %d" % i)) for i in range(3)]
    cm.close()
    nas.rename(tmp_path / "nas-disk")  # unmounted: an empty mount point is left
    nas.mkdir()
    cm = pool(hosts, redundancy=2)
    assert cm.verify()["missing"] == 0
    nas.rmdir()
    (tmp_path / "nas-disk").rename(nas)  # remounted
    cm.verify(hashes=digests)
    assert all(cm.status(d)["verified"] == 2 for d in digests)


# -- 4. a #DEL line is never a copy ---------------------------------------------------

def test_p04_delete_link_is_never_recorded_as_a_copy(pool, src, fake_plowshare):
    fake_plowshare.faults("locker", plowup_links="del")  # plowup prints only "#DEL <url>"
    cm = pool(["plowshare:locker"], redundancy=1)
    digest = cm.upload(src("f", b"on a locker"))
    status = cm.status(digest)
    assert status["copies"] == 0
    assert all("/del/" not in (u["url"] or "") for u in status["uploads"] if not u["error"])
    assert cm.evict(0) == 0 and cm.on_cache(digest)  # still pinned


# -- 5. imported claims do not let an upload skip every host --------------------------

def test_p05_claims_do_not_let_a_large_upload_skip_every_host(pool, src, tmp_path):
    shared = spec(tmp_path, "shared")
    a = pool([shared], name="a", redundancy=1)
    b = pool([shared], name="b", capacity=1000, redundancy=1)
    data = os.urandom(5000)  # larger than b's cache
    digest = a.upload(src("big", data))
    b.data_load(a.data_dump())
    (tmp_path / "hosts" / "shared" / digest).unlink()  # the claim is false
    assert b.upload(src("big2", data)) == digest
    assert (tmp_path / "hosts" / "shared" / digest).read_bytes() == data


# -- 7. remove() never deletes a copy made after it began ------------------------------

def test_p07_reupload_racing_remove_is_not_lost(pool, src, tmp_path):
    h = spec(tmp_path, "h1")
    cm = pool([h], redundancy=1)
    other = pool([h], redundancy=1)  # same database and cache: another process
    data = b"uploaded twice, removed once"
    source = src("raced", data)
    digest = cm.upload(source)
    real_delete = cm.engine.delete

    def delete_after_a_concurrent_upload(location):
        assert other.upload(source) == digest  # returned: a promise
        other.evict(0)
        return real_delete(location)

    cm.engine.delete = delete_after_a_concurrent_upload
    try:
        cm.remove(digest)
    finally:
        cm.engine.delete = real_delete
    other.sync()
    other.evict(0)
    path = other.warm_up(digest)
    assert path and open(path, "rb").read() == data


# -- 8. a file larger than the cache is read once ------------------------------------

def test_p08_source_rewritten_between_reads_is_not_stored_under_the_wrong_hash(
        pool, src, tmp_path, monkeypatch):
    nas = tmp_path / "hosts" / "nas"
    cm = pool(["dir:%s" % nas], capacity=1000, redundancy=1)
    data = b"a" * 5000
    source = src("big", data)
    target = os.path.abspath(source)
    real_open, real_os_open = builtins.open, os.open
    opens = []

    def before_open(path):
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(path) == target:
            opens.append(path)
            if len(opens) == 2:  # the source changes between the first and second read
                with real_open(target, "r+b") as f:
                    f.write(b"Z" * 10)

    def open_(file, *args, **kwargs):
        before_open(file)
        return real_open(file, *args, **kwargs)

    def os_open(path, *args, **kwargs):
        before_open(path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    digest = cm.upload(source)
    monkeypatch.undo()
    if digest:  # whatever was returned must be what the host holds
        assert sha((nas / digest).read_bytes()) == digest
    for name in os.listdir(nas):
        if len(name) == 64:
            assert sha((nas / name).read_bytes()) == name


# -- 10. a full database disk is a typed error ----------------------------------------

def test_p10_full_database_is_a_typed_error(tmp_path):
    try:
        from cloudmanager.db import FileDatabase
    except ImportError:
        from cloudmanager.database import FileDatabase
    from cloudmanager.errors import CloudManagerError

    db = FileDatabase(str(tmp_path / "db.sqlite3"))
    try:
        conn = db.connection
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute("PRAGMA max_page_count = %d" % (pages + 1))
        failures = 0
        for round_ in range(40):
            try:
                with db.transaction() as tx:
                    tx.executemany("INSERT INTO counters (name, value) VALUES (?, 1)",
                                   [("n/%d/%d/%s" % (round_, i, "x" * 200),) for i in range(50)])
            except CloudManagerError as exc:
                failures += 1
                assert "full" in str(exc)
        assert failures > 0
    finally:
        db.close()


# -- 11. a dump holds only records some host holds ------------------------------------

def test_p11_dump_leaves_out_files_no_host_holds(pool, src, tmp_path):
    cm = pool([spec(tmp_path, "nas")], redundancy=1)
    on_host = cm.upload(src("a", b"on a host"))
    cm.upload(src("b", b"only cached, queued"), defer=True)
    assert {r["filehash"] for r in json.loads(cm.data_dump())} == {on_host}


# -- 12. a stale dump does not resurrect deleted copies ---------------------------------

def test_p12_stale_dump_does_not_bring_back_deleted_copies(pool, src, tmp_path):
    hosts = [spec(tmp_path, "a"), spec(tmp_path, "b")]
    cm = pool(hosts, redundancy=2)
    data = b"removed, then added again"
    digest = cm.upload(src("f", data))
    stale = cm.data_dump()
    assert cm.remove(digest)["deleted"]
    cm.close()
    cm = pool(hosts[:1], redundancy=2)  # host b away
    assert cm.upload(src("f2", data)) == digest
    cm.data_load(stale)  # another node's older record: a and b hold it
    cm.close()
    cm = pool(hosts, redundancy=2)
    cm.sync()
    assert (tmp_path / "hosts" / "b" / digest).read_bytes() == data


# -- 13. a batch records its copies though another process removed one file ------------

class RemovingHost(FolderHost):
    victim = None
    remover = None

    def upload_batch(self, items):
        results = super().upload_batch(items)
        if self.remover is not None:
            self.remover.remove(self.victim)
            self.remover = None
        return results


def test_p13_batch_records_copies_when_one_file_was_removed(pool, src, tmp_path):
    root = tmp_path / "hosts" / "nas"
    root.mkdir(parents=True)
    host = RemovingHost(str(root), name="nas", fsync=False)
    cm = pool([host], redundancy=1)
    other = pool([], redundancy=1)  # same database and cache: another process
    # In the pool and queued; sync sends the batch to the host (upload_batch)
    # and records it in one transaction, after the other process removed file 0.
    digests = cm.upload_many([src("f%d" % i, b"file %d" % i) for i in range(20)], defer=True)
    host.victim, host.remover = digests[0], other
    cm.sync()
    assert host.remover is None  # the removal ran mid-batch
    assert not cm.exists(digests[0])
    assert [cm.status(d)["verified"] for d in digests[1:]] == [1] * 19


def test_p13_a_removal_before_a_sent_batch_is_published_comes_first(pool, src, tmp_path):
    """Sent at once, a batch's files enter the pool with their publish: a
    removal that ran while they were on their way to the host found nothing
    to remove, and the file is in the pool after it, with its copy."""
    root = tmp_path / "hosts" / "nas"
    root.mkdir(parents=True)
    host = RemovingHost(str(root), name="nas", fsync=False)
    cm = pool([host], redundancy=1)
    other = pool([], redundancy=1)
    host.victim, host.remover = sha(b"file 0"), other
    digests = cm.upload_many([src("f%d" % i, b"file %d" % i) for i in range(20)])
    assert host.remover is None
    assert [cm.status(d)["verified"] for d in digests] == [1] * 20


# -- circuit breaker --------------------------------------------------------------------

def broken_folder(tmp_path):
    root = tmp_path / "hosts" / "nas"
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("a file where the host folder should be")
    return root


def fix(root):
    root.unlink()
    root.mkdir()


def test_cb1_a_failed_batch_is_one_failure(pool, src, tmp_path):
    root = broken_folder(tmp_path)
    cm = pool(["dir:%s" % root], redundancy=1, make_roots=False)
    cm.upload_many([src("f%d" % i, b"file %d" % i) for i in range(40)])
    health = cm.host_status()["dir:%s" % root]
    assert health["consecutive_failures"] <= 1 and health["state"] == "ok"


def test_cb2_explicit_sync_probes_a_cooling_host(pool, src, tmp_path):
    root = broken_folder(tmp_path)
    cm = pool(["dir:%s" % root], redundancy=1, make_roots=False)
    for i in range(3):
        cm.upload(src("f%d" % i, b"file %d" % i))
    assert cm.host_status()["dir:%s" % root]["state"] == "cooling"
    fix(root)
    assert cm.sync()["uploads"] == 3


def test_cb3_a_clock_stepped_back_does_not_stretch_the_cool_down(pool, src, tmp_path,
                                                                 monkeypatch):
    root = broken_folder(tmp_path)
    cm = pool(["dir:%s" % root], redundancy=1, make_roots=False, host_cooldown=0.5)
    for i in range(3):
        cm.upload(src("f%d" % i, b"file %d" % i))
    assert cm.host_status()["dir:%s" % root]["state"] == "cooling"
    fix(root)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 86400)  # NTP steps back a day
    time.sleep(1.5)  # well past the 0.5 s cool-down
    digest = cm.upload(src("late", b"after the cool-down"))  # not an explicit command
    assert cm.status(digest)["verified"] == 1


def test_cb5_a_host_that_answered_with_a_bad_copy_gets_its_replacement(pool, src, tmp_path,
                                                                        monkeypatch):
    """Found by the copy-beliefs model (tests/property): a host cooling after
    an outage comes back holding a corrupt copy. The verify that probes it
    gets an answer, the bad copy: the host is up, so the sync right after
    must replace that copy there, not skip the host as still cooling."""
    import cloudmanager.replication as replication

    monkeypatch.setattr(replication, "RECHECK_BASE", 0.0)  # suspect copies due at once
    a, b = tmp_path / "hosts" / "a", tmp_path / "hosts" / "b"
    cm = pool(["dir:%s" % a, "dir:%s" % b], redundancy=2)
    data = b"kept on two disks"
    digest = cm.upload(src("f", data))
    assert cm.status(digest)["verified"] == 2
    aside = tmp_path / "unplugged"
    b.rename(aside)  # b's disk is unplugged: an empty mount point stays
    b.mkdir()
    for _ in range(3):
        cm.verify(deep=True)
    assert cm.host_status()["dir:%s" % b]["state"] == "cooling"
    (aside / digest).write_bytes(bytes(x ^ 0xFF for x in data))  # damaged meanwhile
    b.rmdir()
    aside.rename(b)  # plugged back in
    assert cm.verify(deep=True)["bad"] == 1
    assert cm.host_status()["dir:%s" % b]["state"] == "ok"
    assert cm.sync()["uploads"] == 1
    assert (b / digest).read_bytes() == data
    states = {c["host_name"]: c["state"] for c in cm.status(digest)["uploads"] if c["url"]}
    assert states == {"dir:%s" % a: "good", "dir:%s" % b: "good"}


def test_cb4_hostile_sizes_never_count_against_a_host(pool, src, tmp_path):
    h = spec(tmp_path, "nas")
    cm = pool([h], redundancy=1)
    good = cm.upload(src("ok", b"a real file"))
    url = cm.status(good)["uploads"][0]["url"]
    records = []
    for i in range(3):
        fake = sha(b"hostile %d" % i)
        records.append({"version": "0.2", "datetime": "1391212800", "filename": "x%d" % i,
                        "filesize": str(2 ** 63 - 1 - i), "filehash": fake,
                        "uploads": [{"host_name": h, "url": url[: -64] + fake}]})
    cm.data_load(json.dumps(records))
    for r in records:
        cm.warm_up(r["filehash"])
    cm.verify(deep=True)
    cm.sync()
    health = cm.host_status()[h]
    assert health["consecutive_failures"] == 0 and health["state"] == "ok"


# -- load_from: linear work -------------------------------------------------------------

class ShortReads(io.StringIO):
    def read(self, size=-1):
        return super().read(64 * 1024 if size is None or size < 0 else min(size, 64 * 1024))


def test_load_from_decodes_a_large_field_in_linear_work(pool, monkeypatch):
    chars = [0]
    size = 4 << 20

    class Budget(Exception):
        pass

    def charge(n):
        chars[0] += n
        if chars[0] > 20 * size:
            raise Budget("%d characters examined" % chars[0])

    class CountingDecoder(json.JSONDecoder):
        def raw_decode(self, s, idx=0):
            try:
                value, end = super().raw_decode(s, idx)
            except BaseException:
                charge(len(s) - idx)
                raise
            charge(end - idx)
            return value, end

        def decode(self, s, *args, **kwargs):
            charge(len(s))
            return super().decode(s, *args, **kwargs)

    cm = pool([], redundancy=1)
    record = {"version": "0.2", "datetime": "1391212800", "filename": "x" * size,
              "filesize": "1", "filehash": "6e" * 32, "uploads": []}
    text = json.dumps([record])
    monkeypatch.setattr(json, "JSONDecoder", CountingDecoder)
    cm.load_from(ShortReads(text))
    assert chars[0] <= 4 * len(text)
