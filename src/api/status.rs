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
        AdmitError::Exhausted { .. } => Status::with_error_details(
            Code::ResourceExhausted,
            format!("{error}; retry later"),
            ErrorDetails::with_retry_info(Some(retry_after)),
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
    }
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
        | PublishError::Channel(_) => Status::with_error_details(
            Code::Unavailable,
            message,
            ErrorDetails::with_retry_info(Some(UNAVAILABLE_RETRY)),
        ),
    }
}

/// A unary call refused at once because the broker is not connected; `reason` says
/// why, when known (e.g. `authentication refused for user guest — check
/// INGEST_AMQP_URL`), so the caller's error names the cause, not just an outage.
pub(crate) fn disconnected(reason: Option<&str>) -> Status {
    let status = publish_failed(&PublishError::Disconnected, None);
    match reason {
        Some(reason) => Status::with_error_details(
            status.code(),
            format!("{}: {reason}", status.message()),
            ErrorDetails::with_retry_info(Some(UNAVAILABLE_RETRY)),
        ),
        None => status,
    }
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
    status = Status::with_error_details(status.code(), message, details);
    status
}

/// The service is draining.
pub(crate) fn shutting_down() -> Status {
    Status::with_error_details(
        Code::Unavailable,
        "ingest is shutting down; retry on another instance",
        ErrorDetails::with_retry_info(Some(UNAVAILABLE_RETRY)),
    )
}
