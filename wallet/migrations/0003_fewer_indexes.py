"""Drop two ledger indexes no query needs, each written on every proxied request: the entry's
own wallet index ((wallet, idempotency_key) and (wallet, kind, created_at) lead with the wallet)
and the hold's LIKE twin of its request id (looked up by equality only). By name, as
``infra.migration_ops.drop_indexes`` explains."""

import django.db.models.deletion
from django.db import migrations, models

from infra.migration_ops import drop_indexes


class Migration(migrations.Migration):
    dependencies = [
        ("wallet", "0002_append_only_triggers"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="entry",
                    name="wallet",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="entries",
                        to="wallet.wallet",
                    ),
                ),
            ],
            database_operations=[
                drop_indexes("wallet_entry", [("wallet_entry_wallet_id_008ca9ae", "wallet_id", False)])
            ],
        ),
        drop_indexes("wallet_hold", [("wallet_hold_request_id_c3beb433_like", "request_id", True)]),
    ]
