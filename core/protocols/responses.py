"""OpenAI Responses API ⇄ chat completions, for upstreams that speak only chat completions.

* ``request_to_chat(body)`` — a ``POST /v1/responses`` body → a chat-completions body, or
  ``ProtocolError``/``Unsupported`` naming the parameter that cannot be carried.
* ``response_from_chat(completion, request=body)`` — a ``chat.completion`` → a ``Response``.
* ``ResponseStream(request=body)`` — feed it ``chat.completion.chunk`` dicts, get Responses
  stream events (dicts, ``sequence_number`` from 0); ``finish()`` at the end of the upstream
  stream emits the terminal ``response.completed`` / ``.incomplete`` / ``.failed`` with usage.

The gateway is stateless: ``store: true``, ``previous_response_id``, ``conversation``,
``background`` and stored ``prompt`` templates are refused, and so is an ``item_reference``
unless the caller passes ``resolve_item`` to look items up. What maps to what, and why, is
``docs/protocols/openai-responses.md``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

from . import ProtocolError, Unsupported
from .chat import Piece, StreamTranslator, new_id, read_completion, text_of, tool_calls
from .usage import from_chat, responses_usage

# Fields this module maps, checks or deliberately ignores; any other field of the request is
# passed to the chat upstream as it is, as /v1/chat/completions does with fields it does not know.
_HANDLED = {
    "input",
    "instructions",
    "stream",
    "stream_options",
    "store",
    "previous_response_id",
    "conversation",
    "background",
    "prompt",
    "context_management",
    "moderation",
    "prompt_cache_options",
    "include",
    "max_output_tokens",
    "max_tool_calls",
    "reasoning",
    "text",
    "tools",
    "tool_choice",
    "top_logprobs",
    "truncation",
    "n",
}

# State the gateway would have to keep: refused whenever set (``store`` only when true).
_STATEFUL = {
    "previous_response_id": "previous_response_id needs stored responses, which this gateway does not keep: "
    "send the whole conversation in input instead.",
    "conversation": "conversation needs stored conversations, which this gateway does not keep: "
    "send the whole conversation in input instead.",
    "background": "background responses need stored responses, which this gateway does not keep.",
    "prompt": "stored prompt templates are not supported: send instructions and input instead.",
    "context_management": "server-side context management (compaction) is not supported.",
    "moderation": "moderation of responses is not supported.",
    "prompt_cache_options": "prompt_cache_options is not supported on this upstream.",
}

# ``include`` values with nothing to include here: encrypted reasoning is only ever produced by
# OpenAI's own reasoning models (the field stays absent, as it is for any model without it).
_INCLUDABLE = {"reasoning.encrypted_content"}

# Input item types that only OpenAI's servers can act on (built-in tools, stored state).
_BUILT_IN_ITEMS = {
    "file_search_call",
    "computer_call",
    "computer_call_output",
    "web_search_call",
    "image_generation_call",
    "code_interpreter_call",
    "local_shell_call",
    "local_shell_call_output",
    "shell_call",
    "shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
    "mcp_call",
    "custom_tool_call",
    "custom_tool_call_output",
    "tool_search_call",
    "tool_search_output",
    "additional_tools",
    "compaction",
    "compaction_trigger",
    "configuration_update",
    "program",
    "program_output",
}

_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}


# --- request ------------------------------------------------------------------------------------


def request_to_chat(body: object, *, resolve_item: Callable[[str], dict | None] | None = None) -> dict:
    """A Responses request → a chat-completions request.

    ``resolve_item(id)`` may return an earlier output item for an ``item_reference`` (the
    Vercel AI SDK sends assistant text from earlier steps that way unless its ``store`` option
    is false); without it such a reference is refused."""
    if not isinstance(body, dict):
        raise ProtocolError(None, "The request body must be a JSON object.")
    _refuse_stateful(body)
    chat = {key: value for key, value in body.items() if key not in _HANDLED}
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ProtocolError("instructions", "instructions must be a string.")
        if instructions:
            # "system", not "developer": every chat server knows it, and OpenAI itself treats a
            # system message to a reasoning model as a developer message.
            messages.append({"role": "system", "content": instructions})
    if "input" not in body:
        raise ProtocolError("input", "input is required.")
    messages += _input_messages(body["input"], resolve_item)
    chat["messages"] = messages
    if body.get("stream"):
        chat["stream"] = True
        # The terminal event carries usage, so it is always asked for on the translated stream.
        chat["stream_options"] = {"include_usage": True}
    elif "stream" in body:
        chat["stream"] = False
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = _positive_int(body, "max_output_tokens")
    _reasoning(body, chat)
    _text(body, chat)
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    return chat


# The stored state no upstream is ever asked for (the gateway forwards ``store: false``), so
# these are refused on the native path too.
STORED_STATE = ("previous_response_id", "conversation", "background")


def refuse_stored_state(body: dict, names: tuple[str, ...] = STORED_STATE) -> None:
    """``Unsupported`` for ``store: true`` or any of ``names`` set: state the gateway does not keep."""
    if body.get("store") is True:
        raise Unsupported(
            "store",
            "store: true is not supported: this gateway does not keep responses. "
            "Send store: false (or leave it out) and the whole conversation in input.",
        )
    for name in names:
        if body.get(name) not in (None, False):
            raise Unsupported(name, _STATEFUL[name])


def _refuse_stateful(body: dict) -> None:
    refuse_stored_state(body, tuple(_STATEFUL))
    include = body.get("include")
    if include is not None:
        if not isinstance(include, list):
            raise ProtocolError("include", "include must be an array.")
        for position, value in enumerate(include):
            if value not in _INCLUDABLE:
                raise Unsupported(f"include[{position}]", f"include value {value!r} is not supported on this upstream.")
    if body.get("truncation") not in (None, "disabled"):
        raise Unsupported("truncation", "truncation: auto is not supported: the whole input is always sent.")
    if body.get("top_logprobs"):
        raise Unsupported("top_logprobs", "top_logprobs is not supported on this upstream.")
    if body.get("n") not in (None, 1):
        raise Unsupported("n", "n is not a Responses API parameter; one response is generated per request.")


def _positive_int(body: dict, name: str) -> int:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProtocolError(name, f"{name} must be a positive integer.")
    return value


def _reasoning(body: dict, chat: dict) -> None:
    reasoning = body.get("reasoning")
    if reasoning is None:
        return
    if not isinstance(reasoning, dict):
        raise ProtocolError("reasoning", "reasoning must be an object.")
    # Only the effort has a chat-completions twin; ``summary`` asks for summaries, and the
    # reasoning text the upstream returns (if any) is relayed as one.
    if reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]


def _text(body: dict, chat: dict) -> None:
    text = body.get("text")
    if text is None:
        return
    if not isinstance(text, dict):
        raise ProtocolError("text", "text must be an object.")
    if text.get("verbosity") is not None:
        chat["verbosity"] = text["verbosity"]
    fmt = text.get("format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise ProtocolError("text.format", "a json_schema format needs a name and a schema.")
        schema = {key: fmt[key] for key in ("name", "schema", "description", "strict") if key in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    else:
        raise Unsupported("text.format.type", f"text format {kind!r} is not supported.")


def _tools(tools: object) -> list[dict]:
    if not isinstance(tools, list):
        raise ProtocolError("tools", "tools must be an array.")
    result = []
    for position, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise Unsupported(
                f"tools[{position}].type",
                f"tool type {kind!r} is not supported: only function tools can be served by this upstream.",
            )
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ProtocolError(f"tools[{position}].name", "a function tool needs a name.")
        if tool.get("defer_loading"):
            raise Unsupported(
                f"tools[{position}].defer_loading", "deferred tool loading (tool search) is not supported."
            )
        function = {"name": tool["name"]}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        result.append({"type": "function", "function": function})
    return result


def _tool_choice(choice: object) -> object:
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise Unsupported("tool_choice", f"tool_choice {kind!r} is not supported: use none, auto, required or a function.")


def _input_messages(value: object, resolve_item: Callable[[str], dict | None] | None) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ProtocolError("input", "input must be a string or an array of items.")
    builder = _Conversation()
    for position, item in enumerate(value):
        where = f"input[{position}]"
        if isinstance(item, dict) and item.get("type") == "item_reference":
            item = _resolved(item, where, resolve_item)
            if item is None:
                continue
        builder.add(item, where)
    return builder.messages


def _resolved(reference: dict, where: str, resolve_item: Callable[[str], dict | None] | None) -> dict | None:
    item_id = reference.get("id")
    found = resolve_item(item_id) if resolve_item and isinstance(item_id, str) else None
    if isinstance(found, dict) and found.get("type") != "item_reference":
        return found
    if isinstance(item_id, str) and item_id.startswith("rs_"):
        return None  # a reasoning item: never carried to chat completions anyway (see _Conversation)
    raise Unsupported(
        where,
        f"item_reference {item_id!r} needs stored items, which this gateway does not keep: send the item itself "
        "(with the Vercel AI SDK, set providerOptions.openai.store to false).",
    )


class _Conversation:
    """Chat messages built item by item. A Responses conversation spreads one assistant turn
    over several items (reasoning, message, function_call…); chat completions wants one
    assistant message holding the text and every tool call, followed by the tool results."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self._assistant: dict | None = None  # the assistant message still being filled
        self._assistant_parts: list[dict] = []

    def add(self, item: object, where: str) -> None:
        if not isinstance(item, dict):
            raise ProtocolError(where, "each input item must be an object.")
        kind = item.get("type", "message")
        if kind == "message":
            self._message(item, where)
        elif kind == "function_call":
            self._function_call(item, where)
        elif kind == "function_call_output":
            self._assistant = None
            self.messages.append(_tool_message(item, where))
        elif kind == "reasoning":
            # Chat completions has no field to hand reasoning back to the model: the upstream
            # reasons afresh. The item carries no content the answer depends on.
            pass
        elif kind in _BUILT_IN_ITEMS:
            raise Unsupported(f"{where}.type", f"input item type {kind!r} is not supported on this upstream.")
        else:
            raise Unsupported(f"{where}.type", f"unknown input item type {kind!r}.")

    def _message(self, item: dict, where: str) -> None:
        role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise ProtocolError(f"{where}.role", "role must be user, assistant, system or developer.")
        parts = _content_parts(item.get("content"), f"{where}.content", role)
        if role != "assistant":
            self._assistant = None
            self.messages.append({"role": role, "content": _collapse(parts)})
            return
        assistant = self._open_assistant()
        self._assistant_parts += parts
        assistant["content"] = _collapse(self._assistant_parts)

    def _function_call(self, item: dict, where: str) -> None:
        for key in ("call_id", "name"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ProtocolError(f"{where}.{key}", f"a function_call item needs {key}.")
        if item.get("namespace"):
            raise Unsupported(f"{where}.namespace", "namespaced tools (tool search) are not supported.")
        arguments = item.get("arguments", "")
        if not isinstance(arguments, str):
            raise ProtocolError(f"{where}.arguments", "arguments must be a JSON string.")
        call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": arguments}}
        self._open_assistant().setdefault("tool_calls", []).append(call)

    def _open_assistant(self) -> dict:
        if self._assistant is None:
            self._assistant = {"role": "assistant", "content": None}
            self._assistant_parts = []
            self.messages.append(self._assistant)
        return self._assistant


def _content_parts(content: object, where: str, role: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ProtocolError(where, "content must be a string or an array of content parts.")
    parts = []
    for position, part in enumerate(content):
        here = f"{where}[{position}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            # An earlier refusal, replayed: the model should see what it said.
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image":
            if role != "user":
                raise Unsupported(here, "images are only supported in user messages on this upstream.")
            parts.append(_image_part(part, here))
        elif kind in ("input_file", "input_audio"):
            raise Unsupported(f"{here}.type", f"{kind} content is not supported on this upstream.")
        else:
            raise ProtocolError(f"{here}.type", f"content part type {kind!r} is not valid here.")
    return parts


def _image_part(part: dict, where: str) -> dict:
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        if part.get("file_id"):
            raise Unsupported(f"{where}.file_id", "images by file_id need the Files API, which is not supported.")
        raise ProtocolError(f"{where}.image_url", "an input_image needs an image_url.")
    image = {"url": url}
    if part.get("detail") is not None:
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _collapse(parts: list[dict]) -> object:
    """One text part is sent as a plain string: every chat server accepts that."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _tool_message(item: dict, where: str) -> dict:
    if not isinstance(item.get("call_id"), str) or not item["call_id"]:
        raise ProtocolError(f"{where}.call_id", "a function_call_output item needs call_id.")
    output = item.get("output")
    if isinstance(output, list):
        texts = []
        for position, part in enumerate(output):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "input_text" or not isinstance(part.get("text"), str):
                raise Unsupported(
                    f"{where}.output[{position}]",
                    f"function_call_output content {kind!r} is not supported: chat tool results are text only.",
                )
            texts.append({"type": "text", "text": part["text"]})
        output = _collapse(texts)
    elif not isinstance(output, str):
        raise ProtocolError(f"{where}.output", "output must be a string or an array of content parts.")
    return {"role": "tool", "tool_call_id": item["call_id"], "content": output}


# --- response -----------------------------------------------------------------------------------

_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _skeleton(request: dict, response_id: str, created_at: float, model: str | None) -> dict:
    """The Response object's fields that echo the request, as OpenAI's own responses do."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "max_tool_calls": request.get("max_tool_calls"),
        "metadata": request.get("metadata") if isinstance(request.get("metadata"), dict) else {},
        "model": model or request.get("model") or "",
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
        "previous_response_id": None,
        "reasoning": request.get("reasoning") if isinstance(request.get("reasoning"), dict) else None,
        "service_tier": None,
        "store": False,
        "temperature": request.get("temperature"),
        "text": request.get("text") if isinstance(request.get("text"), dict) else {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice") if request.get("tool_choice") is not None else "auto",
        "tools": [_echo_tool(tool) for tool in request.get("tools") or [] if isinstance(tool, dict)],
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "usage": None,
        "user": request.get("user"),
    }


def _echo_tool(tool: dict) -> dict:
    return {
        "type": tool.get("type"),
        "name": tool.get("name"),
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _refusal_part(text: str) -> dict:
    return {"type": "refusal", "refusal": text}


def _message_item(item_id: str, parts: list[dict], status: str) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": parts}


def _reasoning_item(item_id: str, text: str | None, status: str) -> dict:
    summary = [] if text is None else [{"type": "summary_text", "text": text}]
    return {"id": item_id, "type": "reasoning", "summary": summary, "status": status}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _finished(response: dict, *, finish_reason: str | None, error: str | None, usage: dict | None) -> dict:
    """Set the terminal status, error and usage on a Response from the chat finish."""
    if error is not None or finish_reason == "error":
        response["status"] = "failed"
        response["error"] = {
            "code": "server_error",
            "message": error or "The upstream failed while generating the response.",
        }
    elif finish_reason in _INCOMPLETE:
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": _INCOMPLETE[finish_reason]}
    else:
        response["status"] = "completed"
        response["completed_at"] = int(time.time())
    usage_obj = from_chat(usage)
    response["usage"] = responses_usage(usage_obj) if usage_obj is not None else None
    return response


def response_from_chat(
    completion: dict, *, request: dict, response_id: str | None = None, created_at: float | None = None
) -> dict:
    """A whole ``chat.completion`` → a ``Response`` (output: reasoning, message, function calls)."""
    view = read_completion(completion)
    response = _skeleton(request, response_id or new_id("resp"), created_at or int(time.time()), view.model)
    status = "incomplete" if view.finish_reason in _INCOMPLETE else "completed"
    output = response["output"]
    reasoning = text_of(view.pieces, "reasoning")
    if reasoning:
        output.append(_reasoning_item(new_id("rs"), reasoning, status))
    parts = []
    if text_of(view.pieces, "text"):
        parts.append(_text_part(text_of(view.pieces, "text")))
    if text_of(view.pieces, "refusal"):
        parts.append(_refusal_part(text_of(view.pieces, "refusal")))
    if parts:
        output.append(_message_item(new_id("msg"), parts, status))
    for call in tool_calls(view.pieces):
        output.append(
            _call_item(new_id("fc"), call["call_id"] or new_id("call"), call["name"] or "", call["arguments"], status)
        )
    error = view.error["message"] if view.error else None
    return _finished(response, finish_reason=view.finish_reason, error=error, usage=view.usage)


class ResponseStream(StreamTranslator):
    """Chat-completion chunks in, Responses stream events out (see ``StreamTranslator``).

    Opens with ``response.created`` and ``response.in_progress``; ends with
    ``response.completed`` (or ``.incomplete`` when the upstream hit its length limit or a
    content filter) carrying the whole Response and its usage, or ``response.failed``."""

    def __init__(self, *, request: dict, response_id: str | None = None, created_at: float | None = None) -> None:
        super().__init__()
        self.request = request
        self.response = _skeleton(request, response_id or new_id("resp"), created_at or int(time.time()), None)
        self._sequence = 0

    # -- the protocol's beginning and ends ----------------------------------------------------

    def _opening(self) -> list[dict]:
        snapshot = copy.deepcopy(self.response)
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=copy.deepcopy(snapshot)),
        ]

    def _closing(self) -> list[dict]:
        events = self._close("incomplete" if self.finish_reason in _INCOMPLETE else "completed")
        self.response["model"] = self.upstream_model or self.response["model"]
        _finished(self.response, finish_reason=self.finish_reason, error=None, usage=self.usage)
        return [*events, self._event(f"response.{self.response['status']}", response=self.response)]

    def _failing(self, message: str, kind: str | None) -> list[dict]:
        current, self._open = self._open, None
        if current is not None and current["kind"] == "call" and not current["announced"]:
            self.response["output"].pop()  # never shown to the client
        elif current is not None:  # what was streamed stays in the output, marked unfinished
            self.response["output"][current["index"]] = self._item_now(current, "incomplete")
        self.response["model"] = self.upstream_model or self.response["model"]
        _finished(self.response, finish_reason=self.finish_reason, error=message, usage=self.usage)
        self.response["error"]["code"] = kind or "server_error"
        return [self._event("response.failed", response=self.response)]

    def _event(self, kind: str, **fields: object) -> dict:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    # -- items --------------------------------------------------------------------------------

    def _content(self, piece: Piece) -> list[dict]:
        events: list[dict] = []
        if piece.kind == "reasoning":
            if self._open is None or self._open["kind"] != "reasoning":
                events += self._close()
                events += self._open_item("reasoning", text="")
            self._current["text"] += piece.text
            return [*events, self._reasoning_event("response.reasoning_summary_text.delta", delta=piece.text)]
        # text or refusal: a content part of the open message
        if self._open is None or self._open["kind"] != "message":
            events += self._close()
            events += self._open_item("message", parts=[])
        events += self._part(piece.kind)
        self._current["parts"][-1]["text"] += piece.text
        kind = "response.output_text.delta" if piece.kind == "text" else "response.refusal.delta"
        extra: dict[str, object] = {"logprobs": []} if piece.kind == "text" else {}
        return [*events, self._content_event(kind, delta=piece.text, **extra)]

    def _open_item(self, kind: str, **state: object) -> list[dict]:
        index = len(self.response["output"])
        self._open = {"kind": kind, "index": index, "id": new_id("msg" if kind == "message" else "rs"), **state}
        self.response["output"].append(None)
        if kind == "message":
            item = _message_item(self._open["id"], [], "in_progress")
            return [self._event("response.output_item.added", output_index=index, item=item)]
        item = _reasoning_item(self._open["id"], None, "in_progress")
        return [
            self._event("response.output_item.added", output_index=index, item=item),
            self._reasoning_event("response.reasoning_summary_part.added", part={"type": "summary_text", "text": ""}),
        ]

    def _new_call(self) -> dict:
        self.response["output"].append(None)
        return {"index": len(self.response["output"]) - 1, "id": new_id("fc"), "announced": False}

    def _call_fragment(self, call: dict, fragment: str) -> list[dict]:
        if not call["announced"]:
            return self._announce(call) if call["name"] else []
        return [self._call_event("response.function_call_arguments.delta", delta=fragment)] if fragment else []

    def _announce(self, call: dict) -> list[dict]:
        """Add a function_call item: once its name is known (or at its end if it never came);
        the arguments that arrived before go out as one delta."""
        call["announced"] = True
        call["call_id"] = call["call_id"] or new_id("call")
        item = _call_item(call["id"], call["call_id"], call["name"] or "", "", "in_progress")
        events = [self._event("response.output_item.added", output_index=call["index"], item=item)]
        if call["text"]:
            events.append(self._call_event("response.function_call_arguments.delta", delta=call["text"]))
        return events

    def _part(self, kind: str) -> list[dict]:
        parts = self._current["parts"]
        if parts and parts[-1]["kind"] == kind:
            return []
        events = self._close_part() if parts else []
        parts.append({"kind": kind, "text": ""})
        part = _text_part("") if kind == "text" else _refusal_part("")
        return [*events, self._content_event("response.content_part.added", part=part)]

    def _close_part(self) -> list[dict]:
        last = self._current["parts"][-1]
        if last["kind"] == "text":
            return [
                self._content_event("response.output_text.done", text=last["text"], logprobs=[]),
                self._content_event("response.content_part.done", part=_text_part(last["text"])),
            ]
        return [
            self._content_event("response.refusal.done", refusal=last["text"]),
            self._content_event("response.content_part.done", part=_refusal_part(last["text"])),
        ]

    def _close(self, status: str = "completed") -> list[dict]:
        """Finish the open item: its ``.done`` events, then ``response.output_item.done``."""
        current = self._open
        if current is None:
            return []
        events: list[dict] = []
        if current["kind"] == "message" and current["parts"]:
            events += self._close_part()
        elif current["kind"] == "reasoning":
            text = current["text"]
            events.append(self._reasoning_event("response.reasoning_summary_text.done", text=text))
            part = {"type": "summary_text", "text": text}
            events.append(self._reasoning_event("response.reasoning_summary_part.done", part=part))
        elif current["kind"] == "call":
            self._closed_calls.add(current["key"])
            if not current["announced"]:
                events += self._announce(current)
            name, arguments = current["name"] or "", current["text"]
            events.append(self._call_event("response.function_call_arguments.done", name=name, arguments=arguments))
        item = self._item_now(current, status)
        self.response["output"][current["index"]] = item
        self._open = None
        return [*events, self._event("response.output_item.done", output_index=current["index"], item=item)]

    def _item_now(self, current: dict, status: str) -> dict:
        if current["kind"] == "message":
            parts = [
                _text_part(p["text"]) if p["kind"] == "text" else _refusal_part(p["text"]) for p in current["parts"]
            ]
            return _message_item(current["id"], parts, status)
        if current["kind"] == "reasoning":
            return _reasoning_item(current["id"], current["text"], status)
        return _call_item(current["id"], current["call_id"], current["name"] or "", current["text"], status)

    def _content_event(self, kind: str, **fields: object) -> dict:
        current = self._current
        return self._event(
            kind,
            item_id=current["id"],
            output_index=current["index"],
            content_index=len(current["parts"]) - 1,
            **fields,
        )

    def _reasoning_event(self, kind: str, **fields: object) -> dict:
        current = self._current
        return self._event(kind, item_id=current["id"], output_index=current["index"], summary_index=0, **fields)

    def _call_event(self, kind: str, **fields: object) -> dict:
        current = self._current
        return self._event(kind, item_id=current["id"], output_index=current["index"], **fields)
