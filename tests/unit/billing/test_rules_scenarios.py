"""Every worked example of ../shared/domain/billing-scenarios.yaml, decided by the rules engine."""

from datetime import date
from pathlib import Path

import pytest
import yaml

from ccm_billing.domain.model import Consent, Month
from ccm_billing.domain.rules import ccm, ruleset_for
from tests.unit.billing.facts import entry, local, month_facts

SCENARIOS = Path(__file__).resolve().parents[3].parent / "shared" / "domain" / "billing-scenarios.yaml"


def load_scenarios() -> list[dict]:
    if not SCENARIOS.exists():
        raise FileNotFoundError(f"billing scenarios not found at {SCENARIOS}: the reference folder "
                                "../shared must sit beside the repository")
    return yaml.safe_load(SCENARIOS.read_text())


def as_date(value) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def facts_of(scenario: dict):
    entries = [
        entry(i, t["role"], t["seconds"], as_date(t["date"]), status=t.get("status", "finished"))
        for i, t in enumerate(scenario["time"])
    ]
    kwargs = {}
    if "consent" in scenario:
        c = scenario["consent"]
        kwargs["consent"] = None if c is None else Consent(
            "c1", c["status"], local(as_date(c["date"]), hour=0))
    if "care_plan" in scenario and scenario["care_plan"] is None:
        kwargs["care_plan"] = None
    return month_facts(
        str(scenario["month"]), time_entries=entries,
        chronic_conditions=scenario.get("chronic_conditions", 2),
        complexity_documented=scenario.get("complexity_documented", False), **kwargs,
    )


SCENARIO_LIST = load_scenarios()


def test_the_scenario_file_has_examples():
    assert len(SCENARIO_LIST) >= 12


@pytest.mark.parametrize("scenario", SCENARIO_LIST, ids=[s["id"] for s in SCENARIO_LIST])
def test_scenario_is_decided_as_the_rules_document_says(scenario):
    facts = facts_of(scenario)
    decision = ccm.decide(facts, ruleset_for(Month.parse(str(scenario["month"]))))
    expect = scenario["expect"]
    assert decision.codes == expect["codes"]
    assert list(decision.blockers) == expect.get("blockers", [])
    assert list(decision.warnings) == expect.get("warnings", [])
