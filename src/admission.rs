//! Admission: the one place that bounds how much the service holds in memory.
//!
//! Two budgets are shared by every caller: events admitted and not yet settled by the
//! broker, and the bytes those events hold. A [`Permit`] owns its share of both and
//! gives it back when dropped, so the bound is structural: whoever holds a permit holds
//! the right to the memory, and no counter can drift because a release was forgotten on
//! some error path or cancelled future.
//!
//! Unary calls use [`Admission::try_admit`], which never waits. Streams use
//! [`Admission::admit_stream`], which waits in line; that wait is the backpressure.
//!
//! Fairness. Waiters are queued first-in first-out by the semaphores, so streams are
//! served in arrival order and a stream re-queues behind the others for every message:
//! no stream can starve another. Streams and unary calls compete differently, though:
//! room released while streams wait goes to the waiting streams first, so under
//! sustained stream pressure a unary call would never find any. Streams therefore draw
//! from a share of the buffer ([`STREAM_SHARE_PERCENT`]); the rest is only ever taken by
//! unary calls, which always find room there unless they filled it themselves.
//!
//! Tenants. With a tenants file, each tenant has a [`TenantQuota`]: its own bound on
//! events and bytes in flight (its share of the buffer) and an optional rate. A
//! tenant's permit is taken from its own bound *first* and from the shared ones after,
//! so a tenant at its quota waits (streams) or is refused (unary) on its own
//! semaphores, holding nothing of the shared buffer: the others keep finding room.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError},
    time::Instant,
};

/// The part of the buffer streams may hold together; the rest is kept for unary calls.
pub const STREAM_SHARE_PERCENT: usize = 75;

/// Process memory an admitted event costs beyond its payload and strings, charged
/// with each event so that `--buffer-bytes` bounds what the process really holds:
/// the decoded event, its publish future and confirm, lapin's properties and frame
/// headers, and allocator rounding. Measured with `ingest-bench --scenarios abuse`
/// (release build): 10,000 in-flight 1 KiB events grew RSS by 4,691 bytes each, of
/// which 2,048 are the payload twice; this charges 3,072 on top, with some margin.
pub const EVENT_OVERHEAD: usize = 3072;

/// Memory one attribute costs beyond its key and value bytes: the decoded map entry
/// and its AMQP header table entry.
pub const ATTRIBUTE_OVERHEAD: usize = 128;

/// Bytes of an id the service generates (a hyphenated UUID), which the request did
/// not carry.
pub const GENERATED_ID_BYTES: usize = 36;

/// What an admitted event is charged: its payload twice (the event's copy and the
/// AMQP body frame lapin copies it into, held until written to the socket), every
/// other string once, and the fixed overheads.
pub fn event_cost(payload: usize, strings: usize, attributes: usize) -> usize {
    payload
        .saturating_mul(2)
        .saturating_add(strings)
        .saturating_add(EVENT_OVERHEAD)
        .saturating_add(attributes.saturating_mul(ATTRIBUTE_OVERHEAD))
}

/// The most a request message of `len` bytes holding `events` events with
/// `attributes` attributes in all can cost once admitted: every one of its bytes a
/// payload byte, and an id generated for every event. Admitting a message for this
/// before it is decoded means it never needs more room afterwards.
pub fn message_bound(len: usize, events: usize, attributes: usize) -> usize {
    event_cost(len, 0, 0)
        .saturating_sub(EVENT_OVERHEAD)
        .saturating_add(events.saturating_mul(EVENT_OVERHEAD + GENERATED_ID_BYTES))
        .saturating_add(attributes.saturating_mul(ATTRIBUTE_OVERHEAD))
}

/// [`message_bound`] for a caller of `tenant`: each event will also carry the
/// tenant header the service stamps on it (its key, the name, one attribute's
/// overhead), which the request's bytes do not show.
pub fn stamped_bound(len: usize, events: usize, attributes: usize, tenant: Option<&str>) -> usize {
    let stamp = tenant.map_or(0, |name| {
        crate::auth::TENANT_HEADER
            .len()
            .saturating_add(name.len())
            .saturating_add(ATTRIBUTE_OVERHEAD)
    });
    message_bound(len, events, attributes).saturating_add(events.saturating_mul(stamp))
}

/// The most one read from a request body takes off the connection at once: one
/// HTTP/2 DATA frame at the default `SETTINGS_MAX_FRAME_SIZE`, which the server keeps.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// The part of `--buffer-bytes` kept for the chunk a request body is being read in
/// ([`ChunkPermit`]): a chunk may hold bytes of a message not reserved yet (its
/// prefix, or the start of the next message), so every read is paid for first. At
/// least one chunk.
pub const CHUNK_SHARE_PERCENT: usize = 6;

