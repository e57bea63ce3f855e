"""Checks by listing: verify finds copies in a host's listing, and looks at
each copy alone (a HEAD, a download) only where the listing cannot clear it.

Every test runs real pools on real hosts: folders, the moto S3 server and
the WsgiDAV server the fixtures start, and in-memory stores (whose listing
carries a SHA-256). The same damage is done to two identical pools, one
verified by listings and one by a look at each copy, and the copy states
they end with must be the same.
"""

import hashlib
import tempfile
import threading
import time
import uuid

import pytest

from cloudmanager.engine import CheckItem
from cloudmanager.errors import InvalidInputError
from cloudmanager.hosts.base import STAGING_PREFIX, ListedObject, Location
from cloudmanager.hosts.folder import FolderHost
from cloudmanager.hosts.fsspec import FsspecHost
from cloudmanager.hosts.memory import MemoryHost
from cloudmanager.hosts.s3 import S3Host

from hosts.s3_server import aws_env, bucket, moto_endpoint, s3_admin  # noqa: F401  (fixtures)
from hosts.webdav_server import PASSWORD, USER, webdav_server_fixture  # noqa: F401

FILES = 24
#: File numbers and the damage done to their only copy.
DAMAGE = {3: "delete", 7: "delete", 11: "grow", 12: "shrink", 17: "same size"}


def contents(n):
    return (b"file %03d " % n) * (50 + n)


class Counting:
    """Counts the host calls a verify makes that look at one copy (stat,
    download) and at listings, on a real host of any kind (a mixin)."""

    count_lock = threading.Lock()

    def _count(self, what):
        with self.count_lock:  # the engine looks in parallel
            counts = self.__dict__.setdefault("calls", {})
            counts[what] = counts.get(what, 0) + 1

    def stat(self, url):
        self._count("stat")
        return super().stat(url)

    def download(self, url, dest_path, max_bytes=None):
        self._count("download")
        return super().download(url, dest_path, max_bytes)

    def list_objects(self, prefix=""):
        self._count("list")
        return super().list_objects(prefix)


class CountingFolder(Counting, FolderHost):
    pass


class CountingS3(Counting, S3Host):
    pass


class CountingFsspec(Counting, FsspecHost):
    pass


class CountingMemory(Counting, MemoryHost):
    pass


class Site:
    """One host of a kind, and how to damage what it holds, bypassing cloudmanager."""

    def __init__(self, host, put, delete):
        self.host, self.put, self.delete = host, put, delete


@pytest.fixture
def make_site(request, tmp_path):
    """``make_site(kind)``: a new, empty host of ``kind`` (each call its own)."""
    made = []

    def make(kind):
        tag = uuid.uuid4().hex[:10]
        if kind == "folder":
            root = tmp_path / ("folder-" + tag)
            root.mkdir()
            host = CountingFolder(str(root), name="folder", fsync=False)

            def put(name, data):
                (root / name).write_bytes(data)

            def delete(name):
                (root / name).unlink()
        elif kind == "s3":
            endpoint = request.getfixturevalue("moto_endpoint")
            bucket_name = request.getfixturevalue("bucket")
            admin = request.getfixturevalue("s3_admin")
            host = CountingS3(bucket_name, "pool/" + tag, endpoint_url=endpoint,
                              region="us-east-1", addressing_style="path", name="s3")

            def put(name, data):  # a plain PUT: no checksum stored with it
                admin.put_object(Bucket=bucket_name, Key="pool/%s/%s" % (tag, name), Body=data)

            def delete(name):
                admin.delete_object(Bucket=bucket_name, Key="pool/%s/%s" % (tag, name))
        elif kind == "webdav":
            server = request.getfixturevalue("webdav_server")
            host = CountingFsspec("webdav://%s/pool" % tag, base_url=server.base_url,
                                  storage_options={"auth": (USER, PASSWORD)}, timeout=10,
                                  name="webdav")
            root = server.root / tag / "pool"  # what WsgiDAV serves, on disk

            def put(name, data):
                (root / name).write_bytes(data)

            def delete(name):
                (root / name).unlink()
        else:
            host = CountingMemory(uuid.uuid4().hex, name="memory")

            def put(name, data):
                host.objects[name] = data

            def delete(name):
                del host.objects[name]
        made.append(host)
        return Site(host, put, delete)

    yield make
    for host in made:
        host.close()


