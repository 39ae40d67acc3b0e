#!/usr/bin/env python3
"""Unary Publish calls through a plain generated stub with ingest's shipped gRPC
service config (proto/ingest/v1/service_config.json) and no retry code at all: gRPC's
own retry rides out a short broker outage or a full buffer, honouring the server's
grpc-retry-pushback-ms.

    .venv/bin/python examples/python/retry_publish.py --addr 127.0.0.1:50051 --calls 50

Prints one JSON line: {"ok": N, "failed": N, "codes": {...}, "seconds": S}; exits 1 if
any call failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from ingest_common import channel_options, stubs

import grpc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="ingest's gRPC address")
    p.add_argument("--calls", type=int, default=50, help="unary calls, one event each")
    p.add_argument("--concurrency", type=int, default=8, help="calls in flight at once")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between calls")
    p.add_argument("--topic", default="examples.retry", help="topic (AMQP routing key)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each call")
    p.add_argument("--id-prefix", default="", help="prefix of the event ids")
    args = p.parse_args()

    started = time.monotonic()
    codes: dict[str, int] = {}
    with stubs() as (pb2, pb2_grpc), grpc.insecure_channel(
        args.addr, options=channel_options()
    ) as channel:
        stub = pb2_grpc.IngestStub(channel)

        def call(i: int) -> tuple[str, str]:
            # Call i goes out `i * interval` after the start, whatever came before.
            time.sleep(max(0.0, started + i * args.interval - time.monotonic()))
            event = pb2.Event(
                id=f"{args.id_prefix}{uuid.uuid4()}",
                topic=args.topic,
                payload=b"{}",
                content_type="application/json",
            )
            try:
                stub.Publish(pb2.PublishRequest(events=[event]), timeout=args.timeout)
                return event.id, "OK"
            except grpc.RpcError as e:
                print(
                    f"retry_publish.py: {event.id}: {e.code().name} {e.details()}",
                    file=sys.stderr,
                )
                return event.id, e.code().name

        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            for event_id, code in pool.map(call, range(args.calls)):
                codes[code] = codes.get(code, 0) + 1
                if code == "OK":
                    print(event_id, flush=True)
    ok = codes.pop("OK", 0)
    summary = {
        "ok": ok,
        "failed": sum(codes.values()),
        "codes": codes,
        "seconds": round(time.monotonic() - started, 3),
    }
    print(json.dumps(summary), file=sys.stderr, flush=True)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
