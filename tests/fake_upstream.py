"""A fake OpenAI-compatible / OpenRouter upstream: a real HTTP server on 127.0.0.1, in a thread.

Start as many as a test needs (``fake_upstream_server`` is the default upstream's,
``second_upstream_server`` another). Each test scripts the replies it needs, per route (``chat``,
``embeddings``, ``generation``, ``models``, and the native ``responses``, ``messages`` and
``count_tokens``), in order; every
request the proxy makes is recorded (path, headers, JSON body) so tests can assert what reached
the upstream — and what did not. Streamed replies are written chunk by chunk with real pauses,
and a write failing because the proxy closed the connection is timed, which is how disconnect
tests prove the upstream request was cancelled.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Reply:
    status: int = 200
    body: dict | bytes | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds before the status line


GATE_TIMEOUT = 10  # seconds a stream waits at a gate the test never opened (then it goes on)


@dataclass
class StreamReply:
    """``items``: bytes are written as one chunk; a float pauses that many seconds; a
    ``threading.Event`` is a gate: the stream waits there until the test sets it."""

    items: Iterable[bytes | float]
    status: int = 200
    headers: dict = field(default_factory=dict)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    json: object


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def chunk(content=None, *, finish=None, role=None, model="openai/gpt-4o-mini", id="gen-fake-1", **extra) -> dict:
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": 1761300000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def usage(prompt, completion, *, cost=None, cached=0, reasoning=0, cache_write=0) -> dict:
    result = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": cache_write},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    if cost is not None:
        result["cost"] = cost
    return result


def usage_chunk(u: dict, *, model="openai/gpt-4o-mini", id="gen-fake-1") -> bytes:
    """The usage-only chunk with the cost written verbatim (a JSON number, never a float)."""
    cost = u.pop("cost", None)
    body = json.dumps({"id": id, "object": "chat.completion.chunk", "model": model, "choices": [], "usage": u})
    if cost is not None:
        body = body[:-2] + f', "cost": {cost}}}}}'
    return sse(body.encode())


def completion(content="Pong.", *, u=None, model="openai/gpt-4o-mini", id="gen-fake-1", finish="stop") -> bytes:
    u = dict(u or usage(10, 2))
    cost = u.pop("cost", None)
    body = json.dumps(
        {
            "id": id,
            "object": "chat.completion",
            "created": 1761300000,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": u,
        }
    )
    if cost is not None:
        body = body[:-2] + f', "cost": {cost}}}}}'
    return body.encode()


def stream_of(*words, u=None, model="openai/gpt-4o-mini", id="gen-fake-1", comments=False) -> list[bytes]:
    items = [b": OPENROUTER PROCESSING\n\n"] if comments else []
    items.append(sse(chunk("", role="assistant", model=model, id=id)))
    items += [sse(chunk(w, model=model, id=id)) for w in words]
    items.append(sse(chunk(None, finish="stop", model=model, id=id)))
    if u is not None:
        items.append(usage_chunk(dict(u), model=model, id=id))
    items.append(DONE)
    return items


# --- native Responses API and Anthropic Messages replies -----------------------------------------
# Written by hand from the SDKs' types (docs/protocols/), never by core.protocols: a fake that
# used the translators under test could not catch their mistakes.

ANTHROPIC_MODEL = "anthropic/claude-sonnet-4.5"
_COST = re.compile(r'"__cost:([^"]*)__"')


def _dumps(obj) -> str:
    """JSON with every ``cost`` written verbatim (a JSON number, never a float)."""
    return _COST.sub(r"\1", json.dumps(obj))


def _cost(value) -> str:
    return f"__cost:{value}__"


def typed_sse(event: dict) -> bytes:
    """One typed event as both protocols frame it: ``event: <type>`` then ``data: <json>``."""
    return f"event: {event['type']}\ndata: {_dumps(event)}\n\n".encode()


def responses_usage(input_tokens, output_tokens, *, cached=0, reasoning=0, cache_write=0, cost=None) -> dict:
    """A Responses API ``usage``: ``input_tokens`` *include* the cached and cache-written ones."""
    result = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": cache_write},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }
    if cost is not None:  # OpenRouter adds its charge, as on chat completions
        result["cost"] = _cost(cost)
    return result


def _response(id, model, status, output, usage) -> dict:
    return {
        "id": id,
        "object": "response",
        "created_at": 1761300000,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": None,
        "metadata": {},
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "store": False,
        "temperature": None,
        "tool_choice": "auto",
        "tools": [],
        "top_p": None,
        "usage": usage,
    }


def _output_message(text, id="msg_fake_1", status="completed") -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def _function_call(call, position, status="completed") -> dict:
    """``call``: (name, arguments JSON string[, call_id])."""
    name, arguments, *rest = call
    call_id = rest[0] if rest else f"call_fake_{position}"
    return {
        "id": f"fc_fake_{position}",
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response_object(
    text="Pong.", *, u=None, model="openai/gpt-4o-mini", id="resp_fake_1", status="completed", calls=()
) -> bytes:
    """A whole ``Response`` (POST /responses, not streamed): one message, then ``calls``."""
    output = [_output_message(text)] if text else []
    output += [_function_call(call, n) for n, call in enumerate(calls)]
    return _dumps(_response(id, model, status, output, u or responses_usage(10, 2))).encode()


def responses_stream_of(
    *words, u=None, model="openai/gpt-4o-mini", id="resp_fake_1", status="completed", calls=()
) -> list[bytes]:
    """A native Responses stream: created, in_progress, one message streamed word by word, the
    ``calls`` (name, arguments[, call_id]) with their arguments in one delta each, then
    ``response.<status>`` carrying ``u``."""
    seq = iter(range(10_000))
    events = [
        {
            "type": "response.created",
            "sequence_number": next(seq),
            "response": _response(id, model, "in_progress", [], None),
        },
        {
            "type": "response.in_progress",
            "sequence_number": next(seq),
            "response": _response(id, model, "in_progress", [], None),
        },
    ]
    output = []
    if words:
        text = "".join(words)
        item_id, where = "msg_fake_1", {"item_id": "msg_fake_1", "output_index": 0, "content_index": 0}
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events.append(
            {
                "type": "response.output_item.added",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": {**_output_message("", item_id, "in_progress"), "content": []},
            }
        )
        events.append({"type": "response.content_part.added", "sequence_number": next(seq), **where, "part": empty})
        for word in words:
            events.append(
                {
                    "type": "response.output_text.delta",
                    "sequence_number": next(seq),
                    **where,
                    "delta": word,
                    "logprobs": [],
                }
            )
        events.append(
            {"type": "response.output_text.done", "sequence_number": next(seq), **where, "text": text, "logprobs": []}
        )
        done_part = {**empty, "text": text}
        events.append({"type": "response.content_part.done", "sequence_number": next(seq), **where, "part": done_part})
        output.append(_output_message(text, item_id))
        events.append(
            {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0, "item": output[-1]}
        )
    for n, call in enumerate(calls):
        index, item = len(output), _function_call(call, n)
        where = {"item_id": item["id"], "output_index": index}
        added = {**item, "arguments": "", "status": "in_progress"}
        events.append(
            {"type": "response.output_item.added", "sequence_number": next(seq), "output_index": index, "item": added}
        )
        events.append(
            {
                "type": "response.function_call_arguments.delta",
                "sequence_number": next(seq),
                **where,
                "delta": item["arguments"],
            }
        )
        events.append(
            {
                "type": "response.function_call_arguments.done",
                "sequence_number": next(seq),
                **where,
                "name": item["name"],
                "arguments": item["arguments"],
            }
        )
        output.append(item)
        events.append(
            {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": index, "item": item}
        )
    final = _response(id, model, status, output, u or responses_usage(10, len(words)))
    events.append({"type": f"response.{status}", "sequence_number": next(seq), "response": final})
    return [typed_sse(event) for event in events]


def messages_usage(input_tokens, output_tokens, *, cache_read=0, cache_creation=0, cost=None) -> dict:
    """An Anthropic ``usage``: ``input_tokens`` *exclude* the cache reads and writes."""
    result = {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens,
    }
    if cost is not None:  # OpenRouter's /messages adds its charge (documented on the whole Message)
        result["cost"] = _cost(cost)
    return result


def _tool_use(call, position) -> dict:
    """``call``: (name, input dict[, id])."""
    name, arguments, *rest = call
    return {"type": "tool_use", "id": rest[0] if rest else f"toolu_fake_{position}", "name": name, "input": arguments}


def message_object(
    text="Pong.", *, u=None, model=ANTHROPIC_MODEL, id="msg_fake_1", stop_reason="end_turn", tool_uses=()
) -> bytes:
    """A whole Anthropic ``Message`` (POST /messages, not streamed): a text block, then ``tool_uses``."""
    content = [{"type": "text", "text": text}] if text else []
    content += [_tool_use(call, n) for n, call in enumerate(tool_uses)]
    message = {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "tool_use" if tool_uses and stop_reason == "end_turn" else stop_reason,
        "stop_sequence": None,
        "usage": u or messages_usage(10, 2),
    }
    return _dumps(message).encode()


def messages_stream_of(
    *words, u=None, model=ANTHROPIC_MODEL, id="msg_fake_1", stop_reason="end_turn", tool_uses=(), ping=True
) -> list[bytes]:
    """A native Anthropic stream: ``message_start`` with the input counts of ``u`` (and 1 output
    token, as Anthropic starts), a ``ping``, a text block streamed word by word, ``tool_uses``
    (name, input[, id]) with their JSON in two fragments each, ``message_delta`` with the stop
    reason and the final ``output_tokens`` (and ``cost`` when ``u`` has one), ``message_stop``."""
    u = dict(u or messages_usage(10, len(words)))
    cost = u.pop("cost", None)
    start_usage = {**u, "output_tokens": 1}
    message = {"id": id, "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": start_usage}  # fmt: skip
    events = [{"type": "message_start", "message": message}]
    if ping:
        events.append({"type": "ping"})
    index = 0
    if words:
        events.append({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        for word in words:
            events.append({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}})
        events.append({"type": "content_block_stop", "index": 0})
        index = 1
    for n, call in enumerate(tool_uses):
        block = _tool_use(call, n)
        raw = json.dumps(block["input"])
        events.append({"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}})
        for fragment in (raw[: len(raw) // 2], raw[len(raw) // 2 :]):
            delta = {"type": "input_json_delta", "partial_json": fragment}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
        index += 1
    final = "tool_use" if tool_uses and stop_reason == "end_turn" else stop_reason
    delta_usage = {"output_tokens": u["output_tokens"]}
    if cost is not None:
        delta_usage["cost"] = cost  # where OpenRouter puts it in a stream is UNCONFIRMED
    events.append(
        {"type": "message_delta", "delta": {"stop_reason": final, "stop_sequence": None}, "usage": delta_usage}
    )
    events.append({"type": "message_stop"})
    return [typed_sse(event) for event in events]


def messages_error_event(error_type="overloaded_error", message="Overloaded") -> bytes:
    """Anthropic's mid-stream failure: an ``error`` event after the 200."""
    return typed_sse({"type": "error", "error": {"type": error_type, "message": message}})


