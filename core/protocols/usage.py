"""Token usage in every protocol's words, normalised to one shape — and back.

``TokenUsage`` has exactly the token fields of ``core.usage.Usage`` with the same meaning,
so wiring is ``Usage(**dataclasses.asdict(t), cost=reported_cost(raw, "cost"))`` (OpenRouter
adds ``cost``/``is_byok``/``cost_details`` to native ``/responses`` and ``/messages`` usage too).

The protocols disagree about what "input" counts, and money depends on it:

* chat completions: ``prompt_tokens`` *includes* cached reads (``prompt_tokens_details.
  cached_tokens``) and cache writes (``cache_write_tokens``);
* Responses API: ``input_tokens`` includes them the same way (``input_tokens_details``);
* Anthropic: ``input_tokens`` *excludes* them — the total input is ``input_tokens +
  cache_read_input_tokens + cache_creation_input_tokens``.

So an Anthropic report of 10 input, 500 read, 100 written is 610 prompt tokens of which 500
cached and 100 written; reading it as 10 prompt tokens would bill 600 tokens as free.
Output always includes reasoning: ``completion_tokens`` / ``output_tokens``, with reasoning
(``reasoning_tokens``, Anthropic's ``output_tokens_details.thinking_tokens``) a subset of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.usage import count, details


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int = 0  # every input token, cache reads and writes included
    completion_tokens: int = 0  # every output token, reasoning included
    reasoning_tokens: int = 0  # a subset of completion_tokens
    cached_tokens: int = 0  # prompt tokens read from cache (a subset of prompt_tokens)
    cache_write_tokens: int = 0  # prompt tokens written to cache (a subset of prompt_tokens)


def from_chat(usage: object) -> TokenUsage | None:
    """A chat-completions ``usage`` object; None when there is none."""
    if not isinstance(usage, dict):
        return None
    prompt = details(usage, "prompt_tokens_details")
    return TokenUsage(
        prompt_tokens=count(usage.get("prompt_tokens")),
        completion_tokens=count(usage.get("completion_tokens")),
        reasoning_tokens=count(details(usage, "completion_tokens_details").get("reasoning_tokens")),
        cached_tokens=count(prompt.get("cached_tokens")),
        cache_write_tokens=count(prompt.get("cache_write_tokens", usage.get("cache_write_tokens"))),
    )


def from_responses(usage: object) -> TokenUsage | None:
    """A Responses API ``usage`` object (``response.usage``); None when there is none."""
    if not isinstance(usage, dict):
        return None
    input_details = details(usage, "input_tokens_details")
    return TokenUsage(
        prompt_tokens=count(usage.get("input_tokens")),
        completion_tokens=count(usage.get("output_tokens")),
        reasoning_tokens=count(details(usage, "output_tokens_details").get("reasoning_tokens")),
        cached_tokens=count(input_details.get("cached_tokens")),
        cache_write_tokens=count(input_details.get("cache_write_tokens")),
    )


def from_anthropic(usage: object) -> TokenUsage | None:
    """An Anthropic ``usage`` object (a Message's, or the merged stream usage from
    ``merge_anthropic_usage``); None when there is none. Cache reads and writes are *added* to
    ``input_tokens``, which excludes them."""
    if not isinstance(usage, dict):
        return None
    fresh = count(usage.get("input_tokens"))
    read = count(usage.get("cache_read_input_tokens"))
    written = count(usage.get("cache_creation_input_tokens"))
    return TokenUsage(
        prompt_tokens=fresh + read + written,
        completion_tokens=count(usage.get("output_tokens")),
        reasoning_tokens=count(details(usage, "output_tokens_details").get("thinking_tokens")),
        cached_tokens=read,
        cache_write_tokens=written,
    )


def merge_anthropic_usage(current: dict | None, event: object) -> dict | None:
    """The usage of a native Anthropic stream so far, after ``event``.

    ``message_start`` carries the first counts (``message.usage``); each ``message_delta``
    carries cumulative totals that overwrite them, where a field is present and not null —
    the anthropic SDK's own accumulator does the same (``lib/streaming/_messages.py``)."""
    if not isinstance(event, dict):
        return current
    if event.get("type") == "message_start":
        message = event.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        return dict(usage) if isinstance(usage, dict) else current
    if event.get("type") == "message_delta" and isinstance(event.get("usage"), dict):
        merged = dict(current or {})
        merged.update({key: value for key, value in event["usage"].items() if value is not None})
        return merged
    return current


def responses_event_usage(event: object) -> dict | None:
    """The usage a native Responses stream reports: on its terminal event
    (``response.completed``, ``.incomplete`` or ``.failed``), as ``response.usage``."""
    if not isinstance(event, dict) or event.get("type") not in TERMINAL_RESPONSE_EVENTS:
        return None
    response = event.get("response")
    usage = response.get("usage") if isinstance(response, dict) else None
    return usage if isinstance(usage, dict) else None


TERMINAL_RESPONSE_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def responses_usage(usage: TokenUsage) -> dict:
    """``TokenUsage`` as a Responses API ``usage`` object (``ResponseUsage``)."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def anthropic_usage(usage: TokenUsage) -> dict:
    """``TokenUsage`` as an Anthropic ``usage`` object: ``input_tokens`` without the cached
    and cache-written tokens, which are reported beside it."""
    read = min(usage.cached_tokens, usage.prompt_tokens)
    written = min(usage.cache_write_tokens, usage.prompt_tokens - read)
    result: dict = {
        "input_tokens": usage.prompt_tokens - read - written,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
        "output_tokens": usage.completion_tokens,
    }
    if usage.reasoning_tokens:
        result["output_tokens_details"] = {"thinking_tokens": min(usage.reasoning_tokens, usage.completion_tokens)}
    return result