/// The part of `--buffer-bytes` kept for request messages while they are received and
/// decoded ([`Reservation`]); admitted events hold the rest.
///
/// Three pools, always taken in one order: a chunk to read in, then a message's
/// reservation, then its events' admission. A request body waits for a pool only
/// while holding room of the pools before it, and admitted room is freed by confirms
/// alone, so no set of waiting bodies can hold what each other waits for: the budget
/// cannot deadlock, whatever callers send.
pub const RECEIVE_SHARE_PERCENT: usize = 25;

/// Why a request could not be admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmitError {
    /// Not enough room right now; retrying later can succeed.
    #[error(
        "buffer full: {events} events / {bytes} bytes requested, {free_events} events / {free_bytes} bytes free"
    )]
    Exhausted {
        /// Events requested.
        events: usize,
        /// Bytes requested.
        bytes: usize,
        /// Events free at the time of the attempt.
        free_events: usize,
        /// Bytes free at the time of the attempt.
        free_bytes: usize,
    },
    /// Larger than the whole buffer (or the streams' share of it): it can never be
    /// admitted, however long one waits.
    #[error("{what} of {requested} is more than the whole buffer holds ({capacity})")]
    TooLarge {
        /// `"events"` or `"bytes"`.
        what: &'static str,
        /// Requested amount.
        requested: usize,
        /// The configured capacity.
        capacity: usize,
    },
    /// The service is shutting down and admits nothing more.
    #[error("admission closed: shutting down")]
    Closed,
    /// The caller's tenant has this much in flight, or sends faster than its rate.
    #[error("tenant {tenant:?} is over its quota: {why}")]
    Quota {
        /// The tenant's name.
        tenant: Arc<str>,
        /// Which quota and by how much.
        why: String,
        /// When trying again can succeed, if known (the rate's refill).
        retry_after: Option<Duration>,
    },
}

/// Events and bytes, as a snapshot of usage or capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Usage {
    /// Events.
    pub events: usize,
    /// Bytes.
    pub bytes: usize,
}

/// The shared bound on events and bytes in flight.
#[derive(Debug)]
pub struct Admission {
    /// One permit per event admitted and not yet settled.
    events: Arc<Semaphore>,
    /// One permit per byte held by admitted events.
    bytes: Arc<Semaphore>,
    /// The streams' share of `events`: a stream's permit holds one of these per event too.
    stream_events: Arc<Semaphore>,
    /// The streams' share of `bytes`.
    stream_bytes: Arc<Semaphore>,
    /// Configured limits, for gauges and for telling "never fits" from "not now".
    capacity: Usage,
    /// The streams' share of `capacity`.
    stream_capacity: Usage,
    /// One permit per byte of request messages being received or decoded.
    receiving: Arc<Semaphore>,
    /// Capacity of `receiving`.
    receive_capacity: usize,
    /// [`CHUNK_BYTES`] per request body that is reading.
    chunks: Arc<Semaphore>,
    /// Capacity of `chunks`.
    chunk_capacity: usize,
}

impl Admission {
    /// Creates the bound. Capacities are clamped to what a semaphore can count.
    /// `bytes` is split: [`RECEIVE_SHARE_PERCENT`] for messages being received, the
    /// rest for admitted events.
    pub fn new(events: usize, bytes: usize) -> Self {
        let receive = receive_share(bytes);
        let chunks = chunk_share(bytes);
        let admitted = bytes.saturating_sub(receive + chunks).max(1);
        Self::with_pools(events, admitted, receive).with_chunks(chunks)
    }

    /// Sets the chunk pool's capacity (at least one chunk).
    pub fn with_chunks(mut self, bytes: usize) -> Self {
        self.chunk_capacity = bytes.clamp(CHUNK_BYTES, Semaphore::MAX_PERMITS);
        self.chunks = Arc::new(Semaphore::new(self.chunk_capacity));
        self
    }

    /// Room to read one chunk of a request body, or a refusal at once (unary calls).
    pub fn chunk_now(&self) -> Result<ChunkPermit, AdmitError> {
        match Arc::clone(&self.chunks).try_acquire_many_owned(CHUNK_BYTES as u32) {
            Ok(permit) => Ok(ChunkPermit { _room: permit }),
            Err(TryAcquireError::NoPermits) => Err(AdmitError::Exhausted {
                events: 0,
                bytes: CHUNK_BYTES,
                free_events: self.events.available_permits(),
                free_bytes: self.chunks.available_permits(),
            }),
            Err(TryAcquireError::Closed) => Err(AdmitError::Closed),
        }
    }

