"""The SDKs apps are built on, unchanged, against a real server (the shipped uvicorn command)
and the fake upstream: the openai SDK's Responses API, the OpenAI Agents SDK with its default
model, the Vercel AI SDK with its defaults (Node), and the anthropic SDK — each against an
OpenRouter upstream (forwarded natively) and an OpenAI-compatible one (translated to chat
completions), billed exactly."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import asyncio
import json
import os
import shutil
import subprocess
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from accounts.services import api_key_create
from proxy.models import ModelPrice, UsageRecord
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    ANTHROPIC_MODEL,
    MODEL,
    Reply,
    StreamReply,
    completion,
    fake_upstream,
    fake_upstream_server,
    message_object,
    messages_stream_of,
    messages_usage,
    price,
    response_object,
    responses_stream_of,
    responses_usage,
    stream_of,
    tokens_count,
    usage,
)
from tests.live import live_server
from wallet.models import Wallet

pytestmark = pytest.mark.django_db(transaction=True)

JS = Path(__file__).resolve().parent / "js"
WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def servers(django_db_setup, django_db_blocker, fake_upstream_server):
    """{"native": an OpenRouter upstream, "translated": an OpenAI-compatible one}: base URLs."""
    common = {
        "SECRET_KEY": django_settings.SECRET_KEY,
        "UPSTREAM_BASE_URL": fake_upstream_server.url,
        "UPSTREAM_API_KEY": "sk-or-v1-server-secret",
        "PROXY_PRICE_CACHE_SECONDS": "0",
        "LOG_LEVEL": "WARNING",
    }
    with ExitStack() as stack:
        yield {
            "native": stack.enter_context(live_server(**common, UPSTREAM_KIND="openrouter")),
            "translated": stack.enter_context(live_server(**common, UPSTREAM_KIND="openai")),
        }


@pytest.fixture(params=["native", "translated"])
def mode(request) -> str:
    return request.param


@pytest.fixture
def sdk_key(alice, price):
    return api_key_create(user=alice, name="sdk")[1]


def charges() -> list[int]:
    return list(UsageRecord.objects.order_by("id").values_list("charge", flat=True))


def nanos(usd: Decimal) -> int:
    return int((usd * Decimal("1.2") * 10**9).to_integral_value())


def gpt_charge(prompt: int, completion: int) -> int:
    """The ``price`` fixture: $0.15 / $0.60 per million, 20 % markup."""
    return nanos((prompt * Decimal("0.15") + completion * Decimal("0.60")) / 10**6)


def chat_tool_call(name: str, arguments: str, call_id: str, u: dict, *, text=None, model=MODEL) -> bytes:
    """A chat completion whose answer is one tool call (and ``text`` beside it)."""
    body = json.loads(completion(text, u=u, model=model, finish="tool_calls"))
    body["choices"][0]["message"]["tool_calls"] = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    ]
    return json.dumps(body).encode()


def chat_tool_stream(name: str, arguments: str, call_id: str, u: dict, *, text=None, model=MODEL) -> list[bytes]:
    """The same, streamed: (``text``,) the call in one delta, the finish, the usage, ``[DONE]``."""
    chunks = stream_of(*([text] if text else []), u=u, model=model)
    call = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    finish = json.loads(chunks[-3][len(b"data: ") :])
    finish["choices"][0] = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": "tool_calls"}
    chunks[-3] = b"data: " + json.dumps(finish).encode() + b"\n\n"
    return chunks


def script_text(fake, mode: str, words: list[str], prompt: int, output: int, *, stream: bool) -> None:
    """The upstream's answer of ``words`` in the mode's protocol, ``prompt``/``output`` tokens."""
    if mode == "native":
        u = responses_usage(prompt, output)
        reply = (
            StreamReply(responses_stream_of(*words, u=u))
            if stream
            else Reply(body=response_object("".join(words), u=u))
        )
        fake.script("responses", reply)
    else:
        u = usage(prompt, output)
        fake.script(
            "chat", StreamReply(stream_of(*words, u=u)) if stream else Reply(body=completion("".join(words), u=u))
        )


def script_call(fake, mode: str, call_id: str, prompt: int, output: int, *, stream: bool, model=MODEL) -> None:
    """The upstream's answer: a call of ``weather`` for Paris."""
    arguments = '{"city": "Paris"}'
    if mode == "native":
        u, calls = responses_usage(prompt, output), [("weather", arguments, call_id)]
        reply = (
            StreamReply(responses_stream_of(u=u, calls=calls, model=model))
            if stream
            else Reply(body=response_object("", u=u, calls=calls, model=model))
        )
        fake.script("responses", reply)
    elif stream:
        fake.script("chat", StreamReply(chat_tool_stream("weather", arguments, call_id, usage(prompt, output))))
    else:
        reply = chat_tool_call("weather", arguments, call_id, usage(prompt, output), model=model)
        fake.script("chat", Reply(body=reply))


