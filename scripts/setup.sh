#!/usr/bin/env bash
# Create .venv and install curtail with its test tools and the tracking, sweep, fp8 and host-power extras. Idempotent: a second run is fast.
# CPU machines get the CPU build of torch (constraints-cpu.txt); GPU machines keep the resolver's choice.
# Installs with uv where it can be had (seconds), else with pip (minutes); both read pip's configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then constraints=(-c constraints-cpu.txt); fi
stamp=.venv/.curtail-installed
target='.[dev,tracking,sweep,fp8,host-power]'

with_uv() {
    .venv/bin/python -m pip install -q --disable-pip-version-check uv >/dev/null 2>&1 || return 1
    local listed pip_args=()
    listed="$(.venv/bin/python scripts/uv_args.py .venv/bin/python)" || return 1
    [ -z "$listed" ] || mapfile -t pip_args <<< "$listed"
    [ -z "${PIP_CERT:-}" ] || export SSL_CERT_FILE="${SSL_CERT_FILE:-$PIP_CERT}"
    .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python --index-strategy unsafe-best-match \
        "${pip_args[@]}" "${constraints[@]}" -e "$target"
}

if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    if ! with_uv; then
        echo "setup: uv unavailable or failed; installing with pip (several minutes)" >&2
        .venv/bin/python -m pip install -q --disable-pip-version-check "${constraints[@]}" -e "$target"
    fi
    touch "$stamp"
fi
