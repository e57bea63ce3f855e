"""cloudmanager.cache.layout: the one owner of the storage directory's names.

The AST test walks every module of the package and fails on what builds a
shard path or a temp-file name of the storage directory anywhere but
``cache/layout.py``:

- a slice ``x[:2]`` (a hash's shard);
- ``02x`` in a string or a format spec (the shard names);
- the string ``"tmp"`` (the temp directory's name);
- ``%s-%d`` in a string (a token and a reservation id: a temp name);
- ``.tmp`` in a string, ``... + "."`` (a name prefix), ``.lstrip(".")``
  or ``.split("-")`` (the parse of a temp name back to its token).

``fsutil.py`` and ``hosts/`` may name their own temp files (``.tmp``) and
prefixes (``+ "."``): they write beside a destination they are given, and
their names start with that destination's name, so in the temp directory
they start with the session's token too (the test of temp names below).
Docstrings are text, not names, and are skipped.
"""

import ast
import os
from pathlib import Path

import pytest

import cloudmanager
from cloudmanager import fsutil
from cloudmanager.cache import layout
from cloudmanager.cache.layout import Layout

PACKAGE = Path(cloudmanager.__file__).resolve().parent
OWNER = "cache/layout.py"
#: Modules that name temp files beside a destination they are given.
BESIDE_A_DESTINATION = ("fsutil.py", "hosts/")


