"""/v1/chat/completions through the live ASGI app, against the fake upstream on loopback."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import json
from decimal import Decimal

import pytest

from accounts.services import api_key_create
from proxy.models import CostSource, ModelPrice, UsageRecord, UsageStatus
from proxy.upstream import generation_lookup, pseudonym
from tests.conftest import make_user
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    DONE,
    MODEL,
    FakeUpstream,
    Reply,
    StreamReply,
    call,
    chunk,
    completion,
    fake_upstream,
    fake_upstream_server,
    key,
    price,
    self_signed_certificate,
    sse,
    stream_of,
    usage,
    usage_chunk,
)
from wallet.models import Entry, Hold, HoldStatus, Wallet

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}]}


def balance(user) -> int:
    return Wallet.objects.get(user=user).balance


def record() -> UsageRecord:
    return UsageRecord.objects.get()


# --- the happy paths ----------------------------------------------------------------------------


def test_it_charges_openrouter_cost_times_markup_to_the_nanodollar(fake_upstream, alice, key):
    fake_upstream.script("chat", Reply(body=completion(u=usage(412, 37, cost="0.0000597", cached=256))))
    response = call(CHAT, HELLO, token=key)
    assert response.status == 200
    assert response.json()["choices"][0]["message"]["content"] == "Pong."
    assert response.headers["x-tokentill-charge"] == "0.000071640"  # 0.0000597 × 1.2
    assert response.headers["x-tokentill-balance"] == "9.999928360"
    assert response.headers["x-request-id"].startswith("req_")
    assert balance(alice) == 10_000_000_000 - 71_640
    rec = record()
    assert (rec.status, rec.charge, rec.cost_source, rec.upstream_cost) == (
        UsageStatus.OK,
        71_640,
        CostSource.UPSTREAM,
        Decimal("0.0000597"),
    )
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens) == (412, 37, 256)
    assert rec.request_id == response.headers["x-request-id"]
    assert rec.generation_id == "gen-fake-1" and rec.latency_ms is not None
    entry = Entry.objects.get(kind="usage")
    assert entry.amount == -71_640 and entry.reference == rec.request_id
    assert Hold.objects.get().status == HoldStatus.SETTLED


def test_the_upstream_gets_the_server_key_attribution_and_a_pseudonymous_user(fake_upstream, alice, key, settings):
    fake_upstream.script("chat", Reply(body=completion(u=usage(1, 1, cost="0.00001"))))
    response = call(CHAT, {**HELLO, "user": "alice@example.com"}, token=key)
    (sent,) = fake_upstream.calls("chat")
    assert sent.headers["authorization"] == "Bearer sk-or-v1-server-secret"
    assert sent.headers["http-referer"] == settings.APP_URL
    assert sent.headers["x-title"] == sent.headers["x-openrouter-title"] == settings.APP_TITLE
    assert sent.json["user"] == pseudonym(alice.pk) != "alice@example.com"
    assert len(sent.json["user"]) == 64
    assert sent.json["usage"] == {"include": True}
    assert "stream_options" not in sent.json
    assert "sk-or-v1" not in str(response.headers) + response.body.decode()


def test_an_openai_compatible_upstream_is_billed_from_the_price_table_with_reasoning_and_cache(
    fake_upstream, alice, key, settings, price
):
    settings.UPSTREAM_KIND = "openai"
    price.reasoning, price.cache_read, price.request_fee = Decimal("2.40"), Decimal("0.075"), 100_000
    price.save()
    u = usage(1000, 500, cached=400, reasoning=200)
    fake_upstream.script("chat", Reply(body=completion(u=u)))
    response = call(CHAT, {**HELLO, "max_completion_tokens": 600}, token=key)
    # 600 fresh × 0.15 + 400 cached × 0.075 + 300 × 0.60 + 200 reasoning × 2.40, per 1M, + $0.0001 fee
    cost = (600 * Decimal("0.15") + 400 * Decimal("0.075") + 300 * Decimal("0.60") + 200 * Decimal("2.40")) / 10**6
    cost += Decimal("0.0001")
    expected = int((cost * Decimal("1.2") * 10**9).to_integral_value())
    assert response.headers["x-tokentill-charge"] == f"{Decimal(expected) / 10**9:.9f}"
    rec = record()
    assert (rec.charge, rec.cost_source, rec.reasoning_tokens) == (expected, CostSource.PRICE_TABLE, 200)
    assert rec.prices["reasoning"] == "2.400000000000" and rec.markup == Decimal("0.2")
    (sent,) = fake_upstream.calls("chat")
    assert sent.json["max_tokens"] == 600  # Ollama reads only max_tokens
    assert "stream_options" not in sent.json  # vLLM refuses it on a non-streamed request


def test_a_fallback_model_that_answered_is_billed_at_its_own_price(fake_upstream, alice, key, settings):
    settings.UPSTREAM_KIND = "openai"
    ModelPrice.objects.create(model="cheap/model", prompt=Decimal("0.01"), completion=Decimal("0.01"))
    fake_upstream.script("chat", Reply(body=completion(u=usage(1000, 1000), model="cheap/model")))
    call(CHAT, {**HELLO, "models": ["cheap/model"]}, token=key)
    rec = record()
    assert rec.upstream_model == "cheap/model"
    assert rec.charge == 24_000  # 2000 tokens × $0.01/M × 1.2


# --- streaming ----------------------------------------------------------------------------------


def test_a_stream_is_relayed_with_comments_and_without_the_usage_chunk_nobody_asked_for(fake_upstream, alice, key):
    u = usage(20, 3, cost="0.000012")
    paced = [item for event in stream_of("Po", "ng", ".", u=u, comments=True) for item in (event, 0.02)]
    fake_upstream.script("chat", StreamReply(paced))
    response = call(CHAT, {**HELLO, "stream": True}, token=key)
    assert response.status == 200 and response.headers["content-type"] == "text/event-stream"
    events = response.data_events()
    assert events[-1] == "[DONE]"
    assert all('"usage"' not in e for e in events)
    assert response.comments()[0] == ": OPENROUTER PROCESSING"
    body = response.body.decode()
    assert body.index(": tokentill ") < body.index("data: [DONE]")
    trailer = response.tokentill()
    assert trailer["request_id"] == response.headers["x-request-id"]
    assert (trailer["charge"], trailer["balance"]) == ("0.000014400", "9.999985600")
    assert len(response.chunks) >= 4  # relayed as it came (20 ms apart), not in one piece
    assert record().stream is True and record().charge == 14_400


def test_a_client_that_asks_for_usage_gets_the_usage_chunk_priced_at_its_charge(fake_upstream, alice, key):
    """OpenRouter's usage.cost is what the request cost us; the client is shown what it paid."""
    import json

    u = usage(5, 1, cost="0.000001")
    u["cost_details"] = {"upstream_inference_cost": 0.0000009}
    fake_upstream.script("chat", StreamReply(stream_of("Hi", u=u)))
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    response = call(CHAT, body, token=key)
    usage_events = [e for e in response.data_events() if '"usage"' in e]
    assert len(usage_events) == 1
    chunk = json.loads(usage_events[0], parse_float=Decimal)
    assert chunk["choices"] == [] and chunk["usage"]["prompt_tokens"] == 5
    assert chunk["usage"]["cost"] == Decimal(response.tokentill()["charge"]) == Decimal("0.0000012")
    assert "cost_details" not in chunk["usage"]
    assert response.data_events()[-2:] == [usage_events[0], "[DONE]"]  # still the last data event


