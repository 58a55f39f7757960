"""The Anthropic Messages translator (core.protocols.anthropic), checked against the anthropic SDK.

No Django, no database: requests are translated and compared; every Message and stream event
the translator writes is validated with the SDK's own pydantic types and read back through the
SDK's client and ``MessageStream`` accumulator, served from bytes by an httpx2 MockTransport.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import json
from dataclasses import asdict
from decimal import Decimal

import anthropic
import httpx2
import pytest
from anthropic.types import ContentBlockParam, Message, RawMessageStreamEvent, ToolUnionParam
from anthropic.types.shared import ErrorResponse
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter

from core.protocols import ProtocolError, Unsupported
from core.protocols.anthropic import (
    MessageStream,
    error_body,
    error_type,
    message_from_chat,
    request_to_chat,
    tool_input,
)
from core.protocols.sse import encode_all
from core.protocols.usage import TokenUsage, anthropic_usage, from_anthropic, from_chat, merge_anthropic_usage
from tests import chat_stream
from tests.chat_stream import chat_chunk, text_stream, tool_delta, types_in
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    ANTHROPIC_MODEL,
    Reply,
    StreamReply,
    anthropic_error,
    fake_upstream_server,
    message_object,
    messages_error_event,
    messages_stream_of,
    messages_usage,
    tokens_count,
    usage,
)

EVENT = TypeAdapter(RawMessageStreamEvent)
MODEL = "anthropic/claude-sonnet-4.5"


REQUEST = {"model": MODEL, "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]}


def translate(chunks: list[dict], request: dict | None = None, *, finish=True) -> list[dict]:
    return chat_stream.translate(MessageStream(request=request or REQUEST), chunks, finish=finish)


def assert_valid(events: list[dict]) -> None:
    """Every event but a stream error is one the SDK's types accept; blocks open and close in turn."""
    open_index = None
    for event in events:
        if event["type"] != "error":
            EVENT.validate_python(event)
        if event["type"] == "content_block_start":
            assert open_index is None, "a block started before the last one stopped"
            open_index = event["index"]
        elif event["type"] in ("content_block_delta", "content_block_stop"):
            assert event["index"] == open_index
            if event["type"] == "content_block_stop":
                open_index = None


def serving(chunks: list[dict], *, finish=True, status=200, error: dict | None = None, seen: list | None = None):
    def handler(request: httpx2.Request) -> httpx2.Response:
        if error is not None:
            return httpx2.Response(status, json=error)
        body = json.loads(request.content)
        if seen is not None:
            seen.append(({k.lower(): v for k, v in request.headers.items()}, body))
        if body.get("stream"):
            events = translate(chunks, body, finish=finish)
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=encode_all(events))
        completion = {
            "id": "gen-1",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Pong."}, "finish_reason": "stop"}],
            "usage": usage(10, 5),
        }
        return httpx2.Response(200, json=message_from_chat(completion, request=body))

    return handler


def anthropic_client(handler) -> anthropic.Anthropic:
    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return anthropic.Anthropic(api_key="tt_test", base_url="http://gateway.test", http_client=http, max_retries=0)


# --- requests -----------------------------------------------------------------------------------


def test_system_and_text_become_chat_messages_and_max_tokens_the_output_cap():
    chat = request_to_chat(
        {
            "model": MODEL,
            "max_tokens": 256,
            "system": [
                {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Answer in French."},
            ],
            "messages": [
                {"role": "user", "content": "Ping?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Pong."}]},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Again?", "cache_control": {"type": "ephemeral"}}],
                },
            ],
        }
    )
    assert chat == {
        "model": MODEL,
        "max_completion_tokens": 256,
        "messages": [
            {
                "role": "system",
                "content": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}],
            },
            {"role": "user", "content": "Ping?"},
            {"role": "assistant", "content": "Pong."},
            {"role": "user", "content": "Again?"},
        ],
    }
    assert request_to_chat({**REQUEST, "system": "Be kind."})["messages"][0] == {
        "role": "system",
        "content": "Be kind.",
    }


def test_images_become_image_url_parts():
    chat = request_to_chat(
        {
            **REQUEST,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.jpg"}},
                        {"type": "text", "text": "Same cat?"},
                    ],
                }
            ],
        }
    )
    assert chat["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg"}},
                {"type": "text", "text": "Same cat?"},
            ],
        }
    ]


