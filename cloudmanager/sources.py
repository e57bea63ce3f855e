"""Local source files: what ``cm upload PATH...`` reads, and what it can skip.

:func:`walk` turns the paths given on a command line into regular files,
recursing into directories. :class:`SourceIndex` remembers the SHA-256 of
each file it saw uploaded, keyed by the file's size, mtime, ctime, inode and
device, so running the same upload again reads none of the unchanged files.

A remembered hash is trusted only while all five are unchanged. ctime cannot
be set from user space, so a tool that restores an old mtime after writing
is still caught. A file that was modified in the two seconds before it was
read is not remembered at all: a second write in the same timestamp tick
could otherwise leave the stat unchanged (git calls this "racily clean").
"""

import logging
import os
import re
import stat
from typing import Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple, Union

log = logging.getLogger(__name__)

#: A file changed this recently before it was read is not remembered.
RACY_WINDOW_NS = 2 * 10**9


class SourceFile(NamedTuple):
    """A regular file to upload, with the stat taken when it was found."""

    path: str  # absolute
    stat: os.stat_result

    @property
    def size(self):
        return self.stat.st_size

    @property
    def key(self):
        """What must stay the same for a remembered hash to hold."""
        st = self.stat
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def glob_regex(pattern: str) -> str:
    """An rclone-style glob as a regular expression over ``/``-separated paths.

    ``*`` matches within one path segment, ``**`` across segments, ``?`` one
    character other than ``/``, ``[...]`` a character class and ``{a,b}``
    either alternative. A pattern that starts with ``/`` is anchored at the
    top of the tree; any other matches the end of a path, on a segment
    boundary. A pattern that ends with ``/`` matches everything below a
    directory of that name.

    >>> def match(glob, path):
    ...     return bool(re.fullmatch(glob_regex(glob), path))
    >>> match("*.jpg", "2024/a.jpg"), match("/*.jpg", "2024/a.jpg"), match("/*.jpg", "a.jpg")
    (True, False, True)
    >>> match("cache/", "app/cache/x/y"), match("{a,b}?.txt", "b1.txt"), match("**/x", "a/b/x")
    (True, True, True)
    """
    anchored = pattern.startswith("/")
    body = pattern.lstrip("/")
    if body.endswith("/"):
        body += "**"
    out = []
    i = 0
    while i < len(body):
        c = body[i]
        if body.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = body.find("]", i + 1)
            if end < 0:
                raise ValueError("unclosed [ in the glob %r" % pattern)
            members = body[i + 1:end]
            if members.startswith("!"):  # a glob's negation is a regex's ^
                members = "^" + members[1:]
            out.append("[" + members.replace("\\", "\\\\") + "]")
            i = end
        elif c == "{":
            end = body.find("}", i + 1)
            if end < 0:
                raise ValueError("unclosed { in the glob %r" % pattern)
            out.append("(?:" + "|".join(glob_regex("/" + alt)
                                         for alt in body[i + 1:end].split(",")) + ")")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return ("" if anchored else "(?:.*/)?") + "".join(out)


class PathFilter:
    """``--include`` and ``--exclude`` globs (see :func:`glob_regex`) for :func:`walk`.

    A file is uploaded unless an exclude pattern matches its path; when
    include patterns are given, it must also match one of them. Excludes
    win. Paths are relative to the directory named on the command line (a
    file named there is matched by its name), with ``/`` separators. A
    directory whose every file an exclude pattern ending in ``/`` or ``/**``
    would exclude is not walked at all.

    >>> f = PathFilter(include=["*.jpg", "*.png"], exclude=["thumbs/"])
    >>> [f.wants(p) for p in ("a.jpg", "x/b.png", "thumbs/c.jpg", "notes.txt")]
    [True, True, False, False]

    :raises ValueError: for a malformed pattern
    """

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        self.include = [re.compile(glob_regex(p)) for p in include]
        self.exclude = [re.compile(glob_regex(p)) for p in exclude]
        # Directories: "dir/" and "dir/**" exclude everything below them.
        self.prune = [re.compile(glob_regex(p.rstrip("*").rstrip("/")))
                      for p in exclude if p.endswith("/") or p.endswith("/**")]

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def wants(self, relative: str) -> bool:
        """Whether the file at ``relative`` (``/``-separated) is uploaded."""
        if any(r.fullmatch(relative) for r in self.exclude):
            return False
        return not self.include or any(r.fullmatch(relative) for r in self.include)

    def walks(self, relative: str) -> bool:
        """Whether the directory at ``relative`` is walked."""
        return not any(r.fullmatch(relative) for r in self.prune)


