"""What the Python example clients share: stubs generated from ../../proto at start,
and reading the rich error details (google.rpc.*) and `ingest-confirmed-count` out of a
failed call.

    python3 -m pip install -r examples/python/requirements.txt

Used by stream_resume.py and publish.py; not a library, just the common part of two
examples kept in one place.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import sys
import tempfile
from pathlib import Path

INSTALL_HINT = (
    "scripts/run or scripts/test put them in .venv (then run the examples with "
    ".venv/bin/python), or: python3 -m pip install -r examples/python/requirements.txt"
)

try:
    import grpc
    from google.protobuf.message import DecodeError
    from google.rpc import error_details_pb2, status_pb2
    from grpc_tools import protoc
except ImportError as missing:  # pragma: no cover - depends on the machine
    sys.exit(f"{Path(sys.argv[0]).name}: {missing}; install the requirements: {INSTALL_HINT}")

# The proto tree these examples belong to.
PROTO_ROOT = Path(__file__).resolve().parent.parent.parent / "proto"
PROTO_FILE = "ingest/v1/ingest.proto"
# The gRPC service config ingest ships: gRPC's own retry for Publish.
SERVICE_CONFIG = PROTO_ROOT / "ingest/v1/service_config.json"


def channel_options() -> list[tuple[str, object]]:
    """Channel options that make a plain generated stub retry Publish by itself, as
    the shipped service config says (UNAVAILABLE and RESOURCE_EXHAUSTED, honouring
    the server's grpc-retry-pushback-ms)."""
    return [
        ("grpc.service_config", SERVICE_CONFIG.read_text()),
        ("grpc.enable_retries", 1),
    ]

# Trailing metadata: how many leading events of the stream were confirmed.
CONFIRMED_COUNT = "ingest-confirmed-count"
# Trailing metadata: a serialized google.rpc.Status with the rich error details.
STATUS_DETAILS = "grpc-status-details-bin"

# Worth retrying with the same ids: the broker is away or the server is draining
# (UNAVAILABLE), the buffer is full (RESOURCE_EXHAUSTED), the call or an idle stream
# timed out (DEADLINE_EXCEEDED), or it was aborted. Everything else is about the
# events themselves (INVALID_ARGUMENT, FAILED_PRECONDITION, ...): re-sending cannot help.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)

# Backoff when a retryable status carries no RetryInfo (e.g. the connection never
# came up): doubles per attempt that made no progress, with jitter, capped.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


def generate_stubs(out_dir: str) -> None:
    """Compiles the proto into `out_dir` (ingest/v1/ingest_pb2{,_grpc}.py)."""
    # grpc_tools ships the well-known types (google/protobuf/timestamp.proto);
    # `python -m grpc_tools.protoc` adds them itself, `protoc.main` does not.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / PROTO_FILE),
        ]
    )
    if rc != 0:
        sys.exit(
            f"{Path(sys.argv[0]).name}: protoc failed ({rc}) on {PROTO_ROOT / PROTO_FILE}"
        )


@contextlib.contextmanager
def stubs():
    """Yields (ingest_pb2, ingest_pb2_grpc), generated into a temporary directory
    that is removed afterwards, so they always match the proto of this checkout."""
    with tempfile.TemporaryDirectory(prefix="ingest-stubs-") as out:
        generate_stubs(out)
        sys.path.insert(0, out)
        try:
            from ingest.v1 import ingest_pb2, ingest_pb2_grpc

            yield ingest_pb2, ingest_pb2_grpc
        finally:
            sys.path.remove(out)


def trailer(call, key: str):
    """The value of trailing metadata `key`, or None."""
    for k, v in call.trailing_metadata() or ():
        if k == key:
            return v
    return None


def status_details(call) -> list:
    """The rich error details (google.rpc.*) of a failed call, unpacked."""
    raw = trailer(call, STATUS_DETAILS)
    if raw is None:
        return []
    try:
        status = status_pb2.Status.FromString(raw)
    except DecodeError:
        return []
    known = (
        error_details_pb2.RetryInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.PreconditionFailure,
    )
    details = []
    for any_detail in status.details:
        for kind in known:
            if any_detail.Is(kind.DESCRIPTOR):
                detail = kind()
                any_detail.Unpack(detail)
                details.append(detail)
    return details


def retry_delay(details: list) -> float | None:
    """Seconds from google.rpc.RetryInfo, if the status carries one."""
    for d in details:
        if isinstance(d, error_details_pb2.RetryInfo):
            return d.retry_delay.ToTimedelta().total_seconds()
    return None


def violations(details: list) -> list[str]:
    """One line per BadRequest / PreconditionFailure violation, as the server named it."""
    lines = []
    for d in details:
        if isinstance(d, error_details_pb2.BadRequest):
            lines += [f"{v.field}: {v.description}" for v in d.field_violations]
        elif isinstance(d, error_details_pb2.PreconditionFailure):
            lines += [f"{v.type} {v.subject}: {v.description}" for v in d.violations]
    return lines
