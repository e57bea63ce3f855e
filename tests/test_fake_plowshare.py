"""Tests for the fake plowup/plowdown executables in tests/fakes/.

The fakes are run as real subprocesses found through PATH, exactly as the
library will run them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

FAKES = Path(__file__).resolve().parent / "fakes"
sys.path.insert(0, str(FAKES))

import fakeplow  # noqa: E402

DL_RE = re.compile(r"http://([a-z0-9_]+)\.fake/dl/([0-9a-f]{16})")


def run(tool, *args, state, cwd=None, timeout=30, env_extra=None):
    env = dict(os.environ)
    env["PATH"] = f"{FAKES}{os.pathsep}{env.get('PATH', '')}"
    env["FAKE_PLOWSHARE_DIR"] = str(state)
    if env_extra is not None:
        env.update(env_extra)
    return subprocess.run(
        [tool, *args], cwd=cwd, env=env, capture_output=True, timeout=timeout
    )


def upload(state, tmp_path, data=b"hello world", name="f.bin", module="mod", dest=None):
    src = tmp_path / name
    src.write_bytes(data)
    arg = str(src) if dest is None else f"{src}:{dest}"
    res = run("plowup", module, arg, state=state)
    assert res.returncode == 0, res.stderr
    return res.stdout.decode().splitlines()[-1]


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    return d


def test_missing_state_env_is_fatal(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FAKE_PLOWSHARE_DIR"}
    env["PATH"] = f"{FAKES}{os.pathsep}{env.get('PATH', '')}"
    for tool in ("plowup", "plowdown"):
        res = subprocess.run([tool, "x"], env=env, capture_output=True, cwd=tmp_path)
        assert res.returncode == 1
        assert len(res.stderr.decode().strip().splitlines()) == 1
        assert res.stdout == b""


def test_upload_download_roundtrip_and_log(state, tmp_path):
    payload = bytes(range(256)) * 10
    (tmp_path / "in.bin").write_bytes(payload)
    up = run("plowup", "-v", "3", "mymod", "in.bin", "-q", state=state, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    lines = up.stdout.decode().splitlines()
    assert len(lines) == 2
    m = DL_RE.fullmatch(lines[1])
    assert m and m.group(1) == "mymod"
    assert lines[0] == f"#DEL http://mymod.fake/del/{m.group(2)}"
    objs = fakeplow.stored_objects(state, "mymod")
    assert objs == [state / "store" / "mymod" / m.group(2) / "in.bin"]
    assert objs[0].read_bytes() == payload

    out = tmp_path / "out"
    out.mkdir()
    down = run("plowdown", "-o", str(out), lines[1], state=state, cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert down.stdout.decode() == f"{out / 'in.bin'}\n"
    assert (out / "in.bin").read_bytes() == payload

    log = fakeplow.read_log(state)
    assert [e["tool"] for e in log] == ["plowup", "plowdown"]
    assert log[0]["argv"] == ["-v", "3", "mymod", "in.bin", "-q"]
    assert log[0]["cwd"] == str(tmp_path)


def test_destname_splitting_rules(state, tmp_path):
    # FILE:DESTNAME with spaces and non-ASCII in the remote name
    (tmp_path / "a.txt").write_bytes(b"A")
    assert run("plowup", "m", "a.txt:remote näme.bin", state=state, cwd=tmp_path).returncode == 0
    # ':' followed by text containing '/' is part of the path, not a DESTNAME
    (tmp_path / "d:x").mkdir()
    (tmp_path / "d:x" / "b.txt").write_bytes(b"B")
    assert run("plowup", "m", "d:x/b.txt", state=state, cwd=tmp_path).returncode == 0
    # split happens on the LAST ':' only
    (tmp_path / "c:1").write_bytes(b"C")
    assert run("plowup", "m", "c:1:dest", state=state, cwd=tmp_path).returncode == 0
    # a file name starting with '-' after '--'
    (tmp_path / "-dash").write_bytes(b"D")
    assert run("plowup", "m", "--", "-dash", state=state, cwd=tmp_path).returncode == 0

    stored = {p.name: p.read_bytes() for p in fakeplow.stored_objects(state, "m")}
    assert stored == {"remote näme.bin": b"A", "b.txt": b"B", "dest": b"C", "-dash": b"D"}


def test_plowup_error_codes(state, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    assert run("plowup", "m", "missing.bin", state=state, cwd=tmp_path).returncode == 8
    assert run("plowup", "m", str(tmp_path), state=state).returncode == 8  # a directory
    assert run("plowup", "m", state=state, cwd=tmp_path).returncode == 15
    assert run("plowup", state=state, cwd=tmp_path).returncode == 15
    assert run("plowup", "Bad-Mod", "f", state=state, cwd=tmp_path).returncode == 2
    # unknown options are tolerated
    assert run("plowup", "--frob=1", "--zap", "m", "f", state=state, cwd=tmp_path).returncode == 0
    assert len(fakeplow.stored_objects(state, "m")) == 1


def test_multiple_files_exit_code_aggregation(state, tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    ok = run("plowup", "m", "a", "b", state=state, cwd=tmp_path)
    assert ok.returncode == 0
    assert len(ok.stdout.decode().splitlines()) == 4
    mixed = run("plowup", "m", "a", "nope", state=state, cwd=tmp_path)
    assert mixed.returncode == 100 + 8  # Plowshare's ERR_FATAL_MULTIPLE + first error
    assert len(mixed.stdout.decode().splitlines()) == 2


def test_plowdown_error_codes(state, tmp_path):
    url = upload(state, tmp_path)
    assert run("plowdown", "http://other.example/dl/0123456789abcdef", state=state, cwd=tmp_path).returncode == 2
    assert run("plowdown", "http://mod.fake/file/0123456789abcdef", state=state, cwd=tmp_path).returncode == 2
    assert run("plowdown", "http://mod.fake/dl/0123456789abcdef", state=state, cwd=tmp_path).returncode == 13
    assert run("plowdown", "http://mod.fake/dl/..", state=state, cwd=tmp_path).returncode == 13
    assert run("plowdown", "-o", str(tmp_path / "nodir"), url, state=state).returncode == 8
    assert run("plowdown", "--frobnicate", url, state=state, cwd=tmp_path).returncode == 15
    assert run("plowdown", state=state, cwd=tmp_path).returncode == 15
    assert run("plowdown", "-o", state=state, cwd=tmp_path).returncode == 15


def test_plowdown_output_dir_forms_and_default_cwd(state, tmp_path):
    url = upload(state, tmp_path, data=b"zz", name="z.dat")
    forms = (
        lambda d: [f"-o{d}", url],
        lambda d: [url, f"--output-directory={d}"],  # options after the URL too
        lambda d: ["-o", str(d), "--", url],
    )
    for i, form in enumerate(forms):
        d = tmp_path / f"o{i}"
        d.mkdir()
        res = run("plowdown", *form(d), state=state, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert (d / "z.dat").read_bytes() == b"zz"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    res = run("plowdown", url, "-q", state=state, cwd=cwd)
    assert res.returncode == 0
    assert (cwd / "z.dat").read_bytes() == b"zz"
    printed = res.stdout.decode().rstrip("\n")
    assert (cwd / printed).resolve() == (cwd / "z.dat").resolve()


def test_run_after_option_is_honoured_even_when_it_came_from_a_url(state, tmp_path):
    url = upload(state, tmp_path, name="spaced name.bin")
    marker = tmp_path / "marker.json"
    prog = tmp_path / "hook.py"
    prog.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(marker)!r}, 'w').write(json.dumps(sys.argv[1:]))\nsys.exit(7)\n"
    )
    prog.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    # A "URL" that is really an option: the fake must treat it as one (trap).
    res = run("plowdown", f"--run-after={prog}", "-o", str(out), url, state=state)
    assert res.returncode == 0  # hook's exit code is ignored
    final = str(out / "spaced name.bin")
    assert res.stdout.decode() == final + "\n"
    assert json.loads(marker.read_text()) == ["mod", url, final]
    marker.unlink()
    res = run("plowdown", "--run-after", str(prog), "-o", str(out), url, state=state)
    assert res.returncode == 0 and marker.exists()


def test_temp_rename_leaves_no_part_file(state, tmp_path):
    url = upload(state, tmp_path, data=b"data", name="t.bin")
    out = tmp_path / "out"
    out.mkdir()
    res = run("plowdown", "--temp-rename", "-o", str(out), url, state=state)
    assert res.returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["t.bin"]
    assert (out / "t.bin").read_bytes() == b"data"


def test_down_fault_and_faults_reread_each_call(state, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    url = upload(state, tmp_path, name="g")
    dl = tmp_path / "dl"
    dl.mkdir()
    fakeplow.set_faults(state, "mod", down=True)
    up = run("plowup", "mod", "f", state=state, cwd=tmp_path)
    down = run("plowdown", url, state=state, cwd=dl)
    assert up.returncode == 3 and up.stderr.strip() and up.stdout == b""
    assert down.returncode == 3 and down.stderr.strip() and down.stdout == b""
    assert len(fakeplow.stored_objects(state, "mod")) == 1
    assert list(dl.iterdir()) == []
    # faults are per module
    assert run("plowup", "other", "f", state=state, cwd=tmp_path).returncode == 0
    fakeplow.clear_faults(state)
    assert run("plowup", "mod", "f", state=state, cwd=tmp_path).returncode == 0
    with pytest.raises(ValueError):
        fakeplow.set_faults(state, "mod", no_such_knob=True)


def test_corrupt_upload(state, tmp_path):
    fakeplow.set_faults(state, "mod", corrupt_upload=True)
    upload(state, tmp_path, data=b"\x01abc", name="one")
    upload(state, tmp_path, data=b"", name="empty")
    stored = {p.name: p.read_bytes() for p in fakeplow.stored_objects(state, "mod")}
    assert stored == {"one": b"\xfeabc", "empty": b"X"}


def test_corrupt_and_truncate_download(state, tmp_path):
    url = upload(state, tmp_path, data=b"\x00123456789", name="c.bin")
    empty_url = upload(state, tmp_path, data=b"", name="e.bin")
    out = tmp_path / "out"
    out.mkdir()
    fakeplow.set_faults(state, "mod", corrupt_download=True)
    assert run("plowdown", "-o", str(out), url, empty_url, state=state).returncode == 0
    assert (out / "c.bin").read_bytes() == b"\xff123456789"
    assert (out / "e.bin").read_bytes() == b"X"
    fakeplow.set_faults(state, "mod", corrupt_download=None, truncate_download=True)
    assert run("plowdown", "-o", str(out), url, state=state).returncode == 0
    assert (out / "c.bin").read_bytes() == b"\x001234"
    # the stored object itself is untouched
    assert {p.name: p.read_bytes() for p in fakeplow.stored_objects(state, "mod")}["c.bin"] == b"\x00123456789"


def test_empty_download_and_print_path(state, tmp_path):
    url = upload(state, tmp_path, data=b"real", name="r.bin")
    out = tmp_path / "out"
    out.mkdir()
    fakeplow.set_faults(state, "mod", empty_download=True)
    res = run("plowdown", "-o", str(out), url, state=state)
    assert res.returncode == 0
    assert res.stdout.decode() == f"{out / 'r.bin'}\n"
    assert list(out.iterdir()) == []

    fakeplow.clear_faults(state)
    fakeplow.set_faults(state, "mod", print_path="/elsewhere/lie.bin")
    res = run("plowdown", "-o", str(out), url, state=state)
    assert res.returncode == 0
    assert res.stdout.decode() == "/elsewhere/lie.bin\n"
    assert (out / "r.bin").read_bytes() == b"real"


def test_slow_fault_can_be_killed_by_timeout(state, tmp_path):
    url = upload(state, tmp_path, name="s.bin")
    dl = tmp_path / "dl"
    dl.mkdir()
    fakeplow.set_faults(state, "mod", slow=30.0)
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run("plowdown", url, state=state, cwd=dl, timeout=1.0)
    assert time.monotonic() - start < 10
    assert list(dl.iterdir()) == []
    fakeplow.set_faults(state, "mod", slow=0.3)
    start = time.monotonic()
    assert run("plowdown", url, state=state, cwd=dl).returncode == 0
    assert time.monotonic() - start >= 0.3
    assert (dl / "s.bin").exists()


def test_concurrent_invocations_log_every_line(state, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 1000)
    n = 12
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(
            lambda i: run("plowup", f"--tag={'y' * 5000}{i}", "m", f"f:n{i}",
                          state=state, cwd=tmp_path),
            range(n),
        ))
    assert all(r.returncode == 0 for r in results)
    log = fakeplow.read_log(state)  # json.loads fails on an interleaved line
    assert len(log) == n
    assert sorted(e["argv"][2] for e in log) == sorted(f"f:n{i}" for i in range(n))
    ids = {p.parent.name for p in fakeplow.stored_objects(state, "m")}
    assert len(ids) == n
