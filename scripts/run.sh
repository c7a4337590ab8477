#!/usr/bin/env bash
# Set up (once) and run the main job: serve the default model with `hire serve` (Ray Serve: HTTP on 8000,
# gRPC on 50051), answer one request with `hire client`, then stop the server.
# Arguments go to `hire client` and replace the default request, e.g. `scripts/run.sh "The dog" --max-tokens 20`.
# To keep the server running instead: .venv/bin/hire serve
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh serve
if [ $# -eq 0 ]; then set -- "def parse_args(argv):" --max-tokens 100 --temperature 0.8 --seed 1; fi
log=$(mktemp -t hire-serve.XXXXXX.log)
.venv/bin/hire serve >"$log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
echo "hire serve is starting (log: $log); the first request compiles the model's programs" >&2
if ! .venv/bin/hire client --wait 300 "$@"; then
  tail -n 30 "$log" >&2
  exit 1
fi
