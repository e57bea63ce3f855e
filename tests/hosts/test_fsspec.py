"""FsspecHost: the conformance suite over a real WebDAV server and over fsspec's memory://.

The WebDAV server is WsgiDAV in a subprocess on loopback, with basic auth
(see ``webdav_server.py``). No client library is mocked.
"""

import base64
import concurrent.futures
import errno
import logging
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import httpx
import pytest
from webdav4.client import HTTPError as WebdavHTTPError
from webdav4.client import ResourceNotFound

from cloudmanager.errors import (
    HostError,
    HostNotFoundError,
    HostUnavailableError,
    InvalidInputError,
    PermanentHostError,
    TransientHostError,
)
from cloudmanager.hosts import from_spec
from cloudmanager.hosts.fsspec import FsspecHost
from cloudmanager.validation import check_url

from .conformance import HostConformance, sha
from .webdav_server import PASSWORD, USER, webdav_server_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def closed_port():
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh():
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def host(webdav_server):
    h = FsspecHost("webdav://%s/pool" % fresh(), base_url=webdav_server.base_url,
                   storage_options={"auth": (USER, PASSWORD)}, timeout=10)
    yield h
    h.close()


@pytest.fixture
def unreachable_host():
    h = FsspecHost("webdav://pool", base_url="http://127.0.0.1:%d" % closed_port(),
                   auth=(USER, PASSWORD), timeout=2)
    yield h
    h.close()


@pytest.fixture
def src(tmp_path):
    """``src(data)`` → path of a new local file holding ``data``."""
    counter = iter(range(1_000_000))

    def write(data):
        path = tmp_path / ("src-%d" % next(counter))
        path.write_bytes(data)
        return str(path)

    return write


class TestFsspecWebdav(HostConformance):
    # A PUT the client abandons mid-stream may still be written by the server
    # after the client's DELETE: a staging name is left, never an object.
    removes_failed_stagings = False

    @pytest.fixture
    def raw_names(self, host, webdav_server):
        directory = webdav_server.root / host.root_url[len("webdav://"):]
        return lambda: sorted(os.listdir(directory)) if directory.exists() else []

    @pytest.fixture
    def tamper(self, host, webdav_server):
        def tamper(location, data):
            directory = webdav_server.root / host.root_url[len("webdav://"):]
            (directory / host.object_name(location.url)).write_bytes(data)

        return tamper


class TestFsspecMemory(HostConformance):
    """The same host class over another filesystem: it is generic."""

    @pytest.fixture
    def host(self):
        h = from_spec("fsspec:memory://%s/pool" % fresh())
        yield h
        h.close()

    @pytest.fixture
    def raw_names(self, host):
        fs = fsspec.filesystem("memory")
        root = "/" + host.root_url[len("memory://"):]

        def names():
            fs.invalidate_cache(root)
            if not fs.exists(root):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))

        return names

    @pytest.fixture
    def tamper(self, host):
        def tamper(location, data):
            # fsspec's memory filesystems share one store per process.
            fsspec.filesystem("memory").pipe_file(
                "/" + location.url[len("memory://"):], data)

        return tamper


# -- secrets -------------------------------------------------------------------

