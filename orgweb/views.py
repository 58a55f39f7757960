"""Portal pages for organizations: the list (and creating one), one organization's page —
wallet, members with their roles, spend and limits, invitations, keys, usage and history
filtered by member — and the invitation link's page (sign up or log in, then accept).

Every page starts from the signed-in user's membership: a non-member gets 404. The rules are
``orgs.services``'; these views parse forms, call them and redirect with a message.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from core.money import MoneyError, parse_usd
from core.numbers import parse_id
from infra.keyset import BadCursor
from orgs import services
from orgs.emails import invitation_url
from orgs.models import Membership, Role
from orgs.selectors import (
    invitation_get,
    invitation_list,
    member_get,
    member_list,
    membership_for,
    memberships_of,
    org_key_get,
    org_key_list,
    org_wallet,
)
from payments.providers.errors import ProviderError
from payments.selectors import pack_list
from payments.services import (
    NotAllowedToBuy,
    ProviderNotConfigured,
    UnknownOrganization,
    UnknownPack,
    checkout_create,
)
from wallet.selectors import wallet_summary_of

from .selectors import member_spend, org_entries, org_usage_page, org_usage_summary

PAGE_SIZE = 25


def _membership(request, org_id: int) -> Membership:
    membership = membership_for(user=request.user, org=org_id)
    if membership is None:
        raise Http404("no such organization")
    return membership


def _back(org_id: int, anchor: str = ""):
    return redirect(reverse("portal:org", args=[org_id]) + (f"#{anchor}" if anchor else ""))


def _attempt(request, call, **kwargs):
    """Run a service; its refusal becomes an error message. Returns the result or None."""
    try:
        return call(**kwargs)
    except services.OrgError as exc:
        messages.error(request, exc.message)
        return None


@never_cache
@login_required
def orgs(request):
    if request.method == "POST":
        org = _attempt(request, services.organization_create, user=request.user, name=request.POST.get("name", ""))
        if org is not None:
            messages.success(request, f"Organization {org.name} created. You are its owner.")
            return _back(org.pk)
    return render(request, "portal/orgs.html", {"memberships": memberships_of(user=request.user)})


def _member_filter(request, m: Membership) -> int | None:
    if not m.manages:
        return m.user_id
    raw = request.GET.get("member", "").strip()
    try:
        return parse_id(raw) if raw else None
    except ValueError:
        return None


@never_cache
@login_required
def org(request, org_id: int):
    return _org_page(request, _membership(request, org_id))


def _org_page(request, m: Membership, *, new_secret: str = "", new_invitation: dict | None = None, status: int = 200):
    """The organization's page. A new key's secret or invitation link is rendered straight into
    the POST's response (``no-store``), never kept anywhere on our side, as on the keys page."""
    organization = m.organization
    member_id = _member_filter(request, m)
    try:
        usage = org_usage_page(
            organization=organization,
            member_id=member_id,
            after=request.GET.get("after") or None,
            before=request.GET.get("before") or None,
            size=PAGE_SIZE,
        )
    except BadCursor:
        return HttpResponseBadRequest("That page link is not one this page wrote.", content_type="text/plain")
    spend = member_spend(organization=organization)
    members = list(member_list(organization=organization))
    for each in members:
        each.visible = m.manages or each.pk == m.pk
        each.spent = spend.get(each.user_id, {"today": 0, "month": 0})
    context = {
        "m": m,
        "organization": organization,
        "wallet": wallet_summary_of(org_wallet(organization=organization)),
        "members": members,
        "roles": Role.choices,
        "invitations": invitation_list(organization=organization)[:50] if m.manages else [],
        "keys": org_key_list(organization=organization) if m.manages else [],
        "usage": usage,
        "entries": org_entries(organization=organization, member_id=member_id)[:PAGE_SIZE],
        "by_member": org_usage_summary(organization=organization, by="member", member_id=member_id),
        "member_id": member_id,
        "query": f"member={member_id}" if member_id and m.manages else "",
        "packs": pack_list() if m.manages else [],
        "now": timezone.now(),
        "new_secret": new_secret,
        "new_invitation": new_invitation,
    }
    return render(request, "portal/org.html", context, status=status)


def _limit(raw: str) -> int | None:
    text = raw.strip()
    if not text:
        return None
    nanos = parse_usd(text)
    if nanos < 0:
        raise MoneyError("a spend limit cannot be negative")
    return nanos


