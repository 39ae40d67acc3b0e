//! The gRPC surface: `ingest.v1.Ingest`. Turns requests into validated batches,
//! admits them, hands them to the publisher and maps every outcome to a status.

mod acked;
mod call;
pub mod framing;
pub mod hints;
pub mod intake;
pub(crate) mod status;
mod stream;

pub use stream::CONFIRMED_COUNT;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use self::call::Call;

use crate::{
    admission::{self, Admission, AdmitError},
    auth::{Caller, TENANT_HEADER},
    proto::{Event, PublishRequest, PublishResponse, PublishStreamResponse, ingest_server::Ingest},
    publisher::{self, BrokerState, Publisher},
    telemetry::{Metrics, Reason, metrics::Rpc, trace},
    validate::{self, Limits, ValidEvent},
};

/// Largest encoded size of one event's metadata: id, topic, content type, time and
/// 64 attributes of the largest size, with protobuf framing.
const MAX_EVENT_METADATA: usize = validate::MAX_ID_BYTES
    + 2 * validate::MAX_SHORT_STRING
    + validate::MAX_ATTRIBUTES_TOTAL_BYTES
    + validate::MAX_ATTRIBUTES * 16
    + 64;

/// The largest request message accepted. Anything bigger is refused with
/// `OUT_OF_RANGE` from its length prefix, before it is read: a request can never hold
/// more than `max-batch-events` maximal events, and never more than the receive share
/// of `--buffer-bytes` ([`admission::receive_share`]), since it could never be
/// reserved.
pub fn max_message_bytes(limits: &Limits, buffer_bytes: usize) -> usize {
    let per_event = limits.max_event_bytes.saturating_add(MAX_EVENT_METADATA);
    limits
        .max_batch_events
        .saturating_mul(per_event)
        .min(admission::largest_message(buffer_bytes))
}

/// Largest request message of the health and reflection services: theirs are a few
/// bytes, and the intake reserves them from the same budget.
pub const MAX_OTHER_MESSAGE_BYTES: usize = 64 * 1024;

/// Settings of the gRPC surface, from configuration.
#[derive(Clone, Copy, Debug)]
pub struct ServiceSettings {
    /// Request limits.
    pub limits: Limits,
    /// `RetryInfo` delay for `RESOURCE_EXHAUSTED`.
    pub retry_after: Duration,
    /// A stream with no message for this long is closed.
    pub stream_idle_timeout: Duration,
    /// A stream waits this long for a disconnected broker before it ends.
    pub stream_stall_timeout: Duration,
}

/// The `ingest.v1.Ingest` service.
#[derive(Debug)]
pub struct IngestService {
    /// The shared bound every request is admitted against.
    admission: Arc<Admission>,
    /// Where admitted batches go.
    publisher: Publisher,
    /// Limits and timeouts.
    settings: ServiceSettings,
    /// Counts and durations.
    metrics: Metrics,
    /// Cancelled when shutdown begins: new calls are refused, open streams end.
    draining: CancellationToken,
    /// How long refused callers are told to wait.
    hints: hints::RetryHints,
}

