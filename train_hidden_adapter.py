"""Train one adapter level on paired hidden states, select it on the validation split, save it.

    # toy world, CPU, seconds per level (the pipeline's short schedule)
    python train_hidden_adapter.py --train_data data/toy/hidden/train --val_data data/toy/hidden/val \
        --adapter_level L1 --pairs teacher_forced --num_epochs 3 --lm_head data/toy/vl_lm_head.pt \
        --output_dir tasks/toy
    # the real models (one GPU; bf16 autocast), the reference's settings
    python train_hidden_adapter.py --train_data data/hidden/train --val_data data/hidden/val \
        --adapter_level 6 --num_epochs 50 --batch_size 64 --learning_rate 1e-3 --early_stopping 10 \
        --lm_head data/vl_lm_head.pt --output_dir tasks
    # several GPUs (DDP): chunks are split across processes, one process writes
    accelerate launch --num_processes 4 train_hidden_adapter.py --config configs/L5F.yaml
    # continue a stopped run exactly where it stopped (same batches, same RNG)
    python train_hidden_adapter.py --resume tasks/L5F_teacher_forced_20260101_120000
    # the specification's training of a next-position level (one teacher-forced step, no token input)
    python train_hidden_adapter.py ... --adapter_level B1 --spec_loss

Next-position levels (L5, B1, L5F, L5E) are trained by default as they draft: with the token input
(the embedding of each position's token, from the target's frozen table in the --lm_head file), on
roll-outs of --rollout_steps drafting steps fed their own outputs, with the LM head's cross-entropy
beside the regression loss, and selected on the validation roll-out's accepted drafts per iteration.

Writes {output_dir}/{LEVEL}_{pairs}_{YYYYmmdd_HHMMSS}/: best_model.pt (load_adapter), last.pt (the
resume state), history.json, training_curves.png, config.yaml (the resolved flags) and hf/
(config.json + model.safetensors, reload with adapter_hub.load_hf). The test split is never
read here. Choices and measurements: docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from adapter_hub import export_hf
from cli import RunLog, add_config_flag, read_config, run_cli
from common import (
    UserError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    first_line,
    read_json,
    resolve_device,
    safe_torch_load,
    save_figure,
    set_seed,
)
from hidden_adapter import (
    NEXT_POSITION_LEVELS,
    BaseAdapter,
    adapter_inputs,
    canonical_name,
    create_adapter,
    draft_outputs,
    load_adapter,
    rollout_problem,
    save_adapter,
)
from hidden_data import PAIRS, ChunkStream, check_lm_head, differing_models, load_lm_head, model_hashes, to_device
from losses import LOSS_MIXES, adapter_loss, drafting_loss
from metrics import AcceptanceAccumulator, RolloutAccumulator, draft_tokens, strict_json

log = logging.getLogger("xmodal_sd.train")
STATE_FORMAT = "xmodal_sd.train_state"
# Flags that may differ on --resume without changing the result: where and how long this process runs.
RUNTIME_FLAGS = ("resume", "config", "device", "stop_after_epoch", "no_progress", "no_prefetch", "override",
                 "report_to", "push_to_hub", "hub_model_id")
REPORT_TO = ("auto", "tensorboard", "wandb", "none")
# Higher is better for every selection metric except the loss.
SELECT_METRICS = ("auto", "loss", "cos_mean", "accept@0.90", "token_top1", "rollout_accept")
# Measured on the toy world (docs/TRAINING.md, "Next-position loss"): convex beats sum, and w = 1
# (prediction only) beats the reference's w = 0.5 on shifted top-1 and accepted drafts per iteration.
DEFAULT_LOSS_MIX = "convex"
DEFAULT_PREDICTION_WEIGHT = 1.0
# Drafting-oriented training of the next-position levels, measured on the toy world (docs/TRAINING.md,
# "Training as drafting runs"): each of token input, roll-out training and the token loss adds
# accepted drafts per iteration; these are the defaults, --spec_loss turns all of them off.
# What a run folder written before the drafting flags existed was trained with (its config.yaml lacks them).
PRE_DRAFTING_DEFAULTS = {"token_input": "off", "rollout_steps": 1, "token_loss_weight": 0.0}
DEFAULT_ROLLOUT_STEPS = 3  # as good as 5 on the toy world at 12 epochs, for 3/5 of the cost (TRAINING.md)
DEFAULT_ROLLOUT_DECAY = 0.8
DEFAULT_TOKEN_LOSS_WEIGHT = 0.1


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flag(p)
    p.add_argument("--train_data", default=None, help="train split folder written by extract_hidden_states.py")
    p.add_argument("--val_data", default=None, help="validation split folder (model selection and early stopping)")
    p.add_argument("--adapter_level", default=None,
                   help="1-7 or L1, L2, L3, L4, L5, B1, L5F, L5E (6 = L5F, 7 = L5E)")
    p.add_argument("--vlm_only", action="store_true", help="train level 5 on target states only (= B1)")
    p.add_argument("--pairs", choices=PAIRS, default="teacher_forced",
                   help="drafter input: egpt_hidden (free) or egpt_hidden_tf (teacher_forced); docs/DATA_FORMAT.md")
    p.add_argument("--num_epochs", type=int, default=50, help="maximum number of epochs")
    p.add_argument("--batch_size", type=int, default=64, help="samples per optimizer step (per process)")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW peak learning rate (cosine to 0)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    p.add_argument("--early_stopping", type=int, default=10,
                   help="stop after this many epochs without a better validation score (0 = off)")
    p.add_argument("--min_delta", type=float, default=0.0,
                   help="a validation score must beat the best by more than this to count as better")
    p.add_argument("--select_metric", choices=SELECT_METRICS, default="auto",
                   help="validation score that picks best_model.pt (token_top1 = shifted top-1 for next-position "
                        "levels; rollout_accept = accepted drafts per iteration of the validation roll-out); auto = "
                        "rollout_accept for next-position levels with --lm_head, else loss")
    p.add_argument("--prediction_weight", type=float, default=DEFAULT_PREDICTION_WEIGHT,
                   help="weight w of the next-position term (L5, B1, L5F, L5E); 1.0 = prediction only, 0.5 = the "
                        "reference")
    p.add_argument("--loss_mix", choices=LOSS_MIXES, default=DEFAULT_LOSS_MIX,
                   help="next-position levels: sum = align + w*pred, convex = (1-w)*align + w*pred")
    p.add_argument("--token_input", choices=("auto", "on", "off"), default="auto",
                   help="next-position levels read the embedding of each position's token (EAGLE's shifted token) "
                        "from the target's frozen input embeddings in the --lm_head file; auto = on for them")
    p.add_argument("--rollout_steps", type=int, default=None,
                   help="train next-position levels on roll-outs of this many drafting steps, each fed the "
                        "adapter's own previous outputs (1 = one teacher-forced step, the specification's); "
                        f"default {DEFAULT_ROLLOUT_STEPS} (at most --gamma_decode)")
    p.add_argument("--rollout_decay", type=float, default=DEFAULT_ROLLOUT_DECAY,
                   help="roll-out step k weighs decay**(k-1) in the loss (weights normalised to sum to 1)")
    p.add_argument("--token_loss_weight", type=float, default=None,
                   help="weight of the cross-entropy of the target LM head's logits against the target's token at "
                        f"every roll-out step (EAGLE's classification term); default {DEFAULT_TOKEN_LOSS_WEIGHT} for "
                        "next-position levels with --lm_head, else 0")
    p.add_argument("--gamma_decode", type=int, default=5,
                   help="drafts per iteration scored by the validation roll-out (and the most --rollout_steps "
                        "defaults to)")
    p.add_argument("--spec_loss", action="store_true",
                   help="the specification's training of next-position levels: one teacher-forced step, no token "
                        "input, regression loss only, convex mix with w = 0.5, selected on the validation loss "
                        "(overrides --token_input, --rollout_steps, --token_loss_weight, --prediction_weight and "
                        "--loss_mix; an explicit --select_metric is kept)")
    p.add_argument("--dropout", type=float, default=0.1, help="adapter dropout")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and dropout")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (smoke runs)")
    p.add_argument("--stop_after_epoch", type=int, default=None,
                   help="stop (resumably) after this epoch, e.g. to fit a job time limit; continue with --resume")
    p.add_argument("--resume", default=None, help="run folder to continue from its last.pt and config.yaml")
    p.add_argument("--output_dir", default="tasks", help="parent of the run folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (ignored under accelerate launch)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--lm_head", default=None,
                   help="target LM head file (extract_vl_lm_head.py), or the target's Video-LLaVA folder (its two "
                        "tensors are read): token metrics in validation, the token loss, and the input embeddings "
                        "that the token input reads; token-input levels without it look beside the data and in "
                        "the target folder the extraction recorded")
    p.add_argument("--no_prefetch", action="store_true", help="read chunks in the training thread (for benchmarks)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bars (logs only)")
    p.add_argument("--override", action="store_true",
                   help="with --resume: continue with the flags given even where they differ from the run's "
                        "config.yaml (the differences are logged and config.yaml is rewritten); without it such a "
                        "resume is refused")
    p.add_argument("--report_to", choices=REPORT_TO, default="auto",
                   help="per-epoch metrics through accelerate's trackers: tensorboard (RUN/tensorboard/), wandb, or "
                        "none; auto = tensorboard when it is installed, else none")
    p.add_argument("--push_to_hub", action="store_true",
                   help="upload the run's hf/ export to the Hugging Face Hub when training finishes (log in first: "
                        "`hf auth login` or HF_TOKEN)")
    p.add_argument("--hub_model_id", default=None,
                   help="Hub repository for --push_to_hub, e.g. me/eventgpt-L5F (default: the run folder's name "
                        "under your account)")
    return p


def _yaml_defaults(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    return read_config(path, parser)  # keys: flag names, old spellings accepted (common.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", help="YAML defaults (read before the full parse)")
    pre.add_argument("--resume", help="run folder whose config.yaml supplies the defaults")
    first, _ = pre.parse_known_args(argv)
    defaults: dict[str, Any] = {}
    try:
        if first.resume:  # the run's own resolved config; explicit flags still win
            defaults = _yaml_defaults(Path(first.resume) / "config.yaml", parser)
            defaults = {k: v for k, v in defaults.items() if k not in RUNTIME_FLAGS}
            # a run started before the drafting flags existed trained one teacher-forced step, no token input
            for key, before in PRE_DRAFTING_DEFAULTS.items():
                defaults.setdefault(key, before)
        elif first.config:
            defaults = _yaml_defaults(Path(first.config), parser)
    except UserError as err:
        parser.error(str(err))
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.overridden = resume_changes(parser, argv) if first.resume else {}
    if args.overridden and not args.override:
        listed = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in args.overridden.items())
        parser.error(f"--resume {first.resume}: these flags differ from the run's config.yaml: {listed}; drop them "
                     "to continue the run as it was, or add --override to continue with them")
    try:
        args.trackers = resolve_trackers(args.report_to)
    except ValueError as err:
        parser.error(str(err))
    if args.hub_model_id and not args.push_to_hub:
        parser.error("--hub_model_id names the repository of --push_to_hub; pass both")
    for name in ("train_data", "val_data", "adapter_level"):
        if getattr(args, name) in (None, ""):
            parser.error(f"--{name} is required (on the command line or in --config)")
    try:
        args.level_name = canonical_name(str(args.adapter_level), args.vlm_only)
    except ValueError as err:
        parser.error(str(err))
    for name in ("num_epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    for name in ("max_steps", "stop_after_epoch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.learning_rate <= 0 or args.weight_decay < 0 or args.grad_clip < 0 or args.early_stopping < 0:
        parser.error("--learning_rate must be > 0; --weight_decay, --grad_clip, --early_stopping >= 0")
    if not 0 <= args.prediction_weight <= 1 and args.loss_mix == "convex":
        parser.error("--prediction_weight must lie in [0, 1] with --loss_mix convex")
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must lie in [0, 1)")
    locate_lm_head(args)
    if args.select_metric in ("token_top1", "rollout_accept") and not has_head(args):
        parser.error(f"--select_metric {args.select_metric} needs --lm_head")
    if args.select_metric == "rollout_accept" and canonical_name(args.level_name) not in NEXT_POSITION_LEVELS:
        parser.error(f"--select_metric rollout_accept scores drafting roll-outs of the next-position levels "
                     f"{NEXT_POSITION_LEVELS}; {args.level_name} has none (use loss or token_top1)")
    if args.gamma_decode < 1 or (args.rollout_steps is not None and args.rollout_steps < 1):
        parser.error("--gamma_decode and --rollout_steps must be >= 1")
    if not 0 < args.rollout_decay <= 1 or (args.token_loss_weight is not None and args.token_loss_weight < 0):
        parser.error("--rollout_decay must lie in (0, 1] and --token_loss_weight be >= 0")
    try:
        resolve_drafting(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def resume_changes(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, tuple[Any, Any]]:
    """{flag: (run's value, given value)} for flags given on the command line of a resume that differ from
    the run's config.yaml (already the parser's defaults); where and how long it runs does not count."""
    explicit = build_parser()
    for action in explicit._actions:
        action.default = argparse.SUPPRESS
    given, _ = explicit.parse_known_args(argv)
    def same(key: str, old: Any, new: Any) -> bool:
        if key == "adapter_level":  # "l1", "1" and "L1" name one level
            try:
                return canonical_name(str(old)) == canonical_name(str(new))
            except (KeyError, ValueError):
                return False
        return old == new

    return {k: (parser.get_default(k), v) for k, v in vars(given).items()
            if k not in RUNTIME_FLAGS and not same(k, parser.get_default(k), v)}


def resolve_trackers(report_to: str) -> list[str]:
    """accelerate tracker names for --report_to; an explicit one that is not installed is refused."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if report_to == "none":
        return []
    if report_to == "auto":
        return ["tensorboard"] if available["tensorboard"] else []
    if not available[report_to]:
        raise ValueError(f"--report_to {report_to}: {report_to} is not installed (pip install {report_to}), "
                         "or pass --report_to none")
    return [report_to]


LM_HEAD_NAME = "vl_lm_head.pt"  # what extract_vl_lm_head.py writes by default, beside the data folders


def has_head(args: argparse.Namespace) -> bool:
    """Whether training has the target's LM head (--lm_head, given or found: a file or the model's folder)."""
    return bool(args.lm_head)


def _recorded_model_folder(recorded: str, data: Path) -> Path | None:
    """The folder a manifest records for a model, as a path from here: as recorded (absolute, or relative to
    this working folder), else relative to a folder above the data (extraction may have run from there)."""
    path = Path(recorded)
    candidates = [path] if path.is_absolute() else [path, *(parent / path for parent in data.parents)]
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def locate_lm_head(args: argparse.Namespace) -> None:
    """A token-input level (a next-position level with --token_input auto/on) without --lm_head finds the
    target's LM head and input embeddings where the data says they are: an LM head file beside the data
    (DATA/../vl_lm_head.pt or DATA/../../vl_lm_head.pt) of the target that produced the states, else that
    target model's own folder as the extraction recorded it (checked against the recorded config hash; only
    the two tensors are read). What it finds becomes args.lm_head, so config.yaml records it and a resume
    reads the same head (a resume never looks again); args.lm_head_note is the one line saying where it came
    from. Other levels, and --token_input off, keep the defaults of a run without --lm_head."""
    args.lm_head_note = f"LM head: {args.lm_head} (--lm_head)" if args.lm_head else ""
    nxt = canonical_name(args.level_name) in NEXT_POSITION_LEVELS
    if args.lm_head or args.resume or not nxt or args.token_input == "off" or args.spec_loss:
        return
    data = Path(args.train_data).resolve()
    try:
        manifest = read_json(data / "manifest.json", "hidden-state manifest", "extract the data first")
    except UserError:
        manifest = {}  # open_data reports a missing or broken manifest properly
    want = model_hashes(manifest).get("target")
    for candidate in (data.parent / LM_HEAD_NAME, data.parent.parent / LM_HEAD_NAME):
        if not candidate.is_file():
            continue
        try:
            found = safe_torch_load(candidate, "LM head", "", mmap=True).get("config_hash")
        except (UserError, AttributeError):
            continue
        if want is None or found in (None, want):
            args.lm_head = str(candidate)
            args.lm_head_note = f"LM head: {candidate} (found beside the training data; --lm_head names another)"
            return
    from model_builders import config_hash

    recorded = str(((manifest.get("models") or {}).get("target") or {}).get("path") or "")
    folder = _recorded_model_folder(recorded, data) if recorded else None
    found_hash = config_hash(folder / "config.json") if folder else None
    if folder is not None and want in (None, found_hash):
        args.lm_head = str(folder)
        args.lm_head_note = (f"LM head and input embeddings: read from {folder}, the target model that extracted "
                             f"{data} (config hash {want}); --lm_head FILE names another")
        return
    where = (f"the target model the data records ({recorded}) is not here" if folder is None else
             f"{folder} is another model than the data's target (config hash {found_hash}, not {want})")
    args.lm_head_note = f"no LM head: no --lm_head, no {LM_HEAD_NAME} beside {data}, and {where}"


def resolve_drafting(args: argparse.Namespace) -> None:
    """Fill args.use_token_input, args.steps, args.ce_weight, args.select from the flags and the level."""
    nxt = canonical_name(args.level_name) in NEXT_POSITION_LEVELS
    if args.spec_loss:
        if not nxt:
            raise ValueError(f"--spec_loss is about the next-position levels {NEXT_POSITION_LEVELS}; "
                             f"{args.level_name} always trains with the specification's alignment loss")
        args.use_token_input, args.steps, args.ce_weight = False, 1, 0.0
        args.prediction_weight, args.loss_mix = 0.5, "convex"
        if args.select_metric == "auto":  # the specification selects on the validation loss
            args.select_metric = "loss"
    else:
        if args.token_input == "on" and not nxt:
            raise ValueError(f"--token_input is for the next-position levels {NEXT_POSITION_LEVELS}, "
                             f"not {args.level_name}")
        args.use_token_input = nxt and args.token_input != "off"
        args.steps = (args.rollout_steps or min(DEFAULT_ROLLOUT_STEPS, args.gamma_decode)) if nxt else 1
        args.ce_weight = 0.0 if not nxt else (
            args.token_loss_weight if args.token_loss_weight is not None
            else (DEFAULT_TOKEN_LOSS_WEIGHT if has_head(args) else 0.0))
    if args.use_token_input and not has_head(args):
        if args.token_input == "on":
            raise ValueError("the token input reads the target's input embeddings from the LM head file: pass "
                             "--lm_head (extract_vl_lm_head.py), or --token_input off")
        args.use_token_input = False  # the specification's head; locate_lm_head's note says so
        args.lm_head_note += ("; training the specification's head (no token input, no token loss): pass --lm_head "
                              "FILE (extract_vl_lm_head.py) for the head with the token input, which drafts better")
    if args.ce_weight > 0 and not has_head(args):
        raise ValueError("--token_loss_weight > 0 needs --lm_head")
    if args.select_metric == "auto":
        args.select = "rollout_accept" if nxt and has_head(args) else "loss"
    else:
        args.select = args.select_metric


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as saved in config.yaml and the checkpoint (parser destinations only)."""
    return {a.dest: getattr(args, a.dest) for a in build_parser()._actions if a.dest != "help"}


def drafting_record(args: argparse.Namespace) -> dict[str, Any]:
    """How a next-position level was trained, as resolved from the flags (stored in best_model.pt)."""
    return {"token_input": args.use_token_input, "rollout_steps": args.steps, "rollout_decay": args.rollout_decay,
            "token_loss_weight": args.ce_weight, "loss_mix": args.loss_mix,
            "prediction_weight": args.prediction_weight, "spec_loss": args.spec_loss, "select_metric": args.select,
            "lm_head": args.lm_head}


# ----------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """Where this process runs: rank among world_size processes (1 without a launcher)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_processes(args: argparse.Namespace) -> Proc:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch / torchrun
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # gloo between CPU workers
        return Proc(state.process_index, state.num_processes, state.device)
    return Proc(0, 1, resolve_device(args.device))


def all_sum(values: list[float] | Tensor, proc: Proc) -> Tensor:
    """Sum float64 values over processes (identity in one process)."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if proc.world_size > 1:
        dev = proc.device if proc.device.type == "cuda" else torch.device("cpu")
        t = t.to(dev)
        torch.distributed.all_reduce(t)
    return t.cpu()


def broadcast(obj: Any, proc: Proc) -> Any:
    if proc.world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- data and model


def open_data(args: argparse.Namespace, proc: Proc, need_drafter: bool) -> tuple[ChunkStream, ChunkStream]:
    """Streams over the train and val folders, after checking they come from the same models."""
    manifests = {}
    streams = []
    for split, folder, shuffle in (("train", args.train_data, True), ("val", args.val_data, False)):
        stream = ChunkStream(folder, pairs=args.pairs, batch_size=args.batch_size, seed=args.seed, shuffle=shuffle,
                             rank=proc.rank, world_size=proc.world_size, need_drafter=need_drafter,
                             prefetch=not args.no_prefetch, pin_memory=proc.device.type == "cuda")
        manifests[split] = stream.manifest
        streams.append(stream)
    train, val = streams
    tw, vw = train.manifest.get("widths") or {}, val.manifest.get("widths") or {}
    if tw != vw:
        raise UserError(f"{args.train_data} has widths {tw} but {args.val_data} has {vw}; "
                        "use train and validation data extracted with the same models")
    if differing_models(train.manifest, val.manifest):
        raise UserError(f"{args.train_data} and {args.val_data} were extracted with different models "
                        f"({model_hashes(train.manifest)} vs {model_hashes(val.manifest)}); re-extract one of them")
    for stream in streams:  # every chunk is checked against the manifest's widths as it is read
        stream.dims = {"drafter": tw.get("drafter"), "target": tw.get("target")}
    return train, val


def build_adapter_for(args: argparse.Namespace, widths: dict[str, int], vocab_size: int | None = None) -> BaseAdapter:
    if not widths.get("drafter") or not widths.get("target"):
        raise UserError(f"{args.train_data}/manifest.json records no state widths; re-extract with this release")
    extra: dict[str, Any] = {}
    if args.use_token_input:
        extra = {"token_input": True, "vocab_size": vocab_size}
    return create_adapter(args.level_name, drafter_dim=widths["drafter"], target_dim=widths["target"],
                          dropout=args.dropout, prediction_weight=args.prediction_weight, **extra)


def load_head(args: argparse.Namespace, target_dim: int, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The target's LM head (and, for the token input, the input embeddings), checked against the data: the
    --lm_head file, or what locate_lm_head found (a file beside the data, or the target model's files)."""
    if args.lm_head_note:
        log.info("%s", args.lm_head_note)
    if args.lm_head and Path(args.lm_head).is_dir():  # a Video-LLaVA folder: its two tensors, no model built
        from model_builders import read_lm_head

        head = read_lm_head(args.lm_head, load_model=False)
        if head is None:
            raise UserError(f"{args.lm_head} holds no lm_head/embed_tokens tensors to read; pass --lm_head FILE "
                            "(extract_vl_lm_head.py)")
        return check_lm_head(head, args.lm_head, hidden_dim=target_dim, need_embeddings=args.use_token_input,
                             data=manifest, data_name=str(args.train_data))
    if not args.lm_head:
        return None
    return load_lm_head(args.lm_head, hidden_dim=target_dim, need_embeddings=args.use_token_input, data=manifest,
                        data_name=str(args.train_data))


class Drafting(nn.Module):
    """What training runs: `steps` drafting steps of a next-position adapter (adapter.rollout), or the
    plain forward of a same-position one, as one module so DDP sees one forward. Returns a list of
    [B, T, D] outputs (one per step)."""

    def __init__(self, adapter: BaseAdapter, steps: int) -> None:
        super().__init__()
        self.adapter, self.steps = adapter, steps

    def forward(self, x: Tensor, mask: Tensor, **kwargs: Tensor) -> list[Tensor]:
        return draft_outputs(self.adapter, x, mask, self.steps, **kwargs)


def forward(model: nn.Module, adapter: BaseAdapter, batch: dict[str, Tensor]) -> list[Tensor]:
    x, kwargs = adapter_inputs(adapter, batch.get("x"), batch["target"], batch["tokens"])
    return model(x, batch["mask"], **kwargs)


def loss_of(adapter: BaseAdapter, outs: list[Tensor], batch: dict[str, Tensor], args: argparse.Namespace,
            head: Tensor | None) -> tuple[Tensor, dict[str, float]]:
    """The training objective: the specification's loss for same-position levels, the drafting loss
    (roll-out steps, token term) for next-position ones; the same in training and validation."""
    outs = [o.float() for o in outs]
    if adapter.predicts != "next":
        return adapter_loss(adapter, outs[0], batch["target"], batch["mask"], mix=args.loss_mix,
                            prediction_weight=args.prediction_weight)
    return drafting_loss(adapter, outs[: args.steps], batch["target"], batch["mask"], tokens=batch["tokens"],
                         lm_head=head, decay=args.rollout_decay, token_loss_weight=args.ce_weight, mix=args.loss_mix,
                         prediction_weight=args.prediction_weight)


def token_key(predicts: str) -> str:
    """The token metric a level is judged by: same position for L1-L4, shifted for next-position levels."""
    return "shifted_top1" if predicts == "next" else "token_top1"


# ----------------------------------------------------------------------------- epochs


def train_epoch(model: nn.Module, adapter: BaseAdapter, stream: ChunkStream, opt: torch.optim.Optimizer,
                sched: Any, state: dict[str, Any], args: argparse.Namespace, proc: Proc,
                head: Tensor | None = None) -> dict[str, float]:
    """One pass over this rank's share of the train split; returns loss and speed figures."""
    epoch = state["epoch"]
    batches = stream.even_num_batches(epoch)
    if args.max_steps is not None:
        batches = min(batches, args.max_steps - state["step"])
    autocast = proc.device.type == "cuda" and args.precision in ("auto", "bf16")
    model.train()
    sums = torch.zeros(4, dtype=torch.float64)  # loss*n, align*n, pred*n, n (valid positions)
    samples, wait = 0, 0.0
    bar = tqdm(total=batches, desc=f"epoch {epoch + 1}/{args.num_epochs}", unit="batch",
               disable=not proc.is_main or args.no_progress, leave=False)
    start = time.perf_counter()
    it = stream.batches(epoch, max_batches=batches)
    try:  # the bar is closed before an error line is printed
        while True:
            t0 = time.perf_counter()
            try:
                raw = next(it)
            except StopIteration:
                break
            batch = to_device(raw, proc.device)
            wait += time.perf_counter() - t0
            with torch.autocast(proc.device.type, dtype=torch.bfloat16, enabled=autocast):
                outs = forward(model, adapter, batch)
            loss, parts = loss_of(adapter, outs, batch, args, head)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            state["step"] += 1
            n = float(batch["mask"].sum())
            sums += torch.tensor([loss.item() * n, parts["align"] * n, parts.get("pred", math.nan) * n, n],
                                 dtype=torch.float64)
            samples += raw["mask"].shape[0]
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_per_s=f"{samples / max(elapsed, 1e-9):.0f}")
            bar.update(1)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    total = all_sum([*sums.tolist(), samples, elapsed, wait], proc)
    n = max(float(total[3]), 1.0)
    return {"train_loss": float(total[0]) / n, "train_align": float(total[1]) / n,
            # DDP needs equal step counts: the ranks' batches beyond the smallest share are not trained on
            "train_samples_dropped": stream.dropped_samples(epoch),
            "train_pred": float(total[2]) / n if adapter.predicts == "next" else None,
            "train_samples": int(total[4]), "train_s": float(total[5]) / proc.world_size,
            "samples_per_s": float(total[4]) / max(float(total[5]) / proc.world_size, 1e-9),
            "data_wait_share": float(total[6]) / max(float(total[5]), 1e-9)}


