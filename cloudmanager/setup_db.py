"""``cm_setup_db``: create (or migrate) a cloudmanager database, from the
shell (:func:`main`) or from Python (:func:`setup_db`, the original's)."""

import argparse
import os
import sys
from typing import Union

from .db import SCHEMA_VERSION, FileDatabase
from .db.postgres import PostgresDatabase, is_postgres_url, redact
from .errors import CloudManagerError


def setup_db(db_uri: Union[str, "os.PathLike[str]"]) -> bool:
    """Create a cloudmanager database with its schema, or migrate an older one.

    The original cloud-manager's ``setup_db.setup_db(db_uri)``: a SQLite
    file (created with its directory), or the shared catalog on a
    PostgreSQL server (a ``postgresql://`` or ``postgres://`` URL; each
    node makes its cache index when it opens). Running it again changes
    nothing. Unlike the original, there is no default path (it made
    ``test.db`` in the working directory), and an existing database is
    migrated rather than given the schema script again.

    :param db_uri: the database file, or a PostgreSQL URL
    :return: True, as the original
    :raises CloudManagerError: if the database cannot be opened or is not
        a cloudmanager database (or is newer than this code)
    :raises OSError: if the file or its directory cannot be made
    """
    _ensure_schema(os.fspath(db_uri))
    return True


def _ensure_schema(database: str) -> int:
    """Open ``database``, which creates or migrates its schema; :return: its
    schema version."""
    db: Union[PostgresDatabase, FileDatabase]
    if is_postgres_url(database):
        # The catalog alone: each node makes its cache index when it opens.
        db = PostgresDatabase(database)
    else:
        db = FileDatabase(database)
    try:
        return db.schema_version()
    finally:
        db.close()


def main(argv=None):
    """Entry point of ``cm_setup_db PATH|URL``. :return: the exit status."""
    parser = argparse.ArgumentParser(
        prog="cm_setup_db",
        description="Create a cloudmanager database with its schema, or migrate an older "
                    "one: a SQLite file, or the shared catalog on a PostgreSQL server "
                    "(postgresql://user@host/db). Running it again changes nothing, and "
                    "two nodes running it at once create the schema once.")
    parser.add_argument("database", metavar="PATH|URL",
                        help="the database file, e.g. db/production.sqlite3, or a "
                             "postgresql:// URL (a password in it is never printed)")
    args = parser.parse_args(argv)
    shown = redact(args.database) if is_postgres_url(args.database) else args.database
    try:
        version = _ensure_schema(args.database)
    except (CloudManagerError, OSError) as exc:
        print("cm_setup_db: error: %s" % exc, file=sys.stderr)
        return 1
    print("%s: schema version %d" % (shown, version if version else SCHEMA_VERSION))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
