"""Index usage records in the lists' own order, ``(user, created_at, id)`` and
``(organization, created_at, id)``: a page at any depth is then one backward range scan with no
sort. The first replaces ``(user, created_at)`` (a prefix of it); the second the organization's
foreign-key index (which it leads with), so an organization's requests no longer sort in full.

Online on PostgreSQL (``atomic = False``): the new indexes are built ``CONCURRENTLY`` before the
old ones are dropped ``CONCURRENTLY``, so the proxy keeps writing records throughout and a
query always has an index to use. The foreign-key index goes by name, without ``AlterField``,
which would drop and re-check the foreign key itself (see 0002)."""

import django.db.models.deletion
from django.db import migrations, models

from infra.migration_ops import AddIndexOnline, RemoveIndexOnline, drop_indexes


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("orgs", "0002_organization_is_active"),
        ("proxy", "0007_usage_record_organization"),
    ]

    operations = [
        AddIndexOnline(
            model_name="usagerecord",
            index=models.Index(fields=["user", "created_at", "id"], name="usage_user_time_idx"),
        ),
        AddIndexOnline(
            model_name="usagerecord",
            index=models.Index(fields=["organization", "created_at", "id"], name="usage_org_time_idx"),
        ),
        RemoveIndexOnline(model_name="usagerecord", name="proxy_usage_user_id_a505ad_idx"),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="usagerecord",
                    name="organization",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="usage_records",
                        to="orgs.organization",
                    ),
                ),
            ],
            database_operations=[
                drop_indexes(
                    "proxy_usagerecord",
                    [("proxy_usagerecord_organization_id_26974250", "organization_id", False)],
                    concurrently=True,
                )
            ],
        ),
    ]
