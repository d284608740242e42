#!/usr/bin/env bash
# Offline acceptance of every trained adapter in a tasks folder: the newest run of each level and
# pairing (each run's level, pairing and start time are read from its best_model.pt by training_runs.py,
# not from folder names) goes through measure_feature_acceptance.py on the test split, into
# {OUT}/{LEVEL}_{pairs}/. LEVELS="L3 L4 L5 B1 L5F" evaluates only those levels (the specification's
# run_remaining_eval.sh; its run_all_eval.sh is LEVELS="L1 L2").
# A result newer than its checkpoint is kept (FORCE=1 redoes it). Every path can be overridden:
#   TASKS=tasks/real TEST_DATA=data/hidden/test LM_HEAD=data/vl_lm_head.pt OUT=results/acceptance bash run_all_eval.sh
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=shell_help.sh
source ./shell_help.sh && shell_help "$(basename "$0")" "${1:-}"  # --help: settings, then exit

PY=${PY:-.venv/bin/python}  # python of the project's venv
TASKS=${TASKS:-tasks/toy}  # folder of training runs (train_hidden_adapter.py --output_dir)
LEVELS=${LEVELS:-}  # only these levels, e.g. "L3 L4 L5 B1 L5F" (default: every level found)
TEST_DATA=${TEST_DATA:-data/toy/hidden/test}  # test split of hidden states (extract_hidden_states.py)
LM_HEAD=${LM_HEAD:-data/toy/vl_lm_head.pt}  # target LM head file (extract_vl_lm_head.py)
OUT=${OUT:-results/toy/acceptance}  # results go to OUT/{LEVEL}_{pairs}/
GAMMA_PREFILL=${GAMMA_PREFILL:-auto}  # prefill window of the headline prefill_free (auto = 7, the reference's)
GAMMA_DECODE=${GAMMA_DECODE:-5}  # drafts per decode iteration
BATCH_SIZE=${BATCH_SIZE:-64}  # samples per adapter forward
DEVICE=${DEVICE:-auto}  # auto | cpu | cuda
FORCE=${FORCE:-0}  # 1: re-evaluate results that are up to date
L5_TARGET_INPUT=${L5_TARGET_INPUT:-1}  # also score L5 fed the target's states, as the live engine rolls it out

fail() { echo "error: $*" >&2; exit 1; }
[ -x "$PY" ] || fail "python not found at $PY (run: bash setup.sh, or set PY=...)"
[ -d "$TASKS" ] || fail "tasks folder not found: $TASKS (train adapters with train_hidden_adapter.py, or set TASKS=...)"
[ -f "$TEST_DATA/manifest.json" ] || fail "test data not found: $TEST_DATA/manifest.json (run extract_hidden_states.py --split test, or set TEST_DATA=...)"
[ -f "$LM_HEAD" ] || fail "LM head not found: $LM_HEAD (run extract_vl_lm_head.py, or set LM_HEAD=...)"

# newest finished run per (level, pairing), read from each best_model.pt and history.json (training_runs.py):
# level<TAB>pairs<TAB>L5-style<TAB>folder; an interrupted run is resumed by training, not evaluated
runs=$("$PY" training_runs.py "$TASKS" --finished ${LEVELS:+--levels $LEVELS}) || fail "cannot list the runs of $TASKS"
[ -n "$runs" ] || fail "no finished runs (a folder with best_model.pt) in $TASKS${LEVELS:+ for levels $LEVELS}"

evaluated=0
kept=0
while IFS=$'\t' read -r level pairs target_input run; do
  ckpt="$run/best_model.pt"
  key="${level}_${pairs}"
  dest="$OUT/$key"
  if [ "$FORCE" != 1 ] && [ -f "$dest/acceptance_metrics.json" ] && [ "$dest/acceptance_metrics.json" -nt "$ckpt" ] \
      && grep -qF "\"checkpoint\": \"$ckpt\"" "$dest/acceptance_metrics.json"; then
    echo "== $key: up to date ($dest)"
    kept=$((kept + 1))
    continue
  fi
  echo "== $key: $ckpt"
  "$PY" measure_feature_acceptance.py --checkpoint "$ckpt" --test_data "$TEST_DATA" --lm_head "$LM_HEAD" \
    --pairs "$pairs" --output_dir "$dest" --gamma_prefill "$GAMMA_PREFILL" --gamma_decode "$GAMMA_DECODE" \
    --batch_size "$BATCH_SIZE" --device "$DEVICE" </dev/null
  if [ "$L5_TARGET_INPUT" = 1 ] && [ "$target_input" = 1 ]; then
    echo "== $key fed the target's states: $ckpt"
    "$PY" measure_feature_acceptance.py --checkpoint "$ckpt" --test_data "$TEST_DATA" --lm_head "$LM_HEAD" \
      --pairs "$pairs" --output_dir "${dest}_target_input" --input_states target --gamma_prefill "$GAMMA_PREFILL" \
      --gamma_decode "$GAMMA_DECODE" --batch_size "$BATCH_SIZE" --device "$DEVICE" </dev/null
  fi
  evaluated=$((evaluated + 1))
done <<< "$runs"
echo "done: $evaluated evaluated, $kept up to date, results in $OUT"
