"""``/api/orgs``: organizations, their members, invitations, keys, wallet, ledger and usage (DRF).

Every view starts from the caller's membership of the organization in the path: someone who is
not a member gets 404 for every id, exactly as for an organization that does not exist. Inside,
the role decides (``orgs.services`` holds the rules): owners and admins manage; members see the
organization, its wallet and member list, and their own entries and usage.

Changes need the person themself (an access token or a portal session): an API key may read
but not invite, mint keys or change members — a leaked key must not be able to widen its reach.
An organization's own key is refused on all of ``/api`` (``accounts.authentication``).
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, permissions, status
from rest_framework.exceptions import NotFound, ParseError, PermissionDenied
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.api import ManagesKeysUnlessApiKey
from accounts.serializers import ApiKeyCreatedSerializer, ApiKeyCreateSerializer
from core.money import format_usd
from core.numbers import parse_id
from infra.drf import parse_instant, query_text
from orgs import services
from orgs.emails import invitation_url
from orgs.models import Membership
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
from proxy.api import UsagePagination
from wallet.api import EntryCursorPagination
from wallet.models import EntryKind
from wallet.selectors import wallet_summary_of
from wallet.serializers import WalletSerializer

from .selectors import SUMMARY_GROUPS, member_spend, org_entries, org_usage, org_usage_summary
from .serializers import (
    AcceptSerializer,
    InvitationCreatedSerializer,
    InvitationInSerializer,
    InvitationSerializer,
    MemberSerializer,
    MemberUpdateSerializer,
    OrganizationInSerializer,
    OrganizationSerializer,
    OrgEntrySerializer,
    OrgKeySerializer,
    OrgUsageSerializer,
    OrgUsageSummarySerializer,
)


class PersonOnlyForChanges(ManagesKeysUnlessApiKey):
    message = "API keys can read an organization but not change it; use the portal or a desktop login"


_PERMISSIONS = [permissions.IsAuthenticated, PersonOnlyForChanges]


def _membership(request, org_id: int) -> Membership:
    membership = membership_for(user=request.user, org=org_id)
    if membership is None:
        raise NotFound("no such organization")
    return membership


def _manager(membership: Membership) -> None:
    if not membership.manages:
        raise PermissionDenied("only the organization's owners and admins may do this")


def _managing(request, org_id: int) -> Membership:
    """The caller's membership, which must be an owner's or an admin's (404 for a non-member
    first: a stranger never learns the organization exists)."""
    membership = _membership(request, org_id)
    _manager(membership)
    return membership


class Conflict(exceptions.APIException):
    status_code = 409
    default_code = "conflict"


def _run(call, *args, **kwargs):
    """A service call, its refusal (``OrgError``) answered with its status."""
    try:
        return call(*args, **kwargs)
    except services.OrgError as exc:
        if exc.status == 403:
            raise PermissionDenied(exc.message) from None
        if exc.status == 404:
            raise NotFound(exc.message) from None
        if exc.status == 409:
            raise Conflict(exc.message) from None
        raise exceptions.ValidationError({"detail": exc.message}) from None


class OrgListApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(operation_id="orgs_list", responses=OrganizationSerializer(many=True))
    def get(self, request):
        memberships = list(memberships_of(user=request.user))
        roles = {m.organization_id: m.role for m in memberships}
        orgs = [m.organization for m in memberships]
        return Response(OrganizationSerializer(orgs, many=True, context={"roles": roles}).data)

    @extend_schema(
        operation_id="orgs_create", request=OrganizationInSerializer, responses={201: OrganizationSerializer}
    )
    def post(self, request):
        data = OrganizationInSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        org = _run(services.organization_create, user=request.user, name=data.validated_data["name"])
        body = OrganizationSerializer(org, context={"roles": {org.pk: "owner"}}).data
        return Response(body, status=status.HTTP_201_CREATED)


class OrgDetailApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(operation_id="orgs_retrieve", responses=OrganizationSerializer)
    def get(self, request, org_id: int):
        m = _membership(request, org_id)
        return Response(OrganizationSerializer(m.organization, context={"roles": {m.organization_id: m.role}}).data)

    @extend_schema(operation_id="orgs_update", request=OrganizationInSerializer, responses=OrganizationSerializer)
    def patch(self, request, org_id: int):
        m = _managing(request, org_id)
        data = OrganizationInSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        org = _run(services.organization_rename, organization=m.organization, name=data.validated_data["name"])
        return Response(OrganizationSerializer(org, context={"roles": {org.pk: m.role}}).data)


class MemberListApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(operation_id="orgs_members_list", responses=MemberSerializer(many=True))
    def get(self, request, org_id: int):
        m = _membership(request, org_id)
        context = {"viewer": m, "spend": member_spend(organization=m.organization)}
        return Response(MemberSerializer(member_list(organization=m.organization), many=True, context=context).data)


class MemberDetailApi(APIView):
    permission_classes = _PERMISSIONS

    def _target(self, m: Membership, member_id: int) -> Membership:
        target = member_get(organization=m.organization, member_id=member_id)
        if target is None:
            raise NotFound("no such member")
        return target

    @extend_schema(operation_id="orgs_members_retrieve", responses=MemberSerializer)
    def get(self, request, org_id: int, member_id: int):
        m = _membership(request, org_id)
        context = {"viewer": m, "spend": member_spend(organization=m.organization)}
        return Response(MemberSerializer(self._target(m, member_id), context=context).data)

    @extend_schema(operation_id="orgs_members_update", request=MemberUpdateSerializer, responses=MemberSerializer)
    def patch(self, request, org_id: int, member_id: int):
        m = _membership(request, org_id)
        target = self._target(m, member_id)
        data = MemberUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        changes = dict(data.validated_data.get("limits") or {})
        if "role" in data.validated_data:
            changes["role"] = data.validated_data["role"]
        target = _run(services.membership_update, actor=m, membership=target, **changes)
        context = {"viewer": m, "spend": member_spend(organization=m.organization)}
        return Response(MemberSerializer(target, context=context).data)

    @extend_schema(operation_id="orgs_members_remove", responses={204: None})
    def delete(self, request, org_id: int, member_id: int):
        m = _membership(request, org_id)
        _run(services.membership_remove, actor=m, membership=self._target(m, member_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvitationListApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(operation_id="orgs_invitations_list", responses=InvitationSerializer(many=True))
    def get(self, request, org_id: int):
        m = _managing(request, org_id)
        return Response(InvitationSerializer(invitation_list(organization=m.organization), many=True).data)

    @extend_schema(
        operation_id="orgs_invitations_create",
        request=InvitationInSerializer,
        responses={201: InvitationCreatedSerializer},
        description="The link (and its token) are in this response only; send it to the invitee.",
    )
    def post(self, request, org_id: int):
        m = _managing(request, org_id)
        data = InvitationInSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        invitation, token = _run(services.invitation_create, actor=m, **data.validated_data)
        context = {"token": token, "url": invitation_url(token)}
        return Response(InvitationCreatedSerializer(invitation, context=context).data, status=status.HTTP_201_CREATED)


class InvitationDetailApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(operation_id="orgs_invitations_revoke", responses={204: None})
    def delete(self, request, org_id: int, invitation_id: int):
        m = _managing(request, org_id)
        invitation = invitation_get(organization=m.organization, invitation_id=invitation_id)
        if invitation is None:
            raise NotFound("no such invitation")
        _run(services.invitation_revoke, actor=m, invitation=invitation)
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvitationAcceptApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(
        operation_id="orgs_invitations_accept",
        request=AcceptSerializer,
        responses={200: OrganizationSerializer},
        description="Joins the organization as the invitation's role. The account's email must be the "
        "invited address. 404 for an unknown, used, revoked or expired invitation.",
    )
    def post(self, request):
        data = AcceptSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        m = _run(services.invitation_accept, token=data.validated_data["token"], user=request.user)
        return Response(OrganizationSerializer(m.organization, context={"roles": {m.organization_id: m.role}}).data)


class OrgKeyListApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(operation_id="orgs_keys_list", responses=OrgKeySerializer(many=True))
    def get(self, request, org_id: int):
        m = _managing(request, org_id)
        return Response(OrgKeySerializer(org_key_list(organization=m.organization), many=True).data)

    @extend_schema(
        operation_id="orgs_keys_create",
        request=ApiKeyCreateSerializer,
        responses={201: ApiKeyCreatedSerializer},
        description="A key that bills the organization's wallet. `key` (the secret) is in this response only.",
    )
    def post(self, request, org_id: int):
        m = _managing(request, org_id)
        data = ApiKeyCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key, secret = _run(services.org_key_create, actor=m, **data.validated_data)
        return Response(ApiKeyCreatedSerializer(key, context={"secret": secret}).data, status=status.HTTP_201_CREATED)


class OrgKeyDetailApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(operation_id="orgs_keys_revoke", responses={204: None})
    def delete(self, request, org_id: int, key_id: int):
        m = _managing(request, org_id)
        key = org_key_get(organization=m.organization, key_id=key_id)
        if key is None:
            raise NotFound("no such API key")
        _run(services.org_key_revoke, actor=m, key=key)
        return Response(status=status.HTTP_204_NO_CONTENT)


class OrgWalletApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(operation_id="orgs_wallet", responses=WalletSerializer)
    def get(self, request, org_id: int):
        m = _membership(request, org_id)
        return Response(WalletSerializer(wallet_summary_of(org_wallet(organization=m.organization))).data)


def _bound(params, name: str, *, end: bool):
    raw = (params.get(name) or "").strip()
    if not raw:
        return None
    try:
        return parse_instant(raw, end_of_day=end)
    except ValueError as exc:
        raise ParseError(f"{name}: {exc}") from None


def _scope(request, m: Membership) -> dict:
    """The member filter: a manager may name one (``?member=<user id>``) or see all; a member
    sees their own."""
    raw = (request.query_params.get("member") or "").strip()
    named = None
    if raw:
        try:
            named = parse_id(raw)
        except ValueError:
            raise ParseError(f"member={raw!r} is not a user id") from None
    if not m.manages:
        return {"member_id": m.user_id}
    return {"member_id": named}


def _window(request) -> dict:
    params = request.query_params
    since, until = _bound(params, "since", end=False), _bound(params, "until", end=True)
    if since and until and since >= until:
        raise ParseError("since must be before until")
    return {"since": since, "until": until}


_FILTERS = [
    OpenApiParameter("member", int, description="a member's user id (owners and admins; members see their own)"),
    OpenApiParameter("since", str, description="from this date or instant (inclusive)"),
    OpenApiParameter("until", str, description="to this instant (exclusive) or date (inclusive)"),
]


class OrgEntryListApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(
        operation_id="orgs_entries_list",
        parameters=[*_FILTERS, OpenApiParameter("kind", str, enum=EntryKind.values)],
        responses=OrgEntrySerializer(many=True),
    )
    def get(self, request, org_id: int):
        m = _membership(request, org_id)
        kind = query_text(request.query_params, "kind")
        if kind and kind not in EntryKind.values:
            raise ParseError(f"kind must be one of: {', '.join(EntryKind.values)}")
        entries = org_entries(organization=m.organization, kind=kind, **_scope(request, m), **_window(request))
        paginator = EntryCursorPagination()
        page = paginator.paginate_queryset(entries, request, view=self)
        return paginator.get_paginated_response(OrgEntrySerializer(page, many=True).data)


class OrgUsageListApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(
        operation_id="orgs_usage_list",
        parameters=[*_FILTERS, OpenApiParameter("model", str)],
        responses=OrgUsageSerializer(many=True),
    )
    def get(self, request, org_id: int):
        m = _membership(request, org_id)
        model = query_text(request.query_params, "model")
        records = org_usage(organization=m.organization, model=model, **_scope(request, m), **_window(request))
        paginator = UsagePagination()
        page = paginator.paginate_queryset(records, request, view=self)
        return paginator.get_paginated_response(OrgUsageSerializer(page, many=True).data)


class OrgUsageSummaryApi(APIView):
    permission_classes = _PERMISSIONS

    @extend_schema(
        operation_id="orgs_usage_summary",
        parameters=[*_FILTERS, OpenApiParameter("by", str, enum=list(SUMMARY_GROUPS), description="default: member")],
        responses=OrgUsageSummarySerializer,
    )
    def get(self, request, org_id: int):
        m = _membership(request, org_id)
        by = request.query_params.get("by") or "member"
        if by not in SUMMARY_GROUPS:
            raise ParseError(f"by must be one of: {', '.join(SUMMARY_GROUPS)}")
        rows = org_usage_summary(organization=m.organization, by=by, **_scope(request, m), **_window(request))
        money = ("charge", "held")
        results = [{k: format_usd(v) if k in money else v for k, v in row.items()} for row in rows]
        return Response({"by": by, "results": results})