def test_secrets_never_appear_in_urls_names_errors_or_logs(webdav_server, src, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the client libraries' too
    port = webdav_server.port
    # The password in both places: the URL (the webdav+http shorthand) and the options.
    h = from_spec("fsspec:webdav+http://%s:%s@127.0.0.1:%d/%s/pool"
                  % (USER, PASSWORD, port, fresh()), headers={"X-Api-Token": "tok-" + PASSWORD})
    down = FsspecHost("webdav://pool", base_url="http://127.0.0.1:%d" % closed_port(),
                      auth=(USER, PASSWORD), timeout=2)
    texts = [h.name, repr(h), down.name, repr(down), h.root_url]
    try:
        data = b"top secret bytes"
        location = h.upload(src(data), sha(data))
        texts.append(location.url)
        h.download(location.url, str(tmp_path / "got"))
        assert (tmp_path / "got").read_bytes() == data
        texts += [repr(h.stat(location.url)), repr(list(h.list()))]
        h.delete(location.url)
        failures = []
        for call in (lambda: h.download(location.url, str(tmp_path / "gone")),
                     lambda: h.stat(location.url),
                     lambda: h.download("webdav://elsewhere/" + "0" * 64, str(tmp_path / "x")),
                     lambda: down.upload(src(b"x"), sha(b"x")),
                     lambda: down.download("webdav://pool/" + "0" * 64, str(tmp_path / "y"))):
            with pytest.raises(HostError) as info:
                call()
            failures.append(info.value)
        texts += [str(e) for e in failures] + [e.message for e in failures]
    finally:
        h.close()
        down.close()
    texts += [record.getMessage() for record in caplog.records]
    assert any("stored" in r.getMessage() for r in caplog.records)  # we did log
    basic = base64.b64encode(("%s:%s" % (USER, PASSWORD)).encode()).decode()
    for text in texts:
        assert PASSWORD not in text and basic not in text
    assert h.name == "webdav+http://alice@127.0.0.1:%d/%s" % (port, h.root_url.split("/", 3)[3])
    assert location.url.startswith("webdav://alice@127.0.0.1:%d/" % port)


def test_secrets_in_library_messages_are_redacted(webdav_server):
    h = FsspecHost("memory://%s" % fresh(), password="hunter2-xyz", token={"refresh": "r-9876"})
    try:
        error = h._error(ValueError("bad login hunter2-xyz for http://bob:pw1234@h/x, r-9876"),
                         "cannot store x")
        assert isinstance(error, TransientHostError)
        assert "hunter2-xyz" not in str(error) and "pw1234" not in str(error)
        assert "r-9876" not in str(error) and "bob" in str(error)
    finally:
        h.close()


def test_a_wrong_password_is_permanent(webdav_server, src):
    h = FsspecHost("webdav://%s/pool" % fresh(), base_url=webdav_server.base_url,
                   auth=(USER, "wrong-password"))
    try:
        with pytest.raises(PermanentHostError) as info:
            h.upload(src(b"x"), sha(b"x"))
        assert "401" in str(info.value) and "wrong-password" not in str(info.value)
        with pytest.raises(PermanentHostError):
            h.stat("webdav://%s/%s" % (h.root_url[len("webdav://"):], "0" * 64))
        with pytest.raises(PermanentHostError):
            list(h.list())
    finally:
        h.close()


# -- names, URLs, objects on the server ------------------------------------------

def test_accepts_only_hash_names_under_its_own_root(host):
    digest = sha(b"x")
    assert host.accepts(host.root_url + "/" + digest)
    for url in (host.root_url + "2/" + digest,             # a sibling sharing a prefix
                host.root_url + "/sub/" + digest,          # deeper
                host.root_url + "/" + digest.upper(),
                host.root_url + "/" + digest + "/",
                host.root_url + "/" + digest[:-1],
                host.root_url + "/../" + digest,
                host.root_url + "/." + digest + ".abc.tmp",
                "webdav://other/pool/" + digest,
                "memory://" + host.root_url[len("webdav://"):] + "/" + digest,
                None, 42):
        assert not host.accepts(url), url


def test_objects_are_stored_as_root_slash_hash_with_exact_bytes(host, webdav_server, src):
    data = os.urandom(70_000)
    location = host.upload(src(data), sha(data))
    assert location.url == host.root_url + "/" + sha(data)
    directory = webdav_server.root / host.root_url[len("webdav://"):]
    assert (directory / sha(data)).read_bytes() == data
    assert sorted(p.name for p in directory.iterdir()) == [sha(data)]  # no temp left behind


def test_a_damaged_copy_is_replaced_whatever_its_size(host, webdav_server, src):
    data = b"the real content"
    location = host.upload(src(data), sha(data))
    on_disk = webdav_server.root / host.root_url[len("webdav://"):] / sha(data)
    on_disk.write_bytes(b"truncated")
    host.upload(src(data), sha(data))
    assert on_disk.read_bytes() == data
    # Same size, wrong bytes: WebDAV gives no SHA-256 to prove the object,
    # so the size alone does not keep it (it used to).
    on_disk.write_bytes(b"the fake content")
    host.upload(src(data), sha(data))
    assert on_disk.read_bytes() == data
    assert host.stat(location.url).size == len(data)


def test_concurrent_uploads_of_one_object_all_succeed(host, webdav_server, src):
    data = os.urandom(200_000)
    path = src(data)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        locations = list(pool.map(lambda _: host.upload(path, sha(data)), range(6)))
    assert {location.url for location in locations} == {host.root_url + "/" + sha(data)}
    directory = webdav_server.root / host.root_url[len("webdav://"):]
    assert [p.name for p in directory.iterdir()] == [sha(data)]
    assert (directory / sha(data)).read_bytes() == data


def test_list_skips_temp_files_and_foreign_names(host, webdav_server, src):
    data = b"listed"
    host.upload(src(data), sha(data))
    directory = webdav_server.root / host.root_url[len("webdav://"):]
    (directory / (".%s.0a1b2c.tmp" % sha(b"other"))).write_bytes(b"partial")
    (directory / "README").write_bytes(b"hello")
    (directory / sha(b"a directory")).mkdir()
    assert dict(host.list()) == {sha(data): len(data)}


def test_list_of_a_root_never_written_is_empty(webdav_server):
    h = FsspecHost("webdav://%s/pool" % fresh(), base_url=webdav_server.base_url,
                   auth=(USER, PASSWORD))
    try:
        assert list(h.list()) == []
    finally:
        h.close()


def test_the_webdav_shorthand_derives_base_url_and_path(webdav_server, src, tmp_path):
    sub = fresh()
    h = from_spec("fsspec:webdav+http://127.0.0.1:%d/%s/pool" % (webdav_server.port, sub),
                  auth=[USER, PASSWORD])  # a list, as a TOML file gives it
    try:
        data = b"through the shorthand"
        location = h.upload(src(data), sha(data))
        assert location.url == "webdav://127.0.0.1:%d/%s/pool/%s" % (webdav_server.port, sub,
                                                                     sha(data))
        check_url(location.url)
        assert h.name == "webdav+http://127.0.0.1:%d/%s/pool" % (webdav_server.port, sub)
        assert (webdav_server.root / sub / "pool" / sha(data)).read_bytes() == data
        h.download(location.url, str(tmp_path / "back"))
        assert (tmp_path / "back").read_bytes() == data
    finally:
        h.close()


def test_close_then_use_again_reconnects(host, src, tmp_path):
    data = b"after close"
    host.close()
    location = host.upload(src(data), sha(data))
    host.close()
    host.download(location.url, str(tmp_path / "again"))
    assert (tmp_path / "again").read_bytes() == data


# -- options and specs -------------------------------------------------------------

def test_options_of_the_host_and_of_the_filesystem():
    h = from_spec("fsspec:memory://%s/" % fresh(), name="mem", timeout=5, max_connections=2,
                  weight=3, storage_options={"a": 1}, b=2)
    assert (h.name, h.timeout, h.max_connections, h.weight) == ("mem", 5.0, 2, 3.0)
    assert h.root_url.startswith("memory://") and not h.root_url.endswith("/")
    assert repr(h) == "<FsspecHost mem>"
    with pytest.raises(InvalidInputError, match="twice"):
        FsspecHost("memory://x", storage_options={"a": 1}, a=2)


@pytest.mark.parametrize("url", ["memory:pool", "/srv/pool", "nosuchprotocol://x/y",
                                 "memory://x?y=1", "simplecache::memory://x", "",
                                 "webdav+http:///pool"])
def test_malformed_specs_are_refused(url):
    with pytest.raises(InvalidInputError):
        from_spec("fsspec:" + url, base_url="http://127.0.0.1:1")


def test_the_shorthand_refuses_a_second_base_url():
    with pytest.raises(InvalidInputError, match="base_url"):
        from_spec("fsspec:webdav+https://dav.example.org/pool", base_url="https://other")


def test_a_url_that_could_not_be_recorded_is_refused():
    with pytest.raises(InvalidInputError, match="cannot be stored"):
        FsspecHost("webdav://", base_url="http://127.0.0.1:1")  # no host part


def _run_python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=60)


