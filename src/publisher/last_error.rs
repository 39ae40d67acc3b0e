//! Why the broker is not connected, in one line a person can act on: the last failed
//! connection attempt (or the lost connection), kept by the supervisor until a
//! connection is up again. Readiness (`/readyz`) and the `UNAVAILABLE` answer unary
//! callers get while the broker is away both show it, so a wrong password does not look
//! like an outage, and an untrusted broker certificate does not either.

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

/// Whether a connection failure needs someone to change the configuration (or the
/// broker's certificate) rather than time: a refusal, a failed TLS handshake, or no
/// system roots to verify the broker with.
pub(super) fn needs_fix(error: &lapin::Error) -> bool {
    is_refusal(error) || tls_error(error).is_some() || no_system_roots(error)
}

/// rustls-connector's words when the system's certificate store yields no root: with
/// lapin's `rustls-native-certs` (see Cargo.toml) it then refuses every `amqps://`
/// connection, even with `--amqp-ca` certificates to add.
const NO_SYSTEM_ROOTS: &str = "Could not load any valid native certificates";

fn no_system_roots(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::IOError(io) if io.to_string().contains(NO_SYSTEM_ROOTS))
}

/// The rustls error behind a failed `amqps://` connection attempt, if that is why it
/// failed: lapin reports the handshake as an I/O error that carries it.
fn tls_error(error: &lapin::Error) -> Option<&rustls::Error> {
    let ErrorKind::IOError(io) = error.kind() else {
        return None;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = io
        .get_ref()
        .map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = e.source();
    }
    None
}

/// One line for a failed TLS handshake with the broker, saying what to check.
fn describe_tls(error: &rustls::Error) -> String {
    use rustls::{CertificateError as Cert, Error as Tls};
    match error {
        Tls::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            format!(
                "TLS: RabbitMQ's certificate is not valid for the host it was reached at \
                 ({error}) — check the host in INGEST_AMQP_URL"
            )
        }
        Tls::InvalidCertificate(
            Cert::Expired
            | Cert::ExpiredContext { .. }
            | Cert::NotValidYet
            | Cert::NotValidYetContext { .. },
        ) => format!(
            "TLS: RabbitMQ's certificate is outside its validity period ({error}) — renew \
             it on the broker (or check this machine's clock)"
        ),
        Tls::InvalidCertificate(_) => format!(
            "TLS: RabbitMQ's certificate is not trusted ({error}) — check --amqp-ca / \
             INGEST_AMQP_URL host"
        ),
        // E.g. `received corrupt message of type InvalidContentType` from a plain AMQP
        // port, or an alert from a broker that wants a client certificate.
        _ => format!(
            "TLS handshake with RabbitMQ failed ({error}) — check that INGEST_AMQP_URL \
             names RabbitMQ's TLS port"
        ),
    }
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

/// One line for a failed connection attempt by `user`. A refusal or a TLS failure says
/// what to check; anything else is lapin's own description, e.g. `IO error: Connection
/// refused (os error 111)`.
pub(super) fn describe(error: &lapin::Error, user: &str) -> String {
    if let Some(tls) = tls_error(error) {
        return describe_tls(tls);
    }
    if no_system_roots(error) {
        return format!(
            "TLS: this machine has no system root certificates ({error}), which amqps:// \
             needs even with --amqp-ca — install ca-certificates, or point SSL_CERT_FILE at \
             a PEM bundle (the --amqp-ca file will do)"
        );
    }
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

    fn tls_failure(tls: rustls::Error) -> lapin::Error {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        ErrorKind::IOError(std::sync::Arc::new(io)).into()
    }

    #[test]
    fn tls_failures_say_what_to_check() {
        use rustls::CertificateError;
        let untrusted = tls_failure(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        assert!(needs_fix(&untrusted));
        assert!(!is_refusal(&untrusted));
        assert_eq!(
            describe(&untrusted, "u"),
            "TLS: RabbitMQ's certificate is not trusted (invalid peer certificate: \
             UnknownIssuer) — check --amqp-ca / INGEST_AMQP_URL host"
        );
        let name = tls_failure(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        ));
        assert!(describe(&name, "u").contains("not valid for the host"));
        let expired = tls_failure(rustls::Error::InvalidCertificate(CertificateError::Expired));
        assert!(describe(&expired, "u").contains("validity period"));
        let plain_port = tls_failure(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert!(needs_fix(&plain_port));
        assert!(
            describe(&plain_port, "u").starts_with("TLS handshake with RabbitMQ failed ("),
            "{}",
            describe(&plain_port, "u")
        );

        let no_roots: lapin::Error =
            ErrorKind::IOError(std::sync::Arc::new(std::io::Error::other(NO_SYSTEM_ROOTS))).into();
        assert!(needs_fix(&no_roots));
        assert!(
            describe(&no_roots, "u").starts_with(
                "TLS: this machine has no system root certificates (IO error: Could not load \
                 any valid native certificates), which amqps:// needs even with --amqp-ca"
            ),
            "{}",
            describe(&no_roots, "u")
        );

        // Not TLS: neither named as such nor an error that needs a fix.
        let io: lapin::Error = ErrorKind::IOError(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )))
        .into();
        assert!(!needs_fix(&io));
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
