"""Configuration: a pool and its hosts, declared in a ``cloudmanager.toml`` file.

Example::

    [pool]
    database = "pool.sqlite3"     # relative paths start at this file's directory
    storage = "cache"
    capacity = "20 GiB"           # bytes, or a number with a unit (KiB ... TiB, KB ... TB)
    redundancy = 2
    file_mode = 0o640             # cached files readable by the group (default 0o600)
    bwlimit = "10M"               # transfers to and from hosts share 10 MiB/s (as rclone's)

    [hosts.nas]
    spec = "dir:/mnt/nas/pool"

    [hosts.b2]
    spec = "s3://my-bucket/pool"
    weight = 2                    # preferred among equally healthy hosts
    options = { endpoint_url = "https://s3.us-west-004.backblazeb2.com", region = "us-west-004" }

    [hosts.old-locker]
    spec = "plowshare:mediafire"
    enabled = false               # kept for its recorded copies' sake, not used

Each ``[hosts.NAME]`` table has a ``spec``, and optionally ``options`` (keyword
options of the host kind), ``weight`` (a positive number, default 1) and
``enabled`` (default true). ``NAME`` is the name recorded with every upload,
so keep it stable. Credentials belong in the places each backend reads them
(the AWS credential chain for S3); option values whose key looks like a
secret are never shown by :meth:`HostConfig.describe`.

Which file a command uses is decided by :func:`find_config`; with none,
:func:`embedded_config` describes a pool that needs no account and no server.
"""

import os
import re
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

from .db.urls import is_postgres_url
from .db.urls import redact as redact_database_url
from .errors import ConfigError, InvalidInputError
from .validation import SECRET_OPTION, check_host_name, redact_url_passwords

#: Settings of the ``[pool]`` table, with the type each must have.
POOL_KEYS: Dict[str, Union[type, Tuple[type, ...]]] = {
    "database": str,
    "storage": str,
    "capacity": (int, str),
    "redundancy": int,
    "defer_uploads": bool,
    "fsync": bool,
    "host_timeout": (int, float),
    "host_cooldown": (int, float),
    "file_mode": int,
    "encryption_key": str,
    "bwlimit": str,
    "recipients": list,
}
_HOST_KEYS = {"spec", "options", "weight", "enabled"}

