"""Pages under the Content-Security-Policy in a real browser (issue 11, items 3 and 5): both API
docs load Swagger UI from this server alone and render the operations; the admin's own scripts
still work; and the violation watcher the browser tests rely on does see a violation."""

from __future__ import annotations

import pytest

from notify.models import Endpoint
from notify.services import endpoint_create
from tests.conftest import make_user
from tests.test_portal_browser import TIMEOUT_MS, chromium, log_in, server, watch_csp  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def browser_context(chromium, server):  # noqa: F811
    context = chromium.new_context(base_url=server)
    context.set_default_timeout(TIMEOUT_MS)
    requested: list[str] = []
    context.on("request", lambda request: requested.append(request.url))
    violations = watch_csp(context)
    try:
        yield context, requested, violations
    finally:
        context.close()


@pytest.mark.parametrize(("path", "operation"), [("/api/docs/", "/api/wallet"), ("/v1/docs", "/v1/user/charge")])
def test_the_api_docs_load_swagger_ui_from_this_server_only(browser_context, server, path, operation):  # noqa: F811
    context, requested, violations = browser_context
    page = context.new_page()

    page.goto(path)
    page.locator(".opblock-summary-path", has_text=operation).first.wait_for()

    assert page.locator(".swagger-ui .info .title").first.is_visible()
    assert requested and all(url.startswith(server) for url in requested), requested
    assert violations == []


def test_the_admin_asks_before_regenerating_a_secret_under_the_policy(browser_context):
    context, _, violations = browser_context
    make_user("boss@example.com", is_staff=True, is_superuser=True)
    endpoint = endpoint_create(url="https://ops.example.com", event_types=["key.created"])
    old_secret = Endpoint.objects.get(pk=endpoint.pk).secret
    page = context.new_page()
    log_in(page, "boss@example.com", path=f"/admin/login/?next=/admin/notify/endpoint/{endpoint.pk}/change/")
    page.wait_for_url(f"**/admin/notify/endpoint/{endpoint.pk}/change/")
    asked: list[str] = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss() if len(asked) == 1 else dialog.accept()

    page.on("dialog", answer)
    page.get_by_role("button", name="Regenerate the signing secret").click()
    assert page.url.endswith(f"/admin/notify/endpoint/{endpoint.pk}/change/")  # dismissed: nothing sent
    assert Endpoint.objects.get(pk=endpoint.pk).secret == old_secret

    page.get_by_role("button", name="Regenerate the signing secret").click()
    page.locator("[data-endpoint-secret]").wait_for()

    assert asked == ["The current secret stops working at once. Regenerate?"] * 2
    assert Endpoint.objects.get(pk=endpoint.pk).secret != old_secret
    assert violations == []


def test_the_watcher_reports_what_the_policy_blocks(browser_context):
    context, _, violations = browser_context
    page = context.new_page()
    page.goto("/login")

    with page.expect_console_message(lambda message: message.text.startswith("CSP violation")):
        page.evaluate("document.head.appendChild(Object.assign(document.createElement('style'), {textContent: 'p{}'}))")

    assert any("style-src" in violation for violation in violations), violations
