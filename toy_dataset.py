"""The toy world's data set: small synthetic DSEC-like clips with an RGB video and simulated events.

Each clip shows 1-3 textured shapes (circle, square, triangle, diamond) in one of six colours, each
moving left, right, up or down (slowly or fast) or standing still, over a low-contrast textured
background that belongs to the clip's sequence (its "place"). The clip is rendered at `fps * substeps`
Hz; every `substeps`-th render becomes a video frame (mp4, PyAV), and all renders drive an event
camera simulator (ESIM style: per-pixel reference log intensity, one event per threshold crossing,
timestamps interpolated linearly between renders, a little background-activity noise). A static
background therefore produces (almost) no events, exactly like a real event camera.

The folder has the shared data-set layout (questions.json, {split}/index.json, {split}/event_npy,
{split}/mp4); the scene facts go to each record's "meta", and `scene_answer(meta, question)` turns
them into the reference answer the toy VLMs are trained on. Generation is deterministic (same seed -> same bytes)
and resumable (finished clips are skipped). See docs/TOY_WORLD.md.

Usage:
    python toy_dataset.py --output_dir data/toy --seed 0                  # defaults, ~5 s on 2 CPU cores
    python toy_dataset.py --output_dir /tmp/toy_tiny --num_sequences 1 1 1 --clips_per_sequence 2 \\
        --height 48 --width 64 --fps 10                                   # tiny CPU smoke run, ~1 s

    >>> from toy_dataset import write_toy_dataset, scene_answer
    >>> from clip_data import load_index
    >>> summary = write_toy_dataset("data/toy", seed=0)
    >>> record = load_index("data/toy", "train")[0]
    >>> scene_answer(record["meta"], "What is moving in the scene?")
    'A blue square is moving up.'
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cli import run_cli
from clip_data import SPLITS, EventFileError, encode_mp4, pick_codec, read_event_file
from common import UserError, atomic_write_bytes, read_json
from event_frames import encode_png

log = logging.getLogger("xmodal_sd")

FORMAT_VERSION = 1
MANIFEST_NAME = "toy_dataset.json"

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 40),
    "green": (50, 180, 70),
    "blue": (45, 80, 225),
    "yellow": (235, 210, 50),
    "purple": (150, 70, 190),
    "orange": (245, 140, 35),
}
MOTIONS = ("left", "right", "up", "down", "static")
SPEEDS = ("slow", "fast")  # a static object has speed "none"
# Travel per second as a fraction of the frame side the object moves along.
SPEED_FRACTION = {"slow": 0.2, "fast": 0.45}
# place -> (base RGB, phrase naming it, preposition used in captions)
PLACES: dict[str, tuple[tuple[int, int, int], str, str]] = {
    "street": ((128, 128, 130), "a grey street", "on"),
    "park": ((95, 140, 85), "a green park", "in"),
    "beach": ((205, 185, 135), "a sandy beach", "on"),
    "night": ((45, 50, 85), "a dark sky", "under"),
    "room": ((170, 150, 125), "a beige room", "in"),
    "snow": ((222, 226, 232), "a snowy field", "on"),
}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = tuple(
    "center" if (r == "middle" and c == "center") else f"{r} {c}" for r in ROWS for c in COLS
)
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

# (question, count): most frequent first, the seed's questions.json format.
QUESTIONS: tuple[tuple[str, int], ...] = (
    ("What is moving in the scene?", 412),
    ("Describe the scene.", 305),
    ("Which direction is the object moving?", 248),
    ("What color is the object?", 190),
    ("How many objects are there?", 151),
    ("What shape is the object?", 117),
    ("Where is the object?", 96),
    ("How fast is the object moving?", 74),
    ("Is the camera view static?", 58),
    ("What is in the background?", 41),
)

# Event simulator defaults (v2e/ESIM-like values for a clean sensor).
CONTRAST_THRESHOLD = 0.2  # log-intensity change per event
THRESHOLD_SIGMA = 0.03  # relative per-pixel spread of the threshold (fixed-pattern mismatch)
NOISE_RATE_HZ = 0.05  # background-activity events per pixel per second
LOG_EPS = 10.0  # log(lum + eps), lum in 0..255: keeps dark pixels from firing on one-level changes
MAX_EVENTS_PER_STEP = 50  # per pixel and render step; guards against pathological jumps


# --------------------------------------------------------------------------------------------------
# Text: reference answers, captions and the toy corpus
# --------------------------------------------------------------------------------------------------

_MOTION_PHRASE = {
    "left": "to the left",
    "right": "to the right",
    "up": "up",
    "down": "down",
}
_SPEED_ADVERB = {"slow": "slowly", "fast": "quickly"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(obj: dict) -> str:
    """`a red circle` / `an orange square`."""
    return f"{_article(obj['colour'])} {obj['colour']} {obj['shape']}"


def _the(obj: dict) -> str:
    return f"the {obj['colour']} {obj['shape']}"


def _join(items: Sequence[str]) -> str:
    """`x`, `x and y`, `x, y and z`."""
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _moves(obj: dict, speed: bool = True, short: bool = False) -> str:
    """`moves quickly to the left`, `moves to the left` (no speed), short forms `moves left quickly` /
    `moves left` (short, no speed), or `stays still`."""
    if obj["motion"] == "static":
        return "stays still"
    if short:
        return f"moves {obj['motion']} {_SPEED_ADVERB[obj['speed']]}" if speed else f"moves {obj['motion']}"
    adverb = f"{_SPEED_ADVERB[obj['speed']]} " if speed else ""
    return f"moves {adverb}{_MOTION_PHRASE[obj['motion']]}"


def _objects(meta: dict) -> list[dict]:
    objects = meta.get("objects")
    if objects:
        return list(objects)
    # A meta written by hand may carry only the main object's facts at the top level.
    return [{k: meta[k] for k in ("shape", "colour", "motion", "speed", "position") if k in meta}]


def _place_phrase(meta: dict) -> tuple[str, str]:
    place = meta.get("place", "street")
    _, phrase, prep = PLACES.get(place, ((0, 0, 0), f"a {place}", "in"))
    return phrase, prep


def scene_description(meta: dict) -> str:
    """One-sentence caption of a scene, e.g. `A red circle moves quickly to the left on a grey street.`"""
    objects = _objects(meta)
    phrase, prep = _place_phrase(meta)
    # Short forms keep a caption within 20 words; adverbs only while they fit.
    parts = [f"{_a(o)} {_moves(o, speed=len(objects) < 3, short=True)}" for o in objects]
    return _cap(f"{_join(parts)} {prep} {phrase}.")


def _answer_moving(objects: list[dict]) -> str:
    movers = [o for o in objects if o["motion"] != "static"]
    if not movers:
        if len(objects) == 1:
            return f"Nothing is moving; {_the(objects[0])} stays still."
        both = "both" if len(objects) == 2 else f"all {COUNT_WORDS[len(objects)]}"
        return f"Nothing is moving; {both} objects stay still."
    if len(movers) == 1:
        o = movers[0]
        return _cap(f"{_a(o)} is moving {_MOTION_PHRASE[o['motion']]}.")
    short = len(movers) >= 3
    return _cap(_join([f"{_a(o)} {_moves(o, speed=False, short=short)}" for o in movers]) + ".")


def _answer_direction(main: dict) -> str:
    if main["motion"] == "static":
        return _cap(f"{_the(main)} is not moving; it stays in place.")
    return _cap(f"{_the(main)} is moving {_SPEED_ADVERB[main['speed']]} {_MOTION_PHRASE[main['motion']]}.")


def _all_of(n: int) -> str:
    return "Both of the objects" if n == 2 else f"All {COUNT_WORDS[n]} of the objects"


def _answer_colour(objects: list[dict]) -> str:
    n = len(objects)
    if n == 1:
        return f"The {objects[0]['shape']} is {objects[0]['colour']} in color."
    if len({o["shape"] for o in objects}) == n:  # shapes tell the objects apart
        return _cap(_join([f"the {o['shape']} is {o['colour']}" for o in objects]) + ".")
    colours = list(dict.fromkeys(o["colour"] for o in objects))
    if len(colours) == 1:
        return f"{_all_of(n)} are {colours[0]}."
    return f"The objects are {_join(colours)}."


def _answer_count(objects: list[dict]) -> str:
    n = len(objects)
    if n == 1:
        return f"There is one object: {_a(objects[0])}."
    return f"There are {COUNT_WORDS[n]} objects: {_join([_a(o) for o in objects])}."


def _answer_shape(objects: list[dict]) -> str:
    if len(objects) == 1:
        return f"The object is {_article(objects[0]['shape'])} {objects[0]['shape']}."
    counts: dict[str, int] = {}
    for o in objects:
        counts[o["shape"]] = counts.get(o["shape"], 0) + 1
    if len(counts) == 1:
        return f"{_all_of(len(objects))} are {objects[0]['shape']}s."
    parts = [f"{_article(s)} {s}" if k == 1 else f"{COUNT_WORDS[k]} {s}s" for s, k in counts.items()]
    return f"The objects are {_join(parts)}."


def _answer_position(main: dict) -> str:
    return _cap(f"{_the(main)} is in the {main['position']} of the view.")


def _answer_speed(main: dict) -> str:
    if main["motion"] == "static":
        return _cap(f"{_the(main)} does not move at all.")
    return _cap(f"{_the(main)} {_moves(main)}.")


def _answer_camera(objects: list[dict]) -> str:
    movers = [o for o in objects if o["motion"] != "static"]
    if not movers:
        return "Yes, the camera is static and nothing in the scene moves."
    if len(movers) == 1:
        return f"Yes, the camera is static; only {_the(movers[0])} moves."
    return "Yes, the camera is static; only the objects move."


def _answer_background(meta: dict) -> str:
    phrase, _ = _place_phrase(meta)
    return f"The background is {phrase} with a faint texture."


def _normalise(question: str) -> str:
    return re.sub(r"[^a-z ]+", " ", question.lower()).strip()


# Answers aim at 30-50 tokens, as long as the real Video-LLaVA's (which runs to the 50-token cap), so
# that decoding, not vision and prefill, dominates a toy answer's time as it does at 7B. The budget is
# counted in words plus punctuation marks (the toy tokenizer gives most words one token); the longest
# detail variant that fits is used.
ANSWER_BUDGET = 46


def _length(text: str) -> int:
    """Words plus punctuation marks: a tokenizer-free estimate of the toy answer's token count."""
    return len(text.split()) + len(re.findall(r"[.,:;]", text))


