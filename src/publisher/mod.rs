//! Publisher: the only stage that speaks AMQP.
//!
//! It offers "publish these events, tell me each outcome" and hides the connection,
//! the confirm-mode channels, confirms, returns and reconnects. A batch is published
//! by a task that owns the batch's admission permit, so the permit is released exactly
//! once, when the last event of the batch is settled (ack, nack, return, timeout or
//! channel error), whether or not the caller is still waiting for the answer.

mod amqp;
mod broker_ca;
mod last_error;
mod stall;
mod supervisor;

pub use broker_ca::read_ca;
pub use last_error::LastError;

use std::{
    future::Future,
    pin::{Pin, pin},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use lapin::{Channel, types::ShortString};
use tokio::{
    sync::{Notify, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use tracing::Instrument;

use crate::{
    admission::Permit,
    telemetry::{Metrics, Reason, trace},
    validate::ValidEvent,
};

/// What the publisher needs from configuration.
#[derive(Clone, Debug)]
pub struct PublisherSettings {
    /// Broker address, `amqp://user:pass@host:port/vhost` (`amqps://` for TLS).
    pub amqp_url: String,
    /// PEM CA certificates an `amqps://` broker's certificate may chain to, besides the
    /// system's roots (`--amqp-ca`, read with [`read_ca`] at start).
    pub amqp_ca: Option<String>,
    /// Exchange every event is published to; routing key = topic.
    pub exchange: String,
    /// Declare the exchange (durable topic) on every connect; otherwise check it exists.
    pub declare_exchange: bool,
    /// Events in flight when a channel or connection fails are published again on the
    /// next connection (same `message_id`) while their confirm deadline lasts.
    pub retry_unconfirmed: bool,
    /// Answer OK for events no queue received (`mandatory` returns) instead of failing them.
    pub accept_unroutable: bool,
    /// Confirm-mode channels to spread batches over.
    pub channels: usize,
    /// Longest wait from publish to confirm before the event fails as `UNAVAILABLE`.
    pub confirm_timeout: Duration,
    /// Cap of the exponential backoff between connection attempts.
    pub reconnect_max_backoff: Duration,
    /// No answer from the broker for this long, with events outstanding: stalled.
    pub stall_after: Duration,
}

/// Why an event was not confirmed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    /// No connection to the broker right now.
    #[error("not connected to RabbitMQ")]
    Disconnected,
    /// The broker refused responsibility for the message (`basic.nack`).
    #[error("RabbitMQ nacked the message")]
    Nacked,
    /// No queue is bound for the routing key (`mandatory` message returned).
    #[error("unroutable: no queue is bound for topic {topic:?} ({reason})")]
    Unroutable {
        /// The event's topic.
        topic: String,
        /// The broker's reply text, e.g. `NO_ROUTE`.
        reason: String,
    },
    /// No confirm arrived within the confirm timeout.
    #[error("no confirm from RabbitMQ within the confirm timeout")]
    ConfirmTimeout,
    /// The broker blocked publishers (memory or disk alarm) for the whole confirm
    /// timeout; the event was not sent.
    #[error(
        "RabbitMQ is blocking publishers (resource alarm); not sent within the confirm timeout"
    )]
    Blocked,
    /// The channel failed (the broker closed it, or it was unusable) while the
    /// message was in flight; the outcome is unknown, so a retry with the same id may
    /// duplicate. The connection and its other channels may be fine.
    #[error("AMQP channel failed: {0}")]
    Channel(String),
    /// The connection failed under the message (socket error, missed heartbeats, closed
    /// by the broker): every channel on it is gone, though lapin may show some still
    /// open for a moment. Outcome unknown, as for `Channel`.
    #[error("AMQP connection failed: {0}")]
    Connection(String),
    /// The event's properties would not fit in one AMQP frame of the size negotiated
    /// with this broker; sending it would make the broker close the whole connection.
    #[error(
        "event metadata of {size} bytes does not fit the broker's frame size ({frame_max} bytes)"
    )]
    HeadersTooLarge {
        /// Position of the event in its batch.
        index: usize,
        /// Estimated encoded size of the event's properties.
        size: usize,
        /// Negotiated `frame_max`.
        frame_max: usize,
    },
    /// The service is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl PublishError {
    /// In flight when its channel or connection failed: the outcome is unknown, and
    /// `--retry-unconfirmed` publishes it again.
    pub fn lost(&self) -> bool {
        matches!(self, Self::Channel(_) | Self::Connection(_))
    }
}

