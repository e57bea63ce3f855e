"""Metering the bytes that move to and from hosts: progress and bandwidth limits.

A host's bytes are copied deep inside its ``download`` or ``stage`` (or by
the kernel, for a folder), where no caller's argument reaches. So the engine
puts a :class:`Meter` on the thread that runs each host call
(:func:`metering`), and the copy loops of :mod:`cloudmanager.fsutil` report
every chunk they move to the meter of their thread (:func:`tick`). The meter
tells the caller's ``progress`` callback and takes the bytes from the pool's
:class:`TokenBucket`, which sleeps as long as the ``bwlimit`` requires. A
copy on a thread with no meter (the cache's own reads and writes) costs one
attribute lookup per chunk and is never slowed.

Where a library reads a file itself (boto3 on threads of its own, webdav4,
fsspec's ``put_file``), the host hands it the meter of its call
(:func:`current`) as its progress callback. Bytes that pass outside Python
(an external tool such as ``plowdown``) are neither reported nor limited.

>>> bucket = TokenBucket(parse_rate("1M"))
>>> bucket.rate
1048576.0
>>> seen = []
>>> with metering(Meter(seen.append)):
...     tick(10)
>>> tick(5)  # no meter on this thread any more
>>> seen
[10]
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
import time
from typing import Callable, Iterator, Optional

#: ``progress(nbytes)``: told of each chunk of bytes moved, from any thread.
Progress = Callable[[int], None]
#: ``advance(nbytes, nfiles)``: told of bytes moved and of files done.
Advance = Callable[[int, int], None]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_rate(text: str) -> float:
    """A bandwidth as rclone writes it, in bytes per second.

    ``10M`` (or ``10MiB``, ``10M/s``) is 10 MiB/s; the suffixes are binary
    (``K``, ``M``, ``G``, ``T``), as rclone's are; no suffix means KiB/s, as in
    rclone. ``0`` or ``off`` means no limit.

    >>> parse_rate("10M"), parse_rate("512k"), parse_rate("100"), parse_rate("off")
    (10485760.0, 524288.0, 102400.0, 0.0)

    :raises ValueError: if ``text`` is not a rate
    """
    value = text.strip().lower()
    if value in ("off", "0", ""):
        return 0.0
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?(?:/s)?", value)
    if not match:
        raise ValueError("not a bandwidth: %r (try 512K, 10M or 1.5G, per second)" % text)
    number, unit = float(match.group(1)), match.group(2)
    return number * (_UNITS[unit] if unit else _UNITS["k"])


def rate_setting(value: object) -> Optional[float]:
    """The ``bwlimit`` setting as bytes per second: None for no limit.

    :param value: None, a number of bytes per second, or a rate as
        :func:`parse_rate` reads it
    :raises InvalidInputError: for anything else
    """
    from .errors import InvalidInputError

    if isinstance(value, str):
        try:
            value = parse_rate(value)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or value < 0):
        raise InvalidInputError("bwlimit must be bytes per second or a rate such as "
                                "'10M', not %r" % (value,))
    return float(value) if value else None


class TokenBucket:
    """A bandwidth limit shared by every transfer of a pool: ``rate`` bytes a
    second on average, with bursts of up to one second's worth.

    :meth:`take` sleeps until the bytes fit. It is thread-safe: parallel
    transfers share the one limit, as they share the one link.

    :param rate: bytes per second (more than 0)
    :param clock: seconds, monotonic (``time.monotonic``)
    :param sleep: how to wait (``time.sleep``)
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate > 0:
            raise ValueError("a bandwidth limit must be more than 0 bytes/s, not %r" % rate)
        self.rate = float(rate)
        #: The most bytes that can pass at once after a pause.
        self.burst = max(self.rate, 64 * 1024.0)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Let ``nbytes`` pass, after sleeping as long as the limit wants.

        A chunk larger than the burst is let through once the bucket has
        been paid for it (the debt is carried), so any chunk size works.
        """
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            # Outside the lock: other threads add their own debt meanwhile and
            # wait their turn after this one.
            self._sleep(wait)


class Meter:
    """What the bytes of one host call are told to: a progress callback and a limit.

    :param progress: called with each chunk's byte count (may be None)
    :param bucket: the pool's :class:`TokenBucket` (may be None)
    """

    def __init__(self, progress: Optional[Progress] = None,
                 bucket: Optional[TokenBucket] = None) -> None:
        self.progress = progress
        self.bucket = bucket

    def __call__(self, nbytes: int) -> None:
        """Account for ``nbytes`` moved: wait for the limit, then report them.

        A negative count (boto3 takes back the bytes of a part it sends
        again) is reported, and never waited for.
        """
        if self.bucket is not None and nbytes > 0:
            self.bucket.take(nbytes)
        if self.progress is not None:
            self.progress(nbytes)


_local = threading.local()

#: What the caller of a library operation wants told of its progress; the
#: engine reads it when it starts a host call (see :func:`reporting`).
_reporting: contextvars.ContextVar[Optional[Advance]] = contextvars.ContextVar(
    "cloudmanager_progress", default=None)


@contextlib.contextmanager
def reporting(advance: Optional[Advance]) -> Iterator[None]:
    """Run a library operation whose host transfers report to ``advance``.

    The engine picks it up in each host call it starts (it copies this
    context to its worker threads), and puts a :class:`Meter` on the thread
    that moves the bytes. ``None`` leaves whatever is reported to already.
    """
    if advance is None:
        yield
        return
    token = _reporting.set(advance)
    try:
        yield
    finally:
        _reporting.reset(token)


def reported() -> Optional[Progress]:
    """The byte counter of the operation running in this context, or None."""
    advance = _reporting.get()
    if advance is None:
        return None
    return lambda nbytes: advance(nbytes, 0)


def files_done(nfiles: int = 1) -> None:
    """Tell the operation running in this context that ``nfiles`` more are done."""
    advance = _reporting.get()
    if advance is not None and nfiles:
        advance(0, nfiles)


def expect(total_bytes: Optional[int], total_files: Optional[int]) -> None:
    """Tell the operation's ``advance`` the totals to expect, once they are
    known, if it has an ``expect(total_bytes, total_files)`` method (a
    progress bar's ETA needs them)."""
    advance = _reporting.get()
    told = getattr(advance, "expect", None)
    if told is not None:
        told(total_bytes, total_files)


def bytes_only(progress: Optional[Progress]) -> Optional[Advance]:
    """An :data:`Advance` that passes the bytes to ``progress`` (files are not its business)."""
    if progress is None:
        return None
    return lambda nbytes, nfiles: progress(nbytes) if nbytes else None


@contextlib.contextmanager
def metering(meter: Optional[Meter]) -> Iterator[None]:
    """Run a block with ``meter`` on this thread: copies in it :func:`tick` it."""
    previous = getattr(_local, "meter", None)
    _local.meter = meter
    try:
        yield
    finally:
        _local.meter = previous


def current() -> Optional[Meter]:
    """The meter of this thread, or None."""
    return getattr(_local, "meter", None)


def tick(nbytes: int) -> None:
    """Report ``nbytes`` moved to this thread's meter, if it has one."""
    meter = getattr(_local, "meter", None)
    if meter is not None and nbytes:
        meter(nbytes)
