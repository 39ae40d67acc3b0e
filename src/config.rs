//! Start-up configuration: command-line flags and `INGEST_*` environment
//! variables, parsed once into a typed [`Config`].
//!
//! Parsing happens in two steps, in the manner of linkerd2-proxy's `env.rs`:
//!
//! 1. clap collects every setting as a raw `String` into [`Args`]. Nothing is
//!    interpreted there, so clap never stops at the first bad value.
//! 2. `Config::try_from(args)` interprets every field, runs the cross-field
//!    checks and reports *all* problems at once in a [`ConfigError`], one line
//!    per problem, each naming the flag, the environment variable, the value
//!    given and what was expected. An operator fixing a deployment sees every
//!    mistake in one go instead of one per restart.
//!
//! The names of the flags and variables are relied on by deployments; do not
//! rename them.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::tls::TlsFiles;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, parser::ValueSource};

/// Default for `--listen` / `INGEST_LISTEN`.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:50051";
/// Default for `--admin-listen` / `INGEST_ADMIN_LISTEN`.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9464";
/// Default for `--amqp-url` / `INGEST_AMQP_URL`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default for `--exchange` / `INGEST_EXCHANGE`.
pub const DEFAULT_EXCHANGE: &str = "events";
/// Default for `--retry-unconfirmed` / `INGEST_RETRY_UNCONFIRMED`.
pub const DEFAULT_RETRY_UNCONFIRMED: &str = "true";
/// Default for `--declare-exchange` / `INGEST_DECLARE_EXCHANGE`.
pub const DEFAULT_DECLARE_EXCHANGE: &str = "true";
/// Default for `--accept-unroutable` / `INGEST_ACCEPT_UNROUTABLE`.
pub const DEFAULT_ACCEPT_UNROUTABLE: &str = "false";
/// Default for `--buffer-events` / `INGEST_BUFFER_EVENTS`.
pub const DEFAULT_BUFFER_EVENTS: &str = "10000";
/// Default for `--buffer-bytes` / `INGEST_BUFFER_BYTES` (64 MiB).
pub const DEFAULT_BUFFER_BYTES: &str = "67108864";
/// Default for `--max-event-bytes` / `INGEST_MAX_EVENT_BYTES` (1 MiB).
pub const DEFAULT_MAX_EVENT_BYTES: &str = "1048576";
/// Default for `--max-batch-events` / `INGEST_MAX_BATCH_EVENTS`.
pub const DEFAULT_MAX_BATCH_EVENTS: &str = "1000";
/// Default for `--confirm-timeout` / `INGEST_CONFIRM_TIMEOUT`.
pub const DEFAULT_CONFIRM_TIMEOUT: &str = "10s";
/// Default for `--drain-timeout` / `INGEST_DRAIN_TIMEOUT`.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "25s";
/// Default for `--channels` / `INGEST_CHANNELS`.
pub const DEFAULT_CHANNELS: &str = "4";
/// Default for `--reconnect-max-backoff` / `INGEST_RECONNECT_MAX_BACKOFF`.
pub const DEFAULT_RECONNECT_MAX_BACKOFF: &str = "30s";
/// Default for `--retry-after` / `INGEST_RETRY_AFTER`.
pub const DEFAULT_RETRY_AFTER: &str = "250ms";
/// Default for `--stream-idle-timeout` / `INGEST_STREAM_IDLE_TIMEOUT`.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: &str = "60s";
/// Default for `--stream-stall-timeout` / `INGEST_STREAM_STALL_TIMEOUT`.
pub const DEFAULT_STREAM_STALL_TIMEOUT: &str = "30s";
/// Default for `--http2-stream-window` / `INGEST_HTTP2_STREAM_WINDOW` (64 KiB).
/// A window is what a peer may send before the server reads; on a LAN
/// (sub-millisecond round trips) a small stream window costs no throughput, and it
/// bounds what each stream can park in the server.
pub const DEFAULT_HTTP2_STREAM_WINDOW: &str = "65536";
/// Default for `--http2-connection-window` / `INGEST_HTTP2_CONNECTION_WINDOW`
/// (4 MiB). Large on purpose: h2 closes a connection (`GOAWAY ENHANCE_YOUR_CALM
/// too_many_data_frames`) once the small DATA frames it holds unread cost more than
/// half this window in framing overhead, which a stream of small messages reaches
/// while it waits for room. With 64 KiB stream windows, about nine such waiting
/// streams fit on one connection.
pub const DEFAULT_HTTP2_CONNECTION_WINDOW: &str = "4194304";
/// Default for `--max-concurrent-streams` / `INGEST_MAX_CONCURRENT_STREAMS`.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: &str = "128";
/// Default for `--stall-after` / `INGEST_STALL_AFTER`.
pub const DEFAULT_STALL_AFTER: &str = "2s";
/// Default for `--max-connections` / `INGEST_MAX_CONNECTIONS`.
pub const DEFAULT_MAX_CONNECTIONS: &str = "1024";
/// Default for `--handshake-timeout` / `INGEST_HANDSHAKE_TIMEOUT`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: &str = "10s";
/// Default for `--http2-keepalive-interval` / `INGEST_HTTP2_KEEPALIVE_INTERVAL`.
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL: &str = "30s";
/// Default for `--http2-keepalive-timeout` / `INGEST_HTTP2_KEEPALIVE_TIMEOUT`.
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT: &str = "10s";
/// Default for `--max-header-list-size` / `INGEST_MAX_HEADER_LIST_SIZE` (32 KiB).
/// h2 refuses a call over it with HTTP 431 and closes the whole connection only past
/// four times it, so the default keeps 64 KiB of metadata a per-call error.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: &str = "32768";
/// Default for `--log-format` / `INGEST_LOG_FORMAT`.
pub const DEFAULT_LOG_FORMAT: &str = "text";

/// Upper bound of `--channels`. Each channel holds its own window of
/// unconfirmed publishes; beyond a few hundred the broker spends more on
/// channel bookkeeping than the extra parallelism buys.
pub const MAX_CHANNELS: usize = 256;

/// AMQP 0-9-1 exchange names are `shortstr`s: at most 255 bytes.
const MAX_EXCHANGE_NAME_BYTES: usize = 255;

/// Smallest HTTP/2 flow-control window accepted: 65535 bytes, the initial
/// window of RFC 9113 §6.9.2. A connection's window starts there and can only
/// grow; a smaller stream window would only slow every call down.
pub const HTTP2_MIN_WINDOW: u32 = 65_535;

/// Largest HTTP/2 flow-control window: 2^31 - 1 bytes (RFC 9113 §6.9.1).
pub const HTTP2_MAX_WINDOW: u32 = (1 << 31) - 1;

/// Upper bound of `--max-concurrent-streams`. HTTP/2 itself allows up to
/// 2^32 - 1; far beyond what one client needs, such values would make the
/// bound on transport memory per connection (streams × stream window)
/// meaningless.
pub const MAX_CONCURRENT_STREAMS_LIMIT: u32 = 65_536;

/// Upper bound of `--max-connections`.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

/// Bounds of `--max-header-list-size`: gRPC needs its own headers (path, content
/// type, `te`, deadline, trace context) to fit; more than 1 MiB of metadata per call
/// is no longer metadata.
pub const HEADER_LIST_SIZE_RANGE: std::ops::RangeInclusive<usize> = 1024..=1024 * 1024;

/// Raw settings as given on the command line or in the environment.
///
/// Every field is a `String` on purpose: interpretation happens in
/// `Config::try_from`, which reports every bad value at once.
#[derive(Clone, Debug, PartialEq, Eq, Parser)]
#[command(
    name = "ingest",
    version,
    about = "Accepts events over gRPC and publishes them to RabbitMQ, \
             answering only once the broker has confirmed them."
)]
pub struct Args {
    /// Address the gRPC ingest service listens on: IP:port or host:port (a
    /// host name is resolved once, at start). Bind 0.0.0.0 in containers so
    /// the pod network can reach it.
    #[arg(long, env = "INGEST_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,

    /// Address of the admin endpoint (metrics, health): IP:port or host:port.
    /// Kept apart from the gRPC port so it can stay off the public load
    /// balancer.
    #[arg(long, env = "INGEST_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: String,

    /// Broker to publish to (amqp:// or amqps://). The vhost is the URL path,
    /// percent-encoded: `%2f` is the default vhost `/`. --help does not show
    /// the value from the environment, since it usually carries a password.
    #[arg(
        long,
        env = "INGEST_AMQP_URL",
        default_value = DEFAULT_AMQP_URL,
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// Topic exchange events are published to. It must be named: the default
    /// (empty-named) exchange only routes by queue name, not by topic.
    #[arg(long, env = "INGEST_EXCHANGE", default_value = DEFAULT_EXCHANGE)]
    pub exchange: String,

