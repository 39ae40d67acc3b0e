//! Metrics, recorded with the OpenTelemetry API into a per-service meter provider: served
//! in the Prometheus text format by the admin listener (`/metrics`), and pushed over
//! OTLP as well when the standard `OTEL_EXPORTER_OTLP_*ENDPOINT` variable is set.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `ingest_events_received_total` | counter | `rpc` |
//! | `ingest_events_confirmed_total` | counter | |
//! | `ingest_events_rejected_total` | counter | `reason` |
//! | `ingest_buffer_events`, `ingest_buffer_bytes` | gauge | |
//! | `ingest_buffer_events_capacity`, `ingest_buffer_bytes_capacity` | gauge | |
//! | `ingest_broker_connected`, `ingest_broker_blocked`, `ingest_broker_stalled` | gauge (0/1) | |
//! | `ingest_publish_confirm_seconds` | histogram | |
//! | `ingest_rpc_duration_seconds` | histogram | `rpc`, `code` |
//! | `ingest_streams_active` | gauge | |

use std::{sync::Arc, time::Duration};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, Meter, MeterProvider as _, UpDownCounter},
};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use tokio::sync::watch;

use crate::{admission::Admission, publisher::BrokerState};

/// Latency buckets, in seconds: sub-millisecond refusals up to confirm timeouts.
const SECONDS_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why events were not confirmed, as the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Failed validation.
    Invalid,
    /// Buffer full.
    Exhausted,
    /// Broker away, channel lost, blocked too long, or shutting down.
    Unavailable,
    /// No queue bound for the routing key.
    Unroutable,
    /// The broker nacked.
    Nacked,
    /// No confirm within the confirm timeout.
    Timeout,
    /// The caller's deadline passed before the answer.
    Deadline,
    /// The caller went away before the answer.
    Cancelled,
    /// Refused while the broker was stalled.
    Stalled,
    /// The caller's tenant was over its quota (in flight, or rate).
    Quota,
    /// The caller's tenant may not publish to the topic.
    Denied,
}

impl Reason {
    /// Every reason, in label order (`reason as usize` indexes it).
    pub const ALL: [Reason; 11] = [
        Reason::Invalid,
        Reason::Exhausted,
        Reason::Unavailable,
        Reason::Unroutable,
        Reason::Nacked,
        Reason::Timeout,
        Reason::Deadline,
        Reason::Cancelled,
        Reason::Stalled,
        Reason::Quota,
        Reason::Denied,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Reason::Invalid => "invalid",
            Reason::Exhausted => "exhausted",
            Reason::Unavailable => "unavailable",
            Reason::Unroutable => "unroutable",
            Reason::Nacked => "nacked",
            Reason::Timeout => "timeout",
            Reason::Deadline => "deadline",
            Reason::Cancelled => "cancelled",
            Reason::Stalled => "stalled",
            Reason::Quota => "quota",
            Reason::Denied => "denied",
        }
    }
}

/// Which RPC, as the `rpc` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    /// `Publish`.
    Publish,
    /// `PublishStream`.
    PublishStream,
    /// `PublishAcked`.
    PublishAcked,
}

impl Rpc {
    /// Every RPC, in discriminant order (label tables are indexed by it).
    const ALL: [Rpc; 3] = [Rpc::Publish, Rpc::PublishStream, Rpc::PublishAcked];

    fn as_str(self) -> &'static str {
        match self {
            Rpc::Publish => "Publish",
            Rpc::PublishStream => "PublishStream",
            Rpc::PublishAcked => "PublishAcked",
        }
    }
}

/// The service's instruments; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    received: Counter<u64>,
    confirmed: Counter<u64>,
    rejected: Counter<u64>,
    confirm_seconds: Histogram<f64>,
    rpc_seconds: Histogram<f64>,
    retry_delay_seconds: Histogram<f64>,
    streams_active: UpDownCounter<i64>,
    /// Calls refused for want of a credential that names a tenant.
    unauthenticated: Counter<u64>,
    /// Events published again after a lost channel (`--retry-unconfirmed`).
    republished: Counter<u64>,
    /// Events of each tenant, by outcome at the API (`received`, or a refusal reason).
    tenant_events: Counter<u64>,
    /// Label sets built once, so recording allocates nothing.
    rpc_labels: [[KeyValue; 1]; Rpc::ALL.len()],
    /// `[rpc][code]` label pairs for the RPC duration histogram.
    rpc_code_labels: [Vec<[KeyValue; 2]>; Rpc::ALL.len()],
    reason_labels: [[KeyValue; 1]; Reason::ALL.len()],
}

