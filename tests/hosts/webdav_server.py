"""A real WebDAV server on loopback for the fsspec host tests.

Run as a script, it serves a directory with WsgiDAV on cheroot, with HTTP
basic authentication, and prints ``PORT <n>`` once it listens::

    CM_WEBDAV_USER=alice CM_WEBDAV_PASSWORD=... python webdav_server.py --root DIR [--port N]

Imported, it offers :func:`start_webdav_server` and the module-scoped
``webdav_server`` fixture (import ``webdav_server_fixture`` to use it), which
runs the script in a subprocess (so the server's threads never mix with the
tests') and stops it at teardown. The credentials travel in the
environment, not on the command line.
"""

import argparse
import http.client
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

USER = "alice"
PASSWORD = "s3cret-pass"
START_DEADLINE = 20.0


class WebdavServer(NamedTuple):
    """A running server: where it answers, what it serves, and who may use it."""

    base_url: str
    root: Path
    user: str
    password: str
    port: int


def start_webdav_server(root, log_dir, user=USER, password=PASSWORD):
    """Start the server on a free port; return ``(process, WebdavServer)``.

    :raises RuntimeError: with the server's stderr if it does not answer in time
    """
    root, log_dir = Path(root), Path(log_dir)
    root.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "webdav.out", log_dir / "webdav.err"
    env = dict(os.environ, CM_WEBDAV_USER=user, CM_WEBDAV_PASSWORD=password)
    # Files, not pipes: a chatty server can never block on a full pipe.
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--root", str(root), "--port", "0"],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    try:
        port = _wait_for_port(proc, out_path, err_path)
        _wait_until_answering(proc, port, err_path)
    except BaseException:
        stop_webdav_server(proc)
        raise
    server = WebdavServer("http://127.0.0.1:%d" % port, root, user, password, port)
    return proc, server


def stop_webdav_server(proc):
    """Terminate the server process and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _failure(proc, err_path, what):
    stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
    return RuntimeError("WebDAV server %s (exit code %s); its stderr:\n%s"
                        % (what, proc.poll(), stderr[-4000:]))


def _wait_for_port(proc, out_path, err_path):
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        for line in out_path.read_text(errors="replace").splitlines():
            if line.startswith("PORT "):
                return int(line.split()[1])
        if proc.poll() is not None:
            raise _failure(proc, err_path, "exited before listening")
        time.sleep(0.05)
    raise _failure(proc, err_path, "did not report its port within %gs" % START_DEADLINE)


def _wait_until_answering(proc, port, err_path):
    deadline = time.monotonic() + START_DEADLINE
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _failure(proc, err_path, "exited")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("OPTIONS", "/")
            status = conn.getresponse().status
            if status < 500:  # 401 counts: it answers, and wants credentials
                return
            last = "HTTP %d" % status
        except OSError as exc:
            last = exc
        finally:
            conn.close()
        time.sleep(0.05)
    raise _failure(proc, err_path, "did not answer within %gs (last: %s)"
                   % (START_DEADLINE, last))


@pytest.fixture(scope="module", name="webdav_server")
def webdav_server_fixture(tmp_path_factory):
    """A WebDAV server with basic auth (alice / s3cret-pass) serving a fresh directory.

    Yields a :class:`WebdavServer`; the server stops when the module's tests end.
    """
    base = tmp_path_factory.mktemp("webdav")
    proc, server = start_webdav_server(base / "root", base / "logs")
    try:
        yield server
    finally:
        stop_webdav_server(proc)


# -- the server itself ---------------------------------------------------------

def _serve(root, port):
    from cheroot import wsgi
    from wsgidav.fs_dav_provider import FilesystemProvider
    from wsgidav.wsgidav_app import WsgiDAVApp

    user, password = os.environ["CM_WEBDAV_USER"], os.environ["CM_WEBDAV_PASSWORD"]
    config = {
        "host": "127.0.0.1",
        "port": port,
        "provider_mapping": {"/": FilesystemProvider(root, readonly=False, fs_opts={})},
        "http_authenticator": {
            "domain_controller": None,  # the SimpleDomainController below
            "accept_basic": True,
            "accept_digest": False,
            "default_to_digest": False,
        },
        "simple_dc": {"user_mapping": {"*": {user: {"password": password}}}},
        "dir_browser": {"enable": False},
        "verbose": 1,
        "logging": {"enable": False},
        "lock_storage": True,
    }
    app = WsgiDAVApp(config)
    server = wsgi.Server(bind_addr=("127.0.0.1", port), wsgi_app=app, numthreads=8)
    server.prepare()  # binds: the real port is known from here on
    print("PORT %d" % server.bind_addr[1], flush=True)
    try:
        server.serve()
    finally:
        server.stop()


def main(argv=None):
    """Serve ``--root`` over WebDAV until terminated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    _serve(os.path.abspath(args.root), args.port)


if __name__ == "__main__":
    main()
