"""The coarser rollup levels (0011) kept by the same triggers as the hourly one, then backfilled.

The trigger function (PostgreSQL) and the three triggers (SQLite) of 0010 gain, after the hourly
upsert and with the same sign (add NEW, subtract OLD):

* the record's **day** rows (``proxy_usagedayrollup``: UTC day × user × organization × model;
  ``proxy_userdayrollup``: the same without the model) and its **month** row
  (``proxy_usermonthrollup``: month × user × organization × model): per user, so they wait on no
  one a settlement does not already wait on (the user's or organization's wallet);
* its wallet owner's **month** row (``proxy_spendermonthrollup``: the user for their own wallet,
  the organization for requests billed to it), when the record charged something;
* a **journal** row (``proxy_modelrollupjournal``: hour × model deltas) for the operator-wide
  levels, an INSERT that waits on nothing; ``proxy.rollups.fold`` moves it into
  ``proxy_modelhourrollup``/``proxy_modeldayrollup``.

The hourly upsert stays first: ``proxy.rollups.rebuild`` locks the hourly table, so a settlement
it makes wait has written none of the others yet.

The backfill derives every new level from the hourly rollups (not the raw rows: hours whose raw
records were pruned keep their rollups, and the hourly table is a tenth of the raw one). At ten
million records that is one set-based pass over ~9 million hourly rows per level: minutes.
"""

import importlib

from django.db import migrations

TABLE = "proxy_usagerecord"
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
HOUR = {
    "postgresql": "date_trunc('hour', {r}.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    "sqlite": "substr({r}.created_at, 1, 13) || ':00:00'",
}
DAY = {
    "postgresql": "date_trunc('day', {r}.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    "sqlite": "substr({r}.created_at, 1, 10) || ' 00:00:00'",
}
MONTH = {
    "postgresql": "date_trunc('month', {r}.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    "sqlite": "substr({r}.created_at, 1, 7) || '-01 00:00:00'",
}
KEYS = ["user_id", "organization_id", "api_key_id", "model", "agent"]
DAY_KEYS = ["user_id", "organization_id", "model"]
GROUP = "COALESCE(organization_id, 0), COALESCE(api_key_id, 0), model, agent"


def _upsert(vendor, table, columns, values, target, added, when="true"):
    """INSERT … SELECT … WHERE … ON CONFLICT … DO UPDATE adding ``added`` (SQLite reads ON
    CONFLICT after a SELECT as a join clause unless a WHERE comes first)."""
    alias = " AS t" if vendor == "postgresql" else ""
    prefix = "t." if vendor == "postgresql" else ""
    sets = ", ".join(f"{name} = {prefix}{name} + excluded.{name}" for name in added)
    return (
        f"INSERT INTO {table}{alias} ({', '.join(columns)}) SELECT {', '.join(values)} WHERE {when} "
        f"ON CONFLICT {target} DO UPDATE SET {sets}"
    )


def statements(vendor: str, r: str, sign: str) -> list[str]:
    """Add (``sign`` "") or subtract ("-") the record ``r`` (NEW or OLD) to every level: the
    hourly row first (as 0010), then the day row, the journal and the payer's month."""
    sums = [f"{sign}({expression.format(r=r)})" for expression in SUMS.values()]
    keys = [f"{r}.{column}" for column in KEYS]
    hourly = _upsert(
        vendor,
        "proxy_usagerollup",
        ["hour", *KEYS, *SUMS],
        [HOUR[vendor].format(r=r), *keys, *sums],
        f"(user_id, hour, {GROUP})",
        SUMS,
    )
    daily = _upsert(
        vendor,
        "proxy_usagedayrollup",
        ["day", *DAY_KEYS, *SUMS],
        [DAY[vendor].format(r=r), *(f"{r}.{column}" for column in DAY_KEYS), *sums],
        "(user_id, day, COALESCE(organization_id, 0), model)",
        SUMS,
    )
    user_day = _upsert(
        vendor,
        "proxy_userdayrollup",
        ["day", "user_id", "organization_id", *SUMS],
        [DAY[vendor].format(r=r), f"{r}.user_id", f"{r}.organization_id", *sums],
        "(user_id, day, COALESCE(organization_id, 0))",
        SUMS,
    )
    user_month = _upsert(
        vendor,
        "proxy_usermonthrollup",
        ["month", *DAY_KEYS, *SUMS],
        [MONTH[vendor].format(r=r), *(f"{r}.{column}" for column in DAY_KEYS), *sums],
        "(user_id, month, COALESCE(organization_id, 0), model)",
        SUMS,
    )
    now = "now()" if vendor == "postgresql" else "CURRENT_TIMESTAMP"
    # (No value in it: the record's columns, in a trigger.)
    columns = ", ".join(["hour", "model", "created_at", *SUMS])
    values = ", ".join([HOUR[vendor].format(r=r), f"{r}.model", now, *sums])
    journal = f"INSERT INTO proxy_modelrollupjournal ({columns}) VALUES ({values})"  # noqa: S608
    spender = _upsert(
        vendor,
        "proxy_spendermonthrollup",
        ["month", "user_id", "organization_id", "charge"],
        [
            MONTH[vendor].format(r=r),
            f"CASE WHEN {r}.organization_id IS NULL THEN {r}.user_id END",
            f"{r}.organization_id",
            f"{sign}({r}.charge)",
        ],
        "(month, COALESCE(user_id, 0), COALESCE(organization_id, 0))",
        ["charge"],
        when=f"{r}.charge <> 0",
    )
    return [hourly, daily, user_day, user_month, journal, spender]


