"""Checks for everything that comes from outside: hashes, names, URLs.

Each ``check_*`` function returns the cleaned value or raises
:class:`~cloudmanager.errors.InvalidInputError` with the reason. They are
pure, so their examples run as doctests.
"""

import re
import unicodedata
from typing import Set
from urllib.parse import urlsplit

from .errors import InvalidInputError

_HASH = re.compile(r"[0-9a-f]{64}")
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")

#: URL schemes a record may carry. ``file`` is what folder hosts write.
URL_SCHEMES = frozenset({
    "http", "https", "ftp", "file",             # plowshare lockers, folders
    "s3", "memory",                             # S3-compatible stores, in-memory hosts
    "sftp", "ssh", "webdav", "dav", "gs", "gcs", "az", "abfs", "abfss",  # through fsspec
})
#: Option names whose values are secrets, matched anywhere in the name.
SECRET_OPTION = re.compile(r"pass|secret|token|key|auth|credential|cookie|sas|signature|"
                           r"session|private|connection", re.IGNORECASE)
#: ``scheme://user:password@`` anywhere in a text, to hide the password.
URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):[^@/\s]*@")
MAX_URL_LENGTH = 2048
#: The common URL shapes, in ASCII, which the full parse below would accept:
#: ``scheme://host[:port][/?#...]`` (no user info, no brackets) and
#: ``file:///path``. Anything else takes the full parse.
_PLAIN_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(?:([^/?#@:\[\]]+)(?::([0-9]*))?|(?=/))"
                        r"(?:[/?#].*)?", re.DOTALL)
MAX_NAME_BYTES = 255
#: The Unicode line and paragraph separators (categories Zl and Zp).
_LINE_SEPARATORS = frozenset("\u2028\u2029")
#: What a basename may not start with: space (``\s`` is ``str.isspace``), dots, dashes.
_LEADING_JUNK = re.compile(r"[\s.-]*")


def is_hash(value):
    """Whether ``value`` is a SHA-256 in lowercase hex.

    >>> is_hash("0" * 64), is_hash("0" * 63), is_hash("A" * 64), is_hash(None)
    (True, False, False, False)
    """
    return isinstance(value, str) and _HASH.fullmatch(value) is not None


def check_hash(value):
    """Return ``value`` as a lowercase hex SHA-256, or raise.

    Uppercase is accepted and lowered; anything else is refused.

    >>> check_hash("AB" * 32) == "ab" * 32
    True
    >>> check_hash("../etc/passwd")
    Traceback (most recent call last):
    ...
    cloudmanager.errors.InvalidInputError: not a SHA-256 hex digest: '../etc/passwd'
    """
    if isinstance(value, str) and len(value) == 64:
        lowered = value.lower()
        if _HASH.fullmatch(lowered):
            return lowered
    raise InvalidInputError("not a SHA-256 hex digest: %r" % (_short(value),))


def safe_basename(name):
    """Reduce a file name to a basename that is safe to create anywhere.

    Directory parts (``/`` and ``\\``), control characters (and the Unicode
    line and paragraph separators, which would break a listing's line as a
    newline does), surrounding space and leading dots and dashes go; the
    result is NFC-normalized and cut to 255 bytes of UTF-8, whole characters,
    with no space left at its end. It may be empty.

    >>> safe_basename("../../etc/passwd"), safe_basename("C:\\\\x\\\\My File.txt")
    ('passwd', 'My File.txt')
    >>> safe_basename("..."), safe_basename("-rf"), safe_basename(". -rf")
    ('', 'rf', 'rf')
    >>> safe_basename("a\\x00b")
    'ab'
    >>> safe_basename("two\\u2028lines"), len(safe_basename("a" * 254 + " b"))
    ('twolines', 254)
    """
    if not isinstance(name, str):
        return ""
    if name.isascii():
        # The common case, at C speed: NFC leaves ASCII as it is, and the
        # only ASCII characters of category C (0-31, 127) are exactly those
        # isprintable() refuses.
        name = name.replace("\\", "/").rpartition("/")[2]
        if not name.isprintable():
            name = "".join(ch for ch in name if ch.isprintable())
    else:
        # NFC neither makes nor removes a slash, a control or a format
        # character, so it can come last: after a format character (a soft
        # hyphen, a zero-width joiner) is dropped, what it kept apart may
        # compose, and the name must come out the same when cleaned again.
        name = re.split(r"[/\\]", name)[-1]
        name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C"
                       and ch not in _LINE_SEPARATORS)
        name = unicodedata.normalize("NFC", name)
    # Space, dots and dashes in any mix: ". -rf" must not become "-rf".
    junk = _LEADING_JUNK.match(name)
    assert junk is not None  # the pattern matches the empty string: always a match
    name = name[junk.end():].rstrip()
    if len(name) <= MAX_NAME_BYTES // 4:  # short enough in any encoding: nothing to cut
        return name
    encoded = name.encode("utf-8")[:MAX_NAME_BYTES]
    return encoded.decode("utf-8", "ignore").rstrip()


def check_host_name(value):
    """Return a host name if it is plain text of at most 128 characters.

    >>> check_host_name("mediafire")
    'mediafire'
    >>> check_host_name("--run-after=x")
    Traceback (most recent call last):
    ...
    cloudmanager.errors.InvalidInputError: not a valid host name: '--run-after=x'
    """
    if value.__class__ is str and value in _VALID_HOST_NAMES:
        return value  # an import checks the same few names once per copy
    if isinstance(value, str) and _HOST_NAME.fullmatch(value):
        if len(_VALID_HOST_NAMES) < _VALID_HOST_NAMES_MAX:
            _VALID_HOST_NAMES.add(value)
        return value
    raise InvalidInputError("not a valid host name: %r" % (_short(value),))


#: Host names :func:`check_host_name` has passed, so that it passes them
#: again without a match (a bounded set: names come from records too).
_VALID_HOST_NAMES: Set[str] = set()
_VALID_HOST_NAMES_MAX = 4096


def redact_url_passwords(text):
    """Hide the passwords of any ``scheme://user:password@host`` in ``text``.

    >>> redact_url_passwords("fsspec:webdav+https://alice:hunter2@dav.example.org/pool")
    'fsspec:webdav+https://alice:***@dav.example.org/pool'
    """
    return URL_PASSWORD.sub(r"\1:***@", text)


def check_url(value, schemes=URL_SCHEMES):
    """Return ``value`` if it is a URL safe to hand to a host or a tool.

    Refused: anything that is not a string, longer than 2048 characters,
    containing whitespace or control characters, starting with ``-`` (it
    would be read as an option), or with a scheme outside ``schemes``.
    Network URLs need a host part, which does not start with ``-`` either
    (no DNS name does; a tool could read it as an option), and a port, if
    any, in 0-65535. ``file`` URLs need an absolute path.

    >>> check_url("http://www.mediafire.com/?qorncpzfe74s9")
    'http://www.mediafire.com/?qorncpzfe74s9'
    >>> check_url("--run-after=/bin/sh")
    Traceback (most recent call last):
    ...
    cloudmanager.errors.InvalidInputError: URL starts with '-': '--run-after=/bin/sh'
    >>> check_url("javascript:alert(1)")
    Traceback (most recent call last):
    ...
    cloudmanager.errors.InvalidInputError: URL scheme 'javascript' not allowed: 'javascript:alert(1)'
    >>> check_url("http://h.example:99999/x")
    Traceback (most recent call last):
    ...
    cloudmanager.errors.InvalidInputError: URL has a bad port: 'http://h.example:99999/x'
    """
    if not isinstance(value, str) or not value:
        raise InvalidInputError("URL is not a non-empty string: %r" % (_short(value),))
    if len(value) > MAX_URL_LENGTH:
        raise InvalidInputError("URL longer than %d characters" % MAX_URL_LENGTH)
    if value.startswith("-"):
        raise InvalidInputError("URL starts with '-': %r" % (_short(value),))
    # ASCII (nearly every URL): printable and no space says the same as the
    # per-character test below, at C speed.
    if not (value.isprintable() and " " not in value) if value.isascii() else \
            any(ch.isspace() or unicodedata.category(ch)[0] == "C" for ch in value):
        raise InvalidInputError("URL contains whitespace or control characters: %r"
                                % (_short(value),))
    plain = _PLAIN_URL.fullmatch(value) if value.isascii() else None
    if plain is not None:  # an import checks one URL per copy: the fast path
        scheme = plain.group(1).lower()
        host, port = plain.group(2), plain.group(3)
        # A host for network URLs; none for file URLs, whose path is absolute.
        if scheme in schemes and (host is None) == (scheme == "file") \
                and not (host or "").startswith("-") and (not port or int(port) <= 65535):
            return value
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise InvalidInputError("URL does not parse: %r (%s)" % (_short(value), exc)) from exc
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise InvalidInputError("URL scheme %r not allowed: %r" % (scheme, _short(value)))
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidInputError("file URL needs an absolute local path: %r"
                                    % (_short(value),))
    elif not parts.hostname:
        raise InvalidInputError("URL has no host: %r" % (_short(value),))
    elif parts.hostname.startswith("-"):
        raise InvalidInputError("URL host starts with '-': %r" % (_short(value),))
    else:
        try:
            parts.port  # noqa: B018 -- raises ValueError when not an int in 0-65535
        except ValueError:
            raise InvalidInputError("URL has a bad port: %r" % (_short(value),)) from None
    return value


#: The longest source tag :func:`check_source` accepts (a block or
#: transaction hash is 64 hex digits).
MAX_SOURCE_LENGTH = 256


def check_source(value):
    r"""Return ``value`` if it can tag imported records with where they came
    from (the original's ``blockchain_hash``): text of 1 to 256 characters,
    none of them a control character or a line separator.

    >>> check_source("6e" * 32) == "6e" * 32
    True
    >>> check_source("block\n42")
    Traceback (most recent call last):
    ...
    cloudmanager.errors.InvalidInputError: not a valid source: 'block\n42'
    """
    if isinstance(value, str) and 0 < len(value) <= MAX_SOURCE_LENGTH \
            and not any(unicodedata.category(ch)[0] == "C" or ch in _LINE_SEPARATORS
                        for ch in value):
        return value
    raise InvalidInputError("not a valid source: %r" % (_short(value),))


def check_count(value, what, minimum=0, maximum=2 ** 63 - 1):
    """Return ``value`` if it is an int (not a bool) in ``[minimum, maximum]``.

    >>> check_count(7, "a block height")
    7
    >>> check_count(True, "a block height")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cloudmanager.errors.InvalidInputError: a block height must be an integer from 0 to ..., not True
    """
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidInputError("%s must be an integer from %d to %d, not %s"
                                % (what, minimum, maximum, _short(value)))
    return value


def _short(value, limit=80):
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
