"""Reading the chat-completions side of a translation: what a chunk or a completion says.

Servers put the same things in different places, and both translators must read them alike:

* reasoning text is ``reasoning`` (OpenRouter) or ``reasoning_content`` (vLLM, DeepSeek);
* a tool call's first delta names it (``id``, ``function.name``), later ones carry argument
  fragments under the same ``index``; some servers send a whole call in one delta, several
  calls in one chunk, or omit ``index`` (then ``id`` tells the calls apart);
* a mid-stream failure is an ``error`` object on the chunk (OpenRouter, vLLM) or on the choice,
  with ``finish_reason: "error"`` (OpenRouter);
* usage arrives on its own final chunk (``choices: []``) or, on some servers, on any chunk.

Only choice 0 is read: the translated requests never ask for ``n`` > 1.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from . import ProtocolError


def new_id(prefix: str) -> str:
    """An id in the style the protocol uses (``resp_…``, ``msg_…``, ``fc_…``, ``toolu_…``)."""
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Piece:
    """One ordered piece of model output: ``reasoning``, ``text`` or ``refusal`` text, or a
    ``tool`` call fragment. ``key`` tells calls apart (the delta's ``index``, else its ``id``);
    None means "the call being streamed" in a stream, "a call of its own" in a completion.
    ``call_id`` and ``name`` are set only on the fragment that gives them."""

    kind: str
    text: str = ""
    key: object = None
    call_id: str | None = None
    name: str | None = None


@dataclass
class View:
    """What one chunk (or a whole completion) says."""

    pieces: list[Piece] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None  # vLLM names the stop string that ended the output
    usage: dict | None = None
    error: dict | None = None  # {"message": str, "code": …}
    model: str | None = None
    id: str | None = None


def _error(value: object) -> dict | None:
    if not value:
        return None
    if isinstance(value, dict):
        message = value.get("message")
        return {"message": str(message or "upstream error")[:500], "code": value.get("code")}
    return {"message": str(value)[:500], "code": None}


def _reasoning(part: dict) -> str:
    for name in ("reasoning", "reasoning_content"):
        value = part.get(name)
        if isinstance(value, str):
            return value
    return ""


def _pieces(part: dict) -> list[Piece]:
    pieces: list[Piece] = []
    reasoning = _reasoning(part)
    if reasoning:
        pieces.append(Piece("reasoning", reasoning))
    content = part.get("content")
    if isinstance(content, list):  # a few servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if isinstance(content, str) and content:
        pieces.append(Piece("text", content))
    refusal = part.get("refusal")
    if isinstance(refusal, str) and refusal:
        pieces.append(Piece("refusal", refusal))
    calls = part.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
        index = call.get("index")
        key = index if isinstance(index, int) and not isinstance(index, bool) else call_id
        name = function.get("name") if isinstance(function.get("name"), str) and function.get("name") else None
        arguments = function.get("arguments")
        pieces.append(
            Piece("tool", arguments if isinstance(arguments, str) else "", key=key, call_id=call_id, name=name)
        )
    return pieces


def _read(obj: object, part_name: str) -> View:
    view = View()
    if not isinstance(obj, dict):
        return view
    view.id = obj.get("id") if isinstance(obj.get("id"), str) else None
    view.model = obj.get("model") if isinstance(obj.get("model"), str) and obj.get("model") else None
    view.usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
    view.error = _error(obj.get("error"))
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        part = choice.get(part_name)
        if isinstance(part, dict):
            view.pieces += _pieces(part)
        if isinstance(choice.get("finish_reason"), str):
            view.finish_reason = choice["finish_reason"]
        if isinstance(choice.get("stop_reason"), str):
            view.stop_sequence = choice["stop_reason"]
        view.error = view.error or _error(choice.get("error"))
    if view.error and view.finish_reason is None:
        view.finish_reason = "error"
    return view


def read_chunk(chunk: object) -> View:
    """A ``chat.completion.chunk`` (its ``delta``s)."""
    return _read(chunk, "delta")


def read_completion(completion: object) -> View:
    """A whole ``chat.completion`` (its ``message``), in the same pieces a stream would give."""
    return _read(completion, "message")


def tool_calls(pieces: list[Piece]) -> list[dict]:
    """A completion's tool-call pieces joined per call, in order:
    ``[{"key", "call_id", "name", "arguments"}]``."""
    calls: dict[object, dict] = {}
    for position, piece in enumerate(pieces):
        if piece.kind != "tool":
            continue
        key = piece.key if piece.key is not None else ("position", position)
        call = calls.setdefault(key, {"key": key, "call_id": None, "name": None, "arguments": ""})
        call["call_id"] = call["call_id"] or piece.call_id
        call["name"] = call["name"] or piece.name
        call["arguments"] += piece.text
    return list(calls.values())


def text_of(pieces: list[Piece], kind: str) -> str:
    return "".join(piece.text for piece in pieces if piece.kind == kind)


class StreamTranslator(ABC):
    """What translating a chat stream into either protocol's events has in common.

    ``feed(chunk)`` → the events the chunk produces (the protocol's opening events first, once);
    ``finish()`` at the end of the upstream stream → the closing events, or a failure if the
    upstream never said it had finished; ``fail(message)`` → the protocol's failure ending. After
    the end every call returns nothing. An ``error`` on a chunk fails the stream by itself.

    Output is streamed one item (block) at a time, each closed before the next opens. A tool
    call's fragments are told apart by ``Piece.key``; a fragment with no key belongs to the call
    being streamed; a fragment for a call already closed means the upstream interleaved calls,
    which no protocol here can express, so the stream fails.

    Subclasses write the protocol: ``_opening``, ``_content(piece)`` (text, refusal, reasoning),
    ``_new_call(key)`` and ``_call_fragment(call, piece)``, ``_close()``, ``_closing()`` and
    ``_failing(message)``."""

    def __init__(self) -> None:
        self.usage: dict | None = None  # the chat usage, once reported
        self.upstream_model: str | None = None  # the model that answered, as the upstream names it
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.done = False
        self._started = False
        self._open: dict | None = None  # the item being streamed; tool calls have kind "call"
        self._closed_calls: set[object] = set()

    @property
    def _current(self) -> dict:
        """The item being streamed, for the steps that run only while one is open."""
        if self._open is None:
            raise RuntimeError("no output item is open")
        return self._open

    def start(self) -> list[dict]:
        if self._started:
            return []
        self._started = True
        return self._opening()

    def feed(self, chunk: object) -> list[dict]:
        if self.done:
            return []
        events = self.start()
        view = read_chunk(chunk)
        self.upstream_model = view.model or self.upstream_model
        if view.usage is not None:
            self.usage = view.usage
        try:
            for piece in view.pieces:
                events += self._tool(piece) if piece.kind == "tool" else self._content(piece)
        except ProtocolError as broken:
            return events + self.fail(broken.message)
        if view.finish_reason:
            self.finish_reason, self.stop_sequence = view.finish_reason, view.stop_sequence
        if view.error:
            events += self.fail(view.error["message"])
        return events

    def finish(self) -> list[dict]:
        if self.done:
            return []
        events = self.start()
        if self.finish_reason in (None, "error"):
            return events + self.fail("The upstream stream ended before the answer was complete.")
        self.done = True
        return events + self._closing()

    def fail(self, message: str, kind: str | None = None) -> list[dict]:
        """End the stream as failed. ``kind`` is the protocol's name for the failure (Anthropic's
        ``error.type``, the Responses ``error.code``); None means its generic server error."""
        if self.done:
            return []
        self.done = True
        return self.start() + self._failing(message, kind)

    def _tool(self, piece: Piece) -> list[dict]:
        current = self._open if self._open is not None and self._open["kind"] == "call" else None
        key = piece.key if piece.key is not None else (current["key"] if current else None)
        events: list[dict] = []
        if current is None or key != current["key"]:
            if key in self._closed_calls:
                raise ProtocolError(None, "The upstream interleaved the arguments of several tool calls.")
            events = self._close()
            current = self._open = {
                "kind": "call",
                "key": key,
                "call_id": None,
                "name": None,
                "text": "",
                **self._new_call(),
            }
        current["name"] = current["name"] or piece.name
        current["call_id"] = current["call_id"] or piece.call_id
        current["text"] += piece.text
        return events + self._call_fragment(current, piece.text)

    @abstractmethod
    def _opening(self) -> list[dict]:
        """The events that open the stream."""

    @abstractmethod
    def _content(self, piece: Piece) -> list[dict]:
        """The events for a piece of text, refusal or reasoning."""

    @abstractmethod
    def _new_call(self) -> dict:
        """Protocol state for a tool call that starts streaming (kept in the call's dict)."""

    @abstractmethod
    def _call_fragment(self, call: dict, fragment: str) -> list[dict]:
        """The events for a fragment of a call's arguments (already added to ``call["text"]``)."""

    @abstractmethod
    def _close(self) -> list[dict]:
        """Close the open item, if there is one: its closing events."""

    @abstractmethod
    def _closing(self) -> list[dict]:
        """The events that end a finished stream, the open item included."""

    @abstractmethod
    def _failing(self, message: str, kind: str | None) -> list[dict]:
        """The events that end a failed stream."""
