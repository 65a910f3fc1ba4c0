"""Required value-set bindings (R4 4.0.1) and the datatype invariants per-1, cpt-2, qty-3,
drt-1, age-1, cnt-3 and dis-1, wherever
their elements occur in a supported resource, contained resources included: a bad value is
refused (422, an OperationOutcome naming the element), a good one taken."""

import json

import pytest

from ccm_ingest.domain.rules import check_resource
from tests.unit.ingest.conftest import counts, example

FHIR = {"Content-Type": "application/fhir+json"}
UCUM = "http://unitsofmeasure.org"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
DIV = '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'


def patient(**elements) -> dict:
    return {"resourceType": "Patient", "name": [{"family": "Doe"}], **elements}


def practitioner(**elements) -> dict:
    return {"resourceType": "Practitioner", "name": [{"family": "Ng"}], **elements}


def role(**elements) -> dict:
    return {"resourceType": "PractitionerRole",
            "practitioner": {"reference": "Practitioner/d1"}, **elements}


def organization(**elements) -> dict:
    return {"resourceType": "Organization", "name": "Main Street Clinic", **elements}


def condition(**elements) -> dict:
    return {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
            "code": {"text": "hypertension"}, **elements}


def care_plan(**elements) -> dict:
    return {"resourceType": "CarePlan", "status": "active", "intent": "plan",
            "subject": {"reference": "Patient/p1"}, **elements}


def consent(provision: dict) -> dict:
    basic = {k: v for k, v in example("Consent/r4spec-basic.json").items() if k != "id"}
    return {**basic, "provision": provision}


def encounter(**elements) -> dict:
    """An Encounter that is no CCM time (no CPT type), so that only validation speaks."""
    return {"resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                      "code": "AMB"},
            "subject": {"reference": "Patient/p1"}, **elements}


def period(start: str, end: str) -> dict:
    return {"start": start, "end": end}


BACKWARDS = period("2026-03-02", "2026-03-01")
FORWARDS = period("2026-03-01", "2026-03-02")

