"""FolderHost: copies kept as ROOT/<sha256> files, recorded with file:// URLs."""

import errno
import os
from urllib.parse import urlsplit

import pytest

from cloudmanager import fsutil
from cloudmanager.errors import (
    HostError,
    HostNotFoundError,
    InvalidInputError,
    TransientHostError,
)
from cloudmanager.hosts import Location, from_spec
from cloudmanager.hosts.folder import FolderHost
from cloudmanager.validation import check_url
from helpers import sha

from .conformance import HostConformance



@pytest.fixture
def root(tmp_path):
    return tmp_path / "pool"


@pytest.fixture
def host(root):
    return FolderHost(str(root), fsync=False)


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def put(tmp_path, data, name="src.bin"):
    src = tmp_path / name
    src.write_bytes(data)
    return src


def test_round_trip_is_byte_exact(host, root, tmp_path, out_dir):
    # Over several copy chunks (1 MiB), not a multiple of the chunk size.
    data = os.urandom(3 * (1 << 20) + 12345)
    src = put(tmp_path, data)
    loc = host.upload(str(src), sha(data))
    assert isinstance(loc, Location)
    assert loc.host_name == "dir:" + str(root)
    assert (root / sha(data)).read_bytes() == data
    dest = out_dir / "copy.bin"
    assert host.download(loc.url, str(dest)) is None
    assert dest.read_bytes() == data
    assert [p.name for p in out_dir.iterdir()] == ["copy.bin"]
    assert src.read_bytes() == data


def test_custom_name_is_recorded(root, tmp_path):
    src = put(tmp_path, b"x")
    loc = FolderHost(str(root), name="nas", fsync=False).upload(str(src), sha(b"x"))
    assert loc.host_name == "nas"


def test_empty_file_round_trip(host, root, tmp_path, out_dir):
    src = put(tmp_path, b"")
    loc = host.upload(str(src), sha(b""))
    assert (root / sha(b"")).read_bytes() == b""
    dest = out_dir / "empty"
    dest.write_bytes(b"stale")
    host.download(loc.url, str(dest))
    assert dest.exists() and dest.read_bytes() == b""


def test_upload_is_atomic_and_leaves_no_temp(host, root, tmp_path):
    first = b"first version " * 1000
    name = sha(first)
    host.upload(str(put(tmp_path, first)), name)
    assert sorted(os.listdir(root)) == [name]
    # A second upload under the same name replaces the object whole.
    (root / name).write_bytes(b"garbage that is much longer than anything else " * 5000)
    host.upload(str(put(tmp_path, first, "again.bin")), name)
    assert (root / name).read_bytes() == first
    assert sorted(os.listdir(root)) == [name]


def test_failed_upload_leaves_nothing(host, root, tmp_path):
    with pytest.raises(TransientHostError):
        host.upload(str(tmp_path / "does-not-exist"), sha(b"x"))
    with pytest.raises(TransientHostError):
        host.upload(str(tmp_path), sha(b"y"))  # a directory is not a readable file
    assert not root.exists() or os.listdir(root) == []


@pytest.mark.parametrize("bad", ["../escape", "A" * 64, "0" * 63, "", "x" * 64, "/etc/passwd"])
def test_upload_refuses_non_hash_name(host, root, tmp_path, bad):
    src = put(tmp_path, b"x")
    with pytest.raises(InvalidInputError):
        host.upload(str(src), bad)
    assert not root.exists() or os.listdir(root) == []
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("dirname", ["with space", "pct%20sign", "hash#and?query", "été ü",
                                     "semi;colon,comma"])
def test_urls_are_percent_encoded_and_still_download(tmp_path, out_dir, dirname):
    root = tmp_path / dirname / "pool"
    host = FolderHost(str(root), fsync=False)
    data = b"percent " * 333
    loc = host.upload(str(put(tmp_path, data)), sha(data))
    assert loc.url.startswith("file:///")
    assert " " not in loc.url and "#" not in loc.url and "?" not in loc.url
    assert check_url(loc.url) == loc.url
    parts = urlsplit(loc.url)
    assert parts.query == "" and parts.fragment == ""
    assert host.accepts(loc.url)
    dest = out_dir / "d.bin"
    host.download(loc.url, str(dest))
    assert dest.read_bytes() == data
    # Another FolderHost on the same root (another node, same NAS) reads it too.
    other = FolderHost(str(root) + os.sep, name="other", fsync=False)
    assert other.accepts(loc.url)


def test_root_with_undecodable_bytes(tmp_path, out_dir):
    # Regression: FolderHost.upload raised UnicodeEncodeError (quote() on a
    # surrogate-escaped root) after the object was already written.
    root = os.fsdecode(os.fsencode(str(tmp_path)) + b"/latin1-\xe9t\xe9")
    host = FolderHost(root, fsync=False)
    data = b"bytes in a latin-1 named directory"
    loc = host.upload(str(put(tmp_path, data)), sha(data))
    dest = out_dir / "d.bin"
    host.download(loc.url, str(dest))
    assert dest.read_bytes() == data


