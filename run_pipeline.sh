#!/usr/bin/env bash
# The whole pipeline, from a fresh clone: set-up, data, models, extraction, training of every adapter,
# offline evaluation, two-phase estimates, the live benchmark, and a generated RESULTS.md.
#
# With no settings it builds and uses the built-in toy world (CPU, minutes). Every stage skips work
# that is already done, so a rerun is cheap (FORCE=1 redoes the benchmarks and evaluations and retrains
# every level). `bash run_pipeline.sh --help` prints every setting with its current value, and exits.
# Real data and models are chosen by environment variables, or by one file of them (PIPELINE_ENV):
#   WORLD=dsec DATASET_DIR=data/dsec EGPT_MODEL=checkpoints/EventGPT-7b \
#     VL_MODEL=LanguageBind/Video-LLaVA-7B-hf QUANT=4bit NUM_GPUS=4 bash run_pipeline.sh
# See docs/PIPELINE.md (stages and files) and docs/REAL_MODELS.md (the 7B models and DSEC).
set -euo pipefail
cd "$(dirname "$0")"
if [ -n "${PIPELINE_ENV:-}" ]; then
  [ -f "$PIPELINE_ENV" ] || { echo "error: PIPELINE_ENV=$PIPELINE_ENV does not exist" >&2; exit 2; }
  # shellcheck disable=SC1090
  source "$PIPELINE_ENV"
fi
# shellcheck source=shell_help.sh
source ./shell_help.sh && shell_help "$(basename "$0")" "${1:-}"  # --help: settings, then exit
bash setup.sh
PY=${PY:-.venv/bin/python}  # python of the project's venv (setup.sh makes it)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 shared cores: one thread per process is fastest and steady

