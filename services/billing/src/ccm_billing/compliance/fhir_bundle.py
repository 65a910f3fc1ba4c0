"""The audit packet as a FHIR R4 Bundle of type collection.

Consents at their newest version; Encounters (time entries) as the month's close locked them,
each later version a ``ccm-correction`` extension, and the initiating visit; each month's care
plans and chronic Conditions at the version its decision was taken on (version-specific entries,
``CarePlan/x/_history/2``: another month may show another version), with the decision's verdict
on them in its Basic; one Provenance per source version (versionId, SHA-256, received time);
review evidence as completed Tasks; the stored ChargeItems and Invoices as issued; the
AuditEvents of the audit log entries that name the patient; and one List per month that points
to that month's part of it all.
"""

from __future__ import annotations

import hashlib
import json

from ccm_billing.adapters.fhir import code_system

EXT = "http://ccm-platform.org/fhir/StructureDefinition"
CS = "http://ccm-platform.org/fhir/CodeSystem/compliance"


def canonical(doc: dict) -> bytes:
    """The bytes the packet's SHA-256 is taken over (sorted keys, no spaces)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sha256_of(doc: dict) -> str:
    return hashlib.sha256(canonical(doc)).hexdigest()


def _short(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _source_ext(src: dict | None) -> list[dict]:
    if not src:
        return []
    return [{"url": f"{EXT}/source-version", "extension": [
        {"url": "versionId", "valueString": src["versionId"]},
        {"url": "sha256", "valueString": src["sha256"]},
        {"url": "receivedAt", "valueDateTime": src["receivedAt"]},
    ]}]


def _meta(src: dict | None) -> dict:
    return {"versionId": src["versionId"], "lastUpdated": src["lastUpdated"]} if src else {}


def _consent(patient: str, c: dict) -> dict:
    resource = {
        "resourceType": "Consent", "id": c["consent"].split("/", 1)[1],
        "status": c["status"],
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "treatment"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0",
                                  "display": "Patient Consent"}], "text": "CCM consent"}],
        "patient": {"reference": f"Patient/{patient}"},
        "provision": {"type": c["provision"]},
        "extension": [{"url": f"{EXT}/consent-method", "valueCode": c["method"]},
                      *_source_ext(c.get("source"))],
    }
    # When it was obtained as the EHR wrote it (a dateTime keeps its time and zone), else the
    # practice's day billing reads it as.
    if c.get("obtainedAt") or c.get("obtainedOn"):
        resource["dateTime"] = c.get("obtainedAt") or c["obtainedOn"]
    if c.get("performer"):  # who obtained it: the billing practitioner it names (rules §3.1)
        resource["performer"] = [{"reference": p} for p in c["performer"]]
    period = dict(c.get("period") or {})
    if c.get("effectiveUntil") and (not period.get("end")
                                    or c["effectiveUntil"] < period["end"][:10]):
        period["end"] = c["effectiveUntil"]  # revoked: in effect to the end of that month
    if period:
        resource["provision"]["period"] = period
    if c.get("firstReceivedAt"):
        resource["extension"].append({"url": f"{EXT}/consent-first-received",
                                      "valueDateTime": c["firstReceivedAt"]})
    if meta := _meta(c.get("source")):
        resource["meta"] = meta
    return resource


ENCOUNTER_STATUS = {"finished": "finished", "cancelled": "cancelled"}


def _encounter(patient: str, e: dict) -> dict:
    resource = {
        "resourceType": "Encounter", "id": e["entry"],
        "status": ENCOUNTER_STATUS.get(e["status"], "entered-in-error"),
        # The class is not part of what billing receives: said so rather than guessed.
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "UNK"},
        "subject": {"reference": f"Patient/{patient}"},
        "extension": [
            {"url": f"{EXT}/ccm-counted", "valueBoolean": e["counted"]},
            *([{"url": f"{EXT}/ccm-not-counted-reason", "valueCode": e["reason"]}]
              if e["reason"] else []),
            *([{"url": f"{EXT}/ccm-performer-role", "valueCode": e["role"]}] if e["role"] else []),
            *_source_ext(e.get("source")),
            *(_correction_ext(c) for c in e.get("corrections", [])),
        ],
    }
    if e["start"]:
        resource["period"] = {"start": e["start"]}
    if e["seconds"] is not None:
        resource["length"] = {"value": e["seconds"], "unit": "s",
                              "system": "http://unitsofmeasure.org", "code": "s"}
    if e["performer"]:
        resource["participant"] = [{"individual": {"reference": e["performer"]}}]
    if meta := _meta(e.get("source")):
        resource["meta"] = meta
    return resource


def _correction_ext(c: dict) -> dict:
    """A version of the Encounter received after the month was locked, and what the filing that
    took it in recorded (the Encounter itself stays as locked at close)."""
    parts = [{"url": "versionId", "valueString": c["versionId"]},
             {"url": "sha256", "valueString": c["sha256"]},
             {"url": "receivedAt", "valueDateTime": c["receivedAt"]},
             {"url": "event", "valueString": c["event"]}]
    if c.get("status"):
        parts.append({"url": "status", "valueCode": c["status"]})
    if (filing := c.get("filing")) is not None:
        parts += [{"url": "revision", "valueInteger": filing["revision"]},
                  {"url": "filedAt", "valueDateTime": filing["filedAt"]},
                  {"url": "filingReason", "valueString": filing["reason"]},
                  {"url": "counted", "valueBoolean": filing["counted"]}]
        if filing["notCountedReason"]:
            parts.append({"url": "notCountedReason", "valueCode": filing["notCountedReason"]})
    return {"url": f"{EXT}/ccm-correction", "extension": parts}


def _visit(patient: str, visit: dict | None) -> dict | None:
    """The visit that initiated the CCM a month billed (its codes, day and performers)."""
    if visit is None:
        return None
    resource = {
        "resourceType": "Encounter", "id": visit["encounter"], "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "UNK"},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": visit["date"]},
        "extension": [{"url": f"{EXT}/ccm-initiating-visit", "valueBoolean": True}],
    }
    if visit["codes"]:
        resource["type"] = [{"coding": [{"system": code_system(c), "code": c}
                                        for c in visit["codes"]]}]
    if visit["performers"]:
        resource["participant"] = [{"individual": {"reference": p}} for p in visit["performers"]]
    return resource


def version_ref(kind: str, resource_id: str, version: dict | None) -> str:
    """A version-specific reference (``CarePlan/x/_history/2``): a month's evidence is one
    version of a resource that other months may show at another."""
    ref = f"{kind}/{resource_id}"
    return f"{ref}/_history/{version['versionId']}" if version else ref


def _care_plan(patient: str, plan_id: str, v: dict | None, fact: dict | None = None) -> dict:
    """One version of a care plan as billing received it (or, for a plan billing holds no
    version of, as the decision read it)."""
    seen = v or fact or {}
    resource = {
        "resourceType": "CarePlan", "id": plan_id,
        "status": seen["status"], "intent": seen["intent"],
        "subject": {"reference": f"Patient/{patient}"},
        "extension": _source_ext(v),
    }
    if meta := _meta(v):
        resource["meta"] = meta
    if seen.get("created"):
        resource["created"] = seen["created"]
    return resource


def _condition(patient: str, condition_id: str, v: dict) -> dict:
    """One version of a Condition as billing received it (the codes and statuses it carried)."""
    resource = {
        "resourceType": "Condition", "id": condition_id, "meta": _meta(v),
        "subject": {"reference": f"Patient/{patient}"},
        "extension": _source_ext(v),
    }
    if v["clinicalStatus"]:
        resource["clinicalStatus"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "code": v["clinicalStatus"]}]}
    if v["verificationStatus"]:
        resource["verificationStatus"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
            "code": v["verificationStatus"]}]}
    codings = [{k: c[k] for k in ("system", "code", "display") if c.get(k)} for c in v["code"]]
    if codings:
        resource["code"] = {"coding": codings}
    if v["onset"]:
        resource["onsetString"] = v["onset"]  # as the EHR wrote it (a date, an age, a text)
    return resource


def _provenance(src: dict, recorded_by: str) -> dict:
    return {
        "resourceType": "Provenance",
        "id": _short("prov", src["resourceType"], src["id"], src["versionId"], src["event"]),
        "target": [{"reference": f"{src['resourceType']}/{src['id']}/_history/{src['versionId']}"}],
        "recorded": src["receivedAt"],
        "activity": {"text": src["event"]},
        "agent": [{"who": {"display": src.get("connection") or recorded_by}}],
        "extension": _source_ext(src),
    }


def _review_task(patient: str, r: dict) -> dict:
    return {
        "resourceType": "Task", "id": _short("review", r["tracker"], r["dueDate"], r["completedAt"]),
        "status": "completed", "intent": "order",
        "code": {"coding": [{"system": CS, "code": "care-plan-review"}]},
        "focus": {"reference": r["carePlan"]},
        "for": {"reference": f"Patient/{patient}"},
        "executionPeriod": {"end": r["completedAt"]},
        "restriction": {"period": {"end": r["dueDate"]}},
        **({"owner": {"reference": r["responsibleProvider"]}} if r["responsibleProvider"] else {}),
    }


def _decision(patient: str, month: str, section: dict) -> dict | None:
    d = section["decision"]
    if d is None:
        return None
    filing = section["filings"][-1] if section["filings"] else None
    ext = [
        {"url": "month", "valueString": month},
        {"url": "status", "valueCode": section["status"]},
        {"url": "billable", "valueBoolean": d["billable"]},
        {"url": "ruleset", "valueString": d["ruleset"]},
        # G0506 is HCPCS Level II, as its ChargeItem says (it was coded as CPT here)
        *({"url": "code", "valueCoding": {"system": code_system(code), "code": code}}
          for code in sorted(d["codes"])),
        *({"url": "units", "valueString": f"{code} x {n}"} for code, n in sorted(d["codes"].items())),
        *({"url": "blocker", "valueCode": b} for b in d["blockers"]),
        *({"url": "warning", "valueCode": w} for w in d["warnings"]),
        *({"url": "note", "valueString": n} for n in d["notes"]),
        {"url": "staffSeconds", "valueInteger": d["seconds"].get("staff", 0)},
        {"url": "practitionerSeconds", "valueInteger": d["seconds"].get("practitioner", 0)},
    ]
    ext += _evidence_ext(section)
    ext += _mbi_ext(section.get("billedMbi"))
    ext += [_history_ext(h) for h in section.get("decisionHistory", [])]
    if filing is not None:
        ext += [{"url": "revision", "valueInteger": filing["revision"]},
                {"url": "filedAt", "valueDateTime": filing["filedAt"]},
                {"url": "filingReason", "valueString": filing["reason"]}]
    resource = {
        "resourceType": "Basic", "id": _short("decision", patient, month),
        "code": {"coding": [{"system": CS, "code": "ccm-billing-decision"}],
                 "text": "CCM billing decision"},
        "subject": {"reference": f"Patient/{patient}"},
        "extension": [{"url": f"{EXT}/ccm-billing-decision", "extension": ext}],
    }
    if filing is not None:
        resource["created"] = filing["filedAt"][:10]
    return resource


MBI_SYSTEM = "http://hl7.org/fhir/sid/us-mbi"


def _mbi_ext(billed: dict | None) -> list[dict]:
    """The MBI the month was billed under (as on record when its decision in force was filed)."""
    if not billed or not billed.get("mbi"):
        return []
    parts = [{"url": "identifier", "valueIdentifier": {"system": MBI_SYSTEM,
                                                        "value": billed["mbi"]}}]
    if billed.get("asOf"):
        parts.append({"url": "asOf", "valueDateTime": billed["asOf"]})
    if billed.get("patientVersion"):
        parts.append({"url": "patientVersion", "valueString": billed["patientVersion"]})
    parts.append({"url": "currentMbi", "valueBoolean": billed["mbi"] == billed.get("current")})
    return [{"url": "billedMbi", "extension": parts}]


def _history_ext(h: dict) -> dict:
    """One step of the month's decision history: a filing (revision, when, why, its result) or
    a request that decided the month (which, who: token label and id, when, its AuditEvent)."""
    if h["kind"] == "filing":
        parts = [{"url": "revision", "valueInteger": h["revision"]},
                 {"url": "filedAt", "valueDateTime": h["at"]},
                 {"url": "reason", "valueString": h["reason"]},
                 {"url": "billable", "valueBoolean": h["billable"]},
                 *({"url": "code", "valueString": f"{code} x {n}"}
                   for code, n in sorted(h["codes"].items())),
                 *({"url": "blocker", "valueCode": b} for b in h["blockers"])]
        return {"url": "filing", "extension": parts}
    parts = [{"url": "operation", "valueString": h["operation"]},
             {"url": "recorded", "valueDateTime": h["at"]},
             {"url": "by", "valueString": h["by"]},
             {"url": "token", "valueString": h["token"]},
             {"url": "auditEvent", "valueReference": {"reference": h["auditEvent"]}}]
    return {"url": "request", "extension": parts}


def _evidence_ext(section: dict) -> list[dict]:
    """The care plans and chronic conditions the decision was taken on, with its verdicts."""
    ext = []
    if section.get("evidenceAsOf"):
        ext.append({"url": "evidenceAsOf", "valueDateTime": section["evidenceAsOf"]})
    for p in section["carePlans"]:
        if p["version"] is None and p["fact"] is None:
            continue  # received after the decision: it judged nothing of it
        parts = [{"url": "reference", "valueReference": {"reference": version_ref(
                     "CarePlan", p["carePlan"].split("/", 1)[1], p["version"])}},
                 {"url": "inForce", "valueBoolean": p["inForce"]},
                 {"url": "note", "valueString": p["note"]},
                 {"url": "receivedAfterMonth", "valueBoolean": p["receivedAfterMonth"]}]
        if p["movedAway"]:
            parts.append({"url": "movedToAnotherPatient", "valueBoolean": True})
        ext.append({"url": "carePlan", "extension": parts})
    for c in section["conditions"]:
        if not c["counted"]:
            continue
        ext.append({"url": "chronicCondition", "extension": [
            {"url": "reference", "valueReference": {"reference": version_ref(
                "Condition", c["condition"].split("/", 1)[1], c["version"])}},
            {"url": "receivedAfterMonth", "valueBoolean": c["receivedAfterMonth"]}]})
    eligibility = section["eligibility"]
    ext += [{"url": "chronicConditionsCounted", "valueInteger": eligibility["chronicConditions"]},
            {"url": "chronicConditionsRequired", "valueInteger": eligibility["minimum"]}]
    ext += [{"url": "evidenceCheck", "valueString": x} for x in section["evidenceChecks"]]
    return ext


def invoice_excerpt(invoice: dict, charges: list[dict]) -> dict:
    """The Invoice with only this patient's lines (the others are other patients' business);
    its total for the whole practice is kept in an extension, not as the excerpt's total."""
    mine = {f"ChargeItem/{c['chargeItem']['id']}" for c in charges}
    excerpt = {k: v for k, v in invoice.items() if k not in ("totalNet", "totalGross", "lineItem")}
    excerpt["lineItem"] = [x for x in invoice.get("lineItem", [])
                           if x["chargeItemReference"]["reference"] in mine]
    excerpt["extension"] = [*invoice.get("extension", []), {
        "url": f"{EXT}/invoice-excerpt", "extension": [
            {"url": "lines", "valueString": "this patient's lines only"},
            *([{"url": "invoiceTotalNet", "valueMoney": invoice["totalNet"]}]
              if "totalNet" in invoice else []),
        ]}]
    if not excerpt["lineItem"]:
        del excerpt["lineItem"]
    return excerpt


