//! Telemetry: logs, traces and metrics.
//!
//! - Logs: human-readable lines by default, JSON lines with `--log-format json`
//!   (carrying the request's trace and span ids), filtered by `RUST_LOG`. No log line
//!   per event at `info`.
//! - Traces: a server span per RPC, parented on the caller's W3C `traceparent`, and a
//!   producer span per published batch whose context travels in the AMQP headers.
//!   Exported over OTLP/gRPC when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the SDK reads the other `OTEL_*`
//!   variables (service name, sampler, batch delays). Unset: no exporter, and the spans
//!   that only tracing needs are disabled at their call sites.
//! - Metrics: see [`Metrics`]; served by the admin listener in the Prometheus format.

pub mod metrics;
pub mod trace;

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

pub use metrics::{Metrics, Reason};

use crate::config::LogFormat;

/// lapin's own lines stay out of the default log: it logs every returned (unroutable)
/// message at `warn` (a line per event, which the service reports to the caller
/// instead), and on every failed connection attempt a burst of ERROR lines, one saying
/// "backoff attempts exhausted, aborting recovery" while ingest keeps retrying. The
/// supervisor logs each connection failure itself, once per new reason.
/// `RUST_LOG=info,lapin=warn` shows them again.
const DEFAULT_FILTER: &str = "info,lapin=off";

/// The standard variables that turn OTLP export on.
const OTLP_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];
const OTLP_METRICS_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
];

/// Whether OTLP export of traces is configured (standard OpenTelemetry variables).
pub fn otlp_traces_configured() -> bool {
    OTLP_ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Whether OTLP export of metrics is configured (standard OpenTelemetry variables).
pub fn otlp_metrics_configured() -> bool {
    OTLP_METRICS_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Keeps the exporters alive; [`Telemetry::shutdown`] flushes what is buffered.
#[derive(Debug)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the trace exporter (bounded by the SDK's own timeouts).
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing traces failed");
        }
    }
}

/// Installs the global subscriber: logs, and the OpenTelemetry layer when OTLP export is
/// configured. Call once, from `main`, inside the tokio runtime.
pub fn init(format: LogFormat) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let logs = match format {
        // Colours only for a person at a terminal, never into files or log collectors.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);

    let (otel, tracer_provider) = if otlp_traces_configured() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                let provider = SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(opentelemetry_sdk::Resource::builder().build())
                    .build();
                let tracer = provider.tracer("ingest");
                // The otel layer sees ingest's spans down to DEBUG (the per-batch
                // producer spans) whatever the log filter says.
                let layer = tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(Targets::new().with_target("ingest", Level::DEBUG));
                (Some(layer), Some(provider))
            }
            Err(error) => {
                eprintln!("ingest: OTLP trace exporter not started: {error}");
                (None, None)
            }
        }
    } else {
        (None, None)
    };
    if otel.is_some() || format == LogFormat::Json {
        trace::enable_rich_spans();
    }
    tracing_subscriber::registry().with(logs).with(otel).init();
    Telemetry { tracer_provider }
}
