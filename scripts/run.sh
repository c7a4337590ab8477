#!/usr/bin/env bash
# Set up (once) and run the main job: stream a completion from the default model.
# Any arguments replace the default ones, e.g. `scripts/run.sh --prompt "The dog" --temperature 0.8`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ $# -eq 0 ]; then set -- --prompt "Once upon a time" --max-tokens 100 --temperature 0; fi
exec .venv/bin/hire generate "$@"
