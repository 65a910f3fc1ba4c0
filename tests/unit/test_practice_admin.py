"""`ccm practice list|show|update` and `create --rule`: an administrator amends a practice's
contract and billing rule options without editing the database, and billing reads what was set.

Before, the rule options billing documents (date of service, initiating visit as a blocker,
consent renewal) could only be written into `platform.practices.pricing` by hand: `practice
create` refused an existing id and had no option for them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ccm_billing.service_layer.common import PracticeInfo, consent_renewal_months
from ccm_billing.service_layer.decisions import practice_options
from ccm_shared import cli

pytestmark = pytest.mark.usefixtures("clean_ccm_env")


def ccm(*args: str):  # noqa: ANN201
    return CliRunner().invoke(cli.app, list(args))


@pytest.fixture
def platform_db(monkeypatch, tmp_path):  # noqa: ANN201
    monkeypatch.setenv("CCM_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/platform.db")
    assert ccm("migrate").exit_code == 0
    created = ccm("practice", "create", "--id", "sunrise", "--name", "Sunrise", "--timezone",
                  "America/Chicago", "--pricing", "per-code", "--rate", "99490=42.00",
                  "--rule", "date_of_service=threshold-met")
    assert created.exit_code == 0, created.output


def shown() -> dict:
    result = ccm("practice", "show", "--id", "sunrise")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def billing_view(practice: dict) -> PracticeInfo:
    """The practice as billing reads its row."""
    row = SimpleNamespace(id=practice["id"], name=practice["name"],
                          timezone=practice["timezone"], pricing=json.dumps(practice["pricing"]))
    return PracticeInfo.of_row(row)


def test_rules_set_on_create_and_update_are_what_billing_decides_with(platform_db):
    result = ccm("practice", "update", "--id", "sunrise", "--rule",
                 "initiating_visit_missing=blocker", "--rule", "consent_renewal_months=12")
    assert result.exit_code == 0, result.output
    info = billing_view(shown())
    options = practice_options(info)
    assert (options.date_of_service, options.initiating_visit_missing) == ("threshold-met",
                                                                           "blocker")
    assert consent_renewal_months(info) == 12
    # Removing a rule gives its default back; the other rules and the contract stay.
    assert ccm("practice", "update", "--id", "sunrise", "--unset-rule",
               "date_of_service").exit_code == 0
    practice = shown()
    assert practice_options(billing_view(practice)).date_of_service == "month-end"
    assert practice["pricing"]["rules"] == {"initiating_visit_missing": "blocker",
                                            "consent_renewal_months": 12}
    assert practice["pricing"]["rates"] == {"99490": "42.00"}


def test_a_new_contract_replaces_the_old_one_and_keeps_the_rules(platform_db):
    result = ccm("practice", "update", "--id", "sunrise", "--pricing", "percent-of-medicare",
                 "--percent", "40", "--name", "Sunrise Clinic")
    assert result.exit_code == 0, result.output
    practice = shown()
    assert practice["name"] == "Sunrise Clinic"
    assert practice["pricing"] == {"model": "percent-of-medicare", "rates": {}, "percent": "40",
                                   "flat_fee": None, "due_days": 30,
                                   "rules": {"date_of_service": "threshold-met"}}
    assert practice["timezone"] == "America/Chicago"
    # Payment terms alone leave the contract as it is.
    assert ccm("practice", "update", "--id", "sunrise", "--due-days", "45").exit_code == 0
    assert shown()["pricing"] == {**practice["pricing"], "due_days": 45}
    listed = ccm("practice", "list")
    assert listed.stdout.splitlines() == ["sunrise\tAmerica/Chicago\tpercent-of-medicare\t"
                                          "Sunrise Clinic"]


@pytest.mark.parametrize(("options", "message"), [
    ([], "nothing to change"),
    (["--rule", "foo=1"], "unknown rule 'foo'"),
    (["--rule", "date_of_service"], "--rule takes NAME=VALUE"),
    (["--rule", "date_of_service=yesterday"], "takes month-end or threshold-met"),
    (["--rule", "initiating_visit_missing=error"], "takes warning or blocker"),
    (["--rule", "consent_renewal_months=1201"], "from 0 (none) to 1200"),
    (["--rule", "consent_renewal_months=-1"], "from 0 (none) to 1200"),
    (["--rule", "consent_renewal_months=1.5"], "from 0 (none) to 1200"),
    (["--unset-rule", "foo"], "--unset-rule foo: unknown rule"),
    (["--rule", "date_of_service=month-end", "--unset-rule", "date_of_service"], "both name"),
    (["--percent", "40"], "come with --pricing"),
    (["--pricing", "per-code"], "needs at least one --rate"),
    (["--pricing", "percent-of-medicare", "--percent", "150"], "at most 100"),
    (["--pricing", "by-the-hour"], "--pricing must be"),
    (["--name", "  "], "--name: 1 to 200 characters"),
    (["--name", "x" * 201], "--name: 1 to 200 characters"),
])
def test_a_refused_change_says_why_and_changes_nothing(platform_db, options, message):
    before = shown()
    result = ccm("practice", "update", "--id", "sunrise", *options)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert shown() == before


def test_a_practice_that_does_not_exist_is_not_updated(platform_db):
    result = ccm("practice", "update", "--id", "nosuch", "--rule", "date_of_service=month-end")
    assert result.exit_code == 2
    assert "practice 'nosuch' not found" in result.output
    assert ccm("practice", "show", "--id", "nosuch").exit_code == 2


def test_create_refuses_a_rule_it_does_not_know(monkeypatch):
    monkeypatch.setenv("CCM_DATABASE_URL", "postgresql+asyncpg://ccm:x@127.0.0.1:1/ccm")
    result = ccm("practice", "create", "--id", "x", "--name", "X", "--timezone", "UTC",
                 "--rule", "date_of_service=sometimes")
    assert result.exit_code == 2, result.output  # refused before connecting (not exit 3)
    assert "takes month-end or threshold-met" in result.output
