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
test; S3 hosts set a multipart threshold below it).

A module may also override the ``tamper`` fixture: ``tamper(location, data)``
replaces the bytes stored behind ``location`` without going through the host
(as a disk error or another writer would). Without it the tests that need it
are skipped.
"""

import concurrent.futures
import hashlib
import os

import pytest

from cloudmanager.errors import (
    HostError,
    HostNotFoundError,
    InvalidInputError,
    PermanentHostError,
)
from cloudmanager.hosts.base import Location, ObjectInfo, Received
from cloudmanager.validation import check_url


def sha(data):
    return hashlib.sha256(data).hexdigest()


class HostConformance:
    """Tests of the Host contract. Subclasses supply ``host`` and ``unreachable_host``."""

    large_size = 6 << 20

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