# (id, resource from a value, bad value, good value, expression of the bad one, issue code)
CASES = [
    # Consent: the provision type the consent events carry (permit/deny), nested ones too
    ("Consent.provision.type", lambda v: consent({"type": v}), "maybe", "permit",
     "Consent.provision.type", "code-invalid"),
    ("nested Consent.provision.provision[].type",
     lambda v: consent({"type": "permit", "provision": [{"type": "deny"}, {"type": v}]}),
     "maybe", "deny", "Consent.provision.provision[1].type", "code-invalid"),
    ("Consent.provision.data.meaning",
     lambda v: consent({"type": "permit", "data": [
         {"meaning": v, "reference": {"reference": "Patient/p1"}}]}),
     "whatever", "related", "Consent.provision.data[0].meaning", "code-invalid"),
    ("per-1 Consent.provision.period (years)", lambda v: consent({"type": "permit", "period": v}),
     period("2027", "2026"), period("2026", "2027"), "Consent.provision.period", "invariant"),
    ("per-1 nested Consent.provision.period",
     lambda v: consent({"type": "deny", "provision": [{"type": "permit", "period": v}]}),
     BACKWARDS, FORWARDS, "Consent.provision.provision[0].period", "invariant"),
    # Patient and the datatypes in it
    ("Patient.gender", lambda v: patient(gender=v), "m", "male", "Patient.gender",
     "code-invalid"),
    ("HumanName.use", lambda v: patient(name=[{"family": "Doe", "use": v}]), "nickname2",
     "nickname", "Patient.name[0].use", "code-invalid"),
    ("ContactPoint.system",
     lambda v: patient(telecom=[{"system": "phone", "value": "555-0100"},
                                {"system": v, "value": "555-0101"}]),
     "pager2", "pager", "Patient.telecom[1].system", "code-invalid"),
    ("ContactPoint.use",
     lambda v: patient(telecom=[{"system": "phone", "value": "555-0100", "use": v}]),
     "cell", "mobile", "Patient.telecom[0].use", "code-invalid"),
    ("cpt-2 (a value needs a system)", lambda v: patient(telecom=[v]), {"value": "555-0100"},
     {"system": "phone", "value": "555-0100"}, "Patient.telecom[0].system", "invariant"),
    ("Address.use", lambda v: patient(address=[{"use": v, "city": "Boston"}]), "vacation",
     "temp", "Patient.address[0].use", "code-invalid"),
    ("Address.type", lambda v: patient(address=[{"type": v, "city": "Boston"}]), "house",
     "physical", "Patient.address[0].type", "code-invalid"),
    ("Identifier.use",
     lambda v: patient(identifier=[{"use": v, "system": "urn:oid:1.2.3", "value": "7"}]),
     "main", "official", "Patient.identifier[0].use", "code-invalid"),
    ("Identifier.use in a Reference",
     lambda v: patient(managingOrganization={"identifier": {
         "use": v, "system": "urn:oid:1.2.3", "value": "7"}}),
     "main", "usual", "Patient.managingOrganization.identifier.use", "code-invalid"),
    ("Patient.link.type",
     lambda v: patient(link=[{"other": {"reference": "Patient/p2"}, "type": v}]), "sibling",
     "seealso", "Patient.link[0].type", "code-invalid"),
    ("Patient.contact.gender",
     lambda v: patient(contact=[{"name": {"family": "Roe"}, "gender": v}]), "f", "female",
     "Patient.contact[0].gender", "code-invalid"),
    ("Patient.contact.name.use",
     lambda v: patient(contact=[{"name": {"family": "Roe", "use": v}}]), "nick", "official",
     "Patient.contact[0].name.use", "code-invalid"),
    ("Patient.contact.telecom.system",
     lambda v: patient(contact=[{"name": {"family": "Roe"},
                                 "telecom": [{"system": v, "value": "555-0100"}]}]),
     "beeper", "phone", "Patient.contact[0].telecom[0].system", "code-invalid"),
    ("Narrative.status", lambda v: patient(text={"status": v, "div": DIV}), "made",
     "generated", "Patient.text.status", "code-invalid"),
    ("per-1 HumanName.period",
     lambda v: patient(name=[{"family": "Doe", "period": v}]), BACKWARDS, FORWARDS,
     "Patient.name[0].period", "invariant"),
    ("per-1 in an extension's valuePeriod",
     lambda v: patient(extension=[{"url": "http://example.org/stay", "valuePeriod": v}]),
     period("2026-03-01T10:00:00Z", "2026-03-01T09:59:59Z"),
     period("2026-03-01T10:00:00Z", "2026-03-01T10:00:00Z"),
     "Patient.extension[0].valuePeriod", "invariant"),
    # Practitioner, PractitionerRole, Organization
    ("Practitioner.gender", lambda v: practitioner(gender=v), "F", "female",
     "Practitioner.gender", "code-invalid"),
    ("Practitioner.address.use", lambda v: practitioner(address=[{"use": v, "city": "Boston"}]),
     "vacation", "work", "Practitioner.address[0].use", "code-invalid"),
    ("per-1 Practitioner.qualification.period",
     lambda v: practitioner(qualification=[{"code": {"text": "MD"}, "period": v}]),
     BACKWARDS, FORWARDS, "Practitioner.qualification[0].period", "invariant"),
    ("PractitionerRole.availableTime.daysOfWeek",
     lambda v: role(availableTime=[{"daysOfWeek": ["mon", v]}]), "funday", "sun",
     "PractitionerRole.availableTime[0].daysOfWeek[1]", "code-invalid"),
    ("PractitionerRole.telecom.system",
     lambda v: role(telecom=[{"system": v, "value": "555-0100"}]), "pager2", "pager",
     "PractitionerRole.telecom[0].system", "code-invalid"),
    ("per-1 PractitionerRole.notAvailable.during",
     lambda v: role(notAvailable=[{"description": "leave", "during": v}]), BACKWARDS, FORWARDS,
     "PractitionerRole.notAvailable[0].during", "invariant"),
    ("Organization.address.type",
     lambda v: organization(address=[{"type": v, "city": "Boston"}]), "office", "both",
     "Organization.address[0].type", "code-invalid"),
    ("Organization.contact.telecom.use",
     lambda v: organization(contact=[{"telecom": [
         {"system": "email", "value": "a@example.org", "use": v}]}]),
     "office", "work", "Organization.contact[0].telecom[0].use", "code-invalid"),
    # CarePlan
    ("CarePlan.activity.detail.status",
     lambda v: care_plan(activity=[{"detail": {"status": v}}]), "kinda", "in-progress",
     "CarePlan.activity[0].detail.status", "code-invalid"),
    ("CarePlan.activity.detail.kind",
     lambda v: care_plan(activity=[{"detail": {"kind": v, "status": "scheduled"}}]), "Foo",
     "ServiceRequest", "CarePlan.activity[0].detail.kind", "code-invalid"),
    ("Timing.repeat.periodUnit",
     lambda v: care_plan(activity=[{"detail": {"status": "scheduled", "scheduledTiming": {
         "repeat": {"frequency": 1, "period": 1, "periodUnit": v}}}}]),
     "fortnight", "wk", "CarePlan.activity[0].detail.scheduledTiming.repeat.periodUnit",
     "code-invalid"),
    ("Timing.repeat.dayOfWeek",
     lambda v: care_plan(activity=[{"detail": {"status": "scheduled", "scheduledTiming": {
         "repeat": {"dayOfWeek": [v]}}}}]),
     "Monday", "mon", "CarePlan.activity[0].detail.scheduledTiming.repeat.dayOfWeek[0]",
     "code-invalid"),
    ("per-1 CarePlan.period", lambda v: care_plan(period=v), period("2026-04", "2026-03-31"),
     period("2026-03", "2026-03-01"), "CarePlan.period", "invariant"),
    # Encounter
    ("Encounter.statusHistory.status",
     lambda v: encounter(statusHistory=[{"status": v, "period": {"start": "2026-03-01"}}]),
     "nope", "arrived", "Encounter.statusHistory[0].status", "code-invalid"),
    ("Encounter.location.status",
     lambda v: encounter(location=[{"location": {"reference": "Location/l1"}, "status": v}]),
     "bogus", "completed", "Encounter.location[0].status", "code-invalid"),
    ("Quantity.comparator (Encounter.length, a Duration)",
     lambda v: encounter(length={"value": 25, "comparator": v, "unit": "min", "system": UCUM,
                                 "code": "min"}),
     "about", "<", "Encounter.length.comparator", "code-invalid"),
    ("per-1 Encounter.participant.period",
     lambda v: encounter(participant=[{"individual": {"reference": "Practitioner/d1"},
                                       "period": v}]),
     period("2026-03-01T10:00:00-05:00", "2026-03-01T14:00:00Z"),
     period("2026-03-01T10:00:00-05:00", "2026-03-01T15:00:00Z"),
     "Encounter.participant[0].period", "invariant"),
    # Condition: required bindings on CodeableConcepts
    ("Condition.clinicalStatus as text only",
     lambda v: condition(clinicalStatus=v), {"text": "active"},
     {"coding": [{"system": CLINICAL, "code": "active"}], "text": "active"},
     "Condition.clinicalStatus", "code-invalid"),
    ("Condition.clinicalStatus of another system only",
     lambda v: condition(clinicalStatus={"coding": [v]}),
     {"system": "http://snomed.info/sct", "code": "55561003"},
     {"system": CLINICAL, "code": "active"}, "Condition.clinicalStatus", "code-invalid"),
    ("Condition.clinicalStatus without a system",
     lambda v: condition(clinicalStatus={"coding": [v]}), {"code": "active"},
     {"system": CLINICAL, "code": "active"}, "Condition.clinicalStatus", "code-invalid"),
    ("Condition.clinicalStatus code outside condition-clinical",
     lambda v: condition(clinicalStatus={"coding": [{"system": CLINICAL, "code": v}]}),
     "dormant", "remission", "Condition.clinicalStatus.coding[0].code", "code-invalid"),
    ("Condition.verificationStatus as text only",
     lambda v: condition(verificationStatus=v), {"text": "confirmed"},
     {"coding": [{"system": VERIFICATION, "code": "confirmed"}]},
     "Condition.verificationStatus", "code-invalid"),
    ("Condition.verificationStatus code outside condition-ver-status",
     lambda v: condition(verificationStatus={"coding": [
         {"system": "http://snomed.info/sct", "code": "410605003"},
         {"system": VERIFICATION, "code": v}]}),
     "likely", "provisional", "Condition.verificationStatus.coding[1].code", "code-invalid"),
    ("Quantity.comparator (Condition.onsetAge, an Age)",
     lambda v: condition(onsetAge={"value": 50, "comparator": v, "unit": "a", "system": UCUM,
                                   "code": "a"}),
     "~", ">=", "Condition.onsetAge.comparator", "code-invalid"),
    # Quantity and its profiles: a Duration whose code is in no system or another system than
    # UCUM's was counted as CCM time ({"value": 20, "code": "min"}: 1,200 s)
    ("drt-1 holds for a Duration without a code, whatever its system",
     lambda v: encounter(length={"value": 20, "unit": "min", "system": "urn:units", **v}),
     {"code": "min"}, {}, "Encounter.length.system", "invariant"),
    ("drt-1 Encounter.length in another system",
     lambda v: encounter(length={"value": 20, "unit": "min", "system": v, "code": "min"}),
     "http://example.org", UCUM, "Encounter.length.system", "invariant"),
    ("qty-3 Encounter.length coded without a system",
     lambda v: encounter(length={"value": 20, "code": "min", **v}), {},
     {"system": UCUM}, "Encounter.length.system", "invariant"),
    ("drt-1 Encounter.length coded without a value",
     lambda v: encounter(length={"system": UCUM, "code": "min", **v}), {}, {"value": 20},
     "Encounter.length.value", "invariant"),
    ("drt-1 Timing.repeat.boundsDuration (a care plan activity)",
     lambda v: care_plan(activity=[{"detail": {"status": "scheduled", "scheduledTiming": {
         "repeat": {"boundsDuration": {"value": 3, "system": v, "code": "mo"}}}}}]),
     "urn:months", UCUM,
     "CarePlan.activity[0].detail.scheduledTiming.repeat.boundsDuration.system", "invariant"),
    ("age-1 Condition.onsetAge needs a code",
     lambda v: condition(onsetAge={"value": 50, **v}), {}, {"system": UCUM, "code": "a"},
     "Condition.onsetAge.code", "invariant"),
    ("age-1 Condition.abatementAge is positive",
     lambda v: condition(abatementAge={"value": v, "system": UCUM, "code": "a"}), -1, 1,
     "Condition.abatementAge.value", "invariant"),
    ("cnt-3 an extension's valueCount is whole",
     lambda v: patient(extension=[{"url": "http://example.org/x", "valueCount": {
         "value": v, "system": UCUM, "code": "1"}}]), 2.5, 2,
     "Patient.extension[0].valueCount.value", "invariant"),
    ("dis-1 an extension's valueDistance in UCUM",
     lambda v: patient(extension=[{"url": "http://example.org/x", "valueDistance": {
         "value": 3, "system": v, "code": "km"}}]), "urn:km", UCUM,
     "Patient.extension[0].valueDistance.system", "invariant"),
    ("qty-3 an extension's valueQuantity coded without a system",
     lambda v: patient(extension=[{"url": "http://example.org/x", "valueQuantity": {
         "value": 3, "code": "kg", **v}}]), {}, {"system": "urn:units"},
     "Patient.extension[0].valueQuantity.system", "invariant"),
    ("per-1 Condition.onsetPeriod", lambda v: condition(onsetPeriod=v),
     # 2026-03-01 ends by 03-02T12:00Z in any zone (UTC-12 the last); 11:00Z is still in it
     period("2026-03-02T13:00:00Z", "2026-03-01"), period("2026-03-02T11:00:00Z", "2026-03-01"),
     "Condition.onsetPeriod", "invariant"),
    # Contained resources are checked as resources of their type
    ("a contained Condition's clinicalStatus",
     lambda v: care_plan(contained=[condition(id="c1", clinicalStatus=v)],
                         addresses=[{"reference": "#c1"}]),
     {"text": "active"}, {"coding": [{"system": CLINICAL, "code": "active"}]},
     "CarePlan.contained[0].clinicalStatus", "code-invalid"),
    ("a contained Practitioner's telecom.system",
     lambda v: care_plan(contained=[practitioner(id="d1", telecom=[
         {"system": v, "value": "555-0100"}])], author={"reference": "#d1"}),
     "pager2", "pager", "CarePlan.contained[0].telecom[0].system", "code-invalid"),
    ("a contained Patient's address.use",
     lambda v: encounter(contained=[patient(id="p", address=[{"use": v, "city": "Boston"}])],
                         subject={"reference": "#p"}),
     "vacation", "home", "Encounter.contained[0].address[0].use", "code-invalid"),
    ("a contained resource of another type: its narrative status",
     lambda v: care_plan(contained=[{"resourceType": "Goal", "id": "g", "text": {
         "status": v, "div": DIV}, "lifecycleStatus": "active",
         "description": {"text": "walk daily"}, "subject": {"reference": "Patient/p1"}}],
         goal=[{"reference": "#g"}]),
     "done", "generated", "CarePlan.contained[0].text.status", "code-invalid"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_value_outside_the_binding_or_breaking_the_invariant_is_named(case):
    _, make, bad, _, expression, code = case
    issues = check_resource(make(bad))
    assert [(i.code, i.expression) for i in issues] == [(code, (expression,))], issues
    message = issues[0].diagnostics
    assert expression in message
    if code == "code-invalid" and isinstance(bad, str):
        assert repr(bad) in message  # the value, and what the value set allows
        assert "required value set" in message and "(" in message


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_value_in_the_binding_passes_the_rules(case):
    _, make, _, good, _, _ = case
    assert check_resource(make(good)) == []


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_the_api_refuses_the_bad_value_with_422_and_writes_nothing(fhir, case):
    _, make, bad, _, expression, code = case
    resource = make(bad)
    before = await counts(fhir)
    r = await fhir.post(f"/fhir/{resource['resourceType']}", content=json.dumps(resource),
                        headers=FHIR)
    assert r.status_code == 422, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert any(i["code"] == code and expression in i.get("expression", [])
               for i in outcome["issue"]), outcome
    assert await counts(fhir) == before


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_the_api_takes_the_good_value(fhir, case):
    _, make, _, good, _, _ = case
    resource = make(good)
    r = await fhir.post(f"/fhir/{resource['resourceType']}", content=json.dumps(resource),
                        headers=FHIR)
    assert r.status_code == 201, r.text


async def test_a_bad_provision_type_in_a_transaction_is_located_in_its_entry(fhir):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Patient"}, "resource": patient()},
        {"request": {"method": "POST", "url": "Consent"},
         "resource": consent({"type": "permit", "provision": [{"type": "maybe"}]})}]}
    before = await counts(fhir)
    r = await fhir.post("/fhir", content=json.dumps(bundle), headers=FHIR)
    assert r.status_code == 422, r.text
    where = "Bundle.entry[1].resource.provision.provision[0].type"
    assert any(where in i.get("expression", []) for i in r.json()["issue"]), r.json()
    assert await counts(fhir) == before


