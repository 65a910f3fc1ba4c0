"""What ``fhir.resources`` does not check and ingest relies on: required value-set bindings,
the R4 invariants we use (Consent ppc-1..5, Condition con-4/con-5), R5-only shapes and reference
formats. Pure functions over the decoded JSON; each issue names its element (``expression``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from ccm_ingest.domain.model import Issue

# Required bindings in R4 4.0.1 (the full code lists, not fhir.resources' truncated ones).
REQUIRED_BINDINGS: dict[str, dict[str, frozenset[str]]] = {
    "Encounter": {
        "status": frozenset(
            "planned arrived triaged in-progress onleave finished cancelled entered-in-error "
            "unknown".split()
        ),
    },
    "Consent": {
        "status": frozenset("draft proposed active rejected inactive entered-in-error".split()),
    },
    "CarePlan": {
        "status": frozenset(
            "draft active on-hold revoked completed entered-in-error unknown".split()
        ),
        "intent": frozenset("proposal plan order option".split()),
    },
    "Patient": {"gender": frozenset("male female other unknown".split())},
    "Practitioner": {"gender": frozenset("male female other unknown".split())},
}
CONDITION_CLINICAL = frozenset("active recurrence relapse inactive remission resolved".split())
CONDITION_VERIFICATION = frozenset(
    "unconfirmed provisional differential confirmed refuted entered-in-error".split()
)
CLINICAL_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"

# Elements that exist only in R5 (or changed shape there): a payload carrying them is R5.
R5_ONLY: dict[str, tuple[str, ...]] = {
    "Encounter": ("actualPeriod", "plannedStartDate", "plannedEndDate", "virtualService",
                  "careTeam", "admission", "subjectStatus", "reason"),
    "Consent": ("decision", "controller", "grantor", "grantee", "manager", "subject", "date",
                "regulatoryBasis", "policyBasis", "policyText"),
    "CarePlan": ("custodian", "addresses.concept"),
    "Condition": ("participant",),
}

_REFERENCE = re.compile(
    r"^(#[A-Za-z0-9\-.]*"
    r"|[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?"
    r"|[A-Z][A-Za-z]+\?\S+"
    r"|https?://\S+/[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?"
    r"|urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|urn:oid:[0-2](\.(0|[1-9][0-9]*))+)$"
)


def _err(code: str, message: str, expression: str) -> Issue:
    return Issue("error", code, message, (expression,))


def check_resource(resource: dict[str, Any]) -> list[Issue]:
    """Every rule of ours the resource breaks (an empty list: it passes)."""
    rtype = resource.get("resourceType", "")
    issues: list[Issue] = []
    issues += _r5_shapes(rtype, resource)
    for element, allowed in REQUIRED_BINDINGS.get(rtype, {}).items():
        value = resource.get(element)
        if value is not None and value not in allowed:
            issues.append(_err(
                "code-invalid",
                f"{rtype}.{element} {value!r} is not in the required value set "
                f"({', '.join(sorted(allowed))})",
                f"{rtype}.{element}",
            ))
    check = _TYPE_CHECKS.get(rtype)
    if check is not None:
        issues += check(resource)
    issues += _references(resource, rtype)
    return issues


def _r5_shapes(rtype: str, resource: dict[str, Any]) -> list[Issue]:
    issues = []
    if rtype == "Encounter" and isinstance(resource.get("class"), list):
        issues.append(_err("structure", "Encounter.class is a list: that is the R5 shape; "
                           "FHIR R4 has a single Coding", "Encounter.class"))
    for element in R5_ONLY.get(rtype, ()):
        head, _, tail = element.partition(".")
        value = resource.get(head)
        if value is None:
            continue
        if tail:
            items = value if isinstance(value, list) else [value]
            if not any(isinstance(i, dict) and tail in i for i in items):
                continue
        issues.append(_err("structure", f"{rtype}.{element} is an R5 element; this endpoint "
                           "speaks FHIR R4", f"{rtype}.{element}"))
    return issues


def _codes(concept: Any) -> list[tuple[str | None, str | None]]:
    if not isinstance(concept, dict):
        return []
    return [(c.get("system"), c.get("code")) for c in concept.get("coding") or []
            if isinstance(c, dict)]


def _encounter(resource: dict[str, Any]) -> list[Issue]:
    cls = resource.get("class")
    if isinstance(cls, dict) and cls.get("system") not in (None, ACT_CODE):
        return [_err("code-invalid", f"Encounter.class.system must be {ACT_CODE} "
                     f"(v3 ActEncounterCode), not {cls.get('system')!r}", "Encounter.class.system")]
    if isinstance(cls, dict) and cls.get("system") is None:
        return [_err("required", f"Encounter.class needs system {ACT_CODE}",
                     "Encounter.class.system")]
    return []


def _consent(resource: dict[str, Any]) -> list[Issue]:
    issues = []
    if not resource.get("policy") and not resource.get("policyRule"):
        issues.append(_err("invariant", "ppc-1: a Consent needs a policy or a policyRule",
                           "Consent.policyRule"))
    scopes = {code for system, code in _codes(resource.get("scope")) if system == CONSENT_SCOPE}
    for code, rule in (("patient-privacy", "ppc-2"), ("research", "ppc-3"), ("adr", "ppc-4"),
                       ("treatment", "ppc-5")):
        if code in scopes and not resource.get("patient"):
            issues.append(_err("invariant", f"{rule}: a Consent with scope {code} needs a patient",
                               "Consent.patient"))
    return issues


def _condition(resource: dict[str, Any]) -> list[Issue]:
    issues = []
    clinical = [c for s, c in _codes(resource.get("clinicalStatus")) if s == CLINICAL_SYSTEM]
    verification = [c for s, c in _codes(resource.get("verificationStatus"))
                     if s == VERIFICATION_SYSTEM]
    for code in clinical:
        if code not in CONDITION_CLINICAL:
            issues.append(_err("code-invalid", f"Condition.clinicalStatus {code!r} is not in the "
                               "required value set", "Condition.clinicalStatus"))
    for code in verification:
        if code not in CONDITION_VERIFICATION:
            issues.append(_err("code-invalid", f"Condition.verificationStatus {code!r} is not in "
                               "the required value set", "Condition.verificationStatus"))
    has_abatement = any(k.startswith("abatement") for k in resource)
    if has_abatement and clinical and not set(clinical) & {"inactive", "resolved", "remission"}:
        issues.append(_err("invariant", "con-4: an abated Condition must have clinicalStatus "
                           "inactive, resolved or remission", "Condition.clinicalStatus"))
    if "entered-in-error" in verification and resource.get("clinicalStatus"):
        issues.append(_err("invariant", "con-5: clinicalStatus must be absent when "
                           "verificationStatus is entered-in-error", "Condition.clinicalStatus"))
    return issues


_TYPE_CHECKS = {"Encounter": _encounter, "Consent": _consent, "Condition": _condition}


def _walk_references(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            yield f"{path}.reference", ref
        for key, item in value.items():
            if key in ("contained", "text"):
                continue
            yield from _walk_references(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk_references(item, f"{path}[{i}]")


def _references(resource: dict[str, Any], rtype: str) -> list[Issue]:
    return [
        _err("value", f"{where} {ref!r} is not a FHIR reference (Type/id, an absolute URL, "
             "#contained, urn:uuid: or a conditional Type?search)", where)
        for where, ref in _walk_references(resource, rtype)
        if not _REFERENCE.match(ref)
    ]
