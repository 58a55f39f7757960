"""The invitation email: the link to join an organization, sent to the invited address.

Three templates under ``templates/orgs/email/`` (``invitation_subject.txt``, ``invitation.txt``,
``invitation.html``), like notify's. The email goes out once the invitation is committed, through
Django's email backend; a failed send is logged (never with the link: it holds the token) and
refuses nothing — the inviter is shown the link once and can pass it on themselves.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template.loader import render_to_string
from django.urls import reverse

from .models import Invitation

log = logging.getLogger(__name__)


def invitation_url(token: str) -> str:
    """The page that accepts an invitation (sign up or log in first)."""
    return f"{settings.APP_URL.rstrip('/')}{reverse('portal:org_invitation', args=[token])}"


def invitation_message(invitation: Invitation, token: str) -> EmailMultiAlternatives:
    context = {
        "invitation": invitation,
        "organization": invitation.organization,
        "inviter": invitation.created_by,
        "url": invitation_url(token),
        "app_title": settings.APP_TITLE,
        "app_url": settings.APP_URL,
    }
    subject = " ".join(render_to_string("orgs/email/invitation_subject.txt", context).split())
    mail = EmailMultiAlternatives(
        subject=f"[{settings.APP_TITLE}] {subject}",
        body=render_to_string("orgs/email/invitation.txt", context),
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[invitation.email],
    )
    mail.attach_alternative(render_to_string("orgs/email/invitation.html", context), "text/html")
    return mail


def invitation_send(invitation: Invitation, token: str) -> bool:
    """Email the invitation's link to its address; False (and a log line) when sending failed."""
    try:
        invitation_message(invitation, token).send()
    except Exception:  # any backend's failure: the invitation stands, its link was shown once
        log.warning("invitation %s: the email could not be sent", invitation.pk, exc_info=False)
        return False
    return True
