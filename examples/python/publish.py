#!/usr/bin/env python3
"""Publish to ingest from Python: one JSON event with the unary `Publish`, then a
batch of JSON events over one client-streaming `PublishStream`, retrying both the
way the server asks.

    python3 -m pip install -r examples/python/requirements.txt
    INGEST_ADDR=127.0.0.1:50051 python3 examples/python/publish.py

Plain grpcio; the stubs are generated from ../../proto at start (ingest_common.py),
so they always match the proto of this checkout.

Retries
-------
Every event gets an id before the first attempt and keeps it on every retry: it
becomes the AMQP `message_id`, so a consumer can drop the duplicate an ambiguous
failure (e.g. a connection lost before the confirm came back) may cause.

* `RESOURCE_EXHAUSTED` (the server's buffer is full) and `UNAVAILABLE` (broker away,
  server draining) carry a `google.rpc.RetryInfo`: wait that long, then send again.
  `DEADLINE_EXCEEDED` and `ABORTED` are retried too; without a RetryInfo the client
  backs off exponentially with jitter.
* The stream resumes: the trailing metadata `ingest-confirmed-count` = N of a failed
  stream says events 0..N of it are confirmed, so the next stream starts at N.
* Anything else (`INVALID_ARGUMENT`, `FAILED_PRECONDITION` for an unroutable topic,
  ...) is about the events themselves: no retry, the violations are printed.

Output: each confirmed id on its own line on stdout (the unary event first, then the
batch in order); progress and errors on stderr. Exit status 0 only when every event
was confirmed, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid

# Exits with the install hint if a requirement is missing.
from ingest_common import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    CONFIRMED_COUNT,
    RETRYABLE,
    channel_options,
    retry_delay,
    status_details,
    stubs,
    trailer,
    violations,
)

import grpc

PROG = "publish.py"


class NotConfirmed(Exception):
    """Some events were not confirmed; the message says which and why, `done` how
    many leading ones were."""

    def __init__(self, message: str, done: int = 0):
        super().__init__(message)
        self.done = done


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Publish one event with Publish and a batch with PublishStream.",
    )
    p.add_argument(
        "--addr",
        default=os.environ.get("INGEST_ADDR", "127.0.0.1:50051"),
        help="server host:port (default: $INGEST_ADDR or 127.0.0.1:50051)",
    )
    p.add_argument("--topic", default="examples.python", help="topic (AMQP routing key)")
    p.add_argument("--count", type=int, default=10, help="events in the streamed batch")
    p.add_argument("--batch", type=int, default=5, help="events per stream message")
    p.add_argument(
        "--id-prefix",
        default=None,
        help="event ids start with this (default: a fresh random prefix per run)",
    )
    p.add_argument(
        "--only",
        choices=("unary", "stream"),
        default=None,
        help="run only the unary call or only the stream (default: both)",
    )
    p.add_argument("--max-attempts", type=int, default=20, help="attempts per call, at most")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of each attempt, in seconds"
    )
    args = p.parse_args()
    if args.count < 1 or args.batch < 1 or args.max_attempts < 1 or args.timeout <= 0:
        p.error("--count, --batch and --max-attempts must be >= 1, --timeout > 0")
    if args.id_prefix is None:
        args.id_prefix = f"py-{uuid.uuid4().hex[:12]}-"
    return args


def log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def json_event(pb2, event_id: str, topic: str, body: dict):
    """An event with a JSON payload (the server checks it parses) and an event time."""
    event = pb2.Event(
        id=event_id,
        topic=topic,
        payload=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        attributes={"source": PROG},
    )
    event.time.GetCurrentTime()
    return event


class Backoff:
    """The wait before the next attempt: the server's RetryInfo if it sent one, else
    exponential backoff with jitter, reset whenever an attempt made progress."""

    def __init__(self):
        self.next = BACKOFF_FIRST

    def delay(self, details: list, progressed: bool) -> float:
        if progressed:
            self.next = BACKOFF_FIRST
        server = retry_delay(details)
        if server is not None:
            return server
        delay = self.next * random.uniform(0.5, 1.0)
        self.next = min(self.next * 2, BACKOFF_MAX)
        return delay


def explain(error: grpc.RpcError, details: list) -> str:
    lines = [f"{error.code().name}: {error.details()}"]
    lines += [f"  {v}" for v in violations(details)]
    return "\n".join(lines)


def publish_unary(stub, pb2, event, args) -> list[str]:
    """Publishes one event with `Publish`, retrying as the server asks.

    Returns the ids the server confirmed; raises NotConfirmed otherwise.
    """
    backoff = Backoff()
    for attempt in range(1, args.max_attempts + 1):
        try:
            response = stub.Publish(pb2.PublishRequest(events=[event]), timeout=args.timeout)
            return list(response.ids)
        except grpc.RpcError as error:
            details = status_details(error)
            if error.code() not in RETRYABLE:
                raise NotConfirmed(f"Publish of {event.id} refused: {explain(error, details)}")
            if attempt == args.max_attempts:
                raise NotConfirmed(
                    f"Publish of {event.id}: gave up after {attempt} attempts, the last "
                    f"ended with {error.code().name} ({error.details()})"
                )
            delay = backoff.delay(details, progressed=False)
            log(
                f"Publish attempt {attempt} ended with {error.code().name} "
                f"({error.details()}); retrying {event.id} in {delay:.2f}s"
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def publish_stream(stub, pb2, events: list, args) -> int:
    """Publishes `events` in order over `PublishStream`, `args.batch` per message,
    resuming from `ingest-confirmed-count` after a retryable failure.

    Returns how many were confirmed (all of them); raises NotConfirmed otherwise,
    saying how many leading events were confirmed.
    """
    done = 0  # events[:done] are confirmed: the resume point
    backoff = Backoff()

    def messages(start: int):
        # A generator: grpcio pulls the next message only once the previous one is
        # sent, so a server that stops reading (full buffer) stops this loop too.
        for i in range(start, len(events), args.batch):
            yield pb2.PublishRequest(events=events[i : i + args.batch])

    for attempt in range(1, args.max_attempts + 1):
        start = done
        try:
            response = stub.PublishStream(messages(start), timeout=args.timeout)
        except grpc.RpcError as error:
            raw = trailer(error, CONFIRMED_COUNT)
            confirmed = min(int(raw), len(events) - start) if raw else 0
            done = start + confirmed
            details = status_details(error)
            if error.code() not in RETRYABLE:
                # The stream stops at the first bad event: the first unconfirmed one.
                # Field paths count from the start of that stream.
                raise NotConfirmed(
                    f"PublishStream: {done} of {len(events)} confirmed; event "
                    f"{events[done].id} (events[{confirmed}] of the stream starting at "
                    f"{start}) refused: {explain(error, details)}",
                    done,
                )
            if attempt == args.max_attempts:
                raise NotConfirmed(
                    f"PublishStream: gave up after {attempt} attempts, the last ended "
                    f"with {error.code().name} ({error.details()}); {done} of "
                    f"{len(events)} confirmed",
                    done,
                )
            delay = backoff.delay(details, progressed=confirmed > 0)
            log(
                f"PublishStream attempt {attempt} ended with {error.code().name} "
                f"({error.details()}); {confirmed} more confirmed, resuming at "
                f"{events[done].id} in {delay:.2f}s"
            )
            time.sleep(delay)
            continue
        if response.events != len(events) - start:
            raise NotConfirmed(
                f"PublishStream answered OK for {response.events} events, "
                f"sent {len(events) - start}",
                start,
            )
        return len(events)
    raise AssertionError("unreachable")


def main() -> int:
    args = parse_args()
    unary = args.only in (None, "unary")
    stream = args.only in (None, "stream")
    expected = int(unary) + (args.count if stream else 0)
    confirmed = 0
    failure = None
    with stubs() as (pb2, pb2_grpc), grpc.insecure_channel(
        args.addr, options=channel_options()
    ) as channel:
        stub = pb2_grpc.IngestStub(channel)
        try:
            if unary:
                event = json_event(
                    pb2, f"{args.id_prefix}unary", args.topic, {"kind": "unary", "n": 0}
                )
                ids = publish_unary(stub, pb2, event, args)
                if ids != [event.id]:
                    raise NotConfirmed(f"Publish answered ids {ids}, sent [{event.id}]")
                print(event.id, flush=True)
                confirmed += 1
            if stream:
                events = [
                    json_event(
                        pb2,
                        f"{args.id_prefix}stream-{i}",
                        args.topic,
                        {"kind": "stream", "n": i},
                    )
                    for i in range(args.count)
                ]
                done = 0
                try:
                    done = publish_stream(stub, pb2, events, args)
                except NotConfirmed as e:
                    done = e.done
                    raise
                finally:
                    # Confirmed ids are printed even when the rest failed.
                    for event in events[:done]:
                        print(event.id, flush=True)
                    confirmed += done
        except NotConfirmed as e:
            failure = str(e)
    if failure:
        log(failure)
        log(f"{confirmed} of {expected} events confirmed; retry the rest with the same ids")
        return 1
    log(f"{confirmed} of {expected} events confirmed by {args.addr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
