"""What a publish can fail with: the server's answer, read out of its rich status
(`google.rpc.Status` with `BadRequest`, `RetryInfo`, `PreconditionFailure`, ...), or
the publisher's own refusal (full, closed, dropped)."""

from __future__ import annotations

from typing import Optional, Sequence

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

# Worth sending again with the same ids: the broker is away, stalled or nacked, the
# server is draining (UNAVAILABLE), the buffer is full (RESOURCE_EXHAUSTED), a stream
# idled out (DEADLINE_EXCEEDED), or the call was aborted. Everything else is about the
# events themselves (INVALID_ARGUMENT, FAILED_PRECONDITION, PERMISSION_DENIED, ...):
# sending them again cannot help.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)

# A stream that ended with one of these was cut by the transport (a reset stream, a
# lost connection), not refused: what was in flight is sent again on a new stream.
STREAM_RETRYABLE = RETRYABLE | {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}

_CODES = {code.value[0]: code for code in grpc.StatusCode}

# The detail types the server sends, unpacked when found.
_KNOWN_DETAILS = (
    error_details_pb2.RetryInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
    error_details_pb2.ErrorInfo,
)

STATUS_DETAILS = "grpc-status-details-bin"
RETRY_PUSHBACK = "grpc-retry-pushback-ms"


def code_of(number: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` for a numeric code (UNKNOWN for numbers gRPC lacks)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def unpack_details(status: status_pb2.Status) -> list[Message]:
    """The status's details that this package knows, unpacked; others are skipped."""
    details: list[Message] = []
    for any_detail in status.details:
        for kind in _KNOWN_DETAILS:
            if any_detail.Is(kind.DESCRIPTOR):
                detail = kind()
                any_detail.Unpack(detail)
                details.append(detail)
                break
    return details


class IngestError(Exception):
    """Base of every error this package raises or sets on a future."""


class PublishError(IngestError):
    """The server did not confirm the event: its answer, with the rich details.

    `code` is the gRPC status code, `message` the server's text, `details` the
    unpacked `google.rpc` details. `violations` lists `field: description` for
    every `BadRequest` / `PreconditionFailure` entry (e.g. `events[3].topic: ...`,
    counted within the request the event was sent in), `retry_delay` the
    `RetryInfo` delay in seconds, if any.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        details: Sequence[Message] = (),
        event_id: Optional[str] = None,
    ) -> None:
        self.code = code
        self.message = message
        self.details = list(details)
        self.event_id = event_id
        text = f"{code.name}: {message}"
        if event_id is not None:
            text = f"event {event_id!r}: {text}"
        super().__init__(text)

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> "PublishError":
        return cls(code_of(status.code), status.message, unpack_details(status))

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "PublishError":
        """A failed call's status; its details from `grpc-status-details-bin`."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        details: list[Message] = []
        pushback: Optional[float] = None
        trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        for key, value in trailers or ():
            if key == STATUS_DETAILS:
                try:
                    details = unpack_details(status_pb2.Status.FromString(value))
                except DecodeError:
                    pass
            elif key == RETRY_PUSHBACK:
                try:
                    pushback = int(value) / 1000.0
                except ValueError:
                    pass
        if pushback is not None and not any(
            isinstance(d, error_details_pb2.RetryInfo) for d in details
        ):
            info = error_details_pb2.RetryInfo()
            info.retry_delay.FromMilliseconds(int(pushback * 1000))
            details.append(info)
        return cls(code or grpc.StatusCode.UNKNOWN, message or "", details)

    def for_event(self, event_id: str) -> "PublishError":
        """The same error, naming one event."""
        return PublishError(self.code, self.message, self.details, event_id)

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    @property
    def retry_delay(self) -> Optional[float]:
        for d in self.details:
            if isinstance(d, error_details_pb2.RetryInfo):
                return d.retry_delay.ToTimedelta().total_seconds()
        return None

    @property
    def violations(self) -> list[str]:
        lines: list[str] = []
        for d in self.details:
            if isinstance(d, error_details_pb2.BadRequest):
                lines += [f"{v.field}: {v.description}" for v in d.field_violations]
            elif isinstance(d, error_details_pb2.PreconditionFailure):
                lines += [f"{v.subject}: {v.description}" for v in d.violations]
            elif isinstance(d, error_details_pb2.QuotaFailure):
                lines += [f"{v.subject}: {v.description}" for v in d.violations]
        return lines


class PublisherFull(IngestError):
    """`publish` found the publisher's bound reached and `on_full` is ERROR (or the
    BLOCK wait ran out: see `FlowControlTimeout`)."""


class FlowControlTimeout(PublisherFull):
    """`publish` waited `block_timeout` for room and none came."""


class EventDropped(IngestError):
    """Set on the future of an event dropped because the bound was reached and
    `on_full` is DROP; the publisher's `stats().dropped` counts them."""


class PublisherClosed(IngestError):
    """`publish` after `close()`, or an event still unconfirmed when `close()` gave up."""
