"""Database-enforced append-only ledger: UPDATE and DELETE on wallet_entry are refused.

The model refuses them too, but only the database stops raw SQL, a bulk ``.update()`` or a
future bug. One trigger set per vendor, each with its reverse.
"""

from django.db import migrations

SQLITE_FORWARD = [
    """CREATE TRIGGER wallet_entry_no_update BEFORE UPDATE ON wallet_entry
       BEGIN SELECT RAISE(ABORT, 'wallet_entry is append-only'); END;""",
    """CREATE TRIGGER wallet_entry_no_delete BEFORE DELETE ON wallet_entry
       BEGIN SELECT RAISE(ABORT, 'wallet_entry is append-only'); END;""",
]
SQLITE_REVERSE = ["DROP TRIGGER IF EXISTS wallet_entry_no_update;", "DROP TRIGGER IF EXISTS wallet_entry_no_delete;"]

POSTGRES_FORWARD = [
    """CREATE OR REPLACE FUNCTION wallet_entry_append_only() RETURNS trigger AS $$
       BEGIN RAISE EXCEPTION 'wallet_entry is append-only'; END;
       $$ LANGUAGE plpgsql;""",
    """CREATE TRIGGER wallet_entry_no_update BEFORE UPDATE OR DELETE ON wallet_entry
       FOR EACH ROW EXECUTE FUNCTION wallet_entry_append_only();""",
    # TRUNCATE bypasses row triggers, so refuse it with a statement trigger.
    """CREATE TRIGGER wallet_entry_no_truncate BEFORE TRUNCATE ON wallet_entry
       FOR EACH STATEMENT EXECUTE FUNCTION wallet_entry_append_only();""",
]
POSTGRES_REVERSE = [
    "DROP TRIGGER IF EXISTS wallet_entry_no_truncate ON wallet_entry;",
    "DROP TRIGGER IF EXISTS wallet_entry_no_update ON wallet_entry;",
    "DROP FUNCTION IF EXISTS wallet_entry_append_only();",
]


def forward(apps, schema_editor):
    _run(schema_editor, SQLITE_FORWARD, POSTGRES_FORWARD)


def reverse(apps, schema_editor):
    _run(schema_editor, SQLITE_REVERSE, POSTGRES_REVERSE)


def _run(schema_editor, sqlite, postgres):
    vendor = schema_editor.connection.vendor
    statements = {"sqlite": sqlite, "postgresql": postgres}.get(vendor)
    if statements is None:
        raise RuntimeError(f"no append-only triggers written for {vendor}")
    for sql in statements:
        schema_editor.execute(sql)


class Migration(migrations.Migration):
    dependencies = [("wallet", "0001_initial")]
    operations = [migrations.RunPython(forward, reverse)]