def test_a_whole_response_states_the_charge_as_its_usage_cost(fake_upstream, alice, key):
    import json

    fake_upstream.script("chat", Reply(body=completion(u=usage(412, 37, cost="0.0000597"))))
    response = call(CHAT, HELLO, token=key)
    body = json.loads(response.body, parse_float=Decimal)
    assert body["usage"]["cost"] == Decimal(response.headers["x-tokentill-charge"]) == Decimal("0.00007164")
    assert body["choices"][0]["message"]["content"] == "Pong." and body["usage"]["completion_tokens"] == 37
    assert int(response.headers["content-length"]) == len(response.body)


def byok_usage(prompt, completion, *, fee, provider, is_byok=True) -> dict:
    """OpenRouter's usage for a Bring-Your-Own-Key request: ``cost`` is its fee, the provider's
    charge to the operator's own account is ``cost_details.upstream_inference_cost``."""
    u = usage(prompt, completion, cost=fee)
    u["is_byok"] = is_byok
    u["cost_details"] = {"upstream_inference_cost": provider}
    return u


@pytest.mark.parametrize("stream", [False, True])
def test_a_byok_request_is_billed_the_providers_charge_plus_openrouters_fee(fake_upstream, alice, key, stream):
    import json

    u = byok_usage(412, 37, fee="0.000003", provider=0.00006)
    reply = StreamReply(stream_of("Pong", u=u)) if stream else Reply(body=completion(u=u))
    fake_upstream.script("chat", reply)
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}} if stream else HELLO
    response = call(CHAT, body, token=key)
    assert response.status == 200
    charge = response.tokentill()["charge"] if stream else response.headers["x-tokentill-charge"]
    assert charge == "0.000075600"  # (0.000003 + 0.00006) × 1.2
    rec = record()
    assert (rec.upstream_cost, rec.charge, rec.cost_source) == (Decimal("0.000063"), 75_600, CostSource.UPSTREAM)
    assert balance(alice) == 10_000_000_000 - 75_600
    shown = json.loads(response.data_events()[-2] if stream else response.body, parse_float=Decimal)["usage"]
    assert shown["cost"] == Decimal("0.0000756") and "cost_details" not in shown  # our cost price stays ours


