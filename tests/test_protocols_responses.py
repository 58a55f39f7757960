"""The Responses API translator (core.protocols.responses), checked against the openai SDK itself.

No Django, no database: requests are translated and compared, and every Response and stream
event the translator writes is validated with the SDK's own pydantic types and read back through
the SDK's own client and stream accumulator, served from bytes by an httpx2 MockTransport (the
outside world here is "an OpenAI-compatible server"; the translator is the code under test).
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import json
from dataclasses import asdict

import httpx2
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.responses import Response, ResponseStreamEvent, response_input_param, tool_param
from pydantic import TypeAdapter

from core.protocols import ProtocolError, Unsupported
from core.protocols.responses import ResponseStream, request_to_chat, response_from_chat
from core.protocols.sse import encode, encode_all
from core.protocols.usage import (
    TokenUsage,
    from_chat,
    from_responses,
    responses_event_usage,
    responses_usage,
)
from tests import chat_stream
from tests.chat_stream import chat_chunk, text_stream, tool_delta, types_in
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    Reply,
    StreamReply,
    fake_upstream_server,
    response_object,
    responses_stream_of,
    usage,
)
from tests.fake_upstream import (
    responses_usage as fake_responses_usage,
)

EVENT = TypeAdapter(ResponseStreamEvent)
MODEL = "openai/gpt-4o-mini"


def translate(chunks: list[dict], request: dict | None = None, *, finish=True) -> list[dict]:
    return chat_stream.translate(
        ResponseStream(request=request or {"model": MODEL, "input": "hi", "stream": True}), chunks, finish=finish
    )


def assert_valid(events: list[dict]) -> None:
    """Every event is one the SDK knows, and sequence numbers run 0, 1, 2… without a gap."""
    for event in events:
        EVENT.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def serving(chunks: list[dict], *, finish=True, seen: list | None = None):
    """An httpx2 client whose every POST is answered by translating ``chunks`` for that request."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        if seen is not None:
            seen.append(body)
        if body.get("stream"):
            events = translate(chunks, body, finish=finish)
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=encode_all(events))
        completion = {
            "id": "gen-1",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Pong."}, "finish_reason": "stop"}],
            "usage": usage(10, 5),
        }
        return httpx2.Response(200, json=response_from_chat(completion, request=body))

    return handler


def openai_client(handler) -> OpenAI:
    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return OpenAI(api_key="tt_test", base_url="http://gateway.test/v1", http_client=http, max_retries=0)


# --- requests -----------------------------------------------------------------------------------


def test_a_string_input_with_instructions_becomes_a_system_and_a_user_message():
    chat = request_to_chat({"model": MODEL, "input": "Ping?", "instructions": "Answer in one word."})
    assert chat == {
        "model": MODEL,
        "messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Ping?"}],
    }


def test_a_streamed_request_always_asks_the_chat_upstream_for_usage():
    chat = request_to_chat(
        {"model": MODEL, "input": "hi", "stream": True, "stream_options": {"include_obfuscation": False}}
    )
    assert chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}


def test_sampling_limits_and_labels_map_to_their_chat_twins():
    chat = request_to_chat(
        {
            "model": MODEL,
            "input": "hi",
            "max_output_tokens": 300,
            "reasoning": {"effort": "low", "summary": "auto"},
            "temperature": 0.2,
            "top_p": 0.9,
            "metadata": {"ticket": "T-1"},
            "user": "u_1",
            "parallel_tool_calls": False,
            "safety_identifier": "h_1",
            "text": {
                "verbosity": "low",
                "format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True},
            },
            "provider": {"order": ["openai"]},  # unknown to the Responses API: passed through, as on chat
        }
    )
    assert chat["max_completion_tokens"] == 300
    assert chat["reasoning_effort"] == "low"
    assert (chat["temperature"], chat["top_p"], chat["metadata"], chat["user"]) == (0.2, 0.9, {"ticket": "T-1"}, "u_1")
    assert chat["parallel_tool_calls"] is False
    assert chat["safety_identifier"] == "h_1"
    assert chat["verbosity"] == "low"
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    }
    assert chat["provider"] == {"order": ["openai"]}
    for responses_only in ("max_output_tokens", "reasoning", "text", "input"):
        assert responses_only not in chat


