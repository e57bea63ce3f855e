"""Trees: a directory recorded by name, as a manifest stored in the pool.

A **tree manifest** maps each regular file's path, relative to the directory,
to its SHA-256, size, permission bits and mtime. It is stored in the pool as
an ordinary content-addressed file named ``NAME.cmtree`` (like DVC's ``.dir``
objects and git's trees), so it replicates, verifies, dumps and loads like any
file; the catalog's ``trees`` table (:mod:`cloudmanager.db.trees`) names it,
so listing trees reads that small table, not every file. A record loaded from
another node whose filename ends in ``.cmtree`` is named a tree there too.

The format is canonical JSON, so the same tree always has the same hash:
UTF-8, keys sorted, no spaces, entries sorted by path, one newline at the end::

    {"entries":[{"hash":"<64 hex>","mode":420,"mtime_ns":1700000000000000000,
    "path":"docs/a.txt","size":12}],"format":"cloudmanager-tree","version":1}

- ``path``: ``/``-separated, relative; no empty, ``.`` or ``..`` component,
  no ``\\``, no NUL, no Windows device name (``CON``, ``nul.txt``...), at
  most 255 bytes a component and 4096 in all;
- ``mode``: the permission bits, 0 to 0o777 (no set-id or sticky bit);
- ``mtime_ns``: nanoseconds since the epoch; ``size``: bytes.

Only regular files are recorded: empty directories and symbolic links are
not (links inside a directory are skipped by ``cm upload`` unless followed).

A manifest is **untrusted input** once it comes from another node:
:func:`decode` refuses a malformed one whole, before anything is written, and
:func:`restore` writes only below its destination, through directory file
descriptors opened with ``O_NOFOLLOW`` (a symbolic link met inside the
destination is refused, never followed), to a temp name in the target
directory that is then renamed. A file that exists and differs is left alone
unless ``force`` is given.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from typing import (
    TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence,
    Tuple, Union,
)

from . import fsutil
from .errors import CloudManagerError, InvalidInputError, TreeError, UnsafePathError
from .validation import check_hash, safe_basename

if TYPE_CHECKING:
    from .pool import Pool
    from .sources import SourceFile

log = logging.getLogger(__name__)

#: The ``format`` field of every manifest.
FORMAT = "cloudmanager-tree"
#: The manifest version this code writes and reads.
VERSION = 1
#: How a manifest's filename ends in the pool (and how a loaded record is
#: recognised as one).
SUFFIX = ".cmtree"
#: The largest manifest read (about two million files).
MAX_MANIFEST_BYTES = 512 * 2**20
#: Files fetched at the same time by :func:`restore` unless told otherwise,
#: and the most allowed.
DEFAULT_JOBS = 4
MAX_JOBS = 16
#: Distinct files a restore brings into the cache together (one
#: :meth:`~cloudmanager.pool.Pool.warm_up_many` call) before its workers copy
#: them out: a batch of that call.
RESTORE_GROUP = 500
#: Limits of a path in a manifest (Linux's NAME_MAX and PATH_MAX).
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
#: Temp files of a restore start with this (a re-run removes those a killed
#: one left; fsutil's temp names beside them start with "." + this).
TEMP_PREFIX = ".cm-restore-"

#: Names Windows gives to devices, with or without an extension: refused in
#: every manifest, so that a tree restores the same everywhere.
_DEVICES = frozenset(["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
                     + ["COM%d" % n for n in range(10)] + ["LPT%d" % n for n in range(10)]
                     + ["COM\u00b9", "COM\u00b2", "COM\u00b3", "LPT\u00b9", "LPT\u00b2",
                        "LPT\u00b3"])
#: A path plainly safe: ASCII components of letters, digits and ``_+-.``, not
#: starting with a dot, none a device name. ASCII, so its length in
#: characters is its length in bytes. Any other path is checked part by part
#: (a test checks that the two agree).
_PLAIN_COMPONENT = (r"(?!(?i:con|prn|aux|nul|com[0-9]|lpt[0-9])(?:[./]|\Z))"
                    r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,%d}" % (MAX_COMPONENT_BYTES - 1))
_PLAIN_PATH = re.compile(r"%s(?:/%s)*\Z" % (_PLAIN_COMPONENT, _PLAIN_COMPONENT)).match
#: A manifest and an entry as canonical JSON: keys sorted, no spaces.
_MANIFEST_JSON = '{"entries":[%s],"format":%s,"version":%d}\n'
_ENTRY_JSON = '{"hash":"%s","mode":%d,"mtime_ns":%d,"path":%s,"size":%d}'
#: A string as JSON with ensure_ascii=False (quoted, escaped), as json.dumps does it.
_json_string = json.encoder.encode_basestring
_ENTRY_KEYS = frozenset(["path", "hash", "size", "mode", "mtime_ns"])
#: A hash as a manifest holds it (anything else is checked slowly, for the reason).
_LOWERCASE_HASH = re.compile(r"[0-9a-f]{64}\Z").match
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class TreeEntry(NamedTuple):
    """One file of a tree."""

    #: ``/``-separated, relative to the tree's root.
    path: str
    hash: str
    size: int
    #: Permission bits (0 to 0o777).
    mode: int
    #: Modification time, nanoseconds since the epoch.
    mtime_ns: int


class RestoreSummary(NamedTuple):
    """What :func:`restore` did (or, with ``dry_run``, would do)."""

    #: Files in the tree.
    files: int
    #: Files fetched and written (with ``dry_run``: to be).
    fetched: int
    #: Bytes of those files.
    fetched_bytes: int
    #: Files already there with the right content (their mode and mtime set
    #: where they differed).
    unchanged: int
    #: Paths left alone: a different file, or a directory, is in the way.
    conflicts: List[Tuple[str, str]]
    #: Paths that could not be restored, with the reason.
    failed: List[Tuple[str, str]]
    #: ``(action, path)`` per file, in path order: ``fetch``, ``keep``
    #: (identical), ``touch`` (identical, mode or mtime to set), ``conflict``
    #: or ``fail``.
    actions: List[Tuple[str, str]]

    @property
    def ok(self) -> bool:
        """Whether every file of the tree is now in place."""
        return not self.conflicts and not self.failed


# -- the format ---------------------------------------------------------------------

def check_path(path: Any) -> str:
    """Check one path of a manifest: relative, ``/``-separated, nothing to escape with.

    >>> check_path("docs/a.txt")
    'docs/a.txt'
    >>> check_path("../etc/passwd")
    Traceback (most recent call last):
    ...
    cloudmanager.errors.UnsafePathError: refusing path '../etc/passwd': '..' as a component

    :return: ``path``
    :raises UnsafePathError: naming the path and why
    """
    if isinstance(path, str) and len(path) <= MAX_PATH_BYTES and _PLAIN_PATH(path):
        return path  # the common case, in one match; the rest is what it refuses
    if not isinstance(path, str):
        raise UnsafePathError(path, "not a string")
    if not path:
        raise UnsafePathError(path, "empty")
    if "\x00" in path:
        raise UnsafePathError(path, "a NUL byte")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(path, "not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafePathError(path, "longer than %d bytes" % MAX_PATH_BYTES)
    if path.startswith("/"):
        raise UnsafePathError(path, "an absolute path")
    if "\\" in path:
        raise UnsafePathError(path, "a backslash (a Windows separator)")
    if len(path) > 1 and path[1] == ":" and path[0].isalpha():
        raise UnsafePathError(path, "a drive letter")
    for part in path.split("/"):
        if not part:
            raise UnsafePathError(path, "an empty component")
        if part in (".", ".."):
            raise UnsafePathError(path, "%r as a component" % part)
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(path, "a component longer than %d bytes"
                                  % MAX_COMPONENT_BYTES)
        if part.split(".", 1)[0].rstrip(" ").upper() in _DEVICES:
            raise UnsafePathError(path, "%r is a device name on Windows" % part)
    return path


def _check_int(value: Any, what: str, path: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TreeError("entry %r: %s must be an integer in [%d, %d], not %r"
                        % (path, what, low, high, value))
    return value


def _entry(item: Any, index: int) -> TreeEntry:
    if not isinstance(item, dict):
        raise TreeError("entry #%d is not an object" % index)
    path = check_path(item.get("path"))
    if item.keys() != _ENTRY_KEYS:
        raise TreeError("entry %r: fields must be exactly %s (got %s)"
                        % (path, ", ".join(sorted(_ENTRY_KEYS)), ", ".join(sorted(item))))
    return _checked_fields(TreeEntry(path, item["hash"], item["size"], item["mode"],
                                     item["mtime_ns"]))


def _checked_fields(e: TreeEntry) -> TreeEntry:
    """``e``, its hash, size, mode and mtime checked (its path already is)."""
    if not (isinstance(e.hash, str) and _LOWERCASE_HASH(e.hash)):
        try:
            file_hash = check_hash(e.hash)
        except InvalidInputError as exc:
            raise TreeError("entry %r: %s" % (e.path, exc)) from None
        if file_hash != e.hash:
            raise TreeError("entry %r: the hash must be lowercase" % e.path)
    # type() is int: plain ints pass here, anything else (a bool too) is
    # checked again for the reason.
    if not (type(e.size) is int and 0 <= e.size < 2**63):
        _check_int(e.size, "size", e.path, 0, 2**63 - 1)
    if not (type(e.mode) is int and 0 <= e.mode <= 0o777):
        _check_int(e.mode, "mode", e.path, 0, 0o777)
    if not (type(e.mtime_ns) is int and -2**63 <= e.mtime_ns < 2**63):
        _check_int(e.mtime_ns, "mtime_ns", e.path, -2**63, 2**63 - 1)
    return e


def encode(entries: Iterable[TreeEntry]) -> bytes:
    """The canonical manifest of ``entries`` (checked as :func:`decode` checks).

    >>> e = TreeEntry("a.txt", "0" * 64, 0, 0o644, 0)
    >>> encode([e]).replace(b"0" * 64, b"0...0").rstrip()
    b'{"entries":[{"hash":"0...0","mode":420,"mtime_ns":0,"path":"a.txt","size":0}],"format":"cloudmanager-tree","version":1}'

    :raises TreeError: for an entry :func:`decode` would refuse
    """
    ordered = sorted(entries, key=lambda e: e.path)
    _check_layout(ordered)
    parts = []
    for e in ordered:  # each checked as decode() will read it
        check_path(e.path)
        _checked_fields(e)
        # As json.dumps(sort_keys=True, ensure_ascii=False) writes it (a test
        # holds the two equal), without a dict per entry: the hash is
        # lowercase hex and the rest are integers, so only the path is escaped.
        parts.append(_ENTRY_JSON % (e.hash, e.mode, e.mtime_ns, _json_string(e.path), e.size))
    return (_MANIFEST_JSON % (",".join(parts), _json_string(FORMAT), VERSION)).encode("utf-8")


def decode(data: bytes) -> List[TreeEntry]:
    """Read and check a manifest, whole: one bad field refuses all of it.

    :return: its entries, sorted by path
    :raises TreeError: if it is not a manifest of this version, or a field
        is out of range; :class:`UnsafePathError` for a path that could leave
        the destination, a duplicate, or a file where another path needs a
        directory
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise TreeError("a manifest larger than %d bytes" % MAX_MANIFEST_BYTES)
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TreeError("not a tree manifest (not JSON: %s)" % exc) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise TreeError("not a tree manifest (no \"format\": %r)" % FORMAT)
    if document.get("version") != VERSION:
        raise TreeError("tree manifest version %r; this cloudmanager reads version %d"
                        % (document.get("version"), VERSION))
    if set(document) != {"format", "version", "entries"} \
            or not isinstance(document["entries"], list):
        raise TreeError("a tree manifest has exactly format, version and entries (a list)")
    entries = sorted((_entry(item, i) for i, item in enumerate(document["entries"])),
                     key=lambda e: e.path)
    _check_layout(entries)
    return entries


