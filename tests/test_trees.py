"""Trees: directories recorded by name as manifests in the pool, and restored.

Real pools (SQLite files, folder hosts), real directories. Manifests from
another node are untrusted: the hostile ones here are refused whole, with the
path named, before anything is written.
"""

import json
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudmanager import trees
from cloudmanager.errors import TreeError, UnsafePathError
from cloudmanager.trees import TreeEntry
from helpers import sha

H = "ab" * 32


def make_tree(root, files):
    """Write ``{relpath: (bytes, mode, mtime)}`` under ``root``."""
    for rel, (data, mode, mtime) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, mode)
        os.utime(path, (mtime, mtime))
    return root


def snapshot(root):
    """``{relpath: (bytes, mode, mtime_ns)}`` of every regular file under ``root``."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), stat.S_IMODE(st_.st_mode),
                                                    st_.st_mtime_ns)
    return out


SAMPLE = {
    "a.txt": (b"alpha\n", 0o644, 1_600_000_000),
    "bin/run.sh": (b"#!/bin/sh\necho hi\n", 0o755, 1_600_000_100),
    "deep/er/still/z": (b"", 0o600, 1_500_000_000),
    "deep/er/same.txt": (b"alpha\n", 0o640, 1_600_000_200),  # same content as a.txt
    "uni/\u00e9t\u00e9 \u2603.txt": (b"snow" * 1000, 0o644, 1_700_000_000),
}


def manifest(entries, **top):
    doc = {"format": "cloudmanager-tree", "version": 1, "entries": entries}
    doc.update(top)
    return json.dumps(doc).encode()


def entry(path, **kw):
    e = {"path": path, "hash": H, "size": 1, "mode": 0o644, "mtime_ns": 0}
    e.update(kw)
    return e


# -- the format -------------------------------------------------------------------------

def test_the_manifest_is_canonical_and_round_trips():
    a = TreeEntry("b/x", H, 3, 0o644, 5)
    b = TreeEntry("a", "cd" * 32, 0, 0o600, -1)
    data = trees.encode([a, b])
    assert data == trees.encode([b, a])  # order of the input does not matter
    assert data.endswith(b"\n") and b" " not in data
    doc = json.loads(data)
    assert list(doc) == sorted(doc) and [e["path"] for e in doc["entries"]] == ["a", "b/x"]
    assert trees.decode(data) == [b, a]


@pytest.mark.parametrize("path, why", [
    ("../etc/passwd", "'..' as a component"),
    ("a/../../x", "'..' as a component"),
    ("/etc/passwd", "an absolute path"),
    ("a//b", "an empty component"),
    ("a/", "an empty component"),
    ("./a", "'.' as a component"),
    ("", "empty"),
    ("a\x00b", "a NUL byte"),
    ("a\\..\\b", "a backslash"),
    ("C:x", "a drive letter"),
    ("dir/CON", "device name"),
    ("nul.txt", "device name"),
    ("Com1.tar.gz", "device name"),
    ("x" * 256, "longer than 255"),
    ("\udcff", "not valid UTF-8"),
])
def test_hostile_paths_are_refused_whole_naming_the_path(path, why):
    data = json.dumps({"format": "cloudmanager-tree", "version": 1,
                       "entries": [entry("fine.txt"), entry(path)]}).encode("utf-8",
                                                                            "surrogatepass")
    with pytest.raises(UnsafePathError, match=why) as info:
        trees.decode(data)
    assert info.value.path == path


@pytest.mark.parametrize("entries, why", [
    ([entry("a"), entry("a")], "listed twice"),
    ([entry("a"), entry("a/b")], "'a' is a file in the same tree"),
    ([entry("x/a"), entry("x/a/b/c")], "'x/a' is a file"),
])
def test_duplicates_and_a_file_where_a_directory_must_be_are_refused(entries, why):
    with pytest.raises(UnsafePathError, match=why):
        trees.decode(manifest(entries))


@pytest.mark.parametrize("data, why", [
    (b"\xff\xfe", "not JSON"),
    (b"[]", "no \"format\""),
    (manifest([], version=2), "version 2"),
    (manifest([], extra=1), "exactly format, version and entries"),
    (manifest([entry("a", size=-1)]), "size must be"),
    (manifest([entry("a", size=True)]), "size must be"),
    (manifest([entry("a", mode=0o4755)]), "mode must be"),
    (manifest([entry("a", mtime_ns="1")]), "mtime_ns must be"),
    (manifest([entry("a", hash="../x")]), "not a SHA-256"),
    (manifest([entry("a", hash=H.upper())]), "lowercase"),
    (manifest([dict(entry("a"), owner="root")]), "fields must be exactly"),
    (manifest(["a"]), "not an object"),
])
def test_malformed_manifests_are_refused(data, why):
    with pytest.raises(TreeError, match=why):
        trees.decode(data)


_component = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00"),
                     min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(_component, min_size=1, max_size=5))
def test_any_path_accepted_stays_below_the_destination(parts):
    """Whatever a manifest's path is, if it is accepted, joining it to a
    destination and normalising it stays below that destination."""
    path = "/".join(parts)
    try:
        trees.check_path(path)
    except UnsafePathError:
        return
    dest = "/d/e/s/t"
    assert os.path.normpath(os.path.join(dest, path)).startswith(dest + "/")
    assert ".." not in path.split("/") and not path.startswith("/")


# -- upload, list, read, dump and load ----------------------------------------------------

def test_a_tree_is_made_listed_read_and_travels_to_another_node(make_pool, tmp_path):
    src = make_tree(tmp_path / "photos", SAMPLE)
    one = make_pool(1 << 20, name="one")
    tree = one.upload_tree(src)
    assert isinstance(tree, str) and len(tree) == 64
    # The manifest is an ordinary file of the pool, with copies on the hosts.
    assert one.info(tree)["filename"] == "photos.cmtree"
    assert one.status(tree)["copies"] == 3
    assert [(t["hash"], t["name"]) for t in one.trees()] == [(tree, "photos")]
    listed = one.tree_entries(tree)
    assert [e["path"] for e in listed] == sorted(SAMPLE)
    by_path = {e["path"]: e for e in listed}
    assert by_path["bin/run.sh"]["mode"] == 0o755
    assert by_path["a.txt"]["mtime_ns"] == 1_600_000_000 * 10**9
    assert by_path["a.txt"]["hash"] == sha(b"alpha\n") == by_path["deep/er/same.txt"]["hash"]
    # The same tree again: the same manifest, one tree.
    assert one.upload_tree(src) == tree and len(one.trees()) == 1

    # Another node, its own catalog and cache, the same hosts: it learns the
    # tree from the records, and restores it byte for byte.
    two = make_pool(1 << 20, name="two")
    assert two.data_load(one.data_dump()) >= len(SAMPLE)
    assert [(t["hash"], t["name"]) for t in two.trees()] == [(tree, "photos")]
    dest = tmp_path / "restored"
    summary = two.restore_tree(tree, dest)
    assert summary["ok"] and summary["fetched"] == len(SAMPLE) and summary["failed"] == []
    assert snapshot(dest) == snapshot(src)
    # Again: nothing to do.
    again = two.restore_tree(tree, dest)
    assert again["fetched"] == 0 and again["unchanged"] == len(SAMPLE)
    assert {a for a, _ in again["actions"]} == {"keep"}


def test_a_failed_file_means_no_tree(make_pool, tmp_path, caplog):
    src = make_tree(tmp_path / "d", {"a": (b"a", 0o644, 1), "b": (b"b", 0o644, 1)})
    os.mkfifo(src / "pipe")
    cm = make_pool()
    assert cm.upload_tree(src) is False
    assert "no tree recorded" in caplog.text and "pipe" in caplog.text
    assert cm.trees() == []
    assert cm.exists(sha(b"a"))  # the files that went stay


def test_upload_tree_refuses_a_file_and_restore_a_missing_tree(make_pool, tmp_path):
    cm = make_pool()
    (tmp_path / "f").write_bytes(b"x")
    assert cm.upload_tree(tmp_path / "f") is False
    assert cm.restore_tree("0" * 64, tmp_path / "out") is None
    assert cm.restore_tree("not a hash", tmp_path / "out") is None
    assert cm.tree_entries("0" * 64) is None
    # A file of the pool that is not a manifest: refused, nothing made.
    plain = cm.upload(tmp_path / "f")
    assert cm.tree_entries(plain) is False
    assert cm.restore_tree(plain, tmp_path / "out") is False
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


# -- restore: resuming, conflicts, the destination --------------------------------------

@pytest.fixture
def uploaded(make_pool, tmp_path):
    src = make_tree(tmp_path / "src_tree", SAMPLE)
    cm = make_pool(1 << 20)
    return cm, cm.upload_tree(src), src


def test_restore_resumes_and_mends_mode_and_mtime(uploaded, tmp_path):
    cm, tree, src = uploaded
    dest = tmp_path / "out"
    assert cm.restore_tree(tree, dest)["ok"]
    # As an interrupted run leaves it: a file missing, a temp file left, one
    # file with the right bytes but not yet its mode and mtime.
    os.unlink(dest / "bin/run.sh")
    (dest / "deep" / "er" / ".cm-restore-0123.part").write_bytes(b"partial")
    os.chmod(dest / "a.txt", 0o600)
    os.utime(dest / "a.txt", (5, 5))
    summary = cm.restore_tree(tree, dest)
    assert summary["ok"] and summary["fetched"] == 1
    assert dict((p, a) for a, p in summary["actions"])["a.txt"] == "touch"
    assert snapshot(dest) == snapshot(src)  # the temp file is gone too


def test_restore_reports_bytes_as_they_arrive(make_pool, tmp_path):
    """The progress callback hears of a large file's bytes while they move
    (not once it is done), and in all of every file's bytes and count."""
    src = make_tree(tmp_path / "src_tree", {"big.bin": (os.urandom(3 << 20), 0o644, 1e9),
                                             "small.txt": (b"small", 0o600, 1e9)})
    cm = make_pool(16 << 20)
    tree = cm.upload_tree(src)
    cm.evict(0)  # fetched from the hosts, chunk by chunk
    calls = []
    summary = cm.restore_tree(tree, tmp_path / "out",
                              progress=lambda nbytes, nfiles: calls.append((nbytes, nfiles)))
    assert summary["ok"] and summary["fetched"] == 2
    assert sum(n for n, _ in calls) == (3 << 20) + 5 and sum(f for _, f in calls) == 2
    assert len([n for n, f in calls if n and not f]) > 1  # bytes before their file ended
    assert snapshot(tmp_path / "out") == snapshot(src)


