"""The publisher when things go wrong: a stalled broker (the client's own memory stays
flat, `publish` pushes back as configured, every future resolves OK afterwards) and a
connection cut mid-stream (exactly the unacknowledged requests are sent again)."""

from __future__ import annotations

import collections
import threading
import time

import pytest

from ingest_client import (
    BatchSettings,
    EventDropped,
    FlowControl,
    OnFull,
    Publisher,
    PublisherFull,
)
from support import AMQP_PORT, Ingest, Proxy, TestQueue, rss_bytes, wait_until

GUARD = 120.0
STALL = 10.0
PAYLOAD = b"p" * 100_000  # 100 KB: a leak shows in RSS at once
BOUND = 8 * 1024 * 1024  # the publisher's byte bound in these tests


@pytest.fixture
def stalled_broker(exchange):
    """ingest publishing through a proxy to RabbitMQ, and a queue for its events."""
    queue = TestQueue(exchange)
    proxy = Proxy(AMQP_PORT)
    server = Ingest(exchange, amqp_port=proxy.port).ready()
    yield server, proxy, queue
    proxy.resume()
    server.stop()
    proxy.close()
    queue.close()


class RssSampler:
    """Peak resident memory of this process while it runs."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def finish(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def test_stalled_broker_blocks_publish_with_flat_client_memory_then_every_future_is_ok(stalled_broker):
    server, proxy, queue = stalled_broker
    flow = FlowControl(max_bytes=BOUND, on_full=OnFull.BLOCK, block_timeout=None)
    publisher = Publisher(server.addr, flow_control=flow, batch=BatchSettings(max_events=20))
    futures = []
    # Warm up: threads, channel, buffers; then measure from here.
    futures += [publisher.publish("ml.predictions", PAYLOAD, id=f"s-{i}") for i in range(100)]
    assert publisher.flush(GUARD)
    baseline = rss_bytes()

    handed_at: list[float] = []  # when each publish() returned
    stop = threading.Event()

    def application() -> None:
        # Publishes as fast as it can until told to stop.
        i = len(futures)
        while not stop.is_set():
            futures.append(publisher.publish("ml.predictions", PAYLOAD, id=f"s-{i}"))
            handed_at.append(time.monotonic())
            i += 1

    sampler = RssSampler()
    proxy.stall()
    stalled_at = time.monotonic()
    app = threading.Thread(target=application)
    app.start()
    time.sleep(STALL)
    during = sum(1 for t in handed_at if t < stalled_at + STALL)
    peak_during = sampler.peak
    proxy.resume()
    time.sleep(1.0)
    stop.set()
    app.join(GUARD)
    assert not app.is_alive(), "publish still blocked after the stall"
    assert publisher.flush(GUARD), "not every future resolved after the stall"
    peak = sampler.finish()
    ids = [f.result(0) for f in futures]  # every future OK (raises otherwise)
    stats = publisher.stats()
    publisher.close(GUARD)

    growth = peak - baseline
    print(
        f"\nstall {STALL}s: {during} events handed over during the stall "
        f"(bound {BOUND // len(PAYLOAD)}), {len(futures)} in all; client RSS baseline "
        f"{baseline / 2**20:.1f} MiB, peak during the stall {peak_during / 2**20:.1f} MiB, "
        f"peak {peak / 2**20:.1f} MiB (+{growth / 2**20:.1f} MiB); resent {stats.resent}"
    )
    # The client's memory stayed flat: the bound, copies of it in flight in grpcio,
    # and interpreter noise; an unbounded client grows by GBs in 10 s here.
    assert growth < 3 * BOUND + 24 * 2**20, f"client RSS grew {growth / 2**20:.1f} MiB"
    # publish() blocked: during the stall no more than the bound was handed over
    # (plus what the last confirms before the stall freed).
    assert during <= BOUND // len(PAYLOAD) + 20, f"{during} events handed over while stalled"
    assert stats.outstanding_events == 0 and stats.outstanding_bytes == 0
    landed = {m[0] for m in queue.take_all(len(set(ids)))}
    missing = set(ids) - landed
    assert not missing, f"{len(missing)} confirmed events not in the queue"


def test_stalled_broker_raises_or_drops_when_asked_to(stalled_broker):
    server, proxy, queue = stalled_broker
    small = dict(max_events=20, max_bytes=BOUND)
    raising = Publisher(server.addr, flow_control=FlowControl(on_full=OnFull.ERROR, **small))
    dropping = Publisher(server.addr, flow_control=FlowControl(on_full=OnFull.DROP, **small))
    proxy.stall()
    kept = {raising: [], dropping: []}
    dropped = []
    try:
        refused = None
        for i in range(200):
            try:
                kept[raising].append(raising.publish("t.r", b"x", id=f"r-{i}"))
            except PublisherFull as e:
                refused = (i, e)
                break
        assert refused is not None, "ERROR mode never raised PublisherFull with the broker stalled"
        assert refused[0] == 20, f"raised after {refused[0]} events; the bound is 20"
        assert "max_events=20" in str(refused[1])
        for i in range(40):
            f = dropping.publish("t.d", b"x", id=f"d-{i}")
            (dropped if f.done() else kept[dropping]).append(f)
        assert len(kept[dropping]) == 20 and len(dropped) == 20
        assert all(isinstance(f.exception(0), EventDropped) for f in dropped)
        assert dropping.stats().dropped == 20
    finally:
        proxy.resume()
    for publisher, futures in kept.items():
        assert publisher.flush(GUARD)
        assert all(f.result(0) for f in futures)
        publisher.close(GUARD)
    landed = collections.Counter(m[0] for m in queue.take_all(40))
    assert set(landed) == {f"r-{i}" for i in range(20)} | {f"d-{i}" for i in range(20)}


def test_connection_cut_mid_stream_resends_exactly_the_unacknowledged_requests(ingest, queue):
    proxy = Proxy(ingest.port)
    n = 20_000
    publisher = Publisher(f"127.0.0.1:{proxy.port}", batch=BatchSettings(max_events=50))
    try:
        ids = [f"cut-{i}" for i in range(n)]
        futures = []
        app = threading.Thread(
            target=lambda: futures.extend(publisher.publish("t.cut", b"x" * 200, id=i) for i in ids)
        )
        app.start()
        # Cut once the stream is well under way, with requests in flight.
        wait_until("3000 events confirmed", lambda: publisher.stats().confirmed >= 3000, GUARD, 0.001)
        unacked_before = publisher.stats().outstanding_events
        proxy.cut()
        cut_at = publisher.stats().published
        assert unacked_before > 0, "nothing was in flight at the cut"
        app.join(GUARD)
        assert publisher.flush(GUARD)
        assert [f.result(0) for f in futures] == ids
        stats = publisher.stats()
    finally:
        publisher.close(GUARD)
        proxy.close()
    landed = collections.Counter(m[0] for m in queue.take_all(n))
    duplicates = sum(c - 1 for c in landed.values())
    print(
        f"\ncut after {cut_at} events handed over: {unacked_before} unacknowledged, "
        f"{stats.resent} resent, {duplicates} duplicates in the queue, {stats.streams} streams"
    )
    assert set(landed) == set(ids), "every event is in the queue"
    assert stats.streams >= 2, "a new stream carried the rest"
    assert 0 < stats.resent <= unacked_before, "only unacknowledged events were sent again"
    assert duplicates <= stats.resent, "only events sent again can be duplicated"
