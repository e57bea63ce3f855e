"""The ``cm`` command: a pool of files from the shell.

Every subcommand opens the pool its configuration describes (see
:func:`cloudmanager.config.find_config`), does one job through the
:class:`~cloudmanager.CloudManager` facade, and exits 0 on success, 1 when an
operation failed and 2 on a usage error. Errors are one line on stderr; ``-v``
adds the traceback. Read commands take ``--json`` for scripts. Progress bars
appear only when stdout is a terminal.
"""

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import traceback

import click

from . import __version__
from .config import (
    CONFIG_ENV,
    CONFIG_NAME,
    default_capacity,
    embedded_config,
    find_config,
    load_config,
    parse_config,
    parse_size,
    user_dirs,
)
from .errors import CloudManagerError, InvalidInputError
from .sources import SourceIndex, walk

log = logging.getLogger("cloudmanager")

#: Concurrent uploads of ``cm upload`` unless ``--jobs`` says otherwise.
DEFAULT_JOBS = 4
#: ``cm upload`` hands files to ``upload_many`` in batches of at most this
#: many files and bytes: large enough to share transactions, small enough
#: that the progress bar moves and Ctrl-C stops soon.
UPLOAD_BATCH_FILES = 500
UPLOAD_BATCH_BYTES = 64 * 2**20
#: Files of at least this size are uploaded ``--jobs`` at a time, each on
#: its own; smaller ones in batches.
LARGE_FILE = 8 * 2**20
#: ``cm upload`` stores remembered hashes after this many files, so an
#: interrupted run keeps what it did.
REMEMBER_BATCH = 2000
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# -- errors and logging ---------------------------------------------------------

class OperationFailed(click.ClickException):
    """An operation did not succeed: exit status 1, one line on stderr."""

    exit_code = 1


def fail_quietly():
    """Exit 1 without another line: the library has logged the reason."""
    raise click.exceptions.Exit(1)


class _Formatter(logging.Formatter):
    def format(self, record):
        return "cm: %s: %s" % (record.levelname.lower(), super().format(record))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now, so progress bars (which
    redirect it while they draw) and test runners both see the messages."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


_handler = None


def _configure_logging(verbosity):
    global _handler
    logger = logging.getLogger("cloudmanager")
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = _StderrHandler()
    _handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(max(logging.DEBUG, min(logging.CRITICAL, logging.WARNING - 10 * verbosity)))
    logger.propagate = False


class _Group(click.Group):
    """The ``cm`` group: one-line errors, exit 1 for failures and 2 for usage."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise
        except (CloudManagerError, OSError) as exc:
            self._traceback(ctx)
            raise OperationFailed(str(exc)) from exc
        except Exception as exc:  # a bug: say so in one line unless -v
            self._traceback(ctx)
            raise OperationFailed("internal error: %s: %s (run with -v for the traceback)"
                                  % (type(exc).__name__, exc)) from exc

    @staticmethod
    def _traceback(ctx):
        session = ctx.find_object(Session)
        if session is not None and session.verbosity > 0:
            traceback.print_exc(file=sys.stderr)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        logger = logging.getLogger("cloudmanager")
        saved = logger.level, logger.propagate  # restored for callers in this process
        try:
            self._main(args, prog_name, complete_var, **extra)
        finally:
            logger.removeHandler(_handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]

    def _main(self, args, prog_name, complete_var, **extra):
        try:
            # Without standalone mode, click returns an Exit's code instead of exiting.
            status = super().main(args, prog_name, complete_var, standalone_mode=False,
                                  **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = ""
            if exc.ctx is not None:
                hint = " (see '%s --help')" % exc.ctx.command_path
            click.echo("%s: error: %s%s" % (prog_name or "cm", exc.format_message(), hint),
                       err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo("cm: error: %s" % exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("cm: aborted", err=True)
            sys.exit(1)
        except BrokenPipeError:  # `cm ls | head`: the reader has what it wanted
            # Python would complain again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        sys.exit(status if isinstance(status, int) else 0)


# -- the session: configuration and the pool it opens ----------------------------

class Session:
    """What the global options decided; opens the pool on first use."""

    def __init__(self, config_option, capacity, verbosity):
        self.config_option = config_option
        self.capacity = capacity
        self.verbosity = verbosity
        self.config_path = None
        self.config_source = None
        self._pool = None

    def config(self):
        """The :class:`~cloudmanager.config.Config` in use (a file, or the defaults)."""
        path, source = find_config(self.config_option)
        self.config_path, self.config_source = path, source
        config = load_config(path) if path else embedded_config()
        pool = dict(config.pool)
        if self.capacity is not None:
            pool["capacity"] = self.capacity
        elif "capacity" not in pool:
            pool["capacity"] = default_capacity(pool["storage"],
                                                _cached_bytes(pool["database"]))
        return config._replace(pool=pool)

    def pool(self):
        """The open :class:`~cloudmanager.CloudManager`."""
        if self._pool is None:
            from .manager import CloudManager

            config = self.config()
            log.debug("opening the pool of %s: database %s, cache %s (%d bytes)",
                      self.config_path or "the embedded defaults", config.pool["database"],
                      config.pool["storage"], config.pool["capacity"])
            self._pool = CloudManager(config=config)
        return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def quiet(self):
        return self.verbosity < 0

    @property
    def show_progress(self):
        return not self.quiet and sys.stdout.isatty()


def _cached_bytes(database):
    """What an existing pool's cache holds (0 for a new pool)."""
    if not os.path.exists(database):
        return 0
    from .db import FileDatabase

    db = FileDatabase(database)
    try:
        return db.cache_index.counter("cached_bytes")
    finally:
        db.close()


