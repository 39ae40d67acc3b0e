//! Intake: every request byte is paid for before it is taken off the connection.
//!
//! A tower layer in front of tonic wraps each request body. As the body's bytes
//! arrive, [`Framer`] finds each gRPC message's 5-byte length prefix, and before any
//! byte of that message is passed on the whole message is reserved from the receive
//! share of `--buffer-bytes` ([`Reservation`]). Then, before the message's last byte
//! is passed on (tonic decodes a message only once it has all of it), its events,
//! counted on the way, are admitted into the buffer for their upper-bound cost
//! ([`Permit`]). The handler takes that [`Ticket`] from the request's extensions with
//! the decoded message, shrinks the permit to what the validated events cost, and
//! drops the reservation.
//!
//! While a reservation or an admission waits, the body is not polled, so HTTP/2 flow
//! control stops the sender: for streams that wait is the backpressure. A unary call
//! is refused at once instead (`RESOURCE_EXHAUSTED` with `RetryInfo`), having read no
//! more than the chunk that held the prefix. A message is reserved whole, never in
//! part, and an admission waits only on room that confirms free, so no set of
//! half-received messages can deadlock the budget.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;
use tonic::{Status, body::Body, codegen::http};

use super::{
    framing::{FrameError, FrameLimits, Framer, Stop},
    status,
};
use crate::{
    admission::{self, Admission, AdmitError, ChunkPermit, Permit, Reservation},
    telemetry::{Metrics, Reason, metrics::Rpc},
    validate::FieldViolation,
};

/// How a method's request messages wait for room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Refused at once when there is no room (unary `Publish`).
    Now,
    /// Waits for room, and so stalls the stream (`PublishStream`, `PublishAcked`).
    Wait,
    /// Health and reflection: their (small) messages are reserved, refused at once if
    /// there is no room, and never admitted as events.
    Other,
}

fn mode(path: &str) -> Mode {
    match path.strip_prefix("/ingest.v1.Ingest/") {
        Some("Publish") => Mode::Now,
        Some(_) => Mode::Wait,
        None => Mode::Other,
    }
}

/// The room taken for one request message: its reservation while it is received,
/// and the permit its events were admitted with, for their upper-bound cost.
#[derive(Debug)]
pub struct Ticket {
    /// The message's bytes, until it is decoded and validated.
    pub reservation: Reservation,
    /// The events' room; the handler shrinks it to what they cost.
    pub permit: Permit,
    /// Events the message holds.
    pub events: usize,
}

/// The tickets of one request's messages, oldest first: the body adds one before
/// the last byte of each message passes, the handler takes one per decoded message.
/// Holds at most two: a message is decoded only once it is whole.
#[derive(Clone, Debug, Default)]
pub struct Tickets(Arc<TicketsInner>);

#[derive(Debug, Default)]
struct TicketsInner {
    queue: Mutex<VecDeque<Ticket>>,
    /// The body is waiting for room: a stream that reads nothing now is pushed back,
    /// not idle.
    waiting: AtomicBool,
}

impl Tickets {
    /// The oldest ticket, for the message just decoded.
    pub fn take(&self) -> Option<Ticket> {
        self.0
            .queue
            .lock()
            .ok()
            .and_then(|mut queue| queue.pop_front())
    }

    /// True while the body waits for room for its next message.
    pub fn waiting_for_room(&self) -> bool {
        self.0.waiting.load(Ordering::Relaxed)
    }

    fn push(&self, ticket: Ticket) {
        if let Ok(mut queue) = self.0.queue.lock() {
            queue.push_back(ticket);
        }
    }

    fn set_waiting(&self, waiting: bool) {
        self.0.waiting.store(waiting, Ordering::Relaxed);
    }
}

/// What the intake needs from configuration.
#[derive(Clone, Debug)]
pub struct IntakeSettings {
    /// The shared bound.
    pub admission: Arc<Admission>,
    /// Limits checked while bytes pass.
    pub limits: FrameLimits,
    /// Largest message on the other services (health, reflection).
    pub max_other_message: usize,
    /// `RetryInfo` delays for refusals.
    pub hints: super::hints::RetryHints,
    /// Unary calls refused here never reach their handler: counted here.
    pub metrics: Metrics,
}

/// The tower layer that puts [`IntakeBody`] in front of every request.
#[derive(Clone, Debug)]
pub struct IntakeLayer {
    settings: Arc<IntakeSettings>,
}

impl IntakeLayer {
    /// A layer over the given settings.
    pub fn new(settings: IntakeSettings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }
}

impl<S> tower_layer::Layer<S> for IntakeLayer {
    type Service = Intake<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Intake {
            inner,
            settings: Arc::clone(&self.settings),
        }
    }
}

/// The service [`IntakeLayer`] wraps around the routes.
#[derive(Clone, Debug)]
pub struct Intake<S> {
    inner: S,
    settings: Arc<IntakeSettings>,
}