    /// Declare the exchange (durable, topic) at start. Turn off where the
    /// service's broker user may not configure exchanges and the exchange is
    /// provisioned separately.
    #[arg(
        long,
        env = "INGEST_DECLARE_EXCHANGE",
        default_value = DEFAULT_DECLARE_EXCHANGE,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "true|false"
    )]
    pub declare_exchange: String,

    /// Answer OK for events that no queue received (the broker returned them
    /// as unroutable) instead of FAILED_PRECONDITION. Only for setups where
    /// dropping events with no consumer bound yet is acceptable.
    #[arg(
        long,
        env = "INGEST_ACCEPT_UNROUTABLE",
        default_value = DEFAULT_ACCEPT_UNROUTABLE,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "true|false"
    )]
    pub accept_unroutable: String,

    /// Most events admitted and not yet confirmed by the broker. Bounds memory
    /// and the work lost on a crash; when full, callers get
    /// RESOURCE_EXHAUSTED and retry instead of queueing without bound.
    #[arg(long, env = "INGEST_BUFFER_EVENTS", default_value = DEFAULT_BUFFER_EVENTS)]
    pub buffer_events: String,

    /// Most payload bytes admitted and not yet confirmed (e.g. 64MiB). The
    /// event count alone does not bound memory when events are large.
    #[arg(long, env = "INGEST_BUFFER_BYTES", default_value = DEFAULT_BUFFER_BYTES)]
    pub buffer_bytes: String,

    /// Largest single event payload (e.g. 1MiB). Large messages hurt broker
    /// throughput for everyone; reject them at the edge. Must not exceed
    /// --buffer-bytes.
    #[arg(long, env = "INGEST_MAX_EVENT_BYTES", default_value = DEFAULT_MAX_EVENT_BYTES)]
    pub max_event_bytes: String,

    /// Most events in one request. Keeps one caller from taking the whole
    /// buffer in a single call. Must not exceed --buffer-events; when not
    /// set, it is lowered to a smaller --buffer-events.
    #[arg(long, env = "INGEST_MAX_BATCH_EVENTS", default_value = DEFAULT_MAX_BATCH_EVENTS)]
    pub max_batch_events: String,

    /// Whether `max_batch_events` was given (flag or environment) rather than
    /// left at its default: only a default is lowered to the buffer. Set from
    /// clap's value source by [`Config::load`] and [`Config::from_args`].
    #[arg(skip)]
    pub max_batch_events_given: bool,

    /// How long to wait for the broker to confirm a publish (e.g. 10s) before
    /// answering the caller with an error it can retry. Without it a stuck
    /// broker would hold requests and buffer space forever.
    #[arg(long, env = "INGEST_CONFIRM_TIMEOUT", default_value = DEFAULT_CONFIRM_TIMEOUT)]
    pub confirm_timeout: String,

    /// On SIGTERM, how long to keep waiting for outstanding confirms before
    /// exiting (e.g. 25s). Keep it below the orchestrator's grace period
    /// (30s on Kubernetes) so the process exits on its own terms.
    #[arg(long, env = "INGEST_DRAIN_TIMEOUT", default_value = DEFAULT_DRAIN_TIMEOUT)]
    pub drain_timeout: String,

    /// Number of confirm-mode AMQP channels to publish on (1..=256). One
    /// channel serialises all publishes; a few spread the work over cores.
    #[arg(long, env = "INGEST_CHANNELS", default_value = DEFAULT_CHANNELS)]
    pub channels: String,

    /// Cap of the exponential backoff between broker connection attempts
    /// (e.g. 30s), so a long outage does not stretch the time to recover.
    #[arg(
        long,
        env = "INGEST_RECONNECT_MAX_BACKOFF",
        default_value = DEFAULT_RECONNECT_MAX_BACKOFF
    )]
    pub reconnect_max_backoff: String,

    /// Delay suggested to callers (gRPC RetryInfo) when answering
    /// RESOURCE_EXHAUSTED (e.g. 250ms), so well-behaved clients back off
    /// instead of hammering a full buffer.
    #[arg(long, env = "INGEST_RETRY_AFTER", default_value = DEFAULT_RETRY_AFTER)]
    pub retry_after: String,

    /// Close a PublishStream that sends no message for this long (e.g. 60s),
    /// so dead callers do not pin buffer room and HTTP/2 streams.
    #[arg(
        long,
        env = "INGEST_STREAM_IDLE_TIMEOUT",
        default_value = DEFAULT_STREAM_IDLE_TIMEOUT
    )]
    pub stream_idle_timeout: String,

    /// While the broker is disconnected, how long a PublishStream waits for
    /// it to come back (e.g. 30s) before ending with UNAVAILABLE and its
    /// confirmed count, so a short reconnect does not cut streams off while a
    /// long outage does not hold them forever. Unary calls fail at once
    /// instead.
    #[arg(
        long,
        env = "INGEST_STREAM_STALL_TIMEOUT",
        default_value = DEFAULT_STREAM_STALL_TIMEOUT
    )]
    pub stream_stall_timeout: String,

    /// Most request bytes one stream may have in flight toward the server
    /// before HTTP/2 flow control stops its sender (e.g. 1MiB; 65535 to
    /// 2147483647 bytes). With admission waiting, this is what a stalled
    /// stream can park in server memory.
    #[arg(
        long,
        env = "INGEST_HTTP2_STREAM_WINDOW",
        default_value = DEFAULT_HTTP2_STREAM_WINDOW
    )]
    pub http2_stream_window: String,

    /// Most request bytes all streams of one connection together may have in
    /// flight toward the server (e.g. 4MiB; 65535 to 2147483647 bytes). Must
    /// not be below --http2-stream-window, or every stream is throttled to it.
    #[arg(
        long,
        env = "INGEST_HTTP2_CONNECTION_WINDOW",
        default_value = DEFAULT_HTTP2_CONNECTION_WINDOW
    )]
    pub http2_connection_window: String,

    /// Concurrent calls one HTTP/2 connection may open (1..=65536). With the
    /// windows it bounds transport memory per connection.
    #[arg(
        long,
        env = "INGEST_MAX_CONCURRENT_STREAMS",
        default_value = DEFAULT_MAX_CONCURRENT_STREAMS
    )]
    pub max_concurrent_streams: String,

    /// With events outstanding and no confirm (or nack, or return) from RabbitMQ for
    /// this long, the broker counts as stalled: new unary calls are refused at once
    /// with UNAVAILABLE, streams stop reading, readiness turns 503 and health
    /// NOT_SERVING, until the next confirm (e.g. 2s).
    #[arg(long, env = "INGEST_STALL_AFTER", default_value = DEFAULT_STALL_AFTER)]
    pub stall_after: String,

    /// gRPC connections held at once (1..=1000000). More wait in the listen
    /// backlog, unaccepted, until one closes; keep the descriptor limit above it.
    #[arg(
        long,
        env = "INGEST_MAX_CONNECTIONS",
        default_value = DEFAULT_MAX_CONNECTIONS
    )]
    pub max_connections: String,

    /// A new connection that has not sent its HTTP/2 preface within this long is
    /// closed (e.g. 10s).
    #[arg(
        long,
        env = "INGEST_HANDSHAKE_TIMEOUT",
        default_value = DEFAULT_HANDSHAKE_TIMEOUT
    )]
    pub handshake_timeout: String,

    /// How often the server pings each connection to notice a dead peer (e.g.
    /// 30s).
    #[arg(
        long,
        env = "INGEST_HTTP2_KEEPALIVE_INTERVAL",
        default_value = DEFAULT_HTTP2_KEEPALIVE_INTERVAL
    )]
    pub http2_keepalive_interval: String,

    /// A connection whose peer does not answer a keepalive ping within this long
    /// is closed (e.g. 10s).
    #[arg(
        long,
        env = "INGEST_HTTP2_KEEPALIVE_TIMEOUT",
        default_value = DEFAULT_HTTP2_KEEPALIVE_TIMEOUT
    )]
    pub http2_keepalive_timeout: String,

    /// Most request metadata (HTTP/2 header list) one call may carry (1KiB to
    /// 1MiB). A call over it is refused; other calls on its connection go on.
    #[arg(
        long,
        env = "INGEST_MAX_HEADER_LIST_SIZE",
        default_value = DEFAULT_MAX_HEADER_LIST_SIZE
    )]
    pub max_header_list_size: String,

    /// Format of the log lines on stderr: `text` (human-readable, for people
    /// at a terminal) or `json` (one JSON object per line, with trace and
    /// span ids, for log pipelines).
    #[arg(
        long,
        env = "INGEST_LOG_FORMAT",
        default_value = DEFAULT_LOG_FORMAT,
        value_name = "text|json"
    )]
    pub log_format: String,

    /// After a lost connection or channel, publish the events sent and not yet
    /// confirmed again (same message_id, original order within each request) on the
    /// next connection, while their confirm deadline lasts; callers then get OK.
    /// Unary calls arriving during the first round of reconnects wait for it too.
    /// `false`: they fail UNAVAILABLE at once.
    #[arg(
        long,
        env = "INGEST_RETRY_UNCONFIRMED",
        default_value = DEFAULT_RETRY_UNCONFIRMED,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "true|false"
    )]
    pub retry_unconfirmed: String,

    /// PEM certificate chain for TLS on the gRPC listener; with --tls-key. Unset:
    /// plaintext. Reloaded when the file changes and on SIGHUP.
    #[arg(long, env = "INGEST_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<String>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "INGEST_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<String>,

    /// PEM CA certificates: mutual TLS, every client must present a certificate
    /// that chains to one of them (needs --tls-cert).
    #[arg(long, env = "INGEST_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<String>,

    /// Tenants file (TOML): who may publish what, and how much. Unset: no
    /// authentication (local development). Reloaded when it changes and on SIGHUP.
    #[arg(long, env = "INGEST_AUTH_FILE", value_name = "TOML")]
    pub auth_file: Option<String>,

    /// PEM CA certificates that an amqps:// broker's certificate must chain to
    /// (in addition to the system's roots).
    #[arg(long, env = "INGEST_AMQP_CA", value_name = "PEM")]
    pub amqp_ca: Option<String>,
}

