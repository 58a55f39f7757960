"""Unit tests for the proxy's framework-free helpers: SSE parsing, usage parsing, pricing."""

import json
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from core.money import loads_decimal
from core.pricing import Rates, affordable_output, charge_nanos, cost_usd, hold_nanos
from core.sse import SSEParser
from core.usage import StreamMeter, Usage, reported_cost, usage_from

STREAM = (
    b": OPENROUTER PROCESSING\n\n"
    b'data: {"id":"gen-1","choices":[{"delta":{"content":"Hi"}}]}\n\n'
    b'data: {"id":"gen-1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"cost":0.0000597}}\n\n'
    b"data: [DONE]\n\n"
)


def _feed_all(parser, pieces):
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.flush()


def test_sse_parser_yields_comments_data_and_done_in_order():
    events = SSEParser().feed(STREAM)
    assert [e.is_comment for e in events] == [True, False, False, False]
    assert events[0].encode() == b": OPENROUTER PROCESSING\n\n"
    assert events[1].data == '{"id":"gen-1","choices":[{"delta":{"content":"Hi"}}]}'
    assert events[3].is_done


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), max_size=12))
def test_sse_parser_gives_the_same_events_however_the_bytes_are_split(cuts):
    points = sorted(set(cuts))
    pieces = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    whole = [(e.data, e.lines) for e in SSEParser().feed(STREAM)]
    assert [(e.data, e.lines) for e in _feed_all(SSEParser(), pieces)] == whole


def test_sse_parser_accepts_crlf_even_when_split_between_reads():
    crlf = STREAM.replace(b"\n", b"\r\n")
    pieces = [crlf[: crlf.index(b"\r") + 1], crlf[crlf.index(b"\r") + 1 :]]
    events = _feed_all(SSEParser(), pieces)
    assert [e.data for e in events] == [e.data for e in SSEParser().feed(STREAM)]


def test_sse_parser_joins_multiline_data_and_keeps_a_final_event_without_blank_line():
    events = _feed_all(SSEParser(), [b"data: one\ndata:two\n\ndata: [DONE]"])
    assert events[0].data == "one\ntwo"
    assert events[1].is_done


def test_usage_reads_cached_reasoning_cache_write_and_exact_cost():
    parsed = loads_decimal(
        b'{"prompt_tokens":412,"completion_tokens":37,"cost":0.0000597,'
        b'"prompt_tokens_details":{"cached_tokens":256,"cache_write_tokens":12},'
        b'"completion_tokens_details":{"reasoning_tokens":20}}'
    )
    assert usage_from(parsed) == Usage(412, 37, 20, 256, 12, Decimal("0.0000597"))


def test_usage_ignores_nulls_and_junk():
    assert usage_from(None) is None
    assert usage_from({"prompt_tokens": "x", "completion_tokens": -3, "cost": "1"}) == Usage()


def test_stream_meter_keeps_the_last_non_null_usage_and_counts_output():
    meter = StreamMeter()
    for raw in [
        b'{"id":"a","model":"m1","choices":[{"delta":{"content":"Hello"}}],"usage":null}',
        b'{"id":"a","model":"m1","choices":[{"delta":{"content":"!"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":2}}',
        b'{"id":"a","model":"m2","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}',
    ]:
        meter.observe(loads_decimal(raw))
    assert (meter.id, meter.model, meter.finish_reason, meter.output_chars) == ("a", "m2", "stop", 6)
    assert meter.usage.completion_tokens == 3


def test_stream_meter_records_a_mid_stream_error():
    meter = StreamMeter()
    meter.observe({"error": {"code": 502, "message": "Upstream connection dropped"}, "choices": []})
    assert meter.error == "Upstream connection dropped"


RATES = Rates(prompt=Decimal("3"), completion=Decimal("15"), markup=Decimal("0.20"))


def test_cost_prices_prompt_and_completion_per_million():
    assert cost_usd(RATES, Usage(prompt_tokens=1000, completion_tokens=100)) == Decimal("0.0045")


def test_reasoning_tokens_are_not_billed_twice():
    usage = Usage(prompt_tokens=0, completion_tokens=100, reasoning_tokens=60)
    assert cost_usd(RATES, usage) == Decimal("0.0015")  # all 100 at the completion rate
    dearer = Rates(completion=Decimal("15"), reasoning=Decimal("30"))
    assert cost_usd(dearer, usage) == (40 * Decimal(15) + 60 * Decimal(30)) / 1_000_000


def test_cached_and_cache_write_tokens_use_their_rates_or_fall_back_to_prompt():
    usage = Usage(prompt_tokens=1000, cached_tokens=600, cache_write_tokens=100)
    assert cost_usd(RATES, usage) == Decimal("0.003")
    cached = Rates(prompt=Decimal("3"), cache_read=Decimal("0.3"), cache_write=Decimal("3.75"))
    assert cost_usd(cached, usage) == (300 * 3 + 600 * Decimal("0.3") + 100 * Decimal("3.75")) / 1_000_000


def test_request_fee_is_added_before_markup():
    rates = Rates(request_fee=1_000_000)  # $0.001
    assert cost_usd(rates, Usage()) == Decimal("0.001")


