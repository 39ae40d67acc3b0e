//! `PublishStream`: client-streaming ingest with backpressure through HTTP/2 flow control.
//!
//! The handler takes room for one more event *before* it reads the next message, so
//! while the buffer is full it does not read at all: the request body stays in the
//! HTTP/2 stream window, flow control stops the caller's sender, and a stalled broker
//! stalls the stream instead of growing memory. Read ahead is one message per stream,
//! and only once there was room. Confirms are awaited concurrently, in order, so many
//! events are in flight per stream (up to the streams' share of the buffer).
//!
//! Every outcome ends with trailing metadata `ingest-confirmed-count`: how many leading
//! events of the stream were confirmed. A client resumes from there with the same ids.

use std::{future::Future, time::Duration};

use futures::{StreamExt, stream::FuturesOrdered};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming, metadata::MetadataValue};

use super::{intake, status};
use crate::{
    admission::Admission,
    proto::PublishRequest,
    publisher::{self, BatchOutcome, Lane, Pending, PublishError, Publisher},
    telemetry::{Metrics, Reason, metrics::Rpc, trace},
    validate::{self, Limits, ValidEvent},
};

/// Trailing metadata naming how many leading events of the stream were confirmed.
pub const CONFIRMED_COUNT: &str = "ingest-confirmed-count";

/// Batches of one stream sent and not yet taken in. Past it the stream reads no
/// further until the oldest is settled: settled outcomes queued behind an unsettled
/// batch no longer hold a permit, and must not pile up without a bound.
const MAX_BATCHES_IN_FLIGHT: usize = 4096;

/// What one stream needs from the service.
pub(super) struct StreamContext<'a> {
    /// The room the intake took for each message, in message order.
    pub(super) tickets: intake::Tickets,
    pub(super) admission: &'a Admission,
    pub(super) publisher: &'a Publisher,
    pub(super) metrics: &'a Metrics,
    pub(super) limits: &'a Limits,
    pub(super) idle_timeout: Duration,
    pub(super) stall_timeout: Duration,
    pub(super) draining: &'a CancellationToken,
    pub(super) incoming: &'a trace::Incoming,
    /// The authenticated caller, with a tenants file.
    pub(super) caller: Option<crate::auth::Caller>,
}

/// Runs one stream to its end; `Ok` carries the number of events confirmed, `Err` a
/// status that already holds the confirmed count.
pub(super) async fn run(
    ctx: StreamContext<'_>,
    mut stream: Streaming<PublishRequest>,
) -> Result<u64, Status> {
    let mut lane = ctx.publisher.lane();
    let mut progress = Progress::default();
    let ended = read_all(&ctx, &mut stream, &mut progress, &mut lane).await;
    // Whatever ended the read, every batch already sent is settled before answering,
    // so the confirmed count is exact. A batch failure (earlier events) wins over what
    // ended the read (later ones). After a failure, later batches settle in their tasks.
    let settled = if progress.failed {
        Ok(())
    } else {
        progress.settle_all().await
    };
    match settled.and(ended) {
        Ok(()) => Ok(progress.confirmed),
        Err(mut status) => {
            status
                .metadata_mut()
                .insert(CONFIRMED_COUNT, MetadataValue::from(progress.confirmed));
            Err(status)
        }
    }
}