def test_json_object_and_plain_text_formats():
    assert request_to_chat({"model": MODEL, "input": "hi", "text": {"format": {"type": "json_object"}}})[
        "response_format"
    ] == {"type": "json_object"}
    assert "response_format" not in request_to_chat(
        {"model": MODEL, "input": "hi", "text": {"format": {"type": "text"}}}
    )


def test_message_items_keep_their_roles_and_images_become_image_url_parts():
    chat = request_to_chat(
        {
            "model": MODEL,
            "input": [
                {"role": "developer", "content": "Be terse."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
                    ],
                },
                {"role": "assistant", "content": "A pixel."},
                {"role": "user", "content": [{"type": "input_text", "text": "Thanks"}]},
            ],
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Be terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
            ],
        },
        {"role": "assistant", "content": "A pixel."},
        {"role": "user", "content": "Thanks"},
    ]


def test_an_assistant_turn_spread_over_items_becomes_one_message_with_its_tool_calls():
    """What an agent sends on its second step: its earlier output items, then the tool results."""
    chat = request_to_chat(
        {
            "model": MODEL,
            "input": [
                {"role": "user", "content": "Weather in Oslo and Rome?"},
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Two lookups."}]},
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}],
                },
                {
                    "type": "function_call",
                    "id": "fc_1",
                    "call_id": "call_a",
                    "name": "weather",
                    "arguments": '{"city":"Oslo"}',
                },
                {
                    "type": "function_call",
                    "id": "fc_2",
                    "call_id": "call_b",
                    "name": "weather",
                    "arguments": '{"city":"Rome"}',
                },
                {"type": "function_call_output", "call_id": "call_a", "output": "-3C"},
                {
                    "type": "function_call_output",
                    "call_id": "call_b",
                    "output": [{"type": "input_text", "text": "21C"}],
                },
                {"type": "function_call", "call_id": "call_c", "name": "weather", "arguments": '{"city":"Nice"}'},
                {"type": "function_call_output", "call_id": "call_c", "output": "18C"},
            ],
        }
    )
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
                {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "-3C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "21C"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_c", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Nice"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_c", "content": "18C"},
    ]


def test_text_after_tool_calls_in_the_same_turn_joins_that_assistant_message():
    # chat completions refuses an assistant message with tool_calls not followed by their results
    chat = request_to_chat(
        {
            "model": MODEL,
            "input": [
                {"role": "user", "content": "Go"},
                {"type": "function_call", "call_id": "call_a", "name": "f", "arguments": "{}"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Calling f."}]},
                {"type": "function_call_output", "call_id": "call_a", "output": "ok"},
            ],
        }
    )
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "tool"]
    assert chat["messages"][1]["content"] == "Calling f."


def test_function_tools_and_tool_choice_map_to_chat_functions():
    chat = request_to_chat(
        {
            "model": MODEL,
            "input": "hi",
            "tools": [
                {
                    "type": "function",
                    "name": "weather",
                    "description": "Look up the weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "strict": True,
                },
                {"type": "function", "name": "noop", "parameters": None, "strict": None},
            ],
            "tool_choice": {"type": "function", "name": "weather"},
        }
    )
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Look up the weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "noop"}},
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    for choice in ("auto", "none", "required"):
        assert request_to_chat({"model": MODEL, "input": "hi", "tool_choice": choice})["tool_choice"] == choice


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"context_management": [{"type": "compaction"}]}, "context_management"),
        ({"include": ["file_search_call.results"]}, "include[0]"),
        ({"include": ["reasoning.encrypted_content", "message.output_text.logprobs"]}, "include[1]"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 5}, "top_logprobs"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"tools": [{"type": "function", "name": "f", "defer_loading": True}]}, "tools[0].defer_loading"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ],
)
def test_what_needs_state_or_openai_servers_is_refused_by_name(change, param):
    with pytest.raises(Unsupported) as refused:
        request_to_chat({"model": MODEL, "input": "hi", **change})
    assert refused.value.param == param
    assert refused.value.message


