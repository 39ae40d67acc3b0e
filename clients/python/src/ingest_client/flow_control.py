"""The publisher's bound: events and bytes handed to `publish` and not yet settled
(confirmed, or failed for good). Room is taken in `publish`, on the caller's thread,
before the event is held anywhere, and given back when its future resolves.

Waiters are served in arrival order, so a large event is not starved by small ones.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from .errors import FlowControlTimeout, PublisherFull


class OnFull(enum.Enum):
    """What `publish` does when the bound is reached."""

    BLOCK = "block"
    """Wait for room, up to `FlowControl.block_timeout` (then `FlowControlTimeout`)."""
    ERROR = "error"
    """Raise `PublisherFull` at once."""
    DROP = "drop"
    """Do not send the event: its future fails with `EventDropped`, and
    `stats().dropped` counts it. Chosen explicitly, never a default."""


@dataclass(frozen=True)
class FlowControl:
    """At most `max_events` events and `max_bytes` bytes (serialized events) are
    held unsettled by one publisher; the defaults keep a Python process within tens
    of MiB whatever the broker does."""

    max_events: int = 10_000
    max_bytes: int = 32 * 1024 * 1024
    on_full: OnFull = OnFull.BLOCK
    # Seconds `publish` waits for room with BLOCK; None waits as long as it takes.
    block_timeout: Optional[float] = 60.0

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.max_bytes < 1:
            raise ValueError("FlowControl: max_events and max_bytes must be at least 1")
        if self.block_timeout is not None and self.block_timeout < 0:
            raise ValueError("FlowControl: block_timeout must be >= 0 or None")


class FlowController:
    """Counts the room in use; `acquire` before holding, `release` once settled."""

    def __init__(self, settings: FlowControl) -> None:
        self.settings = settings
        self._cond = threading.Condition()
        self._events = 0
        self._bytes = 0
        # Tickets of the callers waiting, oldest first: only the head may take room.
        self._waiters: deque[object] = deque()

    def _fits(self, nbytes: int) -> bool:
        return (
            self._events + 1 <= self.settings.max_events
            and self._bytes + nbytes <= self.settings.max_bytes
        )

    def acquire(self, nbytes: int, mode: Optional[OnFull] = None) -> bool:
        """Takes room for one event of `nbytes`. True once taken; False when the
        event is to be dropped (DROP); raises `PublisherFull` (ERROR) or
        `FlowControlTimeout` (BLOCK, after `block_timeout`). `mode` overrides
        `on_full` for this call."""
        if nbytes > self.settings.max_bytes:
            raise ValueError(
                f"an event of {nbytes} bytes can never fit FlowControl.max_bytes "
                f"({self.settings.max_bytes}); raise max_bytes or send smaller events"
            )
        mode = mode or self.settings.on_full
        with self._cond:
            if not self._waiters and self._fits(nbytes):
                self._take(nbytes)
                return True
            if mode is OnFull.DROP:
                return False
            if mode is OnFull.ERROR:
                raise PublisherFull(self._full_message())
            ticket = object()
            self._waiters.append(ticket)
            deadline = (
                None
                if self.settings.block_timeout is None
                else time.monotonic() + self.settings.block_timeout
            )
            try:
                while not (self._waiters[0] is ticket and self._fits(nbytes)):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise FlowControlTimeout(
                            f"{self._full_message()}; waited {self.settings.block_timeout}s "
                            "(FlowControl.block_timeout)"
                        )
                    self._cond.wait(remaining)
                self._take(nbytes)
                return True
            finally:
                self._waiters.remove(ticket)
                # The next waiter may fit now (or the head changed).
                self._cond.notify_all()

    def _take(self, nbytes: int) -> None:
        self._events += 1
        self._bytes += nbytes

    def _full_message(self) -> str:
        return (
            f"publisher full: {self._events} events / {self._bytes} bytes unsettled "
            f"(FlowControl max_events={self.settings.max_events}, "
            f"max_bytes={self.settings.max_bytes})"
        )

    def release(self, events: int, nbytes: int) -> None:
        with self._cond:
            self._events -= events
            self._bytes -= nbytes
            assert self._events >= 0 and self._bytes >= 0, "flow control released twice"
            self._cond.notify_all()

    def in_use(self) -> tuple[int, int]:
        """(events, bytes) held now."""
        with self._cond:
            return self._events, self._bytes
