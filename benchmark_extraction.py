"""Extraction throughput (samples/s): the reference's one-by-one loop against batched extraction, one run.

    # toy world on CPU (under a minute; needs the event PNGs of
    # `preprocess_event_images.py --dataset_dir data/toy/dataset --allow_pickle`)
    python benchmark_extraction.py --dataset_dir data/toy/dataset --egpt_model data/toy/models/eventgpt \\
        --vl_model data/toy/models/video_llava --teacher_forced --output results/extraction_benchmark.json
    # tiny random weights built in memory, CPU (seconds)
    python benchmark_extraction.py --random_shape tiny --dataset_dir data/toy/dataset --max_clips 2 \\
        --max_questions 2 --max_new_tokens 8 --repeats 2 --output /tmp/extraction_benchmark_tiny.json
    # Vicuna-7B / CLIP ViT-L shapes with random weights on one GPU, fp16 (no checkpoint needed)
    python benchmark_extraction.py --random_shape 7b --dataset_dir data/toy/dataset --device cuda --dtype fp16 \\
        --max_clips 4 --batch_size 16 --teacher_forced --allow_output_mismatch \\
        --output results/extraction_benchmark_7b.json

One-by-one is the reference's extraction loop: for every (clip, question) sample both models' vision
features are computed again (video decoded, event PNG read and encoded), then each model generates
alone (batch 1). Batched is `extract_hidden_states.py`: a clip's features are computed once and
shared by its questions, and `--batch_size` samples of one or more clips generate together with left
padding. Both ways call the same `extract_hidden_states.run_models` on the same samples; the repeats
alternate between them, each timer sits between device synchronisations, and `--warmup` untimed
passes over the first batch come first. The outputs of the two ways are compared (tokens exactly,
fp16 hidden states within 2e-2), and the exit code is 1 when they differ (see --allow_output_mismatch).
"""

from __future__ import annotations

import argparse
import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cli import add_config_flag, add_dry_run_flag, alias_help, dry_run_report, parse_with_config, run_cli
from clip_data import plan_samples, render_hint
from common import UserError, atomic_write_json, markdown_table, set_seed
from extract_hidden_states import iter_batches, pair_features, run_models
from model_builders import add_model_args, check_model_args, load_runners
from preflight import preflight
from timing import Stopwatch, spread
from vlm_runners import model_description

log = logging.getLogger("xmodal_sd.bench_extract")

