"""``cm import-legacy``: bring in a pool of the original cloud-manager."""

import click

from ..errors import CloudManagerError, LegacyPoolError
from .app import JSON_OPTION, OperationFailed, fail_quietly, pass_session
from .output import emit_json, plural


@click.command("import-legacy")
@click.argument("database", metavar="DATABASE")
@click.argument("storage", metavar="STORAGE")
@JSON_OPTION
@pass_session
def import_legacy(session, database, storage, as_json):
    """Import a pool of the original cloud-manager (Storj, 2014).

    DATABASE is its SQLite file or its postgres:// URL (only read; a
    password in it is never shown); STORAGE is its storage folder (only
    read: nothing there is changed, deleted, or followed through a
    symbolic link).

    Every file's record is merged after the checks `cm load` makes (a bad
    one is skipped, with its reason); names lose the original's
    "<first 7 hex of the hash>_" prefix. Files that no host got and whose
    bytes are in STORAGE are added and uploaded, each checked against its
    recorded SHA-256: one that does not match is refused and not recorded.
    Its blockchain tags and export stamps, transfer meter and last known
    block come along. Running it again changes nothing.

    Exits 1 if a file was refused or is missing from STORAGE, 2 if DATABASE
    or STORAGE is not an original pool.

    \b
    Example:
      cm import-legacy old/cloudmanager.db old/storage
    """
    from ..legacy_import import check_source_pool  # for this command only, not every start of cm

    try:
        database, storage = check_source_pool(database, storage)
    except LegacyPoolError as exc:
        raise click.UsageError(str(exc)) from None
    except CloudManagerError as exc:
        raise OperationFailed(str(exc)) from None
    cm = session.open()
    summary = cm.import_legacy(database, storage)
    if summary is None:
        fail_quietly()  # the library logged why
    refused, missing = summary["refused"], summary["missing"]
    if as_json:
        emit_json(summary)
    elif not session.quiet:
        click.echo("import-legacy: %s imported (%d changed), %s skipped, %s uploaded, "
                   "%d refused, %d missing" % (
                       plural(summary["records"], "record"), summary["changed"],
                       plural(len(summary["skipped"]), "bad record") if summary["skipped"]
                       else "no record", plural(len(summary["uploaded"]), "file"),
                       len(refused), len(missing)))
    if refused or missing:
        raise OperationFailed("%s refused, %d missing from %s (see the warnings)"
                              % (plural(len(refused), "file"), len(missing), storage))


COMMANDS = [import_legacy]
