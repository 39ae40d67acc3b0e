//! Per-call bookkeeping: the RPC duration by status code, and what a call that ends
//! without an answer (the caller's deadline passed, or it went away) leaves behind.

use std::time::Duration;

use tokio::time::Instant;
use tonic::{Code, metadata::MetadataMap};

use crate::telemetry::{Metrics, Reason, metrics::Rpc};

/// Lives as long as one RPC's handler. Dropped before [`Call::finish`] means tonic
/// dropped the handler: the caller's deadline passed or it cancelled.
pub(super) struct Call<'a> {
    metrics: &'a Metrics,
    rpc: Rpc,
    started: Instant,
    /// The caller's `grpc-timeout`, to tell a deadline from a cancel.
    timeout: Option<Duration>,
    /// Events the caller is waiting on; counted as rejected if the call is abandoned.
    pending: usize,
    finished: bool,
}

impl<'a> Call<'a> {
    pub(super) fn start(metrics: &'a Metrics, rpc: Rpc, metadata: &MetadataMap) -> Self {
        Self {
            metrics,
            rpc,
            started: Instant::now(),
            timeout: grpc_timeout(metadata),
            pending: 0,
            finished: false,
        }
    }

    /// The caller now waits on `events` more events.
    pub(super) fn waiting_on(&mut self, events: usize) {
        self.pending = events;
    }

    /// Records the answer.
    pub(super) fn finish(mut self, code: Code) {
        self.finished = true;
        self.metrics
            .rpc_finished(self.rpc, code, self.started.elapsed());
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let elapsed = self.started.elapsed();
        let (reason, code) = match self.timeout {
            Some(timeout) if elapsed >= timeout => (Reason::Deadline, Code::DeadlineExceeded),
            _ => (Reason::Cancelled, Code::Cancelled),
        };
        // The events may still be confirmed in the background; the caller, though,
        // was not told so.
        self.metrics.rejected(reason, self.pending);
        self.metrics.rpc_finished(self.rpc, code, elapsed);
    }
}

/// Parses `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit H, M, S, m, u, n).
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let parse = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(parse("123456789S"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(parse("5x"), None);
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
