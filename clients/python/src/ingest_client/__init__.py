"""ingest_client: a Python publisher for ingest's `PublishAcked` stream.

Events are batched, sent on one long-lived stream, and each future resolves when
RabbitMQ confirmed its event. The client holds a bounded number of events and bytes:
when the broker is slow or away, `publish` blocks (or raises, or drops: your choice),
so the process's memory stays flat however long the outage.
"""

from .aio import AsyncPublisher
from .errors import (
    RETRYABLE,
    EventDropped,
    FlowControlTimeout,
    IngestError,
    PublishError,
    PublisherClosed,
    PublisherFull,
)
from .flow_control import FlowControl, OnFull
from .publisher import BatchSettings, PublishFuture, Publisher, RetrySettings, Stats, new_id

__all__ = [
    "AsyncPublisher",
    "BatchSettings",
    "EventDropped",
    "FlowControl",
    "FlowControlTimeout",
    "IngestError",
    "OnFull",
    "PublishError",
    "PublishFuture",
    "Publisher",
    "PublisherClosed",
    "PublisherFull",
    "RETRYABLE",
    "RetrySettings",
    "Stats",
    "new_id",
]