    /// Room to read one chunk of a request body, waiting in line (streams).
    pub async fn chunk(&self) -> Result<ChunkPermit, AdmitError> {
        Arc::clone(&self.chunks)
            .acquire_many_owned(CHUNK_BYTES as u32)
            .await
            .map(|permit| ChunkPermit { _room: permit })
            .map_err(|_| AdmitError::Closed)
    }

    /// Bytes of the chunk pool held by reading bodies, and its capacity.
    pub fn reading(&self) -> (usize, usize) {
        let free = self.chunks.available_permits().min(self.chunk_capacity);
        (self.chunk_capacity - free, self.chunk_capacity)
    }

    /// The bound with its pools given: `events` and `bytes` for admitted events,
    /// `receive` bytes for messages being received. Capacities are clamped to what a
    /// semaphore can count.
    pub fn with_pools(events: usize, bytes: usize, receive: usize) -> Self {
        let events = events.min(Semaphore::MAX_PERMITS);
        let bytes = bytes.min(Semaphore::MAX_PERMITS);
        let receive_capacity = receive.min(Semaphore::MAX_PERMITS);
        let share = |n: usize| percent(n, STREAM_SHARE_PERCENT);
        let stream_capacity = Usage {
            events: share(events),
            bytes: share(bytes),
        };
        Self {
            events: Arc::new(Semaphore::new(events)),
            bytes: Arc::new(Semaphore::new(bytes)),
            stream_events: Arc::new(Semaphore::new(stream_capacity.events)),
            stream_bytes: Arc::new(Semaphore::new(stream_capacity.bytes)),
            capacity: Usage { events, bytes },
            stream_capacity,
            receiving: Arc::new(Semaphore::new(receive_capacity)),
            receive_capacity,
            chunks: Arc::new(Semaphore::new(CHUNK_BYTES)),
            chunk_capacity: CHUNK_BYTES,
        }
    }

    /// Reserves `bytes` for a request message about to be received, or refuses at
    /// once (unary calls).
    pub fn reserve_now(&self, bytes: usize) -> Result<Reservation, AdmitError> {
        let n = self.receivable(bytes)?;
        match Arc::clone(&self.receiving).try_acquire_many_owned(n) {
            Ok(permit) => Ok(Reservation { bytes: permit }),
            Err(TryAcquireError::NoPermits) => Err(AdmitError::Exhausted {
                events: 0,
                bytes,
                free_events: self.events.available_permits(),
                free_bytes: self.receiving.available_permits(),
            }),
            Err(TryAcquireError::Closed) => Err(AdmitError::Closed),
        }
    }

    /// Reserves `bytes` for a request message about to be received, waiting in line
    /// (streams). Cancel-safe: a dropped future holds nothing.
    pub async fn reserve(&self, bytes: usize) -> Result<Reservation, AdmitError> {
        let n = self.receivable(bytes)?;
        Arc::clone(&self.receiving)
            .acquire_many_owned(n)
            .await
            .map(|permit| Reservation { bytes: permit })
            .map_err(|_| AdmitError::Closed)
    }

    fn receivable(&self, bytes: usize) -> Result<u32, AdmitError> {
        let too_large = || AdmitError::TooLarge {
            what: "request bytes",
            requested: bytes,
            capacity: self.receive_capacity,
        };
        if bytes > self.receive_capacity {
            return Err(too_large());
        }
        u32::try_from(bytes).map_err(|_| too_large())
    }

    /// Bytes reserved for messages being received, and the capacity for them.
    pub fn receiving(&self) -> (usize, usize) {
        let free = self
            .receiving
            .available_permits()
            .min(self.receive_capacity);
        (self.receive_capacity - free, self.receive_capacity)
    }

    /// A cheap look, without taking anything: `Exhausted` if a request of this size
    /// would fit the buffer but not the room free right now. Lets an overloaded service
    /// refuse before doing per-event work; racy by nature, so [`Admission::try_admit`]
    /// stays the real check.
    pub fn check_room(&self, events: usize, bytes: usize) -> Result<(), AdmitError> {
        let free_events = self.events.available_permits();
        let free_bytes = self.bytes.available_permits();
        let fits_ever = events <= self.capacity.events && bytes <= self.capacity.bytes;
        if fits_ever && (events > free_events || bytes > free_bytes) {
            return Err(AdmitError::Exhausted {
                events,
                bytes,
                free_events,
                free_bytes,
            });
        }
        Ok(())
    }

