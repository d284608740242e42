"""The data set on disk, the layer every stage reads through: the clip index and its record checks, the
questions, sample planning, clip paths, each clip's events (read and validated) and its video and RGB images.

A data set folder (docs/DATA_FORMAT.md, "Clip index") holds `questions.json` and `{split}/index.json`, a
list of clip records. Paths in a record are relative to its split folder. A clip's events come from one of
two sources, named by the record:

    event_npy                   one file per clip (EventGPT's pickled dict, .npz, structured .npy)
    event_h5 + event_range      a slice [start, end) of a DSEC recording's events.h5, read when needed
                                (t0_us: the window start relative to the file's t_offset; rectify_map:
                                optional DSEC rectify_map.h5 applied to the event coordinates)

The video is `video` (an mp4 per clip); `frames` (when present) lists the source images it was made from.
Event frames (the PNGs EventGPT reads; event_frames.py draws them) live at `event_frame_path(prefix, i)`,
`{event_image_prefix}_{i}.png`. Who writes these folders: make_toy_world.py / toy_dataset.py (the toy
world's own clips) and prepare_dsec_index.py (clips cut from DSEC recordings).

What it owns:
    index       SPLITS, RECORD_KEYS, record_problem, read_index, load_index, plan_samples
    questions   questions_path, load_questions
    paths       event_frame_path (the one frame-name rule), clip_paths, render_hint
    events      EventFileError, EVENT_KEYS, read_event_file, validate_events, load_events (.npy/.npz);
                open_h5, read_recording_header, list_h5_clips, read_rectify_map, rectify_events,
                read_h5_events (DSEC events.h5); read_clip_events (one record's events, either source)
    video/RGB   ClipReadError, frame_indices, sample_video_frames, read_rgb, pick_codec, encode_mp4
    the check   check_data_folder: the cheap check a stage runs before it loads any model

    >>> from clip_data import load_index, load_questions, read_clip_events, check_data_folder
    >>> check_data_folder("data/toy/dataset", ["train"])            # raises UserError naming what is wrong
    >>> record = load_index("data/toy/dataset", "train")[0]
    >>> events = read_clip_events("data/toy/dataset/train", record, allow_pickle=True)   # x, y, t (us), p
    >>> load_events("clip.npy", height=480, width=640)              # EventFileError("clip.npy: ...") if unusable
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from common import UserError, first_line, read_json

SPLITS = ("train", "val", "test")
# Every record has these; the event source is `event_npy`, or `event_h5` with `event_range`.
RECORD_KEYS = ("id", "sequence", "clip", "video", "event_image_prefix", "height", "width")
EVENT_KEYS = ("x", "y", "t", "p")
ROOT = Path(__file__).resolve().parent
DEFAULT_QUESTIONS = ROOT / "configs" / "questions_driving.json"
INDEX_FIX = ("point --dataset_dir at a folder written by make_toy_world.py or prepare_dsec_index.py "
             "(docs/REAL_MODELS.md)")

# How Video-LLaVA's frames are picked from the n decoded frames (see `frame_indices`); the first is
# the default, LanguageBind's and the fork's `np.linspace(0, n - 1, k, dtype=int)`.
FRAME_PICKS = ("floor", "round")
DEFAULT_FRAME_PICK = FRAME_PICKS[0]


class ClipReadError(UserError, ValueError):
    """A clip's video or event image is missing or unreadable; the message names the file. Extraction counts
    and skips such clips; a stage that needs the clip stops on it with this one line (a `UserError`)."""


class EventFileError(ValueError):
    """One event file (or clip) cannot be used; the message names it and says what is wrong."""


# --------------------------------------------------------------------------------------------------
# Index, questions, sample plan, clip paths
# --------------------------------------------------------------------------------------------------


def record_problem(rec: Any, required: Sequence[str] = RECORD_KEYS) -> str | None:
    """What is wrong with one index record (None when it is usable): a key of `required` missing, or no
    event source (`event_npy`, or `event_h5` with `event_range`). A stage that needs less than every
    key (rendering needs only the events and `event_image_prefix`) passes its own `required`."""
    if not isinstance(rec, dict):
        return f"is a {type(rec).__name__}, not an object"
    missing = [k for k in required if k not in rec]
    if "event_npy" not in rec and "event_h5" not in rec:
        missing.append("event_npy (or event_h5)")
    if "event_h5" in rec and "event_range" not in rec:
        missing.append("event_range")
    return f"lacks {', '.join(missing)}" if missing else None


def read_index(dataset_dir: str | Path, split: str) -> list[Any]:
    """The records of DIR/{split}/index.json, not yet checked (`record_problem` checks one); a missing or
    malformed file, or one that is not a JSON list, -> UserError naming it."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = Path(dataset_dir) / split / "index.json"
    records = read_json(path, f"{split} index", INDEX_FIX)
    if not isinstance(records, list):
        raise UserError(f"{path} must hold a JSON list of clip records, got {type(records).__name__} ({INDEX_FIX})")
    return records


