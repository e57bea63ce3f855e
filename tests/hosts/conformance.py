"""The host conformance suite: the Host contract, as tests every host class passes.

A backend's test module provides two fixtures and subclasses
:class:`HostConformance`::

    @pytest.fixture
    def host(tmp_path):            # a working, empty host
        (tmp_path / "pool").mkdir()  # a folder host never creates its root
        return FolderHost(str(tmp_path / "pool"), fsync=False)

    @pytest.fixture
    def unreachable_host(tmp_path):  # one whose backend cannot be reached
        ...

    class TestFolder(HostConformance):
        large_size = 8 << 20

Class attributes tune the suite: ``large_size`` (bytes of the large-file
test; S3 hosts set a multipart threshold below it), ``removes_failed_stagings``.

A module may also override the ``tamper`` fixture: ``tamper(location, data)``
replaces the bytes stored behind ``location`` without going through the host
(as a disk error or another writer would). Without it the tests that need it
are skipped.

Hosts that can stage (``can_stage``) also pass the staged-upload tests; a
module gives them the ``raw_names`` fixture: ``raw_names()`` lists every
name in the host's own area (its root, its key prefix), staging leftovers
included, as seen without going through the host. Without it the tests that
look for leftovers are skipped.
"""

import concurrent.futures
import hashlib
import os
from pathlib import Path

import pytest

from cloudmanager.errors import (
    HostError,
    HostNotFoundError,
    InvalidInputError,
    PermanentHostError,
)
from cloudmanager.hosts.base import Location, ObjectInfo, Received, is_staging_name
from cloudmanager.validation import check_url


def sha(data):
    return hashlib.sha256(data).hexdigest()


class ForwardStream:
    """A source as a staging host gets it: ``read`` only, no seek, no file
    descriptor. Counts what was read; fails with ``fail`` once ``fail_after``
    bytes are out."""

    def __init__(self, data, fail_after=None, fail=None):
        self.data = data
        self.pos = 0
        self.ended = False  # a read returned the end (b"", or all the rest)
        self.fail_after = fail_after
        self.fail = fail or OSError(5, "Input/output error (injected)")

    def readable(self):
        return True

    def seekable(self):
        return False

    def read(self, size=-1):
        whole = size is None or size < 0
        end = len(self.data) if whole else self.pos + size
        if self.fail_after is not None and end > self.fail_after:
            if whole or self.pos >= self.fail_after:
                raise self.fail
            end = self.fail_after
        chunk = self.data[self.pos:end]
        self.pos += len(chunk)
        if not chunk or size is None or size < 0:
            self.ended = True
        return chunk