# --- the openai SDK's Responses API -------------------------------------------------------------


def test_responses_create_returns_the_text_and_the_charge(servers, fake_upstream, sdk_key, mode):
    script_text(fake_upstream, mode, ["Pong."], 412, 37, stream=False)
    client = openai.OpenAI(base_url=servers[mode] + "/v1", api_key=sdk_key, max_retries=0)
    raw = client.responses.with_raw_response.create(model=MODEL, input="Say pong", instructions="Be brief.")
    response = raw.parse()
    assert response.output_text == "Pong." and response.status == "completed"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (412, 37)
    assert raw.headers["x-tokentill-charge"] == "0.000100800" and charges() == [gpt_charge(412, 37)] == [100_800]
    assert UsageRecord.objects.get().endpoint == "responses"


def test_async_responses_create_and_a_streamed_iteration(servers, fake_upstream, sdk_key, mode):
    script_text(fake_upstream, mode, ["Pong."], 10, 2, stream=False)
    script_text(fake_upstream, mode, ["Po", "ng", "."], 20, 3, stream=True)

    async def run():
        client = openai.AsyncOpenAI(base_url=servers[mode] + "/v1", api_key=sdk_key, max_retries=0)
        whole = await client.responses.create(model=MODEL, input="Say pong", max_output_tokens=50)
        stream = await client.responses.create(model=MODEL, input="Say pong", stream=True)
        events = [event async for event in stream]
        await client.close()
        return whole, events

    whole, events = asyncio.run(run())
    assert whole.output_text == "Pong."
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Pong."
    assert events[-1].response.usage.output_tokens == 3
    assert charges() == [gpt_charge(10, 2), gpt_charge(20, 3)]


def test_responses_stream_with_a_function_tool_round_trip(servers, fake_upstream, sdk_key, mode):
    script_call(fake_upstream, mode, "call_1", 30, 5, stream=True)
    script_text(fake_upstream, mode, ["Sunny."], 40, 2, stream=True)
    client = openai.OpenAI(base_url=servers[mode] + "/v1", api_key=sdk_key, max_retries=0)
    question = {"role": "user", "content": "Weather in Paris?"}
    with client.responses.stream(model=MODEL, input=[question], tools=[WEATHER]) as stream:
        for _ in stream:
            pass
        first = stream.get_final_response()
    (call,) = first.output
    assert (call.type, call.name, call.call_id, json.loads(call.arguments)) == (
        "function_call",
        "weather",
        "call_1",
        {"city": "Paris"},
    )
    result = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    follow_up = [question, call.model_dump(exclude_none=True), result]
    with client.responses.stream(model=MODEL, input=follow_up, tools=[WEATHER]) as stream:
        second = stream.get_final_response()
    assert second.output_text == "Sunny."
    assert charges() == [gpt_charge(30, 5), gpt_charge(40, 2)]