HIDDEN_TOL = 2e-2  # atol = rtol for fp16 hidden states, as the extraction tests use
TRAIN_SAMPLES = 52_080  # the reference's train split: 5,208 scenes x 10 questions
REFERENCE_TRAIN_HOURS = 24.0  # its one-by-one extraction of that split on one RTX 4090, 4-bit

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset_dir", default="data/toy/dataset", help="data set root with {split}/index.json, "
                   "questions.json and the event PNGs (clips are read from here in both modes)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="split the clips come from")
    p.add_argument("--max_clips", type=int, default=8, help="use the first N clips of the split")
    p.add_argument("--questions", default=None, help="questions JSON (default DATASET_DIR/questions.json)")
    p.add_argument("--max_questions", type=int, default=10, help="questions per clip (the first N, most frequent)")
    p.add_argument("--max_samples", type=int, default=None, help="cap on (clip, question) samples, clip-major")
    p.add_argument("--max_new_tokens", type=int, default=50, help="generated positions per answer")
    p.add_argument("--batch_size", type=int, default=16, help="samples generated together in the batched way")
    p.add_argument("--teacher_forced", action="store_true",
                   help="add the drafter's teacher-forced pass on the target's answer to both ways")
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each way (alternating)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes of each way over the first batch")
    add_model_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--allow_output_mismatch", "--allow_mismatch", dest="allow_mismatch", action="store_true",
                   help=alias_help("exit 0 even when the two ways' outputs differ (random weights in fp16 can flip "
                   "near-tied argmaxes between batch shapes; the timing is still valid)", "--allow_mismatch"))
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--output", default="results/extraction_benchmark.json", help="JSON file for the results")
    add_config_flag(p)
    add_dry_run_flag(p)
    args = parse_with_config(p, argv)
    for name in ("max_clips", "max_questions", "max_new_tokens", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0 or (args.max_samples is not None and args.max_samples < 1):
        p.error("--warmup must be >= 0 and --max_samples >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    check_model_args(p, args)
    args.dataset_dir = Path(args.dataset_dir)
    return args


# ----------------------------------------------------------------------------------- the two ways


def features_or_fail(egpt: Any, vl: Any, split_dir: Path, clip: dict, c: int) -> dict[tuple[str, int], torch.Tensor]:
    """`pair_features`, but an unreadable clip stops the benchmark: it needs every clip it times."""
    from clip_data import ClipReadError

    try:
        return pair_features(egpt, vl, split_dir, clip, c)
    except ClipReadError as err:
        raise UserError(f"clip {clip['id']}: {err} (the benchmark needs every clip it times)") from err


def one_by_one(egpt: Any, vl: Any, samples: list[tuple[int, int]], ctx: dict[str, Any],
               bar: tqdm) -> list[dict[str, torch.Tensor]]:
    """The reference's loop: features recomputed for every sample, batch 1."""
    outs = []
    for c, q in samples:
        feats = features_or_fail(egpt, vl, ctx["split_dir"], ctx["clips"][c], c)
        outs.append(run_models(egpt, vl, [(c, q)], ctx["questions"], feats, ctx["teacher_forced"],
                               ctx["max_new_tokens"]))
        bar.update(1)
    return outs


def batched(egpt: Any, vl: Any, samples: list[tuple[int, int]], ctx: dict[str, Any],
            bar: tqdm) -> list[dict[str, torch.Tensor]]:
    """extract_hidden_states' own loop: features once per clip, `batch_size` samples per generate."""
    outs = []
    for batch, out in iter_batches(egpt, vl, samples, ctx["clips"], ctx["split_dir"], ctx["questions"],
                                   ctx["batch_size"], ctx["teacher_forced"], ctx["max_new_tokens"]):
        outs.append(out)
        bar.update(len(batch))
    return outs


WAYS: dict[str, Callable[..., list[dict[str, torch.Tensor]]]] = {"one_by_one": one_by_one, "batched": batched}


def timed_pass(way: str, egpt: Any, vl: Any, samples: list[tuple[int, int]], ctx: dict[str, Any],
               device: torch.device, desc: str) -> tuple[float, dict[str, torch.Tensor]]:
    """(seconds, outputs concatenated over samples) of one pass, between device synchronisations."""

    with tqdm(total=len(samples), desc=desc, unit="sample", leave=False, dynamic_ncols=True, disable=None) as bar:
        watch = Stopwatch(device)
        outs = WAYS[way](egpt, vl, samples, ctx, bar)
        seconds = watch.ms() / 1e3
    return seconds, {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = HIDDEN_TOL) -> dict[str, Any]:
    """Tokens and masks must be equal; hidden states within atol = rtol = `tol` where the tokens agree.

    Hidden states are only compared for samples whose tokens agree (after a different token the
    two answers continue from different text, so their states are not expected to match).
    """
    n = a["egpt_tokens"].shape[0]
    same = torch.ones(n, dtype=torch.bool)
    for key in ("egpt_tokens", "vl_tokens", "egpt_mask", "vl_mask"):
        same &= (a[key] == b[key]).flatten(1).all(1)
    worst, ok = 0.0, True
    hidden_keys = [k for k in a if "hidden" in k]
    for key in hidden_keys:
        x, y = a[key][same].float(), b[key][same].float()
        if x.numel():
            worst = max(worst, float((x - y).abs().max()))
            ok &= bool(((x - y).abs() <= tol + tol * y.abs()).all())
    return {
        "samples": n,
        "samples_with_equal_tokens": int(same.sum()),
        "tokens_equal": bool(same.all()),
        "hidden_keys": hidden_keys,
        "hidden_max_abs_diff": worst,
        "hidden_atol": tol,
        "hidden_rtol": tol,
        "hidden_within_tolerance": ok,
        "passed": bool(same.all()) and ok,
    }


def summarise(seconds: list[float], samples: int, positions: int) -> dict[str, Any]:
    """Median and range of the repeats; samples/s from the median time (min/max from the extremes)."""
    s = spread(seconds)
    med = s["median"]
    return {
        "samples": samples,
        "seconds": seconds,
        "median_s": med,
        "min_s": s["min"],
        "max_s": s["max"],
        "samples_per_s": samples / med,
        "samples_per_s_min": samples / max(seconds),
        "samples_per_s_max": samples / min(seconds),
        "generated_positions": positions,
        "projected_train_hours": TRAIN_SAMPLES / (samples / med) / 3600,
    }


def format_table(result: dict[str, Any]) -> str:
    rows = []
    for way in WAYS:
        r = result[way]
        rows.append([
            way.replace("_", "-"), str(r["samples"]), f"{r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f})",
            f"{r['samples_per_s']:.3f} ({r['samples_per_s_min']:.3f}-{r['samples_per_s_max']:.3f})",
            f"{r['projected_train_hours']:.2f}",
        ])
    sp, eq = result["speedup"], result["equality"]
    rows.append(["speed-up (paired repeats)", "", "", f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})",
                 f"{REFERENCE_TRAIN_HOURS / sp['median']:.1f} (24 h / speed-up)"])
    header = ["way", "samples", "seconds, median (min-max)", "samples/s, median (min-max)",
              f"{TRAIN_SAMPLES:,} samples, h"]
    check = (f"equality check: {'PASSED' if eq['passed'] else 'FAILED'} - tokens equal in "
             f"{eq['samples_with_equal_tokens']}/{eq['samples']} samples, hidden max |diff| "
             f"{eq['hidden_max_abs_diff']:.2e} (tolerance {eq['hidden_atol']:g} abs + rel)")
    return markdown_table(header, rows) + "\n" + check


