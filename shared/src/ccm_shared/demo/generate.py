"""A synthetic CCM practice and one month of its care, as FHIR R4 transaction Bundles.

Pure and deterministic: the same seed, month, time zone and ``now`` give the same Bundles. The
first patients are the edge cases of the CMS billing rules (``../shared/domain/
ccm-billing-rules.md`` §8), each with the outcome the rules expect; the rest are ordinary patients
with a realistic spread of time. Resources carry stable ids and are written with PUT, so pushing
the same practice twice changes nothing.
"""

from __future__ import annotations

import calendar
import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

CPT = "http://www.ama-assn.org/go/cpt"
VISIT_CODE = "99214"  # the initiating office visit (ccm-billing-rules.md §3.4)
NUCC = "http://nucc.org/provider-taxonomy"
ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/practitioner-role"
MBI_SYSTEM = "http://hl7.org/fhir/sid/us-mbi"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5"

CHRONIC = [
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("42343007", "Congestive heart failure"),
    ("13645005", "Chronic obstructive pulmonary disease"),
    ("709044004", "Chronic kidney disease"),
    ("49436004", "Atrial fibrillation"),
    ("55822004", "Hyperlipidemia"),
    ("35489007", "Depressive disorder"),
    ("396275006", "Osteoarthritis"),
    ("195967001", "Asthma"),
]
GIVEN_F = [
    "Ana",
    "Mary",
    "Linda",
    "Grace",
    "Rosa",
    "Mei",
    "Fatima",
    "Irene",
    "June",
    "Olga",
    "Nadia",
    "Ruth",
    "Carmen",
    "Helen",
    "Joan",
    "Priya",
]
GIVEN_M = [
    "James",
    "Robert",
    "Luis",
    "Chen",
    "Ahmed",
    "Walter",
    "Frank",
    "Ivan",
    "George",
    "Samuel",
    "Raj",
    "Henry",
    "Arthur",
    "Tomas",
    "Ken",
    "Paul",
]
FAMILY = [
    "Rivera",
    "Smith",
    "Johnson",
    "Nguyen",
    "Garcia",
    "Brown",
    "Kowalski",
    "Okafor",
    "Patel",
    "Miller",
    "Davis",
    "Lopez",
    "Wilson",
    "Anderson",
    "Kim",
    "Hughes",
    "Moreau",
    "Schmidt",
    "Ivanova",
    "Tanaka",
    "Haddad",
    "Olsen",
    "Mensah",
    "Costa",
]
MBI_LETTERS = "ACDEFGHJKMNPQRTUVWXY"  # CMS leaves out S, L, O, I, B, Z


@dataclass(frozen=True)
class Staff:
    """A practitioner and the PractitionerRole that logs their time."""

    id: str
    role_id: str
    given: str
    family: str
    kind: str  # physician | nurse | coordinator
    role_coding: dict
    npi: str | None = None

    @property
    def email(self) -> str:
        return f"{self.given}.{self.family}@lakeside-clinic.example".lower()


