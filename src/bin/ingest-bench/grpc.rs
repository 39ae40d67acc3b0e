//! The gRPC workloads: concurrent unary callers, client streams that send as fast
//! as HTTP/2 flow control lets them, and acked streams that keep a window of
//! requests in flight and time each one until its ack.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ingest::proto::{Event, PublishRequest};
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::{
    plan::{Plan, Tally},
    server::Client,
};

/// Pause before retrying a call refused with RESOURCE_EXHAUSTED. Shorter than the
/// server's hint: the bench wants the buffer kept full, not polite spacing.
const REFUSED_BACKOFF: Duration = Duration::from_millis(5);

/// How long one call is retried while refused before it counts as an error.
const REFUSED_GIVE_UP: Duration = Duration::from_secs(30);

/// Trailing metadata that says how many leading events of a stream were confirmed.
const CONFIRMED_COUNT: &str = "ingest-confirmed-count";

/// A gRPC workload over a set of connections.
pub struct Grpc {
    /// One client per HTTP/2 connection; callers are spread round-robin.
    pub clients: Vec<Client>,
    /// The event every request repeats (empty id: the server generates one).
    pub event: Event,
}

/// What the callers of a gRPC workload call.
#[derive(Debug, Clone, Copy)]
pub enum Rpc {
    /// Unary Publish, one call after the other. Latency is per call.
    Unary,
    /// One PublishStream call each, sending until the plan runs out. No latency: a
    /// stream only says how many events were confirmed at its end.
    Stream,
    /// One PublishAcked call each, keeping up to `window` requests unacked, sending
    /// until the plan runs out. Latency is per request, from handing it to the
    /// stream to its ack.
    Acked { window: usize },
}

impl Grpc {
    /// Runs `n` concurrent callers of `rpc` spread over the clients, `batch` events
    /// per call or message, until `plan` runs out, and sums their tallies.
    pub async fn run(
        &self,
        rpc: Rpc,
        n: usize,
        batch: u64,
        plan: Arc<Plan>,
        progress: Arc<AtomicU64>,
    ) -> anyhow::Result<Tally> {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let worker = Worker {
                    client: self.clients[i % self.clients.len()].clone(),
                    event: self.event.clone(),
                    batch,
                    plan: Arc::clone(&plan),
                    progress: Arc::clone(&progress),
                };
                match rpc {
                    Rpc::Unary => tokio::spawn(unary_caller(worker)),
                    Rpc::Stream => tokio::spawn(stream_caller(worker)),
                    Rpc::Acked { window } => tokio::spawn(acked_caller(worker, window)),
                }
            })
            .collect();
        let mut tallies = Vec::with_capacity(tasks.len());
        for task in tasks {
            tallies.push(task.await?);
        }
        Ok(Tally::sum(tallies))
    }
}

/// What one caller of a workload works with.
struct Worker {
    client: Client,
    /// The event every request repeats.
    event: Event,
    /// Events per call or message.
    batch: u64,
    plan: Arc<Plan>,
    /// Events acknowledged so far (sent so far, for client streams).
    progress: Arc<AtomicU64>,
}

/// A failed call as the tally keeps it.
fn failure(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// A request of `n` copies of `event`.
pub fn request(event: &Event, n: u64) -> PublishRequest {
    PublishRequest {
        sequence: 0,
        events: (0..n).map(|_| event.clone()).collect(),
    }
}

async fn unary_caller(mut w: Worker) -> Tally {
    let mut tally = Tally::default();
    loop {
        let n = w.plan.claim(w.batch);
        if n == 0 {
            return tally;
        }
        let req = request(&w.event, n);
        // A refused call is retried with the same events, so a counted plan still
        // publishes exactly its events; a timed one gives up at its deadline, and
        // either gives up on a server that refuses for too long.
        let first_try = Instant::now();
        loop {
            let started = Instant::now();
            match w.client.publish(req.clone()).await {
                Ok(_) => {
                    tally.record(started.elapsed());
                    tally.acked += n;
                    w.progress.fetch_add(n, Ordering::Relaxed);
                }
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tally.refused += 1;
                    if w.plan.expired() {
                        break;
                    }
                    if first_try.elapsed() > REFUSED_GIVE_UP {
                        tally.error(|| {
                            format!("refused for {REFUSED_GIVE_UP:?}: {}", status.message())
                        });
                        break;
                    }
                    tokio::time::sleep(REFUSED_BACKOFF).await;
                    continue;
                }
                Err(status) => tally.error(|| failure(&status)),
            }
            break;
        }
    }
}

