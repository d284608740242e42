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
from common import UserError, atomic_torch_save, read_json
from hidden_data import LM_HEAD_FORMAT, load_lm_head
from preflight import preflight
from vlm_runners import QUANT_CHOICES

log = logging.getLogger("xmodal_sd.lm_head")
HEAD_KEYS = ("lm_head.weight", "embed_tokens.weight")  # the LM head and the input embeddings, by key suffix


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--vl_model", required=True, help="Video-LLaVA folder or hub id (transformers format)")
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
    from model_builders import VIDEO_LLAVA_MODEL_TYPE, checkpoint_tensors, config_hash

    folder = Path(vl_model)
    if folder.is_dir():
        cfg = read_json(folder / "config.json", "model config", "point --vl_model at a Video-LLaVA folder")
        if cfg.get("model_type") != VIDEO_LLAVA_MODEL_TYPE:
            raise UserError(f"{folder / 'config.json'} has model_type {cfg.get('model_type')!r}, not "
                            f"{VIDEO_LLAVA_MODEL_TYPE!r}: the LM head must be the target's (Video-LLaVA's)")
    # Straight from a local folder's files, no model build. Vision towers' embeddings never match: their
    # keys end otherwise.
    found = checkpoint_tensors(folder, suffixes=HEAD_KEYS) if folder.is_dir() else {}
    weight, embed = (next((v for k, v in found.items() if k.endswith(suffix)), None) for suffix in HEAD_KEYS)
    if weight is not None and embed is not None:
        log.info("read the LM head and input embeddings from the files in %s", folder)
        chash = config_hash(folder / "config.json")
    else:
        from model_builders import load_video_llava

        runner = load_video_llava(vl_model, quant=quant, device=device)
        weight = runner.lm_head_weight()
        embed = runner.decoder.get_input_embeddings().weight  # bitsandbytes leaves embeddings unquantised
        chash = runner.config_hash
    if tuple(embed.shape) != tuple(weight.shape):
        raise UserError(f"{vl_model}: input embeddings {tuple(embed.shape)} and LM head {tuple(weight.shape)} differ "
                        "in shape; this is not a Video-LLaVA language model")
    return {
        "format": LM_HEAD_FORMAT,
        "weight": weight.detach().float().cpu().half().contiguous(),
        "embed_weight": embed.detach().float().cpu().half().contiguous(),
        "vocab_size": int(weight.shape[0]),
        "hidden_dim": int(weight.shape[1]),
        "model": str(vl_model),
        "config_hash": chash,
    }


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
