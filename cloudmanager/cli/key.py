"""``cm key``: the pool's encryption key (an age identity)."""

import os

import click

from ..errors import CloudManagerError
from .app import OperationFailed, pass_session


@click.group()
def key():
    """The pool's encryption key: an age identity file (age-encryption.org).

    With a key (``[pool] encryption_key = "PATH"``), hosts hold only age
    ciphertext, named by nothing that reveals the file. Losing the key loses
    the data: keep a copy somewhere safe, away from the hosts.
    """


@key.command("new")
@click.argument("path", required=False, default="cloudmanager.key",
                type=click.Path(dir_okay=False, writable=True))
@pass_session
def key_new(session, path):
    """Write a new age identity to PATH (default: ./cloudmanager.key), mode 0600.

    It never replaces an existing file. It prints the key's public recipient
    (age1...), for other nodes' or a person's `recipients` settings. The
    file opens any copy with the standard tool: `age -d -i PATH OBJECT`.

    \b
    LOSING THIS FILE LOSES EVERY FILE IT ENCRYPTS. Keep a copy off the hosts.
    """
    # Imported here: the crypto module (and subprocess, for age) is for this
    # command and encrypted pools, not for every start of cm.
    from ..crypto import new_identity_file

    try:
        recipient = new_identity_file(os.path.abspath(path))
    except CloudManagerError as exc:
        raise OperationFailed(str(exc)) from None
    except OSError as exc:  # named as the user gave it, not by the temp file's name
        raise OperationFailed("cannot write %s: %s" % (path, exc.strerror or exc)) from None
    click.echo(recipient)
    if not session.quiet:
        click.echo("wrote the key %s (0600). Losing it loses every file it encrypts: keep a "
                   "copy somewhere safe, away from the hosts." % os.path.abspath(path),
                   err=True)


COMMANDS = [key]