def test_accepts_only_hash_named_objects_of_its_root(host, root, tmp_path):
    h = sha(b"x")
    good = "file://" + str(root) + "/" + h
    assert host.accepts(good)
    assert host.accepts("file://localhost" + str(root) + "/" + h)
    refused = [
        "file://" + str(root) + "/../" + h,                     # parent of root
        "file://" + str(root) + "/../../etc/passwd",
        "file://" + str(root) + "/%2e%2e/%2e%2e/etc/passwd",
        "file://" + str(root) + "/%2e%2e/" + h,
        "file://" + str(root) + "/sub/" + h,                    # below root
        "file://" + str(root) + "-evil/" + h,                   # sibling with same prefix
        "file://" + str(root) + "/" + h.upper(),
        "file://" + str(root) + "/" + h[:-1],
        "file://" + str(root) + "/" + h + ".tmp",
        "file://" + str(root) + "/passwd",
        "file://" + str(root) + "/",
        "file://" + str(root),
        "file://remote.example" + str(root) + "/" + h,
        "file:relative/" + h,
        "http://example.com" + str(root) + "/" + h,
        "-file://" + str(root) + "/" + h,
        "file://" + str(root) + "/" + h + " x",
        "/" + h,
        "",
        None,
    ]
    for url in refused:
        assert host.accepts(url) is False, url


def test_traversal_url_is_refused_by_download_and_exists(host, root, tmp_path, out_dir):
    # A hash-named file outside the root must not be readable through the host.
    secret = b"outside the root"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / sha(secret)).write_bytes(secret)
    url = "file://" + str(root) + "/../elsewhere/" + sha(secret)
    dest = out_dir / "d.bin"
    with pytest.raises((HostError, InvalidInputError)):
        host.download(url, str(dest))
    with pytest.raises((HostError, InvalidInputError)):
        host.exists(url)
    with pytest.raises((HostError, InvalidInputError)):
        host.delete(url)
    assert not dest.exists()
    assert list(out_dir.iterdir()) == []
    assert (outside / sha(secret)).read_bytes() == secret  # delete did not reach it


def test_download_of_missing_object_is_not_found(host, root, out_dir):
    root.mkdir()
    url = "file://" + str(root) + "/" + sha(b"never stored")
    dest = out_dir / "d.bin"
    with pytest.raises(HostNotFoundError) as info:
        host.download(url, str(dest))
    assert info.value.host == host.name
    assert not dest.exists()
    assert list(out_dir.iterdir()) == []


def test_download_of_missing_object_keeps_existing_dest(host, root, out_dir):
    root.mkdir()
    dest = out_dir / "d.bin"
    dest.write_bytes(b"keep me")
    with pytest.raises(HostNotFoundError):
        host.download("file://" + str(root) + "/" + sha(b"never"), str(dest))
    assert dest.read_bytes() == b"keep me"
    assert [p.name for p in out_dir.iterdir()] == ["d.bin"]


def test_missing_destination_directory_is_not_reported_as_missing_object(host, tmp_path):
    # Regression: a missing destination directory was reported as
    # HostNotFoundError, which makes the engine mark a good copy bad.
    data = b"present"
    loc = host.upload(str(put(tmp_path, data)), sha(data))
    with pytest.raises(HostError) as info:
        host.download(loc.url, str(tmp_path / "no" / "such" / "dir" / "d.bin"))
    assert not isinstance(info.value, HostNotFoundError)


def test_exists_and_delete(host, root, tmp_path):
    assert host.can_check and host.can_delete
    data = b"to be deleted"
    loc = host.upload(str(put(tmp_path, data)), sha(data))
    keep = b"to be kept"
    kept = host.upload(str(put(tmp_path, keep, "k.bin")), sha(keep))
    assert host.exists(loc.url) is True
    host.delete(loc.url)
    assert host.exists(loc.url) is False
    assert not (root / sha(data)).exists()
    host.delete(loc.url)  # deleting a missing object is not an error
    assert host.exists(kept.url) is True
    assert (root / sha(keep)).read_bytes() == keep


def test_from_spec_file_and_dir(tmp_path):
    a = from_spec("file://" + str(tmp_path / "a"))
    assert isinstance(a, FolderHost) and a.root == str(tmp_path / "a")
    b = from_spec("dir:" + str(tmp_path / "b"))
    assert isinstance(b, FolderHost) and b.root == str(tmp_path / "b")
    c = from_spec("file://localhost" + str(tmp_path / "c%20d"))
    assert c.root == str(tmp_path / "c d")
    named = from_spec("dir:" + str(tmp_path), name="usb", fsync=False)
    assert named.name == "usb"