def walk(paths: Iterable[Union[str, os.PathLike[str]]], follow_symlinks: bool = False,
         problems: Optional[List[Tuple[str, str]]] = None,
         filters: Optional[PathFilter] = None) -> Iterator[SourceFile]:
    """Yield a :class:`SourceFile` for every regular file under ``paths``.

    Directories are walked recursively, in sorted order. A path named in
    ``paths`` is followed if it is a symbolic link (as ``cp -H`` does); links
    met inside directories are skipped with a logged notice unless
    ``follow_symlinks`` (a linked directory is then walked too, once).

    :param problems: a list that gets ``(path, reason)`` for what could not
        be read or is not a file: a directory that cannot be listed, a named
        socket or FIFO, a dangling link. Each is logged too.
    :param filters: a :class:`PathFilter`: only the files it wants
    :raises FileNotFoundError: if a path given does not exist
    """
    problems = [] if problems is None else problems
    seen_dirs: Set[Tuple[int, int]] = set()  # (st_dev, st_ino) of directories walked
    for path in paths:
        path = os.path.abspath(os.fspath(path))
        st = os.stat(path)
        # A directory's files are matched from below it; a file by its name.
        relative = None if stat.S_ISDIR(st.st_mode) else os.path.basename(path)
        yield from _walk_entry(path, st, follow_symlinks, seen_dirs, problems,
                               filters or None, relative)


def _walk_entry(path, st, follow_symlinks, seen_dirs, problems, filters=None, relative=None):
    if stat.S_ISREG(st.st_mode):
        if filters is None or filters.wants(relative or os.path.basename(path)):
            yield SourceFile(path, st)
    elif stat.S_ISDIR(st.st_mode):
        if filters is not None and relative is not None and not filters.walks(relative):
            return
        if (st.st_dev, st.st_ino) in seen_dirs:  # a link loop, or given twice
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            _problem(problems, path, exc.strerror or str(exc))
            return
        for entry in entries:
            try:
                child = entry.stat(follow_symlinks=follow_symlinks)
            except OSError as exc:  # vanished, or a dangling link
                _problem(problems, entry.path, exc.strerror or str(exc))
                continue
            yield from _walk_entry(entry.path, child, follow_symlinks, seen_dirs, problems,
                                   filters, entry.name if relative is None
                                   else relative + "/" + entry.name)
    elif stat.S_ISLNK(st.st_mode):
        # Not an error: like rclone, links inside a tree are left out by default.
        log.warning("skipping symbolic link %s (use --follow-symlinks to upload its target)",
                    path)
    else:
        _problem(problems, path, "not a regular file or directory")


def _problem(problems, path, reason):
    log.error("cannot upload %s: %s", path, reason)
    problems.append((path, reason))


class SourceIndex:
    """Remembered hashes of source files, stored in the pool's database.

    :param db: the :class:`~cloudmanager.db.FileDatabase`
    """

    def __init__(self, db):
        self.db = db

    def known(self, files):
        """``{path: hash}`` for the files whose remembered stat still matches
        and whose hash the pool still holds (cached, or on a host)."""
        files = list(files)
        stored = self.db.sources.lookup(f.path for f in files)
        found = {}
        for f in files:
            row = stored.get(f.path)
            if row is not None and row[:5] == f.key:
                found[f.path] = row[5]
        hashes = set(found.values())
        # In the pool still: cached here, or with a copy on a host.
        held = self.db.cache_index.cached_among(hashes) | self.db.files.in_pool(hashes)
        return {path: h for path, h in found.items() if h in held}

    @staticmethod
    def rememberable(before, after, read_started_ns):
        """Whether a file read between two stats may be remembered.

        :param before: the :class:`SourceFile` found before the read
        :param after: ``os.stat_result`` taken after it
        :param read_started_ns: ``time.time_ns()`` before the read began
        """
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino,
                after.st_dev) != before.key:
            return False  # changed while it was read: the hash may mix versions
        newest = max(after.st_mtime_ns, after.st_ctime_ns)
        return newest < read_started_ns - RACY_WINDOW_NS

    def remember(self, entries):
        """Store ``[(SourceFile, hash)]``."""
        rows = [(f.path,) + f.key + (h,) for f, h in entries]
        if rows:
            self.db.sources.remember(rows)
