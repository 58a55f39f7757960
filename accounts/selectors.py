"""Reads for accounts. A user only ever reaches their own keys: others' ids look like missing ones."""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import Http404

from .models import ApiKey, User


def api_key_list(*, user: User) -> QuerySet[ApiKey]:
    """Every key of the user, revoked ones included (they stay listed for the audit trail)."""
    return ApiKey.objects.filter(user=user).order_by("-created_at", "-id")


def api_key_get(*, user: User, key_id: int) -> ApiKey:
    key = ApiKey.objects.filter(user=user, pk=key_id).first()
    if key is None:
        raise Http404("no such API key")
    return key
