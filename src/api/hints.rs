//! Retry hints: how long a refused caller should wait, computed from what the service
//! sees, not a constant.
//!
//! - **Buffer full** (`RESOURCE_EXHAUSTED`): the room the refused request lacks,
//!   divided by the broker's measured confirm rate, is how long that room takes to
//!   free. With ±20 % jitter (so refused callers do not come back in lockstep), at
//!   least `--retry-after`, at most 5 s. A broker confirming nothing gets the cap.
//! - **Broker away** (`UNAVAILABLE`): the time until the next connection attempt of
//!   the reconnect schedule, jittered, at least 1 s ([`MIN_UNAVAILABLE_HINT`]) and
//!   at most 5 s.

use std::time::Duration;

use crate::{admission::AdmitError, publisher::Publisher, telemetry::Metrics};

/// The longest delay ever hinted.
pub const MAX_HINT: Duration = Duration::from_secs(5);

/// The shortest delay hinted while the broker is away. The next connection attempt
/// may come sooner, but early attempts of an outage mostly fail, and gRPC's own retry
/// allows at most 5 attempts: four waits of at least 1 s span a few-second outage.
pub const MIN_UNAVAILABLE_HINT: Duration = Duration::from_secs(1);

/// Computes retry delays; cheap to clone.
#[derive(Clone, Debug)]
pub struct RetryHints {
    publisher: Publisher,
    /// Every hint given is recorded (`ingest_retry_delay_seconds`).
    metrics: Metrics,
    /// `--retry-after`: the shortest delay hinted.
    floor: Duration,
}

impl RetryHints {
    /// Hints over `publisher`'s pace, never below `floor`.
    pub fn new(publisher: Publisher, metrics: Metrics, floor: Duration) -> Self {
        Self {
            publisher,
            metrics,
            floor: floor.min(MAX_HINT),
        }
    }

    /// The delay for a request admission refused with `error`.
    pub fn exhausted(&self, error: &AdmitError) -> Duration {
        let seconds = match error {
            // The tenant's rate says when its tokens are back.
            AdmitError::Quota {
                retry_after: Some(wait),
                ..
            } => wait.as_secs_f64(),
            // Its in-flight room frees as fast as the broker confirms: a guess of
            // one event's worth is too little to matter, so the floor.
            AdmitError::Quota { .. } => 0.0,
            _ => room_seconds(error, self.publisher.confirm_rate()),
        };
        let delay = self.bounded(seconds);
        self.metrics.retry_delay(delay, true);
        delay
    }

    /// The delay while the broker is not connected: until the next connection
    /// attempt, and at least [`MIN_UNAVAILABLE_HINT`].
    pub fn disconnected(&self) -> Duration {
        let seconds = self
            .publisher
            .until_reconnect()
            .map_or(MAX_HINT.as_secs_f64(), |d| d.as_secs_f64());
        let floor = self.floor.max(MIN_UNAVAILABLE_HINT);
        let delay = bounded(seconds, floor, 0.8 + 0.4 * fastrand::f64());
        self.metrics.retry_delay(delay, false);
        delay
    }

    fn bounded(&self, seconds: f64) -> Duration {
        bounded(seconds, self.floor, 0.8 + 0.4 * fastrand::f64())
    }
}

/// Seconds until the room a request refused with `error` lacks is freed, at `rate`
/// answers per second; the cap when the broker answers (almost) nothing.
fn room_seconds(error: &AdmitError, rate: f64) -> f64 {
    let AdmitError::Exhausted {
        events,
        bytes,
        free_events,
        free_bytes,
    } = *error
    else {
        return 0.0;
    };
    let short_events = events.saturating_sub(free_events) as f64;
    // Bytes free as fast as events do, at the request's own cost per event.
    let per_event = (bytes as f64 / events.max(1) as f64).max(1.0);
    let short_bytes = bytes.saturating_sub(free_bytes) as f64 / per_event;
    let needed = short_events.max(short_bytes).max(1.0);
    if rate > 0.1 {
        needed / rate
    } else {
        MAX_HINT.as_secs_f64()
    }
}

/// `seconds` times `jitter`, within `floor..=MAX_HINT`.
fn bounded(seconds: f64, floor: Duration, jitter: f64) -> Duration {
    let floor = floor.as_secs_f64();
    Duration::from_secs_f64((seconds * jitter).clamp(floor, MAX_HINT.as_secs_f64().max(floor)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(events: usize, bytes: usize, free_events: usize, free_bytes: usize) -> AdmitError {
        AdmitError::Exhausted {
            events,
            bytes,
            free_events,
            free_bytes,
        }
    }

    #[test]
    fn the_hint_is_the_missing_room_over_the_confirm_rate() {
        // 100 events short at 50 confirms/s: 2 s.
        assert_eq!(room_seconds(&full(100, 1000, 0, 1000), 50.0), 2.0);
        // 10 short of 100 events: 0.2 s.
        assert!((room_seconds(&full(100, 1000, 90, 1000), 50.0) - 0.2).abs() < 1e-9);
        // Bytes short: 600 of 1000 bytes for 10 events = 6 events' worth.
        assert!((room_seconds(&full(10, 1000, 10, 400), 30.0) - 0.2).abs() < 1e-9);
        // A broker answering nothing: the cap.
        assert_eq!(room_seconds(&full(1, 1, 0, 0), 0.0), MAX_HINT.as_secs_f64());
    }

    #[test]
    fn hints_are_jittered_within_the_floor_and_the_cap() {
        let floor = Duration::from_millis(250);
        assert_eq!(bounded(0.001, floor, 1.0), floor);
        assert_eq!(bounded(100.0, floor, 1.2), MAX_HINT);
        assert_eq!(bounded(1.0, floor, 0.8), Duration::from_millis(800));
        assert_eq!(bounded(1.0, floor, 1.2), Duration::from_millis(1200));
    }
}
