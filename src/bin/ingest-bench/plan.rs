//! How much a phase publishes ([`Plan`]) and what came of it ([`Tally`]).
//!
//! Workers claim events from a shared plan before sending them, so "run for 10 s"
//! and "send exactly N events" are the same loop, and no worker needs to know how
//! many others there are.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

/// A phase's budget: until a deadline, or a fixed number of events.
#[derive(Debug)]
pub struct Plan {
    deadline: Option<Instant>,
    limit: Option<u64>,
    claimed: AtomicU64,
}

impl Plan {
    /// Hand out events until `length` has passed from now.
    pub fn timed(length: Duration) -> Self {
        Self {
            deadline: Some(Instant::now() + length),
            limit: None,
            claimed: AtomicU64::new(0),
        }
    }

    /// Hand out exactly `events` events.
    pub fn counted(events: u64) -> Self {
        Self {
            deadline: None,
            limit: Some(events),
            claimed: AtomicU64::new(0),
        }
    }

    /// Claims up to `want` events for one call; 0 means the phase is over. The last
    /// claim of a counted plan may be short, so the total is exact.
    pub fn claim(&self, want: u64) -> u64 {
        if let Some(deadline) = self.deadline
            && Instant::now() >= deadline
        {
            return 0;
        }
        let Some(limit) = self.limit else {
            self.claimed.fetch_add(want, Ordering::Relaxed);
            return want;
        };
        match self
            .claimed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |claimed| {
                (claimed < limit).then(|| claimed + want.min(limit - claimed))
            }) {
            Ok(before) => want.min(limit - before),
            Err(_) => 0,
        }
    }

    /// The target of a counted plan, for the progress bar.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Whether the deadline of a timed plan has passed (never for a counted plan).
    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, 3 significant
/// digits: enough for p99.9 of sub-millisecond calls and of stalled ones alike.
const MAX_MICROS: u64 = 600_000_000;

/// What one worker (and, merged, one phase) achieved.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Events the broker (or ingest, on its behalf) acknowledged.
    pub acked: u64,
    /// Calls or publishes that failed for good.
    pub errors: u64,
    /// Calls refused with RESOURCE_EXHAUSTED.
    pub refused: u64,
    /// Per call / per publish latency; per refusal in the overload scenario.
    pub latency: Histogram<u64>,
    /// The first failure seen, to show why `errors` is not 0.
    pub first_error: Option<String>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            acked: 0,
            errors: 0,
            refused: 0,
            latency: Histogram::new_with_bounds(1, MAX_MICROS, 3)
                .expect("static histogram bounds are valid"),
            first_error: None,
        }
    }
}

impl Tally {
    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_MICROS);
        self.latency.saturating_record(micros.max(1));
    }

    /// Counts a failure and keeps the first message.
    pub fn error(&mut self, message: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(message());
        }
    }

    /// Adds another worker's tally to this one.
    pub fn merge(&mut self, other: Tally) {
        self.acked += other.acked;
        self.errors += other.errors;
        self.refused += other.refused;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Merges the tallies of all workers of a phase.
    pub fn sum(tallies: impl IntoIterator<Item = Tally>) -> Tally {
        tallies.into_iter().fold(Tally::default(), |mut all, t| {
            all.merge(t);
            all
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_plan_hands_out_exactly_its_events() {
        let plan = Plan::counted(250);
        let mut total = 0;
        loop {
            let n = plan.claim(100);
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 250);
    }

    #[test]
    fn timed_plan_stops_at_its_deadline() {
        let plan = Plan::timed(Duration::ZERO);
        assert_eq!(plan.claim(5), 0);
        assert!(plan.expired());
    }
}
