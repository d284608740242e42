"""The cheap checks a stage runs before it loads the 7B models: data folder, questions, model folders,
adapter checkpoints, output folder and device. `preflight(args)` runs those that `args` has flags for and
returns one line per check passed; a failed check is one `UserError` line, before any model is loaded.
`--dry_run` (cli.py) prints these lines and exits.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from adapter_checkpoint import read_adapter_config
from clip_data import check_data_folder
from common import UserError, check_device, read_json
from hidden_adapter import levels


def check_dataset_split(dataset_dir: str | os.PathLike, split: str, questions_file: str | None = None,
                        num_event_images: int = 1) -> str:
    """The data set's `{split}/index.json` parses, its clips' videos and first `num_event_images` rendered
    event frames exist (what the model-loading stages read; refused when no clip has them, counted when
    some lack them), and the questions file parses (the data layer's own check); returns one line."""
    found = check_data_folder(dataset_dir, [split], questions_file, num_event_images=num_event_images,
                              raw_events=False, strict=False)
    missing = found["clips_missing_files"]
    clips = (f"{found['splits'][split]} clips, {missing} of them missing files (extraction counts and skips "
             "them; a benchmark stops at the first one it times)" if missing
             else f"{found['splits'][split]} clips with their files")
    return f"{Path(dataset_dir) / split / 'index.json'}: {clips}; {found['questions']} questions " \
           f"({found['questions_file']})"


def check_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """`path` (or its nearest existing parent) is a writable folder, checked before any model loads."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable; choose another {flag}")


# The `model_type` of each model's config.json: EventGPT's release and transformers' Video-LLaVA. The loaders
# (model_builders.py) refuse any other, and the check before loading reads it too.
EVENTGPT_MODEL_TYPE = "EventChat_llama"
VIDEO_LLAVA_MODEL_TYPE = "video_llava"
MODEL_FLAGS = {"--egpt_model": (EVENTGPT_MODEL_TYPE, "EventGPT"), "--vl_model": (VIDEO_LLAVA_MODEL_TYPE, "Video-LLaVA")}


def check_model_path(path: str, flag: str) -> str:
    """A local model folder exists and its config.json names the model `flag` takes (`MODEL_FLAGS`: an
    EventGPT folder given as --vl_model is refused here, before EventGPT loads); a hub id such as org/name
    is left to the loader. Returns the model_type read ("" for a hub id)."""
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(".") or p.exists() or len(p.parts) != 2
    if not looks_local:
        return ""
    if not p.is_dir():
        raise UserError(f"{flag} {path}: no such folder (a checkpoint folder, or a hub id org/name)")
    want, what = MODEL_FLAGS[flag]
    found = read_json(p / "config.json", f"{flag} config", f"{flag} takes {what}'s checkpoint folder").get("model_type")
    if found == want:
        return found
    other = next((f"{name}'s, which {other_flag} takes" for other_flag, (kind, name) in MODEL_FLAGS.items()
                  if kind == found), "")
    raise UserError(f"{flag} {path}: config.json has model_type {found!r}{f' ({other})' if other else ''}; {flag} "
                    f"takes {what}'s checkpoint folder (model_type {want!r})")


def check_adapter_role(path: str, role: str) -> str:
    """An adapter checkpoint's header reads, and its level can play `role` (prefill: a same-position level
    L1-L4). Only the config is looked at (the tensors are mapped, not read): the stage loads the weights."""
    config, extra = read_adapter_config(path)
    level = config.name
    if role == "prefill" and config.predicts != "same":
        raise UserError(f"--prefill_adapter must be a same-position level ({', '.join(levels(predicts='same'))}), "
                        f"got {level} ({path})")
    return f"--{role}_adapter {path}: {level} ({extra.get('pairs', '?')} pairs)"


def preflight(args: argparse.Namespace, required_roles: dict[str, list[str]] | None = None) -> list[str]:
    """The cheap checks of a stage that loads the 7B models, run before any model loads.

    Reads whichever of these `args` has: dataset_dir + split (+ questions_file), egpt_model, vl_model
    (unless random_shape), prefill_adapter / decode_adapter (unless random_adapters), output_dir or
    output, device. `required_roles`: {role: [configurations that need a --{role}_adapter]}. Returns one
    line per check passed; a failed check is one `UserError` line."""
    done: list[str] = []
    for role, users in (required_roles or {}).items():
        if users and not getattr(args, f"{role}_adapter", None):
            raise UserError(f"config(s) {', '.join(users)} need --{role}_adapter (a checkpoint from "
                            "train_hidden_adapter.py, or a level with --random_adapters), or leave them out of "
                            "--configs")
    device = getattr(args, "device", None)
    if device:
        check_device(str(device))
        done.append(f"device {device}")
    if getattr(args, "dataset_dir", None) is not None and getattr(args, "split", None):
        questions = getattr(args, "questions_file", None) or getattr(args, "questions", None)
        # The first rendered frame only: a stage asking for more frames than were rendered has its own,
        # more precise error (it reads the renderer's manifest).
        done.append(check_dataset_split(args.dataset_dir, args.split, questions))
    if getattr(args, "random_shape", None) is None:
        for flag in ("egpt_model", "vl_model"):
            if getattr(args, flag, None):
                found = check_model_path(str(getattr(args, flag)), f"--{flag}")
                done.append(f"--{flag} {getattr(args, flag)}" + (f" (model_type {found})" if found else ""))
    if not getattr(args, "random_adapters", False):
        for role in ("prefill", "decode"):
            for path in getattr(args, f"{role}_adapter", None) or []:
                done.append(check_adapter_role(str(path), role))
    if getattr(args, "output_dir", None) is not None:
        check_writable_dir(args.output_dir, "--output_dir")
        done.append(f"--output_dir {args.output_dir} writable")
    elif getattr(args, "output", None):
        check_writable_dir(Path(args.output).parent, "--output")
        done.append(f"--output {args.output} writable")
    return done