def damaged_pool(make_pool, site, name, write_file):
    """A pool of :data:`FILES` files on ``site``'s host alone, with :data:`DAMAGE` done."""
    cm = make_pool(hosts=[site.host], name=name, redundancy=1, make_roots=False)
    digests = [cm.upload(write_file("%s-%d" % (name, n), contents(n))) for n in range(FILES)]
    assert all(digests)
    for n, damage in DAMAGE.items():
        data = contents(n)
        if damage == "delete":
            site.delete(digests[n])
        elif damage == "grow":
            site.put(digests[n], data + b"!")
        elif damage == "shrink":
            site.put(digests[n], data[:-1])
        else:
            site.put(digests[n], data[:-1] + b"?")
    cm.evict(0)  # nothing cached: verify looks at the hosts alone
    site.host.calls = {}
    return cm, digests


def states(cm, digests):
    return [[(c.host_name, c.state) for c in cm.db.copies.of(d)] for d in digests]


@pytest.mark.parametrize("kind", ["folder", "s3", "webdav", "memory"])
def test_a_listing_finds_the_same_missing_and_bad_copies_as_a_look_at_each(
        kind, make_pool, make_site, write_file):
    listed_site, looked_site = make_site(kind), make_site(kind)
    listed, listed_digests = damaged_pool(make_pool, listed_site, "listed", write_file)
    looked, looked_digests = damaged_pool(make_pool, looked_site, "looked", write_file)
    assert listed_digests == looked_digests
    listed.engine.listing = True
    looked.engine.listing = False

    by_listing = listed.verify()
    by_looks = looked.verify()

    assert by_listing == by_looks
    assert states(listed, listed_digests) == states(looked, looked_digests)
    # What the damage must have given, host by host.
    found = {n: s[0][1] for n, s in enumerate(states(listed, listed_digests))}
    sees_content = kind == "memory"  # its listing (and stat) carries a SHA-256
    for n in range(FILES):
        expected = {"delete": "missing", "grow": "bad", "shrink": "bad",
                    "same size": "bad" if sees_content else "good"}.get(DAMAGE.get(n), "good")
        assert found[n] == expected, n
    assert by_listing["checked"] == FILES
    assert by_listing["missing"] == 2 and by_listing["bad"] == (3 if sees_content else 2)
    # The listing cleared the sound copies: only the doubted ones were
    # looked at alone (and a condemned copy is never cleared by a listing).
    doubted = len(DAMAGE) if sees_content else len(DAMAGE) - 1
    assert listed_site.host.calls.get("list", 0) >= 1
    assert listed_site.host.calls.get("stat", 0) == doubted
    assert looked_site.host.calls.get("list", 0) == 0
    assert looked_site.host.calls.get("stat", 0) == FILES

    # Again: the condemned copies are looked at by download, by both.
    listed_site.host.calls, looked_site.host.calls = {}, {}
    digests = listed_digests
    condemned = [digests[n] for n, s in found.items() if s != "good"]
    again_listed = listed.verify(hashes=condemned)
    again_looked = looked.verify(hashes=condemned)
    assert again_listed == again_looked
    assert listed_site.host.calls.get("download", 0) == len(condemned)
    assert states(listed, digests) == states(looked, digests)


def test_a_listing_pages_through_more_objects_than_one_request_returns(
        moto_endpoint, bucket, make_pool, write_file):  # noqa: F811
    host = CountingS3(bucket, "paged", endpoint_url=moto_endpoint, region="us-east-1",
                      addressing_style="path", name="s3")
    host.list_page = 5
    requests = []
    host.client.meta.events.register("before-parameter-build.s3.ListObjectsV2",
                                      lambda params, **kw: requests.append(params))
    cm = make_pool(hosts=[host], redundancy=1, make_roots=False)
    digests = [cm.upload(write_file("p%d" % n, contents(n))) for n in range(23)]
    last = max(digests)  # listed last: on the last page
    host.client.delete_object(Bucket=bucket, Key="paged/" + last)
    cm.evict(0)
    cm.engine.listing = True
    host.calls = {}

    summary = cm.verify()

    assert summary == dict(summary, checked=23, good=22, missing=1, error=0)
    assert [c.state for c in cm.db.copies.of(last)] == ["missing"]
    assert len(requests) == 5  # 22 objects, 5 per request
    assert {r["MaxKeys"] for r in requests} == {5}
    assert host.calls.get("stat") == 1  # the missing one, looked at alone


