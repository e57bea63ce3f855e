"""Moving files in and out: ``cm upload``, ``cm download``, ``cm warm``, ``cm restore``."""

import contextlib
import os
import shutil
import tempfile
import time
from typing import List, Tuple

import click

from ..scheduler import DEFAULT_JOBS, upload_files
from ..sources import PathFilter, walk
from .app import (
    BWLIMIT_OPTION, DRY_RUN_OPTION, HASH, JSON_OPTION, Interrupted, OperationFailed,
    fail_quietly, pass_session, resolve_hash, stop_on_interrupt,
)
from .output import (
    display_path, emit_json, hash_line, human_size, plural, printable, progress,
)

#: ``cm upload`` stores remembered hashes after this many files, so an
#: interrupted run keeps what it did.
REMEMBER_BATCH = 2000


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=DEFAULT_JOBS,
              show_default=True, help="Large files (8 MiB and more) uploaded at the same "
              "time, beside one stream of batches of small files.")
@click.option("--defer/--no-defer", default=None,
              help="Only cache and queue the files; `cm sync` uploads them later. "
              "Without either, the config's [pool] defer_uploads decides.")
@click.option("--rehash", is_flag=True,
              help="Read every file, even those unchanged since they were last uploaded.")
@click.option("-L", "--follow-symlinks", is_flag=True,
              help="Upload what symbolic links point to (they are skipped otherwise).")
@click.option("--include", "includes", multiple=True, metavar="GLOB",
              help="Only files matching GLOB (repeat for more); see Filters below.")
@click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
              help="Not files matching GLOB (repeat for more); wins over --include.")
@DRY_RUN_OPTION
@BWLIMIT_OPTION
@JSON_OPTION
@pass_session
def upload(session, paths, jobs, defer, rehash, follow_symlinks, includes, excludes, dry_run,
           as_json):
    """Add files to the pool; directories are walked recursively.

    Each file is hashed while it is copied into the cache, then uploaded to
    the configured hosts: small files in batches, each sent to the hosts
    before the next is read; large ones several at a time (--jobs). Prints
    "SHA256  PATH" per file as it lands, like sha256sum (skipped files
    after). Each directory given is also recorded as a tree (its files'
    paths, hashes, modes and mtimes, stored in the pool) and printed last as
    "TREEHASH  DIR/": `cm restore TREEHASH DEST` recreates it anywhere the
    records are (`cm trees` lists them). Running it again skips files
    already in the pool whose size and times have not changed, without
    reading them.

    Filters, as rclone's: a GLOB is matched against each file's path
    relative to the directory given (a file given by name: its name), with
    / between directories. * matches within a name, ** across directories,
    ? one character, [abc] a class, {a,b} either; a GLOB starting with / is
    anchored at the top, any other matches the end of the path; one ending
    with / matches everything below a directory of that name (which is then
    not walked at all). A file matching an --exclude is skipped; with
    --include, a file is uploaded only if it matches one.

    It warns when files are left below the redundancy target, and exits 1
    when a file failed or no host took one (it stays cached, pinned and
    queued for `cm sync`; with --defer that is what was asked). Ctrl-C
    stops it cleanly: the files already in the pool are printed, and a
    re-run skips them.

    \b
    Examples:
      cm upload notes.txt
      cm upload --jobs 8 ~/photos
      cm upload --include '*.jpg' --exclude 'thumbs/' ~/photos
      cm upload --dry-run ~/photos       what would be uploaded
      h=$(cm upload notes.txt | cut -c1-64)
    """
    try:
        filters = PathFilter(includes, excludes)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--include' / '--exclude'") from None
    cm = session.open()
    problems: List[Tuple[str, str]] = []  # (path, reason), from walk()
    files = list(walk(paths, follow_symlinks=follow_symlinks, problems=problems,
                      filters=filters))
    known = {} if rehash else cm.remembered(files)
    if dry_run:
        report_dry_upload(session, files, known, problems, as_json)
        return
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
    # Ctrl-C: batches not started yet are not started, and the running ones
    # finish and are reported, so every file that reached the pool is printed
    # and remembered (a re-run skips it unread). A second Ctrl-C stops at once.
    with stop_on_interrupt(session, "the files in flight") as stop:
        try:
            with progress(session, "uploading", sum(f.size for f in todo),
                          len(todo)) as bar, \
                    contextlib.closing(upload_files(cm, todo, jobs, defer, bar,
                                                    stop=stop)) as batches:
                for batch in batches:
                    lines = []
                    for done in batch:
                        results[done.file.path] = (done.hash,
                                                   "uploaded" if done.hash else "failed")
                        if done.hash:
                            lines.append(hash_line(done.hash, display_path(done.file.path,
                                                                           cwd)))
                            if done.rememberable:
                                remember.append((done.file, done.hash))
                    if lines and not as_json:  # as they land, so an interrupted run shows them
                        bar.echo("\n".join(lines))
                    if len(remember) >= REMEMBER_BATCH:
                        cm.remember(remember)
                        remember = []
        finally:  # even on a second Ctrl-C: what was committed is remembered
            cm.remember(remember)
    interrupted = stop.is_set()
    # An interrupted run records no tree: a tree promises every file below it.
    trees = [] if interrupted else record_trees(cm, paths, files, results, problems, defer)
    deferred = defer if defer is not None else cm.settings()["defer_uploads"]
    report_upload(session, files, results, todo, time.monotonic() - started, as_json,
                  problems, trees,
                  None if deferred or interrupted else short_of_target(cm, results),
                  interrupted=interrupted)