def test_tool_use_and_tool_result_become_tool_calls_and_tool_messages():
    chat = request_to_chat(
        {
            **REQUEST,
            "messages": [
                {"role": "user", "content": "Weather in Oslo and Rome?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Two lookups.", "signature": "sig"},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_a", "name": "weather", "input": {"city": "Oslo"}},
                        {"type": "tool_use", "id": "toolu_b", "name": "weather", "input": {"city": "Rome"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_a", "content": "-3C"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_b",
                            "content": [{"type": "text", "text": "timeout"}],
                            "is_error": True,
                        },
                        {"type": "text", "text": "And Nice?"},
                    ],
                },
            ],
        }
    )
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "toolu_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
                {"id": "toolu_b", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_a", "content": "-3C"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "Error: timeout"},
        {"role": "user", "content": "And Nice?"},
    ]


def test_tools_tool_choice_and_sampling_map_to_chat():
    chat = request_to_chat(
        {
            **REQUEST,
            "tools": [
                {
                    "name": "weather",
                    "description": "Look up the weather",
                    "input_schema": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                    "cache_control": {"type": "ephemeral"},
                },
                {"type": "custom", "name": "noop", "input_schema": {"type": "object"}, "strict": True},
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "stop_sequences": ["\n\nHuman:"],
            "temperature": 0.3,
            "top_p": 0.9,
            "top_k": 40,
            "metadata": {"user_id": "u_123"},
            "stream": True,
        }
    )
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                "description": "Look up the weather",
            },
        },
        {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}, "strict": True}},
    ]
    assert chat["tool_choice"] == "required"
    assert chat["parallel_tool_calls"] is False
    assert chat["stop"] == ["\n\nHuman:"]
    assert (chat["temperature"], chat["top_p"], chat["top_k"]) == (0.3, 0.9, 40)  # top_k: passed as is
    assert chat["user"] == "u_123"
    assert chat["stream_options"] == {"include_usage": True}
    for choice, expected in (
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "weather"}, {"type": "function", "function": {"name": "weather"}}),
    ):
        assert request_to_chat({**REQUEST, "tool_choice": choice})["tool_choice"] == expected


@pytest.mark.parametrize(
    ("change", "effort"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
        ({"thinking": {"type": "enabled", "budget_tokens": 8000}}, "medium"),
        ({"thinking": {"type": "enabled", "budget_tokens": 32000}}, "high"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}, "output_config": {"effort": "max"}}, "max"),
        ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}}, "high"),
        ({"thinking": {"type": "adaptive"}}, None),
        ({"thinking": {"type": "disabled"}, "output_config": {"effort": "low"}}, None),
        ({}, None),
    ],
)
def test_thinking_becomes_a_reasoning_effort(change, effort):
    assert request_to_chat({**REQUEST, **change}).get("reasoning_effort") == effort