def _check_layout(entries: Sequence[TreeEntry]) -> None:
    """No path twice, and no file where another path needs a directory."""
    files = set()
    for e in entries:
        if e.path in files:
            raise UnsafePathError(e.path, "listed twice")
        files.add(e.path)
    directories = set()  # checked already, with every directory above it
    for e in entries:
        parent = e.path
        while "/" in parent:
            parent = parent[:parent.rindex("/")]
            if parent in directories:
                break
            if parent in files:
                raise UnsafePathError(e.path, "%r is a file in the same tree" % parent)
            directories.add(parent)


# -- making trees ---------------------------------------------------------------------

def tree_name(directory: Union[str, os.PathLike[str]]) -> str:
    """The name a directory's tree gets: its basename, made safe ("tree" if none)."""
    return safe_basename(os.path.basename(os.path.abspath(os.fspath(directory)))) or "tree"


def name_of_record(filename: str) -> Optional[str]:
    """The tree name a record's filename gives (``photos.cmtree`` -> ``photos``),
    or None if it does not name a manifest.

    >>> name_of_record("photos.cmtree"), name_of_record("photos.txt")
    ('photos', None)
    """
    if not filename.endswith(SUFFIX):
        return None
    return filename[:-len(SUFFIX)] or "tree"


def entries_for(root: Union[str, os.PathLike[str]],
                files: Iterable[Tuple[SourceFile, str]]) -> List[TreeEntry]:
    """The entries of a tree from files uploaded from under ``root``.

    :param files: ``(SourceFile, hash)`` pairs, the stat taken before the
        file was read (as :func:`cloudmanager.sources.walk` gives it)
    :raises UnsafePathError: for a file not under ``root`` (a path a
        manifest cannot hold is refused by :func:`encode`)
    """
    root = os.path.abspath(os.fspath(root))
    below = root.rstrip(os.sep) + os.sep
    cut = len(below)
    out = []
    for f, file_hash in files:
        # walk() gives absolute paths: slicing spares relpath's work. A path
        # that is not normalised keeps a "." or ".." that encode() refuses.
        if f.path.startswith(below):
            relative = f.path[cut:]
        else:
            relative = os.path.relpath(f.path, root)
            if relative.startswith(os.pardir + os.sep) or relative in (os.curdir, os.pardir):
                raise UnsafePathError(f.path, "not under %s" % root)
        if os.sep != "/":
            relative = relative.replace(os.sep, "/")
        # Paths and hashes are checked once, by encode(), which every
        # manifest goes through before it is stored.
        st = f.stat
        out.append(TreeEntry(relative, file_hash, st.st_size, st.st_mode & 0o777,
                             st.st_mtime_ns))
    return out


