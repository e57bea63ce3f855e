"""Streaming load: linear work and bounded memory, whatever the reads cut.

The work of :func:`iter_documents` is counted, not timed: a decoder that
tallies the characters each decode attempt may examine, and a ceiling that
stops a quadratic loader early instead of letting it run for minutes.
"""

import io
import json
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudmanager.errors import SerializationError
from cloudmanager.serializers import _ValueEnd, iter_documents

HASH = "6e" * 32
READ = 64 * 1024


class ShortReads(io.StringIO):
    """A text file that returns at most 64 KiB per read, as a pipe or socket does."""

    def __init__(self, text, most=READ):
        super().__init__(text)
        self.most = most
        self.reads = 0

    def read(self, size=-1):
        self.reads += 1
        return super().read(self.most if size is None or size < 0 else min(size, self.most))


class DecodeBudgetExceeded(Exception):
    pass


@pytest.fixture
def decode_work(monkeypatch):
    """Count the decode attempts of ``iter_documents`` and the characters each may read.

    A success examined the characters it consumed; a failure may have read
    up to the end of the buffer. Set ``work.budget`` to stop as soon as it
    is passed.
    """

    class Work:
        attempts = 0
        chars = 0
        budget = None

        def charge(self, chars):
            self.attempts += 1
            self.chars += chars
            if self.budget is not None and self.chars > self.budget:
                raise DecodeBudgetExceeded("%d characters examined in %d attempts"
                                           % (self.chars, self.attempts))

    work = Work()

    class CountingDecoder(json.JSONDecoder):
        def raw_decode(self, s, idx=0):
            try:
                value, end = super().raw_decode(s, idx)
            except BaseException:
                work.charge(len(s) - idx)
                raise
            work.charge(end - idx)
            return value, end

        def decode(self, s, *args, **kwargs):
            work.charge(len(s))
            return super().decode(s, *args, **kwargs)

    monkeypatch.setattr(json, "JSONDecoder", CountingDecoder)
    return work


def big_record(field_size):
    return {"version": "0.2", "datetime": "1391212800", "filename": "x" * field_size,
            "filesize": "1", "filehash": HASH, "uploads": []}


def test_one_large_field_is_decoded_in_linear_work(decode_work):
    # One 8 MiB string field read 64 KiB at a time: the old loader decoded the
    # record from its start after every read (128 attempts, ~512 MiB examined).
    rec = big_record(8 << 20)
    text = json.dumps([rec])
    decode_work.budget = 4 * len(text)
    source = ShortReads(text)
    assert list(iter_documents(source)) == [rec]
    assert decode_work.attempts <= 3
    assert decode_work.chars <= 2 * len(text) + 2 * READ
    assert source.reads <= len(text) // READ + 3  # each character read once


@pytest.mark.parametrize("most", [READ, 4093])
@pytest.mark.parametrize("field", ['"%s"', '["%s"]', '{"k": "%s"}', '[[[["%s"]]]]'])
def test_a_large_element_of_any_shape_costs_linear_work(decode_work, field, most):
    # Escapes (\\ and \") every few characters, so reads cut them everywhere.
    body = 'ab\\\\cd\\"e]}[{' * (256 << 10)  # 3.25 MiB of string body
    text = "[1, %s, 2]" % (field % body)
    decode_work.budget = 4 * len(text)
    assert list(iter_documents(ShortReads(text, most=most), chunk_size=most)) == json.loads(text)
    assert decode_work.attempts <= 5


def test_many_records_are_each_decoded_about_once(decode_work):
    docs = [big_record(i % 300) | {"filehash": "%064x" % i} for i in range(3000)]
    text = json.dumps(docs)
    decode_work.budget = 3 * len(text)
    source = ShortReads(text)
    assert list(iter_documents(source)) == docs
    # Each record once, and once more for each record a read cut.
    assert decode_work.attempts <= len(docs) + 2 * source.reads
    assert decode_work.chars <= len(text) + 2 * READ * source.reads


def test_a_long_number_cut_by_reads_is_not_decoded_again_per_read(decode_work):
    text = "[1.%s, 7]" % ("5" * (1 << 20))
    decode_work.budget = 4 * len(text)
    assert list(iter_documents(ShortReads(text))) == json.loads(text)
    assert decode_work.attempts <= 3


def test_a_long_run_of_space_between_records_is_skipped(decode_work):
    text = "[1," + " \n\t\r" * (1 << 20) + "2" + " " * (3 << 20) + "]" + "\n" * (1 << 20)
    assert list(iter_documents(ShortReads(text))) == [1, 2]
    assert decode_work.attempts == 2
    with pytest.raises(SerializationError, match="after the JSON array"):
        list(iter_documents(ShortReads(text + "x")))