impl Metrics {
    /// Builds the instruments; the gauges read `admission` and `broker` when collected.
    /// With `otlp`, metrics are also pushed to the configured OTLP endpoint.
    pub fn new(
        admission: Arc<Admission>,
        broker: watch::Receiver<BrokerState>,
        otlp: bool,
    ) -> Result<Self, String> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_units()
            .without_target_info()
            .build()
            .map_err(|e| format!("Prometheus exporter: {e}"))?;
        let mut builder = SdkMeterProvider::builder().with_reader(prometheus);
        if otlp {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| format!("OTLP metric exporter: {e}"))?;
            builder = builder.with_reader(PeriodicReader::builder(exporter).build());
        }
        let provider = builder.build();
        let meter = provider.meter("ingest");
        register_gauges(&meter, admission, broker);
        let inner = Inner {
            received: meter
                .u64_counter("ingest_events_received")
                .with_description("Events received, by RPC")
                .build(),
            confirmed: meter
                .u64_counter("ingest_events_confirmed")
                .with_description("Events RabbitMQ confirmed")
                .build(),
            rejected: meter
                .u64_counter("ingest_events_rejected")
                .with_description("Events not confirmed, by reason")
                .build(),
            confirm_seconds: meter
                .f64_histogram("ingest_publish_confirm_seconds")
                .with_description("From publish to RabbitMQ's confirm, per event")
                .with_unit("s")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            rpc_seconds: meter
                .f64_histogram("ingest_rpc_duration_seconds")
                .with_description("RPC duration, by RPC and status code")
                .with_unit("s")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            retry_delay_seconds: meter
                .f64_histogram("ingest_retry_delay_seconds")
                .with_description("Retry delays told to refused callers (RetryInfo), by code")
                .with_unit("s")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            streams_active: meter
                .i64_up_down_counter("ingest_streams_active")
                .with_description("PublishStream and PublishAcked calls open")
                .build(),
            republished: meter
                .u64_counter("ingest_events_republished")
                .with_description(
                    "Events published again on a new connection after theirs was lost unconfirmed",
                )
                .build(),
            unauthenticated: meter
                .u64_counter("ingest_calls_unauthenticated")
                .with_description("Calls refused UNAUTHENTICATED (no credential names a tenant)")
                .build(),
            tenant_events: meter
                .u64_counter("ingest_tenant_events")
                .with_description("Events by tenant and outcome: received, or the refusal reason")
                .build(),
            rpc_labels: Rpc::ALL.map(|r| [KeyValue::new("rpc", r.as_str())]),
            rpc_code_labels: Rpc::ALL.map(|r| {
                (0..=16)
                    .map(|c| {
                        let code = format!("{:?}", tonic::Code::from_i32(c));
                        [
                            KeyValue::new("rpc", r.as_str()),
                            KeyValue::new("code", code),
                        ]
                    })
                    .collect()
            }),
            reason_labels: Reason::ALL.map(|r| [KeyValue::new("reason", r.as_str())]),
            provider,
            registry,
        };
        // Every series exists from the start, so dashboards and rate() see zeros, not gaps.
        for labels in &inner.rpc_labels {
            inner.received.add(0, labels);
        }
        for labels in &inner.reason_labels {
            inner.rejected.add(0, labels);
        }
        inner.confirmed.add(0, &[]);
        inner.streams_active.add(0, &[]);
        inner.unauthenticated.add(0, &[]);
        inner.republished.add(0, &[]);
        Ok(Self(Arc::new(inner)))
    }

    /// Counts a call refused UNAUTHENTICATED.
    pub fn unauthenticated(&self) {
        self.0.unauthenticated.add(1, &[]);
    }

    /// Counts a tenant's events received. Tenants come from the tenants file, so the
    /// label's values are bounded by it.
    pub fn tenant_received(&self, tenant: &str, events: usize) {
        self.tenant_events(tenant, "received", events);
    }

    /// Counts a tenant's events refused before publishing.
    pub fn tenant_rejected(&self, tenant: &str, reason: Reason, events: usize) {
        self.tenant_events(tenant, reason.as_str(), events);
    }

    fn tenant_events(&self, tenant: &str, outcome: &'static str, events: usize) {
        if events > 0 {
            self.0.tenant_events.add(
                events as u64,
                &[
                    KeyValue::new("tenant", tenant.to_owned()),
                    KeyValue::new("outcome", outcome),
                ],
            );
        }
    }

    /// Exports each tenant's buffer use (`ingest_tenant_buffer_events{tenant}`,
    /// `ingest_tenant_buffer_bytes{tenant}`), read from the tenants in force.
    pub fn watch_tenants(&self, authenticator: Arc<crate::auth::Authenticator>) {
        let meter = self.0.provider.meter("ingest");
        for (name, description, bytes) in [
            (
                "ingest_tenant_buffer_events",
                "Events a tenant has admitted and not yet settled",
                false,
            ),
            (
                "ingest_tenant_buffer_bytes",
                "Bytes a tenant's admitted events hold",
                true,
            ),
        ] {
            let auth = Arc::clone(&authenticator);
            meter
                .u64_observable_gauge(name)
                .with_description(description)
                .with_callback(move |observer| {
                    for tenant in &auth.tenants().tenants {
                        let used = tenant.quota.in_use();
                        let value = if bytes { used.bytes } else { used.events };
                        observer.observe(
                            value as u64,
                            &[KeyValue::new("tenant", tenant.name.to_string())],
                        );
                    }
                })
                .build();
        }
    }

    /// Exports `ingest_broker_node{node="host:port"} 1` for the node the connection in
    /// use goes to (nothing while disconnected).
    pub fn watch_node(&self, node: crate::publisher::LastError) {
        self.0
            .provider
            .meter("ingest")
            .u64_observable_gauge("ingest_broker_node")
            .with_description("1 for the RabbitMQ node (host:port) the connection in use goes to")
            .with_callback(move |observer| {
                if let Some(node) = node.get() {
                    observer.observe(1, &[KeyValue::new("node", node.to_string())]);
                }
            })
            .build();
    }

    /// Counts events received on `rpc`.
    pub fn received(&self, rpc: Rpc, events: usize) {
        self.0
            .received
            .add(events as u64, &self.0.rpc_labels[rpc as usize]);
    }

    /// Counts events published again after their connection was lost unconfirmed.
    pub fn republished(&self, events: usize) {
        if events > 0 {
            self.0.republished.add(events as u64, &[]);
        }
    }

    /// Counts events RabbitMQ confirmed.
    pub fn confirmed(&self, events: usize) {
        if events > 0 {
            self.0.confirmed.add(events as u64, &[]);
        }
    }

    /// Counts events not confirmed, by reason.
    pub fn rejected(&self, reason: Reason, events: usize) {
        if events > 0 {
            self.0
                .rejected
                .add(events as u64, &self.0.reason_labels[reason as usize]);
        }
    }

    /// Records one event's publish-to-confirm time.
    pub fn confirm_latency(&self, latency: Duration) {
        self.0.confirm_seconds.record(latency.as_secs_f64(), &[]);
    }

    /// Records a retry delay told to a refused caller; `exhausted`: for a full buffer
    /// (`RESOURCE_EXHAUSTED`), else for a broker away (`UNAVAILABLE`).
    pub fn retry_delay(&self, delay: Duration, exhausted: bool) {
        let code = if exhausted {
            "ResourceExhausted"
        } else {
            "Unavailable"
        };
        self.0
            .retry_delay_seconds
            .record(delay.as_secs_f64(), &[KeyValue::new("code", code)]);
    }

    /// Records one finished RPC.
    pub fn rpc_finished(&self, rpc: Rpc, code: tonic::Code, duration: Duration) {
        if let Some(labels) = self.0.rpc_code_labels[rpc as usize].get(code as usize) {
            self.0.rpc_seconds.record(duration.as_secs_f64(), labels);
        }
    }

    /// Counts an open stream until the guard is dropped.
    pub fn stream_opened(&self) -> StreamGuard {
        self.0.streams_active.add(1, &[]);
        StreamGuard(self.clone())
    }

    /// Everything, in the Prometheus text format.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.0.registry.gather())
            .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
    }

    /// Flushes the OTLP exporter, if any.
    pub fn shutdown(&self) {
        let _ = self.0.provider.shutdown();
    }
}

