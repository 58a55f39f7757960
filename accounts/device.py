"""Browser sign-in for apps: the OAuth 2.0 device authorization flow (RFC 8628), our endpoints.

An app asks for a pair of codes (``device_authorization_create``), shows the user code and opens
the portal's ``/device`` page; the user signs in there, types the code and approves or denies
(``device_authorization_approve`` / ``_deny``); meanwhile the app polls with the device code
(``device_token_redeem``) and gets a token pair exactly once.

Every decision that must happen once is one conditional UPDATE whose row count decides: a poll
is on time only if ``last_polled_at`` is still what it read, an approval only if the
authorization is still pending and unexpired, a redemption only if it is still approved. Two
requests racing cannot both win, without a read-then-write window between them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.crypto import salted_hmac

from .models import DeviceAuthorization, DeviceStatus, User
from .services import TokenPair, sha256_hex, token_pair_issue

# RFC 8628 §6.1: consonants only, so no code spells a word; minus L, which reads as 1 or I.
# 19^8 ≈ 1.7·10^10 codes, against guessing throttled per user and per address.
USER_CODE_ALPHABET = "BCDFGHJKMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
DEVICE_CODE_PREFIX = "ttd_"
SLOW_DOWN_STEP = 5  # seconds added to the interval by each slow_down (RFC 8628 §3.5)
MAX_INTERVAL = 60  # an app that keeps polling too fast is not sent further than this
# A poll that arrives this much before its interval is up still counts as on time: an app that
# sleeps exactly ``interval`` between polls sees its requests land a little early or late.
POLL_SLACK = timedelta(seconds=1)
_CREATE_ATTEMPTS = 5  # a fresh user code colliding with a pending one is rare; retrying is enough


class DeviceFlowError(Exception):
    """A poll that yields no tokens; ``error`` is RFC 8628's code for it."""

    def __init__(self, error: str, message: str, *, interval: int | None = None):
        super().__init__(message)
        self.error, self.message, self.interval = error, message, interval


class UserCodeNotFound(Exception):
    """No pending, unexpired authorization has this user code."""


@dataclass
class DeviceCodes:
    authorization: DeviceAuthorization
    device_code: str  # the secret the app polls with; never stored
    user_code: str  # shown as two groups of four letters, e.g. "BDFH-KMNP"


def user_code_normalise(raw: str) -> str | None:
    """The code as typed (any case, with or without the dash or spaces) in its canonical form,
    or None when it cannot be a user code at all."""
    code = "".join(raw.split()).replace("-", "").upper()
    if len(code) != USER_CODE_LENGTH or any(char not in USER_CODE_ALPHABET for char in code):
        return None
    return code


def user_code_display(code: str) -> str:
    return f"{code[:4]}-{code[4:]}"


def _user_code_hash(code: str) -> str:
    return salted_hmac("tokentill.device.user_code", code, algorithm="sha256").hexdigest()


def device_authorization_create(*, client_name: str) -> DeviceCodes:
    device_code = DEVICE_CODE_PREFIX + secrets.token_urlsafe(32)
    now = timezone.now()
    attempts_left = _CREATE_ATTEMPTS
    while True:
        user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
        try:
            # A savepoint: the partial unique index on pending user codes refuses a collision,
            # and the next code is tried in the same (caller's) transaction.
            with transaction.atomic():
                authorization = DeviceAuthorization.objects.create(
                    device_code_hash=sha256_hex(device_code),
                    user_code_hash=_user_code_hash(user_code),
                    client_name=client_name,
                    created_at=now,
                    expires_at=now + timedelta(seconds=settings.DEVICE_CODE_TTL),
                    interval=settings.DEVICE_POLL_INTERVAL,  # RFC 8628's default: 5 s
                )
        except IntegrityError:
            attempts_left -= 1
            if not attempts_left:
                raise
            continue
        return DeviceCodes(authorization, device_code, user_code_display(user_code))


