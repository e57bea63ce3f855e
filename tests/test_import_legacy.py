"""``cm import-legacy`` and ``CloudManager.import_legacy``: a pool of the
original cloud-manager, built as it kept one, brought into a fresh pool.

The original kept a ``files(name, size, hash, payload, blockchain_hash,
exported_timestamp)`` table (payload: the v0.2 record, NULL until uploaded),
a ``transfer_meter(uploaded, downloaded, month)`` and a
``blockchain_state(last_known_block)``, in a SQLite file or on PostgreSQL,
and a storage folder of files named ``<first 7 hex of the hash>_<basename>``.
"""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest


#: The original's tables after its last migration, as its schema.sql made them.
ORIGINAL_SCHEMA = [
    "CREATE TABLE files (name varchar, size int, hash varchar, payload text,"
    " blockchain_hash varchar, exported_timestamp timestamp)",
    "CREATE TABLE transfer_meter (uploaded bigint, downloaded bigint, month varchar)",
    "CREATE UNIQUE INDEX transfer_meter_month_idx ON transfer_meter(month)",
    "CREATE TABLE blockchain_state (last_known_block integer)",
]
BLOCK = 4242
#: (month, uploaded, downloaded): the row older than months, and two months.
METER = [(None, 100, 200), ("2014-04", 1000, 2000), ("2014-5", 10, 20)]


def sha(data):
    return hashlib.sha256(data).hexdigest()


class OriginalPool:
    """An original cloud-manager pool: its database (SQLite or PostgreSQL), its
    storage folder, and the folder of the host its uploaded files went to."""

    def __init__(self, root, database=None):
        self.root = Path(root)
        self.storage = self.root / "storage"
        self.host = self.root / "host"  # where the "uploaded" copies are
        self.storage.mkdir(parents=True)
        self.host.mkdir()
        self.database = database or str(self.root / "cloudmanager.db")
        self.rows = []
        #: name -> bytes of every file that must come back.
        self.expected = {}

    def cached(self, name, data, file_hash=None):
        """Put bytes in the storage folder as the original named them."""
        path = self.storage / ("%s_%s" % ((file_hash or sha(data))[:7], name))
        path.write_bytes(data)
        return path

    def uploaded(self, name, data, blockchain_hash=None, exported=None, filename=None,
                 version="0.2"):
        """A file the original uploaded: its payload names a copy on the host."""
        digest = sha(data)
        (self.host / digest).write_bytes(data)
        stored = "%s_%s" % (digest[:7], name)
        payload = {"version": version, "datetime": "1398333600", "filesize": str(len(data)),
                   "filehash": digest,
                   "uploads": [{"host_name": "old", "url": "file://%s/%s" % (self.host, digest)},
                               {"host_name": "mediafire", "error": True}]}
        if version == "0.2":
            payload["filename"] = stored if filename is None else filename
        self.rows.append((stored, len(data), digest, json.dumps(payload), blockchain_hash,
                          exported))
        return digest

    def queued(self, name, data, in_storage=True, stored_bytes=None, row_name=None):
        """A file never uploaded (payload NULL), its bytes in the storage folder."""
        digest = sha(data)
        stored = row_name or "%s_%s" % (digest[:7], name)
        if in_storage:
            (self.storage / stored).write_bytes(data if stored_bytes is None else stored_bytes)
        self.rows.append((stored, len(data), digest, None, None, None))
        return digest

    def raw_row(self, name, size, digest, payload):
        self.rows.append((name, size, digest, payload, None, None))

    def write(self):
        """Create the database with the original's schema and rows."""
        statements = ORIGINAL_SCHEMA
        meter = "INSERT INTO transfer_meter (month, uploaded, downloaded) VALUES (?, ?, ?)"
        files = "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)"
        block = "INSERT INTO blockchain_state VALUES (?)"
        if self.database.startswith("postgres"):
            import psycopg

            with psycopg.connect(self.database, autocommit=True) as conn:
                for sql in statements:
                    conn.execute(sql)
                with conn.cursor() as cur:
                    cur.executemany(files.replace("?", "%s"), self.rows)
                    cur.executemany(meter.replace("?", "%s"), METER)
                    cur.execute(block.replace("?", "%s"), (BLOCK,))
            return
        conn = sqlite3.connect(self.database)
        with conn:
            for sql in statements:
                conn.execute(sql)
            conn.executemany(files, self.rows)
            conn.executemany(meter, METER)
            conn.execute(block, (BLOCK,))
        conn.close()


