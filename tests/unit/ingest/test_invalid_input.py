"""Every bad input gets the right status and an OperationOutcome naming the problem, and
nothing is written."""

import json
from pathlib import Path

import pytest

from tests.unit.ingest.conftest import as_practice, counts, example
from tests.unit.ingest.test_fhir_api import ccm_encounter

CCM_CONSENT = {**next(
    e["resource"] for e in json.loads((Path(__file__).resolve().parents[3] / "services/ingest/"
                                       "examples/ccm-transaction-bundle.json").read_text())["entry"]
    if e["resource"]["resourceType"] == "Consent"), "patient": {"reference": "Patient/p1"},
    "performer": [{"reference": "Patient/p1"}]}
NOWHERE = "urn:uuid:0b7f1f6e-6c49-4b0c-9a51-3e1c9e2f1a00"  # the fullUrl of no entry


def deep(levels: int) -> dict:
    value: dict = {"resourceType": "Patient"}
    current = value
    for _ in range(levels):
        current["extension"] = [{"url": "urn:x"}]
        current = current["extension"][0]
    return value


CASES = [
    # (name, method, path, body (dict or raw bytes), headers, status, issue code, expression)
    ("malformed JSON", "POST", "/fhir/Patient", b'{"resourceType": "Patient",', {}, 400,
     "structure", None),
    ("not an object", "POST", "/fhir/Patient", b"[1, 2]", {}, 400, "structure", None),
    ("NaN is no JSON", "PUT", "/fhir/Encounter/e1",
     json.dumps(ccm_encounter()).replace('"value": 25', '"value": NaN').encode(), {}, 400,
     "structure", None),
    ("Infinity is no JSON", "PUT", "/fhir/Encounter/e1",
     json.dumps(ccm_encounter()).replace('"value": 25', '"value": -Infinity').encode(), {},
     400, "structure", None),
    ("resourceType differs from the URL", "POST", "/fhir/Patient",
     {"resourceType": "Practitioner"}, {}, 400, "invalid", "resourceType"),
    ("unsupported type", "POST", "/fhir/Observation", {"resourceType": "Observation"}, {},
     404, "not-supported", "resourceType"),
    ("R5 Encounter.class list", "PUT", "/fhir/Encounter/e1",
     {**ccm_encounter(), "class": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                    "code": "AMB"}]}, {}, 422, "structure", "Encounter.class"),
    ("R5 Consent decision", "POST", "/fhir/Consent",
     {**example("Consent/r4spec-basic.json"), "decision": "permit"}, {}, 422, "structure",
     "Consent.decision"),
    ("bad Encounter.status", "PUT", "/fhir/Encounter/e1", {**ccm_encounter(), "status": "bogus"},
     {}, 422, "code-invalid", "Encounter.status"),
    ("Encounter.class from another system", "PUT", "/fhir/Encounter/e1",
     {**ccm_encounter(), "class": {"system": "urn:x", "code": "AMB"}}, {}, 422, "code-invalid",
     "Encounter.class.system"),
    ("bad CarePlan.intent", "POST", "/fhir/CarePlan",
     {**example("CarePlan/r4spec-f001.json"), "intent": "wish"}, {}, 422, "code-invalid",
     "CarePlan.intent"),
    ("missing required Encounter.status", "POST", "/fhir/Encounter",
     {k: v for k, v in ccm_encounter().items() if k not in ("status", "id")}, {}, 422,
     "required", "Encounter.status"),
    ("Consent ppc-1 (no policy)", "POST", "/fhir/Consent",
     {k: v for k, v in example("Consent/r4spec-basic.json").items() if k != "policyRule"}, {},
     422, "invariant", "Consent.policyRule"),
    ("Consent ppc-2 (privacy without patient)", "POST", "/fhir/Consent",
     {k: v for k, v in example("Consent/r4spec-basic.json").items() if k != "patient"}, {},
     422, "invariant", "Consent.patient"),
    ("malformed reference", "PUT", "/fhir/Encounter/e1",
     {**ccm_encounter(), "subject": {"reference": "patient 1"}}, {}, 422, "value",
     "Encounter.subject.reference"),
    ("CCM time without duration", "PUT", "/fhir/Encounter/e1",
     {k: v for k, v in ccm_encounter().items() if k != "length"}, {}, 422, "required",
     "Encounter.length"),
    ("a modifier extension not understood (it may say 'not performed')", "PUT",
     "/fhir/Encounter/e1", {**ccm_encounter(), "modifierExtension": [
         {"url": "http://example.org/not-performed", "valueBoolean": True}]}, {}, 422,
     "not-supported", "Encounter.modifierExtension"),
    ("a nested modifier extension", "PUT", "/fhir/Encounter/e1",
     {**ccm_encounter(), "participant": [{"modifierExtension": [
         {"url": "http://example.org/x", "valueBoolean": True}],
         "individual": {"reference": "Practitioner/d1"}}]}, {}, 422, "not-supported",
     "Encounter.participant[0].modifierExtension"),
    ("an empty array (FHIR JSON has none)", "POST", "/fhir/Patient",
     {"resourceType": "Patient", "name": []}, {}, 422, "structure", "Patient.name"),
    ("an empty object in an array (ele-1)", "POST", "/fhir/Patient",
     {"resourceType": "Patient", "name": [{}]}, {}, 422, "structure", "Patient.name[0]"),
    ("an extension with no value (ext-1)", "POST", "/fhir/Patient",
     {"resourceType": "Patient", "extension": [{"url": "http://example.org/x"}]}, {}, 422,
     "invariant", "Patient.extension[0]"),
    ("an extension with a value and extensions (ext-1)", "POST", "/fhir/Patient",
     {"resourceType": "Patient", "extension": [{
         "url": "http://example.org/x", "valueString": "a",
         "extension": [{"url": "y", "valueString": "b"}]}]}, {}, 422, "invariant",
     "Patient.extension[0]"),
    *[(f"narrative: {why} (txt-1/txt-2)", "POST", "/fhir/Patient",
       {"resourceType": "Patient", "text": {"status": "generated", "div": div}}, {}, 422,
       "invariant", "Patient.text.div") for why, div in [
        ("not XHTML", "hello"),
        ("no XHTML namespace", "<div>hello</div>"),
        ("a script", '<div xmlns="http://www.w3.org/1999/xhtml">hi<script>alert(1)</script>'
                     '</div>'),
        ("an event attribute", '<div xmlns="http://www.w3.org/1999/xhtml">'
                               '<p onclick="alert(1)">hi</p></div>'),
        ("a javascript: link", '<div xmlns="http://www.w3.org/1999/xhtml">'
                               '<a href=" JavaScript:alert(1)">hi</a></div>'),
        ("a javascript: link with a tab in it (browsers drop it)",
         '<div xmlns="http://www.w3.org/1999/xhtml"><a href="java&#x09;script:alert(1)">hi'
         '</a></div>'),
        ("a DOCTYPE", '<!DOCTYPE html><div xmlns="http://www.w3.org/1999/xhtml">hi</div>'),
        *[(f"a script hidden from XML in {kind}", '<div xmlns="http://www.w3.org/1999/xhtml">'
           f'<p>ok</p>{hidden}</div>') for kind, hidden in [
            ("a comment", "<!--><img src=x onerror=alert(1)>-->"),
            ("CDATA", "<![CDATA[><img src=x onerror=alert(1)>]]>"),
            ("a processing instruction", "<?x ><img src=x onerror=alert(1)>?>")]],
        ("an HTML entity", '<div xmlns="http://www.w3.org/1999/xhtml">A&nbsp;B</div>'),
        ("an iframe", '<div xmlns="http://www.w3.org/1999/xhtml"><iframe src="x"/></div>'),
        ("an entity declaration", '<!DOCTYPE div [<!ENTITY x "y">]><div '
                                  'xmlns="http://www.w3.org/1999/xhtml">&x;</div>'),
        ("no content", '<div xmlns="http://www.w3.org/1999/xhtml"> <p/> </div>'),
    ]],
    ("a modifier extension in a contained resource", "POST", "/fhir/Patient",
     {"resourceType": "Patient", "contained": [{
         "resourceType": "Organization", "id": "o1", "name": "x", "modifierExtension": [
             {"url": "http://example.org/x", "valueBoolean": True}]}],
      "managingOrganization": {"reference": "#o1"}}, {}, 422, "not-supported",
     "Patient.contained[0].modifierExtension"),
    ("implicitRules not understood", "POST", "/fhir/Patient",
     {"resourceType": "Patient", "implicitRules": "http://example.org/rules"}, {}, 422,
     "not-supported", "Patient.implicitRules"),
    ("unknown element", "POST", "/fhir/Patient", {"resourceType": "Patient", "colour": "red"},
     {}, 422, "structure", "Patient.colour"),
    ("id differs from URL", "PUT", "/fhir/Patient/a", {"resourceType": "Patient", "id": "b"},
     {}, 400, "invalid", "Patient.id"),
    ("oversized body", "POST", "/fhir/Patient",
     {"resourceType": "Patient", "text": {"status": "generated",
                                          "div": "<div>" + "x" * 300_000 + "</div>"}},
     {}, 413, "too-costly", None),
    ("deep nesting", "POST", "/fhir/Patient", deep(80), {}, 400, "too-costly", None),
    ("XML media type", "POST", "/fhir/Patient", b"<Patient/>",
     {"Content-Type": "application/fhir+xml"}, 415, "not-supported", None),
    ("too many Bundle entries", "POST", "/fhir",
     {"resourceType": "Bundle", "type": "batch",
      "entry": [{"request": {"method": "GET", "url": "Patient/x"}}] * 1001}, {}, 413,
     "too-costly", "Bundle.entry"),
    ("document Bundle", "POST", "/fhir", {"resourceType": "Bundle", "type": "document"}, {},
     422, "value", "Bundle.type"),
    ("unknown route", "GET", "/fhir/Patient/a/b/c", None, {}, 404, "not-found", None),
    ("meta.lastUpdated in the future (a wrong clock would freeze the resource)", "PUT",
     "/fhir/Patient/a", {"resourceType": "Patient", "id": "a",
                         "meta": {"lastUpdated": "2099-01-01T00:00:00Z"}},
     {}, 422, "business-rule", "Patient.meta.lastUpdated"),
    ("urn:uuid reference outside a Bundle", "POST", "/fhir/Condition",
     {**example("Condition/r4spec-example.json"),
      "subject": {"reference": NOWHERE}},
     {}, 422, "not-found", "Condition.subject.reference"),
    ("transaction reference to no entry's fullUrl", "POST", "/fhir",
     {"resourceType": "Bundle", "type": "transaction", "entry": [
         {"request": {"method": "POST", "url": "Condition"},
          "resource": {**example("Condition/r4spec-example.json"),
                       "subject": {"reference": NOWHERE}}}]},
     {}, 422, "not-found", "Bundle.entry[0].resource.subject.reference"),
    ("an XML response asked for (Accept)", "GET", "/fhir/Patient/a", None,
     {"Accept": "application/fhir+xml"}, 406, "not-supported", "Accept"),
    ("an XML response asked for (_format)", "POST", "/fhir/Patient?_format=xml",
     {"resourceType": "Patient"}, {}, 406, "not-supported", "_format"),
    ("meta.lastUpdated with a leap second", "PUT", "/fhir/Patient/a",
     {"resourceType": "Patient", "id": "a", "meta": {"lastUpdated": "2026-12-31T23:59:60Z"}},
     {}, 422, "value", "Patient.meta.lastUpdated"),
    ("meta.lastUpdated beyond year 9999 in UTC", "PUT", "/fhir/Patient/a",
     {"resourceType": "Patient", "id": "a",
      "meta": {"lastUpdated": "9999-12-31T23:59:59-01:00"}},
     {}, 422, "value", "Patient.meta.lastUpdated"),
    ("an entry's fullUrl that is no string", "POST", "/fhir",
     {"resourceType": "Bundle", "type": "transaction", "entry": [
         {"fullUrl": {"x": 1}, "request": {"method": "POST", "url": "Patient"},
          "resource": {"resourceType": "Patient"}}]}, {}, 422, "value", "Bundle.entry[0].fullUrl"),
    ("an entry's ifMatch that is no string", "POST", "/fhir",
     {"resourceType": "Bundle", "type": "transaction", "entry": [
         {"request": {"method": "PUT", "url": "Patient/a", "ifMatch": 5},
          "resource": {"resourceType": "Patient", "id": "a"}}]},
     {}, 422, "value", "Bundle.entry[0].request.ifMatch"),
    ("JSON refused with q=0", "GET", "/fhir/Patient/a", None,
     {"Accept": "application/fhir+json;q=0, application/xml"}, 406, "not-supported", "Accept"),
    ("another FHIR version asked for (Accept)", "GET", "/fhir/Patient/a", None,
     {"Accept": "application/fhir+json; fhirVersion=5.0"}, 406, "not-supported", "Accept"),
    ("another FHIR version sent (Content-Type)", "POST", "/fhir/Patient",
     {"resourceType": "Patient"}, {"Content-Type": "application/fhir+json; fhirVersion=3.0"},
     415, "not-supported", None),
    ("XML asked for with an empty _format", "GET", "/fhir/Patient/a?_format=", None,
     {"Accept": "application/xml"}, 406, "not-supported", "Accept"),
    ("a version id that is no ASCII number", "GET", "/fhir/Patient/a/_history/%C2%B2", None,
     {}, 404, "not-found", "vid"),
    *[(f"CCM time of {name}", "PUT", "/fhir/Encounter/e1", body, {}, 422, "value", where)
      for name, body, where in [
          ("a negative length", {**ccm_encounter(), "length": {
              "value": -20, "unit": "min", "system": "http://unitsofmeasure.org", "code": "min"}},
           "Encounter.length.value"),
          ("an absurd length", {**ccm_encounter(), "length": {
              "value": 1e300, "unit": "min", "system": "http://unitsofmeasure.org",
              "code": "min"}}, "Encounter.length.value"),
          ("a length with a comparator", {**ccm_encounter(), "length": {
              "value": 20, "comparator": ">", "unit": "min",
              "system": "http://unitsofmeasure.org", "code": "min"}},
           "Encounter.length.comparator"),
          ("a month-long period", {**{k: v for k, v in ccm_encounter().items() if k != "length"},
                                   "period": {"start": "2026-03-01T00:00:00Z",
                                              "end": "2026-04-01T00:00:00Z"}},
           "Encounter.period"),
      ]],
    ("CCM time from a period without times of day", "PUT", "/fhir/Encounter/e1",
     {**{k: v for k, v in ccm_encounter().items() if k != "length"},
      "period": {"start": "2026-03-01", "end": "2026-03-02"}}, {}, 422, "required",
     "Encounter.length"),
    ("CCM time placed by a month only", "PUT", "/fhir/Encounter/e1",
     ccm_encounter(start="2026-03"), {}, 422, "value", "Encounter.period.start"),
    ("CCM time in the future", "PUT", "/fhir/Encounter/e1",
     ccm_encounter(start="9999-12-31T23:00:00Z"), {}, 422, "business-rule",
     "Encounter.period.start"),
    ("a CCM consent in force without its date", "PUT", "/fhir/Consent/c1",
     {**{k: v for k, v in CCM_CONSENT.items() if k != "dateTime"}, "id": "c1"}, {}, 422,
     "required",
     "Consent.dateTime"),
    ("a CCM consent in force dated by its year only", "PUT", "/fhir/Consent/c1",
     {**CCM_CONSENT, "id": "c1", "dateTime": "2026"}, {}, 422, "required", "Consent.dateTime"),
    *[(f"a CCM consent in force obtained {when}", "PUT", "/fhir/Consent/c1",
       {**CCM_CONSENT, "id": "c1", "dateTime": value}, {}, 422, "business-rule",
       "Consent.dateTime")
      for when, value in [("in a year typed wrong", "2030-01-01"),
                          ("on the calendar's last day", "9999-12-31T23:59:59Z")]],
    *[(f"{method} {url} in a transaction", "POST", "/fhir",
       {"resourceType": "Bundle", "type": "transaction", "entry": [
           {"request": {"method": method, "url": url},
            **({"resource": {"resourceType": "Patient", "id": "a"}}
               if method in ("PUT", "POST") else {})}]},
       {}, 422, "not-supported", "Bundle.entry[0].request.url")
      for method, url in [("DELETE", "Patient/a/_history/1"), ("PUT", "Patient/a/whatever"),
                          ("POST", "Patient/a")]],
    ("a NUL character in a string", "POST", "/fhir/Patient",
     b'{"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "A\\u0000B"}]}',
     {}, 400, "structure", None),
    ("a key twice in one object", "POST", "/fhir/Patient",
     b'{"resourceType": "Patient", "active": true, "active": false}', {}, 400, "structure",
     None),
    ("a key twice in a Bundle entry's resource", "POST", "/fhir",
     b'{"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": '
     b'"POST", "url": "Encounter"}, "resource": {"resourceType": "Encounter", "status": '
     b'"finished", "status": "cancelled"}}]}', {}, 400, "structure", None),
    ("a body that is no UTF-8", "POST", "/fhir/Patient", b'{"resourceType": "Patient\xff"}',
     {}, 400, "structure", None),
    *[(f"a contained resource {name}", "PUT", "/fhir/Patient/b2",
       {"resourceType": "Patient", "id": "b2", "contained": [contained],
        "generalPractitioner": [{"reference": "#o1"}]}, {}, 422, code, f"Patient.{where}")
      for name, contained, code, where in [
          ("of no FHIR type", {"resourceType": "Bogus", "id": "o1"}, "structure",
           "contained[0].resourceType"),
          ("of an R5-only type", {"resourceType": "Requirements", "id": "o1"}, "structure",
           "contained[0].resourceType"),
          ("of an abstract type", {"resourceType": "DomainResource", "id": "o1"}, "structure",
           "contained[0].resourceType"),
          ("without resourceType", {"id": "o1"}, "structure", "contained[0].resourceType"),
          ("whose resourceType is a number", {"resourceType": 5, "id": "o1"}, "structure",
           "contained[0].resourceType"),
          ("without an id", {"resourceType": "Organization", "name": "x"}, "required",
           "contained[0].id"),
          ("that contains another (dom-2)", {"resourceType": "Organization", "id": "o1",
                                             "contained": [{"resourceType": "Bogus"}]},
           "invariant", "contained[0].contained"),
          ("with meta.versionId (dom-4)", {"resourceType": "Organization", "id": "o1",
                                           "meta": {"versionId": "3"}}, "invariant",
           "contained[0].meta"),
      ]],
    # Which one "#o1" names would be a guess (both were accepted, PUT 201).
    ("two contained resources with one id", "PUT", "/fhir/Patient/b2",
     {"resourceType": "Patient", "id": "b2",
      "contained": [{"resourceType": "Organization", "id": "o1", "name": "A"},
                    {"resourceType": "Organization", "id": "o1", "name": "B"}],
      "managingOrganization": {"reference": "#o1"}}, {}, 422, "duplicate",
     "Patient.contained[1].id"),
    ("two contained resources with one id in a transaction", "POST", "/fhir",
     {"resourceType": "Bundle", "type": "transaction", "entry": [
         {"request": {"method": "POST", "url": "Patient"}, "resource": {
             "resourceType": "Patient",
             "contained": [{"resourceType": "Organization", "id": "o1"},
                           {"resourceType": "Practitioner", "id": "o1"}],
             "generalPractitioner": [{"reference": "#o1"}]}}]}, {}, 422, "duplicate",
     "Bundle.entry[0].resource.contained[1].id"),
    ("a contained resource referred to from nowhere (dom-3)", "PUT", "/fhir/Patient/b2",
     {"resourceType": "Patient", "id": "b2",
      "contained": [{"resourceType": "Organization", "id": "o2"}]}, {}, 422, "invariant",
     "Patient.contained[0]"),
    *[(f"{name} (JSON types)", "PUT", f"/fhir/{rtype}/j1", {"resourceType": rtype, "id": "j1",
                                                           **body}, {}, 422, code, where)
      for name, rtype, body, code, where in [
          ('a boolean sent as "false"', "Organization", {"active": "false"}, "value",
           "Organization.active"),
          ("a boolean sent as 0", "Patient", {"active": 0}, "value", "Patient.active"),
          ('an integer sent as "2"', "Patient", {"multipleBirthInteger": "2"}, "value",
           "Patient.multipleBirthInteger"),
          ("an integer sent as true", "Patient", {"telecom": [{"rank": True}]}, "value",
           "Patient.telecom[0].rank"),
          ('a decimal sent as "25"', "Encounter", {**ccm_encounter(), "id": "j1", "length": {
              "value": "25", "unit": "min", "system": "http://unitsofmeasure.org",
              "code": "min"}}, "value", "Encounter.length.value"),
          ("an extension's boolean sent as a string", "Patient", {"extension": [
              {"url": "http://example.org/x", "valueBoolean": "true"}]}, "value",
           "Patient.extension[0].valueBoolean"),
          # The library read a number as seconds since 1970: a 500 in the CCM mapping, or
          # stored and published with "start": 1700000000 (its consumers set the events aside).
          ("a dateTime sent as a number", "Encounter", {**ccm_encounter(), "id": "j1",
                                                         "period": {"start": 1, "end": 2}},
           "value", "Encounter.period.start"),
          ("a consent's dateTime sent as a number", "Consent", {
              **{k: v for k, v in example("Consent/r4spec-basic.json").items() if k != "id"},
              "dateTime": 1700000000}, "value", "Consent.dateTime"),
          ("a care plan's created sent as a number", "CarePlan", {
              "status": "active", "intent": "plan", "subject": {"reference": "Patient/p1"},
              "created": 1700000000}, "value", "CarePlan.created"),
          ("a date sent as a number", "Patient", {"birthDate": 19740101}, "value",
           "Patient.birthDate"),
          ("an instant sent as a number", "Patient", {"meta": {"lastUpdated": 5}}, "value",
           "Patient.meta.lastUpdated"),
          ("a dateTime in a list sent as a number", "Condition", {
              "subject": {"reference": "Patient/p1"}, "onsetDateTime": 1700000000}, "value",
           "Condition.onsetDateTime"),
          ("a null element", "Patient", {"active": None}, "structure", "Patient.active"),
          ("a null element in a contained resource", "Patient", {
              "contained": [{"resourceType": "Organization", "id": "o", "name": None}],
              "managingOrganization": {"reference": "#o"}}, "structure",
           "Patient.contained[0].name"),
      ]],
    ("an Encounter.class code outside ActEncounterCode", "PUT", "/fhir/Encounter/e1",
     {**ccm_encounter(), "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                   "code": "BOGUS"}}, {}, 422, "code-invalid",
     "Encounter.class.code"),
    ("an Encounter.class code that is an object", "POST", "/fhir/Encounter",
     {**ccm_encounter(), "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                   "code": {"a": 1}}}, {}, 422, "value", "Encounter.class.code"),
    ("a status that is an object", "POST", "/fhir/Encounter",
     {**ccm_encounter(), "status": {"a": 1}}, {}, 422, "value", "Encounter.status"),
    ("$validate of a conditional reference sent alone", "POST", "/fhir/Encounter/$validate",
     {**ccm_encounter(), "subject": {"reference": "Patient?identifier=urn:mrn|1"}}, {}, 422,
     "not-supported", "Encounter.subject.reference"),
    ("a compressed body", "POST", "/fhir/Patient", {"resourceType": "Patient"},
     {"Content-Encoding": "gzip"}, 415, "not-supported", None),
    *[(f"the id {rid!r}", "POST", "/fhir", {"resourceType": "Bundle", "type": "transaction",
                                            "entry": [{"resource": {"resourceType": "Patient",
                                                                    "id": rid},
                                                       "request": {"method": "PUT",
                                                                   "url": f"Patient/{rid}"}}]},
       {}, 422, "value", "Bundle.entry[0].request.url") for rid in (".", "..")],
    *[(f"an entry URL id {name}", "POST", "/fhir", {"resourceType": "Bundle", "type": kind,
                                                    "entry": [{"resource": {
                                                        "resourceType": "Patient"},
                                                        "request": {"method": "PUT",
                                                                    "url": f"Patient/{rid}"}}]},
       {}, 422, "value", "Bundle.entry[0].request.url")
      for name, rid in (("with a space", "a b"), ("of 65 characters", "x" * 65),
                        ("with a non-ASCII letter", "ä")) for kind in ("transaction",)],
    ("a body id '.'", "POST", "/fhir/Patient/$validate",
     {"resourceType": "Patient", "id": "."}, {}, 422, "value", "Patient.id"),
    ("a conditional reference in a resource sent alone", "PUT", "/fhir/Encounter/e1",
     {**ccm_encounter(), "subject": {"reference": "Patient?identifier=urn:mrn|1"}}, {}, 422,
     "not-supported", "Encounter.subject.reference"),
    # Digits of other scripts (Arabic-Indic, fullwidth) are no FHIR date's: they were read as
    # 2026 (a regular expression's \d, then int()).
    *[(f"{name} with digits {digits!r}", "GET", f"{path}{digits}", None, {}, 400, "value",
       name)
      for name, path in (("_lastUpdated", "/fhir/Patient?_lastUpdated=ge"),
                         ("_since", "/fhir/Patient/p1/_history?_since="))
      for digits in ("\u0662\u0660\u0662\u0666", "\uff12\uff10\uff12\uff16",
                     "2026-0\u0663", "2026-03-01T1\u0660:00Z", "2026-03-01T10:00:00.\u0665Z",
                     "2026-03-01T10:00+0\u0665:00")],
    ("_lastUpdated with other digits in a conditional create", "POST", "/fhir/Patient",
     {"resourceType": "Patient"}, {"If-None-Exist": "_lastUpdated=%D9%A2%D9%A0%D9%A2%D9%A6"},
     400, "value", None),
    ("_lastUpdated with other digits in a Bundle's search", "POST", "/fhir",
     {"resourceType": "Bundle", "type": "transaction", "entry": [
         {"request": {"method": "POST", "url": "Patient",
                      "ifNoneExist": "_lastUpdated=\u0662\u0660\u0662\u0666"},
          "resource": {"resourceType": "Patient"}}]}, {}, 400, "value", None),
    ("a subject search on Consent (R4 has none)", "GET", "/fhir/Consent?subject=Patient/p1",
     None, {}, 400, "not-supported", "subject"),
    ("a #id reference to no contained resource", "PUT", "/fhir/Patient/b2",
     {"resourceType": "Patient", "id": "b2", "managingOrganization": {"reference": "#nope"}},
     {}, 422, "not-found", "Patient.managingOrganization.reference"),
    ("$validate of a resource containing one of no FHIR type", "POST", "/fhir/Patient/$validate",
     {"resourceType": "Patient", "contained": [{"resourceType": "Bogus", "id": "o1"}],
      "managingOrganization": {"reference": "#o1"}}, {},
     422, "structure", "Patient.contained[0].resourceType"),
    ("a NUL character in an id", "GET", "/fhir/Patient/a%00b", None, {}, 400, "value", None),
    ("a NUL character in a search", "GET", "/fhir/Patient?_id=%00", None, {}, 400, "value", None),
    ("a NUL character in If-None-Exist", "POST", "/fhir/Patient", {"resourceType": "Patient"},
     {"If-None-Exist": "identifier=urn:x|A%00B"}, 400, "value", "If-None-Exist"),
    ("a CCM Encounter starting on a leap second", "PUT", "/fhir/Encounter/e1",
     {**ccm_encounter(), "period": {"start": "2026-12-31T23:59:60Z"}}, {}, 422, "value",
     "Encounter"),
    ("a CCM Encounter beyond year 9999 in the practice's zone", "PUT", "/fhir/Encounter/e1",
     {**ccm_encounter(), "period": {"start": "9999-12-31T23:00:00-12:00"}}, {}, 422, "value",
     "Encounter"),
    ("a CCM Consent dated beyond year 9999 in UTC", "PUT", "/fhir/Consent/c1",
     {**CCM_CONSENT, "id": "c1", "dateTime": "9999-12-31T23:00:00-12:00"}, {}, 422, "value",
     "Consent"),
    ("empty ifNoneExist criteria in a transaction", "POST", "/fhir",
     {"resourceType": "Bundle", "type": "transaction", "entry": [
         {"request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier="},
          "resource": {"resourceType": "Patient"}}]},
     {}, 400, "required", "Bundle.entry[0].request.ifNoneExist"),
    ("a Bundle without a type", "POST", "/fhir", {"resourceType": "Bundle"}, {}, 422, "value",
     "Bundle.type"),
    ("a Condition whose subject is an Organization", "POST", "/fhir/Condition",
     {**example("Condition/r4spec-example.json"), "subject": {"reference": "Organization/x"}},
     {}, 422, "value", "Condition.subject.reference"),
    ("an identifier search with a comma (OR)", "GET", "/fhir/Patient?identifier=A,B", None, {},
     400, "not-supported", "identifier"),
    ("a transaction writing one resource twice", "POST", "/fhir",
     {"resourceType": "Bundle", "type": "transaction", "entry": [
         {"request": {"method": "PUT", "url": "Patient/a"},
          "resource": {"resourceType": "Patient", "id": "a"}},
         {"request": {"method": "DELETE", "url": "Patient/a"}}]},
     {}, 422, "invariant", "Bundle.entry[1].request.url"),
    ("empty If-None-Exist criteria", "POST", "/fhir/Patient", {"resourceType": "Patient"},
     {"If-None-Exist": "identifier="}, 400, "required", "If-None-Exist"),
    ("If-Match that is no ETag", "PUT", "/fhir/Patient/a", {"resourceType": "Patient", "id": "a"},
     {"If-Match": "garbage"}, 400, "value", "If-Match"),
    ("update without an id in its body", "PUT", "/fhir/Patient/a", {"resourceType": "Patient"},
     {}, 400, "required", "Patient.id"),
    ("two entries with the same fullUrl (bdl-7)", "POST", "/fhir",
     {"resourceType": "Bundle", "type": "transaction", "entry": [
         {"fullUrl": "urn:uuid:0b7f1f6e-6c49-4b0c-9a51-3e1c9e2f1a01",
          "request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}},
         {"fullUrl": "urn:uuid:0b7f1f6e-6c49-4b0c-9a51-3e1c9e2f1a01",
          "request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}},
     ]}, {}, 422, "invariant", "Bundle.entry[1].fullUrl"),
    # What our rules read before the library checks JSON types (500s found by fuzzing).
    *[(f"{name} where a rule reads codes", "POST", f"/fhir/{rtype}", {
        "resourceType": rtype, "patient": {"reference": "Patient/p1"},
        "policyRule": {"text": "x"}, "status": "active", "category": [{"text": "x"}],
        element: value} if rtype == "Consent" else {
        "resourceType": rtype, "subject": {"reference": "Patient/p1"}, element: value},
       {}, 422, "value", where) for name, rtype, element, value, where in (
        ("a number for a coding list", "Condition", "clinicalStatus", {"coding": 5},
         "Condition.clinicalStatus.coding"),
        ("true for a coding list", "Condition", "verificationStatus", {"coding": True},
         "Condition.verificationStatus.coding"),
        ("a number for a coding list", "Consent", "scope", {"coding": 1}, "Consent.scope.coding"),
        ("a list for a code", "Consent", "scope", {"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/consentscope",
             "code": ["treatment"]}]}, "Consent.scope.coding[0].code"),
        ("an object for a code", "Condition", "clinicalStatus", {"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
             "code": {"a": 1}}]}, "Condition.clinicalStatus.coding[0].code"))],
    # Escaped text no FHIR string holds, wherever it is: refused as read, never echoed.
    *[(f"{what} in {where or 'a key'}", "POST", path, body.replace(b"BAD", escape), {}, 400,
       "structure", where) for what, escape in (("a lone surrogate", b"\\ud800"),
                                   ("a lone low surrogate", b"\\uDC00x"),
                                   ("a NUL character", b"\\u0000"))
      for path, body, where in (
          ("/fhir/Patient", b'{"resourceType":"Patient","name":[{"family":"aBAD"}]}',
           "Patient.name[0].family"),
          ("/fhir/Patient", b'{"resourceType":"Patient","text":{"status":"generated","div":'
           b'"<div xmlns=\\"http://www.w3.org/1999/xhtml\\">xBAD</div>"}}', "Patient.text.div"),
          ("/fhir/Patient/$validate?mode=profile", b'{"resourceType":"Patient","aBAD":1}',
           None),  # a key: named escaped
          ("/fhir/Patient", b'{"resourceType":"PatientBAD"}', None),  # the path's root
          ("/fhir", b'{"resourceType":"BundleBAD","type":"batch"}', None),
          ("/fhir", b'{"resourceType":"Bundle","type":"transaction","entry":[{"request":'
           b'{"method":"POST","url":"PatBAD"},"resource":{"resourceType":"Patient"}}]}',
           "Bundle.entry[0].request.url"),
          ("/fhir", b'{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":'
           b'"GET","url":"Patient?identifier=BAD"}}]}', "Bundle.entry[0].request.url"),
          ("/fhir", b'{"resourceType":"Bundle","type":"transaction","entry":[{"request":'
           b'{"method":"POST","url":"Patient","ifNoneExist":"identifier=BAD"},'
           b'"resource":{"resourceType":"Patient"}}]}', "Bundle.entry[0].request.ifNoneExist"))],
    # Identifiers are searched and matched on their first 500 characters: a longer one was cut
    # (a conditional create on it created the resource again every time) or, a system, a 500.
    *[(f"an identifier {part} of 501 characters", "POST", "/fhir/Patient",
       {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "v",
                                                   part: "u" * 501}]},
       {}, 422, "too-long", f"Patient.identifier[0].{part}") for part in ("system", "value")],
    ("more _id values than a search takes", "GET", "/fhir/Patient?_id=" + "," * 1000, None, {},
     400, "too-costly", "_id"),
    # FHIR JSON is UTF-8: a body in another Unicode encoding is refused as a charset other than
    # UTF-8 is (it was read, as json.loads reads bytes), whatever Content-Type says.
    *[(f"a {encoding} body{label}", "POST", "/fhir/Patient",
       '{"resourceType":"Patient","name":[{"family":"Muñoz"}]}'.encode(encoding),
       headers, 415, "not-supported", None)
      for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be")
      for label, headers in (("", {}), (" labelled UTF-8",
                                        {"Content-Type": "application/fhir+json; charset=utf-8"}))],
    ("a surrogate's bytes (no UTF-8)", "POST", "/fhir/Patient",
     b'{"resourceType":"Patient","name":[{"family":"a\xed\xa0\x80"}]}', {}, 400, "structure",
     None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_bad_input_is_refused_with_an_operation_outcome(fhir, case):
    _, method, path, body, headers, status, code, expression = case
    before = await counts(fhir)
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    r = await fhir.request(method, path, content=content,
                           headers={"Content-Type": "application/fhir+json", **headers})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == code, outcome
    if expression is not None:
        assert any(expression in i.get("expression", []) for i in outcome["issue"]), outcome
    assert await counts(fhir) == before


async def test_chunked_body_over_the_limit_is_413_operation_outcome(fhir):
    async def chunks():
        for _ in range(30):
            yield b" " * 10_000

    r = await fhir.post("/fhir/Patient", content=chunks(),
                        headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 413 and r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(("headers", "query"), [
    ({"Accept": "application/fhir+json; fhirVersion=4.0"}, ""),
    ({"Accept": "application/fhir+json; fhirVersion=4.0.0"}, ""),
    ({"Accept": "application/fhir+json; fhirVersion=5.0, application/json; fhirversion=4.0.1"},
     ""),
    ({"Accept": "text/html, application/json;q=0.9"}, ""),
    ({"Accept": "*/*"}, ""), ({"Accept": ""}, ""), ({"Accept": "application/*+json"}, ""),
    ({}, "?_format=json"), ({}, "?_format=application/fhir+json"),
    ({"Accept": "application/fhir+xml"}, "?_format=application%2Ffhir%2Bjson"),  # _format wins
])
async def test_json_asked_for_in_any_of_its_spellings_is_served(fhir, headers, query):
    r = await fhir.get(f"/fhir/metadata{query}", headers=headers)
    assert r.status_code == 200, r.text


async def test_the_fhir_version_parameter_names_r4_or_the_version_refused(fhir):
    ok = await fhir.post("/fhir/Patient", json={"resourceType": "Patient"},
                         headers={"Content-Type": "application/fhir+json; fhirVersion=4.0"})
    assert ok.status_code == 201, ok.text
    sent = await fhir.post("/fhir/Patient", json={"resourceType": "Patient"},
                           headers={"Content-Type": "application/fhir+json; fhirVersion=5.0"})
    assert "fhirVersion=5.0" in sent.json()["issue"][0]["diagnostics"]
    asked = await fhir.get("/fhir/metadata",
                           headers={"Accept": "application/fhir+json; fhirVersion=3.0"})
    assert asked.status_code == 406
    assert "only FHIR R4 is served" in asked.json()["issue"][0]["diagnostics"]


async def test_a_key_twice_is_named_and_a_utf8_bom_is_still_read(fhir):
    twice = await fhir.post("/fhir/Patient", content=b'{"resourceType": "Patient", '
                            b'"name": [{"family": "A", "family": "B"}]}',
                            headers={"Content-Type": "application/fhir+json"})
    assert twice.status_code == 400 and "'family'" in twice.json()["issue"][0]["diagnostics"]
    bom = await fhir.post("/fhir/Patient", content=b'\xef\xbb\xbf{"resourceType": "Patient"}',
                          headers={"Content-Type": "application/fhir+json"})
    assert bom.status_code == 201, bom.text
    bom = await fhir.post("/fhir/Patient", content='\ufeff{"resourceType": "Patient", "name": '
                          '[{"family": "Muñoz"}]}'.encode(),
                          headers={"Content-Type": "application/fhir+json; charset=utf-8"})
    assert bom.status_code == 201, bom.text
    assert bom.json()["name"] == [{"family": "Muñoz"}]


async def test_a_batch_entry_containing_an_unknown_type_fails_alone(fhir):
    bad = {"resourceType": "Patient", "id": "b4",
           "contained": [{"resourceType": "Bogus", "id": "o1"}],
           "managingOrganization": {"reference": "#o1"}}
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": bad, "request": {"method": "PUT", "url": "Patient/b4"}},
        {"resource": {"resourceType": "Patient", "id": "b5"},
         "request": {"method": "PUT", "url": "Patient/b5"}}]})
    assert r.status_code == 200, r.text
    assert [e["response"]["status"] for e in r.json()["entry"]] == [
        "422 Unprocessable Entity", "201 Created"]
    assert (await fhir.get("/fhir/Patient/b5")).status_code == 200