STAFF = (
    Staff(
        "dr-okafor",
        "role-dr-okafor",
        "Chidi",
        "Okafor",
        "physician",
        {"system": NUCC, "code": "207Q00000X", "display": "Family Medicine Physician"},
        "1629071484",
    ),
    Staff(
        "dr-lindqvist",
        "role-dr-lindqvist",
        "Eva",
        "Lindqvist",
        "physician",
        {"system": NUCC, "code": "207R00000X", "display": "Internal Medicine Physician"},
        "1881765296",
    ),
    Staff(
        "rn-nguyen",
        "role-rn-nguyen",
        "Lan",
        "Nguyen",
        "nurse",
        {"system": ROLE_SYSTEM, "code": "nurse"},
    ),
    Staff(
        "rn-adeyemi",
        "role-rn-adeyemi",
        "Tolu",
        "Adeyemi",
        "nurse",
        {"system": NUCC, "code": "163W00000X", "display": "Registered Nurse"},
    ),
    Staff(
        "lpn-harris",
        "role-lpn-harris",
        "Dana",
        "Harris",
        "nurse",
        {"system": NUCC, "code": "164W00000X", "display": "Licensed Practical Nurse"},
    ),
    # A care coordinator whose role code no mapping knows: her time blocks the month with
    # staff-role-unknown until the practice maps the code (ingest-config clinical_staff_roles).
    Staff(
        "cc-morgan",
        "role-cc-morgan",
        "Sam",
        "Morgan",
        "coordinator",
        {"system": ROLE_SYSTEM, "code": "ict", "display": "ICT professional"},
    ),
)
PHYSICIANS = [s for s in STAFF if s.kind == "physician"]
NURSES = [s for s in STAFF if s.kind == "nurse"]
COORDINATOR = next(s for s in STAFF if s.kind == "coordinator")
SUPERVISOR = PHYSICIANS[0]


@dataclass(frozen=True)
class Expectation:
    """What the billing rules decide for an edge-case patient: codes with units ({} = nothing
    billable) and reasons that must be among the decision's blockers and warnings."""

    codes: dict[str, int]
    blockers: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass
class PatientPlan:
    id: str
    scenario: str  # "typical" or the edge case's name
    description: str
    entries_in_month: int = 0  # finished CCM-time Encounters starting in the month (local)
    care_plan: str = "current"  # current | due | overdue | none
    expect: Expectation | None = None
    resources: list[dict] = field(default_factory=list)
    corrections: list[dict] = field(default_factory=list)  # later versions, pushed afterwards
    # The billing practitioner its consent names: only their own time is 99491's (rules §1).
    gp: Staff | None = None


@dataclass
class DemoPractice:
    practice: str
    month: str
    timezone: str
    seed: int
    directory: dict  # transaction Bundle: Organization, Practitioners, PractitionerRoles
    patients: list[PatientPlan]
    staff: tuple[Staff, ...] = STAFF

    def patient_bundles(self, per_bundle: int = 10) -> list[tuple[int, dict]]:
        """(patients in it, transaction Bundle) chunks of the patients' first versions."""
        out = []
        for i in range(0, len(self.patients), per_bundle):
            chunk = self.patients[i : i + per_bundle]
            out.append((len(chunk), transaction([r for p in chunk for r in p.resources])))
        return out

    def correction_bundle(self) -> dict | None:
        """Later versions (revocations, entries in error), after the first versions landed."""
        resources = [r for p in self.patients for r in p.corrections]
        return transaction(resources) if resources else None

    @property
    def edge_cases(self) -> list[PatientPlan]:
        return [p for p in self.patients if p.expect is not None]

    @property
    def resource_count(self) -> int:
        return len(self.directory["entry"]) + sum(
            len(p.resources) + len(p.corrections) for p in self.patients
        )


def transaction(resources: list[dict]) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


def previous_month(today: date) -> str:
    first = today.replace(day=1) - timedelta(days=1)
    return f"{first.year:04d}-{first.month:02d}"


def parse_month(text: str) -> tuple[int, int]:
    """'YYYY-MM' → (year, month); ValueError with a readable message otherwise."""
    try:
        year, month = (int(x) for x in text.split("-"))
        date(year, month, 1)
    except (ValueError, TypeError):
        raise ValueError(f"month must be YYYY-MM, got {text!r}") from None
    return year, month


