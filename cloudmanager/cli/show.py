"""Looking at the pool: ``cm ls``, ``cm trees``, ``cm info``, ``cm whereis``, ``cm status``,
``cm hosts``."""

import click

from ..errors import InvalidInputError
from .app import HASH, JSON_OPTION, fail_quietly, pass_session, resolve_hash
from .output import (
    emit_json,
    human_size,
    human_time,
    plural,
    print_copies,
    print_hosts,
    print_table,
    printable,
)


@click.command("ls")
@click.argument("tree", required=False, metavar="[TREE]", type=HASH)
@click.option("--cached", "only_cached", is_flag=True, help="Only files in the local cache.")
@click.option("--below-target", "only_short", is_flag=True,
              help="Only files on fewer hosts than the redundancy target.")
# The old spelling, kept working for scripts; "short" read as "short listing".
@click.option("--short", "old_short", is_flag=True, hidden=True,
              help="The old spelling of --below-target.")
@JSON_OPTION
@pass_session
def ls(session, tree, only_cached, only_short, old_short, as_json):
    """List the pool's files: hash, size, cached, copies/target, name.

    "cached" is "pinned" for a file kept in the cache until a host holds it
    (or pinned by hand).

    With TREE (a hash from `cm trees` or `cm upload DIR`), list that tree's
    files instead: hash, size, mode, modification time, path.
    """
    only_short = only_short or old_short
    cm = session.open()
    if tree is not None:
        if only_cached or only_short:
            raise click.UsageError("--cached and --below-target list the pool, not a tree")
        list_tree(cm, resolve_hash(cm, tree), as_json)
        return
    target = cm.settings()["redundancy"]
    rows = (f for f in cm.files()
            if (not only_cached or f["cached"]) and (not only_short or f["copies"] < target))
    if as_json:
        emit_json([dict(f, target=target) for f in rows])
        return
    for f in rows:
        state = ("pinned" if f["pinned"] or not f["verified"] else "cached") if f["cached"] \
            else "-"
        click.echo("%s  %10s  %-6s  %d/%d  %s" % (f["hash"], human_size(f["size"]), state,
                                                 f["copies"], target, f["filename"]))