def test_a_json_schema_output_format_becomes_a_response_format():
    chat = request_to_chat(
        {**REQUEST, "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}
    )
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": {"type": "object"}},
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ("nope", None),
        ({"model": MODEL, "messages": []}, "max_tokens"),
        ({**REQUEST, "max_tokens": 0}, "max_tokens"),
        ({**REQUEST, "max_tokens": "10"}, "max_tokens"),
        ({**REQUEST, "messages": "hi"}, "messages"),
        ({**REQUEST, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({**REQUEST, "messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0].type"),
        (
            {
                **REQUEST,
                "messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}],
            },
            "messages[0].content[0].id",
        ),
        (
            {**REQUEST, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
            "messages[0].content[0].tool_use_id",
        ),
        ({**REQUEST, "system": [{"type": "image"}]}, "system[0]"),
        ({**REQUEST, "tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({**REQUEST, "tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({**REQUEST, "thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        ({**REQUEST, "stop_sequences": "STOP"}, "stop_sequences"),
    ],
)
def test_malformed_requests_say_where(body, param):
    with pytest.raises(ProtocolError) as refused:
        request_to_chat(body)
    assert refused.value.param == param


TRANSLATED_USER = {"text", "image", "tool_result"}
TRANSLATED_ASSISTANT = {"text", "tool_use", "thinking", "redacted_thinking"}


@pytest.mark.parametrize("kind", sorted(set(types_in(ContentBlockParam)) - TRANSLATED_USER))
def test_every_other_content_block_the_sdk_knows_is_refused_in_a_user_turn(kind):
    with pytest.raises(Unsupported) as refused:
        request_to_chat(
            {**REQUEST, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": kind}]}]}
        )
    assert refused.value.param == "messages[0].content[1].type"
    assert kind in refused.value.message


@pytest.mark.parametrize("kind", sorted(set(types_in(ContentBlockParam)) - TRANSLATED_ASSISTANT))
def test_every_other_content_block_the_sdk_knows_is_refused_in_an_assistant_turn(kind):
    with pytest.raises(Unsupported) as refused:
        request_to_chat({**REQUEST, "messages": [{"role": "assistant", "content": [{"type": kind}]}]})
    assert refused.value.param == "messages[0].content[0].type"


@pytest.mark.parametrize("kind", sorted(set(types_in(ToolUnionParam)) - {"custom"}))
def test_every_server_tool_the_sdk_knows_is_refused_by_name(kind):
    with pytest.raises(Unsupported) as refused:
        request_to_chat({**REQUEST, "tools": [{"type": kind, "name": "x"}]})
    assert refused.value.param == "tools[0].type"
    assert kind in refused.value.message


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"container": "container_1"}, "container"),
        ({"mcp_servers": [{"type": "url", "url": "https://mcp.test", "name": "x"}]}, "mcp_servers"),
        ({"context_management": {"edits": []}}, "context_management"),
        ({"inference_geo": "eu"}, "inference_geo"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f_1"}}]}
                ]
            },
            "messages[0].content[0].source.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t",
                                "content": [
                                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}
                                ],
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].content[0].type",
        ),
    ],
)
def test_what_only_anthropic_servers_can_do_is_refused_by_name(change, param):
    with pytest.raises(Unsupported) as refused:
        request_to_chat({**REQUEST, **change})
    assert refused.value.param == param


# --- whole messages -----------------------------------------------------------------------------


def completion(message: dict, finish="stop", u=None, **choice) -> dict:
    return {
        "id": "gen-1",
        "object": "chat.completion",
        "model": "anthropic/claude-4.5-sonnet-20250929",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, **choice}],
        "usage": u if u is not None else usage(700, 20, cached=500, cache_write=100, reasoning=6),
    }


def test_a_completion_becomes_a_message_the_sdk_accepts():
    calls = [{"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}]
    raw = message_from_chat(
        completion({"content": "Checking.", "reasoning": "Need it.", "tool_calls": calls}, "tool_calls"),
        request=REQUEST,
    )
    message = Message.model_validate(raw)
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "Need it."
    assert message.content[1].text == "Checking."
    assert (message.content[2].id, message.content[2].name, message.content[2].input) == (
        "call_a",
        "weather",
        {"city": "Oslo"},
    )
    assert message.stop_reason == "tool_use"
    assert message.model == "anthropic/claude-4.5-sonnet-20250929"
    assert message.id.startswith("msg_")
    # Anthropic counts input without the cache: 700 prompt = 100 fresh + 500 read + 100 written
    assert (
        message.usage.input_tokens,
        message.usage.cache_read_input_tokens,
        message.usage.cache_creation_input_tokens,
    ) == (100, 500, 100)
    assert message.usage.output_tokens == 20
    assert message.usage.output_tokens_details.thinking_tokens == 6


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
    ],
)
def test_finish_reasons_become_stop_reasons(finish, stop_reason):
    message = Message.model_validate(message_from_chat(completion({"content": "x"}, finish), request=REQUEST))
    assert message.stop_reason == stop_reason


def test_a_matched_stop_sequence_is_named_when_the_upstream_says_which():
    request = {**REQUEST, "stop_sequences": ["END"]}
    message = Message.model_validate(
        message_from_chat(completion({"content": "x"}, "stop", stop_reason="END"), request=request)
    )
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")


def test_tool_arguments_that_are_not_a_json_object_are_kept_not_fixed():
    assert tool_input("") == {}
    assert tool_input('{"a": 1}') == {"a": 1}
    assert tool_input('{"a": ') == {"_unparsed_arguments": '{"a": '}
    assert tool_input("[1, 2]") == {"_unparsed_arguments": "[1, 2]"}


def test_a_refusal_is_said_as_text_and_missing_usage_counts_zero():
    raw = completion({"content": None, "refusal": "I can't help with that."}, "content_filter")
    del raw["usage"]
    message = Message.model_validate(message_from_chat(raw, request=REQUEST))
    assert message.content[0].text == "I can't help with that."
    assert message.stop_reason == "refusal"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (0, 0)


