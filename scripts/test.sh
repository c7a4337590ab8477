#!/usr/bin/env bash
# Set up (once) with the test extras and run the test suite; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
