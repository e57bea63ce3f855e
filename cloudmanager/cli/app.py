"""What every ``cm`` command shares: the session, errors, logging and parameters.

The :class:`Session` holds what the global options decided and opens the
pool, through the public :class:`~cloudmanager.CloudManager` facade only.
:class:`CmGroup` turns errors into one line on stderr and the exit status
(0 success, 1 failure, 2 usage error).
"""

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import traceback
from typing import Optional

import click

from ..config import (
    Config, default_capacity, embedded_config, find_config, load_config, parse_size,
    DATABASE_ENV, is_postgres_url, shown_database,
)
from ..errors import CloudManagerError, ConfigError, InvalidInputError
from ..manager import CloudManager
from ..meter import parse_rate
from .output import bar_cleared

log = logging.getLogger("cloudmanager")

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# -- errors ------------------------------------------------------------------------

class OperationFailed(click.ClickException):
    """An operation did not succeed: exit status 1, one line on stderr."""

    exit_code = 1


class BadConfig(click.ClickException):
    """The configuration cannot be used: exit status 2 (a usage mistake, like
    a bad option), one line naming the file and the setting."""

    exit_code = 2


#: The exit status of ``cm`` stopped by Ctrl-C (SIGINT), as shells report it.
INTERRUPTED = 130


class Interrupted(click.ClickException):
    """Ctrl-C stopped the command: exit status 130, one line saying what was done."""

    exit_code = INTERRUPTED


@contextlib.contextmanager
def stop_on_interrupt(session, what):
    """Turn the first Ctrl-C (SIGINT) into a request to stop, for work that
    can end cleanly between items: yields a :class:`threading.Event` that is
    set then. A second Ctrl-C interrupts at once (KeyboardInterrupt).

    :param what: what finishes before the stop, for the message
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Signal handlers belong to the main thread; an ignored SIGINT (a
        # background job of a script, nohup) stays ignored.
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if not session.quiet:
            click.echo("cm: stopping once %s finish (Ctrl-C again to stop now)" % what,
                       err=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def fail_quietly():
    """Exit 1 without another line: the library has logged the reason."""
    raise click.exceptions.Exit(1)


# -- logging -----------------------------------------------------------------------

class LogFormatter(logging.Formatter):
    """``cm: warning: MESSAGE``."""

    def format(self, record):
        """The record as one ``cm: LEVEL: message`` line."""
        return "cm: %s: %s" % (record.levelname.lower(), super().format(record))


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (test runners swap it), on a
    line of its own even while a progress bar is drawn."""

    @property
    def stream(self):
        """``sys.stderr``, looked up at every write."""
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record):
        """Write the record, with any progress bar's frame erased first."""
        with bar_cleared():
            super().emit(record)


class LogSetup:
    """The ``cloudmanager`` logger as ``cm`` sets it, and as it was before."""

    def __init__(self) -> None:
        self.handler: Optional[logging.Handler] = None

    def configure(self, verbosity):
        """Send the library's messages to stderr: warnings and errors, more
        with each ``-v``, only errors with ``-q``."""
        logger = logging.getLogger("cloudmanager")
        if self.handler is not None:
            logger.removeHandler(self.handler)
        self.handler = StderrHandler()
        self.handler.setFormatter(LogFormatter("%(message)s"))
        logger.addHandler(self.handler)
        logger.setLevel(max(logging.DEBUG,
                            min(logging.CRITICAL, logging.WARNING - 10 * verbosity)))
        logger.propagate = False

    def remove(self) -> None:
        """Take the handler away again (the level is restored by the caller)."""
        if self.handler is not None:
            logging.getLogger("cloudmanager").removeHandler(self.handler)
        self.handler = None


LOGGING = LogSetup()


# -- the command group ---------------------------------------------------------------