def _detail_variants(meta: dict) -> list[str]:
    """Sentences describing every object (colour, shape, place in the view, motion and speed) and the
    place, from the fullest to the shortest."""
    objects = _objects(meta)
    phrase, prep = _place_phrase(meta)
    scene = f"The scene is {prep} {phrase}"
    if len(objects) == 1:
        o = objects[0]
        where = f"{_cap(_the(o))} sits in the {o.get('position', 'center')} of the view and {_moves(o)}."
        return [f"{where} {scene} and the camera does not move.", f"{where} {scene}."]
    full = [f"{_the(o)} in the {o.get('position', 'center')} {_moves(o)}" for o in objects]
    placed = [f"{_the(o)} in the {o.get('position', 'center')} {_moves(o, short=True)}" for o in objects]
    short = [f"{_the(o)} {_moves(o, short=True)}" for o in objects]
    bare = [f"{_the(o)} {_moves(o, speed=False, short=True)}" for o in objects]
    variants = []
    for clauses in (full, placed, short, bare):
        body = _cap(_join(clauses)) + "."
        variants += [f"{body} {scene} and the camera does not move.", f"{body} {scene}."]
    return [*variants, body]  # the last: objects only, for a first sentence that already named the place


def _focused_answer(meta: dict, question: str) -> str:
    """The answer's first sentence: what the question asks about (5-20 words)."""
    objects = _objects(meta)
    main = objects[0]
    q = _normalise(question)
    words = set(q.split())
    if "how many" in q or "number" in words or "count" in words:
        return _answer_count(objects)
    if words & {"color", "colour", "colors", "colours"}:
        return _answer_colour(objects)
    if words & {"shape", "shapes"}:
        return _answer_shape(objects)
    if "camera" in words:
        return _answer_camera(objects)
    if words & {"fast", "speed", "quickly", "slowly"}:
        return _answer_speed(main)
    if words & {"background", "place"}:
        return _answer_background(meta)
    if "direction" in words or "which way" in q or "where is the object moving" in q:
        return _answer_direction(main)
    if "where" in words:
        return _answer_position(main)
    if "moving" in words or "move" in words or "moves" in words:
        return _answer_moving(objects)
    return scene_description(meta)


