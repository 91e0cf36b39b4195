#!/usr/bin/env bash
# Installs rin_scale and everything it needs into .venv (idempotent; a second run takes seconds).
# torch and torchvision come from this machine's local wheel store (pip never downloads them);
# DeepSpeed builds against that torch with --no-build-isolation and no compiled ops.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
step() { echo "[install] $1"; shift; if ! "$@" >"$log" 2>&1; then grep -v "^WARNING: Location" "$log" | tail -n 30; echo "[install] failed: $*" >&2; exit 1; fi; }

[ -x .venv/bin/python ] || step "creating .venv" "$PY" -m venv .venv
pip=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  step "torch 2.14.1 + torchvision 0.29.1 (local wheels, a few minutes)" $pip install torch==2.14.1 torchvision==0.29.1
fi
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  step "deepspeed 0.19.8 (built against the installed torch)" env DS_BUILD_OPS=0 $pip install --no-build-isolation deepspeed==0.19.8
fi
step "pinned dependencies (requirements.txt)" $pip install -r requirements.txt
# DeepSpeed compiles its CPU shared-memory collective on first use (minutes); do it here, once.
step "deepspeed CPU communication op (compiled once, cached in ~/.cache/torch_extensions)" \
  .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
step "rin_scale (editable)" $pip install --no-deps --no-build-isolation -e .
echo "[install] done: .venv is ready"
