"""A throwaway PostgreSQL server on loopback, for the catalog tests.

It is made from the machine's own binaries (Debian's ``postgresql`` package
puts them in ``/usr/lib/postgresql/<version>/bin``): ``initdb`` into a
temporary directory, ``pg_ctl start`` on a free port, and ``pg_ctl stop``
at the end. PostgreSQL refuses to run as root, so when the tests run as
root the server runs as the ``postgres`` user the package creates.

``CM_TEST_POSTGRES_URL`` names an existing server instead; each test then
gets a database of its own on it. ``CM_REQUIRE_POSTGRES=1`` (set by CI)
turns "no PostgreSQL here" from a skip into a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from typing import List, Optional
from urllib.parse import urlsplit, urlunsplit

#: A role with a password, for the tests that a password never leaks.
PASSWORD_USER = "cm_secret_user"
PASSWORD = "s3cret-Pa55word-never-logged"


def binaries() -> Optional[str]:
    """The directory of the newest installed PostgreSQL server binaries, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    pg_ctl = shutil.which("pg_ctl")
    return os.path.dirname(pg_ctl) if pg_ctl else None


def missing_reason() -> Optional[str]:
    """Why no server can be had here, or None if one can."""
    if os.environ.get("CM_TEST_POSTGRES_URL"):
        return None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'cloudmanager[postgres]')"
    if binaries() is None:
        return "no PostgreSQL server binaries (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One server: :meth:`start`, :meth:`new_database`, :meth:`restart`, :meth:`stop`."""

    def __init__(self) -> None:
        self.external = os.environ.get("CM_TEST_POSTGRES_URL")
        self.bin = binaries()
        self.port = _free_port()
        self.datadir = ""
        self._base = ""
        self._run_as: Optional[str] = "postgres" if os.geteuid() == 0 else None

    # -- the server process ---------------------------------------------------------

    def _run(self, argv: List[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(argv, user=self._run_as, check=check, capture_output=True,
                              text=True, timeout=120, cwd="/")

    def start(self) -> PostgresServer:
        if self.external:
            return self
        assert self.bin is not None
        self._base = tempfile.mkdtemp(prefix="cm-pg-")
        self.datadir = os.path.join(self._base, "data")
        os.mkdir(self.datadir, 0o700)
        if self._run_as:
            entry = pwd.getpwnam(self._run_as)
            os.chmod(self._base, 0o755)
            os.chown(self.datadir, entry.pw_uid, entry.pw_gid)
        self._run([os.path.join(self.bin, "initdb"), "-D", self.datadir, "-U", "postgres",
                   "--auth-local=trust", "--auth-host=trust", "-E", "UTF8", "--no-sync"])
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as hba:
            # postgres itself needs no password; the password role does.
            hba.write("local all all trust\n"
                      "host all postgres 127.0.0.1/32 trust\n"
                      "host all all 127.0.0.1/32 scram-sha-256\n")
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as conf:
            conf.write("listen_addresses = '127.0.0.1'\nport = %d\n"
                       "unix_socket_directories = '%s'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                       "max_connections = 200\n" % (self.port, self.datadir))
        self._pg_ctl("start")
        self.admin("CREATE ROLE %s LOGIN PASSWORD '%s'" % (PASSWORD_USER, PASSWORD))
        return self

    def _pg_ctl(self, action: str) -> None:
        assert self.bin is not None
        argv = [os.path.join(self.bin, "pg_ctl"), "-D", self.datadir, "-w", "-t", "60"]
        if action == "start":
            argv += ["-l", os.path.join(self.datadir, "server.log"), "start"]
        else:
            argv += ["-m", "fast", action]
        self._run(argv)

    def restart(self) -> None:
        """Stop the server and start it again (connections are cut)."""
        assert not self.external, "cannot restart a server the tests did not start"
        # Not `pg_ctl restart`: without -l, the new server would keep our
        # output pipes open, and waiting for them would never end.
        self._pg_ctl("stop")
        self._pg_ctl("start")

    def stop(self) -> None:
        if self.external or not self.datadir:
            return
        try:
            self._pg_ctl("stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self._base, ignore_errors=True)

    # -- databases --------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        if self.external:
            return self.external
        return "postgresql://postgres@127.0.0.1:%d/postgres" % self.port

    def admin(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self, owner: str = "postgres") -> str:
        """Create an empty database; return its URL (for ``owner``, no password)."""
        name = "cm_" + uuid.uuid4().hex[:12]
        self.admin('CREATE DATABASE "%s" OWNER %s' % (name, owner))
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))

    def password_url(self) -> str:
        """A fresh database owned by the password role, with the password in the URL."""
        url = self.new_database(owner=PASSWORD_USER)
        parts = urlsplit(url)
        netloc = "%s:%s@%s" % (PASSWORD_USER, PASSWORD, parts.netloc.rsplit("@", 1)[-1])
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
