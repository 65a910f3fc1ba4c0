"""The demo runner's pure helpers: service URLs, metrics parsing, edge-case checking."""

from datetime import UTC, datetime

import pytest

from ccm_shared.demo.generate import generate
from ccm_shared.demo.runner import DemoError, Endpoints, check_edge_cases, metric_sum


def test_other_services_sit_at_ingests_port_plus_one_two_three_unless_given():
    e = Endpoints.derive("http://127.0.0.1:18081/", careplan="http://cp.example:9000")
    assert e == Endpoints("http://127.0.0.1:18081", "http://127.0.0.1:18082",
                          "http://cp.example:9000", "http://127.0.0.1:18084")
    with pytest.raises(DemoError, match="--url"):
        Endpoints.derive("127.0.0.1:8081")


def test_metric_sum_adds_the_samples_whose_labels_match():
    text = (
        '# TYPE ccm_consumer_lag gauge\n'
        'ccm_consumer_lag{group="billing-projections",partition="0",topic="a"} 3.0\n'
        'ccm_consumer_lag{group="billing-projections",partition="1",topic="a"} 4.0\n'
        'ccm_consumer_lag{group="careplan-tracker",partition="0",topic="a"} 9.0\n'
    )
    assert metric_sum(text, "ccm_consumer_lag", group="billing-projections") == 7.0
    assert metric_sum(text, "ccm_consumer_lag") == 16.0
    assert metric_sum(text, "ccm_outbox_backlog") is None


def test_edge_cases_are_checked_against_codes_blockers_and_warnings():
    demo = generate(practice="p", month="2026-03", timezone="UTC", patients=21,
                    now=datetime(2026, 4, 2, tzinfo=UTC))
    rows = []
    for p in demo.edge_cases:
        codes = [{"code": c, "units": n} for c, n in p.expect.codes.items()]
        rows.append({"patient": f"Patient/{p.id}", "codes": codes,
                     "blockers": list(p.expect.blockers), "warnings": list(p.expect.warnings)})
    assert all(r["ok"] for r in check_edge_cases(demo, {"patients": rows}))
    rows[1]["codes"] = []  # 20:00 not billed
    rows[0]["blockers"] = []  # 19:59 without its blocker
    bad = [r for r in check_edge_cases(demo, {"patients": rows[1:]}) if not r["ok"]]
    assert [r["scenario"] for r in bad] == ["staff-19m59s", "staff-20m00s"]
    assert bad[0]["problems"] == ["not on the worklist"]
