//! W3C trace context in and out: read from the caller's gRPC metadata, written into the
//! AMQP headers of every published message so a consumer continues the trace.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::MetadataMap;
use tracing::{Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// W3C header names, in gRPC metadata and in AMQP headers alike.
pub const TRACEPARENT: &str = "traceparent";
/// See [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// The caller's trace context, as received.
#[derive(Clone, Debug, Default)]
pub struct Incoming {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Incoming {
    /// Reads `traceparent`/`tracestate` from request metadata.
    pub fn from_metadata(metadata: &MetadataMap) -> Self {
        let get = |key| {
            metadata
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            traceparent: get(TRACEPARENT),
            tracestate: get(TRACESTATE),
        }
    }

    /// The caller's trace id (32 hex digits), if its `traceparent` is well formed.
    fn trace_id(&self) -> Option<&str> {
        let id = self.traceparent.as_deref()?.split('-').nth(1)?;
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }

    fn context(&self) -> Context {
        TraceContextPropagator::new().extract(self)
    }
}

impl Extractor for Incoming {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent.as_deref(),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// Set once at start-up: whether RPC spans have a reader (see [`rpc_span`]).
static RICH_SPANS: AtomicBool = AtomicBool::new(false);

/// Called by `telemetry::init`: spans are exported, or logs carry their ids.
pub(super) fn enable_rich_spans() {
    RICH_SPANS.store(true, Ordering::Relaxed);
}

/// One RPC span call site per level (a span's level is fixed at its call site).
macro_rules! rpc_span_at {
    ($level:expr, $method:expr) => {
        tracing::span!(
            $level,
            "rpc",
            otel.name = $method,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "ingest.v1.Ingest",
            rpc.method = $method.rsplit('/').next().unwrap_or($method),
            rpc.grpc.status_code = field::Empty,
            trace_id = field::Empty,
            span_id = field::Empty,
        )
    };
}

/// The server span of one RPC, parented on the caller's context. It records the trace
/// id (OpenTelemetry's when tracing is on, else the caller's) so JSON log lines written
/// inside it carry it.
///
/// The span is at INFO when something reads it (an OTLP exporter, or JSON logs that
/// carry its trace id) and at DEBUG otherwise, where it is disabled at its call site:
/// plain text logs at `info` do not pay for a span per call.
pub fn rpc_span(method: &'static str, incoming: &Incoming) -> Span {
    let span = if RICH_SPANS.load(Ordering::Relaxed) {
        rpc_span_at!(tracing::Level::INFO, method)
    } else {
        rpc_span_at!(tracing::Level::DEBUG, method)
    };
    if span.is_disabled() {
        return span;
    }
    if incoming.traceparent.is_some() {
        let _ = span.set_parent(incoming.context());
    }
    let context = span.context();
    let otel = context.span().span_context().clone();
    if otel.is_valid() {
        span.record("trace_id", field::display(otel.trace_id()));
        span.record("span_id", field::display(otel.span_id()));
    } else if let Some(id) = incoming.trace_id() {
        span.record("trace_id", id);
    }
    span
}

/// The AMQP headers that carry the trace on: the producer span's context when tracing
/// is on; otherwise the caller's own context, if it is a valid W3C context (parsed and
/// written again, never copied through as the caller sent it).
pub fn outgoing_headers(producer: &Span, incoming: &Incoming) -> Vec<(&'static str, String)> {
    let mut context = producer.context();
    if !context.span().span_context().is_valid() {
        context = incoming.context();
    }
    let mut headers = Headers(Vec::with_capacity(2));
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut headers);
    }
    headers.0
}

struct Headers(Vec<(&'static str, String)>);

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        let key = match key {
            TRACEPARENT => TRACEPARENT,
            TRACESTATE => TRACESTATE,
            _ => return,
        };
        if !value.is_empty() {
            self.0.push((key, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_context_passes_through_when_tracing_is_off() {
        let mut metadata = MetadataMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        metadata.insert(TRACEPARENT, parent.parse().unwrap());
        metadata.insert(TRACESTATE, "congo=t61rcWkgMzE".parse().unwrap());
        let incoming = Incoming::from_metadata(&metadata);
        assert_eq!(
            incoming.trace_id(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        // No subscriber here: the span is disabled, so the caller's context is used.
        let headers = outgoing_headers(&Span::none(), &incoming);
        assert_eq!(
            headers,
            vec![
                (TRACEPARENT, parent.to_owned()),
                (TRACESTATE, "congo=t61rcWkgMzE".to_owned())
            ]
        );
    }

    #[test]
    fn malformed_traceparent_has_no_trace_id() {
        let mut metadata = MetadataMap::new();
        metadata.insert(
            TRACEPARENT,
            "00-nothex-00f067aa0ba902b7-01".parse().unwrap(),
        );
        assert_eq!(Incoming::from_metadata(&metadata).trace_id(), None);
        assert!(outgoing_headers(&Span::none(), &Incoming::default()).is_empty());
    }
}