def test_a_message_we_wrote_is_accepted_back_in_the_next_request():
    """Claude-style agents resend the assistant turn as the SDK dumps it (``to_param``)."""
    calls = [{"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]
    first = Message.model_validate(
        message_from_chat(
            completion({"content": "Checking.", "reasoning": "Hm.", "tool_calls": calls}, "tool_calls"), request=REQUEST
        )
    )
    turn = first.to_param()
    turn["content"] = [block.model_dump(exclude_none=True) for block in first.content]
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_a", "content": "3C"}]}
    chat = request_to_chat({**REQUEST, "messages": [*REQUEST["messages"], turn, result]})
    assert chat["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "3C"},
    ]


# --- streams ------------------------------------------------------------------------------------


def test_a_text_stream_becomes_the_message_event_sequence():
    events = translate(text_stream("Po", "ng.", u=usage(700, 3, cached=500, cache_write=100)))
    assert_valid(events)
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}  # not known yet
    assert [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"] == ["Po", "ng."]
    assert events[5]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[5]["usage"] == {
        "input_tokens": 100,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 500,
        "output_tokens": 3,
    }


def test_streamed_tool_calls_become_tool_use_blocks_with_json_deltas():
    chunks = [
        chat_chunk({"content": "Checking."}),
        chat_chunk(tool_delta(0, id="call_a", name="weather", arguments="")),
        chat_chunk(tool_delta(0, arguments='{"city":')),
        chat_chunk(tool_delta(0, arguments='"Oslo"}')),
        chat_chunk(tool_delta(1, id="call_b", name="time", arguments="{}")),
        chat_chunk({}, "tool_calls"),
        chat_chunk(None, usage=usage(10, 5)),
    ]
    events = translate(chunks)
    assert_valid(events)
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use", "tool_use"]
    assert (starts[1]["id"], starts[1]["name"], starts[1]["input"]) == ("call_a", "weather", {})
    fragments = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta" and e["index"] == 1]
    assert fragments == ['{"city":', '"Oslo"}']
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_reasoning_streams_as_a_thinking_block():
    chunks = [chat_chunk({"reasoning": "Hmm."}), chat_chunk({"content": "Yes."}), chat_chunk({}, "stop")]
    events = translate(chunks)
    assert_valid(events)
    assert events[1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[2]["delta"] == {"type": "thinking_delta", "thinking": "Hmm."}
    assert events[4]["content_block"]["type"] == "text"


def test_a_length_cut_stream_stops_with_max_tokens_and_a_matched_stop_sequence_is_named():
    assert translate(text_stream("Half", finish="length"))[-2]["delta"]["stop_reason"] == "max_tokens"
    request = {**REQUEST, "stop_sequences": ["END"]}
    delta = translate(text_stream("x", stop_reason="END"), request)[-2]["delta"]
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_an_upstream_error_mid_stream_becomes_an_error_event():
    stream = MessageStream(request=REQUEST)
    events = stream.feed(chat_chunk({"content": "Hal"}))
    events += stream.feed({"error": {"message": "Provider disconnected", "code": 502}, "choices": []})
    assert_valid(events)
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "Provider disconnected"}}
    assert stream.feed(chat_chunk({"content": "more"})) == []
    assert stream.finish() == []


def test_a_stream_that_ends_early_or_goes_back_to_a_finished_tool_call_fails():
    assert translate([chat_chunk({"content": "Hal"})])[-1]["type"] == "error"
    chunks = [
        chat_chunk(tool_delta(0, id="call_a", name="f", arguments="{}")),
        chat_chunk(tool_delta(1, id="call_b", name="g", arguments="{}")),
        chat_chunk(tool_delta(0, arguments="more")),
    ]
    events = translate(chunks, finish=False)
    assert_valid(events)
    assert events[-1]["type"] == "error"
    assert MessageStream(request=REQUEST).fail("gone", "overloaded_error")[-1]["error"]["type"] == "overloaded_error"


# --- through the anthropic SDK's own client and MessageStream accumulator ---------------------


def test_the_sdk_accumulator_reads_text_tool_use_and_the_usage_from_message_delta():
    chunks = [
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"reasoning": "Need the weather."}),
        chat_chunk({"content": "Let me "}),
        chat_chunk({"content": "check."}),
        chat_chunk(tool_delta(0, id="call_a", name="weather", arguments='{"city"')),
        chat_chunk(tool_delta(0, arguments=':"Oslo"}')),
        chat_chunk({}, "tool_calls"),
        chat_chunk(None, usage=usage(700, 12, cached=500, cache_write=100)),
    ]
    seen: list = []
    client = anthropic_client(serving(chunks, seen=seen))
    with client.messages.stream(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "Oslo?"}]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert texts == ["Let me ", "check."]
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Oslo"}
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.cache_creation_input_tokens) == (
        100,
        500,
        100,
    )
    assert final.usage.output_tokens == 12
    headers, body = seen[0]
    # anthropic 2.x sends its key as a bearer token (0.x sent x-api-key): a gateway takes both
    assert headers["authorization"] == "Bearer tt_test"
    assert "x-api-key" not in headers
    assert headers["anthropic-version"]
    assert body["max_tokens"] == 100


