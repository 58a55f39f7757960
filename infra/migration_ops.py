"""Migration operations shared by the apps' migrations (kept stable: migrations import them)."""

from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations


def drop_indexes(
    table: str, indexes: list[tuple[str, str, bool]], *, concurrently: bool = False
) -> migrations.RunPython:
    """Drop ``indexes`` of ``table`` by name, re-creating them on reverse.

    Each is ``(name, column, like)``; ``like`` marks PostgreSQL's ``varchar_pattern_ops`` twin of
    a character column's index, which exists only there. Used inside a ``SeparateDatabaseAndState``
    whose state side turns ``db_index`` off: letting ``AlterField`` drop a foreign key's index
    would also drop and re-add the foreign key itself, re-checking every row under lock.
    ``concurrently`` (a migration with ``atomic = False``): on PostgreSQL, drop and re-create
    without locking out writes to the table.
    """

    def forward(apps, schema_editor):
        how = _concurrently(schema_editor, concurrently)
        for name, _, _ in indexes:
            schema_editor.execute(f'DROP INDEX {how}IF EXISTS "{name}"')

    def backward(apps, schema_editor):
        postgres = schema_editor.connection.vendor == "postgresql"
        how = _concurrently(schema_editor, concurrently)
        for name, column, like in indexes:
            if like and not postgres:
                continue
            ops = " varchar_pattern_ops" if like else ""
            schema_editor.execute(f'CREATE INDEX {how}"{name}" ON "{table}" ("{column}"{ops})')

    return migrations.RunPython(forward, backward)


def _concurrently(schema_editor, wanted: bool) -> str:
    return "CONCURRENTLY " if wanted and schema_editor.connection.vendor == "postgresql" else ""


class AddIndexOnline(AddIndexConcurrently):
    """``AddIndex`` that on PostgreSQL builds the index ``CONCURRENTLY``: on a table of millions of
    rows a plain CREATE INDEX blocks every insert (every proxied request) until it is built.
    Elsewhere (SQLite) a plain ``AddIndex``. The migration must set ``atomic = False``."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        return migrations.AddIndex.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        return migrations.AddIndex.database_backwards(self, app_label, schema_editor, from_state, to_state)


class RemoveIndexOnline(RemoveIndexConcurrently):
    """``RemoveIndex`` that on PostgreSQL drops the index ``CONCURRENTLY``; a plain one elsewhere.
    The migration must set ``atomic = False``."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        return migrations.RemoveIndex.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        return migrations.RemoveIndex.database_backwards(self, app_label, schema_editor, from_state, to_state)
