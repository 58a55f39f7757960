"""/v1/responses through the live ASGI app, against the fake upstream on loopback: forwarded to
OpenRouter's own /responses (the default for an OpenRouter upstream) or translated to chat
completions (UPSTREAM_RESPONSES=translate, the default for an OpenAI-compatible one)."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import os
from decimal import Decimal

import pytest
from django.core.management import call_command

from accounts.services import api_key_create
from proxy.models import CostSource, UsageRecord, UsageStatus
from proxy.upstream import pseudonym
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    MODEL,
    Reply,
    StreamReply,
    call,
    chunk,
    completion,
    fake_upstream,
    fake_upstream_server,
    key,
    price,
    response_object,
    responses_stream_of,
    responses_usage,
    sse,
    stream_of,
    typed_sse,
    usage,
)
from tests.test_proxy_chat import balance, record
from wallet.models import Entry, Hold, HoldStatus

pytestmark = pytest.mark.django_db(transaction=True)

RESPONSES = "/v1/responses"
HELLO = {"model": MODEL, "input": "Say pong"}
WEATHER = {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}


def ledger_is_clean() -> None:
    call_command("verify_ledger", stdout=open(os.devnull, "w"))  # raises CommandError on any discrepancy


@pytest.fixture
def translated(settings):
    """An OpenAI-compatible upstream: /v1/responses is translated, billed from the price table."""
    settings.UPSTREAM_KIND, settings.UPSTREAM_RESPONSES = "openai", "translate"


# --- native: OpenRouter's /responses ---------------------------------------------------------------


def test_a_native_response_is_billed_openrouters_cost_times_markup_and_shows_the_charge(fake_upstream, alice, key):
    fake_upstream.script(
        "responses", Reply(body=response_object("Pong.", u=responses_usage(412, 37, cost="0.0000597")))
    )
    response = call(RESPONSES, {**HELLO, "metadata": {"app": "x"}, "max_output_tokens": 200}, token=key)
    assert response.status == 200
    body = response.json()
    assert body["output"][0]["content"][0]["text"] == "Pong."
    assert b'"cost":0.000071640}' in response.body and "cost_details" not in body["usage"]
    assert response.headers["x-tokentill-charge"] == "0.000071640"  # 0.0000597 × 1.2
    assert balance(alice) == 10_000_000_000 - 71_640
    rec = record()
    assert (rec.endpoint, rec.status, rec.charge, rec.cost_source) == ("responses", "ok", 71_640, CostSource.UPSTREAM)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.generation_id, rec.finish_reason) == (
        412,
        37,
        "resp_fake_1",
        "stop",
    )
    (sent,) = fake_upstream.calls("responses")
    assert sent.json["store"] is False and sent.json["max_output_tokens"] == 200
    assert sent.json["user"] == pseudonym(alice.pk) and sent.json["metadata"] == {"app": "x"}
    assert sent.headers["authorization"] == "Bearer sk-or-v1-server-secret"
    assert Entry.objects.get(kind="usage").amount == -71_640
    ledger_is_clean()


def test_a_native_response_without_a_cost_is_priced_from_the_table_cache_and_reasoning_included(
    fake_upstream, alice, key, price
):
    price.reasoning, price.cache_read = Decimal("2.40"), Decimal("0.075")
    price.save()
    u = responses_usage(1000, 500, cached=400, reasoning=200)
    fake_upstream.script("responses", Reply(body=response_object(u=u)))
    response = call(RESPONSES, HELLO, token=key)
    cost = (600 * Decimal("0.15") + 400 * Decimal("0.075") + 300 * Decimal("0.60") + 200 * Decimal("2.40")) / 10**6
    expected = int((cost * Decimal("1.2") * 10**9).to_integral_value())
    rec = record()
    assert (rec.charge, rec.cost_source, rec.cached_tokens, rec.reasoning_tokens) == (
        expected,
        CostSource.PRICE_TABLE,
        400,
        200,
    )
    assert response.headers["x-tokentill-charge"] == f"{Decimal(expected) / 10**9:.9f}"
    assert (fake_upstream.calls("responses")[0].json["max_output_tokens"]) == price.default_max_output


def test_a_native_stream_is_relayed_as_it_came_with_the_charge_before_its_terminal_event(fake_upstream, alice, key):
    items = responses_stream_of(
        "Po", "ng", calls=[("weather", '{"city":"Paris"}')], u=responses_usage(20, 3, cost="0.00001")
    )
    fake_upstream.script("responses", StreamReply([b": OPENROUTER PROCESSING\n\n", *items, b"data: [DONE]\n\n"]))
    response = call(RESPONSES, {**HELLO, "stream": True, "tools": [WEATHER]}, token=key)
    assert response.status == 200 and response.headers["content-type"] == "text/event-stream"
    relayed = b"".join(items[:-1])
    assert response.body.startswith(b": OPENROUTER PROCESSING\n\n" + relayed)  # byte for byte
    tail = response.body[len(relayed) + 25 :].split(b"\n\n")
    assert tail[0].startswith(b": tokentill ") and tail[1].startswith(b"event: response.completed\n")
    completed = response.events()[-1]
    assert completed["response"]["usage"]["cost"] == 0.000012 and b"[DONE]" not in response.body
    assert response.tokentill()["charge"] == "0.000012000"
    rec = record()
    assert (rec.charge, rec.stream, rec.completion_tokens, rec.generation_id) == (12_000, True, 3, "resp_fake_1")


def test_a_native_stream_cut_off_ends_with_an_error_event_and_is_billed_an_estimate(fake_upstream, alice, key):
    items = responses_stream_of("Po", "ng")[:5]  # …the deltas, then nothing
    fake_upstream.script("responses", StreamReply(items))
    response = call(RESPONSES, {**HELLO, "stream": True}, token=key)
    last = response.events()[-1]
    assert last["type"] == "error" and last["sequence_number"] == 5 and "cut off" in last["message"]
    assert response.comments()[-1].startswith(": tokentill ")
    rec = record()
    assert (rec.status, rec.estimated, rec.cost_source) == (UsageStatus.UPSTREAM_ERROR, True, CostSource.ESTIMATE)
    assert rec.charge > 0 and balance(alice) == 10_000_000_000 - rec.charge


def test_a_failed_native_response_is_relayed_and_recorded_as_an_upstream_error(fake_upstream, alice, key):
    fake_upstream.script("responses", StreamReply(responses_stream_of("Po", status="failed", u=responses_usage(9, 1))))
    response = call(RESPONSES, {**HELLO, "stream": True}, token=key)
    assert response.events()[-1]["type"] == "response.failed"
    rec = record()
    assert (rec.status, rec.finish_reason, rec.prompt_tokens) == (UsageStatus.UPSTREAM_ERROR, "error", 9)


def test_an_upstream_refusal_is_an_openai_shaped_400_and_costs_nothing(fake_upstream, alice, key):
    refused = Reply(400, {"error": {"code": 400, "message": "previous_response_id is not supported"}})
    fake_upstream.script("responses", refused)
    response = call(RESPONSES, HELLO, token=key)
    assert response.status == 400 and response.error["code"] == "upstream_invalid_request"
    assert "previous_response_id" in response.error["message"]
    assert balance(alice) == 10_000_000_000 and Hold.objects.get().status == HoldStatus.RELEASED


# --- translated to chat completions -------------------------------------------------------------


def test_a_translated_response_is_billed_from_the_chat_usage(fake_upstream, alice, key, translated):
    fake_upstream.script("chat", Reply(body=completion("Pong.", u=usage(1000, 500))))
    body = {
        **HELLO,
        "instructions": "Be brief.",
        "max_output_tokens": 600,
        "reasoning": {"effort": "low"},
        "metadata": {"app": "x"},
    }
    response = call(RESPONSES, body, token=key)
    assert response.status == 200
    answer = response.json()
    assert answer["object"] == "response" and answer["status"] == "completed"
    assert answer["output"][0]["content"][0]["text"] == "Pong." and answer["metadata"] == {"app": "x"}
    assert answer["usage"]["input_tokens"] == 1000 and answer["usage"]["output_tokens"] == 500
    # 1000 × 0.15 + 500 × 0.60 per 1M, × 1.2
    assert response.headers["x-tokentill-charge"] == "0.000540000" and record().charge == 540_000
    assert record().endpoint == "responses" and record().cost_source == CostSource.PRICE_TABLE
    (sent,) = fake_upstream.calls("chat")
    assert sent.json["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say pong"},
    ]
    assert sent.json["max_completion_tokens"] == sent.json["max_tokens"] == 600
    assert sent.json["reasoning_effort"] == "low" and sent.json["user"] == pseudonym(alice.pk)
    assert not fake_upstream.calls("responses")
    ledger_is_clean()


def test_a_translated_stream_asks_for_usage_and_ends_with_the_charge_then_completed(
    fake_upstream, alice, key, translated
):
    fake_upstream.script("chat", StreamReply(stream_of("Po", "ng", u=usage(20, 3), comments=True)))
    response = call(RESPONSES, {**HELLO, "stream": True}, token=key)
    (sent,) = fake_upstream.calls("chat")
    assert sent.json["stream"] is True and sent.json["stream_options"] == {"include_usage": True}
    kinds = [event["type"] for event in response.events()]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "".join(e["delta"] for e in response.events() if e["type"] == "response.output_text.delta") == "Pong"
    assert response.body.decode().split("\n\n")[-3].startswith(": tokentill ")  # just before response.completed
    assert response.events()[-1]["response"]["usage"]["output_tokens"] == 3
    assert record().charge == 5_760 and response.tokentill()["charge"] == "0.000005760"  # (20×0.15+3×0.60)/1M×1.2


def test_function_tools_round_trip_through_the_translation(fake_upstream, alice, key, translated):
    call_chunk = chunk(None, finish="tool_calls")
    call_chunk["choices"][0]["delta"] = {
        "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
        ]
    }
    fake_upstream.script(
        "chat",
        StreamReply(
            [sse(call_chunk), sse(chunk(None, finish="tool_calls") | {"usage": usage(30, 5)}), b"data: [DONE]\n\n"]
        ),
        Reply(body=completion("Sunny.", u=usage(40, 2))),
    )
    first = call(RESPONSES, {**HELLO, "stream": True, "tools": [WEATHER]}, token=key)
    (item,) = first.events()[-1]["response"]["output"]
    assert (item["type"], item["name"], item["call_id"]) == ("function_call", "weather", "call_1")
    follow_up = [
        {"role": "user", "content": "Weather?"},
        item,
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    second = call(RESPONSES, {"model": MODEL, "input": follow_up, "tools": [WEATHER]}, token=key)
    assert second.json()["output"][0]["content"][0]["text"] == "Sunny."
    sent = fake_upstream.calls("chat")[1].json
    assert sent["tools"][0] == {
        "type": "function",
        "function": {"name": "weather", "parameters": WEATHER["parameters"]},
    }
    assert sent["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    charges = [r.charge for r in UsageRecord.objects.order_by("id")]
    assert charges == [9_000, 8_640]  # (30×0.15+5×0.60)/1M×1.2, (40×0.15+2×0.60)/1M×1.2


@pytest.mark.parametrize(
    "body, param",
    [
        ({**HELLO, "store": True}, "store"),
        ({**HELLO, "previous_response_id": "resp_1"}, "previous_response_id"),
        ({**HELLO, "conversation": "conv_1"}, "conversation"),
        ({**HELLO, "stream": "yes"}, "stream"),
        ({**HELLO, "max_output_tokens": 0}, "max_output_tokens"),
    ],
)
@pytest.mark.parametrize("mode", ["native", "translate"])
def test_stored_state_and_malformed_fields_are_400_before_anything_is_held(
    fake_upstream, alice, key, settings, mode, body, param
):
    settings.UPSTREAM_RESPONSES = mode
    response = call(RESPONSES, body, token=key)
    assert response.status == 400 and response.error["param"] == param
    assert response.error["type"] == "invalid_request_error"
    assert record().status == UsageStatus.REFUSED and not Hold.objects.exists() and not fake_upstream.requests


@pytest.mark.parametrize(
    "item, param",
    [
        ({"type": "web_search_call", "id": "ws_1"}, "input[0].type"),
        ({"type": "item_reference", "id": "msg_1"}, "input[0]"),
    ],
)
def test_an_item_the_translation_cannot_carry_is_a_clear_400(fake_upstream, alice, key, translated, item, param):
    response = call(RESPONSES, {"model": MODEL, "input": [item]}, token=key)
    assert response.status == 400 and response.error["param"] == param
    assert response.error["code"] == "unsupported_parameter" and not fake_upstream.requests


# --- refusals -----------------------------------------------------------------------------------


def test_an_empty_wallet_gets_an_openai_shaped_402_with_the_topup_link(fake_upstream, bob, price, settings):
    response = call(RESPONSES, HELLO, token=api_key_create(user=bob, name="k")[1])
    assert response.status == 402 and response.error["code"] == "insufficient_funds"
    assert response.error["topup_url"] == f"{settings.APP_URL}/topup" and response.error["balance"] == "0.000000000"
    assert record().endpoint == "responses" and record().http_status == 402 and not fake_upstream.requests


@pytest.mark.parametrize("stream", [False, True])
def test_assistant_message_mode_answers_a_response_with_the_topup_link(fake_upstream, bob, price, settings, stream):
    settings.REFUSAL_MODE = "assistant_message"
    response = call(RESPONSES, {**HELLO, "stream": stream}, token=api_key_create(user=bob, name="k")[1])
    assert response.status == 200 and response.headers["x-tokentill-blocked"] == "insufficient_funds"
    answer = response.events()[-1]["response"] if stream else response.json()
    assert answer["status"] == "completed" and "/topup" in answer["output"][0]["content"][0]["text"]
    if stream:
        assert response.tokentill()["charge"] == "0.000000000"
    assert not fake_upstream.requests and record().http_status == 402


def test_the_demo_model_answers_the_responses_api_offline(fake_upstream, settings, monkeypatch):
    from proxy import demo
    from tests.conftest import make_user

    monkeypatch.setattr(demo, "WORD_DELAY", 0.001)
    settings.UPSTREAM_API_KEY = ""
    call_command("seed", stdout=open(os.devnull, "w"))
    carol = make_user("carol@example.com", balance="1.00")
    response = call(
        RESPONSES,
        {"model": "tokentill/demo", "input": "hello", "stream": True},
        token=api_key_create(user=carol, name="k")[1],
    )
    assert response.events()[-1]["type"] == "response.completed" and "demo model" in response.body.decode()
    assert record().charge > 0 and not fake_upstream.requests


# --- disconnects and crash safety ------------------------------------------------------------------


def slow_native_stream(first: list[bytes], rest: list[bytes], seconds: float = 10.0, until=None):
    """``first``, then a word every 50 ms until ``until()`` is true (or the time is up), then ``rest``."""
    import time

    yield from first
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        yield 0.05
        yield typed_sse({"type": "response.output_text.delta", "sequence_number": 5, "item_id": "msg_fake_1",
                         "output_index": 0, "content_index": 0, "delta": "word ", "logprobs": []})  # fmt: skip
    yield from rest


def test_a_client_that_disconnects_mid_stream_cancels_the_upstream_and_pays_an_estimate(fake_upstream, alice, key):
    items = responses_stream_of("Po")
    fake_upstream.script("responses", StreamReply(slow_native_stream(items[:4], items[4:])))
    response = call(RESPONSES, {**HELLO, "stream": True}, token=key, disconnect_after=8)
    disconnected_at = float(response.headers["_disconnected_at"])
    assert fake_upstream.stream_finished.wait(3), "the upstream kept streaming after the client left"
    assert fake_upstream.stream_closed_at - disconnected_at < 1.0
    rec = record()
    assert (rec.status, rec.estimated, rec.cost_source) == (UsageStatus.CANCELLED, True, CostSource.ESTIMATE)
    assert rec.completion_tokens >= 5 * response.body.count(b'"word "') // 4 and rec.charge > 0
    assert balance(alice) == 10_000_000_000 - rec.charge and Hold.objects.get().status == HoldStatus.SETTLED


def test_a_long_native_stream_writes_down_its_response_id_and_output_while_it_runs(
    fake_upstream, alice, key, monkeypatch
):
    """Crash safety: what reconcile_holds needs is on the record before the stream ends."""
    from proxy.endpoints import request as lifecycle

    monkeypatch.setattr(lifecycle, "PROGRESS_AFTER", 0.1)
    monkeypatch.setattr(lifecycle, "PROGRESS_EVERY", 0.2)  # made a second: the least allowed
    seen = []

    def progress_written() -> bool:  # asked from the fake upstream's thread, on a connection of its own
        from django.db import connection

        written = UsageRecord.objects.filter(generation_id="resp_fake_1", completion_tokens__gt=0, status="pending")
        seen.extend(written.values_list("completion_tokens", flat=True))
        connection.close()
        return bool(seen)

    items = responses_stream_of("Po", u=responses_usage(5, 40))
    fake_upstream.script("responses", StreamReply(slow_native_stream(items[:4], items[4:], until=progress_written)))
    response = call(RESPONSES, {**HELLO, "stream": True}, token=key)
    assert response.events()[-1]["type"] == "response.completed"
    assert seen and seen[0] > 0, "no progress was written while the stream ran"
    assert record().completion_tokens == 40 and record().status == UsageStatus.OK


def test_translated_for_openrouter_the_usage_and_its_cost_are_asked_for(fake_upstream, alice, key, settings):
    settings.UPSTREAM_RESPONSES = "translate"
    fake_upstream.script("chat", StreamReply(stream_of("Pong", u=usage(20, 3, cost="0.00001"))))
    response = call(RESPONSES, {**HELLO, "stream": True}, token=key)
    (sent,) = fake_upstream.calls("chat")
    assert sent.json["usage"] == {"include": True} and sent.json["stream_options"] == {"include_usage": True}
    assert response.events()[-1]["type"] == "response.completed"
    assert record().charge == 12_000 and record().cost_source == CostSource.UPSTREAM  # OpenRouter's cost × 1.2


def test_the_demo_model_refuses_what_it_cannot_translate_and_releases_the_hold(fake_upstream, settings):
    """Behind an upstream that speaks the Responses API the body is checked only for the native
    path; the demo model speaks chat, so the translation's refusal comes after the hold."""
    from tests.conftest import make_user

    settings.UPSTREAM_API_KEY = ""
    call_command("seed", stdout=open(os.devnull, "w"))
    carol = make_user("carol@example.com", balance="1.00")
    body = {"model": "tokentill/demo", "input": "hello", "tools": [{"type": "web_search"}]}
    response = call(RESPONSES, body, token=api_key_create(user=carol, name="k")[1])
    assert response.status == 400 and response.error["param"] == "tools[0].type"
    rec = record()
    assert (rec.status, rec.http_status, rec.charge) == (UsageStatus.REFUSED, 400, 0)
    assert Hold.objects.get().status == HoldStatus.RELEASED and balance(carol) == 1_000_000_000
    assert not fake_upstream.requests
