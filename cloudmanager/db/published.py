"""The ``published`` table: records known to be in the log the original
cloud-manager shared them through (a blockchain).

A row says a file's record is out there: this pool exported it with
``data_dump(limit)`` (``exported``, a unix time), or loaded it from one of
the log's entries with ``data_load(data, source)`` (``source``, the
original's ``blockchain_hash``). Files with copies on hosts and no row are
the export backlog (the original's "blockchain queue"); see
:meth:`cloudmanager.db.records.Records.iter` and
:meth:`~cloudmanager.db.records.Records.unpublished_totals`.

Only :mod:`cloudmanager.legacy` (through this module, and through
:mod:`cloudmanager.records` for the tags of an import) writes it. A file's
row goes with the file (``ON DELETE CASCADE``).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from .connection import Conn, Store, json_list


class PublishedRow(NamedTuple):
    """What the pool knows of a record's publication."""

    #: Unix time ``data_dump(limit)`` exported it, or None.
    exported: Optional[float]
    #: The source the first ``data_load(data, source)`` that held it gave, or None.
    source: Optional[str]


class Published:
    """Reads and writes of the ``published`` table."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def mark_exported(self, conn: Conn, hashes: Iterable[str], when: float) -> List[str]:
        """Stamp records as exported, inside the caller's transaction.

        Only files still in the pool and not published yet are stamped: a
        record another process exported (or a load tagged) meanwhile, or a
        file removed meanwhile, is left out. Two statements.

        :return: the hashes stamped, in the order given
        """
        hashes = list(dict.fromkeys(hashes))
        if not hashes:
            return []
        free = {h for (h,) in conn.execute(
            "SELECT f.hash FROM json_each(?) AS j JOIN files AS f ON f.hash = j.value"
            " WHERE NOT EXISTS (SELECT 1 FROM published AS p WHERE p.hash = f.hash)",
            (json_list(hashes),))}
        stamped = [h for h in hashes if h in free]
        conn.executemany("INSERT INTO published (hash, exported) VALUES (?, ?)",
                         [(h, when) for h in stamped])
        return stamped

    def tag(self, conn: Conn, hashes: Iterable[str], source: str) -> None:
        """Tag records with the source they were loaded from, inside the
        caller's transaction. A record keeps the first source it was seen
        in; hashes of files the pool does not have are passed over. One
        statement."""
        conn.execute(
            "INSERT INTO published (hash, source)"
            " SELECT f.hash, ? FROM json_each(?) AS j JOIN files AS f ON f.hash = j.value"
            " WHERE true"  # SQLite: an upsert's SELECT needs a WHERE (parsing)
            " ON CONFLICT (hash) DO UPDATE SET source = coalesce(published.source,"
            " excluded.source)",
            (source, json_list(dict.fromkeys(hashes))))

    def stamp(self, conn: Conn, stamps: Iterable[Tuple[str, float]]) -> None:
        """Record when records were exported elsewhere (an original pool's
        ``exported_timestamp``), inside the caller's transaction: a stamp
        already there stays, a file the pool does not have is passed over.
        One statement per stamp.

        :param stamps: ``(hash, unix time)`` pairs
        """
        pairs = [(float(when), h) for h, when in dict(stamps).items()]
        conn.executemany(
            "INSERT INTO published (hash, exported) SELECT hash, ? FROM files WHERE hash = ?"
            " ON CONFLICT (hash) DO UPDATE SET exported = coalesce(published.exported,"
            " excluded.exported)", pairs)

    def of(self, hashes: Iterable[str]) -> Dict[str, PublishedRow]:
        """``{hash: PublishedRow}`` for the published ones among ``hashes``."""
        return {h: PublishedRow(exported, source) for h, exported, source in self.db.read(
            "SELECT p.hash, p.exported, p.source FROM json_each(?) AS j"
            " JOIN published AS p ON p.hash = j.value", (json_list(hashes),))}
