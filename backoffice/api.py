"""The operator API, ``/api/admin/…``: the back office driven from the operator's own systems.

Who may call it: an **operator key** only — an API key with the ``admin`` scope, which only a
superuser mints (Admin → API keys → "Mint an operator key"), for an active staff user. Any other
credential is refused: no credential, a bad, expired or revoked one → 401; a valid credential that
is not an operator key (a customer's key or token, a staff member's ordinary key) or whose owner
is no longer active staff → 403. Sessions are not accepted (no cookie-driven CSRF surface).

Every call by an authenticated caller is written to the operator audit log
(``backoffice.models.AuditEntry``) with its outcome, whether it succeeded, was refused or failed;
calls without a valid credential are not (anyone can send them). Views follow the house rule:
parse, call one service or selector, render, map errors.

Accounts of staff members can be read here but not changed: staff are managed in the admin, and
an operator key must not be a way for one staff member to disable or sign out another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, permissions, status
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.auth import Principal
from accounts.authentication import BearerAuthentication
from accounts.services import (
    api_key_revoke,
    api_key_update,
    token_families_revoke_all,
    token_family_revoke,
    user_set_active,
)
from infra.drf import ResultsCursorPagination
from orgs.selectors import org_wallet
from orgs.services import OrgError, membership_limits_set, organization_set_active
from orgweb.serializers import MemberLimitsSerializer
from proxy.serializers import UsageRecordSerializer
from wallet.selectors import wallet_summary, wallet_summary_of
from wallet.serializers import EntrySerializer
from wallet.services import IdempotencyConflict, WalletError, wallet_correct, wallet_credit, wallet_get_or_create

from . import org_selectors as orgs
from . import user_selectors as users
from .audit import audit_record, storable_text
from .serializers import (
    CorrectionSerializer,
    GrantSerializer,
    KeyLimitsSerializer,
    OperatorKeySerializer,
    OperatorMemberSerializer,
    OrgDetailSerializer,
    OrgRowSerializer,
    OrgSearchSerializer,
    OrgStateSerializer,
    PostedSerializer,
    SessionOutSerializer,
    SignOutSerializer,
    UserDetailSerializer,
    UserRowSerializer,
    UserSearchSerializer,
    UserStateSerializer,
)

MAX_IDEMPOTENCY_KEY = 128  # stored as "operator:correction:<key>" in a 200-character column
REPLAYED_HEADER = "Idempotent-Replayed"


class OperatorError(exceptions.APIException):
    """``{"detail": "…", "code": "…"}``: the operator API's refusals carry a stable code."""

    def __init__(self, status_code: int, code: str, detail: str):
        super().__init__(detail={"detail": detail, "code": code})
        self.status_code = status_code


class OperatorKeyAuthentication(BearerAuthentication):
    operator_keys = True


class OperatorKeyScheme(OpenApiAuthenticationExtension):
    target_class = OperatorKeyAuthentication
    name = "operatorKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An operator key: an API key with the admin scope, minted by a superuser in the admin.",
        }


class IsOperator(permissions.BasePermission):
    def has_permission(self, request, view):
        principal = request.auth
        if principal is None:
            return False  # DRF answers 401 (NotAuthenticated) for a request with no credential
        if not isinstance(principal, Principal) or not principal.is_operator_key:
            raise OperatorError(
                403,
                "operator_key_required",
                "the operator API needs an operator key (an API key with the admin scope, minted by a superuser)",
            )
        if not (principal.user.is_active and principal.user.is_staff):
            raise OperatorError(403, "not_staff", "this operator key's owner is no longer active staff")
        return True


def _not_staff_account(user) -> None:
    if user.is_staff or user.is_superuser:
        raise OperatorError(403, "staff_account", "staff accounts are managed in the admin, not through this API")


def _idempotency_key(request) -> str:
    key = (request.headers.get("Idempotency-Key") or "").strip()
    if not key:
        raise OperatorError(400, "idempotency_key_required", "send an Idempotency-Key header (1–128 characters)")
    if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable() or "\x00" in key:
        raise OperatorError(400, "invalid_idempotency_key", "Idempotency-Key must be 1–128 printable characters")
    return key


