"""How ``cm`` prints: sizes, times, JSON, tables and progress bars.

Tables and bars are drawn with rich, imported only when one is drawn. Piped
output gets a wide console, so hashes are never cut; progress bars appear
only when stdout is a terminal.
"""

import contextlib
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


def plural(count, noun):
    """``plural(2, "file")`` -> ``'2 files'``."""
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


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


def emit_json(value):
    """Print ``value`` as indented JSON on stdout."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def display_path(path, cwd=None):
    """``path`` relative to the current directory if it is below it, else as it is."""
    relative = os.path.relpath(path, cwd or os.getcwd())
    return path if relative.startswith("..") else relative


def print_table(title, columns, rows):
    """A titled table on stdout, without borders."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    # Piped output gets a wide console, so hashes are never cut.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


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


@contextlib.contextmanager
def progress(session, description, total_bytes, total_files):
    """A bar of bytes and files done, with rate and ETA, when stdout is a terminal.

    Yields ``advance(nbytes, files=1)``, safe to call from several threads.
    """
    if not session.show_progress or total_files == 0:
        yield lambda nbytes, files=1: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(),
                   DownloadColumn(binary_units=True),
                   TextColumn("{task.fields[files_done]}/%d files" % total_files),
                   TransferSpeedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    with bar:
        task = bar.add_task(description, total=max(total_bytes, 1), files_done=0)
        done = [0]
        lock = threading.Lock()  # upload jobs report from their threads

        def advance(nbytes, files=1):
            with lock:
                done[0] += files
                bar.update(task, advance=nbytes, files_done=done[0])

        yield advance