/// Broker connection state, for health, readiness and fast failure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BrokerState {
    /// A connection with open confirm channels is in place.
    pub connected: bool,
    /// The broker sent `connection.blocked` (memory or disk alarm).
    pub blocked: bool,
    /// Events are outstanding and the broker has answered none for `--stall-after`
    /// (see `publisher::stall`).
    pub stalled: bool,
    /// Not connected, but only just: a live connection was lost and the first round
    /// of reconnects over the `--amqp-url` nodes is under way (with
    /// `--retry-unconfirmed` only). A cluster node's death looks like this for the
    /// backoff plus one connect; unary calls then wait for the next connection, within
    /// their deadline, as the events in flight do, instead of failing. Ends when that
    /// round connects or fails.
    pub failing_over: bool,
}

/// What became of one batch.
#[derive(Debug)]
pub struct BatchOutcome {
    /// Events in the batch.
    pub events: usize,
    /// Leading events confirmed before the first failure (all of them if none failed).
    pub confirmed: usize,
    /// The first failure, if any.
    pub failure: Option<BatchFailure>,
}

/// The first event of a batch that was not confirmed, and how many were not.
#[derive(Debug)]
pub struct BatchFailure {
    /// Position of the first failed event in the batch.
    pub index: usize,
    /// Why it failed.
    pub error: PublishError,
    /// How many events of the batch failed in all.
    pub failed: usize,
}

/// One caller's ordered sequence of batches (see [`Publisher::lane`]).
#[derive(Debug)]
pub struct Lane {
    /// Which pool channel the lane's batches prefer.
    index: usize,
    /// Resolves once the lane's latest batch has queued its frames with lapin, or gave
    /// up; the next batch waits for it. `None` before the first batch.
    previous: Option<oneshot::Receiver<()>>,
}

/// A cheap handle to the publisher; clones share one connection.
#[derive(Clone, Debug)]
pub struct Publisher {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: PublisherSettings,
    /// Exchange name, converted once.
    exchange: ShortString,
    /// The open channels; `None` while disconnected. Read per batch, written on
    /// (re)connect, so a plain `RwLock` around an `Arc` costs one uncontended read.
    pool: RwLock<Option<Arc<Pool>>>,
    /// Connection state for health and readiness; written by the supervisor, and by
    /// the stall watcher (`stalled` only).
    state: watch::Sender<BrokerState>,
    /// Woken when a publish saw a dead channel, so the supervisor replaces it.
    repair: Notify,
    /// Channels to replace although still open: a confirm timed out on them, and lapin
    /// keeps an abandoned confirm until the channel goes away.
    retired: Mutex<Vec<u16>>,
    /// Round-robin cursor over channels.
    next: AtomicUsize,
    /// Tells the supervisor to close the connection and stop.
    stop: CancellationToken,
    /// Confirm latency and outcomes, counted where they are settled (so also for
    /// callers that went away).
    metrics: Metrics,
    /// Why the broker is not connected (the supervisor writes it).
    last_error: LastError,
    /// Events outstanding and the broker's last answer, for stall detection.
    progress: stall::Progress,
    /// The node (`host:port`) of the connection in use; `None` while disconnected.
    node: LastError,
    /// Connections made so far: numbers each one, for [`ChannelKey`].
    connections: AtomicU64,
    /// Counts every new pool (a connection, or a channel replaced), so a batch waiting
    /// for another channel than the ones that failed it wakes when one appears.
    pools: watch::Sender<u64>,
}

/// One channel of one connection: lapin numbers channels per connection, so the id
/// alone repeats after a reconnect.
type ChannelKey = (u64, u16);

