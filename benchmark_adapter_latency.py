"""Forward latency of every adapter level at batch 1: a whole answer (50 positions) and one decode step.

    # tiny CPU run (seconds)
    python benchmark_adapter_latency.py --hidden_dim 64 --repeats 20 --output results/adapter_latency_toy.json
    # the reference shape (4096 wide, Vicuna-7B) on a GPU, fp16
    python benchmark_adapter_latency.py --device cuda --dtype fp16 --output results/adapter_latency_cuda.json
    # the causal levels' step as the engine's compiled path runs it (preallocated cache, CUDA graphs)
    python benchmark_adapter_latency.py --device cuda --dtype fp16 --levels L5 B1 L5F L5E --compile \
        --output results/adapter_latency_cuda_compiled.json

"Decode step" is what drafting one more token costs: L1-L3 run on the new position alone; L4 is
bidirectional, so it must rerun the whole window; L5, B1 and L5F run one incremental causal step
against cached keys/values of the previous positions (`drafters.draft_step`: `adapter.step` on a
growing cache; with `--static_cache` or `--compile` on a preallocated one, `drafters.StaticAdapterCache`,
as the engine's static and compiled paths draft). Every run is timed between device synchronisations
(`timing.time_ms`); results are the median and spread over `--repeats` runs after `--warmup`.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from typing import Any

import torch

from cli import run_cli
from common import DTYPE_CHOICES, atomic_write_json, markdown_table, resolve_device, resolve_dtype
from drafters import draft_step
from hidden_adapter import (
    ADAPTER_NAMES,
    AttentionAdapter,
    EAGLEStyleAdapter,
    canonical_name,
    count_parameters,
    create_adapter,
)
from timing import spread, time_ms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", nargs="+", default=list(ADAPTER_NAMES), help="levels to time (default: all)")
    parser.add_argument("--hidden_dim", type=int, default=4096, help="width of both models (4096 = 7B)")
    parser.add_argument("--seq_len", type=int, default=50, help="positions in one answer (max_new_tokens)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto (fp16 on CUDA, as the target runs; fp32 on CPU), fp32, fp16 or bf16")
    parser.add_argument("--static_cache", action="store_true",
                        help="time the causal levels' step on a preallocated cache (the engine's static path)")
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile that step (CUDA graphs on CUDA; the engine's --compile); "
                             "implies --static_cache")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per measurement")
    parser.add_argument("--output", default="results/adapter_latency.json", help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.repeats < 3 or args.warmup < 0 or args.seq_len < 2:
        parser.error("--repeats must be >= 3, --warmup >= 0 and --seq_len >= 2")
    args.static_cache = args.static_cache or args.compile
    if args.hidden_dim % 8:
        parser.error("--hidden_dim must be a multiple of 8 (8 attention heads)")
    try:
        args.levels = [canonical_name(level) for level in args.levels]
    except ValueError as err:
        parser.error(str(err))
    return args


def step_path(args: argparse.Namespace) -> str:
    """The adapter-cache path the causal levels' step is timed on: dynamic, static or compiled."""
    return "compiled" if args.compile else "static" if args.static_cache else "dynamic"


def latency(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median / p10 / p90 / min / max wall time of fn() in milliseconds (timing.time_ms and timing.spread)."""
    return {f"{key}_ms": value for key, value in spread(time_ms(fn, device, warmup, repeats), percentiles=True).items()}


@torch.inference_mode()
def bench_level(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    torch.manual_seed(0)
    adapter = create_adapter(name, args.hidden_dim).to(device=device, dtype=dtype).eval()
    d, t = args.hidden_dim, args.seq_len
    x = torch.randn(1, t, adapter.config.in_dim, device=device, dtype=dtype)  # E3: the target's K layer states
    v = torch.randn(1, t, d, device=device, dtype=dtype) if adapter.consumes == "both" else None
    # L5E's EventGPT context: raw for a whole answer; the drafting step reads it projected once per answer
    ctx = torch.randn(1, d, device=device, dtype=dtype) if adapter.config.context else None

    def whole() -> Any:
        return adapter(x, h_target=v, context=ctx)

    if isinstance(adapter, EAGLEStyleAdapter):  # the step the engine drafts with, on the engine's cache path
        one_step = draft_step(adapter, t - 1, step_path(args))
        step_kind = (f"{'compiled' if args.compile else 'eager'} step, preallocated cache, after {t - 1} positions"
                     if args.static_cache else f"incremental step after {t - 1} cached positions")
    elif isinstance(adapter, AttentionAdapter):  # L4: bidirectional, no cache possible
        one_step = whole
        step_kind = f"full {t}-position rerun (bidirectional)"
    else:
        x1 = x[:, -1:]

        def one_step() -> Any:
            return adapter(x1)

        step_kind = "one position"
    row = {"level": name, "params": count_parameters(adapter), "decode_step": step_kind}
    row["sequence"] = latency(whole, device, args.warmup, args.repeats)
    row["step"] = latency(one_step, device, args.warmup, args.repeats)
    return row


def format_table(rows: list[dict[str, Any]], seq_len: int) -> str:
    def cell(m: dict[str, float]) -> str:
        return f"{m['median_ms']:.3f} ({m['p10_ms']:.3f}-{m['p90_ms']:.3f})"

    header = ["level", "params", f"{seq_len} positions, ms", "decode step, ms", "decode step is"]
    body = [[r["level"], f"{r['params']:,}", cell(r["sequence"]), cell(r["step"]), r["decode_step"]] for r in rows]
    return markdown_table(header, body)


def main(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    # Adapters run in fp16 beside 4-bit models on a GPU; fp32 on CPU.
    dtype = resolve_dtype(args.dtype, device, model="adapter")
    rows = [bench_level(name, args, device, dtype) for name in args.levels]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "hidden_dim": args.hidden_dim,
        "seq_len": args.seq_len,
        "step_path": step_path(args),
        "batch": 1,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "levels": rows,
    }
    atomic_write_json(result, args.output)
    print(f"adapter latency on {result['device']} ({result['dtype']}, width {args.hidden_dim}, batch 1)")
    print(format_table(rows, args.seq_len))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    run_cli(main, parse_args)
