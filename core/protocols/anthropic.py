"""Anthropic Messages API ⇄ chat completions, for upstreams that speak only chat completions.

* ``request_to_chat(body)`` — a ``POST /v1/messages`` body → a chat-completions body, or
  ``ProtocolError``/``Unsupported`` naming the parameter that cannot be carried.
* ``message_from_chat(completion, request=body)`` — a ``chat.completion`` → a ``Message``.
* ``MessageStream(request=body)`` — feed it ``chat.completion.chunk`` dicts, get Anthropic
  stream events (``message_start`` … ``message_stop``); ``finish()`` at the end of the upstream
  stream sends ``message_delta`` with the stop reason and the usage, then ``message_stop``.
* ``error_body(status, message)`` — Anthropic's error shape for an HTTP status.

What maps to what, and why, is ``docs/protocols/anthropic-messages.md``.
"""

from __future__ import annotations

import json

from . import ProtocolError, Unsupported
from .chat import Piece, StreamTranslator, View, new_id, read_completion, text_of, tool_calls
from .usage import TokenUsage, anthropic_usage, from_chat

# Fields this module maps, checks or deliberately ignores; any other field of the request is
# passed to the chat upstream as it is (``top_k``, OpenRouter's ``provider``…), as
# /v1/chat/completions does with fields it does not know.
_HANDLED = {
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "stream",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
    "output_config",
    "cache_control",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "inference_geo",
    "n",
}

_REFUSED = {
    "container": "containers (code execution) are not supported on this upstream.",
    "mcp_servers": "MCP servers are not supported on this upstream.",
    "context_management": "server-side context management is not supported on this upstream.",
    # A data-residency requirement the upstream cannot be held to: refusing beats ignoring it.
    "inference_geo": "inference_geo is not supported on this upstream.",
}

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}

# ``thinking.budget_tokens`` has no chat-completions twin; ``reasoning_effort`` is the closest.
_EFFORT_BY_BUDGET = ((4096, "low"), (16384, "medium"))


# --- request ------------------------------------------------------------------------------------


def request_to_chat(body: object) -> dict:
    """An Anthropic Messages request → a chat-completions request."""
    if not isinstance(body, dict):
        raise ProtocolError(None, "The request body must be a JSON object.")
    for name, message in _REFUSED.items():
        if body.get(name) is not None:
            raise Unsupported(name, message)
    if body.get("n") not in (None, 1):
        raise Unsupported("n", "n is not a Messages API parameter; one message is generated per request.")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise ProtocolError("max_tokens", "max_tokens is required.")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ProtocolError("max_tokens", "max_tokens must be a positive integer.")
    chat = {key: value for key, value in body.items() if key not in _HANDLED}
    chat["messages"] = _system(body.get("system")) + _messages(body.get("messages"))
    chat["max_completion_tokens"] = max_tokens
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # message_delta carries the usage
    elif "stream" in body:
        chat["stream"] = False
    if body.get("stop_sequences") is not None:
        stops = body["stop_sequences"]
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ProtocolError("stop_sequences", "stop_sequences must be an array of strings.")
        chat["stop"] = stops
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    _reasoning(body, chat)
    return chat


def _system(system: object) -> list[dict]:
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if not isinstance(system, list):
        raise ProtocolError("system", "system must be a string or an array of text blocks.")
    parts = []
    for position, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise ProtocolError(f"system[{position}]", "system blocks must be text blocks.")
        parts.append({"type": "text", "text": block["text"]})  # cache_control: see _text_part
    return [{"role": "system", "content": _collapse(parts)}] if parts else []


def _messages(messages: object) -> list[dict]:
    if not isinstance(messages, list):
        raise ProtocolError("messages", "messages must be an array.")
    result: list[dict] = []
    for position, message in enumerate(messages):
        where = f"messages[{position}]"
        if not isinstance(message, dict):
            raise ProtocolError(where, "each message must be an object.")
        role = message.get("role")
        content = message.get("content")
        if role not in ("user", "assistant", "system"):
            raise ProtocolError(f"{where}.role", "role must be user or assistant.")
        if isinstance(content, str):
            result.append({"role": role, "content": content})
        elif isinstance(content, list):
            result += _assistant(content, where) if role == "assistant" else _user(role, content, where)
        else:
            raise ProtocolError(f"{where}.content", "content must be a string or an array of content blocks.")
    return result


