"""Render event-camera clips as N temporal event frames (PNG), the images EventGPT reads.

By default this reproduces the released EventGPT preprocessing (`common/common.py`:
`get_event_images_list` + `generate_event_image`): each clip's events are cut into `--num_frames`
slices of equal event count (N // n each, the remainder in the last), and every slice is drawn on a
white canvas of (max y + 1, max x + 1) of that slice: positive polarity red, negative blue, the
latest event wins where several hit one pixel. `--split_mode time` (equal durations) and `--canvas
sensor` (the full sensor) keep this project's earlier behaviour; the manifest records which was used.
Frame i of a clip is `{prefix}_{i}.png`. See docs/PREPROCESSING.md.

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
import io
import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from PIL import Image
from tqdm import tqdm

from cli import add_config_flag, alias_help, parse_with_config, run_cli
from clip_data import read_clip_events, read_h5_events, read_recording_header
from common import UserError, atomic_write_bytes, atomic_write_json, first_line, read_json

log = logging.getLogger("xmodal_sd")

SPLITS = ("train", "val", "test")
EVENT_KEYS = ("x", "y", "t", "p")
SPLIT_MODES = ("count", "time")  # the first is the default: EventGPT's released rule
CANVAS_MODES = ("slice", "sensor")  # the first is the default: the release's per-slice canvas
DEFAULT_SPLIT_MODE, DEFAULT_CANVAS = SPLIT_MODES[0], CANVAS_MODES[0]
DEFAULT_HEIGHT, DEFAULT_WIDTH = 480, 640  # DSEC's Prophesee event sensor
MANIFEST_NAME = "manifest.json"
# 2: the canvas is recorded (version 1 always drew on the full sensor, and defaulted to equal-time slices)
MANIFEST_VERSION = 2
# Colour index 0 = no event (white), 1 = positive (red), 2 = negative (blue).
PALETTE = np.array([[255, 255, 255], [255, 0, 0], [0, 0, 255]], dtype=np.uint8)
PNG_COMPRESS_LEVEL = 1  # lossless either way; 2-4x faster to encode than 6, files ~1.5x larger


class EventFileError(ValueError):
    """One event file (or clip) cannot be used; the message names it and says what is wrong."""


# --------------------------------------------------------------------------- reading


def _arrays_from_object(obj: Any, path: Path, columns: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    """Turn whatever np.load returned into {x, y, t, p} arrays (not yet validated)."""
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0:
        obj = obj.item()  # np.save of a dict stores a 0-d object array
    if isinstance(obj, Mapping):
        missing = [k for k in EVENT_KEYS if k not in obj]
        if missing:
            raise EventFileError(
                f"{path}: missing keys {missing} (found {sorted(map(str, obj))}); "
                "the file needs x, y, t, p"
            )
        return {k: np.asarray(obj[k]) for k in EVENT_KEYS}
    if not isinstance(obj, np.ndarray):
        raise EventFileError(f"{path}: holds a {type(obj).__name__}, expected a dict or array of events")
    if obj.dtype.names is not None:
        missing = [k for k in EVENT_KEYS if k not in obj.dtype.names]
        if missing:
            raise EventFileError(
                f"{path}: structured array lacks fields {missing} (has {list(obj.dtype.names)})"
            )
        return {k: obj[k] for k in EVENT_KEYS}
    if obj.ndim == 2 and obj.shape[1] == 4:
        if columns is None:
            raise EventFileError(
                f"{path}: plain [N, 4] array with unknown column order; pass --columns (e.g. x,y,t,p)"
            )
        return {name: obj[:, i] for i, name in enumerate(columns)}
    raise EventFileError(
        f"{path}: array of shape {obj.shape} and dtype {obj.dtype} is not an event list; expected a "
        "dict or structured array with x, y, t, p, or an [N, 4] array"
    )


def read_event_file(
    path: str | os.PathLike, allow_pickle: bool = False, columns: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Read a .npy/.npz event file into raw {x, y, t, p} arrays; raises EventFileError."""
    path = Path(path)
    if not path.is_file():
        raise EventFileError(f"{path}: file not found")
    with open(path, "rb") as f:
        magic = f.read(6)
    if not magic:
        raise EventFileError(f"{path}: empty file (0 bytes); re-create it")
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK\x03\x04"):
        raise EventFileError(f"{path}: not a numpy .npy/.npz file (starts with {magic!r})")
    try:
        try:
            loaded = np.load(path, allow_pickle=False)
        except ValueError as err:
            if "allow_pickle" not in str(err):
                raise
            if not allow_pickle:
                raise EventFileError(
                    f"{path}: holds pickled Python objects (e.g. EventGPT's dict clips); pass "
                    "--allow_pickle if you trust this file, since unpickling can run code"
                ) from None
            loaded = np.load(path, allow_pickle=True)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                loaded = {k: loaded[k] for k in loaded.files}
    except EventFileError:
        raise
    except Exception as err:  # numpy/pickle/zipfile raise many types for truncated or corrupt files
        raise EventFileError(
            f"{path}: cannot read ({first_line(err)}); the file is probably truncated, re-create it"
        ) from err
    return _arrays_from_object(loaded, path, columns)


