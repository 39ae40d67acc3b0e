//! Broker faults behind the TCP proxy: absent at start, stalled under load.

use std::{collections::BTreeSet, time::Duration};

use futures::{StreamExt, stream::FuturesUnordered};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

use crate::support::{
    AMQP_ADDR, FaultProxy, Mode, TestQueue, json_event, request, spawn_server, test_config, unique,
};

/// Generous guard so a broken test fails instead of hanging; not a performance bound.
const GUARD: Duration = Duration::from_secs(20);

#[tokio::test]
async fn broker_absent_at_start_is_not_serving_and_fails_fast_then_recovers() {
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start_in(AMQP_ADDR.parse().unwrap(), Mode::Refuse).await;
    let mut config = test_config(&proxy.amqp_url(), &queue.exchange);
    config.reconnect_max_backoff = Duration::from_millis(300);
    let server = spawn_server(config).await;
    let mut client = server.client().await;

    assert_eq!(server.health("").await, ServingStatus::NotServing);
    assert_eq!(
        server.health("ingest.v1.Ingest").await,
        ServingStatus::NotServing
    );

    // The broker stays away for the whole call: an answer at all means it did not wait.
    let status = tokio::time::timeout(
        GUARD,
        client.publish(request(vec![json_event("t", "a", "{}")])),
    )
    .await
    .expect("Publish must fail fast while the broker is down")
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.get_details_retry_info().is_some(),
        "UNAVAILABLE carries RetryInfo"
    );
    assert_eq!(server.admission.in_use().events, 0);

    proxy.set_mode(Mode::Forward);
    server.wait_health(ServingStatus::Serving, GUARD).await;
    let ids = client
        .publish(request(vec![json_event("t", "after-recovery", "{}")]))
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(ids, vec!["after-recovery"]);
    assert_eq!(queue.message_ids().await, vec!["after-recovery"]);

    server.stop().await.unwrap();
    queue.cleanup().await;
}

#[tokio::test]
async fn stalled_broker_pushes_back_unary_callers_and_admitted_calls_complete() {
    const BUFFER: usize = 10;
    const CALLERS: usize = 40;
    let queue = TestQueue::new("#").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut config = test_config(&proxy.amqp_url(), &queue.exchange);
    config.buffer_events = BUFFER;
    config.max_batch_events = 1;
    config.confirm_timeout = Duration::from_secs(60);
    let server = spawn_server(config).await;
    server.wait_health(ServingStatus::Serving, GUARD).await;
    let client = server.client().await;

    proxy.set_mode(Mode::Stall);
    let mut calls: FuturesUnordered<_> = (0..CALLERS)
        .map(|i| {
            let mut client = client.clone();
            let id = unique(&format!("stall-{i}"));
            async move {
                let result = client
                    .publish(request(vec![json_event("t", &id, "{}")]))
                    .await;
                (id, result)
            }
        })
        .collect();

    // Every caller beyond the buffer is refused while the broker is still stalled.
    let mut exhausted = 0;
    while exhausted < CALLERS - BUFFER {
        let (_, result) = tokio::time::timeout(GUARD, calls.next())
            .await
            .expect("callers beyond the buffer must be answered while the broker is stalled")
            .unwrap();
        let status = result.expect_err("nothing can be confirmed while the broker is stalled");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let retry = status
            .get_details_retry_info()
            .expect("RESOURCE_EXHAUSTED carries RetryInfo");
        assert!(retry.retry_delay.is_some());
        exhausted += 1;
    }
    assert_eq!(server.admission.in_use().events, BUFFER);
    assert_eq!(queue.count().await, 0);

    proxy.set_mode(Mode::Forward);
    let mut confirmed = BTreeSet::new();
    while let Some((id, result)) = tokio::time::timeout(GUARD, calls.next()).await.unwrap() {
        let ids = result
            .expect("admitted calls complete once the broker is back")
            .into_inner()
            .ids;
        assert_eq!(ids, vec![id.clone()]);
        confirmed.insert(id);
    }
    assert_eq!(confirmed.len(), BUFFER);
    let landed: BTreeSet<String> = queue.message_ids().await.into_iter().collect();
    assert_eq!(
        landed, confirmed,
        "the queue holds exactly the acknowledged events"
    );
    server.wait_admission_idle(GUARD).await;

    server.stop().await.unwrap();
    queue.cleanup().await;
}