impl<S> tower_service::Service<http::Request<Body>> for Intake<S>
where
    S: tower_service::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let mode = mode(request.uri().path());
        let tickets = Tickets::default();
        request.extensions_mut().insert(tickets.clone());
        let settings = Arc::clone(&self.settings);
        // Authenticated by the layer in front: the tenant's quota is admitted from first.
        let quota = request
            .extensions()
            .get::<crate::auth::Caller>()
            .map(|c| Arc::clone(&c.0.quota));
        let request =
            request.map(|body| Body::new(IntakeBody::new(body, mode, settings, tickets, quota)));
        self.inner.call(request)
    }
}

/// What a wait in the body resolves to.
enum Granted {
    Chunk(ChunkPermit),
    Reserved(Reservation),
    Admitted(Permit),
}

type Wait = Pin<Box<dyn Future<Output = Result<Granted, AdmitError>> + Send>>;

/// A request body that passes bytes on only once they are paid for.
pub struct IntakeBody {
    inner: Body,
    mode: Mode,
    settings: Arc<IntakeSettings>,
    framer: Framer,
    /// Bytes taken off the connection and not yet passed on: at most one chunk, the
    /// one that held the prefix of the message now waiting for room.
    held: Bytes,
    /// Room for the chunk being read: held from before a read until the body is
    /// between messages with nothing held, so `held` is always paid for.
    chunk: Option<ChunkPermit>,
    /// The current message's reservation, until its events are admitted.
    reservation: Option<Reservation>,
    /// A reservation or admission being waited for (streams only).
    waiting: Option<Wait>,
    tickets: Tickets,
    /// An error has been returned: nothing more is read.
    failed: bool,
    /// When the request arrived, for the duration of a call refused here.
    started: Instant,
    /// Events of the message being refused, when known.
    events: usize,
    /// The caller's tenant quota, with a tenants file: admitted from first.
    quota: Option<Arc<crate::admission::TenantQuota>>,
}

impl std::fmt::Debug for IntakeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntakeBody")
            .field("mode", &self.mode)
            .field("held", &self.held.len())
            .field("waiting", &self.waiting.is_some())
            .finish_non_exhaustive()
    }
}

impl IntakeBody {
    fn new(
        inner: Body,
        mode: Mode,
        settings: Arc<IntakeSettings>,
        tickets: Tickets,
        quota: Option<Arc<crate::admission::TenantQuota>>,
    ) -> Self {
        let mut limits = settings.limits;
        if mode == Mode::Other {
            limits.max_message = settings.max_other_message;
            // Not event requests: only the framing is read, not the fields.
            limits.walk_fields = false;
        }
        Self {
            inner,
            mode,
            framer: Framer::new(limits),
            settings,
            held: Bytes::new(),
            chunk: None,
            reservation: None,
            waiting: None,
            tickets,
            failed: false,
            started: Instant::now(),
            events: 0,
            quota,
        }
    }

    /// Acts on a stop: for unary calls at once, for streams by starting a wait.
    fn begin(&mut self, stop: Stop) -> Result<(), Status> {
        let admission = &self.settings.admission;
        match (stop, self.mode) {
            (Stop::Message { len }, Mode::Now | Mode::Other) => {
                let reservation = admission.reserve_now(len).map_err(|e| self.refusal(e))?;
                self.granted(Granted::Reserved(reservation));
            }
            (Stop::Message { len }, Mode::Wait) => {
                let admission = Arc::clone(admission);
                self.waiting = Some(Box::pin(async move {
                    admission.reserve(len).await.map(Granted::Reserved)
                }));
            }
            (Stop::LastByte { .. }, Mode::Other) => {
                // Health and reflection: the reservation is enough; it is held until
                // the next message begins or the body is dropped.
                self.framer.admitted();
            }
            (
                Stop::LastByte {
                    events,
                    attributes,
                    len,
                },
                Mode::Now,
            ) => {
                self.events = events;
                let bound = admission::stamped_bound(len, events, attributes, self.tenant_name());
                let permit = admission
                    .try_admit_for(self.quota.as_deref(), events, bound)
                    .map_err(|e| self.refusal(e))?;
                self.granted(Granted::Admitted(permit));
            }
            (
                Stop::LastByte {
                    events,
                    attributes,
                    len,
                },
                Mode::Wait,
            ) => {
                let bound = admission::stamped_bound(len, events, attributes, self.tenant_name());
                let admission = Arc::clone(admission);
                let quota = self.quota.clone();
                self.waiting = Some(Box::pin(async move {
                    admission
                        .admit_stream_for(quota.as_deref(), events, bound)
                        .await
                        .map(Granted::Admitted)
                }));
            }
        }
        Ok(())
    }

    /// The caller's tenant, whose name the service stamps on each of its events.
    fn tenant_name(&self) -> Option<&str> {
        self.quota.as_deref().map(|q| &**q.name())
    }

