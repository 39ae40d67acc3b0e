//! The example clients in other languages against the real service and broker:
//! `examples/python/publish.py` (grpcio: one unary `Publish`, then a batch over
//! `PublishStream`) and `examples/node/publish.js` (@grpc/grpc-js, one unary
//! `Publish`). What they print as confirmed is read back from the queue: the same
//! ids, in order, each once, with the JSON payload and content type they sent.
//! While the broker is away they are answered `UNAVAILABLE` with a 1 s `RetryInfo`,
//! wait that long, and retry with the same ids until it is back.
//!
//! Needs python3 with the Python example's requirements and node with the Node
//! example's packages. A missing one fails the test and says what to install:
//! `pip install -r examples/python/requirements.txt`, `npm ci --prefix examples/node`.

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use lapin::message::BasicGetMessage;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
    sync::watch,
};

use crate::support::{
    AMQP_ADDR, AMQP_URL, FaultProxy, Mode, TestQueue, TestServer, UNBOUND_TOPIC,
    spawn_ready_server, spawn_server, test_config, unique,
};

/// Upper bound for one run of a client (Python stub generation included).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a client may take to report its first `UNAVAILABLE`.
const FIRST_REFUSAL: Duration = Duration::from_secs(60);
/// How long the count must hold to show nothing else (late, duplicate) arrives.
const SETTLE: Duration = Duration::from_millis(300);
/// How long confirmed messages may take to be counted in the queue.
const ARRIVE: Duration = Duration::from_secs(5);

const PYTHON_HINT: &str = "pip install -r examples/python/requirements.txt";
const NODE_HINT: &str = "npm ci --prefix examples/node";

/// The interpreter: `$PYTHON` if set, else `python3` from `PATH`.
fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// The Node.js binary: `$NODE` if set, else `node` from `PATH`.
fn node() -> String {
    std::env::var("NODE").unwrap_or_else(|_| "node".to_owned())
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A client program and how to run it.
struct Client {
    /// The interpreter.
    program: String,
    /// The script, absolute.
    script: PathBuf,
    /// What to install when it cannot run.
    hint: &'static str,
}

impl Client {
    fn python() -> Client {
        Client {
            program: python(),
            script: root().join("examples/python/publish.py"),
            hint: PYTHON_HINT,
        }
    }

    fn node() -> Client {
        Client {
            program: node(),
            script: root().join("examples/node/publish.js"),
            hint: NODE_HINT,
        }
    }

    fn name(&self) -> String {
        self.script
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    /// Starts the client with `args`, `INGEST_ADDR` = `addr`.
    fn spawn(&self, addr: &str, args: &[&str]) -> tokio::process::Child {
        Command::new(&self.program)
            .arg(&self.script)
            .args(args)
            .env("INGEST_ADDR", addr)
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}): install it, then `{}`",
                    self.program, self.hint
                )
            })
    }
}

/// Fails (never skips) when python3 or the Python example's requirements are missing.
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
                "cannot run {} ({e}): install Python 3 and then `{PYTHON_HINT}`",
                python()
            )
        });
    assert!(
        output.status.success(),
        "the Python example's requirements are missing; run `{PYTHON_HINT}`\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Fails (never skips) when node or the Node example's packages are missing.
async fn require_node() {
    let output = Command::new(node())
        .args([
            "-e",
            "for (const m of ['@grpc/grpc-js', '@grpc/proto-loader', 'protobufjs']) require(m)",
        ])
        // `node -e` resolves packages from the working directory.
        .current_dir(root().join("examples/node"))
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): install Node.js (18.3 or later) and then `{NODE_HINT}`",
                node()
            )
        });
    assert!(
        output.status.success(),
        "the Node example's packages are missing; run `{NODE_HINT}`\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// How a client run ended.
struct Run {
    status: ExitStatus,
    /// The ids it printed as confirmed, in order.
    ids: Vec<String>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Panics with the client's output unless it exited 0.
    fn assert_success(&self, client: &Client) {
        assert!(
            self.status.success(),
            "{} failed ({}); if a module or package is missing: `{}`\nstdout:\n{}\nstderr:\n{}",
            client.name(),
            self.status,
            client.hint,
            self.stdout,
            self.stderr
        );
    }
}

/// Collects a child's stderr line by line (passing it through) and flips a flag
/// once a line contains `needle`.
fn watch_stderr(
    child: &mut tokio::process::Child,
    needle: &'static str,
) -> (
    watch::Receiver<bool>,
    tokio::task::JoinHandle<String>,
    Arc<Mutex<String>>,
) {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (seen_tx, seen) = watch::channel(false);
    let text = Arc::new(Mutex::new(String::new()));
    let collected = Arc::clone(&text);
    let task = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            if line.contains(needle) {
                seen_tx.send_replace(true);
            }
            let mut all = collected.lock().unwrap();
            all.push_str(&line);
            all.push('\n');
        }
        collected.lock().unwrap().clone()
    });
    (seen, task, text)
}

