//! Overload: offered load far above capacity while the broker is stalled. What is
//! measured is how fast the refusal (RESOURCE_EXHAUSTED) comes back and how much
//! memory the server takes meanwhile; the claim under test is that the buffer, not
//! the offered load, bounds both.
//!
//! The server is a separate child with a small buffer, talking to RabbitMQ through a
//! [`Proxy`] that is stalled for the hammering and then let go, so the admitted calls
//! finish and the queue check stays exact.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ingest::proto::Event;
use tonic::Code;

use crate::{
    args::Args,
    broker::{Topology, split_authority},
    grpc::request,
    plan::Tally,
    progress::Progress,
    proxy::{Mode, Proxy},
    scenarios::{Env, Measured, Stats},
    server::{ChildServer, Client, Dial},
};

/// Extra time, beyond the stall, that admitted calls get to finish after the proxy
/// forwards again.
const FINISH_GRACE: Duration = Duration::from_secs(60);

/// Runs the overload scenario on `env`'s broker.
pub async fn run(env: &Env<'_>, progress: &Progress) -> anyhow::Result<Measured> {
    let topology = env.topology("overload", true);
    env.broker.declare(&topology, env.queue_expiry()).await?;
    let measured = stalled(env, &topology, progress).await;
    // Removed whatever happened, like the other scenarios' queues.
    let removed = env.broker.remove(&topology).await;
    let measured = measured?;
    removed?;
    Ok(measured)
}

/// Starts the proxied server, hammers it while the broker is stalled, lets the
/// broker go and checks the queue.
async fn stalled(
    env: &Env<'_>,
    topology: &Topology,
    progress: &Progress,
) -> anyhow::Result<Measured> {
    let args = env.args;
    let (head, upstream, tail) = split_authority(&args.amqp_url)?;
    let proxy = Proxy::start(upstream).await?;
    let url = with_heartbeat(
        &format!("{head}{}{tail}", proxy.addr()),
        args.overload_duration,
    );
    let child_env = child_env(args);
    progress.status("starting server");
    let bin = env
        .ingest_bin
        .context("overload needs a server it starts")?;
    let child =
        ChildServer::start(bin, &url, &topology.exchange, &child_env, Dial::default()).await?;
    let clients = child.clients(args.overload_connections).await?;
    let idle_rss = child.rss()?;

    proxy.set_mode(Mode::Stall);
    progress.phase("hammering", None, args.overload_duration);
    let cpu_before = child.cpu_seconds()?;
    let started = Instant::now();
    let deadline = started + args.overload_duration;
    let event = env.event("bench.overload");
    let counter = progress.counter();
    let callers: Vec<_> = if args.overload_rate > 0 {
        vec![tokio::spawn(open_loop(
            clients.clone(),
            event.clone(),
            args.overload_batch as u64,
            args.overload_rate,
            deadline,
            Arc::clone(&counter),
        ))]
    } else {
        (0..args.overload_callers)
            .map(|i| {
                tokio::spawn(hammer(
                    clients[i % clients.len()].clone(),
                    event.clone(),
                    args.overload_batch as u64,
                    deadline,
                    Arc::clone(&counter),
                ))
            })
            .collect()
    };
    tokio::time::sleep_until(deadline.into()).await;
    proxy.set_mode(Mode::Forward);
    progress.status("admitted calls finishing");
    let mut tallies = Vec::with_capacity(callers.len());
    let finish = tokio::time::timeout(args.overload_duration + FINISH_GRACE, async {
        for caller in callers {
            tallies.push(caller.await?);
        }
        anyhow::Ok(())
    });
    finish
        .await
        .context("admitted overload calls did not finish after the broker came back")??;
    let elapsed = started.elapsed();
    let tally = Tally::sum(tallies);
    let expected = tally.acked;
    let server = Stats {
        cpu_seconds: child.cpu_seconds()? - cpu_before,
        peak_rss: child.peak_rss()?,
    };

    progress.status("checking queue");
    let depth = env.broker.settle(&topology.queue, tally.acked).await?;
    child.stop().await?;
    drop(proxy);

    let hammer_secs = args.overload_duration.as_secs_f64();
    let calls = tally.refused + tally.errors + tally.acked / args.overload_batch as u64;
    let load = if args.overload_rate > 0 {
        format!("open loop, {} calls/s", args.overload_rate)
    } else {
        format!("{} callers", args.overload_callers)
    };
    let notes = vec![
        format!(
            "{load} x {} events on {} connections; server buffer {} events / {}; broker \
             stalled {:?}",
            args.overload_batch,
            args.overload_connections,
            args.overload_buffer_events,
            args.overload_buffer_bytes,
            args.overload_duration
        ),
        format!(
            "offered {:.0} calls/s ({:.0} events/s); refused {} ({:.0}/s, latency = refusals); \
             admitted {} events; RSS idle {:.1} MiB",
            calls as f64 / hammer_secs,
            (calls * args.overload_batch as u64) as f64 / hammer_secs,
            tally.refused,
            tally.refused as f64 / hammer_secs,
            tally.acked,
            idle_rss as f64 / MIB,
        ),
    ];
    Ok(Measured {
        setup: format!("{load} x {}, stalled broker", args.overload_batch),
        tally,
        elapsed,
        server: Some(server),
        queue_expected: expected,
        queue_actual: depth,
        notes,
    })
}