async def test_two_authorization_headers_are_refused(fhir):
    good = fhir.headers["Authorization"]
    r = await fhir.get("/fhir/Patient/x", headers=[("Authorization", good),
                                                   ("Authorization", "Bearer not-a-token")])
    assert r.status_code == 401, r.text


async def test_a_method_the_url_does_not_take_says_which_it_does(fhir):
    r = await fhir.patch("/fhir/Patient/x", json={})
    assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"
    assert "PUT" in r.headers["allow"] and "GET" in r.headers["allow"]
    assert "takes DELETE, GET, HEAD, PUT" in r.json()["issue"][0]["diagnostics"]
    posted = await fhir.post("/fhir/Patient/x", json={"resourceType": "Patient", "id": "x"})
    assert posted.status_code == 405
    assert "a create with an id of your own is a PUT" in posted.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("path", ["/fhir/Bundle", "/fhir/Patient"])
async def test_a_bundle_sent_to_a_type_is_told_where_bundles_go(fhir, path):
    r = await fhir.post(path, json={"resourceType": "Bundle", "type": "transaction"})
    assert r.status_code in (400, 404), r.text
    assert "POSTed to the base, /fhir" in r.json()["issue"][0]["diagnostics"]


async def test_a_read_only_token_may_send_a_bundle_of_reads_but_no_write(fhir):
    read_only = as_practice(fhir, "alpha-read")
    reads = {"resourceType": "Bundle", "type": "batch",
             "entry": [{"request": {"method": "GET", "url": "Patient/nobody"}}]}
    r = await fhir.post("/fhir", json=reads, headers=read_only)
    assert r.status_code == 200 and r.json()["entry"][0]["response"]["status"] == "404 Not Found"
    writes = {**reads, "entry": [*reads["entry"], {
        "resource": {"resourceType": "Patient", "id": "w"},
        "request": {"method": "PUT", "url": "Patient/w"}}]}
    # A batch: the write alone is refused; a transaction: all of it.
    batch = await fhir.post("/fhir", json=writes, headers=read_only)
    assert [e["response"]["status"] for e in batch.json()["entry"]] == [
        "404 Not Found", "403 Forbidden"]
    assert (await fhir.get("/fhir/Patient/w")).status_code == 404
    assert (await fhir.post("/fhir", json={**writes, "type": "transaction"},
                            headers=read_only)).status_code == 403