pass_session = click.make_pass_decorator(Session)


# -- output helpers ----------------------------------------------------------------

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


def _plural(count, noun):
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def emit_json(value):
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _console():
    from rich.console import Console

    # Piped output gets a wide console, so hashes are never cut.
    return Console(width=None if sys.stdout.isatty() else 200)


def _table(title, columns, rows):
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    _console().print(table)


def _display_path(path, cwd=None):
    relative = os.path.relpath(path, cwd or os.getcwd())
    return path if relative.startswith("..") else relative


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


def _resolve(cm, text):
    """A full hash from a hash or a unique prefix of one.

    A malformed or ambiguous one is a usage error (exit 2); one that matches
    no file is a failed lookup (exit 1).
    """
    try:
        file_hash = cm.expand_hash(text)
    except InvalidInputError as exc:
        raise click.BadParameter(str(exc), param_hint="HASH") from None
    if file_hash is None:
        raise OperationFailed("no file in the pool has a hash starting with %s" % text.lower())
    return file_hash


def parse_duration(text):
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise click.BadParameter("not a duration: %r (try 90s, 15m, 12h, 7d)" % text)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            size = parse_size(value)
        except InvalidInputError as exc:
            self.fail(str(exc), param, ctx)
        if size <= 0:
            self.fail("must be more than 0 bytes", param, ctx)
        return size


SIZE = _Size()
JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON, for scripts.")


# -- the command group ------------------------------------------------------------

@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cm")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="The config file to use. Otherwise $%s, then ./%s, then %s in the "
                   "user config dir, then the embedded defaults." % (CONFIG_ENV, CONFIG_NAME,
                                                                     CONFIG_NAME))
@click.option("--capacity", type=SIZE, metavar="SIZE",
              help="The cache size, e.g. '20 GiB' (overrides the config file). The "
                   "default is a tenth of the free disk space.")
@click.option("-v", "--verbose", count=True, help="More messages (-vv for debugging); "
              "tracebacks on errors.")
@click.option("-q", "--quiet", count=True, help="Fewer messages (only errors), no progress.")
@click.pass_context
def cli(ctx, config_path, capacity, verbose, quiet):
    """Keep a pool of files on several hosts, with the hot ones in a local cache.

    Files are addressed by their SHA-256 (or a unique prefix of it, 4 or more
    hex digits). With no config file, the pool is a database and a cache in
    your user data and cache dirs, with one folder host there: no account and
    no server needed.

    \b
    Everyday use:
      cm upload photos/            add files (directories recursively)
      cm ls                        what the pool holds
      cm download HASH [DEST]      get a verified copy back
      cm status                    usage, queue, hosts, transfers
    \b
    Setting up hosts:
      cm init --host nas=dir:/mnt/nas/pool --host b2=s3://bucket/pool
      cm hosts                     the configured hosts and their health
    \b
    Keeping it safe:
      cm sync                      upload queued files, top up short ones
      cm verify                    check that the remote copies are intact
      cm fsck                      check the cache against the database
    \b
    Sharing with another node:
      cm dump pool.json            every record, as JSON
      cm load pool.json            merge another node's records

    Exit status: 0 on success, 1 when an operation failed, 2 on a usage error.
    """
    _configure_logging(verbose - quiet)
    session = Session(config_path, capacity, verbose - quiet)
    ctx.obj = session
    ctx.call_on_close(session.close)


