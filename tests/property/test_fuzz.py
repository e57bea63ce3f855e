"""Fuzzing the record format: data_load never raises and never writes a file;
the serializers round-trip."""

import io
import json
import os
import re
import shutil
import tempfile
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudmanager import CloudManager, serializers, trees, validation
from cloudmanager.errors import InvalidInputError, TreeError, UnsafePathError
from cloudmanager.hosts.memory import MemoryHost
from cloudmanager.validation import safe_basename
from reliability.figures import FUZZ, add

HEX = "0123456789abcdef"
hashes = st.text(HEX, min_size=64, max_size=64)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) \
    | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=20)
# Strings a hostile node would try in any field.
nasty = st.sampled_from(["../../etc/passwd", "/etc/passwd", "--run-after=/bin/sh", "-o/tmp",
                         "file:///etc/passwd", "http://x/$(reboot)", "\x00", "..", ".",
                         "a" * 5000, "C:\\Windows\\x", "\u202e", "~/.ssh/id_rsa"])
fields = nasty | json_values
uploads = st.lists(st.fixed_dictionaries({}, optional={
    "host_name": st.text(max_size=20) | nasty, "url": st.text(max_size=60) | nasty
    | st.builds(lambda h: "http://example.org/" + h, hashes),
    "error": st.booleans() | fields}), max_size=4)
records = st.fixed_dictionaries({}, optional={
    "version": st.sampled_from(["0.1", "0.2", "9"]) | fields,
    "datetime": st.integers(-5, 2**64) | st.text(HEX, max_size=22) | fields,
    "filename": fields, "filesize": st.integers(-5, 2**64) | fields,
    "filehash": hashes | fields, "uploads": uploads | fields})
documents = st.lists(records, max_size=5) | json_values | records


@pytest.fixture(scope="module")
def pool():
    base = tempfile.mkdtemp(prefix="cm-fuzz-")
    cm = CloudManager(os.path.join(base, "db.sqlite3"), os.path.join(base, "cache"), 1 << 20,
                      hosts=[MemoryHost("fuzz-" + uuid.uuid4().hex, name="fuzz")], fsync=False)
    yield base, cm
    cm.close()
    shutil.rmtree(base, ignore_errors=True)


def tree(base):
    found = set()
    for d, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.relpath(os.path.join(d, name), base)
            if not path.startswith("db.sqlite3"):  # the database and its -wal, -shm
                found.add(path)
    return found


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(doc=documents, as_bytes=st.booleans())
def test_data_load_never_raises_and_writes_no_file(pool, doc, as_bytes):
    add(FUZZ)
    base, cm = pool
    before = tree(base)
    text = json.dumps(doc)
    result = cm.data_load(text.encode() if as_bytes else text)
    assert result is None or (isinstance(result, int) and result >= 0)
    assert tree(base) == before
    for record in json.loads(cm.data_dump()):  # what was kept is valid and safe
        assert serializers.parse_record(record).filename == record["filename"]
        assert "/" not in record["filename"] and not record["filename"].startswith(("-", "."))


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_data_load_never_raises_on_text_that_is_not_json(pool, text):
    add(FUZZ)
    _, cm = pool
    result = cm.data_load(text)
    assert result is None or isinstance(result, int)


plain_records = st.builds(
    serializers.Record, hashes,
    st.text(max_size=30).map(safe_basename),
    st.integers(0, serializers.MAX_FILESIZE), st.integers(0, serializers.MAX_DATETIME),
    st.lists(st.tuples(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True),
                       st.builds(lambda h: "https://host.example/f/" + h, hashes),
                       st.booleans()), max_size=3, unique=True).map(tuple),
    objects=st.just(()))
#: An encrypted copy's object (its ciphertext's hash and size, the key id), or None.
object_meta = st.none() | st.tuples(hashes, st.integers(0, serializers.MAX_OBJECT_SIZE),
                                    st.from_regex(r"[0-9a-f]{32}", fullmatch=True))


def _with_objects(record, metas):
    """The record with the given objects for its uploads (the first entry per URL)."""
    objects = {}
    for (host, url, _), meta in zip(record.uploads, metas):
        if meta is not None:
            objects.setdefault((host, url), (host, url) + meta)
    return record._replace(objects=tuple(objects.values()))


valid_records = plain_records.flatmap(
    lambda r: st.tuples(*[object_meta for _ in r.uploads]).map(
        lambda metas: _with_objects(r, metas)))