class OperatorView(APIView):
    """Authentication, permission and the audit record every operator endpoint shares.

    ``operations`` names each method's operation (its OpenAPI id, and what the audit log says).
    A view may set ``self.audit_note`` to say what a successful call did.
    """

    authentication_classes = [OperatorKeyAuthentication]
    permission_classes = [IsOperator]
    operations: dict[str, str] = {}

    def initial(self, request, *args, **kwargs):
        self.audit_note = ""
        super().initial(request, *args, **kwargs)

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        self._audit(request, response.status_code, self._detail(response))
        return response

    def handle_exception(self, exc):
        try:
            return super().handle_exception(exc)
        except Exception:
            # Not an API error: Django answers 500. Recorded by the exception's type only — its
            # message may quote anything.
            self._audit(self.request, 500, f"server error ({type(exc).__name__})")
            raise

    def _detail(self, response) -> str:
        if response.status_code < 400:
            return getattr(self, "audit_note", "")
        data = getattr(response, "data", None)
        if isinstance(data, dict) and set(data) <= {"detail", "code"}:
            return f"{data.get('code', '')}: {data.get('detail', '')}".lstrip(": ")
        return str(data)[:1000] if data is not None else ""

    def _audit(self, request, status_code: int, detail: str) -> None:
        principal = getattr(request, "_auth", None)  # set only once authentication succeeded
        if not isinstance(principal, Principal):
            return
        try:
            body = request.data if request.method not in ("GET", "HEAD", "OPTIONS") else None
        except exceptions.ParseError:
            body = "[unreadable body]"
        target = " ".join(f"{name.removesuffix('_id')}:{value}" for name, value in self.kwargs.items())
        audit_record(
            principal=principal,
            method=request.method,
            path=request.path,
            operation=self.operations.get(request.method.lower(), ""),
            target=target,
            query=dict(request.query_params.lists()),
            body=body,
            idempotency_key=request.headers.get("Idempotency-Key", ""),
            status_code=status_code,
            detail=storable_text(detail, limit=1000),
        )


_ERRORS = {
    401: OpenApiResponse(description="no credential, or a bad, expired or revoked one"),
    403: OpenApiResponse(description="operator_key_required, not_staff, or (for changes) staff_account"),
    404: OpenApiResponse(description="no such user, key or login"),
}
ERRORS = _ERRORS


class UserPagination(ResultsCursorPagination):
    ordering = "-id"


class UserListView(OperatorView):
    operations = {"get": "admin_users_list"}

    @extend_schema(
        operation_id="admin_users_list",
        tags=["operator"],
        summary="Search accounts",
        parameters=[UserSearchSerializer, OpenApiParameter("cursor", str), OpenApiParameter("limit", int)],
        responses={200: UserRowSerializer(many=True), 400: OpenApiResponse(description="bad filter"), **_ERRORS},
    )
    def get(self, request):
        filters = UserSearchSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        paginator = UserPagination()
        page = paginator.paginate_queryset(users.user_search(**filters.validated_data), request, view=self)
        return paginator.get_paginated_response(UserRowSerializer(page, many=True).data)


def _detail_of(user) -> dict:
    return {
        "id": user.pk,
        "email": user.email,
        "is_active": user.is_active,
        "is_staff": user.is_staff,
        "is_superuser": user.is_superuser,
        "date_joined": user.date_joined,
        "wallet": wallet_summary(user=user),
        "keys": users.user_keys(user=user),
        "sessions": users.user_sessions(user=user),
        "activity": users.user_activity(user=user),
    }


class UserDetailView(OperatorView):
    operations = {"get": "admin_users_retrieve"}

    @extend_schema(
        operation_id="admin_users_retrieve",
        tags=["operator"],
        summary="One account: wallet, keys with their limits, active logins, last activity",
        responses={200: UserDetailSerializer, **_ERRORS},
    )
    def get(self, request, user_id: int):
        return Response(UserDetailSerializer(_detail_of(users.user_get(user_id=user_id))).data)


def _set_active(view: OperatorView, user_id: int, *, active: bool) -> Response:
    user = users.user_get(user_id=user_id)
    _not_staff_account(user)
    changed = user_set_active(user=user, active=active)
    view.audit_note = ("enabled" if active else "disabled") if changed else "no change"
    return Response({"id": user.pk, "email": user.email, "is_active": user.is_active, "changed": changed})