def load_index(dataset_dir: str | Path, split: str) -> list[dict]:
    """Clip records of DIR/{split}/index.json; missing or malformed (any record too) -> UserError naming the file."""
    records = read_index(dataset_dir, split)
    for i, rec in enumerate(records):
        problem = record_problem(rec)
        if problem:
            raise UserError(f"{Path(dataset_dir) / split / 'index.json'}: record {i} {problem} ({INDEX_FIX})")
    return records


def plan_samples(num_clips: int, num_questions: int, max_samples: int | None) -> list[tuple[int, int]]:
    """Global sample order, (clip, question) index pairs: clip-major, questions in file order, the first
    `max_samples` of them (all when None or 0)."""
    plan = [(c, q) for c in range(num_clips) for q in range(num_questions)]
    return plan[:max_samples] if max_samples else plan


def questions_path(path_or_dir: str | Path | None, dataset_dir: str | Path | None = None) -> Path:
    """The questions file a stage uses: `--questions` when given (a file, or a folder holding
    questions.json), else DATASET_DIR/questions.json."""
    if path_or_dir is None:
        if dataset_dir is None:
            raise UserError("no questions file: pass --questions FILE or --dataset_dir")
        path_or_dir = dataset_dir
    path = Path(path_or_dir)
    return path / "questions.json" if path.is_dir() else path


def load_questions(path_or_dir: str | Path, max_questions: int | None = None) -> list[str]:
    """Questions from questions.json (a file, or a data-set folder holding one), most frequent first.

    Accepts the reference's format [{"question": str, "count": int}, ...] (sorted by count, ties keep
    file order) or a plain list of strings (file order). `max_questions` keeps the first N.
    """
    path = questions_path(path_or_dir)
    fix = 'expected a JSON list of {"question": str, "count": int} or of strings'
    data = read_json(path, "questions file", fix)
    if not isinstance(data, list) or not data:
        raise UserError(f"questions file {path} must be a non-empty JSON list ({fix})")
    entries: list[tuple[str, int]] = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            entries.append((item, 0))
        elif isinstance(item, dict) and isinstance(item.get("question"), str):
            count = item.get("count", 0)
            if not isinstance(count, int) or isinstance(count, bool):
                raise UserError(f"questions file {path}: entry {i} has a non-integer count ({fix})")
            entries.append((item["question"], count))
        else:
            raise UserError(f"questions file {path}: entry {i} has no string 'question' ({fix})")
        if not entries[-1][0].strip():
            raise UserError(f"questions file {path}: entry {i} is an empty question ({fix})")
    order = sorted(range(len(entries)), key=lambda i: -entries[i][1])
    questions = [entries[i][0] for i in order]
    if max_questions is not None:
        if max_questions < 1:
            raise UserError(f"max_questions must be >= 1, got {max_questions}")
        questions = questions[:max_questions]
    return questions


def event_frame_path(prefix: str | os.PathLike, i: int) -> Path:
    """Where frame i of a clip's event frames lives: `{prefix}_{i}.png` (the one place this rule is written)."""
    prefix = Path(prefix)
    return prefix.parent / f"{prefix.name}_{i}.png"


def clip_paths(dataset_dir: str | Path, split: str, record: dict, num_event_images: int = 5) -> dict[str, Any]:
    """Absolute paths of one clip: split_dir, events (the .npy or events.h5), video, event_image_prefix,
    event_images (f"{prefix}_{i}.png" for i < `num_event_images`; they need not exist yet).
    `event_npy` is kept as a name for the events path."""
    split_dir = (Path(dataset_dir) / split).resolve()
    prefix = split_dir / record["event_image_prefix"]
    events = split_dir / (record["event_npy"] if "event_npy" in record else record["event_h5"])
    return {
        "split_dir": split_dir,
        "events": events,
        "event_npy": events,
        "video": split_dir / record["video"],
        "event_image_prefix": prefix,
        "event_images": [event_frame_path(prefix, i) for i in range(num_event_images)],
    }


