"""Group commit of single-resource writes: the creates and updates that arrive while another
batch is being stored go together in the next unit of work (``store_many``: a few statements
and one COMMIT for all of them), and each request answers only once its own version and events
are committed. Under load this is what makes durable POSTs cheap; idle, a batch is one write.

A batch that fails (a mapping error in one resource, a deadlock between two connections'
batches) is rolled back and each of its writes is retried alone, so a write fails only for its
own reasons and is never half-stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from ccm_ingest.service_layer import resources as handlers
from ccm_ingest.service_layer.resources import Caller, Outcome, Write
from ccm_shared.db import UnitOfWork


@dataclasses.dataclass
class _Queued:
    caller: Caller
    write: Write
    done: asyncio.Future


class GroupCommit:
    """Stores writes of one practice and connection (and the same practice settings) in shared
    units of work, at most ``max_batch`` per transaction."""

    def __init__(self, open_uow: Callable[[], UnitOfWork], *, max_batch: int = 100,
                 committed: Callable[[], Any] | None = None) -> None:
        self.open_uow = open_uow
        self.max_batch = max_batch
        self.committed = committed  # e.g. wake the outbox relay
        self._queues: dict[tuple, list[_Queued]] = {}
        self._drainers: dict[tuple, asyncio.Task] = {}

    async def store(self, caller: Caller, write: Write) -> Outcome:
        """Store ``write`` as the next version of its resource; its outcome once committed."""
        # Writes share a batch only when everything but the time is the same caller.
        key = (caller.tenant, caller.token_id, caller.connection, caller.timezone.key,
               caller.config)
        done = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append(_Queued(caller, write, done))
        drainer = self._drainers.get(key)
        if drainer is None or drainer.done():
            # A task of its own: a cancelled request must not stop the others' batch.
            self._drainers[key] = asyncio.create_task(self._drain(key),
                                                      name=f"ingest-group-commit-{key[0]}")
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:  # stored all the same; nobody waits for the outcome
            done.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise

    async def _drain(self, key: tuple) -> None:
        try:
            while queue := self._queues.get(key):
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                await self._store(batch)
        finally:
            if not self._queues.get(key):
                self._queues.pop(key, None)
                self._drainers.pop(key, None)

    async def _store(self, batch: list[_Queued]) -> None:
        try:
            outcomes = await self._commit(batch)
        except Exception as exc:  # noqa: BLE001 - every write on its own, with its own result
            if len(batch) == 1:
                _settle(batch[0].done, error=exc)
                return
            for queued in batch:
                try:
                    outcome = (await self._commit([queued]))[0]
                except Exception as alone:  # noqa: BLE001 - that request's answer
                    _settle(queued.done, error=alone)
                else:
                    _settle(queued.done, outcome)
            return
        for queued, outcome in zip(batch, outcomes, strict=True):
            _settle(queued.done, outcome)

    async def _commit(self, batch: list[_Queued]) -> list[Outcome]:
        # The batch is stored when the last of its requests has arrived: that is its time.
        caller = dataclasses.replace(batch[0].caller, now=max(q.caller.now for q in batch))
        async with self.open_uow() as uow:
            outcomes = await handlers.store_many(uow, caller, [q.write for q in batch])
            await uow.commit()
        if self.committed is not None:
            self.committed()
        return outcomes


def _settle(done: asyncio.Future, outcome: Outcome | None = None, *,
            error: BaseException | None = None) -> None:
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(outcome)