def scene_answer(meta: dict, question: str) -> str:
    """The toy world's reference answer to `question` about the scene `meta` (deterministic, 30-50 tokens).

    A focused first sentence answers the question itself (known questions and paraphrases matched by
    keyword; anything else gets the scene caption), then every object is described with its place in
    the view and its motion, then the place: the longest such description within ANSWER_BUDGET.
    """
    lead = _focused_answer(meta, question)
    variants = _detail_variants(meta)
    for detail in variants:
        if _length(lead) + _length(detail) <= ANSWER_BUDGET:
            return f"{lead} {detail}"
    return f"{lead} {variants[-1]}"


def question_texts() -> list[str]:
    """The toy questions, most frequent first."""
    return [q for q, _ in QUESTIONS]


def _coverage_metas() -> list[dict]:
    """Synthetic metas in which every categorical value appears in every role an answer can use."""
    places = list(PLACES)
    colours = list(COLOURS)
    variants = [(m, s) for m in MOTIONS if m != "static" for s in SPEEDS] + [("static", "none")]
    metas: list[dict] = []
    i = 0
    for shape in SHAPES:
        for colour in colours:
            for motion, speed in variants:
                main = {"shape": shape, "colour": colour, "motion": motion, "speed": speed,
                        "position": POSITIONS[i % len(POSITIONS)]}
                metas.append(_meta_from_objects([main], places[i % len(places)]))
                # Companions rotate through all values too, moving and static.
                others = []
                for j in (1, 2):
                    m, s = variants[(i + 3 * j) % len(variants)]
                    others.append({"shape": SHAPES[(i + j) % len(SHAPES)],
                                   "colour": colours[(i + 2 * j) % len(colours)],
                                   "motion": m, "speed": s,
                                   "position": POSITIONS[(i + j) % len(POSITIONS)]})
                metas.append(_meta_from_objects([main, others[0]], places[(i + 1) % len(places)]))
                metas.append(_meta_from_objects([main, *others], places[(i + 2) % len(places)]))
                i += 1
    still = {"motion": "static", "speed": "none", "position": "center"}
    for n in (2, 3):  # all-static, same-shape and same-colour groups have their own phrasing
        objs = [{"shape": SHAPES[k], "colour": colours[k], **still} for k in range(n)]
        metas.append(_meta_from_objects(objs, places[n]))
        for k, shape in enumerate(SHAPES):
            for colour in colours:
                same = [{"shape": shape, "colour": colour, **still} for _ in range(n)]
                metas.append(_meta_from_objects(same, places[k % len(places)]))
            odd = {"shape": SHAPES[(k + 1) % len(SHAPES)], "colour": colours[k], **still}
            pair = [{"shape": shape, "colour": colours[(k + 1) % len(colours)], **still}] * 2
            metas.append(_meta_from_objects([*pair, odd], places[k % len(places)]))
            metas.append(_meta_from_objects([odd, *pair], places[k % len(places)]))
    return metas


