"""Concurrent single-resource writes are stored together (group commit), each answered only
once committed, each with its own outcome, events and correlation id."""

import asyncio

from sqlalchemy import event

from tests.unit.ingest.conftest import counts, events
from tests.unit.ingest.test_fhir_api import ccm_encounter

FHIR = {"Content-Type": "application/fhir+json"}


def encounter(n: int, patient: str = "p1") -> dict:
    body = ccm_encounter(rid=None, start=f"2026-02-{1 + n % 28:02d}T14:00:00Z")
    body.pop("id")
    body["subject"] = {"reference": f"Patient/{patient}"}
    body["identifier"] = [{"system": "urn:test", "value": str(n)}]
    return body


def version_inserts(fhir) -> list[int]:
    """Counts the statements that insert resource versions (one per stored batch)."""
    seen: list[int] = []

    def count(conn, cursor, statement, *_):  # noqa: ANN001
        if statement.lstrip().upper().startswith("INSERT") and "resource_versions" in statement:
            seen.append(1)

    event.listen(fhir.runtime.db.engine.sync_engine, "before_cursor_execute", count)
    return seen


async def test_concurrent_creates_share_transactions_and_keep_their_own_correlation_ids(fhir):
    inserts = version_inserts(fhir)
    answers = await asyncio.gather(*(
        fhir.post("/fhir/Encounter", json=encounter(n, f"p{n % 3}"),
                  headers={**FHIR, "X-Correlation-ID": f"request-{n}"})
        for n in range(30)))
    assert [r.status_code for r in answers] == [201] * 30
    assert len({r.json()["id"] for r in answers}) == 30
    assert 1 < len(inserts) < 30  # the first alone, the others in batches behind it
    assert (await counts(fhir))["versions"] == 30
    logged = await events(fhir, "ingest.time-entry.logged.v1")
    assert len(logged) == 30
    by_resource = {e["data"]["source"]["id"]: e["correlationid"] for e in logged}
    assert by_resource == {r.json()["id"]: r.headers["x-correlation-id"] for r in answers}
    for patient in ("p0", "p1", "p2"):  # one gapless sequence per patient across batches
        sequences = sorted(e["sequence"] for e in logged if e["subject"] == f"Patient/{patient}")
        assert sequences == list(range(1, 11))


async def test_a_write_the_mapping_refuses_fails_alone_and_the_rest_of_its_batch_is_stored(fhir):
    bad = encounter(99)
    bad["period"] = {"start": "2099-03-01T10:00:00Z"}  # valid FHIR; the mapping refuses it
    bodies = [encounter(n) for n in range(10)]
    bodies.insert(5, bad)
    answers = await asyncio.gather(*(fhir.post("/fhir/Encounter", json=b, headers=FHIR)
                                     for b in bodies))
    statuses = [r.status_code for r in answers]
    assert statuses == [201] * 5 + [422] + [201] * 5
    outcome = answers[5].json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "CCM time cannot start after it was sent" in outcome["issue"][0]["diagnostics"]
    assert (await counts(fhir))["versions"] == 10
    assert len(await events(fhir, "ingest.time-entry.logged.v1")) == 10


async def test_concurrent_updates_of_one_resource_are_both_versions_in_order(fhir):
    first, second = ccm_encounter(rid="e7", minutes=20), ccm_encounter(rid="e7", minutes=40)
    answers = await asyncio.gather(fhir.put("/fhir/Encounter/e7", json=first, headers=FHIR),
                                   fhir.put("/fhir/Encounter/e7", json=second, headers=FHIR))
    assert [r.status_code for r in answers] == [201, 200]
    assert [r.headers["etag"] for r in answers] == ['W/"1"', 'W/"2"']
    current = (await fhir.get("/fhir/Encounter/e7")).json()
    assert current["length"]["value"] == 40 and current["meta"]["versionId"] == "2"


async def test_a_practice_is_read_once_however_many_requests_want_it_at_once():
    import asyncio

    from ccm_ingest.entrypoints.fhir_api import PracticeCache

    cache, reads = PracticeCache(ttl=60), []

    async def load(value="settings"):  # noqa: ANN001, ANN202
        reads.append(value)
        await asyncio.sleep(0.01)
        return value

    got = await asyncio.gather(*(cache.get_or_load("practice", "alpha", load) for _ in range(20)))
    assert got == ["settings"] * 20 and len(reads) == 1
    assert await cache.get_or_load("practice", "alpha", load) == "settings" and len(reads) == 1

    async def fail():  # noqa: ANN202
        reads.append("failed")
        await asyncio.sleep(0.01)
        raise RuntimeError("database down")

    results = await asyncio.gather(*(cache.get_or_load("practice", "beta", fail) for _ in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results) and reads.count("failed") == 1
    assert await cache.get_or_load("practice", "beta", load) == "settings"  # not cached: read again

    # The request that reads is cancelled (its client went away): the others read themselves.
    first = asyncio.create_task(cache.get_or_load("practice", "gamma", lambda: load("g")))
    await asyncio.sleep(0)
    others = [asyncio.create_task(cache.get_or_load("practice", "gamma", lambda: load("g")))
              for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()
    assert await asyncio.gather(*others) == ["g"] * 3
    assert reads.count("g") == 2  # the cancelled read, then one for the three others


async def test_a_read_under_way_when_the_settings_change_is_not_used_afterwards():
    import asyncio

    from ccm_ingest.entrypoints.fhir_api import PracticeCache

    cache, stored = PracticeCache(ttl=60), {"value": "old"}

    async def load():  # noqa: ANN202
        seen = stored["value"]
        await asyncio.sleep(0.02)
        return seen

    before = asyncio.create_task(cache.get_or_load("practice", "alpha", load))
    await asyncio.sleep(0.005)  # the read has seen the old settings
    stored["value"] = "new"
    cache.forget("alpha")  # what PUT ingest-config does once the new settings are stored
    after = await cache.get_or_load("practice", "alpha", load)
    assert after == "new" and await before == "old"
    assert await cache.get_or_load("practice", "alpha", load) == "new"  # the old one never cached