/// The defaults, without reading the command line or the environment.
impl Default for Args {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            admin_listen: DEFAULT_ADMIN_LISTEN.to_owned(),
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            exchange: DEFAULT_EXCHANGE.to_owned(),
            declare_exchange: DEFAULT_DECLARE_EXCHANGE.to_owned(),
            accept_unroutable: DEFAULT_ACCEPT_UNROUTABLE.to_owned(),
            buffer_events: DEFAULT_BUFFER_EVENTS.to_owned(),
            buffer_bytes: DEFAULT_BUFFER_BYTES.to_owned(),
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES.to_owned(),
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS.to_owned(),
            max_batch_events_given: false,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT.to_owned(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT.to_owned(),
            channels: DEFAULT_CHANNELS.to_owned(),
            reconnect_max_backoff: DEFAULT_RECONNECT_MAX_BACKOFF.to_owned(),
            retry_after: DEFAULT_RETRY_AFTER.to_owned(),
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT.to_owned(),
            stream_stall_timeout: DEFAULT_STREAM_STALL_TIMEOUT.to_owned(),
            http2_stream_window: DEFAULT_HTTP2_STREAM_WINDOW.to_owned(),
            http2_connection_window: DEFAULT_HTTP2_CONNECTION_WINDOW.to_owned(),
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS.to_owned(),
            stall_after: DEFAULT_STALL_AFTER.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS.to_owned(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT.to_owned(),
            http2_keepalive_interval: DEFAULT_HTTP2_KEEPALIVE_INTERVAL.to_owned(),
            http2_keepalive_timeout: DEFAULT_HTTP2_KEEPALIVE_TIMEOUT.to_owned(),
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE.to_owned(),
            log_format: DEFAULT_LOG_FORMAT.to_owned(),
            retry_unconfirmed: DEFAULT_RETRY_UNCONFIRMED.to_owned(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            auth_file: None,
            amqp_ca: None,
        }
    }
}

/// Validated configuration. See [`Args`] for what each setting is for.
///
/// Note: `amqp_url` usually carries a password, so do not log this struct
/// with `{:?}`.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Admin (metrics, health) listen address.
    pub admin_listen: SocketAddr,
    /// Broker URL; starts with `amqp://` or `amqps://`.
    pub amqp_url: String,
    /// Named exchange to publish to (1..=255 bytes).
    pub exchange: String,
    /// Declare the exchange at start.
    pub declare_exchange: bool,
    /// Answer OK for unroutable (returned) messages.
    pub accept_unroutable: bool,
    /// Events admitted and not yet confirmed, at most (≥ 1).
    pub buffer_events: usize,
    /// Payload bytes admitted and not yet confirmed, at most (≥ 1).
    pub buffer_bytes: usize,
    /// Largest event payload (1..=`buffer_bytes`).
    pub max_event_bytes: usize,
    /// Most events per request (1..=`buffer_events`).
    pub max_batch_events: usize,
    /// Wait for a publisher confirm at most this long (> 0).
    pub confirm_timeout: Duration,
    /// Wait for outstanding confirms on shutdown at most this long (> 0).
    pub drain_timeout: Duration,
    /// Confirm-mode channels (1..=[`MAX_CHANNELS`]).
    pub channels: usize,
    /// Cap of the reconnect backoff (> 0).
    pub reconnect_max_backoff: Duration,
    /// RetryInfo delay on RESOURCE_EXHAUSTED (> 0).
    pub retry_after: Duration,
    /// Close a PublishStream after this long without a message (> 0).
    pub stream_idle_timeout: Duration,
    /// While the broker is disconnected, end a PublishStream with UNAVAILABLE
    /// after waiting this long for it to come back (> 0).
    pub stream_stall_timeout: Duration,
    /// HTTP/2 flow-control window of one stream, in bytes
    /// ([`HTTP2_MIN_WINDOW`]..=[`HTTP2_MAX_WINDOW`]).
    pub http2_stream_window: u32,
    /// HTTP/2 flow-control window of one connection, in bytes
    /// (`http2_stream_window`..=[`HTTP2_MAX_WINDOW`]).
    pub http2_connection_window: u32,
    /// Concurrent streams per HTTP/2 connection
    /// (1..=[`MAX_CONCURRENT_STREAMS_LIMIT`]).
    pub max_concurrent_streams: u32,
    /// No broker answer for this long with events outstanding: stalled.
    pub stall_after: Duration,
    /// gRPC connections held at once (1..=[`MAX_CONNECTIONS_LIMIT`]).
    pub max_connections: usize,
    /// Time a new connection has to send its HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Interval of the server's keepalive pings.
    pub http2_keepalive_interval: Duration,
    /// Time a peer has to answer a keepalive ping.
    pub http2_keepalive_timeout: Duration,
    /// Most request metadata per call, in bytes ([`HEADER_LIST_SIZE_RANGE`]).
    pub max_header_list_size: u32,
    /// Format of the log lines on stderr.
    pub log_format: LogFormat,
    /// Publish events unconfirmed at a connection loss again on the next connection.
    pub retry_unconfirmed: bool,
    /// TLS on the gRPC listener; `None` = plaintext.
    pub tls: Option<TlsFiles>,
    /// The tenants file; `None` = no authentication.
    pub auth_file: Option<PathBuf>,
    /// CA for an `amqps://` broker.
    pub amqp_ca: Option<PathBuf>,
    /// Settings adjusted because of other settings (e.g. a default
    /// `max_batch_events` lowered to `buffer_events`), one sentence each, for
    /// `main` to log once logging is up.
    pub notices: Vec<String>,
}

/// Format of the log lines written to stderr (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, for people at a terminal.
    Text,
    /// One JSON object per line, with trace and span ids, for log pipelines.
    Json,
}

impl Config {
    /// Reads flags and `INGEST_*` variables and validates them.
    ///
    /// clap handles `--help`, `--version` and unknown flags itself (printing
    /// and exiting the process); every other problem comes back in the
    /// [`ConfigError`].
    pub fn load() -> Result<Config, ConfigError> {
        let matches = Args::command().get_matches();
        let args = Args::from_matches(&matches).unwrap_or_else(|e| e.exit());
        Config::try_from(args)
    }

    /// Like [`Config::load`], but from the given arguments (the first is the
    /// program name) and without exiting the process: clap's own errors,
    /// including `--help`, come back as a [`ConfigError`] with clap's text.
    ///
    /// `INGEST_*` environment variables are still read for settings not
    /// given as flags.
    pub fn from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let clap_error =
            |e: clap::Error| ConfigError(vec![e.render().to_string().trim_end().to_owned()]);
        let matches = Args::command()
            .try_get_matches_from(args)
            .map_err(clap_error)?;
        Config::try_from(Args::from_matches(&matches).map_err(clap_error)?)
    }
}

impl Args {
    /// The raw settings from clap's matches, noting which were given (flag or
    /// environment) rather than left at their defaults.
    fn from_matches(matches: &ArgMatches) -> Result<Args, clap::Error> {
        let mut args = <Args as FromArgMatches>::from_arg_matches(matches)?;
        args.max_batch_events_given = matches!(
            matches.value_source("max_batch_events"),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        Ok(args)
    }
}

/// The defaults of the table in [`Args`], run through the same parser as any
/// other input so that they cannot drift from the documented values.
///
/// Panics only if a `DEFAULT_*` constant is invalid, which the tests rule out;
/// meant for start-up and tests, not request paths.
impl Default for Config {
    fn default() -> Self {
        Config::try_from(Args::default()).expect("defaults are valid")
    }
}

/// Every problem found in the configuration, one per entry, each naming the
/// flag and environment variable, the value given and what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(problem)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A setting's two names, as shown in error messages.
#[derive(Clone, Copy)]
struct Setting {
    flag: &'static str,
    env: &'static str,
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} / {}", self.flag, self.env)
    }
}

macro_rules! settings {
    ($($name:ident = $flag:literal, $env:literal;)*) => {
        $(const $name: Setting = Setting { flag: $flag, env: $env };)*
        /// All settings, to check against the clap definition in tests.
        #[cfg(test)]
        const ALL_SETTINGS: &[Setting] = &[$($name),*];
    };
}

