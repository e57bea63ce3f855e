"""fsutil.copy_file: the folder host's copy (sendfile, or a buffer where the
filesystem has no splice support), atomic and private."""

import errno
import os
import stat

import pytest

from cloudmanager import fsutil


@pytest.mark.parametrize("size", [0, 1, 4096, fsutil.CHUNK + 1, 3 * fsutil.CHUNK])
@pytest.mark.parametrize("path", ["sendfile", "buffer"])
def test_copy_file_is_exact_private_and_leaves_no_temp(tmp_path, monkeypatch, size, path):
    if path == "buffer":
        def no_splice(*args):
            raise OSError(errno.EINVAL, "no splice here")
        monkeypatch.setattr(os, "sendfile", no_splice, raising=False)
    data = os.urandom(size)
    src, dest_dir = tmp_path / "src", tmp_path / "dest"
    src.write_bytes(data)
    dest_dir.mkdir()
    (dest_dir / "obj").write_bytes(b"an older copy is replaced")
    fsutil.copy_file(str(src), str(dest_dir / "obj"), fsync=True)
    assert (dest_dir / "obj").read_bytes() == data
    assert stat.S_IMODE(os.stat(dest_dir / "obj").st_mode) == fsutil.FILE_MODE
    assert os.listdir(dest_dir) == ["obj"]


def test_copy_file_failing_midway_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    src, dest = tmp_path / "src", tmp_path / "obj"
    src.write_bytes(b"x" * 3 * fsutil.CHUNK)
    dest.write_bytes(b"old")
    calls = []

    def failing(out_fd, in_fd, offset, count):
        calls.append(offset)
        if offset:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(out_fd, os.pread(in_fd, count, offset))

    monkeypatch.setattr(os, "sendfile", failing, raising=False)
    with pytest.raises(OSError) as err:
        fsutil.copy_file(str(src), str(dest))
    assert err.value.errno == errno.ENOSPC and len(calls) == 2
    assert dest.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["obj", "src"]


def test_copy_file_of_a_missing_source_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        fsutil.copy_file(str(tmp_path / "missing"), str(tmp_path / "obj"))
    assert os.listdir(tmp_path) == []


def test_copy_to_temp_leaves_a_temp_beside_the_target_and_no_target(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"half of copy_file")
    (tmp_path / "dest").mkdir()
    temp = fsutil.copy_to_temp(str(src), str(tmp_path / "dest" / "obj"), fsync=False)
    assert os.path.dirname(temp) == str(tmp_path / "dest") and temp.endswith(".tmp")
    assert os.listdir(tmp_path / "dest") == [os.path.basename(temp)]
    with open(temp, "rb") as f:
        assert f.read() == b"half of copy_file"


@pytest.mark.skipif(not fsutil.sync_filesystem_available(), reason="needs Linux 5.8+ syncfs")
def test_sync_filesystem_runs_and_reports_a_bad_path(tmp_path):
    fsutil.sync_filesystem(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        fsutil.sync_filesystem(str(tmp_path / "missing"))
