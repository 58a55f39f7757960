"""Emails to users: which events have one, how each is rendered, and the unsubscribe link.

Each email is three Django templates under ``templates/notify/email/``: ``<name>_subject.txt``,
``<name>.txt`` and ``<name>.html``. Every email carries a one-click unsubscribe link (a signed
token naming the user and that kind of email; no sign-in) in its body and in the RFC 8058
``List-Unsubscribe`` / ``List-Unsubscribe-Post`` headers, so mail clients offer their own button.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import signing
from django.core.mail import EmailMultiAlternatives
from django.template.loader import render_to_string
from django.urls import reverse

from core.money import MoneyError, format_money, parse_usd

from .models import Event, EventType

if TYPE_CHECKING:
    # django-stubs' name for the AUTH_USER_MODEL, whichever app defines it (its mypy plugin
    # resolves it); it exists only in the stubs, and notify imports no app above it.
    from django.contrib.auth.models import _User

UNSUBSCRIBE_SALT = "tokentill.notify.unsubscribe"


@dataclass(frozen=True)
class Kind:
    template: str  # the templates' base name
    preference: str  # the ``Preference`` field that turns it off


EMAILS: dict[str, Kind] = {  # by EventType
    EventType.BALANCE_LOW: Kind("balance_low", "email_low_balance"),
    EventType.BALANCE_DEPLETED: Kind("balance_depleted", "email_depleted"),
    EventType.PAYMENT_SUCCEEDED: Kind("payment_succeeded", "email_payments"),
    EventType.PAYMENT_REFUNDED: Kind("payment_refunded", "email_payments"),
    EventType.PAYMENT_FAILED: Kind("payment_failed", "email_payments"),
    EventType.SUBSCRIPTION_RENEWED: Kind("subscription_renewed", "email_subscription"),
}
PREFERENCE_FIELDS = sorted({kind.preference for kind in EMAILS.values()})
# Amount fields rendered for people as "$12.35" (the payload keeps the 9-place strings).
_AMOUNTS = ("balance", "threshold", "min_balance", "amount", "credit", "refunded", "clawed_back")


def has_email(event: Event) -> bool:
    """Does this event get an email to its user? A subscription invoice's payment does not: its
    ``subscription.renewed`` email says it, and one invoice should not mail twice."""
    if event.type not in EMAILS or event.user_id is None:
        return False
    if event.type == EventType.PAYMENT_SUCCEEDED and (event.data.get("payment") or {}).get("subscription"):
        return False
    return True


def unsubscribe_token(user_id: int, preference: str) -> str:
    return signing.dumps({"u": user_id, "p": preference}, salt=UNSUBSCRIBE_SALT, compress=False)


def unsubscribe_token_read(token: str) -> tuple[_User, str] | None:
    """(user, preference field) from a token we signed, else None."""
    try:
        found = signing.loads(token, salt=UNSUBSCRIBE_SALT)
    except signing.BadSignature:
        return None
    if not isinstance(found, dict) or found.get("p") not in PREFERENCE_FIELDS or not isinstance(found.get("u"), int):
        return None
    user = get_user_model().objects.filter(pk=found["u"]).first()
    return (user, found["p"]) if user is not None else None


def unsubscribe_url(user_id: int, preference: str) -> str:
    return settings.APP_URL + reverse("portal:unsubscribe", args=[unsubscribe_token(user_id, preference)])


def _shown(data: dict) -> dict:
    """The payload's amounts for people: "$12.35", half-up to the cent."""
    shown: dict[str, str] = {}
    for source in (data, data.get("payment") or {}):
        for name in _AMOUNTS:
            value = source.get(name)
            if isinstance(value, str):
                try:
                    shown.setdefault(name, format_money(parse_usd(value)))
                except MoneyError:
                    pass
    return shown


def wanted(event: Event, preference) -> bool:
    """Is this email still wanted: the user active, with an address, not unsubscribed from it?"""
    user = event.user
    kind = EMAILS.get(event.type)
    return bool(kind and user is not None and user.is_active and user.email and getattr(preference, kind.preference))


def message(event: Event) -> EmailMultiAlternatives:
    """The rendered email for ``event`` (to its user)."""
    kind = EMAILS[event.type]
    user = event.user
    if user is None:  # has_email() keeps such events from ever having an email delivery
        raise ValueError(f"event {event.id} has no user to email")
    unsubscribe = unsubscribe_url(user.pk, kind.preference)
    context = {
        "event": event,
        "data": event.data,
        "shown": _shown(event.data),
        "user": user,
        "app_title": settings.APP_TITLE,
        "app_url": settings.APP_URL,
        "topup_url": settings.APP_URL + reverse("portal:topup"),
        "settings_url": settings.APP_URL + reverse("portal:notification_settings"),
        "unsubscribe_url": unsubscribe,
    }
    base = f"notify/email/{kind.template}"
    subject = " ".join(render_to_string(f"{base}_subject.txt", context).split())
    mail = EmailMultiAlternatives(
        subject=f"[{settings.APP_TITLE}] {subject}",
        body=render_to_string(f"{base}.txt", context),
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[user.email],
        headers={
            "List-Unsubscribe": f"<{unsubscribe}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            # The event id: a retried send is recognisably the same message.
            "X-Tokentill-Event": event.id,
        },
    )
    mail.attach_alternative(render_to_string(f"{base}.html", context), "text/html")
    return mail