@settings(max_examples=150, deadline=None)
@given(record=valid_records)
def test_a_record_round_trips(record):
    add(FUZZ)
    as_dict = serializers.record_to_dict(record)
    assert serializers.parse_record(as_dict) == record
    assert serializers.parse_record(json.loads(json.dumps(as_dict))) == record


@settings(max_examples=60, deadline=None)
@given(batch=st.lists(valid_records, max_size=6))
def test_a_stream_of_records_round_trips(batch):
    add(FUZZ)
    out = io.StringIO()
    assert serializers.dump_to(iter(batch), out) == len(batch)
    assert list(serializers.load_from(io.StringIO(out.getvalue()))) == batch


# -- check_url: its fast path for common URLs agrees with the full parse ---------

url_bits = st.text("ab:/?#@[]%.-+09Z=&~é", max_size=6)
url_shaped = st.tuples(
    st.sampled_from(["http", "HTTPS", "file", "File", "s3", "memory", "ftp", "x-y", "", "9a"]),
    st.sampled_from(["://", ":/", ":", ":///", "//"]),
    st.sampled_from(["", "host", "localhost", "a.b", "u@h", "[::1]", "h:80", "h:", "h:x"]),
    url_bits).map("".join)


@settings(max_examples=1500, deadline=None)
@given(url_shaped | url_bits,
       st.sampled_from([validation.URL_SCHEMES, frozenset({"file"}), frozenset({"http"})]))
def test_check_url_fast_path_agrees_with_the_full_parse(url, schemes):
    add(FUZZ)

    def verdict():
        try:
            return validation.check_url(url, schemes)
        except InvalidInputError as exc:
            return str(exc)

    fast = verdict()
    plain, validation._PLAIN_URL = validation._PLAIN_URL, re.compile(r"(?!)")  # never matches
    try:
        assert verdict() == fast  # every URL parsed in full
    finally:
        validation._PLAIN_URL = plain


_path_part = st.one_of(
    st.sampled_from(["a", "b.txt", ".", "..", "", "CON", "con.txt", "Nul", "nul.", "com1", "COM1.x",
                     "lpt9", "lpt10", "CONIN$", "aux ", "x" * 255, "y" * 256, ".hidden", "a b",
                     "é", "C:", "a\\\\b", "-n", "+", "9"]),
    st.text(st.characters(codec="utf-8", blacklist_characters="/"), max_size=8),
    st.text("abcnNuUlLoO1239._-+ $:", max_size=6))


@settings(max_examples=1500, deadline=None)
@given(st.lists(_path_part, min_size=1, max_size=5).map("/".join)
       | st.sampled_from(["/a", "a//b", "a/", "x" * 4097, "/".join(["x" * 255] * 17)]))
def test_check_path_fast_path_agrees_with_the_part_by_part_check(path):
    add(FUZZ)

    def verdict():
        try:
            return trees.check_path(path)
        except UnsafePathError as exc:
            return str(exc)

    fast = verdict()
    plain, trees._PLAIN_PATH = trees._PLAIN_PATH, re.compile(r"(?!)").match  # never matches
    try:
        assert verdict() == fast  # every path checked part by part
    finally:
        trees._PLAIN_PATH = plain


def _reference_manifest(entries):
    """A manifest as json.dumps writes it: what trees.encode must match byte for byte."""
    items = [e._asdict() for e in sorted(entries, key=lambda e: e.path)]
    return json.dumps({"format": trees.FORMAT, "version": trees.VERSION, "entries": items},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False
                      ).encode("utf-8") + b"\n"


_tree_entry = st.builds(
    trees.TreeEntry,
    path=st.lists(_path_part, min_size=1, max_size=3).map("/".join),
    hash=st.text("0123456789abcdef", min_size=64, max_size=64),
    size=st.integers(0, 2**63 - 1), mode=st.integers(0, 0o777),
    mtime_ns=st.integers(-2**63, 2**63 - 1))


@settings(max_examples=500, deadline=None)
@given(st.lists(_tree_entry, max_size=6, unique_by=lambda e: e.path))
def test_a_manifest_is_written_as_json_dumps_writes_it(entries):
    add(FUZZ)
    try:
        encoded = trees.encode(entries)
    except (UnsafePathError, TreeError):
        return  # refused: a bad path, or a file where a directory is
    assert encoded == _reference_manifest(entries)
    assert trees.decode(encoded) == sorted(entries, key=lambda e: e.path)
