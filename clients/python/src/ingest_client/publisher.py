"""`Publisher`: events in, futures out, one `PublishAcked` stream underneath.

How an event travels:

1. `publish()` (the caller's thread) builds the `Event`, gives it an id if it has
   none, and takes room for it from the flow controller *before* holding it: when
   the bound is reached it blocks, raises or drops, as `FlowControl.on_full` says.
2. The event joins the open batch. A batch is sealed when it reaches
   `BatchSettings.max_events` or `max_bytes`, or `max_latency` after its first event.
3. The sender thread keeps one `PublishAcked` stream open while there is work. grpcio
   pulls sealed batches from a generator one request at a time, only once the last
   one was written, so when the server stops reading (HTTP/2 flow control), nothing
   piles up here but what the flow controller already counted.
4. The server answers each request with one `PublishAck`, in order. OK resolves the
   batch's futures with their ids; a retryable failure (`UNAVAILABLE`,
   `RESOURCE_EXHAUSTED`, ...) puts the batch back at the head of the queue, to be sent
   again with the same ids after the `RetryInfo` delay; any other failure fails its
   futures with a `PublishError` naming the event.
5. When the stream itself breaks (connection cut, server draining), every request
   sent and not yet acknowledged is sent again, in its order, on a new stream, with
   the same ids. Only those can be duplicated downstream, and their ids (the AMQP
   `message_id`) let a consumer drop the duplicates.

A future resolves once, when its event is settled for good; then its room is freed.
Order: events reach the broker in `publish` order, except around a retry (a batch
sent again lands after batches that were already on their way).
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import grpc
from google.protobuf import timestamp_pb2

from ._stubs import ingest_pb2, ingest_pb2_grpc
from .errors import (
    STREAM_RETRYABLE,
    EventDropped,
    PublishError,
    PublisherClosed,
)
from .flow_control import FlowControl, FlowController, OnFull

log = logging.getLogger("ingest_client")

# Requests sent on one stream and not yet acknowledged: under the server's own
# per-stream bound (1024), past which it would stop reading anyway.
MAX_REQUESTS_IN_FLIGHT = 1000

# A stream with nothing to send or await for this long is closed by the client (the
# server closes idle streams after its stream-idle-timeout, 60 s by default); the
# next publish opens a new one.
IDLE_CLOSE = 20.0

# Protobuf framing added per event inside a request (tag and length).
_EVENT_FRAMING = 6

_EVENT_INDEX = re.compile(r"^events\[(\d+)\]")


@dataclass(frozen=True)
class BatchSettings:
    """When a batch is sent: whichever limit is reached first. The defaults follow
    Pub/Sub's publisher (100 events, 10 ms) with a byte limit well under ingest's
    default message limit (1 MiB)."""

    max_events: int = 100
    max_bytes: int = 512 * 1024
    max_latency: float = 0.01

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.max_bytes < 1 or self.max_latency < 0:
            raise ValueError("BatchSettings: max_events, max_bytes >= 1 and max_latency >= 0")


@dataclass(frozen=True)
class RetrySettings:
    """How long an event is sent again after retryable failures, and the backoff
    when the server gave no `RetryInfo` (e.g. the connection never came up)."""

    # Seconds after `publish` during which a failed event is sent again; past it the
    # future fails with the last error.
    deadline: float = 600.0
    initial_backoff: float = 0.1
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if self.deadline < 0 or self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("RetrySettings: deadline >= 0, 0 < initial_backoff <= max_backoff")


@dataclass(frozen=True)
class Stats:
    """Counters since the publisher was made (events unless named otherwise)."""

    published: int  # accepted by publish() (dropped ones not included)
    confirmed: int  # futures resolved OK
    failed: int  # futures failed for good
    dropped: int  # not sent: the bound was reached with OnFull.DROP
    resent: int  # sent again after a lost stream or a retryable ack
    streams: int  # PublishAcked streams opened
    outstanding_events: int  # held now: accepted and not settled
    outstanding_bytes: int


class PublishFuture(futures.Future):  # type: ignore[type-arg]
    """Resolves to the event's id once the broker confirmed it, or fails with a
    `PublishError` (or `PublisherClosed`). It cannot be cancelled: the event may
    already be on its way."""

    def cancel(self) -> bool:
        return False


class _Batch:
    """Events sent together in one request, and what waits on them."""

    __slots__ = ("events", "futures", "sizes", "nbytes", "due", "deadline")

    def __init__(self, due: float) -> None:
        self.events: list[Any] = []
        self.futures: list[PublishFuture] = []
        self.sizes: list[int] = []
        self.nbytes = 0
        # When the batch is sealed for its latency.
        self.due = due
        # Until when its events are sent again after retryable failures (the
        # earliest of its events' deadlines).
        self.deadline = float("inf")

    def add(self, event: Any, future: PublishFuture, size: int, deadline: float) -> None:
        self.events.append(event)
        self.futures.append(future)
        self.sizes.append(size)
        self.nbytes += size + _EVENT_FRAMING
        self.deadline = min(self.deadline, deadline)

    def subset(self, keep: Sequence[int]) -> "_Batch":
        rest = _Batch(self.due)
        rest.deadline = self.deadline
        for i in keep:
            rest.events.append(self.events[i])
            rest.futures.append(self.futures[i])
            rest.sizes.append(self.sizes[i])
            rest.nbytes += self.sizes[i] + _EVENT_FRAMING
        return rest


# (future, id or error) pairs resolved once the lock is released, with their room.
_Settled = list[tuple[PublishFuture, Union[str, BaseException], int]]


_id_lock = threading.Lock()
_id_last = [0, 0]  # the millisecond and the 12-bit counter of the last id


def new_id() -> str:
    """A UUIDv7 (time-ordered, RFC 9562): what ingest generates for events without id.
    The client names every event itself, so a resend carries the same id. Ids made in
    the same millisecond count up in the 12-bit `rand_a` field (RFC 9562, method 1), so
    they sort in the order they were made."""
    rand = int.from_bytes(os.urandom(8), "big")
    with _id_lock:
        ms = max(time.time_ns() // 1_000_000, _id_last[0])
        if ms == _id_last[0]:
            counter = _id_last[1] + 1
            if counter > 0xFFF:  # 4,096 ids in one millisecond: borrow the next one
                ms, counter = ms + 1, 0
        else:
            counter = (rand >> 62) & 0x3FF  # a random start, with room to count up
        _id_last[0], _id_last[1] = ms, counter
    value = (
        (ms & ((1 << 48) - 1)) << 80
        | 0x7 << 76
        | counter << 64
        | 0b10 << 62
        | (rand & ((1 << 62) - 1))
    )
    return str(uuid.UUID(int=value))


def _timestamp(value: Union[None, datetime.datetime, timestamp_pb2.Timestamp]) -> Any:
    if value is None or isinstance(value, timestamp_pb2.Timestamp):
        return value
    if isinstance(value, datetime.datetime):
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc))
        return stamp
    raise TypeError(f"time must be a datetime or a Timestamp, not {type(value).__name__}")


class Publisher:
    """A batched, bounded publisher on one `PublishAcked` stream.

    >>> with Publisher("127.0.0.1:50051") as publisher:
    ...     future = publisher.publish("ml.predictions", b'{"score": 0.9}',
    ...                                content_type="application/json")
    ...     future.result()  # the event's id, once the broker confirmed it

    `target` is a gRPC target (`host:port`, `dns:///name:port`, ...). `credentials`
    makes it a TLS channel; `metadata` is sent with every stream (e.g.
    `[("authorization", "Bearer ...")]`). Futures' callbacks run on the publisher's
    thread: keep them short.
    """

    def __init__(
        self,
        target: str,
        *,
        batch: BatchSettings = BatchSettings(),
        flow_control: FlowControl = FlowControl(),
        retry: RetrySettings = RetrySettings(),
        credentials: Optional[grpc.ChannelCredentials] = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._batch = batch
        self._retry = retry
        self._flow = FlowController(flow_control)
        self._metadata = tuple(metadata)
        options = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            *channel_options,
        ]
        if "," in target and not any(k == "grpc.default_authority" for k, _ in options):
            # An address list (`ipv4:10.0.0.1:50051,10.0.0.2:50051`, for round_robin)
            # would otherwise be sent whole as the `:authority`, which is no valid
            # authority: ingest's HTTP/2 server resets such streams (PROTOCOL_ERROR).
            options.append(("grpc.default_authority", "ingest"))
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = ingest_pb2_grpc.IngestStub(self._channel)

        # Everything below is guarded by `_cond`'s lock.
        self._cond = threading.Condition()
        # The batch being filled, if any.
        self._current: Optional[_Batch] = None
        # Sealed batches not yet sent, oldest first; batches to send again go first.
        self._queue: deque[_Batch] = deque()
        # Requests sent on the open stream and not yet acknowledged, by sequence.
        self._inflight: OrderedDict[int, _Batch] = OrderedDict()
        self._next_sequence = 1
        # The open stream's number; a generator or ack of another stream is stale.
        self._stream: Optional[int] = None
        self._streams = 0
        # Nothing is sent before this (a RetryInfo delay or a backoff).
        self._pause_until = 0.0
        self._backoff = retry.initial_backoff
        # Events accepted and not settled (their futures unresolved).
        self._unresolved = 0
        self._closing = False
        self._stopping = False
        self._call: Optional[grpc.Future] = None
        self._counts = {"published": 0, "confirmed": 0, "failed": 0, "dropped": 0, "resent": 0}

        self._thread = threading.Thread(target=self._run, name="ingest-publisher", daemon=True)
        self._thread.start()

    # ----- the caller's side -------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: Union[bytes, bytearray, memoryview],
        *,
        id: Optional[str] = None,
        content_type: str = "",
        attributes: Optional[Mapping[str, str]] = None,
        time: Union[None, datetime.datetime, timestamp_pb2.Timestamp] = None,
    ) -> PublishFuture:
        """Hands one event over; the future resolves to its id once confirmed.

        Blocks (or raises `PublisherFull`, or returns a future failed with
        `EventDropped`) while the flow-control bound is reached. Raises
        `PublisherClosed` after `close()`; `TypeError`/`ValueError` for arguments
        that can never be sent.
        """
        return self._publish(
            topic,
            payload,
            None,
            id=id,
            content_type=content_type,
            attributes=attributes,
            time=time,
        )

    def _publish(
        self,
        topic: str,
        payload: Union[bytes, bytearray, memoryview],
        on_full: Optional[OnFull],
        *,
        id: Optional[str] = None,
        content_type: str = "",
        attributes: Optional[Mapping[str, str]] = None,
        time: Union[None, datetime.datetime, timestamp_pb2.Timestamp] = None,
    ) -> PublishFuture:
        if not isinstance(topic, str):
            raise TypeError(f"topic must be a str, not {type(topic).__name__}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        if self._closing:
            raise PublisherClosed("publish after close()")
        event = ingest_pb2.Event(
            id=id if id else new_id(),
            topic=topic,
            payload=bytes(payload),
            content_type=content_type,
            attributes=dict(attributes or {}),
            time=_timestamp(time),
        )
        size = event.ByteSize()
        future = PublishFuture()
        if not self._flow.acquire(size, on_full):
            with self._cond:
                self._counts["dropped"] += 1
            future.set_exception(
                EventDropped(
                    f"event {event.id!r} dropped: the publisher's bound was reached "
                    "(FlowControl.on_full=DROP)"
                )
            )
            return future
        now = _now()
        with self._cond:
            if self._closing:
                self._flow.release(1, size)
                raise PublisherClosed("publish after close()")
            current = self._current
            if current is not None and (
                len(current.events) >= self._batch.max_events
                or current.nbytes + size + _EVENT_FRAMING > self._batch.max_bytes
            ):
                self._seal()
                current = None
            if current is None:
                current = self._current = _Batch(now + self._batch.max_latency)
                self._cond.notify_all()
            current.add(event, future, size, now + self._retry.deadline)
            self._unresolved += 1
            self._counts["published"] += 1
            if len(current.events) >= self._batch.max_events:
                self._seal()
                self._cond.notify_all()
        return future

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Sends the open batch now and waits until every event handed over so far is
        settled (its future resolved). True if they all were within `timeout`."""
        with self._cond:
            if self._current is not None:
                self._seal()
                self._cond.notify_all()
            return self._cond.wait_for(lambda: self._unresolved == 0, timeout)

    def close(self, timeout: Optional[float] = None) -> None:
        """Stops taking events, waits (up to `timeout`) until every future is resolved,
        then closes the stream and the channel. Events still unsettled when the wait
        runs out fail with `PublisherClosed` (they may or may not have reached the
        broker; their ids tell)."""
        with self._cond:
            if self._stopping:
                return
            self._closing = True
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._stream = None
            left = [b for b in self._inflight.values()] + list(self._queue)
            if self._current is not None:
                left.append(self._current)
            self._inflight.clear()
            self._queue.clear()
            self._current = None
            self._cond.notify_all()
            call = self._call
        if call is not None:
            call.cancel()
        self._thread.join()
        error = PublisherClosed("the publisher was closed before the broker confirmed this event")
        self._resolve([(f, error, s) for b in left for f, s in zip(b.futures, b.sizes)])
        self._channel.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> Stats:
        events, nbytes = self._flow.in_use()
        with self._cond:
            return Stats(
                streams=self._streams,
                outstanding_events=events,
                outstanding_bytes=nbytes,
                **self._counts,
            )

    # ----- the sender thread ---------------------------------------------------

    def _seal(self) -> None:
        """Moves the open batch to the queue (lock held)."""
        if self._current is not None:
            self._queue.append(self._current)
            self._current = None

    def _seal_if_due(self, now: float) -> None:
        if self._current is not None and now >= self._current.due:
            self._seal()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    now = _now()
                    self._seal_if_due(now)
                    if self._queue and now >= self._pause_until:
                        break
                    waits = [self._pause_until - now] if self._queue else []
                    if self._current is not None:
                        waits.append(self._current.due - now)
                    self._cond.wait(max(min(waits), 0.0) if waits else None)
                self._streams += 1
                stream = self._streams
                self._stream = stream
            call = self._stub.PublishAcked(self._requests(stream), metadata=self._metadata)
            with self._cond:
                self._call = call
                if self._stopping:
                    call.cancel()
            error: Optional[BaseException] = None
            try:
                for ack in call:
                    if not self._on_ack(stream, ack):
                        call.cancel()
                        break
            except grpc.RpcError as e:
                error = e
            delay = self._stream_ended(stream, error)
            if delay > 0:
                with self._cond:
                    self._pause_until = max(self._pause_until, _now() + delay)

    def _requests(self, stream: int) -> Iterator[Any]:
        """The open stream's requests; grpcio pulls the next only once the previous
        one is written, so a stream the server does not read holds here."""
        idle_since: Optional[float] = None
        while True:
            with self._cond:
                while True:
                    if self._stream != stream:
                        return
                    now = _now()
                    self._seal_if_due(now)
                    if (
                        self._queue
                        and now >= self._pause_until
                        and len(self._inflight) < MAX_REQUESTS_IN_FLIGHT
                    ):
                        batch = self._queue.popleft()
                        sequence = self._next_sequence
                        self._next_sequence += 1
                        self._inflight[sequence] = batch
                        break
                    waits = []
                    if not self._queue and self._current is None and not self._inflight:
                        if self._closing:
                            return  # half-close: the server ends the stream OK
                        idle_since = idle_since or now
                        if now - idle_since >= IDLE_CLOSE:
                            return
                        waits.append(idle_since + IDLE_CLOSE - now)
                    else:
                        idle_since = None
                    if self._queue and now < self._pause_until:
                        waits.append(self._pause_until - now)
                    if self._current is not None:
                        waits.append(self._current.due - now)
                    self._cond.wait(max(min(waits), 0.0) if waits else None)
            yield ingest_pb2.PublishRequest(events=batch.events, sequence=sequence)

    def _on_ack(self, stream: int, ack: Any) -> bool:
        """Settles the oldest request by its ack. False when the ack does not fit
        (a protocol error: the stream is cancelled, its requests sent again)."""
        settled: _Settled = []
        with self._cond:
            if self._stream != stream:
                return True
            if not self._inflight:
                log.error("ingest_client: an ack (sequence %d) for no request; reopening", ack.sequence)
                return False
            sequence, batch = next(iter(self._inflight.items()))
            code = ack.status.code if ack.HasField("status") else 0
            if ack.sequence != sequence or (code == 0 and len(ack.ids) != len(batch.events)):
                log.error(
                    "ingest_client: ack for sequence %d (%d ids) where %d (%d events) was due; reopening",
                    ack.sequence, len(ack.ids), sequence, len(batch.events),
                )
                return False
            del self._inflight[sequence]
            if code == 0:
                self._backoff = self._retry.initial_backoff
                settled = [(f, i, s) for f, i, s in zip(batch.futures, ack.ids, batch.sizes)]
            else:
                settled = self._failed(batch, PublishError.from_status(ack.status))
            self._cond.notify_all()
        self._resolve(settled)
        return True

    def _failed(self, batch: _Batch, error: PublishError) -> _Settled:
        """A request that failed (lock held): sent again, split, or failed for good."""
        now = _now()
        if error.retryable and now < batch.deadline:
            self._queue.appendleft(batch)
            self._counts["resent"] += len(batch.events)
            self._pause_until = max(self._pause_until, now + self._next_delay(error.retry_delay))
            return []
        if error.code == grpc.StatusCode.INVALID_ARGUMENT:
            # Nothing of the request was published. Fail the events the violations
            # name; the others go again, without them.
            named = {
                int(m.group(1))
                for line in error.violations
                if (m := _EVENT_INDEX.match(line)) and int(m.group(1)) < len(batch.events)
            }
            if named and len(named) < len(batch.events):
                keep = [i for i in range(len(batch.events)) if i not in named]
                self._queue.appendleft(batch.subset(keep))
                return [
                    (batch.futures[i], _for_event(error, batch.events[i].id, i), batch.sizes[i])
                    for i in sorted(named)
                ]
        return [
            (f, error.for_event(e.id), s) for f, e, s in zip(batch.futures, batch.events, batch.sizes)
        ]

    def _next_delay(self, told: Optional[float]) -> float:
        if told is not None:
            return told
        delay = self._backoff * random.uniform(0.5, 1.0)
        self._backoff = min(self._backoff * 2, self._retry.max_backoff)
        return delay

    def _stream_ended(self, stream: int, error: Optional[BaseException]) -> float:
        """Every request still unacknowledged goes again, in order, at the head of the
        queue (or fails, when the stream was refused for good). Returns the delay
        before the next stream."""
        settled: _Settled = []
        with self._cond:
            if self._stream == stream:
                self._stream = None
            self._call = None
            batches = list(self._inflight.values())
            self._inflight.clear()
            self._cond.notify_all()
            if self._stopping:
                return 0.0
            status = PublishError.from_rpc_error(error) if isinstance(error, grpc.RpcError) else None
            if status is not None and status.code not in STREAM_RETRYABLE:
                log.error("ingest_client: stream refused: %s", status)
                for batch in batches:
                    settled += [
                        (f, status.for_event(e.id), s)
                        for f, e, s in zip(batch.futures, batch.events, batch.sizes)
                    ]
                delay = self._next_delay(None)
            else:
                now = _now()
                for batch in reversed(batches):
                    if now < batch.deadline or status is None:
                        self._queue.appendleft(batch)
                        self._counts["resent"] += len(batch.events)
                    else:
                        settled += [
                            (f, status.for_event(e.id), s)
                            for f, e, s in zip(batch.futures, batch.events, batch.sizes)
                        ]
                if status is None or (
                    not batches and status.code == grpc.StatusCode.DEADLINE_EXCEEDED
                ):
                    delay = 0.0  # closed by us, or idle: reopen on demand
                else:
                    log.warning(
                        "ingest_client: stream ended (%s); sending %d unacknowledged requests again",
                        status, len(batches),
                    )
                    delay = self._next_delay(status.retry_delay)
        self._resolve(settled)
        return delay

    def _resolve(self, settled: _Settled) -> None:
        """Resolves futures (outside the lock: callbacks run here), then frees their
        room and wakes `flush`."""
        if not settled:
            return
        ok = failed = 0
        nbytes = 0
        for future, outcome, size in settled:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
                failed += 1
            else:
                future.set_result(outcome)
                ok += 1
            nbytes += size
        self._flow.release(len(settled), nbytes)
        with self._cond:
            self._unresolved -= len(settled)
            self._counts["confirmed"] += ok
            self._counts["failed"] += failed
            self._cond.notify_all()


def _for_event(error: PublishError, event_id: str, index: int) -> PublishError:
    """`error` narrowed to the violations of event `index` of its request."""
    prefix = f"events[{index}]"
    own = [line for line in error.violations if line.startswith(prefix)]
    message = "; ".join(own) if own else error.message
    return PublishError(error.code, message, error.details, event_id)


def _now() -> float:
    return time.monotonic()

