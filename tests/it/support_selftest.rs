//! Proves the support kit itself works against the real broker, so a failing
//! service test can be trusted to point at the service, not the harness.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use tokio::time::timeout;

use crate::support::{AMQP_ADDR, FaultProxy, Mode, TestQueue};

const LONG: Duration = Duration::from_secs(5);

fn upstream() -> SocketAddr {
    AMQP_ADDR.parse().unwrap()
}

async fn confirmed_channel(conn: &Connection) -> Channel {
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
}

async fn publish(channel: &Channel, exchange: &str, key: &str) -> PublisherConfirm {
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"payload",
            BasicProperties::default(),
        )
        .await
        .unwrap()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LONG;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forward_stall_latency_cut() {
    let tq = TestQueue::new("#").await;
    let proxy = FaultProxy::start(upstream()).await;
    let conn = timeout(
        LONG,
        Connection::connect(&proxy.amqp_url(), ConnectionProperties::default()),
    )
    .await
    .expect("connect through proxy timed out")
    .expect("connect through proxy");
    assert_eq!(proxy.connections(), 1);
    let channel = confirmed_channel(&conn).await;

    // Forward: publish and confirm flow normally.
    let confirm = publish(&channel, &tq.exchange, "a.b").await;
    assert!(timeout(LONG, confirm).await.unwrap().unwrap().is_ack());
    assert_eq!(tq.wait_for_count(1, LONG).await, 1);

    // Stall: the confirm is held back until forwarding resumes.
    proxy.set_mode(Mode::Stall);
    let mut confirm = publish(&channel, &tq.exchange, "a.b").await;
    assert!(
        timeout(Duration::from_secs(1), &mut confirm).await.is_err(),
        "confirm arrived through a stalled proxy"
    );
    assert_eq!(tq.count().await, 1, "message crossed a stalled proxy");
    proxy.set_mode(Mode::Forward);
    assert!(timeout(LONG, confirm).await.unwrap().unwrap().is_ack());
    assert_eq!(tq.wait_for_count(2, LONG).await, 2);

    // Latency applies per chunk in both directions (publish + confirm).
    proxy.set_latency(Duration::from_millis(200));
    let started = Instant::now();
    let confirm = publish(&channel, &tq.exchange, "a.b").await;
    assert!(timeout(LONG, confirm).await.unwrap().unwrap().is_ack());
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "latency not applied: {:?}",
        started.elapsed()
    );
    proxy.set_latency(Duration::ZERO);

    // Cut: the connection dies, the proxy keeps accepting.
    proxy.cut();
    wait_until("proxy to drop its connection", || proxy.connections() == 0).await;
    wait_until("lapin to notice the cut", || !conn.status().connected()).await;
    let again = timeout(
        LONG,
        Connection::connect(&proxy.amqp_url(), ConnectionProperties::default()),
    )
    .await
    .unwrap()
    .expect("reconnect after cut");
    assert_eq!(proxy.connections(), 1);
    let _ = again.close(200, "OK".into()).await;

    assert_eq!(tq.take_all().await.len(), 3);
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuse_then_forward() {
    let proxy = FaultProxy::start_in(upstream(), Mode::Refuse).await;
    let refused = timeout(
        LONG,
        Connection::connect(&proxy.amqp_url(), ConnectionProperties::default()),
    )
    .await
    .expect("connect to a refusing proxy should fail fast, not hang");
    assert!(refused.is_err(), "connect succeeded through Refuse");
    assert_eq!(proxy.connections(), 0);

    proxy.set_mode(Mode::Forward);
    let conn = timeout(
        LONG,
        Connection::connect(&proxy.amqp_url(), ConnectionProperties::default()),
    )
    .await
    .unwrap()
    .expect("connect once forwarding");

    // Switching to Refuse cuts live connections too.
    proxy.set_mode(Mode::Refuse);
    wait_until("Refuse to cut the connection", || {
        proxy.connections() == 0 && !conn.status().connected()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_queue_routes_counts_and_drains() {
    let tq = TestQueue::new("orders.*").await;
    tq.publish("orders.created", b"first").await;
    tq.publish("payments.created", b"unroutable").await;
    tq.publish("orders.paid", b"second").await;

    assert_eq!(tq.wait_for_count(2, LONG).await, 2);
    tq.assert_count_stays(2, Duration::from_millis(300)).await;

    let taken = tq.take_all().await;
    let bodies: Vec<&[u8]> = taken.iter().map(|m| m.delivery.data.as_slice()).collect();
    assert_eq!(bodies, [b"first".as_slice(), b"second".as_slice()]);
    assert_eq!(tq.count().await, 0);
    tq.cleanup().await;
}
