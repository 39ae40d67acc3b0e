//! Why the broker is not connected, in one line a person can act on: the last failed
//! connection attempt (or the lost connection), kept by the supervisor until a
//! connection is up again. Readiness (`/readyz`) and the `UNAVAILABLE` answer unary
//! callers get while the broker is away both show it, so a wrong password does not look
//! like an outage.

use std::sync::{Arc, RwLock};

use lapin::{
    ErrorKind,
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
};

/// The reason the broker is not connected, shared between the supervisor (the only
/// writer) and its readers; clones share one slot.
#[derive(Clone, Debug, Default)]
pub struct LastError(Arc<RwLock<Option<Arc<str>>>>);

impl LastError {
    /// The reason of the last failure, or `None` while connected and before the first
    /// attempt has ended.
    pub fn get(&self) -> Option<Arc<str>> {
        match self.0.read() {
            Ok(slot) => slot.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Records `reason` (`None`: connected). True if it differs from the one before,
    /// so a failure that repeats on every retry is logged once.
    pub(super) fn set(&self, reason: Option<&str>) -> bool {
        let mut slot = match self.0.write() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        if slot.as_deref() == reason {
            return false;
        }
        *slot = reason.map(Arc::from);
        true
    }
}

/// Whether a connection failure is the broker refusing these credentials or this vhost:
/// it will not heal by retrying, someone has to change the configuration.
pub(super) fn is_refusal(error: &lapin::Error) -> bool {
    refusal_code(error).is_some()
}

fn refusal_code(error: &lapin::Error) -> Option<&AMQPErrorKind> {
    match error.kind() {
        ErrorKind::ProtocolError(e)
            if matches!(
                e.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            ) =>
        {
            Some(e.kind())
        }
        _ => None,
    }
}

/// One line for a failed connection attempt by `user`. A refusal says what to check;
/// anything else is lapin's own description, e.g. `IO error: Connection refused (os
/// error 111)`.
pub(super) fn describe(error: &lapin::Error, user: &str) -> String {
    let ErrorKind::ProtocolError(amqp) = error.kind() else {
        return error.to_string();
    };
    let text = amqp.get_message().as_str();
    match refusal_code(error) {
        // RabbitMQ says only "Login was refused using authentication mechanism PLAIN"
        // for a wrong user or password (and for `guest` from another host).
        Some(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)) if text.contains("Login") => {
            format!("authentication refused for user {user} — check INGEST_AMQP_URL")
        }
        // E.g. "access to vhost 'x' refused for user 'u'".
        Some(AMQPErrorKind::Soft(_)) => {
            format!("access refused for user {user} ({text}) — check INGEST_AMQP_URL")
        }
        // E.g. "vhost x not found".
        Some(AMQPErrorKind::Hard(_)) => {
            format!("RabbitMQ refused the connection ({text}) — check INGEST_AMQP_URL")
        }
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::AMQPError;

    use super::*;

    fn protocol_error(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn refusals_say_what_to_check() {
        let login = protocol_error(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. \
             For details see the broker logfile.",
        );
        assert!(is_refusal(&login));
        assert_eq!(
            describe(&login, "guest"),
            "authentication refused for user guest — check INGEST_AMQP_URL"
        );
        let vhost = protocol_error(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - access to vhost 'v' refused for user 'u'",
        );
        assert_eq!(
            describe(&vhost, "u"),
            "access refused for user u (ACCESS_REFUSED - access to vhost 'v' refused for \
             user 'u') — check INGEST_AMQP_URL"
        );
        let missing = protocol_error(
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
            "NOT_ALLOWED - vhost nosuch not found",
        );
        assert!(is_refusal(&missing));
        assert!(describe(&missing, "u").contains("vhost nosuch not found"));

        let io: lapin::Error = ErrorKind::IOError(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )))
        .into();
        assert!(!is_refusal(&io));
        assert_eq!(describe(&io, "u"), "IO error: connection refused");
    }

    #[test]
    fn the_slot_reports_changes_only() {
        let last = LastError::default();
        assert_eq!(last.get(), None);
        assert!(last.set(Some("a")));
        assert!(!last.set(Some("a")), "the same reason again is no change");
        assert_eq!(last.get().as_deref(), Some("a"));
        assert!(last.set(Some("b")));
        let reader = last.clone();
        assert!(last.set(None));
        assert_eq!(reader.get(), None);
        assert!(!last.set(None));
    }
}
