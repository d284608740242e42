"""The Hugging Face form of an adapter: `config.json` + `model.safetensors` through huggingface_hub's
`PyTorchModelHubMixin`, for sharing a trained adapter as a folder or a Hub repository. The project's own
checkpoint (`best_model.pt`, hidden_adapter.save_adapter / load_adapter) stays the format the stages read.

    >>> from adapter_hub import export_hf, load_hf
    >>> export_hf(adapter, "tasks/toy/B1_run/hf")     # train_hidden_adapter.py does this after training
    >>> adapter = load_hf("tasks/toy/B1_run/hf")      # or a Hub repo id
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from common import UserError, first_line
from hidden_adapter import AdapterConfig, BaseAdapter, build_adapter

__all__ = ["export_hf", "load_hf"]


def _hub_class() -> type:
    """`HubAdapter`: an nn.Module with huggingface_hub's PyTorchModelHubMixin, built on first use so
    importing this module does not import huggingface_hub."""
    global _HUB_CLASS
    if _HUB_CLASS is None:
        from huggingface_hub import PyTorchModelHubMixin

        class HubAdapter(nn.Module, PyTorchModelHubMixin, library_name="xmodal-sd", tags=["speculative-decoding"]):
            """Wraps one adapter; `config.json` holds `adapter_config` (an AdapterConfig as a dict)."""

            def __init__(self, adapter_config: dict[str, Any]):
                super().__init__()
                self.adapter = build_adapter(AdapterConfig(**adapter_config))

            def forward(self, *args: Any, **kwargs: Any) -> Tensor:
                return self.adapter(*args, **kwargs)

        _HUB_CLASS = HubAdapter
    return _HUB_CLASS


_HUB_CLASS: type | None = None


def export_hf(adapter: BaseAdapter, out_dir: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` (huggingface_hub's format) for sharing: reload with
    `load_hf(out_dir)` or `HubAdapter.from_pretrained(repo_or_dir)`, or push with `push_to_hub`."""
    hub = _hub_class()(adapter_config=asdict(adapter.config))
    hub.adapter.load_state_dict(adapter.state_dict())
    hub.save_pretrained(out_dir)
    return Path(out_dir)


def load_hf(path_or_repo: str | Path) -> BaseAdapter:
    """Rebuild an adapter exported by `export_hf` (a local folder or a Hub repo id), in eval mode."""
    try:
        hub = _hub_class().from_pretrained(str(path_or_repo))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"cannot load an exported adapter from {path_or_repo}: {first_line(err)}") from err
    return hub.adapter.eval()
