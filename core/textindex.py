"""A full-text index that the database keeps itself, installed the same way
for every app that has one (chat.search over messages and titles,
rag.lexical over document chunks).

- **SQLite**: FTS5 tables, each kept in step by three triggers
  (`<fts table>_insert`, `_delete`, `_update`) on the indexed table, inside the
  same transaction as the row change.
- **PostgreSQL**: a stored generated `search` tsvector column with a GIN index
  (`<table>_search_gin`) on each indexed table.

`install()` is idempotent. It runs in the migration that creates the index and
after every `migrate` (`after_migrate`, a post_migrate receiver), because
SQLite drops a table's triggers when a later migration rebuilds the table;
when triggers were missing, every row is indexed again so index and rows
agree. A table or trigger whose definition changed in the code (a new column,
a prefix index) is dropped and made again, and every row indexed again: an
existing database takes a new index definition at its next `migrate`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from django.db import connection as default_connection
from django.db import connections

TRIGGER_EVENTS = ("insert", "delete", "update")
_CREATED = re.compile(r"CREATE (VIRTUAL TABLE|TRIGGER) IF NOT EXISTS (\w+)")


@dataclass(frozen=True)
class TextIndex:
    label: str  # what the index is, for errors ("keyword index")
    sqlite_tables: tuple[str, ...]  # the FTS5 tables
    sqlite_schema: tuple[str, ...]  # CREATE ... IF NOT EXISTS: tables, then triggers
    sqlite_reindex: tuple[str, ...]  # empty the FTS5 tables and fill them from the rows
    postgres_tables: tuple[str, ...]  # the tables that carry a `search` column
    postgres_schema: tuple[str, ...]  # ADD COLUMN / CREATE INDEX ... IF NOT EXISTS

    def install(self, conn=None) -> None:
        conn = conn or default_connection
        with conn.cursor() as cursor:
            if conn.vendor == "postgresql":
                for statement in self.postgres_schema:
                    cursor.execute(statement)
                return
            if conn.vendor != "sqlite":
                raise NotImplementedError(f"no {self.label} for {conn.vendor}")
            self._drop_changed(cursor)
            triggers = [
                f"{table}_{event}" for table in self.sqlite_tables for event in TRIGGER_EVENTS
            ]
            cursor.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            complete = set(triggers) <= {name for (name,) in cursor.fetchall()}
            for statement in self.sqlite_schema:
                cursor.execute(statement)
            if not complete:
                for statement in self.sqlite_reindex:
                    cursor.execute(statement)

    def _drop_changed(self, cursor) -> None:
        """SQLite: drop an FTS5 table or trigger whose definition is not the one
        in `sqlite_schema` (a new column, a prefix index, a trigger that writes
        it differently), with the triggers of a dropped table, so install()
        creates them anew and indexes every row again."""
        cursor.execute("SELECT name, sql FROM sqlite_master WHERE type IN ('table', 'trigger')")
        existing = dict(cursor.fetchall())
        for statement in self.sqlite_schema:
            created = _CREATED.match(statement)
            if created is None:
                continue
            kind, name = created.groups()
            if name not in existing or existing[name] == statement.replace(" IF NOT EXISTS", "", 1):
                continue
            if kind == "TRIGGER":
                cursor.execute(f"DROP TRIGGER IF EXISTS {name}")
                continue
            for event in TRIGGER_EVENTS:
                cursor.execute(f"DROP TRIGGER IF EXISTS {name}_{event}")
            cursor.execute(f"DROP TABLE {name}")

    def uninstall(self, conn=None) -> None:
        conn = conn or default_connection
        with conn.cursor() as cursor:
            if conn.vendor == "postgresql":
                for table in self.postgres_tables:
                    cursor.execute(f"DROP INDEX IF EXISTS {table}_search_gin")
                    cursor.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS search")
                return
            for table in self.sqlite_tables:
                for event in TRIGGER_EVENTS:
                    cursor.execute(f"DROP TRIGGER IF EXISTS {table}_{event}")
                cursor.execute(f"DROP TABLE IF EXISTS {table}")

    def after_migrate(self, indexed_table: str) -> Callable[..., None]:
        """A post_migrate receiver that installs the index once the table it
        indexes exists."""

        def receiver(sender, using="default", **kwargs) -> None:
            conn = connections[using]
            if indexed_table in conn.introspection.table_names():
                self.install(conn)

        return receiver
