"""Index entries by (wallet, id): every list of a wallet's entries is newest first by id, and a
deep page then seeks to its cursor instead of sorting the wallet's whole history.

Built ``CONCURRENTLY`` on PostgreSQL (``atomic = False``): the ledger keeps taking entries while a
table of millions of rows is indexed."""

from django.db import migrations, models

from infra.migration_ops import AddIndexOnline


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("wallet", "0006_wallet_owned_by_user_or_organization"),
    ]

    operations = [
        AddIndexOnline(model_name="entry", index=models.Index(fields=["wallet", "id"], name="entry_wallet_id_idx")),
    ]