# ---- what to run on (defaults: the toy world) --------------------------------------------------------
WORLD=${WORLD:-toy}                                   # names data/, tasks/ and results/ subfolders
DATA=${DATA:-data/$WORLD}                             # generated data (hidden states, LM head)
DATASET_DIR=${DATASET_DIR:-}                          # a real data set (prepare_dsec_index.py); empty: toy world
EGPT_MODEL=${EGPT_MODEL:-$DATA/models/eventgpt}       # EventGPT checkpoint folder (release layout)
VL_MODEL=${VL_MODEL:-$DATA/models/video_llava}        # Video-LLaVA folder or hub id
QUANT=${QUANT:-none}                                  # none | 4bit | 8bit (bitsandbytes, CUDA)
DEVICE=${DEVICE:-auto}                                # auto | cpu | cuda
NUM_GPUS=${NUM_GPUS:-0}                               # >1: extraction and training under accelerate launch
ALLOW_PICKLE=${ALLOW_PICKLE:-1}                       # EventGPT's event .npy files are pickled dicts
TASKS=${TASKS:-tasks/$WORLD}  # training runs go here
RESULTS=${RESULTS:-results/$WORLD}  # results and RESULTS.md go here
TIMINGS_DIR=${TIMINGS_DIR:-timings}  # the shipped timing profiles
FORCE=${FORCE:-0}  # 1: redo benchmarks, evaluations and the report, and retrain every level
# ---- how much (toy-sized defaults; the reference used 10 questions, 50 tokens, 50 epochs) -----------
MAX_QUESTIONS=${MAX_QUESTIONS:-10}  # questions per clip (the reference: 10)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-50}  # answer positions (the reference: 50)
EXTRACT_BATCH=${EXTRACT_BATCH:-16}  # extraction batch size
CHUNK_SIZE=${CHUNK_SIZE:-500}  # samples per chunk file
LEVELS=${LEVELS:-"L1 L2 L3 L4 B1 E3 L5 L5F L5E"}  # adapter levels to train, in this order (the longest, HEAD_LEVELS, first: two slots pack best); E3E too: LEVELS="... E3E"
TARGET_LAYERS=${TARGET_LAYERS:-auto}  # target layer states stored for E3/E3E: auto (EAGLE-3's low/mid/high), i,j,k, none
PAIRINGS=${PAIRINGS:-"free teacher_forced"}           # pairings of the same-position levels (prefill drafting)
DECODE_PAIRINGS=${DECODE_PAIRINGS:-teacher_forced}    # next-position levels draft after verification: teacher-forced
TRAIN_ARGS=${TRAIN_ARGS:-"--num_epochs 4 --batch_size 64 --learning_rate 3e-3 --early_stopping 2"}  # extra flags of train_hidden_adapter.py for L1-L4
# next-position levels train on roll-outs (a few passes per batch) and need more epochs to draft well
DECODE_TRAIN_ARGS=${DECODE_TRAIN_ARGS:-"--num_epochs 16 --batch_size 64 --learning_rate 3e-3 --early_stopping 4"}  # the same for L5, L5F, L5E, E3E
HEAD_LEVELS=${HEAD_LEVELS:-"B1 E3"}  # the roll-out heads compared at equal budget (docs/TRAINING.md): trained with HEAD_TRAIN_ARGS
HEAD_TRAIN_ARGS=${HEAD_TRAIN_ARGS:-"--num_epochs 32 --batch_size 64 --learning_rate 3e-3 --early_stopping 6"}  # their epoch curve still rises at 32
GAMMA_DECODE=${GAMMA_DECODE:-5}  # drafts per decode iteration: the decode levels' validation roll-out, evaluation, live
TRAIN_JOBS=${TRAIN_JOBS:-2}                           # trainings side by side (one CPU thread each; 1 on GPUs)
DRAFT_STOP=${DRAFT_STOP:-fixed,expected}              # draft-length rules of the live benchmark
TOY_ARGS=${TOY_ARGS:-}                                # extra flags of make_toy_world.py (tests: --quick)
BENCH_ARGS=${BENCH_ARGS:-"--max_clips 12 --repeats 3"}   # extraction benchmark size
E2E_SAMPLES=${E2E_SAMPLES:-12}                         # live benchmark: (clip, question) samples of the test split
E2E_ARGS=${E2E_ARGS:-"--warmup 2 --repeats 3"}  # live benchmark: extra flags
E2E_TREE=${E2E_TREE:-"--tree_budget 25 --tree_topk 5 --tree_frontier 1"}  # live benchmark: each roll-out head's draft tree beside its chain (--tree_budget 0: chains only; EAGLE-2's: --tree_budget 15 --tree_topk 4)
# live benchmark configurations; on real data 'assisted' (a second full copy of the target) is left out
E2E_CONFIGS=${E2E_CONFIGS:-auto}  # auto: all on the toy world, all but assisted on real data
DEEP_GAMMA=${DEEP_GAMMA:-8}  # a second live run of B1 and E3 chains at this deeper window, beside the perfect drafter ("" = none)
DEEP_LEVELS=${DEEP_LEVELS:-"B1 E3"}  # the decode levels of that run

if [ -z "$DATASET_DIR" ]; then DATASET_DIR=$DATA/dataset; TOY=1; else TOY=0; fi
if [ "$E2E_CONFIGS" = auto ]; then
  if [ "$TOY" = 1 ]; then E2E_CONFIGS=all; else E2E_CONFIGS=target,hf_generate,prompt_lookup,prefill,decode,two_phase,synthetic; fi
fi
LM_HEAD=$DATA/vl_lm_head.pt
mkdir -p "$RESULTS" "$TASKS"
launch() {  # one process, or one per GPU under accelerate launch
  if [ "$NUM_GPUS" -gt 1 ]; then .venv/bin/accelerate launch --num_processes "$NUM_GPUS" "$@"; else $PY "$@"; fi
}
[ "$NUM_GPUS" -gt 1 ] && TRAIN_JOBS=1  # accelerate launch already takes every GPU
fresh() { [ "$FORCE" = 1 ] || [ ! -f "$1" ]; }       # true when output $1 must be (re)made
STAGE_NAMES=()
STAGE_STARTS=()
stage() { STAGE_NAMES+=("$*"); STAGE_STARTS+=("$SECONDS"); echo; echo "== $*"; }

if [ "$TOY" = 1 ]; then
  stage "1. toy world: data set + tiny EventGPT / Video-LLaVA checkpoints (a few minutes the first time)"
  # shellcheck disable=SC2086
  $PY make_toy_world.py --output_dir "$DATA" $TOY_ARGS
