"""Building chat-completion chunks for the protocol translators' tests, and reading SDK unions.

Django-free. ``usage`` for a chat ``usage`` object is ``tests.fake_upstream.usage``.
"""

from __future__ import annotations

import typing

from core.protocols.chat import StreamTranslator
from tests.fake_upstream import usage

MODEL = "openai/gpt-4o-mini"


def chat_chunk(delta: dict | None = None, finish: str | None = None, *, choice: dict | None = None, **extra) -> dict:
    """A ``chat.completion.chunk`` with one choice (``delta``, ``finish``, extra ``choice`` keys),
    or with ``choices: []`` when neither is given (the usage chunk: pass ``usage=…``)."""
    choices = (
        []
        if delta is None and finish is None
        else [{"index": 0, "delta": delta or {}, "finish_reason": finish, **(choice or {})}]
    )
    return {"id": "gen-1", "object": "chat.completion.chunk", "model": MODEL, "choices": choices, **extra}


def text_stream(*words: str, finish: str = "stop", u: dict | None = None, **choice) -> list[dict]:
    """The chunks of a streamed text answer: role, one chunk per word, the finish, the usage."""
    return [
        chat_chunk({"role": "assistant", "content": ""}),
        *[chat_chunk({"content": word}) for word in words],
        chat_chunk({}, finish, choice=choice),
        chat_chunk(None, usage=u or usage(10, 5)),
    ]


def tool_delta(index: int, *, id: str | None = None, name: str | None = None, arguments: str | None = None) -> dict:
    """A delta carrying one tool-call fragment, as chat servers stream them."""
    function = {key: value for key, value in (("name", name), ("arguments", arguments)) if value is not None}
    call = {"index": index, "function": function, **({"id": id, "type": "function"} if id else {})}
    return {"tool_calls": [call]}


def translate(stream: StreamTranslator, chunks: list[dict], *, finish: bool = True) -> list[dict]:
    """Feed ``chunks`` to a translator; its events, the ending included when ``finish``."""
    events = []
    for chunk in chunks:
        events += stream.feed(chunk)
    return events + (stream.finish() if finish else [])


def _literals(annotation) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [value for arg in typing.get_args(annotation) for value in _literals(arg)]


def types_in(union) -> list[str]:
    """The ``type`` values of an SDK union of TypedDicts (every input item, tool, block… it knows)."""
    return [
        t for cls in typing.get_args(union) for t in _literals(typing.get_type_hints(cls, include_extras=True)["type"])
    ]