def toy_text_corpus(num_scenes: int = 200, seed: int = 0, height: int = 96, width: int = 128,
                    duration_s: float = 1.0) -> list[str]:
    """Every string the toy tokenizer/LM must cover: questions, captions and answers (deduplicated).

    A fixed coverage set guarantees every word any `scene_answer`/`scene_description` output can
    contain; `num_scenes` extra scenes drawn like the data set's give realistic frequencies.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7_777]))
    metas = _coverage_metas()
    for k in range(num_scenes):
        objects = sample_objects(rng, height, width, duration_s)
        metas.append(_meta_from_objects(objects, list(PLACES)[k % len(PLACES)]))
    texts = question_texts()
    for meta in metas:
        texts.append(scene_description(meta))
        texts.extend(scene_answer(meta, q) for q in question_texts())
    return list(dict.fromkeys(texts))


# --------------------------------------------------------------------------------------------------
# Scenes: background, objects, rendering
# --------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int = 12) -> np.ndarray:
    """Bilinearly upsampled random grid in [-1, 1], [H, W] float32."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw))
    fy = np.arange(height) / cell
    fx = np.arange(width) / cell
    y0, x0 = fy.astype(int), fx.astype(int)
    wy, wx = (fy - y0)[:, None], (fx - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    out = (1 - wy) * ((1 - wx) * g00 + wx * g01) + wy * ((1 - wx) * g10 + wx * g11)
    return out.astype(np.float32)


def make_background(rng: np.random.Generator, place: str, height: int, width: int) -> np.ndarray:
    """Low-contrast textured background of `place`: [H, W, 3] float32 in 0..255.

    A gentle gradient, smooth blotches and a faint fine grain; static, so it fires no events.
    """
    base = np.asarray(PLACES[place][0], dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height).astype(np.float32)
    ramp -= ramp.mean()
    shade = 1.0 + 0.15 * ramp + 0.06 * _smooth_noise(rng, height, width)
    grain = rng.normal(0.0, 1.5, size=(height, width, 1)).astype(np.float32)
    tint = rng.uniform(0.96, 1.04, size=3).astype(np.float32)
    return np.clip(base * tint * shade[..., None] + grain, 0, 255).astype(np.float32)


def _position_word(x: float, y: float, height: int, width: int) -> str:
    row = ROWS[min(2, max(0, int(3 * y / height)))]
    col = COLS[min(2, max(0, int(3 * x / width)))]
    return "center" if (row == "middle" and col == "center") else f"{row} {col}"


def object_center(obj: dict, t_s: float) -> tuple[float, float]:
    """Centre (x, y) in pixels of `obj` at time `t_s` seconds."""
    (x0, y0), (vx, vy) = obj["start_xy"], obj["velocity_px_s"]
    return x0 + vx * t_s, y0 + vy * t_s


def sample_objects(rng: np.random.Generator, height: int, width: int, duration_s: float) -> list[dict]:
    """1-3 objects with shape, colour, motion, speed, size and a start so the path stays in view.

    The first object is the scene's main object (moving in 85% of scenes); floats are rounded so the
    JSON meta describes the render exactly.
    """
    n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    side = min(height, width)
    objects = []
    for k in range(n):
        shape = str(rng.choice(SHAPES))
        colour = str(rng.choice(list(COLOURS)))
        if k == 0:
            motion = str(rng.choice(MOTIONS[:4])) if rng.random() < 0.85 else "static"
        else:
            motion = str(rng.choice(MOTIONS))
        speed = "none" if motion == "static" else str(rng.choice(SPEEDS))
        size = round(float(rng.uniform(0.08, 0.14) * side), 2)  # radius-like half extent, px
        axis_len = width if motion in ("left", "right") else height
        v = 0.0 if motion == "static" else SPEED_FRACTION[speed] * axis_len * float(rng.uniform(0.85, 1.15))
        vx = {"left": -v, "right": v}.get(motion, 0.0)
        vy = {"up": -v, "down": v}.get(motion, 0.0)
        margin = size + 1.0
        travel_x, travel_y = abs(vx) * duration_s, abs(vy) * duration_s

        def start(lo: float, hi: float, travel: float, sign: float) -> float:
            # The start leaves room for the whole path; a path longer than the frame starts at an edge.
            lo_s, hi_s = (lo + travel, hi) if sign < 0 else (lo, hi - travel)
            if hi_s < lo_s:
                return hi if sign < 0 else lo
            return float(rng.uniform(lo_s, hi_s))

        x0 = start(margin, width - margin, travel_x, np.sign(vx) if vx else 1.0)
        y0 = start(margin, height - margin, travel_y, np.sign(vy) if vy else 1.0)
        obj = {
            "shape": shape,
            "colour": colour,
            "motion": motion,
            "speed": speed,
            "size_px": size,
            "start_xy": [round(x0, 2), round(y0, 2)],
            "velocity_px_s": [round(vx, 2), round(vy, 2)],
            "rgb": list(COLOURS[colour]),
            "texture_angle": round(float(rng.uniform(0, np.pi)), 3),
            "texture_period_px": round(float(rng.uniform(4.0, 8.0)), 2),
        }
        xm, ym = object_center(obj, duration_s / 2)
        obj["position"] = _position_word(xm, ym, height, width)
        objects.append(obj)
    return objects


def _meta_from_objects(objects: list[dict], place: str) -> dict:
    main = objects[0]
    return {
        "place": place,
        "background": PLACES[place][1],
        "camera": "static",
        "count": len(objects),
        "shape": main["shape"],
        "colour": main["colour"],
        "motion": main["motion"],
        "speed": main["speed"],
        "position": main["position"],
        "moving_count": sum(o["motion"] != "static" for o in objects),
        "objects": objects,
    }


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (px, negative inside) of a shape of half-extent `r` centred at 0."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.2 * r) / math.sqrt(2.0)
    if shape == "triangle":  # pointing up; circumradius 1.3 r, inradius half of that
        big = 1.3 * r
        s = math.sqrt(3.0) / 2.0
        return np.maximum.reduce([dy, s * dx - 0.5 * dy, -s * dx - 0.5 * dy]) - big / 2.0
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def render_frame(background: np.ndarray, objects: list[dict], t_s: float) -> np.ndarray:
    """The scene at time `t_s` seconds: [H, W, 3] uint8. Anti-aliased, striped objects, later on top."""
    frame = background.copy()
    height, width = frame.shape[:2]
    for obj in objects:
        cx, cy = object_center(obj, t_s)
        reach = 1.3 * obj["size_px"] + 2.0
        x_lo, x_hi = max(0, int(cx - reach)), min(width, int(cx + reach) + 2)
        y_lo, y_hi = max(0, int(cy - reach)), min(height, int(cy + reach) + 2)
        if x_lo >= x_hi or y_lo >= y_hi:
            continue
        dy, dx = np.mgrid[y_lo:y_hi, x_lo:x_hi].astype(np.float32)
        dx -= cx
        dy -= cy
        alpha = np.clip(0.5 - _signed_distance(obj["shape"], dx, dy, obj["size_px"]), 0.0, 1.0)
        # Stripes fixed to the object: its interior has edges that fire events as it moves.
        a = obj["texture_angle"]
        u = math.cos(a) * dx + math.sin(a) * dy
        shade = 0.78 + 0.22 * np.sin(2 * np.pi * u / obj["texture_period_px"])
        colour = np.asarray(obj["rgb"], dtype=np.float32) * shade[..., None]
        patch = frame[y_lo:y_hi, x_lo:x_hi]
        frame[y_lo:y_hi, x_lo:x_hi] = patch + alpha[..., None] * (colour - patch)
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Event camera simulation
# --------------------------------------------------------------------------------------------------


def log_intensity(frames: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] uint8 RGB -> [..., H, W] float32 log(luma + LOG_EPS), luma in 0..255."""
    rgb = frames.astype(np.float32)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return np.log(luma + np.float32(LOG_EPS)).astype(np.float32)


def events_from_frames(
    frames: np.ndarray,
    times_us: np.ndarray,
    rng: np.random.Generator,
    threshold: float = CONTRAST_THRESHOLD,
    threshold_sigma: float = THRESHOLD_SIGMA,
    noise_rate_hz: float = NOISE_RATE_HZ,
) -> dict[str, np.ndarray]:
    """Simulate an event camera watching `frames` ([K, H, W, 3] uint8 at `times_us` [K] int64).

    Each pixel keeps a reference log intensity; between consecutive frames the log intensity is
    taken as linear in time, and every crossing of reference +/- threshold (per-pixel thresholds,
    fixed-pattern spread `threshold_sigma`) emits one event at the interpolated crossing time and
    moves the reference. Background-activity noise adds Poisson(`noise_rate_hz` * H * W * span)
    events at random pixels and times. Returns {x, y: int16|int32, t: int64 us sorted, p: int8 1/0}.
    """
    frames = np.asarray(frames)
    times_us = np.asarray(times_us, dtype=np.int64)
    if frames.ndim != 4 or frames.shape[0] != times_us.shape[0] or frames.shape[0] < 2:
        raise ValueError(f"need >= 2 frames [K, H, W, 3] and K times, got {frames.shape} and {times_us.shape}")
    num, height, width = frames.shape[:3]
    npix = height * width
    spread = rng.normal(0.0, threshold_sigma, size=(2, npix))
    c_pos = (threshold * np.clip(1.0 + spread[0], 0.5, 1.5)).astype(np.float32)
    c_neg = (threshold * np.clip(1.0 + spread[1], 0.5, 1.5)).astype(np.float32)
    logs = log_intensity(frames).reshape(num, npix)
    ref = logs[0].copy()
    xs, ys, ts, ps = [], [], [], []
    for k in range(num - 1):
        prev, cur = logs[k], logs[k + 1]
        diff = cur - ref
        n = np.where(diff > 0, np.floor(diff / c_pos), np.floor(-diff / c_neg)).astype(np.int64)
        idx = np.flatnonzero(n > 0)
        if idx.size == 0:
            continue
        counts = np.minimum(n[idx], MAX_EVENTS_PER_STEP)
        sign = np.where(diff[idx] > 0, 1.0, -1.0).astype(np.float32)
        step = np.where(sign > 0, c_pos[idx], c_neg[idx])
        owner = np.repeat(np.arange(idx.size), counts)
        first = np.cumsum(counts) - counts
        kth = (np.arange(owner.size) - first[owner] + 1).astype(np.float32)
        level = ref[idx][owner] + sign[owner] * kth * step[owner]
        start, delta = prev[idx][owner], (cur - prev)[idx][owner]
        safe = np.where(np.abs(delta) > 1e-6, delta, 1.0)
        frac = np.where(np.abs(delta) > 1e-6, (level - start) / safe, 1.0)
        frac = np.clip(frac, 0.0, 1.0)
        t_a, t_b = times_us[k], times_us[k + 1]
        pix = idx[owner]
        xs.append(pix % width)
        ys.append(pix // width)
        ts.append(t_a + np.floor(frac.astype(np.float64) * float(t_b - t_a)).astype(np.int64))
        ps.append((sign[owner] > 0).astype(np.int8))
        ref[idx] += sign * counts.astype(np.float32) * step
    t_first, t_last = int(times_us[0]), int(times_us[-1])
    span_s = (t_last - t_first) / 1e6
    n_noise = int(rng.poisson(noise_rate_hz * npix * span_s)) if noise_rate_hz > 0 else 0
    if n_noise:
        xs.append(rng.integers(0, width, n_noise))
        ys.append(rng.integers(0, height, n_noise))
        ts.append(rng.integers(t_first, max(t_first + 1, t_last), n_noise, dtype=np.int64))
        ps.append(rng.integers(0, 2, n_noise).astype(np.int8))
    coord = np.int16 if max(height, width) <= np.iinfo(np.int16).max else np.int32
    if not ts:
        empty = np.zeros(0, dtype=coord)
        return {"x": empty, "y": empty.copy(), "t": np.zeros(0, np.int64), "p": np.zeros(0, np.int8)}
    t = np.concatenate(ts)
    t = np.clip(t, t_first, max(t_first, t_last - 1))
    order = np.argsort(t, kind="stable")
    return {
        "x": np.concatenate(xs).astype(coord)[order],
        "y": np.concatenate(ys).astype(coord)[order],
        "t": t[order].astype(np.int64),
        "p": np.concatenate(ps).astype(np.int8)[order],
    }


def render_clip(
    background: np.ndarray,
    objects: list[dict],
    fps: int,
    duration_s: float,
    substeps: int,
    rng: np.random.Generator,
    threshold: float = CONTRAST_THRESHOLD,
    noise_rate_hz: float = NOISE_RATE_HZ,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Video frames [N, H, W, 3] uint8 (N = fps * duration_s) and the events of the same clip.

    The scene is rendered at `fps * substeps` Hz over [0, duration_s]; every `substeps`-th render is
    a video frame and all renders feed the event simulator.
    """
    num_frames = num_video_frames(fps, duration_s)
    steps = num_frames * substeps
    times_s = np.arange(steps + 1) * (duration_s / steps)
    renders = np.stack([render_frame(background, objects, float(t)) for t in times_s])
    times_us = np.rint(times_s * 1e6).astype(np.int64)
    events = events_from_frames(renders, times_us, rng, threshold=threshold, noise_rate_hz=noise_rate_hz)
    return renders[:steps:substeps].copy(), events


def num_video_frames(fps: int, duration_s: float) -> int:
    return max(1, round(fps * duration_s))


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def events_to_npy_bytes(events: dict[str, np.ndarray]) -> bytes:
    """np.save of the {x, y, t, p} dict (a pickled 0-d object array: EventGPT's DSEC clip format)."""
    buf = io.BytesIO()
    np.save(buf, {k: events[k] for k in ("x", "y", "t", "p")}, allow_pickle=True)
    return buf.getvalue()


def _seed(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


def _sequence_plan(num_sequences: Sequence[int]) -> dict[str, list[tuple[int, str]]]:
    """Globally numbered sequences, consecutive per split: no sequence can land in two splits."""
    plan: dict[str, list[tuple[int, str]]] = {}
    g = 0
    for split, n in zip(SPLITS, num_sequences, strict=True):
        plan[split] = [(g + i, f"seq_{g + i:03d}") for i in range(n)]
        g += n
    return plan


def _questions_json() -> bytes:
    return (json.dumps([{"question": q, "count": c} for q, c in QUESTIONS], indent=2) + "\n").encode()


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write_bytes(data, path)
    return True


def _clip_done(video: Path, npy: Path) -> int | None:
    """Event count of a finished clip, or None when either file is missing or unreadable."""
    if not video.is_file() or video.stat().st_size == 0 or not npy.is_file():
        return None
    try:
        return int(read_event_file(npy, allow_pickle=True)["t"].shape[0])  # our own file: pickle is safe
    except EventFileError:
        return None


@dataclass(frozen=True)
class _ClipSettings:
    """How every clip of one data set is rendered and encoded (part of the folder's config)."""

    height: int
    width: int
    fps: int
    duration_s: float
    substeps: int
    contrast_threshold: float
    noise_rate_hz: float
    codec: str
    frames_per_clip: int


def _checked_config(seed: int, num_sequences: tuple[int, ...], clips_per_sequence: int, height: int, width: int,
                    fps: int, duration_s: float, substeps: int, contrast_threshold: float,
                    noise_rate_hz: float) -> dict[str, Any]:
    """The folder's config (what its manifest records) after checking every argument."""
    if len(num_sequences) != len(SPLITS) or min(num_sequences) < 0 or sum(num_sequences) == 0:
        raise UserError(f"num_sequences must be 3 counts (train, val, test) >= 0, got {num_sequences}")
    if clips_per_sequence < 1:
        raise UserError(f"clips_per_sequence must be >= 1, got {clips_per_sequence}")
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise UserError(f"height and width must be even and >= 16 (yuv420p video), got {height}x{width}")
    if fps < 1 or duration_s <= 0 or num_video_frames(fps, duration_s) < 2:
        raise UserError(f"fps * duration_s must give >= 2 video frames, got fps={fps}, duration_s={duration_s}")
    if substeps < 1 or contrast_threshold <= 0 or noise_rate_hz < 0:
        raise UserError("substeps must be >= 1, contrast_threshold > 0 and noise_rate_hz >= 0")
    return {
        "seed": int(seed),
        "num_sequences": list(num_sequences),
        "clips_per_sequence": int(clips_per_sequence),
        "height": int(height),
        "width": int(width),
        "fps": int(fps),
        "duration_s": float(duration_s),
        "substeps": int(substeps),
        "contrast_threshold": float(contrast_threshold),
        "noise_rate_hz": float(noise_rate_hz),
    }


def _claim_folder(out: Path, config: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Refuse a folder written with another config; otherwise write its (unfinished) manifest and questions."""
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        previous = read_json(manifest_path, "toy data set manifest", "delete the folder and regenerate")
        if not isinstance(previous, dict) or previous.get("config") != config:
            old = previous.get("config") if isinstance(previous, dict) else None
            old = old if isinstance(old, dict) else {}
            diff = ", ".join(f"{k}={old.get(k)!r} (now {v!r})" for k, v in config.items() if old.get(k) != v)
            raise UserError(
                f"{out} already holds a toy data set written with {diff} "
                "(use another --output_dir or delete that folder)"
            )
    else:
        atomic_write_bytes((json.dumps(manifest, indent=2) + "\n").encode(), manifest_path)
    _write_if_changed(out / "questions.json", _questions_json())


def _write_clip(split_dir: Path, seq: str, c: int, g: int, seed: int, place: str, background: np.ndarray,
                cs: _ClipSettings) -> tuple[dict[str, Any], bool]:
    """(index record, whether files were written) of clip `c` of sequence number `g`; a finished clip is
    only read back. Each draw has its own seed path, so skipping a clip changes no other clip."""
    clip = f"{c:06d}"
    objects = sample_objects(_seed(seed, g, 2, c), cs.height, cs.width, cs.duration_s)
    rel_npy, rel_video = f"event_npy/{seq}/{clip}.npy", f"mp4/{seq}/{clip}.mp4"
    n_events = _clip_done(split_dir / rel_video, split_dir / rel_npy)
    written = n_events is None
    if written:
        frames, events = render_clip(background, objects, cs.fps, cs.duration_s, cs.substeps, _seed(seed, g, 3, c),
                                     threshold=cs.contrast_threshold, noise_rate_hz=cs.noise_rate_hz)
        atomic_write_bytes(events_to_npy_bytes(events), split_dir / rel_npy)
        atomic_write_bytes(encode_mp4(frames, cs.fps, cs.codec), split_dir / rel_video)
        n_events = int(events["t"].shape[0])
    record = {
        "id": f"{seq}/{clip}",
        "sequence": seq,
        "clip": clip,
        "event_npy": rel_npy,
        "video": rel_video,
        "event_image_prefix": f"event_image/{seq}/{clip}",
        "height": cs.height,
        "width": cs.width,
        "duration_s": float(cs.duration_s),
        "t0_us": 0,
        "fps": cs.fps,
        "num_video_frames": cs.frames_per_clip,
        "num_events": n_events,
        "meta": _meta_from_objects(objects, place),
    }
    return record, written


def _write_split(split_dir: Path, sequences: list[tuple[int, str]], clips_per_sequence: int, seed: int,
                 cs: _ClipSettings, bar: Any) -> tuple[dict[str, Any], int]:
    """Write one split's clips and index.json; returns (its summary, clips written now)."""
    records, written = [], 0
    for g, seq in sequences:
        place = str(_seed(seed, g, 0).choice(list(PLACES)))  # one place per sequence
        background = make_background(_seed(seed, g, 1), place, cs.height, cs.width)
        for c in range(clips_per_sequence):
            record, wrote = _write_clip(split_dir, seq, c, g, seed, place, background, cs)
            records.append(record)
            written += wrote
            bar.update(1)
    # An empty split still gets an (empty) index so readers can loop over SPLITS.
    _write_if_changed(split_dir / "index.json", (json.dumps(records, indent=2) + "\n").encode())
    summary = {
        "sequences": [name for _, name in sequences],
        "clips": len(records),
        "events": sum(r["num_events"] for r in records),
        "static_clips": sum(r["meta"]["moving_count"] == 0 for r in records),
    }
    return summary, written


def write_toy_dataset(
    output_dir: str | Path,
    seed: int = 0,
    num_sequences: Sequence[int] = (6, 2, 2),
    clips_per_sequence: int = 8,
    height: int = 96,
    width: int = 128,
    fps: int = 20,
    duration_s: float = 1.0,
    substeps: int = 4,
    contrast_threshold: float = CONTRAST_THRESHOLD,
    noise_rate_hz: float = NOISE_RATE_HZ,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the toy data set (docs/TOY_WORLD.md) to `output_dir` and return a summary dict.

    Deterministic: the same arguments give byte-identical files (every clip draws from its own
    SeedSequence([seed, sequence, clip, purpose])). Idempotent: finished clips are skipped, JSON
    files are rewritten only when their bytes would change, all writes are atomic. Reusing a folder
    written with other arguments raises UserError.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    out = Path(output_dir)
    num_sequences = tuple(int(n) for n in num_sequences)
    config = _checked_config(seed, num_sequences, clips_per_sequence, height, width, fps, duration_s, substeps,
                             contrast_threshold, noise_rate_hz)
    cs = _ClipSettings(height, width, fps, float(duration_s), substeps, contrast_threshold, noise_rate_hz,
                       pick_codec(), num_video_frames(fps, duration_s))
    plan = _sequence_plan(num_sequences)
    manifest: dict[str, Any] = {
        "format": "xmodal_sd.toy_dataset",
        "format_version": FORMAT_VERSION,
        "generator": "toy_dataset.py",
        "config": config,
        "complete": False,
        "codec": cs.codec,
        "frames_per_clip": cs.frames_per_clip,
        "events": {"x": "int16", "y": "int16", "t": "int64 us", "p": "int8 1=on 0=off"},
        "splits": {s: {"sequences": [name for _, name in plan[s]],
                       "clips": len(plan[s]) * clips_per_sequence} for s in SPLITS},
    }
    _claim_folder(out, config, manifest)

    total = sum(num_sequences) * clips_per_sequence
    written = 0
    split_summary: dict[str, dict[str, Any]] = {}
    with tqdm(total=total, desc="toy clips", unit="clip", disable=not progress) as bar:
        for split in SPLITS:
            split_summary[split], n = _write_split(out / split, plan[split], clips_per_sequence, seed, cs, bar)
            written += n
    manifest["complete"] = True
    manifest["splits"] = split_summary
    _write_if_changed(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    summary = {
        "output_dir": str(out),
        "seed": int(seed),
        "codec": cs.codec,
        "height": height,
        "width": width,
        "fps": fps,
        "duration_s": float(duration_s),
        "frames_per_clip": cs.frames_per_clip,
        "splits": split_summary,
        "clips_total": total,
        "clips_written": written,
        "clips_skipped": total - written,
        "events_total": sum(s["events"] for s in split_summary.values()),
        "num_questions": len(QUESTIONS),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "toy data set in %s: %d clips (%d written, %d already there), %d events, codec %s, %.1f s",
        out, total, written, total - written, summary["events_total"], cs.codec, summary["seconds"],
    )
    return summary


# --------------------------------------------------------------------------------------------------
# The same scenes as DSEC recordings
# --------------------------------------------------------------------------------------------------

DSEC_T_OFFSET_US = 50_000_000  # a recording's clock does not start at 0 (DSEC: t_offset); per sequence + g s
# The toy split -> the DSEC download it goes to: DSEC ships only train and test (val is carved from train).
DSEC_SPLIT = {"train": "train", "val": "train", "test": "test"}
RECTIFY_SUBPIXEL = 0.3  # the toy lens is ideal: its rectify map is the identity, offset so rounding matters


def _write_h5_recording(path: Path, events: dict[str, np.ndarray], t_offset: int, duration_us: int) -> None:
    """events.h5 as DSEC writes it: events/{x,y,t,p} Blosc/ZSTD, ms_to_idx (one entry per millisecond of
    the recording, its end included), t_offset."""
    import h5py
    import hdf5plugin

    t = events["t"].astype(np.int64)
    num_ms = max(int(t[-1] // 1000) + 2 if t.size else 1, -(-duration_us // 1000) + 1)
    ms_to_idx = np.searchsorted(t, np.arange(num_ms, dtype=np.int64) * 1000, side="left").astype(np.uint64)
    blosc = hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(tmp, "w") as f:
        for key, dtype in (("x", np.uint16), ("y", np.uint16), ("t", np.uint32), ("p", np.uint8)):
            f.create_dataset(f"events/{key}", data=events[key].astype(dtype), chunks=True, **blosc)
        f.create_dataset("ms_to_idx", data=ms_to_idx)
        f.create_dataset("t_offset", data=np.int64(t_offset))
    os.replace(tmp, path)


def _write_rectify_map(path: Path, height: int, width: int) -> None:
    import h5py

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rmap = np.stack([xx, yy], axis=-1) + np.float32(RECTIFY_SUBPIXEL)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(tmp, "w") as f:
        f.create_dataset("rectify_map", data=rmap)
    os.replace(tmp, path)


def write_dsec_layout(dataset_dir: str | Path, output_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Write the toy data set in `dataset_dir` again as DSEC distributes its recordings (docs/TOY_WORLD.md).

    Each toy sequence becomes one recording whose clip c fills [c * duration_s, (c + 1) * duration_s) of
    its clock, rendered with the same seeds as the clip, so its events and frames are exactly the clip's:

        OUT/{train,test}_events/{seq}/events/left/events.h5        events/{x,y,t,p} (Blosc/ZSTD), ms_to_idx, t_offset
        OUT/{train,test}_events/{seq}/events/left/rectify_map.h5   [H, W, 2] (the identity + 0.3 px)
        OUT/{train,test}_images/{seq}/images/left/rectified/NNNNNN.png
        OUT/{train,test}_images/{seq}/{seq}_image_timestamps.txt   one absolute time (us) per PNG

    The toy's val sequences go into train (DSEC has no val split; prepare_dsec_index.py carves one).
    Finished recordings (their timestamps file exists) are skipped. Returns a summary dict.
    """
    from tqdm import tqdm

    dataset_dir, out = Path(dataset_dir), Path(output_dir)
    manifest = read_json(dataset_dir / MANIFEST_NAME, "toy data set manifest", "run make_toy_world.py first")
    if not manifest.get("complete"):
        raise UserError(f"{dataset_dir} is not a complete toy data set; run make_toy_world.py first")
    cfg = manifest["config"]
    cs = _ClipSettings(cfg["height"], cfg["width"], cfg["fps"], float(cfg["duration_s"]), cfg["substeps"],
                       cfg["contrast_threshold"], cfg["noise_rate_hz"], manifest["codec"],
                       num_video_frames(cfg["fps"], cfg["duration_s"]))
    clip_us = round(cs.duration_s * 1e6)
    plan = _sequence_plan(cfg["num_sequences"])
    written, sequences = 0, {}
    total = sum(len(v) for v in plan.values())
    with tqdm(total=total, desc="toy DSEC recordings", unit="seq", disable=not progress) as bar:
        for split in SPLITS:
            for g, seq in plan[split]:
                dsec_split = DSEC_SPLIT[split]
                sequences[seq] = {"toy_split": split, "dsec_split": dsec_split}
                ev_dir = out / f"{dsec_split}_events" / seq / "events" / "left"
                img_root = out / f"{dsec_split}_images" / seq
                stamps_path = img_root / f"{seq}_image_timestamps.txt"
                bar.update(1)
                if stamps_path.is_file():
                    continue
                place = str(_seed(cfg["seed"], g, 0).choice(list(PLACES)))
                background = make_background(_seed(cfg["seed"], g, 1), place, cs.height, cs.width)
                t_offset = DSEC_T_OFFSET_US + g * 1_000_000
                parts, stamps = [], []
                for c in range(cfg["clips_per_sequence"]):
                    objects = sample_objects(_seed(cfg["seed"], g, 2, c), cs.height, cs.width, cs.duration_s)
                    frames, events = render_clip(background, objects, cs.fps, cs.duration_s, cs.substeps,
                                                 _seed(cfg["seed"], g, 3, c), threshold=cs.contrast_threshold,
                                                 noise_rate_hz=cs.noise_rate_hz)
                    parts.append({**events, "t": events["t"] + c * clip_us})
                    for k, frame in enumerate(frames):
                        n = c * cs.frames_per_clip + k
                        png = img_root / "images" / "left" / "rectified" / f"{n:06d}.png"
                        atomic_write_bytes(encode_png(frame), png)
                        stamps.append(t_offset + c * clip_us + round(k * 1e6 / cs.fps))
                joined = {k: np.concatenate([p[k] for p in parts]) for k in ("x", "y", "t", "p")}
                _write_h5_recording(ev_dir / "events.h5", joined, t_offset, cfg["clips_per_sequence"] * clip_us)
                _write_rectify_map(ev_dir / "rectify_map.h5", cs.height, cs.width)
                atomic_write_bytes("".join(f"{s}\n" for s in stamps).encode(), stamps_path)
                written += 1
    log.info("toy DSEC layout in %s: %d recordings (%d written now)", out, total, written)
    return {"output_dir": str(out), "recordings": total, "written": written, "sequences": sequences,
            "clip_s": cs.duration_s}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="folder to write the data set into (created)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed -> byte-identical files")
    p.add_argument("--num_sequences", type=int, nargs=3, default=[6, 2, 2], metavar=("TRAIN", "VAL", "TEST"),
                   help="sequences per split (a sequence is one place; splits never share one)")
    p.add_argument("--clips_per_sequence", type=int, default=8, help="clips per sequence")
    p.add_argument("--height", type=int, default=96, help="frame and event-sensor height in pixels (even)")
    p.add_argument("--width", type=int, default=128, help="frame and event-sensor width in pixels (even)")
    p.add_argument("--fps", type=int, default=20, help="video frame rate")
    p.add_argument("--duration_s", type=float, default=1.0, help="clip length in seconds")
    p.add_argument("--substeps", type=int, default=4,
                   help="renders per video frame interval fed to the event simulator")
    p.add_argument("--contrast_threshold", type=float, default=CONTRAST_THRESHOLD,
                   help="log-intensity change that fires one event")
    p.add_argument("--noise_rate_hz", type=float, default=NOISE_RATE_HZ,
                   help="background-activity noise events per pixel per second")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if min(args.num_sequences) < 0 or sum(args.num_sequences) == 0:
        p.error("--num_sequences needs three counts >= 0 with at least one sequence")
    if args.clips_per_sequence < 1:
        p.error("--clips_per_sequence must be >= 1")
    if args.height < 16 or args.width < 16 or args.height % 2 or args.width % 2:
        p.error("--height and --width must be even and >= 16")
    if args.fps < 1 or args.duration_s <= 0 or num_video_frames(args.fps, args.duration_s) < 2:
        p.error("--fps * --duration_s must give at least 2 frames")
    if args.substeps < 1 or args.contrast_threshold <= 0 or args.noise_rate_hz < 0:
        p.error("--substeps must be >= 1, --contrast_threshold > 0, --noise_rate_hz >= 0")
    return args


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = write_toy_dataset(
        args.output_dir,
        seed=args.seed,
        num_sequences=args.num_sequences,
        clips_per_sequence=args.clips_per_sequence,
        height=args.height,
        width=args.width,
        fps=args.fps,
        duration_s=args.duration_s,
        substeps=args.substeps,
        contrast_threshold=args.contrast_threshold,
        noise_rate_hz=args.noise_rate_hz,
        progress=not args.no_progress,
    )
    print(f"{'split':<6} {'sequences':>9} {'clips':>6} {'static':>6} {'events':>10}")
    for split, s in summary["splits"].items():
        print(f"{split:<6} {len(s['sequences']):>9} {s['clips']:>6} {s['static_clips']:>6} {s['events']:>10}")
    print(f"written {summary['clips_written']}, skipped {summary['clips_skipped']}, "
          f"codec {summary['codec']}, {summary['seconds']} s -> {summary['output_dir']}")
    return summary


if __name__ == "__main__":
    run_cli(main, parse_args)