else
  stage "1. real data set $DATASET_DIR (index written by prepare_dsec_index.py), models $EGPT_MODEL + $VL_MODEL"
  for SPLIT in train val test; do
    [ -f "$DATASET_DIR/$SPLIT/index.json" ] || { echo "error: $DATASET_DIR/$SPLIT/index.json is missing; run prepare_dsec_index.py (docs/REAL_MODELS.md)" >&2; exit 2; }
  done
fi

stage "2. events -> event frames"
PICKLE_FLAG=()
[ "$ALLOW_PICKLE" = 1 ] && PICKLE_FLAG=(--allow_pickle)
$PY preprocess_event_images.py --dataset_dir "$DATASET_DIR" "${PICKLE_FLAG[@]}"

stage "3. paired hidden states of both models, every split (teacher-forced pairs and the target's E3 layers included)"
for SPLIT in train val test; do
  launch extract_hidden_states.py --split "$SPLIT" --chunked --chunk_size "$CHUNK_SIZE" --batch_size "$EXTRACT_BATCH" \
    --quant "$QUANT" --device "$DEVICE" --dataset_dir "$DATASET_DIR" --egpt_model "$EGPT_MODEL" --vl_model "$VL_MODEL" \
    --max_questions "$MAX_QUESTIONS" --max_new_tokens "$MAX_NEW_TOKENS" --teacher_forced --target_layers "$TARGET_LAYERS" \
    --output_dir "$DATA/hidden/$SPLIT"
done

stage "4. the target's LM head, for token-level metrics"
$PY extract_vl_lm_head.py --vl_model "$VL_MODEL" --output "$LM_HEAD" --device "$DEVICE"

stage "5. extraction throughput: the reference's one-by-one loop vs ours, side by side"
if fresh "$RESULTS/extraction_benchmark.json"; then
  # shellcheck disable=SC2086
  $PY benchmark_extraction.py --dataset_dir "$DATASET_DIR" --egpt_model "$EGPT_MODEL" --vl_model "$VL_MODEL" \
    --quant "$QUANT" --device "$DEVICE" --batch_size 16 --teacher_forced --threads 1 $BENCH_ARGS \
    --output "$RESULTS/extraction_benchmark.json"
else echo "kept $RESULTS/extraction_benchmark.json"; fi

stage "6. adapter zoo at the models' width, and its latency"
WIDTH=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['widths']['target'])" "$DATA/hidden/train/manifest.json")
$PY hidden_adapter.py --summary --hidden_dim "$WIDTH"
if fresh "$RESULTS/adapter_latency.json"; then
  $PY benchmark_adapter_latency.py --hidden_dim "$WIDTH" --repeats 10 --device "$DEVICE" --output "$RESULTS/adapter_latency.json"
else echo "kept $RESULTS/adapter_latency.json"; fi

