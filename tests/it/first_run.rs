//! What a new user meets on a first run of the real binary, with the default log filter
//! (no `RUST_LOG`): a wrong AMQP password is named once in the log, in `/readyz` and in
//! the `UNAVAILABLE` a caller gets, with none of lapin's own lines; the start-up line
//! names both addresses; host names are accepted as listen addresses; and
//! `INGEST_BUFFER_EVENTS` set alone below the default batch limit starts the service.

use std::{
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use ingest::proto::ingest_client::IngestClient;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::{Instant, sleep, timeout},
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{AMQP_URL, TestQueue, json_event, request, unique};

/// Longest wait for the child to reach a state it reaches in well under a second here.
const GUARD: Duration = Duration::from_secs(15);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// The `ingest` binary listening on `localhost:<free port>` (gRPC and admin), stderr
/// captured, `RUST_LOG` unset so the default filter applies; killed on drop.
struct FirstRun {
    child: Option<Child>,
    grpc: u16,
    admin: u16,
}

impl FirstRun {
    fn start(env: &[(&str, &str)]) -> Self {
        let (grpc, admin) = (free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
        command
            .args(["--listen", &format!("localhost:{grpc}")])
            .args(["--admin-listen", &format!("localhost:{admin}")])
            .env_remove("RUST_LOG")
            .env_remove("INGEST_BUFFER_EVENTS")
            .env_remove("INGEST_MAX_BATCH_EVENTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        Self {
            child: Some(command.spawn().unwrap()),
            grpc,
            admin,
        }
    }

    /// `GET path` on the admin listener: status and body, `None` while it does not
    /// accept connections yet.
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.admin))
                .await
                .ok()?;
            let head = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
            stream.write_all(head.as_bytes()).await.ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await.ok()?;
            let status = response.split_whitespace().nth(1)?.parse().ok()?;
            let body = response.split_once("\r\n\r\n")?.1.to_owned();
            Some((status, body))
        };
        timeout(Duration::from_secs(5), exchange)
            .await
            .ok()
            .flatten()
    }

    /// Polls `/readyz` until `done` holds for its answer, which it returns.
    async fn readyz_until(&self, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
        let deadline = Instant::now() + GUARD;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.get("/readyz").await;
            if let Some((status, body)) = &last
                && done(*status, body)
            {
                return (*status, body.clone());
            }
            sleep(Duration::from_millis(50)).await;
        }
        panic!("/readyz never reached the expected state; last answer {last:?}");
    }

    async fn client(&self) -> IngestClient<tonic::transport::Channel> {
        let url = format!("http://localhost:{}", self.grpc);
        timeout(GUARD, IngestClient::connect(url))
            .await
            .expect("connect timed out")
            .expect("connect")
    }

    /// SIGTERM, then the exit status and everything the process logged.
    async fn stop(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + GUARD;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("ingest did not exit within {GUARD:?} of SIGTERM");
            }
            sleep(Duration::from_millis(20)).await;
        }
        let Output { status, stderr, .. } = child.wait_with_output().unwrap();
        (status, String::from_utf8_lossy(&stderr).into_owned())
    }
}

