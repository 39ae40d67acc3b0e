//! Observability against the real broker: Prometheus metrics and probes on the admin
//! listener, OTLP traces parented on the caller's `traceparent`, the trace continued
//! in the AMQP headers, and JSON logs carrying the trace id.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::{StreamExt, stream::FuturesUnordered};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value,
    trace::v1::{Span, span::SpanKind},
};
use tokio::sync::Mutex;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    AMQP_ADDR, AMQP_URL, ChildServer, FaultProxy, Mode, TestQueue, http_get, json_event, request,
    sample, spawn_server, test_config, unique,
};

const GUARD: Duration = Duration::from_secs(30);
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_follow_publishes_rejections_and_a_stall() {
    let queue = TestQueue::new("orders.*").await;
    let proxy = FaultProxy::start(AMQP_ADDR.parse().unwrap()).await;
    let mut config = test_config(&proxy.amqp_url(), &queue.exchange);
    config.buffer_events = 5;
    config.max_batch_events = 5;
    config.confirm_timeout = Duration::from_secs(60);
    let server = spawn_server(config).await;
    server.wait_health(ServingStatus::Serving, GUARD).await;
    let mut client = server.client().await;
    let admin = server.admin_addr;

    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);

    let events = (0..3)
        .map(|i| json_event("orders.created", &unique(&format!("m{i}")), "{}"))
        .collect();
    client.publish(request(events)).await.unwrap();
    client
        .publish(request(vec![json_event("", "bad", "{}")]))
        .await
        .unwrap_err();
    client
        .publish(request(vec![json_event("nobody.listens", "lost", "{}")]))
        .await
        .unwrap_err();

    let (status, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &metrics,
            "ingest_events_received_total",
            &["rpc=\"Publish\""]
        ),
        5.0
    );
    assert_eq!(sample(&metrics, "ingest_events_confirmed_total", &[]), 3.0);
    assert_eq!(
        sample(
            &metrics,
            "ingest_events_rejected_total",
            &["reason=\"invalid\""]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "ingest_events_rejected_total",
            &["reason=\"unroutable\""]
        ),
        1.0
    );
    assert_eq!(
        sample(&metrics, "ingest_publish_confirm_seconds_count", &[]),
        3.0
    );
    assert_eq!(
        sample(
            &metrics,
            "ingest_rpc_duration_seconds_count",
            &["code=\"Ok\""]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "ingest_rpc_duration_seconds_count",
            &["code=\"InvalidArgument\""]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "ingest_rpc_duration_seconds_count",
            &["code=\"FailedPrecondition\""]
        ),
        1.0
    );
    assert_eq!(sample(&metrics, "ingest_broker_connected", &[]), 1.0);
    assert_eq!(sample(&metrics, "ingest_buffer_events_capacity", &[]), 5.0);
    assert_eq!(sample(&metrics, "ingest_buffer_events", &[]), 0.0);

    // A stall: the buffer gauges rise, refusals are counted, then all falls back to zero.
    proxy.set_mode(Mode::Stall);
    let mut calls: FuturesUnordered<_> = (0..8)
        .map(|i| {
            let mut client = client.clone();
            async move {
                client
                    .publish(request(vec![json_event(
                        "orders.created",
                        &unique(&format!("s{i}")),
                        "{}",
                    )]))
                    .await
            }
        })
        .collect();
    let mut refused = 0;
    while refused < 3 {
        let status = tokio::time::timeout(GUARD, calls.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        refused += 1;
    }
    let metrics = http_get(admin, "/metrics").await.1;
    assert_eq!(sample(&metrics, "ingest_buffer_events", &[]), 5.0);
    assert!(sample(&metrics, "ingest_buffer_bytes", &[]) > 0.0);
    assert_eq!(
        sample(
            &metrics,
            "ingest_events_rejected_total",
            &["reason=\"exhausted\""]
        ),
        3.0
    );
    proxy.set_mode(Mode::Forward);
    while let Some(result) = tokio::time::timeout(GUARD, calls.next()).await.unwrap() {
        result.unwrap();
    }
    server.wait_admission_idle(GUARD).await;
    let metrics = http_get(admin, "/metrics").await.1;
    assert_eq!(sample(&metrics, "ingest_buffer_events", &[]), 0.0);
    assert_eq!(sample(&metrics, "ingest_buffer_bytes", &[]), 0.0);
    assert_eq!(sample(&metrics, "ingest_events_confirmed_total", &[]), 8.0);

    // Broker gone: not ready, and the gauge says so.
    proxy.set_mode(Mode::Refuse);
    server.wait_health(ServingStatus::NotServing, GUARD).await;
    assert_eq!(http_get(admin, "/readyz").await.0, 503);
    assert_eq!(
        sample(
            &http_get(admin, "/metrics").await.1,
            "ingest_broker_connected",
            &[]
        ),
        0.0
    );
    assert_eq!(
        http_get(admin, "/healthz").await.0,
        200,
        "alive all the same"
    );
    server.stop().await.unwrap();
    queue.cleanup().await;
}

