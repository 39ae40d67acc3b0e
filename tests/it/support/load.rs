//! Load with unique ids during a fault, and the invariants checked after it:
//! acknowledged ⇒ in the broker, sent ⇒ acknowledged or an explicit error, no call
//! hangs, nothing arrives twice or unsent.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use ingest::proto::ingest_client::IngestClient;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use super::{TestQueue, json_event, request, unique};

/// No single call may take longer than this; the test fails instead of hanging.
const CALL_GUARD: Duration = Duration::from_secs(60);

/// What a load run sent and what became of it, per event id.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Every id handed to the service.
    pub sent: BTreeSet<String>,
    /// Ids the service acknowledged as confirmed.
    pub acked: BTreeSet<String>,
    /// Events that got an explicit error, by status code.
    pub errored: BTreeMap<String, usize>,
    /// Calls and streams made.
    pub calls: usize,
}

impl LoadReport {
    fn merge(&mut self, other: LoadReport) {
        self.sent.extend(other.sent);
        self.acked.extend(other.acked);
        for (code, n) in other.errored {
            *self.errored.entry(code).or_default() += n;
        }
        self.calls += other.calls;
    }

    /// Events that got an explicit error.
    pub fn errors(&self) -> usize {
        self.errored.values().sum()
    }

    /// Reads the queue (draining it) and compares it with what was sent and acked.
    pub async fn totals(&self, queue: &TestQueue) -> Totals {
        let landed = queue.message_ids().await;
        let unique_landed: BTreeSet<String> = landed.iter().cloned().collect();
        Totals {
            landed: landed.len(),
            duplicates: landed.len() - unique_landed.len(),
            lost: self.acked.difference(&unique_landed).cloned().collect(),
            unsent: unique_landed.difference(&self.sent).cloned().collect(),
        }
    }

    /// Reads the queue and checks the invariants; returns how many landed.
    pub async fn assert_invariants(&self, queue: &TestQueue) -> usize {
        let totals = self.totals(queue).await;
        eprintln!(
            "load: {} calls, {} sent, {} acked, errors {:?}, {} in the broker, {} lost",
            self.calls,
            self.sent.len(),
            self.acked.len(),
            self.errored,
            totals.landed,
            totals.lost.len()
        );
        assert_eq!(totals.duplicates, 0, "events arrived twice");
        assert!(
            totals.lost.is_empty(),
            "{} acknowledged events are not in the broker: {:?}",
            totals.lost.len(),
            totals.lost.iter().take(5).collect::<Vec<_>>()
        );
        assert!(
            totals.unsent.is_empty(),
            "events in the broker that were never sent: {:?}",
            totals.unsent
        );
        assert_eq!(
            self.acked.len() + self.errors(),
            self.sent.len(),
            "every event sent is acknowledged or explicitly failed"
        );
        totals.landed
    }
}

/// A load run compared with the broker's queue.
#[derive(Debug)]
pub struct Totals {
    /// Messages in the queue.
    pub landed: usize,
    /// Messages in the queue more than once.
    pub duplicates: usize,
    /// Acknowledged ids missing from the queue.
    pub lost: BTreeSet<String>,
    /// Ids in the queue that were never sent.
    pub unsent: BTreeSet<String>,
}

/// Runs `unary` workers (batches of `batch` events) and `streams` workers (streams of
/// one-event messages) against `client` until `duration` has passed. Workers honour
/// `RetryInfo` and go on after errors, like a well-behaved client.
pub async fn run_load(
    client: &IngestClient<Channel>,
    duration: Duration,
    unary: usize,
    streams: usize,
    batch: usize,
) -> LoadReport {
    let until = Instant::now() + duration;
    let mut workers = Vec::new();
    for w in 0..unary {
        workers.push(tokio::spawn(unary_worker(client.clone(), until, batch, w)));
    }
    for w in 0..streams {
        workers.push(tokio::spawn(stream_worker(client.clone(), until, w)));
    }
    let mut report = LoadReport::default();
    for worker in workers {
        report.merge(worker.await.unwrap());
    }
    report
}

async fn unary_worker(
    mut client: IngestClient<Channel>,
    until: Instant,
    batch: usize,
    w: usize,
) -> LoadReport {
    let mut report = LoadReport::default();
    while Instant::now() < until {
        let ids: Vec<String> = (0..batch).map(|_| unique(&format!("u{w}"))).collect();
        let events = ids.iter().map(|id| json_event("t", id, "{}")).collect();
        report.sent.extend(ids.iter().cloned());
        report.calls += 1;
        let result = tokio::time::timeout(CALL_GUARD, client.publish(request(events)))
            .await
            .expect("a unary call hung");
        match result {
            Ok(response) => {
                assert_eq!(response.into_inner().ids, ids);
                report.acked.extend(ids);
            }
            Err(status) => {
                *report
                    .errored
                    .entry(format!("{:?}", status.code()))
                    .or_default() += ids.len();
                backoff(&status).await;
            }
        }
    }
    report
}

async fn stream_worker(mut client: IngestClient<Channel>, until: Instant, w: usize) -> LoadReport {
    let mut report = LoadReport::default();
    while Instant::now() < until {
        // The ids the client library actually took from the request stream.
        let taken = Arc::new(Mutex::new(Vec::new()));
        let requests = {
            let taken = Arc::clone(&taken);
            futures::stream::unfold((), move |()| {
                let taken = Arc::clone(&taken);
                async move {
                    if Instant::now() >= until {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let id = unique(&format!("s{w}"));
                    taken.lock().unwrap().push(id.clone());
                    Some((request(vec![json_event("t", &id, "{}")]), ()))
                }
            })
        };
        report.calls += 1;
        let result = tokio::time::timeout(CALL_GUARD, client.publish_stream(requests))
            .await
            .expect("a stream hung");
        let taken = std::mem::take(&mut *taken.lock().unwrap());
        report.sent.extend(taken.iter().cloned());
        match result {
            Ok(response) => {
                let n = response.into_inner().events as usize;
                assert_eq!(
                    n,
                    taken.len(),
                    "OK must mean every event taken was confirmed"
                );
                report.acked.extend(taken);
            }
            Err(status) => {
                let confirmed = status
                    .metadata()
                    .get(ingest::api::CONFIRMED_COUNT)
                    .map_or(0, |v| v.to_str().unwrap().parse::<usize>().unwrap())
                    .min(taken.len());
                report.acked.extend(taken[..confirmed].iter().cloned());
                *report
                    .errored
                    .entry(format!("{:?}", status.code()))
                    .or_default() += taken.len() - confirmed;
                backoff(&status).await;
            }
        }
    }
    report
}

async fn backoff(status: &tonic::Status) {
    let delay = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap_or(Duration::from_millis(50));
    tokio::time::sleep(delay.min(Duration::from_secs(1))).await;
}