async def test_a_write_only_token_cannot_read_through_a_bundle(fhir):
    from ccm_shared.tenancy import create_token

    await fhir.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    write_only = await create_token(fhir.runtime.db.engine, practice_id="alpha",
                                    scopes=("fhir:write",))
    mixed = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/p1"}},
        {"request": {"method": "DELETE", "url": "Patient/nobody"}}]}
    r = await fhir.post("/fhir", json=mixed, headers={"Authorization": f"Bearer {write_only}"})
    read, deleted = r.json()["entry"]
    assert read["response"]["status"] == "403 Forbidden" and "resource" not in read
    assert "fhir:read" in read["response"]["outcome"]["issue"][0]["diagnostics"]
    assert deleted["response"]["status"] == "204 No Content"
    r = await fhir.post("/fhir", json={**mixed, "type": "transaction"},
                        headers={"Authorization": f"Bearer {write_only}"})
    assert r.status_code == 403 and "fhir:read" in r.text


async def test_a_contained_resource_referring_to_its_container_is_referred_to(fhir):
    patient = {"resourceType": "Patient", "id": "c3", "contained": [{
        "resourceType": "Practitioner", "id": "x", "extension": [{
            "url": "http://example.org/x", "valueReference": {"reference": "#"}}]}]}
    r = await fhir.put("/fhir/Patient/c3", json=patient)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("div", [
    '<div xmlns="http://www.w3.org/1999/xhtml">Peter <b>James</b> Chalmers</div>',
    '<div xmlns="http://www.w3.org/1999/xhtml" xml:lang="en"><table><tr><td style="color:red">'
    'x</td></tr></table><a href="https://example.org/a">link</a></div>',
    '<div xmlns="http://www.w3.org/1999/xhtml"><img src="data:image/png;base64,iVBORw0KGgo=" '
    'alt="scan"/></div>',
    '<div xmlns="http://www.w3.org/1999/xhtml"><kbd>F1</kbd><address>1 Main St</address>A&#160;B'
    '</div>',
])
async def test_narrative_with_basic_formatting_is_taken(fhir, div):
    r = await fhir.post("/fhir/Patient", json={"resourceType": "Patient",
                                               "text": {"status": "generated", "div": div}})
    assert r.status_code == 201, r.text



