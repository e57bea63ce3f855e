"""``cm init``: write a ``cloudmanager.toml`` describing a pool and its hosts."""

import json
import os
import re
from typing import List, Tuple

import click

from ..config import CONFIG_NAME, default_capacity, parse_config, user_dirs
from ..errors import CloudManagerError
from ..fsutil import atomic_write
from .app import SIZE, OperationFailed, pass_session
from .output import plural

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def toml_string(value):
    """A TOML basic string. JSON's escapes are TOML's, but TOML wants DEL
    escaped and takes characters beyond the BMP as they are."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from the command line
        raise click.BadParameter("%r is not valid UTF-8" % value) from None
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(name):
    """A TOML key: bare when it can be, quoted otherwise."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else toml_string(name)


def host_option(ctx, param, values):
    """``--host NAME=SPEC`` values as ``[(name, spec)]``."""
    hosts: List[Tuple[str, str]] = []
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name or ":" not in spec:
            raise click.BadParameter("%r is not NAME=SPEC (e.g. nas=dir:/mnt/nas/pool)"
                                     % value)
        if any(name == known for known, _ in hosts):  # TOML refuses a table twice
            raise click.BadParameter("the host name %r is given twice" % name)
        hosts.append((name, spec))
    return hosts


@click.command()
@click.option("--user", "for_user", is_flag=True,
              help="Write the user config (%s in the user config dir) instead of "
                   "./%s." % (CONFIG_NAME, CONFIG_NAME))
@click.option("--host", "hosts", multiple=True, callback=host_option, metavar="NAME=SPEC",
              help="A host, e.g. nas=dir:/mnt/nas/pool, b2=s3://bucket/pool, "
                   "dav=fsspec:webdav+https://dav.example.com/pool, "
                   "mf=plowshare:mediafire. Repeat for more. Default: a folder in the "
                   "user data dir.")
@click.option("--database", metavar="PATH|URL", help="The SQLite file (relative to the config "
              "file), or a postgresql:// URL for a catalog several nodes share. Default: "
              ".cloudmanager/pool.sqlite3, or the user data dir with --user.")
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
      cm init --database postgresql://cm@db.example/pool --host b2=s3://my-bucket/pool
    """
    config_dir, data_dir, cache_dir = user_dirs()
    if for_user:
        path = os.path.join(config_dir, CONFIG_NAME)
        database = database or os.path.join(data_dir, "pool.sqlite3")
        storage = storage or os.path.join(cache_dir, "pool")
    else:
        path = os.path.abspath(CONFIG_NAME)
        database = database or os.path.join(".cloudmanager", "pool.sqlite3")
        storage = storage or os.path.join(".cloudmanager", "cache")
    if os.path.exists(path) and not force:
        raise OperationFailed("%s exists; pass --force to replace it" % path)
    if not hosts:
        hosts = [("local", "dir:" + os.path.join(data_dir, "hosts", "local"))]
    base = os.path.dirname(path)
    if capacity is None:
        capacity = default_capacity(os.path.join(base, storage))
    capacity_text = next(("%d %s" % (capacity // unit, name)
                          for unit, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"))
                          if capacity % unit == 0), str(capacity))
    lines = ["# A cloudmanager pool, written by `cm init`. Relative paths start at this",
             "# file's directory; sizes take units (MiB, GiB, TB...).", "",
             "[pool]",
             "database = %s" % toml_string(database),
             "storage = %s" % toml_string(storage),
             "capacity = %s" % (capacity_text if capacity_text.isdigit()
                                else toml_string(capacity_text)),
             "redundancy = %d" % (redundancy or min(3, len(hosts)))]
    for name, spec in hosts:
        lines += ["", "[hosts.%s]" % toml_key(name), "spec = %s" % toml_string(spec)]
    text = "\n".join(lines) + "\n"
    check_config_text(text, base)
    os.makedirs(base, 0o700, exist_ok=True)
    with atomic_write(path) as f:
        os.fchmod(f.fileno(), 0o600)  # host options may hold secrets
        f.write(text.encode("utf-8"))
    if not session.quiet:
        click.echo("wrote %s (%s)" % (path, plural(len(hosts), "host")))
    # A folder host never makes its own root (a missing root is an unmounted
    # disk); init is where the user says which folders to use, so it makes them.
    for name, spec in hosts:
        root = folder_root(spec, base)
        if root is not None and not os.path.isdir(root):
            os.makedirs(root, 0o700, exist_ok=True)
            if not session.quiet:
                click.echo("made the folder %s for host %s" % (root, name))


def folder_root(spec, base):
    """The folder a ``dir:`` or ``file://`` host spec names, or None for other kinds."""
    config = parse_config(tomllib.loads("[hosts.h]\nspec = %s\n" % toml_string(spec)),
                          base_dir=base)
    host = config.hosts[0].build()
    return getattr(host, "root", None) if getattr(host, "can_mark", False) else None


def check_config_text(text, base):
    """Refuse to write a config that would not load, or whose hosts cannot be built.

    :raises click.UsageError: naming the setting at fault (exit status 2)
    """
    try:
        config = parse_config(tomllib.loads(text), base_dir=base)
        for host in config.hosts:
            host.build()
    except (tomllib.TOMLDecodeError, CloudManagerError) as exc:
        raise click.UsageError("not written: %s" % exc) from None


COMMANDS = [init]
