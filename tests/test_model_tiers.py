"""Model aliases, low-balance fallback and agent routes, through the public surface: the three
metered endpoints against the fake upstream, ``/v1/models``, and the admin."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from decimal import Decimal

import pytest

from accounts.services import api_key_create
from proxy.models import AgentRoute, ModelAlias, ModelFallback, ModelPrice, UsageRecord, UsageStatus
from proxy.tiers import alias_save
from tests.conftest import bearer_client, make_user
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    MODEL,
    Reply,
    StreamReply,
    call,
    completion,
    fake_upstream,
    fake_upstream_server,
    key,
    price,
    stream_of,
    usage,
)
from wallet.models import Wallet

pytestmark = pytest.mark.django_db(transaction=True)

CHAT, RESPONSES, MESSAGES = "/v1/chat/completions", "/v1/responses", "/v1/messages"
SMART = "acme/smart"  # $3 / $15 per 1M tokens: a 1,000-token answer holds about $0.018
CHEAP = MODEL  # $0.15 / $0.60 per 1M tokens (the ``price`` fixture)
ASK = [{"role": "user", "content": "Say pong"}]


@pytest.fixture
def tiers(settings, price):
    """An OpenAI-compatible upstream (billed from the price table), no balance floor, and
    ``tier/smart`` → acme/smart, falling back to ``tier/fast`` → the cheap model."""
    settings.UPSTREAM_KIND, settings.UPSTREAM_RESPONSES = "openai", "translate"
    settings.MIN_BALANCE = Decimal("0")
    ModelPrice.objects.create(
        model=SMART, name="Smart", prompt=Decimal("3"), completion=Decimal("15"), default_max_output=1000
    )
    fast = ModelAlias.objects.create(name="tier/fast", model=CHEAP)
    smart = ModelAlias.objects.create(name="tier/smart", model=SMART, fallback="tier/fast")
    return smart, fast


def user_key(email: str, balance: str, **limits) -> tuple:
    user = make_user(email, balance=balance)
    return user, api_key_create(user=user, name="app", limits=limits or None)[1]


def record() -> UsageRecord:
    return UsageRecord.objects.get()


def nanos(prompt: int, completion: int, rates=(Decimal("0.15"), Decimal("0.60"))) -> int:
    cost = (prompt * rates[0] + completion * rates[1]) / 10**6
    return int((cost * Decimal("1.2") * 10**9).to_integral_value())


# --- aliases ------------------------------------------------------------------------------------


def test_an_alias_is_served_by_its_model_and_the_record_keeps_both_names(fake_upstream, alice, key, tiers):
    fake_upstream.script("chat", Reply(body=completion(u=usage(1000, 500))))
    response = call(CHAT, {"model": "tier/smart", "messages": ASK}, token=key)
    assert response.status == 200
    assert response.headers["x-tokentill-model-served"] == SMART
    assert "x-tokentill-fallback" not in response.headers
    (sent,) = fake_upstream.calls("chat")
    assert sent.json["model"] == SMART
    rec = record()
    assert (rec.model, rec.alias, rec.served_model, rec.fallback) == ("tier/smart", "tier/smart", SMART, False)
    assert rec.charge == nanos(1000, 500, (Decimal("3"), Decimal("15")))  # at the model's price


def test_staff_switch_an_alias_and_history_keeps_what_served(fake_upstream, alice, key, tiers):
    smart, _ = tiers
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 5))), Reply(body=completion(u=usage(10, 5))))
    call(CHAT, {"model": "tier/smart", "messages": ASK}, token=key)
    smart.model, smart.fallback = CHEAP, ""
    alias_save(row=smart)  # as the admin saves it: the proxy's cache is dropped on commit
    response = call(CHAT, {"model": "tier/smart", "messages": ASK}, token=key)
    assert response.headers["x-tokentill-model-served"] == CHEAP
    first, second = UsageRecord.objects.order_by("id")
    assert (first.served_model, second.served_model) == (SMART, CHEAP)
    assert first.alias == second.alias == "tier/smart"


def test_every_metered_answer_names_the_model_that_served_it(fake_upstream, alice, key, tiers):
    fake_upstream.script("chat", StreamReply(stream_of("Po", "ng", u=usage(20, 3))))
    response = call(CHAT, {"model": CHEAP, "messages": ASK, "stream": True}, token=key)
    assert response.headers["x-tokentill-model-served"] == CHEAP
    assert response.tokentill()["model_served"] == CHEAP and response.tokentill()["fallback"] is False


def test_the_models_list_shows_aliases_at_the_price_of_the_model_behind_them(alice, tiers):
    listed = {item["id"]: item for item in bearer_client(alice).get("/v1/models").json()["data"]}
    assert listed["tier/smart"]["pricing"] == listed[SMART]["pricing"]
    assert listed["tier/fast"]["pricing"] == listed[CHEAP]["pricing"]
    assert (listed["tier/smart"]["alias_of"], listed["tier/smart"]["fallback"]) == (SMART, CHEAP)
    assert listed["tier/smart"]["owned_by"] == "tokentill"
    assert (listed[CHEAP]["alias_of"], listed[CHEAP]["fallback"]) == (None, None)


# --- fallback -----------------------------------------------------------------------------------


def test_a_wallet_that_cannot_afford_the_model_is_served_by_its_fallback(fake_upstream, tiers):
    user, secret = user_key("low@example.com", "0.005", allow_fallback=True)
    fake_upstream.script("chat", StreamReply(stream_of("Po", "ng", u=usage(1000, 500))))
    response = call(CHAT, {"model": "tier/smart", "messages": ASK, "stream": True}, token=secret)
    assert response.status == 200
    assert response.headers["x-tokentill-model-served"] == CHEAP
    assert response.headers["x-tokentill-fallback"] == "used"
    assert "x-tokentill-max-tokens" not in response.headers  # served whole, not clamped
    trailer = response.tokentill()
    assert (trailer["model_served"], trailer["fallback"]) == (CHEAP, True)
    (sent,) = fake_upstream.calls("chat")
    assert sent.json["model"] == CHEAP and sent.json["max_tokens"] == 1000
    rec = record()
    assert (rec.model, rec.alias, rec.served_model, rec.fallback) == ("tier/smart", "tier/smart", CHEAP, True)
    assert rec.charge == nanos(1000, 500)  # at the fallback's price
    assert rec.price.model == CHEAP
    assert Wallet.objects.get(user=user).balance == 5_000_000 - nanos(1000, 500)
    assert trailer["charge"] == f"{Decimal(rec.charge) / 10**9:.9f}"


def test_the_fallback_header_allows_it_on_the_responses_api(fake_upstream, tiers):
    _, secret = user_key("low@example.com", "0.005")
    fake_upstream.script("chat", Reply(body=completion(u=usage(100, 50))))
    body = {"model": "tier/smart", "input": "Say pong", "store": False}
    response = call(RESPONSES, body, token=secret, headers={"X-Tokentill-Fallback": "allow"})
    assert response.status == 200, response.body
    assert response.headers["x-tokentill-model-served"] == CHEAP
    assert fake_upstream.calls("chat")[0].json["model"] == CHEAP
    assert (record().served_model, record().fallback, record().charge) == (CHEAP, True, nanos(100, 50))


def test_the_fallback_header_allows_it_on_anthropic_messages_streamed(fake_upstream, tiers):
    _, secret = user_key("low@example.com", "0.005")
    fake_upstream.script("chat", StreamReply(stream_of("Po", "ng", u=usage(20, 3))))
    body = {"model": "tier/smart", "max_tokens": 1000, "messages": ASK, "stream": True}
    response = call(MESSAGES, body, token=None, headers={"x-api-key": secret, "X-Tokentill-Fallback": "allow"})
    assert response.status == 200, response.body
    assert response.headers["x-tokentill-model-served"] == CHEAP
    assert response.tokentill()["fallback"] is True
    assert (record().served_model, record().charge) == (CHEAP, nanos(20, 3))


def test_without_permission_to_fall_back_the_request_is_refused(fake_upstream, tiers):
    _, secret = user_key("low@example.com", "0.0001")
    response = call(CHAT, {"model": "tier/smart", "messages": ASK}, token=secret)
    assert response.status == 402 and response.error["code"] == "insufficient_funds"
    assert fake_upstream.calls("chat") == []
    rec = record()
    assert (rec.status, rec.served_model, rec.fallback) == (UsageStatus.REFUSED, SMART, False)


def test_a_request_may_deny_the_fallback_its_key_allows(fake_upstream, tiers):
    _, secret = user_key("low@example.com", "0.0001", allow_fallback=True)
    response = call(
        CHAT, {"model": "tier/smart", "messages": ASK}, token=secret, headers={"X-Tokentill-Fallback": "deny"}
    )
    assert response.status == 402


def test_a_fallback_that_does_not_fit_either_is_refused(fake_upstream, tiers):
    _, secret = user_key("empty@example.com", "0.0001", allow_fallback=True)
    response = call(CHAT, {"model": "tier/smart", "messages": ASK}, token=secret)
    assert response.status == 402
    assert fake_upstream.calls("chat") == []
    assert Wallet.objects.get(user__email="empty@example.com").held == 0


def test_under_the_staff_threshold_the_fallback_serves_even_when_the_model_fits(fake_upstream, tiers):
    smart, _ = tiers
    smart.fallback_below = 2_000_000_000  # $2
    alias_save(row=smart)
    _, rich = user_key("rich@example.com", "5.00", allow_fallback=True)
    _, low = user_key("low@example.com", "1.00", allow_fallback=True)
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 5))), Reply(body=completion(u=usage(10, 5))))
    assert call(CHAT, {"model": "tier/smart", "messages": ASK}, token=rich).headers["x-tokentill-model-served"] == SMART
    assert call(CHAT, {"model": "tier/smart", "messages": ASK}, token=low).headers["x-tokentill-model-served"] == CHEAP


def test_a_model_may_have_a_fallback_of_its_own(fake_upstream, tiers):
    ModelFallback.objects.create(model=SMART, fallback=CHEAP)
    _, secret = user_key("low@example.com", "0.005", allow_fallback=True)
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 5))))
    response = call(CHAT, {"model": SMART, "messages": ASK}, token=secret)
    assert response.headers["x-tokentill-model-served"] == CHEAP
    assert (record().alias, record().served_model, record().fallback) == ("", CHEAP, True)


def test_a_fallback_header_that_is_neither_allow_nor_deny_is_a_400(fake_upstream, alice, key, tiers):
    response = call(CHAT, {"model": "tier/smart", "messages": ASK}, token=key, headers={"X-Tokentill-Fallback": "yes"})
    assert response.status == 400 and "X-Tokentill-Fallback" in response.error["message"]


# --- agent routes -------------------------------------------------------------------------------


def test_an_agent_mapped_by_staff_is_served_by_its_alias_whatever_it_asks_for(fake_upstream, alice, key, tiers):
    smart, _ = tiers
    AgentRoute.objects.create(agent="planner", alias=smart)
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 5))), Reply(body=completion(u=usage(10, 5))))
    mapped = call(CHAT, {"model": CHEAP, "messages": ASK}, token=key, headers={"X-Tokentill-Agent": "planner"})
    other = call(CHAT, {"model": CHEAP, "messages": ASK}, token=key, headers={"X-Tokentill-Agent": "writer"})
    assert mapped.headers["x-tokentill-model-served"] == SMART
    assert other.headers["x-tokentill-model-served"] == CHEAP
    first, second = UsageRecord.objects.order_by("id")
    assert (first.model, first.alias, first.served_model, first.agent) == (CHEAP, "tier/smart", SMART, "planner")
    assert (second.alias, second.served_model) == ("", CHEAP)


# --- the admin ----------------------------------------------------------------------------------


def add_alias(admin_client, **fields):
    data = {"name": "", "model": "", "description": "", "fallback": "", "fallback_below": "", **fields}
    return admin_client.post("/admin/proxy/modelalias/add/", data)


def errors_of(response) -> str:
    assert response.status_code == 200, "the form was expected to be refused"
    form = response.context["adminform"].form
    return " ".join(str(message) for messages in form.errors.values() for message in messages)


def test_the_admin_saves_an_alias_and_the_proxy_serves_it_at_once(fake_upstream, admin_client, alice, key, tiers):
    response = add_alias(admin_client, name="tier/new", model=SMART, fallback=CHEAP, fallback_below="1.50")
    assert response.status_code == 302
    alias = ModelAlias.objects.get(name="tier/new")
    assert (alias.model, alias.fallback, alias.fallback_below) == (SMART, CHEAP, 1_500_000_000)
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 5))))
    assert call(CHAT, {"model": "tier/new", "messages": ASK}, token=key).headers["x-tokentill-model-served"] == SMART


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "tier/x", "model": "tier/x"}, "cannot stand for itself"),
        ({"name": "tier/x", "model": "tier/fast"}, "is an alias"),
        ({"name": "tier/x", "model": "nobody/sells-this"}, "is not a model on sale"),
        ({"name": CHEAP, "model": SMART}, "is a model in the price table"),
        ({"name": "tier/x", "model": CHEAP, "fallback": SMART}, "a fallback must be cheaper"),
        ({"name": "tier/x", "model": CHEAP, "fallback": "tier/x"}, "cannot be the model (or alias) itself"),
        ({"name": "tier/x", "model": CHEAP, "fallback": "tier/fast"}, "that is no fallback"),
        ({"name": "tier/x", "model": SMART, "fallback": "nobody/sells-this"}, "is not a model on sale"),
        ({"name": "tier/x", "model": SMART, "fallback_below": "1.00"}, "needs a fallback"),
        ({"name": "tier/x", "model": SMART, "fallback": CHEAP, "fallback_below": "-1"}, "negative"),
    ],
)
def test_the_admin_refuses_an_alias_that_cannot_work(admin_client, tiers, fields, message):
    assert message in errors_of(add_alias(admin_client, **fields))
    assert not ModelAlias.objects.filter(name=fields["name"]).exists()


def test_the_admin_refuses_a_model_fallback_that_is_dearer_or_itself(admin_client, tiers):
    url = "/admin/proxy/modelfallback/add/"
    dearer = admin_client.post(url, {"model": CHEAP, "fallback": SMART, "fallback_below": ""})
    assert "a fallback must be cheaper" in errors_of(dearer)
    itself = admin_client.post(url, {"model": SMART, "fallback": SMART, "fallback_below": ""})
    assert "cannot be the model (or alias) itself" in errors_of(itself)
    unknown = admin_client.post(url, {"model": "nobody/sells-this", "fallback": CHEAP, "fallback_below": ""})
    assert "is not a model on sale" in errors_of(unknown)
    assert admin_client.post(url, {"model": SMART, "fallback": "tier/fast", "fallback_below": ""}).status_code == 302


def test_the_admin_maps_an_agent_to_an_alias(admin_client, tiers):
    smart, _ = tiers
    response = admin_client.post("/admin/proxy/agentroute/add/", {"agent": "planner", "alias": smart.pk})
    assert response.status_code == 302
    assert AgentRoute.objects.get().alias == smart
    padded = admin_client.post("/admin/proxy/agentroute/add/", {"agent": " writer ", "alias": smart.pk})
    # Django strips the field; the label saved is the one matched exactly.
    assert padded.status_code == 302 and AgentRoute.objects.filter(agent="writer").exists()
