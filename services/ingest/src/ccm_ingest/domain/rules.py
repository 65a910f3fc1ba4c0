"""What ``fhir.resources`` does not check and ingest relies on: required value-set bindings,
the R4 invariants we use (Consent ppc-1..5, Condition con-4/con-5, Period per-1, ContactPoint
cpt-2, Quantity qty-3 and its profiles' drt-1, age-1, cnt-3, dis-1), R5-only shapes and
reference formats. Pure functions over the decoded JSON; each issue names its element
(``expression``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from ccm_ingest.domain.model import SUPPORTED_TYPES, Issue


class ValueSet(NamedTuple):
    """An R4 value set a code element is bound to (required): its id and its codes, in the
    spec's order (the order messages list them in)."""

    name: str
    codes: tuple[str, ...]
    members: frozenset[str]


def _value_set(name: str, codes: str) -> ValueSet:
    return ValueSet(name, tuple(codes.split()), frozenset(codes.split()))


# Required bindings in R4 4.0.1 (the full code lists, not fhir.resources' truncated ones).
GENDER = _value_set("administrative-gender", "male female other unknown")
QUANTITY_COMPARATOR = _value_set("quantity-comparator", "< <= >= >")
DAYS_OF_WEEK = _value_set("days-of-week", "mon tue wed thu fri sat sun")
UNITS_OF_TIME = _value_set("units-of-time", "s min h d wk mo a")
ENCOUNTER_STATUS = _value_set(
    "encounter-status",
    "planned arrived triaged in-progress onleave finished cancelled entered-in-error unknown")
# Types and backbone elements (``Type.element``) → code element → its required value set;
# ``_ELEMENTS`` says where each occurs, so they are checked wherever they do, contained
# resources included.
REQUIRED_BINDINGS: dict[str, dict[str, ValueSet]] = {
    "Encounter": {"status": ENCOUNTER_STATUS},
    "Encounter.statusHistory": {"status": ENCOUNTER_STATUS},
    "Encounter.location": {"status": _value_set("encounter-location-status",
                                                "planned active reserved completed")},
    "Consent": {"status": _value_set(
        "consent-state-codes", "draft proposed active rejected inactive entered-in-error")},
    "Consent.provision": {"type": _value_set("consent-provision-type", "deny permit")},
    "Consent.provision.data": {"meaning": _value_set(
        "consent-data-meaning", "instance related dependents authoredby")},
    "CarePlan": {
        "status": _value_set("request-status",
                             "draft active on-hold revoked completed entered-in-error unknown"),
        "intent": _value_set("care-plan-intent", "proposal plan order option"),
    },
    "CarePlan.activity.detail": {
        "kind": _value_set("care-plan-activity-kind",
                           "Appointment CommunicationRequest DeviceRequest MedicationRequest "
                           "NutritionOrder Task ServiceRequest VisionPrescription"),
        "status": _value_set("care-plan-activity-status",
                             "not-started scheduled in-progress on-hold completed cancelled "
                             "stopped unknown entered-in-error"),
    },
    "Patient": {"gender": GENDER},
    "Patient.contact": {"gender": GENDER},
    "Patient.link": {"type": _value_set("link-type", "replaced-by replaces refer seealso")},
    "Practitioner": {"gender": GENDER},
    "PractitionerRole.availableTime": {"daysOfWeek": DAYS_OF_WEEK},
    # datatypes
    "HumanName": {"use": _value_set("name-use",
                                    "usual official temp nickname anonymous old maiden")},
    "ContactPoint": {
        "system": _value_set("contact-point-system", "phone fax email pager url sms other"),
        "use": _value_set("contact-point-use", "home work temp old mobile"),
    },
    "Address": {"use": _value_set("address-use", "home work temp old billing"),
                "type": _value_set("address-type", "postal physical both")},
    "Identifier": {"use": _value_set("identifier-use", "usual official temp secondary old")},
    "Quantity": {"comparator": QUANTITY_COMPARATOR},
    # Quantity's profiles: the same comparator (their own invariants: _INVARIANTS)
    **dict.fromkeys(("Age", "Count", "Distance", "Duration"),
                    {"comparator": QUANTITY_COMPARATOR}),
    "Narrative": {"status": _value_set("narrative-status",
                                       "generated extensions additional empty")},
    "Timing.repeat": {
        "durationUnit": UNITS_OF_TIME,
        "periodUnit": UNITS_OF_TIME,
        "dayOfWeek": DAYS_OF_WEEK,
        "when": _value_set("event-timing",
                           "MORN MORN.early MORN.late NOON AFT AFT.early AFT.late EVE EVE.early "
                           "EVE.late NIGHT PHS HS WAKE C CM CD CV AC ACM ACD ACV PC PCM PCD PCV"),
    },
}
CLINICAL_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
# Required bindings on CodeableConcepts: one coding at least is of the value set's system with
# one of its codes (text alone, or codes of other systems only, do not meet them).
REQUIRED_CONCEPTS: dict[str, dict[str, tuple[str, ValueSet]]] = {
    "Condition": {
        "clinicalStatus": (CLINICAL_SYSTEM, _value_set(
            "condition-clinical", "active recurrence relapse inactive remission resolved")),
        "verificationStatus": (VERIFICATION_SYSTEM, _value_set(
            "condition-ver-status",
            "unconfirmed provisional differential confirmed refuted entered-in-error")),
    },
}
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"

