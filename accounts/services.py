"""State changes for accounts: sign-up, API keys, desktop token families."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core import signing
from django.db import transaction
from django.utils import timezone

from core.money import usd_to_nanos
from notify.models import EventType
from notify.services import event_emit
from wallet import events
from wallet.models import EntryKind
from wallet.services import wallet_credit, wallet_get_or_create

from .limits import own_limits_check, user_limits_clean
from .models import DEFAULT_SESSION_NAME, ApiKey, RefreshToken, Scope, TokenFamily, User

ACCESS_SALT = "tokentill.access"
API_KEY_PREFIX = "tt_"


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class AccountError(Exception):
    pass


class InvalidRefreshToken(AccountError):
    pass


@dataclass
class TokenPair:
    access: str
    refresh: str
    expires_in: int
    family_id: uuid.UUID  # the login these tokens belong to


def user_signup(*, email: str, password: str) -> User:
    """Create the user and their wallet together; grant the trial credit exactly once."""
    with transaction.atomic(savepoint=False):
        user = User.objects.create_user(email=email, password=password)
        wallet = wallet_get_or_create(user=user)
        trial = usd_to_nanos(settings.SIGNUP_TRIAL_CREDIT)
        if trial > 0:
            # Keyed by user id: however often sign-up logic re-runs, the trial posts once.
            wallet_credit(
                wallet=wallet,
                amount=trial,
                kind=EntryKind.TRIAL,
                idempotency_key=f"trial:signup:{user.pk}",
                description="Sign-up trial credit",
            )
    return user


# --- a user's own limits ---------------------------------------------------------------------


def user_own_limits_set(*, user: User, limits: dict) -> User:
    """Replace the user's own budget (``User.own_limits``; a missing or null limit: none of their
    own). Raises Django's ``ValidationError``, by limit name, for a limit that is not one, or that
    is looser than what staff set (a user may only tighten; ``accounts.limits``). The staff's
    limits are read under the row's lock, so a staff change cannot slip between check and save."""
    own = user_limits_clean(limits, by_field=True)
    with transaction.atomic():
        staff = User.objects.select_for_update().values_list("limits", flat=True).get(pk=user.pk)
        own_limits_check(staff=staff, own=own)
        User.objects.filter(pk=user.pk).update(own_limits=own)
    user.own_limits = own
    return user


# --- API keys ---------------------------------------------------------------------------------


def api_key_create(
    *, user: User, name: str, expires_at=None, limits: dict | None = None, scopes: list[str] | None = None
) -> tuple[ApiKey, str]:
    """Returns the key row and the secret, which is shown once and never stored."""
    secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        user=user,
        name=name,
        prefix=secret[: ApiKey.PREFIX_LENGTH],
        key_hash=sha256_hex(secret),
        expires_at=expires_at,
        scopes=scopes or [Scope.PROXY],
    )
    if limits is not None:
        key.limits = limits
    with transaction.atomic(savepoint=False):
        key.save()
        event_emit(type=EventType.KEY_CREATED, user_id=user.pk, data={"api_key": _key_data(key)})
    return key, secret


class OperatorKeyRefused(AccountError):
    """Who may mint an operator key, and for whom, is narrower than any other key."""


def operator_key_create(*, user: User, name: str, minted_by: User, expires_at=None) -> tuple[ApiKey, str]:
    """An API key with only the ``admin`` scope: the operator API's credential (``/api/admin/``).

    Only a superuser mints one, and only for an active staff user: it acts with staff powers
    over every customer account, so it must not be within reach of staff who could then grant
    it to themselves. It has no ``proxy`` scope, and the rest of the API refuses it.
    """
    if not (minted_by.is_active and minted_by.is_superuser):
        raise OperatorKeyRefused("only a superuser can mint an operator key")
    if not (user.is_active and user.is_staff):
        raise OperatorKeyRefused("an operator key can only belong to an active staff user")
    return api_key_create(user=user, name=name, expires_at=expires_at, scopes=[Scope.ADMIN])


def _key_data(key: ApiKey) -> dict:
    """An API key as the ``key.*`` events describe it (never its secret or hash)."""
    return {
        "id": key.pk,
        "name": key.name,
        "prefix": key.prefix,
        "scopes": list(key.scopes or []),
        "created_at": key.created_at.isoformat(),
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


def api_key_update(*, key: ApiKey, name: str | None = None, limits: dict | None = None) -> ApiKey:
    fields = []
    if name is not None:
        key.name = name
        fields.append("name")
    if limits is not None:
        key.limits = limits
        fields.append("limits")
    if fields:
        key.save(update_fields=fields)
    return key


def api_key_revoke(*, key: ApiKey) -> ApiKey:
    """Revoked keys stay in the table for the audit trail (usage records point at them). Open
    ``/ws/events`` sockets authenticated with the key are closed once the revocation commits."""
    if key.revoked_at is not None:
        return key
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        # Conditional: of two revocations racing, one revokes (and announces it); the other finds it done.
        revoked = ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=now)
        key.refresh_from_db(fields=["revoked_at"])
        if revoked:
            event_emit(type=EventType.KEY_REVOKED, user_id=key.user_id, data={"api_key": _key_data(key)})
            events.publish_revocation_on_commit(key.user_id, events.api_key_credential(key.pk))
    return key


