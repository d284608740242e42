"""Write the data-set index (`{split}/index.json`, `questions.json`) for real event/video clips.

Every later stage reads clips through `DIR/{split}/index.json` (see docs/TOY_WORLD.md, "Layout");
the toy world writes it itself, real data needs this script. It pairs each event clip with its
video by sequence and clip name, checks that both files exist, and writes one record per pair.
Clips with a missing partner are counted and listed, never silently dropped.

Expected files (the reference's DSEC 1 s clip layout; both patterns are flags):

    DIR/{split}/event_npy/{seq}/{clip}.npy      events of one clip (EventGPT's pickled dict, .npz or structured .npy)
    DIR/{split}/mp4/{seq}/{clip}.mp4            the RGB video of the same clip

    # the test split of a DSEC folder, 480 x 640 sensor, the reference's question list
    python prepare_dsec_index.py --dataset_dir data/dsec --split test --questions_file top50_questions.json
    # a validation split carved out of train by whole sequences (no scene in both)
    python prepare_dsec_index.py --dataset_dir data/dsec --split train --val_sequences 5
    # tiny CPU check on the toy world's files (it rewrites nothing there: output goes elsewhere)
    python prepare_dsec_index.py --dataset_dir data/toy/dataset --split test --output_dir /tmp/index_check
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

from common import UserError, atomic_write_json, run_cli
from toy_dataset import SPLITS, load_questions

log = logging.getLogger("xmodal_sd.prepare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="data-set root holding {split}/event_npy and {split}/mp4")
    p.add_argument("--split", required=True, choices=list(SPLITS), help="which split's files to index")
    p.add_argument("--output_dir", default=None,
                   help="where {split}/index.json and questions.json go (default: --dataset_dir itself)")
    p.add_argument("--events_glob", default="event_npy/*/*.np[yz]",
                   help="event files relative to the split folder; the parent folder is the sequence")
    p.add_argument("--video_pattern", default="mp4/{seq}/{clip}.mp4",
                   help="video of a clip relative to the split folder ({seq}, {clip} are filled in)")
    p.add_argument("--height", type=int, default=480, help="sensor height in pixels (DSEC: 480)")
    p.add_argument("--width", type=int, default=640, help="sensor width in pixels (DSEC: 640)")
    p.add_argument("--duration_s", type=float, default=1.0, help="clip length in seconds (the reference used 1 s)")
    p.add_argument("--questions_file", default=None,
                   help="questions JSON ([{question, count}] or a list of strings) copied to questions.json")
    p.add_argument("--val_sequences", type=int, default=0,
                   help="with --split train: move this many whole sequences (seeded choice) into a val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation sequence choice")
    args = p.parse_args(argv)
    if args.val_sequences < 0 or (args.val_sequences and args.split != "train"):
        p.error("--val_sequences takes a non-negative count and works with --split train only")
    if args.height <= 0 or args.width <= 0 or args.duration_s <= 0:
        p.error("--height, --width and --duration_s must be positive")
    return args


def find_clips(split_dir: Path, events_glob: str, video_pattern: str, height: int, width: int,
               duration_s: float, rel_prefix: str = "") -> tuple[list[dict[str, Any]], list[str]]:
    """Records for every event file with a video; returns (records sorted by id, problems)."""
    records, problems = [], []
    for npy in sorted(split_dir.glob(events_glob)):
        seq, clip = npy.parent.name, npy.stem
        video = video_pattern.format(seq=seq, clip=clip)
        if not (split_dir / video).is_file():
            problems.append(f"{npy}: no video at {split_dir / video}")
            continue
        if npy.stat().st_size == 0:
            problems.append(f"{npy}: empty event file")
            continue
        records.append({
            "id": f"{seq}/{clip}", "sequence": seq, "clip": clip,
            "event_npy": rel_prefix + npy.relative_to(split_dir).as_posix(),
            "video": rel_prefix + video,
            "event_image_prefix": f"{rel_prefix}event_image/{seq}/{clip}",
            "height": height, "width": width, "duration_s": duration_s, "t0_us": 0, "meta": {},
        })
    return records, problems


def split_off_validation(records: list[dict[str, Any]], count: int, seed: int) -> tuple[list, list]:
    """Move `count` whole sequences (seeded choice) from train to val; paths stay in the train folder."""
    sequences = sorted({r["sequence"] for r in records})
    if count >= len(sequences):
        raise UserError(f"--val_sequences {count} leaves no training sequence (only {len(sequences)} found)")
    chosen = set(random.Random(seed).sample(sequences, count))
    train = [r for r in records if r["sequence"] not in chosen]
    val = [{**r, **{k: "../train/" + r[k] for k in ("event_npy", "video", "event_image_prefix")}}
           for r in records if r["sequence"] in chosen]
    return train, val


def main(args: argparse.Namespace) -> int:
    root = Path(args.dataset_dir)
    split_dir = root / args.split
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} does not exist; point --dataset_dir at the folder holding {args.split}/")
    out = Path(args.output_dir) if args.output_dir else root
    records, problems = find_clips(split_dir, args.events_glob, args.video_pattern,
                                   args.height, args.width, args.duration_s)
    if args.output_dir:  # an index outside the data folder must point back into it
        rel = os.path.relpath(split_dir, out / args.split) + "/"
        records = [{**r, **{k: rel + r[k] for k in ("event_npy", "video", "event_image_prefix")}} for r in records]
    if not records:
        raise UserError(f"no clip with both an event file ({args.events_glob}) and a video ({args.video_pattern}) "
                        f"under {split_dir}; check the layout or pass --events_glob / --video_pattern")
    splits = {args.split: records}
    if args.val_sequences:
        splits["train"], splits["val"] = split_off_validation(records, args.val_sequences, args.seed)
    for name, recs in splits.items():
        atomic_write_json(recs, out / name / "index.json")
        log.info("%s: %d clips from %d sequences -> %s", name, len(recs),
                 len({r["sequence"] for r in recs}), out / name / "index.json")
    if args.questions_file:
        load_questions(args.questions_file)  # refuse a malformed file before copying it
        (out / "questions.json").parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.questions_file, out / "questions.json")
    elif not (out / "questions.json").is_file():
        log.warning("no questions.json in %s yet: pass --questions_file before extraction", out)
    print(f"indexed {len(records)} clips, skipped {len(problems)}")
    for line in problems[:20]:
        print(f"  skipped: {line}")
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more")
    return 0


if __name__ == "__main__":
    run_cli(main, parse_args)
