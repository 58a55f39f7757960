"""Reads for accounts. A user only ever reaches their own keys and sessions: others' ids look
like missing ones."""

from __future__ import annotations

import uuid

from django.db.models import F, QuerySet
from django.http import Http404

from .models import ApiKey, TokenFamily, User


def api_key_list(*, user: User) -> QuerySet[ApiKey]:
    """Every key of the user, revoked ones included (they stay listed for the audit trail); an
    organization's keys are the organization's (``orgs``), not the member's who made them."""
    return ApiKey.objects.filter(user=user, organization__isnull=True).order_by("-created_at", "-id")


def api_key_get(*, user: User, key_id: int) -> ApiKey:
    key = api_key_list(user=user).filter(pk=key_id).first()
    if key is None:
        raise Http404("no such API key")
    return key


def token_family_list(*, user: User) -> QuerySet[TokenFamily]:
    """The user's signed-in apps (active token families), most recently used first."""
    return TokenFamily.objects.filter(user=user, revoked_at__isnull=True).order_by(
        F("last_used_at").desc(nulls_last=True), "-created_at"
    )


def token_family_get(*, user: User, family_id: str) -> TokenFamily:
    """One of the user's active token families; 404 for a revoked one, anyone else's, or no id."""
    try:
        pk = uuid.UUID(str(family_id))
    except ValueError:
        raise Http404("no such session") from None
    family = token_family_list(user=user).filter(pk=pk).first()
    if family is None:
        raise Http404("no such session")
    return family