    /// Takes room for the next read: at once for unary calls, else by a wait.
    fn begin_read(&mut self) -> Result<(), Status> {
        let admission = &self.settings.admission;
        match self.mode {
            Mode::Now | Mode::Other => {
                let chunk = admission.chunk_now().map_err(|e| self.refusal(e))?;
                self.chunk = Some(chunk);
            }
            Mode::Wait => {
                let admission = Arc::clone(admission);
                self.waiting = Some(Box::pin(async move {
                    admission.chunk().await.map(Granted::Chunk)
                }));
            }
        }
        Ok(())
    }

    /// A message has passed whole and nothing is held. A stream gives its room to
    /// read back (one that is quiet holds none) and takes it again before its next
    /// read; a unary body keeps it to its end. A health or reflection message's
    /// reservation ends here: it is decoded by the time another is read.
    fn between_messages(&mut self) {
        match self.mode {
            Mode::Wait => self.chunk = None,
            Mode::Other => self.reservation = None,
            Mode::Now => {}
        }
    }

    fn granted(&mut self, granted: Granted) {
        match granted {
            Granted::Chunk(chunk) => self.chunk = Some(chunk),
            Granted::Reserved(reservation) => {
                self.reservation = Some(reservation);
                self.framer.reserved();
            }
            Granted::Admitted(permit) => {
                if let Some(reservation) = self.reservation.take() {
                    self.tickets.push(Ticket {
                        reservation,
                        events: permit.events(),
                        permit,
                    });
                }
                self.framer.admitted();
            }
        }
    }

    /// The status for a request that cannot be given room.
    fn refusal(&self, error: AdmitError) -> Status {
        if self.mode == Mode::Now {
            self.count(super::admit_reason(&error));
        }
        let delay = self.settings.hints.exhausted(&error);
        status::not_admitted(error, delay)
    }

    /// Counts a unary call refused here, as its handler would have. Events refused
    /// before the message was read are not known, and counted as none.
    fn count(&self, reason: Reason) {
        let metrics = &self.settings.metrics;
        metrics.received(Rpc::Publish, self.events);
        metrics.rejected(reason, self.events);
        if let Some(quota) = &self.quota {
            metrics.tenant_received(quota.name(), self.events);
            metrics.tenant_rejected(quota.name(), reason, self.events);
        }
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.mode == Mode::Now {
            let metrics = &self.settings.metrics;
            metrics.rpc_finished(Rpc::Publish, status.code(), self.started.elapsed());
        }
        self.failed = true;
        self.waiting = None;
        self.held = Bytes::new();
        Poll::Ready(Some(Err(status)))
    }
}

/// A framing error as the caller sees it.
fn frame_status(error: FrameError) -> Status {
    match error {
        FrameError::TooLarge { .. } => Status::out_of_range(error.to_string()),
        FrameError::TooManyEvents { .. } => status::invalid(vec![FieldViolation {
            field: "events".to_owned(),
            description: error.to_string(),
        }]),
        FrameError::TooManyAttributes { index, .. } => status::invalid(vec![FieldViolation {
            field: format!("events[{index}].attributes"),
            description: error.to_string(),
        }]),
        FrameError::EventWithoutTopic { index, .. } => status::invalid(vec![FieldViolation {
            field: format!("events[{index}].topic"),
            description: "required".to_owned(),
        }]),
        FrameError::Malformed(_) => status::invalid(vec![FieldViolation {
            field: "request".to_owned(),
            description: error.to_string(),
        }]),
    }
}

impl HttpBody for IntakeBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        loop {
            if let Some(wait) = &mut this.waiting {
                // Not polling the inner body while waiting is the backpressure.
                this.tickets.set_waiting(true);
                let granted = ready!(wait.as_mut().poll(cx));
                this.tickets.set_waiting(false);
                this.waiting = None;
                match granted {
                    Ok(granted) => this.granted(granted),
                    Err(error) => {
                        let status = this.refusal(error);
                        return this.fail(status);
                    }
                }
            }
            if let Some(stop) = this.framer.stop() {
                if let Err(status) = this.begin(stop) {
                    return this.fail(status);
                }
                continue;
            }
            if !this.held.is_empty() {
                match this.framer.advance(&this.held) {
                    Ok(advance) if advance.taken > 0 => {
                        let chunk = this.held.split_to(advance.taken);
                        if this.held.is_empty() && this.framer.at_boundary() {
                            this.between_messages();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    Ok(_) => continue,
                    Err(error) => {
                        if this.mode == Mode::Now {
                            this.count(Reason::Invalid);
                        }
                        return this.fail(frame_status(error));
                    }
                }
            }
            if this.chunk.is_none() {
                if let Err(status) = this.begin_read() {
                    return this.fail(status);
                }
                continue;
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.held = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                None => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.failed && self.held.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
