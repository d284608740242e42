#!/usr/bin/env bash
# The decode heads' training choices, measured: every row of ROWS (`NAME LEVEL train_hidden_adapter.py flags`)
# trains one run on the train split (teacher-forced pairs, the pipeline's batch and learning rate), its
# offline roll-out is scored on the validation split at every depth in GAMMAS (measure_feature_acceptance.py;
# the test split is never read), and one table of all rows (layers, roll-out depth, losses, epochs, tokens per
# verify pass) and the validation roll-out after each epoch are written between the `<!-- ablation: ... -->` and
# `<!-- /ablation -->` markers of DOC's "EAGLE-3-grade training" section.
# Finished runs and up-to-date scores are kept (a missing depth is scored from the kept run); FORCE=1 redoes them.
#   bash run_training_ablation.sh                      # the toy world's table in docs/TRAINING.md
#   ONLY="e3_r3_kd b1_r3_kd" bash run_training_ablation.sh   # some rows (the table lists every row done)
#   TRAIN=0 DOC= bash run_training_ablation.sh           # print the table of the rows done, train nothing
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=shell_help.sh
source ./shell_help.sh && shell_help "$(basename "$0")" "${1:-}"  # --help: settings, then exit

PY=${PY:-.venv/bin/python}  # python of the project's venv
DATA=${DATA:-data/toy}  # folder holding hidden/{train,val} (with the target's layer states) and vl_lm_head.pt
OUT=${OUT:-results/toy/training_ablation}  # one folder per row: the run, val_g{G}/acceptance_metrics.json
ROWS=${ROWS:-configs/training_ablation.txt}  # the rows: NAME LEVEL FLAGS... per line (# comments)
ONLY=${ONLY:-}  # run only these row names (the table still lists every finished row)
GAMMAS=${GAMMAS:-"5 8"}  # drafting depths of the validation roll-out (live schedule)
COMMON_ARGS=${COMMON_ARGS:-"--batch_size 64 --learning_rate 3e-3"}  # flags of every row (the pipeline's)
JOBS=${JOBS:-2}  # rows trained side by side (one CPU thread each)
DEVICE=${DEVICE:-auto}  # auto | cpu | cuda
DOC=${DOC-docs/TRAINING.md}  # the page whose generated block gets the table ("" = print it only)
FORCE=${FORCE:-0}  # 1: retrain and rescore every row
TRAIN=${TRAIN:-1}  # 0: train and score nothing, only write the table of the rows already done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

fail() { echo "error: $*" >&2; exit 1; }
if [ "$TRAIN" = 1 ]; then
  for SPLIT in train val; do
    [ -f "$DATA/hidden/$SPLIT/manifest.json" ] || fail "$DATA/hidden/$SPLIT is not extracted (run_pipeline.sh stage 3)"
  done
  [ -f "$DATA/vl_lm_head.pt" ] || fail "$DATA/vl_lm_head.pt is missing (run_pipeline.sh stage 4)"
fi
[ -f "$ROWS" ] || fail "ROWS=$ROWS does not exist"
mkdir -p "$OUT"

trained() {  # true when row $1 has a finished run (kept unless FORCE=1)
  [ "$FORCE" != 1 ] && grep -qs '"finished": true' "$OUT/$1"/*_teacher_forced_*/history.json
}
one_row() {  # NAME LEVEL FLAGS...: train (unless trained), then score on the validation split at every depth
  local name=$1 level=$2
  shift 2
  local dir=$OUT/$name
  if ! trained "$name"; then
    rm -rf "$dir" && mkdir -p "$dir"
    # shellcheck disable=SC2086
    $PY train_hidden_adapter.py --train_data "$DATA/hidden/train" --val_data "$DATA/hidden/val" --adapter_level "$level" \
      --pairs teacher_forced --lm_head "$DATA/vl_lm_head.pt" --output_dir "$dir" --device "$DEVICE" --no_progress \
      --report_to none $COMMON_ARGS "$@" > "$dir/train.log" 2>&1 || { tail -n 3 "$dir/train.log" >&2; return 1; }
  fi
  local ckpt
  ckpt=$(ls -d "$dir"/"${level}"_teacher_forced_*/ | tail -n 1)best_model.pt
  for G in $GAMMAS; do
    [ "$FORCE" != 1 ] && [ "$dir/val_g$G/acceptance_metrics.json" -nt "$ckpt" ] && continue
    $PY measure_feature_acceptance.py --checkpoint "$ckpt" --test_data "$DATA/hidden/val" --lm_head "$DATA/vl_lm_head.pt" \
      --gamma_decode "$G" --device "$DEVICE" --output_dir "$dir/val_g$G" > /dev/null
  done
  echo "-- $name done" >&2
}
STARTED=()

