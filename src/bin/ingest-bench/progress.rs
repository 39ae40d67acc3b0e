//! One progress bar per scenario on stderr, so stdout carries only the table.
//!
//! Workers bump a shared counter (one atomic add, no drawing on the hot path); a
//! ticker task redraws the bar ten times a second. indicatif hides the bar by itself
//! when stderr is not a terminal.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

/// How often the bar is redrawn.
const TICK: Duration = Duration::from_millis(100);

/// The bar of one scenario.
pub struct Progress {
    bar: ProgressBar,
    /// Events done in the current phase; workers add to it.
    count: Arc<AtomicU64>,
    phase: Arc<Mutex<Phase>>,
    ticker: JoinHandle<()>,
}

/// What the ticker shows: a time bar for timed phases, an event bar for counted.
#[derive(Clone)]
struct Phase {
    label: &'static str,
    started: Instant,
    /// `Some(n)`: counted phase of n events; `None`: timed phase of `length`.
    events: Option<u64>,
    length: Duration,
}

impl Progress {
    /// Starts the bar of `scenario`.
    pub fn start(scenario: &str) -> Self {
        let bar = ProgressBar::new(1).with_prefix(scenario.to_owned());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10.bold} [{elapsed_precise}] {wide_bar:.cyan/blue} {msg}",
            )
            .expect("static template is valid"),
        );
        let count = Arc::new(AtomicU64::new(0));
        let phase = Arc::new(Mutex::new(Phase {
            label: "starting",
            started: Instant::now(),
            events: None,
            length: Duration::ZERO,
        }));
        let ticker = tokio::spawn(tick(bar.clone(), Arc::clone(&count), Arc::clone(&phase)));
        Self {
            bar,
            count,
            phase,
            ticker,
        }
    }

    /// The counter workers add finished events (or refusals) to.
    pub fn counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.count)
    }

    /// Switches to a new phase: `events` for a counted one, else `length` of time.
    pub fn phase(&self, label: &'static str, events: Option<u64>, length: Duration) {
        self.count.store(0, Ordering::Relaxed);
        *self.phase.lock().expect("progress lock") = Phase {
            label,
            started: Instant::now(),
            events,
            length,
        };
    }

    /// Shows a phase without a known length (waiting for a server, checking a queue).
    pub fn status(&self, label: &'static str) {
        self.phase(label, None, Duration::ZERO);
    }
}

/// Removes the bar and stops its ticker, also when a scenario fails half-way.
impl Drop for Progress {
    fn drop(&mut self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

async fn tick(bar: ProgressBar, count: Arc<AtomicU64>, phase: Arc<Mutex<Phase>>) {
    let mut interval = tokio::time::interval(TICK);
    loop {
        interval.tick().await;
        let phase = phase.lock().expect("progress lock").clone();
        let done = count.load(Ordering::Relaxed);
        let elapsed = phase.started.elapsed();
        let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
        match phase.events {
            Some(total) => {
                bar.set_length(total.max(1));
                bar.set_position(done.min(total));
            }
            None => {
                let total = phase.length.as_millis().max(1) as u64;
                bar.set_length(total);
                bar.set_position((elapsed.as_millis() as u64).min(total));
            }
        }
        if phase.events.is_none() && phase.length.is_zero() {
            // A status, not a phase with work to count.
            bar.set_message(phase.label);
        } else {
            bar.set_message(format!("{}: {done} ({rate:.0}/s)", phase.label));
        }
    }
}
