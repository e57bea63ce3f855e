"""The JSON record format: parsing, validation, and streaming dump/load."""

import datetime
import io
import json
import logging
import threading
import time
import unicodedata

import pytest

from cloudmanager.errors import SerializationError
from cloudmanager import serializers
from cloudmanager.serializers import (MAX_DATETIME, MAX_FILESIZE, MAX_UPLOADS, Record, dump_to,
                                      iter_documents, load_from, parse_record, record_to_dict)

HASH = "6e" * 32


def record(**overrides):
    obj = {
        "version": "0.2", "datetime": "1391212800", "filename": "README.md",
        "filesize": "23124", "filehash": HASH,
        "uploads": [{"host_name": "mediafire", "url": "http://www.mediafire.com/?qorncpzfe74s9"},
                    {"host_name": "anonfiles", "error": True}],
    }
    obj.update(overrides)
    return obj


def test_round_trip_through_dict():
    rec = parse_record(record())
    assert rec == Record(HASH, "README.md", 23124, 1391212800, (
        ("mediafire", "http://www.mediafire.com/?qorncpzfe74s9", False),
        ("anonfiles", "", True)))
    out = record_to_dict(rec)
    assert out == record()  # the seed's format, exactly: numbers as strings
    assert json.loads(json.dumps(out)) == out
    assert parse_record(out) == rec


def test_bad_copy_keeps_its_url_through_a_round_trip():
    rec = parse_record(record(uploads=[{"host_name": "h", "url": "https://h.example/x",
                                        "error": True}]))
    assert rec.uploads == (("h", "https://h.example/x", True),)
    assert record_to_dict(rec)["uploads"] == [
        {"host_name": "h", "url": "https://h.example/x", "error": True}]
    assert parse_record(record_to_dict(rec)) == rec


def test_v01_record_without_filename_is_read():
    obj = record(version="0.1")
    del obj["filename"]
    rec = parse_record(obj)
    assert (rec.hash, rec.filename, rec.size, rec.datetime) == (HASH, "", 23124, 1391212800)
    assert len(rec.uploads) == 2
    assert record_to_dict(rec)["version"] == "0.2"


@pytest.mark.parametrize("version", ["0.3", "1", 0.2, None, ["0.2"]])
def test_unknown_versions_are_refused(version):
    with pytest.raises(SerializationError, match="version"):
        parse_record(record(version=version))


@pytest.mark.parametrize("size, when", [(23124, 1391212800), ("23124", "1391212800"),
                                        (23124, "1391212800"), ("0", 0)])
def test_numbers_as_ints_or_strings(size, when):
    rec = parse_record(record(filesize=size, datetime=when))
    assert rec.size == int(size) and rec.datetime == int(when)
    assert isinstance(rec.size, int) and isinstance(rec.datetime, int)


@pytest.mark.parametrize("field", ["filesize", "datetime"])
@pytest.mark.parametrize("value", [
    True, False, -1, "-1", 1.0, 23124.5, "1.5", "1e3", "", " 12", "12 ", "0x10",
    "\uff11\uff12",              # full-width digits
    "1" * 20,                     # overlong digit string
    "0" * 20,                     # overlong even though its value is small
    "9223372036854775808",        # 19 digits, beyond 2**63 - 1
    2 ** 63, None, [1], {"n": 1},
])
def test_bad_numbers_are_refused(field, value):
    with pytest.raises(SerializationError):
        parse_record(record(**{field: value}))


def test_largest_numbers_are_accepted():
    for size, when in ((MAX_FILESIZE, MAX_DATETIME), (str(MAX_FILESIZE), str(MAX_DATETIME))):
        rec = parse_record(record(filesize=size, datetime=when))
        assert (rec.size, rec.datetime) == (2 ** 48, 253402300799)
    assert MAX_FILESIZE < 2 ** 53 and MAX_FILESIZE / (64 * 1024) < threading.TIMEOUT_MAX
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(MAX_DATETIME)) == "9999-12-31 23:59:59"
    assert datetime.datetime.fromtimestamp(MAX_DATETIME, datetime.timezone.utc).year == 9999


@pytest.mark.parametrize("size", [
    MAX_FILESIZE + 1, 2 ** 53 - 1, 2 ** 53, 2 ** 63 - 1, "9223372036854775807",
    str(MAX_FILESIZE + 1), 10 ** 30, 10 ** 4000,
], ids=lambda v: "%s%s" % (type(v).__name__, str(v)[:20]))
def test_sizes_no_file_can_have_are_refused(size):
    # 2**63 - 1 was accepted: it overflowed the engine's wait downstream.
    with pytest.raises(SerializationError, match="filesize .*beyond 281474976710656"):
        parse_record(record(filesize=size))


