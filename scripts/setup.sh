#!/usr/bin/env bash
# Create .venv and install hire into it, with optional extras (e.g. `scripts/setup.sh test`).
# Idempotent: a stamp keyed on pyproject.toml and the extras skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
hash=$(sha1sum pyproject.toml | cut -c1-12)
stamp=".venv/.installed-$hash${extras:+-$extras}"
[ -f "$stamp" ] && exit 0
python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
find .venv -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash*" -delete
touch "$stamp"