def main(argv=None):
    """Entry point of the ``cm`` console script."""
    cli.main(args=argv, prog_name="cm")


# -- init ---------------------------------------------------------------------------

def _toml_string(value):
    """A TOML basic string. JSON's escapes are TOML's, but TOML wants DEL
    escaped and takes characters beyond the BMP as they are."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from the command line
        raise click.BadParameter("%r is not valid UTF-8" % value) from None
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(name):
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_string(name)


def _host_option(ctx, param, values):
    hosts = []
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name or ":" not in spec:
            raise click.BadParameter("%r is not NAME=SPEC (e.g. nas=dir:/mnt/nas/pool)"
                                     % value)
        hosts.append((name, spec))
    return hosts


@cli.command()
@click.option("--user", "for_user", is_flag=True,
              help="Write the user config (%s in the user config dir) instead of "
                   "./%s." % (CONFIG_NAME, CONFIG_NAME))
@click.option("--host", "hosts", multiple=True, callback=_host_option, metavar="NAME=SPEC",
              help="A host, e.g. nas=dir:/mnt/nas/pool, b2=s3://bucket/pool, "
                   "dav=fsspec:webdav+https://dav.example.com/pool, "
                   "mf=plowshare:mediafire. Repeat for more. Default: a folder in the "
                   "user data dir.")
@click.option("--database", metavar="PATH", help="The SQLite file (relative to the config "
              "file). Default: .cloudmanager/pool.sqlite3, or the user data dir with --user.")
@click.option("--storage", metavar="DIR", help="The cache directory (relative to the config "
              "file). Default: .cloudmanager/cache, or the user cache dir with --user.")
@click.option("--capacity", type=SIZE, metavar="SIZE",
              help="The cache size, e.g. '20 GiB'. Default: a tenth of the free space.")
@click.option("--redundancy", type=click.IntRange(min=1),
              help="How many hosts keep each file. Default: every host, up to 3.")
@click.option("--force", is_flag=True, help="Replace an existing config file.")
@pass_session
def init(session, for_user, hosts, database, storage, capacity, redundancy, force):
    """Write a cloudmanager.toml describing a pool and its hosts.

    Without --user, the file goes in the current directory and the pool's
    database and cache beside it, in .cloudmanager/ (like a git-annex or DVC
    repository); cm finds it when run from this directory. With --user it is
    the pool cm uses anywhere without a local file. Edit the file afterwards
    for host options, weights and more (see the README's Configuration).

    \b
    Examples:
      cm init --host nas=dir:/mnt/nas/pool --host b2=s3://my-bucket/pool
      cm init --user --capacity '50 GiB' --host usb=dir:/media/usb/pool
    """
    dirs = user_dirs()
    if for_user:
        path = os.path.join(dirs.config, CONFIG_NAME)
        database = database or os.path.join(dirs.data, "pool.sqlite3")
        storage = storage or os.path.join(dirs.cache, "pool")
    else:
        path = os.path.abspath(CONFIG_NAME)
        database = database or os.path.join(".cloudmanager", "pool.sqlite3")
        storage = storage or os.path.join(".cloudmanager", "cache")
    if os.path.exists(path) and not force:
        raise OperationFailed("%s exists; pass --force to replace it" % path)
    if not hosts:
        hosts = [("local", "dir:" + os.path.join(dirs.data, "hosts", "local"))]
    base = os.path.dirname(path)
    if capacity is None:
        capacity = default_capacity(os.path.join(base, storage))
    capacity_text = next(("%d %s" % (capacity // unit, name)
                          for unit, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"))
                          if capacity % unit == 0), str(capacity))
    lines = ["# A cloudmanager pool, written by `cm init`. Relative paths start at this",
             "# file's directory; sizes take units (MiB, GiB, TB...).", "",
             "[pool]",
             "database = %s" % _toml_string(database),
             "storage = %s" % _toml_string(storage),
             "capacity = %s" % (capacity_text if capacity_text.isdigit()
                                else _toml_string(capacity_text)),
             "redundancy = %d" % (redundancy or min(3, len(hosts)))]
    for name, spec in hosts:
        lines += ["", "[hosts.%s]" % _toml_key(name), "spec = %s" % _toml_string(spec)]
    text = "\n".join(lines) + "\n"
    _check_config_text(text, base)
    from .fsutil import atomic_write

    os.makedirs(base, 0o700, exist_ok=True)
    with atomic_write(path) as f:
        os.fchmod(f.fileno(), 0o600)  # host options may hold secrets
        f.write(text.encode("utf-8"))
    if not session.quiet:
        click.echo("wrote %s (%s)" % (path, _plural(len(hosts), "host")))


def _check_config_text(text, base):
    """Refuse to write a config that would not load, or whose hosts cannot be built."""
    from .config import tomllib

    config = parse_config(tomllib.loads(text), base_dir=base)
    for host in config.hosts:
        host.build()


# -- adding files -----------------------------------------------------------------------

@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=DEFAULT_JOBS,
              show_default=True, help="Large files (8 MiB and more) uploaded at the same "
              "time, beside one stream of batches of small files.")
@click.option("--defer", is_flag=True,
              help="Only cache and queue the files; `cm sync` uploads them later.")
@click.option("--rehash", is_flag=True,
              help="Read every file, even those unchanged since they were last uploaded.")
@click.option("-L", "--follow-symlinks", is_flag=True,
              help="Upload what symbolic links point to (they are skipped otherwise).")
@JSON_OPTION
@pass_session
def upload(session, paths, jobs, defer, rehash, follow_symlinks, as_json):
    """Add files to the pool; directories are walked recursively.

    Each file is hashed while it is copied into the cache, then uploaded to
    the configured hosts: small files in batches, each sent to the hosts
    before the next is read; large ones several at a time (--jobs). Prints
    "SHA256  PATH" per file as it lands, like sha256sum (skipped files
    last). Running it again skips files
    already in the pool whose size and times have not changed, without
    reading them.

    \b
    Examples:
      cm upload notes.txt
      cm upload --jobs 8 ~/photos
      h=$(cm upload notes.txt | cut -c1-64)
    """
    cm = session.pool()
    problems = []
    files = list(walk(paths, follow_symlinks=follow_symlinks, problems=problems))
    index = SourceIndex(cm.db)
    known = {} if rehash else index.known(files)
    results = {}  # path -> (hash or None, "uploaded" | "skipped" | "failed")
    todo = []
    for f in files:
        file_hash = known.get(f.path)
        if file_hash:
            results[f.path] = (file_hash, "skipped")
        else:
            todo.append(f)
    started = time.monotonic()
    remember = []
    cwd = os.getcwd()
    with progress(session, "uploading", sum(f.size for f in todo), len(todo)) as advance:
        for batch in _upload_concurrently(cm, todo, jobs, defer, advance):
            lines = []
            for f, file_hash, rememberable in batch:
                results[f.path] = (file_hash, "uploaded" if file_hash else "failed")
                if file_hash:
                    lines.append("%s  %s" % (file_hash, _display_path(f.path, cwd)))
                    if rememberable:
                        remember.append((f, file_hash))
            if lines and not as_json:  # as they land, so an interrupted run shows them
                click.echo("\n".join(lines))
            if len(remember) >= REMEMBER_BATCH:
                index.remember(remember)
                remember = []
    index.remember(remember)
    _report_upload(session, files, results, todo, time.monotonic() - started, as_json,
                   problems)


def _upload_concurrently(cm, files, jobs, defer, advance):
    """Yield a list of ``(SourceFile, hash or False, rememberable)`` per batch,
    as batches finish.

    ``advance(nbytes, files)`` is told of the bytes read and the files done,
    from the worker threads. ``jobs`` threads each hand a batch of files to
    :meth:`~cloudmanager.CloudManager.upload_many`, which records a batch in
    one transaction and uploads it to the hosts concurrently.
    """
    def one(batch):
        started = time.time_ns()
        reported = [0]  # bytes the library reported while it read large files

        def read(nbytes):
            reported[0] += nbytes
            advance(nbytes, files=0)

        hashes = cm.upload_many([f.path for f in batch], defer=defer, progress=read)
        # The rest: small files read in one go, files already cached, failures.
        advance(max(0, sum(f.size for f in batch) - reported[0]), files=len(batch))
        done = []
        for f, file_hash in zip(batch, hashes):
            rememberable = False
            if file_hash:
                try:
                    rememberable = SourceIndex.rememberable(f, os.stat(f.path), started)
                except OSError:
                    pass
            done.append((f, file_hash, rememberable))
        return done

    # Small files go in batches down one stream: upload_many already sends
    # each batch to its hosts at once, and several streams would only queue
    # for the GIL and the database's write lock. Large files are where
    # --jobs pays: each is read, hashed and sent on its own.
    small = [f for f in files if f.size < LARGE_FILE]
    large = [[f] for f in files if f.size >= LARGE_FILE]
    streams = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="cm-upload-small")
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=jobs,
                                                     thread_name_prefix="cm-upload")
    try:
        futures = [streams.submit(one, batch)
                   for batch in _batches(small, UPLOAD_BATCH_FILES, UPLOAD_BATCH_BYTES)]
        futures += [executor.submit(one, batch) for batch in large]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()
    finally:
        # On Ctrl-C, batches not started yet are not started.
        for pool in (streams, executor):
            pool.shutdown(wait=True, cancel_futures=True)


def _batches(files, most_files, most_bytes):
    batch, size = [], 0
    for f in files:
        if batch and (len(batch) >= most_files or size + f.size > most_bytes):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += f.size
    if batch:
        yield batch


def _report_upload(session, files, results, todo, elapsed, as_json, problems):
    counts = {"uploaded": 0, "skipped": 0, "failed": len(problems)}
    listing = []
    for f in files:
        file_hash, state = results[f.path]
        counts[state] += 1
        listing.append({"path": f.path, "hash": file_hash or None, "state": state})
    listing += [{"path": path, "hash": None, "state": "failed", "error": reason}
                for path, reason in problems]
    if as_json:
        emit_json({"files": listing, **counts})
    else:
        for item in listing:
            if item["state"] == "skipped":
                click.echo("%s  %s" % (item["hash"], _display_path(item["path"])))
    if not session.quiet and not as_json:
        nbytes = sum(f.size for f in todo if results[f.path][1] == "uploaded")
        click.echo("uploaded %d, skipped %d already in the pool, failed %d (%s in %.1f s)"
                   % (counts["uploaded"], counts["skipped"], counts["failed"],
                      human_size(nbytes), elapsed), err=True)
    if counts["failed"]:
        fail_quietly()  # each failure was logged, and the summary counts them


# -- getting files back --------------------------------------------------------------------

@cli.command()
@click.argument("file_hash", metavar="HASH")
@click.argument("dest", required=False, type=click.Path())
@pass_session
def download(session, file_hash, dest):
    """Write a verified copy of a file to DEST and print its path.

    DEST is a file path, or a directory where the file gets its recorded
    name; the default is the current directory. The copy comes from the
    cache, or from the healthiest host (it is then cached if it fits).
    """
    cm = session.pool()
    file_hash = _resolve(cm, file_hash)
    dest = dest or os.curdir
    if os.path.lexists(dest) and not os.path.isdir(dest) and not os.path.isfile(dest) \
            or os.path.islink(dest) and not os.path.isdir(dest):
        # The copy is renamed into place: it would replace a device, FIFO or link.
        raise OperationFailed("%s exists and is not a regular file or a directory" % dest)
    size = cm.status(file_hash)["size"]
    with progress(session, "downloading", size, 1) as advance:
        path = cm.download(file_hash, dest)
        advance(size)
    if not path:
        fail_quietly()
    click.echo(path)


@cli.command()
@click.argument("hashes", nargs=-1, required=True, metavar="HASH...")
@pass_session
def warm(session, hashes):
    """Bring files into the local cache; print "SHA256  CACHED-PATH" for each.

    Files already cached only move to the front of the LRU order.
    """
    cm = session.pool()
    wanted = [_resolve(cm, h) for h in hashes]
    sizes = {h: cm.status(h)["size"] for h in wanted}
    failed = 0
    with progress(session, "warming", sum(sizes.values()), len(wanted)) as advance:
        for file_hash in wanted:
            path = cm.warm_up(file_hash)
            advance(sizes[file_hash])
            if path:
                click.echo("%s  %s" % (file_hash, path))
            else:
                failed += 1
    if failed:
        fail_quietly()  # warm_up logged why, file by file


# -- looking -----------------------------------------------------------------------------

@cli.command("ls")
@click.option("--cached", "only_cached", is_flag=True, help="Only files in the local cache.")
@click.option("--short", "only_short", is_flag=True,
              help="Only files on fewer hosts than the redundancy target.")
@JSON_OPTION
@pass_session
def ls(session, only_cached, only_short, as_json):
    """List the pool's files: hash, size, cached, copies/target, name.

    "cached" is "pinned" for a file kept in the cache until a host holds it
    (or pinned by hand).
    """
    cm = session.pool()
    rows = (f for f in cm.files()
            if (not only_cached or f["cached"]) and (not only_short or f["copies"] < cm.redundancy))
    if as_json:
        emit_json([dict(f, target=cm.redundancy) for f in rows])
        return
    for f in rows:
        state = ("pinned" if f["pinned"] or not f["verified"] else "cached") if f["cached"] \
            else "-"
        click.echo("%s  %10s  %-6s  %d/%d  %s" % (f["hash"], human_size(f["size"]), state,
                                                 f["copies"], cm.redundancy, f["filename"]))


@cli.command()
@click.argument("file_hash", metavar="HASH")
@JSON_OPTION
@pass_session
def info(session, file_hash, as_json):
    """Everything the pool knows about one file, with each copy's state."""
    cm = session.pool()
    status = cm.status(_resolve(cm, file_hash))
    if as_json:
        emit_json(status)
        return
    click.echo("hash      %s" % status["hash"])
    click.echo("name      %s" % (status["filename"] or "-"))
    click.echo("size      %s (%d bytes)" % (human_size(status["size"]), status["size"]))
    click.echo("added     %s" % human_time(status["created"]))
    click.echo("cached    %s%s" % ("yes" if status["cached"] else "no",
                                   ", pinned" if status["pinned"] else ""))
    click.echo("copies    %d of %d wanted (%d uploaded or checked by this node)"
               % (status["copies"], status["target"], status["verified"]))
    _print_copies(status["uploads"])


def _print_copies(uploads):
    for u in uploads:
        state = "bad" if u["error"] and u["url"] else "failed" if u["error"] else \
            "ok" if u["verified"] else "imported"
        click.echo("  %-16s %-8s %s" % (u["host_name"], state, u["url"] or "-"))


@cli.command()
@click.argument("file_hash", metavar="HASH")
@JSON_OPTION
@pass_session
def whereis(session, file_hash, as_json):
    """Which hosts hold a file, and at which URLs (like git annex whereis)."""
    cm = session.pool()
    status = cm.status(_resolve(cm, file_hash))
    copies = [u for u in status["uploads"] if u["url"]]
    if as_json:
        emit_json({"hash": status["hash"], "cached": status["cached"], "copies": copies})
        return
    click.echo("%s (%d cop%s%s)" % (status["filename"] or status["hash"], status["copies"],
                                    "y" if status["copies"] == 1 else "ies",
                                    ", cached here" if status["cached"] else ""))
    _print_copies(copies)


@cli.command()
@JSON_OPTION
@pass_session
def status(session, as_json):
    """The pool at a glance: config, usage, queue, hosts, transfers per month."""
    cm = session.pool()
    stats = cm.stats()
    where = {"config": session.config_path, "source": session.config_source,
             "database": cm.db.path, "storage": cm.cache.root}
    if as_json:
        emit_json(dict(where, **stats))
        return
    click.echo("config    %s" % (("%s (from %s)" % (session.config_path, session.config_source))
                                 if session.config_path else session.config_source))
    click.echo("database  %s" % cm.db.path)
    click.echo("cache     %s: %s of %s used (%.0f%%), %s"
               % (cm.cache.root, human_size(stats["cached_bytes"]), human_size(stats["capacity"]),
                  100 * stats["usage_ratio"], _plural(stats["cached_files"], "file")))
    click.echo("files     %d in the pool, %d queued for upload, %d below the target of %d "
               "copies" % (stats["files"], stats["queued"], stats["below_target"],
                           stats["redundancy"]))
    click.echo("cache use %d hits, %d misses" % (stats["hits"], stats["misses"]))
    _hosts_table(stats["hosts"])
    months = sorted(stats["transfers"].items(), reverse=True)[:12]
    if months:
        _table("transfers", ["month", "uploaded", "downloaded"],
               [(m, human_size(t["uploaded"]), human_size(t["downloaded"])) for m, t in months])


def _hosts_table(hosts, specs=None):
    rows = []
    for name, h in hosts.items():
        state = h["state"] if not h["retry_after"] else "cooling until %s" % human_time(
            h["retry_after"])
        rows.append([name, h["kind"], state, h["successes"], h["failures"],
                     "-" if h["latency_ms"] is None else "%.0f ms" % h["latency_ms"],
                     h["last_error"] or "-"] + ([specs.get(name, "-")] if specs else []))
    _table("hosts", ["host", "kind", "state", "ok", "failed", "latency", "last error"]
           + (["spec"] if specs else []), rows)


@cli.command()
@JSON_OPTION
@pass_session
def hosts(session, as_json):
    """The configured hosts: kind, health, circuit breaker, and spec."""
    cm = session.pool()
    status = cm.host_status()
    config = cm.config
    described = {h.name: h.describe() for h in config.hosts} if config else {}
    if as_json:
        emit_json({name: dict(row, config=described.get(name)) for name, row in status.items()})
        return
    _hosts_table(status, {name: d["spec"] for name, d in described.items()})
    disabled = [h.name for h in config.hosts if not h.enabled] if config else []
    if disabled:
        click.echo("disabled: %s" % ", ".join(disabled))


# -- keeping it safe ------------------------------------------------------------------------

@cli.command()
@JSON_OPTION
@pass_session
def sync(session, as_json):
    """Upload queued files and top up files below the redundancy target.

    Exits 1 if some files are still short of copies afterwards.
    """
    cm = session.pool()
    summary = cm.sync()
    _print_summary(session, "sync", summary, as_json)
    if summary["short"]:
        raise OperationFailed("%d files are still below the target of %d copies (see cm status)"
                              % (summary["short"], cm.redundancy))


def _print_summary(session, what, summary, as_json):
    if as_json:
        emit_json(summary)
    elif not session.quiet:
        click.echo("%s: %s" % (what, ", ".join("%s %s" % (v, k) for k, v in summary.items())))


@cli.command()
@click.argument("hashes", nargs=-1, metavar="[HASH...]")
@click.option("--host", "host_names", multiple=True, metavar="NAME",
              help="Only copies on this host (repeat for more).")
@click.option("--older-than", type=parse_duration, metavar="AGE",
              help="Only copies not checked for this long: 90s, 15m, 12h, 7d, 2w.")
@click.option("--limit", type=click.IntRange(min=1), help="Check at most this many copies.")
@click.option("--deep", is_flag=True,
              help="Download and hash every copy, even where the host can answer cheaply.")
@JSON_OPTION
@pass_session
def verify(session, hashes, host_names, older_than, limit, deep, as_json):
    """Check that the remote copies are still there and intact.

    Copies checked longest ago go first, so `cm verify --limit 1000` run
    daily walks a large pool a slice at a time. Missing and bad copies are
    marked; the next `cm sync` replaces them. Exits 1 if any copy was bad or
    missing, or a host failed.
    """
    cm = session.pool()
    wanted = [_resolve(cm, h) for h in hashes] or None
    summary = cm.verify(wanted, list(host_names) or None, older_than, limit, deep)
    _print_summary(session, "verify", summary, as_json)
    problems = summary["bad"] + summary["missing"] + summary["error"]
    if problems:
        raise OperationFailed("%d bad, %d missing, %d not checkable now: run `cm sync` to "
                              "replace lost copies" % (summary["bad"], summary["missing"],
                                                       summary["error"]))


@cli.command()
@click.option("--repair", is_flag=True,
              help="Mend what can be mended: drop damaged and stray files, recount the "
                   "usage, queue unprotected files, fetch pinned files back.")
@click.option("--deep", is_flag=True, help="Also hash every cached file.")
@JSON_OPTION
@pass_session
def fsck(session, repair, deep, as_json):
    """Check the cache directory against the database (like git annex fsck).

    Reports missing and stray files, size (and with --deep, hash)
    mismatches, drift in the usage total, pins with no file, cached files no
    host holds, and files nothing holds any more. It never follows a
    symbolic link. Exits 1 if a problem remains after --repair (or was found
    without it).
    """
    cm = session.pool()
    report = cm.check(repair=repair, deep=deep)
    if as_json:
        emit_json(report)
    else:
        for key, value in report.items():
            if key in _FSCK_META or not value:
                continue
            shown = value if isinstance(value, int) else "%d %s" % (
                len(value), " ".join(str(v) for v in list(value)[:3])
                + (" ..." if len(value) > 3 else ""))
            click.echo("%-20s %s" % (key.replace("_", " "), shown))
        if report["repaired"]:
            click.echo("repaired  %s" % ", ".join("%s %s" % (n, k) for k, n in
                                                  report["repaired"].items() if n))
        if not session.quiet:
            verdict = ("clean" if report["clean"] else "problems found"
                       if report["unrepaired"] else "every problem mended")
            click.echo("checked %s: %s" % (_plural(report["files_checked"], "cached file"),
                                           verdict))
    if report["unrepaired"]:
        raise OperationFailed("fsck: not mended: %s%s" % (
            ", ".join(report["unrepaired"]), "" if repair else " (try cm fsck --repair)"))


_FSCK_META = {"clean", "repair", "deep", "repaired", "unrepaired", "files_checked"}


@cli.command()
@click.argument("hashes", nargs=-1, required=True, metavar="HASH...")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@JSON_OPTION
@pass_session
def remove(session, hashes, yes, as_json):
    """Remove files from the pool: their copies on hosts, cache and record.

    Copies on hosts that cannot delete (file lockers) stay there; their
    URLs are printed. Asks first, unless --yes; without a terminal to ask
    on, --yes is required.
    """
    cm = session.pool()
    wanted = [_resolve(cm, h) for h in hashes]
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("remove deletes remote copies; pass --yes to confirm")
        click.confirm("Remove %s and delete their copies on every host?"
                      % _plural(len(wanted), "file"), abort=True)
    outcome = {h: cm.remove(h) for h in wanted}
    if as_json:
        emit_json(outcome)
        return
    for file_hash, result in outcome.items():
        click.echo("removed %s: %d copies deleted, %d kept" % (
            file_hash, len(result["deleted"]), len(result["kept"])))
        for host_name, url in result["kept"]:
            click.echo("  kept on %s: %s" % (host_name, url))


@cli.command()
@click.argument("target", default="0")
@pass_session
def evict(session, target):
    """Shrink the cache to TARGET: a size ('1 GiB') or a share of the capacity ('50%').

    The least recently used files go first. Files no host holds yet stay.
    The default, 0, evicts everything that can be evicted.
    """
    cm = session.pool()
    capacity = cm.cache.capacity
    if target.strip().endswith("%"):
        try:
            share = float(target.strip()[:-1])
        except ValueError:
            share = -1
        if not 0 <= share <= 100:
            raise click.BadParameter("%r is not a share between 0%% and 100%%" % target,
                                     param_hint="TARGET")
        target_bytes = int(capacity * share / 100)
    else:
        try:
            target_bytes = parse_size(target)
        except InvalidInputError as exc:
            raise click.BadParameter(str(exc), param_hint="TARGET") from None
    evicted = cm.evict(target_bytes)
    if not session.quiet:
        click.echo("evicted %s; the cache holds %s of %s (%.0f%%)" % (
            _plural(evicted, "file"), human_size(cm.cache.used_bytes()),
            human_size(capacity), 100 * cm.usage_ratio()))


# -- sharing -------------------------------------------------------------------------------

@cli.command()
@click.argument("file", default="-", type=click.Path(dir_okay=False, allow_dash=True))
@pass_session
def dump(session, file):
    """Write every record as a JSON array to FILE (default: stdout).

    The format is cloud-manager's v0.2 records; another node reads it with
    `cm load`. A FILE is written atomically.
    """
    cm = session.pool()
    if file == "-":
        count = cm.dump_to(sys.stdout)
        sys.stdout.write("\n")
    else:
        import io

        from .fsutil import atomic_write

        with atomic_write(file) as raw:
            out = io.TextIOWrapper(raw, encoding="utf-8")
            count = cm.dump_to(out)
            out.write("\n")
            out.flush()
            out.detach()  # atomic_write closes and renames the file
    if not session.quiet:
        click.echo("dumped %d records" % count, err=True)


@cli.command()
@click.argument("file", default="-", type=click.File("r", encoding="utf-8"))
@pass_session
def load(session, file):
    """Merge records another node dumped, from FILE (default: stdin).

    Records are checked field by field; bad ones are skipped with a reason.
    Loading the same file twice changes nothing.
    """
    cm = session.pool()
    merged = cm.load_from(file)
    if merged is None:
        fail_quietly()  # load_from logged what is wrong with the document
    if not session.quiet:
        unreachable = len(cm.unreachable())
        click.echo("merged %d records%s" % (merged, "; %d files have copies only on hosts "
                                            "not configured here" % unreachable
                                            if unreachable else ""), err=True)
