"""The `asyncio` flavour: the same publisher, without blocking the event loop.

    async with AsyncPublisher("127.0.0.1:50051") as publisher:
        confirmed = await publisher.publish("ml.predictions", payload)  # handed over
        ...
        event_id = await confirmed                                      # broker confirmed

`publish` returns once the event is handed over (with `OnFull.BLOCK` it waits for
room on a worker thread, so the loop goes on), with an `asyncio.Future` that
resolves once the broker confirmed. Await it where you need the answer, or
`await publisher.flush()` at a checkpoint. The network work happens on the
publisher's own thread, as with `Publisher`.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Optional

from .errors import PublisherFull
from .flow_control import OnFull
from .publisher import Publisher, Stats


class AsyncPublisher:
    """`Publisher` for asyncio code; takes the same arguments."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        self._publisher = Publisher(target, **kwargs)

    async def publish(self, topic: str, payload: bytes, **kwargs: Any) -> "asyncio.Future[str]":
        """Hands one event over (see `Publisher.publish`); returns the future of its
        confirm."""
        blocks = self._publisher._flow.settings.on_full is OnFull.BLOCK
        try:
            # Never blocks the loop: with BLOCK, a full bound raises here first.
            future = self._publisher._publish(
                topic, payload, OnFull.ERROR if blocks else None, **kwargs
            )
        except PublisherFull:
            if not blocks:
                raise
            loop = asyncio.get_running_loop()
            future = await loop.run_in_executor(
                None, functools.partial(self._publisher.publish, topic, payload, **kwargs)
            )
        return asyncio.wrap_future(future)

    async def flush(self, timeout: Optional[float] = None) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._publisher.flush, timeout)

    async def close(self, timeout: Optional[float] = None) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._publisher.close, timeout)

    def stats(self) -> Stats:
        return self._publisher.stats()

    async def __aenter__(self) -> "AsyncPublisher":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