/// Channels a batch must not publish on again: each channel that failed it, and
/// every channel of a connection that failed under it. lapin fails the events of a
/// dead socket before it marks the connection's channels closed, so for a moment the
/// others still look open; publishing on them would only fail again.
#[derive(Debug, Default)]
struct Avoid {
    channels: Vec<ChannelKey>,
    connections: Vec<u64>,
}

impl Avoid {
    fn contains(&self, key: ChannelKey) -> bool {
        self.channels.contains(&key) || self.connections.contains(&key.0)
    }

    /// The channel `key` failed the batch; with `connection`, its whole connection did.
    fn add(&mut self, key: ChannelKey, connection: bool) {
        self.channels.push(key);
        if connection {
            self.connections.push(key.0);
        }
    }
}

#[derive(Debug)]
struct Pool {
    channels: Vec<Channel>,
    /// Which connection the channels belong to (see [`Shared::connections`]).
    connection: u64,
    /// That connection's state as lapin sees it: once it is not connected, none of
    /// its channels is used, even one lapin has not marked closed yet.
    status: lapin::ConnectionStatus,
    /// Largest frame the broker accepts (0: no limit); the content header frame, with
    /// every property and header, must fit in one.
    frame_max: usize,
}

/// Room kept in the header frame for the fixed fields and the encoding of the table.
const HEADER_FRAME_OVERHEAD: usize = 512;
/// Encoding overhead per header entry: key length, value type, value length.
const HEADER_ENTRY_OVERHEAD: usize = 6;

fn header_frame_size(event: &ValidEvent) -> usize {
    event.metadata_size() + event.attributes().len() * HEADER_ENTRY_OVERHEAD + HEADER_FRAME_OVERHEAD
}

impl Publisher {
    /// Starts the connection supervisor in the background and returns at once: a
    /// broker that is down at start must not stop the service from serving.
    /// `state` is where the broker state is published (health, readiness and metrics
    /// hold its receivers).
    pub fn start(
        settings: PublisherSettings,
        state: watch::Sender<BrokerState>,
        metrics: Metrics,
    ) -> Result<(Self, JoinHandle<()>), PublishError> {
        let exchange = ShortString::try_new(settings.exchange.clone())
            .map_err(|err| PublishError::Channel(err.to_string()))?;
        let shared = Arc::new(Shared {
            settings,
            exchange,
            pool: RwLock::new(None),
            state,
            repair: Notify::new(),
            retired: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            stop: CancellationToken::new(),
            metrics,
            last_error: LastError::default(),
            progress: stall::Progress::new(),
            node: LastError::default(),
            connections: AtomicU64::new(0),
            pools: watch::Sender::new(0),
        });
        let watched = Arc::clone(&shared);
        tokio::spawn(async move { stall::watch(&watched).await });
        let task = tokio::spawn(supervisor::run(Arc::clone(&shared)));
        Ok((Self { shared }, task))
    }

    /// The broker's pace: answers (confirms, nacks, returns) per second, smoothed over
    /// about a second.
    pub fn confirm_rate(&self) -> f64 {
        self.shared.progress.rate()
    }

    /// Time until the next connection attempt while disconnected, if scheduled.
    pub fn until_reconnect(&self) -> Option<Duration> {
        self.shared.progress.until_reconnect()
    }

    /// Why the broker counts as stalled, in words, for callers and readiness.
    pub fn stall_reason(&self) -> String {
        stall::reason(self.shared.settings.stall_after)
    }

    /// Longest wait from publish to confirm (`--confirm-timeout`).
    pub fn confirm_timeout(&self) -> Duration {
        self.shared.settings.confirm_timeout
    }

    /// Current broker state.
    pub fn state(&self) -> BrokerState {
        *self.shared.state.borrow()
    }

    /// Follows the broker state.
    pub fn watch_state(&self) -> watch::Receiver<BrokerState> {
        self.shared.state.subscribe()
    }

    /// Why the broker is not connected: the last connection failure, e.g. an
    /// authentication refusal, for readiness and for callers refused meanwhile.
    pub fn last_error(&self) -> LastError {
        self.shared.last_error.clone()
    }

