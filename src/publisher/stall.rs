//! Stall detection: a broker that holds events without answering any of them.
//!
//! A connection can stay open (heartbeats flowing, no error) while the broker
//! confirms nothing: a frozen node, a partition that keeps TCP alive, a broker that
//! blocks publishers. Heartbeats notice only a dead peer, after two missed beats. So
//! the publisher counts the events it has handed to the broker and not yet seen
//! settled, and notes when the broker last answered one (ack, nack or return). With
//! events outstanding and no answer for `--stall-after`, the broker is *stalled*:
//! `BrokerState::stalled` turns true (unary calls are refused at once, streams stop
//! reading, readiness and health turn away traffic) until the next answer.
//!
//! Why 2 s does not misfire on a slow but moving broker: it is not a latency limit.
//! Confirms are pipelined, so a busy broker whose persistent confirms each take
//! hundreds of milliseconds still answers *some* event every few milliseconds, and a
//! link with 200 ms of latency still delivers answers every 200 ms. Only a broker that
//! answers nothing at all for the whole interval, with work waiting on it, is stalled.

use std::{
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use tokio::time::Instant;

use super::Shared;

/// How often the watcher looks.
const TICK: Duration = Duration::from_millis(100);

/// Events handed to the broker and not settled, and when it last answered.
#[derive(Debug)]
pub(super) struct Progress {
    /// Events the broker has answered, ever: the watcher turns it into a rate.
    answered: AtomicU64,
    /// Answers per second, smoothed (`f64` bits).
    rate: AtomicU64,
    /// When the supervisor next tries to connect, nanoseconds after `epoch` (0: not
    /// waiting to reconnect).
    next_attempt: AtomicU64,
    outstanding: AtomicUsize,
    /// Nanoseconds after `epoch` of the last answer (or of the moment work began
    /// after an idle spell, so an idle broker is not stalled when work resumes).
    last_answer: AtomicU64,
    epoch: Instant,
}

impl Progress {
    pub(super) fn new() -> Self {
        Self {
            answered: AtomicU64::new(0),
            rate: AtomicU64::new(0f64.to_bits()),
            next_attempt: AtomicU64::new(0),
            outstanding: AtomicUsize::new(0),
            last_answer: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// `events` more are handed to the broker.
    pub(super) fn sent(&self, events: usize) {
        if self.outstanding.fetch_add(events, Ordering::AcqRel) == 0 {
            self.touch();
        }
    }

    /// One event settled; `answered` if the broker answered it (ack, nack, return)
    /// rather than it timing out or its channel failing.
    pub(super) fn settled(&self, answered: bool) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        if answered {
            self.answered.fetch_add(1, Ordering::Relaxed);
            self.touch();
        }
    }

    /// The broker's pace: answers per second, smoothed over about a second.
    pub(super) fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    /// The supervisor waits `delay` before its next connection attempt.
    pub(super) fn reconnect_in(&self, delay: Duration) {
        let at = self.epoch.elapsed() + delay;
        self.next_attempt.store(
            u64::try_from(at.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Time until the next connection attempt, if one is scheduled.
    pub(super) fn until_reconnect(&self) -> Option<Duration> {
        let at = self.next_attempt.load(Ordering::Relaxed);
        (at > 0).then(|| Duration::from_nanos(at).saturating_sub(self.epoch.elapsed()))
    }

    /// Folds the answers since the last tick (`dt` ago) into the rate.
    fn tick(&self, last: &mut u64, dt: Duration) {
        let now = self.answered.load(Ordering::Relaxed);
        let instant = (now - *last) as f64 / dt.as_secs_f64().max(1e-3);
        *last = now;
        // About a second of memory at 100 ms ticks.
        let rate = 0.8 * self.rate() + 0.2 * instant;
        self.rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_answer.store(nanos, Ordering::Release);
    }

    /// Events outstanding and for how long the broker has not answered.
    fn silence(&self) -> (usize, Duration) {
        let outstanding = self.outstanding.load(Ordering::Acquire);
        let last = Duration::from_nanos(self.last_answer.load(Ordering::Acquire));
        (outstanding, self.epoch.elapsed().saturating_sub(last))
    }
}

/// Keeps `BrokerState::stalled` true exactly while events are outstanding and the
/// broker has answered none for `stall_after`; ends when the publisher stops.
pub(super) async fn watch(shared: &Shared) {
    let stall_after = shared.settings.stall_after;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut answered, mut last) = (0, Instant::now());
    loop {
        tokio::select! {
            () = shared.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        shared.progress.tick(&mut answered, last.elapsed());
        last = Instant::now();
        let (outstanding, silence) = shared.progress.silence();
        let stalled = outstanding > 0 && silence >= stall_after && shared.state.borrow().connected;
        if stalled != shared.state.borrow().stalled {
            if stalled {
                tracing::warn!(outstanding, silence = ?silence, "RabbitMQ stalled: no confirm with events outstanding; refusing new calls until it answers");
            } else {
                tracing::info!("RabbitMQ answers again; no longer stalled");
            }
            shared.state.send_modify(|s| s.stalled = stalled);
        }
    }
}

/// Why the broker counts as stalled, for callers and readiness.
pub fn reason(stall_after: Duration) -> String {
    format!(
        "RabbitMQ stalled: no confirm for over {stall_after:?} with events outstanding (stall-after)"
    )
}
