"""The user web portal (session auth). ``/topup`` is also the link the proxy puts in refusals."""

from django.urls import path

from accounts import views as account_views
from accounts import views_device as device_views
from notify import views as notify_views
from orgweb import views as org_views
from payments import views as payment_views
from proxy import views as usage_views
from wallet import views as wallet_views

app_name = "portal"

urlpatterns = [
    path("", wallet_views.home, name="home"),
    path("login", account_views.LoginView.as_view(), name="login"),
    path("signup", account_views.signup, name="signup"),
    path("logout", account_views.logout_view, name="logout"),
    path("keys", account_views.keys, name="keys"),
    path("keys/<int:key_id>/rename", account_views.key_rename, name="key_rename"),
    path("keys/<int:key_id>/revoke", account_views.key_revoke, name="key_revoke"),
    path("device", device_views.device, name="device"),
    path("apps", device_views.apps, name="apps"),
    path("apps/<str:family_id>/sign-out", device_views.app_sign_out, name="app_sign_out"),
    path("auth/link/<str:token>", device_views.web_link, name="web_link"),
    path("history", wallet_views.history, name="history"),
    path("history.csv", wallet_views.history_csv, name="history_csv"),
    path("usage", usage_views.usage, name="usage"),
    path("usage.csv", usage_views.usage_csv, name="usage_csv"),
    path("settings/limits", account_views.limits_settings, name="limits_settings"),
    path("settings/notifications", wallet_views.notification_settings, name="notification_settings"),
    path("unsubscribe/<str:token>", notify_views.unsubscribe, name="unsubscribe"),
    path("orgs", org_views.orgs, name="orgs"),
    path("orgs/<int:org_id>", org_views.org, name="org"),
    path("orgs/<int:org_id>/members/<int:member_id>", org_views.member_update, name="org_member_update"),
    path("orgs/<int:org_id>/members/<int:member_id>/remove", org_views.member_remove, name="org_member_remove"),
    path("orgs/<int:org_id>/invitations", org_views.invitation_create, name="org_invitation_create"),
    path(
        "orgs/<int:org_id>/invitations/<int:invitation_id>/revoke",
        org_views.invitation_revoke,
        name="org_invitation_revoke",
    ),
    path("orgs/<int:org_id>/keys", org_views.key_create, name="org_key_create"),
    path("orgs/<int:org_id>/keys/<int:key_id>/revoke", org_views.key_revoke, name="org_key_revoke"),
    path("orgs/<int:org_id>/topup", org_views.topup, name="org_topup"),
    path("orgs/join/<str:token>", org_views.invitation, name="org_invitation"),
    path("topup", payment_views.topup, name="topup"),
    path("topup/done", payment_views.topup_done, name="topup_done"),
    path("topup/<slug:slug>", payment_views.topup_pack, name="topup_pack"),
]
