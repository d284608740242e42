"""The adapter checkpoint (`best_model.pt`) every stage reads and writes: a format tag and version,
the adapter's config (hidden_adapter.AdapterConfig), its weights and a plain `extra` dict (training
arguments, metrics). Loading checks the tag, the version, the level and the widths, and any problem is
one UserError line naming the file. The Hugging Face form for sharing is in adapter_hub.py.

    >>> from adapter_checkpoint import load_adapter, save_adapter
    >>> save_adapter("tasks/toy/run/best_model.pt", adapter, epoch=3)
    >>> adapter, extra = load_adapter("tasks/toy/run/best_model.pt", expected_level="B1", target_dim=64)
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from common import UserError, atomic_torch_save, first_line, safe_torch_load
from hidden_adapter import AdapterConfig, BaseAdapter, build_adapter, canonical_name

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_adapter", "read_adapter_config", "save_adapter"]

CHECKPOINT_FORMAT = "xmodal_sd.adapter"
CHECKPOINT_VERSION = 1


def _plain(obj: Any, where: str = "extra") -> Any:
    """Convert to types `torch.load(weights_only=True)` accepts; Paths become strings."""
    if obj is None or isinstance(obj, bool | int | float | str | Tensor):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, list | tuple):
        return [_plain(v, where) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, argparse.Namespace):
        return _plain(vars(obj), where)
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a checkpoint (plain types only)")


def save_adapter(path: str | Path, adapter: BaseAdapter, **extra: Any) -> None:
    """Write a self-describing checkpoint: format tag, adapter config, weights, and `extra` (e.g.
    the training args and metrics; plain types only). Atomic."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": asdict(adapter.config),
        "state_dict": {k: v.detach().cpu() for k, v in adapter.state_dict().items()},
        "extra": _plain(extra),
    }
    atomic_torch_save(payload, path)


_CHECKPOINT_FIX = "pass a best_model.pt written by train_hidden_adapter.py"


def _read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> tuple[dict, AdapterConfig]:
    """The checkpoint dict and its config, checked (format tag, version, config fields); one UserError line."""
    ckpt = safe_torch_load(path, "adapter checkpoint", _CHECKPOINT_FIX, map_location=map_location, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an adapter checkpoint (no '{CHECKPOINT_FORMAT}' tag); {_CHECKPOINT_FIX}")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise UserError(
            f"{path} has adapter format version {ckpt.get('format_version')}, "
            f"this code reads version {CHECKPOINT_VERSION}; retrain or use a matching release"
        )
    try:
        return ckpt, AdapterConfig(**ckpt["config"])
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"{path} holds an unusable adapter config: {err}") from err


def read_adapter_config(path: str | Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """(config, extra) of an adapter checkpoint without building the adapter or reading its weights (the
    tensors are memory-mapped): the quick look of a check before loading. Problems as in load_adapter."""
    ckpt, config = _read_checkpoint(path, mmap=True)
    return config, ckpt.get("extra", {})


def load_adapter(
    path: str | Path,
    *,
    expected_level: int | str | None = None,
    drafter_dim: int | None = None,
    target_dim: int | None = None,
    map_location: Any = "cpu",
) -> tuple[BaseAdapter, dict[str, Any]]:
    """Rebuild an adapter from its checkpoint; returns (adapter in eval mode, the `extra` dict).

    Any problem (missing, corrupt, not an adapter checkpoint, another level or width than expected)
    raises UserError with one line naming the file.
    """
    ckpt, config = _read_checkpoint(path, map_location)
    try:
        adapter = build_adapter(config)
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"{path} holds an unusable adapter config: {err}") from err
    if expected_level is not None and canonical_name(expected_level) != config.name:
        raise UserError(
            f"{path} is a {config.name} adapter but {canonical_name(expected_level)} was expected; "
            "pass the checkpoint of the right level"
        )
    for what, want, have in (("drafter", drafter_dim, config.drafter_dim), ("target", target_dim, config.target_dim)):
        if want is not None and want != have:
            raise UserError(
                f"{path} was trained for {what} width {have} but the data/model has width {want}; "
                "use an adapter trained on hidden states of these models"
            )
    try:
        adapter.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise UserError(f"{path}: weights do not match its own config ({first_line(err)})") from err
    adapter.eval()
    return adapter, ckpt.get("extra", {})