# Where the elements with bindings or invariants occur in the supported types (R4 4.0.1):
# element → its type, a key of this table (Age, Count, Distance and Duration are Quantities
# with invariants of their own; SimpleQuantity has no comparator and no rule here). Every type
# listed also carries ``extension`` (Extension) and every resource ``text`` (Narrative) and
# ``contained``.
_ELEMENTS: dict[str, dict[str, str]] = {
    "Patient": {"identifier": "Identifier", "name": "HumanName", "telecom": "ContactPoint",
                "address": "Address", "contact": "Patient.contact",
                "generalPractitioner": "Reference", "managingOrganization": "Reference",
                "link": "Patient.link"},
    "Patient.contact": {"name": "HumanName", "telecom": "ContactPoint", "address": "Address",
                        "organization": "Reference", "period": "Period"},
    "Patient.link": {"other": "Reference"},
    "Practitioner": {"identifier": "Identifier", "name": "HumanName", "telecom": "ContactPoint",
                     "address": "Address", "qualification": "Practitioner.qualification"},
    "Practitioner.qualification": {"identifier": "Identifier", "period": "Period",
                                   "issuer": "Reference"},
    "PractitionerRole": {"identifier": "Identifier", "period": "Period",
                         "practitioner": "Reference", "organization": "Reference",
                         "location": "Reference", "healthcareService": "Reference",
                         "telecom": "ContactPoint",
                         "availableTime": "PractitionerRole.availableTime",
                         "notAvailable": "PractitionerRole.notAvailable",
                         "endpoint": "Reference"},
    "PractitionerRole.availableTime": {},
    "PractitionerRole.notAvailable": {"during": "Period"},
    "Organization": {"identifier": "Identifier", "partOf": "Reference",
                     "telecom": "ContactPoint", "address": "Address",
                     "contact": "Organization.contact", "endpoint": "Reference"},
    "Organization.contact": {"name": "HumanName", "telecom": "ContactPoint",
                             "address": "Address"},
    "Condition": {"identifier": "Identifier", "encounter": "Reference", "subject": "Reference",
                  "onsetAge": "Age", "onsetPeriod": "Period", "abatementAge": "Age",
                  "abatementPeriod": "Period", "recorder": "Reference", "asserter": "Reference",
                  "stage": "Condition.stage", "evidence": "Condition.evidence",
                  "note": "Annotation"},
    "Condition.stage": {"assessment": "Reference"},
    "Condition.evidence": {"detail": "Reference"},
    "CarePlan": {"identifier": "Identifier", "basedOn": "Reference", "replaces": "Reference",
                 "partOf": "Reference", "subject": "Reference", "encounter": "Reference",
                 "period": "Period", "author": "Reference", "contributor": "Reference",
                 "careTeam": "Reference", "addresses": "Reference",
                 "supportingInfo": "Reference", "goal": "Reference",
                 "activity": "CarePlan.activity", "note": "Annotation"},
    "CarePlan.activity": {"outcomeReference": "Reference", "progress": "Annotation",
                          "reference": "Reference", "detail": "CarePlan.activity.detail"},
    "CarePlan.activity.detail": {"reasonReference": "Reference", "goal": "Reference",
                                 "scheduledTiming": "Timing", "scheduledPeriod": "Period",
                                 "location": "Reference", "performer": "Reference",
                                 "productReference": "Reference"},
    "Consent": {"identifier": "Identifier", "patient": "Reference", "performer": "Reference",
                "organization": "Reference", "sourceReference": "Reference",
                "verification": "Consent.verification", "provision": "Consent.provision"},
    "Consent.verification": {"verifiedWith": "Reference"},
    "Consent.provision": {"period": "Period", "actor": "Consent.provision.actor",
                          "dataPeriod": "Period", "data": "Consent.provision.data",
                          "provision": "Consent.provision"},
    "Consent.provision.actor": {"reference": "Reference"},
    "Consent.provision.data": {"reference": "Reference"},
    "Encounter": {"identifier": "Identifier", "statusHistory": "Encounter.statusHistory",
                  "classHistory": "Encounter.classHistory", "subject": "Reference",
                  "episodeOfCare": "Reference", "basedOn": "Reference",
                  "participant": "Encounter.participant", "appointment": "Reference",
                  "period": "Period", "length": "Duration", "reasonReference": "Reference",
                  "diagnosis": "Encounter.diagnosis", "account": "Reference",
                  "hospitalization": "Encounter.hospitalization",
                  "location": "Encounter.location", "serviceProvider": "Reference",
                  "partOf": "Reference"},
    "Encounter.statusHistory": {"period": "Period"},
    "Encounter.classHistory": {"period": "Period"},
    "Encounter.participant": {"period": "Period", "individual": "Reference"},
    "Encounter.diagnosis": {"condition": "Reference"},
    "Encounter.hospitalization": {"preAdmissionIdentifier": "Identifier",
                                  "origin": "Reference", "destination": "Reference"},
    "Encounter.location": {"location": "Reference", "period": "Period"},
    # datatypes
    "Identifier": {"period": "Period", "assigner": "Reference"},
    "Reference": {"identifier": "Identifier"},
    "HumanName": {"period": "Period"},
    "ContactPoint": {"period": "Period"},
    "Address": {"period": "Period"},
    "Period": {},
    "Quantity": {},
    "Age": {},
    "Count": {},
    "Distance": {},
    "Duration": {},
    "Narrative": {},
    "Annotation": {"authorReference": "Reference"},
    "Timing": {"repeat": "Timing.repeat"},
    "Timing.repeat": {"boundsDuration": "Duration", "boundsPeriod": "Period"},
    "Ratio": {"numerator": "Quantity", "denominator": "Quantity"},
    "ContactDetail": {"telecom": "ContactPoint"},
    "Extension": {"valueAddress": "Address", "valueAge": "Age", "valueAnnotation":
                  "Annotation", "valueContactDetail": "ContactDetail",
                  "valueContactPoint": "ContactPoint", "valueCount": "Count",
                  "valueDistance": "Distance", "valueDuration": "Duration",
                  "valueHumanName": "HumanName", "valueIdentifier": "Identifier",
                  "valuePeriod": "Period", "valueQuantity": "Quantity", "valueRatio": "Ratio",
                  "valueReference": "Reference", "valueTiming": "Timing"},
}

