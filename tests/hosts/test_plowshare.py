"""PlowshareHost driven through the fake plowup/plowdown (real subprocesses).

The fakes in ``tests/fakes`` follow the real tools' command lines and exit
codes, including the dangerous parts (``plowdown`` obeys ``--run-after`` and
``-o``; ``plowup`` splits ``FILE:DESTNAME`` on the last ``:``), so these
tests exercise the real safety properties of the adapter.
"""

import concurrent.futures
import os
import re
import stat
import subprocess
import threading
import time

import fakeplow
import pytest

from cloudmanager.errors import (
    HostError,
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    PermanentHostError,
    TransientHostError,
)
from cloudmanager.hosts import Location, from_spec
from cloudmanager.hosts.plowshare import PlowshareHost
from helpers import sha

from .conformance import HostConformance

DL_URL = re.compile(r"http://([a-z0-9_]+)\.fake/dl/([0-9a-f]{16})")
DEAD_ID = "0123456789abcdef"



def tool_calls(fake, tool):
    return [entry for entry in fake.log() if entry["tool"] == tool]


def fake_processes(state_dir):
    """PIDs of live processes (other than us) started with this fake state dir."""
    needle = b"\0FAKE_PLOWSHARE_DIR=" + os.fsencode(str(state_dir)) + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/environ" % entry, "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in b"\0" + env:
            found.append(int(entry))
    return found


@pytest.fixture
def payload():
    # Not valid UTF-8, with NULs and newlines: bytes must pass untouched.
    return bytes(range(256)) * 37 + b"\n\r\x00tail\xff"


@pytest.fixture
def stored(fake_plowshare, tmp_path, payload):
    """A file uploaded to module ``mod`` through PlowshareHost: (host, location)."""
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    host = PlowshareHost("mod", timeout=30)
    return host, host.upload(str(src), sha(payload))


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


# -- upload --------------------------------------------------------------------


def test_upload_returns_location_and_stores_exact_bytes(fake_plowshare, tmp_path, payload):
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    name = sha(payload)

    loc = PlowshareHost("mod", timeout=30).upload(str(src), name)

    assert isinstance(loc, Location)
    assert loc.host_name == "mod"
    m = DL_URL.fullmatch(loc.url)
    assert m and m.group(1) == "mod", loc.url
    objects = fake_plowshare.objects("mod")
    assert len(objects) == 1
    assert objects[0].parent.name == m.group(2)
    assert objects[0].name == name  # stored under the object name, not the user's name
    assert objects[0].read_bytes() == payload
    assert src.read_bytes() == payload  # the source is never modified


