"""Shared fixtures: real SQLite files, real directories, fake plowshare tools.

The fake ``plowup``/``plowdown`` in ``tests/fakes/`` follow the real tools'
command lines and exit codes, with fault injection (see ``fakeplow.py``).
"""

import logging
import os
import sys
from pathlib import Path

import pytest

FAKES = Path(__file__).parent / "fakes"
sys.path.insert(0, str(FAKES))
sys.path.insert(0, str(Path(__file__).parent))  # pg_server

import fakeplow  # noqa: E402

from cloudmanager import CloudManager  # noqa: E402


class FakePlowshare:
    """Handle on the fake tools' state directory."""

    def __init__(self, state_dir):
        self.dir = state_dir

    def faults(self, module, **knobs):
        fakeplow.set_faults(self.dir, module, **knobs)

    def clear(self):
        fakeplow.clear_faults(self.dir)

    def log(self):
        return fakeplow.read_log(self.dir)

    def objects(self, module):
        return fakeplow.stored_objects(self.dir, module)


@pytest.fixture
def fake_plowshare(tmp_path, monkeypatch):
    """Put the fake plowup/plowdown first on PATH, with a fresh state directory."""
    state = tmp_path / "plowstate"
    state.mkdir()
    monkeypatch.setenv("PATH", "%s%s%s" % (FAKES, os.pathsep, os.environ.get("PATH", "")))
    monkeypatch.setenv("FAKE_PLOWSHARE_DIR", str(state))
    return FakePlowshare(state)


def make_folder_roots(hosts):
    """Create the root of every folder host among ``hosts`` (specs or objects):
    a folder host never creates its own."""
    for host in hosts:
        root = getattr(host, "root", None)
        if isinstance(host, str) and host.startswith("dir:"):
            root = host[len("dir:"):]
        if root and not str(root).startswith(("memory", "s3")) and not os.path.lexists(root):
            os.makedirs(root)


class PoolCatalog:
    """Where a test's pools keep their catalog: a SQLite file per node, or a
    PostgreSQL database per node (``server`` given). Each node has its own
    catalog either way, as the suites run on both expect; a test of nodes
    sharing one passes the same ``database`` to each."""

    def __init__(self, kind, server=None):
        self.kind, self.server = kind, server
        self._urls = {}

    def database(self, base):
        if self.server is None:
            return str(base / "db.sqlite3")
        if base not in self._urls:
            self._urls[base] = self.server.new_database()
        return self._urls[base]


#: Test modules whose pools run on both catalogs (the facade's and the CLI's
#: suites); elsewhere pools use SQLite.
BOTH_CATALOGS = {"test_manager.py", "test_cli.py", "test_cli_process.py",
                 "test_original_api.py", "test_trees.py", "test_warm_many.py"}


def pytest_generate_tests(metafunc):
    if "pool_catalog" in metafunc.fixturenames \
            and os.path.basename(str(metafunc.definition.fspath)) in BOTH_CATALOGS:
        metafunc.parametrize("pool_catalog", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def pool_catalog(request):
    """The catalog of the test's pools (see :class:`PoolCatalog`)."""
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        return PoolCatalog("sqlite")
    return PoolCatalog(kind, request.getfixturevalue("postgres_server"))


@pytest.fixture
def make_pool(tmp_path, pool_catalog):
    """Factory for CloudManager instances on real files under tmp_path.

    ``make_pool(capacity, hosts=..., name=..., **kw)``; hosts default to
    three folder hosts. Pools of one test with different names are nodes,
    each with its own cache and catalog (SQLite, or PostgreSQL in the suites
    run on both); ``database=`` overrides the catalog. Every instance is
    closed at teardown.
    """
    made = []

    def make(capacity=1 << 20, hosts=None, name="node", make_roots=True, database=None,
             **kwargs):
        base = tmp_path / name
        if hosts is None:
            hosts = ["dir:%s" % (tmp_path / "hosts" / h) for h in ("h1", "h2", "h3")]
        if make_roots:  # as `cm init` makes the folders it is given
            make_folder_roots(hosts)
        kwargs.setdefault("fsync", False)
        if database is None:
            database = pool_catalog.database(base)
        cm = CloudManager(database, base / "cache", capacity, hosts=hosts, **kwargs)
        made.append(cm)
        return cm

    yield make
    for cm in made:
        cm.close()


@pytest.fixture
def write_file(tmp_path):
    """``write_file(name, data)`` → Path of a new file under tmp_path/src."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)

    def write(name, data):
        path = src / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    return write


@pytest.fixture(autouse=True)
def _debug_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="cloudmanager")


@pytest.fixture
def db(tmp_path):
    """A FileDatabase on a real file, closed at teardown."""
    from cloudmanager.db import FileDatabase

    database = FileDatabase(tmp_path / "db.sqlite3")
    yield database
    database.close()


# -- PostgreSQL -------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server from the machine's binaries, for the whole session
    (see ``tests/pg_server.py``). Skips when there is none, unless
    ``CM_REQUIRE_POSTGRES=1``: then it fails."""
    from pg_server import PostgresServer, missing_reason

    reason = missing_reason()
    if reason is not None:
        if os.environ.get("CM_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required here (CM_REQUIRE_POSTGRES=1): " + reason)
        pytest.skip(reason)
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server):
    """The URL of a new, empty database on the session's server."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request, tmp_path):
    """``(database, index_path)`` for a pool on each kind of catalog: a SQLite
    file (the index in it), or a new PostgreSQL database and a local index."""
    if request.param == "sqlite":
        return str(tmp_path / "db.sqlite3"), None
    return request.getfixturevalue("pg_url"), str(tmp_path / "index.sqlite3")
