"""Reads behind the operator API's ``orgs`` resource: any organization, by staff (the users'
counterpart is ``user_selectors``). Unlike ``orgs.selectors`` nothing starts from a membership:
an operator sees every organization."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Max, Q, QuerySet
from django.http import Http404

from accounts.models import ApiKey
from infra.keyset import BY_ID, BY_TIME, Page, keyset_page
from orgs.models import Membership, Organization
from orgs.selectors import member_list, org_key_list
from proxy.models import UsageRecord
from wallet.models import Entry, Wallet
from wallet.selectors import entries_of

from .user_selectors import MAX_ID, spend_by_day


def org_search(*, q: str = "") -> QuerySet[Organization]:
    """Organizations whose name or slug contains ``q`` (case-insensitive), or whose id is ``q``;
    newest first."""
    orgs = Organization.objects.select_related("wallet")
    q = q.strip()
    if q:
        match = Q(name__icontains=q) | Q(slug__icontains=q)
        if q.isdigit() and len(q) < 19:
            match |= Q(pk=int(q))
        orgs = orgs.filter(match)
    return orgs.order_by("-id")


def org_get(*, org_id: int) -> Organization:
    org = Organization.objects.select_related("wallet").filter(pk=org_id).first() if org_id <= MAX_ID else None
    if org is None:
        raise Http404("no such organization")
    return org


def org_wallet_read(*, org: Organization) -> Wallet:
    """The organization's wallet as it is now; an empty one (unsaved) if it has none yet."""
    return Wallet.objects.filter(organization=org).first() or Wallet(organization=org)


def org_members(*, org: Organization) -> QuerySet[Membership]:
    return member_list(organization=org)


def org_keys(*, org: Organization) -> QuerySet[ApiKey]:
    return org_key_list(organization=org)


def org_key_get(*, org: Organization, key_id: int) -> ApiKey:
    key = org_keys(org=org).filter(pk=key_id).first() if key_id <= MAX_ID else None
    if key is None:
        raise Http404("no such API key for this organization")
    return key


def org_member_get(*, org: Organization, user_id: int) -> Membership:
    """The organization's membership of the user ``user_id``."""
    member = org_members(org=org).filter(user_id=user_id).first() if user_id <= MAX_ID else None
    if member is None:
        raise Http404("no such member of this organization")
    return member


@dataclass(frozen=True)
class OrgActivity:
    last_key_use: datetime | None  # of the organization's own keys, to the minute
    last_request: datetime | None  # the newest usage record billed to it
    last_entry: datetime | None  # the newest entry of its wallet

    @property
    def last_activity(self) -> datetime | None:
        moments = [m for m in vars(self).values() if m is not None]
        return max(moments) if moments else None


def org_activity(*, org: Organization) -> OrgActivity:
    return OrgActivity(
        last_key_use=ApiKey.objects.filter(organization=org).aggregate(at=Max("last_used_at"))["at"],
        last_request=UsageRecord.objects.filter(organization=org).aggregate(at=Max("created_at"))["at"],
        last_entry=Entry.objects.filter(wallet__organization=org).aggregate(at=Max("created_at"))["at"],
    )


def org_entries(*, org: Organization) -> QuerySet[Entry]:
    return entries_of(organization=org).order_by("-id")


def org_usage(*, org: Organization) -> QuerySet[UsageRecord]:
    return UsageRecord.objects.filter(organization=org).order_by("-created_at", "-id")


# --- the admin's per-organization staff page ----------------------------------------------------


def org_spend_by_day(*, org: Organization, since: datetime) -> list[dict]:
    """What the organization's wallet paid per day (UTC): see ``user_selectors.spend_by_day``."""
    usage = UsageRecord.objects.filter(organization=org)
    return spend_by_day(usage=usage, entries=Entry.objects.filter(wallet__organization=org), since=since)


def org_usage_page(*, org: Organization, after: str | None, size: int) -> Page:
    """A page of the requests billed to it, newest first, with who made each (keyset paged)."""
    records = org_usage(org=org).select_related("api_key", "user")
    return keyset_page(records, keyset=BY_TIME, after=after, size=size)


def org_entries_page(*, org: Organization, after: str | None, size: int) -> Page:
    return keyset_page(org_entries(org=org).select_related("member"), keyset=BY_ID, after=after, size=size)
