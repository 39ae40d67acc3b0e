//! The gRPC workloads: concurrent unary callers, and client streams that send as
//! fast as HTTP/2 flow control lets them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ingest::proto::{Event, PublishRequest, ingest_client::IngestClient};
use tonic::{Code, transport::Channel};

use crate::plan::{Plan, Tally};

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
    pub clients: Vec<IngestClient<Channel>>,
    /// The event every request repeats (empty id: the server generates one).
    pub event: Event,
}

impl Grpc {
    /// `callers` concurrent unary callers, `batch` events per call, until `plan`
    /// runs out. Latency is per call.
    pub async fn unary(
        &self,
        callers: usize,
        batch: u64,
        plan: Arc<Plan>,
        progress: Arc<AtomicU64>,
    ) -> anyhow::Result<Tally> {
        self.fan_out(callers, |client, event| {
            unary_caller(
                client,
                event,
                batch,
                Arc::clone(&plan),
                Arc::clone(&progress),
            )
        })
        .await
    }

    /// `streams` concurrent PublishStream calls, `batch` events per message, each
    /// ending when `plan` runs out. No latency: a stream only says how many events
    /// were confirmed at its end.
    pub async fn streams(
        &self,
        streams: usize,
        batch: u64,
        plan: Arc<Plan>,
        progress: Arc<AtomicU64>,
    ) -> anyhow::Result<Tally> {
        self.fan_out(streams, |client, event| {
            stream_caller(
                client,
                event,
                batch,
                Arc::clone(&plan),
                Arc::clone(&progress),
            )
        })
        .await
    }

    /// Runs `n` callers spread over the clients, each made by `caller`, and sums
    /// their tallies.
    async fn fan_out<F, Fut>(&self, n: usize, caller: F) -> anyhow::Result<Tally>
    where
        F: Fn(IngestClient<Channel>, Event) -> Fut,
        Fut: std::future::Future<Output = Tally> + Send + 'static,
    {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let client = self.clients[i % self.clients.len()].clone();
                tokio::spawn(caller(client, self.event.clone()))
            })
            .collect();
        let mut tallies = Vec::with_capacity(tasks.len());
        for task in tasks {
            tallies.push(task.await?);
        }
        Ok(Tally::sum(tallies))
    }
}

/// A request of `n` copies of `event`.
pub fn request(event: &Event, n: u64) -> PublishRequest {
    PublishRequest {
        sequence: 0,
        events: (0..n).map(|_| event.clone()).collect(),
    }
}

async fn unary_caller(
    mut client: IngestClient<Channel>,
    event: Event,
    batch: u64,
    plan: Arc<Plan>,
    progress: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        let n = plan.claim(batch);
        if n == 0 {
            return tally;
        }
        let req = request(&event, n);
        // A refused call is retried with the same events, so a counted plan still
        // publishes exactly its events; a timed one gives up at its deadline, and
        // either gives up on a server that refuses for too long.
        let first_try = Instant::now();
        loop {
            let started = Instant::now();
            match client.publish(req.clone()).await {
                Ok(_) => {
                    tally.record(started.elapsed());
                    tally.acked += n;
                    progress.fetch_add(n, Ordering::Relaxed);
                }
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tally.refused += 1;
                    if plan.expired() {
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
                Err(status) => tally.error(|| format!("{:?}: {}", status.code(), status.message())),
            }
            break;
        }
    }
}

async fn stream_caller(
    mut client: IngestClient<Channel>,
    event: Event,
    batch: u64,
    plan: Arc<Plan>,
    progress: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    // Yields the next message as soon as tonic polls for it, i.e. as soon as the
    // transport has taken the previous one; no sleeps, no queue in between.
    let requests = futures::stream::unfold((), move |()| {
        let n = plan.claim(batch);
        let next = (n > 0).then(|| {
            // Counted when handed to the transport: a stream's confirms are only
            // visible at its end.
            progress.fetch_add(n, Ordering::Relaxed);
            (request(&event, n), ())
        });
        std::future::ready(next)
    });
    match client.publish_stream(requests).await {
        Ok(response) => tally.acked += response.into_inner().events,
        Err(status) => {
            tally.acked += status
                .metadata()
                .get(CONFIRMED_COUNT)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            tally.error(|| format!("{:?}: {}", status.code(), status.message()));
        }
    }
    tally
}
