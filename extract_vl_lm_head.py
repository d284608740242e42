"""Save the target's (Video-LLaVA's) LM head, and its input-embedding table, for offline token-level
metrics and for the adapters that read tokens.

Stored hidden states are taken after the final norm, so token logits are simply `h @ weight.T`. The
input embeddings are what EAGLE-style heads with a token input (`token_input=True`) look tokens up in:
the target's own frozen table, kept once here instead of a trainable copy in every adapter.

    # toy world (seconds)
    python extract_vl_lm_head.py --vl_model data/toy/models/video_llava --output data/toy/vl_lm_head.pt
    # the real model: read straight from its safetensors when local, else load it (4-bit is dequantised)
    python extract_vl_lm_head.py --vl_model LanguageBind/Video-LLaVA-7B-hf --output data/vl_lm_head.pt

Output: {"weight": [V, D] fp16, "embed_weight": [V, D] fp16, "vocab_size": V, "hidden_dim": D,
"model": path, "config_hash": str}.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from cli import add_dry_run_flag, dry_run_report, run_cli
from common import UserError, atomic_torch_save
from hidden_data import load_lm_head
from preflight import preflight
from vlm_runners import QUANT_CHOICES

log = logging.getLogger("xmodal_sd.lm_head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--vl_model", default="LanguageBind/Video-LLaVA-7B-hf",
                   help="Video-LLaVA folder or hub id (transformers format); default the released 7B model")
    p.add_argument("--output", default="data/vl_lm_head.pt", help="where to write the LM head .pt")
    p.add_argument(
        "--quant",
        default="none",
        choices=QUANT_CHOICES,
        help="only used when the model has to be loaded (no local safetensors): bitsandbytes mode",
    )
    p.add_argument("--device", default="auto", help="device used when the model has to be loaded")
    p.add_argument("--overwrite", action="store_true", help="rewrite the output even if it exists")
    add_dry_run_flag(p)
    return p.parse_args(argv)


def extract(vl_model: str, quant: str = "none", device: str = "auto") -> dict[str, Any]:
    """The LM head file's contents (model_builders.read_lm_head): from a local folder's files, else loaded."""
    from model_builders import read_lm_head

    return read_lm_head(vl_model, quant=quant, device=device)


def main(args: argparse.Namespace) -> dict[str, Any] | int:
    checks = preflight(args)
    if args.dry_run:
        return dry_run_report("extract_vl_lm_head.py", checks, [f"write {args.vl_model}'s LM head to {args.output}"])
    out = Path(args.output)
    if out.is_file() and not args.overwrite:
        head = load_lm_head(out)
        if isinstance(head.get("embed_weight"), torch.Tensor):
            print(f"{out} exists (vocab {head['vocab_size']}, width {head['hidden_dim']}); pass --overwrite to redo")
            return head
        log.info("%s lacks the input-embedding table (an older file); rewriting it", out)
    head = extract(args.vl_model, args.quant, args.device)
    try:
        atomic_torch_save(head, out)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}; choose a writable --output") from err
    print(f"wrote {out}: LM head and input embeddings [{head['vocab_size']}, {head['hidden_dim']}] fp16 "
          f"from {head['model']}")
    return head


if __name__ == "__main__":
    run_cli(main, parse_args)