@pytest.mark.parametrize("when", [
    MAX_DATETIME + 1, 2 ** 40, 1391212800000,  # milliseconds, not seconds
    "9223372036854775807", 2 ** 63 - 1, 2 ** 64,
], ids=lambda v: "%s%s" % (type(v).__name__, v))
def test_times_after_year_9999_are_refused(when):
    with pytest.raises(SerializationError, match="datetime .*beyond 253402300799"):
        parse_record(record(datetime=when))


def test_a_record_with_a_hostile_size_is_skipped_and_the_others_load(caplog):
    docs = [record_to_dict(r) for r in sample_records(3)]
    docs[1]["filesize"] = str(2 ** 63 - 1)
    docs.insert(2, dict(docs[2], filehash="ab" * 32, datetime=str(2 ** 62)))
    with caplog.at_level(logging.WARNING, logger="cloudmanager"):
        loaded = list(load_from(io.StringIO(json.dumps(docs))))
    assert loaded == [sample_records(3)[0], sample_records(3)[2]]
    assert [m for m in caplog.messages if "skipping record" in m] == [
        "skipping record #1: filesize 9223372036854775807 is beyond 281474976710656",
        "skipping record #2: datetime 4611686018427387904 is beyond 253402300799"]


def test_a_pool_imports_the_good_records_of_a_hostile_dump(make_pool, write_file):
    # The hostile record is refused at import, so no transfer of it can fail
    # and count against a healthy host.
    source = make_pool(name="source", redundancy=1)
    good = source.upload(write_file("good", b"good data"))
    hostile = source.upload(write_file("hostile", b"hostile data"))
    docs = json.loads(source.data_dump())
    for doc in docs:
        if doc["filehash"] == hostile:
            doc["filesize"] = str(2 ** 63 - 1)
    pool = make_pool(name="pool", redundancy=1)
    assert pool.load_from(io.StringIO(json.dumps(docs))) == 1
    assert pool.data_load(json.dumps(docs)) == 0  # the same, and nothing new
    assert pool.exists(good) and not pool.exists(hostile)
    assert pool.download(hostile) is None
    assert pool.download(good) and pool.stats()["hosts"] and all(
        h["failures"] == 0 for h in pool.stats()["hosts"].values())


@pytest.mark.parametrize("bad", [None, "", "6e" * 31, "6e" * 33, "zz" * 32, "../" * 21 + "a",
                                 " " + "6e" * 32, 123, ["6e" * 32]])
def test_bad_hashes_are_refused(bad):
    with pytest.raises(SerializationError):
        parse_record(record(filehash=bad))


def test_uppercase_hash_is_lowered():
    assert parse_record(record(filehash=HASH.upper())).hash == HASH


@pytest.mark.parametrize("name, safe", [
    ("../../etc/passwd", "passwd"),
    ("/etc/shadow", "shadow"),
    ("..\\..\\Windows\\system.ini", "system.ini"),
    ("...", ""),
    ("-rf", "rf"),
    ("--run-after=x", "run-after=x"),
    (". -rf", "rf"),                               # a dash behind a dot and a space
    ("- -rf", "rf"),
    (" . .. -- x", "x"),
    (".\u3000-x", "x"),                             # behind an ideographic space
    ("\u00a0.\u2003-\u00e9", "\u00e9"),
    (".bashrc", "bashrc"),
    ("a\x00b\nc", "abc"),
    ("e\u0301t\u00e9.txt", "\u00e9t\u00e9.txt"),  # NFC
    ("\u00e9" * 200, "\u00e9" * 127),              # cut to 255 bytes, whole characters
    pytest.param("a" * 254 + " b", "a" * 254, id="no-space-left-at-the-cut"),
    pytest.param("\u00e9" * 126 + "\u3000b", "\u00e9" * 126, id="no-wide-space-at-the-cut"),
    ("two\u2028lines\u2029.txt", "twolines.txt"),  # line separators, as newlines
    ("\u202eexe.txt", "exe.txt"),                  # a bidi override
    ("a\ud800b", "ab"),                            # a lone surrogate
    (42, ""),
    (None, ""),
])
def test_hostile_filenames_become_safe_basenames(name, safe):
    assert parse_record(record(filename=name)).filename == safe


