"""The publisher against the real service and broker: what callers are told, and what
lands on the queue."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from ingest_client import (
    AsyncPublisher,
    BatchSettings,
    PublishError,
    Publisher,
    PublisherClosed,
)
from support import Ingest, TestQueue, free_port

GUARD = 60.0


def test_every_event_is_confirmed_with_its_id_and_lands_once_in_order(ingest, queue):
    n = 5000
    with Publisher(ingest.addr) as publisher:
        ids = [f"ordered-{i}" for i in range(n)]
        futures = [
            publisher.publish("orders.created", f"{i}".encode(), id=ids[i], attributes={"n": str(i)})
            for i in range(n)
        ]
        assert [f.result(GUARD) for f in futures] == ids
        stats = publisher.stats()
    assert stats.confirmed == n and stats.failed == 0 and stats.outstanding_events == 0
    # One stream carried them all, in batches.
    assert stats.streams == 1, stats
    landed = queue.take_all(n)
    assert [m[0] for m in landed] == ids, "the queue holds exactly the events, in publish order"
    assert landed[7][1] == b"7" and landed[7][2]["n"] == "7"


def test_generated_ids_are_distinct_and_time_ordered(ingest, queue):
    with Publisher(ingest.addr) as publisher:
        ids = [publisher.publish("t.x", b"x").result(GUARD) for _ in range(50)]
    assert len(set(ids)) == 50
    assert ids == sorted(ids), "UUIDv7 ids sort in publish order"
    assert sorted(m[0] for m in queue.take_all(50)) == sorted(ids)


def test_an_invalid_event_fails_alone_and_the_rest_of_its_batch_is_confirmed(ingest, queue):
    # One batch of ten (max_latency far above the time to publish them).
    batch = BatchSettings(max_events=10, max_latency=1.0)
    with Publisher(ingest.addr, batch=batch) as publisher:
        futures = [
            publisher.publish(
                "orders.created",
                b"{not json" if i == 4 else b'{"ok": true}',
                id=f"b-{i}",
                content_type="application/json",
            )
            for i in range(10)
        ]
        publisher.flush(GUARD)
    with pytest.raises(PublishError) as bad:
        futures[4].result(0)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.event_id == "b-4"
    assert any(v.startswith("events[4].payload") for v in bad.value.violations), bad.value.violations
    ok = [f"b-{i}" for i in range(10) if i != 4]
    assert [f.result(0) for i, f in enumerate(futures) if i != 4] == ok
    assert [m[0] for m in queue.take_all(9)] == ok, "the innocent nine landed, the bad one did not"


def test_an_unroutable_event_fails_with_failed_precondition_and_later_events_go_on(exchange):
    # Only `bound.#` reaches a queue; `nobody.home` is unroutable.
    bound = TestQueue(exchange, "bound.#")
    ingest = Ingest(exchange).ready()
    try:
        with Publisher(ingest.addr, batch=BatchSettings(max_events=1)) as publisher:
            before = publisher.publish("bound.a", b"1", id="u-0")
            lost = publisher.publish("nobody.home", b"2", id="u-1")
            after = [publisher.publish("bound.b", b"3", id=f"u-{i}") for i in range(2, 12)]
            assert before.result(GUARD) == "u-0"
            with pytest.raises(PublishError) as unroutable:
                lost.result(GUARD)
            assert unroutable.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "nobody.home" in str(unroutable.value)
            assert [f.result(GUARD) for f in after] == [f"u-{i}" for i in range(2, 12)]
            assert publisher.stats().streams == 1, "the failure did not end the stream"
        assert [m[0] for m in bound.take_all(11)] == ["u-0"] + [f"u-{i}" for i in range(2, 12)]
    finally:
        ingest.stop()
        bound.close()


def test_close_waits_for_every_future_and_refuses_new_events(ingest, queue):
    publisher = Publisher(ingest.addr, batch=BatchSettings(max_latency=0.5))
    futures = [publisher.publish("t.close", b"x", id=f"c-{i}") for i in range(300)]
    publisher.close(GUARD)
    assert all(f.done() for f in futures)
    assert [f.result(0) for f in futures] == [f"c-{i}" for i in range(300)]
    with pytest.raises(PublisherClosed):
        publisher.publish("t.close", b"late")
    assert len(queue.take_all(300)) == 300


def test_events_published_before_the_server_is_up_are_confirmed_once_it_is(queue):
    port = free_port()
    publisher = Publisher(f"127.0.0.1:{port}")
    server = None
    try:
        futures = [publisher.publish("t.late", b"x", id=f"l-{i}") for i in range(100)]
        time.sleep(1.0)  # refused, backing off
        assert not any(f.done() for f in futures), "nothing can be confirmed yet"
        assert publisher.stats().streams >= 2, "it kept trying"
        server = Ingest(queue.exchange, port=port).ready()
        assert [f.result(GUARD) for f in futures] == [f"l-{i}" for i in range(100)]
    finally:
        publisher.close(GUARD)
        if server:
            server.stop()
    assert sorted(m[0] for m in queue.take_all(100)) == sorted(f"l-{i}" for i in range(100))


def test_asyncio_flavour_confirms_without_blocking_the_loop(ingest, queue):
    async def main() -> list[str]:
        async with AsyncPublisher(ingest.addr) as publisher:
            handed = [await publisher.publish("t.aio", b"x", id=f"a-{i}") for i in range(500)]
            ids = await asyncio.gather(*handed)
            return ids

    ids = asyncio.run(asyncio.wait_for(main(), GUARD))
    assert ids == [f"a-{i}" for i in range(500)]
    assert len(queue.take_all(500)) == 500
