"""``cm init``: write a ``cloudmanager.toml`` describing a pool and its hosts;
``cm config show|check``: look at the configuration in use."""

import json
import os
import re
from typing import Dict, List, Tuple

import click

from ..config import CONFIG_NAME, default_capacity, parse_config, shown_database, user_dirs
from ..errors import CloudManagerError
from ..fsutil import atomic_write
from ..validation import SECRET_OPTION
from .app import JSON_OPTION, SIZE, OperationFailed, pass_session
from .output import emit_json, human_size, plural

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


def host_option_option(ctx, param, values):
    """``--host-option NAME.KEY=VALUE`` values as ``{name: [(key, toml_value)]}``."""
    options: Dict[str, List[Tuple[str, str]]] = {}
    for value in values:
        target, sep, raw = value.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not name or not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise click.BadParameter("%r is not NAME.KEY=VALUE (e.g. "
                                     "b2.endpoint_url=https://s3.example.com)" % value)
        options.setdefault(name, []).append((key, toml_value(raw)))
    return options


def toml_value(raw):
    """``--host-option``'s VALUE as TOML: itself if it is a TOML value (a
    number, true/false, a quoted string, an array), else a string of it."""
    try:
        tomllib.loads("v = %s" % raw)
    except tomllib.TOMLDecodeError:
        return toml_string(raw)
    return raw


