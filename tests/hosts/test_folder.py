"""FolderHost: copies kept as ROOT/<sha256> files, recorded with file:// URLs."""

import errno
import os
from urllib.parse import urlsplit

import pytest

from cloudmanager import fsutil
from cloudmanager.errors import (
    HostError,
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    TransientHostError,
)
from cloudmanager.hosts import Location, Received, from_spec
from cloudmanager.hosts.folder import FolderHost
from cloudmanager.validation import check_url
from helpers import sha

from .conformance import ForwardStream, HostConformance



@pytest.fixture
def root(tmp_path):
    # A folder host never creates its root: the folder exists, like a
    # mounted disk, before the host is used.
    path = tmp_path / "pool"
    path.mkdir()
    return path


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
    assert host.download(loc.url, str(dest)) == Received(sha(data), len(data))
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
    assert sorted(os.listdir(root)) == sorted([name, MARKER])
    # A second upload under the same name replaces the object whole.
    (root / name).write_bytes(b"garbage that is much longer than anything else " * 5000)
    host.upload(str(put(tmp_path, first, "again.bin")), name)
    assert (root / name).read_bytes() == first
    assert sorted(os.listdir(root)) == sorted([name, MARKER])


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
    root.mkdir(parents=True)
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
    os.mkdir(root)
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
    url = "file://" + str(root) + "/" + sha(b"never stored")
    dest = out_dir / "d.bin"
    with pytest.raises(HostNotFoundError) as info:
        host.download(url, str(dest))
    assert info.value.host == host.name
    assert not dest.exists()
    assert list(out_dir.iterdir()) == []


def test_download_of_missing_object_keeps_existing_dest(host, root, out_dir):
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


def names_in(root):
    """Every name in a folder host's root but its marker."""
    return lambda: sorted(set(os.listdir(root)) - {FolderHost.MARKER_NAME})


class TestFolderConformance(HostConformance):
    @pytest.fixture
    def tamper(self, root):
        return overwrite_file(root)

    @pytest.fixture
    def raw_names(self, root):
        return names_in(root)


class TestFolderWithFsyncConformance(HostConformance):
    """With fsync on, batches take the syncfs path (where Linux has it)."""

    @pytest.fixture
    def tamper(self, root):
        return overwrite_file(root)

    @pytest.fixture
    def raw_names(self, root):
        return names_in(root)

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
    assert sorted(os.listdir(root)) == sorted([MARKER] + [d for _, d in items[:1] + items[2:]])


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


@pytest.mark.skipif(not fsutil.sync_filesystem_available(), reason="needs Linux 5.8+ syncfs")
def test_a_failed_rename_in_a_batch_leaves_no_temp(root, tmp_path, monkeypatch):
    host = FolderHost(str(root), fsync=True)
    real, renamed = fsutil.publish, []

    def second_fails(temp, final, fsync=True):
        if os.path.basename(final) == MARKER:
            return real(temp, final, fsync)
        if renamed:
            raise OSError(errno.EIO, "Input/output error")
        renamed.append(final)
        real(temp, final, fsync)

    monkeypatch.setattr(fsutil, "publish", second_fails)
    results = host.upload_batch(batch_of(tmp_path, 3))
    assert all(isinstance(r, TransientHostError) for r in results)
    # No temp; one object, unrecorded (and the marker, written before the renames).
    assert sorted(os.listdir(root)) == sorted([MARKER, os.path.basename(renamed[0])])


# -- the root is never created; the marker tells a mounted pool from an empty mount point --


ALL_OPERATIONS = ("upload", "upload_batch", "stage", "download", "stat", "exists", "list",
                  "delete")


