"""Uploading many files at once: small ones in batches, large ones side by side.

:func:`upload_files` is what ``cm upload DIR`` runs, for any caller with a
list of files (usually from :func:`cloudmanager.sources.walk`)::

    import contextlib

    from cloudmanager.scheduler import upload_files
    from cloudmanager.sources import walk

    files = list(walk(["photos"]))
    with contextlib.closing(upload_files(cm, files, jobs=4)) as batches:
        for batch in batches:
            for done in batch:
                print(done.hash, done.file.path)

Small files go in batches down one stream: each batch is one
:meth:`~cloudmanager.CloudManager.upload_many`, which records it in one
transaction and sends it to the hosts at once, so several streams of small
files would only queue for the GIL and the database's write lock. Large
files are where parallelism pays: each is read, hashed and sent on its own,
``jobs`` at a time, beside the stream of small ones.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from typing import Callable, Generator, Iterable, Iterator, List, NamedTuple, Optional, Union

from .errors import InvalidInputError
from .sources import SourceFile, SourceIndex

#: Large files uploaded at the same time unless the caller says otherwise.
DEFAULT_JOBS = 4
#: Small files go to :meth:`~cloudmanager.CloudManager.upload_many` in
#: batches of at most this many files and bytes: large enough to share
#: transactions, small enough that progress moves and a stop comes soon.
BATCH_FILES = 500
BATCH_BYTES = 64 * 2**20
#: Files of at least this size are uploaded on their own, ``jobs`` at a time.
LARGE_FILE = 8 * 2**20


class Uploaded(NamedTuple):
    """The outcome of one file of :func:`upload_files`."""

    #: The :class:`~cloudmanager.sources.SourceFile` given.
    file: SourceFile
    #: Its SHA-256 hex once it is in the pool, or ``False`` (the reason was logged).
    hash: Union[str, bool]
    #: Whether its hash may be remembered against its stat (see
    #: :meth:`cloudmanager.CloudManager.remember`): it was uploaded, did not
    #: change while it was read, and was not modified just before.
    rememberable: bool


#: ``advance(nbytes, nfiles)``: told of bytes read and files done.
Advance = Callable[[int, int], None]


def upload_files(cm, files: Iterable[Union[SourceFile, str, os.PathLike[str]]],
                jobs: int = DEFAULT_JOBS, defer: Optional[bool] = None,
                advance: Optional[Advance] = None, *, large_file: Optional[int] = None,
                batch_files: Optional[int] = None, batch_bytes: Optional[int] = None,
                stop: Optional[threading.Event] = None
                ) -> Generator[List[Uploaded], None, None]:
    """Upload files to the pool, yielding each batch's outcomes as it finishes.

    Files smaller than ``large_file`` go in batches (see :func:`batches`)
    down one stream; larger ones are uploaded one per batch, ``jobs`` at a
    time beside it. Batches are yielded in the order they finish, so the
    order of files is not kept.

    Every batch is submitted at the start. When the iterator is closed
    before the end (``break``, an exception in the caller, Ctrl-C while it
    waits), batches not started yet are never started, and the batches
    running are let finish: their files are in the pool, as
    :meth:`~cloudmanager.CloudManager.upload_many` promises. Wrap it in
    :func:`contextlib.closing` so that this happens at once, not when the
    iterator is garbage-collected.

    :param cm: the :class:`~cloudmanager.CloudManager`
    :param files: :class:`~cloudmanager.sources.SourceFile` objects (from
        :func:`~cloudmanager.sources.walk`), or paths, which are stat'ed here
    :param jobs: how many large files are uploaded at the same time (>= 1)
    :param defer: as for :meth:`~cloudmanager.CloudManager.upload_many`: if
        True, files are only cached and queued for :meth:`sync`
    :param advance: called as ``advance(nbytes, nfiles)`` from the worker
        threads (so it must be thread-safe) while files are read and as
        batches finish; over the whole run the bytes add up to the files'
        sizes and the files to their number
    :param large_file: the size from which a file is large; default
        :data:`LARGE_FILE`
    :param batch_files: the most files in a batch; default :data:`BATCH_FILES`
    :param batch_bytes: the most bytes in a batch (a larger file still makes
        a batch of its own); default :data:`BATCH_BYTES`
    :param stop: once set (by a Ctrl-C handler, say), batches not started
        yet are not started: each yields an empty list, while the batches
        running finish and yield their outcomes as usual, so the caller
        hears of every file that reached the pool
    :return: an iterator of lists of :class:`Uploaded`, one list per batch
    :raises InvalidInputError: if ``jobs`` is not a positive integer
    :raises OSError: if a path given cannot be stat'ed (before anything starts)
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidInputError("jobs must be a positive integer, not %r" % (jobs,))
    large_file = LARGE_FILE if large_file is None else large_file
    batch_files = BATCH_FILES if batch_files is None else batch_files
    batch_bytes = BATCH_BYTES if batch_bytes is None else batch_bytes
    sources = [f if isinstance(f, SourceFile) else source_file(f) for f in files]
    report = advance or (lambda nbytes, nfiles: None)
    return _run(cm, sources, jobs, defer, report, large_file, batch_files, batch_bytes,
                stop or threading.Event())