stage "7. train every adapter level: L1-L4 on both pairings, the decode levels on teacher-forced pairs as they draft (selected on val; the test split is never read)"
# Runs are found by what their best_model.pt says (level, pairing, start), not by folder names: training_runs.py
# lists the newest finished run of each level and pairing, one `level<TAB>pairs<TAB>..<TAB>folder` line each.
list_runs() { RUNS=$($PY training_runs.py "$TASKS" --finished) || { echo "error: cannot list the runs of $TASKS" >&2; exit 1; }; }
newest_run() {  # newest finished run folder of level $1, pairing $2 (from the last list_runs)
  awk -F'\t' -v l="$1" -v p="$2" '$1 == l && $2 == p {print $4}' <<< "$RUNS"
}
# the decode (next-position) levels, from the adapter configs' roles
DECODE_LEVELS=" $($PY -c 'from hidden_adapter import levels; print(*levels(predicts="next"))') "
is_decode_level() { [[ "$DECODE_LEVELS" == *" $1 "* ]]; }
mkdir -p "$TASKS/logs"
list_runs
PIDS=()
NAMES=()
wait_one() {  # wait for the oldest running training; stop the pipeline if it failed
  local pid=${PIDS[0]} name=${NAMES[0]}
  PIDS=("${PIDS[@]:1}")
  NAMES=("${NAMES[@]:1}")
  if wait "$pid"; then tail -n 1 "$TASKS/logs/$name.log"
  else echo "error: training $name failed; see $TASKS/logs/$name.log" >&2; tail -n 5 "$TASKS/logs/$name.log" >&2; exit 1; fi
}
for LEVEL in $LEVELS; do
  if [[ " $HEAD_LEVELS " == *" $LEVEL "* ]] && is_decode_level "$LEVEL"; then
    LEVEL_PAIRINGS=$DECODE_PAIRINGS; LEVEL_ARGS="--gamma_decode $GAMMA_DECODE $HEAD_TRAIN_ARGS"
  elif is_decode_level "$LEVEL"; then LEVEL_PAIRINGS=$DECODE_PAIRINGS; LEVEL_ARGS="--gamma_decode $GAMMA_DECODE $DECODE_TRAIN_ARGS"
  else LEVEL_PAIRINGS=$PAIRINGS; LEVEL_ARGS=$TRAIN_ARGS; fi
  for PAIRS in $LEVEL_PAIRINGS; do
    done_run=$(newest_run "$LEVEL" "$PAIRS")
    if [ -n "$done_run" ] && [ "$FORCE" != 1 ]; then echo "kept $done_run"; continue; fi
    echo "-- $LEVEL on $PAIRS pairs (log: $TASKS/logs/${LEVEL}_$PAIRS.log)"
    [ "${#PIDS[@]}" -ge "$TRAIN_JOBS" ] && wait_one
    # shellcheck disable=SC2086
    launch train_hidden_adapter.py --train_data "$DATA/hidden/train" --val_data "$DATA/hidden/val" --adapter_level "$LEVEL" \
      --pairs "$PAIRS" --lm_head "$LM_HEAD" --output_dir "$TASKS" --device "$DEVICE" --no_progress $LEVEL_ARGS \
      > "$TASKS/logs/${LEVEL}_$PAIRS.log" 2>&1 &
    PIDS+=($!)
    NAMES+=("${LEVEL}_$PAIRS")
  done
done
while [ "${#PIDS[@]}" -gt 0 ]; do wait_one; done

stage "8. offline acceptance of every adapter on the test split (hidden-state and token level)"
PY=$PY TASKS=$TASKS LEVELS=$LEVELS TEST_DATA=$DATA/hidden/test LM_HEAD=$LM_HEAD OUT=$RESULTS/acceptance DEVICE=$DEVICE FORCE=$FORCE \
  GAMMA_DECODE=$GAMMA_DECODE bash run_all_eval.sh

stage "9. live lossless speculative decoding, measured against the target alone"
list_runs
PREFILL_RUN=$(newest_run L1 free)
DECODE_RUNS=()
for LEVEL in $DECODE_LEVELS; do  # every decode level, from the adapter roles
  r=$(newest_run "$LEVEL" teacher_forced)
  [ -n "$r" ] && DECODE_RUNS+=("$r/best_model.pt")
done
[ -n "$PREFILL_RUN" ] && [ "${#DECODE_RUNS[@]}" -gt 0 ] || { echo "error: no trained L1 / decode adapter in $TASKS" >&2; exit 1; }
E2E_OUT=$RESULTS/e2e
if fresh "$E2E_OUT/e2e_wallclock.json" || [ "$PREFILL_RUN/best_model.pt" -nt "$E2E_OUT/e2e_wallclock.json" ]; then
  # shellcheck disable=SC2086
  $PY benchmark_e2e_wallclock.py --dataset_dir "$DATASET_DIR" --egpt_model "$EGPT_MODEL" --vl_model "$VL_MODEL" \
    --quant "$QUANT" --device "$DEVICE" --max_questions "$MAX_QUESTIONS" --max_samples "$E2E_SAMPLES" \
    --max_new_tokens "$MAX_NEW_TOKENS" --prefill_adapter "$PREFILL_RUN/best_model.pt" --decode_adapter "${DECODE_RUNS[@]}" \
    --draft_stop "$DRAFT_STOP" --configs "$E2E_CONFIGS" --reference_profile "$TIMINGS_DIR/h200_fp16_eager_7b.json" \
    --gamma_decode "$GAMMA_DECODE" $E2E_TREE $E2E_ARGS --output_dir "$E2E_OUT"
