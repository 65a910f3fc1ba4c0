"""The rules of a conditional read (FHIR http.html#cread, RFC 9110 §13.1-13.2), one row per
rule and edge case: which preconditions are read from the headers and a Bundle entry, what they
refuse, and when a version is "not modified" (304)."""

from datetime import UTC, datetime

import pytest

from ccm_ingest.adapters.repository import VersionRow
from ccm_ingest.domain.model import FhirRejected
from ccm_ingest.service_layer.resources import (
    ReadConditions,
    entry_read_conditions,
    header_read_conditions,
    http_date,
    if_none_match,
    read_outcome,
)

# Version 3, last updated at 10:00:00.500 UTC: its Last-Modified header says 10:00:00 GMT.
AT = datetime(2026, 3, 1, 10, 0, 0, 500_000, tzinfo=UTC)
V3 = VersionRow("Patient", "p1", 3, {"resourceType": "Patient", "id": "p1"}, "0" * 64, AT, AT,
                False, True, "PUT")


def second(s: int, micro: int = 0) -> datetime:
    return datetime(2026, 3, 1, 10, 0, s, micro, tzinfo=UTC)


@pytest.mark.parametrize(("conditions", "not_modified"), [
    (ReadConditions(frozenset({"3"})), True),  # the client has this version
    (ReadConditions(frozenset({"2"})), False),  # an older one
    (ReadConditions(frozenset({"2", "3"})), True),  # any of a list
    (ReadConditions(frozenset({"*"})), True),  # any version
    (ReadConditions(frozenset({"abc"})), False),  # no version's tag
    # If-None-Match decides when sent: If-Modified-Since is then not looked at
    (ReadConditions(frozenset({"2"}), second(59)), False),
    (ReadConditions(frozenset({"3"}), second(0).replace(year=2000)), True),
    # If-Modified-Since, against Last-Modified as the header gives it (to the second)
    (ReadConditions(None, second(0)), True),  # the Last-Modified sent: unchanged
    (ReadConditions(None, second(1)), True),  # later
    (ReadConditions(None, datetime(2026, 3, 1, 9, 59, 59, tzinfo=UTC)), False),  # earlier
    # a Bundle's ifModifiedSince, against its lastModified as the entry gives it (exact)
    (ReadConditions(None, second(0, 500_000), whole_seconds=False), True),
    (ReadConditions(None, second(0, 499_999), whole_seconds=False), False),
    (ReadConditions(None, second(0), whole_seconds=False), False),
    (ReadConditions(), False),  # nothing asked
])
def test_when_a_version_is_not_modified(conditions, not_modified):
    assert conditions.not_modified(V3) is not_modified
    outcome = read_outcome("Patient", "p1", V3, conditions)
    assert (outcome.status, outcome.version) == (304 if not_modified else 200, V3)


def test_a_read_without_conditions_is_a_200():
    assert read_outcome("Patient", "p1", V3, None).status == 200


@pytest.mark.parametrize(("sent", "versions"), [
    ('W/"3"', {"3"}),  # as the ETag header gives it
    ('"3"', {"3"}),  # strong: compared weakly (RFC 9110: If-None-Match uses weak comparison)
    ("3", {"3"}),  # bare, as If-Match takes it
    ('W/"2", W/"3"', {"2", "3"}),
    (' W/"2" ,"3" ', {"2", "3"}),
    ("*", {"*"}),
    (' * ', {"*"}),
    ('W/"abc"', {"abc"}),  # a tag, of no version here
    ('""', {""}),
])
def test_if_none_match_names_versions(sent, versions):
    assert if_none_match(sent) == frozenset(versions)


@pytest.mark.parametrize("sent", ["", "  ", "W/3", "abc", '"3', 'W/"3",', '*, W/"3"', "3 4",
                                  "v3", None, 3, ["W/\"3\""]])