def device_authorization_pending(*, user_code: str, now: datetime | None = None) -> DeviceAuthorization:
    """The pending, unexpired authorization a (normalised) user code names, or ``UserCodeNotFound``."""
    found = DeviceAuthorization.objects.filter(
        user_code_hash=_user_code_hash(user_code),
        status=DeviceStatus.PENDING,
        expires_at__gt=now or timezone.now(),
    ).first()
    if found is None:
        raise UserCodeNotFound(user_code)
    return found


def _decide(user_code: str, user: User, status: str) -> DeviceAuthorization:
    now = timezone.now()
    authorization = device_authorization_pending(user_code=user_code, now=now)
    # Only a still-pending, unexpired authorization changes: a second click, a race with another
    # tab, or an expiry in between all find it gone.
    decided = DeviceAuthorization.objects.filter(
        pk=authorization.pk, status=DeviceStatus.PENDING, expires_at__gt=now
    ).update(status=status, user=user, decided_at=now)
    if not decided:
        raise UserCodeNotFound(user_code)
    authorization.status, authorization.user, authorization.decided_at = status, user, now
    return authorization


def device_authorization_approve(*, user_code: str, user: User) -> DeviceAuthorization:
    """The user lets the app sign in as them; the app's next poll collects the tokens."""
    return _decide(user_code, user, DeviceStatus.APPROVED)


def device_authorization_deny(*, user_code: str, user: User) -> DeviceAuthorization:
    return _decide(user_code, user, DeviceStatus.DENIED)


def device_token_redeem(*, device_code: str) -> TokenPair:
    """One poll: the token pair once the user approved, else ``DeviceFlowError``.

    A decided authorization answers at once; only a pending one is held to its interval. As in
    ``token_refresh``, refusals are decided inside the transaction and raised after it, so the
    slow_down's longer interval commits.
    """
    now = timezone.now()
    failure: DeviceFlowError | None = None
    with transaction.atomic(savepoint=False):
        found = DeviceAuthorization.objects.filter(device_code_hash=sha256_hex(device_code or "")).first()
        if found is None or found.status == DeviceStatus.REDEEMED:
            failure = DeviceFlowError("invalid_grant", "This device code is unknown or was already used.")
        elif found.status == DeviceStatus.DENIED:
            failure = DeviceFlowError("access_denied", "The user denied this sign-in.")
        elif found.expires_at <= now:
            failure = DeviceFlowError("expired_token", "This device code has expired; start the sign-in again.")
        elif found.status == DeviceStatus.PENDING:
            failure = _poll_pending(found, now)
        else:
            # Single use: of two polls racing here only one moves it to redeemed.
            redeemed = DeviceAuthorization.objects.filter(pk=found.pk, status=DeviceStatus.APPROVED).update(
                status=DeviceStatus.REDEEMED, last_polled_at=now
            )
            if not redeemed:
                failure = DeviceFlowError("invalid_grant", "This device code is unknown or was already used.")
            elif found.user is None:  # _decide sets the user with the approval
                raise RuntimeError(f"device authorization {found.pk} was approved without a user")
            else:
                pair = token_pair_issue(user=found.user, name=found.client_name)
                DeviceAuthorization.objects.filter(pk=found.pk).update(family_id=pair.family_id)
    if failure is not None:
        raise failure
    return pair


def _poll_pending(found: DeviceAuthorization, now: datetime) -> DeviceFlowError:
    """authorization_pending, or slow_down (and a longer interval) for a poll that came too soon.

    The poll's time is recorded only if ``last_polled_at`` is still the value read: of two polls
    racing, one is on time and the other too soon, as if they had come in turn.
    """
    previous = found.last_polled_at
    on_time = previous is None or now - previous >= timedelta(seconds=found.interval) - POLL_SLACK
    if on_time:
        recorded = DeviceAuthorization.objects.filter(pk=found.pk, last_polled_at=previous).update(last_polled_at=now)
        if recorded:
            return DeviceFlowError("authorization_pending", "The user has not approved this sign-in yet.")
    interval = min(found.interval + SLOW_DOWN_STEP, MAX_INTERVAL)
    DeviceAuthorization.objects.filter(pk=found.pk).update(interval=interval, last_polled_at=now)
    return DeviceFlowError("slow_down", f"Polling too fast: wait {interval} seconds between polls.", interval=interval)
