"""The bottom layer: errors for user mistakes, logging, device and dtype choice, atomic writes, safe loads,
tables and figures.

Every module may import from here; this module imports no other module of the project (the layering test,
tests/test_layering.py, checks it). The command-line skeleton the stages share is cli.py; the checks a stage
runs before it loads models are preflight.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import warnings
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


def check_device(requested: str) -> None:
    """A CUDA device that was asked for is visible (before any model loads)."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested} was requested but no CUDA GPU is visible; use --device cpu")


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
    check_device(requested)
    log.info("device: %s, as requested", requested)
    return torch.device(requested)


def default_cpu_threads(device: str | None) -> int | None:
    """One torch thread for a run on the CPU unless `OMP_NUM_THREADS` says otherwise; returns the count set
    (None: left as it was). The models of the toy world are so small that a second thread costs more in
    hand-over than it saves, and on a machine others share every extra thread competes with them, so one
    thread is fastest for this project's CPU runs (`OMP_NUM_THREADS=N` gives N, which torch itself reads). A
    run on a GPU (`device` cuda, or auto with one visible) is left as it is: its CPU threads decode videos
    and images."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    on_cpu = str(device or "auto").startswith("cpu") or (str(device or "auto") == "auto"
                                                         and not torch.cuda.is_available())
    if not on_cpu:
        return None
    torch.set_num_threads(1)
    log.debug("cpu: 1 torch thread, the fastest for these models on a shared machine (OMP_NUM_THREADS=N for N)")
    return 1


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
    """`torch.load(weights_only=True)` that turns a missing or unreadable file into one `UserError` line
    saying what is wrong with it (`torch_file_problem`), never torch's own message (cut mid-sentence, or
    advising `weights_only=False`). `mmap=True` maps the tensors instead of reading them (for a look at a
    checkpoint's small entries); a file torch cannot map is read whole."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path} ({fix})")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it is about to refuse
            warnings.simplefilter("ignore", UserWarning)
            if mmap:
                try:
                    return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
                except Exception:  # an old-format or damaged file: the plain read below names the problem
                    pass
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt/unsafe files
        log.debug("torch.load(%s): %s", path, err)
        raise UserError(f"cannot read {what} {path}: {torch_file_problem(path, err)} ({fix})") from err


def torch_file_problem(path: Path, err: BaseException) -> str:
    """What is wrong with a file `torch.load(weights_only=True)` refused, judged from the file itself."""
    import zipfile

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        return "the file is empty (0 bytes; an interrupted write or copy)"
    if "unsupported global" in str(err).lower():
        return ("it holds Python objects beyond tensors and plain types, which this project never writes and "
                "will not unpickle (a file from another program, or one that is not safe to load)")
    if head == b"PK\x03\x04":  # torch.save's zip container
        if not zipfile.is_zipfile(path):
            return (f"the file is truncated ({size:,} bytes of a torch zip archive without its end; an "
                    "interrupted write or copy)")
        return f"a damaged torch archive ({size:,} bytes; {type(err).__name__})"
    if head[:1] == b"\x80":
        return f"not a torch file, or a damaged one ({size:,} bytes of a pickle that torch cannot read)"
    return f"not a torch file ({size:,} bytes that are neither a torch zip archive nor a pickle)"


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