async def test_one_issue_for_a_reference_that_is_none_and_integers_said_plainly(fhir):
    from tests.unit.ingest.test_fhir_api import ccm_encounter

    enc = {**ccm_encounter(), "subject": {"reference": "http://test/fhir/Patient/p1/"}}
    r = await fhir.put("/fhir/Encounter/e1", json=enc)
    assert r.status_code == 422
    assert [i["diagnostics"] for i in r.json()["issue"]
            if "R4 allows" in i["diagnostics"]] == []  # only the format issue
    r = await fhir.post("/fhir/Patient", content=b'{"resourceType": "Patient", '
                        b'"multipleBirthInteger": 1e3}')
    assert r.status_code == 422
    assert "number without a fraction or exponent, not 1000.0" in r.text


def _validate_path(method: str, path: str, body) -> str | None:  # noqa: ANN001
    """The $validate URL that checks what ``method path`` would store, when there is one."""
    if method not in ("POST", "PUT") or not isinstance(body, dict) or "$" in path:
        return None
    parts = path.split("/")[2:]  # after /fhir
    if not parts:
        return "/fhir/Bundle/$validate"
    if method == "POST" and len(parts) == 1 or method == "PUT" and len(parts) == 2:
        return f"/fhir/{parts[0]}/$validate"
    return None


