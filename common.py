"""Small shared helpers: errors for user mistakes, device/dtype choice, atomic writes, safe loads.

Every stage script imports from here instead of re-implementing these ten-line pieces.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("xmodal_sd")
# torchao 0.18, which transformers imports whenever it is installed, registers two enums in a way torch 2.14
# deprecates, and torch warns at every start of every script; the warning is about torchao's code, not ours.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


class UserError(Exception):
    """A mistake the user can fix (bad path, wrong file, bad flag). Printed as one line, no traceback."""


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once: `LEVEL message` lines on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def run_cli(main: Callable[[Any], Any], parse_args: Callable[[], Any]) -> None:
    """Run `main(parse_args())`; a `UserError` becomes one `error: ...` line and exit code 2."""
    setup_logging()
    try:
        result = main(parse_args())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, int) and result != 0:
        sys.exit(result)


def resolve_device(requested: str = "auto") -> torch.device:
    """Pick the compute device once and log why. `auto` prefers CUDA, then CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
            log.info("device: cuda (%s), because a CUDA GPU is visible", torch.cuda.get_device_name(0))
        else:
            device = torch.device("cpu")
            log.info("device: cpu, because no CUDA GPU is visible")
        return device
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested} was requested but no CUDA GPU is visible; use --device cpu")
    log.info("device: %s, as requested", requested)
    return torch.device(requested)


DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What "auto" means on CUDA, per model: each in the precision its released code runs it in (EventGPT's
# inference.py casts to bfloat16; the Video-LLaVA-7B-hf model card, LanguageBind's inference and the
# research fork load Video-LLaVA in float16). The adapters run beside the target, in its precision. Without
# a model, "auto" is the GPU's bf16 (fp16 if it lacks bf16). On CPU "auto" is float32 for everything.
AUTO_CUDA_DTYPES = {"eventgpt": torch.bfloat16, "video_llava": torch.float16, "adapter": torch.float16}


def resolve_dtype(requested: str, device: torch.device, model: str | None = None) -> torch.dtype:
    """Map `auto|fp32|fp16|bf16` to a dtype, logging why for `auto`: on CUDA the released precision of
    `model` (`AUTO_CUDA_DTYPES`; bf16 falls back to fp16 on a GPU without it), float32 on CPU."""
    if requested in DTYPES:
        return DTYPES[requested]
    if requested != "auto":
        raise UserError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if model is not None and model not in AUTO_CUDA_DTYPES:
        raise UserError(f"unknown model {model!r}; choose one of {', '.join(AUTO_CUDA_DTYPES)}")
    if device.type != "cuda":
        log.info("%sdtype: float32, because half precision is slow and inexact on CPU", f"{model} " if model else "")
        return torch.float32
    dtype = AUTO_CUDA_DTYPES[model] if model else torch.bfloat16
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.info("%sdtype: float16, because this GPU lacks bfloat16", f"{model} " if model else "")
        return torch.float16
    why = "the precision its released code runs it in" if model else "the fastest exact-enough type on this GPU"
    log.info("%sdtype: %s under auto on CUDA, %s", f"{model} " if model else "", str(dtype).removeprefix("torch."), why)
    return dtype


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if empty), cut to `limit` characters."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer around it measures the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, then rename: readers never see half a file."""
    _atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON (indented, sorted keys kept as given) atomically."""
    _atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write raw bytes atomically."""
    _atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def safe_torch_load(path: str | os.PathLike, what: str, fix: str, map_location: Any = "cpu",
                    mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` that turns a missing or corrupt file into one `UserError` line.
    `mmap=True` maps the tensors instead of reading them (for a look at a checkpoint's small entries);
    a file torch cannot map is read whole."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path} ({fix})")
    try:
        if mmap:
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            except Exception:  # an old-format or damaged file: the plain read below names the problem
                pass
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt/unsafe files
        raise UserError(f"cannot read {what} {path}: {first_line(err)} ({fix})") from err


def read_json(path: str | os.PathLike, what: str, fix: str) -> Any:
    """Read a JSON file, turning a missing or malformed file into one `UserError` line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path} ({fix})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} is not valid JSON: {err} ({fix})") from err


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A padded markdown table (numbers right-aligned by the caller's formatting)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def save_figure(path: str | os.PathLike, draw: Callable[..., Any], *, nrows: int = 1, ncols: int = 1,
                figsize: tuple[float, float] = (6, 4), dpi: int = 120, **subplots: Any) -> Path:
    """Draw one matplotlib figure off-screen and write it as a PNG atomically: `draw(fig, axes)` fills it
    (`axes` as `plt.subplots(nrows, ncols)` returns them). matplotlib is imported only here."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, **subplots)
    try:
        draw(fig, axes)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)
    return Path(path)


# ----------------------------------------------------------------------------- run logs (issue 18)


class RunLog:
    """Appends what a run prints (stdout, log records, its error line) to one file, after the command line.

    The file is created only once its folder exists: output that comes before (a refusal on a bad flag,
    say) stays in memory and is written when the folder appears, or dropped if it never does, so a run
    that refuses to start leaves nothing behind. Progress bars (stderr) are not copied.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._file: Any = None
        self._pending: list[str] = []
        self._stdout: Any = None
        self._handler: logging.Handler | None = None

    def write(self, text: str) -> None:
        if not self.enabled or not text:
            return
        if self._file is None and self.path.parent.is_dir():
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
            self._file.write("".join(self._pending))
            self._pending = []
        if self._file is None:
            self._pending.append(text)
        else:
            self._file.write(text)
            self._file.flush()

    def __enter__(self) -> RunLog:
        if not self.enabled:
            return self
        import shlex
        from datetime import datetime

        self.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} in {os.getcwd()}\n"
                   f"$ python {shlex.join(sys.argv)}\n")
        log_self = self

        class _Tee:
            def __init__(self, stream: Any):
                self.stream = stream

            def write(self, text: str) -> int:
                log_self.write(text)
                return self.stream.write(text)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.stream, name)

        self._stdout, sys.stdout = sys.stdout, _Tee(sys.stdout)
        handler = logging.StreamHandler(_LineSink(self))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        logging.getLogger().addHandler(handler)
        self._handler = handler
        return self

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> None:
        if not self.enabled:
            return
        if isinstance(err, UserError):
            self.write(f"error: {err}\n")
        elif err is not None and not isinstance(err, SystemExit | KeyboardInterrupt):
            self.write(f"failed: {type(err).__name__}: {first_line(err)}\n")
        elif isinstance(err, KeyboardInterrupt):
            self.write("interrupted\n")
        sys.stdout = self._stdout
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
        if self._file is not None:
            self._file.close()
            self._file = None


class _LineSink:
    """A file-like object handing logging output to a RunLog."""

    def __init__(self, run_log: RunLog):
        self.run_log = run_log

    def write(self, text: str) -> None:
        self.run_log.write(text)

    def flush(self) -> None:
        pass


# ----------------------------------------------------------------------------- command line (shared)
# One place for what every stage's parse_args needs: YAML defaults under --config (the command line
# wins), old flag spellings kept as aliases, and the cheap checks a stage runs before it loads models.

ALIAS_NOTE = "old spelling, kept for one release"


def alias_help(text: str, *old: str) -> str:
    """`text` plus the note that names the old spellings a flag still accepts."""
    return f"{text} ({', '.join(old)}: {ALIAS_NOTE})"


def add_config_flag(parser: Any) -> None:
    """Add `--config FILE` (YAML defaults; keys are flag names) to a stage's parser."""
    parser.add_argument("--config", default=None,
                        help="YAML file of defaults, keys = flag names without dashes (old spellings accepted); "
                        "flags on the command line win")


def config_keys(parser: Any) -> dict[str, str]:
    """Every name a config key may use -> the flag's dest: the dest and each long option (aliases too)."""
    keys: dict[str, str] = {}
    for action in parser._actions:
        if action.dest == "help":
            continue
        keys[action.dest] = action.dest
        for opt in action.option_strings:
            if opt.startswith("--"):
                keys[opt[2:]] = action.dest
    return keys


def read_config(path: str | os.PathLike, parser: Any) -> dict[str, Any]:
    """YAML file -> {dest: value}; a missing file, bad YAML or an unknown key is one `UserError` line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (--config)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a mapping of flag names to values")
    keys = config_keys(parser)
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in keys:
            raise UserError(f"{path}: unknown key {key!r}; keys are this script's flag names without dashes "
                            "(see --help)")
        out[keys[name]] = value
    return out


def parse_with_config(parser: Any, argv: list[str] | None = None) -> Any:
    """`parser.parse_args(argv)`, with the file named by `--config` as defaults: the command line wins.

    A required flag given in the file is no longer required on the command line. A config error is
    reported through `parser.error` (one line, exit 2)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    first, _ = pre.parse_known_args(argv)
    if first.config:
        try:
            defaults = read_config(first.config, parser)
        except UserError as err:
            parser.error(str(err))
        for action in parser._actions:
            if action.dest in defaults:
                action.required = False
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def check_dataset_split(dataset_dir: str | os.PathLike, split: str, questions_file: str | None = None,
                        num_event_images: int = 1) -> str:
    """The data set's `{split}/index.json` parses, its clips' videos and first `num_event_images` rendered
    event frames exist (what the model-loading stages read; refused when no clip has them, counted when
    some lack them), and the questions file parses (the data layer's own check); returns one line."""
    from clip_data import check_data_folder

    found = check_data_folder(dataset_dir, [split], questions_file, num_event_images=num_event_images,
                              raw_events=False, strict=False)
    missing = found["clips_missing_files"]
    clips = (f"{found['splits'][split]} clips, {missing} of them missing files (the stage counts and skips "
             "them)" if missing else f"{found['splits'][split]} clips with their files")
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


def check_device(requested: str) -> None:
    """A CUDA device that was asked for is visible (before any model loads)."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested} was requested but no CUDA GPU is visible; use --device cpu")


def check_model_path(path: str, flag: str) -> None:
    """A local model folder exists (a hub id such as org/name is left to the loader)."""
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(".") or p.exists() or len(p.parts) != 2
    if looks_local and not p.is_dir():
        raise UserError(f"{flag} {path}: no such folder (a checkpoint folder, or a hub id org/name)")


def add_dry_run_flag(parser: Any) -> None:
    """Add `--dry_run`: run the cheap checks, print what would run, exit 0 without loading a model."""
    parser.add_argument("--dry_run", action="store_true",
                        help="check the data, questions, adapters, output folder and device, print what would "
                        "run, and exit without loading a model")


def dry_run_report(script: str, checks: list[str], plan: list[str]) -> int:
    """Print what `--dry_run` checked and what would run; the caller returns its 0."""
    print(f"{script} --dry_run: checks passed, no model loaded")
    for line in checks:
        print(f"  ok: {line}")
    for line in plan:
        print(f"  would: {line}")
    return 0


def check_adapter_role(path: str, role: str) -> str:
    """An adapter checkpoint's header reads, and its level can play `role` (prefill: a same-position level
    L1-L4). Only the config is looked at (the tensors are mapped, not read): the stage loads the weights."""
    from hidden_adapter import read_adapter_config

    config, extra = read_adapter_config(path)
    level = config.name
    if role == "prefill" and config.predicts != "same":
        raise UserError(f"--prefill_adapter must be a same-position level (L1-L4), got {level} ({path})")
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
                check_model_path(str(getattr(args, flag)), f"--{flag}")
                done.append(f"--{flag} {getattr(args, flag)}")
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


# Prefill drafting window, one default everywhere: `auto` = as many drafts as EventGPT finishes while the
# target prefills. The live engine stops drafting when the target's prefill ends, so there auto is only a
# cap (PREFILL_WINDOW_CAP, the two-phase model's longest window); the two-phase model fits the window to
# each timing profile; offline measurement records every window and headlines the reference's 7.
PREFILL_WINDOW_CAP = 16
REFERENCE_PREFILL_WINDOW = 7


def gamma_prefill_arg(parser: Any, value: Any, auto: int | None, minimum: int = 1) -> Any:
    """`--gamma_prefill` as given: 'auto' -> `auto` (None keeps the string 'auto'), else an int >= minimum."""
    if str(value) == "auto":
        return "auto" if auto is None else auto
    try:
        number = int(value)
    except (TypeError, ValueError):
        parser.error(f"--gamma_prefill must be an integer >= {minimum} or 'auto', got {value!r}")
    if number < minimum:
        parser.error(f"--gamma_prefill must be >= {minimum} (or 'auto')")
    return number
