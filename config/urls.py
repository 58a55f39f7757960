from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from accounts.views import staff_login
from backoffice.staff_pages import org_page as staff_org_page
from backoffice.staff_pages import user_page as staff_user_page
from infra import health
from infra.ninja import api as v1_api
from infra.ninja import not_found as v1_not_found
from proxy.v1 import router as v1_router

v1_api.add_router("", v1_router)

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/login/", staff_login),  # the admin's login, answering 429 when throttled
    # Before the admin's own URLs, whose catch-all would answer 404: the per-user and
    # per-organization staff pages.
    path("admin/tokentill/users/<int:user_id>/", admin.site.admin_view(staff_user_page), name="staff_user"),
    path("admin/tokentill/orgs/<int:org_id>/", admin.site.admin_view(staff_org_page), name="staff_org"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves Swagger UI's start-up script as a file of its own: the page has no
    # inline script, so it runs under the Content-Security-Policy.
    path(
        "api/docs/",
        SpectacularSwaggerSplitView.as_view(url_name="schema", template_name="api_docs/swagger_ui.html"),
        name="api-docs",
    ),
    path("api/admin/", include("backoffice.urls_api")),
    path("api/", include("accounts.urls_api")),
    path("api/", include("wallet.urls_api")),
    path("api/", include("proxy.urls_api")),
    path("api/", include("payments.urls_api")),
    path("api/", include("orgweb.urls_api")),
    # Unknown paths under /v1/ answer in the OpenAI shape: "/v1/" itself before Ninja's routes (its
    # root view exists only to be reversed, and answers Django's HTML 404), anything else after
    # them. /v1/chat/completions and /v1/embeddings never get here under ASGI (config/routing.py).
    path("v1/", v1_not_found),
    path("v1/", v1_api.urls),
    re_path(r"^v1/", v1_not_found),
    path("webhooks/", include("payments.urls_webhooks")),
    path("", include("config.urls_portal")),
]