class _Builder:
    def __init__(
        self, practice: str, year: int, month: int, tz: ZoneInfo, now: datetime, rng: random.Random
    ) -> None:
        self.practice = practice
        self.year, self.month = year, month
        self.tz = tz
        self.now = now
        self.today = now.astimezone(tz).date()
        self.rng = rng
        self.last_day = calendar.monthrange(year, month)[1]
        self.month_text = f"{year:04d}-{month:02d}"
        self.mbis: set[str] = set()

    # -- moments ---------------------------------------------------------------------------

    def local(self, day: int, hour: int, minute: int = 0, *, month_offset: int = 0) -> datetime:
        y, m = self.year, self.month + month_offset
        while m < 1:
            y, m = y - 1, m + 12
        while m > 12:
            y, m = y + 1, m - 12
        day = min(day, calendar.monthrange(y, m)[1])
        return datetime.combine(date(y, m, day), time(hour, minute), self.tz)

    def stamp(self, moment: datetime) -> str:
        """meta.lastUpdated never in the future (ingest orders versions by it)."""
        return min(moment, self.now - timedelta(minutes=1)).astimezone(UTC).isoformat()

    def months_before_today(self, months: int, extra_days: int = 0) -> date:
        y, m = self.today.year, self.today.month - months
        while m < 1:
            y, m = y - 1, m + 12
        d = min(self.today.day, calendar.monthrange(y, m)[1])
        return date(y, m, d) - timedelta(days=extra_days)

    # -- resources --------------------------------------------------------------------------

    def mbi(self) -> str:
        r = self.rng
        while True:
            alnum = MBI_LETTERS + "0123456789"
            value = "".join(
                [
                    r.choice("123456789"),
                    r.choice(MBI_LETTERS),
                    r.choice(alnum),
                    r.choice("0123456789"),
                    r.choice(MBI_LETTERS),
                    r.choice(alnum),
                    r.choice("0123456789"),
                    r.choice(MBI_LETTERS),
                    r.choice(MBI_LETTERS),
                    r.choice("0123456789"),
                    r.choice("0123456789"),
                ]
            )
            if value not in self.mbis:
                self.mbis.add(value)
                return value

    def patient(self, pid: str, number: int, gp: Staff) -> dict:
        r = self.rng
        female = r.random() < 0.55
        return {
            "resourceType": "Patient",
            "id": pid,
            "active": True,
            "identifier": [
                {"system": MBI_SYSTEM, "value": self.mbi()},
                {"system": MRN_SYSTEM, "value": f"MRN-{number:06d}"},
            ],
            "name": [
                {
                    "use": "official",
                    "family": r.choice(FAMILY),
                    "given": [r.choice(GIVEN_F if female else GIVEN_M)],
                }
            ],
            "gender": "female" if female else "male",
            "birthDate": date(
                r.randint(1934, 1958), r.randint(1, 12), r.randint(1, 28)
            ).isoformat(),
            "managingOrganization": {"reference": "Organization/org-main"},
            "generalPractitioner": [{"reference": f"Practitioner/{gp.id}"}],
        }

    def conditions(self, pid: str, chronic: int, resolved: int = 0) -> list[dict]:
        picks = self.rng.sample(CHRONIC, chronic + resolved)
        out = []
        for i, (code, display) in enumerate(picks):
            status = "active" if i < chronic else "resolved"
            onset = date(self.year - self.rng.randint(2, 15), self.rng.randint(1, 12), 1)
            cond = {
                "resourceType": "Condition",
                "id": f"{pid}-cond-{i + 1}",
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": status,
                        }
                    ]
                },
                "verificationStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                            "code": "confirmed",
                        }
                    ]
                },
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                "code": "problem-list-item",
                            }
                        ]
                    }
                ],
                "code": {
                    "coding": [
                        {"system": "http://snomed.info/sct", "code": code, "display": display}
                    ]
                },
                "subject": {"reference": f"Patient/{pid}"},
                "onsetDateTime": onset.isoformat(),
            }
            if status == "resolved":
                cond["abatementDateTime"] = date(self.year - 1, 6, 1).isoformat()
            out.append(cond)
        return out

    def consent(
        self,
        pid: str,
        obtained: datetime,
        physician: Staff,
        status: str = "active",
        updated: datetime | None = None,
    ) -> dict:
        return {
            "resourceType": "Consent",
            "id": f"{pid}-consent",
            "meta": {"lastUpdated": self.stamp(updated or obtained)},
            "status": status,
            "scope": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                        "code": "treatment",
                    }
                ]
            },
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{pid}"},
            "dateTime": obtained.isoformat(),
            "performer": [{"reference": f"Practitioner/{physician.id}"}],
            "policyRule": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
                ]
            },
            "sourceAttachment": {"contentType": "application/pdf", "title": "Signed CCM consent"},
            "provision": {"type": "permit", "period": {"start": obtained.date().isoformat()}},
        }

    def care_plan(self, pid: str, created: date, author: Staff, conditions: list[dict]) -> dict:
        return {
            "resourceType": "CarePlan",
            "id": f"{pid}-careplan",
            "status": "active",
            "intent": "plan",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://hl7.org/fhir/us/core/CodeSystem/careplan-category",
                            "code": "assess-plan",
                        }
                    ]
                }
            ],
            "subject": {"reference": f"Patient/{pid}"},
            "created": created.isoformat(),
            "period": {"start": created.isoformat()},
            "author": {"reference": f"Practitioner/{author.id}"},
            "addresses": [
                {"reference": f"Condition/{c['id']}"}
                for c in conditions
                if c["clinicalStatus"]["coding"][0]["code"] == "active"
            ],
            "text": {
                "status": "generated",
                "div": '<div xmlns="http://www.w3.org/1999/xhtml">Comprehensive CCM care '
                "plan</div>",
            },
        }

    def encounter(
        self,
        pid: str,
        n: int,
        start: datetime,
        seconds: int,
        who: Staff,
        code: str | None = None,
        status: str = "finished",
        updated: datetime | None = None,
        utc: bool = False,
    ) -> dict:
        code = code or ("99491" if who.kind == "physician" else "99490")
        end = start + timedelta(seconds=seconds)
        fmt = (lambda t: t.astimezone(UTC).isoformat()) if utc else (lambda t: t.isoformat())
        return {
            "resourceType": "Encounter",
            "id": f"{pid}-enc-{n}",
            "meta": {"lastUpdated": self.stamp(updated or end + timedelta(minutes=5))},
            "status": status,
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"coding": [{"system": CPT, "code": code}]}],
            "subject": {"reference": f"Patient/{pid}"},
            "participant": [{"individual": {"reference": f"PractitionerRole/{who.role_id}"}}],
            "period": {"start": fmt(start), "end": fmt(end)},
        }

    def visit(self, pid: str, day_end: datetime, physician: Staff) -> dict:
        """The office visit (99214) that initiates CCM, by the consenting physician: the 20 min
        before ``day_end`` (the consent's signature)."""
        start = day_end - timedelta(minutes=20)
        return {
            "resourceType": "Encounter",
            "id": f"{pid}-visit",
            "meta": {"lastUpdated": self.stamp(day_end + timedelta(minutes=30))},
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"coding": [{"system": CPT, "code": VISIT_CODE,
                                  "display": "Office visit, established patient, 30-39 min"}]}],
            "subject": {"reference": f"Patient/{pid}"},
            "participant": [{"individual": {"reference": f"PractitionerRole/{physician.role_id}"}}],
            "period": {"start": start.isoformat(), "end": day_end.isoformat()},
        }

    def split_time(
        self,
        pid: str,
        total_seconds: int,
        who: Staff,
        *,
        first_n: int = 1,
        code: str | None = None,
        days: tuple[int, int] = (2, 26),
    ) -> list[dict]:
        """Total time as 1–3 encounters on distinct working days of the month."""
        pieces = 1 if total_seconds < 600 else self.rng.randint(1, 3)
        cuts = (
            sorted(self.rng.sample(range(60, total_seconds - 59), pieces - 1)) if pieces > 1 else []
        )
        bounds = [0, *cuts, total_seconds]
        day_list = sorted(self.rng.sample(range(days[0], min(days[1], self.last_day) + 1), pieces))
        out = []
        for i in range(pieces):
            start = self.local(
                day_list[i], self.rng.randint(8, 16), self.rng.choice((0, 15, 30, 45))
            )
            out.append(
                self.encounter(pid, first_n + i, start, bounds[i + 1] - bounds[i], who, code)
            )
        return out


