from django.urls import path

from . import api

urlpatterns = [
    path("auth/signup", api.SignupView.as_view(), name="api-auth-signup"),
    path("auth/token", api.TokenView.as_view(), name="api-auth-token"),
    path("auth/token/refresh", api.TokenRefreshView.as_view(), name="api-auth-token-refresh"),
    path("auth/logout", api.LogoutView.as_view(), name="api-auth-logout"),
    path("keys", api.KeyListView.as_view(), name="api-keys"),
    path("keys/<int:id>", api.KeyDetailView.as_view(), name="api-key-detail"),
]
