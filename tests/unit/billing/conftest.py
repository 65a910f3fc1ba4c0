from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest_asyncio

from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.support.embedded import embedded_runtime


class Clock:
    """An injectable clock tests move by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


PRICING = Pricing(model="per-code", rates={"99490": Decimal("42.00"), "99439": Decimal("33.33"),
                                           "99491": Decimal("60.00"), "99437": Decimal("40.00"),
                                           "99487": Decimal("95.00"), "99489": Decimal("50.00"),
                                           "G0506": Decimal("45.00")}, due_days=30)


@pytest_asyncio.fixture
async def billing(tmp_path):
    """The billing service on the embedded database: practices alpha (New York) and beta."""
    clock = Clock(datetime(2025, 3, 20, 15, tzinfo=UTC))
    runtime = await embedded_runtime(tmp_path, "billing", clock=clock)
    await create_practice(runtime.db.engine, practice_id="alpha", name="Alpha Clinic",
                          timezone="America/New_York", pricing=PRICING)
    await create_practice(runtime.db.engine, practice_id="beta", name="Beta Clinic",
                          timezone="America/Chicago",
                          pricing=Pricing(model="percent-of-medicare", percent=Decimal("40")))
    runtime.state["tokens"] = {p: await create_token(runtime.db.engine, practice_id=p)
                               for p in ("alpha", "beta")}
    runtime.state["clock"] = clock
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()), base_url="http://t")
    runtime.state["client"] = client
    yield runtime
    await client.aclose()
    await runtime.db.dispose()
