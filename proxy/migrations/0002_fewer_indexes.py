"""Drop the usage record's indexes that no query uses: each is written twice per proxied request
(the insert, then the settlement's update, which changes indexed columns and so is never HOT).

Only the indexes go, by name (``DROP INDEX IF EXISTS``): letting ``AlterField`` do it would also
drop and re-create the foreign keys, re-checking every row of the table under lock."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

from infra.migration_ops import drop_indexes

# (index, column, is it PostgreSQL's varchar_pattern_ops twin for LIKE queries)
UNUSED = [
    ("proxy_usagerecord_user_id_f9832232", "user_id", False),  # (user, created_at) leads with it
    ("proxy_usagerecord_price_id_b03f13ec", "price_id", False),  # price versions are never deleted
    ("proxy_usagerecord_generation_id_75d52b96", "generation_id", False),  # never looked up by it
    ("proxy_usagerecord_generation_id_75d52b96_like", "generation_id", True),
    ("proxy_usagerecord_run_838d78b8", "run", False),  # run limits count in the cache
    ("proxy_usagerecord_run_838d78b8_like", "run", True),
    ("proxy_usagerecord_request_id_5a0eb1ca_like", "request_id", True),  # looked up by equality only
]


class Migration(migrations.Migration):
    dependencies = [
        ("proxy", "0001_initial"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="usagerecord",
                    name="generation_id",
                    field=models.CharField(blank=True, max_length=200),
                ),
                migrations.AlterField(
                    model_name="usagerecord",
                    name="price",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="proxy.modelprice",
                    ),
                ),
                migrations.AlterField(
                    model_name="usagerecord",
                    name="run",
                    field=models.CharField(blank=True, max_length=200),
                ),
                migrations.AlterField(
                    model_name="usagerecord",
                    name="user",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="usage_records",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
            database_operations=[drop_indexes("proxy_usagerecord", UNUSED)],
        ),
    ]
