"""The default credit packs and their provider ids, shared by the data migration and
``manage.py seed_packs``. Takes the model class as an argument so a migration can pass its
historical model."""

from django.conf import settings

NANOS_PER_USD = 10**9

# (slug, name, price USD, credit USD, LS variant setting, Stripe price setting, sort order)
DEFAULT_PACKS = [
    ("starter", "Starter", 10, 10, "LEMONSQUEEZY_VARIANT_STARTER", "STRIPE_PRICE_STARTER", 10),
    ("pro", "Pro", 25, 26, "LEMONSQUEEZY_VARIANT_PRO", "STRIPE_PRICE_PRO", 20),
]


def seed_packs(pack_model) -> list[str]:
    """Create missing default packs and fill empty provider ids from the environment.

    Idempotent. Existing packs keep their name, price and credit; an id staff typed in the admin
    is never overwritten — the environment only fills what is still empty. Returns what changed.
    """
    changes = []
    for slug, name, price, credit, variant_setting, price_setting, order in DEFAULT_PACKS:
        pack, created = pack_model.objects.get_or_create(
            slug=slug,
            defaults={
                "name": name,
                "price": price * NANOS_PER_USD,
                "credit": credit * NANOS_PER_USD,
                "currency": "USD",
                "sort_order": order,
            },
        )
        if created:
            changes.append(f"created pack {slug}")
        updates = {}
        variant = getattr(settings, variant_setting, "")
        if variant and not pack.lemonsqueezy_variant_id:
            updates["lemonsqueezy_variant_id"] = variant
        stripe_price = getattr(settings, price_setting, "")
        if stripe_price and not pack.stripe_price_id:
            updates["stripe_price_id"] = stripe_price
        if updates:
            pack_model.objects.filter(pk=pack.pk).update(**updates)
            changes.extend(f"set {slug}.{field}" for field in updates)
    return changes
