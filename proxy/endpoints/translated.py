"""The endpoints whose protocol an upstream may speak itself or not: the Responses API
(``responses.py``) and Anthropic Messages (``anthropic.py``).

Each request takes one of two paths, decided by ``upstream.speaks(protocol)`` (and the demo
model, which speaks only chat completions):

* **native** — the body goes to the upstream's own endpoint with the gateway's changes only (the
  output cap the hold was taken for, the pseudonymous user, ``store: false``), and the answer is
  relayed as it comes, metered from the protocol's own usage (``relay.NativeStreamRelay``);
* **translated** — ``core.protocols`` turns the body into a chat completion, and the chat answer
  back into the protocol's (``relay.TranslatedStreamRelay``); it is metered as chat is.

Either way the request is admitted, held, settled and labelled exactly like a chat completion;
only the wire format differs. A body the translation cannot carry is refused with a 400 naming
the parameter (``core.protocols.Unsupported``) before anything is held.
"""

from __future__ import annotations

import abc

from django.conf import settings

from core.media import media_parts
from core.openai_errors import OpenAIError
from core.protocols import ProtocolError, Unsupported
from core.protocols.chat import StreamTranslator
from core.usage import StreamMeter

from .. import upstream
from ..services import Begun, Funds, Outcome, Refusal
from . import refusals, relay, validation
from .request import Endpoint, Finish, ProxyRequest
from .validation import Invalid, Parsed


def protocol_refusal(problem: ProtocolError) -> OpenAIError:
    """The 400 for a body the protocol's rules (or its translation) reject."""
    code = "unsupported_parameter" if isinstance(problem, Unsupported) else "invalid_request"
    return Refusal(400, problem.message, code=code, param=problem.param)


class TranslatableEndpoint(Endpoint):
    """An endpoint served natively or through chat completions. Subclasses set ``protocol``
    (what ``upstream.speaks`` is asked), ``native_path`` and ``cap`` (the body's output-cap
    field) and write the protocol's half below."""

    protocol = ""
    native_path = ""
    cap = ""

    # -- the protocol's half -----------------------------------------------------------------------

    def check(self, payload: dict) -> None:
        """Rules that hold on both paths; raises ``ProtocolError``."""

    @abc.abstractmethod
    def to_chat(self, payload: dict) -> dict:
        """The chat-completions request; raises ``ProtocolError`` for what it cannot carry."""

    @abc.abstractmethod
    def answer_from_chat(self, completion: dict, payload: dict) -> tuple[int, bytes]:
        """A whole chat completion as the protocol's answer: (HTTP status, JSON body)."""

    @abc.abstractmethod
    def translator(self, payload: dict) -> StreamTranslator:
        """A chat-completions stream turned into the protocol's events, for this request."""

    @abc.abstractmethod
    def native_body(self, payload: dict, *, user_id: int, max_output: int) -> dict:
        """The body sent to an upstream that speaks the protocol itself (its output cap set)."""

    @abc.abstractmethod
    def native_meter(self) -> StreamMeter:
        """What meters the protocol's own stream."""

    @abc.abstractmethod
    def native_stream(self) -> relay.NativeStreamRelay:
        """The relay of the protocol's own stream."""

    # -- the lifecycle's half ----------------------------------------------------------------------

    def parse(self, body: bytes) -> Parsed:
        payload = validation.json_object(body)
        model = payload.get("model")
        if not validation.model_id(model):
            raise Invalid(validation.invalid("`model` must be a model id.", "model"))
        try:
            if "stream" in payload and not isinstance(payload["stream"], bool):
                raise ProtocolError("stream", "stream must be a boolean.")
            cap = payload.get(self.cap)
            if cap is not None and not validation.positive_int(cap, validation.MAX_OUTPUT_TOKENS):
                most = validation.MAX_OUTPUT_TOKENS
                raise ProtocolError(self.cap, f"{self.cap} must be a positive integer no larger than {most}.")
            self.check(payload)
            if not upstream.speaks(self.protocol):
                self.to_chat(payload)  # refused now, before anything is held
        except ProtocolError as problem:
            raise Invalid(protocol_refusal(problem), model) from None
        return Parsed(
            payload=payload,
            model=model,
            stream=payload.get("stream") is True,
            requested_output=cap,
            prompt_chars=len(body),
            media=media_parts(payload),
        )

    async def relay(self, request: ProxyRequest, begun: Begun, parsed: Parsed, outcome: Outcome) -> Finish:
        payload, user_id, max_output = parsed.payload, begun.meta.user.pk, begun.max_output
        # This attempt's upstream decides (a failover may land on one of another kind).
        if upstream.speaks(self.protocol, request.upstream) and not request.route.is_demo:
            body = self.native_body(payload, user_id=user_id, max_output=max_output)
            if not parsed.stream:
                meter = self.native_meter()
                return await relay.relay_whole(request, begun, body, outcome, self.native_path, meter=meter)
            return await relay.relay_stream(request, begun, body, outcome, self.native_stream(), self.native_path)
        try:
            chat = self.to_chat(payload)
        except ProtocolError as problem:  # the demo model, behind an upstream that speaks the protocol
            return request.refused(outcome, protocol_refusal(problem))
        body = upstream.chat_body(
            chat, user_id=user_id, stream=parsed.stream, max_output=max_output, target=request.upstream
        )
        if not parsed.stream:

            def answer(raw: bytes, completion: object, charge: int) -> tuple[int, bytes]:
                return self.answer_from_chat(completion, payload)

            return await relay.relay_whole(request, begun, body, outcome, "chat/completions", answer=answer)
        stream = relay.TranslatedStreamRelay(self.translator(payload))
        return await relay.relay_stream(request, begun, body, outcome, stream, "chat/completions")

    async def insufficient_funds(self, request: ProxyRequest, funds: Funds, parsed: Parsed) -> None:
        """The 402, or in ``assistant_message`` mode the protocol's own answer (streamed or not)
        saying how to top up: the chat refusal, translated."""
        if settings.REFUSAL_MODE != "assistant_message":
            return await super().insufficient_funds(request, funds, parsed)
        exchange, request_id, payload = request.exchange, request.request_id, parsed.payload
        text = refusals.assistant_message_text(funds)
        blocked = [("x-tokentill-blocked", "insufficient_funds")]
        if not parsed.stream:
            completion = refusals.assistant_completion(request_id=request_id, model=parsed.model, text=text)
            _, content = self.answer_from_chat(completion, payload)
            return await exchange.send_whole(200, content, [("content-type", "application/json"), *blocked])
        stream = relay.TranslatedStreamRelay(self.translator(payload))
        body = stream.feed(
            refusals.assistant_stream(request_id=request_id, model=parsed.model, text=text, with_usage=True)
        )
        body += stream.tail(request_id=request_id, charge=0, balance=funds.balance, failure=None)
        await exchange.start(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache"), *blocked])
        await exchange.send_body(body)