const MIB: f64 = 1024.0 * 1024.0;

/// The overload server: small buffer, batches and events that fit it, and confirm
/// timeout and heartbeat well beyond the stall so the stall itself fails nothing.
fn child_env(args: &Args) -> Vec<(&'static str, String)> {
    let stall_secs = args.overload_duration.as_secs() + 60;
    vec![
        ("INGEST_CHANNELS", args.channels.to_string()),
        (
            "INGEST_BUFFER_EVENTS",
            args.overload_buffer_events.to_string(),
        ),
        ("INGEST_BUFFER_BYTES", args.overload_buffer_bytes.clone()),
        (
            "INGEST_MAX_BATCH_EVENTS",
            args.overload_buffer_events.min(1000).to_string(),
        ),
        (
            "INGEST_MAX_EVENT_BYTES",
            args.payload_bytes.max(1).to_string(),
        ),
        ("INGEST_CONFIRM_TIMEOUT", format!("{stall_secs}s")),
    ]
}

/// Adds `heartbeat=` (seconds) to an AMQP URL: a stalled proxy also stops
/// heartbeats, and the default would drop the connection after ~20 s.
fn with_heartbeat(url: &str, stall: Duration) -> String {
    let secs = stall.as_secs() * 2 + 30;
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}heartbeat={secs}")
}

/// Most calls of the open loop outstanding at once: admitted calls wait for the stalled
/// broker, and a generator that cannot keep up must not grow without bound.
const MAX_OUTSTANDING: usize = 4096;

/// Open loop: a call every `1/rate` seconds until `deadline`, whatever the answers.
/// Latency runs from each call's scheduled time (no coordinated omission). Every call
/// is spawned only after taking one of `MAX_OUTSTANDING` permits.
async fn open_loop(
    clients: Vec<Client>,
    event: Event,
    batch: u64,
    rate: u64,
    deadline: Instant,
    progress: Arc<AtomicU64>,
) -> Tally {
    let outstanding = Arc::new(tokio::sync::Semaphore::new(MAX_OUTSTANDING));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Result<(), tonic::Status>)>(1024);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let req = request(&event, batch);
    let mut tally = Tally::default();
    let record = |tally: &mut Tally, scheduled: Instant, outcome: Result<(), tonic::Status>| {
        progress.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => tally.acked += batch,
            Err(status) if status.code() == Code::ResourceExhausted => {
                tally.refused += 1;
                tally.record(scheduled.elapsed());
            }
            Err(status) => tally.error(|| format!("{:?}: {}", status.code(), status.message())),
        }
    };
    let mut sent = 0usize;
    loop {
        tokio::select! {
            scheduled = ticker.tick() => {
                let scheduled = scheduled.into_std();
                if scheduled >= deadline {
                    break;
                }
                let Ok(permit) = Arc::clone(&outstanding).try_acquire_owned() else {
                    tally.error(|| format!("generator: {MAX_OUTSTANDING} calls outstanding"));
                    continue;
                };
                let mut client = clients[sent % clients.len()].clone();
                sent += 1;
                let (tx, req) = (tx.clone(), req.clone());
                tokio::spawn(async move {
                    let outcome = client.publish(req).await.map(drop);
                    let _ = tx.send((scheduled, outcome)).await;
                    drop(permit);
                });
            }
            Some((scheduled, outcome)) = rx.recv() => record(&mut tally, scheduled, outcome),
        }
    }
    drop(tx);
    while let Some((scheduled, outcome)) = rx.recv().await {
        record(&mut tally, scheduled, outcome);
    }
    tally
}

/// One caller: unary calls back to back until `deadline`. Refusals are timed; an
/// admitted call waits for the broker like any other and is counted when it lands.
async fn hammer(
    mut client: Client,
    event: Event,
    batch: u64,
    deadline: Instant,
    progress: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::default();
    let req = request(&event, batch);
    while Instant::now() < deadline {
        let started = Instant::now();
        let outcome = client.publish(req.clone()).await;
        progress.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(_) => tally.acked += batch,
            Err(status) if status.code() == Code::ResourceExhausted => {
                tally.refused += 1;
                tally.record(started.elapsed());
            }
            Err(status) => tally.error(|| format!("{:?}: {}", status.code(), status.message())),
        }
    }
    tally
}