def test_dry_run_writes_nothing(uploaded, tmp_path):
    cm, tree, _ = uploaded
    dest = tmp_path / "nowhere"
    summary = cm.restore_tree(tree, dest, dry_run=True)
    assert summary["fetched"] == len(SAMPLE) and {a for a, _ in summary["actions"]} == {"fetch"}
    assert summary["fetched_bytes"] == sum(len(d) for d, _, _ in SAMPLE.values())
    assert not dest.exists()


def test_a_file_that_differs_is_kept_unless_forced(uploaded, tmp_path):
    cm, tree, src = uploaded
    dest = tmp_path / "out"
    (dest / "bin").mkdir(parents=True)
    (dest / "a.txt").write_bytes(b"my own text")
    (dest / "bin" / "run.sh").mkdir()  # a directory in the way
    summary = cm.restore_tree(tree, dest)
    assert not summary["ok"]
    assert sorted(p for p, _ in summary["conflicts"]) == ["a.txt", "bin/run.sh"]
    assert (dest / "a.txt").read_bytes() == b"my own text"
    assert (dest / "deep/er/same.txt").read_bytes() == b"alpha\n"  # the rest came
    forced = cm.restore_tree(tree, dest, force=True)
    assert [p for p, _ in forced["conflicts"]] == ["bin/run.sh"]  # never a directory
    assert (dest / "a.txt").read_bytes() == b"alpha\n"


