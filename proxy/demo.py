"""The built-in demo model: canned replies served in-process when no upstream is configured.

It answers exactly like an OpenAI-compatible upstream would (the same SSE chunks, a usage chunk,
``[DONE]``), so the relay, metering and settlement paths it exercises are the real ones and the
whole loop — sign up, trial credit, chat, see the charge — works offline. Usage is counted the
way the proxy estimates tokens, and the reported cost is priced from the model's own rates.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

from core.pricing import Rates, cost_usd
from core.usage import Usage, estimate_tokens

WORD_DELAY = 0.02  # seconds between streamed words: slow enough to look like a model typing


def reply_text(body: dict) -> str:
    question = ""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            question = str(content or "").strip()
            break
    if len(question) > 80:
        question = question[:77] + "..."
    return (
        "Hello from the Tokentill demo model. No real model is connected to this server "
        "(UPSTREAM_API_KEY is not set), so this canned reply stands in for one. "
        f'You said: "{question}". '
        "This reply was metered and charged like a real one: look at your balance and usage to see it."
    )


class DemoResponse:
    status_code = 200

    def __init__(self, body: dict, rates: Rates, *, prompt_chars: int):
        self.headers: dict[str, str] = {}
        self.body = body
        self.text = reply_text(body)
        self.id = f"chatcmpl-demo-{uuid.uuid4().hex[:20]}"
        self.model = str(body.get("model", ""))
        self.created = int(time.time())
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        words = self.text.split(" ")
        if isinstance(cap, int) and cap > 0:
            while len(words) > 1 and estimate_tokens(len(" ".join(words))) > cap:
                words.pop()
        self.words = words
        self.finish_reason = "stop" if len(words) == len(self.text.split(" ")) else "length"
        self.usage = Usage(
            prompt_tokens=estimate_tokens(prompt_chars),
            completion_tokens=estimate_tokens(len(" ".join(words))),
        )
        self.cost = cost_usd(rates, self.usage)

    def _usage_json(self) -> str:
        usage = {
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "total_tokens": self.usage.prompt_tokens + self.usage.completion_tokens,
            "cost": "COST",
        }
        # The cost is an exact decimal; write it as a JSON number without passing through float.
        return json.dumps(usage).replace('"COST"', str(self.cost.quantize(Decimal("1e-12")).normalize()))

    def _chunk(self, delta: dict, finish_reason: str | None) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        yield self._chunk({"role": "assistant", "content": ""}, None)
        for index, word in enumerate(self.words):
            await asyncio.sleep(WORD_DELAY)
            yield self._chunk({"content": word if index == 0 else " " + word}, None)
        yield self._chunk({}, self.finish_reason)
        head = json.dumps(
            {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        )[:-1]
        yield f'data: {head}, "choices": [], "usage": {self._usage_json()}}}\n\n'.encode()
        yield b"data: [DONE]\n\n"

    async def aread(self) -> bytes:
        await asyncio.sleep(WORD_DELAY)
        head = json.dumps(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(self.words)},
                        "finish_reason": self.finish_reason,
                    }
                ],
            }
        )[:-1]
        return f'{head}, "usage": {self._usage_json()}}}'.encode()

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> DemoResponse:
        return self

    async def __aexit__(self, *exc) -> None:
        return None