class UserDisableView(OperatorView):
    operations = {"post": "admin_users_disable"}

    @extend_schema(
        operation_id="admin_users_disable",
        tags=["operator"],
        request=None,
        summary="Disable an account: every credential stops working, its live sockets close",
        responses={200: UserStateSerializer, **_ERRORS},
    )
    def post(self, request, user_id: int):
        return _set_active(self, user_id, active=False)


class UserEnableView(OperatorView):
    operations = {"post": "admin_users_enable"}

    @extend_schema(
        operation_id="admin_users_enable",
        tags=["operator"],
        request=None,
        summary="Enable a disabled account (its revoked keys and logins stay revoked)",
        responses={200: UserStateSerializer, **_ERRORS},
    )
    def post(self, request, user_id: int):
        return _set_active(self, user_id, active=True)


class UserKeyView(OperatorView):
    operations = {"patch": "admin_users_keys_limits"}

    @extend_schema(
        operation_id="admin_users_keys_limits",
        tags=["operator"],
        summary="Set an API key's limits (the same rules as PATCH /api/keys/{id})",
        request=KeyLimitsSerializer,
        responses={200: OperatorKeySerializer, 400: OpenApiResponse(description="invalid limits"), **_ERRORS},
    )
    def patch(self, request, user_id: int, key_id: int):
        user = users.user_get(user_id=user_id)
        key = users.user_key_get(user=user, key_id=key_id)
        _not_staff_account(user)
        serializer = KeyLimitsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = api_key_update(key=key, limits=serializer.validated_data["limits"])
        self.audit_note = f"limits of {key.prefix}… set"
        return Response(OperatorKeySerializer(key).data)


class UserKeyRevokeView(OperatorView):
    operations = {"post": "admin_users_keys_revoke"}

    @extend_schema(
        operation_id="admin_users_keys_revoke",
        tags=["operator"],
        request=None,
        summary="Revoke an API key at once (its live sockets close); revoking a revoked key changes nothing",
        responses={200: OperatorKeySerializer, **_ERRORS},
    )
    def post(self, request, user_id: int, key_id: int):
        user = users.user_get(user_id=user_id)
        key = users.user_key_get(user=user, key_id=key_id)
        _not_staff_account(user)
        was_revoked = key.revoked
        key = api_key_revoke(key=key)
        self.audit_note = "already revoked" if was_revoked else f"revoked {key.prefix}…"
        return Response(OperatorKeySerializer(key).data)


class UserSessionRevokeView(OperatorView):
    operations = {"post": "admin_users_sessions_revoke"}

    @extend_schema(
        operation_id="admin_users_sessions_revoke",
        tags=["operator"],
        request=None,
        summary="Sign an account out of one app (end one login: its tokens and live sockets)",
        responses={200: SessionOutSerializer, **_ERRORS},
    )
    def post(self, request, user_id: int, session_id: str):
        user = users.user_get(user_id=user_id)
        family = users.user_session_get(user=user, session_id=session_id)
        _not_staff_account(user)
        was_revoked = family.revoked_at is not None
        family = token_family_revoke(family=family, reason="operator")
        self.audit_note = "already signed out" if was_revoked else "signed out"
        return Response(SessionOutSerializer(family).data)


class UserSignOutView(OperatorView):
    operations = {"post": "admin_users_sign_out"}

    @extend_schema(
        operation_id="admin_users_sign_out",
        tags=["operator"],
        request=None,
        summary="Sign an account out of every app (every login); API keys are left alone",
        responses={200: SignOutSerializer, **_ERRORS},
    )
    def post(self, request, user_id: int):
        user = users.user_get(user_id=user_id)
        _not_staff_account(user)
        count = token_families_revoke_all(user=user, reason="operator")
        self.audit_note = f"{count} login(s) ended"
        return Response({"signed_out": count})