#: The file looked for in the current directory and in the user config dir.
CONFIG_NAME = "cloudmanager.toml"
#: The environment variable naming a config file.
CONFIG_ENV = "CLOUDMANAGER_CONFIG"
#: The environment variable that, when set, is the pool's database for `cm`
#: (over the config file's): a SQLite path or a ``postgresql://`` URL, so a
#: password can stay out of the file (libpq's ``PGPASSWORD`` or ``~/.pgpass``
#: work too).
DATABASE_ENV = "CLOUDMANAGER_DATABASE"
#: The share of the free disk space the embedded defaults give the cache.
DEFAULT_CAPACITY_SHARE = 0.10
#: The embedded defaults never make a cache smaller than this...
MIN_DEFAULT_CAPACITY = 64 * 2**20
#: ...or larger than this.
MAX_DEFAULT_CAPACITY = 100 * 2**30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(value):
    """Turn ``20 GiB``, ``500MB``, ``4096`` or ``1.5 TB`` into a number of bytes.

    >>> parse_size("20 GiB"), parse_size("500MB"), parse_size(4096), parse_size("1.5k")
    (21474836480, 500000000, 4096, 1500)
    >>> parse_size("lots")
    Traceback (most recent call last):
    ...
    cloudmanager.errors.InvalidInputError: not a size: 'lots' (try '20 GiB' or a number of bytes)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value if isinstance(value, str)
                         else "")
    if not match or match.group(2).lower() not in _UNITS:
        raise InvalidInputError("not a size: %r (try '20 GiB' or a number of bytes)" % (value,))
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def redact(options):
    """A copy of ``options`` with secret-looking values hidden, at any depth.

    >>> redact({"region": "eu", "password": "hunter2", "auth": ["u", "p"],
    ...         "storage_options": {"token": "t", "endpoint_url": "https://u:p@x.example"}})
    {'region': 'eu', 'password': '***', 'auth': '***', 'storage_options': {'token': '***', 'endpoint_url': 'https://u:***@x.example'}}
    """
    def hide(key, value):
        if SECRET_OPTION.search(key):
            return "***"
        if isinstance(value, dict):
            return redact(value)
        if isinstance(value, str):
            return redact_url_passwords(value)
        return value

    return {k: hide(k, v) for k, v in options.items()}


class HostConfig(NamedTuple):
    """One ``[hosts.NAME]`` table."""

    name: str
    spec: str
    options: Dict[str, object]
    weight: float = 1.0
    enabled: bool = True

    def build(self, default_timeout=None):
        """Make the :class:`~cloudmanager.hosts.base.Host` this table describes.

        :param default_timeout: the pool's ``host_timeout``, unless the
            host's options set ``timeout``
        """
        from .hosts import from_spec

        options = dict(self.options)
        if default_timeout is not None:
            options.setdefault("timeout", default_timeout)
        try:
            host = from_spec(self.spec, name=self.name, **options)
        except TypeError as exc:  # an option the host kind does not take
            raise ConfigError("hosts.%s: %s" % (self.name, redact_url_passwords(str(exc)))
                              ) from None
        host.weight = self.weight
        return host

    def describe(self):
        """A dict for people and ``--json`` output, with secrets hidden."""
        return {"name": self.name, "spec": redact_url_passwords(self.spec),
                "options": redact(self.options),
                "weight": self.weight, "enabled": self.enabled}

    def __repr__(self):
        return "HostConfig(%r)" % (self.describe(),)


class Config(NamedTuple):
    """A parsed configuration file."""

    #: The file it came from (None when built in code).
    path: Optional[str]
    #: The ``[pool]`` settings, paths made absolute and sizes in bytes.
    pool: Dict[str, object]
    #: Every ``[hosts.NAME]`` table, enabled or not, in file order.
    hosts: List[HostConfig]

    def enabled_hosts(self):
        """The host tables with ``enabled = true``."""
        return [h for h in self.hosts if h.enabled]


def load_config(path):
    """Read and check a ``cloudmanager.toml``.

    :param path: the file
    :return: a :class:`Config`
    :raises ConfigError: if the file cannot be read, is not TOML, or holds an
        unknown or invalid setting; the message names the file and the setting
    """
    # Imported here: the TOML parser is for the commands that read a file
    # (``import cloudmanager`` need not load it).
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = os.path.abspath(os.fspath(path))
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc.strerror or exc)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("%s is not valid TOML: %s" % (path, exc)) from exc
    try:
        return parse_config(document, base_dir=os.path.dirname(path), path=path)
    except (ConfigError, InvalidInputError) as exc:
        raise ConfigError("%s: %s" % (path, exc)) from exc


def parse_config(document, base_dir=".", path=None):
    """Check a configuration already parsed from TOML (a dict).

    :param base_dir: where relative paths in ``[pool]`` start
    :raises ConfigError: on an unknown or invalid setting
    """
    unknown = set(document) - {"pool", "hosts"}
    if unknown:
        raise ConfigError("unknown table %s (known: pool, hosts)" % ", ".join(sorted(unknown)))
    pool = dict(_table(document, "pool"))
    for key, value in pool.items():
        if key not in POOL_KEYS:
            raise ConfigError("unknown setting pool.%s (known: %s)"
                              % (key, ", ".join(sorted(POOL_KEYS))))
        kind = POOL_KEYS[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError("pool.%s has the wrong type: %r" % (key, value))
    for key in ("database", "storage", "encryption_key"):
        if key in pool and not (key == "database" and is_postgres_url(pool[key])):
            pool[key] = os.path.join(base_dir, os.path.expanduser(pool[key]))
    if not all(isinstance(r, str) for r in pool.get("recipients", [])):
        raise ConfigError("pool.recipients must be a list of age1... strings")
    if "capacity" in pool:
        try:
            pool["capacity"] = parse_size(pool["capacity"])
        except InvalidInputError as exc:
            raise ConfigError("pool.capacity: %s" % exc) from None
    if "bwlimit" in pool:
        from .meter import parse_rate

        try:
            pool["bwlimit"] = parse_rate(pool["bwlimit"]) or None
        except ValueError as exc:
            raise ConfigError("pool.bwlimit: %s" % exc) from None
    hosts = [_host_config(name, table) for name, table in _table(document, "hosts").items()]
    return Config(path, pool, hosts)


def _table(document, key):
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError("%s must be a table" % key)
    return value


def _host_config(name, table):
    where = "hosts.%s" % name
    try:
        check_host_name(name)
    except InvalidInputError as exc:
        raise ConfigError("%s: %s" % (where, exc)) from None
    if not isinstance(table, dict):
        raise ConfigError("%s must be a table" % where)
    unknown = set(table) - _HOST_KEYS
    if unknown:
        raise ConfigError("unknown setting %s.%s (known: %s)"
                          % (where, sorted(unknown)[0], ", ".join(sorted(_HOST_KEYS))))
    spec = table.get("spec")
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError("%s needs a spec such as 'dir:/path' or 's3://bucket/prefix'" % where)
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError("%s.options must be a table" % where)
    for key in ("name", "weight"):
        if key in options:
            raise ConfigError("%s.options.%s: set it as %s.%s" % (
                where, key, where, "weight" if key == "weight" else "NAME (the table's name)"))
    weight = table.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise ConfigError("%s.weight must be a positive number" % where)
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("%s.enabled must be true or false" % where)
    return HostConfig(name, spec, dict(options), float(weight), enabled)


# -- where the configuration comes from ---------------------------------------

class UserDirs(NamedTuple):
    """The per-user directories of this platform (from platformdirs)."""

    config: str
    data: str
    cache: str


def user_dirs():
    """The user config, data and cache directories for cloudmanager.

    On Linux these follow XDG: ``~/.config/cloudmanager``,
    ``~/.local/share/cloudmanager`` and ``~/.cache/cloudmanager``, or where
    ``$XDG_CONFIG_HOME``, ``$XDG_DATA_HOME`` and ``$XDG_CACHE_HOME`` point.
    """
    import platformdirs  # only the command line needs it

    return UserDirs(platformdirs.user_config_dir("cloudmanager"),
                    platformdirs.user_data_dir("cloudmanager"),
                    platformdirs.user_cache_dir("cloudmanager"))


def find_config(explicit=None, environ=None, cwd=None):
    """Find the config file a command should use.

    The order: ``explicit`` (``cm --config``), then ``$CLOUDMANAGER_CONFIG``,
    then ``./cloudmanager.toml``, then ``cloudmanager.toml`` in the user
    config dir. A file named explicitly or by the environment must exist.

    :return: ``(path, source)``: the file (None when none is found, meaning
        the embedded defaults) and a phrase saying where it came from
    :raises ConfigError: if a file named by ``explicit`` or the environment
        does not exist
    """
    environ = os.environ if environ is None else environ
    for path, source in ((explicit, "--config"), (environ.get(CONFIG_ENV), "$" + CONFIG_ENV)):
        if path:
            path = os.path.abspath(os.path.expanduser(os.fspath(path)))
            if not os.path.isfile(path):
                raise ConfigError("%s names %s, which is not a file" % (source, path))
            return path, source
    local = os.path.join(cwd or os.getcwd(), CONFIG_NAME)
    if os.path.isfile(local):
        return os.path.abspath(local), "the current directory"
    user = os.path.join(user_dirs().config, CONFIG_NAME)
    if os.path.isfile(user):
        return user, "the user config dir"
    return None, "embedded defaults (no %s found)" % CONFIG_NAME


def default_capacity(storage, cached_bytes=0):
    """A cache size for a pool nobody sized: a tenth of the free space.

    The bytes the cache already holds count as free, so the capacity does
    not shrink as the cache fills. Clamped to [64 MiB, 100 GiB].

    :param storage: the cache directory (it need not exist yet)
    :param cached_bytes: what the cache holds now
    """
    probe = os.path.abspath(storage)
    while not os.path.exists(probe):  # statvfs the filesystem it will be on
        probe = os.path.dirname(probe)
    st = os.statvfs(probe)
    share = int((st.f_bavail * st.f_frsize + cached_bytes) * DEFAULT_CAPACITY_SHARE)
    return max(MIN_DEFAULT_CAPACITY, min(MAX_DEFAULT_CAPACITY, share))


def embedded_config(capacity=None):
    """The pool used when no config file is found: no account, no server.

    The database lives in the user data dir, the cache in the user cache
    dir, and the one host is a folder in the user data dir (``hosts/local``),
    so ``cm upload FILE`` works right after install. Add remote hosts with
    ``cm init --host``.

    :param capacity: the cache size in bytes; ``None`` leaves it for the
        caller to set (see :func:`default_capacity`)
    :return: a :class:`Config` whose ``path`` is None
    """
    dirs = user_dirs()
    pool = {"database": os.path.join(dirs.data, "pool.sqlite3"),
            "storage": os.path.join(dirs.cache, "pool"),
            "redundancy": 1}
    if capacity is not None:
        pool["capacity"] = capacity
    root = os.path.join(dirs.data, "hosts", "local")
    # The one folder this library owns: made here, once, like `cm init` does
    # for the folders it is given. A folder host never makes its root itself
    # (a missing root is an unmounted disk).
    os.makedirs(root, 0o700, exist_ok=True)
    local = HostConfig("local", "dir:" + root, {})
    return Config(None, pool, [local])


def shown_database(database: str) -> str:
    """The ``[pool] database`` setting as it may be shown: a PostgreSQL URL
    without its password.

    >>> shown_database("postgresql://cm:hunter2@db.example/pool")
    'postgresql://cm:***@db.example/pool'
    """
    return redact_database_url(database) if is_postgres_url(database) else database