settings! {
    LISTEN = "--listen", "INGEST_LISTEN";
    ADMIN_LISTEN = "--admin-listen", "INGEST_ADMIN_LISTEN";
    AMQP_URL = "--amqp-url", "INGEST_AMQP_URL";
    EXCHANGE = "--exchange", "INGEST_EXCHANGE";
    DECLARE_EXCHANGE = "--declare-exchange", "INGEST_DECLARE_EXCHANGE";
    ACCEPT_UNROUTABLE = "--accept-unroutable", "INGEST_ACCEPT_UNROUTABLE";
    BUFFER_EVENTS = "--buffer-events", "INGEST_BUFFER_EVENTS";
    BUFFER_BYTES = "--buffer-bytes", "INGEST_BUFFER_BYTES";
    MAX_EVENT_BYTES = "--max-event-bytes", "INGEST_MAX_EVENT_BYTES";
    MAX_BATCH_EVENTS = "--max-batch-events", "INGEST_MAX_BATCH_EVENTS";
    CONFIRM_TIMEOUT = "--confirm-timeout", "INGEST_CONFIRM_TIMEOUT";
    DRAIN_TIMEOUT = "--drain-timeout", "INGEST_DRAIN_TIMEOUT";
    CHANNELS = "--channels", "INGEST_CHANNELS";
    RECONNECT_MAX_BACKOFF = "--reconnect-max-backoff", "INGEST_RECONNECT_MAX_BACKOFF";
    RETRY_AFTER = "--retry-after", "INGEST_RETRY_AFTER";
    STREAM_IDLE_TIMEOUT = "--stream-idle-timeout", "INGEST_STREAM_IDLE_TIMEOUT";
    STREAM_STALL_TIMEOUT = "--stream-stall-timeout", "INGEST_STREAM_STALL_TIMEOUT";
    HTTP2_STREAM_WINDOW = "--http2-stream-window", "INGEST_HTTP2_STREAM_WINDOW";
    HTTP2_CONNECTION_WINDOW = "--http2-connection-window", "INGEST_HTTP2_CONNECTION_WINDOW";
    MAX_CONCURRENT_STREAMS = "--max-concurrent-streams", "INGEST_MAX_CONCURRENT_STREAMS";
    STALL_AFTER = "--stall-after", "INGEST_STALL_AFTER";
    MAX_CONNECTIONS = "--max-connections", "INGEST_MAX_CONNECTIONS";
    HANDSHAKE_TIMEOUT = "--handshake-timeout", "INGEST_HANDSHAKE_TIMEOUT";
    HTTP2_KEEPALIVE_INTERVAL = "--http2-keepalive-interval", "INGEST_HTTP2_KEEPALIVE_INTERVAL";
    HTTP2_KEEPALIVE_TIMEOUT = "--http2-keepalive-timeout", "INGEST_HTTP2_KEEPALIVE_TIMEOUT";
    MAX_HEADER_LIST_SIZE = "--max-header-list-size", "INGEST_MAX_HEADER_LIST_SIZE";
    LOG_FORMAT = "--log-format", "INGEST_LOG_FORMAT";
    RETRY_UNCONFIRMED = "--retry-unconfirmed", "INGEST_RETRY_UNCONFIRMED";
    TLS_CERT = "--tls-cert", "INGEST_TLS_CERT";
    TLS_KEY = "--tls-key", "INGEST_TLS_KEY";
    TLS_CLIENT_CA = "--tls-client-ca", "INGEST_TLS_CLIENT_CA";
    AUTH_FILE = "--auth-file", "INGEST_AUTH_FILE";
    AMQP_CA = "--amqp-ca", "INGEST_AMQP_CA";
}

/// Collects problems while every field is parsed.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// Parses one setting; on failure records the problem and returns `None`.
    fn parse<T>(
        &mut self,
        setting: Setting,
        raw: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match parse(raw) {
            Ok(value) => Some(value),
            Err(why) => {
                self.report(setting, why);
                None
            }
        }
    }

    fn report(&mut self, setting: Setting, why: impl fmt::Display) {
        self.0.push(format!("{setting}: {why}"));
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let mut problems = Problems::default();
        let p = &mut problems;

        let listen = p.parse(LISTEN, &args.listen, parse_socket_addr);
        let admin_listen = p.parse(ADMIN_LISTEN, &args.admin_listen, parse_socket_addr);
        let amqp_url = p.parse(AMQP_URL, &args.amqp_url, parse_amqp_url);
        let exchange = p.parse(EXCHANGE, &args.exchange, parse_exchange);
        let declare_exchange = p.parse(DECLARE_EXCHANGE, &args.declare_exchange, parse_bool);
        let accept_unroutable = p.parse(ACCEPT_UNROUTABLE, &args.accept_unroutable, parse_bool);
        let buffer_events = p.parse(BUFFER_EVENTS, &args.buffer_events, |s| {
            at_least_one(s, parse_count(s)?, "the buffer could never admit an event")
        });
        let buffer_bytes = p.parse(BUFFER_BYTES, &args.buffer_bytes, |s| {
            at_least_one(s, parse_size(s)?, "the buffer could never admit an event")
        });
        let max_event_bytes = p.parse(MAX_EVENT_BYTES, &args.max_event_bytes, |s| {
            at_least_one(s, parse_size(s)?, "every event would be refused")
        });
        let mut max_batch_events = p.parse(MAX_BATCH_EVENTS, &args.max_batch_events, |s| {
            at_least_one(s, parse_count(s)?, "every request would be refused")
        });
        let confirm_timeout = p.parse(CONFIRM_TIMEOUT, &args.confirm_timeout, |s| {
            positive(
                s,
                parse_duration(s)?,
                "every publish would time out at once",
            )
        });
        let drain_timeout = p.parse(DRAIN_TIMEOUT, &args.drain_timeout, |s| {
            positive(
                s,
                parse_duration(s)?,
                "shutdown would drop unconfirmed events",
            )
        });
        let channels = p.parse(CHANNELS, &args.channels, |s| {
            let n = parse_count(s)?;
            if (1..=MAX_CHANNELS).contains(&n) {
                Ok(n)
            } else {
                Err(format!(
                    "{s:?} is out of range (expected 1..={MAX_CHANNELS} channels)"
                ))
            }
        });
        let reconnect_max_backoff =
            p.parse(RECONNECT_MAX_BACKOFF, &args.reconnect_max_backoff, |s| {
                positive(s, parse_duration(s)?, "reconnects would spin without pause")
            });
        let retry_after = p.parse(RETRY_AFTER, &args.retry_after, |s| {
            positive(s, parse_duration(s)?, "callers would retry without pause")
        });
        let stream_idle_timeout = p.parse(STREAM_IDLE_TIMEOUT, &args.stream_idle_timeout, |s| {
            positive(
                s,
                parse_duration(s)?,
                "every stream would be closed at once",
            )
        });
        let stream_stall_timeout = p.parse(STREAM_STALL_TIMEOUT, &args.stream_stall_timeout, |s| {
            positive(
                s,
                parse_duration(s)?,
                "every stream would end at the first broker disconnect",
            )
        });
        let http2_stream_window = p.parse(
            HTTP2_STREAM_WINDOW,
            &args.http2_stream_window,
            parse_http2_window,
        );
        let http2_connection_window = p.parse(
            HTTP2_CONNECTION_WINDOW,
            &args.http2_connection_window,
            parse_http2_window,
        );
        let max_concurrent_streams =
            p.parse(MAX_CONCURRENT_STREAMS, &args.max_concurrent_streams, |s| {
                let n = parse_count(s)?;
                u32::try_from(n)
                    .ok()
                    .filter(|n| (1..=MAX_CONCURRENT_STREAMS_LIMIT).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "{s:?} is out of range \
                             (expected 1..={MAX_CONCURRENT_STREAMS_LIMIT} streams)"
                        )
                    })
            });
        let stall_after = p.parse(STALL_AFTER, &args.stall_after, |s| {
            positive(
                s,
                parse_duration(s)?,
                "every busy moment would count as a stall",
            )
        });
        let max_connections = p.parse(MAX_CONNECTIONS, &args.max_connections, |s| {
            let n = parse_count(s)?;
            if (1..=MAX_CONNECTIONS_LIMIT).contains(&n) {
                Ok(n)
            } else {
                Err(format!(
                    "{s:?} is out of range (expected 1..={MAX_CONNECTIONS_LIMIT} connections)"
                ))
            }
        });
        let handshake_timeout = p.parse(HANDSHAKE_TIMEOUT, &args.handshake_timeout, |s| {
            positive(
                s,
                parse_duration(s)?,
                "every connection would be closed at once",
            )
        });
        let http2_keepalive_interval = p.parse(
            HTTP2_KEEPALIVE_INTERVAL,
            &args.http2_keepalive_interval,
            |s| positive(s, parse_duration(s)?, "pings would be sent without pause"),
        );
        let http2_keepalive_timeout = p.parse(
            HTTP2_KEEPALIVE_TIMEOUT,
            &args.http2_keepalive_timeout,
            |s| positive(s, parse_duration(s)?, "every ping would time out at once"),
        );
        let max_header_list_size = p.parse(MAX_HEADER_LIST_SIZE, &args.max_header_list_size, |s| {
            let bytes = parse_size(s)?;
            if HEADER_LIST_SIZE_RANGE.contains(&bytes) {
                u32::try_from(bytes).map_err(|e| e.to_string())
            } else {
                Err(format!(
                    "{s:?} ({bytes} bytes) is out of range (expected {}..={} bytes)",
                    HEADER_LIST_SIZE_RANGE.start(),
                    HEADER_LIST_SIZE_RANGE.end()
                ))
            }
        });
        let log_format = p.parse(LOG_FORMAT, &args.log_format, parse_log_format);
        let retry_unconfirmed = p.parse(RETRY_UNCONFIRMED, &args.retry_unconfirmed, parse_bool);

        // Cross-field checks, only where both sides parsed.
        if let (Some(event), Some(buffer)) = (max_event_bytes, buffer_bytes)
            && event > buffer
        {
            p.report(
                MAX_EVENT_BYTES,
                format_args!(
                    "{:?} ({event} bytes) exceeds {BUFFER_BYTES} {:?} ({buffer} bytes): \
                     an event larger than the whole buffer could never be admitted",
                    args.max_event_bytes, args.buffer_bytes,
                ),
            );
        }
        let mut notices = Vec::new();
        if let (Some(batch), Some(buffer)) = (max_batch_events.as_mut(), buffer_events)
            && *batch > buffer
        {
            if args.max_batch_events_given {
                p.report(
                    MAX_BATCH_EVENTS,
                    format_args!(
                        "{:?} exceeds {BUFFER_EVENTS} {:?}: \
                         a batch larger than the whole buffer could never be admitted",
                        args.max_batch_events, args.buffer_events,
                    ),
                );
            } else {
                // The operator set only the buffer: a default must not stop the start.
                notices.push(format!(
                    "{MAX_BATCH_EVENTS} not set: using {buffer} (the {BUFFER_EVENTS} value) \
                     instead of the default {batch}, since a request can never hold more \
                     events than the whole buffer"
                ));
                *batch = buffer;
            }
        }
        if let (Some(connection), Some(stream)) = (http2_connection_window, http2_stream_window)
            && connection < stream
        {
            p.report(
                HTTP2_CONNECTION_WINDOW,
                format_args!(
                    "{:?} ({connection} bytes) is below {HTTP2_STREAM_WINDOW} {:?} \
                     ({stream} bytes): a connection window smaller than one stream's window \
                     throttles every stream to it",
                    args.http2_connection_window, args.http2_stream_window,
                ),
            );
        }

        let path =
            |raw: &Option<String>| raw.as_deref().filter(|s| !s.is_empty()).map(PathBuf::from);
        let tls = match (path(&args.tls_cert), path(&args.tls_key)) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: path(&args.tls_client_ca),
            }),
            (None, None) => {
                if args.tls_client_ca.as_deref().is_some_and(|s| !s.is_empty()) {
                    p.report(
                        TLS_CLIENT_CA,
                        format_args!(
                            "is set without {TLS_CERT} and {TLS_KEY}: mutual TLS needs TLS"
                        ),
                    );
                }
                None
            }
            (Some(_), None) => {
                p.report(
                    TLS_KEY,
                    format_args!("is missing: {TLS_CERT} needs its key"),
                );
                None
            }
            (None, Some(_)) => {
                p.report(
                    TLS_CERT,
                    format_args!("is missing: {TLS_KEY} needs its certificate"),
                );
                None
            }
        };
        let amqp_ca = path(&args.amqp_ca);
        // A file that is not there is a typo: say so now, with the setting's name.
        for (setting, raw) in [
            (TLS_CERT, &args.tls_cert),
            (TLS_KEY, &args.tls_key),
            (TLS_CLIENT_CA, &args.tls_client_ca),
            (AUTH_FILE, &args.auth_file),
            (AMQP_CA, &args.amqp_ca),
        ] {
            if let Some(file) = path(raw)
                && !file.is_file()
            {
                p.report(
                    setting,
                    format_args!("{} is not a readable file", file.display()),
                );
            }
        }
        if let (Some(_), Some(url)) = (&amqp_ca, &amqp_url)
            && !url
                .split(',')
                .all(|u| u.trim_start().starts_with("amqps://"))
        {
            p.report(
                AMQP_CA,
                format_args!("is set, but {AMQP_URL} is not amqps://: the CA would not be used"),
            );
        }

        let (
            Some(listen),
            Some(admin_listen),
            Some(amqp_url),
            Some(exchange),
            Some(declare_exchange),
            Some(accept_unroutable),
            Some(buffer_events),
            Some(buffer_bytes),
            Some(max_event_bytes),
            Some(max_batch_events),
            Some(confirm_timeout),
            Some(drain_timeout),
            Some(channels),
            Some(reconnect_max_backoff),
            Some(retry_after),
            Some(stream_idle_timeout),
            Some(stream_stall_timeout),
            Some(http2_stream_window),
            Some(http2_connection_window),
            Some(max_concurrent_streams),
            Some(stall_after),
            Some(max_connections),
            Some(handshake_timeout),
            Some(http2_keepalive_interval),
            Some(http2_keepalive_timeout),
            Some(max_header_list_size),
            Some(log_format),
            Some(retry_unconfirmed),
        ) = (
            listen,
            admin_listen,
            amqp_url,
            exchange,
            declare_exchange,
            accept_unroutable,
            buffer_events,
            buffer_bytes,
            max_event_bytes,
            max_batch_events,
            confirm_timeout,
            drain_timeout,
            channels,
            reconnect_max_backoff,
            retry_after,
            stream_idle_timeout,
            stream_stall_timeout,
            http2_stream_window,
            http2_connection_window,
            max_concurrent_streams,
            stall_after,
            max_connections,
            handshake_timeout,
            http2_keepalive_interval,
            http2_keepalive_timeout,
            max_header_list_size,
            log_format,
            retry_unconfirmed,
        )
        else {
            // Every `None` above came with a recorded problem.
            debug_assert!(!problems.0.is_empty());
            return Err(ConfigError(problems.0));
        };
        if !problems.0.is_empty() {
            return Err(ConfigError(problems.0));
        }

        Ok(Config {
            listen,
            admin_listen,
            amqp_url,
            exchange,
            declare_exchange,
            accept_unroutable,
            buffer_events,
            buffer_bytes,
            max_event_bytes,
            max_batch_events,
            confirm_timeout,
            drain_timeout,
            channels,
            reconnect_max_backoff,
            retry_after,
            stream_idle_timeout,
            stream_stall_timeout,
            http2_stream_window,
            http2_connection_window,
            max_concurrent_streams,
            stall_after,
            max_connections,
            handshake_timeout,
            http2_keepalive_interval,
            http2_keepalive_timeout,
            max_header_list_size,
            log_format,
            retry_unconfirmed,
            tls,
            auth_file: path(&args.auth_file),
            amqp_ca,
            notices,
        })
    }
}

