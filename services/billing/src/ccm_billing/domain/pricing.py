"""The vendor's bill to a practice: contract pricing of charge lines, Decimal, half-up to cents."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

CENT = Decimal("0.01")
MODELS = ("per-code", "percent-of-medicare", "flat-per-patient")


class PricingInvalid(Exception):
    """The practice's contract cannot price this invoice (e.g. no rate for a billed code)."""


@dataclass(frozen=True)
class Contract:
    model: str = "per-code"
    rates: dict[str, Decimal] | None = None
    percent: Decimal | None = None
    flat_fee: Decimal | None = None
    due_days: int = 30

    @classmethod
    def from_json(cls, doc: dict) -> Contract:
        """From ``platform.practices.pricing``; raises PricingInvalid on a malformed contract."""
        try:
            model = doc.get("model") or "per-code"
            if model not in MODELS:
                raise PricingInvalid(f"unknown pricing model {model!r}; one of {', '.join(MODELS)}")
            rates = {k: Decimal(str(v)) for k, v in (doc.get("rates") or {}).items()}
            percent = Decimal(str(doc["percent"])) if doc.get("percent") is not None else None
            flat = Decimal(str(doc["flat_fee"])) if doc.get("flat_fee") is not None else None
            return cls(model, rates, percent, flat, int(doc.get("due_days") or 30))
        except (InvalidOperation, TypeError, ValueError) as exc:
            raise PricingInvalid(f"malformed pricing: {exc}") from None


@dataclass(frozen=True)
class ChargeLine:
    """One patient × code of a month: what Medicare pays and what the practice is billed."""

    patient: str
    code: str
    units: int
    medicare_unit: Decimal


def money(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


# A line's amount must be finite and under this: ten trillion dollars is no contract's price, and
# the decision lines hold amounts of at most 13 integer digits (billing_0015's check).
LINE_LIMIT = Decimal(10) ** 13


def _line_amount(value: Decimal) -> Decimal:
    amount = money(value) if value.is_finite() else value
    if not amount.is_finite() or abs(amount) >= LINE_LIMIT:
        raise PricingInvalid(f"the practice's contract prices a line at {value}: a line must be "
                             f"a finite amount under {LINE_LIMIT:,} USD")
    return amount


def price_lines(lines: list[ChargeLine], contract: Contract) -> list[Decimal]:
    """The amount of each line, rounded half-up to cents per line (totals are their sum).

    flat-per-patient puts the patient's fee on that patient's first line; further lines are 0.00.
    """
    amounts: list[Decimal] = []
    seen_patients: set[str] = set()
    for line in lines:
        if contract.model == "per-code":
            rate = (contract.rates or {}).get(line.code)
            if rate is None:
                raise PricingInvalid(f"the practice's contract has no rate for code {line.code}")
            amounts.append(_line_amount(rate * line.units))
        elif contract.model == "percent-of-medicare":
            if contract.percent is None:
                raise PricingInvalid("percent-of-medicare pricing without a percent")
            amounts.append(_line_amount(line.medicare_unit * line.units * contract.percent / 100))
        else:
            if contract.flat_fee is None:
                raise PricingInvalid("flat-per-patient pricing without a flat_fee")
            first = line.patient not in seen_patients
            seen_patients.add(line.patient)
            amounts.append(_line_amount(contract.flat_fee) if first else Decimal("0.00"))
    return amounts


def total(amounts: list[Decimal]) -> Decimal:
    return sum(amounts, Decimal("0.00"))
