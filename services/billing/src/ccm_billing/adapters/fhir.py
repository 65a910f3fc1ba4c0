"""FHIR R4 output: ChargeItem per patient × code, Invoice per practice × month (revision)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import orjson

from ccm_billing.domain.model import Month
from ccm_billing.domain.pricing import total
from ccm_shared.paging import page_links

CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"  # Level II codes: G0506 …
CHARGE_ITEM_SYSTEM = "https://ccm-platform.org/fhir/sid/charge-item"
INVOICE_SYSTEM = "https://ccm-platform.org/fhir/sid/invoice"
# The platform's practice ids (platform.practices.id): an Invoice's recipient is named by it (a
# logical reference), not as Organization/{practice}, which no FHIR server here resolves (the
# practice's Organization in its EHR has an id of the EHR's).
PRACTICE_SYSTEM = "https://ccm-platform.org/fhir/sid/practice"
EXT_REPLACES = "https://ccm-platform.org/fhir/StructureDefinition/invoice-replaces"
EXT_REPLACED_BY = "https://ccm-platform.org/fhir/StructureDefinition/invoice-replaced-by"
EXT_MEDICARE = "https://ccm-platform.org/fhir/StructureDefinition/medicare-amount"
VENDOR = "ccm-platform CCM services"


def short_id(prefix: str, key: str) -> str:
    """Deterministic id within FHIR's 64-character limit."""
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def invoice_identifier(practice: str, month: Month, revision: int) -> str:
    base = f"{practice}:{month}"
    return base if revision == 0 else f"{base}:r{revision}"


def invoice_id(practice: str, month: Month, revision: int) -> str:
    return invoice_id_of(invoice_identifier(practice, month, revision))


def invoice_id_of(identifier: str) -> str:
    """The id of the Invoice whose identifier value is ``identifier`` (an identifier search)."""
    return short_id("inv", identifier)


def charge_item_identifier(practice: str, patient: str, month: Month, code: str) -> str:
    return f"{practice}:{patient}:{month}:{code}"


def charge_item_id(practice: str, patient: str, month: Month, code: str, revision: int) -> str:
    return short_id("ci", f"{charge_item_identifier(practice, patient, month, code)}:r{revision}")


def money(amount: Decimal) -> dict:
    return {"value": float(amount), "currency": "USD"}


def line_items(lines: list[tuple[str, Decimal]]) -> orjson.Fragment:
    """``Invoice.lineItem`` of (ChargeItem id, amount) lines, as the JSON text orjson writes for

        [{"sequence": n, "chargeItemReference": {"reference": f"ChargeItem/{id}"},
          "priceComponent": [{"type": "base", "amount": money(amount)}]}, ...]

    written directly: an Invoice has a line per billable patient × code (1,780 for a practice of
    1,000 patients), and building the dicts and writing them twice (the Invoice row, its event)
    was a quarter of a month close. ChargeItem ids are ours (``short_id``: nothing to escape);
    floats are written as orjson writes them (shortest round trip: ``repr``). A test checks the
    text against orjson's."""
    return valued_line_items((ci, repr(float(amount))) for ci, amount in lines)


def valued_line_items(lines: Iterable[tuple[str, str]]) -> orjson.Fragment:
    """``line_items`` of (ChargeItem id, the amount's JSON number text) lines."""
    return orjson.Fragment("[" + ",".join(
        f'{{"sequence":{n},"chargeItemReference":{{"reference":"ChargeItem/{ci}"}},'
        f'"priceComponent":[{{"type":"base","amount":{{"value":{value},"currency":"USD"}}}}]}}'
        for n, (ci, value) in enumerate(lines, start=1)) + "]")


@dataclass(frozen=True)
class InvoiceLines:
    """What an Invoice needs of its lines: ``lineItem`` as JSON text (``line_items``), how many
    lines there are and their total (the sum of the lines)."""

    items: orjson.Fragment
    count: int
    total: Decimal

    @classmethod
    def of(cls, lines: list[tuple[str, Decimal]]) -> InvoiceLines:
        """lines: (ChargeItem id, amount) in order."""
        return cls(line_items(lines), len(lines), total([amount for _, amount in lines]))


def code_system(code: str) -> str:
    """CPT for the five-digit codes, HCPCS Level II for the letter-and-four-digit ones."""
    return HCPCS if code[:1].isalpha() else CPT


def charge_item(
    *, id: str, practice: str, patient: str, month: Month, code: str, units: int, amount: Decimal,
    medicare_amount: Decimal, practitioner: str | None, encounters: list[str],
    entered: datetime | None, status: str = "billable", day: date | None = None,
) -> dict:
    """A ChargeItem; without ``enteredDate`` when ``entered`` is None (completed at issue). Its
    occurrence is the month, or ``day`` when the service has one (G0506: the initiating visit)."""
    resource = {
        "resourceType": "ChargeItem",
        "id": id,
        "identifier": [
            {"system": CHARGE_ITEM_SYSTEM,
             "value": charge_item_identifier(practice, patient, month, code)}
        ],
        "status": status,
        "code": {"coding": [{"system": code_system(code), "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        **({"occurrenceDateTime": day.isoformat()} if day else {"occurrencePeriod": {
            "start": month.first_day.isoformat(), "end": month.last_day.isoformat()}}),
        "quantity": {"value": units},
        "priceOverride": money(amount),
        "extension": [{"url": EXT_MEDICARE, "valueMoney": money(medicare_amount)}],
        "supportingInformation": [{"reference": f"Encounter/{e}"} for e in encounters],
    }
    if practitioner:
        resource["performer"] = [{"actor": {"reference": practitioner}}]
    if not encounters:
        del resource["supportingInformation"]
    if entered is not None:
        resource["enteredDate"] = entered.isoformat()
    return resource