def test_charge_is_cost_times_markup_rounded_half_up_to_the_nanodollar():
    assert charge_nanos(Decimal("0.0000597"), markup=Decimal("0.20")) == 71_640
    assert charge_nanos(Decimal("0.0000000005"), markup=Decimal("0")) == 1  # .5 nanodollar rounds up
    assert charge_nanos(Decimal("0.0000000004"), markup=Decimal("0")) == 0


def test_charge_is_never_below_the_minimum_fee_but_free_requests_stay_free():
    assert charge_nanos(Decimal("0.000001"), markup=Decimal("0.2"), min_charge=5_000) == 5_000
    assert charge_nanos(Decimal("0"), markup=Decimal("0.2"), min_charge=5_000) == 0


def test_hold_covers_prompt_and_every_allowed_output_token_at_the_dearest_output_rate():
    rates = Rates(prompt=Decimal("3"), completion=Decimal("15"), reasoning=Decimal("20"), markup=Decimal("0.2"))
    expected = (1000 * Decimal(3) + 500 * Decimal(20)) / 1_000_000 * Decimal("1.2") * 10**9
    assert hold_nanos(rates, prompt_tokens=1000, max_output=500) == int(expected)


def test_affordable_output_is_the_largest_cap_whose_hold_fits():
    available = 10_000_000  # $0.01
    tokens = affordable_output(RATES, prompt_tokens=100, available=available)
    assert hold_nanos(RATES, prompt_tokens=100, max_output=tokens) <= available
    assert hold_nanos(RATES, prompt_tokens=100, max_output=tokens + 1) > available


def test_affordable_output_is_zero_when_not_even_the_prompt_fits():
    assert affordable_output(RATES, prompt_tokens=10_000_000, available=1_000) == 0


def test_reported_cost_adds_the_providers_charge_only_for_byok():
    byok = {"cost": Decimal("0.01"), "is_byok": True, "cost_details": {"upstream_inference_cost": Decimal("0.2")}}
    assert reported_cost(byok, "cost") == Decimal("0.21")
    assert reported_cost({**byok, "is_byok": False}, "cost") == Decimal("0.01")
    for unusable in (None, Decimal("-1"), "0.2", True):
        assert reported_cost({**byok, "cost_details": {"upstream_inference_cost": unusable}}, "cost") == Decimal("0.01")
    assert reported_cost({**byok, "cost": None}, "cost") is None  # no cost stated: the price table decides
    generation = {"total_cost": 1, "is_byok": True, "upstream_inference_cost": Decimal("0.5")}
    assert reported_cost(generation, "total_cost") == Decimal("1.5")
    assert usage_from(byok).cost == Decimal("0.21")


def _chunk(delta: dict, *, finish=None, model="m1", compact=True, ascii=True, **extra) -> bytes:
    body = {"id": "gen-1", "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    separators = (",", ":") if compact else (", ", ": ")
    return b"data: " + json.dumps(body, separators=separators, ensure_ascii=ascii).encode() + b"\n\n"


@given(st.text(), st.booleans(), st.booleans())
def test_a_content_chunk_counted_from_its_text_counts_what_a_parse_counts(text, compact, ascii):
    parsed, read = StreamMeter(), StreamMeter()
    first = _chunk({"role": "assistant", "content": ""})[len(b"data: ") :]
    parsed.observe(loads_decimal(first)), read.observe(loads_decimal(first))
    raw = _chunk({"content": text, "reasoning": text[::-1]}, compact=compact, ascii=ascii)[len(b"data: ") : -2]
    parsed.observe(loads_decimal(raw))
    assert read.observe_text(raw.decode())
    assert read.output_chars == parsed.output_chars == 2 * len(text)


def test_a_stream_whose_content_chunks_are_not_parsed_bills_and_estimates_as_parsed(monkeypatch):
    from proxy.endpoints import relay

    parses = []
    monkeypatch.setattr(relay, "loads_decimal", lambda data: parses.append(data) or loads_decimal(data))
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}
    events = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": 'Say "usage": 1\n'}),  # a key's name inside text is text
        _chunk({"content": "h\u00e9llo \U0001f600"}, compact=False, ascii=False),
        _chunk({"reasoning": "think", "content": None}),
        _chunk({"tool_calls": [call]}),
        _chunk({"content": "!"}, model="m2"),  # another model: parsed
        _chunk({}, finish="stop"),  # the finish reason: parsed
        b'data: {"id":"gen-1","model":"m2","choices":[],'
        b'"usage":{"prompt_tokens":7,"completion_tokens":9,"cost":0.5}}\n\n',
    ]
    reference = StreamMeter()
    for event in events:
        reference.observe(loads_decimal(event[len(b"data: ") : -2]))

    stream = relay.ChatStreamRelay(client_usage=False)
    out = b"".join(stream.feed(event) for event in [*events, b"data: [DONE]\n\n"])

    assert len(parses) == 4  # the first chunk, another model, the finish reason, the usage
    meter = stream.meter
    assert (meter.id, meter.model, meter.finish_reason, meter.usage) == (
        reference.id,
        reference.model,
        reference.finish_reason,
        reference.usage,
    )
    assert meter.output_chars == reference.output_chars == 15 + 7 + 5 + (1 + 4) + 1
    assert meter.usage == Usage(prompt_tokens=7, completion_tokens=9, cost=Decimal("0.5"))
    assert out == b"".join(events[:-1]) and stream.done  # relayed unchanged; the usage chunk held back
