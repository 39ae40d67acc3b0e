//! SIGTERM against the real binary: in-flight calls finish, then the process exits.

use std::{
    collections::BTreeSet,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use futures::future::join_all;
use ingest::proto::ingest_client::IngestClient;
use tonic::transport::Channel;

use crate::support::{AMQP_ADDR, FaultProxy, Mode, TestQueue, json_event, request, unique};

const GUARD: Duration = Duration::from_secs(30);

/// The `ingest` binary as a child process, killed on drop if still running.
struct ChildServer {
    child: Child,
    addr: String,
}

impl ChildServer {
    fn start(amqp_url: &str, exchange: &str, drain_timeout: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_ingest"))
            .env("INGEST_LISTEN", &addr)
            .env("INGEST_ADMIN_LISTEN", "127.0.0.1:0")
            .env("INGEST_AMQP_URL", amqp_url)
            .env("INGEST_EXCHANGE", exchange)
            .env("INGEST_DRAIN_TIMEOUT", drain_timeout)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self { child, addr }
    }

    /// Connects once the server listens and reports SERVING.
    async fn ready_client(&self) -> IngestClient<Channel> {
        let deadline = tokio::time::Instant::now() + GUARD;
        loop {
            if let Ok(channel) = Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
            {
                let mut health =
                    tonic_health::pb::health_client::HealthClient::new(channel.clone());
                let status = health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .map(|r| r.into_inner().status());
                if matches!(
                    status,
                    Ok(tonic_health::pb::health_check_response::ServingStatus::Serving)
                ) {
                    return IngestClient::new(channel);
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ingest did not become SERVING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + GUARD;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ingest did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_with_calls_in_flight_completes_them_and_exits_zero() {
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut server = ChildServer::start(&proxy.amqp_url(), &queue.exchange, "20s");
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
    let landed: BTreeSet<String> = queue.message_ids().await.into_iter().collect();
    assert_eq!(landed, acked);
    assert_eq!(landed.len(), 50);
    queue.cleanup().await;
}

#[tokio::test]
async fn sigterm_drain_deadline_passed_with_unconfirmed_events_exits_nonzero_and_acks_nothing() {
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut server = ChildServer::start(&proxy.amqp_url(), &queue.exchange, "1s");
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
    assert!(
        !status.success(),
        "unconfirmed events at the deadline must give a non-zero exit"
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
