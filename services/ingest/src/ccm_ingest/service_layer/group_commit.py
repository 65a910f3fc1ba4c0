"""Group commit of single-resource writes: the creates and updates that arrive while another
batch is being stored go together in the next unit of work (``store_many``: a few statements
and one COMMIT for all of them), and each request answers only once its own version and events
are committed. Under load this is what makes durable POSTs cheap; idle, a batch is one write.

A batch that fails (a mapping error in one resource, a deadlock between two connections'
batches) is rolled back and each of its writes is retried alone (``ccm_shared.db.GroupCommit``),
so a write fails only for its own reasons and is never half-stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ccm_ingest.service_layer import resources as handlers
from ccm_ingest.service_layer.resources import Caller, Outcome, Write
from ccm_shared.db import GroupCommit, UnitOfWork


class GroupedWrites:
    """Stores writes of one practice and connection (with the same practice settings) in shared
    units of work, at most ``max_batch`` per transaction."""

    def __init__(self, open_uow: Callable[[], UnitOfWork], *, max_batch: int = 100,
                 committed: Callable[[], Any] | None = None) -> None:
        self.open_uow = open_uow
        self.committed = committed  # e.g. wake the outbox relay
        self._group: GroupCommit[tuple[Caller, Write], Outcome] = GroupCommit(
            self._commit, max_batch=max_batch, name="ingest-group-commit")

    async def store(self, caller: Caller, write: Write) -> Outcome:
        """Store ``write`` as the next version of its resource; its outcome once committed."""
        # Writes share a batch only when everything but the time is the same caller (a
        # practice's config revision decides its config: the config itself is not hashed).
        key = (caller.tenant, caller.token_id, caller.connection, caller.timezone.key,
               caller.config_revision, caller.local_bases)
        return await self._group.submit((caller, write), key)

    async def _commit(self, batch: list[tuple[Caller, Write]]) -> list[Outcome]:
        # The batch is stored when the last of its requests has arrived: that is its time.
        caller = dataclasses.replace(batch[0][0], now=max(c.now for c, _ in batch))
        async with self.open_uow() as uow:
            outcomes = await handlers.store_many(uow, caller, [w for _, w in batch])
            await uow.commit()
        if self.committed is not None:
            self.committed()
        return outcomes