def call(host, operation, tmp_path, data=b"probe"):
    """Run one host operation on an object of ``data``; return what it returned."""
    src = put(tmp_path, data, "probe.bin")
    url = "file://" + host.root + "/" + sha(data)
    if operation == "upload":
        return host.upload(str(src), sha(data))
    if operation == "upload_batch":
        [result] = host.upload_batch([(str(src), sha(data))])
        if isinstance(result, Exception):
            raise result
        return result
    if operation == "stage":
        return host.stage(ForwardStream(data), len(data)).publish(sha(data))
    if operation == "download":
        return host.download(url, str(tmp_path / "fetched"))
    if operation == "stat":
        return host.stat(url)
    if operation == "exists":
        return host.exists(url)
    if operation == "list":
        return list(host.list())
    return host.delete(url)


@pytest.mark.parametrize("fsync", [False, True])
@pytest.mark.parametrize("operation", ALL_OPERATIONS)
def test_a_missing_root_is_an_outage_and_is_never_created(tmp_path, operation, fsync):
    # Regression: an upload made the missing folder, so an unmounted disk's
    # mount point filled up with copies on the wrong disk.
    root = tmp_path / "mnt" / "pool"
    host = FolderHost(str(root), fsync=fsync)
    with pytest.raises(HostUnavailableError) as info:
        call(host, operation, tmp_path)
    assert info.value.host == host.name and info.value.transient
    assert "missing" in info.value.message
    assert not (tmp_path / "mnt").exists()
    assert not (tmp_path / "fetched").exists()


def test_a_batch_into_a_missing_root_fails_every_file_and_creates_nothing(tmp_path):
    root = tmp_path / "not" / "yet"
    for fsync in (True, False):
        host = FolderHost(str(root), fsync=fsync)
        results = host.upload_batch(batch_of(tmp_path, 3))
        assert len(results) == 3 and all(isinstance(r, HostUnavailableError) for r in results)
    assert not (tmp_path / "not").exists()


MARKER = ".cloudmanager-host"  # FolderHost.MARKER_NAME


def test_the_first_upload_adopts_an_empty_folder_and_writes_the_marker(host, root, tmp_path):
    assert os.listdir(root) == [] and not host.has_marker() and not host.require_marker
    data = b"first"
    host.upload(str(put(tmp_path, data)), sha(data))
    assert host.has_marker()
    assert sorted(os.listdir(root)) == sorted([MARKER, sha(data)])  # no temp left
    assert b"cloudmanager" in (root / MARKER).read_bytes()
    assert dict(host.list()) == {sha(data): len(data)}  # the marker is no object
    # A second upload leaves the marker as it is.
    stamp = (root / MARKER).stat().st_mtime_ns
    other = b"second"
    host.upload(str(put(tmp_path, other, "o.bin")), sha(other))
    assert (root / MARKER).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("fsync", [False, True])
def test_a_batch_writes_the_marker_too(root, tmp_path, fsync):
    host = FolderHost(str(root), fsync=fsync)
    items = batch_of(tmp_path, 2)
    assert all(isinstance(r, Location) for r in host.upload_batch(items))
    assert host.has_marker()
    assert sorted(os.listdir(root)) == sorted([MARKER] + [d for _, d in items])


def test_a_publish_writes_the_marker_and_a_staging_does_not(host, root):
    staged = host.stage(ForwardStream(b"staged"), 6)
    assert not host.has_marker()  # bytes that may never be published
    [name] = os.listdir(root)
    assert name.startswith(".cloudmanager-staging-") and os.path.dirname(staged.temp) == str(root)
    staged.publish(sha(b"staged"))
    assert host.has_marker() and sorted(os.listdir(root)) == sorted([MARKER, sha(b"staged")])


def test_a_staging_root_unmounted_before_the_publish_is_an_outage(root, tmp_path):
    host = FolderHost(str(root), fsync=False, require_marker=True)
    host.mark()
    staged = host.stage(ForwardStream(b"staged"), 6)
    away = unmount(root)
    with pytest.raises(HostUnavailableError):
        staged.publish(sha(b"staged"))
    assert os.listdir(root) == []  # nothing written onto the mount point
    remount(root, away)
    staged.abort()
    assert os.listdir(root) == [MARKER]


def test_a_failed_upload_writes_no_marker(host, root, tmp_path):
    with pytest.raises(TransientHostError):
        host.upload(str(tmp_path / "does-not-exist"), sha(b"x"))
    assert os.listdir(root) == [] and not host.has_marker()


