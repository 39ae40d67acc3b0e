//! SIGTERM against the real binary: in-flight calls finish, then the process exits.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use futures::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::support::{
    AMQP_ADDR, ChildServer, FaultProxy, Load, Mode, TestQueue, assert_exactly_once, json_event,
    request, run_load_with, unique,
};

const GUARD: Duration = Duration::from_secs(30);
/// How long the queue must hold still before it is read, so late duplicates show.
const SETTLE: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_calls_in_flight_completes_them_and_exits_zero() {
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut server = ChildServer::start(
        &proxy.amqp_url(),
        &queue.exchange,
        &[("INGEST_DRAIN_TIMEOUT", "20s")],
    );
    let client = server.ready_client().await;

    // Hold the confirms back so the calls are surely in flight when SIGTERM lands.
    proxy.set_mode(Mode::Stall);
    let ids: Vec<Vec<String>> = (0..10)
        .map(|c| (0..5).map(|e| unique(&format!("drain-{c}-{e}"))).collect())
        .collect();
    let calls = tokio::spawn(join_all(ids.clone().into_iter().map(|batch| {
        let mut client = client.clone();
        async move {
            let events = batch.iter().map(|id| json_event("t", id, "{}")).collect();
            client.publish(request(events)).await
        }
    })));
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "ingest must wait for in-flight confirms"
    );
    proxy.set_mode(Mode::Forward);

    let results = tokio::time::timeout(GUARD, calls).await.unwrap().unwrap();
    let mut acked = BTreeSet::new();
    for (result, batch) in results.into_iter().zip(&ids) {
        let response = result
            .expect("calls in flight at SIGTERM complete")
            .into_inner();
        assert_eq!(&response.ids, batch);
        acked.extend(response.ids);
    }
    let status = server.wait_exit().await;
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(acked.len(), 50);
    let landed = queue.settled_message_ids(SETTLE).await;
    assert_exactly_once(&landed, &acked);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_deadline_passed_with_unconfirmed_events_exits_nonzero_and_acks_nothing() {
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut server = ChildServer::start(
        &proxy.amqp_url(),
        &queue.exchange,
        &[("INGEST_DRAIN_TIMEOUT", "1s")],
    );
    let client = server.ready_client().await;

    proxy.set_mode(Mode::Stall);
    let calls = tokio::spawn(join_all((0..4).map(|c| {
        let mut client = client.clone();
        async move {
            client
                .publish(request(vec![json_event(
                    "t",
                    &unique(&format!("late-{c}")),
                    "{}",
                )]))
                .await
        }
    })));
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.sigterm();

    let status = server.wait_exit().await;
    // Exactly 1, the service's own failure exit: a panic (101) or a signal (no code)
    // is not a drain deadline.
    assert_eq!(
        status.code(),
        Some(1),
        "unconfirmed events at the drain deadline exit 1, got {status:?}"
    );
    let results = tokio::time::timeout(GUARD, calls).await.unwrap().unwrap();
    for result in results {
        assert!(
            result.is_err(),
            "nothing was confirmed, so nothing may be acknowledged"
        );
    }
    drop(proxy);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_stream_load_tells_each_stream_its_confirmed_prefix_and_exits_zero() {
    let queue = TestQueue::new("#").await;
    let mut server = ChildServer::start(
        crate::support::AMQP_URL,
        &queue.exchange,
        &[("INGEST_DRAIN_TIMEOUT", "20s")],
    );
    let client = server.ready_client().await;

    const STREAMS: usize = 4;
    let stop = CancellationToken::new();
    let load = Load {
        duration: Duration::from_secs(3),
        unary: 1,
        streams: STREAMS,
        batch: 10,
        stop: stop.clone(),
        ..Load::default()
    };
    let load = tokio::spawn(async move { run_load_with(&client, load).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // No call starts from here on, so every call is one the service must answer: none
    // is refused by a process that has already exited. Streams open now keep sending.
    stop.cancel();
    server.sigterm();
    let status = server.wait_exit().await;
    assert!(status.success(), "exit status {status:?}");

    let report = load.await.unwrap();
    assert!(
        report.acked.len() > 100,
        "load ran before the signal: {} acked",
        report.acked.len()
    );
    // Each worker's one stream was open at SIGTERM (they send until 3 s), and the
    // service ended each with UNAVAILABLE and its confirmed count.
    assert_eq!(
        report.stream_answers,
        BTreeMap::from([("Unavailable".to_owned(), STREAMS)]),
        "every stream open at SIGTERM ends UNAVAILABLE, answered by the service; \
         without a count: {:?}; transport failures: {:?}",
        report.streams_without_count,
        report.transport_failures
    );
    // Every stream answer carried ingest-confirmed-count, no call failed in the
    // transport, and each stream's confirmed prefix is in the queue.
    report.assert_invariants(&queue).await;
    queue.cleanup().await;
}
