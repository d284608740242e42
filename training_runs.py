"""The training runs of a tasks folder, read from their files: each finished run's level, pairing and start
time come from its `best_model.pt` (the adapter config and the training record), never from the folder's name.

`newest_runs(tasks_dir)` keeps the newest run of every (level, pairing); the results page (write_results.py)
and the offline evaluation of every adapter (run_all_eval.sh, through the command below) read it.

    python training_runs.py tasks/toy                      # level, pairing, roles, folder: one tab-separated line each
    python training_runs.py tasks/toy --levels L3 L4 B1    # only these levels
    python training_runs.py tasks/toy --finished           # only runs that ran to their end
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from adapter_checkpoint import read_adapter_config
from cli import run_cli
from common import UserError, read_json
from hidden_adapter import AdapterConfig, canonical_name

log = logging.getLogger("xmodal_sd.runs")


@dataclass(frozen=True)
class Run:
    """One training run (finished or not: see `finished`): its folder and what its best_model.pt says."""

    folder: Path
    config: AdapterConfig
    pairs: str
    started: float  # POSIX seconds: the recorded start, or best_model.pt's modification time for older runs

    @property
    def level(self) -> str:
        return self.config.name

    @property
    def checkpoint(self) -> Path:
        return self.folder / "best_model.pt"


def read_run(folder: str | Path) -> Run:
    """The run in `folder` (it must hold a best_model.pt); a damaged checkpoint is one UserError line."""
    folder = Path(folder)
    config, extra = read_adapter_config(folder / "best_model.pt")
    pairs = extra.get("pairs")
    if not isinstance(pairs, str):
        raise UserError(f"{folder / 'best_model.pt'} records no pairing (not written by train_hidden_adapter.py)")
    started, when = extra.get("started"), None
    if isinstance(started, str):
        try:
            when = datetime.fromisoformat(started).timestamp()
        except ValueError:
            log.warning("%s: unreadable start time %r; using the file's time", folder / "best_model.pt", started)
    return Run(folder, config, pairs, when if when is not None else (folder / "best_model.pt").stat().st_mtime)


def finished(run: Run) -> bool:
    """Whether the run's history.json says it ran to its end (every epoch, or early stopping)."""
    path = run.folder / "history.json"
    try:
        history = read_json(path, "training history", "rerun the training") if path.is_file() else None
    except UserError:
        return False
    return isinstance(history, dict) and history.get("finished") is True


def newest_runs(tasks_dir: str | Path, levels: list[str] | None = None, only_finished: bool = False
                ) -> tuple[dict[tuple[str, str], Run], int]:
    """({(level, pairing): newest run}, how many folders were passed over: a folder of `tasks_dir` without a
    best_model.pt anywhere below it, or a checkpoint that cannot be read, which is logged). `levels` keeps
    only those levels (any spelling: 3, "l3", "L3");
    `only_finished` only runs whose history says they finished (an interrupted run is resumed, not used)."""
    wanted = {canonical_name(level) for level in levels} if levels else None
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise UserError(f"tasks folder not found: {tasks_dir} (train adapters with train_hidden_adapter.py)")
    runs: dict[tuple[str, str], Run] = {}
    # a run folder is any folder holding a best_model.pt, at any depth (tasks/L1/<run>/ as the specification
    # lays them out, or tasks/<run>/ as the pipeline does)
    checkpoints = sorted(tasks_dir.glob("**/best_model.pt"))
    ignored = sum(1 for top in tasks_dir.iterdir() if top.is_dir() and not any(
        c.is_relative_to(top) for c in checkpoints))
    for checkpoint in checkpoints:
        try:
            run = read_run(checkpoint.parent)
        except UserError as err:
            log.warning("passing over %s: %s", checkpoint.parent, err)
            ignored += 1
            continue
        if (wanted is not None and run.level not in wanted) or (only_finished and not finished(run)):
            continue
        key = (run.level, run.pairs)
        if key not in runs or (run.started, run.folder.name) > (runs[key].started, runs[key].folder.name):
            runs[key] = run
    return runs, ignored


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks_dir", type=Path, help="folder of training runs (train_hidden_adapter.py --output_dir)")
    p.add_argument("--levels", nargs="+", default=None, help="only these levels (e.g. L3 L4 L5 B1 L5F)")
    p.add_argument("--finished", action="store_true",
                   help="only runs whose history.json says they finished (run_pipeline.sh keeps those)")
    args = p.parse_args(argv)
    for level in args.levels or []:
        try:
            canonical_name(level)
        except ValueError as err:
            p.error(str(err))
    if not args.tasks_dir.is_dir():
        p.error(f"tasks folder not found: {args.tasks_dir} (train adapters with train_hidden_adapter.py)")
    return args


def main(args: argparse.Namespace) -> dict[tuple[str, str], Run]:
    """Print `level<TAB>pairs<TAB>rolls_out_from_drafter<TAB>folder` per newest run, sorted; a count on stderr."""
    import sys

    runs, ignored = newest_runs(args.tasks_dir, args.levels, only_finished=args.finished)
    for (level, pairs), run in sorted(runs.items()):
        # L5: a roll-out head that reads drafter states is also scored fed the target's states (the live engine)
        target_input = int(run.config.rolls_out and run.config.consumes == "drafter")
        print(f"{level}\t{pairs}\t{target_input}\t{run.folder}")
    print(f"{len(runs)} run(s) (level x pairing), {ignored} folder(s) without a readable best_model.pt passed over",
          file=sys.stderr)
    return runs


if __name__ == "__main__":
    run_cli(main, parse_args)