/// Reads, validates, admits and publishes messages until the stream ends or fails.
async fn read_all(
    ctx: &StreamContext<'_>,
    stream: &mut Streaming<PublishRequest>,
    progress: &mut Progress,
    lane: &mut Lane,
) -> Result<(), Status> {
    let mut next_index: u64 = 0;
    loop {
        if progress.in_flight.len() >= MAX_BATCHES_IN_FLIGHT {
            progress.settle_oldest(ctx.draining).await?;
        }
        // The intake reserves each message before it is read and admits its events
        // before it is decoded; while it waits for room the stream is pushed back,
        // not idle.
        let request = loop {
            let read = tokio::time::timeout(ctx.idle_timeout, stream.message());
            match progress.settling(ctx.draining, read).await? {
                Err(_) if ctx.tickets.waiting_for_room() => continue,
                Err(_) => {
                    return Err(Status::new(
                        Code::DeadlineExceeded,
                        format!(
                            "no message for {:?} (stream-idle-timeout): stream closed; resume with a new stream",
                            ctx.idle_timeout
                        ),
                    ));
                }
                Ok(Err(status)) => return Err(status),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(request))) => break request,
            }
        };
        let ticket = ctx.tickets.take();
        let received = request.events.len();
        ctx.metrics.received(Rpc::PublishStream, received);
        if let Some(crate::auth::Caller(tenant)) = &ctx.caller {
            ctx.metrics.tenant_received(&tenant.name, received);
        }
        // An empty message is allowed: a caller may use it to keep an idle stream open.
        if received > ctx.limits.max_batch_events {
            ctx.metrics.rejected(Reason::Invalid, received);
            return Err(status::invalid(vec![validate::FieldViolation {
                field: "events".to_owned(),
                description: format!(
                    "a stream message holds {} events, more than the limit of {} (max-batch-events)",
                    request.events.len(),
                    ctx.limits.max_batch_events
                ),
            }]));
        }
        let (mut valid, violations) = valid_prefix(request, next_index, ctx.limits);
        let first = usize::try_from(next_index).unwrap_or(usize::MAX);
        if let Err(status) = super::authorize(ctx.caller.as_ref(), &mut valid, first) {
            // Nothing of this message is published; the stream ends here.
            ctx.metrics.rejected(Reason::Denied, received);
            if let Some(crate::auth::Caller(tenant)) = &ctx.caller {
                ctx.metrics
                    .tenant_rejected(&tenant.name, Reason::Denied, received);
            }
            return Err(status);
        }
        // The events after the first invalid one are dropped with it.
        ctx.metrics
            .rejected(Reason::Invalid, received - valid.len());
        if !valid.is_empty() {
            // A broker that is away or stalled stalls the stream (it holds its room
            // and reads no further) until it answers again, or the stall timeout ends
            // the stream.
            let usable = |s: &publisher::BrokerState| s.connected && !s.stalled;
            if !usable(&ctx.publisher.state()) {
                let mut state = ctx.publisher.watch_state();
                let back = tokio::time::timeout(ctx.stall_timeout, state.wait_for(usable));
                if !matches!(progress.settling(ctx.draining, back).await?, Ok(Ok(_))) {
                    let was_stalled = ctx.publisher.state().stalled;
                    let reason = if was_stalled {
                        Reason::Stalled
                    } else {
                        Reason::Unavailable
                    };
                    ctx.metrics.rejected(reason, valid.len());
                    let waited = format!(
                        "stream stalled {:?} (stream-stall-timeout)",
                        ctx.stall_timeout
                    );
                    return Err(if was_stalled {
                        status::stalled(&format!("{waited}: {}", ctx.publisher.stall_reason()))
                    } else {
                        status::publish_failed(&PublishError::Disconnected, Some(waited))
                    });
                }
            }
            let n = valid.len();
            let bytes: usize = valid.iter().map(ValidEvent::size).sum();
            let permit = match ticket {
                Some(intake::Ticket { mut permit, .. }) => {
                    permit.shrink(n, bytes);
                    permit
                }
                // Served without the intake layer: admit here.
                None => progress
                    .settling(
                        ctx.draining,
                        ctx.admission.admit_stream_for(
                            ctx.caller.as_ref().map(|c| &*c.0.quota),
                            n,
                            bytes,
                        ),
                    )
                    .await?
                    .map_err(|e| status::not_admitted(e, Duration::ZERO))
                    .inspect_err(|_| ctx.metrics.rejected(Reason::Invalid, n))?,
            };
            let pending = ctx
                .publisher
                .publish(valid, permit, Some(&mut *lane), ctx.incoming)
                .map_err(|e| {
                    ctx.metrics.rejected(publisher::reason(&e), n);
                    status::publish_failed(&e, None)
                })?;
            let events = n as u64;

            progress.in_flight.push_back(pending);
            next_index += events;
        }
        if !violations.is_empty() {
            // The valid events before the bad one are published; the stream ends here.
            return Err(status::invalid(violations));
        }
    }
}

/// Validates a message's events in order up to the first invalid one: the events
/// before it, and that event's violations (indexes count from the stream's start).
fn valid_prefix(
    request: PublishRequest,
    first_index: u64,
    limits: &Limits,
) -> (Vec<ValidEvent>, Vec<validate::FieldViolation>) {
    let mut valid = Vec::with_capacity(request.events.len());
    let mut violations = Vec::new();
    for (i, event) in request.events.into_iter().enumerate() {
        let index = usize::try_from(first_index)
            .unwrap_or(usize::MAX)
            .saturating_add(i);
        match validate::validate_event(event, index, limits, &mut violations) {
            Some(event) => valid.push(event),
            None => break,
        }
    }
    (valid, violations)
}

/// The stream's batches in flight, in order, and how many leading events are confirmed.
#[derive(Default)]
struct Progress {
    /// Leading events confirmed so far.
    confirmed: u64,
    /// Batches sent and not yet taken in, oldest first. A batch's task holds its
    /// permit until the batch settles and drops it before answering, so an entry that
    /// settled behind an older, unsettled one holds only its small outcome: admission
    /// bounds the unsettled entries, [`MAX_BATCHES_IN_FLIGHT`] all of them.
    in_flight: FuturesOrdered<Pending>,
    /// A batch failed: the confirmed prefix ends there.
    failed: bool,
}

impl Progress {
    /// Awaits `work` while settling batches as their confirms arrive. Ends early with
    /// the first batch failure, or with `UNAVAILABLE` when the service starts draining.
    async fn settling<F: Future>(
        &mut self,
        draining: &CancellationToken,
        work: F,
    ) -> Result<F::Output, Status> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                () = draining.cancelled() => return Err(status::shutting_down()),
                Some(outcome) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.record(outcome)?;
                }
                output = &mut work => return Ok(output),
            }
        }
    }

    /// Waits for the oldest batch in flight to settle, or for draining to begin.
    async fn settle_oldest(&mut self, draining: &CancellationToken) -> Result<(), Status> {
        tokio::select! {
            biased;
            () = draining.cancelled() => Err(status::shutting_down()),
            Some(outcome) = self.in_flight.next() => self.record(outcome),
            else => Ok(()),
        }
    }

    /// Settles every batch still in flight.
    async fn settle_all(&mut self) -> Result<(), Status> {
        while let Some(outcome) = self.in_flight.next().await {
            self.record(outcome)?;
        }
        Ok(())
    }

    fn record(&mut self, outcome: BatchOutcome) -> Result<(), Status> {
        let first = self.confirmed;
        self.confirmed += outcome.confirmed as u64;
        match outcome.failure {
            None => Ok(()),
            Some(failure) => {
                self.failed = true;
                let index = first + failure.index as u64;
                Err(status::publish_failed(
                    &failure.error,
                    Some(format!("events[{index}]")),
                ))
            }
        }
    }
}