    /// The node (`host:port`) the connection in use goes to; `None` while disconnected.
    /// With several URLs (a cluster) it changes on failover.
    pub fn node(&self) -> LastError {
        self.shared.node.clone()
    }

    /// A lane for a caller whose batches must reach the broker in the order it
    /// publishes them, e.g. a stream: they all go to one channel, each after the one
    /// before it.
    pub fn lane(&self) -> Lane {
        Lane {
            index: self.shared.next.fetch_add(1, Ordering::Relaxed),
            previous: None,
        }
    }

    /// Publishes `events` in order on one channel and settles each of them; the
    /// returned [`Pending`] resolves to the outcome. The work runs in its own task
    /// holding `permit`, bounded by admission: dropping `Pending` (a cancelled caller)
    /// does not cancel the publish, it only stops listening.
    ///
    /// Order: the work is polled once here, on the caller's task, before it is spawned.
    /// That first poll hands every frame of the batch to lapin's queue for the channel
    /// (`basic_publish` queues its frames before its first await), so batches a caller
    /// publishes one after another reach the channel in that order whatever the runtime
    /// does with the tasks; only the confirms are awaited concurrently. A batch that
    /// cannot send at once (the broker blocks publishers) waits in its task, and the
    /// later batches of its `lane` wait behind it.
    ///
    /// Tracing: a producer span per batch, a child of the caller's current span; its
    /// context (or, with tracing off, the caller's `incoming` context) goes into every
    /// message's headers.
    pub fn publish(
        &self,
        events: Vec<ValidEvent>,
        permit: Permit,
        lane: Option<&mut Lane>,
        incoming: &trace::Incoming,
    ) -> Result<Pending, PublishError> {
        if self.shared.stop.is_cancelled() {
            return Err(PublishError::ShuttingDown);
        }
        let lane_index = lane.as_ref().map(|l| l.index);
        // No live channel right now although the caller saw the broker connected: the
        // connection is being lost under us (a failover). With --retry-unconfirmed the
        // batch waits for the next connection within its confirm deadline, as a batch
        // in flight would; without, it fails at once.
        let channel = match self.shared.channel(lane_index, &Avoid::default()) {
            Ok((channel, frame_max, key)) => {
                too_large(&events, frame_max)?;
                Some((channel, key))
            }
            Err(PublishError::Disconnected) if self.shared.settings.retry_unconfirmed => None,
            Err(error) => return Err(error),
        };
        let shared = Arc::clone(&self.shared);
        let (tx, rx) = oneshot::channel();
        let deadline = Instant::now() + shared.settings.confirm_timeout;
        let producer = producer_span(&shared.settings.exchange, &events);
        let headers = trace::outgoing_headers(&producer, incoming);
        // The lane's previous batch, and the signal this one gives its successor once
        // its frames are queued (or it gave up).
        let (previous, sent) = match lane {
            Some(lane) => {
                let (sent, next) = oneshot::channel();
                (lane.previous.replace(next), Some(sent))
            }
            None => (None, None),
        };
        let work = async move {
            if let Some(previous) = previous {
                // Sent or gave up: either way this batch goes next.
                let _ = previous.await;
            }
            let channel = match channel {
                Some(channel) => Ok(channel),
                None => {
                    match next_channel(&shared, lane_index, deadline, &Avoid::default()).await {
                        Some((channel, frame_max, key)) => {
                            too_large(&events, frame_max).map(|()| (channel, key))
                        }
                        None => Err(PublishError::Disconnected),
                    }
                }
            };
            let outcome = match channel {
                Ok((channel, key)) => {
                    let batch = Batch {
                        channel: &channel,
                        key,
                        lane: lane_index,
                        events: &events,
                        headers: &headers,
                        deadline,
                    };
                    publish_batch(&shared, batch, sent).await
                }
                Err(error) => {
                    shared.metrics.rejected(reason(&error), events.len());
                    BatchOutcome {
                        events: events.len(),
                        confirmed: 0,
                        failure: Some(BatchFailure {
                            index: 0,
                            error,
                            failed: events.len(),
                        }),
                    }
                }
            };
            // Settled: give the room back before answering, so a caller that retries
            // at once finds it free.
            drop(permit);
            let _ = tx.send(outcome);
        };
        let mut work = Box::pin(work.instrument(producer));
        // The first poll, here on the caller's task, queues the batch's frames (see
        // above); the task it is then spawned in polls it with a real waker.
        let mut first_poll = Context::from_waker(Waker::noop());
        if work.as_mut().poll(&mut first_poll).is_pending() {
            tokio::spawn(work);
        }
        Ok(Pending(rx))
    }