def record_trees(cm, paths, files, results, problems, defer=None):
    """Record each directory given as a tree: ``[(directory, tree hash or None)]``.

    A directory with a file that failed (or could not be read) gets no tree,
    with a logged reason: a tree promises every file below it.
    """
    trees = []
    for given in dict.fromkeys(paths):
        if not os.path.isdir(given):
            continue
        root = os.path.abspath(given)
        below = root.rstrip(os.sep) + os.sep
        uploaded, failed = [], []
        for f in files:
            if f.path.startswith(below):
                file_hash = results[f.path][0]
                if file_hash:
                    uploaded.append((f, file_hash))
                else:
                    failed.append(f.path)
        failed += [path for path, _ in problems if path.startswith(below)]
        if failed:
            click.echo("cm: no tree recorded for %s: %d of its files were not uploaded"
                       % (given, len(failed)), err=True)
            trees.append((given, None))
            continue
        tree = cm.record_tree(root, uploaded, defer=defer)
        trees.append((given, tree or None))
    return trees


def report_dry_upload(session, files, known, problems, as_json):
    """``cm upload --dry-run``: what would be uploaded and what skipped; nothing is read."""
    listing = [{"path": f.path, "size": f.size, "hash": known.get(f.path),
                "state": "skipped" if f.path in known else "would upload"} for f in files]
    listing += [{"path": path, "size": None, "hash": None, "state": "failed", "error": reason}
                for path, reason in problems]
    todo = [item for item in listing if item["state"] == "would upload"]
    if as_json:
        emit_json({"dry_run": True, "files": listing, "would_upload": len(todo),
                   "skipped": len(files) - len(todo), "failed": len(problems)})
    else:
        for item in listing:
            if item["state"] != "failed":
                click.echo("%-12s  %10s  %s" % (item["state"], human_size(item["size"]),
                                                display_path(item["path"])))
        if not session.quiet:
            click.echo("dry run: would upload %s (%s), skip %d already in the pool; "
                       "nothing was read or sent"
                       % (plural(len(todo), "file"), human_size(sum(i["size"] for i in todo)),
                          len(files) - len(todo)), err=True)
    if problems:
        fail_quietly()


def short_of_target(cm, results):
    """``(below the target, on no host, target)`` for the files uploaded by
    this run: those with fewer copies than the target, and those no host
    took. A file another process is uploading at the same moment (its lease)
    is short here but not refused: only a failed attempt, or a pool with no
    host at all, counts as no host taking it."""
    uploaded = {h for h, state in results.values() if state == "uploaded"}
    status = cm.replication(uploaded)
    no_hosts = not cm.host_status()
    target = cm.settings()["redundancy"]
    below = no_host = 0
    for h in uploaded:
        s = status.get(h)
        if s is None:  # removed meanwhile by another process: nothing to say
            continue
        below += s["verified"] < target
        no_host += s["copies"] == 0 and (no_hosts or s["last_error"] is not None)
    return below, no_host, target


