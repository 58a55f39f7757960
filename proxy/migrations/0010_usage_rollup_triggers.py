"""Usage rollups kept by the database: triggers on ``proxy_usagerecord``, then the backfill.

A record adds its figures to its rollup row (``proxy_usagerollup``, one per hour × user ×
organization × key × model × agent) when it is inserted or updated out of ``pending`` and, once
settled, moves the difference on every later change of a summed or grouping column (subtract
the old row, add the new one). In flight (pending → pending: the proxy's hold insert and its
progress writes) the trigger's WHEN clause is false and nothing runs. DELETE has no trigger on
purpose: pruning raw rows keeps their sums.

Why triggers rather than one more part of the proxy's settlement statement: they are exact for
every writer — the proxy's statements, ``reconcile_holds``' ORM saves, staff SQL — with nothing
to forget, they run inside the statement that changes the record (no extra round trip; the hot
path's statement count is unchanged) and the hold and wallet code does not learn about usage.
The SQL is written here, per vendor, with its reverse (as the ledger's append-only triggers).
"""

from django.db import migrations

TABLE = "proxy_usagerecord"
ROLLUP = "proxy_usagerollup"
KEY = ["hour", "user_id", "organization_id", "api_key_id", "model", "agent"]
# The conflict target: the unique index ``usagerollup_one_row_per_group``.
TARGET = "(user_id, hour, COALESCE(organization_id, 0), COALESCE(api_key_id, 0), model, agent)"
SUMS = {
    "requests": "1",
    "refused": "CASE WHEN {r}.status = 'refused' THEN 1 ELSE 0 END",
    "prompt_tokens": "{r}.prompt_tokens",
    "completion_tokens": "{r}.completion_tokens",
    "reasoning_tokens": "{r}.reasoning_tokens",
    "cached_tokens": "{r}.cached_tokens",
    "cache_write_tokens": "{r}.cache_write_tokens",
    "upstream_cost": "COALESCE({r}.upstream_cost, 0)",
    "charge": "{r}.charge",
    "operator_loss": "{r}.operator_loss",
    "loss_requests": "CASE WHEN {r}.operator_loss > 0 THEN 1 ELSE 0 END",
}
# A settled record's change of any of these moves its figures (or its group).
WATCHED = [
    "status",
    "created_at",
    "user_id",
    "organization_id",
    "api_key_id",
    "model",
    "agent",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "upstream_cost",
    "charge",
    "operator_loss",
]
HOUR = {
    "postgresql": "date_trunc('hour', {r}.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    # Django keeps SQLite timestamps as UTC text, 'YYYY-MM-DD HH:MM:SS[.ffffff]'.
    "sqlite": "substr({r}.created_at, 1, 13) || ':00:00'",
}


def upsert(vendor: str, r: str, sign: str) -> str:
    """Add (``sign`` "") or subtract ("-") the record ``r`` (NEW or OLD) to its rollup row."""
    values = [HOUR[vendor].format(r=r), *(f"{r}.{column}" for column in KEY[1:])]
    values += [f"{sign}({expression.format(r=r)})" for expression in SUMS.values()]
    target = "t." if vendor == "postgresql" else ""
    alias = " AS t" if vendor == "postgresql" else ""
    added = ", ".join(f"{name} = {target}{name} + excluded.{name}" for name in SUMS)
    # (SQLite reads ON CONFLICT after INSERT … SELECT as a join clause unless a WHERE comes first.)
    rows = f"VALUES ({', '.join(values)})" if vendor == "postgresql" else f"SELECT {', '.join(values)} WHERE true"
    return f"INSERT INTO {ROLLUP}{alias} ({', '.join([*KEY, *SUMS])}) {rows} ON CONFLICT {TARGET} DO UPDATE SET {added}"


def changed(vendor: str) -> str:
    differs = "IS DISTINCT FROM" if vendor == "postgresql" else "IS NOT"
    return " OR ".join(f"OLD.{column} {differs} NEW.{column}" for column in WATCHED)