def test_the_sdk_reads_a_whole_message():
    client = anthropic_client(serving([]))
    message = client.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "Ping?"}])
    assert message.content[0].text == "Pong."
    assert message.usage.input_tokens == 10


def test_the_sdk_raises_on_a_mid_stream_error_event():
    client = anthropic_client(
        serving([chat_chunk({"content": "Hal"}), {"error": {"message": "Provider disconnected"}}], finish=False)
    )
    with pytest.raises(anthropic.APIStatusError) as failed:
        with client.messages.stream(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "Ping?"}]
        ) as stream:
            stream.get_final_message()
    assert failed.value.type == "api_error"
    assert "Provider disconnected" in str(failed.value)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_types_by_status(status, kind):
    assert error_type(status) == kind
    body = error_body(status, "Something went wrong.", request_id="req_1")
    assert body == {"type": "error", "error": {"type": kind, "message": "Something went wrong."}, "request_id": "req_1"}
    if kind != "request_too_large":  # Anthropic's documented 413 type; the SDK's ErrorType omits it
        ErrorResponse.model_validate(body)


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, anthropic.BadRequestError),
        (401, anthropic.AuthenticationError),
        (402, anthropic.PaymentRequiredError),
        (403, anthropic.PermissionDeniedError),
        (413, anthropic.ContentTooLargeError),
        (429, anthropic.RateLimitError),
        (529, anthropic.OverloadedError),
    ],
)
def test_the_sdk_raises_its_own_exception_for_each_error_body(status, exception):
    body = error_body(status, "No.", topup_url="https://tokentill.test/topup", balance="0.010000000")
    client = anthropic_client(serving([], status=status, error=body))
    with pytest.raises(exception) as raised:
        client.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "Ping?"}])
    assert raised.value.type == error_type(status)
    assert raised.value.body["error"]["topup_url"] == "https://tokentill.test/topup"


# --- usage: Anthropic's input_tokens exclude the cache, chat's prompt_tokens include it -------


def test_anthropic_usage_adds_cache_reads_and_writes_to_the_prompt():
    usage = from_anthropic(
        {
            "input_tokens": 10,
            "cache_read_input_tokens": 500,
            "cache_creation_input_tokens": 100,
            "output_tokens": 20,
            "output_tokens_details": {"thinking_tokens": 7},
        }
    )
    assert usage == TokenUsage(
        prompt_tokens=610, completion_tokens=20, reasoning_tokens=7, cached_tokens=500, cache_write_tokens=100
    )
    assert from_anthropic({"input_tokens": 10, "output_tokens": 2, "cache_read_input_tokens": None}) == TokenUsage(
        10, 2
    )
    assert from_anthropic(None) is None


def test_an_anthropic_report_prices_exactly_like_the_same_tokens_reported_by_chat():
    """600 of the 610 prompt tokens are cache reads and writes: billed at their rates, not as fresh
    input and not as free. 10 fresh × $3 + 500 read × $0.30 + 100 written × $3.75 + 20 out × $15."""
    from core.pricing import Rates, cost_usd
    from core.usage import Usage, usage_from

    rates = Rates(prompt=Decimal("3"), completion=Decimal("15"), cache_read=Decimal("0.3"), cache_write=Decimal("3.75"))
    native = messages_usage(10, 20, cache_read=500, cache_creation=100)
    via_anthropic = Usage(**asdict(from_anthropic(native)))
    via_chat = usage_from(usage(610, 20, cached=500, cache_write=100))
    assert cost_usd(rates, via_anthropic) == cost_usd(rates, via_chat) == Decimal("0.000855")


