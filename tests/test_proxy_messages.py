"""/v1/messages and /v1/messages/count_tokens through the live ASGI app, against the fake
upstream: forwarded to OpenRouter's own /messages, or translated to chat completions for an
OpenAI-compatible upstream. Errors are in Anthropic's shape throughout."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import json
import os
from decimal import Decimal
from itertools import chain

import pytest
from django.core.management import call_command

from accounts.services import api_key_create, token_pair_issue
from proxy.models import CostSource, UsageRecord, UsageStatus
from proxy.upstream import pseudonym
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    ANTHROPIC_MODEL,
    MODEL,
    Reply,
    StreamReply,
    anthropic_error,
    call,
    completion,
    fake_upstream,
    fake_upstream_server,
    key,
    message_object,
    messages_error_event,
    messages_stream_of,
    messages_usage,
    price,
    stream_of,
    tokens_count,
    usage,
)
from tests.test_proxy_chat import balance, record
from wallet.models import Hold

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"
HELLO = {"model": ANTHROPIC_MODEL, "max_tokens": 300, "messages": [{"role": "user", "content": "Say pong"}]}


@pytest.fixture
def claude(db):
    """Claude Sonnet 4.5's price on OpenRouter: $3 / $15 per million, cache reads $0.30, writes $3.75."""
    from proxy.models import ModelPrice

    return ModelPrice.objects.create(
        model=ANTHROPIC_MODEL,
        prompt=Decimal("3"),
        completion=Decimal("15"),
        cache_read=Decimal("0.30"),
        cache_write=Decimal("3.75"),
        default_max_output=1000,
    )


@pytest.fixture
def sk(alice, claude):
    """Alice's key, sent as the anthropic SDK's ``x-api-key`` header."""
    return {"x-api-key": api_key_create(user=alice, name="claude")[1], "anthropic-version": "2023-06-01"}


def charge_for(fresh, read, written, output) -> int:
    """Nanodollars at the claude price with the 20 % markup, rounded half up."""
    cost = (fresh * Decimal(3) + read * Decimal("0.30") + written * Decimal("3.75") + output * Decimal(15)) / 10**6
    return int((cost * Decimal("1.2") * 10**9).to_integral_value())


# --- native: OpenRouter's /messages ---------------------------------------------------------------


def test_a_native_message_bills_cache_reads_and_writes_that_input_tokens_leave_out(fake_upstream, alice, sk):
    u = messages_usage(10, 20, cache_read=500, cache_creation=100)  # no cost: priced from the table
    fake_upstream.script("messages", Reply(body=message_object("Pong.", u=u)))
    response = call(MESSAGES, HELLO, token=None, headers=sk)
    assert response.status == 200 and response.json()["content"] == [{"type": "text", "text": "Pong."}]
    expected = charge_for(10, 500, 100, 20)
    assert response.headers["x-tokentill-charge"] == f"{Decimal(expected) / 10**9:.9f}"
    rec = record()
    assert (rec.endpoint, rec.charge, rec.cost_source, rec.finish_reason) == (
        "messages",
        expected,
        CostSource.PRICE_TABLE,
        "stop",
    )
    assert (rec.prompt_tokens, rec.cached_tokens, rec.cache_write_tokens, rec.completion_tokens) == (610, 500, 100, 20)
    (sent,) = fake_upstream.calls("messages")
    assert sent.json["max_tokens"] == 300 and sent.json["metadata"] == {"user_id": pseudonym(alice.pk)}
    assert sent.headers["authorization"] == "Bearer sk-or-v1-server-secret" and "x-api-key" not in sent.headers
    assert balance(alice) == 10_000_000_000 - expected