VALIDATED = [c for c in CASES if c[5] == 422 and not c[4] and _validate_path(c[1], c[2], c[3])]


@pytest.mark.parametrize("case", VALIDATED, ids=[c[0] for c in VALIDATED])
async def test_validate_refuses_what_the_write_refuses(fhir, case):
    """$validate answers what the write would: an EHR that checks first is not told 'valid'
    for a resource or Bundle the write then refuses (a transaction's urn: reference that names
    no entry, a CCM Encounter without its time, …)."""
    _, method, path, body, _, _, code, expression = case
    r = await fhir.post(_validate_path(method, path, body), json=body)
    assert r.status_code == 422, r.text
    outcome = r.json()
    assert outcome["issue"][0]["code"] == code, outcome
    if expression is not None:
        assert any(expression in i.get("expression", []) for i in outcome["issue"]), outcome


def _transaction(*entries) -> dict:  # noqa: ANN002
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


PATIENT_URN = "urn:uuid:0b7f1f6e-6c49-4b0c-9a51-3e1c9e2f1a01"


async def test_validate_resolves_a_transactions_references_as_the_write_would(fhir):
    before = await counts(fhir)
    patient = {"fullUrl": PATIENT_URN, "resource": {"resourceType": "Patient"},
               "request": {"method": "POST", "url": "Patient"}}
    encounter = {"resource": {**ccm_encounter(), "subject": {"reference": PATIENT_URN}},
                 "request": {"method": "POST", "url": "Encounter"}}
    by_criteria = {"resource": {**ccm_encounter(), "subject": {
        "reference": "Patient?identifier=urn:mrn|1"}}, "request": {"method": "POST",
                                                                "url": "Encounter"}}
    for bundle in (_transaction(patient, encounter), _transaction(by_criteria)):
        r = await fhir.post("/fhir/Bundle/$validate", json=bundle)
        assert r.status_code == 200, r.text  # a CCM Encounter of this server's patient
    # A conditional reference of a type not stored here is refused, as the write refuses it.
    odd = {"resource": {**ccm_encounter(), "subject": {"reference": "Group?name=x"}},
           "request": {"method": "POST", "url": "Encounter"}}
    r = await fhir.post("/fhir/Bundle/$validate", json=_transaction(odd))
    assert r.status_code == 422 and "type not supported" in r.text
    assert r.json()["issue"][0]["expression"] == ["Bundle.entry[0].resource.subject.reference"]
    # Two entries updating one resource.
    twice = [{"resource": {"resourceType": "Patient", "id": "p9"},
              "request": {"method": "PUT", "url": "Patient/p9"}}] * 2
    r = await fhir.post("/fhir/Bundle/$validate", json=_transaction(*twice))
    assert r.status_code == 422 and "may touch a resource only once" in r.text
    assert await counts(fhir) == before  # nothing stored, whatever the answer


