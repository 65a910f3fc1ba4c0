"""Texts the ingest domain writes faster than the obvious way, checked against the obvious way.

The content hash is SHA-256 of one canonical text, whichever writer produced it: the text of
``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` since the first
release, so hashes stored by earlier versions keep matching the same content."""

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_ingest.domain.model import SourceVersion, canonical_json, content_hash


def reference_text(resource: dict) -> bytes:
    body = {k: v for k, v in resource.items() if k != "id"}
    meta = body.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if meta:
            body["meta"] = meta
        else:
            body.pop("meta")
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


json_values = st.recursive(
    st.none() | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=20,
)


@settings(max_examples=400)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_the_canonical_text_is_json_dumps_byte_for_byte(resource):
    try:
        expected = reference_text(resource)
    except UnicodeEncodeError:  # a lone surrogate: not text either way
        with pytest.raises(UnicodeEncodeError):
            canonical_json(resource)
        return
    assert canonical_json(resource) == expected


@pytest.mark.parametrize("value", [
    1e-05, -1e-05, 1.5e-07, 6.273866203557358e-09, 0.0001, 1e-10, 1e16, 1.5e16, 5e-324,
    1.7976931348623157e308, -0.0, 2.5, 100.0, 2**64, -(2**63) - 1, 2**80,
    float("nan"), float("inf"), "é\u2028\x7f\x1f\"\\/", "1e-5", "null", "\ud800",
])
def test_values_where_orjson_writes_otherwise_or_fails(value):
    resource = {"resourceType": "Encounter", "length": {"value": value, "unit": "min"},
                "note": [value, {"v": value}]}
    if value == "\ud800":  # a lone surrogate is not text: both raise
        for write in (canonical_json, reference_text):
            with pytest.raises(UnicodeEncodeError):
                write(resource)
        return
    assert canonical_json(resource) == reference_text(resource)


def test_id_and_server_meta_are_not_content():
    one = {"resourceType": "Patient", "id": "a", "meta": {"versionId": "1",
           "lastUpdated": "2026-01-01T00:00:00Z"}, "active": True}
    other = {"resourceType": "Patient", "id": "b", "active": True}
    tagged = {**other, "meta": {"tag": [{"code": "x"}]}}
    assert content_hash(one) == content_hash(other) == hashlib.sha256(
        b'{"active":true,"resourceType":"Patient"}').hexdigest()
    assert content_hash(tagged) != content_hash(other)


def test_source_times_are_written_with_their_own_zone_and_fold():
    """Event times are remembered, keyed so equal instants in other zones (and the two 1:30 of
    a DST fall-back) keep their own text."""
    ny = ZoneInfo("America/New_York")
    noon = datetime(2026, 3, 1, 12, tzinfo=UTC)
    times = [noon, noon.astimezone(timezone(timedelta(hours=-5))), noon.astimezone(ny),
             datetime(2026, 11, 1, 1, 30, tzinfo=ny), datetime(2026, 11, 1, 1, 30, fold=1,
                                                               tzinfo=ny)]
    for _ in range(2):  # written, then remembered
        for t in times:
            event = SourceVersion("Encounter", "e", 1, t, "h", t, None).to_event()
            assert event["lastUpdated"] == event["receivedAt"] == t.isoformat()
    assert len({t.isoformat() for t in times}) == 4


def test_last_modified_of_the_two_readings_of_a_repeated_hour():
    from ccm_ingest.entrypoints.outcomes import http_date

    ny = ZoneInfo("America/New_York")
    first, second = datetime(2026, 11, 1, 1, 30, tzinfo=ny), datetime(2026, 11, 1, 1, 30,
                                                                      fold=1, tzinfo=ny)
    for _ in range(2):
        assert (http_date(first), http_date(second)) == ("Sun, 01 Nov 2026 05:30:00 GMT",
                                                         "Sun, 01 Nov 2026 06:30:00 GMT")
