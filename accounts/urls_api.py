from django.urls import path

from . import api, api_device, api_sessions

urlpatterns = [
    path("auth/signup", api.SignupView.as_view(), name="api-auth-signup"),
    path("auth/token", api.TokenView.as_view(), name="api-auth-token"),
    path("auth/token/refresh", api.TokenRefreshView.as_view(), name="api-auth-token-refresh"),
    path("auth/logout", api.LogoutView.as_view(), name="api-auth-logout"),
    path("auth/device", api_device.DeviceCodeView.as_view(), name="api-auth-device"),
    path("auth/device/token", api_device.DeviceTokenView.as_view(), name="api-auth-device-token"),
    path("auth/me", api_sessions.MeView.as_view(), name="api-auth-me"),
    path("auth/sessions", api_sessions.SessionListView.as_view(), name="api-auth-sessions"),
    path("auth/sessions/<str:id>", api_sessions.SessionDetailView.as_view(), name="api-auth-session-detail"),
    path("auth/web-link", api_sessions.WebLinkView.as_view(), name="api-auth-web-link"),
    path("account/limits", api.AccountLimitsView.as_view(), name="api-account-limits"),
    path("keys", api.KeyListView.as_view(), name="api-keys"),
    path("keys/<int:id>", api.KeyDetailView.as_view(), name="api-key-detail"),
]