/// Keeps `ingest_streams_active` counting a stream while it lives.
#[derive(Debug)]
pub struct StreamGuard(Metrics);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.0.streams_active.add(-1, &[]);
    }
}

fn register_gauges(meter: &Meter, admission: Arc<Admission>, broker: watch::Receiver<BrokerState>) {
    let capacity = admission.capacity();
    let gauge = |name: &'static str,
                 description: &'static str,
                 read: Box<dyn Fn() -> u64 + Send + Sync>| {
        meter
            .u64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |observer| observer.observe(read(), &[]))
            .build();
    };
    let a = Arc::clone(&admission);
    gauge(
        "ingest_buffer_events",
        "Events admitted and not yet settled",
        Box::new(move || a.in_use().events as u64),
    );
    let a = admission;
    gauge(
        "ingest_buffer_bytes",
        "Bytes held by admitted events",
        Box::new(move || a.in_use().bytes as u64),
    );
    gauge(
        "ingest_buffer_events_capacity",
        "Configured buffer-events",
        Box::new(move || capacity.events as u64),
    );
    gauge(
        "ingest_buffer_bytes_capacity",
        "Configured buffer-bytes",
        Box::new(move || capacity.bytes as u64),
    );
    let b = broker.clone();
    gauge(
        "ingest_broker_connected",
        "1 while connected to RabbitMQ",
        Box::new(move || u64::from(b.borrow().connected)),
    );
    let b = broker.clone();
    gauge(
        "ingest_broker_blocked",
        "1 while RabbitMQ blocks publishers",
        Box::new(move || u64::from(b.borrow().blocked)),
    );
    let b = broker;
    gauge(
        "ingest_broker_stalled",
        "1 while RabbitMQ holds events without answering any (--stall-after)",
        Box::new(move || u64::from(b.borrow().stalled)),
    );
}