def _user(role: str, blocks: list, where: str) -> list[dict]:
    """A user turn: its tool results become ``tool`` messages, which chat completions wants
    straight after the assistant's tool calls, then the rest becomes one user message."""
    tools: list[dict] = []
    parts: list[dict] = []
    for position, block in enumerate(blocks):
        here = f"{where}.content[{position}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            tools.append(_tool_result(block, here))
        elif kind == "text":
            parts.append(_text_part(block, here))
        elif kind == "image" and role == "user":
            parts.append(_image_part(block, here))
        else:
            raise _unsupported_block(kind, here)
    return tools + ([{"role": role, "content": _collapse(parts)}] if parts else [])


def _assistant(blocks: list, where: str) -> list[dict]:
    parts: list[dict] = []
    calls: list[dict] = []
    for position, block in enumerate(blocks):
        here = f"{where}.content[{position}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(_text_part(block, here))
        elif kind == "tool_use":
            calls.append(_tool_call(block, here))
        elif kind in ("thinking", "redacted_thinking"):
            # Chat completions has no field to hand thinking back: the upstream thinks afresh.
            continue
        else:
            raise _unsupported_block(kind, here)
    message: dict = {"role": "assistant", "content": _collapse(parts) if parts else None}
    if calls:
        message["tool_calls"] = calls
    return [message] if parts or calls else []


def _unsupported_block(kind: object, where: str) -> ProtocolError:
    if kind is None:
        return ProtocolError(f"{where}.type", "each content block must be an object with a type.")
    return Unsupported(f"{where}.type", f"content block type {kind!r} is not supported here on this upstream.")


def _text_part(block: dict, where: str) -> dict:
    if not isinstance(block.get("text"), str):
        raise ProtocolError(f"{where}.text", "a text block needs text.")
    # cache_control is a prompt-caching hint with no chat-completions twin; it does not change
    # the answer, only what the upstream may cache (docs/protocols/anthropic-messages.md).
    return {"type": "text", "text": block["text"]}


def _image_part(block: dict, where: str) -> dict:
    source = block.get("source")
    if not isinstance(source, dict):
        raise ProtocolError(f"{where}.source", "an image needs a base64 or url source.")
    kind = source.get("type")
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    elif kind in ("file", "text", "content"):
        raise Unsupported(f"{where}.source.type", f"image source {kind!r} is not supported on this upstream.")
    else:
        raise ProtocolError(f"{where}.source", "an image needs a base64 or url source.")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(block: dict, where: str) -> dict:
    if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
        raise ProtocolError(f"{where}.tool_use_id", "a tool_result needs tool_use_id.")
    content = block.get("content", "")
    if isinstance(content, list):
        texts = []
        for position, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise Unsupported(
                    f"{where}.content[{position}].type",
                    f"tool_result content {kind!r} is not supported: chat tool results are text only.",
                )
            texts.append(_text_part(part, f"{where}.content[{position}]"))
        content = _collapse(texts) if texts else ""
    elif not isinstance(content, str):
        raise ProtocolError(f"{where}.content", "tool_result content must be a string or an array of blocks.")
    if block.get("is_error"):
        # Chat tool messages have no error flag; the model must still learn the tool failed.
        content = f"Error: {content}" if isinstance(content, str) else [{"type": "text", "text": "Error:"}, *content]
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}


def _tool_call(block: dict, where: str) -> dict:
    for key in ("id", "name"):
        if not isinstance(block.get(key), str) or not block[key]:
            raise ProtocolError(f"{where}.{key}", f"a tool_use block needs {key}.")
    arguments = json.dumps(block.get("input") or {}, separators=(",", ":"), ensure_ascii=False)
    return {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}