impl IngestService {
    /// Builds the service over the shared admission and publisher.
    pub fn new(
        admission: Arc<Admission>,
        publisher: Publisher,
        settings: ServiceSettings,
        metrics: Metrics,
        draining: CancellationToken,
    ) -> Self {
        let hints =
            hints::RetryHints::new(publisher.clone(), metrics.clone(), settings.retry_after);
        Self {
            admission,
            publisher,
            settings,
            metrics,
            draining,
            hints,
        }
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type PublishAckedStream = acked::AckStream;

    async fn publish_acked(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishAckedStream>, Status> {
        let incoming = trace::Incoming::from_metadata(request.metadata());
        let span = trace::rpc_span("ingest.v1.Ingest/PublishAcked", &incoming);
        if self.draining.is_cancelled() {
            let mut call = Call::start(&self.metrics, Rpc::PublishAcked, request.metadata());
            call.waiting_on(0);
            call.finish(Code::Unavailable);
            return Err(status::shutting_down());
        }
        let ctx = acked::AckedContext {
            tickets: request
                .extensions()
                .get::<intake::Tickets>()
                .cloned()
                .unwrap_or_default(),
            admission: Arc::clone(&self.admission),
            publisher: self.publisher.clone(),
            metrics: self.metrics.clone(),
            settings: self.settings,
            draining: self.draining.clone(),
            hints: self.hints.clone(),
            incoming,
            metadata: request.metadata().clone(),
            caller: request.extensions().get::<Caller>().cloned(),
        };
        Ok(Response::new(acked::spawn(ctx, request.into_inner(), span)))
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let incoming = trace::Incoming::from_metadata(request.metadata());
        let span = trace::rpc_span("ingest.v1.Ingest/Publish", &incoming);
        let mut call = Call::start(&self.metrics, Rpc::Publish, request.metadata());
        // The room the intake took for this request while it was received.
        let ticket = request
            .extensions()
            .get::<intake::Tickets>()
            .and_then(intake::Tickets::take);
        let caller = request.extensions().get::<Caller>().cloned();
        let result = self
            .publish_batch(
                request.into_inner().events,
                ticket,
                caller.as_ref(),
                &incoming,
                &mut call,
            )
            .instrument(span.clone())
            .await;
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        span.record("rpc.grpc.status_code", code as i32);
        if let Err(status) = &result {
            // DEBUG: under overload this is a line per refused call.
            tracing::debug!(parent: &span, code = ?status.code(), message = status.message(), "Publish failed");
        }
        call.finish(code);
        result.map(|ids| Response::new(PublishResponse { ids }))
    }

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<PublishStreamResponse>, Status> {
        let incoming = trace::Incoming::from_metadata(request.metadata());
        let span = trace::rpc_span("ingest.v1.Ingest/PublishStream", &incoming);
        let call = Call::start(&self.metrics, Rpc::PublishStream, request.metadata());
        let _open = self.metrics.stream_opened();
        let result = if self.draining.is_cancelled() {
            // Every stream answer says how much of it was confirmed: here, nothing.
            let mut status = status::shutting_down();
            status
                .metadata_mut()
                .insert(CONFIRMED_COUNT, tonic::metadata::MetadataValue::from(0u64));
            Err(status)
        } else {
            let ctx = stream::StreamContext {
                tickets: request
                    .extensions()
                    .get::<intake::Tickets>()
                    .cloned()
                    .unwrap_or_default(),
                admission: &self.admission,
                publisher: &self.publisher,
                metrics: &self.metrics,
                limits: &self.settings.limits,
                idle_timeout: self.settings.stream_idle_timeout,
                stall_timeout: self.settings.stream_stall_timeout,
                draining: &self.draining,
                incoming: &incoming,
                caller: request.extensions().get::<Caller>().cloned(),
            };
            stream::run(ctx, request.into_inner())
                .instrument(span.clone())
                .await
        };
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        span.record("rpc.grpc.status_code", code as i32);
        match &result {
            Ok(events) => tracing::debug!(parent: &span, events, "stream ended"),
            Err(status) => {
                let confirmed = status
                    .metadata()
                    .get(CONFIRMED_COUNT)
                    .and_then(|v| v.to_str().ok());
                tracing::info!(parent: &span, code = ?status.code(), confirmed, message = status.message(), "stream ended with an error");
            }
        }
        call.finish(code);
        let events = result?;
        let mut response = Response::new(PublishStreamResponse { events });
        response.metadata_mut().insert(
            CONFIRMED_COUNT,
            tonic::metadata::MetadataValue::from(events),
        );
        Ok(response)
    }
}

impl IngestService {
    /// Waits until a failover (`BrokerState::failing_over`) has connected to another
    /// node or given up, at most `--confirm-timeout` (the wait an event in flight is
    /// given), or until shutdown begins; then the state it ended in. The request it
    /// holds meanwhile was admitted by the intake: the bound covers it.
    async fn wait_out_failover(&self) -> BrokerState {
        let mut watch = self.publisher.watch_state();
        let over = async {
            let _ = watch
                .wait_for(|s| s.connected || !s.failing_over)
                .await
                .map(|_| ());
        };
        tokio::select! {
            _ = tokio::time::timeout(self.publisher.confirm_timeout(), over) => {}
            () = self.draining.cancelled() => {}
        }
        self.publisher.state()
    }

    /// The unary path: every check, cheapest first, then publish and wait.
    async fn publish_batch(
        &self,
        events: Vec<Event>,
        ticket: Option<intake::Ticket>,
        caller: Option<&Caller>,
        incoming: &trace::Incoming,
        call: &mut Call<'_>,
    ) -> Result<Vec<String>, Status> {
        let n = events.len();
        self.metrics.received(Rpc::Publish, n);
        if let Some(Caller(tenant)) = caller {
            self.metrics.tenant_received(&tenant.name, n);
        }
        let reject = |reason, status| {
            self.metrics.rejected(reason, n);
            if let Some(Caller(tenant)) = caller {
                self.metrics.tenant_rejected(&tenant.name, reason, n);
            }
            status
        };
        if self.draining.is_cancelled() {
            return Err(reject(Reason::Unavailable, status::shutting_down()));
        }
        // Fail fast while the broker is away or stalled, before any other work; but
        // a connection lost just now is a failover under way: wait for its outcome.
        let mut state = self.publisher.state();
        if !state.connected && state.failing_over {
            call.waiting_on(n);
            state = self.wait_out_failover().await;
            if self.draining.is_cancelled() {
                return Err(reject(Reason::Unavailable, status::shutting_down()));
            }
        }
        if !state.connected {
            let status = status::disconnected(
                self.publisher.last_error().get().as_deref(),
                self.hints.disconnected(),
            );
            return Err(reject(Reason::Unavailable, status));
        }
        if state.stalled {
            let status = status::stalled(&self.publisher.stall_reason());
            return Err(reject(Reason::Stalled, status));
        }
        let refused = |e: AdmitError| {
            let delay = self.hints.exhausted(&e);
            reject(admit_reason(&e), status::not_admitted(e, delay))
        };
        let (batch, permit) = match ticket {
            // Admitted by the intake before it was decoded, for its upper bound: keep
            // what the validated events cost, and the request's bytes are free.
            Some(intake::Ticket { mut permit, .. }) => {
                let mut batch = validate::validate_batch(events, &self.settings.limits)
                    .map_err(|v| reject(Reason::Invalid, status::invalid(v)))?;
                authorize_batch(caller, &mut batch).map_err(|s| reject(Reason::Denied, s))?;
                permit.shrink(batch.len(), batch.bytes());
                (batch, permit)
            }
            // Served without the intake layer (it is part of every server `App`
            // builds): admit here.
            None => {
                // Overloaded: refuse before any per-event work (validation, ids,
                // copies), so refusals stay cheap when they are most of the traffic.
                self.admission
                    .check_room(n, validate::estimated_size(&events))
                    .map_err(refused)?;
                let mut batch = validate::validate_batch(events, &self.settings.limits)
                    .map_err(|v| reject(Reason::Invalid, status::invalid(v)))?;
                authorize_batch(caller, &mut batch).map_err(|s| reject(Reason::Denied, s))?;
                let permit = self
                    .admission
                    .try_admit_for(caller.map(|c| &*c.0.quota), batch.len(), batch.bytes())
                    .map_err(refused)?;
                (batch, permit)
            }
        };
        let ids = batch.ids();
        // From here the batch task owns the permit: if this call is cancelled (the
        // caller's deadline or disconnect), the events are still settled with the
        // broker and the permit is released then.
        let pending = self
            .publisher
            .publish(batch.into_events(), permit, None, incoming)
            .map_err(|e| reject(publisher::reason(&e), status::publish_failed(&e, None)))?;
        call.waiting_on(n);
        let outcome = pending.await;
        call.waiting_on(0);
        match outcome.failure {
            None => Ok(ids),
            // The publisher counted each failed event where it was settled.
            Some(failure) => Err(status::batch_failed(&failure, n)),
        }
    }
}

/// With a tenant: every event's topic must be one of its patterns, else
/// `PERMISSION_DENIED` naming the first that is not (and nothing of the request is
/// published); each event is stamped with the tenant's name ([`TENANT_HEADER`]).
/// `first_index` is the index of `events[0]` in what the caller sent.
pub(super) fn authorize(
    caller: Option<&Caller>,
    events: &mut [ValidEvent],
    first_index: usize,
) -> Result<(), Status> {
    let Some(Caller(tenant)) = caller else {
        return Ok(());
    };
    check_topics(tenant, events, first_index)?;
    for event in events.iter_mut() {
        event.stamp(TENANT_HEADER, &tenant.name);
    }
    Ok(())
}

/// [`authorize`] for a whole request (its size is computed again after the stamp).
pub(super) fn authorize_batch(
    caller: Option<&Caller>,
    batch: &mut validate::ValidBatch,
) -> Result<(), Status> {
    let Some(Caller(tenant)) = caller else {
        return Ok(());
    };
    check_topics(tenant, batch.events(), 0)?;
    batch.stamp_all(TENANT_HEADER, &tenant.name);
    Ok(())
}

fn check_topics(
    tenant: &crate::auth::Tenant,
    events: &[ValidEvent],
    first_index: usize,
) -> Result<(), Status> {
    match events
        .iter()
        .enumerate()
        .find(|(_, e)| !tenant.allows(e.topic()))
    {
        None => Ok(()),
        Some((i, event)) => {
            let field = format!("events[{}].topic", first_index.saturating_add(i));
            Err(status::topic_denied(&tenant.name, &field, event.topic()))
        }
    }
}

/// The `reason` label of an admission refusal.
pub(super) fn admit_reason(error: &AdmitError) -> Reason {
    match error {
        AdmitError::Exhausted { .. } => Reason::Exhausted,
        AdmitError::TooLarge { .. } => Reason::Invalid,
        AdmitError::Closed => Reason::Unavailable,
        AdmitError::Quota { .. } => Reason::Quota,
    }
}
