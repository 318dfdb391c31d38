#!/usr/bin/env bash
# Sequential editing to >= 500 edits on a KnowEdit fact world, on one GPU + 16 cores in ~7 minutes.
#   bash benchmarks/device_seq500.sh DATA_JSON OUT_DIR [extra device_seq500.py flags]
# e.g. bash benchmarks/device_seq500.sh .devdata/train_cf.json "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: device_seq500.sh DATA_JSON OUT_DIR [flags]}
OUT=${2:?usage: device_seq500.sh DATA_JSON OUT_DIR [flags]}
shift 2
mkdir -p "$OUT"
python -u benchmarks/device_seq500.py --data "$DATA" --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
