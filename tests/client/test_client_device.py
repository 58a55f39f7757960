"""``login_in_browser()``: the device flow approved by a person in a real browser (Debian's
chromium through Playwright) against the live server; and a denial."""

import re
from urllib.parse import urlsplit

import pytest
from tokentill import LoginFailed

from accounts.models import TokenFamily
from tests.client.conftest import PASSWORD
from tests.conftest import make_user
from tests.test_portal_browser import TIMEOUT_MS, chromium  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def person(chromium, server):  # noqa: F811
    """A browser tab that clicks through the portal's /device page like a person: signs in, checks
    the code the app showed, then approves (or denies)."""
    context = chromium.new_context(base_url=server)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()

    def decide(url: str, *, email: str, shown: list, approve: bool = True) -> None:
        parts = urlsplit(url)
        page.goto(f"{parts.path}?{parts.query}")
        page.wait_for_url(re.compile(r"/login\?next="))
        page.get_by_label(re.compile("Email")).fill(email)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(re.compile(r"/device\?code="))
        assert page.get_by_label("Code").input_value() == shown[0].user_code  # the code the app showed
        page.get_by_role("button", name="Continue").click()
        page.get_by_role("button", name="Approve" if approve else "Deny").click()
        page.get_by_role("status").wait_for()

    yield decide
    context.close()


def test_an_app_signs_in_through_the_browser(client_for, person, memory_keyring, server, real_passwords):
    alice = make_user("alice@example.com", balance="3.00")
    client = client_for()
    shown = []
    account = client.login_in_browser(
        "Acme Desktop", on_code=shown.append, open_browser=lambda url: person(url, email=alice.email, shown=shown)
    )
    assert (account.email, account.id) == ("alice@example.com", alice.pk)
    assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}", shown[0].user_code)
    assert shown[0].verification_uri == server + "/device"
    assert TokenFamily.objects.get().name == "Acme Desktop"
    assert (f"tokentill {server}", "alice@example.com") in memory_keyring.entries
    assert client.balance().balance == 3


def test_a_denied_sign_in_is_a_clear_error_and_stores_nothing(client_for, person, memory_keyring, real_passwords):
    make_user("alice@example.com")
    client = client_for()
    shown = []
    with pytest.raises(LoginFailed) as denied:
        client.login_in_browser(
            on_code=shown.append,
            open_browser=lambda url: person(url, email="alice@example.com", shown=shown, approve=False),
        )
    assert denied.value.reason == "access_denied"
    assert memory_keyring.entries == {} and not TokenFamily.objects.exists()
