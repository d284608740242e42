#!/usr/bin/env bash
# The GPU checks of the static / compiled / torchao paths, one step per line, each under its own timeout.
# Run from the repository root on a CUDA machine:   bash timings/gpu_check.sh [RESULTS_DIR]
# Writes RESULTS/<dtype>_<path>/{e2e_wallclock.json,md,png,timing_profile.json} per path, copies each
# profile to timings/<gpu>_<dtype>_<path>_7b.json and RESULTS/profiles/, and after every step packs
# RESULTS into RESULTS.tar.gz (one file to bring back; a killed call keeps the steps that finished).
# A step that fails or times out is reported and the next one still runs; the script exits 1 if any
# failed. STEPS picks the steps, run in the order below whatever order STEPS names them. One device
# command may run 10 minutes and a session has 15 device minutes, machine start included, so one call
# holds STEPS="compile tests" (the issue's done-when figures; typically 6-8 min) and the rest waits for
# a later session: STEPS="adapters int4_ao", then STEPS="eager static int8_ao". STEPS="eagle3" runs the
# EAGLE-3 heads' steps (eagle3_step, eagle3_live, eagle3_tests: about 8 min, one call of its own). STEPS="trees"
# runs the draft trees' steps (trees_compiled, trees_eager, trees_widths: at most TREES_S = 500 s, one call of its
# own, the last in the default list). On the lent GPU machine first run timings/gpu_wheels.sh here and carry .whl
# with the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=../shell_help.sh
source ./shell_help.sh && shell_help timings/gpu_check.sh "${1:-}"  # --help: settings, then exit
# The project's venv where there is one, else the machine's python (the GPU machine's: CPython 3.12 with
# torch and an older transformers; the wheels from timings/gpu_wheels.sh, carried as .whl/, go on top).
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # the venv's python, else python3
RESULTS=${RESULTS:-${1:-results/gpu_check}}  # results folder (also the first argument)
STEPS=${STEPS:-"compile tests adapters int4_ao eager static int8_ao eagle3 trees"}  # steps to run (see the header)
TREES_S=${TREES_S:-500}  # seconds the trees steps take together at most (trees_widths gets what is left)
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import transformers, sys; sys.exit(0 if tuple(map(int, transformers.__version__.split('.')[:2])) >= (5, 24) else 1)" \
  || { echo "gpu_check: transformers >= 5.24 is needed (bash timings/gpu_wheels.sh, then carry .whl)"; exit 1; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cd '[:alnum:]' | tr '[:upper:]' '[:lower:]')
GPU=${GPU:-gpu}
mkdir -p "$RESULTS/profiles"
failed=()

