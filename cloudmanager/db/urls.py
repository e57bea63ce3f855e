"""A catalog's URL: whether a database setting names a PostgreSQL server, and
how such a URL may be shown.

Kept apart from :mod:`.postgres` so that a SQLite pool (and ``import
cloudmanager``) can tell what its setting is without loading the PostgreSQL
catalog's module; see :mod:`.postgres` for the catalog itself.
"""

from __future__ import annotations

from typing import List
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: URL schemes that name a PostgreSQL catalog.
URL_SCHEMES = ("postgresql", "postgres")
#: The one-line hint when the driver is missing.
INSTALL_HINT = "PostgreSQL catalogs need psycopg: pip install 'cloudmanager[postgres]'"


def is_postgres_url(value: object) -> bool:
    """Whether ``value`` is a ``postgresql://`` or ``postgres://`` URL.

    >>> is_postgres_url("postgresql://cm@db.example/pool"), is_postgres_url("pool.sqlite3")
    (True, False)
    """
    return isinstance(value, str) and value.split("://", 1)[0].lower() in URL_SCHEMES \
        and "://" in value


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs, errors and reports.

    >>> redact("postgresql://cm:hunter2@db.example:5432/pool?password=x&sslmode=require")
    'postgresql://cm:***@db.example:5432/pool?password=***&sslmode=require'
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, hostport = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = userinfo + "@" + hostport
        query = parts.query
        if query:
            query = urlencode([(k, "***" if k.lower() == "password" else v)
                               for k, v in parse_qsl(query, keep_blank_values=True)],
                              safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "postgresql://***"


def passwords_in(url: str) -> List[str]:
    """The password(s) in ``url``, raw and as libpq may echo them, to scrub
    them from error texts.

    >>> passwords_in("postgresql://cm:hunter2@db.example/pool?password=x")
    ['hunter2', 'x']
    """
    found = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(parts.password)
        found += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    except ValueError:
        pass
    return [s for s in found if s]
