"""Small shared helpers: errors for user mistakes, device/dtype choice, atomic writes, safe loads.

Every stage script imports from here instead of re-implementing these ten-line pieces.
"""

from __future__ import annotations

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


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Map `auto|fp32|fp16|bf16` to a dtype; `auto` is bf16 on CUDA (fp16 if bf16 is missing), fp32 on CPU."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if requested in table:
        return table[requested]
    if requested != "auto":
        raise UserError(f"unknown dtype {requested!r}; choose one of auto, fp32, fp16, bf16")
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        log.info("dtype: %s, the fastest exact-enough type on this GPU", dtype)
        return dtype
    log.info("dtype: float32, because half precision is slow and inexact on CPU")
    return torch.float32


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


def safe_torch_load(path: str | os.PathLike, what: str, fix: str, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` that turns a missing or corrupt file into one `UserError` line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path} ({fix})")
    try:
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
