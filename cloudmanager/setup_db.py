"""``cm_setup_db``: create (or migrate) a cloudmanager database from the shell."""

import argparse
import sys

from .db import SCHEMA_VERSION, FileDatabase
from .errors import CloudManagerError


def main(argv=None):
    """Entry point of ``cm_setup_db PATH``. :return: the exit status."""
    parser = argparse.ArgumentParser(
        prog="cm_setup_db",
        description="Create a cloudmanager SQLite database with the schema "
                    "(cloudmanager/schema.sql), or migrate an older one. "
                    "Running it again on the same file changes nothing.")
    parser.add_argument("path", help="the database file, e.g. db/production.sqlite3")
    args = parser.parse_args(argv)
    try:
        db = FileDatabase(args.path)
        try:
            before = db.schema_version()
        finally:
            db.close()
    except (CloudManagerError, OSError) as exc:
        print("cm_setup_db: error: %s" % exc, file=sys.stderr)
        return 1
    print("%s: schema version %d" % (args.path, before if before else SCHEMA_VERSION))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
