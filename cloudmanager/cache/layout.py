"""The storage directory's layout: the one module that names its entries.

Under the storage directory::

    ab/abcdef...                    a cached file, named by its SHA-256, in the
                                    shard named by the hash's first two digits
    tmp/<token>-<n>.tmp             the temp file of the session's reservation <n>
    tmp/<token>-<n>-<k>.tmp         item <k> of a batch reservation
    tmp/<token>-<n>.tmp.<rnd>.tmp   a download attempt beside the reservation's

``<token>`` is the session's (the last part of its ``sessions.owner``), so
every temp name starts with the token of the session that wrote it
(:func:`temp_token`): repair removes a dead session's temp files and never a
live one's. ``<n>`` is a number the session counts up from 1 for each
reservation, so no name comes twice in a session (not the reservation's row
id, which SQLite may give again once the row is gone). Every other module
asks this one for a shard path or a temp name (a test walks their AST).

Anyone who can write into the storage directory can put a symlink where a
shard, the temp directory or a cached file should be. Walks and deletes here
go through directory fds opened with ``O_NOFOLLOW``, so they never reach
outside: a planted link is removed as a link, and what it points at is
neither read nor deleted.
"""

import contextlib
import errno
import logging
import os
import shutil
import stat
import sys
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

from .. import fsutil
from ..errors import CacheError
from ..validation import is_hash

log = logging.getLogger(__name__)

#: The 256 shard directories, ``00`` to ``ff``.
SHARDS = tuple("%02x" % i for i in range(256))
#: The directory of temp files, under the storage directory.
TEMP_DIR = "tmp"
_TEMP_SUFFIX = ".tmp"

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) \
    | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


# -- names -----------------------------------------------------------------------


def shard_of(file_hash: str) -> str:
    """The shard (directory name) a hash's file lives in.

    >>> shard_of("ab" + "0" * 62)
    'ab'
    """
    return file_hash[:2]


def relpath(file_hash: str) -> str:
    """A cached file's path relative to the storage directory (as reports give it).

    >>> relpath("ab" + "0" * 62) == os.path.join("ab", "ab" + "0" * 62)
    True
    """
    return os.path.join(shard_of(file_hash), file_hash)


def reservation_temp_name(token: str, number: int) -> str:
    """The temp file name of a session's reservation ``number``.

    >>> reservation_temp_name("0123abcd", 7)
    '0123abcd-7.tmp'
    """
    return "%s-%d%s" % (token, number, _TEMP_SUFFIX)


def batch_temp_name(token: str, number: int, item: int) -> str:
    """The temp file name of item ``item`` of a session's batch reservation ``number``.

    >>> batch_temp_name("0123abcd", 7, 2)
    '0123abcd-7-2.tmp'
    """
    return "%s-%d-%d%s" % (token, number, item, _TEMP_SUFFIX)


def download_prefix(dest_path: str) -> str:
    """The name prefix of a download attempt's temp file, created beside
    ``dest_path`` (:func:`cloudmanager.fsutil.open_temp` adds a random part).

    It starts with the destination's name, so in the cache, where the
    destination is a reservation's temp file, it starts with the session's
    token, and :func:`temp_token` tells whose it is.

    >>> download_prefix("/c/tmp/0123abcd-7.tmp")
    '0123abcd-7.tmp.'
    """
    return os.path.basename(dest_path) + "."


def temp_token(name: str) -> str:
    """The session token a temp file's name starts with (after any dots).

    >>> temp_token("0123abcd-7-2.tmp"), temp_token("0123abcd-7.tmp.5f2e.tmp")
    ('0123abcd', '0123abcd')
    """
    return name.lstrip(".").split("-", 1)[0]


def belongs_in(shard: str, name: str) -> bool:
    """Whether ``name`` is a cached file's name that belongs in ``shard``.

    >>> belongs_in("ab", "ab" + "0" * 62), belongs_in("00", "ab" + "0" * 62)
    (True, False)
    """
    return is_hash(name) and name.startswith(shard)


# -- walks -----------------------------------------------------------------------


class FileStat(NamedTuple):
    """A cached file as a walk saw it (its inode and mtime tell a replacement)."""

    size: int
    ino: int
    mtime_ns: int


class ShardScan(NamedTuple):
    """What a walk of the shards found."""

    #: the regular files with a cached file's name, in the right shard
    files: Dict[str, FileStat]
    #: entries that do not belong (relative paths, sorted): a symlink, a
    #: directory, a misnamed or misplaced file in a shard, and a shard that is
    #: not a real directory
    foreign: List[str]
    #: how many of ``foreign`` were removed
    removed: int