const SIZE_EXPECTED: &str = "expected bytes, e.g. 65536, 64KiB, 1MiB";
const DURATION_EXPECTED: &str = "expected a number with a unit ms, s or m, e.g. 250ms, 10s, 2m";

/// Parses a byte size: a whole number of bytes, optionally followed (with or
/// without a space) by `B`, `KiB`, `MiB` or `GiB`. Units are binary
/// (1 KiB = 1024 B); `KB`/`MB`/`GB` are refused as ambiguous.
///
/// On error, returns a message quoting the value and saying what is expected.
pub fn parse_size(raw: &str) -> Result<usize, String> {
    let s = raw.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    let unit = unit.trim_start();
    if number.is_empty() {
        return Err(format!("{raw:?} is not a size ({SIZE_EXPECTED})"));
    }
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "k" | "K" | "KB" | "kB" | "M" | "MB" | "G" | "GB" => {
            return Err(format!(
                "{raw:?} has an ambiguous unit {unit:?} (use binary units KiB, MiB or GiB, \
                 e.g. 64KiB, 1MiB)"
            ));
        }
        _ => return Err(format!("{raw:?} is not a size ({SIZE_EXPECTED})")),
    };
    let too_large = || format!("{raw:?} is too large (at most {} bytes)", usize::MAX);
    // Digits only, so the only possible parse failure is overflow.
    let number: u64 = number.parse().map_err(|_| too_large())?;
    let bytes = number.checked_mul(multiplier).ok_or_else(too_large)?;
    usize::try_from(bytes).map_err(|_| too_large())
}

/// Parses a duration: a whole number followed (with or without a space) by a
/// unit `ms`, `s` or `m` (minutes). A bare number is refused: "10" could mean
/// seconds or milliseconds, and guessing wrong is a thousandfold error.
///
/// On error, returns a message quoting the value and saying what is expected.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let s = raw.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    let unit = unit.trim_start();
    if number.is_empty() {
        return Err(format!("{raw:?} is not a duration ({DURATION_EXPECTED})"));
    }
    if unit.is_empty() {
        return Err(format!(
            "{raw:?} needs a unit (ms, s or m, e.g. {number}ms or {number}s)"
        ));
    }
    let too_large = || format!("{raw:?} is too large a duration");
    let number: u64 = number.parse().map_err(|_| too_large())?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => number
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(too_large),
        _ => Err(format!(
            "{raw:?} has an unknown unit {unit:?} ({DURATION_EXPECTED})"
        )),
    }
}

/// Whole, non-negative number without unit.
fn parse_count(raw: &str) -> Result<usize, String> {
    let s = raw.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{raw:?} is not a whole number (expected e.g. 1000)"
        ));
    }
    s.parse()
        .map_err(|_| format!("{raw:?} is too large (at most {})", usize::MAX))
}

/// An HTTP/2 flow-control window: a size within
/// [`HTTP2_MIN_WINDOW`]..=[`HTTP2_MAX_WINDOW`] bytes.
fn parse_http2_window(raw: &str) -> Result<u32, String> {
    let bytes = parse_size(raw)?;
    u32::try_from(bytes)
        .ok()
        .filter(|w| (HTTP2_MIN_WINDOW..=HTTP2_MAX_WINDOW).contains(w))
        .ok_or_else(|| {
            format!(
                "{raw:?} ({bytes} bytes) is out of range (expected \
                 {HTTP2_MIN_WINDOW}..={HTTP2_MAX_WINDOW} bytes, the HTTP/2 window limits)"
            )
        })
}

fn parse_bool(raw: &str) -> Result<bool, String> {
    let s = raw.trim();
    if s.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if s.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(format!("{raw:?} is not a boolean (expected true or false)"))
    }
}

fn parse_log_format(raw: &str) -> Result<LogFormat, String> {
    let s = raw.trim();
    if s.eq_ignore_ascii_case("text") {
        Ok(LogFormat::Text)
    } else if s.eq_ignore_ascii_case("json") {
        Ok(LogFormat::Json)
    } else {
        Err(format!(
            "{raw:?} is not a log format (expected text or json)"
        ))
    }
}

const ADDR_EXPECTED: &str =
    "expected IP:port or host:port, e.g. 0.0.0.0:50051, [::]:50051 or localhost:50051";

