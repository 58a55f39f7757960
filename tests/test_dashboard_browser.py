"""The staff dashboard's charts in a real browser (Debian's chromium through Playwright) against a
real server: server-rendered SVG, drawn under a strict Content-Security-Policy with no violation,
exact figures on hover. Saves a screenshot to ``var/admin-dashboard.png``."""

from __future__ import annotations

import pytest

from orgs.models import Membership
from orgs.services import organization_create
from tests.conftest import make_user
from tests.live import BASE_DIR, live_server
from tests.test_admin_dashboard import payment, usage
from tests.test_portal_browser import PASSWORD, TIMEOUT_MS, chromium  # noqa: F401 (a fixture)
from tests.test_staff_org_page import billed

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# No 'unsafe-inline' anywhere: an inline style attribute or script would be a violation.
STRICT_CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'"
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push(e.violatedDirective + ' ' + (e.blockedURI || 'inline') + ' ' + (e.sample || ''));
});
"""


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    with live_server() as url:
        yield url


@pytest.fixture
def page(chromium, server):  # noqa: F811
    context = chromium.new_context(base_url=server, viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(RECORD_VIOLATIONS)

    def strict(route):
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": STRICT_CSP})

    context.route("**/admin/**", strict)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def sign_in_as_root(page, *, then: str) -> None:
    page.goto(f"/admin/login/?next={then}")
    page.get_by_label("Email").fill("root@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def test_the_dashboard_draws_its_charts_under_a_strict_csp(page):
    make_user("root@example.com", is_staff=True, is_superuser=True, password=PASSWORD)
    alice = make_user("alice@example.com", balance="10.00")
    bob = make_user("bob@example.com")
    payment(1, gross="10.00", fee="1.00", user=alice, days_ago=3)
    usage(alice, "r1", cost="0.000100000", charge="0.000139", model="openai/gpt-4o-mini")
    usage(bob, "r2", cost="1.000000000", charge="1.20", model="anthropic/claude-sonnet-4", days_ago=1)
    acme = organization_create(user=alice, name="Acme Labs")
    billed(acme, alice, "r3", cost="0.100000000", charge="0.25", model="mistral/small")

    sign_in_as_root(page, then="/admin/")
    page.wait_for_url("**/admin/")

    money = page.locator('[data-chart="money"] svg')
    assert money.is_visible() and money.bounding_box()["height"] > 100
    assert money.locator("polyline").count() == 3  # revenue, upstream cost, margin
    by_model = page.locator('[data-chart="by-model"] svg')
    assert by_model.locator("rect").count() == 3
    # The bar shows the amount to six places and the request count; its hover title keeps the exact figure.
    titles = by_model.locator("rect title").all_text_contents()
    assert "openai/gpt-4o-mini: 0.000139000 USD — 1 request" in titles
    spenders = page.locator('[data-chart="top-spenders"] svg text').all_text_contents()
    assert spenders[:2] == ["bob@example.com", "$1.20"]
    orgs = page.locator('[data-chart="top-orgs"] svg')
    assert orgs.is_visible() and orgs.locator("rect").count() == 1
    assert orgs.locator("text").all_text_contents()[:2] == ["Acme Labs", "$0.25"]
    assert page.evaluate("window.__cspViolations") == []
    page.screenshot(path=str(BASE_DIR / "var" / "admin-dashboard.png"), full_page=True)
    assert by_model.locator("text", has_text="$0.000139").count() == 1  # not "$0.00"
    assert by_model.locator("text", has_text="1 request").count() == 3


def test_a_users_staff_page_draws_spend_and_pages_requests_under_a_strict_csp(page):
    from backoffice.staff_pages import PAGE_SIZE

    make_user("root@example.com", is_staff=True, is_superuser=True, password=PASSWORD)
    alice = make_user("alice@example.com", balance="10.00")
    for n in range(PAGE_SIZE + 2):
        usage(alice, f"req_{n:02d}", cost="0.000100000", charge="0.000139", model="openai/gpt-4o-mini", days_ago=n % 5)

    sign_in_as_root(page, then="/admin/accounts/user/")
    page.get_by_role("link", name="alice@example.com").click()
    page.get_by_role("link", name="Spend, keys and requests").click()
    page.wait_for_url(f"**/admin/tokentill/users/{alice.pk}/")

    chart = page.locator('[data-chart="spend"] svg')
    assert chart.is_visible() and chart.bounding_box()["height"] > 100
    assert chart.locator("polyline").count() == 2  # model usage, tool charges
    spent = page.locator('[data-figure="spent"]')
    assert spent.inner_text() == "$0.003753"  # 27 requests × $0.000139: no rounding to "$0.00"
    assert spent.get_attribute("title") == "0.003753000"
    requests = page.locator('[data-table="requests"] tbody tr')
    assert requests.count() == PAGE_SIZE
    page.get_by_role("link", name="Older requests").click()
    page.wait_for_url("**requests_after=*")  # count the next page's rows, not the old page's
    assert requests.count() == 2
    assert requests.first.locator("td").last.inner_text() == "$0.000139"
    assert page.evaluate("window.__cspViolations") == []
    page.screenshot(path=str(BASE_DIR / "var" / "admin-user.png"), full_page=True)


def test_an_organizations_staff_page_draws_spend_lists_members_and_pages_requests(page):
    from backoffice.staff_pages import PAGE_SIZE

    make_user("root@example.com", is_staff=True, is_superuser=True, password=PASSWORD)
    alice = make_user("alice@example.com", balance="10.00")
    bob = make_user("bob@example.com")
    acme = organization_create(user=alice, name="Acme Labs")
    Membership.objects.create(organization=acme, user=bob, role="member", monthly_spend=10**9)
    for n in range(PAGE_SIZE + 2):
        member = bob if n % 2 else alice
        billed(acme, member, f"req_{n:02d}", cost="0.000100000", charge="0.000139", model="m", days_ago=n % 5)

    sign_in_as_root(page, then="/admin/orgs/organization/")
    page.get_by_role("link", name="Acme Labs").click()
    page.get_by_role("link", name="Spend, members, keys and requests").click()
    page.wait_for_url(f"**/admin/tokentill/orgs/{acme.pk}/")

    chart = page.locator('[data-chart="spend"] svg')
    assert chart.is_visible() and chart.bounding_box()["height"] > 100
    assert chart.locator("polyline").count() == 2
    spent = page.locator('[data-figure="spent"]')
    assert spent.inner_text() == "$0.003753"  # 27 requests × $0.000139
    members = page.locator('[data-table="members"] tbody tr')
    assert members.all_inner_texts()[1].startswith("bob@example.com\tMember\tmonthly spend: $1.00")
    requests = page.locator('[data-table="requests"] tbody tr')
    assert requests.count() == PAGE_SIZE
    page.get_by_role("link", name="Older requests").click()
    page.wait_for_url("**requests_after=*")
    assert requests.count() == 2
    assert requests.first.locator("td").last.inner_text() == "$0.000139"
    assert page.evaluate("window.__cspViolations") == []
    page.screenshot(path=str(BASE_DIR / "var" / "admin-org.png"), full_page=True)
