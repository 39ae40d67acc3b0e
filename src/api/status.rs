//! One table from failure to gRPC status, with the rich error details
//! (`google.rpc.BadRequest`, `RetryInfo`, `PreconditionFailure`) callers act on.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    admission::AdmitError,
    publisher::{BatchFailure, PublishError},
    validate::FieldViolation,
};

/// Retry hint for failures that last as long as the broker is away, not as long as
/// the buffer is full.
pub(crate) const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

/// `INVALID_ARGUMENT` with every field violation.
pub(crate) fn invalid(violations: Vec<FieldViolation>) -> Status {
    let message = match violations.as_slice() {
        [only] => format!("invalid request: {only}"),
        [first, rest @ ..] => format!("invalid request: {first} (and {} more)", rest.len()),
        [] => "invalid request".to_owned(),
    };
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field, v.description);
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// Admission refused the request.
pub(crate) fn not_admitted(error: AdmitError, retry_after: Duration) -> Status {
    match error {
        AdmitError::Exhausted { .. } => retryable(
            Code::ResourceExhausted,
            format!("{error}; retry later"),
            retry_after,
        ),
        AdmitError::TooLarge {
            what,
            requested,
            capacity,
        } => invalid(vec![FieldViolation {
            field: "events".to_owned(),
            description: format!(
                "the request holds {requested} {what}, more than the whole buffer ({capacity}, buffer-{what}) can ever admit; send smaller requests"
            ),
        }]),
        AdmitError::Closed => shutting_down(),
        AdmitError::Quota {
            ref tenant,
            ref why,
            ..
        } => {
            let mut details = ErrorDetails::with_retry_info(Some(retry_after));
            details.add_quota_failure_violation(format!("tenant:{tenant}"), why.clone());
            let mut status = Status::with_error_details(
                Code::ResourceExhausted,
                format!("{error}; retry later"),
                details,
            );
            pushback(&mut status, retry_after);
            status
        }
    }
}

/// `UNAUTHENTICATED`: no credential, or none that names a tenant.
pub(crate) fn unauthenticated(why: &str) -> Status {
    Status::unauthenticated(why.to_owned())
}

/// `PERMISSION_DENIED`: the tenant may not publish to `events[index].topic`.
pub(crate) fn topic_denied(tenant: &str, field: &str, topic: &str) -> Status {
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("field".to_owned(), field.to_owned());
    metadata.insert("topic".to_owned(), topic.to_owned());
    metadata.insert("tenant".to_owned(), tenant.to_owned());
    Status::with_error_details(
        Code::PermissionDenied,
        format!(
            "{field}: tenant {tenant:?} may not publish to topic {topic:?}; nothing of the request was published"
        ),
        ErrorDetails::with_error_info("TOPIC_NOT_ALLOWED", "ingest", metadata),
    )
}

/// A publish that could not start or an event that was not confirmed.
pub(crate) fn publish_failed(error: &PublishError, field: Option<String>) -> Status {
    let message = match &field {
        Some(field) => format!("{field}: {error}"),
        None => error.to_string(),
    };
    match error {
        PublishError::Unroutable { topic, .. } => {
            let subject = field.map_or_else(|| "topic".to_owned(), |f| format!("{f}.topic"));
            Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_precondition_failure_violation(
                    "UNROUTABLE",
                    subject,
                    format!("no queue is bound to the exchange for routing key {topic:?}"),
                ),
            )
        }
        PublishError::HeadersTooLarge { index, .. } => invalid(vec![FieldViolation {
            field: format!("events[{index}].attributes"),
            description: error.to_string(),
        }]),
        PublishError::ShuttingDown => shutting_down(),
        PublishError::Disconnected
        | PublishError::Nacked
        | PublishError::ConfirmTimeout
        | PublishError::Blocked
        | PublishError::Channel(_)
        | PublishError::Connection(_) => retryable(Code::Unavailable, message, UNAVAILABLE_RETRY),
    }
}

/// A unary call refused at once because the broker is not connected; `reason` says
/// why, when known (e.g. `authentication refused for user guest — check
/// INGEST_AMQP_URL`), so the caller's error names the cause, not just an outage.
pub(crate) fn disconnected(reason: Option<&str>, delay: Duration) -> Status {
    let message = PublishError::Disconnected.to_string();
    match reason {
        Some(reason) => retryable(Code::Unavailable, format!("{message}: {reason}"), delay),
        None => retryable(Code::Unavailable, message, delay),
    }
}

/// A call refused at once because the broker holds events without answering any.
pub(crate) fn stalled(reason: &str) -> Status {
    retryable(
        Code::Unavailable,
        format!("{reason}; retry later or on another instance"),
        UNAVAILABLE_RETRY,
    )
}

/// A batch in which some event was not confirmed.
pub(crate) fn batch_failed(failure: &BatchFailure, events: usize) -> Status {
    let mut status = publish_failed(&failure.error, Some(format!("events[{}]", failure.index)));
    let message = format!(
        "{} ({} of {events} events not confirmed; retry with the same ids to de-duplicate)",
        status.message(),
        failure.failed
    );
    let details = status.check_error_details().unwrap_or_default();
    let pushback = status.metadata().get(RETRY_PUSHBACK).cloned();
    status = Status::with_error_details(status.code(), message, details);
    if let Some(pushback) = pushback {
        status.metadata_mut().insert(RETRY_PUSHBACK, pushback);
    }
    status
}

/// The service is draining.
pub(crate) fn shutting_down() -> Status {
    retryable(
        Code::Unavailable,
        "ingest is shutting down; retry on another instance",
        UNAVAILABLE_RETRY,
    )
}

/// Trailing metadata gRPC's built-in retry reads (gRFC A6): how long to wait before
/// the next attempt, in milliseconds. Sent with every `RetryInfo`, which generated
/// clients' retry policies do not read.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// A status callers should retry after `delay`: `RetryInfo` for clients that read
/// the rich details, `grpc-retry-pushback-ms` for gRPC's own retry.
pub(crate) fn retryable(code: Code, message: impl Into<String>, delay: Duration) -> Status {
    let mut status =
        Status::with_error_details(code, message, ErrorDetails::with_retry_info(Some(delay)));
    pushback(&mut status, delay);
    status
}

/// Adds the `grpc-retry-pushback-ms` trailer for `delay`.
fn pushback(status: &mut Status, delay: Duration) {
    let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    status
        .metadata_mut()
        .insert(RETRY_PUSHBACK, tonic::metadata::MetadataValue::from(millis));
}
