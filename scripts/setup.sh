#!/usr/bin/env bash
# Create .venv (if needed) and install spellshield into it, with the test extras.
# CPU machines: torch==2.13.0 first (a CPU wheel); an unpinned torch would pull a CUDA build.
# GPU machines: set SPELLSHIELD_TORCH to the torch you want (e.g. "torch==2.13.0" from the
# CUDA index), and SPELLSHIELD_EXTRAS=test,gpu for faiss-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "${SPELLSHIELD_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[${SPELLSHIELD_EXTRAS:-test}]"