def list_h5_clips(path: str | os.PathLike, clip_duration_ms: int = 1000) -> list[tuple[int, int]]:
    """Event-index ranges of the complete `clip_duration_ms` clips of a DSEC events.h5.

    DSEC's `ms_to_idx[m]` is the index of the first event with t >= m ms, so clip i spans
    `ms_to_idx[i*D] : ms_to_idx[(i+1)*D]`. A trailing partial clip is left out.
    """
    ms_to_idx = read_recording_header(path)["ms_to_idx"]
    num_clips = max(len(ms_to_idx) - 1, 0) // clip_duration_ms
    return [
        (int(ms_to_idx[i * clip_duration_ms]), int(ms_to_idx[(i + 1) * clip_duration_ms]))
        for i in range(num_clips)
    ]


# --------------------------------------------------------------------------- validation


def _check_whole(a: np.ndarray, key: str, fail: Callable[[str], NoReturn], hint: str) -> None:
    """Floats must be finite and whole numbers; uint64 must fit int64."""
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            i = int(np.argmax(bad))
            kind = "NaN" if np.isnan(a[i]) else "infinite"
            fail(f"'{key}' has {kind} values (first at index {i}); drop or repair those events")
        frac = a != np.floor(a)
        if frac.any():
            i = int(np.argmax(frac))
            fail(f"'{key}' has non-integer values (e.g. {a[i]} at index {i}); {hint}")
    if a.dtype.kind == "u" and a.dtype.itemsize == 8 and int(a.max()) > np.iinfo(np.int64).max:
        fail(f"'{key}' has values too large for int64")