def test_without_fsspec_the_error_names_the_extra():
    result = _run_python(
        "import sys\n"
        "sys.modules['fsspec'] = None\n"
        "from cloudmanager.errors import MissingDependencyError\n"
        "from cloudmanager.hosts import host_class\n"
        "try:\n"
        "    host_class('fsspec')\n"
        "except MissingDependencyError as exc:\n"
        "    print(exc)\n")
    assert result.returncode == 0, result.stderr
    assert "pip install 'cloudmanager[fsspec]'" in result.stdout


def test_without_webdav4_the_error_names_the_webdav_extra():
    result = _run_python(
        "import sys\n"
        "sys.modules['webdav4'] = None\n"
        "from cloudmanager.errors import MissingDependencyError\n"
        "from cloudmanager.hosts import from_spec\n"
        "from_spec('fsspec:memory://ok')\n"
        "try:\n"
        "    from_spec('fsspec:webdav://pool', base_url='http://127.0.0.1:1')\n"
        "except MissingDependencyError as exc:\n"
        "    print(exc)\n")
    assert result.returncode == 0, result.stderr
    assert "pip install 'cloudmanager[webdav]'" in result.stdout


# -- error translation ---------------------------------------------------------------

def _http_error(status):
    request = httpx.Request("PUT", "http://127.0.0.1/x")
    return WebdavHTTPError(httpx.Response(status, request=request))