    /// Admits `events` events holding `bytes` bytes at once, or refuses at once.
    pub fn try_admit(&self, events: usize, bytes: usize) -> Result<Permit, AdmitError> {
        let (n_events, n_bytes) = check_fits(events, bytes, self.capacity)?;
        let exhausted = || AdmitError::Exhausted {
            events,
            bytes,
            free_events: self.events.available_permits(),
            free_bytes: self.bytes.available_permits(),
        };
        let share = try_both(&self.events, &self.bytes, n_events, n_bytes, exhausted)?;
        Ok(Permit {
            events: share.events,
            bytes: share.bytes,
            stream: None,
            tenant: None,
        })
    }

    /// [`Admission::try_admit`] for a tenant: its quota first (refused at once with
    /// [`AdmitError::Quota`]), then the shared buffer.
    pub fn try_admit_for(
        &self,
        quota: Option<&TenantQuota>,
        events: usize,
        bytes: usize,
    ) -> Result<Permit, AdmitError> {
        let Some(quota) = quota else {
            return self.try_admit(events, bytes);
        };
        let share = quota.try_take(events, bytes)?;
        let mut permit = self.try_admit(events, bytes)?;
        permit.tenant = Some(share);
        Ok(permit)
    }

    /// [`Admission::admit_stream`] for a tenant: waits for its rate and its quota
    /// first, then in line for the shared buffer. Cancel-safe like `admit_stream`.
    pub async fn admit_stream_for(
        &self,
        quota: Option<&TenantQuota>,
        events: usize,
        bytes: usize,
    ) -> Result<Permit, AdmitError> {
        let Some(quota) = quota else {
            return self.admit_stream(events, bytes).await;
        };
        let share = quota.take(events, bytes).await?;
        let mut permit = self.admit_stream(events, bytes).await?;
        permit.tenant = Some(share);
        Ok(permit)
    }

    /// Admits `events` events holding `bytes` bytes for a stream, waiting in line for
    /// room within the streams' share.
    ///
    /// Cancel-safe: dropping the future gives back whatever it had acquired. Every
    /// waiter acquires in the same order (share, then buffer; events, then bytes), so
    /// two waiters never hold what the other waits for in opposite order.
    pub async fn admit_stream(&self, events: usize, bytes: usize) -> Result<Permit, AdmitError> {
        let (n_events, n_bytes) = check_fits(events, bytes, self.stream_capacity)?;
        let acquire = |semaphore: &Arc<Semaphore>, n| Arc::clone(semaphore).acquire_many_owned(n);
        let closed = |_| AdmitError::Closed;
        let share_events = acquire(&self.stream_events, n_events)
            .await
            .map_err(closed)?;
        let share_bytes = acquire(&self.stream_bytes, n_bytes).await.map_err(closed)?;
        let events = acquire(&self.events, n_events).await.map_err(closed)?;
        let bytes = acquire(&self.bytes, n_bytes).await.map_err(closed)?;
        Ok(Permit {
            events,
            bytes,
            stream: Some(StreamShare {
                events: share_events,
                bytes: share_bytes,
            }),
            tenant: None,
        })
    }

    /// What is admitted and not yet released.
    pub fn in_use(&self) -> Usage {
        Usage {
            events: self.capacity.events
                - self.events.available_permits().min(self.capacity.events),
            bytes: self.capacity.bytes - self.bytes.available_permits().min(self.capacity.bytes),
        }
    }

    /// What stream permits hold of the streams' share ([`Admission::stream_capacity`]),
    /// admitted and not yet released. Every stream permit also counts in
    /// [`Admission::in_use`]; this is the share's own count, so that a share permit
    /// that is not given back shows even when the buffer's are.
    pub fn stream_in_use(&self) -> Usage {
        let held = |capacity: usize, semaphore: &Semaphore| {
            capacity - semaphore.available_permits().min(capacity)
        };
        Usage {
            events: held(self.stream_capacity.events, &self.stream_events),
            bytes: held(self.stream_capacity.bytes, &self.stream_bytes),
        }
    }

    /// The configured bound.
    pub fn capacity(&self) -> Usage {
        self.capacity
    }

    /// The part of the bound streams may hold.
    pub fn stream_capacity(&self) -> Usage {
        self.stream_capacity
    }

    /// Refuses every later admission; permits already held stay valid. Used on shutdown.
    pub fn close(&self) {
        for semaphore in [
            &self.events,
            &self.bytes,
            &self.stream_events,
            &self.stream_bytes,
            &self.receiving,
            &self.chunks,
        ] {
            semaphore.close();
        }
    }
}