def test_if_none_match_that_names_no_etags_is_a_400_naming_it(sent):
    with pytest.raises(FhirRejected) as refused:
        if_none_match(sent, "Bundle.entry[0].request.ifNoneMatch")
    assert refused.value.status == 400
    (issue,) = refused.value.issues
    assert issue.expression == ("Bundle.entry[0].request.ifNoneMatch",)
    assert "not * or a list of ETags" in issue.diagnostics


@pytest.mark.parametrize("sent", [
    "Sun, 01 Mar 2026 10:00:00 GMT",  # IMF-fixdate, as Last-Modified gives it
    "Sunday, 01-Mar-26 10:00:00 GMT",  # obsolete RFC 850
    "Sun Mar  1 10:00:00 2026",  # obsolete asctime (GMT)
    "Sun, 01 Mar 2026 12:00:00 +0200",  # another zone: the same instant
])
def test_an_http_date_in_any_of_its_forms_is_read(sent):
    assert http_date(sent) == second(0)


@pytest.mark.parametrize("sent", ["", "yesterday", "2026-03-01T10:00:00Z", "Sun, 99 Mar 2026",
                                  "Sun, 01 Xyz 2026 10:00:00 GMT"])
def test_if_modified_since_that_is_no_http_date_is_a_400(sent):
    with pytest.raises(FhirRejected) as refused:
        http_date(sent)
    assert refused.value.status == 400
    assert refused.value.issues[0].expression == ("If-Modified-Since",)


@pytest.mark.parametrize(("inm", "ims", "expected"), [
    ([], [], None),
    (['W/"3"'], [], ReadConditions(frozenset({"3"}))),
    # If-None-Match in several headers is one list (RFC 9110 §5.3)
    (['W/"1"', 'W/"3"'], [], ReadConditions(frozenset({"1", "3"}))),
    ([], ["Sun, 01 Mar 2026 10:00:00 GMT"], ReadConditions(None, second(0))),
    (["*"], ["Sun, 01 Mar 2026 10:00:00 GMT"], ReadConditions(frozenset({"*"}), second(0))),
])
def test_a_rest_reads_conditions_come_from_its_headers(inm, ims, expected):
    assert header_read_conditions(inm, ims) == expected


def test_if_modified_since_given_twice_is_a_400():
    with pytest.raises(FhirRejected) as refused:
        header_read_conditions([], ["Sun, 01 Mar 2026 10:00:00 GMT"] * 2)
    assert refused.value.status == 400 and "more than once" in refused.value.issues[0].diagnostics


@pytest.mark.parametrize(("inm", "ims", "expected"), [
    (None, None, None),
    ('W/"3"', None, ReadConditions(frozenset({"3"}), None, whole_seconds=False)),
    (None, "2026-03-01T10:00:00.5Z", ReadConditions(None, second(0, 500_000), False)),
    (None, "2026-03-01T05:00:00.5-05:00", ReadConditions(None, second(0, 500_000), False)),
    (None, "2026-03-01T10:00:00+00:00", ReadConditions(None, second(0), False)),
])
def test_a_bundle_reads_conditions_come_from_its_request(inm, ims, expected):
    assert entry_read_conditions(inm, ims, "Bundle.entry[2]") == expected


@pytest.mark.parametrize(("inm", "ims", "element"), [
    ("", None, "ifNoneMatch"),
    (7, None, "ifNoneMatch"),
    ("abc", None, "ifNoneMatch"),
    (None, "Sun, 01 Mar 2026 10:00:00 GMT", "ifModifiedSince"),  # an HTTP date: no instant
    (None, "2026-03-01", "ifModifiedSince"),  # a date
    (None, "2026-03-01T10:00:00", "ifModifiedSince"),  # no zone
    (None, "2026-02-30T10:00:00Z", "ifModifiedSince"),  # no such day
    (None, 1772359200, "ifModifiedSince"),
])
def test_a_bundle_reads_conditions_that_are_none_are_a_400_at_the_element(inm, ims, element):
    with pytest.raises(FhirRejected) as refused:
        entry_read_conditions(inm, ims, "Bundle.entry[2]")
    assert refused.value.status == 400
    assert refused.value.issues[0].expression == (f"Bundle.entry[2].request.{element}",)
