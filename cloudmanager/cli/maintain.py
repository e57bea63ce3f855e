"""Keeping the pool safe and in shape: ``cm sync``, ``cm verify``, ``cm fsck``,
``cm remove``, ``cm evict``."""

import sys

import click

from ..config import parse_size
from ..errors import CloudManagerError, InvalidInputError
from .app import (
    BWLIMIT_OPTION, DRY_RUN_OPTION, HASH, JSON_OPTION, Interrupted, OperationFailed,
    parse_duration, pass_session, resolve_hash,
)
from .output import emit_json, human_size, plural, print_summary, progress

#: Keys of the fsck report that are not findings.
FSCK_META = {"clean", "repair", "deep", "repaired", "unrepaired", "files_checked"}


@click.command()
@click.option("--reencrypt", is_flag=True,
              help="Then rewrite plaintext copies (made before the pool had its "
                   "encryption_key) encrypted, and delete the plaintext ones; resumable.")
@DRY_RUN_OPTION
@BWLIMIT_OPTION
@JSON_OPTION
@pass_session
def sync(session, reencrypt, dry_run, as_json):
    """Upload queued files and top up files below the redundancy target.

    With --dry-run, lists each file it would work on ("HASH  SIZE  copies
    HAVE+WANTED  NAME") and sends nothing. Exits 1 if some files are still
    short of copies afterwards.
    """
    cm = session.open()
    if dry_run:
        report_dry_sync(session, cm.sync_plan(), as_json)
        return
    plan = cm.sync_plan() if session.show_progress else []
    try:
        with progress(session, "syncing", sum(p["size"] * p["wanted"] for p in plan),
                      len(plan) or None) as bar:
            summary = cm.sync(reencrypt=reencrypt, progress=bar)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: the copies sync made are recorded; run cm sync again "
                          "to go on") from None
    except InvalidInputError as exc:  # --reencrypt on a pool without a key: usage
        raise click.UsageError(str(exc)) from None
    except CloudManagerError as exc:
        raise OperationFailed(str(exc)) from None
    print_summary(session, "sync", summary, as_json)
    if summary["short"]:
        raise OperationFailed("%s still below the target of %s (see cm status)"
                              % (plural(summary["short"], "file is", "files are"),
                                 plural(cm.settings()["redundancy"], "copy", "copies")))


def report_dry_sync(session, plan, as_json):
    """``cm sync --dry-run``: the files sync would work on, and the copies it would make."""
    if as_json:
        emit_json({"dry_run": True, "files": plan,
                   "copies_wanted": sum(p["wanted"] for p in plan)})
        return
    for p in plan:
        click.echo("%s  %10s  copies %d+%d  %s%s" % (
            p["hash"], human_size(p["size"]), p["copies"], p["wanted"], p["filename"] or "-",
            "  (queued)" if p["queued"] else ""))
    if not session.quiet:
        wanted = sum(p["wanted"] for p in plan)
        click.echo("dry run: sync would work on %s and make up to %s (%s); nothing was sent"
                   % (plural(len(plan), "file"), plural(wanted, "copy", "copies"),
                      human_size(sum(p["size"] * p["wanted"] for p in plan))), err=True)


@click.command()
@click.argument("hashes", nargs=-1, metavar="[HASH...]", type=HASH)
@click.option("--host", "host_names", multiple=True, metavar="NAME",
              help="Only copies on this host (repeat for more).")
@click.option("--older-than", type=parse_duration, metavar="AGE",
              help="Only copies not checked for this long: 90s, 15m, 12h, 7d, 2w.")
@click.option("--limit", type=click.IntRange(min=1), help="Check at most this many copies.")
@click.option("--deep", is_flag=True,
              help="Download and hash every copy, even where the host can answer cheaply.")