def test_require_marker_is_an_option_and_an_attribute(root, tmp_path):
    assert FolderHost(str(root), require_marker=True).require_marker is True
    assert from_spec("dir:" + str(root), require_marker=True).require_marker is True
    host = FolderHost(str(root), fsync=False)
    host.require_marker = True  # what the core does once the catalog records copies here
    with pytest.raises(HostUnavailableError, match="marker"):
        call(host, "upload", tmp_path)
    assert os.listdir(root) == []  # an unmarked folder is not adopted any more


def unmount(root):
    """Simulate an unmounted disk: the real folder goes away, an empty mount point stays."""
    away = root.with_name(root.name + ".mounted")
    os.rename(root, away)
    root.mkdir()
    return away


def remount(root, away):
    os.rmdir(root)
    os.rename(away, root)


@pytest.mark.parametrize("operation", ALL_OPERATIONS)
def test_with_require_marker_an_empty_mount_point_is_an_outage(root, tmp_path, operation):
    host = FolderHost(str(root), fsync=False)
    data = b"probe"
    location = host.upload(str(put(tmp_path, data)), sha(data))
    host.require_marker = True
    away = unmount(root)
    # Not "not found": that would get every copy on the disk marked missing.
    with pytest.raises(HostUnavailableError) as info:
        call(host, operation, tmp_path, data)
    assert "unmounted" in info.value.message and info.value.transient
    assert os.listdir(root) == []  # nothing written onto the mount point
    assert not (tmp_path / "fetched").exists()
    remount(root, away)
    assert host.exists(location.url)
    host.download(location.url, str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == data
    call(host, operation, tmp_path, data)  # and it works again


def test_with_require_marker_and_the_marker_there_a_missing_object_is_not_found(root, tmp_path):
    host = FolderHost(str(root), fsync=False)
    host.upload(str(put(tmp_path, b"x")), sha(b"x"))
    host.require_marker = True
    missing = "file://" + str(root) + "/" + sha(b"never stored")
    with pytest.raises(HostNotFoundError):
        host.download(missing, str(tmp_path / "d"))
    with pytest.raises(HostNotFoundError):
        host.stat(missing)
    assert host.exists(missing) is False
    host.delete(missing)  # still not an error
    assert dict(host.list()) == {sha(b"x"): 1}


def test_without_require_marker_an_unmarked_folder_behaves_as_before(root, tmp_path):
    (root / sha(b"old")).write_bytes(b"old")  # copies from before markers existed
    host = FolderHost(str(root), fsync=False)
    url = "file://" + str(root) + "/" + sha(b"old")
    assert host.exists(url) and host.stat(url).size == 3
    assert dict(host.list()) == {sha(b"old"): 3}
    with pytest.raises(HostNotFoundError):
        host.stat("file://" + str(root) + "/" + sha(b"never"))


def test_mark_upgrades_a_folder_from_before_markers(root, tmp_path):
    (root / sha(b"old")).write_bytes(b"old")
    url = "file://" + str(root) + "/" + sha(b"old")
    host = FolderHost(str(root), fsync=False, require_marker=True)
    with pytest.raises(HostUnavailableError):
        host.stat(url)
    host.mark()
    assert host.has_marker() and host.stat(url).size == 3
    host.mark()  # marking twice is harmless
    assert sorted(os.listdir(root)) == sorted([MARKER, sha(b"old")])


def test_mark_never_creates_the_root(tmp_path):
    host = FolderHost(str(tmp_path / "gone" / "pool"), fsync=False)
    with pytest.raises(HostUnavailableError, match="missing"):
        host.mark()
    assert not (tmp_path / "gone").exists()


def test_only_the_folder_host_declares_a_marker(host):
    from cloudmanager.hosts.base import Host
    from cloudmanager.hosts.memory import MemoryHost

    assert host.can_mark and not Host.can_mark and not MemoryHost.can_mark
