from django.urls import path

from . import api

urlpatterns = [
    path("orgs", api.OrgListApi.as_view(), name="api-orgs"),
    path("orgs/invitations/accept", api.InvitationAcceptApi.as_view(), name="api-org-invitation-accept"),
    path("orgs/<int:org_id>", api.OrgDetailApi.as_view(), name="api-org"),
    path("orgs/<int:org_id>/members", api.MemberListApi.as_view(), name="api-org-members"),
    path("orgs/<int:org_id>/members/<int:member_id>", api.MemberDetailApi.as_view(), name="api-org-member"),
    path("orgs/<int:org_id>/invitations", api.InvitationListApi.as_view(), name="api-org-invitations"),
    path(
        "orgs/<int:org_id>/invitations/<int:invitation_id>",
        api.InvitationDetailApi.as_view(),
        name="api-org-invitation",
    ),
    path("orgs/<int:org_id>/keys", api.OrgKeyListApi.as_view(), name="api-org-keys"),
    path("orgs/<int:org_id>/keys/<int:key_id>", api.OrgKeyDetailApi.as_view(), name="api-org-key"),
    path("orgs/<int:org_id>/wallet", api.OrgWalletApi.as_view(), name="api-org-wallet"),
    path("orgs/<int:org_id>/entries", api.OrgEntryListApi.as_view(), name="api-org-entries"),
    path("orgs/<int:org_id>/usage", api.OrgUsageListApi.as_view(), name="api-org-usage"),
    path("orgs/<int:org_id>/usage/summary", api.OrgUsageSummaryApi.as_view(), name="api-org-usage-summary"),
]