def validate_events(
    events: Mapping[str, Any],
    height: int | None = None,
    width: int | None = None,
    source: str = "events",
) -> dict[str, np.ndarray]:
    """Check one clip's events and return them normalised; raise EventFileError("{source}: problem").

    Returns x, y int32 [N], t int64 [N] (microseconds, sorted) and p int8 [N] (1 positive, 0 negative).
    Zero events is valid (a blank clip). Coordinates are checked against the sensor when its size is given.
    """

    def fail(problem: str) -> NoReturn:
        raise EventFileError(f"{source}: {problem}")

    missing = [k for k in EVENT_KEYS if k not in events]
    if missing:
        fail(f"missing keys {missing}; the events need x, y, t, p")
    arrays = {k: np.asarray(events[k]) for k in EVENT_KEYS}
    for k, a in arrays.items():
        if a.ndim != 1:
            fail(f"'{k}' must be 1-D, got shape {a.shape}")
        if a.dtype.kind not in "iuf" and not (k == "p" and a.dtype.kind == "b"):
            fail(f"'{k}' has dtype {a.dtype}; expected numbers")
    lengths = {k: len(a) for k, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        fail(f"arrays have different lengths {lengths}; each event needs all of x, y, t, p")
    if lengths["t"] == 0:
        return {
            "x": np.zeros(0, np.int32),
            "y": np.zeros(0, np.int32),
            "t": np.zeros(0, np.int64),
            "p": np.zeros(0, np.int8),
        }

    coords = {}
    for k, size, flag in (("x", width, "--width"), ("y", height, "--height")):
        a = arrays[k]
        _check_whole(a, k, fail, "pixel coordinates must be whole numbers")
        lo, hi = int(a.min()), int(a.max())  # int() of a whole float is exact here
        limit = size if size is not None else 2**31
        if lo < 0 or hi >= limit:
            what = f"the sensor's {flag[2:]} is {size}" if size is not None else "coordinates must be >= 0"
            fail(f"'{k}' outside the sensor: values span {lo}..{hi} but {what}; pass the real sensor size "
                 f"with --height/--width")
        coords[k] = a.astype(np.int32)

    _check_whole(arrays["t"], "t", fail, "timestamps must be integer microseconds")
    t = arrays["t"].astype(np.int64, copy=False)
    if (t < 0).any():
        i = int(np.argmax(t < 0))
        fail(f"negative timestamp {int(t[i])} at index {i}; timestamps are microseconds >= 0")
    back = np.diff(t) < 0
    if back.any():
        i = int(np.argmax(back))
        fail(f"timestamps are not sorted (t[{i + 1}]={int(t[i + 1])} < t[{i}]={int(t[i])}); "
             "sort the events by t before saving")

    p = arrays["p"]
    bad = ~((p == 1) | (p == 0) | (p == -1))
    if bad.any():
        i = int(np.argmax(bad))
        fail(f"polarity must be 1 (positive) or 0/-1 (negative); found {p[i]} at index {i}")
    return {"x": coords["x"], "y": coords["y"], "t": t, "p": (p > 0).astype(np.int8)}


def load_events(
    path: str | os.PathLike,
    allow_pickle: bool = False,
    columns: tuple[str, ...] | None = None,
    height: int | None = None,
    width: int | None = None,
) -> dict[str, np.ndarray]:
    """Read and validate one clip file; see `read_event_file` and `validate_events`."""
    raw = read_event_file(path, allow_pickle=allow_pickle, columns=columns)
    return validate_events(raw, height=height, width=width, source=str(path))


# --------------------------------------------------------------------------- rendering


def split_indices(t: np.ndarray, num_frames: int, split_mode: str = DEFAULT_SPLIT_MODE) -> list[tuple[int, int]]:
    """[start, end) event ranges of `num_frames` slices of sorted timestamps t [N].

    "count" (default): EventGPT's released rule, N // num_frames events per slice and the remainder
    in the last slice. "time": equal windows over [t[0], t[-1]] (the last one closed); if all events
    share one timestamp they all go to frame 0.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    n = len(t)
    if split_mode == "count":
        size = n // num_frames
        bounds = [k * size for k in range(num_frames)] + [n]
    elif split_mode == "time":
        if n == 0:
            return [(0, 0)] * num_frames
        t0, span = t[0], t[-1] - t[0]
        if span == 0:
            return [(0, n)] + [(n, n)] * (num_frames - 1)
        if np.issubdtype(np.asarray(t).dtype, np.integer):
            # event in window k  <=>  t - t0 >= k * span / num_frames  <=>  t - t0 >= ceil(...)
            t0, span = int(t0), int(span)
            edges = [t0 - (-k * span // num_frames) for k in range(1, num_frames)]
        else:
            edges = [t0 + k * span / num_frames for k in range(1, num_frames)]
        bounds = [0, *np.searchsorted(t, edges, side="left").tolist(), n]
    else:
        raise ValueError(f"unknown split_mode {split_mode!r}; choose one of {', '.join(SPLIT_MODES)}")
    return list(itertools.pairwise(bounds))


def slice_canvas(x: np.ndarray, y: np.ndarray, height: int, width: int, canvas: str) -> tuple[int, int]:
    """(height, width) of the canvas one slice's events (x, y [n]) are drawn on.

    "slice": the release's `generate_event_image`, (max y + 1, max x + 1) of the slice, so the image
    ends at the right/bottom-most event. The release cannot draw an empty slice (numpy's max of an
    empty array raises); that gets the sensor canvas, white. "sensor": always (height, width).
    """
    if canvas not in CANVAS_MODES:
        raise ValueError(f"unknown canvas {canvas!r}; choose one of {', '.join(CANVAS_MODES)}")
    if canvas == "sensor" or len(x) == 0:
        return height, width
    return int(y.max()) + 1, int(x.max()) + 1


def render_event_frames(
    x: np.ndarray,
    y: np.ndarray,
    t: np.ndarray,
    p: np.ndarray,
    num_frames: int = 5,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    split_mode: str = DEFAULT_SPLIT_MODE,
    canvas: str = DEFAULT_CANVAS,
) -> list[np.ndarray]:
    """Draw events (x, y, t, p [N], t sorted) as `num_frames` uint8 frames [H_i, W_i, 3].

    White background; positive polarity (p > 0) red, negative blue; where a pixel has several events
    in one slice the latest one decides its colour. `height` x `width` is the sensor: events outside
    it are an error, and it is the canvas of every frame with `canvas="sensor"` (and of an empty slice).
    With `canvas="slice"` (default) each frame is (max y + 1, max x + 1) of its own slice, as the
    release draws it, so frames of one clip can differ in size.
    """
    x, y, t, p = (np.asarray(a) for a in (x, y, t, p))
    n = len(t)
    if not len(x) == len(y) == len(p) == n:
        raise ValueError(f"x, y, t, p lengths differ: {len(x)}, {len(y)}, {n}, {len(p)}")
    if n and (x.min() < 0 or x.max() >= width or y.min() < 0 or y.max() >= height):
        raise ValueError(f"event coordinates fall outside the {width}x{height} sensor")
    if canvas not in CANVAS_MODES:
        raise ValueError(f"unknown canvas {canvas!r}; choose one of {', '.join(CANVAS_MODES)}")
    slices = split_indices(t, num_frames, split_mode)  # checks split_mode before any work
    # Fancy assignment with repeated indices has no guaranteed order in numpy, so the latest event
    # per pixel is found with an order-independent max. Keys grow with the event index and carry
    # the PALETTE index of the event's colour in their two low bits; 0 (no event) stays white.
    key_dtype = np.int32 if n < 2**29 else np.int64  # int32 halves the memory traffic
    key = (np.arange(n, dtype=key_dtype) << 2) | np.where(p > 0, 1, 2).astype(key_dtype)
    latest = np.empty(height * width, dtype=key_dtype)  # every canvas fits inside the sensor
    frames = []
    for start, end in slices:
        xs, ys = x[start:end], y[start:end]
        h, w = slice_canvas(xs, ys, height, width, canvas)
        buf = latest[: h * w]
        buf.fill(0)
        np.maximum.at(buf, ys.astype(np.int64) * w + xs.astype(np.int64), key[start:end])
        frames.append(np.take(PALETTE, buf & 3, axis=0).reshape(h, w, 3))
    return frames


def encode_png(frame: np.ndarray) -> bytes:
    """PNG bytes of one uint8 [H, W, 3] frame."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def frame_paths(prefix: str | os.PathLike, num_frames: int) -> list[Path]:
    """Frame i of a clip lives at f"{prefix}_{i}.png"."""
    return [Path(f"{prefix}_{i}.png") for i in range(num_frames)]


# --------------------------------------------------------------------------- one clip, many clips


@dataclass(frozen=True)
class ClipTask:
    name: str  # how error lines name it: the clip file, or "{events.h5} clip {i}"
    source: Path  # .npy/.npz clip file, or a DSEC events.h5
    out_prefix: Path  # frame i is written to f"{out_prefix}_{i}.png"
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
        records = read_json(index_path, "clip index", "re-create the dataset")
        if not isinstance(records, list):
            raise UserError(f"{index_path}: expected a list of clip records, got {type(records).__name__}")
        roots.append(split_dir / "event_image")
        for k, rec in enumerate(records):
            # Rendering needs only the event source and where the frames go (not the video).
            if (not isinstance(rec, dict) or "event_image_prefix" not in rec
                    or not ("event_npy" in rec or {"event_h5", "event_range"} <= rec.keys())):
                failures.append(f"{index_path}: record {k} lacks 'event_npy' (or 'event_h5' + 'event_range') "
                                "or 'event_image_prefix'")
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


def frame_settings(opts: RenderOptions, sensor: tuple[int | None, int | None]) -> dict[str, Any]:
    """What decides the pixels of a frame; `sensor` is the --height/--width override (None = per clip)."""
    return {"num_frames": opts.num_frames, "split_mode": opts.split_mode, "canvas": opts.canvas,
            "height": sensor[0], "width": sensor[1]}


FRAME_SETTING_KEYS = ("num_frames", "split_mode", "canvas", "height", "width")


def recorded_frame_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The frame settings an event-image manifest records, in the current form.

    Version 1 manifests did not record the canvas; that version always drew on the full sensor.
    """
    settings = {k: manifest.get(k) for k in FRAME_SETTING_KEYS}
    if manifest.get("format_version", 1) < 2:
        settings["canvas"] = "sensor"
    return settings


def read_frame_settings(root: str | os.PathLike) -> dict[str, Any] | None:
    """Frame settings recorded in ROOT/manifest.json (e.g. {split}/event_image), or None without one.

    Later stages record this next to their own settings, so data made from frames cut one way is
    never mixed with data made from frames cut another way.
    """
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    return recorded_frame_settings(read_json(path, "event image manifest", "re-render the event frames"))


def check_manifest(root: Path, opts: RenderOptions, overwrite: bool, sensor: tuple[int | None, int | None]) -> None:
    """Refuse to mix frames rendered with other settings into an existing output folder."""
    path = root / MANIFEST_NAME
    if overwrite or not path.is_file():
        return
    old_settings = read_frame_settings(root)
    settings = frame_settings(opts, sensor)
    if old_settings != settings:
        raise UserError(
            f"{root} holds frames rendered with {old_settings}, not {settings}; rerun with the same "
            "flags, or pass --overwrite to re-render every clip"
        )


def write_manifest(root: Path, opts: RenderOptions, counts: dict[str, int],
                   sensor: tuple[int | None, int | None]) -> None:
    release = opts.split_mode == DEFAULT_SPLIT_MODE and opts.canvas == DEFAULT_CANVAS
    atomic_write_json({
        "format_version": MANIFEST_VERSION,
        "writer": "preprocess_event_images.py",
        **frame_settings(opts, sensor),
        "frame_name": "{clip}_{i}.png, i = 0..num_frames-1",
        "colours": {"background": "white", "positive": "red (255,0,0)", "negative": "blue (0,0,255)",
                    "overlap": "latest event wins"},
        "split_rule": {"count": "N // num_frames events per slice, the remainder in the last (EventGPT release)",
                       "time": "equal durations over [first t, last t] of the clip"}[opts.split_mode],
        "canvas_rule": {"slice": "(max y + 1, max x + 1) of each slice (EventGPT release); empty slice: sensor",
                        "sensor": "full sensor size of each clip"}[opts.canvas],
        "matches_eventgpt_release": release,
        "last_run": counts,
    }, root / MANIFEST_NAME)


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
            start = time.perf_counter()
            out = fn()
            seconds.append(time.perf_counter() - start)
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
    for root in roots:
        check_manifest(root, opts, args.overwrite, (args.height, args.width))

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
        write_manifest(root, opts, counts, (args.height, args.width))

    log.info("done in %.1f s (%.2f M events/s overall): %d written, %d blank (zero events, white frames), "
             "%d skipped (frames exist), %d failed; %d events dropped by rectification (off the sensor)",
             elapsed, num_events / max(elapsed, 1e-9) / 1e6, counts["written"], counts["blank"], counts["skipped"],
             counts["failed"], off_sensor)
    for line in sorted(failures):
        log.error("failed: %s", line)
    return 1 if failures else 0


if __name__ == "__main__":
    run_cli(main, parse_args)