# --------------------------------------------------------------------------------------------------
# Events: .npy/.npz files, validation, DSEC events.h5
# --------------------------------------------------------------------------------------------------


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


def open_h5(path: str | os.PathLike) -> Any:
    """An h5py.File (read-only) with the Blosc/ZSTD filters DSEC compresses with registered."""
    try:
        import h5py
        import hdf5plugin  # noqa: F401  (registers the Blosc/zstd filters)
    except ImportError as err:
        raise EventFileError(f"{path}: reading DSEC .h5 needs h5py and hdf5plugin ({err})") from err
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise EventFileError(f"{path}: cannot open as HDF5 ({first_line(err)})") from err


def read_recording_header(path: str | os.PathLike) -> dict[str, Any]:
    """ms_to_idx [L] int64, t_offset (us) and the event count of a DSEC events.h5, without reading events."""
    with open_h5(path) as f:
        missing = [n for n in (*(f"events/{k}" for k in EVENT_KEYS), "ms_to_idx") if n not in f]
        if missing:
            raise EventFileError(f"{path}: missing datasets {missing}; expected DSEC's events.h5 layout")
        lengths = {k: int(f[f"events/{k}"].shape[0]) for k in EVENT_KEYS}
        if len(set(lengths.values())) != 1:
            raise EventFileError(f"{path}: event datasets have different lengths {lengths}")
        ms_to_idx = np.asarray(f["ms_to_idx"], dtype=np.int64)
        t_offset = int(np.asarray(f["t_offset"])) if "t_offset" in f else 0
    return {"ms_to_idx": ms_to_idx, "t_offset": t_offset, "num_events": lengths["t"]}


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


def read_rectify_map(path: str | os.PathLike) -> np.ndarray:
    """DSEC's rectify_map.h5: [H, W, 2] float32, the rectified (x, y) of each raw sensor pixel."""
    with open_h5(path) as f:
        if "rectify_map" not in f:
            raise EventFileError(f"{path}: no 'rectify_map' dataset; expected DSEC's rectify_map.h5")
        rmap = np.asarray(f["rectify_map"], dtype=np.float32)
    if rmap.ndim != 3 or rmap.shape[2] != 2:
        raise EventFileError(f"{path}: rectify_map has shape {rmap.shape}, expected [H, W, 2]")
    return rmap


def rectify_events(events: dict[str, np.ndarray], rmap: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """Map raw sensor coordinates through a rectify map ([H, W, 2]) and round to the nearest pixel.

    Events that land outside the H x W sensor are dropped; returns (events, how many were dropped).
    """
    height, width = rmap.shape[:2]
    x, y = events["x"].astype(np.int64), events["y"].astype(np.int64)
    xy = rmap[y, x]
    xr, yr = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)
    keep = (xr >= 0) & (xr < width) & (yr >= 0) & (yr < height)
    out = {"x": xr[keep].astype(np.int32), "y": yr[keep].astype(np.int32),
           "t": np.asarray(events["t"])[keep], "p": np.asarray(events["p"])[keep]}
    return out, int((~keep).sum())


def read_h5_events(path: str | os.PathLike, start: int, end: int, name: str = "") -> dict[str, np.ndarray]:
    """Raw {x, y, t, p} of events [start, end) of a DSEC events.h5 (t relative to the file's t_offset)."""
    with open_h5(path) as f:
        try:
            return {k: f[f"events/{k}"][start:end] for k in EVENT_KEYS}
        except (OSError, KeyError) as err:
            raise EventFileError(f"{name or path}: cannot read events ({first_line(err)})") from err


