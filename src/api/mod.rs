//! The gRPC surface: `ingest.v1.Ingest`. Turns requests into validated batches,
//! admits them, hands them to the publisher and maps every outcome to a status.

mod status;
mod stream;

pub use stream::CONFIRMED_COUNT;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    admission::Admission,
    proto::{PublishRequest, PublishResponse, PublishStreamResponse, ingest_server::Ingest},
    publisher::Publisher,
    validate::{self, Limits},
};

/// Largest encoded size of one event's metadata: id, topic, content type, time and
/// 64 attributes of the largest size, with protobuf framing.
const MAX_EVENT_METADATA: usize = validate::MAX_ID_BYTES
    + 2 * validate::MAX_SHORT_STRING
    + validate::MAX_ATTRIBUTES_TOTAL_BYTES
    + validate::MAX_ATTRIBUTES * 16
    + 64;

/// The largest request message tonic will decode. Anything bigger is refused with
/// `OUT_OF_RANGE` before it is buffered: a request can never hold more than
/// `max-batch-events` maximal events, and never more than the whole byte buffer
/// (plus one event's metadata), since such a request could never be admitted.
pub fn max_message_bytes(limits: &Limits, buffer_bytes: usize) -> usize {
    let per_event = limits.max_event_bytes.saturating_add(MAX_EVENT_METADATA);
    limits
        .max_batch_events
        .saturating_mul(per_event)
        .min(buffer_bytes.saturating_add(MAX_EVENT_METADATA))
}

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
    /// Cancelled when shutdown begins: new calls are refused, open streams end.
    draining: CancellationToken,
}

impl IngestService {
    /// Builds the service over the shared admission and publisher.
    pub fn new(
        admission: Arc<Admission>,
        publisher: Publisher,
        settings: ServiceSettings,
        draining: CancellationToken,
    ) -> Self {
        Self {
            admission,
            publisher,
            settings,
            draining,
        }
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        if self.draining.is_cancelled() {
            return Err(status::shutting_down());
        }
        // Fail fast while the broker is away, before any other work.
        if !self.publisher.state().connected {
            return Err(status::publish_failed(
                &crate::publisher::PublishError::Disconnected,
                None,
            ));
        }
        let events = request.into_inner().events;
        // Overloaded: refuse before any per-event work (validation, ids, copies), so
        // refusals stay cheap and fast when they are most of the traffic.
        self.admission
            .check_room(events.len(), validate::estimated_size(&events))
            .map_err(|e| status::not_admitted(e, self.settings.retry_after))?;
        let batch =
            validate::validate_batch(events, &self.settings.limits).map_err(status::invalid)?;
        let permit = self
            .admission
            .try_admit(batch.len(), batch.bytes())
            .map_err(|e| status::not_admitted(e, self.settings.retry_after))?;
        let ids = batch.ids();
        let events = batch.len();
        // From here the batch task owns the permit: if this call is cancelled (the
        // caller's deadline or disconnect), the events are still settled with the
        // broker and the permit is released then.
        let outcome = self
            .publisher
            .publish(batch.into_events(), permit, None)
            .map_err(|e| status::publish_failed(&e, None))?
            .await;
        match outcome.failure {
            None => Ok(Response::new(PublishResponse { ids })),
            Some(failure) => Err(status::batch_failed(&failure, events)),
        }
    }

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<PublishStreamResponse>, Status> {
        if self.draining.is_cancelled() {
            return Err(status::shutting_down());
        }
        let ctx = stream::StreamContext {
            admission: &self.admission,
            publisher: &self.publisher,
            limits: &self.settings.limits,
            idle_timeout: self.settings.stream_idle_timeout,
            stall_timeout: self.settings.stream_stall_timeout,
            draining: &self.draining,
        };
        let events = stream::run(ctx, request.into_inner()).await?;
        let mut response = Response::new(PublishStreamResponse { events });
        response.metadata_mut().insert(
            CONFIRMED_COUNT,
            tonic::metadata::MetadataValue::from(events),
        );
        Ok(response)
    }
}
