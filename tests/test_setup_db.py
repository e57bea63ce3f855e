"""cm_setup_db, run as a real subprocess, both from the checkout and installed."""

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cloudmanager.db import SCHEMA_VERSION

SCRIPT = Path(__file__).resolve().parent.parent / "cm_setup_db"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=60)


def test_creates_schema_and_is_idempotent(tmp_path):
    db = tmp_path / "db" / "production.sqlite3"
    for _ in range(2):
        result = run(str(db))
        assert result.returncode == 0, result.stderr
        assert "schema version %d" % SCHEMA_VERSION in result.stdout
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"files", "uploads", "upload_queue", "host_health", "transfers",
            "counters", "reservations", "sessions"} <= tables


def test_help():
    result = run("--help")
    assert result.returncode == 0 and "usage: cm_setup_db" in result.stdout


@pytest.mark.parametrize("make_bad", ["directory", "not_sqlite", "newer"])
def test_errors_are_one_line_and_non_zero(tmp_path, make_bad):
    target = tmp_path / "bad"
    if make_bad == "directory":
        target.mkdir()
    elif make_bad == "not_sqlite":
        target.write_bytes(b"this is not a database at all" * 100)
    else:
        conn = sqlite3.connect(target)
        conn.execute("PRAGMA user_version = 99")
        conn.close()
    result = run(str(target))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("cm_setup_db: error:")
    assert "Traceback" not in result.stderr


def test_usage_error_exits_2():
    result = run()
    assert result.returncode == 2 and "usage" in result.stderr


def test_installed_console_script(tmp_path):
    exe = shutil.which("cm_setup_db", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("cloudmanager is not installed in this environment")
    result = subprocess.run([exe, str(tmp_path / "x.sqlite3")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_postgresql_catalog_is_set_up_once_even_by_two_at_once(postgres_server, tmp_path):
    """`cm_setup_db URL`, from two processes at the same moment, then again:
    the schema is created once, and the password is never printed."""
    from pg_server import PASSWORD

    url = postgres_server.password_url()
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    again = run(url)
    assert again.returncode == 0, again.stderr
    for out, err in outs + [(again.stdout, again.stderr)]:
        assert "schema version %d" % SCHEMA_VERSION in out
        assert PASSWORD not in out + err and ":***@" in out
    # The catalog alone: no node's cache index on the server.
    import psycopg

    with psycopg.connect(url) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
    assert {"files", "uploads", "upload_queue", "host_health", "tombstones"} <= tables
    assert not tables & {"cache_entries", "reservations", "sessions"}
    bad = run(url.replace(PASSWORD, "wrong"))
    assert bad.returncode == 1 and "wrong" not in bad.stderr and PASSWORD not in bad.stderr
    assert bad.stderr.count("\n") == 1
