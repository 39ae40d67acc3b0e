//! The Python example client (`examples/python/stream_resume.py`, plain grpcio)
//! against the real service and broker: a polyglot caller streams 20 000 events on
//! one `PublishStream`, and resumes from `ingest-confirmed-count` with the same ids
//! after the server closed an idle stream. What arrived is checked on the queue.
//!
//! Needs python3 with the example's requirements; a missing one fails the test:
//! `python3 -m pip install -r examples/python/requirements.txt`.

use std::{collections::HashSet, path::Path, process::Stdio, time::Duration};

use serde_json::Value;
use tokio::process::Command;

use crate::support::{
    AMQP_ADDR, AMQP_URL, FaultProxy, Mode, TestQueue, spawn_ready_server, test_config, unique,
};

/// Upper bound for one run of the Python client (stub generation included).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the count must hold to show nothing else (late, duplicate) arrives.
const SETTLE: Duration = Duration::from_millis(300);

const INSTALL_HINT: &str = "pip install -r examples/python/requirements.txt";

/// The interpreter: `$PYTHON` if set, else `python3` from `PATH`.
fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Fails (never skips) when python3 or the example's requirements are missing.
async fn require_python() {
    let output = Command::new(python())
        .args([
            "-c",
            "import grpc, grpc_tools.protoc, google.protobuf, google.rpc.error_details_pb2",
        ])
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): install Python 3 and then `{INSTALL_HINT}`",
                python()
            )
        });
    assert!(
        output.status.success(),
        "the Python example's requirements are missing; run `{INSTALL_HINT}`\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What one run of the client reported.
struct Run {
    summary: Value,
    elapsed: Duration,
}

/// Runs `stream_resume.py` with `args`; asserts it exited 0 and returns its
/// one-line JSON summary (stdout) and wall time. Its stderr is passed through.
async fn run_client(args: &[&str]) -> Run {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("examples/python/stream_resume.py");
    let began = tokio::time::Instant::now();
    let child = Command::new(python())
        .arg(&script)
        .args(args)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); `{INSTALL_HINT}`", python()));
    let output = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {args:?} ran longer than {CLIENT_TIMEOUT:?}",
                script.display()
            )
        })
        .expect("wait for the Python client");
    let elapsed = began.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprint!("{stderr}");
    assert!(
        output.status.success(),
        "stream_resume.py {args:?} failed ({}); if a module is missing: `{INSTALL_HINT}`\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let line = stdout.lines().last().unwrap_or_default();
    let summary = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("summary line is not JSON ({e}): {stdout:?}"));
    Run { summary, elapsed }
}

fn number(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("summary has no number {key:?}: {summary}"))
}