def test_upload_location_uses_custom_name(fake_plowshare, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    loc = PlowshareHost("mod", name="my-locker", timeout=30).upload(str(src), sha(b"abc"))
    assert loc.host_name == "my-locker"
    assert DL_URL.fullmatch(loc.url).group(1) == "mod"


def test_upload_hostile_source_path_never_reaches_argv(fake_plowshare, tmp_path):
    weird_dir = tmp_path / "dir with space:and colon"
    weird_dir.mkdir()
    src = weird_dir / "-rf x:evil name.bin"
    data = b"hostile path content\n" * 100
    src.write_bytes(data)

    loc = PlowshareHost("mod", timeout=30).upload(str(src), sha(data))

    calls = tool_calls(fake_plowshare, "plowup")
    assert len(calls) == 1
    argv = calls[0]["argv"]
    user_bits = (str(src), str(weird_dir), src.name, "evil name", "and colon", "-rf")
    for arg in argv:
        for bit in user_bits:
            assert bit not in arg, argv
    positionals = [a for a in argv if not a.startswith("-")]
    assert positionals[0] == "mod"
    files = argv[argv.index("mod") + 1:]
    assert files, argv
    for f in files:
        assert not f.startswith("-"), argv
        assert ":" not in f, argv  # would split into FILE:DESTNAME
    # The whole file went up, under its hash, byte-exact.
    objects = fake_plowshare.objects("mod")
    assert [o.name for o in objects] == [sha(data)]
    assert objects[0].read_bytes() == data
    assert DL_URL.fullmatch(loc.url)


@pytest.mark.parametrize("bad_name", ["../x", "-rf", "a:b", "", "a b", "a/b"])
def test_upload_refuses_unsafe_object_name_without_running_plowup(
        fake_plowshare, tmp_path, bad_name):
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    with pytest.raises(InvalidInputError):
        PlowshareHost("mod", timeout=30).upload(str(src), bad_name)
    assert tool_calls(fake_plowshare, "plowup") == []


def test_upload_leaves_no_staging_directory(fake_plowshare, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    host = PlowshareHost("mod", timeout=30)
    host.upload(str(src), sha(b"abc"))
    fake_plowshare.faults("mod", down=True)
    with pytest.raises(TransientHostError):
        host.upload(str(src), sha(b"abc"))
    assert list(tmp.iterdir()) == []
    # plowup really was given a file inside the staging area
    calls = tool_calls(fake_plowshare, "plowup")
    assert len(calls) == 2
    assert all(c["argv"][-1].startswith(str(tmp) + os.sep) for c in calls)


def test_upload_to_down_host_is_transient(fake_plowshare, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    fake_plowshare.faults("mod", down=True)
    with pytest.raises(TransientHostError) as info:
        PlowshareHost("mod", timeout=30).upload(str(src), sha(b"abc"))
    assert info.value.host == "mod"
    assert fake_plowshare.objects("mod") == []


def _fake_plowup(tmp_path, monkeypatch, script):
    bindir = tmp_path / "badbin"
    bindir.mkdir()
    tool = bindir / "plowup"
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", "%s%s%s" % (bindir, os.pathsep, os.environ["PATH"]))


@pytest.mark.parametrize("script, error", [
    # Regression: the wrapper's parse_output did output.split()[-1] and let
    # IndexError escape PlowshareHost.upload.
    ("exit 0\n", HostError),
    # Regression: the wrapper's parse_output decoded strictly and let
    # UnicodeDecodeError escape PlowshareHost.upload.
    ("printf 'http://m.fake/dl/\\377x\\n'\nexit 0\n", HostError),
    ("echo 'all done'\nexit 0\n", TransientHostError),
], ids=["silent", "non-utf8", "no-url"])
def test_upload_with_unusable_plowup_output_is_host_error(tmp_path, monkeypatch, script, error):
    _fake_plowup(tmp_path, monkeypatch, script)
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    with pytest.raises(error):
        PlowshareHost("mod", timeout=30).upload(str(src), sha(b"abc"))


@pytest.mark.parametrize("links", ["del", "adm", "del,adm", "adm,del"])
def test_plowup_that_prints_no_download_link_has_failed(fake_plowshare, tmp_path, links):
    # Regression: a plowup that printed only "#DEL <url>" got its delete
    # link recorded as the copy (the wrapper took the last token).
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    fake_plowshare.faults("mod", plowup_links=links)
    with pytest.raises(TransientHostError, match="no download link") as info:
        PlowshareHost("mod", timeout=30).upload(str(src), sha(b"abc"))
    assert info.value.host == "mod"
    assert "/del/" not in str(info.value) and "/adm/" not in str(info.value)  # never shown


@pytest.mark.parametrize("links", ["dl,adm", "dl,del", "adm,dl,del", "del,adm,dl"])
def test_the_download_link_is_taken_wherever_plowup_prints_it(fake_plowshare, tmp_path, links):
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    fake_plowshare.faults("mod", plowup_links=links)
    location = PlowshareHost("mod", timeout=30).upload(str(src), sha(b"abc"))
    assert DL_URL.fullmatch(location.url), location.url


# -- download ------------------------------------------------------------------


def test_download_round_trip(stored, out_dir, payload):
    host, loc = stored
    dest = out_dir / "result.bin"
    assert host.download(loc.url, str(dest)) is None
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in out_dir.iterdir()) == ["result.bin"]


def test_download_overwrites_existing_dest(stored, out_dir, payload):
    host, loc = stored
    dest = out_dir / "result.bin"
    dest.write_bytes(b"old content that is longer than nothing" * 1000)
    host.download(loc.url, str(dest))
    assert dest.read_bytes() == payload


@pytest.mark.parametrize("stored_name", ["my file é.txt", "two  spaces .bin", "日本 語"])
def test_download_of_name_with_spaces_and_non_ascii(fake_plowshare, tmp_path, out_dir,
                                                    stored_name):
    src = tmp_path / "plain.bin"
    data = b"spaced out\n" * 50
    src.write_bytes(data)
    res = subprocess.run(["plowup", "mod", "%s:%s" % (src, stored_name)],
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    url = res.stdout.decode().splitlines()[-1]
    assert DL_URL.fullmatch(url)
    assert [o.name for o in fake_plowshare.objects("mod")] == [stored_name]

    dest = out_dir / "dest.bin"
    PlowshareHost("mod", timeout=30).download(url, str(dest))
    assert dest.read_bytes() == data
    assert [p.name for p in out_dir.iterdir()] == ["dest.bin"]


@pytest.mark.parametrize("setup, url, error", [
    ("down", None, TransientHostError),
    (None, "http://mod.fake/dl/" + DEAD_ID, HostNotFoundError),
    (None, "http://nosuchmodule.example/dl/" + DEAD_ID, PermanentHostError),
])
def test_download_exit_codes_are_classified(fake_plowshare, stored, out_dir, setup, url, error):
    host, loc = stored
    if setup == "down":
        fake_plowshare.faults("mod", down=True)
    url = url or loc.url
    dest = out_dir / "dest.bin"
    with pytest.raises(error) as info:
        host.download(url, str(dest))
    assert type(info.value) is error
    assert info.value.host == "mod"
    assert len(tool_calls(fake_plowshare, "plowdown")) == 1
    assert list(out_dir.iterdir()) == []


def test_exit_code_classes_match_transience(fake_plowshare, stored, out_dir):
    host, loc = stored
    with pytest.raises(HostNotFoundError) as dead:
        host.download("http://mod.fake/dl/" + DEAD_ID, str(out_dir / "d"))
    assert dead.value.transient is False
    fake_plowshare.faults("mod", down=True)
    with pytest.raises(TransientHostError) as down:
        host.download(loc.url, str(out_dir / "d"))
    assert down.value.transient is True


@pytest.fixture
def marker_prog(tmp_path):
    marker = tmp_path / "RAN"
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\ntouch '%s'\n" % marker)
    prog.chmod(0o755)
    return prog, marker


@pytest.mark.parametrize("make_url", [
    lambda prog: "--run-after=%s" % prog,
    lambda prog: "-o/tmp",
    lambda prog: "-o",
    lambda prog: "http://x y",
    lambda prog: "http://mod.fake/dl/%s --run-after=%s" % (DEAD_ID, prog),
    lambda prog: "file:///etc/passwd",
    lambda prog: "",
])
def test_hostile_url_refused_before_plowdown_runs(fake_plowshare, out_dir, marker_prog,
                                                  make_url):
    prog, marker = marker_prog
    url = make_url(prog)
    host = PlowshareHost("mod", timeout=30)
    assert host.accepts(url) is False
    with pytest.raises(InvalidInputError):
        host.download(url, str(out_dir / "dest.bin"))
    assert tool_calls(fake_plowshare, "plowdown") == []
    assert not marker.exists()
    assert list(out_dir.iterdir()) == []


def test_marker_program_would_run_if_passed_to_plowdown(fake_plowshare, stored, tmp_path,
                                                         marker_prog):
    """Harness check: the hostile-URL test above would notice a leak."""
    prog, marker = marker_prog
    _, loc = stored
    where = tmp_path / "direct"
    where.mkdir()
    res = subprocess.run(["plowdown", loc.url, "--run-after=%s" % prog, "-o", str(where)],
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert marker.exists()


def test_download_timeout_kills_process_tree(fake_plowshare, stored, out_dir):
    host, loc = stored
    host = PlowshareHost("mod", timeout=1)
    fake_plowshare.faults("mod", slow=30.0)
    state = fake_plowshare.dir
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        future = pool.submit(host.download, loc.url, str(out_dir / "dest.bin"))
        # The detector sees the fake while it runs (so its "gone" below means something).
        seen = False
        while not future.done() and time.monotonic() - started < 5:
            if fake_processes(state):
                seen = True
                break
            time.sleep(0.02)
        with pytest.raises(HostUnavailableError):
            future.result(timeout=30)
        elapsed = time.monotonic() - started
    assert seen, "the fake plowdown was never observed running"
    assert elapsed < 10, elapsed
    assert elapsed >= 0.9, elapsed
    deadline = time.monotonic() + 2
    while fake_processes(state) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_processes(state) == []
    assert list(out_dir.iterdir()) == []


def test_upload_timeout_kills_process_and_is_unavailable(fake_plowshare, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    fake_plowshare.faults("mod", slow=30.0)
    started = time.monotonic()
    with pytest.raises(HostUnavailableError) as info:
        PlowshareHost("mod", timeout=1).upload(str(src), sha(b"abc"))
    assert time.monotonic() - started < 10
    assert info.value.host == "mod"
    deadline = time.monotonic() + 2
    while fake_processes(fake_plowshare.dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_processes(fake_plowshare.dir) == []
    assert fake_plowshare.objects("mod") == []


def test_empty_download_is_transient_and_leaves_nothing(fake_plowshare, stored, out_dir):
    host, loc = stored
    fake_plowshare.faults("mod", empty_download=True)
    dest = out_dir / "dest.bin"
    with pytest.raises(TransientHostError):
        host.download(loc.url, str(dest))
    assert len(tool_calls(fake_plowshare, "plowdown")) == 1
    assert list(out_dir.iterdir()) == []


def tree_size(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


def test_a_download_past_max_bytes_is_killed_while_it_runs(fake_plowshare, stored, out_dir):
    # Regression: plowdown wrote the whole object (53 MB into a 1 MiB cache)
    # before its size was checked.
    host, loc = stored
    total, max_bytes = 64 << 20, 1 << 20
    fake_plowshare.faults("mod", grow_download=total)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_size(out_dir))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with pytest.raises(TransientHostError,
                           match="larger than the %d bytes expected" % max_bytes) as info:
            host.download(loc.url, str(out_dir / "dest.bin"), max_bytes=max_bytes)
    finally:
        done.set()
        sampler.join()
    assert info.value.host == "mod"
    [written] = fakeplow.read_progress(fake_plowshare.dir).values()
    # What the tool had written when it was killed (one chunk more at most
    # than it recorded), and the most the test saw on disk.
    assert written + fakeplow.GROW_CHUNK <= max_bytes + (4 << 20), written
    assert peak[0] <= max_bytes + (4 << 20), peak[0]
    assert peak[0] > 0  # the sampler did see the download
    assert list(out_dir.iterdir()) == []  # no partial file, no private directory
    deadline = time.monotonic() + 2
    while fake_processes(fake_plowshare.dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_processes(fake_plowshare.dir) == []


def test_a_download_of_exactly_max_bytes_is_not_stopped(fake_plowshare, stored, out_dir):
    host, loc = stored
    size = 3 * fakeplow.GROW_CHUNK + 5
    fake_plowshare.faults("mod", grow_download=size)
    host.download(loc.url, str(out_dir / "dest.bin"), max_bytes=size)
    assert (out_dir / "dest.bin").stat().st_size == size
    with pytest.raises(TransientHostError, match="larger than"):
        host.download(loc.url, str(out_dir / "again.bin"), max_bytes=size - 1)
    assert [p.name for p in out_dir.iterdir()] == ["dest.bin"]


@pytest.mark.parametrize("where", ["absolute", "relative", "etc_passwd"])
def test_printed_path_outside_workdir_is_not_used(fake_plowshare, stored, out_dir, tmp_path,
                                                  payload, where):
    host, loc = stored
    if where == "etc_passwd":
        victim = "/etc/passwd"
        printed = victim
    elif where == "absolute":
        victim = str(tmp_path / "victim.txt")
        printed = victim
    else:  # beside dest, reached by '..' from plowdown's private directory
        victim = str(out_dir / "victim.txt")
        printed = "../victim.txt"
    backup = None
    if where != "etc_passwd":
        with open(victim, "wb") as f:
            f.write(b"precious, must stay\n")
    else:
        with open(victim, "rb") as f:
            backup = f.read()
    before = open(victim, "rb").read()
    fake_plowshare.faults("mod", print_path=printed)
    dest = out_dir / "dest.bin"
    try:
        host.download(loc.url, str(dest))
        assert dest.read_bytes() == payload
        assert os.path.isfile(victim)
        with open(victim, "rb") as f:
            assert f.read() == before
    finally:
        if backup is not None and (not os.path.exists(victim)
                                   or open(victim, "rb").read() != backup):
            with open(victim, "wb") as f:  # never leave the machine broken
                f.write(backup)
    expected = {"dest.bin", "victim.txt"} if where == "relative" else {"dest.bin"}
    assert {p.name for p in out_dir.iterdir()} == expected


@pytest.mark.parametrize("fault", ["down", "dead", "no_module", "empty_download", "timeout"])
def test_failed_download_leaves_no_partial_file_or_temp_dir(fake_plowshare, stored, out_dir,
                                                            fault):
    host, loc = stored
    url = loc.url
    if fault == "dead":
        url = "http://mod.fake/dl/" + DEAD_ID
    elif fault == "no_module":
        url = "http://elsewhere.example/dl/" + DEAD_ID
    elif fault == "timeout":
        host = PlowshareHost("mod", timeout=1)
        fake_plowshare.faults("mod", slow=30.0)
    else:
        fake_plowshare.faults("mod", **{fault: True})
    dest = out_dir / "dest.bin"
    with pytest.raises(HostError):
        host.download(url, str(dest))
    assert not dest.exists()
    assert list(out_dir.iterdir()) == []


def test_missing_plowup_and_plowdown_raise_host_errors(tmp_path, monkeypatch, out_dir):
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("FAKE_PLOWSHARE_DIR", str(tmp_path / "state"))
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    host = PlowshareHost("mod", timeout=30)
    with pytest.raises(HostError) as up:
        host.upload(str(src), sha(b"abc"))
    assert up.value.host == "mod"
    with pytest.raises(HostError) as down:
        host.download("http://mod.fake/dl/" + DEAD_ID, str(out_dir / "dest.bin"))
    assert down.value.host == "mod"
    assert list(out_dir.iterdir()) == []


# -- accepts, specs ------------------------------------------------------------


@pytest.mark.parametrize("url, ok", [
    ("http://www.mediafire.com/?qorncpzfe74s9", True),
    ("https://mod.fake/dl/" + DEAD_ID, True),
    ("HTTP://MOD.FAKE/dl/x", True),
    ("file:///tmp/x", False),
    ("file://localhost/tmp/x", False),
    ("ftp://example.com/x", False),
    ("-http://example.com/x", False),
    ("--run-after=/bin/sh", False),
    ("http://", False),
    ("http://a b/c", False),
    ("", False),
    (None, False),
    (b"http://example.com/", False),
])
def test_accepts(url, ok):
    assert PlowshareHost("mod").accepts(url) is ok


@pytest.mark.parametrize("spec", ["plowshare:Bad-Name!", "plowshare:", "plowshare:-o",
                                  "plowshare:a b", "plowshare:mod/../x", "plowshare:" + "a" * 65])
def test_from_spec_refuses_bad_module(spec):
    with pytest.raises(InvalidInputError):
        from_spec(spec)


def test_from_spec_builds_plowshare_host():
    host = from_spec("plowshare:mediafire")
    assert isinstance(host, PlowshareHost)
    assert host.module == "mediafire" and host.name == "mediafire"
    named = from_spec("plowshare:mod", name="mine", timeout=5)
    assert named.name == "mine" and named.timeout == 5.0


# -- the shared host contract -------------------------------------------------


@pytest.fixture
def host(fake_plowshare):
    return PlowshareHost("conform", timeout=30)


@pytest.fixture
def unreachable_host(fake_plowshare):
    fake_plowshare.faults("offline", down=True)
    return PlowshareHost("offline", timeout=30)


class TestPlowshareConformance(HostConformance):
    large_size = 3 << 20  # each transfer is a subprocess writing to disk

    @pytest.fixture
    def tamper(self, fake_plowshare):
        def tamper(location, data):
            module, obj_id = DL_URL.fullmatch(location.url).groups()
            [stored] = [p for p in fake_plowshare.objects(module) if p.parent.name == obj_id]
            stored.write_bytes(data)

        return tamper

    @pytest.fixture
    def missing_url(self, host):
        return "http://conform.fake/dl/%s" % DEAD_ID
