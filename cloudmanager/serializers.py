"""The JSON record format that nodes exchange.

One record per file, version 0.2, exactly as the original cloud-manager wrote
it (``datetime`` and ``filesize`` as strings)::

    {"version": "0.2", "datetime": "1391212800", "filename": "README.md",
     "filesize": "23124", "filehash": "6e16...1b1b",
     "uploads": [{"host_name": "mediafire", "url": "http://..."},
                 {"host_name": "anonfiles", "error": true}]}

Version 0.1 records (no ``filename``) are read too, and numbers are accepted
as ints or strings. Every field is validated, and no value can overflow
what it is used for: a size above :data:`MAX_FILESIZE` (256 TiB) or a time
after :data:`MAX_DATETIME` (the year 9999) is refused. A bad record is
skipped with a logged reason and never raises.

>>> rec = parse_record({"version": "0.2", "datetime": 1391212800,
...     "filename": "../README.md", "filesize": "23124", "filehash": "6e" * 32,
...     "uploads": [{"host_name": "mediafire", "url": "http://mediafire.com/?q"},
...                 {"host_name": "anonfiles", "error": True}]})
>>> rec.filename, rec.size, rec.uploads[1]
('README.md', 23124, ('anonfiles', '', True))
>>> record_to_dict(rec)["filesize"]
'23124'
>>> parse_record(record_to_dict(rec)) == rec
True
"""

import json
import logging
import re
from typing import Any, Dict, NamedTuple, Optional, Tuple

from .errors import InvalidInputError, SerializationError
from .validation import check_hash, check_host_name, check_url, safe_basename

log = logging.getLogger(__name__)

VERSION = "0.2"
READABLE_VERSIONS = ("0.1", "0.2")
#: The largest ``filesize`` a record may carry: 2**48 bytes (256 TiB).
#: No host we write to keeps a bigger object (the largest any store takes
#: is an Azure block blob, 190.7 TiB; S3 and GCS objects are far smaller, an
#: ext4 file stops at 16 TiB), so a larger size is a forgery or corruption.
#: The bound keeps every use of a size finite and exact: it is exact as a
#: double (what JavaScript peers read numbers as), 32768 such sizes sum
#: within SQLite's signed 64-bit INTEGER, and the engine's transfer deadline
#: (a second per 64 KiB) stays below ``threading.TIMEOUT_MAX`` (about 2**33
#: s). 2**53 - 1 would not: a ``filesize`` of 2**63 - 1 made that wait raise
#: OverflowError, which was counted against a healthy host.
MAX_FILESIZE = 2 ** 48
#: The latest ``datetime`` (Unix seconds) a record may carry:
#: 9999-12-31T23:59:59Z, the last second Python's ``datetime`` can hold,
#: so every date shown or computed from a record works, and it fits any
#: 64-bit ``time_t``. A time in milliseconds (13 digits) is beyond it, and
#: refused rather than read as a date tens of thousands of years ahead.
MAX_DATETIME = 253402300799
MAX_UPLOADS = 1000
#: An encrypted copy is at most this much larger than the largest file (age's
#: header and one 16-byte tag per 64 KiB chunk; see cloudmanager/crypto.py).
MAX_OBJECT_SIZE = MAX_FILESIZE + MAX_FILESIZE // 4096 + 4096 + 16


class Record(NamedTuple):
    """One file as nodes exchange it. ``uploads`` holds ``(host_name, url, error)``."""

    hash: str
    filename: str
    size: int
    datetime: int
    uploads: Tuple[Tuple[str, str, bool], ...]
    #: The copies that are not the plaintext (an encrypted pool's), as
    #: ``(host_name, url, object_sha256, object_size, key_id)``: optional
    #: fields of their upload entries, which a v0.2 reader ignores.
    objects: Tuple[Tuple[str, str, str, int, str], ...] = ()


#: A key id: 32 lowercase hex digits (see :attr:`cloudmanager.crypto.PoolKey.key_id`).
_KEY_ID = re.compile(r"[0-9a-f]{32}")
#: The fields of an upload entry that describe an encrypted copy's object.
OBJECT_FIELDS = ("object_sha256", "object_size", "key_id")


