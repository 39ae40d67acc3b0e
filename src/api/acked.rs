//! `PublishAcked`: a long-lived stream acknowledged as it goes.
//!
//! Each request is handled like a unary `Publish` (validated whole, admitted whole,
//! published in stream order on the stream's lane) and answered by exactly one
//! [`PublishAck`], in request order, as soon as its events are settled. A failed
//! request gets its status in its ack and the stream goes on; only the caller closing
//! its side, draining, the idle timeout or a transport error end it.
//!
//! Bounds, so a caller cannot grow memory by sending fast or by not reading:
//! - the intake admits each request's events before it is decoded, waiting for room
//!   (the stream is pushed back through HTTP/2 flow control meanwhile);
//! - at most [`MAX_PENDING_ACKS`] requests are unanswered per stream; past that the
//!   stream reads no further until the oldest ack is written;
//! - acks wait for the caller in a channel of [`ACKS_BUFFERED`]; a caller that stops
//!   reading fills it, then the pending acks, then the stream stops being read;
//! - a request's ids, which its ack carries after the events are settled, keep their
//!   share of the admission permit until the ack is handed to the channel.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use futures::{StreamExt, stream::FuturesOrdered};
use prost::Message;
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming, metadata::MetadataMap};
use tracing::Instrument;

use super::{ServiceSettings, admit_reason, call::Call, hints::RetryHints, intake, status};
use crate::{
    admission::{Admission, Permit},
    auth::Caller,
    proto::{PublishAck, PublishRequest},
    publisher::{self, BrokerState, Lane, Pending, Publisher},
    telemetry::{Metrics, Reason, metrics::Rpc, trace},
    validate,
};

/// Requests of one stream read and not yet answered.
pub const MAX_PENDING_ACKS: usize = 1024;

/// Acks written and not yet taken by the transport (the caller reads slower).
pub const ACKS_BUFFERED: usize = 64;

/// Admission bytes an ack holds per id it carries, beyond the id itself: the
/// `String` and its protobuf framing.
const ID_OVERHEAD: usize = 32;

/// The answers of one `PublishAcked` stream.
pub type AckStream = ReceiverStream<Result<PublishAck, Status>>;

/// What one stream needs; owned, as the stream runs in its own task.
pub(super) struct AckedContext {
    /// The room the intake took for each message, in message order.
    pub(super) tickets: intake::Tickets,
    pub(super) admission: Arc<Admission>,
    pub(super) publisher: Publisher,
    pub(super) metrics: Metrics,
    pub(super) settings: ServiceSettings,
    pub(super) draining: CancellationToken,
    pub(super) hints: RetryHints,
    pub(super) incoming: trace::Incoming,
    /// The call's request metadata (its `grpc-timeout`, for the RPC metrics).
    pub(super) metadata: MetadataMap,
    /// The authenticated caller, with a tenants file.
    pub(super) caller: Option<Caller>,
}

/// Starts the stream's task; its acks come out of the returned stream.
pub(super) fn spawn(
    ctx: AckedContext,
    requests: Streaming<PublishRequest>,
    span: tracing::Span,
) -> AckStream {
    let (tx, rx) = mpsc::channel(ACKS_BUFFERED);
    let task_span = span.clone();
    tokio::spawn(
        async move {
            let _open = ctx.metrics.stream_opened();
            let call = Call::start(&ctx.metrics, Rpc::PublishAcked, &ctx.metadata);
            let code = match run(&ctx, requests, &tx).await {
                Ended::Done => Code::Ok,
                Ended::Failed(status) => {
                    let code = status.code();
                    tracing::info!(code = ?code, message = status.message(), "stream ended with an error");
                    // The caller may be gone already; then nobody is left to tell.
                    let _ = tx.send(Err(status)).await;
                    code
                }
                Ended::CallerGone => {
                    // Dropping `call` unfinished records the cancel (or deadline).
                    tracing::debug!("caller went away; batches in flight settle in their tasks");
                    return;
                }
            };
            span.record("rpc.grpc.status_code", code as i32);
            call.finish(code);
        }
        .instrument(task_span),
    );
    ReceiverStream::new(rx)
}

/// How a stream ended.
enum Ended {
    /// The caller closed its side and every ack was written.
    Done,
    /// Draining, idle or a transport error: every ack due was written first where
    /// the caller was still there; this is the final status.
    Failed(Status),
    /// The caller stopped listening.
    CallerGone,
}

