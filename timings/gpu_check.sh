#!/usr/bin/env bash
# The GPU checks of the static / compiled / torchao paths, one step per line, each under its own timeout.
# Run from the repository root on a CUDA machine:   bash timings/gpu_check.sh [OUT_DIR]
# Writes OUT_DIR/<path>/{e2e_wallclock.json,md,timing_profile.json} per path and copies each profile to
# timings/<gpu>_<path>_7b.json. A step that fails or times out is reported and the next one still runs;
# the script exits 1 if any failed. Total worst case about 23 min: on a 15-minute device budget run it
# twice with STEPS (e.g. STEPS="tests eager static compile", then STEPS="int8_ao int4_ao").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-results/gpu_check}
STEPS=${STEPS:-"tests eager static compile int8_ao int4_ao"}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cd '[:alnum:]' | tr '[:upper:]' '[:lower:]')
mkdir -p "$OUT"
failed=()

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (timeout ${limit}s): $*"
  local start=$SECONDS
  if timeout "$limit" "$@"; then echo "== $name ok in $((SECONDS - start)) s"
  else echo "== $name FAILED (exit $?) after $((SECONDS - start)) s"; failed+=("$name"); fi
}

if [ ! -d data/toy/dataset/test/event_image ]; then  # the benchmark reads clips from the toy world
  timeout 300 $PY make_toy_world.py --output_dir data/toy --quick || exit 1
  timeout 300 $PY preprocess_event_images.py --dataset_dir data/toy/dataset --allow_pickle || exit 1
fi
# torchao: installed from a carried wheel when the machine has no index (TORCHAO_WHEEL=path/to/torchao-*.whl)
case " $STEPS " in *_ao*) $PY -c "import torchao" 2>/dev/null || $PY -m pip install --quiet \
  "${TORCHAO_WHEEL:-torchao>=0.18,<0.19}" ;; esac

# 1. the CUDA-only tests: compiled (CUDA-graph) path lossless, streams, fidelity on GPU
step tests 240 $PY -m pytest -q -x tests/test_static_decoding.py tests/test_speculative_decoding.py -k cuda

# 2-6. Vicuna-7B shapes with random weights, fp16, batch 1: the target alone on the path, transformers'
# eager generate on the same samples, the controlled drafter at p=0.7 (the issue's done-when) and 1.3 ms per draft.
BENCH=($PY benchmark_e2e_wallclock.py --random_shape 7b --device cuda --dtype fp16 --dataset_dir data/toy/dataset
       --configs target,hf_generate,synthetic --synthetic_acceptance 0.7 --synthetic_cost_ms 1.3
       --max_samples 4 --max_new_tokens 32 --warmup 2 --repeats 2 --reference_profile none)
step eager 180 "${BENCH[@]}" --output_dir "$OUT/eager"
step static 180 "${BENCH[@]}" --static_cache --output_dir "$OUT/static"
step compile 300 "${BENCH[@]}" --compile --output_dir "$OUT/compiled"
step int8_ao 240 "${BENCH[@]}" --compile --quant int8_ao --output_dir "$OUT/int8_ao_compiled"
step int4_ao 240 "${BENCH[@]}" --dtype bf16 --compile --quant int4_ao --output_dir "$OUT/int4_ao_compiled"

for dir in "$OUT"/*/; do
  name=$(basename "$dir")
  [ -f "$dir/timing_profile.json" ] && cp "$dir/timing_profile.json" "timings/${GPU}_fp16_${name}_7b.json"
done
if [ ${#failed[@]} -gt 0 ]; then echo "gpu_check: failed steps: ${failed[*]}"; exit 1; fi
echo "gpu_check: all steps passed; results in $OUT, profiles in timings/"