/// The receive share of a byte budget: what [`Admission::new`] keeps for messages
/// being received, and so the largest request message that can ever be reserved.
pub fn receive_share(bytes: usize) -> usize {
    percent(bytes, RECEIVE_SHARE_PERCENT)
}

/// The largest request message a byte budget of `bytes` can take in: one that fits
/// its receive share while received and, once admitted for its bound (one event), the
/// streams' share of the admitted pool.
pub fn largest_message(bytes: usize) -> usize {
    let admitted = bytes
        .saturating_sub(receive_share(bytes) + chunk_share(bytes))
        .max(1);
    let stream_share = percent(admitted, STREAM_SHARE_PERCENT);
    let admissible = stream_share.saturating_sub(EVENT_OVERHEAD + GENERATED_ID_BYTES) / 2;
    receive_share(bytes).min(admissible)
}

/// The chunk share of a byte budget (at least one chunk).
pub fn chunk_share(bytes: usize) -> usize {
    percent(bytes, CHUNK_SHARE_PERCENT).max(CHUNK_BYTES)
}

/// `p` percent of `n`, at least 1, without overflow.
fn percent(n: usize, p: usize) -> usize {
    (n / 100 * p + n % 100 * p / 100).max(1)
}

/// Takes `n_events` and `n_bytes` at once, all or nothing; `full` says why not when
/// either lacks room (the events are given back before it is asked).
fn try_both(
    events: &Arc<Semaphore>,
    bytes: &Arc<Semaphore>,
    n_events: u32,
    n_bytes: u32,
    full: impl Fn() -> AdmitError,
) -> Result<StreamShare, AdmitError> {
    let take = |semaphore: &Arc<Semaphore>, n| match Arc::clone(semaphore).try_acquire_many_owned(n)
    {
        Ok(p) => Ok(p),
        Err(TryAcquireError::NoPermits) => Err(None),
        Err(TryAcquireError::Closed) => Err(Some(AdmitError::Closed)),
    };
    let events = take(events, n_events).map_err(|e| e.unwrap_or_else(&full))?;
    match take(bytes, n_bytes) {
        Ok(bytes) => Ok(StreamShare { events, bytes }),
        Err(e) => {
            drop(events);
            Err(e.unwrap_or_else(full))
        }
    }
}

fn check_fits(events: usize, bytes: usize, capacity: Usage) -> Result<(u32, u32), AdmitError> {
    let too_large = |what, requested, capacity| AdmitError::TooLarge {
        what,
        requested,
        capacity,
    };
    if events > capacity.events {
        return Err(too_large("events", events, capacity.events));
    }
    if bytes > capacity.bytes {
        return Err(too_large("bytes", bytes, capacity.bytes));
    }
    let n_events =
        u32::try_from(events).map_err(|_| too_large("events", events, u32::MAX as usize))?;
    let n_bytes = u32::try_from(bytes).map_err(|_| too_large("bytes", bytes, u32::MAX as usize))?;
    Ok((n_events, n_bytes))
}

/// One tenant's bound: events and bytes in flight, and optionally events per second.
/// Shared by every call of the tenant; kept across reloads of the tenants file while
/// the tenant's limits stay the same, so what is in flight keeps counting.
#[derive(Debug)]
pub struct TenantQuota {
    name: Arc<str>,
    events: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    capacity: Usage,
    rate: Option<Mutex<TokenBucket>>,
}

/// Events per second with a burst of one second's worth.
#[derive(Debug)]
struct TokenBucket {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        self.at = now;
    }

    /// Takes `n` tokens, or says how long until they are there.
    fn take(&mut self, n: usize) -> Result<(), Duration> {
        self.refill(Instant::now());
        // A request larger than the burst may go once the bucket is full.
        let n = (n as f64).min(self.per_second);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - self.tokens) / self.per_second))
        }
    }
}