def test_an_upstream_inference_cost_without_byok_is_not_added(fake_upstream, alice, key):
    u = byok_usage(412, 37, fee="0.0000597", provider=0.0000597, is_byok=False)
    fake_upstream.script("chat", Reply(body=completion(u=u)))
    assert call(CHAT, HELLO, token=key).headers["x-tokentill-charge"] == "0.000071640"
    assert record().upstream_cost == Decimal("0.0000597")


def test_usage_riding_on_the_finish_chunk_is_billed_and_only_the_usage_key_is_stripped(
    fake_upstream, alice, key, settings
):
    settings.UPSTREAM_KIND = "openai"  # old llama.cpp: usage on the finish chunk, no cost
    items = [sse(chunk("Hi", role="assistant")), sse(chunk(None, finish="stop", usage=usage(100, 50))), DONE]
    fake_upstream.script("chat", StreamReply(items))
    response = call(CHAT, {**HELLO, "stream": True}, token=key)
    finish = [e for e in response.data_events() if '"finish_reason":"stop"' in e]
    assert len(finish) == 1 and '"usage"' not in finish[0]
    assert record().charge == int((100 * Decimal("0.15") + 50 * Decimal("0.6")) * Decimal("1.2") * 1000)
    (sent,) = fake_upstream.calls("chat")
    assert sent.json["stream_options"] == {"include_usage": True}


# --- refusals -----------------------------------------------------------------------------------


def test_a_bad_credential_is_401_and_nothing_is_recorded(fake_upstream, price):
    response = call(CHAT, HELLO, token="tt_not-a-real-key")
    assert response.status == 401 and response.error["code"] == "invalid_api_key"
    assert set(response.error) >= {"message", "type", "param", "code"}
    assert UsageRecord.objects.count() == 0 and not fake_upstream.requests


@pytest.mark.parametrize(
    "body, code",
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        ({"model": MODEL}, "invalid_request"),
        ({"model": MODEL, "messages": []}, "invalid_request"),
        ({"messages": [{"role": "user", "content": "x"}]}, "invalid_request"),
        ({**HELLO, "max_tokens": -1}, "invalid_request"),
        ({**HELLO, "n": 0}, "invalid_request"),
        ({**HELLO, "model": "nobody/nothing"}, "model_not_found"),
        # Inputs that once reached the database (a 500 there) or the recursion limit:
        (b"[" * 5000 + b"]" * 5000, "invalid_json"),
        ({**HELLO, "model": "gpt\u0000x"}, "invalid_request"),
        (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}', "invalid_request"),
        ({**HELLO, "model": "m" * 201}, "invalid_request"),
        ({**HELLO, "models": [MODEL] * 11}, "invalid_request"),
        ({**HELLO, "models": ["nobody/nothing", *[f"x/{i}" for i in range(9)]]}, "model_not_found"),
    ],
)
def test_malformed_requests_and_unknown_models_are_400_and_recorded_as_refused(fake_upstream, alice, key, body, code):
    response = call(CHAT, body, token=key)
    assert response.status == 400 and response.error["code"] == code
    assert record().status == UsageStatus.REFUSED and record().charge == 0 and record().http_status == 400
    assert not fake_upstream.requests


