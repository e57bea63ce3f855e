"""The ``cm`` command: a pool of files from the shell.

Every subcommand opens the pool its configuration describes (see
:func:`cloudmanager.config.find_config`), does one job through the
:class:`~cloudmanager.CloudManager` facade, and exits 0 on success, 1 when an
operation failed and 2 on a usage error. Errors are one line on stderr; ``-v``
adds the traceback. Read commands take ``--json`` for scripts. Progress bars
appear only when stdout is a terminal.

The command line uses the library's public API only (a test walks these
modules to keep it so):

- this module: the ``cm`` group, its global options, and :func:`main`;
- :mod:`.app`: the session, errors, logging and parameter types;
- :mod:`.output`: sizes, times, JSON, tables and progress bars;
- the commands, by concern: :mod:`.configure` (init, config), :mod:`.transfer`
  (upload, download, warm), :mod:`.show` (ls, info, whereis, status, hosts,
  unreachable),
  :mod:`.maintain` (sync, verify, fsck, remove, evict), :mod:`.share`
  (dump, load), :mod:`.migrate` (migrate), :mod:`.legacy` (import-legacy).
"""

import gc

import click

from .. import __version__
from ..config import CONFIG_ENV, CONFIG_NAME
from . import configure, key, legacy, maintain, migrate, share, show, transfer
from .app import (
    LOGGING, SIZE, CmGroup, OperationFailed, Session, parse_duration, verbosity_options,
)

__all__ = ["cli", "main", "OperationFailed", "parse_duration"]


@click.group(cls=CmGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
      cm trees                     directories uploaded, by name (cm ls TREE)
      cm restore TREE DEST         recreate a directory, here or on another node
      cm status                    usage, queue, hosts, transfers
    \b
    Setting up hosts:
      cm init --host nas=dir:/mnt/nas/pool --host b2=s3://bucket/pool
      cm config show               the config in use, secrets hidden
      cm hosts                     the configured hosts and their health
      cm hosts --retry NAME        try a cooling host again now
    \b
    Keeping it safe:
      cm sync                      upload queued files, top up short ones
      cm verify                    check that the remote copies are intact
      cm fsck                      check the cache against the database
    \b
    Sharing with another node:
      cm dump pool.json            every record, as JSON
      cm load pool.json            merge another node's records
      cm unreachable               files only on hosts not configured here
      cm migrate --to URL          move the database to PostgreSQL (or back)
      cm import-legacy DB STORAGE  bring in a pool of the original cloud-manager

    -v and -q work before or after the command. Shell completion (commands,
    options, hashes): eval "$(_CM_COMPLETE=bash_source cm)" in ~/.bashrc
    (zsh_source, fish_source for those shells).

    Exit status: 0 on success, 1 when an operation failed, 2 on a usage or
    config error.
    """
    LOGGING.configure(verbose - quiet)
    session = Session(config_path, capacity, verbose - quiet)
    ctx.obj = session
    ctx.call_on_close(session.close)


def _with_verbosity(command):
    """Give a command (and a group's subcommands) ``-v`` and ``-q`` of its own."""
    command.params.extend(verbosity_options())
    for sub in getattr(command, "commands", {}).values():
        _with_verbosity(sub)


for module in (configure, transfer, show, maintain, share, migrate, key, legacy):
    for command in module.COMMANDS:
        _with_verbosity(command)
        cli.add_command(command)
del module, command


def main(argv=None):
    """Entry point of the ``cm`` console script."""
    # What the imports built lives as long as the command runs, so the
    # collector's full passes need not walk it again (one such pass over
    # 10,000 files' objects took 10-19 ms). Unfrozen after, for a caller that
    # runs main() in its own process: a cycle frozen here is collected then.
    gc.freeze()
    try:
        cli.main(args=argv, prog_name="cm")
    finally:
        gc.unfreeze()
