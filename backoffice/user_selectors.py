"""Reads behind the operator API's ``users`` resource (and the admin's per-user page): any
account, by staff. Organizations, when they come, get a resource of their own beside this one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Max, Q, QuerySet
from django.http import Http404

from accounts.models import ApiKey, TokenFamily, User
from proxy.models import UsageRecord
from wallet.models import Entry

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
    return Entry.objects.filter(wallet__user=user).order_by("-id")


def user_usage(*, user: User) -> QuerySet[UsageRecord]:
    return UsageRecord.objects.filter(user=user).order_by("-created_at", "-id")
