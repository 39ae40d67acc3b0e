//! One scenario from start to finish: its own exchange and queue, its own server,
//! an unmeasured warm-up, the measured phase, the queue check, the clean-up.

use std::{
    path::Path,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use ingest::proto::Event;

use crate::{
    abuse,
    args::{Args, Scenario},
    broker::{Broker, Topology, unique},
    direct::Direct,
    grpc::{Grpc, Rpc},
    overload,
    plan::{Plan, Tally},
    progress::Progress,
    security::{self, Material, Mode, Setup},
    server::{self, ChildServer, Dial},
};

/// Events per call or message of the `-100` scenarios.
const BATCH: u64 = 100;
/// ingest's default `--max-event-bytes` (1 MiB).
const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;
/// ingest's default `--max-batch-events`.
const DEFAULT_MAX_BATCH_EVENTS: usize = 1000;

/// What every scenario shares.
pub struct Env<'a> {
    pub args: &'a Args,
    /// The bench's own connection, for topology and queue checks.
    pub broker: &'a Broker,
    /// The server binary to start per scenario; `None` with `--addr`.
    pub ingest_bin: Option<&'a Path>,
    /// The payload every event carries.
    pub payload: Bytes,
    /// The certificates and token of the non-plain `--security` modes; `None` when
    /// only plain was asked for.
    pub security: Option<&'a Material>,
}

/// Server-side cost of the measured phase.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// User + system CPU seconds the server used in the measured phase.
    pub cpu_seconds: f64,
    /// Peak resident memory of the server process, bytes.
    pub peak_rss: u64,
}

/// The raw result of one scenario.
#[derive(Debug)]
pub struct Measured {
    /// Workload shape, e.g. "64 callers x 1 event".
    pub setup: String,
    /// The measured phase (the warm-up is not in it).
    pub tally: Tally,
    /// Wall time of the measured phase, until its last call was answered.
    pub elapsed: Duration,
    /// `None` when the server is not the bench's child (or for `direct`).
    pub server: Option<Stats>,
    /// Events acknowledged in the whole scenario, warm-up included.
    pub queue_expected: u64,
    /// Messages found in the scenario's queue.
    pub queue_actual: u64,
    /// Anything the numbers alone do not say.
    pub notes: Vec<String>,
}

impl Env<'_> {
    /// A fresh queue, on a fresh exchange unless the server is someone else's
    /// (`--addr`) and `own` is false.
    pub fn topology(&self, scenario: &str, own: bool) -> Topology {
        let owns_exchange = own || self.args.addr.is_none();
        Topology {
            exchange: if owns_exchange {
                unique(&format!("ingest-bench-{scenario}"))
            } else {
                self.args.exchange.clone()
            },
            queue: unique(&format!("ingest-bench-{scenario}")),
            owns_exchange,
        }
    }

    /// Queue expiry: long enough for any scenario of this run, short enough that
    /// a crashed run's queue (and its messages) goes away by itself.
    pub fn queue_expiry(&self) -> Duration {
        let run = self.args.warmup + self.args.duration + self.args.overload_duration;
        let floor = if self.args.events.is_some() {
            Duration::from_secs(6 * 3600)
        } else {
            Duration::from_secs(3600)
        };
        (run * 2).max(floor)
    }

    /// The event every publish of a scenario repeats: no id (the server generates
    /// one, as for most callers), no content type (no JSON check), no attributes.
    pub fn event(&self, topic: &str) -> Event {
        Event {
            topic: topic.to_owned(),
            payload: self.payload.clone(),
            ..Event::default()
        }
    }

    /// What `mode` adds to a started server and its clients.
    fn security_setup(&self, mode: Mode) -> anyhow::Result<Setup> {
        match self.security {
            Some(material) => material.setup(mode),
            None if mode == Mode::Plain => Ok(Setup::default()),
            None => anyhow::bail!("no certificates were made for {}", mode.name()),
        }
    }

    /// Settings forwarded to every started server. ingest refuses to start with a
    /// buffer smaller than its largest batch or event, so a small buffer brings
    /// those limits down with it.
    fn server_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("INGEST_CHANNELS", self.args.channels.to_string())];
        if let Some(bytes) = &self.args.buffer_bytes {
            env.push(("INGEST_BUFFER_BYTES", bytes.clone()));
            if let Ok(n) = ingest::config::parse_size(bytes)
                && n < DEFAULT_MAX_EVENT_BYTES
            {
                env.push(("INGEST_MAX_EVENT_BYTES", n.to_string()));
            }
        }
        if let Some(events) = &self.args.buffer_events {
            env.push(("INGEST_BUFFER_EVENTS", events.clone()));
            if let Ok(n) = events.trim().parse::<usize>()
                && n < DEFAULT_MAX_BATCH_EVENTS
            {
                env.push(("INGEST_MAX_BATCH_EVENTS", n.to_string()));
            }
        }
        env
    }
}

/// A scenario's name in the report: `stream-100` in plain, `stream-100/tls` etc.
/// otherwise.
pub fn row_name(scenario: Scenario, mode: Mode) -> String {
    match mode {
        Mode::Plain => scenario.name().to_owned(),
        _ => format!("{}/{}", scenario.name(), mode.name()),
    }
}