def test_a_disabled_model_is_not_found(fake_upstream, alice, key, price):
    from django.utils import timezone

    ModelPrice.objects.create(model=MODEL, enabled=False, effective_from=timezone.now())
    assert call(CHAT, HELLO, token=key).error["code"] == "model_not_found"


def test_a_body_over_the_limit_is_413_by_content_length_and_by_what_arrived(fake_upstream, alice, key, settings):
    settings.PROXY_MAX_BODY_BYTES = 2048
    big = {**HELLO, "messages": [{"role": "user", "content": "x" * 4000}]}
    assert call(CHAT, big, token=key).status == 413
    raw = b'{"model": "x", "pad": "' + b"y" * 1500
    response = call(CHAT, raw, token=key, body_parts=[raw, b"z" * 1500, b'"}'])
    assert response.status == 413 and response.error["code"] == "request_too_large"
    assert UsageRecord.objects.filter(http_status=413).count() == 2 and not fake_upstream.requests


def test_a_key_without_the_proxy_scope_or_for_other_models_is_403(fake_upstream, alice, price):
    billing = api_key_create(user=alice, name="billing", scopes=["billing"])[1]
    assert call(CHAT, HELLO, token=billing).error["code"] == "insufficient_scope"
    narrow = api_key_create(user=alice, name="narrow", limits={"allowed_models": ["other/model"]})[1]
    response = call(CHAT, HELLO, token=narrow)
    assert response.status == 403 and response.error["code"] == "model_not_allowed"
    assert not fake_upstream.requests


def test_an_empty_wallet_gets_402_with_a_topup_link_and_the_upstream_never_hears(fake_upstream, bob, price, settings):
    token = api_key_create(user=bob, name="k")[1]
    response = call(CHAT, HELLO, token=token)
    assert response.status == 402
    assert response.error["type"] == response.error["code"] == "insufficient_funds"
    assert response.error["topup_url"] == settings.APP_URL + "/topup"
    assert response.error["balance"] == "0.000000000"
    # What the request needs available: its hold, or MIN_BALANCE when that is more (as here).
    assert response.error["needed"] == "0.050000000"
    assert "needs $0.050000000" in response.error["message"]
    assert not fake_upstream.requests
    assert record().status == UsageStatus.REFUSED and record().http_status == 402


def test_the_402_says_what_the_whole_request_would_have_held(fake_upstream, bob, price):
    import json

    from core.money import format_usd
    from core.pricing import hold_nanos
    from core.usage import estimate_tokens
    from proxy.selectors import rates_for

    body = {**HELLO, "max_tokens": 200_000}
    response = call(CHAT, body, token=api_key_create(user=bob, name="k")[1])
    prompt = estimate_tokens(len(json.dumps(body).encode()))
    hold = hold_nanos(rates_for(price), prompt_tokens=prompt, max_output=200_000)
    assert hold > 50_000_000  # above MIN_BALANCE: the hold itself is what is needed
    assert response.status == 402 and response.error["needed"] == format_usd(hold)


@pytest.mark.parametrize("stream", [False, True])
def test_assistant_message_mode_refuses_with_a_readable_completion(fake_upstream, bob, price, settings, stream):
    settings.REFUSAL_MODE = "assistant_message"
    token = api_key_create(user=bob, name="k")[1]
    response = call(CHAT, {**HELLO, "stream": stream}, token=token)
    assert response.status == 200 and response.headers["x-tokentill-blocked"] == "insufficient_funds"
    if stream:
        assert response.data_events()[-1] == "[DONE]" and response.tokentill()["charge"] == "0.000000000"
        assert "/topup" in response.data_events()[0]
    else:
        assert "/topup" in response.json()["choices"][0]["message"]["content"]
        assert "needs $0.050000000" in response.json()["choices"][0]["message"]["content"]
    assert not fake_upstream.requests