def test_a_symlink_inside_the_destination_is_never_followed(uploaded, tmp_path):
    cm, tree, _ = uploaded
    dest = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    os.symlink(outside, dest / "deep")  # a directory of the tree, pointing out
    os.symlink(outside / "victim", dest / "a.txt")  # a file of the tree, pointing out
    (outside / "victim").write_bytes(b"keep me")
    for force in (False, True):
        summary = cm.restore_tree(tree, dest, force=force)
        assert not summary["ok"]
        reasons = dict(summary["conflicts"])
        assert "deep in the destination is a symbolic link" in reasons["deep/er/same.txt"]
        assert "refusing path 'deep/er/still/z'" in reasons["deep/er/still/z"]
        assert os.listdir(outside) == ["victim"]
        assert (outside / "victim").read_bytes() == b"keep me"
    # With force, the link named a.txt was replaced by the file (the link, not its target).
    assert not os.path.islink(dest / "a.txt") and (dest / "a.txt").read_bytes() == b"alpha\n"


def test_a_manifest_that_lies_about_sizes_fails_those_paths(make_pool, tmp_path):
    cm = make_pool()
    real = cm.upload(tmp_path.joinpath("r").write_bytes(b"real") and tmp_path / "r")
    hostile = [TreeEntry("ok", real, 4, 0o644, 0), TreeEntry("lies", real, 99, 0o644, 0),
               TreeEntry("unknown", "ee" * 32, 1, 0o644, 0)]
    summary = trees.restore(cm.pool, hostile, tmp_path / "out")
    failed = dict(summary.failed)
    assert "says 99 bytes" in failed["lies"] and "not in the pool" in failed["unknown"]
    assert os.listdir(tmp_path / "out") == ["ok"]


