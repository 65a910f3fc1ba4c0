"""Who performed CCM time: billing practitioner, clinical staff, non-clinical or unknown."""

from __future__ import annotations

from collections.abc import Iterable

CLASSIFICATION_TO_ROLE = {
    "billing-practitioner": "practitioner",
    "clinical-staff": "staff",
    "non-clinical": "non-clinical",
    "unknown": "unknown",
}
PRACTITIONER_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/practitioner-role"
NUCC_SYSTEM = "http://nucc.org/provider-taxonomy"


def classify_codes(codings: Iterable[dict], code_sets: dict) -> str:
    """Role from PractitionerRole codings by the default code sets (fhir-mapping defaults)."""
    for wanted, key in (("practitioner", "billing_practitioner_roles"), ("staff", "clinical_staff_roles")):
        sets = code_sets[key]
        for c in codings:
            system, code = c.get("system"), c.get("code") or ""
            if system == PRACTITIONER_ROLE_SYSTEM and code in sets["practitioner-role"]:
                return wanted
            if system == NUCC_SYSTEM and any(code.startswith(p) for p in sets["nucc_prefixes"]):
                return wanted
    return "unknown"