counts = st.integers(min_value=0, max_value=10**7)


@given(fresh=counts, read=counts, written=counts, output=counts, thinking=counts)
def test_anthropic_usage_round_trips_through_the_normal_form(fresh, read, written, output, thinking):
    thinking = min(thinking, output)
    usage = TokenUsage(fresh + read + written, output, thinking, read, written)
    assert from_anthropic(anthropic_usage(usage)) == usage


@given(prompt=counts, cached=counts, written=counts, output=counts)
def test_chat_usage_never_turns_into_negative_anthropic_input(prompt, cached, written, output):
    raw = anthropic_usage(from_chat(usage(prompt, output, cached=cached, cache_write=written)))
    assert raw["input_tokens"] >= 0
    assert raw["input_tokens"] + raw["cache_read_input_tokens"] + raw["cache_creation_input_tokens"] == prompt


def test_a_native_streams_usage_is_merged_from_message_start_and_message_delta():
    raw = [
        json.loads(line[6:])
        for line in b"".join(messages_stream_of("Po", "ng.", u=messages_usage(10, 2, cache_read=500)))
        .decode()
        .splitlines()
        if line.startswith("data: ")
    ]
    merged = None
    for event in raw:
        merged = merge_anthropic_usage(merged, event)
    assert from_anthropic(merged) == TokenUsage(prompt_tokens=510, completion_tokens=2, cached_tokens=500)
    # a message_delta's cumulative counts win, and a null there keeps the start's value
    merged = merge_anthropic_usage(
        {"input_tokens": 5, "output_tokens": 1},
        {"type": "message_delta", "usage": {"output_tokens": 9, "input_tokens": None}},
    )
    assert merged == {"input_tokens": 5, "output_tokens": 9}


# --- the fake upstream's native /messages routes, read by the SDK over HTTP -------------------


def test_the_fake_upstream_serves_native_messages_the_sdk_accepts(fake_upstream_server):
    fake = fake_upstream_server
    fake.reset()
    usage = messages_usage(10, 2, cache_read=500, cache_creation=100, cost="0.000321")
    fake.script(
        "messages",
        Reply(body=message_object("Pong.", u=usage, tool_uses=[("weather", {"city": "Oslo"})])),
        StreamReply(messages_stream_of("Po", "ng.", u=usage, tool_uses=[("weather", {"city": "Oslo"})])),
        StreamReply([*messages_stream_of("Hal", u=usage)[:4], messages_error_event()]),
        anthropic_error(402, "billing_error", "Top up."),
    )
    fake.script("count_tokens", Reply(body=tokens_count(42)))
    base = fake.url.removesuffix("/v1")  # the SDK appends /v1/messages
    client = anthropic.Anthropic(api_key="sk-ant-test", base_url=base, max_retries=0)
    ask = {"model": ANTHROPIC_MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "Ping?"}]}

    whole = client.messages.create(**ask)
    assert (whole.content[0].text, whole.content[1].input, whole.stop_reason) == ("Pong.", {"city": "Oslo"}, "tool_use")
    assert from_anthropic(whole.usage.model_dump()) == TokenUsage(610, 2, 0, 500, 100)
    assert b'"cost": 0.000321' in message_object(u=usage)  # a JSON number, written as given

    with client.messages.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.content[0].text == "Pong."
    assert final.content[1].input == {"city": "Oslo"}
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.output_tokens) == (10, 500, 2)
    assert any(event.type == "message_stop" for event in events)

    # an error event after the 200: the SDK picks exception classes by HTTP status, so this is a
    # plain APIStatusError whose type says what happened
    with pytest.raises(anthropic.APIStatusError) as overloaded, client.messages.stream(**ask) as stream:
        stream.get_final_message()
    assert overloaded.value.type == "overloaded_error"
    with pytest.raises(anthropic.PaymentRequiredError):
        client.messages.create(**ask)
    assert client.messages.count_tokens(model=ANTHROPIC_MODEL, messages=ask["messages"]).input_tokens == 42
    paths = [call.path for call in fake.requests]
    assert paths == ["/api/v1/messages"] * 4 + ["/api/v1/messages/count_tokens"]
    assert fake.requests[0].headers["authorization"] == "Bearer sk-ant-test"