class _PostingView(OperatorView, ABC):
    """A grant or a correction: ``Idempotency-Key`` required, the same answer when replayed.

    A concrete view mixes in whose wallet (``_UserWallet`` or ``_OrgWallet``) and what is posted
    (``_Grant`` or ``_Correction``)."""

    serializer_class: type
    namespace: str
    owner_name: str

    def post_once(self, request, **kwargs) -> Response:
        owner_wallet = self.owner_wallet(**kwargs)
        key = _idempotency_key(request)
        serializer = self.serializer_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            wallet, ledger_key = owner_wallet(), f"operator:{self.namespace}:{key}"
            posted = self.post_entry(request.user, wallet, ledger_key, serializer.validated_data)
        except IdempotencyConflict:
            raise OperatorError(
                409,
                "idempotency_conflict",
                f"this Idempotency-Key was already used for a different change to this {self.owner_name}",
            ) from None
        except WalletError as exc:
            raise OperatorError(400, "invalid_request", str(exc)) from None
        entry = posted.entry
        self.audit_note = f"{'replayed' if posted.replayed else 'posted'} entry {entry.pk}"
        headers = {REPLAYED_HEADER: "true"} if posted.replayed else {}
        return Response(PostedSerializer(entry).data, status=status.HTTP_201_CREATED, headers=headers)

    @abstractmethod
    def owner_wallet(self, **kwargs):
        """Checks the owner may be changed (404 / 403 otherwise) and answers a callable that
        gets or makes its wallet — called only once the request is known to be valid."""

    @abstractmethod
    def post_entry(self, staff, wallet, idempotency_key: str, data: dict): ...


class _UserWallet:
    owner_name = "user"

    def owner_wallet(self, *, user_id: int):
        user = users.user_get(user_id=user_id)
        _not_staff_account(user)
        return lambda: wallet_get_or_create(user=user)


class _OrgWallet:
    owner_name = "organization"

    def owner_wallet(self, *, org_id: int):
        org = orgs.org_get(org_id=org_id)
        return lambda: org_wallet(organization=org)


class _Grant:
    serializer_class = GrantSerializer
    namespace = "grant"

    def post_entry(self, staff, wallet, idempotency_key, data):
        return wallet_credit(
            wallet=wallet,
            amount=data["amount"],
            kind=data["kind"],
            idempotency_key=idempotency_key,
            description=data["reason"],
            metadata={"staff": staff.email, "source": "operator_api"},
            created_by=staff,
        )


class _Correction:
    serializer_class = CorrectionSerializer
    namespace = "correction"

    def post_entry(self, staff, wallet, idempotency_key, data):
        amount, reason = data["amount"], data["reason"]
        return wallet_correct(
            wallet=wallet, amount=amount, reason=reason, staff_user=staff, idempotency_key=idempotency_key
        )


_IDEMPOTENCY = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    required=True,
    description="1–128 printable characters, remembered per wallet: the same key answers the first result",
)
_POSTING_ERRORS = {
    400: OpenApiResponse(description="invalid input; idempotency_key_required; invalid_idempotency_key"),
    409: OpenApiResponse(description="idempotency_conflict: the key was used for a different amount or kind"),
    **_ERRORS,
}


class UserGrantView(_UserWallet, _Grant, _PostingView):
    operations = {"post": "admin_users_grant"}

    @extend_schema(
        operation_id="admin_users_grant",
        tags=["operator"],
        summary="Credit an account (a bonus, trial or grant), with a reason",
        parameters=[_IDEMPOTENCY],
        request=GrantSerializer,
        responses={201: PostedSerializer, **_POSTING_ERRORS},
    )
    def post(self, request, user_id: int):
        return self.post_once(request, user_id=user_id)


class UserCorrectionView(_UserWallet, _Correction, _PostingView):
    operations = {"post": "admin_users_correct"}

    @extend_schema(
        operation_id="admin_users_correct",
        tags=["operator"],
        summary="Correct an account's balance up or down, with a reason (may take it below zero)",
        parameters=[_IDEMPOTENCY],
        request=CorrectionSerializer,
        responses={201: PostedSerializer, **_POSTING_ERRORS},
    )
    def post(self, request, user_id: int):
        return self.post_once(request, user_id=user_id)


class EntryPagination(ResultsCursorPagination):
    ordering = "-id"


class UsagePagination(ResultsCursorPagination):
    ordering = ("-created_at", "-id")


