"""Migration operations shared by the apps' migrations (kept stable: migrations import them)."""

from django.db import migrations


def drop_indexes(table: str, indexes: list[tuple[str, str, bool]]) -> migrations.RunPython:
    """Drop ``indexes`` of ``table`` by name, re-creating them on reverse.

    Each is ``(name, column, like)``; ``like`` marks PostgreSQL's ``varchar_pattern_ops`` twin of
    a character column's index, which exists only there. Used inside a ``SeparateDatabaseAndState``
    whose state side turns ``db_index`` off: letting ``AlterField`` drop a foreign key's index
    would also drop and re-add the foreign key itself, re-checking every row under lock.
    """

    def forward(apps, schema_editor):
        for name, _, _ in indexes:
            schema_editor.execute(f'DROP INDEX IF EXISTS "{name}"')

    def backward(apps, schema_editor):
        postgres = schema_editor.connection.vendor == "postgresql"
        for name, column, like in indexes:
            if like and not postgres:
                continue
            ops = " varchar_pattern_ops" if like else ""
            schema_editor.execute(f'CREATE INDEX "{name}" ON "{table}" ("{column}"{ops})')

    return migrations.RunPython(forward, backward)
