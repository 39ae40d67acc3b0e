//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (connected to RabbitMQ and not draining), for Kubernetes probes,
//! load balancers and scrapers that do not speak gRPC.

use std::future::Future;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{publisher::BrokerState, telemetry::Metrics};

#[derive(Clone)]
struct Admin {
    metrics: Metrics,
    broker: watch::Receiver<BrokerState>,
    draining: CancellationToken,
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    broker: watch::Receiver<BrokerState>,
    draining: CancellationToken,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Admin {
            metrics,
            broker,
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

async fn ready(State(admin): State<Admin>) -> (StatusCode, &'static str) {
    if admin.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    let state = *admin.broker.borrow();
    if !state.connected {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to RabbitMQ\n",
        );
    }
    (StatusCode::OK, "ready\n")
}
