"""Real servers on loopback for the S3 host tests: moto's S3 server, and a tiny
server that answers every request with one chosen S3 error.

Fixtures (import them into a test module to use them):

- ``moto_endpoint`` (session): the URL of a moto S3 server run as a subprocess;
- ``aws_env``: fake credentials and no trace of the real AWS configuration;
- ``bucket``: a fresh, empty bucket on the moto server;
- ``s3_admin``: a boto3 client on the moto server, to look behind a host's back.
"""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

#: Seconds the moto server gets to start answering.
START_DEADLINE = 30.0


def free_port():
    """A TCP port of 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url):
    # No proxy: a proxy from the environment must not answer for loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False
    return True


class MotoServer:
    """A moto S3 server in a subprocess on 127.0.0.1; its output goes to ``log_path``."""

    def __init__(self, log_path):
        self.log_path = log_path
        self.process = None
        self.url = None

    def start(self, attempts=3):
        """Start the server and wait until it answers HTTP.

        A port picked free may be taken before the server binds it, so a
        server that dies at once is started again on another port.
        """
        for _ in range(attempts):
            port = free_port()
            self.url = "http://127.0.0.1:%d" % port
            with open(self.log_path, "wb") as log:
                # Output to a file, not a pipe: the server logs every
                # request and would block once a pipe filled up.
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=dict(os.environ, AWS_ACCESS_KEY_ID="testing",
                             AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"))
            deadline = time.monotonic() + START_DEADLINE
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if _answers(self.url + "/moto-api/"):
                    return self.url
                time.sleep(0.05)
            else:
                self.stop()
                pytest.fail("moto S3 server did not answer within %.0f s:\n%s"
                            % (START_DEADLINE, self.output()))
        pytest.fail("moto S3 server exited with status %s:\n%s"
                    % (self.process.returncode, self.output()))

    def output(self):
        """The server's output so far (its last 4000 characters)."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-4000:]
        except OSError:
            return ""

    def stop(self):
        """Terminate the server, killing it if it does not go within 5 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """The endpoint URL of a moto S3 server running for the whole session."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "server.log")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Fake credentials in the environment, and no real AWS configuration in reach."""
    for var in list(os.environ):
        if var.startswith("AWS_") and var != "AWS_CA_BUNDLE":
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    # Never ask an instance metadata service for credentials: it is not
    # there, and asking takes seconds.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def s3_admin(moto_endpoint, aws_env):
    """A plain boto3 client on the moto server."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}))
    yield client
    client.close()


@pytest.fixture
def bucket(s3_admin):
    """The name of a new, empty bucket; it is emptied and removed afterwards."""
    name = "test-" + uuid.uuid4().hex[:20]
    s3_admin.create_bucket(Bucket=name)
    yield name
    # The server lives for the session: free what each test stored.
    for page in s3_admin.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
        if keys:
            s3_admin.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    s3_admin.delete_bucket(Bucket=name)


class ErrorServer:
    """An HTTP server on 127.0.0.1 that answers S3 requests with set errors.

    ``answers`` maps a method (``HEAD``, ``GET``, ``PUT``...) to
    ``(status, code)``; other methods get ``default``. ``hang`` makes it
    accept connections and never answer.
    """

    def __init__(self, default=(500, "InternalError")):
        self.answers = {}
        self.default = default
        self.hang = threading.Event()
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                server.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if server.hang.is_set():
                    server.stopped.wait(10)
                    return
                status, code = server.answers.get(self.command, server.default)
                body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
                        b'<Message>chosen error %s</Message></Error>'
                        % (code.encode(), code.encode()))
                self.send_response(status)
                # Whatever the client sent that was not read stays out of
                # the next request.
                self.send_header("Connection", "close")
                self.close_connection = True
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD"
                                 else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.stopped = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        """Stop serving and release hanging requests."""
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def error_server():
    """An :class:`ErrorServer`, closed at teardown."""
    server = ErrorServer()
    yield server
    server.close()
