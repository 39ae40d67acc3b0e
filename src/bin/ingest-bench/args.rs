//! Command-line flags. Every knob that changes what is measured is a flag, so a
//! result can be reproduced from the command line that produced it.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::security::Mode;

/// Measures ingest's throughput, latency, CPU and memory against a direct-to-RabbitMQ
/// ceiling, in one run, and checks that every acknowledged event reached a queue.
#[derive(Parser, Debug, Clone)]
#[command(name = "ingest-bench", version)]
pub struct Args {
    /// Measured length of each scenario (e.g. 10s). Ignored when --events is given.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Publish exactly this many events per scenario (measured part) instead of
    /// running for --duration (overload always runs for --overload-duration).
    #[arg(long)]
    pub events: Option<u64>,

    /// Unmeasured warm-up before each scenario (connections, JIT-like caches of the
    /// broker, TCP windows); its events still count in the queue check. 0s: none.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Payload size of every event, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,

    /// Concurrent callers of unary-1, each with one event in flight. Measured on 2
    /// cores: 64 callers 0.40-0.42x of direct, 128 0.52x, 256 0.58x (the broker
    /// batches confirms better with more in flight; ingest's CPU is not the limit).
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,

    /// Concurrent callers of unary-100. A caller's batch drains as its confirms come
    /// back and it sends nothing until the last one, so it has about half a batch in
    /// flight on average: 32 x 100 keeps ~1600 events in flight against direct's
    /// 4 x 256 continuously. Measured on 2 cores: 8 callers 0.63-0.71x of direct,
    /// 16 0.74-0.83x, 24 0.80-0.88x, 32 0.88-0.96x.
    #[arg(long, default_value_t = 32)]
    pub batch_concurrency: usize,

    /// Concurrent PublishStream calls of stream-1 and stream-100, and PublishAcked
    /// calls of acked-1 and acked-100.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,

    /// Requests each PublishAcked stream of acked-1 keeps sent and not yet acked;
    /// the next one waits for the oldest ack (without a window every request would
    /// cost a round trip). 4 streams x 256 keep as many events in flight as direct's
    /// 4 x 256. ingest itself reads at most 1024 unacked requests per stream.
    #[arg(long, default_value_t = 256)]
    pub acked_window: usize,

    /// The same for acked-100: 4 streams x 16 x 100 keep 6,400 events in flight, the
    /// depth of a publisher library with its default bound, and enough to keep the
    /// broker busy. The ack latency grows with it (the extra events wait in ingest's
    /// buffer). Measured on 2 cores, quiet machine, 15 s runs (the broker's own pace
    /// swings ±15 % run to run): 4 requests 0.87-0.94x of direct (stream-100 0.87-1.03x
    /// in the same runs) at ack p99 250-340 ms; 16 requests 1.04x and 1.34x (stream-100
    /// 0.98x) at ack p99 700-740 ms.
    #[arg(long, default_value_t = 16)]
    pub acked_batch_window: usize,

    /// HTTP/2 connections the gRPC callers are spread over.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,

    /// AMQP channels: direct publishes over this many, and it is forwarded to the
    /// server as INGEST_CHANNELS so both sides use the same parallelism.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,

    /// Unconfirmed publishes kept in flight per channel by the direct scenario.
    #[arg(long, default_value_t = 256)]
    pub inflight: usize,

