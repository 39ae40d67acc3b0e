//! Shared integration-test kit: a TCP fault proxy to break the broker link on
//! demand, and broker-side helpers to observe what was actually published.
#![allow(dead_code, unused_imports)]

mod broker;
mod child;
mod cluster;
mod load;
pub mod pki;
mod private_node;
mod proxy;
mod server;

pub use broker::{
    AMQP_ADDR, AMQP_URL, TestQueue, UNBOUND_TOPIC, assert_exactly_once, connect_broker, unique,
};
pub use child::ChildServer;
pub use cluster::{Cluster, NODES as CLUSTER_NODES};
pub use load::{Load, LoadReport, run_load, run_load_with};
pub use private_node::{NodeTls, PrivateNode};
pub use proxy::{CHUNK as PROXY_CHUNK, FaultProxy, Mode};
pub use server::{
    TestServer, http_get, json_event, publish_until_ok, request, sample, spawn_ready_server,
    spawn_server, test_config,
};

/// Waits until `counter` (what a caller handed over) stops growing for `quiet`: the
/// caller is stalled. Fails naming `what` if it still grows after `guard`.
pub async fn until_it_stops_growing(
    counter: &std::sync::atomic::AtomicUsize,
    what: &str,
    quiet: std::time::Duration,
    guard: std::time::Duration,
) -> usize {
    use std::sync::atomic::Ordering;
    let mut last = usize::MAX;
    let deadline = tokio::time::Instant::now() + guard;
    loop {
        tokio::time::sleep(quiet).await;
        let now = counter.load(Ordering::SeqCst);
        if now == last {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never stalled ({now} taken)"
        );
        last = now;
    }
}