def _count(value, field, maximum):
    """``value`` as an int in ``[0, maximum]``, from a JSON int or a string of digits.

    >>> _count("23124", "filesize", MAX_FILESIZE), _count(0, "datetime", MAX_DATETIME)
    (23124, 0)
    >>> try:
    ...     _count(2 ** 63 - 1, "filesize", MAX_FILESIZE)
    ... except SerializationError as exc:
    ...     print(exc)
    filesize 9223372036854775807 is beyond 281474976710656

    :raises SerializationError: for anything else
    """
    if isinstance(value, bool):
        raise SerializationError("%s is a boolean, not a number" % field)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        number = int(value)
    else:
        raise SerializationError("%s is not a non-negative integer: %.40r" % (field, value))
    if number < 0:
        raise SerializationError("%s is negative" % field)
    if number > maximum:
        shown = number if number.bit_length() <= 64 else "(a %d-bit number)" % number.bit_length()
        raise SerializationError("%s %s is beyond %d" % (field, shown, maximum))
    return number


def _upload(entry):
    """``((host_name, url, error), object)``: an upload entry, and its object's
    ``(sha256, size, key_id)`` when it is an encrypted copy (else None)."""
    if not isinstance(entry, dict):
        raise SerializationError("an upload is not an object: %.60r" % (entry,))
    host_name = check_host_name(entry.get("host_name"))
    error = entry.get("error", False)
    if not isinstance(error, bool):
        raise SerializationError("upload 'error' is not a boolean: %.40r" % (error,))
    url = entry.get("url")
    if url is None or (error and url == ""):
        if not error:
            raise SerializationError("upload to %s has neither url nor error" % host_name)
        return (host_name, "", True), None
    url = check_url(url)
    if entry.keys().isdisjoint(OBJECT_FIELDS):
        return (host_name, url, error), None
    # All three or none: half an object description would send a copy to
    # a decryption (or a hash check) it cannot pass.
    try:
        sha = check_hash(entry.get("object_sha256"))
    except InvalidInputError as exc:
        raise SerializationError("upload to %s: object_sha256: %s" % (host_name, exc)) from None
    size = _count(entry.get("object_size"), "object_size", MAX_OBJECT_SIZE)
    key_id = entry.get("key_id")
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise SerializationError("upload to %s: key_id is not 32 hex digits: %.40r"
                                 % (host_name, key_id))
    return (host_name, url, error), (sha, size, key_id)


def parse_record(obj):
    """Validate one decoded JSON record and return a :class:`Record`.

    Upload entries that fail validation are dropped with a warning; the rest
    of the record is kept.

    :raises SerializationError: if the record itself is invalid
    """
    if not isinstance(obj, dict):
        raise SerializationError("a record is not an object: %.60r" % (obj,))
    version = obj.get("version")
    if version not in READABLE_VERSIONS:
        raise SerializationError("unknown record version %.20r" % (version,))
    try:
        file_hash = check_hash(obj.get("filehash"))
    except InvalidInputError as exc:
        raise SerializationError(str(exc)) from exc
    size = _count(obj.get("filesize"), "filesize", MAX_FILESIZE)
    when = _count(obj.get("datetime"), "datetime", MAX_DATETIME)
    filename = safe_basename(obj.get("filename", "")) if version != "0.1" else ""
    raw_uploads = obj.get("uploads", [])
    if not isinstance(raw_uploads, list):
        raise SerializationError("uploads of %s is not a list" % file_hash)
    if len(raw_uploads) > MAX_UPLOADS:
        raise SerializationError("%s lists %d uploads; at most %d are accepted"
                                 % (file_hash, len(raw_uploads), MAX_UPLOADS))
    # A dict: duplicates merged in O(1) each, the first order kept.
    uploads: Dict[Tuple[str, str, bool], None] = {}
    objects: Optional[Dict[Tuple[str, str], Tuple[str, str, str, int, str]]] = None
    for entry in raw_uploads:
        try:
            item, obj = _upload(entry)
        except (SerializationError, InvalidInputError) as exc:
            log.warning("record %s: skipping an upload entry: %s", file_hash, exc)
            continue
        uploads[item] = None
        if obj is not None:
            host_name, url, _ = item
            if objects is None:  # made for encrypted copies only: most records have none
                objects = {}
            objects.setdefault((host_name, url), (host_name, url) + obj)
    return Record(file_hash, filename, size, when, tuple(uploads),
                  tuple(objects.values()) if objects else ())


def record_to_dict(record):
    """Return a :class:`Record` as a v0.2 JSON object (a dict)."""
    objects = {(h, u): (sha, size, key_id) for h, u, sha, size, key_id in record.objects} \
        if record.objects else None
    uploads = []
    for host_name, url, error in record.uploads:
        entry: Dict[str, Any] = {"host_name": host_name}
        if url:
            entry["url"] = url
        if error:
            entry["error"] = True
        obj = objects.get((host_name, url)) if objects and url else None
        if obj is not None:
            entry.update(zip(OBJECT_FIELDS, (obj[0], str(obj[1]), obj[2])))
        uploads.append(entry)
    return {
        "version": VERSION,
        "datetime": str(record.datetime),
        "filename": record.filename,
        "filesize": str(record.size),
        "filehash": record.hash,
        "uploads": uploads,
    }