while [ "$TRAIN" = 1 ] && read -r name level flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]] && continue
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  echo "-- $name: $level $flags" >&2
  rm -f "$OUT/$name.ok"
  # shellcheck disable=SC2086
  { one_row "$name" "$level" $flags && touch "$OUT/$name.ok"; } < /dev/null &
  STARTED+=("$name")
done < "$ROWS"
wait
for name in "${STARTED[@]}"; do [ -f "$OUT/$name.ok" ] || fail "row $name failed (see $OUT/$name/train.log)"; done

# the table, from the rows' own files: each run's recorded training (best_model.pt's drafting record, history)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
$PY - "$OUT" "$ROWS" "$GAMMAS" "$DOC" "$COMMIT" "$DATA" <<'PY'
import json, sys
from pathlib import Path

from adapter_checkpoint import read_adapter_config

out, rows_file, gammas, doc, commit, data = (Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(), sys.argv[4],
                                             sys.argv[5], sys.argv[6])
lines = ["| row | level | features | roll-out steps | losses | epochs (best) | s (train + val) | "
         + " | ".join(f"tokens/verify, gamma {g}" for g in gammas) + f" | drafts 1..k all accepted, gamma {gammas[-1]} |",
         "|" + "---|" * (7 + len(gammas) + 1)]
marks = (1, 2, 4, 6, 8, 12, 16, 24, 32)
curve = ["| row | gamma | " + " | ".join(f"epoch {k}" for k in marks) + " |", "|" + "---|" * (2 + len(marks))]
missing = []
for raw in rows_file.read_text().splitlines():
    name = raw.split()[0] if raw.strip() and not raw.startswith("#") else None
    if not name:
        continue
    run = sorted((out / name).glob("*_teacher_forced_*/history.json"))
    scores = [out / name / f"val_g{g}" / "acceptance_metrics.json" for g in gammas]
    history = json.loads(run[-1].read_text()) if run else None
    if not history or not history.get("finished") or not all(s.is_file() for s in scores):
        missing.append(name)
        continue
    config, extra = read_adapter_config(run[-1].parent / "best_model.pt")
    d = extra["drafting"]
    losses = [f"regression {d.get('regression_weight', 1.0):g}"]
    if d.get("token_loss_weight"):
        losses.append(f"token CE {d['token_loss_weight']:g}")
    if d.get("distill_weight"):
        top = f" top-{d['distill_topk']}" if d.get("distill_topk") else ""
        losses.append(f"distillation{top} {d['distill_weight']:g}")
    features = f"layers {config.target_layers}" if config.reads_layers else "last layer"
    rolls = [json.loads(s.read_text())["drafting"]["rollout"] for s in scores]
    seconds = sum(h.get("epoch_s", 0.0) for h in history["history"])
    epochs = f"{len(history['history'])} ({history['best_epoch']})"
    lines.append(f"| {name} | {config.name} | {features} | {d['rollout_steps']} (decay {d['rollout_decay']:g}) | "
                 f"{', '.join(losses)} | {epochs} | {seconds:.0f} | "
                 + " | ".join(f"{r['live_tokens_per_verify']:.2f}" for r in rolls)
                 + " | " + ", ".join(f"{p:.2f}" for p in rolls[-1]["live_per_position"]) + " |")
    # the validation roll-out after every epoch (at the run's own --gamma_decode): tokens per verify vs epochs
    by_epoch = {h["epoch"]: h["val"]["rollout"] for h in history["history"] if h["val"].get("rollout")}
    if by_epoch:
        gamma = next(iter(by_epoch.values()))["gamma"]
        curve.append(f"| {name} | {gamma} | " + " | ".join(
            f"{by_epoch[k]['live_tokens_per_verify']:.2f}" if k in by_epoch else "" for k in marks) + " |")
table = "\n".join(lines) + "\n\nValidation roll-out (tokens per verify, live schedule) after each epoch of the same runs:\n\n" + "\n".join(curve)
if missing:
    table += f"\n\nRows of {rows_file} without finished results (not run yet): {', '.join(missing)}."
print(table)
if doc:
    page = Path(doc).read_text()
    # its own markers, not docs/update_generated.py's: rerunning this command trains for hours
    if "<!-- ablation: bash run_training_ablation.sh" not in page:
        sys.exit(f"error: {doc} has no '<!-- ablation: bash run_training_ablation.sh' marker; pass DOC= to print only")
    start = page.index("<!-- ablation: bash run_training_ablation.sh")
    end = page.index("<!-- /ablation -->", start)
    block = f"<!-- ablation: bash run_training_ablation.sh @ {commit} (DATA={data} OUT={out}) -->\n{table}\n"
    Path(doc).write_text(page[:start] + block + page[end:])
    print(f"wrote the table into {doc}")
PY
