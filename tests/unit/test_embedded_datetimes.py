"""The embedded database (SQLite) keeps instants, not wall-clock times: a timezone-aware value
written with any offset reads back as the same instant, in UTC, and orders by instant in SQL.
SQLite has no offsets; without this, -05:00 at 02:00 read back as 02:00 naive and moved time
logged early in the morning on the 1st into the previous month."""

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, DateTime, Integer, MetaData, Table, select

from ccm_shared.db import create_engine_for

metadata = MetaData()
moments = Table("moments", metadata, Column("id", Integer, primary_key=True),
                Column("at", DateTime(timezone=True)), Column("wall", DateTime()))
EST = timezone(timedelta(hours=-5))


async def _engine(tmp_path):
    engine = create_engine_for(f"sqlite+aiosqlite:///{tmp_path}/platform.db", schema=None)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    return engine


async def test_an_offset_instant_reads_back_as_the_same_instant_in_utc(tmp_path):
    engine = await _engine(tmp_path)
    try:
        early = datetime(2025, 3, 1, 2, 0, tzinfo=EST)  # 07:00 UTC on the 1st
        async with engine.begin() as conn:
            await conn.execute(moments.insert(), [
                {"id": 1, "at": early, "wall": datetime(2025, 3, 1, 2, 0)},
                {"id": 2, "at": datetime(2025, 3, 1, 6, 0, tzinfo=UTC), "wall": None}])
            rows = (await conn.execute(select(moments).order_by(moments.c.at))).all()
            later = (await conn.execute(select(moments.c.id).where(
                moments.c.at > datetime(2025, 3, 1, 1, 30, tzinfo=EST)))).scalars().all()
        assert [r.id for r in rows] == [2, 1]  # 06:00 UTC before 07:00 UTC, by instant
        assert rows[1].at == early and rows[1].at.tzinfo is UTC
        assert rows[1].at.astimezone(EST).day == 1
        assert rows[1].wall == datetime(2025, 3, 1, 2, 0)  # a naive column stays naive
        assert later == [1]  # 01:30 EST is 06:30 UTC: only the 07:00 one is later
    finally:
        await engine.dispose()


@settings(max_examples=30, deadline=None)
@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1),
                    timezones=st.sampled_from([UTC, EST, timezone(timedelta(hours=5, minutes=30))])))
def test_any_aware_value_round_trips(tmp_path_factory, value):
    import asyncio

    async def run():
        engine = await _engine(tmp_path_factory.mktemp("rt"))
        try:
            async with engine.begin() as conn:
                await conn.execute(moments.insert(), {"id": 1, "at": value})
                return (await conn.execute(select(moments.c.at))).scalar()
        finally:
            await engine.dispose()

    assert asyncio.run(run()) == value