@pytest.mark.parametrize("exc, kind", [
    (FileNotFoundError(errno.ENOENT, "gone"), HostNotFoundError),
    (ResourceNotFound("pool/x"), HostNotFoundError),
    (_http_error(404), HostNotFoundError),
    (PermissionError(errno.EACCES, "no"), PermanentHostError),
    (_http_error(401), PermanentHostError),
    (_http_error(403), PermanentHostError),
    (_http_error(500), TransientHostError),
    (_http_error(503), TransientHostError),
    (_http_error(409), TransientHostError),
    (httpx.ConnectError("refused"), HostUnavailableError),
    (httpx.ReadTimeout("slow"), HostUnavailableError),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), HostUnavailableError),
    (TimeoutError("slow"), HostUnavailableError),
    (socket.gaierror(-2, "Name or service not known"), HostUnavailableError),
    (OSError(errno.ENETUNREACH, "unreachable"), HostUnavailableError),
    (OSError(errno.ENOSPC, "full"), TransientHostError),
    (httpx.RemoteProtocolError("garbage"), TransientHostError),
    (RuntimeError("closed client"), TransientHostError),
])
def test_errors_are_translated(exc, kind):
    h = FsspecHost("memory://%s" % fresh(), name="m")
    error = h._error(exc, "cannot do it")
    assert type(error) is kind and error.host == "m"
    assert error.message.startswith("cannot do it: " + type(exc).__name__)


def test_a_missing_file_while_storing_is_not_a_missing_object():
    h = FsspecHost("memory://%s" % fresh())
    error = h._error(FileNotFoundError(errno.ENOENT, "gone"), "cannot store", False)
    assert type(error) is TransientHostError


def test_a_missing_local_file_is_transient(host, tmp_path):
    with pytest.raises(TransientHostError):
        host.upload(str(tmp_path / "nope"), sha(b"nope"))


def test_a_pool_on_webdav_from_a_config_file_keeps_its_password_private(
        webdav_server, tmp_path, caplog):
    """Secrets from cloudmanager.toml reach no log line, info(), data_dump() or display."""
    import json
    import logging

    from cloudmanager import CloudManager

    caplog.set_level(logging.DEBUG)
    config = tmp_path / "cloudmanager.toml"
    config.write_text(
        '[pool]\ndatabase = "db.sqlite3"\nstorage = "cache"\ncapacity = "1 MiB"\n'
        'redundancy = 1\nfsync = false\n\n'
        '[hosts.dav]\nspec = "fsspec:webdav://%s"\n\n'
        '[hosts.dav.options]\nbase_url = "%s"\nauth = ["%s", "%s"]\ntimeout = 10\n'
        % (fresh(), webdav_server.base_url, USER, PASSWORD))
    data = b"private pool" * 100
    (tmp_path / "f.bin").write_bytes(data)
    with CloudManager(config=config) as cm:
        digest = cm.upload(tmp_path / "f.bin")
        assert digest and cm.db.files.copies(digest) == 1
        cm.evict(0)
        assert open(cm.warm_up(digest), "rb").read() == data
        assert cm.verify()["good"] == 1
        shown = [json.dumps(cm.info(digest)), cm.data_dump(), json.dumps(cm.stats()),
                 repr(cm.config), json.dumps([h.describe() for h in cm.config.hosts]),
                 repr(cm.engine.hosts)]
    basic = base64.b64encode(("%s:%s" % (USER, PASSWORD)).encode()).decode()
    for text in shown + [caplog.text]:
        assert PASSWORD not in text and basic not in text