# ----------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    import transformers

    from clip_data import load_index, load_questions
    from event_frames import read_frame_settings

    checks = preflight(args)  # seconds, before the models load
    if args.dry_run:
        return dry_run_report("benchmark_extraction.py", checks, [
            f"time both extraction ways on {args.max_clips} clips of {args.split}, {args.repeats} repeats, "
            f"into {args.output}"])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    split_dir = args.dataset_dir / args.split
    clips = load_index(args.dataset_dir, args.split)[: args.max_clips]
    questions = load_questions(args.questions or args.dataset_dir, args.max_questions)
    samples = plan_samples(len(clips), len(questions), args.max_samples)
    if not samples:
        raise UserError(f"{split_dir / 'index.json'} lists no clips; pick a split that has some")
    egpt, vl = load_runners(args, questions)
    # Check the files before timing anything: a missing PNG should not surface after minutes.
    missing = [str(p) for c in {s[0] for s in samples}
               for p in [*egpt.event_image_paths(split_dir, clips[c]), split_dir / clips[c]["video"]]
               if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} input files missing, e.g. {missing[0]} ({render_hint(args.dataset_dir)})")
    device = egpt.device
    ctx = {"split_dir": split_dir, "clips": clips, "questions": questions, "teacher_forced": args.teacher_forced,
           "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    used_clips = len({c for c, _ in samples})
    log.info("benchmark: %d samples (%d clips x up to %d questions), batch %d, %d new tokens%s, on %s (EventGPT %s, "
             "Video-LLaVA %s)", len(samples), used_clips, len(questions), args.batch_size, args.max_new_tokens,
             ", teacher-forced" if args.teacher_forced else "", device, egpt.dtype, vl.dtype)

    warm = samples[: args.batch_size]
    for i in range(args.warmup):
        for way in WAYS:
            timed_pass(way, egpt, vl, warm, ctx, device, f"warm-up {way} {i + 1}")
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    first: dict[str, dict[str, torch.Tensor]] = {}
    for r in range(args.repeats):
        for way in WAYS:  # alternate, so slow drift of the machine hits both ways alike
            sec, out = timed_pass(way, egpt, vl, samples, ctx, device, f"{way} {r + 1}/{args.repeats}")
            seconds[way].append(sec)
            first.setdefault(way, out)
            log.info("repeat %d %s: %.2fs (%.3f samples/s)", r + 1, way, sec, len(samples) / sec)

    equality = compare(first["batched"], first["one_by_one"])
    ratios = [a / b for a, b in zip(seconds["one_by_one"], seconds["batched"], strict=True)]
    done = {w: int(first[w]["egpt_tokens"].shape[0]) for w in WAYS}  # rows each way actually produced
    positions = {w: int(first[w]["egpt_mask"].sum() + first[w]["vl_mask"].sum()) for w in WAYS}
    result: dict[str, Any] = {
        "mode": f"random:{args.random_shape}" if args.random_shape else "checkpoints",
        "shape": getattr(args, "shape", None),
        "models": {"drafter": model_description(egpt), "target": model_description(vl)},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "egpt_dtype": str(egpt.dtype).removeprefix("torch."),
        "vl_dtype": str(vl.dtype).removeprefix("torch."),
        "quant": args.quant,
        "frame_pick": vl.frame_pick,
        "event_frames": read_frame_settings(split_dir / "event_image"),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dataset_dir": str(args.dataset_dir),
        "split": args.split,
        "num_clips": used_clips,
        "num_questions": len(questions),
        "num_samples": len(samples),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "teacher_forced": args.teacher_forced,
        "warmup": args.warmup,
        "warmup_samples": len(warm),
        "repeats": args.repeats,
        **{w: summarise(seconds[w], done[w], positions[w]) for w in WAYS},
        # Each repeat times both ways back to back: the median of these paired ratios shrugs off
        # load that other processes put on the machine better than a ratio of two medians does.
        "speedup": {
            **spread(ratios),
            "ratio_of_median_times": spread(seconds["one_by_one"])["median"] / spread(seconds["batched"])["median"],
            "per_repeat": ratios,
        },
        "equality": equality,
        "reference": {"train_samples": TRAIN_SAMPLES, "one_by_one_train_hours_rtx4090_4bit": REFERENCE_TRAIN_HOURS},
    }
    atomic_write_json(result, args.output)
    print(f"extraction throughput on {result['device']} (EventGPT {result['egpt_dtype']}, Video-LLaVA "
          f"{result['vl_dtype']}, {result['mode']}): {len(samples)} "
          f"samples of {used_clips} clips, batch {args.batch_size}, {args.max_new_tokens} new tokens"
          f"{', teacher-forced' if args.teacher_forced else ''}")
    print(format_table(result))
    print(f"wrote {args.output}")
    if not equality["passed"]:
        print("error: the two ways produced different outputs" + (" (allowed by --allow_output_mismatch)"
                                                                   if args.allow_mismatch else ""))
        return 0 if args.allow_mismatch else 1
    return 0


if __name__ == "__main__":
    run_cli(main, parse_args)
