"""Ingest's re-mapped events (``source.mappingRevision``): when a practice changes its ingest
configuration, ingest states a stored version again with a higher mapping revision. The tracker
applies it as newer than what it re-states and older than any later version; the same version
and revision again changes nothing, and an older revision arriving late never overwrites."""

import itertools
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from ccm_careplan.adapters.orm import conditions
from ccm_careplan.service_layer.common import tracker_id
from tests.unit.careplan import factories as f

T0 = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)
PLAN = "CarePlan/cp-1"
LATER = datetime(2027, 3, 1, 15, tzinfo=UTC)  # the plan's review is overdue by then


async def detail(cp, plan=PLAN, practice="alpha"):
    r = await cp.client.get(f"/v1/care-plans/{tracker_id(practice, plan)}",
                            headers=cp.auth(practice))
    assert r.status_code == 200, r.text
    return r.json()


def again(event):
    """The same event under a new event id (a re-push): the inbox does not catch it."""
    return event.model_copy(update={"id": f"{event.id}-again"})


def history(t: dict) -> list[tuple]:
    return [(v["version_id"], v["mapping_revision"], v["event"].split(".")[2], v["status"],
             v["applied"]) for v in t["versions"]]


async def test_a_plan_remapped_as_no_ccm_plan_closes_and_reopens_when_it_is_one_again(careplan):
    """The practice drops the plan's category from ``care_plan_categories`` (ingest re-states its
    current version as closed, entered in error), then adds it back (created again)."""
    cp = careplan
    await cp.deliver(f.care_plan("alpha", PLAN, at=T0))
    await cp.deliver(f.care_plan("alpha", PLAN, kind="closed", status="entered-in-error",
                                 at=T0, mapping_revision=1))
    t = await detail(cp)
    assert t["status"] == "entered-in-error" and t["review_state"] == "inactive"
    assert history(t) == [("1", None, "created", "active", True),
                          ("1", 1, "closed", "entered-in-error", True)]
    assert (await cp.scheduler(LATER)).sent == 0  # a closed plan owes nothing

    await cp.deliver(f.care_plan("alpha", PLAN, kind="created", at=T0, mapping_revision=2))
    t = await detail(cp)
    assert t["status"] == "active" and t["review_state"] == "current"
    assert t["signoff"]["status"] == "awaiting" and t["early_review"] is None
    assert [r[:2] for r in history(t)] == [("1", None), ("1", 1), ("1", 2)]
    # The same version: its care team had it already.
    assert len(await cp.emitted("careplan.plan.distributed.v1")) == 1
    assert (await cp.scheduler(LATER + timedelta(days=1))).sent > 0  # tracked again


async def test_a_remapping_restates_the_plan_but_is_no_revision_of_it(careplan):
    """A re-mapped version's fields apply, but the plan did not change: its sign-off stands and
    its review is not brought forward, as a revision without review evidence would."""
    cp = careplan
    await cp.deliver(f.care_plan("alpha", PLAN, at=T0))
    v2 = f.care_plan("alpha", PLAN, kind="revised", version="2", at=T0 + timedelta(days=100),
                     created="2026-01-05")
    await cp.deliver(v2)
    assert (await detail(cp))["early_review"] == {"reason": "plan-revised", "date": "2026-04-15"}
    cp.clock.now = datetime(2026, 4, 21, 15, tzinfo=UTC)
    r = await cp.client.post(
        f"/v1/care-plans/{tracker_id('alpha', PLAN)}/reviews", headers=cp.auth(),
        json={"reviewer": "Practitioner/dr-lee", "date": "2026-04-20", "outcome": "approved"})
    assert r.status_code == 201, r.text

    await cp.deliver(f.care_plan("alpha", PLAN, kind="revised", version="2",
                                 at=T0 + timedelta(days=100), created="2026-01-05",
                                 author="PractitionerRole/dr-lee-clinic", mapping_revision=3))
    t = await detail(cp)
    assert t["author"] == "PractitionerRole/dr-lee-clinic"
    assert t["signoff"] == {"status": "signed", "by": "Practitioner/dr-lee", "date": "2026-04-20"}
    assert t["early_review"] is None and t["next_review_due"] == "2027-04-20"
    assert (t["current_version"], history(t)[-1]) == ("2", ("2", 3, "revised", "active", True))
    assert len(await cp.emitted("careplan.plan.distributed.v1")) == 2  # v1 and v2, once each


async def test_redeliveries_change_nothing_and_an_older_revision_arriving_late_never_wins(
    careplan
):
    cp = careplan
    first = f.care_plan("alpha", PLAN, at=T0, care_team=("Practitioner/rn-1",))
    r1 = f.care_plan("alpha", PLAN, at=T0, care_team=("Practitioner/rn-1",), mapping_revision=1)
    r2 = f.care_plan("alpha", PLAN, kind="closed", status="entered-in-error", at=T0,
                     care_team=("Practitioner/rn-1",), mapping_revision=2)
    for event in (first, r2, r1, again(first), again(r2), again(r1), r2):
        await cp.deliver(event)
    t = await detail(cp)
    assert t["status"] == "entered-in-error"
    assert history(t) == [("1", None, "created", "active", True),
                          ("1", 1, "created", "active", False),  # late: history only
                          ("1", 2, "closed", "entered-in-error", True)]
    assert cp.runtime.consumers[0].stats.duplicates == 1