async def test_validate_mode_profile_checks_only_the_content(fhir):
    untimed = {k: v for k, v in ccm_encounter().items() if k not in ("period", "length")}
    r = await fhir.post("/fhir/Encounter/$validate", json=untimed)
    assert r.status_code == 422 and r.json()["issue"][0]["expression"] == ["Encounter.length"]
    for mode in ("create", "update"):
        assert (await fhir.post(f"/fhir/Encounter/$validate?mode={mode}",
                                json=untimed)).status_code == 422
    assert (await fhir.post("/fhir/Encounter/$validate?mode=profile",
                            json=untimed)).status_code == 200
    nowhere = _transaction({"resource": {**ccm_encounter(), "subject": {"reference": NOWHERE}},
                            "request": {"method": "POST", "url": "Encounter"}})
    assert (await fhir.post("/fhir/Bundle/$validate?mode=profile",
                            json=nowhere)).status_code == 200
    assert (await fhir.post("/fhir/Bundle/$validate", json=nowhere)).status_code == 422
    r = await fhir.post("/fhir/Encounter/$validate?mode=delete", json=untimed)
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["mode"]


def _entry(resource, method: str, url: str, **request) -> dict:  # noqa: ANN001
    return {**({"resource": resource} if resource is not None else {}),
            "request": {"method": method, "url": url, **request}}