@torch.no_grad()
def validate(model: nn.Module, adapter: BaseAdapter, stream: ChunkStream, head: Tensor | None,
             args: argparse.Namespace, proc: Proc) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Score every validation position (all chunks, all batches): the training loss, the shared acceptance
    metrics and, for next-position levels with a head, the drafting roll-out of --gamma_decode steps
    (accepted drafts per iteration, per draft position) and its confidence calibration.
    Returns (metrics, calibration or None)."""
    model.eval()
    max_t = int(stream.manifest.get("max_new_tokens") or 128)
    acc = AcceptanceAccumulator(predicts=adapter.predicts, lm_head=head, max_positions=max_t,
                                gamma_decode=args.gamma_decode)
    roll = RolloutAccumulator(args.gamma_decode, max_new_tokens=max_t) \
        if adapter.predicts == "next" and head is not None else None
    sums = torch.zeros(2, dtype=torch.float64)
    autocast = proc.device.type == "cuda" and args.precision in ("auto", "bf16")
    steps = max(args.steps, args.gamma_decode) if roll is not None else args.steps
    for raw in stream.batches(0):
        batch = to_device(raw, proc.device)
        x, kwargs = adapter_inputs(adapter, batch.get("x"), batch["target"], batch["tokens"])
        with torch.autocast(proc.device.type, dtype=torch.bfloat16, enabled=autocast):
            outs = draft_outputs(adapter, x, batch["mask"], steps, **kwargs)
        outs = [o.float() for o in outs]
        loss, _ = loss_of(adapter, outs, batch, args, head)
        n = float(batch["mask"].sum())
        sums += torch.tensor([loss.item() * n, n], dtype=torch.float64)
        acc.update(outs[0], batch["target"], batch["mask"], batch["tokens"] if head is not None else None)
        if roll is not None:
            drafts, conf = draft_tokens(outs[: args.gamma_decode], head, batch["mask"])
            roll.update(drafts, conf, batch["tokens"], batch["mask"])
    acc.load_totals(all_sum(acc.totals(), proc))
    sums = all_sum(sums, proc)
    metrics: dict[str, Any] = acc.compute()
    metrics["loss"] = float(sums[0] / max(float(sums[1]), 1.0))
    metrics["valid_positions"] = float(sums[1])
    calibration = None
    if roll is not None:
        roll.load_totals(all_sum(roll.totals(), proc))
        metrics["rollout"] = roll.compute()
        metrics["rollout_accept"] = metrics["rollout"]["live_accepted_per_iteration"]
        calibration = roll.calibration()
    return metrics, calibration


def is_better(value: float, best: float | None, metric: str, min_delta: float = 0.0) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if metric == "loss" else value > best + min_delta


def select_value(metrics: dict[str, Any], metric: str, predicts: str) -> float:
    return metrics.get(token_key(predicts) if metric == "token_top1" else metric, math.nan)


# ----------------------------------------------------------------------------- files


def make_run_dir(args: argparse.Namespace, proc: Proc) -> Path:
    if args.resume:
        return Path(args.resume)
    run_dir = None
    if proc.is_main:
        while run_dir is None or run_dir.exists():  # two runs started in the same second get the next one
            if run_dir is not None:
                time.sleep(0.25)
            stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
            run_dir = Path(args.output_dir) / f"{args.level_name}_{args.pairs}_{stamp}"
        run_dir.mkdir(parents=True)
    return Path(broadcast(str(run_dir) if run_dir else None, proc))


def rng_state(proc: Proc) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if proc.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(proc.device)
    return state


def gather(obj: Any, proc: Proc) -> list[Any]:
    if proc.world_size == 1:
        return [obj]
    out: list[Any] = [None] * proc.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def save_state(path: Path, adapter: BaseAdapter, opt: Any, sched: Any, state: dict[str, Any], proc: Proc) -> None:
    """last.pt: everything needed to continue exactly (every rank's RNG states included)."""
    rngs = gather(rng_state(proc), proc)
    if proc.is_main:
        atomic_torch_save({"format": STATE_FORMAT, "level": adapter.config.name, "adapter": adapter.state_dict(),
                           "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "state": state,
                           "rng": rngs}, path)


def load_state(path: Path, adapter: BaseAdapter, opt: Any, sched: Any, proc: Proc) -> dict[str, Any]:
    ckpt = safe_torch_load(path, "training state", "resume from a run folder written by train_hidden_adapter.py")
    if not isinstance(ckpt, dict) or ckpt.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a training state file; resume from a run folder of train_hidden_adapter.py")
    if ckpt["level"] != adapter.config.name:
        raise UserError(f"{path} is an {ckpt['level']} run but --adapter_level asks for {adapter.config.name}; "
                        "drop --adapter_level when resuming")
    try:
        adapter.load_state_dict(ckpt["adapter"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit this adapter (other widths?): {str(err)[:160]}") from err
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    rngs = ckpt["rng"]
    if len(rngs) != proc.world_size:
        log.warning("%s was written by %d process(es), this run has %d: data split and dropout differ from an "
                    "uninterrupted run", path, len(rngs), proc.world_size)
    mine = rngs[proc.rank % len(rngs)]
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and proc.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], proc.device)
    return ckpt["state"]


def plot_curves(history: list[dict[str, Any]], path: Path, title: str, predicts: str) -> None:
    """training_curves.png: losses (left), validation acceptance (right), per epoch."""
    ep = [h["epoch"] for h in history]

    def draw(fig: Any, axes: Any) -> None:
        ax_l, ax_a = axes
        ax_l.plot(ep, [h["train_loss"] for h in history], "-o", ms=3, label="train")
        ax_l.plot(ep, [h["val"]["loss"] for h in history], "-o", ms=3, label="validation")
        ax_l.set_xlabel("epoch")
        ax_l.set_ylabel("loss")
        ax_l.legend()
        token = token_key(predicts)
        for key, label in (("accept@0.90", "Accept@0.90"), (token, token.replace("_", " "))):
            values = [h["val"].get(key) for h in history]
            if any(v is not None for v in values):
                ax_a.plot(ep, [math.nan if v is None else v for v in values], "-o", ms=3, label=label)
        ax_a.set_xlabel("epoch")
        ax_a.set_ylabel("validation, share of positions")
        ax_a.set_ylim(0, 1.02)
        ax_a.legend()
        fig.suptitle(title)

    save_figure(path, draw, ncols=2, figsize=(10, 4), dpi=110)


def write_config(path: Path, args: argparse.Namespace) -> None:
    import yaml

    atomic_write_bytes(yaml.safe_dump(config_values(args), sort_keys=False).encode(), path)


def data_record(train: ChunkStream, val: ChunkStream) -> dict[str, Any]:
    """What best_model.pt records about its data: folders, counts and the models' config hashes."""
    def one(s: ChunkStream) -> dict[str, Any]:
        return {"manifest": str(s.data_dir / "manifest.json"), "num_samples": s.num_samples,
                "split": s.manifest.get("split"), "max_new_tokens": s.manifest.get("max_new_tokens")}

    return {"train": one(train), "val": one(val), "models": train.manifest.get("models"),
            "widths": train.manifest.get("widths")}


# ----------------------------------------------------------------------------- main


def run_epochs(ctx: dict[str, Any], args: argparse.Namespace, proc: Proc) -> dict[str, Any]:
    adapter, model, opt, sched, state = ctx["adapter"], ctx["model"], ctx["opt"], ctx["sched"], ctx["state"]
    run_dir: Path = ctx["run_dir"]
    while state["epoch"] < args.num_epochs and not state["finished"]:
        t0 = time.perf_counter()
        stats = train_epoch(model, adapter, ctx["train"], opt, sched, state, args, proc, ctx["head"])
        val, calibration = validate(model, adapter, ctx["val"], ctx["head"], args, proc)
        state["epoch"] += 1
        value = select_value(val, args.select, adapter.predicts)
        improved = is_better(value, state["best_value"], args.select, args.min_delta)
        if improved:
            state.update(best_value=value, best_epoch=state["epoch"], bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        entry = {"epoch": state["epoch"], "step": state["step"], "lr": sched.get_last_lr()[0], **stats,
                 "val": val, "best": improved, "epoch_s": time.perf_counter() - t0}
        state["history"].append(strict_json(entry))
        roll = f", roll-out accepted/iter {val['rollout_accept']:.3f}" if "rollout_accept" in val else ""
        if stats["train_samples_dropped"]:
            roll += f", {stats['train_samples_dropped']} train samples left out to keep the ranks in step"
        ctx["trackers"].log(tracker_values(entry, adapter.predicts), step=state["epoch"])
        log.info("epoch %d: train loss %.4f, val loss %.4f, Accept@0.90 %.3f, %s %s%s, %.0f samples/s, "
                 "data wait %.0f%%%s", state["epoch"], stats["train_loss"], val["loss"], val["accept@0.90"],
                 token_key(adapter.predicts), f"{val.get(token_key(adapter.predicts), math.nan):.3f}", roll,
                 stats["samples_per_s"], 100 * stats["data_wait_share"], " (best)" if improved else "")
        if args.max_steps is not None and state["step"] >= args.max_steps:
            state["finished"], state["stop_reason"] = True, f"max_steps {args.max_steps} reached"
        elif args.early_stopping and state["bad_epochs"] >= args.early_stopping:
            state["finished"], state["stop_reason"] = True, f"early stopping after {state['bad_epochs']} epochs " \
                                                            "without improvement"
        elif state["epoch"] >= args.num_epochs:
            state["finished"], state["stop_reason"] = True, "all epochs done"
        if proc.is_main:
            if improved:
                save_adapter(run_dir / "best_model.pt", adapter, pairs=args.pairs, args=config_values(args),
                             epoch=state["epoch"], val_metrics=strict_json(val), data=ctx["data"],
                             loss_mix=args.loss_mix, prediction_weight=args.prediction_weight,
                             select_metric=args.select, world_size=proc.world_size,
                             drafting=drafting_record(args), draft_calibration=strict_json(calibration),
                             started=state.get("started"))
            atomic_write_json({"level": adapter.config.name, "pairs": args.pairs, "finished": state["finished"],
                               "stop_reason": state["stop_reason"], "best_epoch": state["best_epoch"],
                               "initial_val": state["initial_val"], "history": state["history"]},
                              run_dir / "history.json")
            plot_curves(state["history"], run_dir / "training_curves.png",
                        f"{adapter.config.name} ({args.pairs} pairs)", adapter.predicts)
        save_state(run_dir / "last.pt", adapter, opt, sched, state, proc)
        if not state["finished"] and args.stop_after_epoch is not None and state["epoch"] >= args.stop_after_epoch:
            log.info("stopped after epoch %d as asked; continue with --resume %s", state["epoch"], run_dir)
            return state
    return state


def main(args: argparse.Namespace) -> dict[str, Any]:
    proc = setup_processes(args)
    set_seed(args.seed)
    need_drafter = canonical_name(args.level_name) != "B1"
    train, val = open_data(args, proc, need_drafter)
    widths = train.manifest.get("widths") or {}
    head_file = load_head(args, int(widths.get("target") or 0) or None, train.manifest)
    adapter = build_adapter_for(args, widths, head_file["vocab_size"] if head_file else None).to(proc.device)
    problem = rollout_problem(adapter.config) if adapter.predicts == "next" else None
    if problem:  # training rolls it out (validation always does) and the engine would draft that way
        raise UserError(f"{args.train_data}: {problem}")
    if args.use_token_input:
        adapter.attach_token_table(head_file["embed_weight"])
    head = head_file["weight"].to(proc.device, torch.float32) if head_file else None
    model: nn.Module = Drafting(adapter, args.steps)
    if proc.world_size > 1:
        ids = [proc.device.index] if proc.device.type == "cuda" else None
        # the token table is a frozen buffer, the same on every rank: never broadcast it each step
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    torch.manual_seed(args.seed + 1000 * proc.rank)  # dropout differs across ranks, same init everywhere
    opt = torch.optim.AdamW(adapter.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    total = sum(train.even_num_batches(e) for e in range(args.num_epochs))
    total = min(total, args.max_steps or total)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    run_dir = make_run_dir(args, proc)
    with RunLog(run_dir / "log.txt", enabled=proc.is_main):
        return train_in(run_dir, args, proc, train, val, adapter, model, opt, sched, head, total)


def train_in(run_dir: Path, args: argparse.Namespace, proc: Proc, train: ChunkStream, val: ChunkStream,
             adapter: BaseAdapter, model: nn.Module, opt: Any, sched: Any, head: Tensor | None, total: int
             ) -> dict[str, Any]:
    """Everything after the run folder exists (main runs it inside the folder's run log)."""
    state = {"epoch": 0, "step": 0, "best_value": None, "best_epoch": None, "bad_epochs": 0, "history": [],
             "finished": False, "stop_reason": None, "started": datetime.now().isoformat(timespec="seconds")}
    if args.resume:
        state = load_state(run_dir / "last.pt", adapter, opt, sched, proc)
        log.info("resuming %s after epoch %d (step %d)", run_dir, state["epoch"], state["step"])
        if args.overridden:
            log.warning("--override: continuing with %s", ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in args.overridden.items()))
            if proc.is_main:
                write_config(run_dir / "config.yaml", args)
    else:
        if proc.is_main:
            write_config(run_dir / "config.yaml", args)
        # the untrained adapter's score: the yardstick every epoch is read against (L5/B1/L5F start as identity)
        state["initial_val"] = strict_json(validate(model, adapter, val, head, args, proc)[0])
    log.info("%s on %s pairs: %d train / %d val samples, %d process(es) on %s, %d steps planned, run folder %s",
             adapter, args.pairs, train.num_samples, val.num_samples, proc.world_size, proc.device, total, run_dir)
    trackers = Trackers(args.trackers, run_dir, config_values(args), proc)
    ctx = {"adapter": adapter, "model": model, "opt": opt, "sched": sched, "state": state, "run_dir": run_dir,
           "train": train, "val": val, "head": head, "data": data_record(train, val), "trackers": trackers}
    try:
        state = run_epochs(ctx, args, proc)
    finally:
        trackers.finish()
    return finish(state, run_dir, args, proc)


def finish(state: dict[str, Any], run_dir: Path, args: argparse.Namespace, proc: Proc) -> dict[str, Any]:
    result = {"run_dir": str(run_dir), "epochs": state["epoch"], "steps": state["step"],
              "finished": state["finished"], "stop_reason": state["stop_reason"], "best_epoch": state["best_epoch"]}
    if proc.world_size > 1:
        torch.distributed.barrier()
    if not state["finished"] or state["best_epoch"] is None:
        return result
    best = state["history"][state["best_epoch"] - 1]["val"]
    result["best_val"] = best
    dropped = sum(h.get("train_samples_dropped") or 0 for h in state["history"])
    result["train_samples_dropped"] = dropped
    if proc.is_main:
        adapter, _ = load_adapter(run_dir / "best_model.pt")
        export_hf(adapter, run_dir / "hf")
        if dropped:
            print(f"{dropped} train samples over {state['epoch']} epochs were left out to keep the "
                  f"{proc.world_size} processes in step (the ranks' batches beyond the smallest share; a new order "
                  "every epoch)")
        key = token_key(adapter.predicts)
        top1 = best.get(key)
        top1_text = f"{key.replace('_', ' ')} {top1:.3f}" if top1 is not None else "token top-1 n/a (no --lm_head)"
        print(f"{args.level_name} {args.pairs}: best epoch {state['best_epoch']}/{state['epoch']} "
              f"({state['stop_reason']}): val loss {best['loss']:.4f}, Accept@0.90 {best['accept@0.90']:.3f}, "
              f"{top1_text} -> {run_dir / 'best_model.pt'}")
        if args.push_to_hub:
            result["hub_url"] = push_to_hub(run_dir / "hf", args.hub_model_id or run_dir.name)
    return result


# ----------------------------------------------------------------------------- trackers and the Hub


def tracker_values(entry: dict[str, Any], predicts: str) -> dict[str, float]:
    """The per-epoch scalars sent to the trackers (finite numbers only)."""
    val = entry["val"]
    values = {"lr": entry["lr"], "train/loss": entry["train_loss"], "train/align": entry["train_align"],
              "train/pred": entry["train_pred"], "train/samples_per_s": entry["samples_per_s"],
              "train/data_wait_share": entry["data_wait_share"],
              "train/samples_dropped": entry["train_samples_dropped"]}
    for key in ("loss", "cos_mean", "accept@0.90", token_key(predicts), "rollout_accept"):
        values[f"val/{key}"] = val.get(key)
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}


class Trackers:
    """accelerate's experiment trackers, as `Accelerator(log_with=...).init_trackers` would set them up, on the
    main process only (this script owns its processes through PartialState, not an Accelerator)."""

    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any], proc: Proc):
        self.trackers: list[Any] = []
        if not names or not proc.is_main:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        hparams = {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in config.items()}
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = (cls("tensorboard", run_dir) if cls.requires_logging_directory
                       else cls("xmodal-sd", name=run_dir.name, dir=str(run_dir)))
            tracker.start()
            tracker.store_init_configuration(hparams)
            self.trackers.append(tracker)
        log.info("reporting per-epoch metrics to %s", ", ".join(names))

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload the hf/ export (config.json, model.safetensors) to a Hub model repository; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo.repo_id, repo_type="model",
                          commit_message=f"xmodal-sd adapter from {folder.parent.name}")
    except Exception as err:  # network, login, permissions: the export is kept either way
        raise UserError(f"cannot push {folder} to the Hub as {repo_id}: {first_line(err)}; the export is kept, "
                        f"upload it later with `hf upload {repo_id} {folder}`") from err
    url = f"https://huggingface.co/{repo.repo_id}"
    print(f"pushed {folder} to {url}")
    return url


if __name__ == "__main__":
    run_cli(main, parse_args)