class TempScan(NamedTuple):
    """What a walk of the temp directory found."""

    #: temp files of sessions not running (relative paths, sorted), or
    #: ``["tmp"]`` if the temp directory is not a real directory
    stale: List[str]
    #: how many of ``stale`` were removed
    removed: int


class Layout:
    """The storage directory's paths, and the only walks and deletes in it.

    :param root: the storage directory (absolute)
    :param dir_mode: the shards' mode (the temp directory stays 0700)
    """

    def __init__(self, root: str, dir_mode: int = fsutil.DIR_MODE) -> None:
        self.root = root
        self._root_sep = os.path.join(root, "")  # the hot path() concatenates
        self.dir_mode = dir_mode
        #: The temp directory.
        self.tmp_dir = os.path.join(root, TEMP_DIR)
        self._tmp_sep = os.path.join(self.tmp_dir, "")

    # -- paths ---------------------------------------------------------------

    def path(self, file_hash: str) -> str:
        """The path of a (validated) hash's cached file, whether or not it is there."""
        return self._root_sep + shard_of(file_hash) + os.sep + file_hash

    def shard_dir(self, file_hash: str) -> str:
        """The shard directory a hash's file lives in."""
        return self._root_sep + shard_of(file_hash)

    def reservation_temp(self, token: str, number: int) -> str:
        """The temp file path of a reservation (:func:`reservation_temp_name`)."""
        return os.path.join(self.tmp_dir, reservation_temp_name(token, number))

    def batch_temp(self, token: str, number: int, item: int) -> str:
        """The temp file path of a batch item (:func:`batch_temp_name`)."""
        return self._tmp_sep + batch_temp_name(token, number, item)

    # -- the directories -------------------------------------------------------

    def prepare(self) -> None:
        """Create the storage directory, the temp directory and the shards.

        A symlink or a file in place of the temp directory or a shard is
        replaced with a real directory, never followed; modes are set to the
        configured ones.

        :raises CacheError: if the directory cannot be used
        """
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise CacheError("storage path %s exists and is not a directory" % self.root)
        try:
            os.makedirs(self.root, fsutil.DIR_MODE, exist_ok=True)
            own_dir(self.tmp_dir)
            for shard in SHARDS:
                own_dir(os.path.join(self.root, shard), self.dir_mode)
            if self.dir_mode != fsutil.DIR_MODE:  # configured to share: let others in
                os.chmod(self.root, self.dir_mode)
        except OSError as exc:
            raise CacheError("cannot prepare storage directory %s: %s" % (self.root, exc)) from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise CacheError("storage directory %s is not writable" % self.root)

    def is_file(self, file_hash: str, size: int) -> bool:
        """Whether a hash's cached file is a regular file of ``size`` bytes (one lstat)."""
        try:
            st = os.lstat(self.path(file_hash))
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == size

    def file_stat(self, file_hash: str) -> Optional[FileStat]:
        """A hash's cached file as it is now (one lstat, of the link if it is
        one), or None if there is none."""
        try:
            st = os.lstat(self.path(file_hash))
        except FileNotFoundError:
            return None
        return FileStat(st.st_size, st.st_ino, st.st_mtime_ns)

    def unlink(self, file_hash: str) -> None:
        """Remove a hash's cached file, through its shard's own fd.

        A link planted as the file is removed as a link, and a link planted
        as the shard (to a folder host's directory, say) is never entered.
        """
        unlink_in(self.shard_dir(file_hash), file_hash)

    @contextlib.contextmanager
    def open_cached(self, file_hash: str) -> Iterator[Optional[int]]:
        """Yield a read fd on a hash's cached file, opened through its shard's
        fd without following a symlink, or None if there is no such file."""
        fd = None
        with open_dir(self.shard_dir(file_hash)) as dfd:
            if dfd is not None:
                with contextlib.suppress(OSError):
                    fd = os.open(file_hash, _FILE_FLAGS, dir_fd=dfd)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def has_any_file(self) -> bool:
        """Whether any shard holds an entry at all."""
        for shard in SHARDS:
            with open_dir(os.path.join(self.root, shard)) as fd:
                if scan(fd):
                    return True
        return False

    def scan_shards(self, remove: bool) -> ShardScan:
        """Walk the shards: the cached files in them, and what does not belong.

        :param remove: remove what does not belong (without following it),
            and put a real directory in place of a shard that is missing or
            is not one
        """
        files: Dict[str, FileStat] = {}
        foreign: List[str] = []
        removed = 0
        for shard in SHARDS:
            shard_path = os.path.join(self.root, shard)
            try:
                st: Optional[os.stat_result] = os.lstat(shard_path)
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISDIR(st.st_mode):
                if st is not None:  # a symlink or a file where the shard should be
                    foreign.append(shard)
                if remove:
                    own_dir(shard_path, self.dir_mode)
                    removed += st is not None
                continue
            with open_dir(shard_path) as fd:
                if fd is None:  # replaced since the lstat: the next walk sees it
                    continue
                for entry in scan(fd):
                    if entry.is_file(follow_symlinks=False) and belongs_in(shard, entry.name):
                        est = entry.stat(follow_symlinks=False)
                        files[entry.name] = FileStat(est.st_size, est.st_ino, est.st_mtime_ns)
                    else:
                        foreign.append(os.path.join(shard, entry.name))
                        if remove:
                            remove_entry(fd, shard_path, entry)
                            removed += 1
        foreign.sort()
        return ShardScan(files, foreign, removed)

    def scan_temps(self, is_live: Callable[[str], bool], remove: bool) -> TempScan:
        """Walk the temp directory: the temp files of sessions not running.

        :param is_live: ``is_live(token)``: whether the session of that token runs
        :param remove: remove them (without following them), and put a real
            directory in place of a temp directory that is missing or is not one
        """
        stale: List[str] = []
        removed = 0
        try:
            st: Optional[os.stat_result] = os.lstat(self.tmp_dir)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            if st is not None:
                stale.append(TEMP_DIR)
            if remove:
                own_dir(self.tmp_dir)
                removed += st is not None
            return TempScan(stale, removed)
        with open_dir(self.tmp_dir) as fd:
            if fd is None:  # replaced since the lstat: the next walk sees it
                return TempScan(stale, removed)
            for entry in scan(fd):
                if not is_live(temp_token(entry.name)):
                    stale.append(os.path.join(TEMP_DIR, entry.name))
                    if remove:
                        remove_entry(fd, self.tmp_dir, entry)
                        removed += 1
        stale.sort()
        return TempScan(stale, removed)


