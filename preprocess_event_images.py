"""Render event-camera clips as N temporal event frames (PNG), the images EventGPT reads.

By default this reproduces the released EventGPT preprocessing (`common/common.py`:
`get_event_images_list` + `generate_event_image`): each clip's events are cut into `--num_frames`
slices of equal event count (N // n each, the remainder in the last), and every slice is drawn on a
white canvas of (max y + 1, max x + 1) of that slice: positive polarity red, negative blue, the
latest event wins where several hit one pixel. `--split_mode time` (equal durations) and `--canvas
sensor` (the full sensor) keep this project's earlier behaviour; the manifest records which was used.
Frame i of a clip is `{prefix}_{i}.png`. The stage: find the clips, skip finished ones, render the
others (in worker processes) and count every failure in one line each; events are read and checked by
clip_data.py, drawn and the folder's manifest written by event_frames.py. See docs/PREPROCESSING.md.

Inputs: EventGPT's pickled-dict `.npy` clips (needs `--allow_pickle`), numpy structured arrays with
fields x, y, t, p, plain [N, 4] arrays (`--columns`), `.npz` files with arrays x, y, t, p, and DSEC's
`{seq}/events/left/events.h5`, cut into `--clip_duration_ms` clips.

Examples:
    # the toy world (tiny, CPU, seconds); its clips are EventGPT-style pickled dicts
    python preprocess_event_images.py --dataset_dir data/toy/dataset --allow_pickle
    # a folder of {seq}/{clip}.npy and/or DSEC {seq}/events/left/events.h5 recordings
    python preprocess_event_images.py --input_dir data/dsec/train_events --output_dir data/dsec/train/event_image
    # rendering throughput on synthetic events (one core)
    python preprocess_event_images.py --benchmark
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cli import add_config_flag, alias_help, parse_with_config, run_cli
from clip_data import (
    EVENT_KEYS,
    SPLITS,
    EventFileError,
    list_h5_clips,
    load_events,
    read_clip_events,
    read_h5_events,
    read_index,
    record_problem,
    validate_events,
)
from common import UserError, atomic_write_bytes, first_line
from event_frames import (
    CANVAS_MODES,
    DEFAULT_CANVAS,
    DEFAULT_HEIGHT,
    DEFAULT_SPLIT_MODE,
    DEFAULT_WIDTH,
    SPLIT_MODES,
    check_manifest,
    encode_png,
    frame_paths,
    frame_settings,
    render_event_frames,
    write_manifest,
)
from timing import Stopwatch

log = logging.getLogger("xmodal_sd")
RENDER_KEYS = ("event_image_prefix",)  # what rendering needs of an index record besides its event source


# --------------------------------------------------------------------------- one clip, many clips


@dataclass(frozen=True)
class ClipTask:
    name: str  # how error lines name it: the clip file, or "{events.h5} clip {i}"
    source: Path  # .npy/.npz clip file, or a DSEC events.h5
    out_prefix: Path  # frame i is written to frame_paths(out_prefix, n)[i], i.e. {out_prefix}_{i}.png
    height: int
    width: int
    h5_range: tuple[int, int] | None = None  # event index range inside an events.h5
    record: dict | None = None  # dataset mode: the index record, read through clip_data (source: its split folder)


@dataclass(frozen=True)
class RenderOptions:
    num_frames: int
    split_mode: str
    allow_pickle: bool
    columns: tuple[str, ...] | None
    canvas: str = DEFAULT_CANVAS


@dataclass(frozen=True)
class ClipResult:
    status: str  # "written" | "blank" | "failed"
    name: str
    num_events: int
    message: str = ""
    dropped: int = 0  # events the rectification moved off the sensor


def process_clip(task: ClipTask, opts: RenderOptions) -> ClipResult:
    """Load, validate, render and write one clip; never raises (failures come back as a result)."""
    try:
        dropped = 0
        if task.record is not None:
            record = {**task.record, "height": task.height, "width": task.width}
            ev = read_clip_events(task.source, record, opts.allow_pickle, opts.columns)
            dropped = ev["dropped"]
        elif task.h5_range is None:
            ev = load_events(task.source, opts.allow_pickle, opts.columns, task.height, task.width)
        else:
            raw = read_h5_events(task.source, *task.h5_range, name=task.name)
            ev = validate_events(raw, task.height, task.width, source=task.name)
        frames = render_event_frames(
            ev["x"], ev["y"], ev["t"], ev["p"], opts.num_frames, task.height, task.width, opts.split_mode, opts.canvas
        )
        for frame, path in zip(frames, frame_paths(task.out_prefix, opts.num_frames), strict=True):
            atomic_write_bytes(encode_png(frame), path)
        n = len(ev["t"])
        return ClipResult("written" if n else "blank", task.name, n, dropped=dropped)
    except EventFileError as err:
        return ClipResult("failed", task.name, 0, str(err))
    except Exception as err:  # disk full, permissions, ...: report it and let the other clips finish
        return ClipResult("failed", task.name, 0, f"{task.name}: {type(err).__name__}: {first_line(err)}")


def run_clips(tasks: list[ClipTask], opts: RenderOptions, num_workers: int) -> Iterator[ClipResult]:
    """Process clips in this process (num_workers=0) or in a pool; yields results as they finish."""
    if num_workers == 0 or len(tasks) <= 1:
        for task in tasks:
            yield process_clip(task, opts)
        return
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        futures = {pool.submit(process_clip, task, opts): task for task in tasks}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as err:  # a worker died (e.g. out of memory)
                name = futures[future].name
                yield ClipResult("failed", name, 0, f"{name}: worker process failed ({first_line(err)})")


def dataset_tasks(
    dataset_dir: Path, splits: list[str], height: int | None, width: int | None
) -> tuple[list[ClipTask], list[str], list[Path]]:
    """Clips of DIR/{split}/index.json: (tasks, failure lines for bad records, output roots)."""
    tasks, failures, roots = [], [], []
    for split in splits:
        split_dir = dataset_dir / split
        index_path = split_dir / "index.json"
        roots.append(split_dir / "event_image")
        for k, rec in enumerate(read_index(dataset_dir, split)):
            # Rendering needs only the event source and where the frames go (not the video).
            problem = record_problem(rec, RENDER_KEYS)
            if problem:
                failures.append(f"{index_path}: record {k} {problem}")
                continue
            source = split_dir / (rec["event_npy"] if "event_npy" in rec else rec["event_h5"])
            tasks.append(ClipTask(
                name=str(source) if "event_npy" in rec else f"{source} clip {rec.get('id', k)}",
                source=split_dir,
                out_prefix=split_dir / rec["event_image_prefix"],
                height=height or int(rec.get("height") or DEFAULT_HEIGHT),
                width=width or int(rec.get("width") or DEFAULT_WIDTH),
                record=rec,
            ))
    return tasks, failures, roots


def folder_tasks(
    input_dir: Path, output_dir: Path, height: int, width: int, clip_duration_ms: int
) -> tuple[list[ClipTask], list[str]]:
    """Clips of `{seq}/{clip}.npy|.npz` and DSEC `{seq}/events/left/events.h5` under input_dir."""
    tasks, failures = [], []
    clip_files = sorted([*input_dir.glob("*/*.npy"), *input_dir.glob("*/*.npz")])
    for path in clip_files:
        tasks.append(ClipTask(str(path), path, output_dir / path.parent.name / path.stem, height, width))
    recordings = sorted(input_dir.glob("*/events/left/events.h5"))
    for h5 in recordings:
        seq = h5.parents[2].name
        try:
            ranges = list_h5_clips(h5, clip_duration_ms)
        except EventFileError as err:
            failures.append(str(err))
            continue
        log.info("%s: %d complete clips of %d ms", h5, len(ranges), clip_duration_ms)
        for i, (start, end) in enumerate(ranges):
            tasks.append(ClipTask(
                f"{h5} clip {i:06d}", h5, output_dir / seq / f"{i:06d}", height, width, (start, end)
            ))
    if not clip_files and not recordings:
        raise UserError(
            f"no {{seq}}/{{clip}}.npy or {{seq}}/events/left/events.h5 under {input_dir}; "
            "point --input_dir at the folder holding the sequence folders"
        )
    return tasks, failures


# --------------------------------------------------------------------------- benchmark


def benchmark_rendering(
    num_events: int = 2_000_000,
    num_frames: int = 5,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    split_mode: str = DEFAULT_SPLIT_MODE,
    repeats: int = 5,
    seed: int = 0,
    canvas: str = DEFAULT_CANVAS,
) -> dict[str, Any]:
    """Time validation, rendering and PNG encoding of one synthetic 1 s clip in this process (one core)."""
    rng = np.random.default_rng(seed)
    raw = {
        "x": rng.integers(0, width, num_events, dtype=np.uint16),
        "y": rng.integers(0, height, num_events, dtype=np.uint16),
        "t": np.sort(rng.integers(0, 1_000_000, num_events)).astype(np.uint32),
        "p": rng.integers(0, 2, num_events, dtype=np.uint8),
    }

    def timed(fn: Any) -> tuple[list[float], Any]:
        out = fn()  # warm-up
        seconds = []
        for _ in range(repeats):
            watch = Stopwatch()
            out = fn()
            seconds.append(watch.ms() / 1e3)
        return seconds, out

    val_s, ev = timed(lambda: validate_events(raw, height, width))
    render_s, frames = timed(
        lambda: render_event_frames(ev["x"], ev["y"], ev["t"], ev["p"], num_frames, height, width, split_mode, canvas)
    )
    png_s, _ = timed(lambda: [encode_png(f) for f in frames])
    rate = [num_events / s / 1e6 for s in render_s]
    return {
        "num_events": num_events,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "split_mode": split_mode,
        "canvas": canvas,
        "repeats": repeats,
        "render_meps_median": statistics.median(rate),
        "render_meps_min": min(rate),
        "render_meps_max": max(rate),
        "validate_meps_median": statistics.median(num_events / s / 1e6 for s in val_s),
        "png_encode_ms_per_clip_median": statistics.median(png_s) * 1e3,
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_argument_group("what to process (pick one)")
    mode.add_argument("--dataset_dir", type=Path, help="dataset root with {split}/index.json; frames go to "
                      "each record's event_image_prefix")
    mode.add_argument("--input_dir", type=Path, help="folder of {seq}/{clip}.npy|.npz clip files and/or DSEC "
                      "{seq}/events/left/events.h5 recordings; needs --output_dir")
    mode.add_argument("--benchmark", action="store_true", help="measure rendering throughput on synthetic "
                      "events in this process (one core) and exit")
    parser.add_argument("--output_dir", type=Path, help="with --input_dir: frames go to "
                        "OUTPUT_DIR/{seq}/{clip}_{i}.png (e.g. .../train/event_image)")
    parser.add_argument("--split", choices=SPLITS, help="with --dataset_dir: only this split "
                        "(default: every split that has an index.json)")
    parser.add_argument("--event_frames_per_clip", "--num_frames", dest="num_frames", type=int, default=5,
                        help=alias_help("event frames rendered per clip (default 5)", "--num_frames"))
    parser.add_argument("--split_mode", choices=SPLIT_MODES, default=DEFAULT_SPLIT_MODE, help="cut a clip into "
                        "slices of equal event counts ('count', default: EventGPT's released code) or equal "
                        "durations ('time', this project's earlier default)")
    parser.add_argument("--canvas", choices=CANVAS_MODES, default=DEFAULT_CANVAS, help="draw each slice on "
                        "(max y + 1, max x + 1) of its own events ('slice', default: EventGPT's released code) "
                        "or on the full sensor ('sensor', this project's earlier behaviour)")
    parser.add_argument("--height", type=int, help="sensor height in pixels (default: the clip record's "
                        f"height in dataset mode, else {DEFAULT_HEIGHT})")
    parser.add_argument("--width", type=int, help="sensor width in pixels (default: the clip record's "
                        f"width in dataset mode, else {DEFAULT_WIDTH})")
    parser.add_argument("--allow_pickle", action="store_true", help="allow reading pickled .npy files "
                        "(EventGPT's dict clips); unpickling a file can run arbitrary code, so only pass "
                        "this for files you trust")
    parser.add_argument("--columns", help="column order of plain [N, 4] arrays, e.g. x,y,t,p or t,x,y,p")
    parser.add_argument("--clip_duration_ms", type=int, default=1000, help="clip length when cutting "
                        "DSEC events.h5 recordings (default 1000 ms)")
    parser.add_argument("--overwrite", action="store_true", help="re-render clips whose frames all exist")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="worker processes (default min(4, CPU count); 0 renders in this process)")
    parser.add_argument("--benchmark_events", type=int, default=2_000_000,
                        help="events in the synthetic clip of --benchmark (default 2,000,000)")
    add_config_flag(parser)
    args = parse_with_config(parser, argv)

    chosen = [f for f in ("dataset_dir", "input_dir", "benchmark") if getattr(args, f)]
    if len(chosen) != 1:
        raise UserError("pass exactly one of --dataset_dir, --input_dir, --benchmark")
    if args.input_dir is not None:
        if args.output_dir is None:
            raise UserError("--input_dir needs --output_dir (where {seq}/{clip}_{i}.png go)")
        if not args.input_dir.is_dir():
            raise UserError(f"--input_dir {args.input_dir} is not a folder")
    elif args.output_dir is not None:
        raise UserError("--output_dir only goes with --input_dir (dataset mode writes where index.json says)")
    if args.split is not None and args.dataset_dir is None:
        raise UserError("--split only goes with --dataset_dir")
    if args.dataset_dir is not None and not args.dataset_dir.is_dir():
        raise UserError(f"--dataset_dir {args.dataset_dir} is not a folder")
    for flag in ("num_frames", "height", "width", "clip_duration_ms", "benchmark_events"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.columns is not None:
        cols = tuple(c.strip() for c in args.columns.split(","))
        if sorted(cols) != sorted(EVENT_KEYS):
            raise UserError(f"--columns {args.columns!r} must name x, y, t, p once each, e.g. x,y,t,p")
        args.columns = cols
    return args


def main(args: argparse.Namespace) -> int:
    if args.benchmark:
        result = benchmark_rendering(args.benchmark_events, args.num_frames, args.height or DEFAULT_HEIGHT,
                                     args.width or DEFAULT_WIDTH, args.split_mode, canvas=args.canvas)
        log.info("rendering: %.1f M events/s per core (median of %d; min %.1f, max %.1f), validation "
                 "%.1f M events/s, PNG encoding %.1f ms per clip (%d events, %d frames of %dx%d)",
                 result["render_meps_median"], result["repeats"], result["render_meps_min"],
                 result["render_meps_max"], result["validate_meps_median"],
                 result["png_encode_ms_per_clip_median"], result["num_events"], result["num_frames"],
                 result["width"], result["height"])
        print(json.dumps(result))
        return 0

    opts = RenderOptions(args.num_frames, args.split_mode, args.allow_pickle, args.columns, args.canvas)
    if args.dataset_dir is not None:
        splits = [args.split] if args.split else [s for s in SPLITS if (args.dataset_dir / s / "index.json").is_file()]
        if not splits:
            raise UserError(f"no {{split}}/index.json under {args.dataset_dir}; is this a dataset folder?")
        tasks, failures, roots = dataset_tasks(args.dataset_dir, splits, args.height, args.width)
    else:
        tasks, failures = folder_tasks(args.input_dir, args.output_dir, args.height or DEFAULT_HEIGHT,
                                       args.width or DEFAULT_WIDTH, args.clip_duration_ms)
        roots = [args.output_dir]
    if not tasks and not failures:  # e.g. empty index files, or recordings shorter than one clip
        source = args.dataset_dir if args.dataset_dir is not None else args.input_dir
        raise UserError(f"no clips to render under {source}: the index lists none, or every recording is shorter "
                        f"than one clip (--clip_duration_ms); nothing was written")
    settings = frame_settings(opts.num_frames, opts.split_mode, opts.canvas, args.height, args.width)
    for root in roots:
        check_manifest(root, settings, args.overwrite)

    todo = [t for t in tasks
            if args.overwrite or not all(p.is_file() for p in frame_paths(t.out_prefix, opts.num_frames))]
    counts = {"written": 0, "blank": 0, "skipped": len(tasks) - len(todo), "failed": len(failures)}
    off_sensor = 0  # events the rectification moved off the sensor (DSEC records with a rectify_map)
    num_events, start = 0, time.perf_counter()
    log.info("%d clips: %d to render, %d already done; %d frames each, split by %s, %s canvas, %s",
             len(tasks), len(todo), counts["skipped"], opts.num_frames, opts.split_mode, opts.canvas,
             f"{args.num_workers} worker processes" if args.num_workers else "in this process")
    with tqdm(total=len(todo), unit="clip", desc="event frames") as bar:
        for result in run_clips(todo, opts, args.num_workers):
            counts[result.status] += 1
            off_sensor += result.dropped
            num_events += result.num_events
            if result.message:
                failures.append(result.message)
            bar.update()
    elapsed = time.perf_counter() - start
    for root in roots:
        write_manifest(root, settings, counts)

    log.info("done in %.1f s (%.2f M events/s overall): %d written, %d blank (zero events, white frames), "
             "%d skipped (frames exist), %d failed; %d events dropped by rectification (off the sensor)",
             elapsed, num_events / max(elapsed, 1e-9) / 1e6, counts["written"], counts["blank"], counts["skipped"],
             counts["failed"], off_sensor)
    for line in sorted(failures):
        log.error("failed: %s", line)
    return 1 if failures else 0


if __name__ == "__main__":
    run_cli(main, parse_args)
