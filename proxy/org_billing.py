"""Which wallet a metered request spends from, and the member's limits inside an organization.

* An organization's API key always bills the organization (``X-Tokentill-Org``, if sent, must
  name that same organization).
* A member's own key or access token bills their own wallet, unless the request names an
  organization they belong to: ``X-Tokentill-Org: <id or slug>``. The membership is looked up on
  every such request — never remembered — so removing a member refuses their very next one.
* A disabled organization (an operator's call) bills nothing: its keys and the header naming it
  are refused (403 ``organization_disabled``), read on every request like the membership.
* Inside the organization the member's limits apply on top of the key's: the models they may
  use (``check_model``, here), and daily and monthly spend — counted by ``proxy.limits`` like a
  key's or a user's spend caps (``limits.reserve_member_spend``: settled charges plus holds in
  flight, one atomic ``incr`` before the upstream is reached, undone when over, rebuilt when
  missing from the member's usage records in the organization and the tool charges on its
  wallet that name the member).
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from core.openai_errors import OpenAIError
from infra import adb
from orgs.models import Membership, Organization
from orgs.selectors import membership_for
from wallet.models import Wallet

ORG_HEADER = "x-tokentill-org"


def _forbidden(org: str) -> OpenAIError:
    return OpenAIError(
        403, f"You are not a member of the organization `{org[:100]}`.", "permission_error", "organization_forbidden"
    )


@dataclasses.dataclass(frozen=True)
class OrgBilling:
    organization: Organization
    wallet: Wallet
    membership: Membership | None  # None for the organization's own key: its limits are the key's


def org_billing(principal, org_header: str) -> OrgBilling | None:
    """The organization a request (or tool charge) bills, or None for the caller's own wallet.
    Raises ``OpenAIError`` (403 ``organization_forbidden`` or ``organization_disabled``)."""
    key = principal.api_key
    if key is not None and key.organization_id is not None:
        # The key's limits apply, not a member's: the key is the organization's own.
        membership = None
        organization = Organization.objects.select_related("wallet").get(pk=key.organization_id)
        if org_header and org_header not in (str(organization.pk), organization.slug):
            raise _forbidden(org_header)
    elif org_header:
        membership = membership_for(user=principal.user, org=org_header)
        if membership is None:
            raise _forbidden(org_header)
        organization = membership.organization
    else:
        return None
    if not organization.is_active:  # checked after membership: an outsider learns nothing
        raise OpenAIError(
            403,
            f"The organization `{organization.slug}` is disabled.",
            "permission_error",
            "organization_disabled",
        )
    # One query in all: the wallet came joined (an organization is created with its wallet).
    return OrgBilling(organization, organization.wallet, membership)


Meta = TypeVar("Meta")  # proxy.services.RequestMeta (which imports this module)


def billing_for(meta: Meta, principal, org_header: str) -> Meta:
    """``meta`` with the organization, its wallet and the membership filled in when the request
    bills an organization; ``meta`` itself otherwise. Raises ``OpenAIError`` (403)."""
    billing = org_billing(principal, org_header)
    if billing is None:
        return meta
    return dataclasses.replace(  # type: ignore[type-var]
        meta, organization=billing.organization, wallet=billing.wallet, membership=billing.membership
    )


async def abilling_for(meta: Meta, principal, headers) -> Meta:
    """``billing_for`` from the event loop: no database trip for a request that names no
    organization with a key of no organization (every request of a single user)."""
    org_header = (headers.get(ORG_HEADER) or "").strip()
    key = principal.api_key
    if not org_header and (key is None or key.organization_id is None):
        return meta
    return await adb.in_thread(billing_for)(meta, principal, org_header)


# --- the member's limits -----------------------------------------------------------------------


def check_model(membership: Membership | None, models: list[str]) -> None:
    allowed = membership.allowed_models if membership is not None else None
    if allowed is None:
        return
    for model in models:
        if model not in allowed:
            raise OpenAIError(
                403,
                f"Your organization does not let you use the model `{model}`.",
                "permission_error",
                "model_not_allowed",
            )
