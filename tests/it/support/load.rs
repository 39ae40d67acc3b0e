//! Load with unique ids during a fault, and the invariants checked after it:
//! acknowledged ⇒ in the broker, sent ⇒ acknowledged or an explicit error, no call
//! hangs, nothing arrives twice or unsent.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use ingest::{api::CONFIRMED_COUNT, proto::ingest_client::IngestClient};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{metadata::MetadataMap, transport::Channel};
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
    /// Streams the service answered, by how they ended: `"Ok"` or the status code.
    pub stream_answers: BTreeMap<String, usize>,
    /// Stream answers without a valid `ingest-confirmed-count` (on OK too, where it
    /// must equal the events confirmed): a broken promise of the API, never counted
    /// as "0 confirmed".
    pub streams_without_count: Vec<String>,
    /// Calls that ended in the transport (connection refused or reset, stream reset)
    /// rather than with a status from the service. The service never answered them,
    /// so they say nothing about what it does; their events count as errors under
    /// `"transport <code>"`.
    pub transport_failures: Vec<String>,
    /// How long each unary call answered OK took, in the order they ended.
    pub ok_latencies: Vec<Duration>,
    /// The service's error messages and how many calls got each, the first
    /// [`MESSAGES_KEPT`] distinct ones: so a failed assertion says what went wrong.
    pub messages: BTreeMap<String, usize>,
}

/// How many distinct error messages a report keeps.
const MESSAGES_KEPT: usize = 20;

impl LoadReport {
    /// Adds `other`'s calls and outcomes to this report.
    pub fn merge(&mut self, other: LoadReport) {
        self.sent.extend(other.sent);
        self.acked.extend(other.acked);
        for (code, n) in other.errored {
            *self.errored.entry(code).or_default() += n;
        }
        self.calls += other.calls;
        for (code, n) in other.stream_answers {
            *self.stream_answers.entry(code).or_default() += n;
        }
        self.streams_without_count
            .extend(other.streams_without_count);
        self.transport_failures.extend(other.transport_failures);
        self.ok_latencies.extend(other.ok_latencies);
        for (message, n) in other.messages {
            self.note(message, n);
        }
    }

    /// Counts a call answered with `message`, as long as fewer than
    /// [`MESSAGES_KEPT`] distinct messages are kept.
    fn note(&mut self, message: String, calls: usize) {
        let kept = self.messages.len();
        if let Some(n) = self.messages.get_mut(&message) {
            *n += calls;
        } else if kept < MESSAGES_KEPT {
            self.messages.insert(message, calls);
        }
    }

    /// The median of [`LoadReport::ok_latencies`], if any call answered OK.
    pub fn median_ok_latency(&self) -> Option<Duration> {
        let mut sorted = self.ok_latencies.clone();
        sorted.sort();
        sorted.get(sorted.len() / 2).copied()
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
        self.assert_invariants_with(queue, 0).await
    }

    /// [`LoadReport::assert_invariants`], allowing at most `republished` duplicates:
    /// the events the service published again after a lost connection
    /// (`ingest_events_republished_total`) may be in the broker twice, nothing else.
    pub async fn assert_invariants_with(&self, queue: &TestQueue, republished: usize) -> usize {
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
        assert!(
            self.streams_without_count.is_empty(),
            "stream answers without a valid {CONFIRMED_COUNT}: {:?}",
            self.streams_without_count
        );
        assert!(
            self.transport_failures.is_empty(),
            "calls the service never answered (failed in the transport): {:?}",
            self.transport_failures
        );
        assert!(
            totals.duplicates <= republished,
            "{} events arrived twice, more than the {republished} the service published again",
            totals.duplicates
        );
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
    run_load_with(
        client,
        Load {
            duration,
            unary,
            streams,
            batch,
            ..Load::default()
        },
    )
    .await
}

/// A load run's shape, for [`run_load_with`].
#[derive(Clone, Debug)]
pub struct Load {
    /// How long workers start new calls; a stream sends until then.
    pub duration: Duration,
    /// Unary workers, each sending batches of `batch` events.
    pub unary: usize,
    /// Stream workers, each sending one-event messages.
    pub streams: usize,
    /// Events per unary batch.
    pub batch: usize,
    /// Payload bytes of each event (a JSON string; at least 2, `""`).
    pub payload_bytes: usize,
    /// Once cancelled, workers start no new call; calls in flight go on to their end
    /// (streams keep sending), e.g. so that every call open at a SIGTERM is one the
    /// service must answer and none is refused by a process that has exited.
    pub stop: CancellationToken,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            duration: Duration::from_secs(3),
            unary: 1,
            streams: 1,
            batch: 10,
            payload_bytes: 2,
            stop: CancellationToken::new(),
        }
    }
}

impl Load {
    /// The JSON payload every event carries.
    fn payload(&self) -> String {
        format!("\"{}\"", "x".repeat(self.payload_bytes.saturating_sub(2)))
    }
}

