#!/usr/bin/env bash
# Writes the Python stubs for ingest.v1 to examples/python/gen/ (gitignored), for
# code that imports them instead of generating them at start as stream_resume.py
# does:  PYTHONPATH=examples/python/gen python3 -c 'from ingest.v1 import ingest_pb2_grpc'
# Needs the requirements: python3 -m pip install -r examples/python/requirements.txt
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rm -rf "$here/gen"
mkdir -p "$here/gen"
# `python3 -m grpc_tools.protoc` adds the well-known types (google/protobuf/*.proto)
# shipped with grpcio-tools to the include path by itself.
python3 -m grpc_tools.protoc \
  -I "$here/../../proto" \
  --python_out="$here/gen" \
  --grpc_python_out="$here/gen" \
  "$here/../../proto/ingest/v1/ingest.proto"
echo "stubs written to $here/gen/ingest/v1/"
