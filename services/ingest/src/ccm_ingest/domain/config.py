"""Per-practice mapping configuration: which codes mean CCM time, consent, care plan, staff role.

Codes are written ``system|code``; a code ending in ``*`` matches every code with that prefix
(NUCC taxonomy groups). The defaults are those of docs ``fhir-mapping.md``; a practice overrides
any key through ``PUT /v1/practices/{practice}/ingest-config`` and keeps the defaults for the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

from ccm_ingest.domain.rules import ENCOUNTER_CLASSES
from ccm_shared.text import is_text

CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
LOINC = "http://loinc.org"
PLATFORM = "https://ccm-platform.org/fhir/CodeSystem/ccm"
ROLE = "http://terminology.hl7.org/CodeSystem/practitioner-role"
NUCC = "http://nucc.org/provider-taxonomy"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
US_CORE_CAREPLAN = "http://hl7.org/fhir/us/core/CodeSystem/careplan-category"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"


CARE_PLAN_INTENTS = ("proposal", "plan", "order", "option")


# The integer settings: (most allowed, what that is).
INTEGER_LIMITS = {"length_tolerance_seconds": (86_400, "a day"),
                  "consent_expiring_lead_days": (366, "a year")}


class ConfigInvalid(Exception):
    """An ingest configuration that cannot be used; the message names the key."""


@dataclass(frozen=True)
class IngestConfig:
    ccm_time_codes: tuple[str, ...] = (
        *(f"{CPT}|{c}" for c in ("99490", "99439", "99491", "99437", "99487", "99489")),
        f"{PLATFORM}|ccm-time",
    )
    complex_codes: tuple[str, ...] = (f"{CPT}|99487", f"{CPT}|99489")
    # Visits that can initiate CCM (ccm-billing-rules.md §3.4): office E/M 99212–99215, the
    # annual wellness visit (G0438, G0439), the IPPE (G0402) and transitional care (99495, 99496).
    visit_codes: tuple[str, ...] = (
        *(f"{CPT}|{c}" for c in ("99212", "99213", "99214", "99215", "99495", "99496")),
        *(f"{HCPCS}|{c}" for c in ("G0438", "G0439", "G0402")),
    )
    consent_categories: tuple[str, ...] = (
        f"{LOINC}|59284-0",
        f"{LOINC}|64292-6",
        f"{PLATFORM}|ccm-consent",
    )
    consent_scopes: tuple[str, ...] = (
        f"{CONSENT_SCOPE}|treatment",
        f"{CONSENT_SCOPE}|patient-privacy",
    )
    care_plan_categories: tuple[str, ...] = (
        f"{US_CORE_CAREPLAN}|assess-plan",
        f"{PLATFORM}|ccm-care-plan",
    )
    care_plan_intents: tuple[str, ...] = ("plan", "order")
    billing_practitioner_roles: tuple[str, ...] = (
        f"{ROLE}|doctor",
        *(f"{NUCC}|{p}*" for p in ("207", "208", "363L", "363A", "364S")),
    )
    clinical_staff_roles: tuple[str, ...] = (
        f"{ROLE}|nurse",
        *(f"{NUCC}|{p}*" for p in ("163W", "164W", "164X", "3747")),
    )
    non_clinical_roles: tuple[str, ...] = ()
    chronic_categories: tuple[str, ...] = (f"{CONDITION_CATEGORY}|problem-list-item",)
    chronic_codes: tuple[str, ...] = ()  # empty: every code counts
    length_tolerance_seconds: int = 60
    # Encounter.class codes (v3 ActCode) of facility stays: CCM time is not billed for them
    # (ccm-billing-rules.md: not while the patient is an inpatient; configurable).
    facility_classes: tuple[str, ...] = ("IMP", "ACUTE", "NONAC", "EMER", "OBSENC", "PRENC",
                                         "SS")
    # Days before a granted CCM consent's provision.period ends that ingest.consent.expiring.v1
    # goes out (fhir-mapping.md: "an 'expiring' event ahead of time"); 0: never.
    consent_expiring_lead_days: int = 30

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def merged(self, overrides: dict[str, Any], *, strict: bool = True) -> IngestConfig:
        """These settings with ``overrides`` applied; unknown keys or bad values raise.

        ``strict=False`` for overrides stored earlier: the checks added since they could be
        saved (intents, ``*`` placement, the tolerance's upper bound, a role in two lists) are
        not applied to them, so a practice keeps the rules it saved; saving again applies them.
        """
        known = {f.name: f for f in fields(self)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                raise ConfigInvalid(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
            if key in INTEGER_LIMITS:
                most, meaning = INTEGER_LIMITS[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0 or \
                        (strict and value > most):
                    raise ConfigInvalid(f"{key} must be an integer from 0 to {most} ({meaning})")
                values[key] = value
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigInvalid(f"{key} must be a list of non-empty strings")
            # (a GET of the config answered 500 after a PUT stored one)
            if not all(is_text(v) for v in value):
                raise ConfigInvalid(f"{key}: a code with a NUL character or a lone surrogate "
                                    "(\\ud800 without its pair) is no text")
            if key == "care_plan_intents":
                if strict and (unknown := [v for v in value if v not in CARE_PLAN_INTENTS]):
                    raise ConfigInvalid(f"{key}: {unknown[0]!r} is no CarePlan intent; R4's are "
                                        f"{', '.join(CARE_PLAN_INTENTS)}")
            elif key == "facility_classes":
                if unknown := [v for v in value if v not in ENCOUNTER_CLASSES]:
                    raise ConfigInvalid(f"{key}: {unknown[0]!r} is no Encounter.class "
                                        "(ActEncounterCode); R4's are "
                                        f"{', '.join(sorted(ENCOUNTER_CLASSES))}")
            else:
                for v in value:
                    system, bar, code = v.partition("|")
                    if not bar or not system or not code:
                        raise ConfigInvalid(f"{key}: {v!r} is not 'system|code'")
                    if strict and ("*" in code[:-1] or code == "*"):
                        raise ConfigInvalid(f"{key}: {v!r}: '*' may only end a code prefix "
                                            "(e.g. 'system|207*')")
            values[key] = tuple(value)
        merged = IngestConfig(**{**asdict(self), **values})
        if strict:
            merged.check_roles()
        return merged

    def stored(self, overrides: dict[str, Any]) -> tuple[IngestConfig, list[str]]:
        """These settings with the overrides stored earlier that can be used now (``merged``
        with ``strict=False``, key by key), and why each other key is left out (its default
        applies): a key a later release no longer knows, or a value it cannot read, costs that
        key only, not the practice's other overrides (its code sets decide how its time is
        billed)."""
        usable: dict[str, Any] = {}
        problems: list[str] = []
        for key, value in overrides.items():
            try:
                self.merged({key: value}, strict=False)
            except ConfigInvalid as exc:
                problems.append(str(exc))
            else:
                usable[key] = value
        return self.merged(usable, strict=False), problems

    def check_roles(self) -> None:
        """A role code in two role lists would be classified by the lists' order, silently."""
        lists = ("billing_practitioner_roles", "clinical_staff_roles", "non_clinical_roles")
        for i, first in enumerate(lists):
            for second in lists[i + 1:]:
                if both := sorted(set(getattr(self, first)) & set(getattr(self, second))):
                    raise ConfigInvalid(f"{both[0]!r} is in both {first} and {second}: a role "
                                        "is one kind; remove it from one of them")


