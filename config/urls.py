from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from . import health
from .v1 import api as v1_api

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/", include("accounts.urls_api")),
    path("api/", include("wallet.urls_api")),
    path("api/", include("proxy.urls_api")),
    path("api/", include("payments.urls_api")),
    path("v1/", v1_api.urls),
    path("webhooks/", include("payments.urls_webhooks")),
    path("", include("config.urls_portal")),
]