    /// Closes the connection cleanly and stops reconnecting. In-flight batches fail
    /// with a channel error; callers drain them first.
    pub fn close(&self) {
        self.shared.stop.cancel();
    }
}

impl Shared {
    /// The channel for `lane` (or the next one round-robin), the frame size and the
    /// channel's key; never one of `avoid` (channels that already failed the caller,
    /// which lapin may still show open for a moment after their connection died).
    fn channel(
        &self,
        lane: Option<usize>,
        avoid: &Avoid,
    ) -> Result<(Channel, usize, ChannelKey), PublishError> {
        let pool = self
            .pool
            .read()
            .map_err(|_| PublishError::Disconnected)?
            .clone()
            .ok_or(PublishError::Disconnected)?;
        if !pool.status.connected() {
            // Lost under us; the supervisor is about to notice and replace it.
            return Err(PublishError::Disconnected);
        }
        let n = pool.channels.len();
        let start = lane.unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed));
        // Prefer the chosen channel; skip over one the broker closed until it is replaced.
        for i in 0..n {
            let channel = &pool.channels[(start + i) % n];
            let key = (pool.connection, channel.id());
            if avoid.contains(key) {
                continue;
            }
            if channel.status().connected() {
                return Ok((channel.clone(), pool.frame_max, key));
            }
            self.repair.notify_one();
        }
        Err(PublishError::Disconnected)
    }
}

/// The producer span of one batch, after the OpenTelemetry messaging conventions. At
/// DEBUG: with tracing off it is disabled at its call site and costs nothing.
fn producer_span(exchange: &str, events: &[ValidEvent]) -> tracing::Span {
    let span = tracing::debug_span!(
        "publish",
        otel.name = %format_args!("publish {exchange}"),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "publish",
        messaging.operation.name = "publish",
        messaging.destination.name = exchange,
        messaging.batch.message_count = events.len(),
        messaging.message.id = tracing::field::Empty,
        messaging.message.body.size = tracing::field::Empty,
        messaging.rabbitmq.destination.routing_key = tracing::field::Empty,
    );
    if let [event] = events
        && !span.is_disabled()
    {
        span.record("messaging.message.id", event.id());
        span.record("messaging.message.body.size", event.payload().len());
        span.record("messaging.rabbitmq.destination.routing_key", event.topic());
    }
    span
}

/// How many times lost events are published again, at most, before they fail.
const REPUBLISH_ROUNDS: usize = 3;

/// One batch on its way: where it goes and until when.
struct Batch<'a> {
    channel: &'a Channel,
    /// Which channel that is, so a republish does not pick it again.
    key: ChannelKey,
    /// The lane's channel index, to publish again on the same lane after a reconnect.
    lane: Option<usize>,
    events: &'a [ValidEvent],
    headers: &'a [(&'static str, String)],
    deadline: Instant,
}

/// Publishes `events` (their indexes in the batch) on `channel`, pipelined, in order,
/// and returns each one's result once settled.
async fn publish_some(
    shared: &Shared,
    batch: &Batch<'_>,
    channel: &Channel,
    which: &[usize],
    sent: Option<oneshot::Sender<()>>,
) -> Vec<Result<(), PublishError>> {
    // `join_all` polls every publish once, in order, before awaiting any confirm:
    // the whole batch is pipelined on the channel, in order.
    shared.progress.sent(which.len());
    let mut publishes = pin!(futures::future::join_all(which.iter().map(
        |&i| async move {
            let started = Instant::now();
            let result = amqp::publish_one(
                channel,
                &shared.exchange,
                &batch.events[i],
                batch.headers,
                batch.deadline,
                shared.settings.accept_unroutable,
            )
            .await;
            if result.is_ok() {
                shared.metrics.confirm_latency(started.elapsed());
            }
            let answered = matches!(
                result,
                Ok(()) | Err(PublishError::Nacked | PublishError::Unroutable { .. })
            );
            shared.progress.settled(answered);
            result
        }
    )));
    match futures::poll!(publishes.as_mut()) {
        Poll::Ready(results) => results,
        Poll::Pending => {
            // Every frame of the batch is queued: the lane's next batch may go.
            drop(sent);
            publishes.await
        }
    }
}

