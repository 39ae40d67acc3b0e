//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (connected to RabbitMQ and not draining; when not, the body says
//! why, e.g. `not connected to RabbitMQ: authentication refused for user guest — check
//! INGEST_AMQP_URL`), for Kubernetes probes, load balancers and scrapers that do not
//! speak gRPC.

use std::future::Future;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    publisher::{BrokerState, LastError, Publisher},
    telemetry::Metrics,
};

#[derive(Clone)]
struct Admin {
    metrics: Metrics,
    broker: watch::Receiver<BrokerState>,
    /// Why the broker is not connected, shown in `/readyz`.
    last_error: LastError,
    /// The node the connection goes to, shown in `/readyz` when ready.
    node: LastError,
    /// What `/readyz` says while the broker is stalled.
    stall_reason: String,
    draining: CancellationToken,
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    publisher: Publisher,
    draining: CancellationToken,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let broker = publisher.watch_state();
    let last_error = publisher.last_error();
    let node = publisher.node();
    let stall_reason = publisher.stall_reason();
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Admin {
            metrics,
            broker,
            last_error,
            node,
            stall_reason,
            draining,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_text(State(admin): State<Admin>) -> ([(&'static str, &'static str); 1], String) {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        admin.metrics.render(),
    )
}

async fn ready(State(admin): State<Admin>) -> (StatusCode, String) {
    if admin.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned());
    }
    let state = *admin.broker.borrow();
    if !state.connected {
        let body = match admin.last_error.get() {
            Some(reason) => format!("not connected to RabbitMQ: {reason}\n"),
            None => "not connected to RabbitMQ (connecting)\n".to_owned(),
        };
        return (StatusCode::SERVICE_UNAVAILABLE, body);
    }
    if state.stalled {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", admin.stall_reason),
        );
    }
    match admin.node.get() {
        Some(node) => (
            StatusCode::OK,
            format!("ready: connected to RabbitMQ node={node}\n"),
        ),
        None => (StatusCode::OK, "ready\n".to_owned()),
    }
}