/// A request read while the broker was away or stalled: it waits for the broker, and
/// the stream reads nothing else meanwhile, so order holds.
struct Held {
    request: PublishRequest,
    ticket: Option<intake::Ticket>,
    until: Instant,
}

fn usable(state: &BrokerState) -> bool {
    state.connected && !state.stalled
}

async fn run(
    ctx: &AckedContext,
    mut requests: Streaming<PublishRequest>,
    tx: &mpsc::Sender<Result<PublishAck, Status>>,
) -> Ended {
    let mut lane = ctx.publisher.lane();
    let mut acks: FuturesOrdered<Settling> = FuturesOrdered::new();
    // The oldest settled ack, waiting for room in the channel, with the room its ids hold.
    let mut ready: Option<(PublishAck, Option<Permit>)> = None;
    let mut held: Option<Held> = None;
    let mut reading = true;
    let mut end: Option<Status> = None;
    let mut broker = ctx.publisher.watch_state();
    let idle_timeout = ctx.settings.stream_idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    loop {
        if !reading && held.is_none() && acks.is_empty() && ready.is_none() {
            return end.map_or(Ended::Done, Ended::Failed);
        }
        let held_until = held.as_ref().map_or_else(Instant::now, |h| h.until);
        let idle_now = reading && held.is_none() && acks.is_empty() && ready.is_none();
        tokio::select! {
            biased;
            () = ctx.draining.cancelled(), if reading || held.is_some() => {
                reading = false;
                if let Some(h) = held.take() {
                    let n = h.request.events.len();
                    acks.push_back(refused(ctx, h.request.sequence, n, Reason::Unavailable, status::shutting_down()));
                }
                end = Some(status::shutting_down());
            }
            () = tx.closed() => return Ended::CallerGone,
            room = tx.reserve(), if ready.is_some() => match room {
                Ok(room) => {
                    if let Some((ack, _ids)) = ready.take() {
                        room.send(Ok(ack));
                    }
                    idle.as_mut().reset(Instant::now() + idle_timeout);
                }
                Err(_) => return Ended::CallerGone,
            },
            Some(ack) = acks.next(), if ready.is_none() && !acks.is_empty() => ready = Some(ack),
            // Back, or still away after the stall timeout: then this request fails
            // with what a unary call would hear, and the stream goes on.
            _ = tokio::time::timeout_at(held_until, broker.wait_for(usable)), if held.is_some() => {
                if let Some(h) = held.take() {
                    acks.push_back(start(ctx, h.request, h.ticket, &mut lane));
                }
            }
            read = requests.next(), if reading && held.is_none() && acks.len() < MAX_PENDING_ACKS => {
                idle.as_mut().reset(Instant::now() + idle_timeout);
                match read {
                    None => reading = false,
                    Some(Err(status)) => {
                        reading = false;
                        end = Some(status);
                    }
                    Some(Ok(request)) => {
                        let ticket = ctx.tickets.take();
                        if request.events.is_empty() || usable(&ctx.publisher.state()) {
                            acks.push_back(start(ctx, request, ticket, &mut lane));
                        } else {
                            held = Some(Held {
                                request,
                                ticket,
                                until: Instant::now() + ctx.settings.stream_stall_timeout,
                            });
                        }
                    }
                }
            }
            () = &mut idle, if idle_now => {
                if ctx.tickets.waiting_for_room() {
                    // Pushed back, not idle.
                    idle.as_mut().reset(Instant::now() + idle_timeout);
                } else {
                    reading = false;
                    end = Some(Status::new(
                        Code::DeadlineExceeded,
                        format!("no request for {idle_timeout:?} (stream-idle-timeout): stream closed; open a new one"),
                    ));
                }
            }
        }
    }
}