def generate(
    *,
    practice: str,
    month: str,
    timezone: str,
    now: datetime,
    patients: int = 200,
    seed: int = 0,
) -> DemoPractice:
    """The synthetic practice. ``now`` places care-plan review dates (overdue, due) and keeps
    every ``meta.lastUpdated`` in the past; ``month`` must have ended in ``timezone``."""
    year, mon = parse_month(month)
    tz = ZoneInfo(timezone)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    b = _Builder(practice, year, mon, tz, now, random.Random(f"{seed}:{month}:{practice}"))
    month_end = b.local(b.last_day, 23, 59)
    if month_end >= now:
        raise ValueError(f"{month} has not ended yet in {timezone}; choose a past month")
    edge = _edge_cases(b)
    if patients < len(edge):
        raise ValueError(f"at least {len(edge)} patients are needed for the edge cases")
    plans = edge + [_typical(b, i) for i in range(len(edge) + 1, patients + 1)]
    return DemoPractice(
        practice=practice,
        month=month,
        timezone=timezone,
        seed=seed,
        directory=_directory(),
        patients=plans,
    )


def _directory() -> dict:
    org = {
        "resourceType": "Organization",
        "id": "org-main",
        "active": True,
        "name": "Lakeside Family Medicine",
        "identifier": [{"system": NPI_SYSTEM, "value": "1144221847"}],
        "telecom": [{"system": "phone", "value": "555-0100", "use": "work"}],
    }
    resources: list[dict] = [org]
    for s in STAFF:
        practitioner = {
            "resourceType": "Practitioner",
            "id": s.id,
            "active": True,
            "name": [
                {
                    "family": s.family,
                    "given": [s.given],
                    **({"prefix": ["Dr."]} if s.kind == "physician" else {}),
                }
            ],
            "telecom": [{"system": "email", "value": s.email, "use": "work"}],
        }
        if s.npi:
            practitioner["identifier"] = [{"system": NPI_SYSTEM, "value": s.npi}]
        role = {
            "resourceType": "PractitionerRole",
            "id": s.role_id,
            "active": True,
            "practitioner": {"reference": f"Practitioner/{s.id}"},
            "organization": {"reference": "Organization/org-main"},
            "code": [{"coding": [s.role_coding]}],
        }
        resources += [practitioner, role]
    return transaction(resources)