class TreeStore:
    """A pool's trees: record, list, read and restore them.

    :param pool: the :class:`~cloudmanager.pool.Pool`
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def record(self, name: str, entries: Sequence[TreeEntry],
               defer: Optional[bool] = None) -> str:
        """Store a manifest of ``entries`` in the pool as ``NAME.cmtree`` and name it.

        Each entry's size is taken from the catalog (the bytes uploaded); a
        file the pool does not have refuses the tree.

        :param defer: as for :meth:`~cloudmanager.pool.Pool.upload`, for the manifest
        :return: the manifest's hash
        :raises TreeError: if an entry's file is not in the pool, or the
            manifest cannot be made
        :raises CloudManagerError, OSError: if the manifest cannot be uploaded
        """
        sizes = self.pool.db.files.sizes(e.hash for e in entries)
        checked = []
        for e in entries:
            if e.hash not in sizes:
                raise TreeError("%s (%s) is not in the pool" % (e.path, e.hash))
            checked.append(e if e.size == sizes[e.hash] else e._replace(size=sizes[e.hash]))
        data = encode(checked)
        name = safe_basename(name) or "tree"
        with tempfile.TemporaryDirectory(prefix="cm-tree-") as scratch:
            path = os.path.join(scratch, name + SUFFIX)
            with fsutil.atomic_write(path, fsync=False) as out:
                out.write(data)
            tree_hash = self.pool.upload(path, defer=defer)
        with self.pool.db.catalog.transaction() as conn:
            self.pool.db.trees.add(conn, [(tree_hash, name, int(time.time()))])
        log.info("recorded tree %s of %d files as %s", name, len(checked), tree_hash)
        return tree_hash

    def upload(self, directory: Union[str, os.PathLike[str]], defer: Optional[bool] = None,
               follow_symlinks: bool = False) -> str:
        """Upload every regular file under ``directory`` and record it as a tree.

        :return: the tree's hash
        :raises InvalidInputError: if ``directory`` is not a directory
        :raises TreeError: if some file could not be read or uploaded (those
            that were stay in the pool), or the tree cannot be recorded
        """
        from .sources import walk

        directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(directory):
            raise InvalidInputError("%s is not a directory" % directory)
        problems: List[Tuple[str, str]] = []
        files = list(walk([directory], follow_symlinks=follow_symlinks, problems=problems))
        results = self.pool.upload_many([f.path for f in files], defer=defer)
        failed = [(f.path, str(r)) for f, r in zip(files, results) if not isinstance(r, str)]
        failed += problems
        if failed:
            raise TreeError("no tree recorded for %s: %d files were not uploaded (%s)"
                            % (directory, len(failed), "; ".join(
                                "%s: %s" % item for item in failed[:3])))
        return self.record(tree_name(directory),
                           entries_for(directory, zip(files, results)),  # type: ignore[arg-type]
                           defer=defer)

    def read(self, tree_hash: str) -> List[TreeEntry]:
        """The entries of a tree (any file of the pool that is a manifest).

        :raises NotInPoolError: if the pool has no such file
        :raises TreeError: if it is not a manifest, or one that is refused
        :raises CloudManagerError: if no host delivered it
        """
        tree_hash = check_hash(tree_hash)
        size = self.pool.size_of(tree_hash)
        if size > MAX_MANIFEST_BYTES:
            raise TreeError("%s is not a tree manifest (%d bytes)" % (tree_hash, size))
        with tempfile.TemporaryDirectory(prefix="cm-tree-") as scratch:
            path = self.pool.download(tree_hash, os.path.join(scratch, "manifest"))
            with open(path, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        try:
            return decode(data)
        except UnsafePathError:
            raise  # it names the path
        except TreeError as exc:
            raise TreeError("%s: %s" % (tree_hash, exc)) from None

    def list(self) -> List[dict]:
        """Every tree the catalog names: ``{hash, name, created}``, oldest first."""
        return [row._asdict() for row in self.pool.db.trees.all()]

    def restore(self, tree_hash: str, dest: Union[str, os.PathLike[str]], *,
                jobs: int = DEFAULT_JOBS, force: bool = False, dry_run: bool = False,
                checksum: bool = False,
                progress: Optional[Callable[[int, int], None]] = None) -> RestoreSummary:
        """Recreate a tree under ``dest``; see :func:`restore`."""
        return restore(self.pool, self.read(tree_hash), dest, jobs=jobs, force=force,
                       dry_run=dry_run, checksum=checksum, progress=progress)


# -- restoring ------------------------------------------------------------------------

def restore(pool: Pool, entries: Sequence[TreeEntry], dest: Union[str, os.PathLike[str]],
            *, jobs: int = DEFAULT_JOBS, force: bool = False, dry_run: bool = False,
            checksum: bool = False,
            progress: Optional[Callable[[int, int], None]] = None) -> RestoreSummary:
    """Recreate the files of ``entries`` under ``dest``, verified, in parallel.

    A file already there with the manifest's size and mtime is taken as
    identical (as rsync does; with ``checksum``, or when only the mtime
    differs, it is hashed), and only its mode and mtime are set where they
    differ; so a second run over a finished restore reads and writes
    nothing, and a run after an interrupted one fetches only what is missing
    or differs. Every other file is fetched (from the cache, or from a host,
    and cached if it fits: in groups of up to :data:`RESTORE_GROUP` files
    taking at most half the cache, brought in together by
    :meth:`~cloudmanager.pool.Pool.warm_up_many`, in parallel within each
    host's connections), checked against its hash and size, written to a
    temp name in its directory with its mode and mtime, and renamed into
    place. A different file, or anything else, in the way is a conflict and
    is left alone, unless ``force`` (a directory in the way always is).

    :param entries: from :func:`decode` (checked)
    :param dest: the directory to restore into; created if missing. It may
        itself be a symbolic link; nothing below it is followed
    :param jobs: files fetched at the same time (1 to :data:`MAX_JOBS`)
    :param force: replace files that differ (never a directory)
    :param dry_run: only plan: nothing is created or written
    :param checksum: hash existing files even when size and mtime match
    :param progress: called as ``progress(nbytes, nfiles)`` from worker
        threads as files land (bytes of fetched files only)
    :return: a :class:`RestoreSummary`
    :raises InvalidInputError: for a bad ``jobs``, or a ``dest`` that is not
        a directory
    :raises UnsafePathError: for an entry refused (nothing is written then)
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise InvalidInputError("jobs must be an integer from 1 to %d, not %r"
                                % (MAX_JOBS, jobs))
    entries = sorted(entries, key=lambda e: e.path)
    for e in entries:  # a caller's own list gets the checks a decoded one had
        check_path(e.path)
    _check_layout(entries)
    report = progress or (lambda nbytes, nfiles: None)
    dest = os.path.abspath(os.fspath(dest))
    if not dry_run:
        try:
            os.makedirs(dest, exist_ok=True)
        except OSError as exc:
            raise InvalidInputError("cannot create %s: %s" % (dest, exc.strerror)) from None
    restorer = _Restorer(pool, dest, force, dry_run, checksum)
    try:
        restorer.sizes = pool.db.files.sizes(e.hash for e in entries)
        plan = [restorer.plan(e) for e in entries]
        actions = [(action, e.path) for e, (action, _) in zip(entries, plan)]
        conflicts = [(e.path, why) for e, (action, why) in zip(entries, plan)
                     if action == "conflict"]
        failed = [(e.path, why) for e, (action, why) in zip(entries, plan) if action == "fail"]
        fetch = [e for e, (action, _) in zip(entries, plan) if action == "fetch"]
        unchanged = sum(1 for action, _ in plan if action in ("keep", "touch"))
        if dry_run:
            return RestoreSummary(len(entries), len(fetch), sum(e.size for e in fetch),
                                  unchanged, conflicts, failed, actions)
        for e, (action, _) in zip(entries, plan):
            if action == "touch":
                try:
                    restorer.touch(e)
                except (OSError, CloudManagerError) as exc:
                    failed.append((e.path, _reason(exc)))
        fetched, fetched_bytes = 0, 0
        with concurrent.futures.ThreadPoolExecutor(
                max_workers=jobs, thread_name_prefix="cm-restore") as workers:
            for group in _restore_groups(fetch, restorer.sizes, pool.cache.capacity):
                # The group's files come into the cache together, in parallel
                # batches (Pool.warm_up_many); a worker copies each file out
                # as soon as it is cached (one blocked download holds up no other).
                moved_in = [0]
                waiting: Dict[str, List[TreeEntry]] = {}
                for e in group:
                    waiting.setdefault(e.hash, []).append(e)
                futures: Dict[concurrent.futures.Future, TreeEntry] = {}

                def arrived(nbytes: int) -> None:
                    moved_in[0] += nbytes
                    report(nbytes, 0)

                def fetch_one(e: TreeEntry, warmed: bool) -> int:
                    """Fetch ``e``, its bytes reported as they move (a file warmed
                    into the cache has been); :return: how many were."""
                    told = [0]

                    def moved(nbytes: int) -> None:
                        told[0] += nbytes
                        report(nbytes, 0)

                    restorer.fetch(e, None if warmed else moved)
                    return told[0]

                def landed(file_hash: str, outcome: object) -> None:
                    for e in waiting.pop(file_hash, []):
                        futures[workers.submit(fetch_one, e, isinstance(outcome, str))] = e

                try:
                    pool.warm_up_many(list(waiting), progress=arrived, landed=landed)
                    for file_hash in list(waiting):  # not told (none should be)
                        landed(file_hash, None)
                    told = moved_in[0]
                    for future in concurrent.futures.as_completed(futures):
                        e = futures[future]
                        try:
                            told += future.result()
                        except (OSError, CloudManagerError) as exc:
                            log.error("could not restore %s: %s", e.path, _reason(exc))
                            failed.append((e.path, _reason(exc)))
                            report(0, 1)
                        else:
                            fetched += 1
                            fetched_bytes += e.size
                            report(0, 1)
                finally:  # Ctrl-C: files not started are not started
                    for future in futures:
                        future.cancel()
                # What nobody reported: cache hits, repeated contents.
                report(max(0, sum(e.size for e in group) - told), 0)
        failed.sort()
        return RestoreSummary(len(entries), fetched, fetched_bytes, unchanged, conflicts,
                              failed, actions)
    finally:
        restorer.close()


def _restore_groups(fetch: Sequence[TreeEntry], sizes: Dict[str, int],
                    capacity: int) -> Iterator[List[TreeEntry]]:
    """The entries to fetch in groups whose distinct files take at most half
    the cache (so a group's files are still cached when the workers copy
    them out) and number at most :data:`RESTORE_GROUP`; a
    file larger than that is a group of its own (fetched as before: streamed
    if it does not fit)."""
    group: List[TreeEntry] = []
    seen: Dict[str, int] = {}
    budget = capacity // 2
    for e in fetch:
        size = sizes.get(e.hash, e.size)
        if e.hash not in seen and group and (len(seen) >= RESTORE_GROUP
                                             or sum(seen.values()) + size > budget):
            yield group
            group, seen = [], {}
        group.append(e)
        seen[e.hash] = size
    if group:
        yield group


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class _Restorer:
    """The file work of one :func:`restore`, relative to ``dest``'s descriptor."""

    def __init__(self, pool: Pool, dest: str, force: bool, dry_run: bool,
                 checksum: bool) -> None:
        self.pool = pool
        self.dest = dest
        self.force = force
        self.dry_run = dry_run
        self.checksum = checksum
        self.root_fd: Optional[int] = None
        if os.path.isdir(dest):
            self.root_fd = os.open(dest, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        elif os.path.lexists(dest) or not dry_run:
            raise InvalidInputError("%s is not a directory" % dest)
        #: The catalog's size of each file of the tree it has.
        self.sizes: Dict[str, int] = {}
        self._cleaned: set = set()

    def close(self) -> None:
        if self.root_fd is not None:
            os.close(self.root_fd)
            self.root_fd = None

    def _open_parent(self, path: str, create: bool) -> Optional[int]:
        """A descriptor of ``path``'s directory, opened a component at a time
        without following a link; None if it does not exist (and not ``create``).

        :raises UnsafePathError: if a component is a link or not a directory
        """
        parts = path.split("/")[:-1]
        if self.root_fd is None:
            return None
        fd = os.dup(self.root_fd)
        try:
            for depth, part in enumerate(parts):
                try:
                    child = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC,
                                    dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:  # another worker made it
                        pass
                    child = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC,
                                    dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                        where = "/".join(parts[:depth + 1])
                        what = "a symbolic link" if _is_link(part, fd) else "not a directory"
                        raise UnsafePathError(path, "%s in the destination is %s"
                                              % (where, what)) from None
                    raise
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def plan(self, e: TreeEntry) -> Tuple[str, str]:
        """``(action, reason)`` for one entry (see :attr:`RestoreSummary.actions`)."""
        size = self.sizes.get(e.hash)
        if size is None:
            return "fail", "%s is not in the pool" % e.hash
        if size != e.size:
            return "fail", "the manifest says %d bytes, the pool's record of %s %d" % (
                e.size, e.hash, size)
        try:
            parent = self._open_parent(e.path, create=False)
        except UnsafePathError as exc:
            return "conflict", str(exc)
        if parent is None:
            return "fetch", ""
        try:
            self._clean_temps(parent, e.path)
            name = e.path.rsplit("/", 1)[-1]
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return "fetch", ""
            if stat.S_ISDIR(st.st_mode):
                return "conflict", "a directory is in the way"
            if stat.S_ISREG(st.st_mode) and st.st_size == e.size:
                same = st.st_mtime_ns == e.mtime_ns and not self.checksum
                if not same:
                    same = _hash_at(parent, name) == e.hash
                if same:
                    if stat.S_IMODE(st.st_mode) == e.mode and st.st_mtime_ns == e.mtime_ns:
                        return "keep", ""
                    if st.st_nlink == 1:
                        return "touch", ""
                    # A hard link: a chmod would change the other names'
                    # file too (one outside DEST, maybe). Same bytes, so
                    # a fresh file renamed over this name loses nothing.
                    return "fetch", ""
            if not self.force:
                what = "a file that differs" if stat.S_ISREG(st.st_mode) else \
                    "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                return "conflict", "%s is in the way (--force replaces it)" % what
            return "fetch", ""
        except OSError as exc:
            return "fail", _reason(exc)
        finally:
            os.close(parent)

    def _clean_temps(self, parent: int, path: str) -> None:
        """Remove the temp files a killed restore left in ``path``'s directory (once)."""
        directory = path.rpartition("/")[0]
        if self.dry_run or directory in self._cleaned:
            return
        self._cleaned.add(directory)
        for name in os.listdir(parent):
            if name.startswith((TEMP_PREFIX, "." + TEMP_PREFIX)):
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    log.info("removing %s, left by an interrupted restore",
                             os.path.join(self.dest, directory, name))
                    os.unlink(name, dir_fd=parent)

    def touch(self, e: TreeEntry) -> None:
        """Set an identical file's mode and mtime."""
        parent = self._open_parent(e.path, create=False)
        if parent is None:
            raise FileNotFoundError(errno.ENOENT, "its directory is gone")
        try:
            fd = os.open(e.path.rsplit("/", 1)[-1], os.O_RDONLY | _NOFOLLOW | _CLOEXEC,
                         dir_fd=parent)
            try:
                os.chmod(fd, e.mode)
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            finally:
                os.close(fd)
        finally:
            os.close(parent)

    def fetch(self, e: TreeEntry, progress: Optional[Callable[[int], None]] = None) -> None:
        """Fetch one file, verified, to a temp name beside its place, and rename it there.

        :param progress: told of the bytes as they arrive (or are copied
            from the cache)
        """
        parent = self._open_parent(e.path, create=True)
        assert parent is not None  # created
        name = e.path.rsplit("/", 1)[-1]
        temp = "%s%s.part" % (TEMP_PREFIX, secrets.token_hex(8))
        try:
            # The pool writes the verified bytes to a path; through
            # /proc/self/fd it resolves by the descriptor, so a directory
            # swapped for a link meanwhile cannot redirect it.
            self.pool.download(e.hash, os.path.join(_fd_path(parent, self.dest, e.path), temp),
                               progress)
            fd = os.open(temp, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=parent)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != e.size:
                    raise TreeError("%s: fetched %d bytes, the manifest says %d"
                                    % (e.path, st.st_size, e.size))
                os.chmod(fd, e.mode)
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            finally:
                os.close(fd)
            os.replace(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
            os.fsync(parent)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=parent)
            except OSError:
                pass
            raise
        finally:
            os.close(parent)


def _fd_path(fd: int, dest: str, path: str) -> str:
    """A path naming the directory open as ``fd``: by the descriptor where the
    system allows (Linux), else by name (its components were checked)."""
    proc = "/proc/self/fd/%d" % fd
    if os.path.isdir(proc):
        return proc
    return os.path.join(dest, *path.split("/")[:-1])


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _hash_at(parent: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=parent)
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(fsutil.CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