def _body(vendor, r, sign):
    return "; ".join(statements(vendor, r, sign)) + ";"


POSTGRES_FORWARD = [
    f"""CREATE OR REPLACE FUNCTION proxy_usage_rollup() RETURNS trigger AS $$
        BEGIN
            IF TG_OP = 'UPDATE' AND OLD.status <> 'pending' THEN
                {_body("postgresql", "OLD", "-")}
            END IF;
            IF NEW.status <> 'pending' THEN
                {_body("postgresql", "NEW", "")}
            END IF;
            RETURN NULL;
        END;
        $$ LANGUAGE plpgsql;""",
]


def _sqlite_forward(previous):
    changed = previous.changed("sqlite")
    return [
        *previous.SQLITE_REVERSE,
        f"""CREATE TRIGGER proxy_usage_rollup_insert AFTER INSERT ON {TABLE}
            WHEN NEW.status <> 'pending'
            BEGIN {_body("sqlite", "NEW", "")} END;""",
        f"""CREATE TRIGGER proxy_usage_rollup_update_out AFTER UPDATE ON {TABLE}
            WHEN OLD.status <> 'pending' AND ({changed})
            BEGIN {_body("sqlite", "OLD", "-")} END;""",
        f"""CREATE TRIGGER proxy_usage_rollup_update_in AFTER UPDATE ON {TABLE}
            WHEN NEW.status <> 'pending' AND ({changed})
            BEGIN {_body("sqlite", "NEW", "")} END;""",
    ]


def _previous():
    return importlib.import_module("proxy.migrations.0010_usage_rollup_triggers")


def _run(schema_editor, statements_by_vendor):
    vendor = schema_editor.connection.vendor
    sql = statements_by_vendor.get(vendor)
    if sql is None:
        raise RuntimeError(f"no usage rollup triggers written for {vendor}")
    for statement in sql:
        schema_editor.execute(statement, params=None)


def forward(apps, schema_editor):
    previous = _previous()
    _run(schema_editor, {"sqlite": _sqlite_forward(previous), "postgresql": POSTGRES_FORWARD})


def reverse(apps, schema_editor):
    previous = _previous()
    sqlite = [*previous.SQLITE_REVERSE, *previous.SQLITE_FORWARD]
    _run(schema_editor, {"sqlite": sqlite, "postgresql": previous.POSTGRES_FORWARD[:1]})


def backfill(apps, schema_editor):
    # After the triggers, under the rebuild's locks: a request settling meanwhile is counted once.
    from proxy.rollups import rebuild_levels

    rebuild_levels(apps=apps)
    if schema_editor.connection.vendor == "postgresql":
        # Planner statistics now, not at autovacuum's leisure: without them a user's totals
        # read the day table through the wrong index.
        tables = ("usagedayrollup", "userdayrollup", "usermonthrollup", "modelhourrollup", "modeldayrollup")
        for name in (*tables, "spendermonthrollup"):
            schema_editor.execute(f"ANALYZE proxy_{name}", params=None)


class Migration(migrations.Migration):
    dependencies = [("proxy", "0011_usage_rollup_levels")]
    operations = [
        migrations.RunPython(forward, reverse),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
