"""402 → ``topup()`` → the signed payment webhook → the balance event → the refused call again,
and everything around it: the one-time link, a pack's checkout, a top-up that never comes."""

import json
from decimal import Decimal

import httpx
import pytest
from tokentill import InsufficientFunds, TopupTimeout

from tests.conftest import make_user
from tests.fake_payment_apis import ls_order, ls_signature
from tests.fake_upstream import MODEL, Reply, completion, usage

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "Say pong"}]


@pytest.fixture
def packs(db):
    from payments.models import CreditPack
    from payments.seed import seed_packs

    seed_packs(CreditPack)  # transactional tests flush the seeded rows
    CreditPack.objects.filter(slug="starter").update(lemonsqueezy_variant_id="412233")
    CreditPack.objects.filter(slug="pro").update(lemonsqueezy_variant_id="412244")


class Browser:
    """What the user's browser does with the link ``topup()`` opens: follows it (the one-time link
    signs it in), and — when ``pays`` — the user pays, and Lemon Squeezy's signed webhook arrives."""

    def __init__(self, server: str, user, *, pays: bool = True, variant: int = 412233, cents: int = 1000):
        self.server, self.user, self.pays, self.variant, self.cents = server, user, pays, variant, cents
        self.visits: list[httpx.Response] = []

    def __call__(self, url: str) -> None:
        with httpx.Client() as browser:
            response = browser.get(url)
            # Redirects within the server are followed; the provider's checkout page is only noted
            # (this test machine reaches nothing but loopback).
            while response.is_redirect and response.next_request.url.host == "127.0.0.1":
                response = browser.send(response.next_request)
            self.visits.append(response)
        if self.pays:
            order = ls_order(user_id=self.user.pk, variant_id=self.variant, total_cents=self.cents)
            body = json.dumps(order).encode()
            headers = {"X-Event-Name": "order_created", "X-Signature": ls_signature(body)}
            response = httpx.post(self.server + "/webhooks/lemonsqueezy", content=body, headers=headers)
            assert response.status_code == 200, response.text


def test_a_402_then_topup_then_the_call_succeeds(server, client_for, fake_upstream, price, packs):
    bob = make_user("bob@example.com")
    client = client_for(bob)
    fake_upstream.script("chat", Reply(body=completion("Pong.", u=usage(10, 2, cost="0.00001"))))
    llm = client.openai()
    with pytest.raises(InsufficientFunds) as refused:
        llm.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert refused.value.balance == 0 and refused.value.needed > 0

    browser = Browser(server, bob)
    assert client.topup(open_browser=browser, timeout=60) == Decimal("10")
    landed = browser.visits[0]
    assert landed.status_code == 200 and landed.url.path == "/topup"  # signed in, on the pack chooser
    reply = llm.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.choices[0].message.content == "Pong." and client.last_balance < 10


def test_retry_after_topup_does_all_of_it_for_one_call(server, client_for, fake_upstream, price, packs):
    bob = make_user("bob@example.com")
    client = client_for(bob)
    fake_upstream.script("chat", Reply(body=completion("Pong.", u=usage(10, 2, cost="0.00001"))))
    browser = Browser(server, bob)

    def chat():
        return client.openai().chat.completions.create(model=MODEL, messages=MESSAGES)

    original = client.topup
    client.topup = lambda pack=None: original(pack, open_browser=browser, timeout=60)  # the test's browser
    reply = client.retry_after_topup(chat)
    assert reply.choices[0].message.content == "Pong."
    assert len(browser.visits) == 1 and len(fake_upstream.calls("chat")) == 1


def test_a_packs_top_up_goes_straight_to_its_checkout(server, client_for, packs, fake_ls_server):
    bob = make_user("bob@example.com")
    client = client_for(bob)
    browser = Browser(server, bob, pays=False)
    with pytest.raises(TopupTimeout):
        client.topup("pro", open_browser=browser, timeout=3)
    # The link signed the browser in on /topup/pro, which sent it on to that pack's checkout.
    assert browser.visits[0].headers["location"].startswith("https://tokentill.lemonsqueezy.com/checkout/")
    checkout = fake_ls_server.requests[-1]
    assert json.loads(checkout["body"])["data"]["relationships"]["variant"]["data"]["id"] == "412244"


def test_no_payment_means_a_clear_timeout(server, client_for, packs):
    bob = make_user("bob@example.com")
    client = client_for(bob)
    with pytest.raises(TopupTimeout, match="no top-up arrived within 2 s"):
        client.topup(open_browser=Browser(server, bob, pays=False), timeout=2)
    assert isinstance(TopupTimeout("x"), TimeoutError)


def test_whoami_names_the_account_behind_the_sign_in(client_for):
    alice = make_user("alice@example.com")
    account = client_for(alice).whoami()
    assert (account.email, account.id) == ("alice@example.com", alice.pk)
