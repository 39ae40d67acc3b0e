//! PublishStream against the real broker: order, counts, resume point, cancel, idle
//! close, and backpressure when the broker stalls.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt, stream::FuturesUnordered};
use ingest::proto::{Event, PublishRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

use crate::support::{
    AMQP_ADDR, AMQP_URL, ChildServer, FaultProxy, Mode, PrivateNode, TestQueue, json_event,
    request, spawn_server, test_config, unique,
};

const GUARD: Duration = Duration::from_secs(30);

/// `events` as a request stream of `per_message` events per message; `pulled` counts the
/// messages the client library has taken from it, i.e. what the caller handed over.
fn counted(
    events: Vec<Event>,
    per_message: usize,
    pulled: Arc<AtomicUsize>,
) -> impl Stream<Item = PublishRequest> {
    let messages: Vec<Vec<Event>> = events.chunks(per_message).map(<[Event]>::to_vec).collect();
    futures::stream::iter(messages).map(move |events| {
        pulled.fetch_add(1, Ordering::SeqCst);
        PublishRequest {
            events,
            sequence: 0,
        }
    })
}

fn events(prefix: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| json_event("t", &format!("{prefix}-{i:06}"), "{\"n\":1}"))
        .collect()
}

fn confirmed_count(status: &Status) -> u64 {
    status
        .metadata()
        .get(ingest::api::CONFIRMED_COUNT)
        .unwrap_or_else(|| panic!("no {} in {status:?}", ingest::api::CONFIRMED_COUNT))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

/// Out-of-order neighbours in `landed`, by each id's position in `sent`; panics on an
/// id that was never sent.
fn out_of_order_neighbours(sent: &[Event], landed: &[String]) -> usize {
    let position: HashMap<&str, usize> = sent
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.as_str(), i))
        .collect();
    let at = |id: &String| {
        *position
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} landed but was never sent"))
    };
    landed.windows(2).filter(|w| at(&w[0]) > at(&w[1])).count()
}

