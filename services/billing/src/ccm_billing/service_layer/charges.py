"""Charge lines of a month: one per billable patient × code, priced by the practice's contract."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from ccm_billing.adapters import fhir
from ccm_billing.domain.model import Decision, Month
from ccm_billing.domain.pricing import CENT, ChargeLine, PricingInvalid, price_lines
from ccm_billing.domain.rules import ruleset_for
from ccm_billing.service_layer.common import PracticeInfo
from ccm_shared.errors import InvalidInput
from ccm_shared.jsontext import compact


@dataclass(frozen=True)
class PricedLine:
    patient: str
    code: str
    units: int
    medicare_amount: Decimal
    amount: Decimal
    practitioner: str | None
    encounters: tuple[str, ...]
    day: date | None = None  # the service day (G0506: its visit's); None: the whole month


def priced_lines(info: PracticeInfo, month: Month, decisions: list[Decision]) -> list[PricedLine]:
    """One line per billable patient × code, priced by the practice's contract."""
    ruleset = ruleset_for(month)
    raw = []
    for d in decisions:
        if not d.billable:
            continue
        for code, units in sorted(d.codes.items()):
            raw.append((d, ChargeLine(d.patient, code, units, ruleset.fee(code))))
    try:
        amounts = price_lines([line for _, line in raw], info.contract())
    except PricingInvalid as exc:
        raise InvalidInput(f"practice {info.id}: {exc}") from None
    initiation = ruleset.setting("CCM", "initiation")["code"]
    out = []
    for (d, line), amount in zip(raw, amounts, strict=True):
        encounters, day = d.counted, None
        if line.code == initiation and d.initiating_visit is not None:
            # Billed with the initiating visit: its day, its Encounter as the evidence.
            encounters, day = (d.initiating_visit.visit_id,), d.initiating_visit.day
        out.append(PricedLine(line.patient, line.code, line.units, line.medicare_unit * line.units,
                              amount, d.practitioner, encounters, day))
    return out


def billed_line(row) -> PricedLine:  # noqa: ANN001
    """A stored ChargeItem (a ``filed.charge_items`` row) as the line it was priced as: what a
    reissue carries over unchanged and the report shows of a closed month."""
    resource = json.loads(row.resource)
    medicare = next(x["valueMoney"]["value"] for x in resource["extension"]
                    if x["url"] == fhir.EXT_MEDICARE)
    performer = (resource.get("performer") or [{}])[0].get("actor", {}).get("reference")
    day = resource.get("occurrenceDateTime")
    return PricedLine(
        row.patient, row.code, resource["quantity"]["value"],
        Decimal(str(medicare)).quantize(CENT), Decimal(row.amount), performer,
        tuple(r["reference"].removeprefix("Encounter/")
              for r in resource.get("supportingInformation", [])),
        date.fromisoformat(day) if day else None)


def charge_item_stub(practice: str, month: Month, line: PricedLine, revision: int) -> tuple[str, str]:
    """The ChargeItem of a line as compact JSON without its ``enteredDate`` (known only when the
    Invoice is issued; ``entered`` completes it): (its id, the JSON)."""
    ci_id = fhir.charge_item_id(practice, line.patient, month, line.code, revision)
    resource = fhir.charge_item(
        id=ci_id, practice=practice, patient=line.patient, month=month, code=line.code,
        units=line.units, amount=line.amount, medicare_amount=line.medicare_amount,
        practitioner=line.practitioner, encounters=list(line.encounters), entered=None,
        day=line.day,
    )
    return ci_id, compact(resource)


def entered_suffix(entered: datetime) -> str:
    """What replaces a stub's closing brace: the entered date, then the brace."""
    return f',"enteredDate":{json.dumps(entered.isoformat())}}}'


def entered(stub: str, when: datetime) -> str:
    return stub[:-1] + entered_suffix(when)
