"""How ``cm`` prints: sizes, times, JSON, tables and progress bars.

Tables are drawn with rich, imported only when one is drawn; piped, a table
is as wide as its widest row, so no line wraps and no hash is cut. Progress
bars (:class:`Bar`) are one line on stderr, drawn only on a terminal and
erased before any output or log line, so that lines are never broken.
"""

import contextlib
import io
import json
import os
import sys
import threading
import time

import click


def human_size(n):
    """``1536`` -> ``'1.5 KiB'``: binary units, as ``parse_size`` reads them."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return "%d %s" % (n, unit) if unit == "B" else "%.1f %s" % (n, unit)
        n /= 1024.0


def human_time(timestamp):
    """A unix time as ``YYYY-MM-DD HH:MM:SS UTC``, or ``-``."""
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def plural(count, noun, nouns=None):
    """``plural(2, "file")`` -> ``'2 files'``; ``plural(1, "copy", "copies")`` -> ``'1 copy'``."""
    return "%d %s" % (count, noun if count == 1 else nouns or noun + "s")


def hash_line(file_hash, name):
    r"""``HASH  NAME`` as GNU ``sha256sum`` prints it: a name with a backslash,
    newline or carriage return gets them escaped (``\\``, ``\n``, ``\r``) and
    the line a leading backslash, so each file stays one line and
    ``sha256sum -c`` reads it back.

    >>> hash_line("ab", "x.txt"), hash_line("ab", "new\nline"), hash_line("ab", "c:\\d")
    ('ab  x.txt', '\\ab  new\\nline', '\\ab  c:\\\\d')
    """
    if "\\" in name or "\n" in name or "\r" in name:
        escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return "\\%s  %s" % (file_hash, escaped)
    return "%s  %s" % (file_hash, name)


def printable(name):
    r"""``name`` with what could forge a line or drive the terminal escaped: a
    backslash, newline and carriage return as :func:`hash_line` escapes them,
    any other control character as ``\xHH``. For names that come from other
    nodes (a tree's paths).

    >>> printable("a\nb"), printable("esc\x1b[2J"), printable("ok.txt")
    ('a\\nb', 'esc\\x1b[2J', 'ok.txt')
    """
    out = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return "".join(c.encode("unicode_escape").decode("ascii") if ord(c) < 32 or ord(c) == 127
                   else c for c in out)


def emit_json(value):
    """Print ``value`` as indented JSON on stdout."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def display_path(path, cwd=None):
    """``path`` relative to the current directory if it is below it, else as it is."""
    cwd = cwd or os.getcwd()
    # The common case without relpath's normalising (a tenth of a 10k-file
    # upload's wall time went there): a normalised path below cwd.
    if os.path.isabs(path) and os.path.normpath(path) == path:
        below = cwd.rstrip(os.sep) + os.sep
        if path.startswith(below):
            return path[len(below):]
        if path != cwd:
            return path  # not below it: relpath would begin with ".."
    relative = os.path.relpath(path, cwd)
    return path if relative.startswith("..") else relative


def print_table(title, columns, rows):
    """A titled table on stdout, without borders."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    cells = [[str(cell) for cell in row] for row in rows]
    for row in cells:
        table.add_row(*row)
    if sys.stdout.isatty():  # the terminal's width: long cells fold within their column
        Console().print(table)
        return
    # Piped: as wide as the widest row, so no line is wrapped and no hash cut.
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    buffer = io.StringIO()
    Console(width=max(sum(widths) + 2 * len(widths), len(title)) + 1, file=buffer,
            color_system=None).print(table)
    for line in buffer.getvalue().splitlines():
        click.echo(line.rstrip())


def print_hosts(hosts, specs=None):
    """The hosts table of ``cm status`` and ``cm hosts``.

    :param hosts: :meth:`~cloudmanager.CloudManager.host_status`
    :param specs: ``{name: spec}`` for a spec column
    """
    rows = []
    for name, h in hosts.items():
        state = h["state"] if not h["retry_after"] else "cooling until %s" % human_time(
            h["retry_after"])
        rows.append([name, h["kind"], state, h["successes"], h["failures"],
                     "-" if h["latency_ms"] is None else "%.0f ms" % h["latency_ms"],
                     h["last_error"] or "-"] + ([specs.get(name, "-")] if specs else []))
    print_table("hosts", ["host", "kind", "state", "ok", "failed", "latency", "last error"]
                + (["spec"] if specs else []), rows)


def print_copies(uploads):
    """One line per copy: host, state, URL."""
    for u in uploads:
        state = "bad" if u["error"] and u["url"] else "failed" if u["error"] else \
            "ok" if u["verified"] else "imported"
        click.echo("  %-16s %-8s %s" % (u["host_name"], state, u["url"] or "-"))


def print_summary(session, what, summary, as_json):
    """A summary dict as ``what: 3 checked, 2 good`` (or JSON); nothing with ``-q``."""
    if as_json:
        emit_json(summary)
    elif not session.quiet:
        click.echo("%s: %s" % (what, ", ".join("%s %s" % (v, k) for k, v in summary.items())))


class Bar:
    """A one-line progress bar on stderr: bytes and files done, rate and ETA.

    Drawn by a thread of its own ten times a second, each frame cut to the
    terminal's width so that it never wraps, and cleared (carriage return,
    erase line) before anything else is written: :meth:`echo` for output
    lines, :func:`bar_cleared` for log messages. So a ``HASH  PATH`` line is
    always whole on the screen, and :meth:`close` leaves no frame behind.

    Calling it, ``bar(nbytes, files=1)``, counts bytes and files done; it is
    safe from any thread. ``total_bytes`` or ``total_files`` may be None
    (unknown): the frame then shows what is done, and no ETA.
    """

    #: Seconds between frames.
    INTERVAL = 0.1
    #: Seconds of history the rate is measured over.
    WINDOW = 5.0

    def __init__(self, description, total_bytes, total_files, stream=None):
        self.description = description
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.stream = stream or sys.stderr
        self.done_bytes = 0
        self.done_files = 0
        self.started = time.monotonic()
        self.samples = [(self.started, 0)]
        self.lock = threading.RLock()
        self.drawn = False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="cm-progress", daemon=True)

    def start(self):
        """Draw the first frame now, then one every :attr:`INTERVAL`; returns the bar."""
        with self.lock:
            self.draw()
        self.thread.start()
        return self

    def __call__(self, nbytes, files=1):
        """Count ``nbytes`` and ``files`` more done."""
        with self.lock:
            self.done_bytes += nbytes
            self.done_files += files

    def expect(self, total_bytes, total_files):
        """Set the totals, once the library knows them (``cm verify``)."""
        with self.lock:
            self.total_bytes, self.total_files = total_bytes, total_files

    def echo(self, text, err=False):
        """Print ``text`` as a line of its own (on stdout, or stderr with
        ``err``); the bar comes back at the next frame."""
        with self.lock:
            self.clear()
            click.echo(text, err=err)

    def clear(self):
        """Erase the frame on the screen, if one is drawn."""
        with self.lock:
            if self.drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self.drawn = False

    def close(self):
        """Stop drawing and erase the last frame."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()
        self.clear()

    def run(self):
        """The drawing thread: a frame every :attr:`INTERVAL` seconds until closed."""
        while not self.stopping.wait(self.INTERVAL):
            with self.lock:
                try:
                    self.draw()
                except (OSError, ValueError):  # the terminal went away: stop drawing
                    self.drawn = False
                    return

    def draw(self):
        """Write the current frame over the last one."""
        line = self.frame(_width(self.stream) - 1)
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def rate(self):
        """Bytes per second over the last :attr:`WINDOW` seconds (None at first)."""
        now = time.monotonic()
        self.samples.append((now, self.done_bytes))
        while len(self.samples) > 2 and now - self.samples[1][0] > self.WINDOW:
            self.samples.pop(0)
        then, before = self.samples[0]
        if now - then < 0.5:
            return None
        return (self.done_bytes - before) / (now - then)

    def frame(self, width):
        """The text of one frame, at most ``width`` characters."""
        rate = self.rate()
        parts = [self.description]
        if self.total_bytes:
            share = min(1.0, self.done_bytes / self.total_bytes)
            cells = 20
            filled = int(share * cells)
            parts.append("[%s%s] %3d%%" % ("#" * filled, "-" * (cells - filled), share * 100))
            parts.append("%s/%s" % (human_size(min(self.done_bytes, self.total_bytes)),
                                    human_size(self.total_bytes)))
        else:
            parts.append(human_size(self.done_bytes))
        if self.total_files is not None:
            parts.append("%d/%s" % (min(self.done_files, self.total_files),
                                    plural(self.total_files, "file")))
        elif self.done_files:
            parts.append(plural(self.done_files, "file"))
        if rate is not None:
            parts.append("%s/s" % human_size(rate))
            left = (self.total_bytes or 0) - self.done_bytes
            if self.total_bytes and rate > 0 and left > 0:
                parts.append("ETA %s" % _clock(left / rate))
        return "  ".join(parts)[:max(0, width)]