/// `--retry-unconfirmed`: the events whose channel or connection failed while they
/// were in flight (outcome unknown) are published again, in their order, on a channel
/// of the next connection, with the same `message_id`, until they settle or their
/// confirm deadline passes. Counted in `ingest_events_republished_total`.
///
/// Order: within the batch it is kept; across batches of one stream it is not
/// guaranteed (each batch waits for the new connection on its own).
async fn republish_lost(
    shared: &Shared,
    batch: &Batch<'_>,
    results: &mut [Result<(), PublishError>],
) {
    // Never the same channel again: the one that failed may still look open.
    let mut failed = Avoid::default();
    let mut key = batch.key;
    // A channel the broker closes for a reason of the message's own (say the exchange
    // was deleted) would fail every attempt: a few rounds, not a spin until the deadline.
    for _ in 0..REPUBLISH_ROUNDS {
        let lost: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.as_ref().is_err_and(PublishError::lost))
            .map(|(i, _)| i)
            .collect();
        if lost.is_empty() || shared.stop.is_cancelled() {
            return;
        }
        let connection_lost = lost
            .iter()
            .any(|&i| matches!(results[i], Err(PublishError::Connection(_))));
        failed.add(key, connection_lost);
        let Some((channel, _, next)) =
            next_channel(shared, batch.lane, batch.deadline, &failed).await
        else {
            return;
        };
        shared.metrics.republished(lost.len());
        tracing::debug!(
            events = lost.len(),
            failed = ?key,
            connection_lost,
            next = ?next,
            "publishing unconfirmed events again after a lost channel"
        );
        key = next;
        let again = publish_some(shared, batch, &channel, &lost, None).await;
        for (i, result) in lost.into_iter().zip(again) {
            results[i] = result;
        }
    }
}

/// Refuses events whose properties would not fit one frame of `frame_max` bytes (0:
/// no limit): the broker would close the whole connection over them.
fn too_large(events: &[ValidEvent], frame_max: usize) -> Result<(), PublishError> {
    match events
        .iter()
        .map(header_frame_size)
        .enumerate()
        .find(|&(_, size)| frame_max > 0 && size > frame_max)
    {
        Some((index, size)) => Err(PublishError::HeadersTooLarge {
            index,
            size,
            frame_max,
        }),
        None => Ok(()),
    }
}

/// A live channel for `lane` (and the frame size) once the broker is connected again,
/// or `None` when the deadline passes (or the service stops) first.
async fn next_channel(
    shared: &Shared,
    lane: Option<usize>,
    deadline: Instant,
    avoid: &Avoid,
) -> Option<(Channel, usize, ChannelKey)> {
    let mut state = shared.state.subscribe();
    let mut pools = shared.pools.subscribe();
    loop {
        if shared.stop.is_cancelled() {
            return None;
        }
        pools.borrow_and_update();
        let connected = state.borrow_and_update().connected;
        if connected && let Ok(found) = shared.channel(lane, avoid) {
            return Some(found);
        }
        // A new connection, or a replaced channel on this one.
        let changed = async {
            tokio::select! {
                changed = state.changed() => changed.is_ok(),
                changed = pools.changed() => changed.is_ok(),
            }
        };
        match tokio::time::timeout_at(deadline, changed).await {
            Ok(true) => {}
            _ => return None,
        }
    }
}

