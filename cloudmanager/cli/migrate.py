"""``cm migrate``: move the pool's database between SQLite and PostgreSQL."""

import os
import re

import click

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from ..config import DATABASE_ENV, is_postgres_url, parse_config, shown_database
from ..errors import CloudManagerError
from ..fsutil import atomic_write
from .app import JSON_OPTION, OperationFailed, pass_session
from .configure import toml_string
from .output import emit_json, plural

_TABLE = re.compile(r"^\s*\[\s*([^\]]*?)\s*\]\s*(#.*)?$")
_DATABASE_KEY = re.compile(r"^\s*database\s*=")


def with_database(text, value):
    """The config file's text with ``[pool] database`` set to ``value``: the
    key's line replaced, or added at the top of the ``[pool]`` table (made
    at the end if there is none). Comments and everything else stay.

    >>> with_database('[pool]\\ndatabase = "a"  # old\\nstorage = "c"\\n', "b")
    '[pool]\\ndatabase = "b"\\nstorage = "c"\\n'
    >>> with_database('[hosts.x]\\nspec = "dir:/x"\\n', "b")
    '[hosts.x]\\nspec = "dir:/x"\\n\\n[pool]\\ndatabase = "b"\\n'
    """
    line = "database = %s" % toml_string(value)
    lines = text.splitlines(keepends=True)
    table, pool_start = None, None
    for i, current in enumerate(lines):
        header = _TABLE.match(current)
        if header:
            table = header.group(1)
            if table == "pool" and pool_start is None:
                pool_start = i + 1
        elif table == "pool" and _DATABASE_KEY.match(current):
            return "".join(lines[:i] + [line + "\n"] + lines[i + 1:])
    if pool_start is not None:
        return "".join(lines[:pool_start] + [line + "\n"] + lines[pool_start:])
    if text and not text.endswith("\n"):
        text += "\n"
    return text + ("\n" if text else "") + "[pool]\n" + line + "\n"


@click.command()
@click.option("--to", "destination", required=True, metavar="PATH|URL",
              help="The new database: a SQLite file (absent or empty), or a postgresql:// "
                   "URL of an empty database.")
@click.option("--write-config", is_flag=True,
              help="Also set [pool] database in the config file in use to the new one.")
@JSON_OPTION
@pass_session
def migrate(session, destination, write_config, as_json):
    """Move the pool's database to another: SQLite to PostgreSQL, or back.

    Copies the whole catalog (files, every copy in its state, tombstones,
    removals, the upload queue, host health, the transfer meter, the
    nodes) and this node's cache index into an empty database, in one
    transaction. With a PostgreSQL catalog, the cache index goes to a local
    file beside the cache directory (CACHE.index.sqlite3); with SQLite, into
    the one file. Cached files stay where they are, and the old database is
    left as it was: the config decides which one the pool uses.

    The pool must be idle: the move is refused while another process has it
    open, and other nodes sharing a catalog must be stopped first. A
    password in the URL is never printed.

    \b
    Examples:
      cm migrate --to postgresql://cm@db.example/pool --write-config
      cm migrate --to pool.sqlite3
    """
    # Not opened: the pool must be idle while it moves. A Config is
    # (file, [pool] settings, host tables).
    _, settings, _ = session.config()
    if not is_postgres_url(destination):
        destination = os.path.abspath(os.path.expanduser(destination))
    from_environment = bool(os.environ.get(DATABASE_ENV))
    if write_config and (session.config_path is None or from_environment):
        raise click.UsageError(
            "--write-config needs a config file that names the database; %s" % (
                "$%s names it now: set that instead" % DATABASE_ENV if from_environment
                else "there is none (see cm init)"))
    from ..migrate import migrate_pool  # for this command only, not every start of cm

    report = migrate_pool(settings["database"], settings["storage"], destination)
    if write_config:
        update_config(session.config_path, destination)
    if as_json:
        emit_json(dict(report, config=session.config_path, config_written=write_config))
        return
    if session.quiet:
        return
    rows = report["rows"]
    click.echo("moved the pool from %s to %s" % (report["source"], report["destination"]))
    click.echo("  catalog: %s, %s, %s, %s, %d queued, %s, %s, %s" % (
        plural(rows["files"], "file"), plural(rows["uploads"], "copy row"),
        plural(rows["tombstones"], "tombstone"), plural(rows["removals"], "removal"),
        rows["upload_queue"], plural(rows["host_health"], "host health row"),
        plural(rows["transfers"], "transfer meter row"), plural(rows["nodes"], "node")))
    if report["index"]:
        click.echo("  cache index: %s, %s, in %s" % (
            plural(rows["cache_entries"], "entry" if rows["cache_entries"] == 1 else "entrie"),
            plural(rows["sources"], "remembered source"), report["index"]))
    if report["recounted"]:
        click.echo("  %s had copy counts that disagreed with their copies: recounted"
                   % plural(report["recounted"], "file"))
    click.echo("the old database is left as it was; the cached files stay in %s"
               % settings["storage"])
    shown = shown_database(destination)
    if write_config:
        click.echo("updated %s: [pool] database = %s" % (session.config_path,
                                                          toml_string(shown)))
    elif from_environment:
        click.echo("to use the new one, set $%s to it" % DATABASE_ENV)
    else:
        click.echo("to use the new one, set in %s:" % (
            session.config_path or "a config file (cm init --database ...)"))
        click.echo("  [pool]\n  database = %s" % toml_string(shown))
        if shown != destination:
            click.echo("  (the password is not shown: write it there, or keep it in "
                       "~/.pgpass, $PGPASSWORD or $%s)" % DATABASE_ENV)


def update_config(path, database):
    """Set ``[pool] database`` in the config file ``path``, atomically; the
    file stays private if the value holds a password.

    :raises OperationFailed: if the file cannot be read, edited or written
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = with_database(text, database)
        _, settings, _ = parse_config(tomllib.loads(new), base_dir=os.path.dirname(path))
        if settings.get("database") != database:
            raise ValueError("the edit did not take")
        mode = os.stat(path).st_mode & 0o777
        if shown_database(database) != database:
            mode &= 0o700
        with atomic_write(path) as f:
            os.fchmod(f.fileno(), mode)
            f.write(new.encode("utf-8"))
    except (OSError, ValueError, CloudManagerError) as exc:
        raise OperationFailed("the pool moved, but %s could not be updated (%s): set [pool] "
                              "database there by hand" % (path, getattr(exc, "strerror", None)
                                                          or exc)) from exc


COMMANDS = [migrate]