def test_prefixes_narrow_an_s3_listing_and_the_plan_uses_them(
        moto_endpoint, bucket, make_pool, write_file):  # noqa: F811
    host = S3Host(bucket, "narrow", endpoint_url=moto_endpoint, region="us-east-1",
                  addressing_style="path", name="s3")
    cm = make_pool(hosts=[host], redundancy=1, make_roots=False)
    digests = [cm.upload(write_file("n%d" % n, contents(n))) for n in range(40)]
    first = digests[0][0]
    assert sorted(o.name for o in host.list_objects(first)) \
        == sorted(d for d in digests if d.startswith(first))
    sizes = {d: len(contents(n)) for n, d in enumerate(digests)}
    assert {o.name: (o.size, o.sha256) for o in host.list_objects()} \
        == {d: (size, None) for d, size in sizes.items()}
    with pytest.raises(InvalidInputError):
        list(host.list_objects("../other"))

    engine = cm.engine
    names = digests[:20]
    # A host of a million objects: 20 copies are not worth listing it all,
    # nor 20 prefixes of 1, 2 or 3 digits; one look each costs less.
    assert engine.listing_plan(host, names, 1_000_000) is None
    # 2,000 copies of 2,000 objects: the whole host, in two requests.
    many = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(2000)]
    assert engine.listing_plan(host, many, 2000) == [""]
    # 2,000 copies among 15,000 objects: the whole host still (15 requests).
    assert engine.listing_plan(host, many, 15_000) == [""]
    # 100 copies under one prefix among 100,000 objects: that prefix, once
    # it holds few enough objects (two digits: about 390).
    clustered = ["ab" + n[2:] for n in many[:100]]
    assert engine.listing_plan(host, clustered, 100_000) == ["ab"]
    # Hashes are spread evenly: 2,000 of 100,000 cover every short prefix,
    # and the 4-digit ones save next to no request. A look each.
    plan = engine.listing_plan(host, many, 100_000)
    assert plan is None or all(any(n.startswith(p) for p in plan) for n in many)
    # A folder is read whole whatever the prefix: all, or a look each.
    folder = FolderHost("/nonexistent-root-for-planning")
    assert engine.listing_plan(folder, many, 2000) == [""]
    assert engine.listing_plan(folder, many, 100_000) is None
    # Few copies: a look each.
    assert engine.listing_plan(host, many[:3], 3) is None

    # A verify by prefixes finds the copies, and no others.
    items = []
    for digest in digests:
        [copy] = cm.db.copies.of(digest)
        items.append(CheckItem(digest, sizes[digest], Location(copy.host_name, copy.url)))
    items[5] = items[5]._replace(size=items[5].size + 1)  # a record the host disagrees with
    prefixes = sorted({d[:1] for d in digests})
    results, facts = engine.check_listed(host, items, prefixes)
    assert [r and r.verdict for r in results] == ["intact"] * 5 + [None] + ["intact"] * 34
    assert len(facts) == len(prefixes) and all(f.ok for f in facts)


class Crowded(MemoryHost):
    """A memory host that records how many looks at single copies run at once.

    The first ``bound`` looks wait for each other at a barrier: they can only
    pass it if that many run at the same time.
    """

    max_connections = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.looks = 0
        self.barrier = threading.Barrier(self.max_connections, timeout=30)

    def _look(self, call):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.looks += 1
            first = self.looks <= self.max_connections
        try:
            if first:
                self.barrier.wait()
            return call()
        finally:
            with self.lock:
                self.running -= 1

    def stat(self, url):
        return self._look(lambda: super(Crowded, self).stat(url))

    def download(self, url, dest_path, max_bytes=None):
        return self._look(lambda: super(Crowded, self).download(url, dest_path, max_bytes))


@pytest.mark.parametrize("deep", [False, True])
def test_looks_at_single_copies_run_in_parallel_within_the_hosts_bound(
        deep, make_pool, write_file):
    crowded = [Crowded(uuid.uuid4().hex, name="c%d" % i) for i in range(2)]
    cm = make_pool(hosts=crowded, redundancy=2)
    digests = [cm.upload(write_file("f%d" % n, contents(n))) for n in range(30)]
    cm.engine.listing = False  # every copy looked at alone (a HEAD, or a download)
    del crowded[0].objects[digests[4]]

    summary = cm.verify(deep=deep)

    assert summary == dict(summary, checked=60, good=59, missing=1, error=0)
    for host in crowded:
        assert host.looks == 30
        assert host.most == host.max_connections  # reached (the barrier), never passed
    assert [c.state for c in cm.db.copies.of(digests[4]) if c.host_name == "c0"] == ["missing"]


