"""The generated stubs of `ingest.v1`, compiled from the repository's proto at install
time (see setup.py)."""

from __future__ import annotations

try:
    from ._gen import ingest_pb2, ingest_pb2_grpc
except ImportError as missing:  # pragma: no cover - depends on how it was installed
    raise ImportError(
        "ingest_client's generated stubs are missing: install the package with "
        "`pip install ./clients/python` from a checkout of the ingest repository "
        f"(an editable install does not build them) ({missing})"
    ) from missing

__all__ = ["ingest_pb2", "ingest_pb2_grpc"]
