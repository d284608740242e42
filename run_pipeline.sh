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

echo "== 1. toy world: data set + tiny EventGPT / Video-LLaVA checkpoints (a few minutes the first time)"
$PY make_toy_world.py --output_dir "$DATA"

echo "== 2. events -> event frames (the toy clips are pickled dicts, as EventGPT's DSEC files)"
$PY preprocess_event_images.py --dataset_dir "$DATA/dataset" --allow_pickle

echo "== 3. paired hidden states of both models, every split (teacher-forced pairs included)"
for SPLIT in train val test; do
  $PY extract_hidden_states.py --split "$SPLIT" --chunked --chunk_size 500 --batch_size 16 --quant none \
    --dataset_dir "$DATA/dataset" --egpt_model "$DATA/models/eventgpt" --vl_model "$DATA/models/video_llava" \
    --teacher_forced --output_dir "$DATA/hidden/$SPLIT"
done

echo "== 4. the target's LM head, for token-level metrics"
$PY extract_vl_lm_head.py --vl_model "$DATA/models/video_llava" --output "$DATA/vl_lm_head.pt"

echo "== 5. extraction throughput: the reference's one-by-one loop vs ours, side by side"
$PY benchmark_extraction.py --dataset_dir "$DATA/dataset" --egpt_model "$DATA/models/eventgpt" \
  --vl_model "$DATA/models/video_llava" --max_clips 12 --batch_size 16 --repeats 3 --teacher_forced --threads 1 \
  --output "$RESULTS/extraction_benchmark.json"

echo "== 6. adapter zoo at the toy width, and its latency"
$PY hidden_adapter.py --summary --hidden_dim 64
$PY benchmark_adapter_latency.py --hidden_dim 64 --repeats 10 --output "$RESULTS/adapter_latency.json"

echo "done: data in $DATA, results in $RESULTS"