else echo "kept $E2E_OUT/e2e_wallclock.json"; fi

DEEP_RUNS=()
for LEVEL in $DEEP_LEVELS; do r=$(newest_run "$LEVEL" teacher_forced); [ -n "$r" ] && DEEP_RUNS+=("$r/best_model.pt"); done
DEEP_OUT=$RESULTS/e2e_deep
if [ -n "$DEEP_GAMMA" ] && [ "${#DEEP_RUNS[@]}" -gt 0 ]; then
  echo "-- the same heads at gamma $DEEP_GAMMA (EAGLE-3 drafts 7-8 deep): $DEEP_LEVELS beside the perfect drafter, one run"
  if fresh "$DEEP_OUT/e2e_wallclock.json" || [ "${DEEP_RUNS[0]}" -nt "$DEEP_OUT/e2e_wallclock.json" ]; then
    # shellcheck disable=SC2086
    $PY benchmark_e2e_wallclock.py --dataset_dir "$DATASET_DIR" --egpt_model "$EGPT_MODEL" --vl_model "$VL_MODEL" \
      --quant "$QUANT" --device "$DEVICE" --max_questions "$MAX_QUESTIONS" --max_samples "$E2E_SAMPLES" \
      --max_new_tokens "$MAX_NEW_TOKENS" --decode_adapter "${DEEP_RUNS[@]}" --draft_stop fixed \
      --configs target,decode,synthetic --synthetic_acceptance 1.0 --tree_budget 0 \
      --reference_profile "$TIMINGS_DIR/h200_fp16_eager_7b.json" --gamma_decode "$DEEP_GAMMA" $E2E_ARGS \
      --output_dir "$DEEP_OUT" > "$DEEP_OUT.log" 2>&1 || { tail -n 5 "$DEEP_OUT.log" >&2; exit 1; }
  else echo "kept $DEEP_OUT/e2e_wallclock.json"; fi
fi

echo "-- offline acceptance of the same checkpoints on the live benchmark's samples (the first $E2E_SAMPLES of the test split)"
for CKPT in "$PREFILL_RUN/best_model.pt" "${DECODE_RUNS[@]}"; do
  KEY=$(awk -F'\t' -v f="$(dirname "$CKPT")" '$4 == f {print $1 "_" $2}' <<< "$RUNS")  # level_pairs, from the checkpoint
  DEST=$RESULTS/acceptance_e2e_samples/$KEY
  if fresh "$DEST/acceptance_metrics.json" || [ "$CKPT" -nt "$DEST/acceptance_metrics.json" ]; then
    $PY measure_feature_acceptance.py --checkpoint "$CKPT" --test_data "$DATA/hidden/test" --lm_head "$LM_HEAD" \
      --max_samples "$E2E_SAMPLES" --gamma_decode "$GAMMA_DECODE" --device "$DEVICE" $E2E_TREE --output_dir "$DEST" > /dev/null
  fi
done

stage "10. two-phase estimates: every configuration under every timing profile (shipped + measured here)"
PY=$PY ACCEPTANCE=$RESULTS/acceptance OUT=$RESULTS/two_phase LABEL=$WORLD \
  TIMINGS="$TIMINGS_DIR/h200_fp16_eager_7b.json $TIMINGS_DIR/h100_fp16_eager_7b.json $TIMINGS_DIR/rtx4090_4bit_reference.json $E2E_OUT/timing_profile.json" \
  bash run_two_phase_eval.sh

stage "11. RESULTS.md, generated from this run's files"
$PY write_results.py --world "$WORLD" --data_dir "$DATA" --tasks_dir "$TASKS" --results_dir "$RESULTS" \
  --output "$RESULTS/RESULTS.md"

echo
echo "time per stage (this run; kept work costs nothing):"
STAGE_STARTS+=("$SECONDS")
for i in "${!STAGE_NAMES[@]}"; do
  printf '  %5ds  %s\n' "$((STAGE_STARTS[i + 1] - STAGE_STARTS[i]))" "${STAGE_NAMES[i]:0:90}"
done
echo
echo "done: data in $DATA, adapters in $TASKS, results in $RESULTS (read $RESULTS/RESULTS.md)"
