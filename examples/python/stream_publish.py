#!/usr/bin/env python3
"""An ML service logging every prediction for hours, on the `ingest_client` publisher.

The model "predicts" at --rate per second; each prediction is logged as one JSON event
with `publisher.publish(...)`. The publisher batches events onto one long-lived
`PublishAcked` stream, and each future resolves once RabbitMQ confirmed that event.
What this process holds is bounded (--max-events, --max-mib): if RabbitMQ stalls,
`publish` blocks and the prediction loop slows down with it, instead of the process
growing by every prediction it cannot hand over (the ~87 MB per batch of unanswered
tasks that a fire-and-forget logger grows by). After a disconnect, the requests not yet
acknowledged are sent again with the same ids (the AMQP message_id), so a consumer can
drop the few duplicates.

    python3 -m pip install -r examples/python/requirements.txt   # from the repo root
    python3 examples/python/stream_publish.py --addr 127.0.0.1:50051 --rate 1000

It runs until --duration passes, --count predictions are logged, or SIGINT/SIGTERM;
then it flushes (waits for every confirm, up to --close-timeout) and prints one JSON
summary line on stdout:
    {"logged": ..., "confirmed": ..., "failed": ..., "resent": ..., "streams": ..., "seconds": ...}
Progress goes to stderr every --report seconds. Exit status 0 only when every logged
prediction was confirmed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time

try:
    from ingest_client import BatchSettings, FlowControl, Publisher, PublishError
except ImportError as missing:  # pragma: no cover - depends on the machine
    sys.exit(
        f"stream_publish.py: {missing}; install it from the repository root: "
        "python3 -m pip install -r examples/python/requirements.txt"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Log ML predictions to ingest for hours.")
    p.add_argument("--addr", default=os.environ.get("INGEST_ADDR", "127.0.0.1:50051"))
    p.add_argument("--topic", default="ml.predictions")
    p.add_argument("--model", default="churn-v7")
    p.add_argument("--rate", type=float, default=1000.0, help="predictions per second (0: as fast as possible)")
    p.add_argument("--duration", type=float, default=None, help="seconds to run (default: until stopped)")
    p.add_argument("--count", type=int, default=None, help="predictions to log (default: until stopped)")
    p.add_argument("--max-events", type=int, default=10_000, help="events held unconfirmed at most")
    p.add_argument("--max-mib", type=float, default=32.0, help="MiB held unconfirmed at most")
    p.add_argument("--report", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--close-timeout", type=float, default=60.0)
    return p.parse_args()


def predict(model: str, n: int) -> bytes:
    """Stands in for the model: one prediction, as the JSON line a service would log."""
    return json.dumps(
        {
            "model": model,
            "request": n,
            "features": [round(random.random(), 4) for _ in range(8)],
            "score": round(random.random(), 4),
            "ts": time.time(),
        }
    ).encode()


def main() -> int:
    args = parse_args()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    failures: list[str] = []

    def on_done(future) -> None:  # runs on the publisher's thread: keep it short
        error = future.exception()
        if isinstance(error, PublishError):
            failures.append(str(error))

    publisher = Publisher(
        args.addr,
        batch=BatchSettings(max_events=100, max_latency=0.01),
        flow_control=FlowControl(
            max_events=args.max_events, max_bytes=int(args.max_mib * 2**20), block_timeout=None
        ),
    )
    began = time.monotonic()
    next_report = began + args.report
    logged = 0
    while not stop.is_set():
        now = time.monotonic()
        if args.duration is not None and now - began >= args.duration:
            break
        if args.count is not None and logged >= args.count:
            break
        future = publisher.publish(
            args.topic,
            predict(args.model, logged),
            content_type="application/json",
            attributes={"model": args.model},
        )
        future.add_done_callback(on_done)
        logged += 1
        if args.rate > 0:
            # Pace to --rate; publish() itself blocks while the bound is reached.
            delay = began + logged / args.rate - time.monotonic()
            if delay > 0:
                stop.wait(delay)
        if now >= next_report:
            s = publisher.stats()
            print(
                f"stream_publish.py: {logged} logged, {s.confirmed} confirmed, {s.failed} failed, "
                f"{s.outstanding_events} held ({s.outstanding_bytes / 2**20:.1f} MiB), "
                f"{s.resent} resent, {s.streams} streams",
                file=sys.stderr,
            )
            next_report = now + args.report
    publisher.close(args.close_timeout)
    s = publisher.stats()
    for line in failures[:10]:
        print(f"stream_publish.py: {line}", file=sys.stderr)
    print(
        json.dumps(
            {
                "logged": logged,
                "confirmed": s.confirmed,
                "failed": s.failed,
                "resent": s.resent,
                "streams": s.streams,
                "seconds": round(time.monotonic() - began, 3),
            }
        ),
        flush=True,
    )
    return 0 if s.confirmed == logged else 1


if __name__ == "__main__":
    sys.exit(main())