@pytest.mark.parametrize("spec", ["dir:relative", "dir:./x", "dir:", "file:relative",
                                  "file://remote.example/abs", "file://", "folder:/abs", "/abs",
                                  "dir"])
def test_from_spec_refuses(spec):
    with pytest.raises(InvalidInputError):
        from_spec(spec)


# -- the shared host contract -------------------------------------------------


@pytest.fixture
def unreachable_host(tmp_path):
    # A root below a regular file: every operation fails as the disk would
    # if the mount went away.
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    return FolderHost(str(blocker / "pool"), fsync=False)


def overwrite_file(root):
    def tamper(location, data):
        (root / location.url.rsplit("/", 1)[1]).write_bytes(data)

    return tamper


class TestFolderConformance(HostConformance):
    @pytest.fixture
    def tamper(self, root):
        return overwrite_file(root)


class TestFolderWithFsyncConformance(HostConformance):
    """With fsync on, batches take the syncfs path (where Linux has it)."""

    @pytest.fixture
    def tamper(self, root):
        return overwrite_file(root)

    @pytest.fixture
    def host(self, root):
        return FolderHost(str(root), fsync=True)


# -- batches made durable together --------------------------------------------------


@pytest.fixture
def syncs(monkeypatch):
    """The paths fsutil.sync_filesystem was called on, in order (it still runs)."""
    calls = []
    real = fsutil.sync_filesystem

    def counted(path):
        calls.append(path)
        real(path)

    monkeypatch.setattr(fsutil, "sync_filesystem", counted)
    return calls


def batch_of(tmp_path, n):
    items = []
    for i in range(n):
        data = b"%d" % i * 50
        items.append((str(put(tmp_path, data, "b%d" % i)), sha(data)))
    return items


@pytest.mark.skipif(not fsutil.sync_filesystem_available(), reason="needs Linux 5.8+ syncfs")
def test_a_durable_batch_costs_two_syncs_and_isolates_a_bad_file(root, tmp_path, syncs):
    host = FolderHost(str(root), fsync=True)
    items = batch_of(tmp_path, 4)
    items.insert(1, (str(tmp_path / "missing"), sha(b"missing")))
    results = host.upload_batch(items)
    assert syncs == [str(root), str(root)]  # the bytes, then the renames: not one per file
    assert isinstance(results[1], TransientHostError) and "missing" in results[1].message
    for (path, digest), location in zip(items[:1] + items[2:], results[:1] + results[2:]):
        assert location == Location(host.name, "file://" + str(root / digest))
        assert (root / digest).read_bytes() == open(path, "rb").read()
    assert sorted(os.listdir(root)) == sorted(d for _, d in items[:1] + items[2:])


@pytest.mark.skipif(not fsutil.sync_filesystem_available(), reason="needs Linux 5.8+ syncfs")
def test_a_failed_sync_fails_the_whole_batch_and_leaves_no_temp(root, tmp_path, monkeypatch):
    host = FolderHost(str(root), fsync=True)

    def failing(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsutil, "sync_filesystem", failing)
    results = host.upload_batch(batch_of(tmp_path, 3))
    assert all(isinstance(r, TransientHostError) and "Input/output" in r.message
               for r in results)
    assert os.listdir(root) == []  # not a name points at bytes that may not be on disk


def test_without_fsync_a_batch_is_uploads_one_by_one(root, tmp_path, syncs):
    host = FolderHost(str(root), fsync=False)
    results = host.upload_batch(batch_of(tmp_path, 3))
    assert syncs == [] and all(isinstance(r, Location) for r in results)


def test_a_batch_into_a_missing_folder_makes_it(tmp_path):
    root = tmp_path / "not" / "yet"
    host = FolderHost(str(root), fsync=True)
    assert all(isinstance(r, Location) for r in host.upload_batch(batch_of(tmp_path, 2)))
    assert len(os.listdir(root)) == 2


@pytest.mark.skipif(not fsutil.sync_filesystem_available(), reason="needs Linux 5.8+ syncfs")
def test_a_failed_rename_in_a_batch_leaves_no_temp(root, tmp_path, monkeypatch):
    host = FolderHost(str(root), fsync=True)
    real, renamed = fsutil.publish, []

    def second_fails(temp, final, fsync=True):
        if renamed:
            raise OSError(errno.EIO, "Input/output error")
        renamed.append(final)
        real(temp, final, fsync)

    monkeypatch.setattr(fsutil, "publish", second_fails)
    results = host.upload_batch(batch_of(tmp_path, 3))
    assert all(isinstance(r, TransientHostError) for r in results)
    assert os.listdir(root) == [os.path.basename(renamed[0])]  # no temp; one object, unrecorded