def test_the_output_cap_the_hold_covers_is_always_sent_upstream(fake_upstream, alice, key, price):
    """Without max_tokens the hold assumes the model's default output cap — so that cap is what
    the upstream is told; with n choices the hold covers each of them."""
    import json

    from core.pricing import hold_nanos
    from core.usage import estimate_tokens
    from proxy.selectors import rates_for

    bodies = [HELLO, {**HELLO, "max_tokens": 50}, {**HELLO, "max_tokens": 50, "n": 3}]
    fake_upstream.script("chat", *[Reply(body=completion(u=usage(10, 5, cost="0.000001")))] * 3)
    for body in bodies:
        call(CHAT, body, token=key)
    plain, capped, three = fake_upstream.calls("chat")
    assert plain.json["max_completion_tokens"] == price.default_max_output == 1000
    assert capped.json["max_tokens"] == 50 and three.json["max_tokens"] == 50 and three.json["n"] == 3
    holds = [r.hold_amount for r in UsageRecord.objects.order_by("id")]
    prompts = [estimate_tokens(len(json.dumps(body).encode())) for body in bodies]
    rates = rates_for(price)
    assert holds == [
        hold_nanos(rates, prompt_tokens=prompts[0], max_output=1000),
        hold_nanos(rates, prompt_tokens=prompts[1], max_output=50),
        hold_nanos(rates, prompt_tokens=prompts[2], max_output=150),
    ]


def test_billing_ignores_a_model_the_request_never_named(fake_upstream, alice, key, settings):
    settings.UPSTREAM_KIND = "openai"
    ModelPrice.objects.create(model="dear/model", prompt=Decimal("100"), completion=Decimal("100"))
    fake_upstream.script("chat", Reply(body=completion(u=usage(1000, 1000), model="dear/model")))
    call(CHAT, HELLO, token=key)
    assert record().upstream_model == "dear/model"
    assert record().charge == 900_000  # at the requested model's price: 1000 × 0.15 + 1000 × 0.60, per 1M, × 1.2


def test_a_small_balance_clamps_the_output_cap_instead_of_refusing(fake_upstream, price, settings):
    settings.MIN_BALANCE = Decimal("0")
    poor = make_user("poor@example.com", balance="0.0005")  # affords ~690 output tokens at $0.60/M × 1.2
    token = api_key_create(user=poor, name="k")[1]
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 5, cost="0.000001"))))
    response = call(CHAT, {**HELLO, "max_tokens": 5000}, token=token)
    assert response.status == 200
    (sent,) = fake_upstream.calls("chat")
    assert settings.PROXY_MIN_OUTPUT_TOKENS <= sent.json["max_tokens"] < 700
    assert response.headers["x-tokentill-max-tokens"] == str(sent.json["max_tokens"])  # the client is told
    assert record().hold_amount <= 500_000


@pytest.mark.usefixtures("one_minute")
def test_the_keys_rpm_limit_is_429_with_retry_after(fake_upstream, alice, price):
    token = api_key_create(user=alice, name="k", limits={"rpm": 1})[1]
    fake_upstream.script("chat", Reply(body=completion(u=usage(1, 1, cost="0.000001"))))
    assert call(CHAT, HELLO, token=token).status == 200
    response = call(CHAT, HELLO, token=token)
    assert response.status == 429 and response.error["code"] == "rate_limit_exceeded"
    assert 0 < int(response.headers["retry-after"]) <= 60