def docstrings(tree):
    """The ids of the string constants that are docstrings."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def violations(source, relpath):
    """What in ``source`` (the text of ``cloudmanager/<relpath>``) builds a
    storage-directory name outside the layout, as ``[(line, what)]``."""
    beside = relpath.startswith(BESIDE_A_DESTINATION)
    tree = ast.parse(source)
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):
            s = node.slice
            if s.lower is None and s.step is None and isinstance(s.upper, ast.Constant) \
                    and s.upper.value == 2:
                found.append((node.lineno, "a [:2] slice (a shard)"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            if "02x" in text:
                found.append((node.lineno, "02x (a shard name)"))
            if text == layout.TEMP_DIR:
                found.append((node.lineno, "%r (the temp directory)" % text))
            if "%s-%d" in text:
                found.append((node.lineno, "%s-%d (a token and an id: a temp name)"))
            if ".tmp" in text and not beside:
                found.append((node.lineno, "%r (a temp-file name)" % text))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) \
                and isinstance(node.right, ast.Constant) and node.right.value == "." \
                and not beside:
            found.append((node.lineno, '... + "." (a temp-name prefix)'))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.args and isinstance(node.args[0], ast.Constant):
            method, arg = node.func.attr, node.args[0].value
            if (method, arg) in (("lstrip", "."), ("split", "-"), ("rsplit", "-")):
                found.append((node.lineno, ".%s(%r) (a temp-name parse)" % (method, arg)))
    return found


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel != OWNER:
            yield path, rel


def test_the_package_is_walked():
    names = {rel for _, rel in package_modules()}
    assert {"cache/store.py", "cache/fsck.py", "engine.py", "pool.py", "fsutil.py"} <= names
    assert OWNER not in names and len(names) >= 30


@pytest.mark.parametrize("path,rel", list(package_modules()), ids=[r for _, r in package_modules()])
def test_only_the_layout_names_the_storage_directory(path, rel):
    found = violations(path.read_text(encoding="utf-8"), rel)
    assert not found, "%s builds a storage-directory name (ask cache/layout.py):\n%s" % (
        path, "\n".join("  line %d: %s" % hit for hit in found))


def test_the_layout_itself_would_be_caught():
    source = (PACKAGE / OWNER).read_text(encoding="utf-8")
    assert len(violations(source, "cache/store.py")) >= 6


@pytest.mark.parametrize("source", [
    "os.path.join(root, file_hash[:2], file_hash)",
    "shard = '%02x' % i",
    "shard = f'{i:02x}'",
    "shard = '{:02x}'.format(i)",
    "os.path.join(root, 'tmp')",
    "temp = '%s-%d.tmp' % (token, rid)",
    "stem = '%s-%d' % (token, rid)",
    "prefix = os.path.basename(dest) + '.'",
    "token = name.lstrip('.').split('-', 1)[0]",
    "token = name.split('-')[0]",
])
def test_the_check_catches_what_it_forbids(source):
    assert violations(source, "engine.py"), source


@pytest.mark.parametrize("source,rel", [
    ('"""A docstring may say tmp/<token>-<id>.tmp and ab/abcd."""', "engine.py"),
    ("short = file_hash[:12]", "reports.py"),
    ("name = '%s%s.tmp' % (prefix, rnd)", "fsutil.py"),
    ("temp = '%s/.%s.%s.tmp' % (root, name, rnd)", "hosts/fsspec.py"),
    ("prefix = os.path.basename(dest) + '.'", "hosts/plowshare.py"),
    ("prefix = layout.download_prefix(dest)", "engine.py"),
    ("temp = self.layout.batch_temp(self.token, res.id, k)", "cache/store.py"),
])
def test_the_check_lets_the_layout_calls_through(source, rel):
    assert violations(source, rel) == []


# -- the names -------------------------------------------------------------------------


def test_paths_are_under_the_right_shard(tmp_path):
    lay = Layout(str(tmp_path))
    digest = "ab" + "0" * 62
    assert lay.path(digest) == os.path.join(str(tmp_path), "ab", digest)
    assert lay.shard_dir(digest) == os.path.join(str(tmp_path), "ab")
    assert len(layout.SHARDS) == 256 and layout.SHARDS[0] == "00" and layout.SHARDS[-1] == "ff"


def test_temp_names_parse_back_to_their_session(tmp_path):
    """Every temp file written in the temp directory, whoever names it, parses
    back to the token of the session whose reservation it serves."""
    lay = Layout(str(tmp_path))
    lay.prepare()
    token = "0123456789abcdef"
    reservation = lay.reservation_temp(token, 7)
    batch_item = lay.batch_temp(token, 7, 3)
    fd, attempt = fsutil.open_temp(lay.tmp_dir, layout.download_prefix(reservation))
    os.close(fd)
    # A host writing beside the attempt (fsutil.atomic_write: a hidden name).
    with fsutil.atomic_write(attempt, fsync=False) as out:
        hidden = [n for n in os.listdir(lay.tmp_dir) if n.startswith(".")]
        out.write(b"x")
    names = [os.path.basename(p) for p in (reservation, batch_item, attempt)] + hidden
    assert len(names) == 4
    for name in names:
        assert os.path.dirname(os.path.join(lay.tmp_dir, name)) == lay.tmp_dir
        assert layout.temp_token(name) == token, name


# -- the walks -------------------------------------------------------------------------


def test_scans_without_remove_change_nothing(tmp_path):
    lay = Layout(str(tmp_path / "store"))
    lay.prepare()
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    os.symlink(outside, os.path.join(lay.root, "ab", "ab" * 32))
    (Path(lay.root) / "cd" / "junk").write_bytes(b"j")
    os.rmdir(os.path.join(lay.root, "ef"))
    os.symlink(tmp_path, os.path.join(lay.root, "ef"))
    (Path(lay.tmp_dir) / "deadbeef-1.tmp").write_bytes(b"t")
    before = sorted(os.walk(lay.root))
    walk = lay.scan_shards(remove=False)
    temps = lay.scan_temps(lambda token: False, remove=False)
    assert walk.files == {} and walk.removed == 0
    assert walk.foreign == sorted([os.path.join("ab", "ab" * 32), os.path.join("cd", "junk"),
                                   "ef"])
    assert temps == layout.TempScan([os.path.join("tmp", "deadbeef-1.tmp")], 0)
    assert sorted(os.walk(lay.root)) == before and outside.read_bytes() == b"keep"


def test_scan_temps_spares_live_sessions(tmp_path):
    lay = Layout(str(tmp_path / "store"))
    lay.prepare()
    for name in ("live-1.tmp", "live-1.tmp.abc.tmp", ".live-1.tmp.x.tmp", "dead-2.tmp"):
        (Path(lay.tmp_dir) / name).write_bytes(b"t")
    os.mkdir(os.path.join(lay.tmp_dir, "dead-3.tmp.workdir"))
    temps = lay.scan_temps({"live"}.__contains__, remove=True)
    assert temps.stale == ["tmp/dead-2.tmp", "tmp/dead-3.tmp.workdir"] and temps.removed == 2
    assert sorted(os.listdir(lay.tmp_dir)) == [".live-1.tmp.x.tmp", "live-1.tmp",
                                                "live-1.tmp.abc.tmp"]


def test_prepare_keeps_no_symlinked_directory(tmp_path):
    lay = Layout(str(tmp_path / "store"), dir_mode=0o750)
    lay.prepare()
    os.rmdir(lay.tmp_dir)
    os.symlink(tmp_path, lay.tmp_dir)
    lay.prepare()
    assert not os.path.islink(lay.tmp_dir) and os.path.isdir(lay.tmp_dir)
    assert (os.stat(os.path.join(lay.root, "00")).st_mode & 0o777) == 0o750