UNTIMED = {k: v for k, v in ccm_encounter().items() if k not in ("period", "length")}
AGREEING = [
    # (name, Bundle, the status both answer): $validate and POST /fhir agree.
    ("a DELETE entry's resource is not looked at", _transaction(
        _entry(UNTIMED, "DELETE", "Encounter/d1")), 200),
    ("a GET entry's resource is not looked at", _transaction(
        _entry({**UNTIMED, "meta": {"lastUpdated": "2030-01-01T00:00:00Z"}}, "GET",
               "Encounter/d2")), 200),
    ("a DELETE entry's resource that is no object", _transaction(
        _entry("x", "DELETE", "Encounter/d3")), 200),
    ("a urn: reference inside a contained resource does not hide the rest", _transaction(
        _entry({**UNTIMED, "contained": [{"resourceType": "Practitioner", "id": "c1",
                                          "extension": [{"url": "urn:x", "valueReference": {
                                              "reference": NOWHERE}}]}],
                "participant": [{"individual": {"reference": "#c1"}}]}, "POST",
               "Encounter")), 422),
    ("a PUT whose body names another id", _transaction(
        _entry({"resourceType": "Patient", "id": "p2"}, "PUT", "Patient/p1")), 400),
    ("an ifMatch that is no version", _transaction(
        _entry({"resourceType": "Patient", "id": "p3"}, "PUT", "Patient/p3",
               ifMatch="abc")), 400),
    ("ifNoneExist criteria not supported", _transaction(
        _entry({"resourceType": "Patient"}, "POST", "Patient", ifNoneExist="foo=bar")), 400),
    ("a conditional reference with criteria not supported", _transaction(
        _entry({**ccm_encounter(), "subject": {"reference": "Patient?foo=bar"}}, "POST",
               "Encounter")), 400),
    ("a conditional reference with criteria the search refuses", _transaction(
        _entry({**ccm_encounter(), "subject": {"reference": "Patient?identifier=a,b"}},
               "POST", "Encounter")), 400),
    ("an ifMatch on a create, which is not read", _transaction(
        _entry({"resourceType": "Patient"}, "POST", "Patient", ifMatch="abc")), 200),
    ("an ifMatch on a read, which is not read", _transaction(
        _entry(None, "GET", "Patient/zz", ifMatch="abc")), 200),
    ("ifNoneExist criteria the search refuses", _transaction(
        _entry({"resourceType": "Patient"}, "POST", "Patient",
               ifNoneExist="identifier=a,b")), 400),
    ("a conditional delete the search refuses", _transaction(
        _entry(None, "DELETE", "Patient?_lastUpdated=junk")), 400),
    ("a delete of no id and no criteria", _transaction(_entry(None, "DELETE", "Patient")), 400),
    ("an update of no id and no criteria", _transaction(
        _entry({"resourceType": "Patient"}, "PUT", "Patient")), 422),
    ("a method that is a list", _transaction(_entry(None, ["GET"], "Patient")), 422),
    ("a versionId that is a list beside a fullUrl", _transaction(
        {"fullUrl": PATIENT_URN, **_entry({"resourceType": "Patient", "meta": {
            "versionId": [1]}}, "POST", "Patient")}), 422),
]