def dump_to(records, fileobj):
    """Write records to a text file object as a JSON array, one record a line.

    Streams: memory use does not grow with the number of records.

    :return: the number of records written
    """
    count = 0
    # One encoder for every record: json.dumps with an option builds one a call.
    encode = json.JSONEncoder(ensure_ascii=False).encode
    fileobj.write("[")
    for record in records:
        fileobj.write((",\n" if count else "\n") + encode(record_to_dict(record)))
        count += 1
    fileobj.write("\n]\n" if count else "]\n")
    return count


def iter_documents(fileobj, chunk_size=1 << 16):
    """Yield each element of a JSON array read from a text file object.

    The array is decoded element by element, so a large dump is never held in
    memory whole: memory is bounded by the largest element plus a read. The
    work is linear in the text. Most elements decode at once from the read
    buffer; one that runs past it is scanned as more text arrives (each
    character once, see :class:`_ValueEnd`) and decoded once, when its end
    has been read. A document that is a single object yields that object.

    >>> import io
    >>> list(iter_documents(io.StringIO('[{"a": "]"}, 1.5, [2]]'), chunk_size=4))
    [{'a': ']'}, 1.5, [2]]

    :param fileobj: a text file object; ``read(n)`` may return fewer than
        ``n`` characters, and ``""`` only at its end
    :param chunk_size: characters asked for by each read
    :raises SerializationError: if the text is not JSON, or not an array or
        object (raised as the generator is consumed, after the elements
        before the fault)
    """
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    eof = False

    def read():
        nonlocal eof
        try:
            data = fileobj.read(chunk_size)
        except UnicodeDecodeError as exc:  # a binary file given for a dump
            raise SerializationError("not UTF-8 text (byte %s cannot be decoded): a dump is "
                                     "a JSON array of records" % hex(exc.object[exc.start])
                                     ) from None
        if not data:
            eof = True
        return data

    def skip_space():
        nonlocal buf, pos
        if pos < len(buf) and buf[pos] not in " \t\r\n":
            return  # most often: nothing to skip
        while True:
            space = _SPACE.match(buf, pos)
            assert space is not None  # the pattern matches the empty string
            pos = space.end()
            if pos < len(buf) or eof:
                return
            buf, pos = read(), 0  # all of buf was space

    def decode_from(text, start):
        try:
            return decoder.raw_decode(text, start)
        except RecursionError as exc:
            raise SerializationError("nested too deeply") from exc
        except ValueError as exc:
            raise SerializationError("not JSON: %s" % exc) from exc

    def read_element():
        # The element at pos runs past the buffer (or may): read on until its
        # end is seen, keeping the reads in a list, so that each character is
        # scanned once and copied once, then decode it once.
        nonlocal buf, pos
        pieces, buf = [buf[pos:]], ""
        scanner = _ValueEnd()
        done = scanner.feed(pieces[0])
        while not done and not eof:
            data = read()
            pieces.append(data)
            done = scanner.feed(data)
        buf, pos = "".join(pieces), 0
        del pieces
        return decode_from(buf, 0)

    skip_space()
    if pos >= len(buf):
        raise SerializationError("empty document")
    if buf[pos] == "{":
        pieces = [buf[pos:]]
        while not eof:
            pieces.append(read())
        buf, pos = "".join(pieces), 0
        del pieces
        try:
            yield decoder.decode(buf)
        except (ValueError, RecursionError) as exc:
            raise SerializationError("not JSON: %s" % exc) from exc
        return
    if buf[pos] != "[":
        raise SerializationError(_not_an_array(buf, pos, decoder))
    pos += 1
    first = True
    while True:
        # skip_space() only when there may be space to skip: between most
        # records there is none, and the call costs more than the test.
        if pos >= len(buf) or buf[pos] in " \t\r\n":
            skip_space()
        if pos >= len(buf):
            raise SerializationError("unterminated JSON array")
        if buf[pos] == "]":
            pos += 1
            skip_space()
            if pos < len(buf):
                raise SerializationError("text after the JSON array")
            return
        if not first:
            if buf[pos] != ",":
                raise SerializationError("expected ',' between records")
            pos += 1
            if pos >= len(buf) or buf[pos] in " \t\r\n":
                skip_space()
        try:
            value, end = decoder.raw_decode(buf, pos)
        except RecursionError as exc:
            raise SerializationError("nested too deeply") from exc
        except ValueError as exc:
            if eof:
                raise SerializationError("not JSON: %s" % exc) from exc
            value, end = read_element()  # it may continue in the next reads
        else:
            if not eof and value.__class__ is not dict and _may_continue(value, buf, end):
                value, end = read_element()  # a number cut by the read: "1." or "2e"
        pos = end
        first = False
        yield value
        value = None  # not kept alive while the next element is read


