from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.money import (
    MoneyError,
    format_cents,
    format_usd,
    loads_decimal,
    mul_round,
    parse_usd,
    usd_to_nanos,
)


def test_it_parses_decimal_strings_to_nanodollars():
    assert parse_usd("12.345678901") == 12_345_678_901
    assert parse_usd("0.000000001") == 1
    assert parse_usd("-1") == -1_000_000_000
    assert parse_usd(".5") == parse_usd("0.50") == 500_000_000


@pytest.mark.parametrize("value", [0.1, 1.0, float("nan"), True])
def test_it_refuses_floats_and_bools(value):
    with pytest.raises(MoneyError):
        parse_usd(value)


@pytest.mark.parametrize("value", ["abc", "", "1e", "NaN", "Infinity", None, [1], " 10 ", "1e999990", "-1e999990"])
def test_it_refuses_what_is_not_an_amount(value):
    with pytest.raises(MoneyError):
        parse_usd(value)


@pytest.mark.parametrize("value", ["1" + "0" * 99_999, "-1" + "0" * 99_999, "10000000000000", 10**13])
def test_it_refuses_amounts_too_large_for_the_ledger_before_any_arithmetic(value):
    with pytest.raises(MoneyError, match="too large"):
        parse_usd(value)
    assert parse_usd("9999999999999") == 9_999_999_999_999 * 10**9  # just under the bound


def test_it_refuses_more_than_nine_decimal_places_from_clients():
    with pytest.raises(MoneyError, match="decimal places"):
        parse_usd("0.0000000001")


def test_usd_to_nanos_rounds_half_up_not_to_even():
    assert usd_to_nanos(Decimal("0.0000000005")) == 1
    assert usd_to_nanos(Decimal("0.0000000025")) == 3  # banker's rounding would give 2
    assert usd_to_nanos(Decimal("0.00000000049")) == 0


def test_formatting_keeps_nine_places_and_the_sign():
    assert format_usd(0) == "0.000000000"
    assert format_usd(1) == "0.000000001"
    assert format_usd(-3_600_000) == "-0.003600000"
    assert format_cents(12_345_000_000) == "$12.35"
    assert format_cents(-5_000_000) == "-$0.01"


def test_format_refuses_non_integers():
    with pytest.raises(MoneyError):
        format_usd(1.5)


def test_mul_round_is_cost_times_markup_half_up():
    # $0.0000597 upstream cost × 1.2 = $0.00007164 → 71640 nanodollars exactly
    assert mul_round(Decimal("0.0000597") * 10**9, Decimal("1.2")) == 71_640
    assert mul_round(5, Decimal("0.5")) == 3


def test_upstream_json_numbers_become_decimals():
    body = loads_decimal(b'{"usage": {"cost": 0.0000597, "prompt_tokens": 12}}')
    assert body["usage"]["cost"] == Decimal("0.0000597")
    assert isinstance(body["usage"]["prompt_tokens"], int)


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_format_then_parse_round_trips(nanos):
    assert parse_usd(format_usd(nanos)) == nanos