/// An in-process OTLP trace receiver: the collector's `TraceService`.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().await;
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a any_value::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_follow_the_callers_traceparent_into_the_amqp_headers() {
    let receiver = Receiver::default();
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = otlp.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(otlp)),
    );
    let queue = TestQueue::new("#").await;
    let endpoint = format!("http://{otlp_addr}");
    let log_path = std::env::temp_dir().join(format!("{}.log", unique("ingest-json")));
    let log = std::fs::File::create(&log_path).unwrap();
    let server = ChildServer::start_with_stderr(
        AMQP_URL,
        &queue.exchange,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "ingest-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("INGEST_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,ingest=debug"),
        ],
        log.into(),
    );
    let mut client = server.ready_client().await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut call = request(vec![json_event("t", "traced-1", "{}")]);
    let mut call = tonic::Request::new(std::mem::take(&mut call));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    client.publish(call).await.unwrap();

    // The spans arrive in the exporter's next batch.
    let deadline = tokio::time::Instant::now() + GUARD;
    let (server_span, producer) = loop {
        let spans = receiver.0.lock().await.clone();
        let find = |kind: SpanKind| spans.iter().find(|s| s.kind == kind as i32).cloned();
        if let (Some(s), Some(p)) = (find(SpanKind::Server), find(SpanKind::Producer)) {
            break (s, p);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no RPC and producer spans exported: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(server_span.name, "ingest.v1.Ingest/Publish");
    assert_eq!(
        hex(&server_span.trace_id),
        trace_id,
        "the RPC span continues the caller's trace"
    );
    assert_eq!(hex(&server_span.parent_span_id), caller_span);
    assert_eq!(hex(&producer.trace_id), trace_id);
    assert_eq!(
        producer.parent_span_id, server_span.span_id,
        "producer span is a child of the RPC span"
    );
    let text = |v: Option<&any_value::Value>| match v {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        other => panic!("not a string attribute: {other:?}"),
    };
    assert_eq!(text(attribute(&producer, "messaging.system")), "rabbitmq");
    assert_eq!(
        text(attribute(&producer, "messaging.destination.name")),
        queue.exchange
    );
    assert_eq!(
        text(attribute(&producer, "messaging.message.id")),
        "traced-1"
    );

    // The consumer gets the producer span's context in the AMQP headers.
    let messages = queue.take_all().await;
    assert_eq!(messages.len(), 1);
    let headers: HashMap<String, String> = messages[0]
        .delivery
        .properties
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                match v {
                    lapin::types::AMQPValue::LongString(s) => s.to_string(),
                    other => format!("{other:?}"),
                },
            )
        })
        .collect();
    assert_eq!(
        headers["traceparent"],
        format!("00-{trace_id}-{}-01", hex(&producer.span_id))
    );

    // JSON log lines written inside a call carry its trace id: a refused call logs one.
    let mut bad = tonic::Request::new(request(vec![json_event("", "bad", "{}")]));
    bad.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    assert_eq!(
        client.publish(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let deadline = tokio::time::Instant::now() + GUARD;
    let line = loop {
        let logs = std::fs::read_to_string(&log_path).unwrap();
        if let Some(line) = logs.lines().find(|l| l.contains("Publish failed")) {
            break line.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 'Publish failed' line in:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(json["span"]["trace_id"], trace_id, "{line}");
    assert_eq!(
        json["span"]["span_id"].as_str().map(str::len),
        Some(16),
        "{line}"
    );

    drop(server);
    let _ = std::fs::remove_file(&log_path);
    queue.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_only_metrics_the_service_exports() {
    let queue = TestQueue::new("#").await;
    let server = spawn_server(test_config(AMQP_URL, &queue.exchange)).await;
    server.wait_health(ServingStatus::Serving, GUARD).await;
    // One confirmed call, so histograms have their bucket series.
    server
        .client()
        .await
        .publish(request(vec![json_event("t", "d1", "{}")]))
        .await
        .unwrap();
    let metrics = http_get(server.admin_addr, "/metrics").await.1;
    let exported: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/ingest.json"
    ))
    .unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is valid JSON");
    let mut used = std::collections::BTreeSet::new();
    for (i, _) in dashboard.match_indices("ingest_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        used.insert(name);
    }
    assert!(used.len() >= 10, "{used:?}");
    for name in &used {
        assert!(
            exported.contains(name.as_str()),
            "the dashboard queries {name}, which /metrics does not export: {exported:?}"
        );
    }
    server.stop().await.unwrap();
    queue.cleanup().await;
}