pack() {  # the profiles measured so far into timings/ and RESULTS/profiles/, then RESULTS.tar.gz
  local dir name
  for dir in "$RESULTS"/*/; do
    name=$(basename "$dir")
    [ -f "$dir/timing_profile.json" ] || continue
    cp "$dir/timing_profile.json" "timings/${GPU}_${name}_7b.json"
    cp "$dir/timing_profile.json" "$RESULTS/profiles/${GPU}_${name}_7b.json"
  done
  tar czf "$RESULTS.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
}

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*|*" ${name%%_*} "*) ;; *) return 0 ;; esac  # eagle3 = eagle3_*
  echo "== $name (timeout ${limit}s): $*"
  local start=$SECONDS
  if timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"; then echo "== $name ok in $((SECONDS - start)) s"
  else echo "== $name FAILED (exit ${PIPESTATUS[0]}) after $((SECONDS - start)) s"; failed+=("$name"); fi
  pack
}

if [ ! -d data/toy/dataset/test/event_image ]; then  # the benchmark reads clips from the toy world
  timeout 240 $PY make_toy_world.py --output_dir data/toy --quick || exit 1
  timeout 120 $PY preprocess_event_images.py --dataset_dir data/toy/dataset --allow_pickle || exit 1
fi
# torchao: from the carried wheels (.whl), else from a package index where the machine has one
case " $STEPS " in *_ao*) $PY -c "import torchao" 2>/dev/null || $PY -m pip install --quiet "torchao>=0.18,<0.19" \
  || echo "gpu_check: no torchao (bash timings/gpu_wheels.sh, then carry .whl); the _ao steps will fail" ;; esac

# Vicuna-7B shapes with random weights, batch 1, max 32 new tokens, 4 samples x 2 repeats after 2 warm-ups.
BENCH=($PY benchmark_e2e_wallclock.py --random_shape 7b --device cuda --dtype fp16 --dataset_dir data/toy/dataset
       --synthetic_acceptance 0.7 --max_samples 4 --max_new_tokens 32 --warmup 2 --repeats 2 --reference_profile none)
PLAIN=(--configs target,hf_generate,synthetic)

# 1. compiled, fp16: the target alone on the path, transformers' eager generate on the same samples, the
# controlled drafter at p=0.7 costing the compiled B1 draft step this run measures (the issue's done-when),
# and the B1 roll-out drafter itself (random weights: read its row as a cost). Compiles fall in the warm-up.
step compile 300 "${BENCH[@]}" --compile --synthetic_cost_ms B1 --configs target,hf_generate,synthetic,decode \
  --random_adapters --decode_adapter B1 --output_dir "$RESULTS/fp16_compiled"

# 2. the CUDA-only tests: compiled (CUDA-graph) target and adapter steps lossless, streams, fidelity on GPU
step tests 180 $PY -m pytest -q -x tests/test_static_decoding.py tests/test_speculative_decoding.py -k cuda

# 3. the causal adapters' draft step at width 4096, growing cache against compiled (CUDA graphs)
step adapters 200 bash -c "$PY benchmark_adapter_latency.py --device cuda --dtype fp16 --levels L5 B1 L5F L5E \
  --output '$RESULTS/adapter_latency_eager.json' && $PY benchmark_adapter_latency.py --device cuda --dtype fp16 \
  --levels L5 B1 L5F L5E --compile --output '$RESULTS/adapter_latency_compiled.json'"

# 4-7. torchao int4 (bf16, compiled; do both 7B models fit 24 GB?), then the eager and static paths at the
# reference's 1.3 ms per draft (the eager loop against generate, side by side), and int8
step int4_ao 240 "${BENCH[@]}" "${PLAIN[@]}" --dtype bf16 --compile --quant int4_ao --synthetic_cost_ms B1 \
  --output_dir "$RESULTS/bf16_int4_ao_compiled"
step eager 180 "${BENCH[@]}" "${PLAIN[@]}" --synthetic_cost_ms 1.3 --output_dir "$RESULTS/fp16_eager"
step static 180 "${BENCH[@]}" "${PLAIN[@]}" --static_cache --synthetic_cost_ms 1.3 --output_dir "$RESULTS/fp16_static"
step int8_ao 240 "${BENCH[@]}" "${PLAIN[@]}" --compile --quant int8_ao --synthetic_cost_ms B1 \
  --output_dir "$RESULTS/fp16_int8_ao_compiled"

# 8. the EAGLE-3 heads (issue 27), one call: E3's draft step against B1's at width 4096 on the compiled path
# (a drafted position reads the head's own output, so it should cost B1's); E3 and B1 drafting live at 7B
# shape on the compiled path (random weights: read the rows as costs), whose profile records what returning the
# target's three layer states (2, 16, 29) adds to a verify pass (verify_layers_extra_ms, in its notes too); and
# the CUDA tests of the layer states (compiled CUDA-graph step equal to a full forward; E3 lossless there).
step eagle3_step 150 $PY benchmark_adapter_latency.py --device cuda --dtype fp16 --levels B1 E3 E3E --compile \
  --output "$RESULTS/eagle3_adapter_latency_compiled.json"
step eagle3_live 300 "${BENCH[@]}" --compile --random_adapters --decode_adapter B1 E3 --configs target,decode \
  --max_samples 2 --repeats 1 --warmup 1 --output_dir "$RESULTS/fp16_compiled_eagle3"
step eagle3_tests 120 $PY -m pytest -q -x tests/test_eagle3.py -k cuda

# 9. draft trees (issue 26), one call: the controlled drafter as a tree (3 siblings per depth, gamma 5: 15 nodes,
# a verify pass 16 wide) against the controlled chain at the same p=0.7, both costing the B1 draft step this run
# measures per depth, on the compiled path, then on the eager path, whose profile also times verify widths 32 and 64
# (the eager path runs every width as one pass: 1, 2, 4, 6, 8, 16, 32, 64). The static and compiled paths pad every
# verify pass to gamma_decode + 1 and run a wider one in pieces of it, so there a profile's chain widths other than 1
# and gamma + 1 are not one pass (its tree widths, since 7d7a15b, are one verify_tree pass): trees_widths runs the target alone with --gamma_decode W-1 for each width W, compiled
# (16, 32, 64; width 6 is trees_compiled's) then static (6, 16, 32, 64), each run under its own timeout and none past
# TREES_S, into RESULTS/trees_widths/fp16_<path>_w<W>/ (read vl_verify_ms at 1 and W only; not copied to timings/).
trees_start=$SECONDS
TREES=("${BENCH[@]}" --configs target,synthetic --synthetic_tree_width 3 --synthetic_cost_ms B1)
step trees_compiled 200 "${TREES[@]}" --compile --output_dir "$RESULTS/fp16_compiled_trees"
step trees_eager 100 "${TREES[@]}" --verify_widths 32,64 --output_dir "$RESULTS/fp16_eager_trees"
WIDTHS='out=$1 end=$((SECONDS + $2)) rc=0; shift 2  # $2: seconds for all the runs; then the benchmark command
for run in compiled:16 compiled:32 compiled:64 static:6 static:16 static:32 static:64; do
  path=${run%:*} w=${run#*:}; dir=$out/fp16_${path}_w$w
  flag=--static_cache cap=45; [ "$path" = compiled ] && flag=--compile cap=90
  t=$((end - SECONDS < cap ? end - SECONDS : cap))
  if [ "$t" -lt 20 ]; then echo "-- $dir: skipped, $t s left"; rc=1; continue; fi
  echo "-- $dir (timeout $t s)"
  timeout "$t" "$@" "$flag" --gamma_decode $((w - 1)) --output_dir "$dir" || { echo "-- $dir FAILED"; rc=1; }
done
grep -H "^verify k" "$out"/*/e2e_wallclock.md; exit $rc'
left=$((TREES_S - (SECONDS - trees_start)))
step trees_widths $((left > 1 ? left : 1)) bash -c "$WIDTHS" trees_widths "$RESULTS/trees_widths" $((left - 5)) \
  "${BENCH[@]}" --configs target --max_samples 1 --warmup 0 --repeats 1 --max_new_tokens 8

if [ ${#failed[@]} -gt 0 ]; then echo "gpu_check: failed steps: ${failed[*]}"; exit 1; fi
echo "gpu_check: all steps passed; results in $RESULTS and $RESULTS.tar.gz, profiles in timings/"