def _base(
    b: _Builder,
    n: int,
    scenario: str,
    description: str,
    *,
    chronic: int = 2,
    resolved: int = 0,
    consent: datetime | None | bool = True,
    care_plan: date | None | bool = True,
    care_plan_state: str = "current",
    visit: datetime | bool = True,
) -> PatientPlan:
    """A patient with conditions, a consent (after its initiating visit: the same day, or when
    ``visit`` says) and a care plan (each overridable)."""
    # Ids carry the month: each month's demo is its own cohort, so months never mix.
    pid = f"p{b.year:04d}{b.month:02d}-{n:04d}"
    gp = PHYSICIANS[n % len(PHYSICIANS)]
    plan = PatientPlan(pid, scenario, description, care_plan=care_plan_state, gp=gp)
    conds = b.conditions(pid, chronic, resolved)
    plan.resources += [b.patient(pid, n, gp), *conds]
    if consent is not None and consent is not False:
        obtained = (
            consent
            if isinstance(consent, datetime)
            else b.local(b.rng.randint(1, 28), 10, month_offset=-b.rng.randint(3, 30))
        )
        plan.resources.append(b.consent(pid, obtained, gp))
        if visit:
            ended = visit if isinstance(visit, datetime) else obtained
            plan.resources.append(b.visit(pid, ended, gp))
    if care_plan is not None and care_plan is not False:
        created = (
            care_plan
            if isinstance(care_plan, date)
            else b.local(b.rng.randint(1, 28), 9, month_offset=-b.rng.randint(1, 8)).date()
        )
        plan.resources.append(b.care_plan(pid, created, gp, conds))
    else:
        plan.care_plan = "none"
    return plan


