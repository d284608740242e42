"""Events -> the PNG frames EventGPT reads: split, canvas, palette, render, PNG, frame settings and manifest.

By default this reproduces the released EventGPT preprocessing (`common/common.py`:
`get_event_images_list` + `generate_event_image`): a clip's events are cut into `num_frames` slices of
equal event count (N // n each, the remainder in the last), and every slice is drawn on a white canvas
of (max y + 1, max x + 1) of that slice: positive polarity red, negative blue, the latest event wins
where several hit one pixel. `split_mode="time"` (equal durations) and `canvas="sensor"` (the full
sensor) keep this project's earlier behaviour. Frame i of a clip is `clip_data.event_frame_path(prefix,
i)`. A folder of frames records how they were drawn in its `manifest.json` (`write_manifest`), which later
stages read back with `read_frame_settings`. The stage that renders whole data sets is
preprocess_event_images.py; docs/PREPROCESSING.md explains the choices.

    >>> from clip_data import load_events
    >>> from event_frames import encode_png, frame_paths, render_event_frames, read_frame_settings
    >>> ev = load_events("clip.npy", height=480, width=640)
    >>> frames = render_event_frames(ev["x"], ev["y"], ev["t"], ev["p"], num_frames=5)   # 5 x uint8 [H_i, W_i, 3]
    >>> for frame, path in zip(frames, frame_paths("out/clip", 5)):
    ...     path.write_bytes(encode_png(frame))
    >>> read_frame_settings("data/toy/dataset/train/event_image")   # {"num_frames": 5, "split_mode": "count", ...}
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clip_data import event_frame_path
from common import UserError, atomic_write_json, read_json

SPLIT_MODES = ("count", "time")  # the first is the default: EventGPT's released rule
CANVAS_MODES = ("slice", "sensor")  # the first is the default: the release's per-slice canvas
DEFAULT_SPLIT_MODE, DEFAULT_CANVAS = SPLIT_MODES[0], CANVAS_MODES[0]
DEFAULT_HEIGHT, DEFAULT_WIDTH = 480, 640  # DSEC's Prophesee event sensor
# Colour index 0 = no event (white), 1 = positive (red), 2 = negative (blue).
PALETTE = np.array([[255, 255, 255], [255, 0, 0], [0, 0, 255]], dtype=np.uint8)
PNG_COMPRESS_LEVEL = 1  # lossless either way; 2-4x faster to encode than 6, files ~1.5x larger
MANIFEST_NAME = "manifest.json"
# 2: the canvas is recorded (version 1 always drew on the full sensor, and defaulted to equal-time slices)
MANIFEST_VERSION = 2
# What decides the pixels of a frame (height/width: the sensor-size override, None = each clip's own).
FRAME_SETTING_KEYS = ("num_frames", "split_mode", "canvas", "height", "width")


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


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
    """The paths of a clip's `num_frames` frames, `clip_data.event_frame_path(prefix, i)` for each i."""
    return [event_frame_path(prefix, i) for i in range(num_frames)]


# --------------------------------------------------------------------------------------------------
# Frame settings and the manifest
# --------------------------------------------------------------------------------------------------


def frame_settings(num_frames: int, split_mode: str = DEFAULT_SPLIT_MODE, canvas: str = DEFAULT_CANVAS,
                   height: int | None = None, width: int | None = None) -> dict[str, Any]:
    """What decides the pixels of a frame, keyed as FRAME_SETTING_KEYS; `height`/`width` are the sensor-size
    override (None: each clip's own size)."""
    return {"num_frames": num_frames, "split_mode": split_mode, "canvas": canvas, "height": height, "width": width}


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


def check_manifest(root: str | os.PathLike, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix frames drawn with other `settings` (see `frame_settings`) into an existing folder."""
    if overwrite or not (Path(root) / MANIFEST_NAME).is_file():
        return
    old_settings = read_frame_settings(root)
    if old_settings != settings:
        raise UserError(
            f"{root} holds frames rendered with {old_settings}, not {settings}; rerun with the same "
            "flags, or pass --overwrite to re-render every clip"
        )


def write_manifest(root: str | os.PathLike, settings: dict[str, Any], counts: dict[str, int]) -> None:
    """Write ROOT/manifest.json: the frame settings, what they mean, and the last run's `counts`."""
    release = settings["split_mode"] == DEFAULT_SPLIT_MODE and settings["canvas"] == DEFAULT_CANVAS
    atomic_write_json({
        "format_version": MANIFEST_VERSION,
        "writer": "preprocess_event_images.py",
        **settings,
        "frame_name": "{clip}_{i}.png, i = 0..num_frames-1",
        "colours": {"background": "white", "positive": "red (255,0,0)", "negative": "blue (0,0,255)",
                    "overlap": "latest event wins"},
        "split_rule": {"count": "N // num_frames events per slice, the remainder in the last (EventGPT release)",
                       "time": "equal durations over [first t, last t] of the clip"}[settings["split_mode"]],
        "canvas_rule": {"slice": "(max y + 1, max x + 1) of each slice (EventGPT release); empty slice: sensor",
                        "sensor": "full sensor size of each clip"}[settings["canvas"]],
        "matches_eventgpt_release": release,
        "last_run": counts,
    }, Path(root) / MANIFEST_NAME)
