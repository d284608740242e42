#!/usr/bin/env bash
# Two-phase configurations (prefill adapter x decode adapter) under every timing profile, from the
# acceptance results of run_all_eval.sh. Three runs, each writing two_phase_results_{label}.json/.md:
#   {LABEL}             measured acceptance, honest and reference cost models side by side
#   {LABEL}_concurrent  the same with EventGPT's decode steps assumed concurrent (an upper bound)
#   reference_inputs    the reference's own published inputs: its table, then what the honest model makes of it
# Every path can be overridden, e.g.
#   ACCEPTANCE=results/acceptance TIMINGS="a.json b.yaml" OUT=results/two_phase LABEL=dsec bash run_two_phase_eval.sh
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=shell_help.sh
source ./shell_help.sh && shell_help "$(basename "$0")" "${1:-}"  # --help: settings, then exit

PY=${PY:-.venv/bin/python}  # python of the project's venv
ACCEPTANCE=${ACCEPTANCE:-results/toy/acceptance}  # results of run_all_eval.sh
TIMINGS_DIR=${TIMINGS_DIR:-timings}  # the shipped timing profiles
TIMINGS=${TIMINGS:-"$TIMINGS_DIR/h100_fp16_eager_7b.json $TIMINGS_DIR/rtx4090_4bit_reference.json"}  # timing profiles, space-separated
OUT=${OUT:-results/toy/two_phase}  # where the JSON and tables go
LABEL=${LABEL:-toy}  # name in the output files
CONFIGS=${CONFIGS:-}  # prefill+decode configurations, e.g. L1+L5F,B1 (default: eval_two_phase.py's, less those without results)
PREFILL_PAIRS=${PREFILL_PAIRS:-free}  # pairing that scores prefill adapters
DECODE_PAIRS=${DECODE_PAIRS:-teacher_forced}  # pairing that scores decode adapters
NUM_TOKENS=${NUM_TOKENS:-auto}  # answer length N (auto: the test split's mean)

fail() { echo "error: $*" >&2; exit 1; }
[ -x "$PY" ] || fail "python not found at $PY (run: bash setup.sh, or set PY=...)"
[ -d "$ACCEPTANCE" ] || fail "acceptance results not found: $ACCEPTANCE (run run_all_eval.sh first, or set ACCEPTANCE=...)"
read -r -a PROFILES <<< "$TIMINGS"
[ "${#PROFILES[@]}" -gt 0 ] || fail "TIMINGS is empty: name one or more timing profiles"
for f in "${PROFILES[@]}"; do
  [ -f "$f" ] || fail "timing profile not found: $f (set TIMINGS_DIR=... or TIMINGS=\"a.json b.json\")"
done

echo "== measured acceptance, ${CONFIGS:-the default configurations}"
"$PY" eval_two_phase.py --acceptance_dir "$ACCEPTANCE" --timings "${PROFILES[@]}" ${CONFIGS:+--configs "$CONFIGS"} \
  --prefill_pairs "$PREFILL_PAIRS" --decode_pairs "$DECODE_PAIRS" --num_tokens "$NUM_TOKENS" \
  --label "$LABEL" --output_dir "$OUT"
echo "== measured acceptance, EventGPT assumed concurrent"
"$PY" eval_two_phase.py --acceptance_dir "$ACCEPTANCE" --timings "${PROFILES[@]}" ${CONFIGS:+--configs "$CONFIGS"} \
  --prefill_pairs "$PREFILL_PAIRS" --decode_pairs "$DECODE_PAIRS" --num_tokens "$NUM_TOKENS" \
  --concurrent_drafter --label "${LABEL}_concurrent" --output_dir "$OUT"
echo "== the reference's own inputs (its table under --reference_cost_model, beside the honest model)"
"$PY" eval_two_phase.py --reference_inputs --reference_cost_model --timings "${PROFILES[@]}" \
  --label reference_inputs --output_dir "$OUT"
echo "done: two-phase results in $OUT"
