"""``/api/admin/…``: the operator API (``backoffice.api``). Resources are named by what they are
(``users``, ``orgs``), never by who may see them."""

from django.urls import path

from . import api, api_reports

urlpatterns = [
    path("users", api.UserListView.as_view(), name="api-admin-users"),
    path("users/<int:user_id>", api.UserDetailView.as_view(), name="api-admin-user"),
    path("users/<int:user_id>/disable", api.UserDisableView.as_view(), name="api-admin-user-disable"),
    path("users/<int:user_id>/enable", api.UserEnableView.as_view(), name="api-admin-user-enable"),
    path("users/<int:user_id>/sign-out", api.UserSignOutView.as_view(), name="api-admin-user-sign-out"),
    path("users/<int:user_id>/keys/<int:key_id>", api.UserKeyView.as_view(), name="api-admin-user-key"),
    path(
        "users/<int:user_id>/keys/<int:key_id>/revoke",
        api.UserKeyRevokeView.as_view(),
        name="api-admin-user-key-revoke",
    ),
    path(
        "users/<int:user_id>/sessions/<str:session_id>/revoke",
        api.UserSessionRevokeView.as_view(),
        name="api-admin-user-session-revoke",
    ),
    path("users/<int:user_id>/grants", api.UserGrantView.as_view(), name="api-admin-user-grants"),
    path("users/<int:user_id>/corrections", api.UserCorrectionView.as_view(), name="api-admin-user-corrections"),
    path("users/<int:user_id>/entries", api.UserEntriesView.as_view(), name="api-admin-user-entries"),
    path("users/<int:user_id>/usage", api.UserUsageView.as_view(), name="api-admin-user-usage"),
    path("orgs", api.OrgListView.as_view(), name="api-admin-orgs"),
    path("orgs/<int:org_id>", api.OrgDetailView.as_view(), name="api-admin-org"),
    path("orgs/<int:org_id>/keys/<int:key_id>/revoke", api.OrgKeyRevokeView.as_view(), name="api-admin-org-key-revoke"),
    path("orgs/<int:org_id>/members/<int:user_id>", api.OrgMemberView.as_view(), name="api-admin-org-member"),
    path("orgs/<int:org_id>/disable", api.OrgDisableView.as_view(), name="api-admin-org-disable"),
    path("orgs/<int:org_id>/enable", api.OrgEnableView.as_view(), name="api-admin-org-enable"),
    path("orgs/<int:org_id>/grants", api.OrgGrantView.as_view(), name="api-admin-org-grants"),
    path("orgs/<int:org_id>/corrections", api.OrgCorrectionView.as_view(), name="api-admin-org-corrections"),
    path("orgs/<int:org_id>/entries", api.OrgEntriesView.as_view(), name="api-admin-org-entries"),
    path("orgs/<int:org_id>/usage", api.OrgUsageView.as_view(), name="api-admin-org-usage"),
    path("reports/money", api_reports.MoneyReportView.as_view(), name="api-admin-reports-money"),
    path("reports/usage", api_reports.UsageReportView.as_view(), name="api-admin-reports-usage"),
    path("reports/top-spenders", api_reports.TopSpendersView.as_view(), name="api-admin-reports-top-spenders"),
    path("reports/liabilities", api_reports.LiabilitiesView.as_view(), name="api-admin-reports-liabilities"),
]