class NoBar:
    """What :func:`progress` yields when no bar is drawn: counts nothing, prints plainly."""

    def __call__(self, nbytes, files=1):
        """Nothing to count."""

    @staticmethod
    def echo(text, err=False):
        """``click.echo``."""
        click.echo(text, err=err)

    def clear(self):
        """Nothing to erase."""


#: The bar on the screen now, if any (log messages clear it first).
_ACTIVE: "list[Bar]" = []


def _width(stream):
    """The terminal's width: $COLUMNS, else the terminal's own, else 80 (a
    terminal that says 0, as a new pty does)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


def _clock(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)
    return "%d:%02d" % (seconds // 60, seconds % 60)


@contextlib.contextmanager
def bar_cleared():
    """Write something to the terminal with no frame of a bar in the way."""
    bar = _ACTIVE[-1] if _ACTIVE else None
    if bar is None:
        yield
        return
    with bar.lock:
        bar.clear()
        yield


@contextlib.contextmanager
def progress(session, description, total_bytes, total_files):
    """A :class:`Bar` when stdout is a terminal (and not ``-q``), else a :class:`NoBar`.

    Yields ``bar``: ``bar(nbytes, files=1)`` counts progress, safe to call
    from several threads; ``bar.echo(line)`` prints an output line. The last
    frame is erased before this returns.
    """
    if not session.show_progress or total_files == 0:
        yield NoBar()
        return
    bar = Bar(description, total_bytes, total_files).start()
    _ACTIVE.append(bar)
    try:
        yield bar
    finally:
        _ACTIVE.remove(bar)
        bar.close()