def packet_id(packet: dict) -> str:
    """Stable for the same request at the same instant (practice, patient, range, time)."""
    return _short("packet", packet["practice"]["id"], packet["patient"]["id"], packet["from"],
                  packet["to"], packet["generatedAt"])


def bundle(packet: dict, bundle_id: str) -> dict:
    """The packet as a FHIR R4 collection Bundle (each resource once, a List per month)."""
    patient = packet["patient"]["id"]
    resources: dict[str, dict] = {}

    def add(resource: dict | None, key: str | None = None) -> str | None:
        if resource is None:
            return None
        key = key or f"{resource['resourceType']}/{resource['id']}"
        resources.setdefault(key, resource)
        return key

    pat = {"resourceType": "Patient", "id": patient}
    current = packet["patient"]["mbi"]
    # Today's MBI, and each other MBI a month of the packet was billed under (use old).
    ids = [{"use": "official", "system": MBI_SYSTEM, "value": current}] if current else []
    for billed in dict.fromkeys((s.get("billedMbi") or {}).get("mbi") for s in packet["months"]):
        if billed and billed != current:
            ids.append({"use": "old", "system": MBI_SYSTEM, "value": billed})
    if ids:
        pat["identifier"] = ids
    add(pat)
    lists = []
    for section in packet["months"]:
        month = section["month"]
        refs = [add(_consent(patient, c)) for c in section["consents"]]
        refs += [add(_encounter(patient, e)) for e in section["timeLog"]["entries"]]
        visit = _visit(patient, section.get("initiatingVisit"))
        if visit is not None and f"Encounter/{visit['id']}" in resources:
            # Also CCM time (one Encounter, both codes): the time entry says it initiated too.
            known = resources[f"Encounter/{visit['id']}"]["extension"]
            known += [x for x in visit["extension"] if x not in known]
        refs.append(add(visit))
        for p in section["carePlans"]:
            plan_id = p["carePlan"].split("/", 1)[1]
            if p["version"] is not None or p["fact"] is not None:
                refs.append(add(_care_plan(patient, plan_id, p["version"], p["fact"]),
                                version_ref("CarePlan", plan_id, p["version"])))
            refs += [add(_care_plan(patient, plan_id, v), version_ref("CarePlan", plan_id, v))
                     for v in p["laterVersions"]]
        for c in section["conditions"]:
            cid = c["condition"].split("/", 1)[1]
            refs += [add(_condition(patient, cid, v), version_ref("Condition", cid, v))
                     for v in ([c["version"]] if c["version"] else []) + c["laterVersions"]]
        refs += [add(_review_task(patient, r)) for r in section["reviews"]]
        refs.append(add(_decision(patient, month, section)))
        for line in section["charges"]:
            refs.append(add(line["chargeItem"]))
        for inv_id in sorted({line["invoice"] for line in section["charges"]}):
            refs.append(add(invoice_excerpt(packet["invoices"][inv_id], section["charges"])))
        refs += [add(_provenance(s, "ccm-platform ingest")) for s in section["sources"]]
        # The requests that decided the month (their AuditEvents are added with the trail).
        refs += [h["auditEvent"] for h in section.get("decisionHistory", [])
                 if h["kind"] == "request"]
        lists.append({
            "resourceType": "List", "id": _short("month", patient, month), "status": "current",
            "mode": "snapshot", "title": f"CCM records {month}",
            "subject": {"reference": f"Patient/{patient}"},
            "entry": [{"item": {"reference": r}} for r in dict.fromkeys(x for x in refs if x)],
        })
    for event in packet["auditEvents"]:
        add(event)
    entries = [{"fullUrl": f"urn:ccm:{key}", "resource": res} for key, res in resources.items()]
    entries += [{"fullUrl": f"urn:ccm:List/{x['id']}", "resource": x} for x in lists]
    return {
        "resourceType": "Bundle", "id": bundle_id, "type": "collection",
        "identifier": {"system": f"{EXT}/audit-packet",
                       "value": f"{packet['practice']['id']}:{patient}:{packet['from']}:{packet['to']}"},
        "timestamp": packet["generatedAt"],
        "entry": entries,
    }
