"""Reading token usage and cost out of upstream responses and stream chunks.

No Django imports. JSON must have been parsed with ``core.money.loads_decimal`` so that
OpenRouter's ``usage.cost`` arrives as an exact ``Decimal``. Servers disagree on *where* usage
goes (a final ``choices: []`` chunk for OpenAI/vLLM/Ollama/OpenRouter, the finish chunk for old
llama.cpp, every chunk for vLLM's continuous mode), so a stream meter simply keeps the last
non-null ``usage`` it sees.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # includes reasoning tokens
    reasoning_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from cache (a subset of prompt_tokens)
    cache_write_tokens: int = 0  # prompt tokens written to cache (a subset of prompt_tokens)
    cost: Decimal | None = None  # USD, only when the upstream reports it (OpenRouter)


def count(value: object) -> int:
    """A token count from parsed JSON (int, or Decimal when parsed that way); junk is 0."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        return 0
    return max(int(value), 0)


def details(usage: dict, name: str) -> dict:
    """A ``*_details`` object of a usage report, or an empty one."""
    value = usage.get(name)
    return value if isinstance(value, dict) else {}


def _amount(value: object) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, (Decimal, int)):
        return None
    value = Decimal(value)
    return value if value.is_finite() and value >= 0 else None


def reported_cost(report: dict, cost_field: str) -> Decimal | None:
    """What a request cost us, from OpenRouter's report of it: a response's ``usage`` (cost in
    ``cost``) or a ``/generation`` record (in ``total_cost``). None when it states no cost.

    With Bring-Your-Own-Key, OpenRouter's figure is only its own fee: the provider bills the
    operator's account ``upstream_inference_cost`` on top (``usage.cost_details`` in a response,
    top level in a generation record), so that is added — a BYOK request billed on the fee alone
    would sell inference at a few percent of its cost.
    """
    cost = _amount(report.get(cost_field))
    if cost is None or report.get("is_byok") is not True:
        return cost
    breakdown = details(report, "cost_details") if cost_field == "cost" else report
    return cost + (_amount(breakdown.get("upstream_inference_cost")) or 0)


def usage_from(value: object) -> Usage | None:
    """A ``usage`` object → ``Usage``; anything that is not one → None."""
    if not isinstance(value, dict):
        return None
    prompt_details = details(value, "prompt_tokens_details")
    completion_details = details(value, "completion_tokens_details")
    return Usage(
        prompt_tokens=count(value.get("prompt_tokens")),
        completion_tokens=count(value.get("completion_tokens")),
        reasoning_tokens=count(completion_details.get("reasoning_tokens")),
        cached_tokens=count(prompt_details.get("cached_tokens")),
        cache_write_tokens=count(prompt_details.get("cache_write_tokens", value.get("cache_write_tokens"))),
        cost=reported_cost(value, "cost"),
    )


def estimate_tokens(text_length: int) -> int:
    """Roughly four characters per token for English text; an estimate, marked as one."""
    return (text_length + 3) // 4


class StreamMeter:
    """Watches a chat completion (chunks or a whole response) for what billing needs."""

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.usage: Usage | None = None
        self.finish_reason = ""
        self.error = ""
        self.output_chars = 0  # content relayed so far, for an estimate when usage never comes

    def observe(self, obj: object) -> None:
        if not isinstance(obj, dict):
            return
        if not self.id and isinstance(obj.get("id"), str):
            self.id = obj["id"]
        if isinstance(obj.get("model"), str) and obj["model"]:
            self.model = obj["model"]
        usage = usage_from(obj.get("usage"))
        if usage is not None:
            self.usage = usage
        error = obj.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else error
            self.error = str(message or "upstream error")[:500]
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._observe_choice(choice)

    def observe_text(self, data: str) -> bool:
        """Meter a chunk from its JSON text without parsing it, when it can only add output
        characters: most of a stream is content chunks, and what they change here is a character
        count (the estimate billed when no usage ever comes), which the text gives as exactly as a
        parse. True if done; False when the chunk must be parsed and ``observe``d instead — the
        first one (its id), and any that may carry something else billing reads: usage, an error,
        a finish reason, another model, or text in a shape other than a ``delta``'s.

        (Keys are matched with their quotes, which a JSON string value cannot hold unescaped: a
        content string that mentions ``"usage"`` does not look like a usage key.)
        """
        if not self.id or any(marker in data for marker in _MUST_PARSE) or '"delta"' not in data:
            return False
        if _FINISHED.search(data) is not None:
            return False
        model = _MODEL.search(data)
        if model is not None and model.group(1) != self.model:
            return False
        chars = 0
        for match in _TEXT.finditer(data):
            value = match.group(1)
            if "\\" in value:
                try:
                    value = json.loads(f'"{value}"')
                except ValueError:  # not JSON after all: left to the parse, which skips it
                    return False
            chars += len(value)
        self.output_chars += chars
        return True

    def _observe_choice(self, choice: dict) -> None:
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])[:40]
        for part in (choice.get("delta"), choice.get("message")):
            if isinstance(part, dict):
                self.output_chars += _text_length(part)


# What ``observe_text`` leaves to a parse, and what it reads itself. ``_TEXT``'s keys are the
# strings ``_text_length`` counts (a tool call's function ``name`` and ``arguments`` included); a
# value's escapes (``\\n``, ``\\u00e9``) count as the one character they stand for.
_MUST_PARSE = ('"usage"', '"error"', '"message"', '"annotations"', '"function_call"')
_FINISHED = re.compile(r'"finish_reason"\s*:(?!\s*null)')
_MODEL = re.compile(r'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')
_TEXT = re.compile(r'"(?:content|reasoning|reasoning_content|refusal|name|arguments)"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _text_length(part: dict) -> int:
    total = 0
    for name in ("content", "reasoning", "reasoning_content", "refusal"):
        value = part.get(name)
        if isinstance(value, str):
            total += len(value)
    calls = part.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                total += sum(len(v) for v in (function.get("name"), function.get("arguments")) if isinstance(v, str))
    return total
