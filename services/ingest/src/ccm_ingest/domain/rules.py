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
        if type(value) is str and value not in allowed:  # another JSON type: the library says
            issues.append(_err(
                "code-invalid",
                f"{rtype}.{element} {value!r} is not in the required value set "
                f"({', '.join(sorted(allowed))})",
                f"{rtype}.{element}",
            ))
    check = _TYPE_CHECKS.get(rtype)
    if check is not None:
        issues += check(resource)
    issues += _identifier_lengths(resource, rtype)
    reference_issues, local = _references(resource, rtype)
    issues += reference_issues
    issues += subject_targets(resource, rtype)
    if "contained" in resource:
        issues += _contained(resource, rtype, local)
    return issues


def _contained(resource: dict[str, Any], rtype: str,
               local: list[tuple[str, str]]) -> list[Issue]:
    """R4's rules for contained resources, which are part of their container with no identity of
    their own: each has a resourceType and an id, contains nothing (dom-2), has no
    meta.versionId or meta.lastUpdated (dom-4) and is referred to from the resource (dom-3,
    ``#id``); a ``#id`` reference names one of them (``#`` alone: the container), and no two
    share an id."""
    items = resource["contained"] if isinstance(resource["contained"], list) else []
    issues: list[Issue] = []
    ids: dict[str, str] = {}
    refs = list(local)  # the container's own # references (``_references`` found them)
    for i, item in enumerate(items):
        at = f"{rtype}.contained[{i}]"
        if not isinstance(item, dict):
            continue  # the datatype check says so
        if not isinstance(item.get("resourceType"), str) or not item["resourceType"]:
            issues.append(_err("structure", "a contained resource needs its resourceType",
                               f"{at}.resourceType"))
            continue
        if isinstance(item.get("id"), str) and item["id"]:
            if item["id"] in ids:  # which one a #id reference names would be a guess
                issues.append(_err("duplicate", f"contained resource id {item['id']!r} is "
                                   f"already the id of {ids[item['id']]}: contained ids are "
                                   "unique within their resource", f"{at}.id"))
            else:
                ids[item["id"]] = at
        else:
            issues.append(_err("required", "a contained resource needs an id: it is referred "
                               "to as #id", f"{at}.id"))
        if "contained" in item:
            issues.append(_err("invariant", "dom-2: a contained resource SHALL NOT contain "
                               "resources", f"{at}.contained"))
        meta = item.get("meta")
        if isinstance(meta, dict) and ("versionId" in meta or "lastUpdated" in meta):
            issues.append(_err("invariant", "dom-4: a contained resource SHALL NOT have "
                               "meta.versionId or meta.lastUpdated", f"{at}.meta"))
        modifiers: list[str] = []
        refs += [(w, r) for w, r in _walk_references(item, at, modifiers) if r.startswith("#")]
        issues += _not_understood(modifiers, item, at)
    issues += [_no_contained(where, ref) for where, ref in refs
               if ref != "#" and ref[1:] not in ids]
    # dom-3 counts any element whose value is "#id" (references, canonicals, uris).
    named = {value[1:] for value in _strings(resource) if value.startswith("#")}
    # ... or it refers to its container ("#" alone) from within itself
    named |= {item["id"] for item in items if isinstance(item, dict)
              and isinstance(item.get("id"), str) and "#" in _strings(item)}
    issues += [_err("invariant", f"dom-3: contained resource #{cid} is referred to from nowhere "
                    "in the resource", at) for cid, at in ids.items() if cid not in named]
    return issues


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


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


# The longest identifier system and value kept for ``identifier`` searches and conditional
# creates (a database column's width): a longer one would not be found again, and a
# conditional create on it would create the resource anew every time.
MAX_IDENTIFIER_LENGTH = 500


def _identifier_lengths(resource: dict[str, Any], rtype: str) -> list[Issue]:
    found = resource.get("identifier")
    return [_err("too-long", f"{rtype}.identifier[{i}].{part} has {len(text):,} characters; "
                 f"identifiers are searched and matched on at most {MAX_IDENTIFIER_LENGTH}",
                 f"{rtype}.identifier[{i}].{part}")
            for i, ident in enumerate(found if isinstance(found, list) else [])
            if isinstance(ident, dict)
            for part in ("system", "value")
            if isinstance(text := ident.get(part), str) and len(text) > MAX_IDENTIFIER_LENGTH]