# Elements that exist only in R5 (or changed shape there): a payload carrying them is R5.
R5_ONLY: dict[str, tuple[str, ...]] = {
    "Encounter": ("actualPeriod", "plannedStartDate", "plannedEndDate", "virtualService",
                  "careTeam", "admission", "subjectStatus", "reason"),
    "Consent": ("decision", "controller", "grantor", "grantee", "manager", "subject", "date",
                "regulatoryBasis", "policyBasis", "policyText"),
    "CarePlan": ("custodian", "addresses.concept"),
    "Condition": ("participant",),
}

# FHIR's uuid and oid types as a URI: ``urn:uuid:`` + RFC 4122's 8-4-4-4-12 hex digits (either
# case: RFC 4122 reads them case-insensitively), ``urn:oid:`` + digits and dots (ASCII digits:
# ``\d`` would take other scripts'). A reference may be one; so may a Bundle entry's fullUrl.
UUID_URN = r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
OID_URN = r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+"
_REFERENCE = re.compile(
    r"^(#[A-Za-z0-9\-.]*"
    r"|[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?"
    r"|[A-Z][A-Za-z]+\?\S+"
    r"|https?://\S+/[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?"
    rf"|{UUID_URN}|{OID_URN})$"
)


def _err(code: str, message: str, expression: str) -> Issue:
    return Issue("error", code, message, (expression,))


