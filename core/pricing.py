"""Pricing arithmetic: token counts × rates → USD cost → charged nanodollars.

No Django imports; amounts in nanodollars are ``int``, costs in USD are exact ``Decimal``.

* Rates are USD per 1M tokens. Reasoning and cache tokens are *subsets* of the completion and
  prompt counts the upstream reports, so each token is priced once: reasoning tokens at the
  reasoning rate when one is set (else they stay completion tokens), cache reads at the
  cache-read rate when set (else prompt rate), cache writes likewise.
* ``charge = round_half_up(cost_usd × (1 + markup) × 10⁹)``, never below the model's minimum
  fee — except a request that cost nothing at all (OpenRouter does not bill a generation that
  ended in an error), which is charged nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from core.money import NANOS_PER_USD

from .usage import Usage

PER_MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Rates:
    prompt: Decimal = Decimal(0)  # USD per 1M tokens
    completion: Decimal = Decimal(0)
    reasoning: Decimal = Decimal(0)  # 0 = reasoning tokens cost what completion tokens cost
    cache_read: Decimal = Decimal(0)  # 0 = cached tokens cost what prompt tokens cost
    cache_write: Decimal = Decimal(0)  # 0 = cache-write tokens cost what prompt tokens cost
    request_fee: int = 0  # nanodollars per request, before markup
    min_charge: int = 0  # nanodollars
    markup: Decimal = Decimal("0.20")

    @property
    def output_rate(self) -> Decimal:
        """The dearest rate an output token can be billed at (for holds)."""
        return max(self.completion, self.reasoning)

    def snapshot(self) -> dict:
        return {
            "prompt": str(self.prompt),
            "completion": str(self.completion),
            "reasoning": str(self.reasoning),
            "cache_read": str(self.cache_read),
            "cache_write": str(self.cache_write),
            "request_fee": self.request_fee,
            "min_charge": self.min_charge,
            "markup": str(self.markup),
        }


def cost_usd(rates: Rates, usage: Usage) -> Decimal:
    """What the request cost before markup, from the price table (fee included)."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
    fresh = usage.prompt_tokens - cached - written
    reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
    if rates.reasoning:
        plain_output, reasoning_cost = usage.completion_tokens - reasoning, reasoning * rates.reasoning
    else:
        plain_output, reasoning_cost = usage.completion_tokens, Decimal(0)
    per_million = (
        fresh * rates.prompt
        + cached * (rates.cache_read or rates.prompt)
        + written * (rates.cache_write or rates.prompt)
        + plain_output * rates.completion
        + reasoning_cost
    )
    return per_million / PER_MILLION + Decimal(rates.request_fee) / NANOS_PER_USD


def charge_nanos(cost: Decimal, *, markup: Decimal, min_charge: int = 0) -> int:
    if cost <= 0:
        return 0
    nanos = int((cost * (1 + markup) * NANOS_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))
    return max(nanos, min_charge)


def hold_nanos(rates: Rates, *, prompt_tokens: int, max_output: int) -> int:
    """The most a request can cost: the prompt estimate plus every allowed output token."""
    cost = (prompt_tokens * rates.prompt + max_output * rates.output_rate) / PER_MILLION
    cost += Decimal(rates.request_fee) / NANOS_PER_USD
    # A hold must be positive even for a free model: it is what makes the request visible.
    return max(charge_nanos(cost, markup=rates.markup, min_charge=rates.min_charge), 1)


def affordable_output(rates: Rates, *, prompt_tokens: int, available: int) -> int:
    """The largest ``max_output`` whose hold fits in ``available`` nanodollars (0 if none)."""
    if hold_nanos(rates, prompt_tokens=prompt_tokens, max_output=0) > available:
        return 0
    if not rates.output_rate:
        return 2**31 - 1
    budget = Decimal(available) / NANOS_PER_USD / (1 + rates.markup) - Decimal(rates.request_fee) / NANOS_PER_USD
    budget -= prompt_tokens * rates.prompt / PER_MILLION
    tokens = max(int(budget * PER_MILLION / rates.output_rate), 0)
    # Half-up rounding of the hold can add a nanodollar: step down until it truly fits.
    while tokens > 0 and hold_nanos(rates, prompt_tokens=prompt_tokens, max_output=tokens) > available:
        tokens -= 1
    return tokens