class UserEntriesView(OperatorView):
    operations = {"get": "admin_users_entries"}

    @extend_schema(
        operation_id="admin_users_entries",
        tags=["operator"],
        summary="An account's ledger entries, newest first",
        parameters=[OpenApiParameter("cursor", str), OpenApiParameter("limit", int)],
        responses={200: EntrySerializer(many=True), **_ERRORS},
    )
    def get(self, request, user_id: int):
        user = users.user_get(user_id=user_id)
        paginator = EntryPagination()
        page = paginator.paginate_queryset(users.user_entries(user=user), request, view=self)
        return paginator.get_paginated_response(EntrySerializer(page, many=True).data)


class UserUsageView(OperatorView):
    operations = {"get": "admin_users_usage"}

    @extend_schema(
        operation_id="admin_users_usage",
        tags=["operator"],
        summary="An account's requests (usage records), newest first",
        parameters=[OpenApiParameter("cursor", str), OpenApiParameter("limit", int)],
        responses={200: UsageRecordSerializer(many=True), **_ERRORS},
    )
    def get(self, request, user_id: int):
        user = users.user_get(user_id=user_id)
        paginator = UsagePagination()
        page = paginator.paginate_queryset(users.user_usage(user=user), request, view=self)
        return paginator.get_paginated_response(UsageRecordSerializer(page, many=True).data)


def _paged(view: OperatorView, request, paginator, queryset, serializer) -> Response:
    page = paginator.paginate_queryset(queryset, request, view=view)
    return paginator.get_paginated_response(serializer(page, many=True).data)


# --- organizations: the same calls as for users, on the organization's wallet and keys ----------
#


class OrgListView(OperatorView):
    operations = {"get": "admin_orgs_list"}

    @extend_schema(
        operation_id="admin_orgs_list",
        tags=["operator"],
        summary="Search organizations",
        parameters=[OrgSearchSerializer, OpenApiParameter("cursor", str), OpenApiParameter("limit", int)],
        responses={200: OrgRowSerializer(many=True), 400: OpenApiResponse(description="bad filter"), **_ERRORS},
    )
    def get(self, request):
        filters = OrgSearchSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        return _paged(self, request, UserPagination(), orgs.org_search(**filters.validated_data), OrgRowSerializer)


class OrgDetailView(OperatorView):
    operations = {"get": "admin_orgs_retrieve"}

    @extend_schema(
        operation_id="admin_orgs_retrieve",
        tags=["operator"],
        summary="One organization: wallet, members with their roles and limits, keys, last activity",
        responses={200: OrgDetailSerializer, **_ERRORS},
    )
    def get(self, request, org_id: int):
        org = orgs.org_get(org_id=org_id)
        detail = {
            "id": org.pk,
            "name": org.name,
            "slug": org.slug,
            "is_active": org.is_active,
            "created_at": org.created_at,
            "wallet": wallet_summary_of(orgs.org_wallet_read(org=org)),
            "members": orgs.org_members(org=org),
            "keys": orgs.org_keys(org=org),
            "activity": orgs.org_activity(org=org),
        }
        return Response(OrgDetailSerializer(detail).data)


class OrgKeyRevokeView(OperatorView):
    operations = {"post": "admin_orgs_keys_revoke"}

    @extend_schema(
        operation_id="admin_orgs_keys_revoke",
        tags=["operator"],
        request=None,
        summary="Revoke one of an organization's API keys at once; revoking a revoked key changes nothing",
        responses={200: OperatorKeySerializer, **_ERRORS},
    )
    def post(self, request, org_id: int, key_id: int):
        key = orgs.org_key_get(org=orgs.org_get(org_id=org_id), key_id=key_id)
        was_revoked = key.revoked
        key = api_key_revoke(key=key)
        self.audit_note = "already revoked" if was_revoked else f"revoked {key.prefix}…"
        return Response(OperatorKeySerializer(key).data)