def _edge_cases(b: _Builder) -> list[PatientPlan]:  # noqa: PLR0915 - one table of cases
    nurse, nurse2 = NURSES[0], NURSES[1]
    cases: list[PatientPlan] = []

    def add(plan: PatientPlan, encounters: list[dict], expect: Expectation) -> None:
        plan.resources += encounters
        plan.entries_in_month = len(encounters)
        plan.expect = expect
        cases.append(plan)

    def at(day: int, hour: int, minute: int = 0) -> datetime:
        return b.local(day, hour, minute)

    def correct_consent(plan: PatientPlan, status: str, updated: datetime) -> None:
        """A later version of the plan's consent, with ``status``, pushed as a correction."""
        consent = next(r for r in plan.resources if r["resourceType"] == "Consent")
        plan.corrections.append(
            b.consent(plan.id, datetime.fromisoformat(consent["dateTime"]), plan.gp, status=status,
                      updated=updated)
        )

    n = len(cases) + 1
    p = _base(b, n, "staff-19m59s", "clinical staff 19 min 59 s: one second short of 99490")
    add(
        p,
        [
            b.encounter(p.id, 1, at(4, 10), 10 * 60, nurse),
            b.encounter(p.id, 2, at(18, 14), 9 * 60 + 59, nurse2),
        ],
        Expectation({}, blockers=("time-threshold-not-met",)),
    )

    p = _base(b, len(cases) + 1, "staff-20m00s", "clinical staff exactly 20 min: 99490")
    add(
        p,
        [
            b.encounter(p.id, 1, at(4, 11), 12 * 60, nurse),
            b.encounter(p.id, 2, at(19, 9), 8 * 60, nurse),
        ],
        Expectation({"99490": 1}),
    )

    p = _base(b, len(cases) + 1, "staff-41m", "clinical staff 41 min: 99490 + one 99439")
    add(
        p,
        [
            b.encounter(p.id, 1, at(6, 10), 21 * 60, nurse2),
            b.encounter(p.id, 2, at(20, 15), 20 * 60, nurse),
        ],
        Expectation({"99490": 1, "99439": 1}),
    )

    p = _base(b, len(cases) + 1, "staff-85m", "clinical staff 85 min: 99439 capped at two units")
    add(
        p,
        [
            b.encounter(p.id, 1, at(3, 9), 30 * 60, nurse),
            b.encounter(p.id, 2, at(12, 9), 30 * 60, nurse2),
            b.encounter(p.id, 3, at(24, 9), 25 * 60, nurse),
        ],
        Expectation({"99490": 1, "99439": 2}),
    )

    p = _base(
        b,
        len(cases) + 1,
        "physician-30-staff-25",
        "physician 30 min + staff 25 min: all as staff time (99490 + 99439) beats 99491",
    )
    add(
        p,
        [
            b.encounter(p.id, 1, at(5, 13), 30 * 60, p.gp),
            b.encounter(p.id, 2, at(15, 10), 25 * 60, nurse),
        ],
        Expectation({"99490": 1, "99439": 1}),
    )

    p = _base(b, len(cases) + 1, "physician-35m", "billing practitioner personally 35 min: 99491")
    add(p, [b.encounter(p.id, 1, at(9, 16), 35 * 60, p.gp)], Expectation({"99491": 1}))

    p = _base(
        b,
        len(cases) + 1,
        "complex-59m",
        "complex care 59 min: under 99487's 60, billed as 99490 + 99439",
    )
    add(
        p,
        [
            b.encounter(p.id, 1, at(7, 10), 30 * 60, nurse, "99487"),
            b.encounter(p.id, 2, at(21, 10), 29 * 60, nurse2, "99487"),
        ],
        Expectation({"99490": 1, "99439": 1}),
    )

    p = _base(b, len(cases) + 1, "complex-95m", "complex care 95 min: 99487 + 99489")
    add(
        p,
        [
            b.encounter(p.id, 1, at(8, 9), 45 * 60, nurse, "99487"),
            b.encounter(p.id, 2, at(16, 9), 50 * 60, nurse2, "99487"),
        ],
        Expectation({"99487": 1, "99489": 1}),
    )

    consent_day = 15
    p = _base(
        b,
        len(cases) + 1,
        "consent-mid-month",
        "consent signed on the 15th, after a visit last month: the 12 min before it do not "
        "count (no G0506: the visit was in the month before)",
        consent=at(consent_day, 9),
        visit=b.local(20, 10, month_offset=-1),
    )
    add(
        p,
        [
            b.encounter(p.id, 1, at(6, 10), 12 * 60, nurse),
            b.encounter(p.id, 2, at(consent_day + 3, 10), 22 * 60, nurse),
        ],
        Expectation({"99490": 1}, warnings=("consent-after-service",)),
    )

    p = _base(
        b,
        len(cases) + 1,
        "consent-revoked-mid-month",
        "consent revoked on the 12th: effective to month end, the month stays billable",
    )
    correct_consent(p, "inactive", at(12, 11))
    add(
        p,
        [
            b.encounter(p.id, 1, at(5, 10), 10 * 60, nurse),
            b.encounter(p.id, 2, at(22, 10), 15 * 60, nurse),
        ],
        Expectation({"99490": 1}),
    )

    p = _base(
        b,
        len(cases) + 1,
        "initiating-visit-g0506",
        "consented at an office visit on the 2nd: G0506 is billed once, with that visit",
        consent=at(2, 11),
    )
    add(
        p,
        [b.encounter(p.id, 1, at(9, 10), 24 * 60, nurse)],
        Expectation({"99490": 1, "G0506": 1}),
    )

    p = _base(
        b,
        len(cases) + 1,
        "initiating-visit-missing",
        "no qualifying visit by the billing physician in the 12 months before the consent: "
        "billable with a warning (a practice may make it a blocker)",
        visit=False,
    )
    add(
        p,
        [b.encounter(p.id, 1, at(7, 10), 23 * 60, nurse2)],
        Expectation({"99490": 1}, warnings=("initiating-visit-missing",)),
    )

    p = _base(
        b, len(cases) + 1, "consent-missing", "30 min of time but no consent on file", consent=None
    )
    add(
        p,
        [b.encounter(p.id, 1, at(10, 10), 30 * 60, nurse)],
        Expectation({}, blockers=("consent-missing",)),
    )

    p = _base(
        b,
        len(cases) + 1,
        "consent-entered-in-error",
        "the only consent was entered in error: its time is void",
    )
    correct_consent(p, "entered-in-error", at(b.last_day, 17))
    add(
        p,
        [b.encounter(p.id, 1, at(11, 10), 25 * 60, nurse)],
        Expectation({}, blockers=("consent-missing",)),
    )

    p = _base(
        b,
        len(cases) + 1,
        "one-chronic-condition",
        "one active chronic condition (another resolved): not eligible",
        chronic=1,
        resolved=1,
    )
    add(
        p,
        [b.encounter(p.id, 1, at(13, 10), 25 * 60, nurse)],
        Expectation({}, blockers=("insufficient-chronic-conditions",)),
    )

    p = _base(
        b,
        len(cases) + 1,
        "no-care-plan",
        "eligible and consented, but no care plan",
        care_plan=None,
    )
    add(
        p,
        [b.encounter(p.id, 1, at(14, 10), 25 * 60, nurse)],
        Expectation({}, blockers=("care-plan-missing",)),
    )

    p = _base(
        b,
        len(cases) + 1,
        "encounter-entered-in-error",
        "two 12 min calls, one later marked entered-in-error: 12 min remain",
    )
    first = b.encounter(p.id, 1, at(8, 10), 12 * 60, nurse)
    add(
        p,
        [first, b.encounter(p.id, 2, at(17, 10), 12 * 60, nurse)],
        Expectation({}, blockers=("time-threshold-not-met",)),
    )
    p.corrections.append(
        b.encounter(
            p.id, 1, at(8, 10), 12 * 60, nurse, status="entered-in-error", updated=at(20, 8)
        )
    )

    p = _base(
        b,
        len(cases) + 1,
        "care-plan-overdue",
        "care plan created 14 months ago (at least 13 before the month), never reviewed: "
        "billable with a warning; the tracker shows it overdue and escalated",
        care_plan=min(b.months_before_today(14), b.local(1, 9, month_offset=-13).date()),
        care_plan_state="overdue",
    )
    add(
        p,
        [b.encounter(p.id, 1, at(9, 10), 26 * 60, nurse)],
        Expectation({"99490": 1}, warnings=("care-plan-review-overdue",)),
    )

    p = _base(
        b,
        len(cases) + 1,
        "care-plan-due-soon",
        "care plan review due in 10 days (reminders are on their way)",
        care_plan=b.months_before_today(12, extra_days=-10),
        care_plan_state="due",
    )
    add(p, [b.encounter(p.id, 1, at(10, 11), 21 * 60, nurse2)], Expectation({"99490": 1}))

    p = _base(
        b,
        len(cases) + 1,
        "month-boundary",
        "25 min starting 23:40 local on the month's last day count in this month; 20 min "
        "at 23:30 local the evening before the 1st (already the 1st in UTC) do not",
    )
    last = b.local(b.last_day, 23, 40)
    before = b.local(31, 23, 30, month_offset=-1)
    add(p, [b.encounter(p.id, 1, last, 25 * 60, nurse, utc=True)], Expectation({"99490": 1}))
    p.resources.append(b.encounter(p.id, 2, before, 20 * 60, nurse, utc=True))

    p = _base(
        b,
        len(cases) + 1,
        "unknown-staff-role",
        "22 min by a care coordinator whose role code the practice has not mapped",
    )
    add(
        p,
        [b.encounter(p.id, 1, at(12, 10), 22 * 60, COORDINATOR, "99490")],
        Expectation({}, blockers=("staff-role-unknown",)),
    )
    return cases


