"""One-time web links: an app that is signed in hands its user's browser a link that signs the
browser into the portal and lands on one of a few portal pages (top up, history, usage, keys).

A link is a bearer credential for the portal, so it is random (256 bits), stored only as its
SHA-256, valid for ``WEB_LINK_TTL`` seconds, used once (one conditional UPDATE decides), and can
only lead to our own pages: ``next`` must be one of the paths below, matched whole — never a URL
or a path a browser could read as another host (``//evil.example``, ``/\\evil``).
"""

from __future__ import annotations

import re
import secrets
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from .models import User, WebLink
from .services import sha256_hex

# The pages a link may land on. A pack slug is Django's slug (letters, digits, "-", "_").
NEXT_PATHS = ("/", "/topup", "/history", "/usage", "/keys")
_NEXT_PACK = re.compile(r"/topup/[-a-zA-Z0-9_]{1,50}")


class WebLinkInvalid(Exception):
    """Unknown, used, expired, or its user can no longer sign in."""


def web_link_next_allowed(value: str) -> bool:
    return value in NEXT_PATHS or _NEXT_PACK.fullmatch(value) is not None


def web_link_create(*, user: User, next: str) -> tuple[WebLink, str]:
    """The link row and its token (shown once, in the URL). ``next`` must be allowed (checked by
    the caller's input validation; checked again here because the rule is the guarantee)."""
    if not web_link_next_allowed(next):
        raise ValueError(f"{next!r} is not a page a web link may lead to")
    token = secrets.token_urlsafe(32)
    now = timezone.now()
    link = WebLink.objects.create(
        token_hash=sha256_hex(token),
        user=user,
        next=next,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.WEB_LINK_TTL),
    )
    return link, token


def web_link_redeem(*, token: str) -> WebLink:
    """Use the link once: its row (with its user) or ``WebLinkInvalid``.

    The UPDATE is the check: only an unused, unexpired link is marked used, so of two browsers
    opening it together exactly one gets in.
    """
    now = timezone.now()
    token_hash = sha256_hex(token)
    used = WebLink.objects.filter(token_hash=token_hash, used_at__isnull=True, expires_at__gt=now).update(used_at=now)
    if not used:
        raise WebLinkInvalid("this link is unknown, expired or already used")
    link = WebLink.objects.select_related("user").get(token_hash=token_hash)
    if not link.user.is_active:
        raise WebLinkInvalid("this account is disabled")
    return link