fn expected_ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_streams_20000_events_on_one_stream() {
    const N: usize = 20_000;
    require_python().await;
    let queue = TestQueue::new("#").await;
    let server = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;
    let prefix = format!("{}-", unique("py"));
    let addr = server.addr.to_string();
    let count = N.to_string();

    let run = run_client(&[
        "--addr",
        &addr,
        "--count",
        &count,
        "--topic",
        "t",
        "--id-prefix",
        &prefix,
    ])
    .await;
    let summary = &run.summary;
    eprintln!(
        "python client: {N} events on one stream in {:.2?} ({:.0} events/s incl. start-up): {summary}",
        run.elapsed,
        N as f64 / run.elapsed.as_secs_f64()
    );
    assert_eq!(number(summary, "confirmed"), N as u64, "{summary}");
    assert_eq!(number(summary, "sent"), N as u64, "{summary}");
    assert_eq!(number(summary, "attempts"), 1, "one stream: {summary}");
    assert_eq!(summary["resumed_from"], serde_json::json!([]), "{summary}");

    // Confirmed means routed to the queue: all of them are there already.
    queue.assert_count_stays(N as u32, SETTLE).await;
    let ids = queue.message_ids().await;
    let expected = expected_ids(&prefix, N);
    assert_eq!(ids.len(), N);
    if let Some(i) = (0..N).find(|&i| ids[i] != expected[i]) {
        panic!(
            "message {i} in the queue is {:?}, expected {:?} (the stream's order)",
            ids[i], expected[i]
        );
    }

    server.stop().await.expect("service stops cleanly");
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_resumes_after_the_server_closes_an_idle_stream() {
    const N: usize = 2_000;
    const PAUSE_AFTER: u64 = 700;
    require_python().await;
    let queue = TestQueue::new("#").await;
    let mut config = test_config(AMQP_URL, &queue.exchange);
    config.stream_idle_timeout = Duration::from_millis(500);
    let server = spawn_ready_server(config).await;
    let prefix = format!("{}-", unique("py-resume"));
    let addr = server.addr.to_string();
    let count = N.to_string();
    let pause_after = PAUSE_AFTER.to_string();

    let run = run_client(&[
        "--addr",
        &addr,
        "--count",
        &count,
        "--topic",
        "t",
        "--id-prefix",
        &prefix,
        "--pause-after",
        &pause_after,
        "--pause-secs",
        "2",
    ])
    .await;
    let summary = &run.summary;
    eprintln!("python client resumed in {:.2?}: {summary}", run.elapsed);
    assert_eq!(number(summary, "confirmed"), N as u64, "{summary}");
    assert!(number(summary, "attempts") >= 2, "{summary}");
    let resumed_from: Vec<u64> = summary["resumed_from"]
        .as_array()
        .unwrap_or_else(|| panic!("resumed_from is not a list: {summary}"))
        .iter()
        .map(|v| v.as_u64().expect("resumed_from holds indexes"))
        .collect();
    assert!(
        resumed_from.contains(&PAUSE_AFTER),
        "the idle close should report {PAUSE_AFTER} confirmed and the client resume there: {summary}"
    );

    // Exactly once each: the resume re-sent nothing the first stream had confirmed.
    queue.assert_count_stays(N as u32, SETTLE).await;
    let ids = queue.message_ids().await;
    let distinct: HashSet<&String> = ids.iter().collect();
    let expected = expected_ids(&prefix, N);
    let expected: HashSet<&String> = expected.iter().collect();
    assert_eq!(ids.len(), N, "duplicates or losses in the queue");
    assert_eq!(distinct.len(), N, "some ids arrived more than once");
    assert!(
        distinct == expected,
        "the queue holds other ids than expected"
    );

    server.stop().await.expect("service stops cleanly");
    queue.cleanup().await;
}

/// Runs `retry_publish.py` (a plain stub with the shipped service config, no retry
/// code) with `args`: whether it exited 0, the ids it got OK for, its JSON summary.
async fn run_retry_client(args: Vec<String>) -> (bool, Vec<String>, Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("examples/python/retry_publish.py");
    let child = Command::new(python())
        .arg(&script)
        .args(&args)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); `{INSTALL_HINT}`", python()));
    let output = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .expect("retry_publish.py ran too long")
        .expect("wait for the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprint!("{stderr}");
    let summary = stderr
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary from retry_publish.py:\n{stderr}"));
    let ids = stdout.lines().map(str::to_owned).collect();
    (output.status.success(), ids, summary)
}

/// The RPC count of `Publish` calls answered with `code`, from `/metrics`.
async fn publish_answers(server: &crate::support::TestServer, code: &str) -> f64 {
    let (_, metrics) = crate::support::http_get(server.admin_addr, "/metrics").await;
    metrics
        .lines()
        .filter(|l| l.starts_with("ingest_rpc_duration_seconds_count"))
        .filter(|l| l.contains("rpc=\"Publish\"") && l.contains(&format!("code=\"{code}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// gRPC's own retry, configured only by `proto/ingest/v1/service_config.json`, gets
/// every call through a 2 s broker outage and through a buffer-full episode: the
/// client has no retry code, and the server's `grpc-retry-pushback-ms` sets the pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_python_stub_with_the_service_config_rides_out_an_outage_and_a_full_buffer() {
    require_python().await;
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut config = test_config(&proxy.amqp_url(), &queue.exchange);
    config.reconnect_max_backoff = Duration::from_millis(400);
    config.buffer_events = 4;
    config.max_batch_events = 4;
    let server = spawn_ready_server(config).await;
    let addr = server.addr.to_string();
    let args = |calls: &str, interval: &str, concurrency: &str, prefix: &str| {
        [
            "--addr",
            &addr,
            "--calls",
            calls,
            "--interval",
            interval,
            "--concurrency",
            concurrency,
            "--topic",
            "t",
            "--id-prefix",
            prefix,
        ]
        .map(str::to_owned)
        .to_vec()
    };

    // A 2 s outage while calls keep coming (40 calls, one every 100 ms).
    let client = tokio::spawn(run_retry_client(args("40", "0.1", "8", "outage-")));
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.set_mode(Mode::Refuse);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_mode(Mode::Forward);
    let (ok, ids, summary) = client.await.unwrap();
    eprintln!("outage: {summary}");
    assert!(ok, "calls failed across a 2 s outage: {summary}");
    assert_eq!(ids.len(), 40, "{summary}");
    let unavailable = publish_answers(&server, "Unavailable").await;
    assert!(unavailable > 0.0, "the outage was not seen by any call");

    // A full buffer: 4 events of room, 16 calls at once, a broker 50 ms away.
    proxy.set_latency(Duration::from_millis(50));
    let (ok, full_ids, summary) = run_retry_client(args("16", "0", "16", "full-")).await;
    eprintln!("buffer full: {summary}");
    assert!(ok, "calls failed across a full buffer: {summary}");
    assert_eq!(full_ids.len(), 16, "{summary}");
    let exhausted = publish_answers(&server, "ResourceExhausted").await;
    assert!(exhausted > 0.0, "the buffer never filled");
    eprintln!(
        "server answered UNAVAILABLE {unavailable} and RESOURCE_EXHAUSTED {exhausted} times; the client saw none"
    );
    proxy.set_latency(Duration::ZERO);

    // Every acknowledged event is in the queue (a retry after an ambiguous failure
    // may add a copy with the same id; none is missing).
    let landed: HashSet<String> = queue.message_ids().await.into_iter().collect();
    let missing: Vec<&String> = ids
        .iter()
        .chain(&full_ids)
        .filter(|id| !landed.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged, not in the queue: {missing:?}"
    );
    server.stop().await.expect("service stops cleanly");
    queue.cleanup().await;
}