def test_a_native_stream_restates_openrouters_cost_as_the_charge_before_message_stop(fake_upstream, alice, sk):
    u = messages_usage(12, 3, cache_read=100, cost="0.00002")
    fake_upstream.script("messages", StreamReply(messages_stream_of("Po", "ng", u=u)))
    response = call(MESSAGES, {**HELLO, "stream": True}, token=None, headers=sk)
    kinds = [event["type"] for event in response.events()]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    assert response.body.decode().split("\n\n")[-3].startswith(": tokentill ")  # just before message_stop
    assert response.events()[-2]["usage"] == {"output_tokens": 3, "cost": 0.000024}
    rec = record()
    assert (rec.charge, rec.prompt_tokens, rec.cached_tokens, rec.completion_tokens) == (24_000, 112, 100, 3)
    assert rec.generation_id == "msg_fake_1" and response.tokentill()["charge"] == "0.000024000"


def test_an_upstream_error_event_mid_stream_is_relayed_and_recorded(fake_upstream, alice, sk):
    items = [*messages_stream_of("Po", "ng")[:4], messages_error_event()]
    fake_upstream.script("messages", StreamReply(items))
    response = call(MESSAGES, {**HELLO, "stream": True}, token=None, headers=sk)
    assert response.events()[-1] == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    rec = record()
    assert (rec.status, rec.finish_reason, rec.error) == (UsageStatus.UPSTREAM_ERROR, "error", "Overloaded")


def test_a_native_stream_cut_off_ends_with_an_error_event(fake_upstream, alice, sk):
    fake_upstream.script("messages", StreamReply(messages_stream_of("Po", "ng")[:4]))
    response = call(MESSAGES, {**HELLO, "stream": True}, token=None, headers=sk)
    last = response.events()[-1]
    assert last["type"] == "error" and last["error"]["type"] == "api_error" and "cut off" in last["error"]["message"]
    assert record().status == UsageStatus.UPSTREAM_ERROR and record().charge > 0


def test_an_upstream_rejection_is_an_anthropic_shaped_error(fake_upstream, alice, sk):
    fake_upstream.script("messages", anthropic_error(400, message="prompt is too long"))
    response = call(MESSAGES, HELLO, token=None, headers=sk)
    assert response.status == 400
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["message"] == "prompt is too long" and balance(alice) == 10_000_000_000


# --- credentials ------------------------------------------------------------------------------------


def test_a_key_or_token_is_accepted_as_x_api_key_or_bearer_with_any_anthropic_version(fake_upstream, alice, claude):
    fake_upstream.script("messages", *[Reply(body=message_object(u=messages_usage(5, 1, cost="0.00001")))] * 3)
    secret = api_key_create(user=alice, name="k")[1]
    access = token_pair_issue(user=alice).access
    for headers in (
        {"x-api-key": secret},
        {"authorization": f"Bearer {secret}", "anthropic-version": "2026-10-21"},
        {"x-api-key": access, "anthropic-version": "1999-01-01"},
    ):
        assert call(MESSAGES, HELLO, token=None, headers=headers).status == 200
    assert UsageRecord.objects.filter(status=UsageStatus.OK).count() == 3


def test_a_bad_key_is_an_anthropic_authentication_error(fake_upstream, claude):
    response = call(MESSAGES, HELLO, token=None, headers={"x-api-key": "tt_nope"})
    assert response.status == 401
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert body["request_id"] == response.headers["x-request-id"] and not fake_upstream.requests


# --- translated to chat completions -------------------------------------------------------------


@pytest.fixture
def translated(settings):
    settings.UPSTREAM_KIND = "openai"


def test_a_translated_message_is_billed_from_the_chat_usage(fake_upstream, alice, sk, translated):
    fake_upstream.script("chat", Reply(body=completion("Pong.", u=usage(1000, 40, cached=600), model=ANTHROPIC_MODEL)))
    body = {**HELLO, "system": "Be brief.", "stop_sequences": ["END"]}
    response = call(MESSAGES, body, token=None, headers=sk)
    message = response.json()
    assert message["type"] == "message" and message["content"] == [{"type": "text", "text": "Pong."}]
    assert message["usage"]["input_tokens"] == 400 and message["usage"]["cache_read_input_tokens"] == 600
    assert record().charge == charge_for(400, 600, 0, 40)
    (sent,) = fake_upstream.calls("chat")
    assert sent.json["messages"][0] == {"role": "system", "content": "Be brief."} and sent.json["stop"] == ["END"]
    assert sent.json["max_completion_tokens"] == 300 and sent.json["user"] == pseudonym(alice.pk)


