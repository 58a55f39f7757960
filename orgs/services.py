"""State changes for organizations: create one, invite, accept, change roles and limits, remove
members, and mint the organization's API keys.

The role rules, written once here (the API and the portal only map ``OrgError`` to answers):

* owners and admins manage the organization (members, invitations, keys, limits, top-ups);
* only an owner makes, changes or removes an owner; an organization always keeps one owner;
* anyone may leave, except its last owner.

Removing a member takes away their access to the organization's wallet at once: requests that
name the organization look the membership up every time, and the organization's API keys the
member made are revoked in the same transaction (they saw those keys' secrets).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from accounts.models import ApiKey, User
from accounts.services import api_key_create, api_key_revoke
from wallet.models import Wallet

from .emails import invitation_send
from .models import MANAGERS, Invitation, Membership, Organization, Role

INVITATION_TTL = timedelta(days=7)


class OrgError(Exception):
    """A refused change: ``status`` is the HTTP status an API answers it with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def _text(value: str, what: str, *, most: int) -> str:
    """A name as a person typed it, stripped; refused when blank, too long or holding a NUL
    (which PostgreSQL cannot store)."""
    text = (value or "").strip()
    if not text:
        raise OrgError(f"{what} cannot be blank")
    if len(text) > most:
        raise OrgError(f"{what} is at most {most} characters")
    if "\x00" in text:
        raise OrgError(f"{what} cannot contain a NUL character")
    return text


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _free_slug(name: str) -> str:
    base = (slugify(name) or "org")[:40]
    if base.isdigit():
        base = f"org-{base}"
    slug, n = base, 1
    while Organization.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{base}-{n}"
    return slug


def organization_create(*, user: User, name: str) -> Organization:
    """A new organization with ``user`` as its owner, and its (empty) wallet."""
    name = _text(name, "an organization's name", most=100)
    for _ in range(3):  # two organizations of one name created at once: the UNIQUE slug decides
        try:
            with transaction.atomic():
                org = Organization.objects.create(name=name, slug=_free_slug(name))
                Membership.objects.create(organization=org, user=user, role=Role.OWNER)
                Wallet.objects.create(organization=org)
            return org
        except IntegrityError:
            continue
    raise OrgError("could not choose a unique slug; try another name", 409)


def organization_rename(*, organization: Organization, name: str) -> Organization:
    organization.name = _text(name, "an organization's name", most=100)
    organization.save(update_fields=["name"])
    return organization


def organization_set_active(*, organization: Organization, active: bool) -> bool:
    """Disable or enable an organization (the operator's call); True when that changed it. Read
    on every request that bills it, so it takes effect on the next one."""
    changed = bool(Organization.objects.filter(pk=organization.pk, is_active=not active).update(is_active=active))
    organization.is_active = active
    return changed


def _require_manager(actor: Membership) -> None:
    if actor.role not in MANAGERS:
        raise OrgError("only the organization's owners and admins may do this", 403)


# --- invitations -------------------------------------------------------------------------------


def invitation_create(*, actor: Membership, email: str, role: str = Role.MEMBER) -> tuple[Invitation, str]:
    """An invitation and its token (shown once: only its hash is stored). Once the invitation is
    committed, its link is emailed to the invited address (``orgs.emails``)."""
    _require_manager(actor)
    if role not in Role.values:
        raise OrgError(f"role must be one of: {', '.join(Role.values)}")
    if role == Role.OWNER and actor.role != Role.OWNER:
        raise OrgError("only an owner may invite an owner", 403)
    email = _text(email, "an email address", most=254).lower()
    try:
        validate_email(email)
    except ValidationError:
        raise OrgError(f"{email!r} is not an email address") from None
    if Membership.objects.filter(organization_id=actor.organization_id, user__email__iexact=email).exists():
        raise OrgError("that address is already a member", 409)
    token = secrets.token_urlsafe(32)
    now = timezone.now()
    with transaction.atomic():
        invitation = Invitation.objects.create(
            organization_id=actor.organization_id,
            email=email,
            role=role,
            token_hash=_token_hash(token),
            created_by=actor.user,
            created_at=now,
            expires_at=now + INVITATION_TTL,
        )
        transaction.on_commit(lambda: invitation_send(invitation, token))
    return invitation, token


def invitation_revoke(*, actor: Membership, invitation: Invitation) -> Invitation:
    _require_manager(actor)
    if invitation.accepted_at is None and invitation.revoked_at is None:
        invitation.revoked_at = timezone.now()
        Invitation.objects.filter(pk=invitation.pk, accepted_at__isnull=True).update(revoked_at=invitation.revoked_at)
    return invitation


def invitation_find(*, token: str) -> Invitation | None:
    """The pending invitation a link's token names, or None (unknown, used, revoked, expired)."""
    found = Invitation.objects.select_related("organization").filter(token_hash=_token_hash(token)).first()
    if found is None or found.status != "pending":
        return None
    return found