/// Runs the load `load` describes against `client`; see [`run_load`].
pub async fn run_load_with(client: &IngestClient<Channel>, load: Load) -> LoadReport {
    let until = Instant::now() + load.duration;
    let payload: Arc<str> = load.payload().into();
    let mut workers = Vec::new();
    for w in 0..load.unary {
        workers.push(tokio::spawn(unary_worker(
            client.clone(),
            Worker::new(&load, until, &payload, w),
            load.batch,
        )));
    }
    for w in 0..load.streams {
        workers.push(tokio::spawn(stream_worker(
            client.clone(),
            Worker::new(&load, until, &payload, w),
        )));
    }
    let mut report = LoadReport::default();
    for worker in workers {
        report.merge(worker.await.unwrap());
    }
    report
}

/// What every worker needs to know.
struct Worker {
    until: Instant,
    stop: CancellationToken,
    payload: Arc<str>,
    w: usize,
}

impl Worker {
    fn new(load: &Load, until: Instant, payload: &Arc<str>, w: usize) -> Self {
        Worker {
            until,
            stop: load.stop.clone(),
            payload: Arc::clone(payload),
            w,
        }
    }

    /// Whether to start another call.
    fn go_on(&self) -> bool {
        Instant::now() < self.until && !self.stop.is_cancelled()
    }
}

/// A description of `status` if the client library made it from a transport failure
/// (it then carries the underlying error as its source); `None` for a status the
/// service sent.
fn transport_failure(status: &tonic::Status) -> Option<String> {
    std::error::Error::source(status)
        .map(|source| format!("{:?} {:?} ({source:?})", status.code(), status.message()))
}

/// The `ingest-confirmed-count` in `metadata`, or why there is none.
fn confirmed_count(metadata: &MetadataMap) -> Result<usize, String> {
    let value = metadata
        .get(CONFIRMED_COUNT)
        .ok_or_else(|| format!("no {CONFIRMED_COUNT}"))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{CONFIRMED_COUNT} is {value:?}"))
}

async fn unary_worker(
    mut client: IngestClient<Channel>,
    worker: Worker,
    batch: usize,
) -> LoadReport {
    let mut report = LoadReport::default();
    while worker.go_on() {
        let ids: Vec<String> = (0..batch)
            .map(|_| unique(&format!("u{}", worker.w)))
            .collect();
        let events = ids
            .iter()
            .map(|id| json_event("t", id, &worker.payload))
            .collect();
        report.sent.extend(ids.iter().cloned());
        report.calls += 1;
        let started = Instant::now();
        let result = tokio::time::timeout(CALL_GUARD, client.publish(request(events)))
            .await
            .expect("a unary call hung");
        match result {
            Ok(response) => {
                report.ok_latencies.push(started.elapsed());
                assert_eq!(response.into_inner().ids, ids);
                report.acked.extend(ids);
            }
            Err(status) => {
                let key = match transport_failure(&status) {
                    Some(failure) => {
                        report.transport_failures.push(failure);
                        format!("transport {:?}", status.code())
                    }
                    None => format!("{:?}", status.code()),
                };
                *report.errored.entry(key).or_default() += ids.len();
                report.note(format!("{:?}: {}", status.code(), status.message()), 1);
                backoff(&status).await;
            }
        }
    }
    report
}

async fn stream_worker(mut client: IngestClient<Channel>, worker: Worker) -> LoadReport {
    let mut report = LoadReport::default();
    let (until, w) = (worker.until, worker.w);
    while worker.go_on() {
        // The ids the client library actually took from the request stream.
        let taken = Arc::new(Mutex::new(Vec::new()));
        let requests = {
            let taken = Arc::clone(&taken);
            let payload = Arc::clone(&worker.payload);
            futures::stream::unfold((), move |()| {
                let taken = Arc::clone(&taken);
                let payload = Arc::clone(&payload);
                async move {
                    if Instant::now() >= until {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let id = unique(&format!("s{w}"));
                    taken.lock().unwrap().push(id.clone());
                    Some((request(vec![json_event("t", &id, &payload)]), ()))
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
                let count = confirmed_count(response.metadata());
                let n = response.into_inner().events as usize;
                assert_eq!(
                    n,
                    taken.len(),
                    "OK must mean every event taken was confirmed"
                );
                if count != Ok(n) {
                    report
                        .streams_without_count
                        .push(format!("OK with {n} events: {count:?}"));
                }
                *report.stream_answers.entry("Ok".into()).or_default() += 1;
                report.acked.extend(taken);
            }
            Err(status) => {
                let code = format!("{:?}", status.code());
                let confirmed = if let Some(failure) = transport_failure(&status) {
                    // Never answered: nothing can be known to be confirmed.
                    report.transport_failures.push(failure);
                    *report
                        .errored
                        .entry(format!("transport {code}"))
                        .or_default() += taken.len();
                    0
                } else {
                    *report.stream_answers.entry(code.clone()).or_default() += 1;
                    let confirmed = match confirmed_count(status.metadata()) {
                        Ok(confirmed) => confirmed,
                        Err(missing) => {
                            report.streams_without_count.push(format!(
                                "{:?} {:?}: {missing}",
                                status.code(),
                                status.message()
                            ));
                            0
                        }
                    };
                    assert!(
                        confirmed <= taken.len(),
                        "{CONFIRMED_COUNT} {confirmed} but only {} events were sent: {status:?}",
                        taken.len()
                    );
                    *report.errored.entry(code).or_default() += taken.len() - confirmed;
                    report.note(format!("{:?}: {}", status.code(), status.message()), 1);
                    confirmed
                };
                report.acked.extend(taken[..confirmed].iter().cloned());
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