TYPICAL_MINUTES = (  # (weight, lowest, highest minutes of staff time)
    (10, 0, 0),
    (20, 5, 19),
    (40, 20, 39),
    (15, 40, 59),
    (10, 60, 75),
)


def _typical(b: _Builder, n: int) -> PatientPlan:
    r = b.rng
    overdue = r.random() < 0.06
    plan = _base(
        b,
        n,
        "typical",
        "an enrolled patient with an ordinary month",
        chronic=r.randint(2, 4),
        care_plan=b.months_before_today(r.randint(13, 20)) if overdue else True,
        care_plan_state="overdue" if overdue else "current",
    )
    if r.random() < 0.05:  # the physician's own month: 99491 territory
        encounters = b.split_time(plan.id, r.randint(30, 50) * 60, PHYSICIANS[n % 2])
    else:
        weights = [w for w, _, _ in TYPICAL_MINUTES]
        _, low, high = r.choices(TYPICAL_MINUTES, weights=weights)[0]
        minutes = r.randint(low, high)
        seconds = minutes * 60 + (r.randint(0, 59) if minutes else 0)
        encounters = b.split_time(plan.id, seconds, r.choice(NURSES)) if seconds else []
    plan.resources += encounters
    plan.entries_in_month = len(encounters)
    return plan
