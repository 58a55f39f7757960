"""Reads for organizations. Every lookup starts from the caller's membership, so a non-member
can reach nothing: an organization they are not in looks exactly like one that does not exist."""

from __future__ import annotations

import re

from django.db.models import QuerySet

from accounts.models import ApiKey, User
from core.numbers import parse_id
from wallet.models import Wallet

from .models import Invitation, Membership, Organization


def memberships_of(*, user: User) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("organization").order_by("organization__name", "id")


_SLUG = re.compile(r"[-a-zA-Z0-9_]{1,50}")


def membership_for(*, user: User, org: str | int) -> Membership | None:
    """The user's membership of the organization ``org`` names — its id, or its slug — or None
    (also for anything that could be neither: it is never sent to the database)."""
    # The organization's wallet rides along: a request billing the organization needs it next.
    memberships = Membership.objects.select_related("organization__wallet").filter(user=user)
    text = str(org).strip()
    try:
        return memberships.filter(organization_id=parse_id(text)).first()
    except ValueError:
        return memberships.filter(organization__slug=text).first() if _SLUG.fullmatch(text) else None


def member_list(*, organization: Organization) -> QuerySet[Membership]:
    return Membership.objects.filter(organization=organization).select_related("user").order_by("created_at", "id")


def member_get(*, organization: Organization, member_id: int) -> Membership | None:
    """A membership by its id, within the organization."""
    return member_list(organization=organization).filter(pk=member_id).first()


def invitation_list(*, organization: Organization) -> QuerySet[Invitation]:
    return Invitation.objects.filter(organization=organization).order_by("-created_at", "-id")


def invitation_get(*, organization: Organization, invitation_id: int) -> Invitation | None:
    return invitation_list(organization=organization).filter(pk=invitation_id).first()


def org_key_list(*, organization: Organization) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(organization=organization).select_related("user").order_by("-created_at", "-id")


def org_key_get(*, organization: Organization, key_id: int) -> ApiKey | None:
    return org_key_list(organization=organization).filter(pk=key_id).first()


def org_wallet(*, organization: Organization) -> Wallet:
    wallet, _ = Wallet.objects.get_or_create(organization=organization)
    return wallet