def invitation_accept(*, token: str, user: User) -> Membership:
    """Join the organization the invitation names, as its role. Single use: one conditional
    UPDATE decides, so two accepts of one link cannot both succeed. The account must have the
    address the invitation was sent to (a forwarded link is no invitation)."""
    invitation = invitation_find(token=token)
    if invitation is None:
        raise OrgError("this invitation is unknown, used, revoked or expired", 404)
    if invitation.email.lower() != user.email.lower():
        raise OrgError(f"this invitation was sent to another address; sign in as {invitation.email}", 403)
    now = timezone.now()
    with transaction.atomic():
        taken = Invitation.objects.filter(
            pk=invitation.pk, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=now
        ).update(accepted_at=now, accepted_by=user)
        if not taken:
            raise OrgError("this invitation is unknown, used, revoked or expired", 404)
        membership, _ = Membership.objects.get_or_create(
            organization_id=invitation.organization_id, user=user, defaults={"role": invitation.role}
        )
    return membership


# --- members -----------------------------------------------------------------------------------

_UNSET = object()


def _owners(organization_id: int) -> int:
    return Membership.objects.filter(organization_id=organization_id, role=Role.OWNER).count()


def _locked(actor: Membership, membership: Membership) -> None:
    """Lock the organization's row, then read both roles again under it: changes to one
    organization's members are serialised, so an owner count read now stays true until commit,
    and an actor demoted or removed a moment ago acts with the role they have now, not the one
    they had when their request began."""
    Organization.objects.select_for_update().filter(pk=membership.organization_id).first()
    roles = dict(Membership.objects.filter(pk__in=[actor.pk, membership.pk]).values_list("pk", "role"))
    if actor.pk not in roles or membership.pk not in roles:
        raise OrgError("no such member", 404)
    actor.role, membership.role = roles[actor.pk], roles[membership.pk]


def membership_update(
    *,
    actor: Membership,
    membership: Membership,
    role: str | None = None,
    daily_spend=_UNSET,
    monthly_spend=_UNSET,
    allowed_models=_UNSET,
) -> Membership:
    """Change a member's role and/or limits (spend in nanodollars, None for no limit)."""
    with transaction.atomic():
        _locked(actor, membership)  # two owners demoting each other at once cannot leave none
        _require_manager(actor)
        if membership.role == Role.OWNER and actor.role != Role.OWNER:
            raise OrgError("only an owner may change an owner", 403)
        if role is not None and role != membership.role:
            if role not in Role.values:
                raise OrgError(f"role must be one of: {', '.join(Role.values)}")
            if role == Role.OWNER and actor.role != Role.OWNER:
                raise OrgError("only an owner may make an owner", 403)
            if membership.role == Role.OWNER and _owners(membership.organization_id) <= 1:
                raise OrgError("an organization keeps at least one owner", 409)
            membership.role = role
        for name, value in _limits(daily_spend, monthly_spend, allowed_models).items():
            setattr(membership, name, value)
        membership.save()
    return membership


def _limits(daily_spend, monthly_spend, allowed_models) -> dict:
    """The limits a change names (spend in nanodollars or None; model ids checked), by field."""
    changes = {}
    for name, value in (
        ("daily_spend", daily_spend),
        ("monthly_spend", monthly_spend),
        ("allowed_models", allowed_models),
    ):
        if value is not _UNSET:
            if name == "allowed_models" and value is not None:
                value = [_text(model, "a model id", most=200) for model in value]
            changes[name] = value
    return changes


def membership_limits_set(
    *, membership: Membership, daily_spend=_UNSET, monthly_spend=_UNSET, allowed_models=_UNSET
) -> Membership:
    """Set a member's limits on the operator's word (the operator API; no role in the
    organization is needed). Only the named limits change — never the role — and a membership
    removed meanwhile is a 404, not a resurrection."""
    changes = _limits(daily_spend, monthly_spend, allowed_models)
    if changes and not Membership.objects.filter(pk=membership.pk).update(**changes):
        raise OrgError("no such member", 404)
    for name, value in changes.items():
        setattr(membership, name, value)
    return membership


def membership_remove(*, actor: Membership, membership: Membership) -> Membership:
    """Remove a member (or leave, when ``actor`` is ``membership``). Their access to the
    organization's wallet ends at once, and the organization's keys they made are revoked.
    Returns the removed membership (no longer in the database)."""
    leaving = actor.pk == membership.pk
    with transaction.atomic():
        _locked(actor, membership)
        if not leaving:
            _require_manager(actor)
            if membership.role == Role.OWNER and actor.role != Role.OWNER:
                raise OrgError("only an owner may remove an owner", 403)
        if membership.role == Role.OWNER and _owners(membership.organization_id) <= 1:
            raise OrgError("an organization keeps at least one owner", 409)
        keys = ApiKey.objects.filter(
            organization_id=membership.organization_id, user_id=membership.user_id, revoked_at__isnull=True
        )
        for key in keys:
            api_key_revoke(key=key)
        Membership.objects.filter(pk=membership.pk).delete()
    return membership


# --- keys --------------------------------------------------------------------------------------


def org_key_create(*, actor: Membership, name: str, expires_at=None, limits: dict | None = None) -> tuple[ApiKey, str]:
    """An API key of the organization, made by one of its owners or admins: it bills the
    organization's wallet whoever uses it."""
    _require_manager(actor)
    name = _text(name, "a key's name", most=100)
    with transaction.atomic():
        key, secret = api_key_create(user=actor.user, name=name, expires_at=expires_at, limits=limits)
        ApiKey.objects.filter(pk=key.pk).update(organization_id=actor.organization_id)
        key.organization_id = actor.organization_id
    return key, secret


def org_key_revoke(*, actor: Membership, key: ApiKey) -> ApiKey:
    _require_manager(actor)
    return api_key_revoke(key=key)