_SPACE = re.compile(r"[ \t\r\n]*")
#: What can change the nesting of a JSON value outside its strings.
_STRUCTURAL = re.compile(r'["\[\]{}]')
#: The characters of a number or of ``true``, ``false``, ``null`` (and of
#: the garbage that may follow them: it is the decoder's to refuse).
_TOKEN_CHAR = re.compile(r"[0-9A-Za-z+.\-]")
_TOKEN_END = re.compile(r"[^0-9A-Za-z+.\-]")


class _ValueEnd:
    r"""Find where one JSON value ends, in its text fed piece by piece.

    It tracks only what decides the end: whether it is inside a string (and
    whether a piece ended on an unpaired backslash) and the depth of
    brackets. ``str.find``, ``re.search`` and ``str.rstrip`` step over
    everything else, and each character is examined a bounded number of
    times, so the scan is linear however the pieces cut the text. It does
    not check the JSON: the decoder does that once the end is in hand.

    The value ``{"a": ["x\"", "\\"]}`` cut after its first backslash:

    >>> scan = _ValueEnd()
    >>> scan.feed('{"a": ["x\\'), scan.feed('"", "\\\\"]'), scan.feed('}, 2]')
    (False, False, True)
    """

    def __init__(self):
        self.kind = None      # "nested" (array, object, string) or "token"
        self.depth = 0
        self.in_string = False
        self.escaped = False  # the previous piece ended on an unpaired backslash

    def feed(self, text):
        """Scan the next piece of the value's text.

        :return: whether the value's end has been seen: the bracket or quote
            that closes it, or after a number or literal, a character that
            cannot continue it
        """
        if not text:
            return False
        if self.kind is None:
            self.kind = "nested" if text[0] in '[{"' else "token"
        if self.kind == "token":
            return _TOKEN_END.search(text) is not None
        i = 0
        if self.escaped:
            self.escaped = False
            i = 1  # the character after a backslash is never an end
        while True:
            if self.in_string:
                quote = text.find('"', i)
                if quote < 0:
                    tail = text[i:]
                    self.escaped = (len(tail) - len(tail.rstrip("\\"))) % 2 == 1
                    return False
                run = text[i:quote]
                i = quote + 1
                if (len(run) - len(run.rstrip("\\"))) % 2 == 1:
                    continue  # an escaped quote
                self.in_string = False
                if self.depth == 0:
                    return True  # the value was a string
            else:
                match = _STRUCTURAL.search(text, i)
                if match is None:
                    return False
                char = match.group()
                i = match.end()
                if char == '"':
                    self.in_string = True
                elif char in "[{":
                    self.depth += 1
                else:
                    self.depth -= 1
                    if self.depth <= 0:
                        return True


def _may_continue(value, buf, end):
    """Whether a decoded number may be the head of a longer one cut by a read.

    A number is whole once a character that cannot be part of one follows
    it. The test looks at one character, so it costs nothing per element.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return end >= len(buf) or _TOKEN_CHAR.match(buf, end) is not None


def _not_an_array(buf, pos, decoder):
    """Why the text at ``buf[pos:]`` is not a dump: not JSON at all, or JSON of
    another kind (``42``, ``"text"``)."""
    try:
        value, _ = decoder.raw_decode(buf, pos)
    except (ValueError, RecursionError):
        line = buf.count("\n", 0, pos) + 1
        return ("not JSON (it starts with %r at line %d): a dump is a JSON array of records"
                % (buf[pos:pos + 12], line))
    return "a JSON %s, not an array of records" % {
        str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def load_from(fileobj):
    """Read records from a JSON document, validating each.

    :return: a generator of :class:`Record`; invalid records are skipped with
        a warning
    :raises SerializationError: when the document itself is not JSON records
        (raised as the generator is consumed)
    """
    for index, obj in enumerate(iter_documents(fileobj)):
        try:
            yield parse_record(obj)
        except SerializationError as exc:
            log.warning("skipping record #%d: %s", index, exc)