class CmGroup(click.Group):
    """The ``cm`` group: one-line errors, exit 1 for failures and 2 for usage."""

    def invoke(self, ctx):
        """Run the command, turning library errors into one-line failures."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise
        except ConfigError as exc:  # the config is wrong, as an option can be: exit 2
            self.print_traceback(ctx)
            raise BadConfig(str(exc)) from exc
        except (CloudManagerError, OSError) as exc:
            self.print_traceback(ctx)
            raise OperationFailed(str(exc)) from exc
        except Exception as exc:  # a bug: say so in one line unless -v
            self.print_traceback(ctx)
            raise OperationFailed("internal error: %s: %s (run with -v for the traceback)"
                                  % (type(exc).__name__, exc)) from exc

    @staticmethod
    def print_traceback(ctx):
        """The traceback on stderr, with ``-v``."""
        session = ctx.find_object(Session)
        if session is not None and session.verbosity > 0:
            traceback.print_exc(file=sys.stderr)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        """Run ``cm`` and exit; the ``cloudmanager`` logger is left as it was found."""
        logger = logging.getLogger("cloudmanager")
        saved = logger.level, logger.propagate  # restored for callers in this process
        try:
            self.run(args, prog_name, complete_var, **extra)
        finally:
            LOGGING.remove()
            logger.setLevel(saved[0])
            logger.propagate = saved[1]

    def run(self, args, prog_name, complete_var, **extra):
        """click's main without its standalone mode: every outcome is an exit status."""
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
            click.echo("cm: %s%s" % ("" if isinstance(exc, Interrupted) else "error: ",
                                     exc.format_message()), err=True)
            sys.exit(exc.exit_code)
        except click.Abort as exc:
            if isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C, as shells count it
                click.echo("cm: interrupted", err=True)
                sys.exit(INTERRUPTED)
            click.echo("cm: aborted", err=True)  # a confirmation answered no
            sys.exit(1)
        except BrokenPipeError:  # `cm ls | head`: the reader has what it wanted
            # Python would complain again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        sys.exit(status if isinstance(status, int) else 0)


# -- the session: configuration and the pool it opens --------------------------------

class Session:
    """What the global options decided; opens the pool on first use."""

    def __init__(self, config_option, capacity, verbosity):
        self.config_option = config_option
        self.capacity = capacity
        self.verbosity = verbosity
        #: ``--bwlimit`` in bytes per second (0: none), over the config's; None: the config's.
        self.bwlimit = None
        #: The config file in use (None for the embedded defaults), and how it was found.
        self.config_path = None
        self.config_source = None
        #: The :class:`~cloudmanager.config.Config` the pool was opened with.
        self.loaded = None
        self.manager = None

    def config(self):
        """The :class:`~cloudmanager.config.Config` to open the pool with (a
        file, or the defaults), with the cache's capacity settled."""
        path, source = find_config(self.config_option)
        self.config_path, self.config_source = path, source
        # A Config is (file, [pool] settings, host tables).
        origin, settings, hosts = load_config(path) if path else embedded_config()
        settings = dict(settings)
        database = os.environ.get(DATABASE_ENV)
        if database:
            settings["database"] = database if is_postgres_url(database) \
                else os.path.abspath(os.path.expanduser(database))
        if self.bwlimit is not None:
            settings["bwlimit"] = self.bwlimit or None
        for key in ("database", "storage"):
            if key not in settings:  # a config file that forgot it
                raise ConfigError("%s: [pool] %s is not set (the pool's %s; see cm init)"
                                  % (path, key, "SQLite file or postgresql:// URL"
                                     if key == "database" else "cache directory"))
        if self.capacity is not None:
            settings["capacity"] = self.capacity
        elif "capacity" not in settings:
            settings["capacity"] = default_capacity(
                settings["storage"],
                CloudManager.cached_bytes_at(settings["database"], settings["storage"]))
        log.debug("opening the pool of %s: database %s, cache %s (%d bytes)",
                  path or "the embedded defaults", shown_database(settings["database"]),
                  settings["storage"],
                  settings["capacity"])
        return Config(origin, settings, hosts)

    def open(self):
        """The open :class:`~cloudmanager.CloudManager`."""
        if self.manager is None:
            config = self.config()
            try:
                self.manager = CloudManager(config=config)
            except InvalidInputError as exc:  # a setting or host spec of the config refused
                raise ConfigError("%s: %s" % (config.path or "the embedded defaults", exc)
                                  ) from exc
            self.loaded = config
        return self.manager

    def host_tables(self):
        """The ``[hosts.NAME]`` tables of the config in use, enabled or not."""
        return list(self.loaded.hosts) if self.loaded is not None else []

    def close(self):
        """Close the pool if it was opened."""
        if self.manager is not None:
            self.manager.close()
            self.manager = None

    @property
    def quiet(self):
        """``-q``: only errors."""
        return self.verbosity < 0

    @property
    def show_progress(self):
        """Progress bars only on a terminal (stdout and stderr), and not with ``-q``."""
        return not self.quiet and sys.stdout.isatty() and sys.stderr.isatty()


