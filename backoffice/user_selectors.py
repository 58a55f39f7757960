"""Reads behind the operator API's ``users`` resource and the admin's per-user staff page: any
account, by staff. Organizations have theirs beside it, ``org_selectors``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count, Max, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.http import Http404

from accounts.models import ApiKey, TokenFamily, User
from infra.keyset import BY_ID, BY_TIME, Page, keyset_page
from proxy.models import UsageRecord
from wallet.models import Entry, EntryKind
from wallet.selectors import entries_of

MAX_ID = 2**63 - 1  # a larger id in a URL matches nothing (and SQLite could not even compare it)


def user_search(*, q: str = "", is_active: bool | None = None, is_staff: bool | None = None) -> QuerySet[User]:
    """Accounts whose email contains ``q`` (case-insensitive), or whose id is ``q``; newest first."""
    users = User.objects.select_related("wallet")
    q = q.strip()
    if q:
        match = Q(email__icontains=q)
        if q.isdigit() and len(q) < 19:
            match |= Q(pk=int(q))
        users = users.filter(match)
    if is_active is not None:
        users = users.filter(is_active=is_active)
    if is_staff is not None:
        users = users.filter(is_staff=is_staff)
    return users.order_by("-id")


def user_get(*, user_id: int) -> User:
    user = User.objects.select_related("wallet").filter(pk=user_id).first() if user_id <= MAX_ID else None
    if user is None:
        raise Http404("no such user")
    return user


def user_key_get(*, user: User, key_id: int) -> ApiKey:
    key = ApiKey.objects.filter(user=user, pk=key_id).first() if key_id <= MAX_ID else None
    if key is None:
        raise Http404("no such API key for this user")
    return key


def user_session_get(*, user: User, session_id: str) -> TokenFamily:
    from uuid import UUID

    try:
        pk = UUID(str(session_id))
    except ValueError:
        raise Http404("no such login for this user") from None
    family = TokenFamily.objects.filter(user=user, pk=pk).first()
    if family is None:
        raise Http404("no such login for this user")
    return family


@dataclass(frozen=True)
class Activity:
    last_login: datetime | None  # portal or admin sign-in (Django's last_login)
    last_key_use: datetime | None  # to the minute: keys record their use at most once a minute
    last_app_use: datetime | None  # a desktop login signed in or refreshed
    last_request: datetime | None  # the newest usage record
    last_entry: datetime | None  # the newest ledger entry

    @property
    def last_activity(self) -> datetime | None:
        moments = [m for m in vars(self).values() if m is not None]
        return max(moments) if moments else None


def user_activity(*, user: User) -> Activity:
    """Five indexed MAX() reads: when the account last did anything we record."""
    return Activity(
        last_login=user.last_login,
        last_key_use=ApiKey.objects.filter(user=user).aggregate(at=Max("last_used_at"))["at"],
        last_app_use=TokenFamily.objects.filter(user=user).aggregate(at=Max("last_used_at"))["at"],
        last_request=UsageRecord.objects.filter(user=user).aggregate(at=Max("created_at"))["at"],
        last_entry=Entry.objects.filter(wallet__user=user).aggregate(at=Max("created_at"))["at"],
    )


def user_keys(*, user: User) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(user=user).order_by("-created_at", "-id")


def user_sessions(*, user: User) -> QuerySet[TokenFamily]:
    """Active logins (desktop apps, API sign-ins), most recently used first."""
    from django.db.models import F

    return TokenFamily.objects.filter(user=user, revoked_at__isnull=True).order_by(
        F("last_used_at").desc(nulls_last=True), "-created_at"
    )


def user_entries(*, user: User) -> QuerySet[Entry]:
    return entries_of(user=user).order_by("-id")


def user_usage(*, user: User) -> QuerySet[UsageRecord]:
    return UsageRecord.objects.filter(user=user).order_by("-created_at", "-id")


# --- the admin's per-user staff page ----------------------------------------------------------


def user_spend_by_day(*, user: User, since: datetime) -> list[dict]:
    """What the account's own wallet paid per day (UTC) since ``since``: see ``spend_by_day``.
    Requests it made on an organization's wallet are that organization's spend (its own page, and
    the top spenders), not counted here twice."""
    usage = UsageRecord.objects.filter(user=user, organization__isnull=True)
    return spend_by_day(usage=usage, entries=Entry.objects.filter(wallet__user=user), since=since)


def spend_by_day(*, usage: QuerySet[UsageRecord], entries: QuerySet[Entry], since: datetime) -> list[dict]:
    """Spending per day (UTC) since ``since``, oldest first, days without spending left out:
    ``day``, ``requests``, ``usage`` (model usage debited, from ``usage``) and ``tools`` (tool
    charges among ``entries``), in nanodollars. Two grouped reads."""
    days: dict = {}
    by_day = (
        usage.filter(created_at__gte=since)
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(requests=Count("id"), charged=Sum("charge", default=0))
        .order_by()
    )
    for found in by_day:
        days[found["day"]] = {"requests": found["requests"], "usage": int(found["charged"]), "tools": 0}
    tools = (
        entries.filter(kind=EntryKind.CHARGE, created_at__gte=since)
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(total=Sum("amount", default=0))
        .order_by()
    )
    for found in tools:
        days.setdefault(found["day"], {"requests": 0, "usage": 0, "tools": 0})["tools"] = -int(found["total"])
    return [{"day": day, **days[day]} for day in sorted(days)]


def user_usage_page(*, user: User, after: str | None, size: int) -> Page:
    return keyset_page(user_usage(user=user).select_related("api_key"), keyset=BY_TIME, after=after, size=size)


def user_entries_page(*, user: User, after: str | None, size: int) -> Page:
    return keyset_page(user_entries(user=user), keyset=BY_ID, after=after, size=size)