def test_a_daily_spend_cap_counts_holds_in_flight(fake_upstream, alice, price):
    from core.money import format_usd
    from core.pricing import hold_nanos
    from proxy.selectors import rates_for

    # A hold for max_tokens=1000 at $0.60/M × 1.2 is ~$0.00072; cap = one hold and a half.
    one = hold_nanos(rates_for(price), prompt_tokens=len(b'{"model": "x"}') // 4, max_output=1000)
    token = api_key_create(user=alice, name="k", limits={"daily_spend": format_usd(one * 3 // 2)})[1]
    fake_upstream.script("chat", Reply(body=completion(u=usage(1, 1, cost="0.000001"))))
    body = {**HELLO, "max_tokens": 1000}
    first = call(CHAT, body, token=token)
    assert first.status == 200  # settled at a tiny charge: the cap has room again
    # Now hold money in flight: a pending request's hold counts against the cap.
    from accounts.models import ApiKey
    from proxy.services import RequestMeta, arequest_begin
    from tests.fake_upstream import run_async

    key_row = ApiKey.objects.get(name="k")
    meta = RequestMeta(request_id="req_inflight", user=alice, api_key=key_row, endpoint="chat.completions", model=MODEL)
    run_async(arequest_begin, meta=meta, prompt_chars=100, requested_output=1000)
    response = call(CHAT, body, token=token)
    assert response.status == 429 and response.error["code"] == "spend_cap_reached"
    assert 0 < int(response.headers["retry-after"]) <= 86400


def test_run_step_and_spend_limits_are_429(fake_upstream, alice, key, settings):
    settings.RUN_MAX_STEPS = 1
    fake_upstream.script("chat", Reply(body=completion(u=usage(1, 1, cost="0.000001"))))
    run = {"X-Tokentill-Run": "run-42", "X-Tokentill-Agent": "planner", "X-Tokentill-Tool": "search"}
    assert call(CHAT, HELLO, token=key, headers=run).status == 200
    response = call(CHAT, HELLO, token=key, headers=run)
    assert response.status == 429 and response.error["code"] == "run_step_limit"
    first = UsageRecord.objects.get(status=UsageStatus.OK)
    assert (first.run, first.agent, first.tool) == ("run-42", "planner", "search")
    settings.RUN_MAX_STEPS, settings.RUN_MAX_SPEND = 0, Decimal("0.0001")
    response = call(CHAT, HELLO, token=key, headers={"X-Tokentill-Run": "run-43"})
    assert response.status == 429 and response.error["code"] == "run_spend_limit"


# --- upstream failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, status, code",
    [
        (Reply(500, {"error": {"message": "boom", "code": 500}}), 502, "upstream_error"),
        (Reply(402, {"error": {"message": "Insufficient credits", "code": 402}}), 502, "upstream_error"),
        (Reply(429, {"error": {"message": "slow", "code": 429}}, {"Retry-After": "7"}), 429, "upstream_rate_limited"),
        (Reply(400, {"error": {"message": "context too long", "code": 400}}), 400, "upstream_invalid_request"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_error_before_output_is_mapped_and_costs_nothing(
    fake_upstream, alice, key, reply, status, code, stream
):
    fake_upstream.script("chat", reply)
    response = call(CHAT, {**HELLO, "stream": stream}, token=key)
    assert response.status == status and response.error["code"] == code
    assert "Insufficient credits" not in response.body.decode()  # the operator's account is not the user's business
    if status == 429:
        assert response.headers["retry-after"] == "7"
    rec = record()
    assert (rec.status, rec.charge, rec.http_status) == (UsageStatus.UPSTREAM_ERROR, 0, status)
    assert balance(alice) == 10_000_000_000 and Hold.objects.get().status == HoldStatus.RELEASED


SERVER_KEY = "sk-or-v1-server-secret"  # what the fake_upstream fixture configures


@pytest.mark.parametrize(
    ("reply", "useful", "param"),
    [
        (  # OpenRouter relaying OpenAI, which quotes the operator's key and organisation
            Reply(
                400,
                {
                    "error": {
                        "message": "Provider returned error",
                        "code": 400,
                        "metadata": {
                            "raw": json.dumps(
                                {
                                    "error": {
                                        "message": f"max_tokens: must be ≤ 4096 (key {SERVER_KEY}, org-AbC123xYz)",
                                        "param": "max_tokens",
                                    }
                                }
                            ),
                            "provider_name": "OpenAI",
                        },
                    }
                },
            ),
            "max_tokens: must be ≤ 4096",
            "max_tokens",
        ),
        (  # vLLM naming the account and the operator's e-mail
            Reply(
                400,
                {
                    "object": "error",
                    "message": "This model's maximum context length is 8192 tokens; account 48213 "
                    "(ops@operator.example) sent 9000.",
                    "type": "BadRequestError",
                    "code": 400,
                },
            ),
            "This model's maximum context length is 8192 tokens",
            None,
        ),
        (  # a proxy's HTML page in front of the upstream
            Reply(
                413,
                b"<html><head><title>413 Request Entity Too Large</title></head><body>gw-7 "
                b"https://gw.operator.example/?token=abcdef</body></html>",
            ),
            "413 Request Entity Too Large",
            None,
        ),
    ],
    ids=["openrouter", "vllm", "html"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_refusal_keeps_what_was_wrong_and_drops_the_operators_key_and_account(
    fake_upstream, alice, key, caplog, reply, useful, param, stream
):
    fake_upstream.script("chat", reply)

    with caplog.at_level("WARNING", logger="proxy.endpoints.refusals"):
        response = call(CHAT, {**HELLO, "stream": stream}, token=key)

    assert response.status == 400
    error = response.error
    assert (error["code"], error["type"], error["param"]) == (
        "upstream_invalid_request",
        "invalid_request_error",
        param,
    )
    assert useful in error["message"]
    text = response.body.decode()
    for private in (SERVER_KEY, "sk-or", "AbC123xYz", "48213", "ops@operator.example", "token=abcdef", "gw-7"):
        assert private not in text
    rec = record()
    assert useful in rec.error and SERVER_KEY not in rec.error and "48213" not in rec.error
    # Staff read the whole body in the log (account, e-mail, URL) — the configured key removed even there.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "proxy.endpoints.refusals")
    assert f"upstream HTTP {reply.status}" in logged and SERVER_KEY not in logged
    assert "48213" in logged or "48213" not in str(reply.body)


def test_an_upstream_timeout_is_504_and_an_unreachable_upstream_502(fake_upstream, alice, key, settings):
    settings.UPSTREAM_READ_TIMEOUT = 0.3
    fake_upstream.script("chat", Reply(body=completion(), delay=1.0))
    response = call(CHAT, HELLO, token=key)
    assert response.status == 504 and response.error["code"] == "upstream_timeout"
    settings.UPSTREAM_BASE_URL = "http://127.0.0.1:9/api/v1"  # discard port: connection refused
    assert call(CHAT, HELLO, token=key).status == 502
    assert balance(alice) == 10_000_000_000


def test_an_openrouter_error_mid_stream_without_usage_is_free(fake_upstream, alice, key):
    error = chunk("", finish="error", error={"code": 502, "message": "Upstream connection dropped"})
    fake_upstream.script("chat", StreamReply([sse(chunk("Hel", role="assistant")), sse(error)]))
    response = call(CHAT, {**HELLO, "stream": True}, token=key)
    assert response.status == 200 and "Upstream connection dropped" in response.body.decode()
    assert response.data_events()[-1] == "[DONE]"
    rec = record()
    assert (rec.status, rec.charge, rec.finish_reason) == (UsageStatus.UPSTREAM_ERROR, 0, "error")
    assert rec.error == "Upstream connection dropped"


def test_a_stream_cut_off_without_usage_is_billed_as_a_marked_estimate(fake_upstream, alice, key, settings):
    settings.UPSTREAM_KIND = "openai"  # vLLM: error event then [DONE], no usage
    error = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
    items = [sse(chunk("x" * 400, role="assistant")), sse(error), DONE]
    fake_upstream.script("chat", StreamReply(items))
    call(CHAT, {**HELLO, "stream": True}, token=key)
    rec = record()
    assert rec.estimated and rec.cost_source == CostSource.ESTIMATE and rec.status == UsageStatus.UPSTREAM_ERROR
    assert rec.completion_tokens == 100 and rec.charge > 0
    assert balance(alice) == 10_000_000_000 - rec.charge


def test_a_stream_that_ends_before_done_is_an_upstream_error_the_client_is_told_of(fake_upstream, alice, key):
    import json

    fake_upstream.script("chat", StreamReply([sse(chunk("x" * 400, role="assistant"))]))  # then the line drops
    response = call(CHAT, {**HELLO, "stream": True}, token=key)
    events = response.data_events()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "upstream_error"
    rec = record()
    assert (rec.status, rec.cost_source, rec.estimated) == (UsageStatus.UPSTREAM_ERROR, CostSource.ESTIMATE, True)
    assert rec.completion_tokens == 100 and rec.charge > 0  # the output relayed is billed, marked as an estimate
    assert response.tokentill()["charge"] == f"{Decimal(rec.charge) / 10**9:.9f}"


def test_a_stream_of_nothing_but_keep_alives_is_a_failure_that_costs_nothing(fake_upstream, alice, key):
    import json

    fake_upstream.script("chat", StreamReply([b": OPENROUTER PROCESSING\n\n"]))
    response = call(CHAT, {**HELLO, "stream": True}, token=key)
    assert response.status == 200 and response.comments()[0] == ": OPENROUTER PROCESSING"  # already relayed
    assert json.loads(response.data_events()[0])["error"]["code"] == "upstream_error"
    assert response.tokentill()["charge"] == "0.000000000" and response.data_events()[-1] == "[DONE]"
    rec = record()
    assert (rec.status, rec.charge) == (UsageStatus.UPSTREAM_ERROR, 0) and "without any output" in rec.error
    assert Hold.objects.get().status == HoldStatus.RELEASED and balance(alice) == 10_000_000_000


def test_only_post_is_served(fake_upstream, alice, key):
    response = call(CHAT, b"", token=key, method="GET")
    assert response.status == 405 and response.headers["allow"] == "POST"
    assert response.error["code"] == "method_not_allowed" and not fake_upstream.requests


def test_a_refusal_states_a_negative_balance_readably(fake_upstream, price):
    from wallet.services import hold_create, hold_settle

    poor = make_user("poor@example.com", balance="0.01")
    hold = hold_create(wallet=poor.wallet, amount=1, request_id="req_old")
    hold_settle(hold=hold, amount=20_000_000)  # an overage took the wallet below zero
    token = api_key_create(user=poor, name="k")[1]
    response = call(CHAT, HELLO, token=token)
    assert response.status == 402 and response.error["balance"] == "-0.010000000"
    assert "(-$0.010000000, -$0.010000000 available)" in response.error["message"]


def test_an_https_upstream_behind_a_private_ca_is_trusted_through_upstream_ca_bundle(
    fake_upstream, alice, key, settings, tmp_path
):
    """vLLM or Ollama behind TLS with their own certificate: refused until the operator trusts it,
    then proxied — whole and streamed — as any upstream is (and so is the generation lookup)."""
    cert, private_key = self_signed_certificate(str(tmp_path))
    tls = FakeUpstream(tls=(cert, private_key))
    try:
        settings.UPSTREAM_BASE_URL = tls.url
        tls.script("chat", Reply(body=completion(u=usage(100, 20, cost=0.00003))))
        untrusted = call(CHAT, HELLO, token=key)
        assert untrusted.status == 502 and untrusted.error["code"] == "upstream_error"
        assert not tls.requests  # the handshake failed: nothing was sent
        assert UsageRecord.objects.get().charge == 0

        settings.UPSTREAM_CA_BUNDLE = cert
        whole = call(CHAT, HELLO, token=key)
        assert whole.status == 200 and whole.headers["x-tokentill-charge"] == "0.000036000"
        tls.script("chat", StreamReply(stream_of("Hello", " there", u=usage(10, 2, cost=0.00001))))
        streamed = call(CHAT, {**HELLO, "stream": True}, token=key)
        assert streamed.status == 200 and streamed.data_events()[-1] == "[DONE]"
        assert streamed.tokentill()["charge"] == "0.000012000"
        tls.script("generation", Reply(body={"data": {"id": "gen-1", "total_cost": 0.5}}))
        assert generation_lookup("gen-1") == {"id": "gen-1", "total_cost": Decimal("0.5")}
    finally:
        tls.close()
