//! Soak: cycles every broker fault for minutes under continuous load and reports the
//! totals. Ignored by default; run it with
//!
//! ```sh
//! INGEST_SOAK_SECS=300 cargo test --release --test it soak -- --ignored --nocapture
//! ```

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    FaultProxy, Mode, PrivateNode, TestQueue, run_load, spawn_server, test_config,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run on demand (see the module docs)"]
async fn soak_cycles_broker_faults_under_load_and_loses_nothing() {
    let secs: u64 = std::env::var("INGEST_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let node = PrivateNode::start().await;
    let mut queue = TestQueue::new_at(&node.amqp_url(), "#").await;
    let proxy = FaultProxy::start(node.amqp_addr()).await;
    let mut config = test_config(&proxy.amqp_url(), &queue.exchange);
    config.buffer_events = 2000;
    config.reconnect_max_backoff = Duration::from_millis(500);
    config.confirm_timeout = Duration::from_secs(5);
    config.stream_stall_timeout = Duration::from_secs(10);
    let server = spawn_server(config).await;
    server
        .wait_health(ServingStatus::Serving, Duration::from_secs(30))
        .await;
    let client = server.client().await;

    let load = tokio::spawn({
        let client = client.clone();
        async move { run_load(&client, Duration::from_secs(secs), 6, 3, 10).await }
    });
    let end = tokio::time::Instant::now() + Duration::from_secs(secs.saturating_sub(10));
    let mut cycle = 0u32;
    let pause = || tokio::time::sleep(Duration::from_secs(3));
    while tokio::time::Instant::now() < end {
        cycle += 1;
        eprintln!("soak cycle {cycle}: cut");
        proxy.cut();
        pause().await;
        eprintln!("soak cycle {cycle}: stall 2 s");
        proxy.set_mode(Mode::Stall);
        tokio::time::sleep(Duration::from_secs(2)).await;
        proxy.set_mode(Mode::Forward);
        pause().await;
        eprintln!("soak cycle {cycle}: slow (20 ms)");
        proxy.set_latency(Duration::from_millis(20));
        pause().await;
        proxy.set_latency(Duration::ZERO);
        eprintln!("soak cycle {cycle}: broker restart");
        node.stop_app().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        node.start_app().await;
        pause().await;
        eprintln!("soak cycle {cycle}: memory alarm 2 s");
        node.set_memory_alarm(true).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        node.set_memory_alarm(false).await;
        pause().await;
    }
    let report = load.await.unwrap();
    server
        .wait_health(ServingStatus::Serving, Duration::from_secs(30))
        .await;
    server.wait_admission_idle(Duration::from_secs(30)).await;
    queue.reconnect().await;
    let totals = report.totals(&queue).await;
    eprintln!(
        "soak totals after {cycle} fault cycles in {secs} s: sent {}, acked {}, errored {} {:?}, in broker {}, duplicates {}, lost {}",
        report.sent.len(),
        report.acked.len(),
        report.errors(),
        report.errored,
        totals.landed,
        totals.duplicates,
        totals.lost.len()
    );
    assert!(
        totals.lost.is_empty(),
        "acknowledged but not in the broker: {:?}",
        totals.lost
    );
    assert!(
        totals.unsent.is_empty(),
        "in the broker but never sent: {:?}",
        totals.unsent
    );
    assert_eq!(totals.duplicates, 0);
    assert_eq!(
        report.acked.len() + report.errors(),
        report.sent.len(),
        "sent => acked or failed"
    );
    server.stop().await.unwrap();
    queue.cleanup().await;
}