def test_odd_names_in_a_listing_are_never_taken_for_copies(make_pool, tmp_path, write_file):
    root = tmp_path / "odd"
    root.mkdir()
    host = FolderHost(str(root), name="odd", fsync=False)
    cm = make_pool(hosts=[host], redundancy=1, make_roots=False)
    digests = [cm.upload(write_file("o%d" % n, contents(n))) for n in range(20)]
    foreign = hashlib.sha256(b"not a file of this pool").hexdigest()
    odd = {
        foreign: b"a foreign object",
        STAGING_PREFIX + "0123abcd.tmp": b"staged, never published",
        "." + digests[0] + ".0a1b2c.tmp": b"a temp file",
        "notes.txt": b"hello",
        "Z" * 64: b"not hex",
        digests[1].upper(): contents(1),
    }
    for name, data in odd.items():
        (root / name).write_bytes(data)
    (root / ("f" * 64)).mkdir()  # a directory named like an object
    cm.engine.listing = True

    listed = {o.name: o for o in host.list_objects()}
    assert set(listed) == set(digests) | {foreign}
    assert listed[foreign] == ListedObject(foreign, len(odd[foreign]))
    summary = cm.verify()

    assert summary == dict(summary, checked=20, good=20, bad=0, missing=0, error=0)
    for name, data in odd.items():  # untouched
        assert (root / name).read_bytes() == data
    assert cm.db.copies.of(foreign) == [] and cm.db.copies.of("f" * 64) == []
    assert {u.host_name for d in digests for u in cm.db.copies.of(d)} == {"odd"}


def test_odd_keys_in_an_s3_listing_are_skipped(moto_endpoint, bucket, s3_admin):  # noqa: F811
    host = S3Host(bucket, "odd", endpoint_url=moto_endpoint, region="us-east-1",
                  addressing_style="path")
    real = hashlib.sha256(b"real").hexdigest()
    for key in ("odd/" + real, "odd/" + STAGING_PREFIX + "0123abcd.tmp", "odd/notes.txt",
                "odd/sub/" + real, "odd/" + real.upper(), "odder/" + real, real):
        s3_admin.put_object(Bucket=bucket, Key=key, Body=b"real")
    try:
        assert list(host.list_objects()) == [ListedObject(real, 4)]
        assert list(host.list_objects(real[:3])) == [ListedObject(real, 4)]
        assert list(host.list_objects("0" if real[0] != "0" else "1")) == []
        # The fields a listing drops before they are parsed stay in any
        # other call's answer on the host's client.
        answer = host.client.list_objects_v2(Bucket=bucket, Prefix="odd/")
        assert all("LastModified" in item and "ETag" in item for item in answer["Contents"])
    finally:
        host.close()


@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_claimed_copies_end_as_a_look_at_each_leaves_them(
        kind, make_pool, tmp_path, request, write_file):
    """Another node's copies (claimed): a listing that sees only a size
    cannot make them good, so they are looked at alone, as without listings
    (S3's HEAD gives its stored SHA-256: good; a folder's size: still claimed)."""
    if kind == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        bucket_name = request.getfixturevalue("bucket")

        def new_host():
            return S3Host(bucket_name, "claims", endpoint_url=endpoint, region="us-east-1",
                          addressing_style="path", name="shared")
    else:
        root = tmp_path / "shared"
        root.mkdir()

        def new_host():
            return FolderHost(str(root), name="shared", fsync=False)

    maker = make_pool(hosts=[new_host()], name="maker", redundancy=1, make_roots=False)
    digests = [maker.upload(write_file("c%d" % n, contents(n))) for n in range(FILES)]
    lost = digests[2]
    dump = maker.data_dump()
    nodes = {}
    for listing in (True, False):
        node = make_pool(hosts=[new_host()], name="node-%s" % listing, redundancy=1,
                         make_roots=False)
        node.data_load(dump)
        node.engine.listing = listing
        nodes[listing] = node
    assert {c.state for d in digests for c in nodes[True].db.copies.of(d)} == {"claimed"}
    if kind == "s3":
        request.getfixturevalue("s3_admin").delete_object(Bucket=bucket_name,
                                                          Key="claims/" + lost)
    else:
        (root / lost).unlink()

    summaries = {listing: node.verify() for listing, node in nodes.items()}

    assert summaries[True] == summaries[False]
    assert summaries[True] == dict(summaries[True], checked=FILES, missing=1)
    ends = {listing: [[c.state for c in node.db.copies.of(d)] for d in digests]
            for listing, node in nodes.items()}
    assert ends[True] == ends[False]
    held = "good" if kind == "s3" else "claimed"
    assert ends[True] == [["missing"] if d == lost else [held] for d in digests]


