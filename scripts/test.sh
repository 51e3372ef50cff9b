#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; real Ray, FAISS, Parquet, diffusers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Token auth must be set the same way in every process of a test (pytest, ray start, jobs).
export RAY_AUTH_MODE=disabled
exec python -m pytest -q "$@"