def snapshot(folder):
    """Every entry under ``folder`` (not following links): kind and bytes or target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                found[path] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                found[path] = ("file", Path(path).read_bytes())
            else:
                found[path] = ("dir", None)
    return found


def build(original, outside):
    """The pool every test imports: one file of each kind."""
    o = original
    a = o.uploaded("photo.jpg", b"uploaded, exported once\n", exported="2014-04-24 10:00:00")
    b = o.uploaded("minutes.txt", b"uploaded, and read back from block 41\n",
                   blockchain_hash="b1" * 32)
    o.cached("photo.jpg", b"uploaded, exported once\n")  # the original's cache had it too
    g = o.uploaded("report.txt", b"a name with someone else's prefix\n",
                   filename="abcdef0_report.txt")
    c = o.queued("notes.txt", b"never uploaded: only in storage\n")
    # A payload that is not JSON: the record is skipped, its bytes still count.
    d_data = b"corrupt payload, good bytes\n"
    d = sha(d_data)
    o.raw_row("%s_diary.txt" % d[:7], len(d_data), d, "{not json")
    o.cached("diary.txt", d_data)
    e = o.queued("tampered.bin", b"the bytes it was recorded with\n",
                 stored_bytes=b"the bytes someone put there!!!\n")  # same size, other bytes
    # A symbolic link to a file outside STORAGE, holding exactly the right bytes:
    # following it would "work", and must not happen.
    secret = b"outside the storage folder\n"
    outside.write_bytes(secret)
    f = o.queued("link.txt", secret, in_storage=False)
    os.symlink(outside, o.storage / ("%s_link.txt" % f[:7]))
    h = o.queued("lost.txt", b"never uploaded, and gone\n", in_storage=False)
    # Larger than a small cache: streamed to the hosts, checked all the same.
    big = b"".join(b"%05d big file line\n" % i for i in range(200))
    i = o.queued("big.bin", big)
    j = o.queued("bigger.bin", big.replace(b"big", b"BIG"),
                 stored_bytes=big.replace(b"big", b"bad"))
    o.expected = {"photo.jpg": (a, b"uploaded, exported once\n"),
                  "minutes.txt": (b, b"uploaded, and read back from block 41\n"),
                  "abcdef0_report.txt": (g, b"a name with someone else's prefix\n"),
                  "notes.txt": (c, b"never uploaded: only in storage\n"),
                  "diary.txt": (d, d_data), "big.bin": (i, big)}
    o.refused = {e: "tampered", f: "link", j: "big tampered"}
    o.missing = h
    o.write()
    return o


class Cm:
    """``cm`` as a real process in a fresh home, in ``work``."""

    def __init__(self, root):
        self.work = Path(root) / "work"
        self.work.mkdir(parents=True)
        self.env = dict(os.environ, HOME=str(root), XDG_CONFIG_HOME=str(Path(root) / "config"),
                        XDG_DATA_HOME=str(Path(root) / "data"),
                        XDG_CACHE_HOME=str(Path(root) / "cache"))
        for name in ("CLOUDMANAGER_CONFIG", "CLOUDMANAGER_DATABASE"):
            self.env.pop(name, None)

    def __call__(self, *args):
        return subprocess.run([sys.executable, "-m", "cloudmanager"] + [str(a) for a in args],
                              cwd=self.work, env=self.env, capture_output=True, text=True,
                              timeout=120)


@pytest.fixture(params=["sqlite", "postgresql"])
def original(request, tmp_path):
    """An original pool, its database a SQLite file or (with a password in
    its ``postgres://`` URL) a PostgreSQL database."""
    database = None
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        database = "postgres://" + server.password_url().split("://", 1)[1]
    return build(OriginalPool(tmp_path / "old", database), tmp_path / "outside.txt")


def test_cm_import_legacy_brings_in_an_original_pool(tmp_path, original):
    cm = Cm(tmp_path / "home")
    assert cm("init", "--host", "old=dir:%s" % original.host).returncode == 0
    storage_before = snapshot(original.storage)
    secret = "s3cret-Pa55word-never-logged"

    first = cm("import-legacy", original.database, original.storage, "--json")
    assert first.returncode == 1, first.stderr  # something was refused
    assert secret not in first.stdout + first.stderr
    summary = json.loads(first.stdout)
    assert summary["rows"] == 10
    assert summary["records"] == 3 and summary["changed"] == 3
    assert summary["tagged"] == 1 and summary["stamped"] == 1
    assert [s["hash"] for s in summary["skipped"]] == [original.expected["diary.txt"][0]]
    assert "not JSON" in summary["skipped"][0]["reason"]
    assert sorted(summary["uploaded"]) == sorted(
        original.expected[n][0] for n in ("notes.txt", "diary.txt", "big.bin"))
    refused = {r["hash"]: r["reason"] for r in summary["refused"]}
    assert set(refused) == set(original.refused)
    kinds = {kind: digest for digest, kind in original.refused.items()}
    assert "does not hold the file" in refused[kinds["tampered"]]
    assert "does not hold the file" in refused[kinds["big tampered"]]
    assert "symbolic link" in refused[kinds["link"]]
    assert [m["hash"] for m in summary["missing"]] == [original.missing]
    assert summary["meter"]["months"] == 3 and summary["last_known_block"] == BLOCK
    assert "refused" in first.stderr and "symbolic link" in first.stderr
    assert "not JSON" in first.stderr  # the skipped record's reason, logged

    # Every file comes back byte for byte, by its stripped name; the refused
    # ones are not in the pool, and the storage folder is as it was.
    listing = json.loads(cm("ls", "--json").stdout)
    names = {f["hash"]: f["filename"] for f in listing}
    assert set(names) == {h for h, _ in original.expected.values()}
    (tmp_path / "out").mkdir()
    for name, (digest, data) in original.expected.items():
        assert names[digest] == name
        got = cm("download", digest, tmp_path / "out")
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "out" / name).read_bytes() == data
    assert snapshot(original.storage) == storage_before
    assert (tmp_path / "outside.txt").read_bytes() == b"outside the storage folder\n"
    listing = cm("ls", "--json").stdout

    # Again: nothing changes, nothing is uploaded; the refusals are reported again.
    second = cm("import-legacy", original.database, original.storage)
    assert second.returncode == 1
    assert second.stdout == ("import-legacy: 3 records imported (0 changed), 1 bad record "
                             "skipped, 0 files uploaded, 3 refused, 1 missing\n")
    assert secret not in second.stdout + second.stderr
    assert cm("ls", "--json").stdout == listing
    assert snapshot(original.storage) == storage_before