DEFAULT_CONFIG = IngestConfig()

# The resource types whose CCM mapping (``mapping.py``) reads each key: when a key changes, the
# practice's current resources of these types are mapped again and what changes is emitted
# (``service_layer/remapping.py``). Every key is listed (a test holds it).
ENCOUNTER_ROLES = ("Encounter", "PractitionerRole")  # a role's kind, and its time's performers
MAPPED_BY: dict[str, tuple[str, ...]] = {
    "ccm_time_codes": ("Encounter",),
    "complex_codes": ("Encounter",),
    "visit_codes": ("Encounter",),
    "facility_classes": ("Encounter",),
    "length_tolerance_seconds": ("Encounter",),  # the time entry's warnings
    "consent_categories": ("Consent",),
    "consent_scopes": ("Consent",),
    "care_plan_categories": ("CarePlan",),
    "care_plan_intents": ("CarePlan",),
    "billing_practitioner_roles": ENCOUNTER_ROLES,
    "clinical_staff_roles": ENCOUNTER_ROLES,
    "non_clinical_roles": ENCOUNTER_ROLES,
    "chronic_categories": ("Condition",),
    "chronic_codes": ("Condition",),
    # Read by the expiry job at each pass, never by the mapping: what a consent keeps (its
    # expiresOn) does not depend on it, so a new lead applies at the next pass as it is.
    "consent_expiring_lead_days": (),
}


def remapped_types(before: IngestConfig, after: IngestConfig) -> tuple[str, ...]:
    """The resource types whose mapping the change from ``before`` to ``after`` may change, in
    the order they are mapped again (the order writers lock rows in: type, then id)."""
    changed = [f.name for f in fields(IngestConfig) if getattr(before, f.name) !=
               getattr(after, f.name)]
    return tuple(sorted({t for key in changed for t in MAPPED_BY[key]}))


@lru_cache(maxsize=256)
def _compiled(patterns: tuple[str, ...]) -> tuple[frozenset[str], tuple[tuple[str, str], ...]]:
    """(exact ``system|code`` set, (system, code prefix) pairs) of a pattern list."""
    exact = frozenset(p for p in patterns if not p.endswith("*"))
    prefixes = tuple((system, code[:-1]) for system, _, code in
                     (p.partition("|") for p in patterns if p.endswith("*")))
    return exact, prefixes


def code_matches(patterns: tuple[str, ...], system: str | None, code: str | None) -> bool:
    """True when ``system|code`` matches one of ``patterns`` (``*`` suffix = prefix match)."""
    if not code:
        return False
    exact, prefixes = _compiled(patterns)
    system = system or ""
    if f"{system}|{code}" in exact:
        return True
    for p_system, p_code in prefixes:  # a loop, not any(<generator>): called per coding
        if system == p_system and code.startswith(p_code):
            return True
    return False


def any_coding_matches(patterns: tuple[str, ...], codings: list[dict]) -> bool:
    for c in codings:
        if code_matches(patterns, c.get("system"), c.get("code")):
            return True
    return False

