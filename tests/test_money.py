from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.money import (
    MoneyError,
    format_money,
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


@pytest.mark.parametrize(
    ("nanos", "shown"),
    [
        (0, "$0.00"),
        (139_000, "$0.000139"),  # a cheap request is not "$0.00"
        (12_345_000_000, "$12.345"),
        (12_345_678_901, "$12.345679"),  # half-up to six places; the title carries all nine
        (12_340_000_000, "$12.34"),  # trailing zeros trimmed, never below cents
        (10_000_000_000, "$10.00"),
        (-5_000_000, "-$0.005"),
        (1_234_567_000_000_000, "$1,234,567.00"),
        (500, "$0.000001"),  # half a micro-dollar rounds up
        (499, "$0.000000499"),  # too small for six places: shown whole, never as zero
        (-1, "-$0.000000001"),
    ],
)
def test_the_display_rule_shows_sub_cent_amounts_and_trims_to_cents(nanos, shown):
    assert format_money(nanos) == shown


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_the_display_rule_never_shows_a_non_zero_amount_as_zero(nanos):
    shown = format_money(nanos)
    assert (shown == "$0.00") == (nanos == 0)
    assert shown.startswith("-") == (nanos < 0)
    # Within half a micro-dollar of the amount (exact below that): what is read is what was spent.
    figure = Decimal(shown.replace("$", "").replace(",", ""))
    assert abs(figure * 10**9 - nanos) <= 500


def test_money_html_puts_the_exact_amount_in_the_title():
    from infra.money_html import money_html

    assert money_html(139_000) == '<span class="money" title="0.000139000">$0.000139</span>'
    assert money_html(None) == '<span class="money" title="0.000000000">$0.00</span>'


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
