//! Admission: the one place that bounds how much the service holds in memory.
//!
//! Two budgets are shared by every caller: events admitted and not yet settled by the
//! broker, and the bytes those events hold. A [`Permit`] owns its share of both and
//! gives it back when dropped, so the bound is structural: whoever holds a permit holds
//! the right to the memory, and no counter can drift because a release was forgotten on
//! some error path or cancelled future.
//!
//! Unary calls use [`Admission::try_admit`], which never waits. Waiting callers are
//! queued first-in first-out by the semaphores, so they are served in arrival order.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

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
    /// Larger than the whole buffer: it can never be admitted, however long one waits.
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
    /// Configured limits, for gauges and for telling "never fits" from "not now".
    capacity: Usage,
}

impl Admission {
    /// Creates the bound. Capacities are clamped to what a semaphore can count.
    pub fn new(events: usize, bytes: usize) -> Self {
        let events = events.min(Semaphore::MAX_PERMITS);
        let bytes = bytes.min(Semaphore::MAX_PERMITS);
        Self {
            events: Arc::new(Semaphore::new(events)),
            bytes: Arc::new(Semaphore::new(bytes)),
            capacity: Usage { events, bytes },
        }
    }

    /// Admits `events` events holding `bytes` bytes at once, or refuses at once.
    pub fn try_admit(&self, events: usize, bytes: usize) -> Result<Permit, AdmitError> {
        let (n_events, n_bytes) = self.check_fits(events, bytes)?;
        let exhausted = || AdmitError::Exhausted {
            events,
            bytes,
            free_events: self.events.available_permits(),
            free_bytes: self.bytes.available_permits(),
        };
        let event_permit = match Arc::clone(&self.events).try_acquire_many_owned(n_events) {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => return Err(exhausted()),
            Err(TryAcquireError::Closed) => return Err(AdmitError::Closed),
        };
        let byte_permit = match Arc::clone(&self.bytes).try_acquire_many_owned(n_bytes) {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => {
                // All or nothing: give the events back before reporting what is free.
                drop(event_permit);
                return Err(exhausted());
            }
            Err(TryAcquireError::Closed) => return Err(AdmitError::Closed),
        };
        Ok(Permit {
            events: event_permit,
            bytes: byte_permit,
        })
    }

    /// Admits `events` events holding `bytes` bytes, waiting in line for room.
    ///
    /// Cancel-safe: dropping the future gives back whatever it had acquired.
    /// Every waiter takes events first, then bytes, so two waiters never hold what the
    /// other waits for in opposite order.
    pub async fn admit(&self, events: usize, bytes: usize) -> Result<Permit, AdmitError> {
        let (n_events, n_bytes) = self.check_fits(events, bytes)?;
        let events = Arc::clone(&self.events)
            .acquire_many_owned(n_events)
            .await
            .map_err(|_| AdmitError::Closed)?;
        let bytes = Arc::clone(&self.bytes)
            .acquire_many_owned(n_bytes)
            .await
            .map_err(|_| AdmitError::Closed)?;
        Ok(Permit { events, bytes })
    }

    /// What is admitted and not yet released.
    pub fn in_use(&self) -> Usage {
        Usage {
            events: self.capacity.events
                - self.events.available_permits().min(self.capacity.events),
            bytes: self.capacity.bytes - self.bytes.available_permits().min(self.capacity.bytes),
        }
    }

    /// The configured bound.
    pub fn capacity(&self) -> Usage {
        self.capacity
    }

    /// Refuses every later admission; permits already held stay valid. Used on shutdown.
    pub fn close(&self) {
        self.events.close();
        self.bytes.close();
    }

    fn check_fits(&self, events: usize, bytes: usize) -> Result<(u32, u32), AdmitError> {
        let too_large = |what, requested, capacity| AdmitError::TooLarge {
            what,
            requested,
            capacity,
        };
        if events > self.capacity.events {
            return Err(too_large("events", events, self.capacity.events));
        }
        if bytes > self.capacity.bytes {
            return Err(too_large("bytes", bytes, self.capacity.bytes));
        }
        let n_events =
            u32::try_from(events).map_err(|_| too_large("events", events, u32::MAX as usize))?;
        let n_bytes =
            u32::try_from(bytes).map_err(|_| too_large("bytes", bytes, u32::MAX as usize))?;
        Ok((n_events, n_bytes))
    }
}

/// The right to hold some events and bytes. Dropping it gives them back, exactly once.
#[derive(Debug)]
#[must_use = "dropping a permit releases its room at once"]
pub struct Permit {
    events: OwnedSemaphorePermit,
    bytes: OwnedSemaphorePermit,
}

impl Permit {
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
    use super::*;

    #[test]
    fn permits_return_everything_on_drop() {
        let a = Admission::new(10, 1000);
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
        drop(p1);
        assert_eq!(
            a.in_use(),
            Usage {
                events: 7,
                bytes: 700
            }
        );
        drop(p2);
        assert_eq!(a.in_use(), Usage::default());
    }

    #[test]
    fn all_or_nothing_when_full() {
        let a = Admission::new(10, 1000);
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
    fn larger_than_capacity_never_fits() {
        let a = Admission::new(10, 1000);
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
        assert_eq!(a.in_use(), Usage::default());
    }

    #[test]
    fn closed_admission_refuses() {
        let a = Admission::new(10, 1000);
        let held = a.try_admit(1, 1).unwrap();
        a.close();
        assert_eq!(a.try_admit(1, 1).unwrap_err(), AdmitError::Closed);
        drop(held);
        assert_eq!(a.in_use(), Usage::default());
    }

    #[tokio::test]
    async fn waiters_get_room_when_released_and_cancel_gives_back() {
        let a = Arc::new(Admission::new(2, 100));
        let held = a.try_admit(2, 50).unwrap();
        let waiter = {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.admit(1, 10).await.map(|p| (p.events(), p.bytes())) })
        };
        // A second waiter that gives up: whatever it acquired must come back.
        let cancelled =
            tokio::time::timeout(std::time::Duration::from_millis(20), a.admit(2, 10)).await;
        assert!(cancelled.is_err());
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), (1, 10));
        assert_eq!(a.in_use(), Usage::default());
    }
}
