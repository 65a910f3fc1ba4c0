"""Contract pricing: per code, percent of Medicare, flat per patient; half-up per line."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccm_billing.domain.pricing import ChargeLine, Contract, PricingInvalid, price_lines, total

LINES = [ChargeLine("a", "99490", 1, Decimal("60.49")), ChargeLine("a", "99439", 2, Decimal("45.93")),
         ChargeLine("b", "99490", 1, Decimal("60.49"))]


def test_per_code_rates():
    c = Contract("per-code", rates={"99490": Decimal("40"), "99439": Decimal("30.005")})
    assert price_lines(LINES, c) == [Decimal("40.00"), Decimal("60.01"), Decimal("40.00")]


def test_percent_of_medicare_rounds_half_up_per_line():
    c = Contract("percent-of-medicare", percent=Decimal("50"))
    # 60.49 * 50% = 30.245 -> 30.25 (half-up), 2 x 45.93 x 50% = 45.93
    assert price_lines(LINES, c) == [Decimal("30.25"), Decimal("45.93"), Decimal("30.25")]


def test_flat_fee_per_billable_patient():
    c = Contract("flat-per-patient", flat_fee=Decimal("55"))
    assert price_lines(LINES, c) == [Decimal("55.00"), Decimal("0.00"), Decimal("55.00")]


@pytest.mark.parametrize("contract", [Contract("per-code", rates={"99490": Decimal(1)}),
                                      Contract("percent-of-medicare"), Contract("flat-per-patient")])
def test_an_incomplete_contract_is_refused(contract):
    with pytest.raises(PricingInvalid):
        price_lines(LINES, contract)


@pytest.mark.parametrize("contract", [
    Contract("per-code", rates={"99490": Decimal("NaN"), "99439": Decimal(1)}),
    Contract("per-code", rates={"99490": Decimal("1e13"), "99439": Decimal(1)}),
    Contract("percent-of-medicare", percent=Decimal("Infinity")),
    Contract("flat-per-patient", flat_fee=Decimal("-1e13")),
])
def test_a_line_priced_out_of_bounds_is_refused(contract):
    """A line must be finite and under 10 ** 13 USD (what the decision lines hold: billing_0015)."""
    with pytest.raises(PricingInvalid, match="finite amount under 10,000,000,000,000"):
        price_lines(LINES, contract)


def test_the_largest_line_is_priced():
    c = Contract("per-code", rates={"99490": Decimal("9999999999999.99"), "99439": Decimal(0)})
    assert price_lines(LINES, c)[0] == Decimal("9999999999999.99")


@pytest.mark.parametrize("doc", [{"model": "barter"}, {"model": "per-code", "rates": {"99490": "x"}}])
def test_malformed_pricing_is_refused(doc):
    with pytest.raises(PricingInvalid):
        Contract.from_json(doc)


amounts = st.decimals(min_value=0, max_value=1000, places=3, allow_nan=False, allow_infinity=False)


@given(st.lists(st.tuples(st.sampled_from(["99490", "99439", "99491"]), st.integers(1, 3), amounts),
                max_size=40), amounts)
def test_total_is_the_sum_of_rounded_lines(rows, percent):
    lines = [ChargeLine(str(i), code, units, Decimal("60.49")) for i, (code, units, _) in enumerate(rows)]
    c = Contract("per-code", rates={code: rate for code, _, rate in rows}) if rows else Contract(
        "percent-of-medicare", percent=percent)
    line_amounts = price_lines(lines, c)
    assert all(a == a.quantize(Decimal("0.01")) for a in line_amounts)
    assert total(line_amounts) == sum(line_amounts, Decimal(0))