/// Runs `scenario` in `mode` (plain for all but the gRPC scenarios) with a progress
/// bar on stderr.
pub async fn run(env: &Env<'_>, scenario: Scenario, mode: Mode) -> anyhow::Result<Measured> {
    let name = row_name(scenario, mode);
    let progress = Progress::start(&name);
    if scenario == Scenario::Overload {
        return overload::run(env, &progress).await;
    }
    if scenario == Scenario::Abuse {
        return abuse::run(env, &progress).await;
    }
    // Queue and exchange names keep to letters, digits and dashes.
    let topology = env.topology(&name.replace(['/', '+'], "-"), false);
    env.broker.declare(&topology, env.queue_expiry()).await?;
    let measured = steady(env, scenario, mode, &topology, &progress).await;
    // The queue goes whatever happened: a full one left behind slows the next
    // scenario down.
    let removed = env.broker.remove(&topology).await;
    let measured = measured?;
    removed?;
    Ok(measured)
}

/// The workload of a throughput scenario.
enum Workload {
    Direct(Direct),
    /// `callers` concurrent callers of `rpc`, `batch` events per call or message.
    Grpc {
        grpc: Grpc,
        rpc: Rpc,
        callers: usize,
        batch: u64,
    },
}

impl Workload {
    async fn run(&self, plan: Plan, progress: Arc<AtomicU64>) -> anyhow::Result<Tally> {
        let plan = Arc::new(plan);
        match self {
            Workload::Direct(direct) => direct.run(plan, progress).await,
            Workload::Grpc {
                grpc,
                rpc,
                callers,
                batch,
            } => grpc.run(*rpc, *callers, *batch, plan, progress).await,
        }
    }

    fn setup(&self, connections: usize) -> String {
        let (rpc, callers, batch) = match self {
            Workload::Direct(d) => {
                return format!("{} channels x {} in flight", d.channels, d.inflight);
            }
            Workload::Grpc {
                rpc,
                callers,
                batch,
                ..
            } => (rpc, callers, batch),
        };
        match rpc {
            Rpc::Unary => format!("{callers} callers x {batch} on {connections} conn"),
            Rpc::Stream => format!("{callers} streams x {batch}/msg on {connections} conn"),
            Rpc::Acked { window } => format!(
                "{callers} streams x {batch}/req, {window} unacked each, on {connections} conn"
            ),
        }
    }
}

/// A throughput scenario: warm-up, measured phase, queue check.
async fn steady(
    env: &Env<'_>,
    scenario: Scenario,
    mode: Mode,
    topology: &Topology,
    progress: &Progress,
) -> anyhow::Result<Measured> {
    let args = env.args;
    let topic = format!("bench.{}", scenario.name());
    let mut child = None;
    let workload = if scenario == Scenario::Direct {
        Workload::Direct(Direct {
            amqp_url: args.amqp_url.clone(),
            exchange: topology.exchange.clone(),
            routing_key: topic,
            channels: args.channels,
            inflight: args.inflight,
            payload: env.payload.clone(),
            header: security::stamped_header(mode),
        })
    } else {
        progress.status("starting server");
        let clients = match (env.ingest_bin, &args.addr) {
            (Some(bin), _) => {
                let Setup {
                    mut server_env,
                    dial,
                } = env.security_setup(mode)?;
                server_env.extend(env.server_env());
                let started =
                    ChildServer::start(bin, &args.amqp_url, &topology.exchange, &server_env, dial)
                        .await?;
                child.insert(started).clients(args.connections).await?
            }
            (None, Some(addr)) => {
                // Args::validate allows only plain with --addr.
                anyhow::ensure!(mode == Mode::Plain, "--addr is measured in plain only");
                server::wait_remote(addr).await?;
                Dial::default().clients(addr, args.connections).await?
            }
            (None, None) => anyhow::bail!("no server: neither an ingest binary nor --addr"),
        };
        let grpc = Grpc {
            clients,
            event: env.event(&topic),
        };
        let (rpc, callers, batch) = match scenario {
            Scenario::Unary1 => (Rpc::Unary, args.concurrency, 1),
            Scenario::Unary100 => (Rpc::Unary, args.batch_concurrency, BATCH),
            Scenario::Stream1 => (Rpc::Stream, args.streams, 1),
            Scenario::Stream100 => (Rpc::Stream, args.streams, BATCH),
            Scenario::Acked1 => {
                let window = args.acked_window;
                (Rpc::Acked { window }, args.streams, 1)
            }
            Scenario::Acked100 => {
                let window = args.acked_batch_window;
                (Rpc::Acked { window }, args.streams, BATCH)
            }
            Scenario::Direct | Scenario::Overload | Scenario::Abuse => {
                unreachable!("handled above")
            }
        };
        Workload::Grpc {
            grpc,
            rpc,
            callers,
            batch,
        }
    };

    let mut expected = 0;
    if !args.warmup.is_zero() {
        progress.phase("warm-up", None, args.warmup);
        let warmup = workload
            .run(Plan::timed(args.warmup), progress.counter())
            .await
            .context("warm-up")?;
        expected += warmup.acked;
    }

    let plan = match args.events {
        Some(events) => Plan::counted(events),
        None => Plan::timed(args.duration),
    };
    progress.phase("measuring", plan.limit(), args.duration);
    let cpu_before = child.as_ref().map(ChildServer::cpu_seconds).transpose()?;
    let started = Instant::now();
    let tally = workload.run(plan, progress.counter()).await?;
    let elapsed = started.elapsed();
    let server = match (&child, cpu_before) {
        (Some(child), Some(before)) => Some(Stats {
            cpu_seconds: child.cpu_seconds()? - before,
            peak_rss: child.peak_rss()?,
        }),
        _ => None,
    };
    expected += tally.acked;

    progress.status("checking queue");
    let actual = env.broker.settle(&topology.queue, expected).await?;
    if let Some(child) = child {
        child.stop().await?;
    }
    Ok(Measured {
        setup: workload.setup(args.connections),
        tally,
        elapsed,
        server,
        queue_expected: expected,
        queue_actual: actual,
        notes: Vec::new(),
    })
}
