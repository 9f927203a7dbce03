#!/usr/bin/env bash
# Create .venv and install curtail with its test tools and the tracking and sweep extras. Idempotent: a second run is fast.
# CPU machines get the CPU build of torch (constraints-cpu.txt); GPU machines keep pip's choice.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then constraints=(-c constraints-cpu.txt); fi
stamp=.venv/.curtail-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check "${constraints[@]}" -e '.[dev,tracking,sweep]'
    touch "$stamp"
fi
