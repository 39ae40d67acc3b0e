"""What the suite runs against: the real `ingest` binary as a child process, the
shared RabbitMQ (read with pika), and a TCP proxy that can stall or cut a connection.

Nothing is skipped: a missing binary, broker or package fails with what to do.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

import pika

REPO = Path(__file__).resolve().parents[3]
AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ingest_binary() -> Path:
    """$INGEST_BIN, else the debug build `cargo test` / `cargo build` leaves."""
    path = Path(os.environ.get("INGEST_BIN", REPO / "target" / "debug" / "ingest"))
    if not path.is_file():
        raise AssertionError(
            f"no ingest binary at {path}: build it with `cargo build --locked --bin ingest` "
            "(scripts/test does), or point INGEST_BIN at one"
        )
    return path


def wait_until(what: str, check, timeout: float, every: float = 0.05):
    """Polls `check` until it returns a true value; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(every)


class Ingest:
    """`ingest` on free ports, publishing to `exchange` through `amqp_port`."""

    def __init__(
        self,
        exchange: str,
        amqp_port: int = AMQP_PORT,
        port: Optional[int] = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self.admin_port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        env = dict(
            os.environ,
            INGEST_LISTEN=self.addr,
            INGEST_ADMIN_LISTEN=f"127.0.0.1:{self.admin_port}",
            INGEST_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{amqp_port}/%2f",
            INGEST_EXCHANGE=exchange,
            RUST_LOG=os.environ.get("RUST_LOG", "info"),
        )
        self.process = subprocess.Popen(
            [str(ingest_binary()), *extra], env=env, stdout=subprocess.DEVNULL
        )

    def ready(self, timeout: float = 30.0) -> "Ingest":
        """Waits for /readyz (listening and connected to RabbitMQ)."""

        def ok() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"ingest exited with {self.process.returncode}")
            try:
                url = f"http://127.0.0.1:{self.admin_port}/readyz"
                with urllib.request.urlopen(url, timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until("ingest ready (/readyz 200)", ok, timeout)
        return self

    def rss_bytes(self) -> int:
        return rss_bytes(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def rss_bytes(pid: Optional[int] = None) -> int:
    """Resident memory of a process (this one by default), from /proc."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/*/status")


class TestQueue:
    """A durable queue bound to `exchange` with `binding`, read and removed by the test."""

    __test__ = False  # not a test class for pytest

    def __init__(self, exchange: str, binding: str = "#") -> None:
        self.exchange = exchange
        self.name = unique("ingest-client-test")
        try:
            self.connection = pika.BlockingConnection(
                pika.ConnectionParameters(AMQP_HOST, AMQP_PORT, heartbeat=0)
            )
        except pika.exceptions.AMQPConnectionError as e:
            raise AssertionError(
                f"RabbitMQ is not reachable on {AMQP_HOST}:{AMQP_PORT} ({e!r}): start it "
                "(scripts/test does, or rabbitmq-server -detached)"
            ) from e
        self.channel = self.connection.channel()
        self.channel.exchange_declare(exchange, "topic", durable=True)
        self.channel.queue_declare(self.name, durable=True)
        self.channel.queue_bind(self.name, exchange, binding)

    def take_all(self, at_least: int, timeout: float = 60.0, settle: float = 0.5) -> list:
        """Every message, as (message_id, body, headers), once at least `at_least` came
        and nothing more arrived for `settle` seconds."""
        messages = []
        deadline = time.monotonic() + timeout
        self.channel.basic_qos(prefetch_count=1000)
        for method, props, body in self.channel.consume(
            self.name, auto_ack=True, inactivity_timeout=settle
        ):
            if method is None:
                if len(messages) >= at_least:
                    break
            else:
                messages.append((props.message_id, body, props.headers or {}))
            if time.monotonic() > deadline:
                self.channel.cancel()
                raise AssertionError(
                    f"queue {self.name}: {len(messages)} messages, wanted at least {at_least} "
                    f"within {timeout}s"
                )
        self.channel.cancel()
        return messages

    def close(self) -> None:
        try:
            self.channel.queue_delete(self.name)
            self.channel.exchange_delete(self.exchange)
        finally:
            self.connection.close()


class Proxy:
    """A TCP proxy on a free port to `upstream`: `stall()` stops forwarding bytes
    (both ways; the peers' TCP windows then fill), `resume()` goes on, `cut()` closes
    every open connection (new ones are still accepted)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self.flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def cut(self) -> int:
        """Closes every connection open now; returns how many sockets it closed."""
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        return len(sockets)

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        self.listener.close()
        self.cut()