class HostConformance:
    """Tests of the Host contract. Subclasses supply ``host`` and ``unreachable_host``."""

    large_size = 6 << 20
    #: Whether a staging whose stream failed is always gone when ``stage``
    #: raises (removal is best effort: a server may finish writing a
    #: request the client gave up on after the client's delete).
    removes_failed_stagings = True

    # -- helpers -------------------------------------------------------------

    @pytest.fixture
    def put(self, host, tmp_path):
        """``put(data, filename=...)`` → (hash, Location) of a new upload."""
        src = tmp_path / "src"
        src.mkdir(exist_ok=True)

        def put(data, filename="file.bin"):
            path = src / filename
            path.write_bytes(data)
            digest = sha(data)
            location = host.upload(str(path), digest)
            assert isinstance(location, Location)
            assert location.host_name == host.name
            return digest, location

        return put

    @staticmethod
    def fetch(host, url, tmp_path, max_bytes=None):
        """Download ``url`` and return its bytes, checking what the host says it wrote."""
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        dest = out / "object"
        received = host.download(url, str(dest), max_bytes=max_bytes)
        data = dest.read_bytes()
        # The engine trusts a returned digest instead of reading the file
        # again: it must be of exactly the bytes written.
        if received is not None:
            assert isinstance(received, Received)
            assert received == (sha(data), len(data))
        return data

    @pytest.fixture
    def tamper(self):
        """``tamper(location, data)``: overwrite a stored object behind the host's back."""
        pytest.skip("this backend's tests give no way to tamper with a stored object")

    @pytest.fixture
    def missing_url(self, host, put):
        """A URL of this host for an object that does not exist."""
        if not host.can_delete:
            pytest.skip("needs a host that can delete; override missing_url")
        _, location = put(b"soon gone")
        host.delete(location.url)
        return location.url

    # -- round trips ---------------------------------------------------------

    def test_round_trip_is_byte_exact(self, host, put, tmp_path):
        data = os.urandom(100_000) + bytes(range(256))
        digest, location = put(data)
        check_url(location.url)  # storable and never an option of a tool
        assert host.accepts(location.url)
        got = self.fetch(host, location.url, tmp_path, max_bytes=len(data))
        assert got == data and sha(got) == digest

    def test_empty_file(self, host, put, tmp_path):
        _, location = put(b"")
        assert self.fetch(host, location.url, tmp_path, max_bytes=0) == b""

    def test_large_file(self, host, put, tmp_path):
        data = os.urandom(self.large_size)
        _, location = put(data)
        assert self.fetch(host, location.url, tmp_path) == data

    def test_unicode_and_space_in_local_name(self, host, put, tmp_path):
        data = b"unicode name"
        _, location = put(data, filename="na\u00efve r\u00e9sum\u00e9 \u65e5\u672c.txt")
        assert self.fetch(host, location.url, tmp_path) == data

    def test_uploading_the_same_object_twice(self, host, put, tmp_path):
        _, first = put(b"twice")
        _, second = put(b"twice")
        assert self.fetch(host, second.url, tmp_path) == b"twice"
        assert host.accepts(first.url)

    def test_a_damaged_object_of_the_same_size_is_replaced_by_a_new_upload(
            self, host, put, tamper, tmp_path):
        # Only a checksum the host verified proves an object is already
        # there: the same size is no proof, and skipping would leave a
        # damaged copy recorded as a good one.
        data = b"the right bytes, 23 b.."
        wrong = b"same size, wrong bytes!"
        assert len(data) == len(wrong)
        _, first = put(data)
        tamper(first, wrong)
        _, second = put(data)
        assert self.fetch(host, second.url, tmp_path) == data

    def test_download_replaces_an_existing_destination(self, host, put, tmp_path):
        _, location = put(b"new bytes")
        dest = tmp_path / "existing"
        dest.write_bytes(b"old bytes, longer than the new ones")
        host.download(location.url, str(dest))
        assert dest.read_bytes() == b"new bytes"

    def test_concurrent_uploads(self, host, tmp_path):
        blobs = [os.urandom(20_000 + i) for i in range(8)]
        src = tmp_path / "many"
        src.mkdir()
        for i, blob in enumerate(blobs):
            (src / str(i)).write_bytes(blob)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            locations = list(pool.map(lambda i: host.upload(str(src / str(i)), sha(blobs[i])),
                                      range(len(blobs))))
        for blob, location in zip(blobs, locations):
            assert self.fetch(host, location.url, tmp_path) == blob

    # -- names and URLs ------------------------------------------------------

    def test_upload_batch_stores_each_file_as_upload_does(self, host, tmp_path):
        src = tmp_path / "batch"
        src.mkdir()
        blobs = [os.urandom(100 + i) for i in range(5)] + [b""]
        items = []
        for i, data in enumerate(blobs):
            (src / ("f%d" % i)).write_bytes(data)
            items.append((str(src / ("f%d" % i)), sha(data)))
        items.append(items[0])  # the same file twice in one batch
        results = host.upload_batch(items)
        assert len(results) == len(items)
        for (path, digest), location in zip(items, results):
            assert isinstance(location, Location) and location.host_name == host.name
            assert host.accepts(location.url) and check_url(location.url) == location.url
            with open(path, "rb") as f:
                assert self.fetch(host, location.url, tmp_path) == f.read()

    def test_object_names_must_be_hashes(self, host, tmp_path):
        path = tmp_path / "f"
        path.write_bytes(b"x")
        for bad in ("../escape", "-rf", "a" * 63, "A" * 64, ""):
            with pytest.raises(InvalidInputError):
                host.upload(str(path), bad)

    def test_foreign_urls_are_not_accepted(self, host, tmp_path):
        for url in ("ftp://example.com/x", "-o", "", "file:///etc/passwd", "javascript:x"):
            assert not host.accepts(url)

    # -- failures ------------------------------------------------------------

    def test_missing_object_is_not_found(self, host, missing_url, tmp_path):
        with pytest.raises(HostNotFoundError) as info:
            self.fetch(host, missing_url, tmp_path)
        assert info.value.host == host.name and not info.value.transient
        assert list((tmp_path / "out").iterdir()) == []

    def test_oversized_download_leaves_nothing(self, host, put, tmp_path):
        data = os.urandom(50_000)
        _, location = put(data)
        with pytest.raises(HostError) as info:
            self.fetch(host, location.url, tmp_path, max_bytes=len(data) - 1)
        assert info.value.transient
        assert list((tmp_path / "out").iterdir()) == []

    def test_download_into_a_missing_directory_fails_cleanly(self, host, put, tmp_path):
        _, location = put(b"nowhere to go")
        with pytest.raises((HostError, OSError)):
            host.download(location.url, str(tmp_path / "no" / "such" / "dir" / "f"))
        assert not (tmp_path / "no").exists()

    def test_unreachable_host_errors_are_transient(self, unreachable_host, tmp_path):
        path = tmp_path / "f"
        path.write_bytes(b"data")
        with pytest.raises(HostError) as info:
            unreachable_host.upload(str(path), sha(b"data"))
        assert info.value.transient and info.value.host == unreachable_host.name

    # -- optional capabilities -----------------------------------------------

    def test_stat_exists_and_delete(self, host, put, tmp_path):
        data = b"checked"
        if not host.can_check:  # the flag is what callers read: it must be honest
            _, location = put(data)
            with pytest.raises(NotImplementedError):
                host.stat(location.url)
            return
        digest, location = put(data)
        info = host.stat(location.url)
        assert isinstance(info, ObjectInfo) and info.size == len(data)
        assert info.sha256 in (None, digest)
        assert host.exists(location.url)
        if not host.can_delete:
            return
        host.delete(location.url)
        assert not host.exists(location.url)
        with pytest.raises(HostNotFoundError):
            host.stat(location.url)
        host.delete(location.url)  # deleting a missing object is not an error

    def test_find_a_name(self, host, put):
        """``find(name)``: the object under a name, as an upload made it, or None."""
        if not host.can_check:
            return
        digest, location = put(b"found")  # first: some hosts make their root on upload
        assert host.find(sha(b"never stored")) is None
        found, info = host.find(digest)
        assert found == location and info.size == len(b"found")
        with pytest.raises(InvalidInputError):
            host.find("../" + digest)

    def test_list(self, host, put):
        if not host.can_list:
            with pytest.raises(NotImplementedError):
                list(host.list())
            return
        one, _ = put(b"one", "a")
        three, _ = put(b"three", "b")
        listed = dict(host.list())
        assert listed[one] == 3 and listed[three] == 5

    def test_close_twice(self, host):
        host.close()
        host.close()

    def test_a_foreign_url_is_refused_permanently(self, host, tmp_path):
        with pytest.raises((PermanentHostError, InvalidInputError)) as info:
            host.download("gopher://example.invalid/" + "0" * 64, str(tmp_path / "x"))
        if isinstance(info.value, HostError):
            assert info.value.host == host.name
        assert not (tmp_path / "x").exists()

    # -- staged uploads (can_stage) ------------------------------------------

    @pytest.fixture
    def raw_names(self):
        """``raw_names()``: every name in the host's own area, staging leftovers included."""
        pytest.skip("this backend's tests give no way to look at its area directly")

    @pytest.fixture
    def stager(self, host):
        if not host.can_stage:
            pytest.skip("this host cannot stage")
        return host

    def test_stage_is_declared_honestly(self, host):
        if host.can_stage:
            return
        with pytest.raises(NotImplementedError):
            host.stage(ForwardStream(b"x"), 1)

    def test_staged_bytes_are_read_once_and_published_under_their_hash(self, stager, tmp_path):
        data = os.urandom(100_000) + bytes(range(256))
        stream = ForwardStream(data)
        staged = stager.stage(stream, len(data))
        assert stream.pos == len(data) and stream.ended  # read to its end
        location = staged.publish(sha(data))
        assert isinstance(location, Location) and location.host_name == stager.name
        assert stager.accepts(location.url) and check_url(location.url) == location.url
        assert self.fetch(stager, location.url, tmp_path, max_bytes=len(data)) == data
        if stager.can_list:
            assert dict(stager.list()) == {sha(data): len(data)}
        if stager.can_check:
            info = stager.stat(location.url)
            assert info.size == len(data) and info.sha256 in (None, sha(data))

    def test_a_large_staged_file(self, stager, tmp_path):
        data = os.urandom(self.large_size)
        location = stager.stage(ForwardStream(data), len(data)).publish(sha(data))
        assert self.fetch(stager, location.url, tmp_path) == data

    def test_an_empty_staged_file(self, stager, tmp_path):
        location = stager.stage(ForwardStream(b""), 0).publish(sha(b""))
        assert self.fetch(stager, location.url, tmp_path, max_bytes=0) == b""

    def test_staged_bytes_are_no_object_until_published(self, stager, raw_names, tmp_path):
        data = b"not an object yet"
        staged = stager.stage(ForwardStream(data), len(data))
        # A staging that a crash ends here leaves a name no one takes for a copy.
        names = raw_names()
        assert len(names) == 1 and is_staging_name(names[0])
        if stager.can_list:
            assert list(stager.list()) == []
        if stager.url_prefix is not None:
            assert not stager.accepts(stager.url_prefix + names[0])
        location = staged.publish(sha(data))
        assert raw_names() == [sha(data)]  # the staging name is gone
        assert self.fetch(stager, location.url, tmp_path) == data

    def test_abort_removes_the_staged_bytes_and_is_harmless_twice(self, stager, raw_names):
        staged = stager.stage(ForwardStream(b"aborted"), 7)
        staged.abort()
        staged.abort()
        assert raw_names() == []
        with pytest.raises(PermanentHostError):
            staged.publish(sha(b"aborted"))
        assert raw_names() == []

    def test_abort_after_publish_keeps_the_object(self, stager, tmp_path):
        staged = stager.stage(ForwardStream(b"kept"), 4)
        location = staged.publish(sha(b"kept"))
        staged.abort()
        with pytest.raises(PermanentHostError):
            staged.publish(sha(b"kept"))
        assert self.fetch(stager, location.url, tmp_path) == b"kept"

    def test_publish_names_must_be_hashes(self, stager, raw_names):
        staged = stager.stage(ForwardStream(b"x"), 1)
        for bad in ("../escape", "-rf", "a" * 63, "A" * 64, ""):
            with pytest.raises(InvalidInputError):
                staged.publish(bad)
        staged.abort()
        assert raw_names() == []

    def test_publish_over_an_object_already_there(self, stager, put, tmp_path):
        digest, _ = put(b"twice over")
        location = stager.stage(ForwardStream(b"twice over"), 10).publish(digest)
        assert self.fetch(stager, location.url, tmp_path) == b"twice over"

    @pytest.mark.parametrize("fail", [OSError(5, "injected"), OverflowError("injected")])
    def test_a_stream_that_fails_leaves_no_object(self, stager, raw_names, fail):
        data = os.urandom(300_000)
        with pytest.raises((HostError, OSError, OverflowError)):
            stager.stage(ForwardStream(data, fail_after=100_000, fail=fail), len(data))
        if stager.can_list:
            assert list(stager.list()) == []
        left = raw_names()
        assert all(is_staging_name(name) for name in left)  # never a copy
        if self.removes_failed_stagings:
            assert left == []

    def test_concurrent_stagings_do_not_collide(self, stager, tmp_path):
        blobs = [os.urandom(10_000 + i) for i in range(6)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            staged = list(pool.map(lambda b: stager.stage(ForwardStream(b), len(b)), blobs))
        assert len({s.temp for s in staged}) == len(blobs)
        for blob, item in zip(blobs, staged):
            assert self.fetch(stager, item.publish(sha(blob)).url, tmp_path) == blob

    # -- streams (can_stream) -------------------------------------------------

    @pytest.fixture
    def streamer(self, host):
        if not host.can_stream:
            pytest.skip("this host cannot stream")
        return host

    def test_stream_is_declared_honestly(self, host):
        if host.can_stream:
            return
        with pytest.raises(NotImplementedError):
            host.open_stream("unused")

    @staticmethod
    def read_all(stream):
        chunks = []
        while True:
            chunk = stream.read(1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def test_a_stream_gives_the_object_byte_exact(self, streamer, put):
        for data in (b"", os.urandom(100_000) + bytes(range(256)), os.urandom(self.large_size)):
            _, location = put(data)
            with streamer.open_stream(location.url, max_bytes=len(data)) as stream:
                assert self.read_all(stream) == data

    def test_a_stream_closed_early_is_harmless(self, streamer, put):
        data = os.urandom(self.large_size)
        _, location = put(data)
        stream = streamer.open_stream(location.url)
        assert stream.read(1000) == data[:1000]
        stream.close()
        stream.close()
        with streamer.open_stream(location.url) as again:  # the object is still whole
            assert self.read_all(again) == data

    def test_a_stream_of_a_missing_object_is_not_found(self, streamer, missing_url):
        with pytest.raises(HostNotFoundError) as info:
            streamer.open_stream(missing_url)
        assert info.value.host == streamer.name and not info.value.transient

    def test_a_stream_of_an_object_larger_than_expected_is_refused(self, streamer, put):
        data = os.urandom(50_000)
        _, location = put(data)
        with pytest.raises(HostError) as info:
            streamer.open_stream(location.url, max_bytes=len(data) - 1)
        assert info.value.transient

    def test_unreachable_host_stream_errors_are_transient(self, unreachable_host):
        if not unreachable_host.can_stream:
            pytest.skip("this host cannot stream")
        if unreachable_host.url_prefix is not None:
            url = unreachable_host.url_prefix + sha(b"data")
        else:  # a folder: a file URL in its (missing) root
            url = Path(unreachable_host.root, sha(b"data")).as_uri()
        assert unreachable_host.accepts(url)
        with pytest.raises(HostError) as info:
            unreachable_host.open_stream(url)
        assert info.value.transient and info.value.host == unreachable_host.name

    def test_unreachable_host_stage_errors_are_transient(self, unreachable_host):
        if not unreachable_host.can_stage:
            pytest.skip("this host cannot stage")
        with pytest.raises(HostError) as info:
            unreachable_host.stage(ForwardStream(b"data"), 4)
        assert info.value.transient and info.value.host == unreachable_host.name
