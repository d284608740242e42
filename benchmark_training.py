"""Training data path: how fast the chunk stream delivers batches, and how much of a training step waits for data.

    # tiny, CPU (seconds; what the test runs)
    python benchmark_training.py --data_dir /tmp/bench_chunks --size_gb 0.01 --hidden_dim 64 \
        --max_steps 5 --output /tmp/bench_training.json
    # the real format at width 4096, several GB (CPU here; on a GPU add --device cuda)
    python benchmark_training.py --data_dir data/bench_chunks --size_gb 4 --hidden_dim 4096 \
        --level L1 --output results/training_benchmark_cpu.json

Writes synthetic chunks in the extraction format (fp16 states at `--hidden_dim`, T = 50, teacher-
forced states included, random answer lengths) into --data_dir unless they are there, then, with
the files' pages dropped from the page cache before every pass (posix_fadvise; --warm keeps them):

1. plain read: every chunk file read sequentially with large reads: the disk's ceiling;
2. loader: `hidden_data.ChunkStream` over the same files for the pairing (only the keys it needs are
   read), batches moved to the device, no model: samples/s and GB/s of file bytes;
3. training: `train_hidden_adapter.py` for --max_steps steps of --level, with the background
   prefetch and without: samples/s and the share of step time spent waiting for data.

Each pass runs --repeats times (passes 1 and 2 alternate, the two ways of pass 3 alternate which goes
first); medians (min-max) are reported. JSON to --output,
a table on stdout. Figures and their meaning: docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from cli import add_config_flag, alias_help, parse_with_config, run_cli
from common import UserError, atomic_write_json, markdown_table, resolve_device
from hidden_data import FORMAT_VERSION, MANIFEST_FORMAT, ChunkStream, chunk_name, to_device, write_chunk
from timing import Stopwatch, spread

log = logging.getLogger("xmodal_sd.bench_train")
T = 50
KEYS_PER_SAMPLE = 3  # egpt_hidden, vl_hidden, egpt_hidden_tf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder for the synthetic chunks (reused when present)")
    p.add_argument("--size_gb", type=float, default=4.0, help="total size of the synthetic train split, GB")
    p.add_argument("--hidden_dim", type=int, default=4096, help="state width of both models")
    p.add_argument("--chunk_size", type=int, default=250, help="samples per chunk file")
    p.add_argument("--adapter_level", "--level", dest="level", default="L1",
                   help=alias_help("adapter level trained in pass 3", "--level"))
    p.add_argument("--pairs", choices=("free", "teacher_forced"), default="teacher_forced",
                   help="pairing read by the loader and the training")
    p.add_argument("--batch_size", type=int, default=64, help="samples per batch")
    p.add_argument("--max_steps", type=int, default=40, help="training steps timed in pass 3 (per way)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of passes 1 and 2")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--warm", action="store_true", help="keep the files in the page cache between passes")
    p.add_argument("--output", default=None, help="JSON result file")
    add_config_flag(p)
    args = parse_with_config(p, argv)
    if args.size_gb <= 0 or args.hidden_dim < 8 or args.chunk_size < 1 or args.batch_size < 1:
        p.error("--size_gb, --hidden_dim (>= 8), --chunk_size and --batch_size must be positive")
    if args.max_steps < 1 or args.repeats < 1:
        p.error("--max_steps and --repeats must be >= 1")
    return args


# ----------------------------------------------------------------------------- synthetic data


def bytes_per_sample(dim: int) -> int:
    return KEYS_PER_SAMPLE * T * dim * 2


def write_synthetic(folder: Path, num_samples: int, chunk_size: int, dim: int, seed: int) -> dict[str, Any]:
    """A finished split in the extraction format (reused when its manifest matches)."""
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("num_samples") == num_samples and (old.get("widths") or {}).get("target") == dim:
            log.info("reusing %s (%d samples)", folder, num_samples)
            return old
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    entries, done = [], 0
    while done < num_samples:
        n = min(chunk_size, num_samples - done)
        lengths = torch.randint(5, T + 1, (n,), generator=g)
        mask = torch.arange(T)[None] < lengths[:, None]
        states = [torch.randn(n, T, dim, generator=g, dtype=torch.float32).half() for _ in range(KEYS_PER_SAMPLE)]
        tensors = {"egpt_hidden": states[0], "vl_hidden": states[1], "egpt_hidden_tf": states[2],
                   "egpt_tokens": torch.zeros(n, T, dtype=torch.int32),
                   "vl_tokens": torch.zeros(n, T, dtype=torch.int32),
                   "egpt_mask": mask, "vl_mask": mask.clone(), "question_idx": torch.zeros(n, dtype=torch.int32)}
        ids = [f"synthetic/{done + i}#q0" for i in range(n)]
        entries.append(write_chunk(folder / chunk_name(0, len(entries)), tensors, ids, ids))
        done += n
    manifest = {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "split": folder.name, "complete": True,
                "teacher_forced": True, "max_new_tokens": T, "chunks": entries, "num_samples": num_samples,
                "widths": {"drafter": dim, "target": dim},
                "models": {"drafter": {"config_hash": "synthetic"}, "target": {"config_hash": "synthetic"}}}
    atomic_write_json(manifest, manifest_path)
    return manifest


def drop_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache (only these files; no root needed)."""
    for f in folder.glob("*.pt"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- passes


def plain_read(folder: Path) -> dict[str, float]:
    watch, total = Stopwatch(), 0  # the disk alone: no device work to wait for
    for f in sorted(folder.glob("chunk_*.pt")):
        with open(f, "rb", buffering=0) as fh:
            while block := fh.read(16 << 20):
                total += len(block)
    seconds = watch.ms() / 1e3
    return {"seconds": seconds, "gb_per_s": total / seconds / 1e9, "bytes": total}


def loader_pass(folder: Path, args: argparse.Namespace, device: torch.device, epoch: int) -> dict[str, float]:
    stream = ChunkStream(folder, pairs=args.pairs, batch_size=args.batch_size, seed=0, prefetch=True,
                         pin_memory=device.type == "cuda")
    watch, samples = Stopwatch(device), 0
    for raw in stream.batches(epoch):
        batch = to_device(raw, device)
        samples += batch["mask"].shape[0]
    seconds = watch.ms() / 1e3
    file_bytes = sum(c["bytes"] for c in stream.manifest["chunks"])
    return {"seconds": seconds, "samples_per_s": samples / seconds, "file_gb_per_s": file_bytes / seconds / 1e9}


def training_pass(train_dir: Path, val_dir: Path, out: Path, args: argparse.Namespace, prefetch: bool) -> dict:
    import train_hidden_adapter as tha

    argv = ["--train_data", str(train_dir), "--val_data", str(val_dir), "--adapter_level", args.level,
            "--pairs", args.pairs, "--batch_size", str(args.batch_size), "--max_steps", str(args.max_steps),
            "--num_epochs", "1", "--output_dir", str(out), "--device", args.device, "--no_progress", "--seed", "0"]
    if not prefetch:
        argv.append("--no_prefetch")
    if not args.warm:
        drop_cache(train_dir)
    result = tha.main(tha.parse_args(argv))
    entry = json.loads((Path(result["run_dir"]) / "history.json").read_text())["history"][0]
    return {k: entry[k] for k in ("samples_per_s", "data_wait_share", "train_s", "train_samples")} | {
        "steps": result["steps"]}


def main(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    root = Path(args.data_dir)
    num = max(1, int(args.size_gb * 1e9 / bytes_per_sample(args.hidden_dim)))
    if num < args.chunk_size:
        args.chunk_size = num
    try:
        manifest = write_synthetic(root / "train", num, args.chunk_size, args.hidden_dim, seed=0)
        write_synthetic(root / "val", min(num, args.batch_size), args.chunk_size, args.hidden_dim, seed=1)
    except OSError as err:
        raise UserError(f"cannot write synthetic chunks under {root}: {err.strerror or err}") from err
    gb = sum(c["bytes"] for c in manifest["chunks"]) / 1e9
    log.info("%d samples in %d chunks, %.2f GB at width %d", num, len(manifest["chunks"]), gb, args.hidden_dim)
    reads, loads = [], []
    for r in range(args.repeats):
        if not args.warm:
            drop_cache(root / "train")
        reads.append(plain_read(root / "train"))
        if not args.warm:
            drop_cache(root / "train")
        loads.append(loader_pass(root / "train", args, device, r))
    runs, ways = root / "runs", ("prefetch", "no_prefetch")
    passes: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    for r in range(args.repeats):  # alternate which way goes first, so drifting load hits both alike
        for way in ways if r % 2 == 0 else ways[::-1]:
            passes[way].append(training_pass(root / "train", root / "val", runs, args, prefetch=way == "prefetch"))
    train = {way: {"samples_per_s": spread([p["samples_per_s"] for p in ps]),
                   "data_wait_share": spread([p["data_wait_share"] for p in ps]),
                   "steps": ps[0]["steps"], "train_samples": ps[0]["train_samples"], "runs": ps}
             for way, ps in passes.items()}
    result = {
        "format": "xmodal_sd.training_benchmark", "device": str(device), "cache": "warm" if args.warm else "cold",
        "hidden_dim": args.hidden_dim, "pairs": args.pairs, "batch_size": args.batch_size, "level": args.level,
        "num_samples": num, "num_chunks": len(manifest["chunks"]), "data_gb": gb, "repeats": args.repeats,
        "plain_read_gb_per_s": spread([x["gb_per_s"] for x in reads]),
        "loader_file_gb_per_s": spread([x["file_gb_per_s"] for x in loads]),
        "loader_samples_per_s": spread([x["samples_per_s"] for x in loads]),
        "loader_vs_plain_read": spread([a["file_gb_per_s"] / b["gb_per_s"] for a, b in zip(loads, reads, strict=True)]),
        "training": train, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
    }
    if args.output:
        atomic_write_json(result, args.output)

    def cell(s: dict[str, float], fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

    print(markdown_table(["pass", "value, median (min-max)"], [
        ["plain sequential read, GB/s of files", cell(result["plain_read_gb_per_s"])],
        ["loader, GB/s of files", cell(result["loader_file_gb_per_s"])],
        ["loader, samples/s", cell(result["loader_samples_per_s"], "{:.0f}")],
        ["loader / plain read", cell(result["loader_vs_plain_read"])],
        *[[f"training {args.level}, {way}: samples/s", cell(t["samples_per_s"], "{:.0f}")] for way, t in train.items()],
        *[[f"training {args.level}, {way}: share of step time waiting for data",
           cell({k: 100 * v for k, v in t["data_wait_share"].items()}, "{:.1f}%")] for way, t in train.items()],
    ]))
    return result


if __name__ == "__main__":
    run_cli(main, parse_args)
