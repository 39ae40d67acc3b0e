"""scripts/queue: bind a queue to ingest's exchange and read it back over AMQP.

Run through scripts/queue, which provides .venv with pika. See scripts/queue for the
commands. Exit status 0 on success, 1 on a broker error, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import pika
import pika.exceptions

PROG = "scripts/queue"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


def redact(url: str) -> str:
    """amqp://user:secret@host/ -> amqp://user:***@host/"""
    return re.sub(r"^(\w+://[^:/@]*):[^@/]*@", r"\1:***@", url)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Bind a queue to ingest's exchange and read it back, over AMQP "
        "(no management plugin needed). Broker: $INGEST_AMQP_URL (default "
        f"{DEFAULT_URL}); exchange: $INGEST_EXCHANGE (default events).",
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bind = commands.add_parser(
        "bind", help="declare a durable queue and bind it to the exchange"
    )
    bind.add_argument("queue")
    bind.add_argument("pattern", help="binding key, e.g. 'orders.#' or '#' for everything")
    get = commands.add_parser("get", help="print messages and remove them from the queue")
    get.add_argument("queue")
    get.add_argument("count", nargs="?", type=int, default=10, help="at most (default 10)")
    delete = commands.add_parser("delete", help="delete the queue")
    delete.add_argument("queue")
    return p.parse_args()


def show(method, properties, body: bytes) -> None:
    fields = {
        "routing_key": method.routing_key,
        "message_id": properties.message_id,
        "content_type": properties.content_type,
        "delivery_mode": properties.delivery_mode,
        "timestamp": properties.timestamp,
    }
    line = "  ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    headers = {
        k: v.decode(errors="replace") if isinstance(v, bytes) else v
        for k, v in (properties.headers or {}).items()
    }
    if headers:
        line += "  headers=" + json.dumps(headers, sort_keys=True)
    print(line)
    try:
        print("  " + body.decode())
    except UnicodeDecodeError:
        print(f"  ({len(body)} bytes, not UTF-8) {body[:64]!r}")


def main() -> int:
    args = parse_args()
    url = os.environ.get("INGEST_AMQP_URL") or DEFAULT_URL
    exchange = os.environ.get("INGEST_EXCHANGE") or "events"
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError as e:
        print(f"{PROG}: cannot connect to RabbitMQ at {redact(url)}: {e!r}", file=sys.stderr)
        return 1
    try:
        channel = connection.channel()
        if args.command == "bind":
            # As ingest declares it, so either may come first.
            channel.exchange_declare(exchange, exchange_type="topic", durable=True)
            channel.queue_declare(args.queue, durable=True)
            channel.queue_bind(args.queue, exchange, routing_key=args.pattern)
            print(f"queue {args.queue} bound to exchange {exchange} with {args.pattern!r}")
        elif args.command == "get":
            taken = 0
            while taken < args.count:
                method, properties, body = channel.basic_get(args.queue, auto_ack=False)
                if method is None:
                    break
                show(method, properties, body)
                channel.basic_ack(method.delivery_tag)
                taken += 1
            left = channel.queue_declare(args.queue, passive=True).method.message_count
            print(f"{taken} message(s) taken from {args.queue}, {left} left")
        elif args.command == "delete":
            channel.queue_delete(args.queue)
            print(f"queue {args.queue} deleted")
    except pika.exceptions.ChannelClosedByBroker as e:
        hint = ""
        if e.reply_code == 404:
            hint = f" (first: {PROG} bind {args.queue} PATTERN)"
        print(f"{PROG}: RabbitMQ refused: {e.reply_text}{hint}", file=sys.stderr)
        return 1
    except pika.exceptions.AMQPError as e:
        print(f"{PROG}: {e!r}", file=sys.stderr)
        return 1
    finally:
        if connection.is_open:
            connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
