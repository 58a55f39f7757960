"""The wire formats apps speak besides chat completions, and their translation to and from it.

``responses`` (OpenAI Responses API) and ``anthropic`` (Anthropic Messages API) each turn their
request into a chat-completions request, a chat completion into their own response object, and
a stream of chat-completion chunks into their own event stream — so an upstream that speaks only
chat completions can serve either. ``usage`` normalises every protocol's token counts to one
shape, ``sse`` frames events, ``chat`` reads the chat side. The facts these rest on, with their
sources, are in ``docs/protocols/``.

A request the translation cannot carry faithfully is refused with ``Unsupported`` (or
``ProtocolError`` when it is simply malformed), naming the parameter: nothing is dropped on the
floor unless ``docs/protocols/`` says so and why.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """A request this protocol's rules reject; ``param`` is where (a JSON path like
    ``input[2].content[0]``), or None for the body as a whole. Rendered as a 400."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class Unsupported(ProtocolError):
    """Valid in the protocol, but something the gateway cannot do on this path (stored state,
    built-in tools, file inputs…). Also a 400: the client must change the request."""
