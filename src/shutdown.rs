//! Shutdown: the signal that starts it, and the drain that waits for every admitted
//! event to be settled before the AMQP connection is closed.

use std::time::Duration;

use tokio::time::{Instant, sleep};

use crate::admission::{Admission, Usage};

/// Resolves on SIGTERM (Kubernetes, systemd) or Ctrl-C.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

/// How often the drain looks at the buffer.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// Waits until nothing is admitted any more (every event settled with the broker) or
/// `deadline` passes; returns what was still in flight then.
pub async fn drained(admission: &Admission, deadline: Instant) -> Usage {
    loop {
        let in_use = admission.in_use();
        if in_use.events == 0 || Instant::now() >= deadline {
            return in_use;
        }
        sleep(DRAIN_POLL).await;
    }
}