@pytest.mark.parametrize("name", [
    "e\u200d\u0301x",      # a zero-width joiner between a letter and its accent
    "a\u00ad\u0301",       # a soft hyphen
    "\u1100\u200b\u1161",  # Hangul jamo kept apart by a zero-width space
    "\u00e9" * 200, ". -\u0301", "x\u2028\u0301",
])
def test_a_cleaned_filename_is_nfc_and_cleaned_again_unchanged(name):
    # An imported name must survive a round trip, or every reload "changes" it.
    rec = parse_record(record(filename=name))
    assert unicodedata.is_normalized("NFC", rec.filename)
    assert parse_record(record_to_dict(rec)).filename == rec.filename


@pytest.mark.parametrize("entry", [
    {"host_name": "h", "url": "-oProxyCommand=sh"},
    {"host_name": "h", "url": "--run-after=/bin/sh"},
    {"host_name": "h", "url": "javascript:alert(1)"},
    {"host_name": "h", "url": "data:text/html,x"},
    {"host_name": "h", "url": "http://a.example/x y"},
    {"host_name": "h", "url": " http://a.example/x"},
    {"host_name": "h", "url": "http://a.example/x\n--run-after=sh"},
    {"host_name": "h", "url": "file://relative/path"},
    {"host_name": "h", "url": "file:relative"},
    {"host_name": "h", "url": "http:///no-host"},
    {"host_name": "h", "url": "http://a.example/" + "x" * 3000},
    {"host_name": "h", "url": "http://a.example:65536/x"},     # no such port
    {"host_name": "h", "url": "http://a.example:99999999999999999999/x"},
    {"host_name": "h", "url": "http://a.example:x/y"},
    {"host_name": "h", "url": "sftp://-oProxyCommand=sh/x"},  # a host read as an option
    {"host_name": "h", "url": "https://u@-a.example/x"},
    {"host_name": "h", "url": "http://-a.\u00e9xample/x"},
    {"host_name": "h", "url": ""},
    {"host_name": "h", "url": 5},
    {"host_name": "h"},                                   # neither url nor error
    {"host_name": "h", "error": False},                    # neither url nor error
    {"host_name": "h", "url": "http://a.example/x", "error": "yes"},
    {"host_name": "-h", "url": "http://a.example/x"},
    {"host_name": "", "error": True},
    {"url": "http://a.example/x"},
    "http://a.example/x",
])
def test_hostile_uploads_are_dropped_and_the_record_kept(entry, caplog):
    good = {"host_name": "h2", "url": "file:///srv/pool/6e"}
    with caplog.at_level(logging.WARNING, logger="cloudmanager"):
        rec = parse_record(record(uploads=[entry, good]))
    assert rec.hash == HASH and rec.size == 23124 and rec.filename == "README.md"
    assert rec.uploads == (("h2", "file:///srv/pool/6e", False),)
    assert any("skipping an upload entry" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


@pytest.mark.parametrize("url", [
    "http://a.example:80/x", "https://a.example:65535/x", "http://a.example:/x",
    "http://a-b.example/x", "sftp://user@a.example:22/pool/6e", "http://[::1]:8080/x",
    "http://a.\u00e9xample:8080/x", "file:///srv/pool/-6e", "http://a.example/-x",
])
def test_urls_with_ports_and_dashes_inside_are_kept(url):
    rec = parse_record(record(uploads=[{"host_name": "h", "url": url}]))
    assert rec.uploads == (("h", url, False),)


def test_duplicate_uploads_are_merged_in_linear_work(monkeypatch):
    # A list's ``not in`` compared each upload with every kept one: 1000
    # distinct uploads cost half a million comparisons per record.
    comparisons = []

    class Counted(tuple):
        __hash__ = tuple.__hash__

        def __eq__(self, other):
            comparisons.append(1)
            return tuple.__eq__(self, other)

    real = serializers._upload
    monkeypatch.setattr(serializers, "_upload", lambda entry: Counted(real(entry)))
    ups = [{"host_name": "h", "url": "http://h.example/%d" % i} for i in range(MAX_UPLOADS)]
    rec = parse_record(record(uploads=ups[:-1] + ups[:1]))
    assert len(rec.uploads) == MAX_UPLOADS - 1 and rec.uploads[0] == ("h", "http://h.example/0",
                                                                     False)
    assert len(comparisons) <= 2 * MAX_UPLOADS


def test_duplicate_uploads_are_merged_and_too_many_refused():
    up = {"host_name": "h", "url": "http://h.example/1"}
    assert parse_record(record(uploads=[up, dict(up)])).uploads == (
        ("h", "http://h.example/1", False),)
    with pytest.raises(SerializationError, match="uploads"):
        parse_record(record(uploads="not a list"))
    many = [{"host_name": "h", "url": "http://h.example/%d" % i} for i in range(MAX_UPLOADS + 1)]
    with pytest.raises(SerializationError, match="at most"):
        parse_record(record(uploads=many))


def test_non_object_record_is_refused():
    for bad in ([record()], "record", 5, None):
        with pytest.raises(SerializationError):
            parse_record(bad)


# -- streaming ---------------------------------------------------------------------


def sample_records(n=5):
    return [parse_record(record(filehash="%064x" % (i + 1), filesize=str(i * 1000),
                                filename="f\u00e9%d \"q\".txt" % i,
                                uploads=[{"host_name": "h%d" % j, "url": "http://h.example/%d" % j}
                                         for j in range(i)]))
            for i in range(n)]


def test_dump_and_load_round_trip():
    records = sample_records()
    buf = io.StringIO()
    assert dump_to(iter(records), buf) == len(records)
    text = buf.getvalue()
    assert json.loads(text) == [record_to_dict(r) for r in records]
    assert list(load_from(io.StringIO(text))) == records


def test_empty_dump_round_trip():
    buf = io.StringIO()
    assert dump_to([], buf) == 0
    assert json.loads(buf.getvalue()) == []
    assert list(load_from(io.StringIO(buf.getvalue()))) == []


def test_load_skips_invalid_records(caplog):
    docs = [record_to_dict(r) for r in sample_records(3)]
    docs.insert(1, {"version": "0.2", "filehash": "nope"})
    docs.append(42)
    with caplog.at_level(logging.WARNING, logger="cloudmanager"):
        loaded = list(load_from(io.StringIO(json.dumps(docs))))
    assert loaded == sample_records(3)
    assert sum("skipping record" in r.getMessage() for r in caplog.records) == 2


def test_iter_documents_small_chunks_match_json_loads():
    docs = [record_to_dict(r) for r in sample_records(4)]
    docs += [12345678, -9876543210, 0, True, False, None, "a string, with ]",
             [1, [2, 22222], {"k": 33333}], {}, []]
    for text in (json.dumps(docs), json.dumps(docs, indent=3),
                 "[12345678,7654321,1234567,12345,123456]"):
        for skip in range(7):  # shift the elements against the 7-char chunks
            padded = " " * skip + text
            assert list(iter_documents(io.StringIO(padded), chunk_size=7)) == json.loads(padded)


def test_number_at_chunk_boundary_is_not_cut():
    # '[' + 6 digits fill the first 7-char chunk; the number goes on in the next.
    assert list(iter_documents(io.StringIO("[123456789, 5]"), chunk_size=7)) == [123456789, 5]
    assert list(iter_documents(io.StringIO("[123456]"), chunk_size=7)) == [123456]


@pytest.mark.parametrize("text", ["[1.5]", "[2e10]", "[3E+7]", "[-4.25e-2]"])
def test_fraction_or_exponent_at_chunk_boundary(text):
    for chunk_size in range(1, len(text) + 1):
        assert list(iter_documents(io.StringIO(text), chunk_size=chunk_size)) == json.loads(text)


@pytest.mark.parametrize("text", [
    "", "   \n", "not json", "42", '"a string"', "true", "null",
    "[", "[1, 2", '[{"a": 1}, {"b":', "[1,]", "[1 2]", "[,1]",
    "[1] x", "[1]]", "[1][2]", '{"a": 1} x', '{"a": ', "{'a': 1}",
])
def test_iter_documents_refuses_non_record_documents(text):
    with pytest.raises(SerializationError):
        list(iter_documents(io.StringIO(text), chunk_size=7))


def test_truncated_dump_raises_after_the_whole_elements():
    text = json.dumps([record_to_dict(r) for r in sample_records(3)])
    cut = text[:text.rindex("{") + 20]
    got = []
    with pytest.raises(SerializationError):
        for value in iter_documents(io.StringIO(cut), chunk_size=7):
            got.append(value)
    assert got == [record_to_dict(r) for r in sample_records(2)]
    with pytest.raises(SerializationError):
        list(load_from(io.StringIO(cut)))


def test_single_object_document_yields_one_element():
    obj = record()
    for text in (json.dumps(obj), "\n  " + json.dumps(obj, indent=2) + "\n"):
        assert list(iter_documents(io.StringIO(text), chunk_size=7)) == [obj]
    assert list(load_from(io.StringIO(json.dumps(obj)))) == [parse_record(obj)]