pass_session = click.make_pass_decorator(Session)


# -- parameters ----------------------------------------------------------------------

def resolve_hash(cm, text):
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
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


class SizeType(click.ParamType):
    """A size in bytes, with units as ``cloudmanager.toml`` takes them: ``20 GiB``."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        """Bytes, more than 0."""
        try:
            size = parse_size(value)
        except InvalidInputError as exc:
            self.fail(str(exc), param, ctx)
        if size <= 0:
            self.fail("must be more than 0 bytes", param, ctx)
        return size


SIZE = SizeType()
JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON, for scripts.")
DRY_RUN_OPTION = click.option("-n", "--dry-run", is_flag=True,
                              help="Only show what would be done; change nothing.")


def _set_bwlimit(ctx, param, value):
    if value is None:
        return
    try:
        rate = parse_rate(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    ctx.find_object(Session).bwlimit = rate


BWLIMIT_OPTION = click.option(
    "--bwlimit", metavar="RATE", expose_value=False, callback=_set_bwlimit,
    help="Limit the bandwidth of transfers to and from hosts, all together, e.g. 10M "
         "(MiB/s; K, M, G suffixes as in rclone; 'off' for none). Overrides the config's "
         "[pool] bwlimit.")


class HashType(click.ParamType):
    """A file hash or a unique prefix of one; completes from the pool's hashes."""

    name = "HASH"

    def shell_complete(self, ctx, param, incomplete):
        """The pool's hashes starting with ``incomplete`` (for ``_CM_COMPLETE``)."""
        from click.shell_completion import CompletionItem

        root = ctx.find_root().params
        session = Session(root.get("config_path"), root.get("capacity"), -1)
        # Nothing may be printed into the user's shell line: not even a warning.
        logging.getLogger("cloudmanager").setLevel(logging.CRITICAL + 1)
        try:
            cm = session.open()
            return [CompletionItem(h) for h in cm.complete_hash(incomplete)]
        except Exception:  # completion must never print a traceback into a shell
            return []
        finally:
            session.close()


HASH = HashType()


def _more_verbose(ctx, param, value):
    _adjust_verbosity(ctx, value)


def _less_verbose(ctx, param, value):
    _adjust_verbosity(ctx, -value)


def _adjust_verbosity(ctx, delta):
    session = ctx.find_object(Session)
    if delta and session is not None and not ctx.resilient_parsing:
        session.verbosity += delta
        LOGGING.configure(session.verbosity)


def verbosity_options():
    """``-v`` and ``-q`` for a subcommand, so they work after it too (``cm ls -q``)."""
    return [
        click.Option(["-v", "--verbose"], count=True, expose_value=False,
                     callback=_more_verbose, help="More messages (-vv for debugging)."),
        click.Option(["-q", "--quiet"], count=True, expose_value=False,
                     callback=_less_verbose, help="Fewer messages (only errors), no progress."),
    ]
