"""Provider writes and acknowledgements conditional on what they read (embedded SQLite): a
write that finds the row changed since its read writes nothing; a provider text with NUL or a
lone surrogate is refused before anything is stored."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select, update

from ccm_notification.adapters.orm import messages, outbox, provider_history, providers
from ccm_notification.service_layer import directory
from ccm_shared.errors import PreconditionFailed
from tests.unit.notification.conftest import NOW
from tests.unit.notification.test_api_edges import GAP

P = "/v1/practices/acme"


async def _count(rt, table, *where) -> int:  # noqa: ANN001
    async with rt.db.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(table).where(*where))
                ).scalar_one()


async def _stale_reads(monkeypatch, rt, times: int) -> None:  # noqa: ANN001
    """The next ``times`` reads of doc-1 answer the row as it is now; then it moves on to
    version 2 (a concurrent writer between the read and the write)."""
    async with rt.db.unit_of_work() as uow:
        stale = await directory.load_provider(uow, "acme", "doc-1")
    async with rt.db.unit_of_work() as uow:
        await uow.session.execute(update(providers).where(providers.c.id == "doc-1")
                                  .values(version=2))
        await uow.commit()
    real, left = directory.load_provider, [times]

    async def load(uow, practice, provider_id, *, lock=False):  # noqa: ANN001, ANN202
        if left[0] > 0:
            left[0] -= 1
            return stale
        return await real(uow, practice, provider_id, lock=lock)

    monkeypatch.setattr(directory, "load_provider", load)


async def test_an_if_match_edit_whose_row_moved_on_after_its_read_is_412(acme, monkeypatch):
    await _stale_reads(monkeypatch, acme, 1)
    async with acme.db.unit_of_work() as uow:
        with pytest.raises(PreconditionFailed):
            await directory.edit_provider(uow, "acme", "doc-1", {"name": "Dr. Late"}, (),
                                          actor="t", now=NOW, if_match=1)
    async with acme.db.unit_of_work() as uow:
        row = await directory.load_provider(uow, "acme", "doc-1")
    assert row.current["name"] == "Dr. One" and row.version == 2


async def test_an_edit_whose_row_moved_on_after_its_read_reads_again_and_applies(acme,
                                                                                  monkeypatch):
    await _stale_reads(monkeypatch, acme, 1)
    async with acme.db.unit_of_work() as uow:
        version, created = await directory.edit_provider(
            uow, "acme", "doc-1", {"name": "Dr. Later"}, (), actor="t", now=NOW, if_match=None)
        await uow.commit()
    assert (version, created) == (3, False)
    async with acme.db.unit_of_work() as uow:
        row = await directory.load_provider(uow, "acme", "doc-1")
    assert row.current["name"] == "Dr. Later" and row.version == 3


async def test_a_create_that_finds_the_provider_created_meanwhile_updates_it(acme, monkeypatch):
    real = directory.load_provider
    calls = [0]

    async def load(uow, practice, provider_id, *, lock=False):  # noqa: ANN001, ANN202
        calls[0] += 1
        if calls[0] == 1:  # read before a concurrent writer created it
            return None
        return await real(uow, practice, provider_id, lock=lock)

    async with acme.db.unit_of_work() as uow:
        await directory.edit_provider(uow, "acme", "doc-2", {"name": "Dr. First"}, (),
                                      actor="t", now=NOW, if_match=None)
        await uow.commit()
    monkeypatch.setattr(directory, "load_provider", load)
    async with acme.db.unit_of_work() as uow:
        version, created = await directory.edit_provider(
            uow, "acme", "doc-2", {"name": "Dr. Second"}, (), actor="t", now=NOW, if_match=None)
        await uow.commit()
    assert (version, created) == (2, False)
    assert await _count(acme, provider_history, provider_history.c.provider_id == "doc-2") == 2


async def test_concurrent_puts_creating_one_provider_create_it_once(api):
    rt, client, headers = api
    answers = await asyncio.gather(*(client.put(f"{P}/providers/doc-new", headers=headers,
                                                json={"name": f"Dr. N{n}"}) for n in range(5)))
    assert sorted(r.status_code for r in answers) == [200] * 4 + [201], [r.text for r in answers]


async def test_a_second_ack_answers_the_first_acknowledgement_and_adds_no_event(api):
    """(The concurrent case, on PostgreSQL: test_races_on_postgres.)"""
    rt, client, headers = api
    mid = (await client.post(f"{P}/notifications", headers=headers, json=GAP)).json()["id"]
    first = await client.post(f"/v1/notifications/{mid}/ack", headers=headers)
    assert first.status_code == 200
    second = await client.post(f"/v1/notifications/{mid}/ack", headers=headers)
    assert second.json() == first.json()
    assert await _count(rt, outbox, outbox.c.event_type == "notification.message.acknowledged.v1",
                        outbox.c.payload.contains(mid)) == 1
    [row] = await _rows(rt, messages.c.id == mid)
    assert row.ack_state == "acknowledged"


async def _rows(rt, *where):  # noqa: ANN001, ANN202
    async with rt.db.engine.connect() as conn:
        return (await conn.execute(select(messages).where(*where))).all()


@pytest.mark.parametrize("body", [
    '{"name": "Dr \\u0000 Nul"}',
    '{"phone": "555\\u00001"}',
    '{"email": "nul\\u0000@acme.test"}',
    '{"name": "Dr \\ud800 Half"}',
])
async def test_a_provider_text_with_nul_or_a_lone_surrogate_is_refused(api, body):
    rt, client, headers = api
    for pid in ("doc-1", "doc-fresh"):
        r = await client.put(f"{P}/providers/{pid}",
                             headers={**headers, "Content-Type": "application/json"},
                             content=body)
        assert r.status_code == 422 and "Nul" not in r.text and "Half" not in r.text, r.text
    assert (await client.get(f"{P}/providers/doc-fresh", headers=headers)).status_code == 404
    stored = (await client.get(f"{P}/providers/doc-1", headers=headers)).json()
    assert stored["version"] == 1 and stored["name"] == "Dr. One"