def report_upload(session, files, results, todo, elapsed, as_json, problems, trees=(),
                  short=None, interrupted=False):
    """The end of ``cm upload``: skipped files, each directory's tree (last, as
    ``TREEHASH  DIR/``), the JSON report or the summary line, and what was
    left below the target.

    :param short: :func:`short_of_target`, or None when uploads were deferred
    :param interrupted: Ctrl-C stopped the run: the summary says so, exit 130
    """
    below, no_host, target = short or (0, 0, 0)
    counts = {"uploaded": 0, "skipped": 0, "failed": len(problems), "not started": 0}
    listing = []
    for f in files:
        file_hash, state = results.get(f.path, (None, "not started"))  # Ctrl-C came first
        counts[state] += 1
        listing.append({"path": f.path, "hash": file_hash or None, "state": state})
    listing += [{"path": path, "hash": None, "state": "failed", "error": reason}
                for path, reason in problems]
    not_started = counts.pop("not started")
    trees = list(trees)
    if as_json:
        # "tree": the tree of the one directory given (null if none, or if
        # several were: "trees" has each).
        emit_json({"files": listing, **counts, "not_started": not_started,
                   "interrupted": interrupted,
                   "tree": trees[0][1] if len(trees) == 1 else None,
                   "trees": [{"path": path, "hash": tree} for path, tree in trees],
                   "below_target": below, "on_no_host": no_host})
    else:
        for item in listing:
            if item["state"] == "skipped":
                click.echo(hash_line(item["hash"], display_path(item["path"])))
        for path, tree in trees:
            if tree:
                click.echo(hash_line(tree, display_path(os.path.abspath(path))
                                     .rstrip(os.sep) + "/"))
    nbytes = sum(f.size for f in todo if results.get(f.path, ("", ""))[1] == "uploaded")
    summary = "uploaded %d, skipped %d already in the pool, failed %d" % (
        counts["uploaded"], counts["skipped"], counts["failed"])
    if interrupted:
        raise Interrupted("interrupted: %s, not started %d (%s in %.1f s); no tree recorded; "
                          "run it again to upload the rest" % (summary, not_started,
                                                                human_size(nbytes), elapsed))
    if not session.quiet and not as_json:
        click.echo("%s (%s in %.1f s)" % (summary, human_size(nbytes), elapsed), err=True)
    if below and not session.quiet:
        them = "it" if below == 1 else "them"
        click.echo("cm: warning: %s %s below the target of %d cop%s; `cm sync` tops %s up "
                   "once the hosts take %s" % (plural(below, "file"), "is" if below == 1
                                               else "are", target, "y" if target == 1
                                               else "ies", them, them), err=True)
    if no_host:
        raise OperationFailed(
            "no host took %s: %s kept in the cache and queued (see cm hosts, then cm sync)"
            % (plural(no_host, "file"), "it is" if no_host == 1 else "they are"))
    if counts["failed"] or any(tree is None for _, tree in trees):
        fail_quietly()  # each failure was logged, and the summary counts them


@click.command()
@click.argument("file_hash", metavar="HASH", type=HASH)
@click.argument("dest", required=False, type=click.Path(allow_dash=True))
@click.option("-f", "--force", is_flag=True,
              help="Replace an existing file at DEST that holds other bytes.")
@BWLIMIT_OPTION
@pass_session
def download(session, file_hash, dest, force):
    """Write a verified copy of a file to DEST and print its path.

    DEST is a file path, or a directory where the file gets its recorded
    name; the default is the current directory. A DEST ending in / is a
    directory, made if missing. DEST - writes the bytes to stdout (and
    nothing else). The copy comes from the cache, or from the healthiest
    host (it is then cached if it fits).

    An existing file is never replaced unless --force: one that already
    holds the file is left as it is, one that holds other bytes is an error.

    \b
    Examples:
      cm download 6f7bed7 restore/
      cm download 6f7bed7 - | tar -x
    """
    cm = session.open()
    file_hash = resolve_hash(cm, file_hash)
    size = cm.status(file_hash)["size"]
    if dest == "-":
        to_stdout(session, cm, file_hash, size)
        return
    try:
        with progress(session, "downloading", size, 1) as bar, counted(bar, size) as told:
            path = cm.download(file_hash, dest or os.curdir, progress=told, overwrite=force)
    except KeyboardInterrupt:  # the destination is written whole or not at all
        raise Interrupted("interrupted: %s was not written" % (dest or "the file")) from None
    if not path:
        fail_quietly()  # the library logged why, naming DEST
    click.echo(path)


@contextlib.contextmanager
def counted(bar, size):
    """Yield a bytes callback for one file's transfer; when it ends, the
    file counts as done and its bar makes up the bytes nobody reported (a
    cache hit moves none)."""
    told = [0]

    def progress(nbytes):
        told[0] += nbytes
        bar(nbytes, 0)

    try:
        yield progress
    finally:
        bar(max(0, size - told[0]), 1)


