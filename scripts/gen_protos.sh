#!/usr/bin/env bash
# Regenerate protos/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py from protos/*.proto (grpcio-tools, in the
# test extra). An argument writes them under that folder instead (tests compare it with protos/).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" protos/*.proto