def invoice(
    *, id: str, practice: str, practice_name: str, month: Month, revision: int,
    lines: InvoiceLines, issued: datetime, due: date, status: str = "issued",
    replaces: str | None = None,
) -> dict:
    """``lineItem`` is JSON text (``line_items``): write the resource with orjson
    (``ccm_shared.jsontext.compact``, an event's ``to_json``)."""
    resource = {
        "resourceType": "Invoice",
        "id": id,
        "identifier": [
            {"system": INVOICE_SYSTEM, "value": invoice_identifier(practice, month, revision)}
        ],
        "status": status,
        "type": {"text": f"Chronic care management services {month}"},
        "recipient": recipient(practice, practice_name),
        "issuer": {"display": VENDOR},
        "date": issued.isoformat(),
        "lineItem": lines.items,
        "totalNet": money(lines.total),
        "totalGross": money(lines.total),
        "paymentTerms": f"Due {due.isoformat()}",
        "note": [{"text": f"CCM services for {month}, revision {revision}"}],
    }
    if not lines.count:
        del resource["lineItem"]
    if replaces:
        resource["extension"] = [{"url": EXT_REPLACES, "valueReference": {"reference": f"Invoice/{replaces}"}}]
    return resource


def recipient(practice: str, name: str) -> dict:
    """The Invoice's recipient: the practice by its platform id (a logical reference, which
    resolves nowhere and need not), with its name."""
    return {"type": "Organization", "identifier": {"system": PRACTICE_SYSTEM, "value": practice},
            "display": name}


def without_line_items(resource: dict) -> dict:
    """The Invoice as stored when its lines are filed in place (``invoices.lines_in_place``)."""
    return {k: v for k, v in resource.items() if k != "lineItem"}


def with_line_items(stored: dict, lines: InvoiceLines) -> dict:
    """``without_line_items`` undone: ``lineItem`` back where ``invoice`` puts it, as plain
    JSON values (any JSON writer can write the result)."""
    if not lines.count:
        return stored
    out = {}
    for key, value in stored.items():
        if key == "totalNet":
            out["lineItem"] = orjson.loads(orjson.dumps(lines.items))
        out[key] = value
    return out


def cancelled(resource: dict, reason: str, replaced_by: str | None) -> dict:
    out = {**resource, "status": "cancelled", "cancelledReason": reason}
    if replaced_by:
        out["extension"] = [*resource.get("extension", []),
                            {"url": EXT_REPLACED_BY, "valueReference": {"reference": f"Invoice/{replaced_by}"}}]
    return out


def with_meta(resource: dict, version_id: int, last_updated: datetime) -> dict:
    """``resource`` as /fhir serves it: its ``meta.versionId`` and ``meta.lastUpdated`` (a FHIR
    instant, UTC) from the row that stores it, after its id, as FHIR writes ``meta``."""
    meta = {"versionId": str(version_id), "lastUpdated": instant(last_updated)}
    out: dict = {}
    for key, value in resource.items():
        if key != "meta":
            out[key] = value
        if key == "id":
            out["meta"] = meta
    return out


def instant(when: datetime) -> str:
    """A FHIR instant of an aware time: UTC, ``Z``, to the microsecond where it has one."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def operation_outcome(code: str, diagnostics: str, expression: list[str] | None = None) -> dict:
    issue = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def full_url(base: str, resource: dict) -> str:
    """A Bundle entry's fullUrl: the resource's absolute URL under the FHIR ``base`` (R4
    Bundle.entry.fullUrl is absolute; ``Invoice/inv-…`` alone was relative)."""
    return f"{base.rstrip('/')}/{resource['resourceType']}/{resource['id']}"


def search_bundle(resources: list[dict], url: Any, *, criteria: list[tuple[str, str]],
                  total: int, count: int, offset: int, max_offset: int, base: str) -> dict:
    """A searchset page: ``resources`` are the matches from ``offset`` (``count`` per page) of
    ``total``. Its links name the search as it was done: ``criteria`` (the parameters used, as
    given) and the paging, on ``url`` (the request's, a Starlette URL): its own page (self), the
    first, previous and next. Each entry's fullUrl is absolute under ``base`` (this server's
    /fhir)."""

    def page(at: int, length: int = count) -> str:
        return str(url.replace(query=urlencode([*criteria, ("_count", length), ("_offset", at)])))

    bundle: dict = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": [{"relation": "self", "url": page(offset)},
                 *page_links(page, offset=offset, count=count, total=total,
                             max_offset=max_offset)],
    }
    if resources:  # FHIR JSON has no empty arrays (ele-1): no matches, no entry
        bundle["entry"] = [
            {"fullUrl": full_url(base, r), "resource": r, "search": {"mode": "match"}}
            for r in resources]
    return bundle
