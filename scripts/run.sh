#!/usr/bin/env bash
# Set up (once) and run the main job: stream a completion from the default model.
# Any arguments replace the default ones, e.g. `scripts/run.sh --prompt "The dog" --temperature 0.8`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ $# -eq 0 ]; then set -- --prompt "def parse_args(argv):" --max-tokens 100 --temperature 0.8 --seed 1; fi
exec .venv/bin/hire generate "$@"