/// Waits for `child` (bounded by [`CLIENT_TIMEOUT`]) and returns how it ended.
async fn finish(
    client: &Client,
    child: tokio::process::Child,
    stderr: tokio::task::JoinHandle<String>,
) -> Run {
    let output = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} ran longer than {CLIENT_TIMEOUT:?}", client.name()))
        .expect("wait for the client");
    let stderr = stderr.await.expect("stderr reader");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    Run {
        status: output.status,
        ids: stdout.lines().map(str::to_owned).collect(),
        stdout,
        stderr,
    }
}

/// Runs `client` against `server` to the end.
async fn run(client: &Client, server: &TestServer, args: &[&str]) -> Run {
    let mut child = client.spawn(&server.addr.to_string(), args);
    let (_, stderr, _) = watch_stderr(&mut child, "UNAVAILABLE");
    finish(client, child, stderr).await
}

/// Runs `client` against a service whose broker is unreachable (a proxy refusing
/// connections) until the client reports `UNAVAILABLE`, then lets the broker through.
async fn run_through_an_outage(client: &Client, queue: &TestQueue, args: &[&str]) -> Run {
    let proxy = FaultProxy::start_in(AMQP_ADDR.parse().unwrap(), Mode::Refuse).await;
    let mut config = test_config(&proxy.amqp_url(), &queue.exchange);
    // Reconnect soon after the proxy lets the broker through.
    config.reconnect_max_backoff = Duration::from_millis(200);
    // A stream waiting for the broker ends UNAVAILABLE soon, so it is retried.
    config.stream_stall_timeout = Duration::from_millis(300);
    let server = spawn_server(config).await;

    let mut child = client.spawn(&server.addr.to_string(), args);
    let (mut refused, stderr, so_far) = watch_stderr(&mut child, "UNAVAILABLE");
    if tokio::time::timeout(FIRST_REFUSAL, refused.wait_for(|seen| *seen))
        .await
        .is_err()
    {
        panic!(
            "{} reported no UNAVAILABLE within {FIRST_REFUSAL:?} while the broker was away; \
             stderr so far:\n{}",
            client.name(),
            so_far.lock().unwrap()
        );
    }
    proxy.set_mode(Mode::Forward);
    let run = finish(client, child, stderr).await;
    server.stop().await.expect("service stops cleanly");
    run
}

/// Waits for exactly `n` messages (and no more arriving), then takes them all.
async fn take_exactly(queue: &TestQueue, n: usize) -> Vec<BasicGetMessage> {
    let n = u32::try_from(n).unwrap();
    assert_eq!(queue.wait_for_count(n, ARRIVE).await, n);
    queue.assert_count_stays(n, SETTLE).await;
    queue.take_all().await
}

/// The message ids, each checked to carry a JSON payload labelled as such.
fn checked_ids(messages: &[BasicGetMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            let props = &m.delivery.properties;
            let id = props
                .message_id()
                .as_ref()
                .expect("message has no message_id")
                .to_string();
            assert_eq!(
                props.content_type().as_ref().map(|c| c.as_str()),
                Some("application/json"),
                "{id}"
            );
            assert_eq!(*props.delivery_mode(), Some(2), "{id}: persistent");
            assert!(props.timestamp().is_some(), "{id}: the event time is set");
            serde_json::from_slice::<serde_json::Value>(&m.delivery.data)
                .unwrap_or_else(|e| panic!("{id}: payload is not JSON ({e})"));
            id
        })
        .collect()
}