def check_resource(resource: dict[str, Any]) -> list[Issue]:
    """Every rule of ours the resource breaks (an empty list: it passes)."""
    rtype = resource.get("resourceType", "")
    issues: list[Issue] = []
    issues += _r5_shapes(rtype, resource)
    _check_elements(_node_of(rtype), resource, rtype, issues)
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
    """con-4 and con-5 (the bindings of clinicalStatus and verificationStatus are
    ``REQUIRED_CONCEPTS``)."""
    issues = []
    clinical = [c for s, c in _codes(resource.get("clinicalStatus")) if s == CLINICAL_SYSTEM]
    verification = [c for s, c in _codes(resource.get("verificationStatus"))
                     if s == VERIFICATION_SYSTEM]
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


# ---- Required bindings and datatype invariants, wherever their elements occur -----------------

# Where an element is, as the walk goes: the resource type, or (where its parent is, its name)
# or (where its parent is, its name, its index), made text (``_path``) only for an issue.
_At = str | tuple[Any, ...]


def _path(at: _At) -> str:
    parts = []
    while type(at) is tuple:
        parts.append(f".{at[1]}[{at[2]}]" if len(at) == 3 else f".{at[1]}")
        at = at[0]
    return at + "".join(reversed(parts))


def _node_of(rtype: Any) -> _Node:
    """The node a resource of type ``rtype`` is checked as (any resource's for an unsupported
    type or a resourceType that is no string)."""
    return _NODES.get(rtype, _ANY_RESOURCE) if type(rtype) is str else _ANY_RESOURCE


def _check_elements(node: _Node, value: dict[str, Any], at: _At, issues: list[Issue]) -> None:
    """The bindings and invariants of ``node`` (a type of ``_ELEMENTS``) on ``value``, and of
    the elements in it that have some: only those are descended into (this runs on every
    resource). A value of another JSON type than FHIR's is skipped: the library says so."""
    if node.invariant is not None:
        node.invariant(value, at, issues)
    elements = node.elements
    for key, item in value.items():
        found = elements.get(key)
        if found is None:
            continue
        kind, what = found
        if kind is _CHILD:  # entered only if it has something to check (most References not)
            if type(item) is dict:
                if what.invariant is not None or not what.keys.isdisjoint(item):
                    _check_elements(what, item, (at, key), issues)
            elif type(item) is list:
                for i, one in enumerate(item):
                    if type(one) is dict and (what.invariant is not None
                                              or not what.keys.isdisjoint(one)):
                        _check_elements(what, one, (at, key, i), issues)
        elif kind is _CODE:
            if type(item) is str:
                if item not in what.members:
                    issues.append(_not_in(_path((at, key)), item, what))
            elif type(item) is list:  # a repeating code (daysOfWeek)
                issues += [_not_in(_path((at, key, i)), one, what) for i, one in enumerate(item)
                           if type(one) is str and one not in what.members]
        elif kind is _CONCEPT:
            _required_concept(item, (at, key), *what, issues)
        elif type(item) is list:  # _CONTAINED: each as a resource of its type
            for i, one in enumerate(item):
                if type(one) is dict:
                    rtype = one.get("resourceType")
                    _check_elements(_node_of(rtype), one, (at, key, i), issues)


def _not_in(where: str, code: str, value_set: ValueSet) -> Issue:
    return _err("code-invalid", f"{where} {code!r} is not in the required value set "
                f"{value_set.name} ({', '.join(value_set.codes)})", where)


def _required_concept(concept: Any, at: _At, system: str, value_set: ValueSet,
                      issues: list[Issue]) -> None:
    """A CodeableConcept bound (required) to ``value_set``: one coding at least of ``system``
    with one of its codes; a coding of ``system`` with another code is named."""
    if type(concept) is not dict:
        return
    codings = concept.get("coding", [])
    if type(codings) is not list:
        return
    if any(type(c) is not dict or type(c.get("code", "")) is not str
           or type(c.get("system", "")) is not str for c in codings):
        return  # a coding or code of another JSON type: the library's to refuse
    found = False
    for i, coding in enumerate(codings):
        if coding.get("system") == system and "code" in coding:
            found = True
            if coding["code"] not in value_set.members:
                issues.append(_not_in(f"{_path(at)}.coding[{i}].code", coding["code"],
                                      value_set))
    if not found:
        where = _path(at)
        what = "codings of no or another system do not" if codings else "text alone does not"
        issues.append(_err("code-invalid", f"{where} needs a coding of {system} with a code "
                           f"of the required value set {value_set.name} "
                           f"({', '.join(value_set.codes)}); {what} meet a required binding",
                           where))


