#!/usr/bin/env bash
# Set up, then run the demo on its embedded default: a local Ray cluster and the scikit-learn
# digits corpus written as WebDataset shards. Usage: bash scripts/demo.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${1:-demo-out}
if [ -f "$OUT/summary.json" ]; then
  echo "scripts/demo.sh: $OUT already holds a finished demo; pass another directory" >&2
  exit 2
fi
exec spellshield demo --out "$OUT"