fn python_ids(prefix: &str, unary: bool, stream: usize) -> Vec<String> {
    let unary = unary.then(|| format!("{prefix}unary"));
    unary
        .into_iter()
        .chain((0..stream).map(|i| format!("{prefix}stream-{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_publishes_one_event_unary_and_a_batch_on_a_stream() {
    const N: usize = 25;
    require_python().await;
    let client = Client::python();
    let queue = TestQueue::new("#").await;
    let server = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;
    let prefix = format!("{}-", unique("py-publish"));

    let run = run(
        &client,
        &server,
        &[
            "--topic",
            "orders.created",
            "--count",
            &N.to_string(),
            "--batch",
            "4",
            "--id-prefix",
            &prefix,
        ],
    )
    .await;
    run.assert_success(&client);
    let expected = python_ids(&prefix, true, N);
    assert_eq!(
        run.ids, expected,
        "printed ids: the unary one, then the batch"
    );
    assert!(
        run.stderr
            .contains(&format!("{} of {} events confirmed", N + 1, N + 1)),
        "{}",
        run.stderr
    );

    // Confirmed means in the queue, each once, in the order sent.
    let messages = take_exactly(&queue, N + 1).await;
    assert_eq!(checked_ids(&messages), expected);
    assert!(
        messages
            .iter()
            .all(|m| m.delivery.routing_key.as_str() == "orders.created")
    );

    server.stop().await.expect("service stops cleanly");
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_names_the_event_and_fails_when_it_is_refused() {
    require_python().await;
    let client = Client::python();
    // Bound to every topic but one-word ones: the example's events to UNBOUND_TOPIC
    // are unroutable, and anything else it published (say, to its default topic)
    // would land in the queue.
    let queue = TestQueue::all_but_one_word_topics().await;
    let server = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;
    let prefix = format!("{}-", unique("py-refused"));

    let run = run(
        &client,
        &server,
        &[
            "--topic",
            UNBOUND_TOPIC,
            "--only",
            "unary",
            "--id-prefix",
            &prefix,
        ],
    )
    .await;
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.ids.is_empty(), "nothing confirmed: {:?}", run.ids);
    assert!(
        run.stderr.contains("FAILED_PRECONDITION") && run.stderr.contains("UNROUTABLE"),
        "the refusal and its precondition are printed:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!("{prefix}unary")),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("retrying"),
        "not retryable:\n{}",
        run.stderr
    );
    queue.assert_count_stays(0, SETTLE).await;

    server.stop().await.expect("service stops cleanly");
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_retries_after_the_servers_delay_while_the_broker_is_away() {
    const N: usize = 10;
    require_python().await;
    let client = Client::python();
    let queue = TestQueue::new("#").await;
    let prefix = format!("{}-", unique("py-outage"));

    let run = run_through_an_outage(
        &client,
        &queue,
        &["--count", &N.to_string(), "--id-prefix", &prefix],
    )
    .await;
    run.assert_success(&client);
    assert!(
        run.stderr
            .contains("Publish attempt 1 ended with UNAVAILABLE"),
        "{}",
        run.stderr
    );
    // The server's hint (at least --retry-after, 250 ms), not the client's own first
    // backoff (100 ms).
    let waited = number_after(
        &run.stderr,
        "Publish attempt 1 ended with UNAVAILABLE",
        " in ",
        "s",
    );
    assert!(
        waited >= 0.25,
        "the unary call waits the server's RetryInfo ({waited} s), not its own backoff:\n{}",
        run.stderr
    );
    let expected = python_ids(&prefix, true, N);
    assert_eq!(run.ids, expected);

    // Each once: the refused attempts published nothing.
    let messages = take_exactly(&queue, N + 1).await;
    assert_eq!(checked_ids(&messages), expected);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_resumes_its_stream_after_the_broker_comes_back() {
    const N: usize = 12;
    require_python().await;
    let client = Client::python();
    let queue = TestQueue::new("#").await;
    let prefix = format!("{}-", unique("py-resume"));

    let run = run_through_an_outage(
        &client,
        &queue,
        &[
            "--only",
            "stream",
            "--count",
            &N.to_string(),
            "--batch",
            "5",
            "--id-prefix",
            &prefix,
        ],
    )
    .await;
    run.assert_success(&client);
    assert!(
        run.stderr
            .contains("PublishStream attempt 1 ended with UNAVAILABLE")
            && run.stderr.contains(&format!(
                "0 more confirmed, resuming at {prefix}stream-0 in 1.00s"
            )),
        "the stream is resumed from ingest-confirmed-count after the server's delay:\n{}",
        run.stderr
    );
    let expected = python_ids(&prefix, false, N);
    assert_eq!(run.ids, expected);
    let messages = take_exactly(&queue, N).await;
    assert_eq!(checked_ids(&messages), expected);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_publishes_one_event_with_its_id() {
    require_node().await;
    let client = Client::node();
    let queue = TestQueue::new("#").await;
    let server = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;
    let id = unique("node-publish");

    let run = run(
        &client,
        &server,
        &["--topic", "orders.created", "--id", &id],
    )
    .await;
    run.assert_success(&client);
    assert_eq!(run.ids, [id.as_str()], "prints the confirmed id");

    let messages = take_exactly(&queue, 1).await;
    assert_eq!(checked_ids(&messages), [id]);
    assert_eq!(messages[0].delivery.routing_key.as_str(), "orders.created");

    server.stop().await.expect("service stops cleanly");
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_without_an_id_prints_the_one_it_generated() {
    require_node().await;
    let client = Client::node();
    let queue = TestQueue::new("#").await;
    let server = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;

    let run = run(&client, &server, &[]).await;
    run.assert_success(&client);
    assert_eq!(run.ids.len(), 1, "{}", run.stdout);
    assert!(run.ids[0].starts_with("node-"), "{:?}", run.ids);

    let messages = take_exactly(&queue, 1).await;
    assert_eq!(checked_ids(&messages), run.ids);

    server.stop().await.expect("service stops cleanly");
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_names_the_event_and_fails_when_it_is_refused() {
    require_node().await;
    let client = Client::node();
    // As for the Python example: UNBOUND_TOPIC is unroutable, anything else lands.
    let queue = TestQueue::all_but_one_word_topics().await;
    let server = spawn_ready_server(test_config(AMQP_URL, &queue.exchange)).await;
    let id = unique("node-refused");

    let run = run(&client, &server, &["--topic", UNBOUND_TOPIC, "--id", &id]).await;
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.ids.is_empty(), "nothing confirmed: {:?}", run.ids);
    assert!(
        run.stderr.contains("FAILED_PRECONDITION")
            && run.stderr.contains("UNROUTABLE")
            && run.stderr.contains(&id),
        "the refusal, its precondition and the id are printed:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("retrying"),
        "not retryable:\n{}",
        run.stderr
    );
    queue.assert_count_stays(0, SETTLE).await;

    server.stop().await.expect("service stops cleanly");
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_retries_after_the_servers_delay_while_the_broker_is_away() {
    require_node().await;
    let client = Client::node();
    let queue = TestQueue::new("#").await;
    let id = unique("node-outage");

    let run = run_through_an_outage(&client, &queue, &["--id", &id]).await;
    run.assert_success(&client);
    assert!(
        run.stderr.contains("attempt 1 ended with UNAVAILABLE"),
        "{}",
        run.stderr
    );
    let waited = number_after(
        &run.stderr,
        "attempt 1 ended with UNAVAILABLE",
        "retrying in ",
        " ms",
    );
    assert!(
        waited >= 250.0,
        "waits the server's RetryInfo ({waited} ms, at least --retry-after), not its own backoff:\n{}",
        run.stderr
    );
    assert_eq!(run.ids, [id.as_str()]);
    let messages = take_exactly(&queue, 1).await;
    assert_eq!(checked_ids(&messages), [id]);
    queue.cleanup().await;
}

/// The number between the last `before` and `unit` on the first line of `text`
/// holding `line`.
fn number_after(text: &str, line: &str, before: &str, unit: &str) -> f64 {
    let found = text
        .lines()
        .find(|l| l.contains(line))
        .unwrap_or_else(|| panic!("no line with {line:?} in:\n{text}"));
    let rest = found
        .rsplit_once(before)
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("no {before:?} in {found:?}"));
    let number = rest.split_once(unit).map_or(rest, |(n, _)| n);
    number
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no number before {unit:?} in {found:?}"))
}