def _codes(concept: Any) -> list[tuple[Any, str]]:
    """(system, code) of a CodeableConcept's codings whose code is text: these rules run before
    the library checks the JSON types, and another type is the library's to refuse (a count or
    a list where a coding or code belongs answered 500)."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(codings, list):
        return []
    return [(c.get("system"), c["code"]) for c in codings
            if isinstance(c, dict) and type(c.get("code")) is str]


def _encounter(resource: dict[str, Any]) -> list[Issue]:
    cls = resource.get("class")
    if isinstance(cls, dict) and cls.get("system") not in (None, ACT_CODE):
        return [_err("code-invalid", f"Encounter.class.system must be {ACT_CODE} "
                     f"(v3 ActEncounterCode), not {cls.get('system')!r}", "Encounter.class.system")]
    if isinstance(cls, dict) and cls.get("system") is None:
        return [_err("required", f"Encounter.class needs system {ACT_CODE}",
                     "Encounter.class.system")]
    code = cls.get("code") if isinstance(cls, dict) else None
    if type(code) is str and code not in ENCOUNTER_CLASSES:
        return [_err("code-invalid", f"Encounter.class.code {code!r} is not a v3 "
                     f"ActEncounterCode ({', '.join(sorted(ENCOUNTER_CLASSES))})",
                     "Encounter.class.code")]
    return []


# The v3 ActEncounterCode value set (R4's binding of Encounter.class).
ENCOUNTER_CLASSES = frozenset({"AMB", "EMER", "FLD", "HH", "IMP", "ACUTE", "NONAC", "OBSENC",
                               "PRENC", "SS", "VR"})


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


REVIEW_EXTENSION = "http://ccm-platform.org/fhir/StructureDefinition/care-plan-review"
REVIEWER_TYPES = ("Practitioner", "PractitionerRole")


_TYPED = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[^/]+)?$")


def _reference_type(ref: str) -> str | None:
    """The resource type a reference names ("" if none); None for ``urn:uuid:`` (a Bundle
    entry, known once the Bundle resolves it)."""
    if ref.startswith("urn:uuid:"):
        return None
    if "?" in ref:
        return ref.partition("?")[0]
    match = _TYPED.search(ref)
    return match.group(1) if match else ""


def review_extensions(resource: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(index, extension) of the platform's care-plan-review extensions on a CarePlan."""
    return [(i, e) for i, e in enumerate(resource.get("extension") or [])
            if isinstance(e, dict) and e.get("url") == REVIEW_EXTENSION]


def _care_plan(resource: dict[str, Any]) -> list[Issue]:
    """The care-plan-review extension (review evidence): at most one, complex (no value[x]),
    with exactly one ``date`` (valueDateTime, at least a day) and at most one ``reviewer``
    (valueReference to a Practitioner or PractitionerRole)."""
    found = review_extensions(resource)
    issues = [_err("invariant", f"a CarePlan version carries at most one {REVIEW_EXTENSION} "
                   f"extension (review evidence); this one has {len(found)}",
                   f"CarePlan.extension[{i}]") for i, _ in found[1:]]
    for i, ext in found[:1]:
        where = f"CarePlan.extension[{i}]"
        values = [k for k in ext if k.startswith("value")]
        if values:
            issues.append(_err("structure", f"{REVIEW_EXTENSION} is a complex extension: "
                               "sub-extensions date and reviewer, no value[x]",
                               f"{where}.{values[0]}"))
        subs = [(j, sub) for j, sub in enumerate(ext.get("extension") or [])
                if isinstance(sub, dict)]
        dates = [(j, sub) for j, sub in subs if sub.get("url") == "date"]
        reviewers = [(j, sub) for j, sub in subs if sub.get("url") == "reviewer"]
        issues += [_err("structure", f"unknown sub-extension {sub.get('url')!r} of "
                        f"{REVIEW_EXTENSION}; allowed: date, reviewer",
                        f"{where}.extension[{j}].url")
                   for j, sub in subs if sub.get("url") not in ("date", "reviewer")]
        if len(dates) != 1:
            issues.append(_err("required", f"review evidence needs exactly one "
                               f"extension[url=date] (it has {len(dates)})", f"{where}.extension"))
        for j, sub in dates[:1]:
            when = sub.get("valueDateTime")
            if not isinstance(when, str) or len(when) < 10:
                other = next((k for k in sub if k.startswith("value")), "valueDateTime")
                issues.append(_err(
                    "value", "extension[url=date] needs valueDateTime with at least a full day "
                    "(YYYY-MM-DD), e.g. 2026-03-10T14:30:00-05:00",
                    f"{where}.extension[{j}].{other}"))
        if len(reviewers) > 1:
            issues.append(_err("invariant", "review evidence has at most one "
                               "extension[url=reviewer]", f"{where}.extension[{reviewers[1][0]}]"))
        for j, sub in reviewers[:1]:
            ref = sub.get("valueReference")
            ref = ref.get("reference") if isinstance(ref, dict) else None
            kind = _reference_type(ref) if isinstance(ref, str) else ""
            if kind is not None and kind not in REVIEWER_TYPES:
                issues.append(_err(
                    "value", "extension[url=reviewer] needs valueReference.reference to a "
                    "Practitioner or PractitionerRole", f"{where}.extension[{j}].valueReference"))
    return issues


_TYPE_CHECKS = {"Encounter": _encounter, "Consent": _consent, "Condition": _condition,
                "CarePlan": _care_plan}