def _per_1(period: dict[str, Any], at: _At, issues: list[Issue]) -> None:
    """per-1: a Period's start is not after its end (when both are given)."""
    start, end = period.get("start"), period.get("end")
    if type(start) is str and type(end) is str and _starts_after_end(start, end):
        path = _path(at)
        issues.append(_err("invariant", f"per-1: {path}.end is before period.start ({end!r} "
                           f"ends before {start!r} begins); a period ends at or after its start",
                           path))


# YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.fraction][zone] (the library checks forms)
_DATE_TIME = re.compile(r"(\d{4})(?:-(\d\d)(?:-(\d\d)(?:T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?"
                        r"(Z|[+-]\d\d:\d\d)?)?)?)?")
_ONE_MICROSECOND = timedelta(microseconds=1)
# A date (no zone) compared with an instant: the date may be in any zone, UTC+14 to UTC-12.
_EARLIEST_ZONE, _LATEST_ZONE = timedelta(hours=14), timedelta(hours=12)


def _span(match: re.Match[str]) -> tuple[datetime, datetime, bool] | None:
    """The first instant a date/dateTime covers, the first after it (``2026`` covers all of
    2026), and whether it has a zone (zoned instants are in UTC); None for no such date."""
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        if hour is not None:
            first = datetime(int(year), int(month), int(day), int(hour), int(minute),
                             int(second), int((fraction or "0")[:6].ljust(6, "0")))
            after = first + _ONE_MICROSECOND
            if zone is None:
                return first, after, False
            if zone != "Z":
                offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
                offset = offset if zone[0] == "+" else -offset
                first, after = first - offset, after - offset
            return first, after, True
        y = int(year)
        if day is not None:
            first = datetime(y, int(month), int(day))
            return first, first + timedelta(days=1), False
        if month is not None:
            m = int(month)
            return (datetime(y, m, 1),
                    datetime(y + m // 12, m % 12 + 1, 1) if y < 9999 or m < 12 else datetime.max,
                    False)
        return datetime(y, 1, 1), datetime(y + 1, 1, 1) if y < 9999 else datetime.max, False
    except (ValueError, OverflowError):  # no such day (2026-02-30): the library says
        return None


def _starts_after_end(start: str, end: str) -> bool:
    """Whether ``start`` is certainly after ``end``: a partial date covers all its instants
    ("2026-03" to "2026-03-01" is a period), and a date without a zone compared with an instant
    may be in any zone."""
    starts, ends = _DATE_TIME.fullmatch(start), _DATE_TIME.fullmatch(end)
    if starts is None or ends is None:
        return False  # not a dateTime: the library says
    # The usual cases without building datetimes: the forms are fixed-width, so dates (of any
    # precision) compare as text on what both give, and instants of one form and zone too.
    if starts[4] is None and ends[4] is None:
        common = min(len(start), len(end))
        return start[:common] > end[:common]
    if len(start) == len(end) and starts[8] is not None and starts[8] == ends[8]:
        return start > end
    first, last = _span(starts), _span(ends)
    if first is None or last is None:
        return False
    begins, _, zoned = first
    _, ends_before, end_zoned = last
    try:
        if zoned != end_zoned:
            begins = begins if zoned else begins - _EARLIEST_ZONE
            ends_before = ends_before if end_zoned else ends_before + _LATEST_ZONE
    except OverflowError:
        return False
    return begins >= ends_before


def _cpt_2(point: dict[str, Any], at: _At, issues: list[Issue]) -> None:
    """cpt-2: a ContactPoint with a value says which system it is of."""
    if point.get("value") is not None and "system" not in point:
        path = _path(at)
        issues.append(_err("invariant", f"cpt-2: {path}.system is missing: a ContactPoint "
                           "with a value says which system it is of (one of "
                           f"{', '.join(REQUIRED_BINDINGS['ContactPoint']['system'].codes)})",
                           f"{path}.system"))


UCUM = "http://unitsofmeasure.org"


def _quantity_rules(name: str, kind: str = "quantity", *, coded: bool = False,
                    valued: bool = False, ucum: bool = False, positive: bool = False,
                    whole: bool = False) -> Callable[[dict[str, Any], _At, list[Issue]], None]:
    """The invariants of Quantity (qty-3) and of one of its profiles (``name``, said of
    ``kind``; R4 4.0.1's expressions, e.g. age-1 ``(code.exists() or value.empty()) and
    (system.empty() or system = %ucum) and (value.empty() or … or value > 0)``): ``coded``, a
    value has a code; ``valued``, a code has a value and only a coded one needs UCUM's system
(drt-1); ``ucum``, a system is UCUM's;
    ``positive`` (age-1), ``whole`` (cnt-3: and its code is "1")."""
    def check(quantity: dict[str, Any], at: _At, issues: list[Issue]) -> None:
        code, system, value = (quantity.get("code"), quantity.get("system"),
                               quantity.get("value"))

        def broken(rule: str, what: str, element: str) -> None:
            where = f"{_path(at)}.{element}"
            issues.append(_err("invariant", f"{rule}: {where}: {what}", where))

        if code is not None and system is None:
            broken("qty-3", "a quantity with a code says its system"
                   + (f" ({UCUM})" if ucum else ""), "system")
        elif ucum and system is not None and system != UCUM and (code is not None or not valued):
            broken(name, f"the system of {kind} is UCUM ({UCUM}), not {system!r}", "system")
        if valued and code is not None and value is None:
            broken(name, f"{kind} with a code has a value", "value")
        if coded and value is not None and code is None:
            broken(name, f"{kind} with a value has a code (UCUM)", "code")
        if positive and type(value) in (int, float) and value <= 0:
            broken(name, f"an age is positive, not {value}", "value")
        if whole:
            if code is not None and code != "1":
                broken(name, f"the code of a count is \"1\", not {code!r}", "code")
            if type(value) is float:
                broken(name, f"a count is a whole number, not {value}", "value")
    return check


class _Node:
    """A type of ``_ELEMENTS``: element → (_CHILD, its _Node) | (_CODE, ValueSet) |
    (_CONCEPT, (system, ValueSet)) | (_CONTAINED, None); and the type's invariant."""

    __slots__ = ("elements", "invariant", "keys")

    def __init__(self) -> None:
        self.elements: dict[str, tuple[int, Any]] = {}
        self.keys: frozenset[str] = frozenset()
        self.invariant: Callable[[dict[str, Any], _At, list[Issue]], None] | None = None


_CHILD, _CODE, _CONCEPT, _CONTAINED = range(4)
_INVARIANTS = {
    "Period": _per_1, "ContactPoint": _cpt_2,
    "Quantity": _quantity_rules("qty-3"),
    "Age": _quantity_rules("age-1", "an age", coded=True, ucum=True, positive=True),
    "Count": _quantity_rules("cnt-3", "a count", coded=True, ucum=True, whole=True),
    "Distance": _quantity_rules("dis-1", "a distance", coded=True, ucum=True),
    # drt-1: code.exists() implies (system = %ucum and value.exists())
    "Duration": _quantity_rules("drt-1", "a duration", valued=True, ucum=True),
}


def _nodes() -> dict[str, _Node]:
    nodes = {name: _Node() for name in (*_ELEMENTS, "Resource")}
    for name, node in nodes.items():
        elements: dict[str, tuple[int, Any]] = {
            key: (_CHILD, nodes[kind]) for key, kind in _ELEMENTS.get(name, {}).items()}
        elements["extension"] = (_CHILD, nodes["Extension"])
        if name in SUPPORTED_TYPES or name == "Resource":
            elements["text"] = (_CHILD, nodes["Narrative"])
            elements["contained"] = (_CONTAINED, None)
        elements.update((key, (_CODE, value_set))
                        for key, value_set in REQUIRED_BINDINGS.get(name, {}).items())
        elements.update((key, (_CONCEPT, binding))
                        for key, binding in REQUIRED_CONCEPTS.get(name, {}).items())
        node.elements = elements
        node.keys = frozenset(elements)
        node.invariant = _INVARIANTS.get(name)
    return nodes


_NODES = _nodes()
_ANY_RESOURCE = _NODES["Resource"]  # a contained resource of another type: text, extension