def _run(cm, files: List[SourceFile], jobs: int, defer: Optional[bool], advance: Advance,
         large_file: int, batch_files: int, batch_bytes: int,
         stop: threading.Event) -> Generator[List[Uploaded], None, None]:
    # A generator of its own, so that upload_files checks its arguments at once.
    small = [f for f in files if f.size < large_file]
    large = [[f] for f in files if f.size >= large_file]
    stream = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix="cm-upload-small")
    side = concurrent.futures.ThreadPoolExecutor(max_workers=jobs,
                                                 thread_name_prefix="cm-upload")
    try:
        futures = [stream.submit(_upload_batch, cm, batch, defer, advance, stop)
                   for batch in batches(small, batch_files, batch_bytes)]
        futures += [side.submit(_upload_batch, cm, batch, defer, advance, stop)
                    for batch in large]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()
    finally:
        # Closed early (Ctrl-C, an error, the caller stopped): batches not
        # started yet are not started; the running ones finish.
        for executor in (stream, side):
            executor.shutdown(wait=True, cancel_futures=True)


def _upload_batch(cm, batch: List[SourceFile], defer: Optional[bool],
                  advance: Advance, stop: threading.Event) -> List[Uploaded]:
    """One :meth:`upload_many` call, with progress and the rememberable check;
    nothing once ``stop`` is set."""
    if stop.is_set():
        return []
    started = time.time_ns()
    reported = [0]  # bytes the library reported while it read large files

    def read(nbytes: int) -> None:
        reported[0] += nbytes
        advance(nbytes, 0)

    hashes = cm.upload_many([f.path for f in batch], defer=defer, progress=read)
    # The rest: small files read in one go, files already cached, failures.
    advance(max(0, sum(f.size for f in batch) - reported[0]), len(batch))
    done = []
    for f, file_hash in zip(batch, hashes):
        rememberable = False
        if file_hash:
            try:
                rememberable = SourceIndex.rememberable(f, os.stat(f.path), started)
            except OSError:  # gone since: nothing to remember it by
                pass
        done.append(Uploaded(f, file_hash, rememberable))
    return done


def batches(files: Iterable[SourceFile], most_files: int,
            most_bytes: int) -> Iterator[List[SourceFile]]:
    """Split ``files``, in order, into lists of at most ``most_files`` files
    and ``most_bytes`` bytes; a file larger than ``most_bytes`` is a batch
    of its own.

    >>> import os
    >>> sized = [SourceFile("/f%d" % n, os.stat_result((0,) * 6 + (n, 0, 0, 0)))
    ...          for n in (1, 2, 3, 9, 1)]
    >>> [[f.size for f in batch] for batch in batches(sized, 2, 5)]
    [[1, 2], [3], [9], [1]]

    :param files: anything with a ``size`` (usually
        :class:`~cloudmanager.sources.SourceFile`)
    :param most_files: the most files in a batch (>= 1)
    :param most_bytes: the most bytes in a batch
    :return: an iterator of non-empty lists
    """
    batch: List[SourceFile] = []
    size = 0
    for f in files:
        if batch and (len(batch) >= most_files or size + f.size > most_bytes):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += f.size
    if batch:
        yield batch


def source_file(path: Union[str, os.PathLike[str]]) -> SourceFile:
    """A :class:`~cloudmanager.sources.SourceFile` for one path, stat'ed now
    (following a symbolic link).

    :raises OSError: if it cannot be stat'ed
    """
    path = os.path.abspath(os.fspath(path))
    return SourceFile(path, os.stat(path))