impl TenantQuota {
    /// A tenant's bound: at most `events` and `bytes` in flight (clamped to what a
    /// semaphore counts), and `per_second` events per second if set.
    pub fn new(name: Arc<str>, events: usize, bytes: usize, per_second: Option<f64>) -> Self {
        let events = events.clamp(1, Semaphore::MAX_PERMITS);
        let bytes = bytes.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            name,
            events: Arc::new(Semaphore::new(events)),
            bytes: Arc::new(Semaphore::new(bytes)),
            capacity: Usage { events, bytes },
            rate: per_second.filter(|r| *r > 0.0).map(|per_second| {
                Mutex::new(TokenBucket {
                    per_second,
                    tokens: per_second,
                    at: Instant::now(),
                })
            }),
        }
    }

    /// The tenant's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Its bound.
    pub fn capacity(&self) -> Usage {
        self.capacity
    }

    /// Its events per second, if limited.
    pub fn per_second(&self) -> Option<f64> {
        self.rate.as_ref().map(|r| match r.lock() {
            Ok(bucket) => bucket.per_second,
            Err(poisoned) => poisoned.into_inner().per_second,
        })
    }

    /// What it holds now.
    pub fn in_use(&self) -> Usage {
        Usage {
            events: self.capacity.events
                - self.events.available_permits().min(self.capacity.events),
            bytes: self.capacity.bytes - self.bytes.available_permits().min(self.capacity.bytes),
        }
    }

    fn rate(&self, n: usize) -> Result<(), Duration> {
        match &self.rate {
            None => Ok(()),
            Some(bucket) => match bucket.lock() {
                Ok(mut bucket) => bucket.take(n),
                Err(poisoned) => poisoned.into_inner().take(n),
            },
        }
    }

    fn over(&self, why: String, retry_after: Option<Duration>) -> AdmitError {
        AdmitError::Quota {
            tenant: Arc::clone(&self.name),
            why,
            retry_after,
        }
    }

    fn check(&self, events: usize, bytes: usize) -> Result<(u32, u32), AdmitError> {
        check_fits(events, bytes, self.capacity).map_err(|e| match e {
            AdmitError::TooLarge {
                what,
                requested,
                capacity,
            } => self.over(
                format!("{requested} {what} in one request, more than its whole quota ({capacity} {what} in flight)"),
                None,
            ),
            other => other,
        })
    }

    /// Its room for a request at once, or [`AdmitError::Quota`].
    fn try_take(&self, events: usize, bytes: usize) -> Result<StreamShare, AdmitError> {
        let (n_events, n_bytes) = self.check(events, bytes)?;
        let full = || {
            let used = self.in_use();
            self.over(
                format!(
                    "{} of {} events and {} of {} bytes in flight (max_events_in_flight, max_bytes_in_flight)",
                    used.events, self.capacity.events, used.bytes, self.capacity.bytes
                ),
                None,
            )
        };
        let share = try_both(&self.events, &self.bytes, n_events, n_bytes, full)?;
        // The rate last: tokens are taken only by a request that is admitted.
        if let Err(wait) = self.rate(events) {
            return Err(self.over(
                format!(
                    "more than {} events per second (events_per_second)",
                    self.per_second().unwrap_or_default()
                ),
                Some(wait),
            ));
        }
        Ok(share)
    }

    /// Its room for a request, waiting for the rate and then in line for the room.
    async fn take(&self, events: usize, bytes: usize) -> Result<StreamShare, AdmitError> {
        let (n_events, n_bytes) = self.check(events, bytes)?;
        while let Err(wait) = self.rate(events) {
            tokio::time::sleep(wait).await;
        }
        let closed = |_| AdmitError::Closed;
        let events = Arc::clone(&self.events)
            .acquire_many_owned(n_events)
            .await
            .map_err(closed)?;
        let bytes = Arc::clone(&self.bytes)
            .acquire_many_owned(n_bytes)
            .await
            .map_err(closed)?;
        Ok(StreamShare { events, bytes })
    }
}

/// The right to hold some events and bytes. Dropping it gives them back, exactly once.
#[derive(Debug)]
#[must_use = "dropping a permit releases its room at once"]
pub struct Permit {
    events: OwnedSemaphorePermit,
    bytes: OwnedSemaphorePermit,
    /// The same amounts from the streams' share, for a stream's permit.
    stream: Option<StreamShare>,
    /// The same amounts from the caller's tenant quota, with a tenants file.
    tenant: Option<StreamShare>,
}

/// Room for one request message's bytes while it is received and decoded, from the
/// receive share of the byte budget; released on drop, once the message is admitted
/// (or refused).
#[derive(Debug)]
#[must_use = "dropping a reservation releases its room at once"]
pub struct Reservation {
    bytes: OwnedSemaphorePermit,
}

impl Reservation {
    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.bytes.num_permits()
    }
}

/// Room for one chunk of a request body while it is read, from the chunk share of
/// the byte budget: it covers whatever of the chunk is not yet reserved as part of a
/// message. Held from before a read until the body is between messages again.
#[derive(Debug)]
#[must_use = "dropping a chunk permit releases its room at once"]
pub struct ChunkPermit {
    _room: OwnedSemaphorePermit,
}

#[derive(Debug)]
struct StreamShare {
    events: OwnedSemaphorePermit,
    bytes: OwnedSemaphorePermit,
}

