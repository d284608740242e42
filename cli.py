"""The stage skeleton every script shares: `run_cli`, `--config FILE.yaml` defaults, old flag spellings
kept as aliases, `--dry_run`, and the run log (`log.txt`) that keeps what a run printed.

    def parse_args(argv=None):
        p = argparse.ArgumentParser(description=__doc__)
        add_config_flag(p)
        ...
        return parse_with_config(p, argv)       # the command line wins over the file

    run_cli(main, parse_args)                   # under the main guard: a UserError or a bad flag is one
                                                # `error: ...` line, exit 2; CPU runs get one torch thread

Imports only common.py, so every module (a stage, or a library module with a command line) can use it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from common import UserError, default_cpu_threads, first_line, setup_logging


def run_cli(main: Callable[[Any], Any], parse_args: Callable[[], Any]) -> None:
    """Run `main(parse_args())`: a bad flag or a `UserError` is one `error: ...` line and exit code 2 (no usage
    block), and a run on the CPU gets one torch thread unless the stage's `--threads` or `OMP_NUM_THREADS`
    says otherwise (common.default_cpu_threads)."""
    setup_logging()
    with one_line_parse_errors():
        args = parse_args()
    if getattr(args, "threads", None) is None:  # a stage with --threads sets its own count
        default_cpu_threads(getattr(args, "device", None))
    try:
        result = main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, int) and result != 0:
        sys.exit(result)


@contextlib.contextmanager
def one_line_parse_errors() -> Iterator[None]:
    """While parsing, argparse's `parser.error` (an unknown or missing flag, a bad value, a stage's own
    checks) prints one line, `error: MESSAGE (python SCRIPT --help lists the flags)`, and exits 2, instead of
    the usage block before it. `--help` is unchanged."""

    def error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
        parser.exit(2, f"error: {message} (python {parser.prog} --help lists the flags)\n")

    before = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = before  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- run logs


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