/// The real binary (a multi-threaded runtime, as users run it): a stream's events reach
/// the broker in stream order, in one-event and in ten-event messages, and OK carries
/// the count. An in-process server under a single-threaded test runtime once hid a race
/// here: spawned batch tasks ran first-in first-out there, and not in the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_events_land_in_stream_order_on_the_real_binary() {
    const EVENTS: usize = 12_000;
    let queue = TestQueue::new("#").await;
    let server = ChildServer::start(AMQP_URL, &queue.exchange, &[]);
    let mut client = server.ready_client().await;
    for per_message in [1, 10] {
        let sent = events(&unique(&format!("order{per_message}")), EVENTS);
        let response = tokio::time::timeout(
            Duration::from_secs(120),
            client.publish_stream(counted(sent.clone(), per_message, Arc::default())),
        )
        .await
        .expect("the stream must end")
        .unwrap();
        let count = response
            .metadata()
            .get(ingest::api::CONFIRMED_COUNT)
            .expect("OK carries ingest-confirmed-count")
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(response.into_inner().events, EVENTS as u64);
        assert_eq!(count, EVENTS.to_string());
        let landed = queue.message_ids().await;
        let out_of_order = out_of_order_neighbours(&sent, &landed);
        let distinct: BTreeSet<&String> = landed.iter().collect();
        eprintln!(
            "{per_message} per message: {} landed, {} distinct, {out_of_order} out-of-order neighbours",
            landed.len(),
            distinct.len()
        );
        assert_eq!(
            out_of_order, 0,
            "{per_message} event(s) per message: events landed out of stream order"
        );
        assert_eq!(landed, ids(&sent), "every event once, in stream order");
    }
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_invalid_event_at_k_confirms_exactly_k() {
    const K: usize = 37;
    let queue = TestQueue::new("#").await;
    let server = spawn_server(test_config(AMQP_URL, &queue.exchange)).await;
    server.wait_health(ServingStatus::Serving, GUARD).await;

    // One event per message, and ten per message with the bad one mid-message.
    for per_message in [1, 10] {
        let mut sent = events(&unique("bad"), 100);
        sent[K].topic.clear();
        let status = server
            .client()
            .await
            .publish_stream(counted(sent.clone(), per_message, Arc::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(confirmed_count(&status), K as u64);
        let fields: Vec<String> = status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, vec![format!("events[{K}].topic")]);
        assert_eq!(
            queue.message_ids().await,
            ids(&sent[..K]),
            "exactly the first k events, per {per_message}"
        );
    }
    server.wait_admission_idle(GUARD).await;
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_cancel_mid_stream_releases_every_permit_and_the_service_keeps_serving() {
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut config = test_config(&proxy.amqp_url(), &queue.exchange);
    config.confirm_timeout = Duration::from_secs(60);
    let server = spawn_server(config).await;
    server.wait_health(ServingStatus::Serving, GUARD).await;
    let mut client = server.client().await;

    // Confirms held back, so the stream's events sit admitted when the caller leaves.
    proxy.set_mode(Mode::Stall);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call = tokio::spawn({
        let mut client = client.clone();
        async move { client.publish_stream(ReceiverStream::new(rx)).await }
    });
    let sent = events(&unique("cancel"), 20);
    for event in &sent {
        tx.send(request(vec![event.clone()])).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + GUARD;
    while server.admission.in_use().events < sent.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events were not admitted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call.abort();
    drop(tx);

    proxy.set_mode(Mode::Forward);
    server.wait_admission_idle(GUARD).await;
    // What was published before the caller left may land, each at most once.
    let landed = queue.message_ids().await;
    let unique_landed: BTreeSet<&String> = landed.iter().collect();
    assert_eq!(unique_landed.len(), landed.len());
    assert!(landed.iter().all(|id| sent.iter().any(|e| &e.id == id)));
    // And the service serves the next caller.
    let ok = client
        .publish(request(vec![json_event("t", "after-cancel", "{}")]))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().ids, vec!["after-cancel"]);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stream_is_closed_with_deadline_exceeded_and_the_count() {
    let queue = TestQueue::new("#").await;
    let mut config = test_config(AMQP_URL, &queue.exchange);
    config.stream_idle_timeout = Duration::from_millis(300);
    let server = spawn_server(config).await;
    server.wait_health(ServingStatus::Serving, GUARD).await;

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sent = events(&unique("idle"), 3);
    tx.send(request(sent.clone())).await.unwrap();
    let status = tokio::time::timeout(
        GUARD,
        server
            .client()
            .await
            .publish_stream(ReceiverStream::new(rx)),
    )
    .await
    .expect("an idle stream must be closed by the server")
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("stream-idle-timeout"),
        "{status:?}"
    );
    assert_eq!(confirmed_count(&status), 3);
    assert_eq!(queue.message_ids().await, ids(&sent));
    drop(tx);
    server.wait_admission_idle(GUARD).await;
    queue.cleanup().await;
}

/// Many streams of large events against a small buffer while the broker is stalled:
/// the streams stall, what callers can hand over is bounded, the server's memory stays
/// within the buffer plus a fixed overhead, unary calls are refused promptly, and after
/// the stall every event lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_broker_stalls_streams_with_bounded_memory_then_everything_lands_once() {
    const STREAMS: usize = 8;
    const EVENTS_PER_STREAM: usize = 100;
    const EVENT_BYTES: usize = 64 * 1024;
    const BUFFER_BYTES: usize = 4 * 1024 * 1024;
    const STREAM_WINDOW: usize = 256 * 1024;
    /// Fixed overhead over the idle process: allocator slack, per-connection HTTP/2 and
    /// AMQP buffers, and frames lapin holds while the socket is blocked (README).
    const OVERHEAD: u64 = 24 * 1024 * 1024;

    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let server = ChildServer::start(
        &proxy.amqp_url(),
        &queue.exchange,
        &[
            ("INGEST_BUFFER_BYTES", &BUFFER_BYTES.to_string()),
            ("INGEST_MAX_EVENT_BYTES", "64KiB"),
            ("INGEST_HTTP2_STREAM_WINDOW", &STREAM_WINDOW.to_string()),
            ("INGEST_HTTP2_CONNECTION_WINDOW", "1MiB"),
            ("INGEST_CONFIRM_TIMEOUT", "2m"),
        ],
    );
    server.ready_client().await;
    let (idle_rss, _) = server.memory();

    proxy.set_mode(Mode::Stall);
    let payload = "x".repeat(EVENT_BYTES - 16);
    let body = format!("{{\"p\":\"{payload}\"}}");
    let pulled = Arc::new(AtomicUsize::new(0));
    let mut all_ids = BTreeSet::new();
    let mut streams = FuturesUnordered::new();
    for s in 0..STREAMS {
        // One HTTP/2 connection per stream, as separate services would connect.
        let mut client = server.client().await;
        let sent: Vec<Event> = (0..EVENTS_PER_STREAM)
            .map(|i| json_event("t", &unique(&format!("big-{s}-{i}")), &body))
            .collect();
        all_ids.extend(ids(&sent));
        let requests = counted(sent, 1, Arc::clone(&pulled));
        streams.push(tokio::spawn(async move {
            client.publish_stream(requests).await
        }));
    }

    // Let the streams run into the stall: what the callers handed over stops growing.
    let handed_over = crate::support::until_it_stops_growing(
        &pulled,
        "streams",
        Duration::from_millis(500),
        GUARD,
    )
    .await;
    // Admitted (the streams' 3/4 of the byte buffer) + per stream: its HTTP/2 window,
    // the one message read before admission, and what the client library buffers.
    let per_stream = STREAM_WINDOW / EVENT_BYTES + 1 + 3;
    let bound = BUFFER_BYTES * 3 / 4 / EVENT_BYTES + STREAMS * per_stream;
    assert!(
        handed_over <= bound,
        "callers handed over {handed_over} messages while the broker was stalled; bound {bound}"
    );
    assert!(
        handed_over < STREAMS * EVENTS_PER_STREAM / 2,
        "streams did not stall"
    );

    // Unary calls meanwhile: the unary quarter fills, then calls are refused at once.
    let mut unary = FuturesUnordered::new();
    for i in 0..40 {
        let mut client = server.client().await;
        let id = unique(&format!("unary-{i}"));
        let event = json_event("t", &id, &body);
        unary.push(tokio::spawn(async move {
            (id, client.publish(request(vec![event])).await)
        }));
    }
    let mut refused = 0;
    let mut unary_pending = Vec::new();
    while refused == 0 {
        let (id, result) = tokio::time::timeout(GUARD, unary.next())
            .await
            .expect("a unary call beyond the buffer must be answered while the broker is stalled")
            .unwrap()
            .unwrap();
        let status = result.expect_err("nothing can be confirmed while the broker is stalled");
        // Pushed back: the unary quarter is full, or the stall has been noticed.
        assert!(
            status.code() == Code::ResourceExhausted
                || (status.code() == Code::Unavailable && status.message().contains("stalled")),
            "{id}: {status:?}"
        );
        assert!(status.get_details_retry_info().is_some());
        refused += 1;
    }

    let (rss, peak) = server.memory();
    let limit = idle_rss + BUFFER_BYTES as u64 + OVERHEAD;
    eprintln!(
        "idle RSS {idle_rss} B, under stall RSS {rss} B, peak {peak} B, limit {limit} B, handed over {handed_over}/{bound}"
    );
    assert!(
        peak <= limit,
        "peak RSS {peak} B over idle {idle_rss} B + buffer {BUFFER_BYTES} B + overhead {OVERHEAD} B"
    );

    proxy.set_mode(Mode::Forward);
    while let Some(joined) = tokio::time::timeout(GUARD, streams.next()).await.unwrap() {
        let response = joined
            .unwrap()
            .expect("every stream ends OK after the stall");
        assert_eq!(response.into_inner().events, EVENTS_PER_STREAM as u64);
    }
    while let Some(joined) = tokio::time::timeout(GUARD, unary.next()).await.unwrap() {
        let (id, result) = joined.unwrap();
        match result {
            Ok(_) => unary_pending.push(id),
            Err(status) => assert!(
                status.code() == Code::ResourceExhausted
                    || (status.code() == Code::Unavailable && status.message().contains("stalled")),
                "{id}: {status:?}"
            ),
        }
    }
    all_ids.extend(unary_pending);
    let landed = queue.message_ids().await;
    assert_eq!(
        landed.len(),
        all_ids.len(),
        "every acknowledged event exactly once"
    );
    assert_eq!(landed.into_iter().collect::<BTreeSet<_>>(), all_ids);
    queue.cleanup().await;
}

/// While the broker blocks publishers (memory alarm), a stream's batches wait in their
/// tasks; when the alarm clears they all wake at once, and still reach the broker in
/// stream order: each waits behind the one before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_order_holds_across_a_memory_alarm() {
    const BEFORE: usize = 200;
    const DURING: usize = 600;
    let node = PrivateNode::start().await;
    let queue = TestQueue::new_at(&node.amqp_url(), "#").await;
    let mut config = test_config(&node.amqp_url(), &queue.exchange);
    config.confirm_timeout = Duration::from_secs(60);
    let server = spawn_server(config).await;
    server.wait_health(ServingStatus::Serving, GUARD).await;
    let sent = events(&unique("alarm-order"), BEFORE + DURING);

    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let call = tokio::spawn({
        let mut client = server.client().await;
        async move { client.publish_stream(ReceiverStream::new(rx)).await }
    });
    for event in &sent[..BEFORE] {
        tx.send(request(vec![event.clone()])).await.unwrap();
    }
    node.set_memory_alarm(true).await;
    // RabbitMQ blocks a connection once it publishes during the alarm.
    for event in &sent[BEFORE..] {
        tx.send(request(vec![event.clone()])).await.unwrap();
    }
    let mut broker = server.broker.clone();
    tokio::time::timeout(GUARD, broker.wait_for(|s| s.blocked))
        .await
        .expect("the service must see connection.blocked")
        .unwrap();
    // Every event is admitted and waiting on the alarm (the default buffer holds them).
    let deadline = tokio::time::Instant::now() + GUARD;
    while server.admission.in_use().events < DURING {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream's events were not admitted while blocked: {:?}",
            server.admission.in_use()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.set_memory_alarm(false).await;
    drop(tx);
    let response = tokio::time::timeout(GUARD, call)
        .await
        .expect("the stream must end after the alarm")
        .unwrap()
        .expect("the stream ends OK");
    assert_eq!(response.into_inner().events, sent.len() as u64);
    let landed = queue.message_ids().await;
    let out_of_order = out_of_order_neighbours(&sent, &landed);
    eprintln!(
        "{} landed, {out_of_order} out-of-order neighbours",
        landed.len()
    );
    assert_eq!(out_of_order, 0, "events landed out of stream order");
    assert_eq!(landed, ids(&sent), "every event once, in stream order");
    server.wait_admission_idle(GUARD).await;
    queue.cleanup().await;
}
