"""Sharing records with another node: ``cm dump`` and ``cm load``."""

import io
import sys

import click

from ..fsutil import atomic_write
from .app import OperationFailed, fail_quietly, pass_session
from .output import plural


@click.command()
@click.argument("file", default="-", type=click.Path(dir_okay=False, allow_dash=True))
@pass_session
def dump(session, file):
    """Write every record as a JSON array to FILE (default: stdout).

    The format is cloud-manager's v0.2 records; another node reads it with
    `cm load`. A FILE is written atomically.
    """
    cm = session.open()
    if file == "-":
        count = cm.dump_to(sys.stdout)
        sys.stdout.write("\n")
    else:
        try:
            with atomic_write(file) as raw:
                out = io.TextIOWrapper(raw, encoding="utf-8")
                count = cm.dump_to(out)
                out.write("\n")
                out.flush()
                out.detach()  # atomic_write closes and renames the file
        except OSError as exc:  # named as the user gave it, not by the temp file's name
            raise OperationFailed("cannot write %s: %s" % (file, exc.strerror or exc)) from None
    if not session.quiet:
        click.echo("dumped %s" % plural(count, "record"), err=True)


@click.command()
@click.argument("file", default="-", type=click.File("r", encoding="utf-8"))
@pass_session
def load(session, file):
    """Merge records another node dumped, from FILE (default: stdin).

    Records are checked field by field; bad ones are skipped with a reason.
    Loading the same file twice changes nothing.
    """
    cm = session.open()
    merged = cm.load_from(file)
    if merged is None:
        fail_quietly()  # load_from logged what is wrong with the document
    if not session.quiet:
        unreachable = len(cm.unreachable())
        click.echo("merged %s%s" % (plural(merged, "record"), "; %s copies only on hosts "
                                    "not configured here (see cm unreachable)"
                                    % plural(unreachable, "file has", "files have")
                                    if unreachable else ""), err=True)


COMMANDS = [dump, load]
