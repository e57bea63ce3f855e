"""What ``import cloudmanager``, opening a pool and starting ``cm`` load.

Only what every pool needs. The modules below serve some operations only (an
import of an original pool, a PostgreSQL catalog, an encrypted pool, trees,
record exports, other kinds of host) or cost start-up time that a command not
using them should not pay (OpenSSL's start through hashlib or secrets, ctypes,
socket, subprocess, statistics). Each is imported where it is used. These
tests pin that without timing anything (speed is bench/'s business, row 8):
a fresh interpreter reports what it loaded, ``sys.modules``.
"""

import hashlib
import json
import subprocess
import sys

import cloudmanager

#: Never loaded by ``import cloudmanager``.
NOT_AT_IMPORT = (
    # ours, for some operations only
    "cloudmanager.legacy_import", "cloudmanager.db.legacy_pool", "cloudmanager.db.postgres",
    "cloudmanager.crypto", "cloudmanager.trees", "cloudmanager.records",
    "cloudmanager.serializers", "cloudmanager.legacy", "cloudmanager.migrate",
    "cloudmanager.cli", "cloudmanager.hosts.s3", "cloudmanager.hosts.fsspec",
    "cloudmanager.hosts.plowshare",
    # the optional dependencies and the CLI's
    "psycopg", "psycopg_pool", "pyrage", "boto3", "botocore", "fsspec", "webdav4", "click",
    # the standard library's costly starts
    "hashlib", "_hashlib", "secrets", "hmac", "ctypes", "socket", "subprocess", "statistics",
    "tomllib",
)

#: Never loaded by ``cm`` before a command runs (its import).
NOT_IN_THE_CLI = (
    "cloudmanager.legacy_import", "cloudmanager.db.legacy_pool", "cloudmanager.db.postgres",
    "cloudmanager.crypto", "cloudmanager.trees", "cloudmanager.migrate", "psycopg", "pyrage",
    "boto3", "fsspec", "hashlib", "subprocess", "socket", "ctypes",
)


def loaded_by(code, *args):
    """``sys.modules`` of a fresh interpreter after ``code``, and what it printed
    before (a JSON value on the first line)."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    return json.loads(out[0]), set(json.loads(out[-1]))


def test_import_cloudmanager_loads_the_core_and_nothing_optional():
    facts, modules = loaded_by(
        "import cloudmanager\n"
        "from cloudmanager import CloudManager\n"
        "import json\n"
        "print(json.dumps([cloudmanager.__file__, isinstance(CloudManager, type),\n"
        "                  CloudManager.__module__]))")
    # The code under test, and the class itself (not a stand-in loaded later).
    assert facts == [cloudmanager.__file__, True, "cloudmanager.manager"]
    assert {"cloudmanager.pool", "cloudmanager.db", "cloudmanager.engine",
            "cloudmanager.replication", "cloudmanager.cache.store"} <= modules
    assert sorted(modules.intersection(NOT_AT_IMPORT)) == []


OPEN_UPLOAD_EXPORT = """
import json, os, sys
from cloudmanager import CloudManager
root, source = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(root, "host"), exist_ok=True)
cm = CloudManager(os.path.join(root, "pool.sqlite3"), os.path.join(root, "cache"), 1 << 20,
                  hosts=["dir:" + os.path.join(root, "host")], redundancy=1)
after_open = sorted(sys.modules)
file_hash = cm.upload(source)
after_upload = sorted(sys.modules)
records = cm.pool.records
exported = json.loads(cm.data_dump())
same_store = cm.pool.records is records
cm.close()
print(json.dumps([after_open, after_upload, file_hash, [r["filehash"] for r in exported],
                  same_store]))
"""


def test_opening_a_pool_loads_nothing_optional_and_each_operation_loads_what_it_needs(
        tmp_path):
    source = tmp_path / "a.txt"
    source.write_bytes(b"start-up" * 1000)
    (after_open, after_upload, file_hash, exported, same_store), _ = loaded_by(
        OPEN_UPLOAD_EXPORT, str(tmp_path / "pool"), str(source))
    assert "cloudmanager.hosts.folder" in after_open
    assert sorted(set(after_open).intersection(NOT_AT_IMPORT)) == []
    # An upload hashes: hashlib comes in then, and the hash is SHA-256's.
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert file_hash == expected
    assert "hashlib" in after_upload and "cloudmanager.records" not in after_upload
    # An export makes the pool's record store on first use, and keeps it.
    assert exported == [expected]
    assert same_store is True


def test_starting_cm_loads_no_optional_module():
    _, modules = loaded_by("import cloudmanager.cli\nprint('null')")
    assert "click" in modules
    # What click itself loads is not ours to avoid: on Python 3.10 its uuid
    # import loads platform, which loads subprocess.
    _, by_click = loaded_by("import click\nprint('null')")
    assert sorted(modules.intersection(NOT_IN_THE_CLI) - by_click) == []
