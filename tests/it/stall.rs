//! A broker that stops answering without closing the connection (a frozen node, a
//! partition): noticed within `--stall-after`, callers refused at once with a hint
//! they can act on, readiness and health turn traffic away, and all of it clears on
//! the next confirm. And a broker that is only slow is never taken for a stalled one.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, stream::FuturesUnordered};
use ingest::proto::{Event, PublishRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

use crate::support::{
    AMQP_ADDR, FaultProxy, Mode, TestQueue, http_get, json_event, request, spawn_ready_server,
    test_config, unique,
};

const GUARD: Duration = Duration::from_secs(30);
const STALL_AFTER: Duration = Duration::from_secs(2);
/// A refusal while stalled must be this fast (it is a guard, not a benchmark).
const PROMPT: Duration = Duration::from_millis(250);

/// What one of [`streams`] sent (its ids) and how its stream ended.
type StreamRun = tokio::task::JoinHandle<(Vec<String>, Result<u64, tonic::Status>)>;

/// Streams that keep sending one-event messages with unique ids until told to stop;
/// each returns the ids it sent and its answer.
fn streams(
    server: &crate::support::TestServer,
    n: usize,
    stop: Arc<AtomicBool>,
) -> FuturesUnordered<StreamRun> {
    (0..n)
        .map(|s| {
            let stop = Arc::clone(&stop);
            let addr = server.url();
            tokio::spawn(async move {
                let mut client = ingest::proto::ingest_client::IngestClient::connect(addr)
                    .await
                    .unwrap();
                let (tx, rx) = tokio::sync::mpsc::channel::<PublishRequest>(1);
                let call = tokio::spawn(async move {
                    client
                        .publish_stream(ReceiverStream::new(rx))
                        .await
                        .map(|r| r.into_inner().events)
                });
                let mut sent = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let id = unique(&format!("stall-s{s}"));
                    let message = request(vec![json_event("stall.t", &id, "{}")]);
                    // Blocks while the stream is pushed back.
                    match tokio::time::timeout(Duration::from_millis(200), tx.send(message)).await {
                        Ok(Ok(())) => sent.push(id),
                        Ok(Err(_)) => break,
                        Err(_) => {}
                    }
                }
                drop(tx);
                (sent, call.await.unwrap())
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_is_noticed_refused_at_once_and_cleared_on_the_next_confirm() {
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut config = test_config(&proxy.amqp_url(), &queue.exchange);
    config.buffer_events = 100;
    config.max_batch_events = 10;
    config.confirm_timeout = Duration::from_secs(60);
    config.stream_stall_timeout = Duration::from_secs(60);
    config.stall_after = STALL_AFTER;
    let server = spawn_ready_server(config).await;
    let mut client = server.client().await;

    // Streams hold the stream share; then the broker stops answering.
    let stop = Arc::new(AtomicBool::new(false));
    let mut running = streams(&server, 8, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_mode(Mode::Stall);
    let stalled_at = tokio::time::Instant::now();

    // Readiness turns 503 within stall-after + 1 s, naming the stall.
    let deadline = stalled_at + STALL_AFTER + Duration::from_secs(1);
    loop {
        let (status, body) = http_get(server.admin_addr, "/readyz").await;
        if status == 503 {
            assert!(body.contains("stalled"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz still {status} {:?} after the stall began",
            stalled_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("/readyz 503 after {:?}", stalled_at.elapsed());
    assert!(server.broker.borrow().stalled);
    server
        .wait_health(ServingStatus::NotServing, Duration::from_secs(1))
        .await;
    let (_, metrics) = http_get(server.admin_addr, "/metrics").await;
    assert_eq!(
        gauge(&metrics, "ingest_broker_stalled"),
        1.0,
        "the stalled gauge"
    );

    // A unary call is refused at once, with a hint gRPC's own retry reads too.
    let began = tokio::time::Instant::now();
    let status = client
        .publish(request(vec![json_event("stall.t", &unique("probe"), "{}")]))
        .await
        .expect_err("nothing can be confirmed while the broker is stalled");
    let took = began.elapsed();
    eprintln!("unary refused in {took:?}: {status:?}");
    assert!(took < PROMPT, "refused after {took:?}");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("stalled"), "{status:?}");
    assert!(status.get_details_retry_info().is_some());
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());

    // The broker answers again: the stall clears, everything recovers.
    proxy.set_mode(Mode::Forward);
    let deadline = tokio::time::Instant::now() + GUARD;
    while http_get(server.admin_addr, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "/readyz stayed 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!server.broker.borrow().stalled);
    server.wait_health(ServingStatus::Serving, GUARD).await;
    let id = unique("after-stall");
    let ok = client
        .publish(request(vec![json_event("stall.t", &id, "{}")]))
        .await
        .expect("served again after the stall");
    assert_eq!(ok.into_inner().ids, vec![id.clone()]);

    stop.store(true, Ordering::SeqCst);
    let mut acked = vec![id];
    while let Some(joined) = tokio::time::timeout(GUARD, running.next()).await.unwrap() {
        let (sent, answer) = joined.unwrap();
        let events = answer.expect("every stream ends OK after the stall");
        assert_eq!(events, sent.len() as u64);
        acked.extend(sent);
    }
    // Every acknowledged event is in the queue, once.
    let landed = queue.message_ids().await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &landed {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "landed more than once: {twice:?}");
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged, not in the queue: {missing:?}"
    );
    eprintln!("{} acknowledged, {} landed", acked.len(), landed.len());
    server.wait_admission_idle(GUARD).await;
    queue.cleanup().await;
}

/// 200 ms of latency on every chunk between ingest and RabbitMQ, under a load that
/// keeps the buffer full: confirms come late, but keep coming, so the broker is never
/// declared stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_behind_200ms_of_latency_is_never_declared_stalled() {
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut config = test_config(&proxy.amqp_url(), &queue.exchange);
    config.buffer_events = 200;
    config.max_batch_events = 10;
    config.confirm_timeout = Duration::from_secs(60);
    config.stall_after = STALL_AFTER;
    let server = spawn_ready_server(config).await;
    proxy.set_latency(Duration::from_millis(200));

    // Watch the state for the whole run.
    let ever_stalled = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let mut broker = server.broker.clone();
        let ever = Arc::clone(&ever_stalled);
        async move {
            loop {
                if broker.borrow_and_update().stalled {
                    ever.store(true, Ordering::SeqCst);
                }
                if broker.changed().await.is_err() {
                    return;
                }
            }
        }
    });

    let stop = Arc::new(AtomicBool::new(false));
    let mut running = streams(&server, 4, Arc::clone(&stop));
    // And unary callers that retry when pushed back.
    let mut unary = FuturesUnordered::new();
    for u in 0..8 {
        let mut client = server.client().await;
        let stop = Arc::clone(&stop);
        unary.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u32, 0u32);
            while !stop.load(Ordering::SeqCst) {
                let events: Vec<Event> = (0..10)
                    .map(|i| json_event("stall.t", &unique(&format!("slow-u{u}-{i}")), "{}"))
                    .collect();
                match client.publish(request(events)).await {
                    Ok(_) => ok += 1,
                    Err(status) if status.code() == Code::ResourceExhausted => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(status) => panic!("a slow broker must not fail calls: {status:?}"),
                }
            }
            (ok, refused)
        }));
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let full = server.admission.in_use().events;
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut refused) = (0, 0);
    while let Some(joined) = tokio::time::timeout(GUARD * 2, unary.next()).await.unwrap() {
        let (o, r) = joined.unwrap();
        ok += o;
        refused += r;
    }
    while let Some(joined) = tokio::time::timeout(GUARD * 2, running.next())
        .await
        .unwrap()
    {
        let (_, answer) = joined.unwrap();
        answer.expect("a slow broker ends no stream");
    }
    eprintln!(
        "200 ms latency: {ok} unary calls OK, {refused} pushed back, buffer at {full}/200 before the end"
    );
    assert!(ok > 0, "nothing was confirmed");
    assert!(refused > 0, "the load did not fill the buffer");
    assert!(
        !ever_stalled.load(Ordering::SeqCst),
        "a slow but answering broker was declared stalled"
    );
    let (_, metrics) = http_get(server.admin_addr, "/metrics").await;
    assert_eq!(gauge(&metrics, "ingest_broker_stalled"), 0.0);
    watcher.abort();
    proxy.set_latency(Duration::ZERO);
    server.wait_admission_idle(GUARD).await;
    queue.cleanup().await;
}

/// The value of an unlabelled gauge (or its only series) in Prometheus text.
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// The `RESOURCE_EXHAUSTED` hint tracks the broker's pace: with confirms slowed by
/// proxy latency, the delays refused callers are told are, in the median, within a
/// factor of 4 of the time the room they needed actually took to free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_full_hint_tracks_the_pace_of_confirms() {
    const FACTOR: f64 = 4.0;
    const BUFFER: usize = 40;
    const BATCH: usize = 10;
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut config = test_config(&proxy.amqp_url(), &queue.exchange);
    config.buffer_events = BUFFER;
    config.max_batch_events = BATCH;
    config.retry_after = Duration::from_millis(5);
    config.confirm_timeout = Duration::from_secs(60);
    let server = spawn_ready_server(config).await;
    proxy.set_latency(Duration::from_millis(40));

    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(f64, f64)>::new()));
    let mut callers = FuturesUnordered::new();
    for c in 0..8 {
        let mut client = server.client().await;
        let (stop, samples, admission) = (
            Arc::clone(&stop),
            Arc::clone(&samples),
            Arc::clone(&server.admission),
        );
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let events: Vec<Event> = (0..BATCH)
                    .map(|i| json_event("pace.t", &unique(&format!("pace-{c}-{i}")), "{}"))
                    .collect();
                let status = match client.publish(request(events)).await {
                    Ok(_) => continue,
                    Err(status) => status,
                };
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let told = status
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .expect("a retry delay");
                // How long until the room this call needs is free.
                let began = tokio::time::Instant::now();
                while BUFFER - admission.in_use().events.min(BUFFER) < BATCH {
                    if began.elapsed() > GUARD {
                        panic!("room never freed");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let took = began.elapsed();
                samples
                    .lock()
                    .unwrap()
                    .push((told.as_secs_f64(), took.as_secs_f64()));
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::SeqCst);
    while let Some(joined) = tokio::time::timeout(GUARD, callers.next()).await.unwrap() {
        joined.unwrap();
    }
    let samples = samples.lock().unwrap().clone();
    assert!(
        samples.len() >= 20,
        "too few refusals to judge: {}",
        samples.len()
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let told = median(samples.iter().map(|s| s.0).collect());
    let took = median(samples.iter().map(|s| s.1).collect());
    eprintln!(
        "{} refusals: median delay told {:.1} ms, median time the room took {:.1} ms",
        samples.len(),
        told * 1e3,
        took * 1e3
    );
    assert!(
        told <= took * FACTOR && took <= told * FACTOR,
        "told {told:.4} s, took {took:.4} s: not within a factor of {FACTOR}"
    );
    proxy.set_latency(Duration::ZERO);
    server.wait_admission_idle(GUARD).await;
    queue.cleanup().await;
}
