"""contracts/ stays in step with the code."""

import json
from pathlib import Path

import jsonschema
import pytest

from ccm_shared.cli import generated_contracts
from ccm_shared.service import discover_services
from tests.support.contracts import EVENTS, assert_valid_event
from tests.support.messaging import make_event

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"


def test_committed_asyncapi_and_openapi_documents_match_the_code():
    for relative, doc in generated_contracts().items():
        path = CONTRACTS / relative
        assert path.exists(), f"{relative} missing: run `uv run ccm contracts`"
        assert json.loads(path.read_text()) == json.loads(json.dumps(doc)), (
            f"{relative} is stale: run `uv run ccm contracts` and commit the result"
        )


@pytest.mark.parametrize("path", sorted(EVENTS.glob("*.schema.json")), ids=lambda p: p.name)
def test_every_schema_is_a_valid_json_schema(path):
    jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_every_produced_topic_has_a_schema():
    for definition in discover_services().values():
        for topic in (*definition.produces, *definition.produces_per_practice):
            assert (EVENTS / f"{topic}.schema.json").exists(), f"{definition.name}: {topic}"
        for topic in definition.produces:
            assert topic.startswith(f"{definition.name}."), "a service produces only its own topics"


def test_an_event_with_unknown_type_is_refused():
    with pytest.raises(AssertionError, match="no schema"):
        assert_valid_event(make_event(type="ingest.nothing.happened.v1"))


def test_an_event_whose_data_breaks_its_schema_is_refused():
    with pytest.raises(jsonschema.ValidationError):
        assert_valid_event(make_event(type="ingest.time-entry.reversed.v1", data={"x": 1}))


def test_the_openapi_documents_give_errors_and_metrics_as_they_are_sent():
    """Errors are problem+json (RFC 9457), under /fhir OperationOutcomes; /metrics is
    Prometheus text (FastAPI documented both as application/json); /readyz's 503 is its
    readiness report, as its 200."""
    docs = generated_contracts()
    for name, doc in docs.items():
        if not name.startswith("openapi/"):
            continue
        for path, operations in doc["paths"].items():
            wanted = "application/fhir+json" if path.startswith("/fhir") else \
                "application/problem+json"
            for operation in operations.values():
                for status, response in operation["responses"].items():
                    if status[0] in "45" and path != "/readyz":
                        assert list(response.get("content", {wanted: 0})) == [wanted], \
                            (name, path, status)
                if path.startswith("/fhir"):  # a parameter refused is a 400 there, not 422
                    assert operation["responses"].get("422", {}).get("description") != \
                        "Validation Error", (name, path)
        if name == "openapi/ingest.json":  # what a write answers for content FHIR refuses
            for path, method in (("/fhir/{rtype}", "post"), ("/fhir/{rtype}/{rid}", "put"),
                                 ("/fhir", "post")):
                answers = doc["paths"][path][method]["responses"]
                assert list(answers["422"]["content"]) == ["application/fhir+json"], path
        assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == \
            ["text/plain"]
        ready = doc["paths"]["/readyz"]["get"]["responses"]
        assert ready["503"]["content"] == ready["200"]["content"]
