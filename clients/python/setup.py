"""Build step: compile the service's proto into the package.

`pip install ./clients/python` builds from this directory in place, so the proto
tree of the checkout (../../proto) is at hand; the generated modules go into the
wheel as `ingest_client/_gen/ingest_pb2.py` and `ingest_pb2_grpc.py`. Only
`ingest/v1/ingest.proto` is compiled: `google.rpc.Status` comes from
googleapis-common-protos and `google.protobuf.Timestamp` from protobuf, so each
proto file is registered once in the process.
"""

from __future__ import annotations

import importlib.resources
import re
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO_FILE = "ingest/v1/ingest.proto"


def compile_proto(out: Path) -> None:
    from grpc_tools import protoc

    source = PROTO_ROOT / PROTO_FILE
    if not source.is_file():
        raise SystemExit(
            f"ingest-client: {source} not found; build the package from a checkout of the "
            "ingest repository (pip install ./clients/python)"
        )
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="ingest-client-gen-") as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(source),
            ]
        )
        if rc != 0:
            raise SystemExit(f"ingest-client: protoc failed ({rc}) on {source}")
        out.mkdir(parents=True, exist_ok=True)
        generated = Path(tmp) / "ingest" / "v1"
        for name in ("ingest_pb2.py", "ingest_pb2.pyi", "ingest_pb2_grpc.py"):
            text = (generated / name).read_text()
            # The gRPC module imports its messages as the top-level package
            # `ingest.v1`; inside this package they are a sibling module.
            text = re.sub(r"^from ingest\.v1 import ", "from . import ", text, flags=re.M)
            (out / name).write_text(text)
        (out / "__init__.py").write_text('"""Generated from proto/ingest/v1/ingest.proto."""\n')


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        compile_proto(Path(self.build_lib) / "ingest_client" / "_gen")


setup(cmdclass={"build_py": BuildWithStubs})