def list_tree(cm, tree, as_json):
    """The files of one tree, for ``cm ls TREE``."""
    entries = cm.tree_entries(tree)
    if not entries:
        if entries == []:
            return  # an empty directory's tree
        fail_quietly()  # the library logged why: not a tree, refused, not fetched
    if as_json:
        emit_json(entries)
        return
    for e in entries:
        # A tree from another node is untrusted: its paths cannot forge lines.
        click.echo("%s  %10s  %04o  %s  %s" % (e["hash"], human_size(e["size"]), e["mode"],
                                               human_time(e["mtime_ns"] // 10**9),
                                               printable(e["path"])))


@click.command("trees")
@JSON_OPTION
@pass_session
def trees_command(session, as_json):
    """List the trees the pool knows: hash, time made, directory name.

    Trees are made by `cm upload DIR`, and learnt from other nodes'
    records by `cm load`. `cm ls TREE` lists a tree's files; `cm restore
    TREE DEST` recreates it.
    """
    cm = session.open()
    known = cm.trees()
    if as_json:
        emit_json(known)
        return
    for t in known:
        click.echo("%s  %s  %s" % (t["hash"], human_time(t["created"]), t["name"]))


@click.command()
@click.argument("file_hash", metavar="HASH", type=HASH)
@JSON_OPTION
@pass_session
def info(session, file_hash, as_json):
    """Everything the pool knows about one file, with each copy's state."""
    cm = session.open()
    status = cm.status(resolve_hash(cm, file_hash))
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
    print_copies(status["uploads"])


@click.command()
@click.argument("file_hash", metavar="HASH", type=HASH)
@JSON_OPTION
@pass_session
def whereis(session, file_hash, as_json):
    """Which hosts hold a file, and at which URLs (like git annex whereis)."""
    cm = session.open()
    status = cm.status(resolve_hash(cm, file_hash))
    copies = [u for u in status["uploads"] if u["url"]]
    if as_json:
        emit_json({"hash": status["hash"], "cached": status["cached"], "copies": copies})
        return
    click.echo("%s (%d cop%s%s)" % (status["filename"] or status["hash"], status["copies"],
                                    "y" if status["copies"] == 1 else "ies",
                                    ", cached here" if status["cached"] else ""))
    print_copies(copies)


@click.command()
@JSON_OPTION
@pass_session
def status(session, as_json):
    """The pool at a glance: config, usage, queue, hosts, transfers per month."""
    cm = session.open()
    stats = cm.stats()
    settings = cm.settings()
    where = {"config": session.config_path, "source": session.config_source,
             "database": settings["database"], "storage": settings["storage"],
             "bwlimit": settings["bwlimit"]}
    if as_json:
        emit_json(dict(where, **stats))
        return
    click.echo("config    %s" % (("%s (from %s)" % (session.config_path, session.config_source))
                                 if session.config_path else session.config_source))
    click.echo("database  %s" % settings["database"])
    encryption = stats.get("encryption")
    click.echo("copies    %s" % ("encrypted with age to %s" % ", ".join(encryption["recipients"])
                                 if encryption else "not encrypted (no encryption_key)"))
    click.echo("cache     %s: %s of %s used (%.0f%%), %s"
               % (settings["storage"], human_size(stats["cached_bytes"]),
                  human_size(stats["capacity"]), 100 * stats["usage_ratio"],
                  plural(stats["cached_files"], "file")))
    click.echo("files     %d in the pool, %d queued for upload, %d below the target of %s"
               % (stats["files"], stats["queued"], stats["below_target"],
                  plural(stats["redundancy"], "copy", "copies")))
    click.echo("cache use %s, %s" % (plural(stats["hits"], "hit"),
                                     plural(stats["misses"], "miss", "misses")))
    if settings["bwlimit"]:
        click.echo("bwlimit   %s/s for all transfers to and from hosts"
                   % human_size(settings["bwlimit"]))
    print_hosts(stats["hosts"])
    months = sorted(stats["transfers"].items(), reverse=True)[:12]
    if months:
        print_table("transfers", ["month", "uploaded", "downloaded"],
                    [(m, human_size(t["uploaded"]), human_size(t["downloaded"]))
                     for m, t in months])


@click.command()
@click.option("--retry", "retry_names", multiple=True, metavar="NAME",
              help="Try this host again now, whatever its circuit breaker says: its "
                   "failure streak is forgotten, for every process sharing the pool "
                   "(repeat for more).")
@JSON_OPTION
@pass_session
def hosts(session, retry_names, as_json):
    """The configured hosts: kind, health, circuit breaker, and spec.

    A host that failed three times in a row is skipped while it cools down
    (longer after each further failure). `cm hosts --retry NAME` ends the
    cool-down now, for example once a disk is mounted again; `cm sync` and
    `cm verify` also probe cooling hosts once when they start. With --json
    and --retry, the output is {"reset": [NAME...], "hosts": {...}}.
    """
    cm = session.open()
    reset = None
    if retry_names:
        try:
            reset = cm.retry_hosts(dict.fromkeys(retry_names))
        except InvalidInputError as exc:
            raise click.BadParameter(str(exc), param_hint="'--retry'") from None
    status = cm.host_status()
    tables = session.host_tables()
    described = {h.name: h.describe() for h in tables}
    listing = {name: dict(row, config=described.get(name)) for name, row in status.items()}
    if as_json:
        emit_json(listing if reset is None else {"reset": reset, "hosts": listing})
        return
    if reset and not session.quiet:
        click.echo("reset %s: tried again on the next transfer" % ", ".join(reset))
    print_hosts(status, {name: d["spec"] for name, d in described.items()})
    disabled = [h.name for h in tables if not h.enabled]
    if disabled:
        click.echo("disabled: %s" % ", ".join(disabled))


@click.command()
@JSON_OPTION
@pass_session
def unreachable(session, as_json):
    """Files whose every good copy is on a host this node has not configured.

    Records loaded from other nodes may name hosts this node cannot reach;
    such files cannot be downloaded here until a matching host is added
    (cm init --host, or the config's [hosts] tables). Prints "HASH  HOSTS"
    per file; cached files are not listed.
    """
    cm = session.open()
    found = cm.unreachable()
    if as_json:
        emit_json(found)
        return
    for file_hash, names in found.items():
        click.echo("%s  %s" % (file_hash, ",".join(names)))
    if not session.quiet:
        click.echo("%s only on hosts not configured here" % plural(len(found), "file is",
                                                                    "files are"), err=True)


COMMANDS = [ls, trees_command, info, whereis, status, hosts, unreachable]