/// A listen address: `IP:port`, or `host:port` with the host name resolved now
/// (start-up). Of several addresses the first IPv4 one is taken (else the
/// first), so `localhost:50051` listens where most clients dial `localhost`.
fn parse_socket_addr(raw: &str) -> Result<SocketAddr, String> {
    let s = raw.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let not_an_address = || format!("{raw:?} is not an address ({ADDR_EXPECTED})");
    let (host, port) = s.rsplit_once(':').ok_or_else(not_an_address)?;
    if host.is_empty() || host.contains([':', '[', ']', '/']) || host.contains(char::is_whitespace)
    {
        return Err(not_an_address());
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{raw:?} has no valid port (0..=65535; {ADDR_EXPECTED})"))?;
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{raw:?}: cannot resolve host {host:?} ({e})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("{raw:?}: host {host:?} resolves to no address"))
}

/// One URL, or several comma-separated (the nodes of a cluster), each checked.
fn parse_amqp_url(raw: &str) -> Result<String, String> {
    if !raw.contains(',') {
        return parse_one_amqp_url(raw);
    }
    let urls: Vec<String> = raw
        .split(',')
        .map(|u| parse_one_amqp_url(u.trim()))
        .collect::<Result<_, _>>()?;
    Ok(urls.join(","))
}

fn parse_one_amqp_url(raw: &str) -> Result<String, String> {
    // Never echo a password into logs: quote the URL with it masked.
    let shown = redact_password(raw);
    if raw.chars().any(char::is_whitespace) {
        return Err(format!(
            "{shown:?} contains whitespace (a trailing newline from a secret file?)"
        ));
    }
    let lower = raw.to_ascii_lowercase();
    let rest = ["amqp://", "amqps://"]
        .iter()
        .find_map(|scheme| lower.strip_prefix(scheme));
    match rest {
        None => Err(format!(
            "{shown:?} is not an AMQP URL (expected amqp://… or amqps://…, \
             e.g. {DEFAULT_AMQP_URL})"
        )),
        Some(rest) if rest.is_empty() || rest.starts_with('/') => Err(format!(
            "{shown:?} has no host (expected e.g. {DEFAULT_AMQP_URL})"
        )),
        Some(_) => Ok(raw.to_owned()),
    }
}

fn parse_exchange(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err(
            "\"\" is the AMQP default exchange, which routes by queue name only \
             (expected a named exchange for topic routing, e.g. events)"
                .to_owned(),
        );
    }
    if raw.len() > MAX_EXCHANGE_NAME_BYTES {
        return Err(format!(
            "the name is {} bytes long (AMQP allows at most {MAX_EXCHANGE_NAME_BYTES})",
            raw.len()
        ));
    }
    Ok(raw.to_owned())
}

fn at_least_one(raw: &str, n: usize, why: &str) -> Result<usize, String> {
    if n >= 1 {
        Ok(n)
    } else {
        Err(format!("{raw:?} must be at least 1 ({why})"))
    }
}

fn positive(raw: &str, d: Duration, why: &str) -> Result<Duration, String> {
    if d > Duration::ZERO {
        Ok(d)
    } else {
        Err(format!("{raw:?} must be greater than zero ({why})"))
    }
}