def test_the_openai_sdk_sees_the_402_of_an_empty_wallet(servers, fake_upstream, bob, price, mode):
    client = openai.OpenAI(base_url=servers[mode] + "/v1", api_key=api_key_create(user=bob, name="k")[1], max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.responses.create(model=MODEL, input="Say pong")
    assert refused.value.status_code == 402 and refused.value.body["code"] == "insufficient_funds"
    assert refused.value.body["topup_url"].endswith("/topup") and not fake_upstream.requests


# --- the OpenAI Agents SDK ----------------------------------------------------------------------


def test_an_agent_with_the_default_model_and_a_tool_is_billed_per_step(servers, fake_upstream, alice, mode):
    from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled
    from agents.models import get_default_model

    default = get_default_model()  # Agents' default model, on its default settings
    ModelPrice.objects.create(model=default, prompt=Decimal("1.25"), completion=Decimal("10"))
    key = api_key_create(user=alice, name="agent")[1]
    script_call(fake_upstream, mode, "call_7", 100, 20, stream=False, model=default)
    if mode == "native":
        fake_upstream.script("responses", Reply(body=response_object("Sunny in Paris.", u=responses_usage(150, 8))))
    else:
        fake_upstream.script("chat", Reply(body=completion("Sunny in Paris.", u=usage(150, 8), model=default)))

    @function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    async def run():
        client = openai.AsyncOpenAI(base_url=servers[mode] + "/v1", api_key=key, max_retries=0)
        set_tracing_disabled(True)  # traces go to OpenAI's own servers, not through the gateway
        set_default_openai_client(client, use_for_tracing=False)
        agent = Agent(name="Weather", instructions="Answer briefly.", tools=[weather])
        result = await Runner.run(agent, "What is the weather in Paris?")
        await client.close()
        return result

    result = asyncio.run(run())
    assert result.final_output == "Sunny in Paris."
    records = UsageRecord.objects.order_by("id")
    assert [(r.endpoint, r.model) for r in records] == [("responses", default)] * 2
    # (100 × 1.25 + 20 × 10) and (150 × 1.25 + 8 × 10) per million, × 1.2
    assert charges() == [390_000, 321_000]
    assert Wallet.objects.get(user=alice).balance == 10_000_000_000 - 711_000
    route = "responses" if mode == "native" else "chat"
    sent = fake_upstream.calls(route)[1].json
    if mode == "native":
        assert sent["input"][-1] == {"call_id": "call_7", "output": "sunny in Paris", "type": "function_call_output"}
    else:
        assert sent["messages"][-1] == {"role": "tool", "tool_call_id": "call_7", "content": "sunny in Paris"}
    call_command("verify_ledger", stdout=open(os.devnull, "w"))


# --- the Vercel AI SDK (Node) ---------------------------------------------------------------------


def vercel(server: str, key: str, scenario: str) -> dict:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the Vercel AI SDK tests need Node 20+")
    if not (JS / "node_modules" / "ai").is_dir():
        pytest.skip("tests/js/node_modules is missing: run `npm ci --prefix tests/js` (scripts/test does)")
    env = {**os.environ, "BASE_URL": server + "/v1", "API_KEY": key, "MODEL": MODEL}
    done = subprocess.run(["node", "vercel.mjs", scenario], cwd=JS, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_vercel_ai_sdk_generates_and_streams_with_its_defaults(servers, fake_upstream, sdk_key, mode):
    script_text(fake_upstream, mode, ["Pong."], 10, 2, stream=False)
    script_text(fake_upstream, mode, ["Po", "ng."], 20, 3, stream=True)
    generated = vercel(servers[mode], sdk_key, "generate")
    assert generated["text"] == "Pong." and generated["usage"]["inputTokens"] == 10
    streamed = vercel(servers[mode], sdk_key, "stream")
    assert streamed["text"] == "Pong." and streamed["usage"]["outputTokens"] == 3
    assert charges() == [gpt_charge(10, 2), gpt_charge(20, 3)]
    sent = fake_upstream.calls("responses" if mode == "native" else "chat")
    assert len(sent) == 2


def test_a_vercel_multi_step_tool_run_works_with_its_defaults(servers, fake_upstream, sdk_key):
    """A step that is only a tool call is sent back in full: no stored item is needed."""
    script_call(fake_upstream, "translated", "call_3", 30, 5, stream=False)
    script_text(fake_upstream, "translated", ["Sunny in Paris."], 45, 4, stream=False)
    run = vercel(servers["translated"], sdk_key, "tools")
    assert run == {**run, "text": "Sunny in Paris.", "steps": 2}
    messages = fake_upstream.calls("chat")[1].json["messages"]
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_3", "content": "sunny in Paris"}
    assert charges() == [gpt_charge(30, 5), gpt_charge(45, 4)]


def test_a_vercel_step_with_text_beside_its_tool_call_needs_store_false(servers, fake_upstream, sdk_key):
    """With its default ``store`` the SDK sends that text back as an ``item_reference``, which a
    stateless gateway cannot resolve: a clear 400 naming the provider option that fixes it."""
    u = usage(30, 5)
    for _ in range(2):
        fake_upstream.script(
            "chat", Reply(body=chat_tool_call("weather", '{"city": "Paris"}', "c1", u, text="Let me see."))
        )
        fake_upstream.script("chat", Reply(body=completion("Sunny in Paris.", u=usage(45, 4))))
    refused = vercel(servers["translated"], sdk_key, "tools")
    assert refused["status"] == 400 and "providerOptions.openai.store" in refused["error"]
    fake_upstream.reset()
    fake_upstream.script(
        "chat", Reply(body=chat_tool_call("weather", '{"city": "Paris"}', "c1", u, text="Let me see."))
    )
    fake_upstream.script("chat", Reply(body=completion("Sunny in Paris.", u=usage(45, 4))))
    run = vercel(servers["translated"], sdk_key, "tools-store-false")
    assert run["text"] == "Sunny in Paris." and run["steps"] == 2
    assert fake_upstream.calls("chat")[1].json["messages"][1]["content"] == "Let me see."


# --- the anthropic SDK --------------------------------------------------------------------------


@pytest.fixture
def claude(db):
    return ModelPrice.objects.create(model=ANTHROPIC_MODEL, prompt=Decimal("3"), completion=Decimal("15"))


def claude_charge(prompt: int, completion: int) -> int:
    return nanos((prompt * Decimal(3) + completion * Decimal(15)) / 10**6)


def test_messages_create_returns_the_text_and_the_charge(servers, fake_upstream, alice, claude, mode):
    if mode == "native":
        fake_upstream.script("messages", Reply(body=message_object("Pong.", u=messages_usage(12, 3))))
    else:
        fake_upstream.script("chat", Reply(body=completion("Pong.", u=usage(12, 3), model=ANTHROPIC_MODEL)))
    client = anthropic.Anthropic(base_url=servers[mode], api_key=api_key_create(user=alice, name="k")[1], max_retries=0)
    raw = client.messages.with_raw_response.create(
        model=ANTHROPIC_MODEL, max_tokens=100, system="Be brief.", messages=[{"role": "user", "content": "Say pong"}]
    )
    message = raw.parse()
    assert message.content[0].text == "Pong." and message.usage.input_tokens == 12
    assert raw.headers["x-tokentill-charge"] == "0.000097200" and charges() == [claude_charge(12, 3)]
    assert UsageRecord.objects.get().endpoint == "messages"


def test_messages_stream_with_a_tool(servers, fake_upstream, alice, claude, mode):
    if mode == "native":
        items = messages_stream_of(
            "Let me see.", u=messages_usage(40, 9), tool_uses=[("weather", {"city": "Paris"}, "toolu_1")]
        )
        fake_upstream.script("messages", StreamReply(items))
    else:
        chunks = chat_tool_stream(
            "weather", '{"city": "Paris"}', "toolu_1", usage(40, 9), text="Let me see.", model=ANTHROPIC_MODEL
        )
        fake_upstream.script("chat", StreamReply(chunks))
    tool = {"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    client = anthropic.Anthropic(base_url=servers[mode], api_key=api_key_create(user=alice, name="k")[1], max_retries=0)
    with client.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=100, tools=[tool], messages=[{"role": "user", "content": "Weather?"}]
    ) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == "Let me see." and message.stop_reason == "tool_use"
    assert (message.content[1].name, message.content[1].input) == ("weather", {"city": "Paris"})
    assert message.usage.input_tokens == 40 and message.usage.output_tokens == 9
    assert charges() == [claude_charge(40, 9)]


def test_the_anthropic_sdk_sees_a_402_as_payment_required(servers, fake_upstream, bob, claude, mode):
    client = anthropic.Anthropic(base_url=servers[mode], api_key=api_key_create(user=bob, name="k")[1], max_retries=0)
    with pytest.raises(anthropic.PaymentRequiredError) as refused:
        client.messages.create(model=ANTHROPIC_MODEL, max_tokens=100, messages=[{"role": "user", "content": "Hi"}])
    error = refused.value.body["error"]
    assert error["type"] == "billing_error" and error["topup_url"].endswith("/topup")
    assert not fake_upstream.requests


def test_count_tokens_through_the_sdk(servers, fake_upstream, alice, claude, settings):
    key = api_key_create(user=alice, name="k")[1]
    hello = {"model": ANTHROPIC_MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    client = anthropic.Anthropic(base_url=servers["native"], api_key=key, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as refused:  # OpenRouter does not offer it
        client.messages.count_tokens(**hello)
    assert "cannot count tokens" in refused.value.body["error"]["message"]

    # An upstream that offers it (an Anthropic one): the count is forwarded, free.
    from config.asgi import application
    from tests.fake_upstream import close_loop_resources

    settings.UPSTREAM_KIND = "anthropic"
    settings.UPSTREAM_BASE_URL, settings.UPSTREAM_API_KEY = fake_upstream.url, "sk-ant-server-secret"
    fake_upstream.script("count_tokens", Reply(body=tokens_count(17)))

    async def count():
        transport = httpx2.ASGITransport(app=application)  # the anthropic SDK's own HTTP client
        http = httpx2.AsyncClient(transport=transport, base_url="http://tokentill")
        sdk = anthropic.AsyncAnthropic(base_url="http://tokentill", api_key=key, http_client=http, max_retries=0)
        try:
            return await sdk.messages.count_tokens(**hello)
        finally:
            await http.aclose()
            await close_loop_resources()

    assert asyncio.run(count()).input_tokens == 17
    assert not UsageRecord.objects.exists()