# --- The account as a whole -------------------------------------------------------------------


def user_set_active(*, user: User, active: bool) -> bool:
    """Disable or enable an account; True when this call changed it. A disabled account's
    credentials all stop working at once (``accounts.auth`` checks ``is_active`` on every
    lookup), and its open ``/ws/events`` sockets close once this commits."""
    with transaction.atomic(savepoint=False):
        changed = User.objects.filter(pk=user.pk).exclude(is_active=active).update(is_active=active)
        if changed and not active:
            events.publish_revocation_on_commit(user.pk, None)
    user.is_active = active
    return bool(changed)


def token_families_revoke_all(*, user: User, reason: str) -> int:
    """Sign the user out of every app (every active login); how many were ended."""
    with transaction.atomic(savepoint=False):
        families = list(TokenFamily.objects.filter(user=user, revoked_at__isnull=True))
        for family in families:
            _family_revoke(family, reason=reason)
    return len(families)


# --- Desktop tokens ---------------------------------------------------------------------------


def _issue(family: TokenFamily) -> TokenPair:
    refresh = "ttr_" + secrets.token_urlsafe(32)
    RefreshToken.objects.create(
        family=family,
        token_hash=sha256_hex(refresh),
        expires_at=timezone.now() + timedelta(seconds=settings.REFRESH_TOKEN_TTL),
    )
    access = signing.dumps({"f": str(family.pk)}, salt=ACCESS_SALT, compress=False)
    return TokenPair(access=access, refresh=refresh, expires_in=settings.ACCESS_TOKEN_TTL, family_id=family.pk)


def token_pair_issue(*, user: User, name: str = DEFAULT_SESSION_NAME) -> TokenPair:
    """A new login (token family) named ``name`` — what the user sees in "Signed-in apps"."""
    with transaction.atomic(savepoint=False):
        return _issue(TokenFamily.objects.create(user=user, name=name, last_used_at=timezone.now()))


def token_refresh(*, refresh: str) -> TokenPair:
    """Rotate a refresh token.

    Presenting a token that was already used means two parties hold it: one of them stole it.
    We cannot tell which, so the whole family (every device session descended from that login)
    is revoked and both must log in again — the standard refresh-token-reuse defence.
    """
    now = timezone.now()
    # Every refusal is decided inside the block but raised after it: an exception leaving an
    # atomic(savepoint=False) block marks a caller's enclosing transaction as broken, and the
    # reuse revocation must commit anyway.
    failure = None
    with transaction.atomic(savepoint=False):
        token = (
            RefreshToken.objects.select_for_update()
            .select_related("family", "family__user")
            .filter(token_hash=sha256_hex(refresh or ""))
            .first()
        )
        if token is None:
            failure = "unknown refresh token"
        elif token.family.revoked_at is not None or not token.family.user.is_active:
            failure = "this session has been revoked"
        elif token.used_at is not None:
            family = token.family
            family.revoked_at, family.revoked_reason = now, "refresh_token_reuse"
            family.save(update_fields=["revoked_at", "revoked_reason"])
            events.publish_revocation_on_commit(family.user_id, events.token_family_credential(family.pk))
            failure = "refresh token reuse detected; every session of this login is revoked"
        elif token.expires_at <= now:
            failure = "refresh token expired"
        else:
            token.used_at = now
            token.save(update_fields=["used_at"])
            TokenFamily.objects.filter(pk=token.family_id).update(last_used_at=now)
            pair = _issue(token.family)
    if failure is not None:
        raise InvalidRefreshToken(failure)
    return pair


def token_logout(*, refresh: str) -> None:
    # Looked up before the write so an unknown token raises outside any atomic block (see above).
    token = RefreshToken.objects.select_related("family").filter(token_hash=sha256_hex(refresh or "")).first()
    if token is None:
        raise InvalidRefreshToken("unknown refresh token")
    _family_revoke(token.family, reason="logout")


def token_family_revoke(*, family: TokenFamily, reason: str) -> TokenFamily:
    """End one login (staff action): its refresh tokens stop rotating, its access tokens stop working."""
    _family_revoke(family, reason=reason)
    family.refresh_from_db(fields=["revoked_at", "revoked_reason"])
    return family


def _family_revoke(family: TokenFamily, *, reason: str) -> None:
    """Revoke the login unless it already is; its open ``/ws/events`` sockets close after commit."""
    revoked = TokenFamily.objects.filter(pk=family.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now(), revoked_reason=reason
    )
    if revoked:
        events.publish_revocation_on_commit(family.user_id, events.token_family_credential(family.pk))