def test_a_translated_stream_ends_with_the_usage_and_the_charge_before_message_stop(
    fake_upstream, alice, sk, translated
):
    fake_upstream.script("chat", StreamReply(stream_of("Po", "ng", u=usage(20, 3), model=ANTHROPIC_MODEL)))
    response = call(MESSAGES, {**HELLO, "stream": True}, token=None, headers=sk)
    kinds = [event["type"] for event in response.events()]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert response.events()[-2]["usage"]["input_tokens"] == 20
    assert response.body.decode().split("\n\n")[-3].startswith(": tokentill ")
    assert fake_upstream.calls("chat")[0].json["stream_options"] == {"include_usage": True}
    assert record().charge == charge_for(20, 0, 0, 3)


def test_tools_round_trip_through_the_translation(fake_upstream, alice, sk, translated):
    call_message = json.loads(completion(None, u=usage(50, 10), model=ANTHROPIC_MODEL, finish="tool_calls"))
    call_message["choices"][0]["message"]["tool_calls"] = [
        {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    ]
    fake_upstream.script(
        "chat",
        Reply(body=json.dumps(call_message).encode()),
        Reply(body=completion("Sunny.", u=usage(70, 2), model=ANTHROPIC_MODEL)),
    )
    tool = {"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    first = call(MESSAGES, {**HELLO, "tools": [tool]}, token=None, headers=sk).json()
    assert first["stop_reason"] == "tool_use"
    (use,) = first["content"]
    assert use == {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}
    turns = [
        *HELLO["messages"],
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]
    second = call(MESSAGES, {**HELLO, "messages": turns, "tools": [tool]}, token=None, headers=sk).json()
    assert second["content"][0]["text"] == "Sunny."
    sent = fake_upstream.calls("chat")[1].json
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    assert [r.charge for r in UsageRecord.objects.order_by("id")] == [charge_for(50, 0, 0, 10), charge_for(70, 0, 0, 2)]


def test_what_the_translation_cannot_carry_is_an_anthropic_400_before_anything_is_held(
    fake_upstream, alice, sk, translated
):
    no_cap = {key: value for key, value in HELLO.items() if key != "max_tokens"}
    server_tool = {**HELLO, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    for body, message in ((no_cap, "max_tokens is required."), (server_tool, "not supported")):
        response = call(MESSAGES, body, token=None, headers=sk)
        assert response.status == 400 and response.json()["error"]["type"] == "invalid_request_error"
        assert message in response.json()["error"]["message"]
    assert not Hold.objects.exists() and not fake_upstream.requests


# --- refusals -----------------------------------------------------------------------------------


def test_an_empty_wallet_gets_a_billing_error_with_the_topup_link(fake_upstream, bob, claude, settings):
    response = call(MESSAGES, HELLO, token=None, headers={"x-api-key": api_key_create(user=bob, name="k")[1]})
    assert response.status == 402
    error = response.json()["error"]
    assert error["type"] == "billing_error" and "Top up" in error["message"]
    assert error["topup_url"] == f"{settings.APP_URL}/topup" and error["balance"] == "0.000000000"
    assert Decimal(error["needed"]) > 0
    assert record().endpoint == "messages" and record().http_status == 402 and not fake_upstream.requests


@pytest.mark.parametrize("stream", [False, True])
def test_assistant_message_mode_answers_a_message_with_the_topup_link(fake_upstream, bob, claude, settings, stream):
    settings.REFUSAL_MODE = "assistant_message"
    headers = {"x-api-key": api_key_create(user=bob, name="k")[1]}
    response = call(MESSAGES, {**HELLO, "stream": stream}, token=None, headers=headers)
    assert response.status == 200 and response.headers["x-tokentill-blocked"] == "insufficient_funds"
    if stream:
        text = "".join(e["delta"]["text"] for e in response.events() if e["type"] == "content_block_delta")
        assert response.events()[-1]["type"] == "message_stop" and response.tokentill()["charge"] == "0.000000000"
    else:
        text = response.json()["content"][0]["text"]
    assert "/topup" in text and not fake_upstream.requests


def test_a_client_that_disconnects_mid_stream_pays_for_what_it_got(fake_upstream, alice, sk):
    from tests.test_proxy_responses import slow_native_stream

    items = messages_stream_of("Po")
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "word "}}
    from tests.fake_upstream import typed_sse

    # Lazily: the words go on for seconds by the clock, so a list of them would take that long to build.
    words = (typed_sse(delta) if isinstance(item, bytes) else item for item in slow_native_stream([], []))
    fake_upstream.script("messages", StreamReply(chain(items[:4], words)))
    response = call(MESSAGES, {**HELLO, "stream": True}, token=None, headers=sk, disconnect_after=8)
    assert fake_upstream.stream_finished.wait(3), "the upstream kept streaming after the client left"
    assert fake_upstream.stream_closed_at - float(response.headers["_disconnected_at"]) < 1.0
    rec = record()
    # message_start's counts are not final (its output is one token): a marked estimate, as chat's
    assert (rec.status, rec.cost_source, rec.estimated) == (UsageStatus.CANCELLED, CostSource.ESTIMATE, True)
    assert rec.completion_tokens >= 5 * response.body.count(b'"word "') // 4 and rec.charge > 0
    assert balance(alice) == 10_000_000_000 - rec.charge
    call_command("verify_ledger", stdout=open(os.devnull, "w"))


# --- count_tokens -------------------------------------------------------------------------------


def test_count_tokens_is_404_when_the_upstream_cannot_count(fake_upstream, alice, sk):
    response = call(COUNT, {"model": ANTHROPIC_MODEL, "messages": HELLO["messages"]}, token=None, headers=sk)
    assert response.status == 404 and response.json()["error"]["type"] == "not_found_error"
    assert "cannot count tokens" in response.json()["error"]["message"] and not fake_upstream.requests


def test_count_tokens_is_forwarded_free_and_rate_limited_per_user(fake_upstream, alice, sk, settings):
    settings.UPSTREAM_KIND = "anthropic"  # the upstream that offers it
    settings.COUNT_TOKENS_RPM = 2
    fake_upstream.script("count_tokens", Reply(body=tokens_count(42)), Reply(body=tokens_count(43)))
    body = {"model": ANTHROPIC_MODEL, "messages": HELLO["messages"], "system": "Be brief."}
    answers = [call(COUNT, body, token=None, headers=sk) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 429]
    assert answers[0].json() == {"input_tokens": 42}
    assert answers[2].json()["error"]["type"] == "rate_limit_error" and int(answers[2].headers["retry-after"]) >= 0
    assert fake_upstream.calls("count_tokens")[0].json == body
    assert not UsageRecord.objects.exists() and not Hold.objects.exists() and balance(alice) == 10_000_000_000


def test_count_tokens_refuses_an_unknown_model_and_a_bad_key(fake_upstream, alice, sk, settings):
    settings.UPSTREAM_KIND = "anthropic"
    unknown = call(COUNT, {"model": "nobody/nothing", "messages": []}, token=None, headers=sk)
    assert unknown.status == 400 and "does not exist" in unknown.json()["error"]["message"]
    bad = call(COUNT, {"model": ANTHROPIC_MODEL, "messages": []}, token=None, headers={"x-api-key": "tt_x"})
    assert bad.status == 401 and bad.json()["error"]["type"] == "authentication_error"
    assert not fake_upstream.requests