/// `amqp://user:secret@host/` → `amqp://user:***@host/`.
fn redact_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = authority[..at].find(':') else {
        return url.to_owned();
    };
    format!(
        "{}***{}",
        &url[..scheme_end + colon + 1],
        &url[scheme_end + at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn config(args: Args) -> Result<Config, ConfigError> {
        Config::try_from(args)
    }

    fn problems(args: Args) -> Vec<String> {
        match config(args) {
            Ok(c) => panic!("expected errors, got {c:?}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn defaults_equal_the_table() {
        let c = Config::default();
        assert_eq!(c.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(c.admin_listen, "0.0.0.0:9464".parse().unwrap());
        assert_eq!(c.amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(c.exchange, "events");
        assert!(c.declare_exchange);
        assert!(!c.accept_unroutable);
        assert_eq!(c.buffer_events, 10_000);
        assert_eq!(c.buffer_bytes, 64 * 1024 * 1024);
        assert_eq!(c.max_event_bytes, 1024 * 1024);
        assert_eq!(c.max_batch_events, 1000);
        assert_eq!(c.confirm_timeout, Duration::from_secs(10));
        assert_eq!(c.drain_timeout, Duration::from_secs(25));
        assert_eq!(c.channels, 4);
        assert_eq!(c.reconnect_max_backoff, Duration::from_secs(30));
        assert_eq!(c.retry_after, Duration::from_millis(250));
        assert_eq!(c.stream_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.stream_stall_timeout, Duration::from_secs(30));
        assert_eq!(c.http2_stream_window, 64 * 1024);
        assert_eq!(c.http2_connection_window, 4 * 1024 * 1024);
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.stall_after, Duration::from_secs(2));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.max_header_list_size, 32 * 1024);
        assert_eq!(c.max_concurrent_streams, 128);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn clap_definition_matches_names_and_defaults() {
        let cmd = Args::command();
        cmd.clone().debug_assert();
        let clap_args: Vec<_> = cmd
            .get_arguments()
            .filter(|a| a.get_long().is_some_and(|l| l != "help" && l != "version"))
            .collect();
        assert_eq!(clap_args.len(), ALL_SETTINGS.len());
        for s in ALL_SETTINGS {
            let arg = clap_args
                .iter()
                .find(|a| a.get_long().map(|l| format!("--{l}")).as_deref() == Some(s.flag))
                .unwrap_or_else(|| panic!("no clap arg for {}", s.flag));
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(s.env));
            // The optional files (TLS, tenants, the broker's CA) have none: unset
            // means off.
            let optional = [TLS_CERT, TLS_KEY, TLS_CLIENT_CA, AUTH_FILE, AMQP_CA]
                .iter()
                .any(|o| o.flag == s.flag);
            assert_eq!(
                arg.get_default_values().len(),
                usize::from(!optional),
                "{} has a default",
                s.flag
            );
        }
        // Args::default() is what clap produces with nothing given (other
        // than the environment, which is why this builds the matches without
        // env lookups: every value comes from default_value).
        let mut no_env = Args::command();
        for s in ALL_SETTINGS {
            let id = s.flag.trim_start_matches("--").replace('-', "_");
            no_env = no_env.mut_arg(id, |a| a.env(None::<&str>));
        }
        let matches = no_env.try_get_matches_from(["ingest"]).unwrap();
        let parsed = <Args as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        assert_eq!(parsed, Args::default());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64 KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("512 B"), Ok(512));
        assert_eq!(parse_size(" 1MiB "), Ok(1 << 20));
        assert_eq!(parse_size("0"), Ok(0));

        let e = parse_size("12XB").unwrap_err();
        assert_eq!(
            e,
            r#""12XB" is not a size (expected bytes, e.g. 65536, 64KiB, 1MiB)"#
        );
        assert!(parse_size("-1").unwrap_err().contains("is not a size"));
        assert!(parse_size("").unwrap_err().contains("is not a size"));
        assert!(parse_size("KiB").unwrap_err().contains("is not a size"));
        assert!(parse_size("1.5MiB").unwrap_err().contains("is not a size"));
        assert!(parse_size("+5").unwrap_err().contains("is not a size"));
        assert!(parse_size("1MB").unwrap_err().contains("ambiguous unit"));
        assert!(parse_size("1kib").is_err());

        assert!(
            parse_size("99999999999999999999")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_size("18446744073709551615GiB")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_size("17179869184GiB")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("10 s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));

        let e = parse_duration("10").unwrap_err();
        assert!(e.contains("needs a unit"), "{e}");
        assert!(e.contains("\"10\""), "{e}");
        let e = parse_duration("abc").unwrap_err();
        assert!(e.contains("is not a duration"), "{e}");
        assert!(
            parse_duration("")
                .unwrap_err()
                .contains("is not a duration")
        );
        assert!(parse_duration("10h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("2M").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(
            parse_duration("18446744073709551615m")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_duration("99999999999999999999s")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn all_errors_reported_at_once() {
        let errs = problems(Args {
            buffer_bytes: "12XB".into(),
            confirm_timeout: "10".into(),
            listen: "nowhere".into(),
            ..Args::default()
        });
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(
            errs.iter()
                .any(|e| e.starts_with("--listen / INGEST_LISTEN: \"nowhere\""))
        );
        assert!(errs.contains(
            &r#"--buffer-bytes / INGEST_BUFFER_BYTES: "12XB" is not a size (expected bytes, e.g. 65536, 64KiB, 1MiB)"#
                .to_owned()
        ));
        assert!(errs.iter().any(|e| {
            e.starts_with("--confirm-timeout / INGEST_CONFIRM_TIMEOUT: \"10\" needs a unit")
        }));

        // Display: one problem per line.
        let shown = ConfigError(errs.clone()).to_string();
        assert_eq!(shown.lines().count(), 3);
        assert_eq!(shown.lines().collect::<Vec<_>>(), errs);
    }

    #[test]
    fn every_field_is_checked() {
        let errs = problems(Args {
            listen: "x".into(),
            admin_listen: "x".into(),
            amqp_url: "x".into(),
            exchange: "".into(),
            declare_exchange: "x".into(),
            accept_unroutable: "x".into(),
            buffer_events: "x".into(),
            buffer_bytes: "x".into(),
            max_event_bytes: "x".into(),
            max_batch_events: "x".into(),
            max_batch_events_given: true,
            confirm_timeout: "x".into(),
            drain_timeout: "x".into(),
            channels: "x".into(),
            reconnect_max_backoff: "x".into(),
            retry_after: "x".into(),
            stream_idle_timeout: "x".into(),
            stream_stall_timeout: "x".into(),
            http2_stream_window: "x".into(),
            http2_connection_window: "x".into(),
            max_concurrent_streams: "x".into(),
            stall_after: "x".into(),
            max_connections: "x".into(),
            handshake_timeout: "x".into(),
            http2_keepalive_interval: "x".into(),
            http2_keepalive_timeout: "x".into(),
            max_header_list_size: "x".into(),
            log_format: "x".into(),
            retry_unconfirmed: "x".into(),
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            tls_client_ca: Some("/nonexistent/ca.pem".into()),
            auth_file: Some("/nonexistent/tenants.toml".into()),
            amqp_ca: Some("/nonexistent/amqp-ca.pem".into()),
        });
        assert_eq!(errs.len(), ALL_SETTINGS.len(), "{errs:#?}");
        for (s, e) in ALL_SETTINGS.iter().zip(&errs) {
            assert!(e.starts_with(&format!("{} / {}: ", s.flag, s.env)), "{e}");
        }
    }

    #[test]
    fn zero_and_range_checks() {
        let errs = problems(Args {
            buffer_events: "0".into(),
            buffer_bytes: "0".into(),
            max_event_bytes: "0B".into(),
            max_batch_events: "0".into(),
            confirm_timeout: "0s".into(),
            drain_timeout: "0ms".into(),
            reconnect_max_backoff: "0m".into(),
            retry_after: "0ms".into(),
            channels: "0".into(),
            stream_idle_timeout: "0s".into(),
            stream_stall_timeout: "0ms".into(),
            http2_stream_window: "0".into(),
            http2_connection_window: "0B".into(),
            max_concurrent_streams: "0".into(),
            ..Args::default()
        });
        assert_eq!(errs.len(), 14, "{errs:#?}");
        assert!(errs.iter().any(|e| {
            e.starts_with("--buffer-events / INGEST_BUFFER_EVENTS: \"0\" must be at least 1")
        }));
        assert!(errs.iter().any(|e| {
            e.starts_with("--buffer-bytes / INGEST_BUFFER_BYTES: \"0\" must be at least 1")
        }));
        assert!(errs.iter().any(|e| e.starts_with(
            "--confirm-timeout / INGEST_CONFIRM_TIMEOUT: \"0s\" must be greater than zero"
        )));
        assert!(errs.iter().any(|e| {
            e.starts_with("--channels / INGEST_CHANNELS: \"0\" is out of range (expected 1..=256")
        }));
        assert!(errs.iter().any(|e| e.starts_with(
            "--stream-idle-timeout / INGEST_STREAM_IDLE_TIMEOUT: \"0s\" must be greater than zero"
        )));
        assert!(errs.iter().any(|e| e.starts_with(
            "--stream-stall-timeout / INGEST_STREAM_STALL_TIMEOUT: \"0ms\" must be greater than \
             zero"
        )));
        assert!(errs.iter().any(|e| e.starts_with(
            "--http2-stream-window / INGEST_HTTP2_STREAM_WINDOW: \"0\" (0 bytes) is out of range \
             (expected 65535..=2147483647 bytes"
        )));
        assert!(errs.iter().any(|e| e.starts_with(
            "--http2-connection-window / INGEST_HTTP2_CONNECTION_WINDOW: \"0B\" (0 bytes) is out \
             of range"
        )));
        assert!(errs.iter().any(|e| e.starts_with(
            "--max-concurrent-streams / INGEST_MAX_CONCURRENT_STREAMS: \"0\" is out of range \
             (expected 1..=65536 streams)"
        )));

        let errs = problems(Args {
            channels: "257".into(),
            ..Args::default()
        });
        assert_eq!(errs.len(), 1);
        assert!(errs[0].contains("\"257\" is out of range"), "{errs:?}");
        for ok in ["1", "256"] {
            let c = config(Args {
                channels: ok.into(),
                ..Args::default()
            })
            .unwrap();
            assert_eq!(c.channels.to_string(), ok);
        }
    }

    #[test]
    fn http2_limits() {
        // Windows: 65535..=2147483647 bytes, in any size notation.
        for (stream, connection) in [
            ("65534", "4MiB"),
            ("1MiB", "2GiB"),
            ("1MiB", "99999999999999999999"),
        ] {
            let errs = problems(Args {
                http2_stream_window: stream.into(),
                http2_connection_window: connection.into(),
                ..Args::default()
            });
            assert_eq!(errs.len(), 1, "{errs:#?}");
        }
        let errs = problems(Args {
            http2_stream_window: "64KiB".into(),
            http2_connection_window: "65535".into(),
            ..Args::default()
        });
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with("--http2-connection-window / "),
            "{errs:?}"
        );
        let errs = problems(Args {
            http2_stream_window: "2GiB".into(),
            ..Args::default()
        });
        assert_eq!(
            errs,
            [
                "--http2-stream-window / INGEST_HTTP2_STREAM_WINDOW: \"2GiB\" (2147483648 bytes) \
                 is out of range (expected 65535..=2147483647 bytes, the HTTP/2 window limits)"
            ]
        );
        for (stream, connection) in [
            ("65535", "65535"),
            ("64KiB", "2147483647"),
            ("2147483647", "2147483647"),
        ] {
            let c = config(Args {
                http2_stream_window: stream.into(),
                http2_connection_window: connection.into(),
                ..Args::default()
            })
            .unwrap();
            assert_eq!(c.http2_stream_window, parse_size(stream).unwrap() as u32);
            assert_eq!(
                c.http2_connection_window,
                parse_size(connection).unwrap() as u32
            );
        }

        // Concurrent streams: 1..=65536.
        for bad in ["65537", "4294967296", "many"] {
            let errs = problems(Args {
                max_concurrent_streams: bad.into(),
                ..Args::default()
            });
            assert_eq!(errs.len(), 1, "{errs:#?}");
            assert!(
                errs[0].starts_with(&format!(
                    "--max-concurrent-streams / INGEST_MAX_CONCURRENT_STREAMS: {bad:?}"
                )),
                "{errs:?}"
            );
        }
        for ok in ["1", "65536"] {
            let c = config(Args {
                max_concurrent_streams: ok.into(),
                ..Args::default()
            })
            .unwrap();
            assert_eq!(c.max_concurrent_streams.to_string(), ok);
        }
    }

    #[test]
    fn cross_field_errors() {
        let errs = problems(Args {
            buffer_bytes: "1MiB".into(),
            max_event_bytes: "2MiB".into(),
            buffer_events: "100".into(),
            max_batch_events: "101".into(),
            max_batch_events_given: true,
            ..Args::default()
        });
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert_eq!(
            errs[0],
            "--max-event-bytes / INGEST_MAX_EVENT_BYTES: \"2MiB\" (2097152 bytes) exceeds \
             --buffer-bytes / INGEST_BUFFER_BYTES \"1MiB\" (1048576 bytes): an event larger \
             than the whole buffer could never be admitted"
        );
        assert!(errs[1].starts_with("--max-batch-events / INGEST_MAX_BATCH_EVENTS: \"101\" exceeds --buffer-events / INGEST_BUFFER_EVENTS \"100\""));

        let errs = problems(Args {
            http2_stream_window: "2MiB".into(),
            http2_connection_window: "1MiB".into(),
            ..Args::default()
        });
        assert_eq!(
            errs,
            [
                "--http2-connection-window / INGEST_HTTP2_CONNECTION_WINDOW: \"1MiB\" \
                 (1048576 bytes) is below --http2-stream-window / INGEST_HTTP2_STREAM_WINDOW \
                 \"2MiB\" (2097152 bytes): a connection window smaller than one stream's \
                 window throttles every stream to it"
            ]
        );

        // Equal is fine.
        let c = config(Args {
            buffer_bytes: "1MiB".into(),
            max_event_bytes: "1048576".into(),
            buffer_events: "100".into(),
            max_batch_events: "100".into(),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(c.max_event_bytes, c.buffer_bytes);
        assert_eq!(c.max_batch_events, c.buffer_events);
        let c = config(Args {
            http2_stream_window: "2MiB".into(),
            http2_connection_window: "2097152".into(),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(c.http2_connection_window, c.http2_stream_window);

        // No cross-field noise when one side is already broken.
        let errs = problems(Args {
            buffer_bytes: "junk".into(),
            max_event_bytes: "2GiB".into(),
            ..Args::default()
        });
        assert_eq!(errs.len(), 1, "{errs:#?}");
        let errs = problems(Args {
            http2_stream_window: "junk".into(),
            http2_connection_window: "64KiB".into(),
            ..Args::default()
        });
        assert_eq!(errs.len(), 1, "{errs:#?}");
    }

    #[test]
    fn a_default_batch_limit_is_lowered_to_a_smaller_buffer() {
        // INGEST_BUFFER_EVENTS=50 alone: the default 1000 must not stop the start.
        let c = config(Args {
            buffer_events: "50".into(),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(c.max_batch_events, 50);
        assert_eq!(c.buffer_events, 50);
        assert_eq!(
            c.notices,
            [
                "--max-batch-events / INGEST_MAX_BATCH_EVENTS not set: using 50 (the \
              --buffer-events / INGEST_BUFFER_EVENTS value) instead of the default 1000, \
              since a request can never hold more events than the whole buffer"
            ]
        );
        // Through clap: only the buffer given, as a flag.
        let c = Config::from_args(["ingest", "--buffer-events", "50"]).unwrap();
        assert_eq!((c.max_batch_events, c.notices.len()), (50, 1));
        // A default at or below the buffer is left alone, silently.
        let c = Config::from_args(["ingest", "--buffer-events", "1000"]).unwrap();
        assert_eq!(c.max_batch_events, 1000);
        assert!(c.notices.is_empty(), "{:?}", c.notices);
        assert!(Config::default().notices.is_empty());
    }

    #[test]
    fn an_explicit_batch_limit_above_the_buffer_is_an_error() {
        let e = Config::from_args([
            "ingest",
            "--buffer-events",
            "50",
            "--max-batch-events",
            "1000",
        ])
        .unwrap_err();
        assert_eq!(
            e.0,
            [
                "--max-batch-events / INGEST_MAX_BATCH_EVENTS: \"1000\" exceeds --buffer-events / \
              INGEST_BUFFER_EVENTS \"50\": a batch larger than the whole buffer could never be \
              admitted"
            ]
        );
        // Given explicitly and equal to the default is still given.
        let e = problems(Args {
            buffer_events: "50".into(),
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS.into(),
            max_batch_events_given: true,
            ..Args::default()
        });
        assert_eq!(e.len(), 1, "{e:?}");
        // A given value within the buffer is taken as is.
        let c =
            Config::from_args(["ingest", "--buffer-events=50", "--max-batch-events=20"]).unwrap();
        assert_eq!(c.max_batch_events, 20);
        assert!(c.notices.is_empty());
    }

    #[test]
    fn listen_addresses_take_ips_and_host_names() {
        for (raw, want) in [
            ("0.0.0.0:50051", "0.0.0.0:50051"),
            (" 127.0.0.1:1 ", "127.0.0.1:1"),
            ("[::]:50051", "[::]:50051"),
            ("[::1]:0", "[::1]:0"),
        ] {
            assert_eq!(parse_socket_addr(raw), Ok(want.parse().unwrap()), "{raw}");
        }
        // A host name is resolved at start; localhost is in every hosts file.
        let addr = parse_socket_addr("localhost:50051").unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 50051);
        let c = Config::from_args([
            "ingest",
            "--listen",
            "localhost:6000",
            "--admin-listen=localhost:6001",
        ])
        .unwrap();
        assert!(
            c.listen.ip().is_loopback() && c.listen.port() == 6000,
            "{}",
            c.listen
        );
        assert!(c.admin_listen.ip().is_loopback() && c.admin_listen.port() == 6001);

        for bad in [
            "localhost",
            "nowhere",
            ":50051",
            "",
            "a b:1",
            "[::1",
            "::1:x",
        ] {
            let e = parse_socket_addr(bad).unwrap_err();
            assert!(e.contains("expected IP:port or host:port"), "{bad:?}: {e}");
        }
        for bad in ["localhost:99999", "localhost:", "localhost:http"] {
            let e = parse_socket_addr(bad).unwrap_err();
            assert!(e.contains("has no valid port"), "{bad:?}: {e}");
        }
        let errs = problems(Args {
            admin_listen: "localhost".into(),
            ..Args::default()
        });
        assert_eq!(
            errs,
            [
                "--admin-listen / INGEST_ADMIN_LISTEN: \"localhost\" is not an address (expected \
              IP:port or host:port, e.g. 0.0.0.0:50051, [::]:50051 or localhost:50051)"
            ]
        );
    }

    #[test]
    fn amqp_url_and_exchange() {
        for ok in [
            "amqp://localhost",
            "amqps://u:p@broker.example:5671/vhost",
            "AMQP://host/%2f",
        ] {
            let c = config(Args {
                amqp_url: ok.into(),
                ..Args::default()
            })
            .unwrap();
            assert_eq!(c.amqp_url, ok);
        }
        let errs = problems(Args {
            amqp_url: "http://user:hunter2@host/".into(),
            ..Args::default()
        });
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with(
                "--amqp-url / INGEST_AMQP_URL: \"http://user:***@host/\" is not an AMQP URL"
            ),
            "{errs:?}"
        );
        assert!(!errs[0].contains("hunter2"));

        let errs = problems(Args {
            amqp_url: "amqp://u:hunter2@host/\n".into(),
            ..Args::default()
        });
        assert!(errs[0].contains("whitespace"), "{errs:?}");
        assert!(!errs[0].contains("hunter2"));
        assert!(
            problems(Args {
                amqp_url: "amqp://".into(),
                ..Args::default()
            })[0]
                .contains("has no host")
        );

        let errs = problems(Args {
            exchange: "".into(),
            ..Args::default()
        });
        assert!(
            errs[0].starts_with("--exchange / INGEST_EXCHANGE: \"\" is the AMQP default exchange")
        );
        let errs = problems(Args {
            exchange: "x".repeat(256),
            ..Args::default()
        });
        assert!(errs[0].contains("256 bytes long"), "{errs:?}");
        assert!(
            config(Args {
                exchange: "x".repeat(255),
                ..Args::default()
            })
            .is_ok()
        );
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_password("amqp://u:p@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact_password("amqp://u@h/v"), "amqp://u@h/v");
        assert_eq!(redact_password("amqp://h/v@x"), "amqp://h/v@x");
        assert_eq!(redact_password("nonsense"), "nonsense");
        assert_eq!(redact_password("amqp://u:p:q@h"), "amqp://u:***@h");
    }

    #[test]
    fn flags_are_parsed() {
        let c = Config::from_args([
            "ingest",
            "--listen",
            "127.0.0.1:6000",
            "--admin-listen=[::1]:9000",
            "--amqp-url",
            "amqps://u:p@mq:5671/prod",
            "--exchange",
            "audit",
            "--declare-exchange",
            "false",
            "--accept-unroutable",
            "--buffer-events",
            "500",
            "--buffer-bytes",
            "1MiB",
            "--max-event-bytes",
            "64 KiB",
            "--max-batch-events",
            "50",
            "--confirm-timeout",
            "3s",
            "--drain-timeout",
            "1m",
            "--channels",
            "8",
            "--reconnect-max-backoff",
            "2m",
            "--retry-after",
            "100ms",
            "--stream-idle-timeout",
            "2m",
            "--stream-stall-timeout",
            "45s",
            "--http2-stream-window",
            "256KiB",
            "--http2-connection-window=2MiB",
            "--max-concurrent-streams",
            "32",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(c.admin_listen, "[::1]:9000".parse().unwrap());
        assert_eq!(c.amqp_url, "amqps://u:p@mq:5671/prod");
        assert_eq!(c.exchange, "audit");
        assert!(!c.declare_exchange);
        assert!(c.accept_unroutable);
        assert_eq!(c.buffer_events, 500);
        assert_eq!(c.buffer_bytes, 1 << 20);
        assert_eq!(c.max_event_bytes, 64 << 10);
        assert_eq!(c.max_batch_events, 50);
        assert_eq!(c.confirm_timeout, Duration::from_secs(3));
        assert_eq!(c.drain_timeout, Duration::from_secs(60));
        assert_eq!(c.channels, 8);
        assert_eq!(c.reconnect_max_backoff, Duration::from_secs(120));
        assert_eq!(c.retry_after, Duration::from_millis(100));
        assert_eq!(c.stream_idle_timeout, Duration::from_secs(120));
        assert_eq!(c.stream_stall_timeout, Duration::from_secs(45));
        assert_eq!(c.http2_stream_window, 256 << 10);
        assert_eq!(c.http2_connection_window, 2 << 20);
        assert_eq!(c.max_concurrent_streams, 32);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn flag_errors_are_collected_and_clap_errors_mapped() {
        let e = Config::from_args([
            "ingest",
            "--buffer-bytes",
            "12XB",
            "--channels",
            "many",
            "--retry-after",
            "10",
        ])
        .unwrap_err();
        assert_eq!(e.0.len(), 3, "{e}");
        assert!(e.0[0].starts_with("--buffer-bytes / INGEST_BUFFER_BYTES: \"12XB\""));
        assert!(e.0[1].starts_with("--channels / INGEST_CHANNELS: \"many\""));
        assert!(e.0[2].starts_with("--retry-after / INGEST_RETRY_AFTER: \"10\""));

        let e = Config::from_args(["ingest", "--no-such-flag"]).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert!(e.0[0].contains("--no-such-flag"), "{e}");

        let e = Config::from_args(["ingest", "--help"]).unwrap_err();
        assert!(e.0[0].contains("INGEST_BUFFER_BYTES"), "{e}");
    }

    #[test]
    fn bools() {
        for (raw, want) in [
            ("true", true),
            ("false", false),
            ("TRUE", true),
            (" False ", false),
        ] {
            assert_eq!(parse_bool(raw), Ok(want));
        }
        for bad in ["yes", "1", ""] {
            assert!(
                parse_bool(bad)
                    .unwrap_err()
                    .contains("expected true or false")
            );
        }
    }

    #[test]
    fn log_formats() {
        for (raw, want) in [
            ("text", LogFormat::Text),
            ("json", LogFormat::Json),
            ("TEXT", LogFormat::Text),
            (" Json ", LogFormat::Json),
        ] {
            assert_eq!(parse_log_format(raw), Ok(want));
            let c = config(Args {
                log_format: raw.into(),
                ..Args::default()
            })
            .unwrap();
            assert_eq!(c.log_format, want);
        }
        let errs = problems(Args {
            log_format: "xml".into(),
            ..Args::default()
        });
        assert_eq!(
            errs,
            [
                "--log-format / INGEST_LOG_FORMAT: \"xml\" is not a log format (expected text or json)"
            ]
        );
        for bad in ["", "logfmt", "jsonl"] {
            assert!(
                parse_log_format(bad)
                    .unwrap_err()
                    .contains("expected text or json")
            );
        }
    }
}
