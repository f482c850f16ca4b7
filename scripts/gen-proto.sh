#!/usr/bin/env bash
# Regenerates consortium/wire/*_pb2*.py from proto/ (grpcio-tools, the version pinned in pyproject).
# tests/dataplane/test_wire.py fails when the committed stubs differ from what this writes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/consortium/wire}"
python="${PYTHON:-python3}"
"$python" -m grpc_tools.protoc -I "$root/proto" --python_out="$out" --grpc_python_out="$out" \
  "$root/proto/consortium/v1/agent.proto"
# protoc writes into consortium/v1/ under the output folder and imports by that package path;
# flatten it into the wire package with a relative import.
mv "$out/consortium/v1/agent_pb2.py" "$out/agent_pb2.py"
sed 's/^from consortium\.v1 import agent_pb2 as/from . import agent_pb2 as/' \
  "$out/consortium/v1/agent_pb2_grpc.py" > "$out/agent_pb2_grpc.py"
rm -r "$out/consortium"