def test_memory_holds_one_record_not_the_document():
    docs = [big_record(200) | {"filehash": "%064x" % i} for i in range(20000)]
    text = json.dumps(docs, indent=1)  # 10 MiB
    count = 0
    source = ShortReads(text)
    tracemalloc.start()
    try:
        for doc in iter_documents(source):
            count += doc["filehash"] == "%064x" % count
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(docs)
    assert peak < 1 << 20, peak


def test_memory_for_a_large_record_is_a_few_times_its_size():
    rec = big_record(4 << 20)
    text = json.dumps([rec, rec])
    size = len(text) // 2
    source = ShortReads(text)
    tracemalloc.start()
    try:
        for doc in iter_documents(source):
            assert doc == rec
            del doc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The text read, the joined text and the decoded value, not more.
    assert peak < 4 * size, (peak, size)


# -- the end of an element, found across any cut ----------------------------------

TRICKY = [
    'a\\"b', "\\\\", '\\\\\\"', "\\\\\\\\", "]", "}", "[", "{", '\\"]', "\\u005c", "\\u0022",
    "\\\\\\\\\\\\\\\\\\\\", "\u00e9\u20ac\U0001f600", ",", " ",
]


def tricky_document():
    strings = ['"%s"' % s for s in TRICKY]
    return "[%s]" % ", ".join(strings + [
        "[%s]" % ",".join(strings),
        "{%s}" % ",".join("%s: %s" % (k, v) for k, v in zip(strings, reversed(strings))),
        '[[[[{"k": [%s]}]]]]' % strings[0],
        "-0.5e-3", "1E+2", "123456789", "true", "false", "null", '""', "[]", "{}",
    ])


def test_strings_with_escapes_and_brackets_cut_anywhere():
    text = tricky_document()
    expected = json.loads(text)
    for chunk in list(range(1, 24)) + [97]:
        for skip in (0, 1, 2):
            padded = " " * skip + text
            assert list(iter_documents(io.StringIO(padded), chunk_size=chunk)) == expected, chunk


@pytest.mark.parametrize("text", [
    '["a\\"]', '["a\\\\"', '[{"a": "]"', '[{"a": "\\"}"]', '[{"a": 1]}]', '[[1}, 2]',
    '["\\x"]', '["a\nb"]', '[1, 2', '[1x]', '[tru]', '[-]', '[' + '1' * 5000 + ']',
])
def test_broken_elements_are_refused_at_any_cut(text):
    for chunk in (1, 2, 3, 5, 8, 64):
        with pytest.raises(SerializationError):
            list(iter_documents(io.StringIO(text), chunk_size=chunk))


def test_deep_nesting_cut_by_small_reads_is_refused_without_crashing():
    for chunk in (7, READ):
        with pytest.raises(SerializationError, match="nested too deeply"):
            list(iter_documents(io.StringIO("[" * 100000 + "]" * 100000), chunk_size=chunk))
        with pytest.raises(SerializationError, match="nested too deeply"):
            list(iter_documents(io.StringIO("[1, " + "[" * 100000 + "]" * 100000 + "]"),
                                chunk_size=chunk))


def test_an_empty_read_mid_way_ends_the_document():
    # read() returns "" only at the end of the file: a truncated element is
    # refused, the whole ones before it are kept.
    got = []
    with pytest.raises(SerializationError, match="not JSON"):
        for value in iter_documents(ShortReads('[{"a": 1}, {"b": "' + "x" * 200000, most=4096)):
            got.append(value)
    assert got == [{"a": 1}]


def test_the_end_scanner_keeps_its_state_over_empty_pieces():
    scan = _ValueEnd()
    assert [scan.feed(piece) for piece in ['["a\\', "", '"', "", "\\\\", '"', "", "]"]] == [
        False, False, False, False, False, False, False, True]


json_text = st.text(st.sampled_from('ab"\\[]{},: \u00e9\n/'), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20)
    | st.floats(allow_nan=False, allow_infinity=False) | json_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(json_values, max_size=5), chunk=st.integers(1, 12),
       indent=st.sampled_from([None, 0, 2]))
def test_any_array_cut_anywhere_decodes_as_json_loads(values, chunk, indent):
    text = json.dumps(values, indent=indent, ensure_ascii=False)
    assert list(iter_documents(io.StringIO(text), chunk_size=chunk)) == json.loads(text)
