//! gRPC health (`grpc.health.v1`): the overall status and `ingest.v1.Ingest` are
//! `SERVING` exactly while the broker connection is up and answering (not stalled) and
//! the service is not draining.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::publisher::BrokerState;

/// The service name health reports under, besides the overall `""`.
pub const SERVICE_NAME: &str = "ingest.v1.Ingest";

/// Keeps health in step with the broker state until the process ends. On draining it
/// reports `NOT_SERVING` at once and stays so.
pub async fn follow(
    reporter: HealthReporter,
    mut broker: watch::Receiver<BrokerState>,
    draining: CancellationToken,
) {
    loop {
        let state = *broker.borrow_and_update();
        let serving = state.connected && !state.stalled && !draining.is_cancelled();
        report(&reporter, serving).await;
        if draining.is_cancelled() {
            return;
        }
        tokio::select! {
            changed = broker.changed() => if changed.is_err() { return },
            () = draining.cancelled() => {}
        }
    }
}

/// Sets the overall and the service status. `tonic-health` starts the overall status
/// as `SERVING`; the service calls this with `false` before it accepts a connection.
pub async fn report(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}
