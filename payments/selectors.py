"""Reads for payments."""

from django.db.models import QuerySet

from .models import CreditPack


def pack_list() -> QuerySet[CreditPack]:
    return CreditPack.objects.filter(active=True).order_by("sort_order", "price", "id")