    /// Scenarios to run, in this order (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,unary-1,unary-100,stream-1,stream-100,acked-1,acked-100,overload"
    )]
    pub scenarios: Vec<Scenario>,

    /// Security modes each gRPC scenario (unary-*, stream-*, acked-*) runs in, one
    /// after the other (comma-separated): `plain`, `tls` (a CA and a `localhost`
    /// certificate made for the run), `tls+auth` (TLS, and a bearer token on every
    /// call checked against a tenants file). Rows other than plain are named e.g.
    /// `stream-100/tls`, with a note of their events/s against the plain row.
    /// Only `plain` with --addr.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "plain")]
    pub security: Vec<Mode>,

    /// Run every scenario (and security mode) this many times over, interleaved, and
    /// end with the median of each row's ratios: the broker's pace drifts by ±15 %
    /// over a minute, which one pass cannot tell from a real difference. Every
    /// second round runs in the reverse order (A B C, C B A, ...), so a drift during
    /// a round does not always favour the rows that run first; use an even number.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,

    /// RabbitMQ URL, for the direct scenario, the queue checks and the server.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,

    /// Benchmark an already running server at HOST:PORT instead of starting one
    /// (no server CPU/RSS columns; overload is skipped since its broker cannot be
    /// stalled from here).
    #[arg(long)]
    pub addr: Option<String>,

    /// Exchange the server at --addr publishes to; each scenario binds its own
    /// queue to it.
    #[arg(long, default_value = "events", requires = "addr")]
    pub exchange: String,

    /// The ingest binary to start (default: `ingest` next to this executable).
    #[arg(long)]
    pub ingest_bin: Option<PathBuf>,

    /// Forwarded to the started server as INGEST_BUFFER_BYTES (default: ingest's).
    #[arg(long)]
    pub buffer_bytes: Option<String>,

    /// Forwarded to the started server as INGEST_BUFFER_EVENTS (default: ingest's).
    #[arg(long)]
    pub buffer_events: Option<String>,

    /// How long the overload scenario hammers the stalled broker. Keep it well
    /// under the AMQP heartbeat timeout the child is given (set from this value).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub overload_duration: Duration,

    /// Calls per second offered in the overload scenario, open loop: calls go out on
    /// schedule whatever the answers, and each refusal's latency is measured from its
    /// scheduled time, so a lagging load generator cannot hide server delay. The
    /// default (x --overload-batch events) is over 3x the broker's persistent ceiling
    /// on this class of machine, and the stalled broker accepts nothing. 0: closed
    /// loop with --overload-callers instead.
    #[arg(long, default_value_t = 5000)]
    pub overload_rate: u64,

    /// Concurrent unary callers of the overload scenario in closed loop
    /// (--overload-rate 0): each sends its next call when the last one is answered.
    #[arg(long, default_value_t = 256)]
    pub overload_callers: usize,

    /// HTTP/2 connections of the overload callers: calls parked on the stalled
    /// broker hold HTTP/2 streams, so one connection's stream limit must not cap
    /// the offered load.
    #[arg(long, default_value_t = 4)]
    pub overload_connections: usize,

    /// Events per overload call.
    #[arg(long, default_value_t = 10)]
    pub overload_batch: usize,

    /// INGEST_BUFFER_EVENTS of the overload server: small, so it fills at once.
    #[arg(long, default_value_t = 1000)]
    pub overload_buffer_events: usize,

    /// INGEST_BUFFER_BYTES of the overload server.
    #[arg(long, default_value = "1MiB")]
    pub overload_buffer_bytes: String,

    /// Write the result rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Draw throughput and latency CDFs into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// One measured workload.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// lapin straight to RabbitMQ: the ceiling.
    #[value(name = "direct")]
    Direct,
    /// Unary Publish, 1 event per call.
    #[value(name = "unary-1")]
    Unary1,
    /// Unary Publish, 100 events per call.
    #[value(name = "unary-100")]
    Unary100,
    /// PublishStream, 1 event per message.
    #[value(name = "stream-1")]
    Stream1,
    /// PublishStream, 100 events per message.
    #[value(name = "stream-100")]
    Stream100,
    /// PublishAcked, 1 event per request, each request timed until its ack.
    #[value(name = "acked-1")]
    Acked1,
    /// PublishAcked, 100 events per request, each request timed until its ack.
    #[value(name = "acked-100")]
    Acked100,
    /// Unary Publish far above capacity against a stalled broker.
    #[value(name = "overload")]
    Overload,
    /// Raw HTTP/2 floods of the largest requests, broker healthy and stalled: the
    /// server's peak RSS per flood, and what one in-flight event costs. Not in the
    /// default set (about a minute).
    #[value(name = "abuse")]
    Abuse,
}

impl Scenario {
    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::Unary1 => "unary-1",
            Scenario::Unary100 => "unary-100",
            Scenario::Stream1 => "stream-1",
            Scenario::Stream100 => "stream-100",
            Scenario::Acked1 => "acked-1",
            Scenario::Acked100 => "acked-100",
            Scenario::Overload => "overload",
            Scenario::Abuse => "abuse",
        }
    }

    /// Whether it is a gRPC throughput scenario, run once per `--security` mode.
    pub fn is_grpc(self) -> bool {
        !matches!(
            self,
            Scenario::Direct | Scenario::Overload | Scenario::Abuse
        )
    }
}

impl Args {
    /// Checks the values clap cannot: zero counts would measure nothing or hang.
    pub fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("--concurrency", self.concurrency),
            ("--batch-concurrency", self.batch_concurrency),
            ("--streams", self.streams),
            ("--acked-window", self.acked_window),
            ("--acked-batch-window", self.acked_batch_window),
            ("--connections", self.connections),
            ("--channels", self.channels),
            ("--inflight", self.inflight),
            ("--rounds", self.rounds),
            ("--overload-callers", self.overload_callers),
            ("--overload-connections", self.overload_connections),
            ("--overload-batch", self.overload_batch),
            ("--overload-buffer-events", self.overload_buffer_events),
        ];
        for (flag, value) in positive {
            anyhow::ensure!(value > 0, "{flag} must be at least 1");
        }
        anyhow::ensure!(
            self.events.is_some() || !self.duration.is_zero(),
            "--duration must be greater than zero (or give --events)"
        );
        anyhow::ensure!(self.events != Some(0), "--events must be at least 1");
        anyhow::ensure!(
            !self.overload_duration.is_zero(),
            "--overload-duration must be greater than zero"
        );
        anyhow::ensure!(!self.security.is_empty(), "--security needs a mode");
        for (i, mode) in self.security.iter().enumerate() {
            anyhow::ensure!(
                !self.security[..i].contains(mode),
                "--security names {} twice",
                mode.name()
            );
        }
        if let Some(addr) = &self.addr
            && let Some(mode) = self.security.iter().find(|m| **m != Mode::Plain)
        {
            anyhow::bail!(
                "--security {} needs a server the bench starts (it makes the certificate \
                 and tenants file for it); with --addr {addr} only plain is measured",
                mode.name()
            );
        }
        Ok(())
    }
}