impl Drop for FirstRun {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The start-up line names both listeners plainly: `listen=IP:PORT admin=IP:PORT`.
fn assert_start_up_line(log: &str, run_grpc: u16, run_admin: u16) {
    let line = log
        .lines()
        .find(|l| l.contains("serving gRPC"))
        .unwrap_or_else(|| panic!("no start-up line in:\n{log}"));
    assert!(!line.contains("Some("), "{line}");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .parse::<std::net::SocketAddr>()
            .unwrap_or_else(|e| panic!("{name} is not IP:port ({e}) in {line}"))
    };
    let (listen, admin) = (field("listen="), field("admin="));
    // `localhost` was resolved to a loopback address.
    assert!(
        listen.ip().is_loopback() && listen.port() == run_grpc,
        "{line}"
    );
    assert!(
        admin.ip().is_loopback() && admin.port() == run_admin,
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_named_once_in_the_log_in_readyz_and_to_callers() {
    let started = Instant::now();
    let url = AMQP_URL.replace("guest:guest@", "guest:not-the-password@");
    let run = FirstRun::start(&[
        ("INGEST_AMQP_URL", &url),
        ("INGEST_EXCHANGE", &unique("ingest-test-auth")),
    ]);
    let reason = "authentication refused for user guest — check INGEST_AMQP_URL";

    let (status, body) = run
        .readyz_until(|_, body| body.contains("authentication"))
        .await;
    assert_eq!(status, 503);
    assert_eq!(body, format!("not connected to RabbitMQ: {reason}\n"));

    let refused = run
        .client()
        .await
        .publish(request(vec![json_event("orders.created", "auth-1", "{}")]))
        .await
        .expect_err("no broker connection: the call must be refused");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.message(),
        format!("not connected to RabbitMQ: {reason}")
    );
    // The hint follows the reconnect schedule, within 1 s and 5 s.
    let retry = refused.get_details_retry_info().expect("RetryInfo");
    let delay = retry.retry_delay.expect("a delay");
    assert!(
        delay >= Duration::from_secs(1) && delay <= Duration::from_secs(5),
        "{delay:?}"
    );

    // Long enough for several attempts (backoff from 100 ms, doubling): before the fix,
    // lapin alone wrote 24 ERROR lines in 12 s, and ingest a WARN per attempt.
    sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let (grpc, admin) = (run.grpc, run.admin);
    let (exit, log) = run.stop().await;
    assert!(exit.success(), "{exit:?}\n{log}");
    let mentions: Vec<_> = log.lines().filter(|l| l.contains(reason)).collect();
    assert_eq!(mentions.len(), 1, "the reason once, not per retry:\n{log}");
    assert!(mentions[0].contains("ERROR"), "{}", mentions[0]);
    let lapin: Vec<_> = log.lines().filter(|l| l.contains("lapin")).collect();
    assert!(
        lapin.is_empty(),
        "lapin's own lines in the default log:\n{log}"
    );
    assert_start_up_line(&log, grpc, admin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_set_alone_below_the_default_batch_limit_starts_and_bounds_requests() {
    let exchange = unique("ingest-test-small-buffer");
    let queue = TestQueue::bind_existing(&exchange, "#").await;
    let run = FirstRun::start(&[
        ("INGEST_AMQP_URL", AMQP_URL),
        ("INGEST_EXCHANGE", &exchange),
        ("INGEST_BUFFER_EVENTS", "50"),
    ]);
    let (_, body) = run.readyz_until(|status, _| status == 200).await;
    assert_eq!(body, "ready: connected to RabbitMQ node=127.0.0.1:5672\n");

    let mut client = run.client().await;
    let batch = |n: usize| {
        let ids = (0..n).map(|i| format!("small-{i}"));
        request(
            ids.map(|id| json_event("orders.created", &id, "{}"))
                .collect(),
        )
    };
    let ids = client
        .publish(batch(50))
        .await
        .expect("50 = the buffer")
        .into_inner()
        .ids;
    assert_eq!(ids.len(), 50);
    let refused = client
        .publish(batch(51))
        .await
        .expect_err("51 > the batch limit");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(queue.wait_for_count(50, GUARD).await, 50);

    let (grpc, admin) = (run.grpc, run.admin);
    let (exit, log) = run.stop().await;
    assert!(exit.success(), "{exit:?}\n{log}");
    let notices: Vec<_> = log
        .lines()
        .filter(|l| l.contains("INGEST_MAX_BATCH_EVENTS not set: using 50"))
        .collect();
    assert_eq!(notices.len(), 1, "{log}");
    assert_start_up_line(&log, grpc, admin);
    queue.cleanup().await;
}