async fn publish_batch(
    shared: &Shared,
    batch: Batch<'_>,
    sent: Option<oneshot::Sender<()>>,
) -> BatchOutcome {
    let Batch {
        channel,
        events,
        deadline,
        ..
    } = batch;
    if shared.state.borrow().blocked && !wait_unblocked(shared, deadline).await {
        return BatchOutcome {
            events: events.len(),
            confirmed: 0,
            failure: Some(BatchFailure {
                index: 0,
                error: PublishError::Blocked,
                failed: events.len(),
            }),
        };
    }
    let all: Vec<usize> = (0..events.len()).collect();
    let mut results = publish_some(shared, &batch, channel, &all, sent).await;
    if shared.settings.retry_unconfirmed {
        if results
            .iter()
            .any(|r| r.as_ref().is_err_and(PublishError::lost))
        {
            // The dead channel goes before the new connection is waited for.
            shared.repair.notify_one();
        }
        republish_lost(shared, &batch, &mut results).await;
    }
    let mut outcome = BatchOutcome {
        events: events.len(),
        confirmed: 0,
        failure: None,
    };
    // Counted once per batch and outcome, not once per event.
    let mut confirmed = 0;
    let mut rejected = [0; Reason::ALL.len()];
    for (index, result) in results.into_iter().enumerate() {
        match &result {
            Ok(()) => confirmed += 1,
            Err(error) => rejected[reason(error) as usize] += 1,
        }
        match (result, &mut outcome.failure) {
            (Ok(()), None) => outcome.confirmed += 1,
            (Ok(()), Some(_)) => {}
            (Err(error), None) => {
                match &error {
                    lost if lost.lost() => shared.repair.notify_one(),
                    PublishError::ConfirmTimeout => shared.retire(channel),
                    // After a quorum queue's leader died with the node, a channel
                    // opened in the failover was seen to nack every publish for as
                    // long as it lived, while newer channels were acked: a channel
                    // that nacks is replaced (the nack itself still fails the event).
                    PublishError::Nacked => shared.retire(channel),
                    _ => {}
                }
                outcome.failure = Some(BatchFailure {
                    index,
                    error,
                    failed: 1,
                });
            }
            (Err(_), Some(failure)) => failure.failed += 1,
        }
    }
    shared.metrics.confirmed(confirmed);
    for (reason, events) in Reason::ALL.into_iter().zip(rejected) {
        shared.metrics.rejected(reason, events);
    }
    outcome
}

/// The `reason` label of a failed event.
pub fn reason(error: &PublishError) -> Reason {
    match error {
        PublishError::Unroutable { .. } => Reason::Unroutable,
        PublishError::Nacked => Reason::Nacked,
        PublishError::ConfirmTimeout | PublishError::Blocked => Reason::Timeout,
        PublishError::HeadersTooLarge { .. } => Reason::Invalid,
        PublishError::Disconnected
        | PublishError::Channel(_)
        | PublishError::Connection(_)
        | PublishError::ShuttingDown => Reason::Unavailable,
    }
}

/// While the broker blocks publishers, lapin accepts frames and holds them (and their
/// memory) until the alarm clears. A batch waits here instead, holding its permit, so
/// admission fills and callers are pushed back. False if the deadline passed first.
async fn wait_unblocked(shared: &Shared, deadline: Instant) -> bool {
    let mut state = shared.state.subscribe();
    matches!(
        tokio::time::timeout_at(deadline, state.wait_for(|s| !s.blocked)).await,
        Ok(Ok(_))
    )
}

impl Shared {
    /// Marks `channel` for replacement and wakes the supervisor.
    fn retire(&self, channel: &Channel) {
        if let Ok(mut retired) = self.retired.lock()
            && !retired.contains(&channel.id())
        {
            retired.push(channel.id());
        }
        self.repair.notify_one();
    }
}

/// The answer to one [`Publisher::publish`].
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<BatchOutcome>);

impl Future for Pending {
    type Output = BatchOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BatchOutcome> {
        Pin::new(&mut self.0).poll(cx).map(|result| {
            // The task only ends without an answer if the runtime is shutting down.
            result.unwrap_or(BatchOutcome {
                events: 0,
                confirmed: 0,
                failure: Some(BatchFailure {
                    index: 0,
                    error: PublishError::ShuttingDown,
                    failed: 0,
                }),
            })
        })
    }
}