@pytest.mark.parametrize(("start", "end"), [
    ("2026-03", "2026-03-01"),  # a month to a day of it
    ("2026-03-01", "2026-03-01"),  # one day
    ("2026", "2026-12-31T23:00:00Z"),
    ("2026-03-01T10:00:00Z", "2026-03-01T10:00:00Z"),  # an instant
    ("2026-03-01T10:00:00.5Z", "2026-03-01T10:00:00.500Z"),
    ("2026-03-01T10:00:00+05:00", "2026-03-01T05:30:00Z"),  # zones: 05:00Z to 05:30Z
    ("2026-03-02", "2026-03-01T23:00:00Z"),  # 03-02 begins at 03-01T10:00Z in UTC+14
])
def test_per_1_compares_partial_dates_and_zones_by_the_instants_they_may_be(start, end):
    assert check_resource(care_plan(period=period(start, end))) == []


@pytest.mark.parametrize(("start", "end"), [
    ("2026-04", "2026-03-31"),
    ("2026-03-01T10:00:00.5Z", "2026-03-01T10:00:00Z"),
    ("2026-03-01T10:00:00+05:00", "2026-03-01T04:59:59Z"),
    ("2026-03-03", "2026-03-01T23:00:00Z"),  # 03-03 begins after 03-02T10:00Z anywhere
])
def test_per_1_refuses_a_period_that_certainly_ends_before_it_starts(start, end):
    (issue,) = check_resource(care_plan(period=period(start, end)))
    assert (issue.code, issue.expression) == ("invariant", ("CarePlan.period",))
    assert repr(start) in issue.diagnostics and repr(end) in issue.diagnostics


def test_every_binding_is_reachable_from_a_supported_type():
    """The tables name types the walk reaches from the supported types: a binding on a type no
    element leads to would never be checked."""
    from ccm_ingest.domain import rules
    from ccm_ingest.domain.model import SUPPORTED_TYPES

    names = {id(node): name for name, node in rules._NODES.items()}
    reached: set[str] = set()
    pending = [rules._NODES[t] for t in SUPPORTED_TYPES]
    while pending:
        node = pending.pop()
        if names[id(node)] not in reached:
            reached.add(names[id(node)])
            pending += [what for kind, what in node.elements.values() if kind == rules._CHILD]
    assert set(rules.REQUIRED_BINDINGS) | set(rules.REQUIRED_CONCEPTS) <= reached
    assert set(rules._ELEMENTS) <= reached
