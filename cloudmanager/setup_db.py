"""``cm_setup_db``: create (or migrate) a cloudmanager database from the shell."""

import argparse
import sys
from typing import Union

from .db import SCHEMA_VERSION, FileDatabase
from .db.postgres import PostgresDatabase, is_postgres_url, redact
from .errors import CloudManagerError


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
    db: Union[PostgresDatabase, FileDatabase]
    try:
        if is_postgres_url(args.database):
            # The catalog alone: each node makes its cache index when it opens.
            db = PostgresDatabase(args.database)
        else:
            db = FileDatabase(args.database)
        try:
            before = db.schema_version()
        finally:
            db.close()
    except (CloudManagerError, OSError) as exc:
        print("cm_setup_db: error: %s" % exc, file=sys.stderr)
        return 1
    print("%s: schema version %d" % (shown, before if before else SCHEMA_VERSION))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