class OrgMemberView(OperatorView):
    operations = {"patch": "admin_orgs_members_limits"}

    @extend_schema(
        operation_id="admin_orgs_members_limits",
        tags=["operator"],
        summary="Set a member's limits in the organization (the same rules as PATCH "
        "/api/orgs/{id}/members/{mid} `limits`); the member is named by their user id",
        request=MemberLimitsSerializer,
        responses={
            200: OperatorMemberSerializer,
            400: OpenApiResponse(description="invalid limits"),
            **_ERRORS,
            404: OpenApiResponse(description="no such organization, or the user is not a member of it"),
        },
    )
    def patch(self, request, org_id: int, user_id: int):
        member = orgs.org_member_get(org=orgs.org_get(org_id=org_id), user_id=user_id)
        serializer = MemberLimitsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            member = membership_limits_set(membership=member, **serializer.validated_data)
        except OrgError as exc:
            code = "invalid_limits" if exc.status == 400 else "not_found"
            raise OperatorError(exc.status, code, exc.message) from None
        named = ", ".join(sorted(serializer.validated_data)) or "nothing"
        self.audit_note = f"limits of member {member.user_id} set ({named})"
        return Response(OperatorMemberSerializer(member).data)


def _org_set_active(view: OperatorView, org_id: int, *, active: bool) -> Response:
    org = orgs.org_get(org_id=org_id)
    changed = organization_set_active(organization=org, active=active)
    view.audit_note = ("enabled" if active else "disabled") if changed else "no change"
    return Response({"id": org.pk, "name": org.name, "is_active": org.is_active, "changed": changed})


class OrgDisableView(OperatorView):
    operations = {"post": "admin_orgs_disable"}

    @extend_schema(
        operation_id="admin_orgs_disable",
        tags=["operator"],
        request=None,
        summary="Disable an organization: its keys and X-Tokentill-Org naming it are refused on /v1 "
        "(403 organization_disabled) from the next request; its members' own wallets are not affected",
        responses={200: OrgStateSerializer, **_ERRORS},
    )
    def post(self, request, org_id: int):
        return _org_set_active(self, org_id, active=False)


class OrgEnableView(OperatorView):
    operations = {"post": "admin_orgs_enable"}

    @extend_schema(
        operation_id="admin_orgs_enable",
        tags=["operator"],
        request=None,
        summary="Enable a disabled organization (its revoked keys stay revoked)",
        responses={200: OrgStateSerializer, **_ERRORS},
    )
    def post(self, request, org_id: int):
        return _org_set_active(self, org_id, active=True)


class OrgGrantView(_OrgWallet, _Grant, _PostingView):
    operations = {"post": "admin_orgs_grant"}

    @extend_schema(
        operation_id="admin_orgs_grant",
        tags=["operator"],
        summary="Credit an organization's wallet (a bonus, trial or grant), with a reason",
        parameters=[_IDEMPOTENCY],
        request=GrantSerializer,
        responses={201: PostedSerializer, **_POSTING_ERRORS},
    )
    def post(self, request, org_id: int):
        return self.post_once(request, org_id=org_id)


class OrgCorrectionView(_OrgWallet, _Correction, _PostingView):
    operations = {"post": "admin_orgs_correct"}

    @extend_schema(
        operation_id="admin_orgs_correct",
        tags=["operator"],
        summary="Correct an organization's balance up or down, with a reason (may take it below zero)",
        parameters=[_IDEMPOTENCY],
        request=CorrectionSerializer,
        responses={201: PostedSerializer, **_POSTING_ERRORS},
    )
    def post(self, request, org_id: int):
        return self.post_once(request, org_id=org_id)


class OrgEntriesView(OperatorView):
    operations = {"get": "admin_orgs_entries"}

    @extend_schema(
        operation_id="admin_orgs_entries",
        tags=["operator"],
        summary="An organization's ledger entries, newest first",
        parameters=[OpenApiParameter("cursor", str), OpenApiParameter("limit", int)],
        responses={200: EntrySerializer(many=True), **_ERRORS},
    )
    def get(self, request, org_id: int):
        entries = orgs.org_entries(org=orgs.org_get(org_id=org_id))
        return _paged(self, request, EntryPagination(), entries, EntrySerializer)


class OrgUsageView(OperatorView):
    operations = {"get": "admin_orgs_usage"}

    @extend_schema(
        operation_id="admin_orgs_usage",
        tags=["operator"],
        summary="The requests billed to an organization (every member's and key's), newest first",
        parameters=[OpenApiParameter("cursor", str), OpenApiParameter("limit", int)],
        responses={200: UsageRecordSerializer(many=True), **_ERRORS},
    )
    def get(self, request, org_id: int):
        records = orgs.org_usage(org=orgs.org_get(org_id=org_id))
        return _paged(self, request, UsagePagination(), records, UsageRecordSerializer)