def anthropic_error(status=400, error_type="invalid_request_error", message="bad request") -> Reply:
    """A native Anthropic error reply: ``{"type": "error", "error": {"type", "message"}}``."""
    body = {"type": "error", "error": {"type": error_type, "message": message}, "request_id": "req_fake_1"}
    return Reply(status, body)


def tokens_count(input_tokens=10) -> dict:
    """The body of POST /messages/count_tokens."""
    return {"input_tokens": input_tokens}


ROUTES = {
    "/chat/completions": "chat",
    "/embeddings": "embeddings",
    "/generation": "generation",
    "/models": "models",
    "/responses": "responses",
    "/messages": "messages",
    "/messages/count_tokens": "count_tokens",
}


def serve_tls(server: ThreadingHTTPServer, tls: tuple[str, str] | None) -> str:
    """Make ``server`` answer HTTPS with ``tls`` = (certificate, key) files; its URL scheme."""
    if tls is None:
        return "http"
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return "https"


class FakeUpstream:
    def __init__(self, tls: tuple[str, str] | None = None):
        """``tls``: (certificate, key) files — then it answers HTTPS only."""
        self.replies: dict[str, deque] = defaultdict(deque)
        self.requests: list[Recorded] = []
        self.stream_closed_at: float | None = None
        self.stream_cut = False  # the last stream's client hung up before its end was written
        self.stream_finished = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.scheme = serve_tls(self.server, tls)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/api/v1"

    def reset(self) -> None:
        with self._lock:
            self.replies.clear()
            self.requests.clear()
            self.stream_closed_at = None
            self.stream_cut = False
            self.stream_finished.clear()

    def script(self, route: str, *replies) -> None:
        with self._lock:
            self.replies[route].extend(replies)

    def next_reply(self, route: str):
        with self._lock:
            if self.replies[route]:
                return self.replies[route].popleft()
        return Reply(500, {"error": {"message": f"no scripted reply for {route}", "code": 500}})

    def calls(self, route: str) -> list[Recorded]:
        return [r for r in self.requests if ROUTES.get(r.path.split("?")[0].removeprefix("/api/v1")) == route]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler_for(fake: FakeUpstream):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def _serve(self, method: str):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw
            fake.requests.append(Recorded(method, self.path, {k.lower(): v for k, v in self.headers.items()}, parsed))
            route = ROUTES.get(self.path.split("?")[0].removeprefix("/api/v1"), "unknown")
            reply = fake.next_reply(route)
            if isinstance(reply, StreamReply):
                return self._stream(reply)
            if reply.delay:
                time.sleep(reply.delay)
            body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body or {}).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _stream(self, reply: StreamReply):
            self.send_response(reply.status)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            try:
                for item in reply.items:
                    if isinstance(item, float):
                        time.sleep(item)
                        continue
                    if isinstance(item, threading.Event):  # a gate the test opens
                        item.wait(GATE_TIMEOUT)
                        continue
                    self.wfile.write(f"{len(item):x}\r\n".encode() + item + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                fake.stream_closed_at = time.monotonic()
                fake.stream_cut = True
                self.close_connection = True
            finally:
                fake.stream_finished.set()

        def do_POST(self):
            self._serve("POST")

        def do_GET(self):
            self._serve("GET")

    return Handler


def slow_stream(seconds: float = 10.0, interval: float = 0.05):
    """Words forever (bounded): for disconnect tests. The generator stops once writes fail."""
    yield sse(chunk("", role="assistant"))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        yield interval
        yield sse(chunk("word "))


@pytest.fixture(scope="session")
def fake_upstream_server():
    fake = FakeUpstream()
    yield fake
    fake.close()


@pytest.fixture
def fake_upstream(fake_upstream_server, settings):
    """The fake upstream, emptied, with the proxy pointed at it as an OpenRouter upstream."""
    from proxy.selectors import price_cache_clear

    fake_upstream_server.reset()
    settings.UPSTREAM_BASE_URL = fake_upstream_server.url
    settings.UPSTREAM_API_KEY = "sk-or-v1-server-secret"
    settings.UPSTREAM_KIND = "openrouter"
    settings.PROXY_PRICE_CACHE_SECONDS = 0
    price_cache_clear()
    yield fake_upstream_server
    price_cache_clear()


@pytest.fixture(scope="session")
def second_upstream_server():
    """Another fake upstream, for routing and failover between two (tests/test_upstreams_*.py)."""
    fake = FakeUpstream()
    yield fake
    fake.close()


MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def price(db):
    """The price the proxy tests bill at: $0.15 / $0.60 per million prompt / completion tokens,
    a hold assuming 1,000 output tokens when a request sets no cap."""
    from decimal import Decimal

    from proxy.models import ModelPrice

    return ModelPrice.objects.create(
        model=MODEL, name="GPT-4o mini", prompt=Decimal("0.15"), completion=Decimal("0.60"), default_max_output=1000
    )


@pytest.fixture
def key(alice, price):
    """Alice's API key (default proxy scope, no limits), with ``price`` in place."""
    from accounts.services import api_key_create

    return api_key_create(user=alice, name="laptop")[1]


def self_signed_certificate(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, valid for a day: (certificate path, key path)."""
    import datetime
    import ipaddress
    import os
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(key_path).write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


# --- driving the proxy through its ASGI application ------------------------------------------


@dataclass
class ProxyResponse:
    status: int
    headers: dict
    body: bytes
    chunks: list[bytes]

    def json(self):
        return json.loads(self.body)

    @property
    def error(self) -> dict:
        return self.json()["error"]

    def data_events(self) -> list[str]:
        return [line[6:] for line in self.body.decode().split("\n") if line.startswith("data: ")]

    def events(self) -> list[dict]:
        """The data events of a typed-event stream (Responses API, Anthropic Messages), parsed."""
        return [json.loads(data) for data in self.data_events()]

    def comments(self) -> list[str]:
        return [line for line in self.body.decode().split("\n") if line.startswith(":")]

    def tokentill(self) -> dict:
        (line,) = [c for c in self.comments() if c.startswith(": tokentill ")]
        return json.loads(line.removeprefix(": tokentill "))


def scope_for(path: str, token: str | None, headers: dict | None, body: bytes, method: str = "POST") -> dict:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if token:
        raw.append((b"authorization", f"Bearer {token}".encode()))
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def proxy_call(
    path: str,
    body,
    *,
    token: str | None,
    headers: dict | None = None,
    body_parts: list[bytes] | None = None,
    disconnect_after: int | None = None,
    timeout: float = 10,
    method: str = "POST",
):
    """POST to the live ASGI app, reading the response chunk by chunk.

    ``disconnect_after=n`` sends ``http.disconnect`` after ``n`` body chunks and returns at once
    (with the time of the disconnect in ``headers["_disconnected_at"]``).
    """
    from config.asgi import application

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    parts = body_parts or [raw]
    try:
        return await _proxy_call(application, path, raw, parts, token, headers, disconnect_after, timeout, method)
    finally:
        await close_loop_resources()


async def close_loop_resources() -> None:
    """Each call runs on an event loop of its own: close the hot path's database pool and the
    upstream client with it."""
    from infra import adb
    from proxy import upstream

    await adb.close()
    await upstream.close()


async def _proxy_call(application, path, raw, parts, token, headers, disconnect_after, timeout, method):
    from channels.testing import ApplicationCommunicator

    communicator = ApplicationCommunicator(application, scope_for(path, token, headers, raw, method))
    for index, part in enumerate(parts):
        await communicator.send_input({"type": "http.request", "body": part, "more_body": index < len(parts) - 1})
    start = await communicator.receive_output(timeout)
    assert start["type"] == "http.response.start", start
    response_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    chunks: list[bytes] = []
    while True:
        message = await communicator.receive_output(timeout)
        chunks.append(message.get("body", b""))
        if disconnect_after is not None and len(chunks) >= disconnect_after:
            response_headers["_disconnected_at"] = str(time.monotonic())
            await communicator.send_input({"type": "http.disconnect"})
            await communicator.wait(timeout)
            break
        if not message.get("more_body"):
            break
    await communicator.wait(timeout)
    return ProxyResponse(start["status"], response_headers, b"".join(chunks), chunks)


def run_async(service, **kwargs):
    """Call an async service (``arequest_begin``…) from a sync test, on a loop of its own whose
    hot-path pool is closed afterwards. The test must be ``transaction=True``: the service's
    connections (worker threads, or the async pool) see only committed rows."""
    from asgiref.sync import async_to_sync

    async def run():
        try:
            return await service(**kwargs)
        finally:
            await close_loop_resources()

    return async_to_sync(run)()


def call(path: str, body, **kwargs) -> ProxyResponse:
    from asgiref.sync import async_to_sync

    return async_to_sync(proxy_call)(path, body, **kwargs)