def test_a_hostile_manifest_from_another_node_writes_nothing(make_pool, tmp_path, caplog):
    """A record named like a manifest, loaded from another node, whose bytes
    hold an escaping path: `cm trees` lists it (by its name), restoring it is
    refused whole, naming the path."""
    one = make_pool(name="one")
    payload = tmp_path / "evil.cmtree"
    payload.write_bytes(manifest([entry("ok.txt"), entry("../../escaped")]))
    evil = one.upload(payload)
    two = make_pool(name="two")
    two.data_load(one.data_dump())
    assert [t["name"] for t in two.trees()] == ["evil"]
    assert two.restore_tree(evil, tmp_path / "dest") is False
    assert "refusing path '../../escaped'" in caplog.text
    assert not (tmp_path / "dest").exists() or os.listdir(tmp_path / "dest") == []
    assert not (tmp_path / "escaped").exists()


def test_jobs_out_of_range_are_refused(uploaded, tmp_path):
    cm, tree, _ = uploaded
    assert cm.restore_tree(tree, tmp_path / "o", jobs=0) is False
    assert cm.restore_tree(tree, tmp_path / "o", jobs=99) is False


def test_a_hard_link_in_the_destination_is_replaced_not_changed(uploaded, tmp_path):
    """An identical file in DEST that is a hard link to a file outside: its
    mode and mtime are not set through the link (that would change the
    outside file); a fresh file takes its name."""
    cm, tree, _ = uploaded
    dest = tmp_path / "out"
    dest.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"alpha\n")
    os.chmod(outside, 0o604)
    os.utime(outside, (7, 7))
    os.link(outside, dest / "a.txt")
    summary = cm.restore_tree(tree, dest)
    assert summary["ok"] and ("fetch", "a.txt") in summary["actions"]
    st_out = os.stat(outside)
    assert (stat.S_IMODE(st_out.st_mode), st_out.st_mtime, st_out.st_nlink) == (0o604, 7, 1)
    st_in = os.stat(dest / "a.txt")
    assert (stat.S_IMODE(st_in.st_mode), st_in.st_mtime) == (0o644, 1_600_000_000)


def test_a_tree_with_files_larger_than_the_cache_restores(make_pool, tmp_path):
    """Files that do not fit the restoring node's cache are streamed from the
    hosts into place, verified, as download does."""
    big = os.urandom(50_000)
    src = make_tree(tmp_path / "big", {"large.bin": (big, 0o644, 1_000_000_000),
                                       "small.txt": (b"s", 0o644, 1_000_000_000)})
    one = make_pool(1 << 20, name="one")
    tree = one.upload_tree(src)
    two = make_pool(10_000, name="two")
    two.data_load(one.data_dump())
    summary = two.restore_tree(tree, tmp_path / "out", jobs=2)
    assert summary["ok"] and summary["fetched"] == 2
    assert snapshot(tmp_path / "out") == snapshot(src)
    assert not two.on_cache(sha(big))


def test_a_deferred_tree_is_queued_with_its_files(make_pool, tmp_path):
    src = make_tree(tmp_path / "later", {"x": (b"x", 0o644, 1)})
    cm = make_pool()
    tree = cm.upload_tree(src, defer=True)
    assert [t["hash"] for t in cm.trees()] == [tree]
    assert cm.status(tree)["copies"] == 0 and cm.stats()["queued"] == 2
    cm.sync()
    assert cm.status(tree)["copies"] == 3