def _collapse(parts: list[dict]) -> object:
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _tools(tools: object) -> list[dict]:
    if not isinstance(tools, list):
        raise ProtocolError("tools", "tools must be an array.")
    result = []
    for position, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ProtocolError(f"tools[{position}]", "each tool must be an object.")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            # bash_…, text_editor_…, web_search_…, computer_…: tools Anthropic's servers define.
            raise Unsupported(f"tools[{position}].type", f"tool type {kind!r} is not supported on this upstream.")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ProtocolError(f"tools[{position}].name", "a tool needs a name.")
        if not isinstance(tool.get("input_schema"), dict):
            raise ProtocolError(f"tools[{position}].input_schema", "a tool needs an input_schema object.")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        result.append({"type": "function", "function": function})
    return result


def _tool_choice(choice: object, chat: dict) -> None:
    if not isinstance(choice, dict):
        raise ProtocolError("tool_choice", "tool_choice type must be auto, any, tool or none.")
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise ProtocolError("tool_choice", "tool_choice type must be auto, any, tool or none.")
    if choice.get("disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False


def _reasoning(body: dict, chat: dict) -> None:
    output_config = body.get("output_config")
    if output_config is not None and not isinstance(output_config, dict):
        raise ProtocolError("output_config", "output_config must be an object.")
    output_config = output_config or {}
    fmt = output_config.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise ProtocolError("output_config.format", "output_config.format must be a json_schema format.")
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    thinking = body.get("thinking")
    thinking_fields = thinking if isinstance(thinking, dict) else {}
    kind = thinking_fields.get("type")
    if thinking is not None and kind not in ("enabled", "disabled", "adaptive"):
        raise ProtocolError("thinking.type", "thinking type must be enabled, disabled or adaptive.")
    effort = output_config.get("effort")
    if effort is None and kind == "enabled":
        budget = thinking_fields.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ProtocolError("thinking.budget_tokens", "thinking needs a positive budget_tokens.")
        effort = next((name for limit, name in _EFFORT_BY_BUDGET if budget < limit), "high")
    if effort is not None and kind != "disabled":
        chat["reasoning_effort"] = effort


# --- response -----------------------------------------------------------------------------------


def _stop_reason(view: View, request: dict) -> tuple[str, str | None]:
    stops = request.get("stop_sequences") or []
    if view.finish_reason == "stop" and view.stop_sequence in stops:
        return "stop_sequence", view.stop_sequence
    return _STOP_REASONS.get(view.finish_reason or "", "end_turn"), None


def tool_input(arguments: str) -> dict:
    """A chat tool call's ``arguments`` string as a ``tool_use`` block's ``input`` object.

    Anthropic's ``input`` is always an object. A model that wrote something else is not
    silently "fixed": the text is kept, under ``_unparsed_arguments``, for the client to see."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"_unparsed_arguments": arguments}


def _usage(raw: dict | None) -> dict:
    return anthropic_usage(from_chat(raw) or TokenUsage())


def message_from_chat(completion: dict, *, request: dict, message_id: str | None = None) -> dict:
    """A whole ``chat.completion`` → a ``Message``: thinking, text, then tool_use blocks.

    A chat completion that failed (``finish_reason: "error"``) is the caller's to turn into an
    error response; given one anyway, it reads as ``end_turn``."""
    view = read_completion(completion)
    content: list[dict] = []
    if text_of(view.pieces, "reasoning"):
        content.append({"type": "thinking", "thinking": text_of(view.pieces, "reasoning"), "signature": ""})
    text = text_of(view.pieces, "text") + text_of(view.pieces, "refusal")
    if text:
        content.append({"type": "text", "text": text})
    for call in tool_calls(view.pieces):
        block_id = call["call_id"] or new_id("toolu")
        content.append(
            {"type": "tool_use", "id": block_id, "name": call["name"] or "", "input": tool_input(call["arguments"])}
        )
    stop_reason, stop_sequence = _stop_reason(view, request)
    return {
        "id": message_id or new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": view.model or request.get("model") or "",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(view.usage),
    }


class MessageStream(StreamTranslator):
    """Chat-completion chunks in, Anthropic stream events out (see ``StreamTranslator``).

    Opens with ``message_start``; ends with ``message_delta`` (stop reason, usage) and
    ``message_stop``, or with an ``error`` event.

    The usage comes at the end of a chat stream, so ``message_start`` says 0 input tokens and
    ``message_delta`` carries the real ``input_tokens`` and cache counts beside
    ``output_tokens``; the anthropic SDK takes a ``message_delta``'s counts over the start's."""

    def __init__(self, *, request: dict, message_id: str | None = None) -> None:
        super().__init__()
        self.request = request
        self.message_id = message_id or new_id("msg")
        self._blocks = 0

    def _opening(self) -> list[dict]:
        message: dict[str, object] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.request.get("model") or "",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}]

    def _closing(self) -> list[dict]:
        events = self._close()
        view = View(finish_reason=self.finish_reason, stop_sequence=self.stop_sequence)
        stop_reason, stop_sequence = _stop_reason(view, self.request)
        delta = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}}
        return [*events, {**delta, "usage": _usage(self.usage)}, {"type": "message_stop"}]

    def _failing(self, message: str, kind: str | None) -> list[dict]:
        return [{"type": "error", "error": {"type": kind or "api_error", "message": message}}]

    def _content(self, piece: Piece) -> list[dict]:
        events: list[dict] = []
        if piece.kind == "reasoning":
            block = {"type": "thinking", "thinking": "", "signature": ""}
            delta = {"type": "thinking_delta", "thinking": piece.text}
        else:  # text, or a refusal, which Anthropic says as text
            block = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": piece.text}
        if self._open is None or self._open["kind"] != block["type"]:
            events += self._close()
            events.append(self._start_block(block, {"kind": block["type"]}))
        return [*events, {"type": "content_block_delta", "index": self._current["index"], "delta": delta}]

    def _new_call(self) -> dict:
        return {"index": None}  # a block index once the block starts

    def _call_fragment(self, call: dict, fragment: str) -> list[dict]:
        if call["index"] is None:
            return self._announce(call) if call["name"] else []
        return [self._json_delta(call, fragment)] if fragment else []

    def _announce(self, call: dict) -> list[dict]:
        """Start a tool_use block: once its name is known (or at its end if it never came); the
        arguments that arrived before go out as one delta."""
        block: dict[str, object] = {
            "type": "tool_use",
            "id": call["call_id"] or new_id("toolu"),
            "name": call["name"] or "",
            "input": {},
        }
        events = [self._start_block(block, call)]
        return events + ([self._json_delta(call, call["text"])] if call["text"] else [])

    def _json_delta(self, call: dict, fragment: str) -> dict:
        delta = {"type": "input_json_delta", "partial_json": fragment}
        return {"type": "content_block_delta", "index": call["index"], "delta": delta}

    def _start_block(self, block: dict, state: dict) -> dict:
        state["index"] = self._blocks
        self._blocks += 1
        self._open = state
        return {"type": "content_block_start", "index": state["index"], "content_block": block}

    def _close(self) -> list[dict]:
        current = self._open
        if current is None:
            return []
        events: list[dict] = []
        if current["kind"] == "call":
            self._closed_calls.add(current["key"])
            if current["index"] is None:
                events += self._announce(current)
        self._open = None
        return [*events, {"type": "content_block_stop", "index": current["index"]}]


# --- errors -------------------------------------------------------------------------------------

# Anthropic's error types by HTTP status (docs.claude.com/en/api/errors; the SDK's ErrorType and
# its status → exception table). 402 is ``billing_error``: the SDK maps 402 to
# PaymentRequiredError and lists billing_error among the error types.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's ``error.type`` for an HTTP status; other 4xx are ``invalid_request_error``
    (as Anthropic documents), other 5xx ``api_error``."""
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str, *, request_id: str | None = None, **extra: object) -> dict:
    """``{"type": "error", "error": {"type", "message", …extra}, "request_id"}`` — ``extra``
    goes inside ``error`` (the 402's ``topup_url`` and ``balance``, as on /v1/chat/completions)."""
    body: dict = {"type": "error", "error": {"type": error_type(status), "message": message, **extra}}
    if request_id is not None:
        body["request_id"] = request_id
    return body