@pytest.mark.parametrize("name, bundle, status", AGREEING, ids=[c[0] for c in AGREEING])
async def test_validate_and_the_transaction_agree(fhir, name, bundle, status):
    v = await fhir.post("/fhir/Bundle/$validate", json=bundle)
    assert v.status_code == status, v.text
    w = await fhir.post("/fhir", json=bundle)
    assert w.status_code == status, w.text
    if status >= 400:
        assert v.json()["issue"][0]["code"] == w.json()["issue"][0]["code"]


async def test_a_batch_entry_whose_method_is_a_list_is_refused_alone(fhir):
    r = await fhir.post("/fhir", json={**_transaction(_entry(None, ["GET"], "Patient")),
                                       "type": "batch"})
    assert r.status_code == 200, r.text
    assert r.json()["entry"][0]["response"]["status"].startswith("422")


async def test_validate_answers_every_resources_problem_together(fhir):
    untimed = _entry(UNTIMED, "POST", "Encounter")
    odd = _entry({**ccm_encounter(), "participant": [{"individual": {
        "reference": "Basic?identifier=a"}}]}, "POST", "Encounter")
    r = await fhir.post("/fhir/Bundle/$validate", json=_transaction(untimed, odd))
    assert r.status_code == 422
    assert [i["expression"][0].split(".resource")[0] for i in r.json()["issue"]] == [
        "Bundle.entry[0]", "Bundle.entry[1]"]


async def test_validate_gives_the_writes_warnings_and_mode_update_needs_an_id(fhir):
    pprf = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                   "v3-ParticipationType", "code": "PPRF"}]}]
    far = {**ccm_encounter(), "participant": [{"type": pprf, "individual": {
        "reference": "https://other.example/fhir/Practitioner/md"}}]}
    r = await fhir.post("/fhir/Encounter/$validate", json=far)
    assert r.status_code == 200, r.text
    assert [i["severity"] for i in r.json()["issue"]] == ["information", "warning"]
    assert "primary performer (PPRF)" in r.json()["issue"][1]["diagnostics"]
    r = await fhir.post("/fhir/Bundle/$validate", json=_transaction(_entry(far, "POST",
                                                                           "Encounter")))
    assert r.json()["issue"][1]["expression"] == [
        "Bundle.entry[0].resource.participant[0].individual"]
    body = {k: v for k, v in ccm_encounter().items() if k != "id"}
    r = await fhir.post("/fhir/Encounter/$validate?mode=update", json=body)
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["Encounter.id"]


async def test_a_batch_entry_locates_the_mappings_error_as_a_transaction_does(fhir):
    for kind in ("batch", "transaction"):
        r = await fhir.post("/fhir", json={**_transaction(_entry(UNTIMED, "POST", "Encounter")),
                                           "type": kind})
        issues = (r.json()["entry"][0]["response"]["outcome"]["issue"] if kind == "batch"
                  else r.json()["issue"])
        assert issues[0]["expression"] == ["Bundle.entry[0].resource.length"], kind


async def test_text_that_only_looks_like_a_nul_or_a_surrogate_is_taken(fhir):
    """An escaped backslash before 'u0000' or 'ud800' is text (refused before: the check looked
    for the six bytes), and so is a surrogate pair (an emoji written escaped)."""
    body = b'{"resourceType":"Patient","name":[{"family":"a\\\\u0000 \\\\ud800 \\ud83d\\ude00"}]}'
    r = await fhir.post("/fhir/Patient", content=body,
                        headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text
    assert r.json()["name"][0]["family"] == "a\\u0000 \\ud800 \U0001F600"


async def test_a_batch_search_entry_with_a_nul_fails_alone_at_its_url(fhir):
    """%00 in a GET entry's URL decodes to a NUL the HTTP edge never saw: the entry is refused
    (400 at its URL), the others go on."""
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?identifier=%00"}},
        {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}},
    ]})
    assert r.status_code == 200, r.text
    first, second = r.json()["entry"]
    assert first["response"]["status"] == "400 Bad Request"
    assert first["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[0].request.url"]
    assert second["response"]["status"] == "201 Created"


@pytest.mark.parametrize(("element", "value", "says"), [
    ("birthDate", "12/25/1974", "not a FHIR date: write YYYY, YYYY-MM or YYYY-MM-DD"),
    ("deceasedDateTime", "2026-03-04 14:00", "not a FHIR dateTime: write YYYY, YYYY-MM, "),
])
async def test_a_date_in_another_form_is_told_the_forms_fhir_takes(fhir, element, value, says):
    r = await fhir.post("/fhir/Patient", json={"resourceType": "Patient", element: value})
    assert r.status_code == 422, r.text
    assert r.json()["issue"][0]["diagnostics"].startswith(f"Patient.{element}: {says}")


async def test_an_if_match_refused_is_quoted_as_sent(fhir):
    r = await fhir.put("/fhir/Patient/a", json={"resourceType": "Patient", "id": "a"},
                       headers={"If-Match": 'W/"x"'})
    assert r.status_code == 400
    assert """If-Match 'W/"x"' is not a version ETag""" in r.json()["issue"][0]["diagnostics"]


async def test_conditional_references_are_searched_once_each_and_bounded(fhir):
    """The same conditional reference is one search however often it is given; more than 1,000
    different ones in a Bundle are a 422 (each is a search while the transaction holds its
    locks: 20,000 took 20 s)."""
    await fhir.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1",
                                             "identifier": [{"system": "urn:mrn", "value": "1"}]})
    same = {**ccm_encounter(), "subject": {"reference": "Patient?identifier=urn:mrn|1"},
            "participant": [{"individual": {"reference": "Patient?identifier=urn:mrn|1"}}]
            * 3000}
    r = await fhir.post("/fhir", json=_transaction(_entry(same, "POST", "Encounter")))
    assert r.status_code != 500, r.text[:300]
    many = {**ccm_encounter(), "subject": {"reference": "Patient?identifier=urn:mrn|1"},
            "extension": [{"url": "urn:x", "valueReference": {
                "reference": f"Patient?_id=p1,x{n}"}} for n in range(1001)]}
    before = await counts(fhir)
    r = await fhir.post("/fhir", json=_transaction(_entry(many, "POST", "Encounter")))
    assert r.status_code == 422 and r.json()["issue"][0]["code"] == "too-costly", r.text[:300]
    assert await counts(fhir) == before


async def test_ingest_config_codes_that_are_no_text_are_refused_and_not_stored(fhir):
    for code in ("http://x|\\ud800", "http://x|a\\u0000"):
        body = '{"chronic_codes": ["' + code + '"]}'
        r = await fhir.put("/v1/practices/alpha/ingest-config", content=body,
                           headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        shown = await fhir.get("/v1/practices/alpha/ingest-config")
        assert shown.status_code == 200 and shown.json()["overrides"] == {}