async fn stream_caller(mut w: Worker) -> Tally {
    let mut tally = Tally::default();
    // Yields the next message as soon as tonic polls for it, i.e. as soon as the
    // transport has taken the previous one; no sleeps, no queue in between.
    let requests = futures::stream::unfold((), move |()| {
        let n = w.plan.claim(w.batch);
        let next = (n > 0).then(|| {
            // Counted when handed to the transport: a stream's confirms are only
            // visible at its end.
            w.progress.fetch_add(n, Ordering::Relaxed);
            (request(&w.event, n), ())
        });
        std::future::ready(next)
    });
    match w.client.publish_stream(requests).await {
        Ok(response) => tally.acked += response.into_inner().events,
        Err(status) => {
            tally.acked += status
                .metadata()
                .get(CONFIRMED_COUNT)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            tally.error(|| failure(&status));
        }
    }
    tally
}

/// A request of a PublishAcked stream handed to the transport and not yet acked.
struct Sent {
    sequence: u64,
    events: u64,
    at: Instant,
}

/// What the request side of a PublishAcked stream carries from one request to the
/// next.
struct Sender {
    event: Event,
    batch: u64,
    plan: Arc<Plan>,
    /// Room for one more [`Sent`] is the window: a request goes out only once the
    /// ack side has taken the record of an old enough one.
    sent: mpsc::Sender<Sent>,
    sequence: u64,
}

async fn acked_caller(mut w: Worker, window: usize) -> Tally {
    let mut tally = Tally::default();
    let (sent, mut outstanding) = mpsc::channel(window);
    let sender = Sender {
        event: w.event,
        batch: w.batch,
        plan: w.plan,
        sent,
        sequence: 0,
    };
    // Each request is recorded before tonic gets it, so its ack always finds its
    // record; the stream ends (and the sender with it) when the plan runs out or
    // the ack side has gone.
    let requests = futures::stream::unfold(sender, |mut s| async move {
        let room = s.sent.reserve().await.ok()?;
        let n = s.plan.claim(s.batch);
        if n == 0 {
            return None;
        }
        let sequence = s.sequence;
        s.sequence += 1;
        room.send(Sent {
            sequence,
            events: n,
            at: Instant::now(),
        });
        let mut req = request(&s.event, n);
        req.sequence = sequence;
        Some((req, s))
    });
    let mut acks = match w.client.publish_acked(requests).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tally.error(|| failure(&status));
            return tally;
        }
    };
    loop {
        let ack = match acks.message().await {
            Ok(Some(ack)) => ack,
            Ok(None) => break,
            Err(status) => {
                tally.error(|| failure(&status));
                break;
            }
        };
        let Ok(sent) = outstanding.try_recv() else {
            tally.error(|| format!("ack {} with no request outstanding", ack.sequence));
            break;
        };
        if ack.sequence != sent.sequence {
            tally.error(|| {
                format!(
                    "ack {} where {} was the oldest unacked request",
                    ack.sequence, sent.sequence
                )
            });
            continue;
        }
        match ack.status {
            Some(status) if status.code == 0 => {
                tally.record(sent.at.elapsed());
                tally.acked += sent.events;
                w.progress.fetch_add(sent.events, Ordering::Relaxed);
            }
            Some(status) => {
                tally.error(|| format!("{:?}: {}", Code::from_i32(status.code), status.message))
            }
            None => tally.error(|| format!("ack {} without a status", ack.sequence)),
        }
    }
    // Requests the stream ended before acking: their events are not confirmed.
    outstanding.close();
    while let Ok(sent) = outstanding.try_recv() {
        tally.error(|| format!("request {} never acked", sent.sequence));
    }
    tally
}
