"""The publisher's bound on its own (no network): room is taken before an event is
held, given back once, and waiters are served in arrival order."""

from __future__ import annotations

import threading
import time

import pytest

from ingest_client import FlowControl, FlowControlTimeout, OnFull, PublisherFull
from ingest_client.flow_control import FlowController


def test_error_mode_raises_at_the_bound_naming_it():
    flow = FlowController(FlowControl(max_events=2, max_bytes=100, on_full=OnFull.ERROR))
    assert flow.acquire(10) and flow.acquire(10)
    with pytest.raises(PublisherFull, match="max_events=2"):
        flow.acquire(10)
    flow.release(1, 10)
    assert flow.acquire(10)
    assert flow.in_use() == (2, 20)


def test_byte_bound_and_drop_mode():
    flow = FlowController(FlowControl(max_events=100, max_bytes=100, on_full=OnFull.DROP))
    assert flow.acquire(60)
    assert flow.acquire(60) is False, "over the byte bound: dropped"
    assert flow.in_use() == (1, 60)


def test_an_event_larger_than_the_bound_is_refused_outright():
    flow = FlowController(FlowControl(max_bytes=100))
    with pytest.raises(ValueError, match="max_bytes"):
        flow.acquire(101)


def test_block_mode_times_out_and_leaves_nothing_taken():
    flow = FlowController(FlowControl(max_events=1, block_timeout=0.2))
    flow.acquire(1)
    began = time.monotonic()
    with pytest.raises(FlowControlTimeout):
        flow.acquire(1)
    assert time.monotonic() - began >= 0.2
    assert flow.in_use() == (1, 1)


def test_blocked_callers_are_served_in_arrival_order():
    flow = FlowController(FlowControl(max_events=1, max_bytes=1000, block_timeout=10))
    flow.acquire(1)
    order: list[int] = []

    def waiter(k: int, size: int) -> None:
        flow.acquire(size)
        order.append(k)

    threads = []
    # A large event first, then small ones that would fit sooner if allowed to pass.
    for k, size in enumerate([900, 1, 1]):
        t = threading.Thread(target=waiter, args=(k, size))
        t.start()
        threads.append(t)
        time.sleep(0.05)  # arrival order
    for k in range(3):
        flow.release(1, 1 if k == 0 else [900, 1, 1][k - 1])
        deadline = time.monotonic() + 5
        while len(order) < k + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2]
    assert flow.in_use() == (1, 1)


def test_ids_made_in_a_burst_are_distinct_and_sorted():
    from ingest_client import new_id

    ids = [new_id() for _ in range(10_000)]  # many share a millisecond
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(i[14] == "7" for i in ids), "version 7"