async def test_a_remapping_is_older_than_the_next_version(careplan):
    """A re-statement of version 1 reaching the tracker after version 2 (another topic) is
    history: version 2 was mapped after the change, with the new configuration."""
    cp = careplan
    await cp.deliver(f.care_plan("alpha", PLAN, at=T0))
    await cp.deliver(f.care_plan("alpha", PLAN, kind="revised", version="2",
                                 at=T0 + timedelta(days=10)))
    await cp.deliver(f.care_plan("alpha", PLAN, kind="closed", status="entered-in-error",
                                 at=T0, mapping_revision=4))
    t = await detail(cp)
    assert (t["status"], t["current_version"]) == ("active", "2")
    assert history(t) == [("1", None, "created", "active", True),
                          ("1", 4, "closed", "entered-in-error", False),
                          ("2", None, "revised", "active", True)]


async def test_a_plan_first_known_from_a_remapping_is_tracked(careplan):
    """A plan that becomes a CCM plan by the practice's change: its first event is re-mapped."""
    cp = careplan
    await cp.deliver(f.care_plan("alpha", PLAN, at=T0, mapping_revision=1))
    t = await detail(cp)
    assert t["status"] == "active" and history(t) == [("1", 1, "created", "active", True)]
    assert len(await cp.emitted("careplan.plan.distributed.v1")) == 1


async def chronic(cp, ref: str) -> bool:
    async with cp.runtime.db.engine.connect() as conn:
        return (await conn.execute(select(conditions.c.chronic_active).where(
            conditions.c.condition == ref))).scalar_one()


async def test_patient_practitioner_and_condition_facts_order_by_version_and_revision(careplan):
    cp = careplan
    at = T0 + timedelta(days=20)
    await cp.deliver(f.care_plan("alpha", PLAN, at=T0))
    events = [
        # The patient's two revisions of one version, the newer first: inactive stands.
        f.patient("alpha", at=at, gps=("Practitioner/gp-1",), mapping_revision=2, active=False),
        f.patient("alpha", at=at, gps=("Practitioner/gp-1",), mapping_revision=1),
        # The author's two versions of one instant: version 10 (inactive) is after version 9
        # (numbers, not text), whatever 9's revision.
        f.practitioner("alpha", "Practitioner/dr-lee", at=at, active=False, version="10"),
        f.practitioner("alpha", "Practitioner/dr-lee", at=at, version="9", mapping_revision=5),
        # A condition made chronic by the practice's chronic_categories, then the version as
        # first mapped pushed again (a new event id): it stays chronic.
        f.condition("alpha", "Condition/ckd", at=at, chronic=False),
        f.condition("alpha", "Condition/ckd", at=at, mapping_revision=1),
        again(f.condition("alpha", "Condition/ckd", at=at, chronic=False)),
    ]
    for event in events:
        await cp.deliver(event)
    t = await detail(cp)
    assert (t["review_state"], t["patient_active"]) == ("inactive", False)
    assert t["responsible_provider"] == "Practitioner/gp-1"  # the author is inactive
    assert await chronic(cp, "Condition/ckd") is True


async def test_a_condition_remapped_as_chronic_brings_the_review_forward(careplan):
    cp = careplan
    await cp.deliver(f.care_plan("alpha", PLAN, at=T0))
    await cp.deliver(f.condition("alpha", "Condition/ckd", at=T0 + timedelta(days=20),
                                 chronic=False))
    assert (await detail(cp))["early_review"] is None
    await cp.deliver(f.condition("alpha", "Condition/ckd", at=T0 + timedelta(days=20),
                                 mapping_revision=1))
    t = await detail(cp)
    assert t["early_review"] == {"reason": "new-chronic-condition", "date": "2026-01-25"}


# -- delivery order does not matter ------------------------------------------------------------

AUTHORS = ("Practitioner/a", "Practitioner/b", "PractitionerRole/c")
KINDS = (("revised", "active"), ("closed", "entered-in-error"), ("created", "active"),
         ("revised", "on-hold"), ("closed", "completed"))
EVENT = st.tuples(st.sampled_from(KINDS), st.sampled_from(AUTHORS))
_plans = itertools.count()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stated=st.dictionaries(
    st.tuples(st.integers(1, 3), st.sampled_from([None, 1, 2, 7])), EVENT, min_size=1,
    max_size=7), order=st.randoms(use_true_random=False), repeats=st.integers(0, 3))
async def test_the_tracker_ends_in_the_state_of_the_newest_event_whatever_the_delivery_order(
    careplan, stated, order, repeats
):
    """Versions 1–3 (version 3 at the same instant as 2), each stated with up to four mapping
    revisions, delivered in any order, some twice under new event ids: the plan's fields are
    those of the newest (version, revision), and its history has one row for each."""
    cp = careplan
    plan = f"CarePlan/prop-{next(_plans)}-{uuid.uuid4().hex[:6]}"
    at = {1: T0, 2: T0 + timedelta(days=30), 3: T0 + timedelta(days=30)}
    events = [f.care_plan("alpha", plan, version=str(v), at=at[v], kind=kind, status=status,
                          author=author, mapping_revision=revision)
              for (v, revision), ((kind, status), author) in stated.items()]
    deliveries = events + [again(e) for e in order.sample(events, min(repeats, len(events)))]
    order.shuffle(deliveries)
    for event in deliveries:
        await cp.deliver(event)

    t = await detail(cp, plan)
    (version, revision), ((_, status), author) = max(
        stated.items(), key=lambda item: (item[0][0], item[0][1] or 0))
    assert (t["current_version"], t["status"], t["author"]) == (str(version), status, author)
    assert sorted((v["version_id"], v["mapping_revision"] or 0) for v in t["versions"]) == sorted(
        (str(v), r or 0) for v, r in stated)
    assert [(v["version_id"], v["mapping_revision"] or 0) for v in t["versions"]] == sorted(
        (str(v), r or 0) for v, r in stated)  # listed in ingest's order