@BWLIMIT_OPTION
@JSON_OPTION
@pass_session
def verify(session, hashes, host_names, older_than, limit, deep, as_json):
    """Check that the remote copies are still there and intact.

    Copies checked longest ago go first, so `cm verify --limit 1000` run
    daily walks a large pool a slice at a time. Missing and bad copies are
    marked; the next `cm sync` replaces them. Exits 1 if any copy was bad or
    missing, or could not be checked (its host failed or is cooling down),
    or if there were copies and none could be checked.
    """
    cm = session.open()
    unknown = sorted(set(host_names) - set(cm.host_status()))
    if unknown:  # its copies could not be checked from here: a mistake, as with --retry
        raise click.BadParameter("no host named %s is configured here" % ", ".join(
            repr(name) for name in unknown), param_hint="'--host'")
    wanted = [resolve_hash(cm, h) for h in hashes] or None
    # How many copies will be looked at is known once the run has them
    # leased: the library tells the bar then (Bar.expect).
    try:
        with progress(session, "verifying", None, None) as bar:
            summary = cm.verify(wanted, list(host_names) or None, older_than, limit, deep,
                                progress=bar)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: the copies verify checked are recorded; run cm verify "
                          "again to go on (the ones checked longest ago go first)") from None
    print_summary(session, "verify", summary, as_json)
    unchecked = summary["error"] + summary["cooling"]
    if not summary["checked"] and (unchecked or summary["unreachable"]):
        raise OperationFailed(
            "nothing could be checked: %d copies on hosts that failed or are cooling down "
            "(see cm hosts; cm hosts --retry NAME), %d on hosts not configured here"
            % (unchecked, summary["unreachable"]))
    if summary["bad"] + summary["missing"] + unchecked:
        raise OperationFailed("%d bad, %d missing, %d not checkable now (a host failed or is "
                              "cooling down): run `cm sync` to replace lost copies"
                              % (summary["bad"], summary["missing"], unchecked))


@click.command()
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
    cm = session.open()
    report = cm.check(repair=repair, deep=deep)
    if as_json:
        emit_json(report)
    else:
        for key, value in report.items():
            if key in FSCK_META or not value:
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
            click.echo("checked %s: %s" % (plural(report["files_checked"], "cached file"),
                                           verdict))
    if report["unrepaired"]:
        raise OperationFailed("fsck: not mended: %s%s" % (
            ", ".join(report["unrepaired"]), "" if repair else " (try cm fsck --repair)"))


@click.command()
@click.argument("hashes", nargs=-1, required=True, metavar="HASH...", type=HASH)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@DRY_RUN_OPTION
@JSON_OPTION
@pass_session
def remove(session, hashes, yes, dry_run, as_json):
    """Remove files from the pool: their copies on hosts, cache and record.

    Copies on hosts that cannot delete (file lockers) stay there; their
    URLs are printed. Asks first, unless --yes; without a terminal to ask
    on, --yes is required. --dry-run lists what would be deleted and kept,
    and asks nothing.
    """
    cm = session.open()
    wanted = [resolve_hash(cm, h) for h in hashes]
    if dry_run:
        report_dry_remove(session, cm, wanted, as_json)
        return
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("remove deletes remote copies; pass --yes to confirm")
        click.confirm("Remove %s and delete their copies on every host?"
                      % plural(len(wanted), "file"), abort=True)
    outcome = {h: cm.remove(h) for h in wanted}
    if as_json:
        emit_json(outcome)
        return
    for file_hash, result in outcome.items():
        click.echo("removed %s: %s deleted, %d kept" % (
            file_hash, plural(len(result["deleted"]), "copy", "copies"), len(result["kept"])))
        for host_name, url in result["kept"]:
            click.echo("  kept on %s: %s" % (host_name, url))


def report_dry_remove(session, cm, wanted, as_json):
    """``cm remove --dry-run``: the copies each removal would delete, and those it would keep."""
    hosts = cm.host_status()
    outcome = {}
    for file_hash in wanted:
        status = cm.status(file_hash)
        copies = [(u["host_name"], u["url"]) for u in status["uploads"] if u["url"]]
        deletable = [c for c in copies if c[0] in hosts and hosts[c[0]]["can_delete"]]
        outcome[file_hash] = {"filename": status["filename"], "cached": status["cached"],
                              "would_delete": deletable,
                              "would_keep": [c for c in copies if c not in deletable]}
    if as_json:
        emit_json({"dry_run": True, "files": outcome})
        return
    for file_hash, plan in outcome.items():
        click.echo("would remove %s (%s): delete %s, keep %d%s" % (
            file_hash, plan["filename"] or "-",
            plural(len(plan["would_delete"]), "copy", "copies"), len(plan["would_keep"]),
            ", and its cached copy" if plan["cached"] else ""))
        for host_name, url in plan["would_keep"]:
            click.echo("  would keep on %s: %s" % (host_name, url))
    if not session.quiet:
        click.echo("dry run: nothing was removed", err=True)


@click.command()
@click.argument("target", default="0")
@pass_session
def evict(session, target):
    """Shrink the cache to TARGET: a size ('1 GiB') or a share of the capacity ('50%').

    The least recently used files go first. Files no host holds yet stay.
    The default, 0, evicts everything that can be evicted.
    """
    cm = session.open()
    capacity = cm.settings()["capacity"]
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
        ratio = cm.usage_ratio()
        click.echo("evicted %s; the cache holds %s of %s (%.0f%%)" % (
            plural(evicted, "file"), human_size(round(ratio * capacity)),
            human_size(capacity), 100 * ratio))


COMMANDS = [sync, verify, fsck, remove, evict]
