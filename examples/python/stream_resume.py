#!/usr/bin/env python3
"""Publish events to ingest over ONE client-streaming `PublishStream` call, resuming
after failures without losing or reordering events.

This is the reference Python client for `ingest.v1.Ingest/PublishStream`. It uses
plain grpcio; the stubs are generated from ../../proto at start (into a temporary
directory), so they always match the proto this checkout serves.

    python3 -m pip install -r examples/python/requirements.txt
    python3 examples/python/stream_resume.py --addr 127.0.0.1:50051 --count 20000

The resume recipe
-----------------
PublishStream handles the events of a stream strictly in order. However a stream
ends, the server reports how many *leading* events of that stream the broker
confirmed:

* OK: the response's `events` field (all of them);
* any error: the trailing metadata `ingest-confirmed-count` (absent, e.g. the
  connection never came up, means no more events were confirmed).

So a client keeps one number, the index of the first unconfirmed event, and after a
retryable error:

1. advances that index by `ingest-confirmed-count`;
2. waits for the `google.rpc.RetryInfo` delay the status carries (in
   `grpc-status-details-bin`), or a small backoff if there is none;
3. opens a NEW stream that starts at that index and re-sends the events with the
   SAME ids. Events past the confirmed prefix may still have reached the broker
   (e.g. when the connection broke before the confirm came back), so the ids are
   what lets consumers drop such duplicates: they become the AMQP `message_id`.

Retryable: UNAVAILABLE (broker away, server draining), RESOURCE_EXHAUSTED (buffer
full), DEADLINE_EXCEEDED (the server closed a stream that sent nothing for
`stream-idle-timeout`), ABORTED. Anything else (INVALID_ARGUMENT,
FAILED_PRECONDITION, ...) is a problem with an event itself: re-sending it cannot
help, so the client stops and names the event.

Output: progress and errors on stderr; one JSON summary line on stdout:
    {"sent": ..., "confirmed": ..., "attempts": ..., "resumed_from": [...], "seconds": ...}
`sent` counts events handed to grpcio (re-sends included), `confirmed` the events
confirmed in all, `resumed_from` the index each later stream started at; a failed
run adds "error". Exit status 0 only when every event was confirmed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
import time

# Stub generation and status-detail parsing, shared with publish.py. It exits with
# the install hint if a requirement is missing.
from ingest_common import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    CONFIRMED_COUNT,
    RETRYABLE,
    retry_delay,
    status_details,
    stubs,
    trailer,
)

import grpc
from google.rpc import error_details_pb2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Publish events over one PublishStream, resuming after failures."
    )
    p.add_argument(
        "--addr",
        default=os.environ.get("INGEST_ADDR", "127.0.0.1:50051"),
        help="server host:port (default: $INGEST_ADDR or 127.0.0.1:50051)",
    )
    p.add_argument("--count", type=int, default=20000, help="events to publish")
    p.add_argument("--batch", type=int, default=1, help="events per stream message")
    p.add_argument("--topic", default="example", help="topic (AMQP routing key)")
    p.add_argument(
        "--id-prefix",
        default="example-",
        help="event ids are this prefix + the event's index, so a resume re-sends the same ids",
    )
    p.add_argument(
        "--max-attempts", type=int, default=20, help="streams to open at most, in all"
    )
    # Test hook: stall the first stream so the server's idle timeout closes it.
    p.add_argument(
        "--pause-after",
        type=int,
        default=None,
        metavar="K",
        help="(testing) on the first attempt, pause after handing over K events",
    )
    p.add_argument(
        "--pause-secs",
        type=float,
        default=0.0,
        metavar="S",
        help="(testing) how long that pause lasts",
    )
    args = p.parse_args()
    if args.count < 0 or args.batch < 1 or args.max_attempts < 1:
        p.error("--count must be >= 0, --batch and --max-attempts >= 1")
    return args


class Attempt:
    """One stream: the events from `start` on, handed to grpcio one message at a time.

    `requests()` is a generator, so grpcio pulls a message only once it has sent the
    previous one: when the server stops reading (its buffer is full), HTTP/2 flow
    control stops this generator instead of piling messages up in memory.
    """

    def __init__(self, pb2, args: argparse.Namespace, start: int, pause_after: int | None):
        self.pb2 = pb2
        self.args = args
        self.start = start
        self.pause_after = pause_after
        self.sent = 0  # events handed to grpcio on this stream
        self.ended = threading.Event()  # set once the call has finished

    def event(self, index: int):
        """Event `index`: the same id and payload on every attempt."""
        return self.pb2.Event(
            id=f"{self.args.id_prefix}{index}",
            topic=self.args.topic,
            payload=json.dumps({"seq": index, "source": "stream_resume.py"}).encode(),
            content_type="application/json",
        )

    def requests(self):
        i, count, batch = self.start, self.args.count, self.args.batch
        while i < count:
            if self.pause_after is not None and self.sent >= self.pause_after:
                # Test hook: go quiet so the server's stream-idle-timeout closes the
                # stream. Stop early once the call is over; nothing would be sent.
                self.pause_after = None
                if self.ended.wait(self.args.pause_secs):
                    return
            end = min(i + batch, count)
            self.sent += end - i
            yield self.pb2.PublishRequest(events=[self.event(j) for j in range(i, end)])
            i = end


def describe_rejection(args, start: int, confirmed: int, error, details: list) -> str:
    """Names the event a non-retryable status is about.

    The stream stops at the first bad event, so it is the first unconfirmed one.
    Field paths in the details (`events[i]...`) count from the first event of THAT
    stream, so they are translated to the global index here.
    """
    index = start + confirmed
    head = f"event #{index} (id {args.id_prefix}{index}) was not accepted: {error.code().name}"
    lines = []

    def globalize(field: str) -> str:
        return re.sub(
            r"events\[(\d+)\]",
            lambda m: f"events[{start + int(m.group(1))}]",
            field,
        )

    for d in details:
        if isinstance(d, error_details_pb2.BadRequest):
            lines += [
                f"  {globalize(v.field)}: {v.description}" for v in d.field_violations
            ]
        elif isinstance(d, error_details_pb2.PreconditionFailure):
            lines += [
                f"  {v.type} {globalize(v.subject)}: {v.description}"
                for v in d.violations
            ]
    # The violations say it all; without any, the status message does.
    if not lines:
        return f"{head}: {error.details()}"
    return "\n".join([head] + lines)


def main() -> int:
    args = parse_args()
    with stubs() as (ingest_pb2, ingest_pb2_grpc):
        return publish(args, ingest_pb2, ingest_pb2_grpc)


def publish(args, pb2, pb2_grpc) -> int:
    summary = {"sent": 0, "confirmed": 0, "attempts": 0, "resumed_from": []}
    next_event = 0  # index of the first event not yet confirmed: THE resume point
    backoff = BACKOFF_FIRST
    began = time.monotonic()
    failure = None

    def finish(code: int) -> int:
        summary["confirmed"] = next_event
        summary["seconds"] = round(time.monotonic() - began, 3)
        if failure:
            summary["error"] = failure
        print(json.dumps(summary), flush=True)
        return code

    with grpc.insecure_channel(args.addr) as channel:
        stub = pb2_grpc.IngestStub(channel)
        while True:
            if summary["attempts"] > 0:
                summary["resumed_from"].append(next_event)
            first = summary["attempts"] == 0
            summary["attempts"] += 1
            attempt = Attempt(pb2, args, next_event, args.pause_after if first else None)
            try:
                response = stub.PublishStream(attempt.requests())
            except grpc.RpcError as error:
                attempt.ended.set()
                summary["sent"] += attempt.sent
                # 1. How far this stream got: its confirmed prefix is done for good.
                raw = trailer(error, CONFIRMED_COUNT)
                confirmed = min(int(raw), args.count - attempt.start) if raw else 0
                next_event = attempt.start + confirmed
                details = status_details(error)
                if error.code() not in RETRYABLE:
                    failure = describe_rejection(args, attempt.start, confirmed, error, details)
                    print(f"stream_resume.py: {failure}", file=sys.stderr)
                    return finish(1)
                if summary["attempts"] >= args.max_attempts:
                    failure = (
                        f"gave up after {summary['attempts']} attempts, the last ended with "
                        f"{error.code().name}: {next_event} of {args.count} events confirmed"
                    )
                    print(f"stream_resume.py: {failure}", file=sys.stderr)
                    return finish(1)
                # 2. Wait as the server asks, or back off (reset once a stream made
                #    progress, grown while none does).
                delay = retry_delay(details)
                if confirmed > 0:
                    backoff = BACKOFF_FIRST
                if delay is None:
                    delay = backoff * random.uniform(0.5, 1.0)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                print(
                    f"stream_resume.py: stream {summary['attempts']} ended with "
                    f"{error.code().name} ({error.details()}); {confirmed} more confirmed, "
                    f"resuming at event #{next_event} in {delay:.2f}s",
                    file=sys.stderr,
                )
                time.sleep(delay)
                # 3. Loop: a new stream from `next_event`, same ids.
                continue
            attempt.ended.set()
            summary["sent"] += attempt.sent
            expected = args.count - attempt.start
            if response.events != expected:
                next_event = attempt.start + min(response.events, expected)
                failure = f"stream answered OK for {response.events} events, sent {expected}"
                print(f"stream_resume.py: {failure}", file=sys.stderr)
                return finish(1)
            next_event = args.count
            return finish(0)


if __name__ == "__main__":
    sys.exit(main())