def read_clip_events(split_dir: str | Path, record: dict, allow_pickle: bool = False,
                     columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """One clip's validated events: x, y int32 [N], t int64 [N] (us from the clip's start), p int8 (1/0).

    A record with `event_h5` is read lazily by its `event_range`, its times shifted by `t0_us` (the
    window start), its coordinates rectified when it names a `rectify_map`; the count of events the
    rectification pushed off the sensor is returned under "dropped" (0 otherwise). Raises EventFileError.
    """
    split_dir = Path(split_dir)
    height, width = int(record["height"]), int(record["width"])
    if "event_npy" in record:
        ev = load_events(split_dir / record["event_npy"], allow_pickle, columns, height, width)
        return {**ev, "dropped": 0}
    source = split_dir / record["event_h5"]
    name = f"{source} clip {record.get('id', '?')}"
    start, end = (int(v) for v in record["event_range"])
    raw = read_h5_events(source, start, end, name)
    dropped = 0
    if record.get("rectify_map"):
        raw, dropped = rectify_events(raw, read_rectify_map(split_dir / record["rectify_map"]))
    raw["t"] = np.asarray(raw["t"], dtype=np.int64) - int(record.get("t0_us", 0))
    return {**validate_events(raw, height, width, source=name), "dropped": dropped}


# --------------------------------------------------------------------------------------------------
# Frames and video
# --------------------------------------------------------------------------------------------------


def frame_indices(total: int, num_frames: int, pick: str = DEFAULT_FRAME_PICK) -> np.ndarray:
    """Indices [num_frames] of the frames to keep out of `total` decoded ones (repeats when fewer).

    "floor" (default): `np.linspace(0, total - 1, num_frames, dtype=int)`, LanguageBind's Video-LLaVA
    video loader and the research fork (20 frames -> 0,2,5,8,10,13,16,19). "round": this project's
    earlier `round(linspace(...))` (20 frames -> 0,3,5,8,11,14,16,19).
    """
    if pick not in FRAME_PICKS:
        raise UserError(f"unknown frame_pick {pick!r}; choose one of {', '.join(FRAME_PICKS)}")
    points = np.linspace(0, total - 1, num_frames)
    return (np.floor(points) if pick == "floor" else np.rint(points)).astype(int)


def _decode(container: Any) -> Iterator[Any]:
    """The frames of the first video stream, decoded on one thread.

    PyAV's threaded decoding costs more than it saves on these short clips (docs/MODELS.md has the
    measurements), and the decode counts towards the target's vision time in every benchmark.
    """
    stream = container.streams.video[0]
    stream.thread_type = "NONE"
    return container.decode(stream)


def sample_video_frames(path: str | os.PathLike, num_frames: int = 8, pick: str = DEFAULT_FRAME_PICK) -> np.ndarray:
    """Decode every frame of an mp4 with PyAV (one thread) and pick `num_frames` uniformly.

    Indices are `frame_indices(n, num_frames, pick)` over the n frames that actually decode. Returns
    uint8 [num_frames, H, W, 3] RGB. Raises `ClipReadError` naming the file when it is missing,
    unreadable or has no frames.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise ClipReadError(f"video not found: {path} (restore it, or drop its clip from the split's index.json)")
    if pick not in FRAME_PICKS:
        raise UserError(f"unknown frame_pick {pick!r}; choose one of {', '.join(FRAME_PICKS)}")
    try:
        # Pass 1 counts decoded frames (container headers can disagree with what decodes); pass 2
        # converts only the chosen ones, so a long video never sits in memory as RGB.
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipReadError(f"video {path} has no video stream")
            total = sum(1 for _ in _decode(container))
        if total == 0:
            raise ClipReadError(f"video {path} decoded to zero frames")
        idx = frame_indices(total, num_frames, pick)
        wanted = set(idx.tolist())
        picked: dict[int, np.ndarray] = {}
        with av.open(str(path)) as container:
            for i, frame in enumerate(_decode(container)):
                if i in wanted:
                    picked[i] = frame.to_ndarray(format="rgb24")
                if i >= idx[-1]:
                    break
    except ClipReadError:
        raise
    except Exception as err:  # PyAV raises many error types for truncated or non-video files
        raise ClipReadError(f"cannot decode video {path}: {type(err).__name__}: {err}") from err
    if len(picked) != len(wanted):
        raise ClipReadError(f"video {path}: second decode gave fewer than {total} frames")
    return np.stack([picked[i] for i in idx])


def render_hint(dataset_dir: str | os.PathLike) -> str:
    """The command that renders a data set's event frames, for errors about a missing PNG."""
    return (f"event frames are rendered by `python preprocess_event_images.py --dataset_dir {dataset_dir}`; "
            "add --allow_pickle for pickled .npy clips such as the toy world's, --event_frames_per_clip N for more "
            "than 5")


def read_rgb(path: str | os.PathLike, what: str = "event image") -> np.ndarray:
    """Read an image as uint8 [H, W, 3] RGB (the release's `load_image(...).convert('RGB')`); a missing or
    unreadable file raises `ClipReadError` naming it (`what` says which image it is)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ClipReadError(f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except Exception as err:  # PIL raises several types for truncated/corrupt files
        raise ClipReadError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from err


def pick_codec() -> str:
    """libx264 (H.264) when this PyAV build can encode it and decode h264, else mpeg4."""
    import av

    try:
        av.Codec("libx264", "w")
        av.Codec("h264", "r")
        return "libx264"
    except Exception:  # av raises UnknownCodecError (or ValueError in old releases)
        return "mpeg4"


def encode_mp4(frames: np.ndarray | Sequence[np.ndarray], fps: int, codec: str) -> bytes:
    """[N, H, W, 3] uint8 -> mp4 bytes (PyAV, no ffmpeg binary), yuv420p, reproducible.

    One encoder thread (x264 output depends on the thread count) and the bitexact flags on both
    codec and muxer (no library-version strings). x264 still writes its own version and options
    into the stream, so bytes match for the same libx264 build.
    """
    import av

    first = np.asarray(frames[0])
    if first.shape[0] % 2 or first.shape[1] % 2:
        raise UserError(f"frames of {first.shape[1]}x{first.shape[0]} px: yuv420p video needs even sizes")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = first.shape[1], first.shape[0]
        stream.pix_fmt = "yuv420p"
        options = {"flags": "+bitexact"}
        options.update({"crf": "18", "preset": "medium"} if codec == "libx264" else {"qscale": "3"})
        stream.codec_context.options = options
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# The check before loading
# --------------------------------------------------------------------------------------------------


def check_data_folder(dataset_dir: str | Path, splits: Iterable[str], questions: str | Path | None = None,
                      num_event_images: int = 0, max_problems: int = 5, raw_events: bool = True,
                      strict: bool = True) -> dict[str, Any]:
    """Cheap check a stage runs before loading any model: the index of each split parses, every clip's
    event source and video exist (and its first `num_event_images` event frames, when > 0), and the
    questions file (default DIR/questions.json) parses. Reads no event or video data. `raw_events=False`
    leaves out the event source (.npy / events.h5) for stages that read only the rendered event frames.

    Returns {"splits": {split: clips}, "questions": count, "questions_file": path, "clips_missing_files":
    count}; raises one UserError listing the first `max_problems` problems and how many there are in all:
    on any problem when `strict`, otherwise only when no clip of a split has its files (a stage that
    counts and skips bad clips can still run on the others).
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(f"--dataset_dir {dataset_dir} is not a folder ({INDEX_FIX})")
    qfile = questions_path(questions, dataset_dir)
    num_questions = len(load_questions(qfile))
    counts, problems, bad_clips, fatal = {}, [], 0, strict
    for split in splits:
        records = load_index(dataset_dir, split)
        counts[split] = len(records)
        bad_here = 0
        for rec in records:
            paths = clip_paths(dataset_dir, split, rec, num_event_images)
            found = len(problems)
            for what, path in (*((("events", paths["events"]),) if raw_events else ()), ("video", paths["video"]),
                               *(("event frame", p) for p in paths["event_images"])):
                if not path.is_file():
                    problems.append(f"{split} clip {rec['id']}: {what} {path} is missing")
            if rec.get("rectify_map") and not (paths["split_dir"] / rec["rectify_map"]).is_file():
                problems.append(f"{split} clip {rec['id']}: rectify map {rec['rectify_map']} is missing")
            bad_here += len(problems) > found
        bad_clips += bad_here
        fatal = fatal or (bad_here > 0 and bad_here == len(records))
    if problems and fatal:
        more = f" (and {len(problems) - max_problems} more)" if len(problems) > max_problems else ""
        hint = f"; {render_hint(dataset_dir)}" if any("event frame" in p for p in problems) else ""
        raise UserError(f"{dataset_dir}: {len(problems)} missing files: "
                        f"{'; '.join(problems[:max_problems])}{more}{hint}")
    return {"splits": counts, "questions": num_questions, "questions_file": str(qfile),
            "clips_missing_files": bad_clips}
