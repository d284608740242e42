"""Experiment trackers for training: accelerate's TensorBoard and W&B trackers, set up as
`Accelerator(log_with=...).init_trackers` would, on the main process only (train_hidden_adapter.py owns
its processes through accelerate's PartialState, not an Accelerator). `--report_to` picks them.

    >>> names = resolve_trackers("auto")             # ["tensorboard"] when it is installed, else []
    >>> trackers = Trackers(names, run_dir, config, is_main=True)
    >>> trackers.log({"val/loss": 0.1}, step=1); trackers.finish()
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["REPORT_TO", "Trackers", "resolve_trackers"]

log = logging.getLogger("xmodal_sd.train")

REPORT_TO = ("auto", "tensorboard", "wandb", "none")


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


class Trackers:
    """accelerate's experiment trackers, as `Accelerator(log_with=...).init_trackers` would set them up, on the
    main process only (this script owns its processes through PartialState, not an Accelerator)."""

    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any], is_main: bool):
        self.trackers: list[Any] = []
        if not names or not is_main:
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
