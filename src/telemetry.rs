//! Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`). No log line per
//! event at `info`: events are counted, not narrated.

use tracing_subscriber::{EnvFilter, fmt};

/// lapin logs every returned (unroutable) message at `warn`: a line per event. The
/// service reports those to the caller instead, so lapin is quieter by default.
const DEFAULT_FILTER: &str = "info,lapin=error";

/// Installs the global subscriber. Call once, from `main`.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