def test_cm_import_legacy_usage_mistakes_exit_2(tmp_path):
    cm = Cm(tmp_path / "home")
    (tmp_path / "storage").mkdir()
    missing = cm("import-legacy", tmp_path / "nope.db", tmp_path / "storage")
    assert missing.returncode == 2 and "no database file" in missing.stderr
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE files (hash TEXT, filename TEXT)")  # not the original's
    conn.commit()
    conn.close()
    wrong = cm("import-legacy", other, tmp_path / "storage")
    assert wrong.returncode == 2 and "not an original cloud-manager pool" in wrong.stderr
    original = build(OriginalPool(tmp_path / "old"), tmp_path / "outside.txt")
    no_folder = cm("import-legacy", original.database, tmp_path / "nowhere")
    assert no_folder.returncode == 2 and "not a directory" in no_folder.stderr
    assert not (tmp_path / "home" / "data").exists()  # no pool was made for nothing


def test_import_legacy_keeps_tags_stamps_meter_and_cursor(tmp_path, make_pool):
    original = build(OriginalPool(tmp_path / "old"), tmp_path / "outside.txt")
    # More rows: a v0.1 record (no filename: the row's name, stripped), a
    # payload of another file, a hash that is not one, and a tagged record
    # whose every upload failed (its bytes in storage).
    original.rows = []
    old_style = original.uploaded("old.txt", b"a v0.1 record\n", version="0.1")
    failed_data = b"every upload failed\n"
    failed = sha(failed_data)
    original.rows.append(("%s_failed.txt" % failed[:7], len(failed_data), failed, json.dumps(
        {"version": "0.2", "datetime": "1", "filename": "%s_failed.txt" % failed[:7],
         "filesize": str(len(failed_data)), "filehash": failed,
         "uploads": [{"host_name": "mediafire", "error": True}]}), "c3" * 32, "2014-05-01"))
    original.cached("failed.txt", failed_data)
    original.raw_row("x_other.txt", 5, "ab" * 32, json.dumps(
        {"version": "0.2", "datetime": "1", "filename": "other.txt", "filesize": "5",
         "filehash": "cd" * 32, "uploads": []}))
    original.raw_row("../../etc/passwd", 5, "../../etc/passwd", None)
    conn = sqlite3.connect(original.database)
    with conn:
        conn.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)", original.rows)
    conn.close()
    original_bytes = Path(original.database).read_bytes()
    # A cache smaller than big.bin: it is streamed to the host, and the
    # tampered one of its size is refused before anything is published.
    cm = make_pool(capacity=1024, hosts=["dir:%s" % original.host], redundancy=1)
    cm.visit_block(10)
    summary = cm.import_legacy(original.database, original.storage)
    assert summary is not None and summary["changed"] == 5
    assert cm.info(old_style)["filename"] == "old.txt"
    assert failed in summary["uploaded"] and cm.info(failed)["filename"] == "failed.txt"
    skipped = {s["hash"]: s["reason"] for s in summary["skipped"]}
    assert "another file" in skipped["ab" * 32] and "SHA-256" in skipped["../../etc/passwd"]
    assert not cm.exists("ab" * 32) and not cm.exists("cd" * 32)
    big = original.expected["big.bin"][0]
    assert big in summary["uploaded"] and not cm.on_cache(big)
    assert (original.host / big).read_bytes() == original.expected["big.bin"][1]
    (tampered_big,) = [h for h, kind in original.refused.items() if kind == "big tampered"]
    assert not cm.exists(tampered_big)
    bad_bytes = (original.storage / ("%s_bigger.bin" % tampered_big[:7])).read_bytes()
    assert sorted(os.listdir(original.host)) == sorted(
        [".cloudmanager-host", old_style, failed] + [h for h, _ in original.expected.values()])
    assert sha(bad_bytes) not in os.listdir(original.host)
    a, b, g = (original.expected[n][0] for n in ("photo.jpg", "minutes.txt",
                                                 "abcdef0_report.txt"))
    # Tagged (b) and stamped (a) records are out there already: only g and
    # the two files uploaded now are left to export.
    exported = json.loads(cm.data_dump(10 ** 6))
    assert {r["filehash"] for r in exported} == {
        g, original.expected["notes.txt"][0], original.expected["diary.txt"][0], big,
        old_style, failed}  # failed: tagged, but its new copy is news
    assert cm.data_dump(10 ** 6) is None
    assert cm.last_known_block() == BLOCK
    assert summary["meter"]["uploaded"] == sum(u for _, u, _ in METER)
    assert summary["meter"]["downloaded"] == sum(d for _, _, d in METER)
    outgoing, incoming = cm.total_outgoing(), cm.total_incoming()
    assert outgoing > summary["meter"]["uploaded"]  # and the two files uploaded now
    assert incoming >= summary["meter"]["downloaded"]
    assert cm.info(b)["filename"] == "minutes.txt"

    again = cm.import_legacy(original.database, original.storage)
    assert again["changed"] == 0 and again["uploaded"] == [] and again["present"] == 4
    assert cm.last_known_block() == BLOCK
    assert (cm.total_outgoing(), cm.total_incoming()) == (outgoing, incoming)  # set, not added
    assert Path(original.database).read_bytes() == original_bytes  # only read
    # A cursor further on than the original's is kept.
    cm.visit_block(BLOCK + 5)
    cm.import_legacy(original.database, original.storage)
    assert cm.last_known_block() == BLOCK + 5
    # Not an original pool: None, logged.
    assert cm.import_legacy(tmp_path / "missing.db", original.storage) is None