/// Every check of a unary `Publish`, then the publish; the returned future settles
/// to the request's ack.
fn start(
    ctx: &AckedContext,
    request: PublishRequest,
    ticket: Option<intake::Ticket>,
    lane: &mut Lane,
) -> Settling {
    let sequence = request.sequence;
    let n = request.events.len();
    ctx.metrics.received(Rpc::PublishAcked, n);
    if let Some(Caller(tenant)) = &ctx.caller {
        ctx.metrics.tenant_received(&tenant.name, n);
    }
    if n == 0 {
        // An empty request keeps an idle stream open; it is acknowledged like any other.
        return Settling::Done(Some((ok(sequence, Vec::new()), None)));
    }
    let state = ctx.publisher.state();
    if !state.connected {
        let status = status::disconnected(
            ctx.publisher.last_error().get().as_deref(),
            ctx.hints.disconnected(),
        );
        return refused(ctx, sequence, n, Reason::Unavailable, status);
    }
    if state.stalled {
        let status = status::stalled(&ctx.publisher.stall_reason());
        return refused(ctx, sequence, n, Reason::Stalled, status);
    }
    let mut batch = match validate::validate_batch(request.events, &ctx.settings.limits) {
        Ok(batch) => batch,
        Err(violations) => {
            return refused(
                ctx,
                sequence,
                n,
                Reason::Invalid,
                status::invalid(violations),
            );
        }
    };
    if let Err(status) = super::authorize_batch(ctx.caller.as_ref(), &mut batch) {
        return refused(ctx, sequence, n, Reason::Denied, status);
    }
    let mut permit = match ticket {
        Some(intake::Ticket { mut permit, .. }) => {
            permit.shrink(batch.len(), batch.bytes());
            permit
        }
        // Served without the intake layer: admit here, without waiting.
        None => match ctx.admission.try_admit_for(
            ctx.caller.as_ref().map(|c| &*c.0.quota),
            batch.len(),
            batch.bytes(),
        ) {
            Ok(permit) => permit,
            Err(e) => {
                let reason = admit_reason(&e);
                let delay = ctx.hints.exhausted(&e);
                return refused(ctx, sequence, n, reason, status::not_admitted(e, delay));
            }
        },
    };
    let ids = batch.ids();
    let ids_cost = ids.iter().map(|id| id.len() + ID_OVERHEAD).sum();
    let ids_room = permit.split_bytes(ids_cost);
    match ctx
        .publisher
        .publish(batch.into_events(), permit, Some(lane), &ctx.incoming)
    {
        Ok(pending) => Settling::Publishing {
            pending,
            sequence,
            ids,
            ids_room,
        },
        Err(e) => refused(
            ctx,
            sequence,
            n,
            publisher::reason(&e),
            status::publish_failed(&e, None),
        ),
    }
}

/// A request answered without publishing: counted, and its ack due in order.
fn refused(
    ctx: &AckedContext,
    sequence: u64,
    n: usize,
    reason: Reason,
    status: Status,
) -> Settling {
    ctx.metrics.rejected(reason, n);
    if let Some(Caller(tenant)) = &ctx.caller {
        ctx.metrics.tenant_rejected(&tenant.name, reason, n);
    }
    Settling::Done(Some((failed(sequence, &status), None)))
}

fn ok(sequence: u64, ids: Vec<String>) -> PublishAck {
    PublishAck {
        sequence,
        ids,
        status: Some(tonic_types::pb::Status {
            code: Code::Ok as i32,
            message: String::new(),
            details: Vec::new(),
        }),
    }
}

/// An ack carrying `status` as a `google.rpc.Status`, with the rich details a unary
/// call would carry in `grpc-status-details-bin`.
fn failed(sequence: u64, status: &Status) -> PublishAck {
    let rich = tonic_types::pb::Status::decode(status.details())
        .ok()
        .filter(|rich| rich.code == status.code() as i32)
        .unwrap_or_else(|| tonic_types::pb::Status {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: Vec::new(),
        });
    PublishAck {
        sequence,
        ids: Vec::new(),
        status: Some(rich),
    }
}

/// One request's ack, once it is due.
enum Settling {
    /// Answered already (refused, or empty); taken once.
    Done(Option<(PublishAck, Option<Permit>)>),
    /// Published; the ack waits for the batch to settle.
    Publishing {
        pending: Pending,
        sequence: u64,
        ids: Vec<String>,
        ids_room: Option<Permit>,
    },
}

impl Future for Settling {
    type Output = (PublishAck, Option<Permit>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match this {
            Settling::Done(ack) => Poll::Ready(ack.take().unwrap_or_else(|| {
                // Polled again after it was ready: FuturesOrdered does not.
                (failed(0, &Status::internal("ack taken twice")), None)
            })),
            Settling::Publishing {
                pending,
                sequence,
                ids,
                ids_room,
            } => {
                let outcome = ready!(Pin::new(pending).poll(cx));
                let ack = match outcome.failure {
                    // The publisher counted each event where it was settled.
                    None => ok(*sequence, std::mem::take(ids)),
                    Some(failure) => failed(*sequence, &status::batch_failed(&failure, ids.len())),
                };
                Poll::Ready((ack, ids_room.take()))
            }
        }
    }
}