def test_stateless_defaults_are_accepted():
    """What the OpenAI Agents SDK sends by default: ``include: []``, no store, verbosity low."""
    chat = request_to_chat(
        {
            "model": MODEL,
            "input": "hi",
            "include": [],
            "store": False,
            "previous_response_id": None,
            "truncation": "disabled",
            "text": {"verbosity": "low"},
            "reasoning": {"effort": "none"},
            "tools": [],
        }
    )
    assert chat["verbosity"] == "low"
    assert chat["reasoning_effort"] == "none"
    assert chat["tools"] == []
    assert request_to_chat({"model": MODEL, "input": "hi", "include": ["reasoning.encrypted_content"]})["messages"]


TRANSLATED_ITEMS = {"message", "function_call", "function_call_output", "reasoning", "item_reference"}


@pytest.mark.parametrize("kind", sorted(set(types_in(response_input_param.ResponseInputItemParam)) - TRANSLATED_ITEMS))
def test_every_other_input_item_type_the_sdk_knows_is_refused_never_dropped(kind):
    with pytest.raises(Unsupported) as refused:
        request_to_chat({"model": MODEL, "input": [{"role": "user", "content": "hi"}, {"type": kind, "id": "x_1"}]})
    assert refused.value.param == "input[1].type"
    assert kind in refused.value.message


@pytest.mark.parametrize("kind", sorted(set(types_in(tool_param.ToolParam)) - {"function"}))
def test_every_built_in_tool_the_sdk_knows_is_refused_by_name(kind):
    with pytest.raises(Unsupported) as refused:
        request_to_chat({"model": MODEL, "input": "hi", "tools": [{"type": kind}]})
    assert refused.value.param == "tools[0].type"
    assert kind in refused.value.message


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "input_file", "file_id": "file-1"}, "input[0].content[0].type"),
        (
            {"type": "input_file", "file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
            "input[0].content[0].type",
        ),
        ({"type": "input_audio", "input_audio": {"data": "AAA=", "format": "wav"}}, "input[0].content[0].type"),
        ({"type": "input_image", "file_id": "file-1", "detail": "auto"}, "input[0].content[0].file_id"),
    ],
)
def test_file_audio_and_stored_image_inputs_are_refused(part, param):
    with pytest.raises(Unsupported) as refused:
        request_to_chat({"model": MODEL, "input": [{"role": "user", "content": [part]}]})
    assert refused.value.param == param


