//! Proves [`PrivateNode`] gives a test a broker of its own that it can
//! restart and put under a memory alarm, and that it cleans up after itself.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Event, PublisherConfirm};
use tokio::time::{sleep, timeout};

use crate::support::{PrivateNode, unique};

const WAIT: Duration = Duration::from_secs(10);

async fn connect(url: &str) -> Connection {
    timeout(
        WAIT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .unwrap_or_else(|_| panic!("connecting to {url} timed out"))
    .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// A confirm-mode channel with `queue` declared on it.
async fn confirmed_channel(conn: &Connection, queue: &str) -> Channel {
    timeout(WAIT, async {
        let channel = conn.create_channel().await.expect("create channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm_select");
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare queue");
        channel
    })
    .await
    .expect("opening a confirm channel timed out")
}

/// Publishes one message to `queue` through the default exchange.
async fn publish(channel: &Channel, queue: &str) -> PublisherConfirm {
    let publish = channel.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        b"hello",
        BasicProperties::default(),
    );
    timeout(WAIT, publish)
        .await
        .expect("basic_publish timed out")
        .expect("basic_publish")
}

async fn assert_acked(confirm: PublisherConfirm, what: &str) {
    let confirmation = timeout(WAIT, confirm)
        .await
        .unwrap_or_else(|_| panic!("{what}: no confirm within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("{what}: confirm failed: {e}"));
    assert!(confirmation.is_ack(), "{what}: broker nacked");
}

async fn ready_count(channel: &Channel, queue: &str) -> u32 {
    let declare = channel.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    );
    timeout(WAIT, declare)
        .await
        .expect("passive declare timed out")
        .expect("passive declare")
        .message_count()
}

/// Polls `condition` every 20 ms until it holds or `WAIT` passes.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the first event matching `wanted`, skipping others.
async fn next_event(
    events: &mut (impl futures::Stream<Item = Event> + Unpin),
    what: &str,
    wanted: impl Fn(&Event) -> bool,
) -> Event {
    timeout(WAIT, async {
        loop {
            match events.next().await {
                Some(event) if wanted(&event) => return event,
                Some(other) => eprintln!("({what}: skipping event {other:?})"),
                None => panic!("{what}: event stream ended"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: no such event within {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_node_starts_restarts_and_raises_a_memory_alarm() {
    let started = Instant::now();
    let node = PrivateNode::start().await;
    eprintln!("start: {:.1?}", started.elapsed());
    let url = node.amqp_url();
    assert_eq!(node.amqp_addr().port(), node.amqp_port());
    assert!(url.contains(&format!(":{}/", node.amqp_port())));

    // 1. A plain publish is confirmed and lands in the queue.
    let queue = unique("private-node-selftest");
    let conn = connect(&url).await;
    let channel = confirmed_channel(&conn, &queue).await;
    assert_acked(publish(&channel, &queue).await, "first publish").await;
    assert_eq!(ready_count(&channel, &queue).await, 1);

    // 2. stop_app drops the connection and refuses new ones.
    let t = Instant::now();
    node.stop_app().await;
    eprintln!("stop_app: {:.1?}", t.elapsed());
    eventually("connection lost after stop_app", || {
        !conn.status().connected()
    })
    .await;
    let refused = timeout(
        WAIT,
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    .expect("connect attempt to a stopped app hung");
    assert!(refused.is_err(), "connected although the app is stopped");

    // 3. start_app: a new connection works again.
    let t = Instant::now();
    node.start_app().await;
    eprintln!("start_app (incl. await_startup): {:.1?}", t.elapsed());
    let conn = connect(&url).await;
    let channel = confirmed_channel(&conn, &queue).await;
    assert_acked(publish(&channel, &queue).await, "publish after restart").await;
    // A blocked connection is not read from at all, so queue depths are
    // checked over a connection that never publishes (and is never blocked).
    let observer = connect(&url).await;
    let observe = observer.create_channel().await.expect("observer channel");
    // The restart dropped the non-durable queue and its first message.
    assert_eq!(ready_count(&observe, &queue).await, 1);
    let mut old_events = conn.events_listener();

    // 4. Memory alarm: publishing connections get blocked. RabbitMQ 3.10
    // sends `connection.blocked` only once a connection publishes while the
    // alarm is on, not on connect nor when the alarm starts.
    let t = Instant::now();
    node.set_memory_alarm(true).await;
    eprintln!("memory alarm on: {:.1?}", t.elapsed());
    assert!(node.alarms().await.contains("memory"));

    let new_conn = connect(&url).await;
    let mut new_events = new_conn.events_listener();
    let new_channel = confirmed_channel(&new_conn, &queue).await;
    assert!(!new_conn.status().blocked(), "blocked before publishing");
    let new_pending = publish(&new_channel, &queue).await;
    let event = next_event(&mut new_events, "new connection blocked", |e| {
        matches!(e, Event::ConnectionBlocked(_))
    })
    .await;
    eprintln!("new connection got {event:?}");
    eventually("new connection status blocked", || {
        new_conn.status().blocked()
    })
    .await;

    // A connection from before the alarm is blocked on its next publish too.
    let old_pending = publish(&channel, &queue).await;
    next_event(&mut old_events, "old connection blocked", |e| {
        matches!(e, Event::ConnectionBlocked(_))
    })
    .await;
    eventually("old connection status blocked", || conn.status().blocked()).await;

    // Blocked means held back, not refused: nothing lands while it lasts.
    sleep(Duration::from_millis(500)).await;
    assert!(
        !observer.status().blocked(),
        "non-publishing observer blocked"
    );
    assert_eq!(
        ready_count(&observe, &queue).await,
        1,
        "a publish got through the alarm"
    );

    // 5. Clearing the alarm unblocks both; the held-back publishes land.
    let t = Instant::now();
    node.set_memory_alarm(false).await;
    eprintln!("memory alarm off: {:.1?}", t.elapsed());
    for (events, status, what) in [
        (&mut new_events, new_conn.status(), "new connection"),
        (&mut old_events, conn.status(), "old connection"),
    ] {
        next_event(events, &format!("{what} unblocked"), |e| {
            matches!(e, Event::ConnectionUnblocked)
        })
        .await;
        eventually(&format!("{what} status unblocked"), || !status.blocked()).await;
    }
    assert_acked(new_pending, "new connection's held-back publish").await;
    assert_acked(old_pending, "old connection's held-back publish").await;
    assert_eq!(ready_count(&observe, &queue).await, 3);
    for c in [&new_conn, &conn, &observer] {
        let _ = timeout(WAIT, c.close(200, "OK".into())).await;
    }

    // 6. Drop shuts the node down and removes its folder.
    let name = node.name().to_owned();
    let dir = node.dir().to_owned();
    let pid = node.os_pid().expect("node has a pid file");
    assert!(PrivateNode::pid_alive(pid));
    let t = Instant::now();
    drop(node);
    eprintln!("drop (shutdown + cleanup): {:.1?}", t.elapsed());
    assert!(!PrivateNode::pid_alive(pid), "node VM {pid} still running");
    assert!(!dir.exists(), "{} not removed", dir.display());
    assert!(
        !PrivateNode::responds(&name).await,
        "node {name} still answers rabbitmqctl"
    );
}