def test_a_verify_records_its_looks_in_a_few_transactions(make_pool, tmp_path, write_file):
    from cloudmanager.replication import VERIFY_BATCH

    root = tmp_path / "few"
    root.mkdir()
    cm = make_pool(hosts=[FolderHost(str(root), name="few", fsync=False)], redundancy=1,
                   make_roots=False)
    count = VERIFY_BATCH + 40
    digests = cm.upload_many([write_file("t%d" % n, b"copy %d" % n) for n in range(count)])
    (root / digests[7]).unlink()
    for listing in (True, False):
        cm.engine.listing = listing
        statements = []
        for conn in cm.db.local._all_connections:
            conn.set_trace_callback(statements.append)
        summary = cm.verify()
        for conn in cm.db.local._all_connections:
            conn.set_trace_callback(None)
        begins = [s for s in statements if s.strip().upper().startswith("BEGIN")]
        # The second time, the missing copy's back-off is not over: not due.
        missing = 1 if listing else 0
        assert summary == dict(summary, checked=count - 1 + missing, good=count - 1,
                               missing=missing)
        # The leases taken, two batches of looks recorded, the leases released.
        assert len(begins) <= 4, begins
    assert [c.state for c in cm.db.copies.of(digests[7])] == ["missing"]


def test_a_deep_verify_interrupted_by_its_progress_callback_ends(make_pool, write_file):
    """Ctrl-C raised by the caller's progress callback in a check's thread
    reaches the caller (it hung, waiting for that check's result)."""
    cm = make_pool(capacity=1 << 20, redundancy=1)
    cm.upload_many([write_file("f%d" % i, b"bytes %d" % i * 100) for i in range(4)])
    outcome = {}

    def progress(nbytes, nfiles):
        if nbytes > 0:
            raise KeyboardInterrupt

    def run():
        try:
            outcome["value"] = cm.pool.verify(deep=True, progress=progress)
        except BaseException as exc:  # what the caller would get
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), KeyboardInterrupt)


class Lagging(MemoryHost):
    """A memory host whose downloads after the first take a while, and that
    counts the downloads begun and ended. The first ends only once a second
    has begun, so one is under way when the first one's caller stops."""

    max_connections = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.begun = 0
        self.ended = 0
        self.second_begun = threading.Event()

    def download(self, url, dest_path, max_bytes=None):
        with self.lock:
            self.begun += 1
            first = self.begun == 1
            if self.begun == 2:
                self.second_begun.set()
        try:
            if first:
                self.second_begun.wait(10)
            else:
                time.sleep(0.3)
            return super().download(url, dest_path, max_bytes)
        finally:
            with self.lock:
                self.ended += 1


def test_an_interrupted_deep_verify_waits_for_its_checks_before_removing_their_room(
        make_pool, write_file, tmp_path, monkeypatch):
    """The checks under way when the caller stops end before their scratch
    directory is removed (its removal raced with a download still writing,
    and the caller got "Directory not empty" in place of its Ctrl-C)."""
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_parent))
    host = Lagging(uuid.uuid4().hex, name="lag")
    cm = make_pool(hosts=[host], redundancy=1, capacity=1 << 20)
    cm.upload_many([write_file("f%d" % i, b"bytes %d" % i * 100) for i in range(6)])

    def progress(nbytes, nfiles):
        if nbytes > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cm.pool.verify(deep=True, progress=progress)
    assert host.begun == host.ended >= 2
    assert list(scratch_parent.iterdir()) == []


def test_a_verify_interrupted_midway_records_the_looks_it_made(make_pool, write_file):
    """Ctrl-C in the middle of a verify keeps what it saw: the copies looked at
    before it are recorded as checked, so the next verify goes on from there
    (they were dropped until a batch of VERIFY_BATCH was full)."""
    cm = make_pool(capacity=1 << 20, redundancy=1)
    digests = cm.upload_many([write_file("v%d" % i, b"verify me %d" % i) for i in range(12)])
    cm.engine.listing = False  # one look per copy, each reported as it ends
    seen = []

    def progress(nbytes, nfiles):
        seen.append(nfiles)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cm.pool.verify(progress=progress)
    checked = [h for h in digests if any(c.checked for c in cm.db.copies.of(h))]
    assert len(checked) >= 4
    # The next verify looks only at the others (a budget of "not checked in an hour").
    summary = cm.verify(older_than=3600)
    assert summary["checked"] == len(digests) - len(checked)