def to_stdout(session, cm, file_hash, size):
    """``cm download HASH -``: a verified copy, then its bytes on stdout.

    The copy is written to a private temp directory first (a pipe cannot be
    taken back if a host's bytes turn out bad) and deleted after.
    """
    with tempfile.TemporaryDirectory(prefix="cm-download-") as scratch:
        with progress(session, "downloading", size, 1) as bar, counted(bar, size) as told:
            path = cm.download(file_hash, os.path.join(scratch, file_hash), progress=told)
        if not path:
            fail_quietly()
        out = click.get_binary_stream("stdout")
        with open(path, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
        out.flush()


@click.command()
@click.argument("hashes", nargs=-1, required=True, metavar="HASH...", type=HASH)
@BWLIMIT_OPTION
@pass_session
def warm(session, hashes):
    """Bring files into the local cache; print "SHA256  CACHED-PATH" for each.

    Files already cached only move to the front of the LRU order. The others
    are fetched several at a time (each host within its max_connections);
    lines come in the order of the arguments, each once its file is cached.
    """
    cm = session.open()
    wanted = [resolve_hash(cm, h) for h in hashes]
    # The bar's total; without a bar no file's size is needed.
    sizes = {h: cm.status(h)["size"] for h in set(wanted)} if session.show_progress else {}
    total = sum(sizes.get(h, 0) for h in wanted)
    landed: dict = {}
    told = [0]
    shown = [0, 0, 0]  # lines looked at (in argument order), warmed, failed
    with stop_on_interrupt(session, "the files in flight") as stop, \
            progress(session, "warming", total, len(wanted)) as bar:

        def moved(nbytes):
            told[0] += nbytes
            bar(nbytes, 0)

        def show(file_hash):
            if landed[file_hash]:
                shown[1] += 1
                bar.echo(hash_line(file_hash, landed[file_hash]))
            else:
                shown[2] += 1
            bar(0, 1)

        def land(file_hash, path):
            landed[file_hash] = path
            while shown[0] < len(wanted) and wanted[shown[0]] in landed:
                show(wanted[shown[0]])
                shown[0] += 1

        cm.warm_up_many(wanted, progress=moved, stop=stop, landed=land)
        for file_hash in wanted[shown[0]:]:  # after a file not started, if stopped
            if file_hash in landed:
                show(file_hash)
        bar(max(0, total - told[0]), 0)
    warmed, failed = shown[1], shown[2]
    if stop.is_set():
        raise Interrupted("interrupted: warmed %d, failed %d, not started %d"
                          % (warmed, failed, len(wanted) - warmed - failed))
    if failed:
        fail_quietly()  # warm_up_many logged why, file by file


@click.command()
@click.argument("tree", metavar="TREE", type=HASH)
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("-j", "--jobs", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Files fetched at the same time.")
@click.option("-n", "--dry-run", is_flag=True,
              help="Only list what would be done: ACTION PATH per file (fetch, keep, "
              "touch, conflict, fail).")
@click.option("--force", is_flag=True,
              help="Replace files in DEST that differ from the tree's (never a directory).")
@click.option("--checksum", is_flag=True,
              help="Hash the files already in DEST even when their size and mtime match.")
@BWLIMIT_OPTION
@JSON_OPTION
@pass_session
def restore(session, tree, dest, jobs, dry_run, force, checksum, as_json):
    """Recreate a tree (from `cm upload DIR`) in DEST, created if missing.

    Works on any node that has the pool's records (`cm load`). Files are
    fetched several at a time, each verified against its hash, written
    under a temp name and renamed in place with its mode and mtime. Files
    already there with the same content are kept, so a re-run after an
    interruption fetches only what is missing, and a re-run over a finished
    restore does nothing. A file that differs is left alone and reported
    (exit 1) unless --force. The tree's paths are checked first: one that
    could leave DEST (.., an absolute path, a device name, a duplicate)
    refuses the whole tree. No symbolic link inside DEST is followed: the
    paths it would lead astray are reported and left alone.

    \b
    Examples:
      cm restore 3f2a photos-copy/
      cm restore --dry-run 3f2a photos-copy/
    """
    cm = session.open()
    tree = resolve_hash(cm, tree)
    kwargs = dict(jobs=jobs, force=force, checksum=checksum)
    if dry_run or not session.show_progress:
        summary = cm.restore_tree(tree, dest, dry_run=dry_run, **kwargs)
    else:  # the totals for the bar: a plan first (it reads no file content)
        plan = cm.restore_tree(tree, dest, dry_run=True, **kwargs)
        if not plan:
            fail_quietly()
        with progress(session, "restoring", plan["fetched_bytes"], plan["fetched"]) as advance:
            summary = cm.restore_tree(tree, dest, progress=advance, **kwargs)
    if not summary:
        fail_quietly()  # logged: not a tree, refused, or DEST unusable
    if as_json:
        emit_json(summary)
    elif dry_run:
        for action, path in summary["actions"]:
            click.echo("%-8s %s" % (action, printable(path)))
    for path, reason in summary["conflicts"]:
        click.echo("cm: %s: %s" % (printable(os.path.join(dest, path)), reason), err=True)
    for path, reason in summary["failed"]:
        click.echo("cm: %s: %s" % (printable(os.path.join(dest, path)), reason), err=True)
    if not session.quiet and not as_json:
        click.echo("%s %s (%s), %d unchanged, %s, %d failed, in %s"
                   % ("would fetch" if dry_run else "restored",
                      plural(summary["fetched"], "file"), human_size(summary["fetched_bytes"]),
                      summary["unchanged"], plural(len(summary["conflicts"]), "conflict"),
                      len(summary["failed"]), dest), err=True)
    if not summary["ok"]:
        fail_quietly()


COMMANDS = [upload, download, warm, restore]