def _walk_references(value: Any, path: str,
                     modifiers: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(where, reference) of every Reference; the paths of modifier extensions go to
    ``modifiers`` when given (one walk for both)."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            yield f"{path}.reference", ref
        for key, item in value.items():
            if key in ("contained", "text"):
                continue
            if key == "modifierExtension" and modifiers is not None and item:
                modifiers.append(f"{path}.{key}")
            yield from _walk_references(item, f"{path}.{key}", modifiers)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk_references(item, f"{path}[{i}]", modifiers)


def _has_local_reference(resource: dict[str, Any], conditional: bool) -> bool:
    pending: list[Any] = [v for k, v in resource.items() if k not in ("contained", "text")]
    while pending:
        value = pending.pop()
        if type(value) is dict:
            ref = value.get("reference")
            if type(ref) is str and (ref.startswith(_LOCAL) or (conditional and "?" in ref)):
                return True
            pending += value.values()
        elif type(value) is list:
            pending += value
    return False


_LOCAL = ("urn:uuid:", "urn:oid:")


def unresolved_local_references(resource: dict[str, Any], rtype: str, *,
                                 alone: bool = False) -> list[Issue]:
    """References to ``urn:uuid:``/``urn:oid:`` left in a resource about to be stored: only a
    transaction Bundle's own fullUrls resolve them (each becomes ``Type/id``), so one left names
    nothing, and stored as it is it would link the resource to no patient. For a resource sent
    ``alone`` (not in a Bundle), conditional references (``Type?criteria``) too: only Bundles
    resolve them."""
    if not _has_local_reference(resource, alone):  # the usual case, without building paths
        return []
    issues = []
    for where, ref in _walk_references(resource, rtype):
        if ref.startswith(_LOCAL):
            issues.append(_err(
                "not-found", f"{where} {ref!r} names nothing here: a urn:uuid:/urn:oid: "
                "reference must be the fullUrl of an entry of the same transaction Bundle that "
                "creates or updates a resource (batch entries and resources sent alone cannot "
                "use them)", where))
        elif alone and _CONDITIONAL.match(ref):
            issues.append(_err("not-supported", f"{where} {ref!r}: a conditional reference is "
                               "resolved only inside a transaction or batch Bundle", where))
    return issues


_CONDITIONAL = re.compile(r"^[A-Za-z]+\?")


# The types R4 lets these elements reference (a CCM patient link): anything else is refused,
# or the resource would be stored linked to no patient.
SUBJECT_TARGETS = {("Encounter", "subject"): ("Patient", "Group"),
                   ("Condition", "subject"): ("Patient", "Group"),
                   ("CarePlan", "subject"): ("Patient", "Group"),
                   ("Consent", "patient"): ("Patient",)}


_TARGET = re.compile(r"(?:^|/)([A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[^/]+)?$")


def subject_targets(resource: dict[str, Any], rtype: str) -> list[Issue]:
    """A patient link of another type than R4 allows (``urn:`` ones are checked once a
    transaction has resolved them)."""
    issues = []
    for (of, element), targets in SUBJECT_TARGETS.items():
        value = resource.get(element) if of == rtype else None
        ref = value.get("reference") if isinstance(value, dict) else None
        if not isinstance(ref, str) or ref.startswith(("#", "urn:")):
            continue
        found = _TARGET.search(ref) if "?" not in ref else None
        if found is None and "?" not in ref:
            continue  # no reference at all: its format issue says so
        target = found.group(1) if found else ref.split("?", 1)[0]
        if target not in targets:
            issues.append(_err("value", f"{rtype}.{element} references a {target}; R4 allows "
                               f"{' or '.join(targets)}", f"{rtype}.{element}.reference"))
    return issues


def _references(resource: dict[str, Any], rtype: str,
                ) -> tuple[list[Issue], list[tuple[str, str]]]:
    """(references that are none, and ``#id`` ones in a resource that contains nothing; the
    ``#`` references it holds, for ``_contained`` to check against what it contains)."""
    contains = "contained" in resource
    issues, local = [], []
    modifiers: list[str] = []
    for where, ref in _walk_references(resource, rtype, modifiers):
        if ref[:1] == "#":
            local.append((where, ref))
        if not _REFERENCE.match(ref):
            issues.append(_err("value", f"{where} {ref!r} is not a FHIR reference (Type/id, an "
                               "absolute URL, #contained, urn:uuid: or a conditional "
                               "Type?search)", where))
        elif ref[:1] == "#" and ref != "#" and not contains:
            issues.append(_no_contained(where, ref))
    issues += _not_understood(modifiers, resource, rtype)
    return issues, local


def _not_understood(modifiers: list[str], resource: dict[str, Any], at: str) -> list[Issue]:
    """FHIR: a modifier extension (or implicitRules) may change what the data means ("not
    performed"); a system that does not know it SHALL NOT process the data as if it were
    absent. None is known here, so none is taken: counted, it could bill care never given."""
    issues = [_err("not-supported", f"{where} is not understood here and may change what "
                   "this resource means, so it cannot be taken (FHIR: modifier extensions "
                   "must not be ignored)", where) for where in modifiers]
    if "implicitRules" in resource:
        issues.append(_err("not-supported", f"{at}.implicitRules is not understood here and "
                           "may change what the resource means, so it cannot be taken",
                           f"{at}.implicitRules"))
    return issues


def _no_contained(where: str, ref: str) -> Issue:
    return _err("not-found", f"{where} {ref!r} names no contained resource", where)