POSTGRES_FORWARD = [
    f"""CREATE OR REPLACE FUNCTION proxy_usage_rollup() RETURNS trigger AS $$
        BEGIN
            IF TG_OP = 'UPDATE' AND OLD.status <> 'pending' THEN
                {upsert("postgresql", "OLD", "-")};
            END IF;
            IF NEW.status <> 'pending' THEN
                {upsert("postgresql", "NEW", "")};
            END IF;
            RETURN NULL;
        END;
        $$ LANGUAGE plpgsql;""",
    f"""CREATE TRIGGER proxy_usage_rollup_insert AFTER INSERT ON {TABLE}
        FOR EACH ROW WHEN (NEW.status <> 'pending') EXECUTE FUNCTION proxy_usage_rollup();""",
    f"""CREATE TRIGGER proxy_usage_rollup_update AFTER UPDATE ON {TABLE}
        FOR EACH ROW WHEN ((OLD.status <> 'pending' OR NEW.status <> 'pending') AND ({changed("postgresql")}))
        EXECUTE FUNCTION proxy_usage_rollup();""",
]
POSTGRES_REVERSE = [
    f"DROP TRIGGER IF EXISTS proxy_usage_rollup_update ON {TABLE};",
    f"DROP TRIGGER IF EXISTS proxy_usage_rollup_insert ON {TABLE};",
    "DROP FUNCTION IF EXISTS proxy_usage_rollup();",
]

SQLITE_FORWARD = [
    f"""CREATE TRIGGER proxy_usage_rollup_insert AFTER INSERT ON {TABLE}
        WHEN NEW.status <> 'pending'
        BEGIN {upsert("sqlite", "NEW", "")}; END;""",
    # Two triggers for the two halves of an update (SQLite triggers have no IF): the old figures
    # out if they were in, the new ones in if they are settled.
    f"""CREATE TRIGGER proxy_usage_rollup_update_out AFTER UPDATE ON {TABLE}
        WHEN OLD.status <> 'pending' AND ({changed("sqlite")})
        BEGIN {upsert("sqlite", "OLD", "-")}; END;""",
    f"""CREATE TRIGGER proxy_usage_rollup_update_in AFTER UPDATE ON {TABLE}
        WHEN NEW.status <> 'pending' AND ({changed("sqlite")})
        BEGIN {upsert("sqlite", "NEW", "")}; END;""",
]
SQLITE_REVERSE = [
    "DROP TRIGGER IF EXISTS proxy_usage_rollup_update_in;",
    "DROP TRIGGER IF EXISTS proxy_usage_rollup_update_out;",
    "DROP TRIGGER IF EXISTS proxy_usage_rollup_insert;",
]


def _run(schema_editor, sqlite, postgres):
    vendor = schema_editor.connection.vendor
    statements = {"sqlite": sqlite, "postgresql": postgres}.get(vendor)
    if statements is None:
        raise RuntimeError(f"no usage rollup triggers written for {vendor}")
    for sql in statements:
        schema_editor.execute(sql, params=None)


def forward(apps, schema_editor):
    _run(schema_editor, SQLITE_FORWARD, POSTGRES_FORWARD)


def reverse(apps, schema_editor):
    _run(schema_editor, SQLITE_REVERSE, POSTGRES_REVERSE)


def backfill(apps, schema_editor):
    # After the triggers: the rebuild locks the rollups, so a request settling meanwhile is
    # counted once (see proxy.rollups.rebuild). The coarser levels come later (0012).
    from proxy.rollups import rebuild

    rebuild(
        records=apps.get_model("proxy", "UsageRecord"), rollups=apps.get_model("proxy", "UsageRollup"), levels=False
    )


class Migration(migrations.Migration):
    dependencies = [("proxy", "0009_usage_rollup")]
    operations = [
        migrations.RunPython(forward, reverse),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