# -- directories, never through a planted symlink ----------------------------------


@contextlib.contextmanager
def open_dir(path: str) -> Iterator[Optional[int]]:
    """Yield an fd on the directory ``path`` itself, or None if it is missing
    or is not a real directory (a symlink in its place is not followed)."""
    try:
        fd: Optional[int] = os.open(path, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        fd = None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        log.warning("%s is a symlink, not a directory; not following it", path)
        fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def scan(fd: Optional[int]) -> List[os.DirEntry]:
    """The entries of an open directory (a list; none for a None fd)."""
    if fd is None:
        return []
    with os.scandir(fd) as it:
        return list(it)


def remove_entry(fd: int, dir_path: str, entry: os.DirEntry) -> None:
    """Remove an entry of the directory open as ``fd`` without following it."""
    if entry.is_dir(follow_symlinks=False):
        if sys.version_info >= (3, 11):
            shutil.rmtree(entry.name, ignore_errors=True, dir_fd=fd)
        else:  # rmtree refuses a symlink at the top, and never follows one below
            shutil.rmtree(os.path.join(dir_path, entry.name), ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.name, dir_fd=fd)


def unlink_in(dir_path: str, name: str) -> None:
    """Unlink ``name`` in ``dir_path``, unless ``dir_path`` is not a real directory."""
    with open_dir(dir_path) as fd:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)


def own_dir(path: str, mode: int = fsutil.DIR_MODE) -> bool:
    """Make ``path`` a real directory with ``mode`` (0700 by default).

    A symlink or a file found in its place is removed, never followed.

    :return: True if it was already a directory
    """
    try:
        os.mkdir(path, mode)
        if mode & ~fsutil.DIR_MODE:  # wider than the umask may allow
            os.chmod(path, mode)
        return False
    except FileExistsError:
        pass  # another process may have made it a moment ago
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        if stat.S_IMODE(st.st_mode) != mode:  # the configured mode changed
            os.chmod(path, mode)
        return True
    log.warning("%s is not a directory (a symlink or a file); replacing it", path)
    os.unlink(path)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    return False
