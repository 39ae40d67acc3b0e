"""Two ingest replicas behind client-side round-robin (grpcio `ipv4:A,B` with
`round_robin` and the shipped service config): a rolling restart under load loses
nothing acknowledged, and callers see no error, since the retry policy absorbs the
draining replica's UNAVAILABLE."""

from __future__ import annotations

import collections
import json
import threading
import time

import grpc

from ingest_client import BatchSettings, Publisher
from ingest_client._stubs import ingest_pb2, ingest_pb2_grpc
from support import REPO, Ingest

GUARD = 120.0
SERVICE_CONFIG = json.loads((REPO / "proto/ingest/v1/service_config.json").read_text())


def round_robin_options() -> list:
    config = dict(SERVICE_CONFIG, loadBalancingConfig=[{"round_robin": {}}])
    return [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]


# A plain grpcio channel to an address list sends the list as its `:authority`, which
# no HTTP/2 server accepts (ingest's resets the stream with PROTOCOL_ERROR): name one.
# (`Publisher` does this by itself.)
AUTHORITY = [("grpc.default_authority", "ingest")]


def test_a_rolling_restart_of_two_replicas_loses_nothing_acknowledged(queue):
    a = Ingest(queue.exchange).ready()
    b = Ingest(queue.exchange).ready()
    target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
    channel = grpc.insecure_channel(target, options=round_robin_options() + AUTHORITY)
    stub = ingest_pb2_grpc.IngestStub(channel)
    stop = threading.Event()
    acked: list[str] = []
    failed: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def unary_caller(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            ids = [f"u{k}-{i}-{j}" for j in range(5)]
            events = [ingest_pb2.Event(id=x, topic="t.rr", payload=b"{}") for x in ids]
            try:
                stub.Publish(ingest_pb2.PublishRequest(events=events), timeout=30)
                with lock:
                    acked.extend(ids)
            except grpc.RpcError as e:
                with lock:
                    failed[e.code().name] += 1

    callers = [threading.Thread(target=unary_caller, args=(k,)) for k in range(6)]
    for t in callers:
        t.start()
    # And a long-lived PublishAcked stream through the library, on the same targets.
    publisher = Publisher(
        target, channel_options=round_robin_options(), batch=BatchSettings(max_events=20)
    )
    futures = []
    streamer_stop = threading.Event()

    def streamer() -> None:
        n = 0
        while not streamer_stop.is_set():
            futures.append(publisher.publish("t.rr", b"{}", id=f"s-{n}"))
            n += 1
            time.sleep(0.002)

    stream_thread = threading.Thread(target=streamer)
    stream_thread.start()

    restarted = []
    try:
        time.sleep(1.5)
        for name, old in (("a", a), ("b", b)):
            began = time.monotonic()
            old.stop()  # SIGTERM: drain, exit
            assert old.process.returncode == 0, f"replica {name} exited {old.process.returncode}"
            new = Ingest(queue.exchange, port=old.port).ready()
            restarted.append((name, round(time.monotonic() - began, 2)))
            if name == "a":
                a = new
            else:
                b = new
            time.sleep(1.5)
    finally:
        stop.set()
        streamer_stop.set()
        for t in callers:
            t.join(GUARD)
        stream_thread.join(GUARD)
    assert publisher.flush(GUARD), "the stream's events were not all settled"
    stream_ids = [f.result(0) for f in futures]  # every future OK, or this raises
    stats = publisher.stats()
    publisher.close(GUARD)
    channel.close()
    landed = collections.Counter(m[0] for m in queue.take_all(len(acked) + len(stream_ids)))
    a.stop()
    b.stop()
    missing = [x for x in acked + stream_ids if x not in landed]
    duplicates = sum(c - 1 for c in landed.values())
    print(
        f"\nrolling restart {restarted}: {len(acked)} unary events and {len(stream_ids)} stream "
        f"events acknowledged, caller-visible failures {dict(failed)}, {duplicates} duplicates, "
        f"stream resent {stats.resent} over {stats.streams} streams"
    )
    assert not missing, f"{len(missing)} acknowledged events missing, e.g. {missing[:5]}"
    assert not failed, f"callers saw errors the retry policy did not absorb: {dict(failed)}"
    assert len(acked) > 500 and len(stream_ids) > 500, "the load ran through the restarts"