def capacity_text(capacity, exact):
    """A capacity as ``cloudmanager.toml`` takes it: ``'20 GiB'``.

    An ``exact`` one (given by the user) keeps every byte: the largest unit
    that divides it, or a plain byte count. A computed default is rounded
    down to a tenth of a GiB (or a MiB, below 1 GiB): a human size the
    config parser reads back.
    """
    for unit, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB")):
        if capacity % unit == 0:
            return "%d %s" % (capacity // unit, name)
    if exact:
        return str(capacity)
    if capacity >= 2**30:
        return "%.1f GiB" % (int(capacity * 10 / 2**30) / 10)
    return "%d MiB" % max(1, capacity // 2**20)


@click.command()
@click.option("--user", "for_user", is_flag=True,
              help="Write the user config (%s in the user config dir) instead of "
                   "./%s." % (CONFIG_NAME, CONFIG_NAME))
@click.option("--host", "hosts", multiple=True, callback=host_option, metavar="NAME=SPEC",
              help="A host, e.g. nas=dir:/mnt/nas/pool, b2=s3://bucket/pool, "
                   "dav=fsspec:webdav+https://dav.example.com/pool, "
                   "mf=plowshare:mediafire. Repeat for more. Default: a folder in the "
                   "user data dir.")
@click.option("--host-option", "host_options", multiple=True, callback=host_option_option,
              metavar="NAME.KEY=VALUE",
              help="An option of host NAME, e.g. b2.endpoint_url=https://s3.example.com or "
                   "nas.timeout=300. VALUE is taken as TOML if it is a TOML value (a number, "
                   "true, \"a string\"), else as a string. Repeat for more.")
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
def init(session, for_user, hosts, host_options, database, storage, capacity, redundancy,
         force):
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
      cm init --host b2=s3://my-bucket/pool \\
              --host-option b2.endpoint_url=https://s3.us-west-004.backblazeb2.com
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
    unknown = sorted(set(host_options) - {name for name, _ in hosts})
    if unknown:
        raise click.BadParameter("no --host named %s" % ", ".join(unknown),
                                 param_hint="'--host-option'")
    base = os.path.dirname(path)
    exact = capacity is not None
    if capacity is None:
        capacity = default_capacity(os.path.join(base, storage))
    text_of_capacity = capacity_text(capacity, exact)
    lines = ["# A cloudmanager pool, written by `cm init`. Relative paths start at this",
             "# file's directory; sizes take units (MiB, GiB, TB...).", "",
             "[pool]",
             "database = %s" % toml_string(database),
             "storage = %s" % toml_string(storage),
             "capacity = %s" % (text_of_capacity if text_of_capacity.isdigit()
                                else toml_string(text_of_capacity)),
             "redundancy = %d" % (redundancy or min(3, len(hosts)))]
    for name, spec in hosts:
        lines += ["", "[hosts.%s]" % toml_key(name), "spec = %s" % toml_string(spec)]
        if name in host_options:
            lines.append("options = { %s }" % ", ".join(
                "%s = %s" % (key, value) for key, value in host_options[name]))
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
        raise click.UsageError("these options do not make a config that loads: %s" % exc
                               ) from None


class ConfigProblem(click.ClickException):
    """A config that cannot be used: exit status 2, like a usage error."""

    exit_code = 2


@click.group("config")
def config_group():
    """The configuration in use: show it (secrets hidden), check it."""


@config_group.command("show")
@JSON_OPTION
@pass_session
def config_show(session, as_json):
    """Print the configuration in effect, with secrets hidden.

    The file found (or the embedded defaults), then the [pool] settings as
    they apply (with $CLOUDMANAGER_DATABASE and --capacity), then each host
    table. Passwords in URLs and options that look secret (password,
    secret_access_key, token, key...) show as ***.
    """
    try:
        config = session.config()
    except CloudManagerError as exc:
        raise ConfigProblem(str(exc)) from None
    _, settings, tables = config  # (file, [pool] settings, host tables)
    pool = shown_pool(settings)
    hosts = [h.describe() for h in tables]
    if as_json:
        emit_json({"config": session.config_path, "source": session.config_source,
                   "pool": pool, "hosts": hosts})
        return
    click.echo("# %s" % (("%s (from %s)" % (session.config_path, session.config_source))
                         if session.config_path else session.config_source))
    click.echo("[pool]")
    for key, value in pool.items():
        click.echo("%s = %s" % (toml_key(key), toml_inline(value)))
    for host in hosts:
        click.echo("\n[hosts.%s]" % toml_key(host["name"]))
        click.echo("spec = %s" % toml_string(host["spec"]))
        if host["options"]:
            click.echo("options = %s" % toml_inline(host["options"]))
        if host["weight"] != 1.0:
            click.echo("weight = %g" % host["weight"])
        if not host["enabled"]:
            click.echo("enabled = false")


def toml_inline(value):
    """A value as TOML (inline tables for dicts), for ``cm config show``.

    >>> toml_inline({"a": [1, True], "b c": {"d": "e"}})
    '{ a = [1, true], "b c" = { d = "e" } }'
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ %s }" % ", ".join("%s = %s" % (toml_key(k), toml_inline(v))
                                    for k, v in value.items()) if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[%s]" % ", ".join(toml_inline(v) for v in value)
    return toml_string(str(value))


def shown_pool(settings):
    """The ``[pool]`` settings as they may be shown: sizes and rates in
    words, no password of a database URL."""
    shown = {}
    for key, value in settings.items():
        if value is None:  # unset (bwlimit = "off"): TOML has no null
            continue
        if key == "database":
            value = shown_database(value)
        elif key == "capacity":
            value = capacity_text(value, exact=True)
            value = int(value) if value.isdigit() else value
        elif key == "bwlimit" and value:
            value = "%s/s" % human_size(value)
        elif key == "file_mode" and isinstance(value, int):
            value = oct(value)
        elif isinstance(value, str) and SECRET_OPTION.search(key) and key != "encryption_key":
            value = "***"
        shown[key] = value
    return shown


@config_group.command("check")
@pass_session
def config_check(session):
    """Check the configuration in use: it loads, and every enabled host can be built.

    Nothing is sent and the pool is not opened. A folder host whose folder
    is missing is reported (an unmounted disk?). Exits 2 if the config
    cannot be used, 1 if a host cannot be built, 0 otherwise.
    """
    try:
        _, settings, tables = session.config()  # (file, [pool] settings, host tables)
    except CloudManagerError as exc:
        raise ConfigProblem(str(exc)) from None
    where = session.config_path or session.config_source
    broken = 0
    for table in tables:
        if not table.enabled:
            click.echo("host %-16s disabled" % table.name)
            continue
        try:
            host = table.build(settings.get("host_timeout"))
        except CloudManagerError as exc:
            broken += 1
            click.echo("host %-16s cannot be used: %s" % (table.name, exc))
            continue
        root = getattr(host, "root", None) if getattr(host, "can_mark", False) else None
        if root is not None and not os.path.isdir(root):
            click.echo("host %-16s ok, but its folder %s is missing" % (table.name, root))
        else:
            click.echo("host %-16s ok (%s)" % (table.name, type(host).__name__))
        host.close()
    if broken:
        raise OperationFailed("%s: %s cannot be used" % (where, plural(broken, "host")))
    if not session.quiet:
        click.echo("%s: ok (%s)" % (where, plural(len(tables), "host")), err=True)


COMMANDS = [init, config_group]
