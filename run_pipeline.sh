#!/usr/bin/env bash
# The whole pipeline on the built-in toy world, from a fresh clone: set-up, data, models, stages.
# Every stage skips work that is already done, so a rerun is cheap. DATA/RESULTS can be overridden.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=.venv/bin/python
DATA=${DATA:-data/toy}
RESULTS=${RESULTS:-results/toy}
mkdir -p "$RESULTS"

echo "== 0. adapter zoo (toy width)"
$PY hidden_adapter.py --summary --hidden_dim 64
$PY benchmark_adapter_latency.py --hidden_dim 64 --repeats 10 --output "$RESULTS/adapter_latency.json"