impl StreamShare {
    fn merge(&mut self, other: StreamShare) {
        self.events.merge(other.events);
        self.bytes.merge(other.bytes);
    }

    fn shrink(&mut self, events: usize, bytes: usize) {
        keep(&mut self.events, events);
        keep(&mut self.bytes, bytes);
    }
}

fn keep(permit: &mut OwnedSemaphorePermit, n: usize) {
    let extra = permit.num_permits().saturating_sub(n);
    drop(permit.split(extra));
}

fn merge_share(mine: &mut Option<StreamShare>, theirs: Option<StreamShare>) {
    match (mine.as_mut(), theirs) {
        (Some(mine), Some(theirs)) => mine.merge(theirs),
        (None, theirs) => *mine = theirs,
        (Some(_), None) => {}
    }
}

impl Permit {
    /// Adds `other`'s room to this permit; both are released together. Used by a
    /// stream that took room for one event before reading a message and the rest after.
    pub fn merge(&mut self, other: Permit) {
        self.events.merge(other.events);
        self.bytes.merge(other.bytes);
        merge_share(&mut self.stream, other.stream);
        merge_share(&mut self.tenant, other.tenant);
    }

    /// Gives back everything beyond `events` events and `bytes` bytes: a request
    /// admitted for its upper bound keeps what it turned out to need.
    pub fn shrink(&mut self, events: usize, bytes: usize) {
        keep(&mut self.events, events);
        keep(&mut self.bytes, bytes);
        for share in [&mut self.stream, &mut self.tenant].into_iter().flatten() {
            share.shrink(events, bytes);
        }
    }

    /// Moves `bytes` of this permit's bytes (no events) into a permit of their own,
    /// released separately: e.g. a `PublishAcked` request's ids, which its ack holds
    /// until it is written, after the events are settled. `None` if the permit holds
    /// fewer bytes.
    pub fn split_bytes(&mut self, bytes: usize) -> Option<Permit> {
        let fits = |p: &OwnedSemaphorePermit| p.num_permits() >= bytes;
        let share_fits = |s: &Option<StreamShare>| s.as_ref().is_none_or(|s| fits(&s.bytes));
        if !fits(&self.bytes) || !share_fits(&self.stream) || !share_fits(&self.tenant) {
            return None;
        }
        let split = |share: &mut Option<StreamShare>| match share {
            Some(share) => Some(StreamShare {
                events: share.events.split(0)?,
                bytes: share.bytes.split(bytes)?,
            }),
            None => None,
        };
        let stream = split(&mut self.stream);
        let tenant = split(&mut self.tenant);
        Some(Permit {
            events: self.events.split(0)?,
            bytes: self.bytes.split(bytes)?,
            stream,
            tenant,
        })
    }

    /// Events this permit holds.
    pub fn events(&self) -> usize {
        self.events.num_permits()
    }