@require_POST
@login_required
def member_update(request, org_id: int, member_id: int):
    m = _membership(request, org_id)
    target = member_get(organization=m.organization, member_id=member_id)
    if target is None:
        raise Http404("no such member")
    try:
        daily, monthly = _limit(request.POST.get("daily_spend", "")), _limit(request.POST.get("monthly_spend", ""))
    except MoneyError as exc:
        messages.error(request, f"Spend limits are USD amounts such as 5 or 2.50: {exc}.")
        return _back(org_id, "members")
    models_text = request.POST.get("allowed_models", "").strip()
    allowed = [name.strip() for name in models_text.split(",") if name.strip()] if models_text else None
    changed = _attempt(
        request,
        services.membership_update,
        actor=m,
        membership=target,
        role=request.POST.get("role") or None,
        daily_spend=daily,
        monthly_spend=monthly,
        allowed_models=allowed,
    )
    if changed is not None:
        messages.success(request, f"{target.user.email}: role and limits saved.")
    return _back(org_id, "members")


@require_POST
@login_required
def member_remove(request, org_id: int, member_id: int):
    m = _membership(request, org_id)
    target = member_get(organization=m.organization, member_id=member_id)
    if target is None:
        raise Http404("no such member")
    removed = _attempt(request, services.membership_remove, actor=m, membership=target) is not None
    if removed and target.pk == m.pk:
        messages.success(request, f"You left {m.organization.name}.")
        return redirect("portal:orgs")
    if removed:
        messages.success(request, f"{target.user.email} was removed; their access ended at once.")
    return _back(org_id, "members")


@require_POST
@login_required
def topup(request, org_id: int):
    """Buy a credit pack for the organization's wallet (owners and admins): off to the
    provider's hosted checkout."""
    m = _membership(request, org_id)
    try:
        checkout = checkout_create(user=request.user, pack_slug=request.POST.get("pack", ""), organization=str(org_id))
    except NotAllowedToBuy as exc:
        messages.error(request, str(exc))
    except (UnknownOrganization, UnknownPack):
        messages.error(request, "That credit pack is not on sale.")
    except ProviderNotConfigured as exc:
        messages.error(request, f"{exc} Please contact the operator.")
    except ProviderError:
        messages.error(request, "The payment processor could not start a checkout. Please try again shortly.")
    else:
        return redirect(checkout.url)
    return _back(m.organization_id, "wallet")


@never_cache
@login_required
def invitation_create(request, org_id: int):
    m = _membership(request, org_id)
    if request.method != "POST":  # a reload of the page that showed a link: the page itself
        return _back(org_id, "invitations")
    made = _attempt(
        request,
        services.invitation_create,
        actor=m,
        email=request.POST.get("email", ""),
        role=request.POST.get("role") or Role.MEMBER,
    )
    if made is None:
        return _back(org_id, "invitations")
    invitation, token = made
    return _org_page(request, m, new_invitation={"email": invitation.email, "url": invitation_url(token)})


@require_POST
@login_required
def invitation_revoke(request, org_id: int, invitation_id: int):
    m = _membership(request, org_id)
    invitation = invitation_get(organization=m.organization, invitation_id=invitation_id)
    if invitation is None:
        raise Http404("no such invitation")
    if _attempt(request, services.invitation_revoke, actor=m, invitation=invitation) is not None:
        messages.success(request, f"The invitation of {invitation.email} was revoked.")
    return _back(org_id, "invitations")


@never_cache
@login_required
def key_create(request, org_id: int):
    m = _membership(request, org_id)
    if request.method != "POST":  # a reload of the page that showed a secret: the page itself
        return _back(org_id, "keys")
    made = _attempt(request, services.org_key_create, actor=m, name=request.POST.get("name", ""))
    if made is None:
        return _back(org_id, "keys")
    return _org_page(request, m, new_secret=made[1])


@require_POST
@login_required
def key_revoke(request, org_id: int, key_id: int):
    m = _membership(request, org_id)
    key = org_key_get(organization=m.organization, key_id=key_id)
    if key is None:
        raise Http404("no such API key")
    if _attempt(request, services.org_key_revoke, actor=m, key=key) is not None:
        messages.success(request, f"Key {key.prefix}… revoked.")
    return _back(org_id, "keys")


@never_cache
def invitation(request, token: str):
    """The link an invitee opens: who invites them to what; log in or sign up (coming back here),
    then accept."""
    found = services.invitation_find(token=token)
    if found is None:
        return render(request, "portal/org_invitation.html", {"invitation": None}, status=404)
    if request.method == "POST" and request.user.is_authenticated:
        joined = _attempt(request, services.invitation_accept, token=token, user=request.user)
        if joined is not None:
            messages.success(request, f"You joined {joined.organization.name} as {joined.get_role_display()}.")
            return _back(joined.organization_id)
    return render(request, "portal/org_invitation.html", {"invitation": found, "here": request.path})
