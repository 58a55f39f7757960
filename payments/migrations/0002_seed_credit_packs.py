from django.db import migrations


def forwards(apps, schema_editor):
    from payments.seed import seed_packs

    seed_packs(apps.get_model("payments", "CreditPack"))


class Migration(migrations.Migration):
    dependencies = [("payments", "0001_initial")]

    # Reverse is a no-op: packs may already have checkouts and payments pointing at them.
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