    /// Bytes this permit holds.
    pub fn bytes(&self) -> usize {
        self.bytes.num_permits()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Asserts nothing is held: neither the buffer nor the streams' share of it.
    #[track_caller]
    fn assert_idle(a: &Admission) {
        assert_eq!(a.in_use(), Usage::default(), "the buffer is not idle");
        assert_eq!(
            a.stream_in_use(),
            Usage::default(),
            "the streams' share is not idle"
        );
    }

    #[test]
    fn permits_return_everything_on_drop() {
        let a = Admission::with_pools(10, 1000, 1000);
        let p1 = a.try_admit(3, 300).unwrap();
        let p2 = a.try_admit(7, 700).unwrap();
        assert_eq!(
            a.in_use(),
            Usage {
                events: 10,
                bytes: 1000
            }
        );
        assert_eq!((p1.events(), p1.bytes()), (3, 300));
        assert_eq!(a.stream_in_use(), Usage::default(), "unary takes no share");
        drop(p1);
        assert_eq!(
            a.in_use(),
            Usage {
                events: 7,
                bytes: 700
            }
        );
        drop(p2);
        assert_idle(&a);
    }

    #[test]
    fn all_or_nothing_when_full() {
        let a = Admission::with_pools(10, 1000, 1000);
        let _held = a.try_admit(5, 900).unwrap();
        // Events would fit, bytes would not: nothing may stay taken.
        let err = a.try_admit(2, 200).unwrap_err();
        assert!(
            matches!(
                err,
                AdmitError::Exhausted {
                    free_events: 5,
                    free_bytes: 100,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            a.in_use(),
            Usage {
                events: 5,
                bytes: 900
            }
        );
        // Bytes would fit, events would not.
        assert!(matches!(
            a.try_admit(6, 10),
            Err(AdmitError::Exhausted { .. })
        ));
        assert_eq!(
            a.in_use(),
            Usage {
                events: 5,
                bytes: 900
            }
        );
    }

    #[test]
    fn check_room_refuses_only_what_fits_but_not_now() {
        let a = Admission::with_pools(10, 1000, 1000);
        assert_eq!(a.check_room(10, 1000), Ok(()));
        let held = a.try_admit(8, 100).unwrap();
        assert!(matches!(
            a.check_room(3, 10),
            Err(AdmitError::Exhausted { free_events: 2, .. })
        ));
        assert_eq!(a.check_room(2, 900), Ok(()));
        // Never fits: left to the full check, which names the limit.
        assert_eq!(a.check_room(11, 1), Ok(()));
        assert_eq!(
            a.in_use(),
            Usage {
                events: 8,
                bytes: 100
            },
            "a look takes nothing"
        );
        drop(held);
    }

    #[test]
    fn larger_than_capacity_never_fits() {
        let a = Admission::with_pools(10, 1000, 1000);
        assert_eq!(
            a.try_admit(11, 1).unwrap_err(),
            AdmitError::TooLarge {
                what: "events",
                requested: 11,
                capacity: 10
            }
        );
        assert_eq!(
            a.try_admit(1, 1001).unwrap_err(),
            AdmitError::TooLarge {
                what: "bytes",
                requested: 1001,
                capacity: 1000
            }
        );
        assert_idle(&a);
    }

    #[test]
    fn closed_admission_refuses() {
        let a = Admission::with_pools(10, 1000, 1000);
        let held = a.try_admit(1, 1).unwrap();
        a.close();
        assert_eq!(a.try_admit(1, 1).unwrap_err(), AdmitError::Closed);
        drop(held);
        assert_idle(&a);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_get_room_when_released_and_cancel_gives_back() {
        let a = Arc::new(Admission::with_pools(4, 100, 1000));
        let held = a.try_admit(4, 50).unwrap();
        let waiter = {
            let a = Arc::clone(&a);
            tokio::spawn(
                async move { a.admit_stream(1, 10).await.map(|p| (p.events(), p.bytes())) },
            )
        };
        // A second waiter that gives up: whatever it acquired must come back.
        let cancelled =
            tokio::time::timeout(Duration::from_millis(20), a.admit_stream(2, 10)).await;
        assert!(cancelled.is_err());
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), (1, 10));
        assert_idle(&a);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_cannot_take_the_unary_share() {
        let a = Admission::with_pools(100, 1000, 1000);
        assert_eq!(
            a.stream_capacity(),
            Usage {
                events: 75,
                bytes: 750
            }
        );
        let streams = a.admit_stream(75, 100).await.unwrap();
        // The streams' share is full: another stream waits...
        assert!(
            tokio::time::timeout(Duration::from_millis(20), a.admit_stream(1, 1))
                .await
                .is_err()
        );
        // ...while a unary call still finds the rest.
        let unary = a.try_admit(25, 100).unwrap();
        assert_eq!(
            a.in_use(),
            Usage {
                events: 100,
                bytes: 200
            }
        );
        assert_eq!(
            a.stream_in_use(),
            Usage {
                events: 75,
                bytes: 100
            },
            "only the stream's permit holds share"
        );
        drop((streams, unary));
        assert_idle(&a);
        assert_eq!(
            a.admit_stream(76, 1).await.unwrap_err(),
            AdmitError::TooLarge {
                what: "events",
                requested: 76,
                capacity: 75
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn merged_permits_release_together() {
        let a = Admission::with_pools(10, 1000, 1000);
        let mut token = a.admit_stream(1, 1).await.unwrap();
        token.merge(a.admit_stream(4, 399).await.unwrap());
        assert_eq!((token.events(), token.bytes()), (5, 400));
        let held = Usage {
            events: 5,
            bytes: 400,
        };
        assert_eq!(a.in_use(), held);
        assert_eq!(
            a.stream_in_use(),
            held,
            "the merged permit holds both shares"
        );
        drop(token);
        assert_idle(&a);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_waiters_are_served_in_arrival_order() {
        let a = Arc::new(Admission::with_pools(4, 1000, 1000));
        let held = a.admit_stream(3, 10).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (a, tx) = (Arc::clone(&a), tx.clone());
            waiters.push(tokio::spawn(async move {
                // The whole share: one waiter at a time, so the order is observable
                // on a multi-threaded runtime.
                let p = a.admit_stream(3, 1).await.unwrap();
                tx.send(i).await.unwrap();
                drop(p);
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(held);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, vec![0, 1, 2]);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_idle(&a);
    }
}