def test_a_tool_result_with_an_image_is_refused():
    output = [{"type": "input_image", "image_url": "https://example.test/a.png", "detail": "auto"}]
    with pytest.raises(Unsupported) as refused:
        request_to_chat({"model": MODEL, "input": [{"type": "function_call_output", "call_id": "c", "output": output}]})
    assert refused.value.param == "input[0].output[0]"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": 42}, "input"),
        ({"model": MODEL, "input": "hi", "instructions": ["a"]}, "instructions"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": True}, "max_output_tokens"),
        ({"model": MODEL, "input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
        ({"model": MODEL, "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        (
            {"model": MODEL, "input": [{"role": "user", "content": [{"type": "output_audio"}]}]},
            "input[0].content[0].type",
        ),
        ({"model": MODEL, "input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ],
)
def test_malformed_requests_say_where(body, param):
    with pytest.raises(ProtocolError) as refused:
        request_to_chat(body)
    assert refused.value.param == param


def test_an_item_reference_is_resolved_when_the_caller_keeps_items_and_refused_otherwise():
    earlier = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Earlier answer."}]}
    body = {"model": MODEL, "input": [{"role": "user", "content": "hi"}, {"type": "item_reference", "id": "msg_9"}]}
    chat = request_to_chat(body, resolve_item={"msg_9": earlier}.get)
    assert chat["messages"][1] == {"role": "assistant", "content": "Earlier answer."}
    with pytest.raises(Unsupported) as refused:
        request_to_chat(body)
    assert refused.value.param == "input[1]"
    assert "store" in refused.value.message  # tells Vercel AI SDK users what to change
    # a reference to a reasoning item is dropped like the reasoning item itself would be
    assert len(request_to_chat({"model": MODEL, "input": [{"type": "item_reference", "id": "rs_1"}]})["messages"]) == 0


# --- whole responses ----------------------------------------------------------------------------


def completion(message: dict, finish="stop", u=None) -> dict:
    return {
        "id": "gen-1",
        "object": "chat.completion",
        "created": 1761300000,
        "model": "openai/gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": u if u is not None else usage(100, 20, cached=60, reasoning=8),
    }


REQUEST = {
    "model": MODEL,
    "input": "hi",
    "instructions": "Be brief.",
    "metadata": {"ticket": "T-1"},
    "max_output_tokens": 500,
    "temperature": 0.5,
    "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}, "strict": True}],
}


def test_a_completion_becomes_a_response_the_sdk_accepts():
    message = {"content": "Pong.", "reasoning": "The user pinged."}
    response = Response.model_validate(response_from_chat(completion(message), request=REQUEST))
    assert response.status == "completed"
    assert response.output_text == "Pong."
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == "The user pinged."
    assert response.model == "openai/gpt-4o-mini-2024-07-18"
    assert (response.instructions, response.metadata, response.max_output_tokens) == (
        "Be brief.",
        {"ticket": "T-1"},
        500,
    )
    assert response.tools[0].name == "weather"
    assert response.store is False
    assert response.id.startswith("resp_")
    assert response.usage.input_tokens == 100
    assert response.usage.input_tokens_details.cached_tokens == 60
    assert response.usage.output_tokens == 20
    assert response.usage.output_tokens_details.reasoning_tokens == 8
    assert response.usage.total_tokens == 120


def test_tool_calls_become_function_call_items():
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
    ]
    response = Response.model_validate(
        response_from_chat(completion({"content": None, "tool_calls": calls}, "tool_calls"), request=REQUEST)
    )
    assert response.status == "completed"
    assert [(item.type, item.call_id, item.arguments) for item in response.output] == [
        ("function_call", "call_a", '{"city":"Oslo"}'),
        ("function_call", "call_b", '{"city":"Rome"}'),
    ]
    assert response.output[0].id != response.output[1].id


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_a_cut_off_completion_is_an_incomplete_response(finish, reason):
    response = Response.model_validate(response_from_chat(completion({"content": "Half"}, finish), request=REQUEST))
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == reason
    assert response.output[0].status == "incomplete"


def test_a_refusal_is_a_refusal_part_and_missing_usage_stays_missing():
    raw = completion({"content": None, "refusal": "I can't help with that."}, u=None)
    del raw["usage"]
    response = Response.model_validate(response_from_chat(raw, request={"model": MODEL, "input": "x"}))
    assert response.output[0].content[0].type == "refusal"
    assert response.output[0].content[0].refusal == "I can't help with that."
    assert response.usage is None


def test_a_response_we_wrote_is_accepted_back_as_the_next_requests_input():
    """The agent loop: output items, dumped by the SDK as an agent resends them, plus results."""
    calls = [{"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]
    message = {"content": "Checking.", "reasoning": "Need weather.", "tool_calls": calls}
    first = Response.model_validate(response_from_chat(completion(message, "tool_calls"), request=REQUEST))
    history = [item.model_dump(exclude_none=True) for item in first.output]
    second = {
        **REQUEST,
        "input": ["placeholder", *history, {"type": "function_call_output", "call_id": "call_a", "output": "3C"}],
    }
    second["input"][0] = {"role": "user", "content": "Weather?"}
    chat = request_to_chat(second)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "3C"},
    ]


# --- streams ------------------------------------------------------------------------------------


def test_a_text_stream_becomes_the_typed_event_sequence():
    events = translate(text_stream("Po", "ng."))
    assert_valid(events)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    item_id = events[2]["item"]["id"]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [(d["delta"], d["item_id"], d["output_index"], d["content_index"]) for d in deltas] == [
        ("Po", item_id, 0, 0),
        ("ng.", item_id, 0, 0),
    ]
    assert events[6]["text"] == "Pong."
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "Pong."
    assert final.status == "completed"
    assert final.usage.input_tokens == 10
    assert final.id == events[0]["response"]["id"]
    assert events[0]["response"]["status"] == "in_progress"


def test_streamed_tool_calls_stream_their_arguments_one_call_after_another():
    chunks = [
        chat_chunk({"role": "assistant", "content": None}),
        chat_chunk(tool_delta(0, id="call_a", name="weather", arguments="")),
        chat_chunk(tool_delta(0, arguments='{"city":')),
        chat_chunk(tool_delta(0, arguments='"Oslo"}')),
        # several calls in one chunk, whole (as some providers send them)
        chat_chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                    },
                    {"index": 2, "id": "call_c", "type": "function", "function": {"name": "time", "arguments": "{}"}},
                ]
            }
        ),
        chat_chunk({}, "tool_calls"),
        chat_chunk(None, usage=usage(10, 5)),
    ]
    events = translate(chunks)
    assert_valid(events)
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["arguments"], e["output_index"]) for e in done] == [
        ("weather", '{"city":"Oslo"}', 0),
        ("weather", '{"city":"Rome"}', 1),
        ("time", "{}", 2),
    ]
    deltas = [
        e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta" and e["output_index"] == 0
    ]
    assert deltas == ['{"city":', '"Oslo"}']
    final = Response.model_validate(events[-1]["response"])
    assert [(o.call_id, o.status) for o in final.output] == [
        ("call_a", "completed"),
        ("call_b", "completed"),
        ("call_c", "completed"),
    ]
    # each item is closed before the next is added
    kinds = [(e["type"], e.get("output_index")) for e in events if "output_item" in e["type"]]
    assert kinds == [
        ("response.output_item.added", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.output_item.done", 2),
    ]


def test_a_tool_call_whose_name_comes_late_is_announced_once_named():
    chunks = [
        chat_chunk(tool_delta(0, id="call_a", arguments='{"a"')),
        chat_chunk(tool_delta(0, name="f", arguments=":1}")),
        chat_chunk({}, "tool_calls"),
    ]
    events = translate(chunks)
    assert_valid(events)
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert added["item"]["name"] == "f"
    assert [e["delta"] for e in events if e["type"].endswith("arguments.delta")] == ['{"a":1}']


def test_tool_call_fragments_without_an_index_belong_to_the_call_being_streamed():
    chunks = [
        chat_chunk({"tool_calls": [{"id": "call_z", "type": "function", "function": {"name": "f", "arguments": "{"}}]}),
        chat_chunk({"tool_calls": [{"function": {"arguments": "}"}}]}),
        chat_chunk(tool_delta(1, arguments='{"b"')),  # the id and name come after the first fragment
        chat_chunk(tool_delta(1, id="call_late", name="g", arguments=":2}")),
        chat_chunk({}, "tool_calls"),
    ]
    final = Response.model_validate(translate(chunks)[-1]["response"])
    assert [(o.call_id, o.name, o.arguments) for o in final.output] == [
        ("call_z", "f", "{}"),
        ("call_late", "g", '{"b":2}'),
    ]


def test_a_failure_while_an_unnamed_tool_call_is_open_shows_only_what_was_announced():
    stream = ResponseStream(request={"model": MODEL, "input": "hi"})
    events = stream.feed(chat_chunk({"content": "Hi"})) + stream.feed(chat_chunk(tool_delta(0, arguments="{")))
    events += stream.fail("upstream timed out")
    assert_valid(events)
    failed = Response.model_validate(events[-1]["response"])
    assert [o.type for o in failed.output] == ["message"]
    assert failed.output[0].status == "completed"


def test_reasoning_then_text_streams_a_reasoning_summary_item_first():
    chunks = [
        chat_chunk({"reasoning": "Think"}),
        chat_chunk({"reasoning_content": "ing."}),  # vLLM's field name
        chat_chunk({"content": "Answer"}),
        chat_chunk({}, "stop"),
        chat_chunk(None, usage=usage(10, 5, reasoning=3)),
    ]
    events = translate(chunks)
    assert_valid(events)
    summary = [e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta"]
    assert summary == ["Think", "ing."]
    final = Response.model_validate(events[-1]["response"])
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == "Thinking."
    assert final.usage.output_tokens_details.reasoning_tokens == 3


def test_a_stream_cut_by_the_length_limit_ends_incomplete():
    events = translate(text_stream("Half", finish="length"))
    assert_valid(events)
    assert events[-1]["type"] == "response.incomplete"
    final = Response.model_validate(events[-1]["response"])
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete"
    assert final.usage is not None


def test_an_upstream_error_mid_stream_ends_the_stream_as_failed():
    stream = ResponseStream(request={"model": MODEL, "input": "hi"})
    events = stream.feed(chat_chunk({"content": "Hal"}))
    events += stream.feed(
        {
            "id": "gen-1",
            "object": "chat.completion.chunk",
            "error": {"code": 502, "message": "Provider disconnected"},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        }
    )
    assert_valid(events)
    assert events[-1]["type"] == "response.failed"
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed"
    assert failed.error.code == "server_error"
    assert failed.error.message == "Provider disconnected"
    assert failed.output[0].status == "incomplete"
    assert failed.output[0].content[0].text == "Hal"
    assert stream.feed(chat_chunk({"content": "more"})) == []
    assert stream.finish() == []


def test_a_stream_that_ends_without_a_finish_reason_fails_and_fail_can_be_called_directly():
    events = translate([chat_chunk({"content": "Hal"})])
    assert events[-1]["type"] == "response.failed"
    stream = ResponseStream(request={"model": MODEL, "input": "hi"})
    events = stream.fail("Slow down.", "rate_limit_exceeded")
    assert_valid(events)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed"]
    assert events[-1]["response"]["error"] == {"code": "rate_limit_exceeded", "message": "Slow down."}


def test_an_upstream_that_goes_back_to_a_finished_tool_call_fails_the_stream():
    chunks = [
        chat_chunk(tool_delta(0, id="call_a", name="f", arguments="{}")),
        chat_chunk(tool_delta(1, id="call_b", name="g", arguments="{}")),
        chat_chunk(tool_delta(0, arguments="more")),
    ]
    events = translate(chunks, finish=False)
    assert_valid(events)
    assert events[-1]["type"] == "response.failed"


def test_events_are_framed_with_an_event_line_and_one_json_data_line():
    event = {"type": "response.output_text.delta", "sequence_number": 4, "delta": "é\n"}
    data = '{"type":"response.output_text.delta","sequence_number":4,"delta":"é\\n"}'
    assert encode(event) == f"event: response.output_text.delta\ndata: {data}\n\n".encode()


# --- through the openai SDK's own client and stream accumulator -------------------------------


def test_the_sdk_stream_accumulator_reads_text_tool_calls_and_usage():
    chunks = [
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": "Let me "}),
        chat_chunk({"content": "check."}),
        chat_chunk(tool_delta(0, id="call_a", name="weather", arguments='{"city"')),
        chat_chunk(tool_delta(0, arguments=':"Oslo"}')),
        chat_chunk({}, "tool_calls"),
        chat_chunk(None, usage=usage(50, 12, cached=30, reasoning=4)),
    ]
    seen: list = []
    client = openai_client(serving(chunks, seen=seen))
    with client.responses.stream(model=MODEL, input="Weather in Oslo?", instructions="Use tools.") as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert texts == ["Let me ", "check."]
    assert final.output_text == "Let me check."
    call = final.output[1]
    assert (call.type, call.name, call.arguments, call.call_id) == (
        "function_call",
        "weather",
        '{"city":"Oslo"}',
        "call_a",
    )
    assert (final.usage.input_tokens, final.usage.output_tokens) == (50, 12)
    assert final.usage.input_tokens_details.cached_tokens == 30
    assert final.usage.output_tokens_details.reasoning_tokens == 4
    assert request_to_chat(seen[0])["messages"][0] == {"role": "system", "content": "Use tools."}


def test_the_sdk_reads_a_raw_stream_and_a_whole_response():
    client = openai_client(serving(text_stream("Po", "ng.")))
    events = list(client.responses.create(model=MODEL, input="Ping?", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "Pong."
    whole = client.responses.create(model=MODEL, input="Ping?")
    assert whole.output_text == "Pong."
    assert whole.usage.total_tokens == 15


async def test_the_async_sdk_reads_the_stream_too():
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(serving(text_stream("Po", "ng."))))
    client = AsyncOpenAI(api_key="tt_test", base_url="http://gateway.test/v1", http_client=http, max_retries=0)
    async with client.responses.stream(model=MODEL, input="Ping?") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "Pong."
    await http.aclose()


def test_the_sdk_sees_a_failed_stream_as_a_failed_response():
    failing = [
        chat_chunk({"content": "Hal"}),
        {"error": {"message": "Provider disconnected", "code": 502}, "choices": []},
    ]
    client = openai_client(serving(failing, finish=False))
    events = list(client.responses.create(model=MODEL, input="Ping?", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.error.message == "Provider disconnected"


# --- usage --------------------------------------------------------------------------------------


def test_responses_usage_counts_cached_tokens_inside_input_tokens_like_chat_does():
    raw = fake_responses_usage(1000, 200, cached=600, reasoning=50, cache_write=100)
    assert from_responses(raw) == TokenUsage(
        prompt_tokens=1000, completion_tokens=200, reasoning_tokens=50, cached_tokens=600, cache_write_tokens=100
    )
    chat = from_chat(usage(1000, 200, cached=600, reasoning=50, cache_write=100))
    assert from_responses(responses_usage(chat)) == chat
    assert from_responses(None) is None
    assert from_responses({"input_tokens": "9", "output_tokens": True}) == TokenUsage()


def test_a_responses_usage_report_prices_exactly_like_the_same_chat_report():
    """The wiring the proxy will use: TokenUsage → core.usage.Usage → the price table.
    300 fresh × $3 + 600 cached × $0.30 + 100 written × $3.75 + 200 out × $15, per million."""
    from decimal import Decimal

    from core.pricing import Rates, cost_usd
    from core.usage import Usage, usage_from

    rates = Rates(prompt=Decimal("3"), completion=Decimal("15"), cache_read=Decimal("0.3"), cache_write=Decimal("3.75"))
    via_responses = Usage(**asdict(from_responses(fake_responses_usage(1000, 200, cached=600, cache_write=100))))
    via_chat = usage_from(usage(1000, 200, cached=600, cache_write=100))
    assert cost_usd(rates, via_responses) == cost_usd(rates, via_chat) == Decimal("0.004455")


# --- the fake upstream's native /responses route, read by the SDK over HTTP -------------------


def test_the_fake_upstream_serves_native_responses_the_sdk_accepts(fake_upstream_server):
    fake = fake_upstream_server
    fake.reset()
    usage = fake_responses_usage(40, 3, cached=10, cost="0.000123")
    fake.script(
        "responses",
        Reply(body=response_object("Pong.", u=usage)),
        StreamReply(responses_stream_of("Po", "ng.", u=usage, calls=[("weather", '{"city":"Oslo"}')])),
    )
    client = OpenAI(api_key="sk-test", base_url=fake.url, max_retries=0)
    whole = client.responses.create(model=MODEL, input="Ping?")
    assert whole.output_text == "Pong."
    assert whole.usage.input_tokens_details.cached_tokens == 10
    with client.responses.stream(model=MODEL, input="Ping?") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert events[-1].type == "response.completed"
    assert final.output_text == "Pong."
    assert final.output[1].arguments == '{"city":"Oslo"}'
    raw = [
        json.loads(line[6:])
        for line in b"".join(responses_stream_of("x", u=usage)).decode().splitlines()
        if line.startswith("data: ")
    ]
    assert_valid(raw)
    assert from_responses(responses_event_usage(raw[-1])) == TokenUsage(40, 3, 0, 10, 0)
    assert b'"cost": 0.000123' in response_object(u=usage)  # a JSON number, written as given
    assert [c.json["input"] for c in fake.calls("responses")] == ["Ping?", "Ping?"]


def test_core_imports_no_django():
    """core/ is the ground floor: a fresh interpreter loads every protocol module without Django."""
    import subprocess
    import sys

    code = (
        "import sys, core.protocols.responses, core.protocols.anthropic, core.protocols.usage, core.protocols.sse;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'proxy', 'wallet')))"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "[]"
