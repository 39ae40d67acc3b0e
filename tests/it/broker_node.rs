//! Faults only a broker of our own can show: a restart and a memory alarm, on a
//! private RabbitMQ node (never the shared one).

use std::{sync::atomic::Ordering, time::Duration};

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

use crate::support::{
    ChildServer, Load, PrivateNode, TestQueue, json_event, request, run_load, run_load_with,
    spawn_server, test_config,
};

const GUARD: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_under_load_recovers_and_loses_nothing_acknowledged() {
    let node = PrivateNode::start().await;
    let mut queue = TestQueue::new_at(&node.amqp_url(), "#").await;
    let mut config = test_config(&node.amqp_url(), &queue.exchange);
    config.reconnect_max_backoff = Duration::from_millis(300);
    config.stream_stall_timeout = Duration::from_secs(10);
    let server = spawn_server(config).await;
    server.wait_health(ServingStatus::Serving, GUARD).await;
    let disconnects = server.count_disconnects();
    let client = server.client().await;

    let load = tokio::spawn({
        let client = client.clone();
        async move { run_load(&client, Duration::from_secs(6), 4, 2, 10).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    node.stop_app().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    node.start_app().await;
    let report = load.await.unwrap();

    assert!(
        disconnects.load(Ordering::SeqCst) >= 1,
        "the restart was seen"
    );
    server.wait_health(ServingStatus::Serving, GUARD).await;
    server.wait_admission_idle(GUARD).await;
    queue.reconnect().await;
    // What was in flight at the restart was published again (--retry-unconfirmed).
    report
        .assert_invariants_with(&queue, server.republished().await)
        .await;
    let mut client = client;
    let ok = client
        .publish(request(vec![json_event("t", "after-restart", "{}")]))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().ids, vec!["after-restart"]);
    server.stop().await.unwrap();
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_pushes_callers_back_then_everything_recovers() {
    const BUFFER: usize = 50;
    // One-event unary calls can take any free slot (streams only their share), and
    // there are more unary workers than slots: while the broker blocks, the buffer
    // fills to exactly BUFFER whatever the interleaving.
    const UNARY: usize = BUFFER + 10;
    let node = PrivateNode::start().await;
    let queue = TestQueue::new_at(&node.amqp_url(), "#").await;
    let mut config = test_config(&node.amqp_url(), &queue.exchange);
    config.buffer_events = BUFFER;
    config.confirm_timeout = Duration::from_secs(30);
    let server = spawn_server(config).await;
    server.wait_health(ServingStatus::Serving, GUARD).await;
    let client = server.client().await;

    node.set_memory_alarm(true).await;
    let load = tokio::spawn({
        let client = client.clone();
        let load = Load {
            duration: Duration::from_secs(8),
            unary: UNARY,
            streams: 2,
            batch: 1,
            ..Load::default()
        };
        async move { run_load_with(&client, load).await }
    });
    // RabbitMQ blocks a connection once it publishes during the alarm.
    let mut broker = server.broker.clone();
    tokio::time::timeout(GUARD, broker.wait_for(|s| s.blocked))
        .await
        .expect("the service must see connection.blocked")
        .unwrap();
    let deadline = tokio::time::Instant::now() + GUARD;
    while server.admission.in_use().events < BUFFER {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the buffer did not fill while blocked: {:?} in use after {GUARD:?}",
            server.admission.in_use()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Full, so the next caller is pushed back, at once and with RetryInfo.
    let status = tokio::time::timeout(
        GUARD,
        client
            .clone()
            .publish(request(vec![json_event("t", "probe", "{}")])),
    )
    .await
    .expect("a caller facing a full buffer is answered at once")
    .expect_err("nothing can be confirmed while the broker blocks");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.get_details_retry_info().is_some(),
        "RESOURCE_EXHAUSTED carries RetryInfo"
    );
    assert!(
        server.broker.borrow().connected,
        "blocked is not disconnected"
    );
    assert_eq!(
        queue.count().await,
        0,
        "nothing is enqueued while the alarm lasts"
    );
    assert_eq!(
        server.admission.in_use().events,
        BUFFER,
        "the buffer stays full while blocked"
    );
    node.set_memory_alarm(false).await;
    tokio::time::timeout(GUARD, broker.wait_for(|s| !s.blocked))
        .await
        .unwrap()
        .unwrap();
    let report = load.await.unwrap();

    for code in report.errored.keys() {
        assert!(
            ["ResourceExhausted", "Unavailable"].contains(&code.as_str()),
            "{code}: {:?}",
            report.errored
        );
    }
    server.wait_admission_idle(GUARD).await;
    let landed = report
        .assert_invariants_with(&queue, server.republished().await)
        .await;
    assert!(landed > 0, "publishing resumed after the alarm");
    server.stop().await.unwrap();
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_broker_blocks_publishers_still_exits_and_acks_nothing_unconfirmed() {
    let node = PrivateNode::start().await;
    let queue = TestQueue::new_at(&node.amqp_url(), "#").await;
    let mut server = ChildServer::start(
        &node.amqp_url(),
        &queue.exchange,
        &[
            ("INGEST_DRAIN_TIMEOUT", "2s"),
            ("INGEST_CONFIRM_TIMEOUT", "60s"),
        ],
    );
    let client = server.ready_client().await;
    node.set_memory_alarm(true).await;

    let calls = tokio::spawn(futures::future::join_all((0..4).map(|i| {
        let mut client = client.clone();
        async move {
            client
                .publish(request(vec![json_event(
                    "t",
                    &format!("blocked-{i}"),
                    "{}",
                )]))
                .await
        }
    })));
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.sigterm();
    // lapin's own close never returns while blocked; the drain deadline must still hold.
    let status = server.wait_exit().await;
    // Exactly 1, the service's own failure exit: a panic (101) or a signal (no code)
    // is not a drain deadline.
    assert_eq!(
        status.code(),
        Some(1),
        "unconfirmed events at the drain deadline exit 1, got {status:?}"
    );
    for result in tokio::time::timeout(GUARD, calls).await.unwrap().unwrap() {
        assert!(
            result.is_err(),
            "nothing was confirmed, so nothing may be acknowledged"
        );
    }
    node.set_memory_alarm(false).await;
    queue.cleanup().await;
}
