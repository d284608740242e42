"""Measured wall-clock speed-up of live, lossless speculative decoding over the target alone.

    # toy world, CPU, every configuration (a few minutes; trained checkpoints from train_hidden_adapter.py)
    python benchmark_e2e_wallclock.py --dataset_dir data/toy/dataset --egpt_model data/toy/models/eventgpt \\
        --vl_model data/toy/models/video_llava --prefill_adapter tasks/L1/best_model.pt \\
        --decode_adapter tasks/B1/best_model.pt --max_samples 20 --max_new_tokens 32 --output_dir results/toy/e2e
    # the engine alone, no checkpoints: random adapters (say so) and the controlled drafter (seconds)
    python benchmark_e2e_wallclock.py --dataset_dir data/toy/dataset --random_adapters --prefill_adapter L1 \\
        --decode_adapter B1 --max_samples 4 --max_new_tokens 16 --repeats 2 --output_dir /tmp/e2e_tiny
    # 7B shapes with random weights on one GPU (only the controlled drafter can accept there)
    python benchmark_e2e_wallclock.py --random_shape 7b --device cuda --dtype fp16 --dataset_dir data/toy/dataset \\
        --configs target,hf_generate,synthetic,assisted --synthetic_cost_ms 1.3 --max_samples 10 \\
        --output_dir results/e2e_7b_fp16
    # the same on the compiled path (static cache + CUDA graphs), or torchao int4 weights for a 24 GB GPU
    python benchmark_e2e_wallclock.py --random_shape 7b --device cuda --dtype fp16 --dataset_dir data/toy/dataset \
        --configs target,hf_generate,synthetic --compile --quant int4_ao --output_dir results/e2e_7b_int4_compiled

Each decode adapter runs under every --draft_stop rule: `fixed` (always gamma_decode drafts), `confidence`
(transformers' rule at --draft_confidence) and `expected` (drafts on while the acceptance estimate
calibrated on validation data says another draft pays at this machine's measured costs; the timing
profile is therefore measured before the timed runs). In one process and on the same samples it times:
the target alone through the engine's own loop
(`target`) and through transformers' `generate` (`hf_generate`, to show the loop is not slower);
`prefill` (prefill hiding only), `decode` (decode drafting only), `two_phase` (both); the controlled
drafter at every `--synthetic_acceptance` p (`synthetic`); transformers' prompt lookup decoding, which
needs no trained drafter, at every (K, N) of `--prompt_lookup_tokens` x `--prompt_lookup_ngram`
(`prompt_lookup[K5,N2]`, ...; the report headlines the fastest, picked on the same timed runs); and ours
against transformers' assisted generation on a text-only pair, the target's language model and a
perturbed copy (`assisted`). Every timer sits between device synchronisations; `--warmup` samples run
untimed first; each of `--repeats` repeats runs every sample through every configuration (order rotated
per repeat), and the speed-up is the median (min-max) over repeats of target time / configuration time
on the same samples.

Every greedy output (warm-up included) is checked at every position against the target's own greedy
answer. A differing token is excused only as a numeric tie (speculative_decoding.check_lossless: the two
tokens the target's top two within the dtype's rounding on every recomputed path, the engine's own
verify pass included), after which the check goes on against the target's own continuation; any other
difference ends the run with an error and no result. A configuration whose ties exceed the target-alone
run's by more than max(2, --tie_margin x its checked outputs) fails: the result is written with the
failure marked and the run exits 1. Writes e2e_wallclock.{json,md,png} and timing_profile.json (the
format that eval_two_phase.py --timings reads), with the cost model's estimate beside each measured
speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import speculative_decoding as sd
from cli import add_config_flag, add_dry_run_flag, dry_run_report, gamma_prefill_arg, parse_with_config, run_cli
from common import UserError, atomic_write_json, markdown_table, set_seed
from cost_model import PREFILL_WINDOW_CAP
from draft_trees import AutoTreeBudget, SyntheticTreeDrafter, TreeSpec, tree_drafter, tree_shape, tree_sizes
from drafters import (
    ConfidenceStop,
    DrafterLM,
    DraftLength,
    ExpectedGainStop,
    NoDrafter,
    SyntheticDrafter,
    drafter_problem,
    make_drafter,
)
from e2e_measure import adapter_path, assisted_run, hf_generate, lookup_ids, measure_profile, prompt_lookup, text_pair
from hidden_adapter import NEXT_POSITION_LEVELS, canonical_name
from model_builders import add_model_args, check_model_args, load_runners
from preflight import preflight
from timing import Stopwatch, spread
from vlm_runners import VLMInputs, eagle3_layer_ids, model_description

log = logging.getLogger("xmodal_sd.e2e")

CONFIGS = ("target", "hf_generate", "prompt_lookup", "prefill", "decode", "two_phase", "synthetic", "assisted")
DRAFT_STOPS = ("fixed", "confidence", "expected")
# 2: every configuration records what it drafts with (`drafting`), and the result the configurations left out
E2E_FORMAT_VERSION = 2
ADAPTER_CONFIGS = {"prefill": ("prefill",), "decode": ("decode",), "two_phase": ("prefill", "decode")}
AUTO_TREE_MAX = 31  # --tree_budget auto verifies at most this many nodes (the profile times width 32)
TIE_MARGIN_MIN = 2  # a configuration may exceed the target-alone run's ties by max(this, --tie_margin x outputs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset_dir", type=Path, required=True, help="data set folder (index.json per split)")
    p.add_argument("--split", default="test", help="split whose clips are answered")
    p.add_argument("--max_samples", type=int, default=50, help="(clip, question) samples timed")
    p.add_argument("--questions", default=None, help="questions JSON (default DATASET_DIR/questions.json)")
    p.add_argument("--max_questions", type=int, default=None, help="use only the first N questions")
    p.add_argument("--max_new_tokens", type=int, default=50, help="answer length cap")
    p.add_argument("--gamma_decode", type=int, default=5, help="drafts per decode iteration")
    p.add_argument("--gamma_prefill", default="auto",
                   help="at most this many drafts while the target prefills (drafting also stops when the "
                   f"target's prefill ends); auto = {PREFILL_WINDOW_CAP}, the two-phase model's longest window")
    p.add_argument("--draft_confidence", type=float, default=0.0,
                   help="the 'confidence' stop: end a decode draft after a token the drafter gives less than this "
                        "probability (transformers' assistant_confidence_threshold rule; lossless); > 0 with "
                        "--draft_stop fixed alone means --draft_stop confidence")
    p.add_argument("--draft_stop", default="fixed",
                   help="comma list of draft-length rules, each decode adapter is run under every one: fixed "
                        "(gamma_decode drafts), confidence (--draft_confidence), expected (calibrated expected "
                        "gain at the measured costs; needs checkpoints from train_hidden_adapter.py)")
    p.add_argument("--tree_budget", default="15",
                   help="nodes of each roll-out head's dynamic draft tree: config decode[LEVEL,tree] runs beside "
                        "decode[LEVEL] (greedy only: sampling drafts chains); 0 = chains only; auto = per window the "
                        "budget of most expected tokens per ms at this run's measured verify cost by width and the "
                        "checkpoint's calibrated acceptance (EAGLE-2's total_token=-1; at most 31 nodes)")
    p.add_argument("--tree_topk", type=int, default=4,
                   help="a draft tree's branching: children per expanded node (and frontier nodes per depth unless "
                        "--tree_frontier)")
    p.add_argument("--tree_frontier", type=int, default=0,
                   help="nodes expanded per depth (0 = --tree_topk, EAGLE-2's); 1 = the greedy chain with each "
                        "depth's runners-up as leaves, drafted at the chain's cost")
    p.add_argument("--tree_depth", type=int, default=0, help="a draft tree's deepest level (0 = --gamma_decode)")
    p.add_argument("--reference_profile", type=Path, default=Path("timings/h200_fp16_eager_7b.json"),
                   help="a second timing profile (default: the measured H200 7B one shipped in timings/) under which "
                        "every configuration's speed-up is also modelled at the acceptance measured here "
                        "('none' to skip)")
    p.add_argument("--prefill_adapter", nargs=1, default=None,
                   help="prefill adapter checkpoint (L1-L4), or a level name with --random_adapters")
    p.add_argument("--decode_adapter", nargs="+", default=None,
                   help="decode adapter checkpoint(s), each its own decode and two-phase config: L5/B1 roll out "
                        "(mode a), L5F with EventGPT in lockstep (mode b), L1-L4 on EventGPT's own drafts "
                        "(mode c); level names with --random_adapters")
    p.add_argument("--random_adapters", action="store_true",
                   help="build untrained adapters from level names (measures the engine, not a drafter)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (outputs checked equal to the target's); > 0 = rejection sampling")
    p.add_argument("--synthetic_acceptance", default="0.5,0.7,0.8,0.9,1.0",
                   help="comma list of p for the controlled drafter (each draft right with probability p)")
    p.add_argument("--synthetic_cost_ms", default="0",
                   help="the controlled drafter's cost per draft: milliseconds, or a causal level (B1, L5, L5F, L5E) "
                        "for that level's roll-out draft step as this run measures it on its decode path "
                        "(compiled with --compile)")
    p.add_argument("--synthetic_tree_width", type=int, default=0,
                   help="with config synthetic, also the controlled drafter as a tree at every p: this many siblings "
                        "per depth, each right with probability p (config synthetic_tree_pP_wW; 0 = chains only)")
    p.add_argument("--verify_widths", default="",
                   help="comma list of extra verify widths the timing profile measures (e.g. 32,64: the cost of "
                        "wide trees)")
    p.add_argument("--prompt_lookup_tokens", default="3,5,10",
                   help="config prompt_lookup: comma list of K, transformers' prompt_lookup_num_tokens (candidate "
                        "tokens copied per step); every K is run with every N of --prompt_lookup_ngram")
    p.add_argument("--prompt_lookup_ngram", default="2,3",
                   help="config prompt_lookup: comma list of N, transformers' max_matching_ngram_size (longest "
                        "n-gram matched against the prompt and the answer so far)")
    p.add_argument("--tie_margin", type=float, default=0.01,
                   help="a configuration fails the lossless check when its numeric ties exceed the target-alone "
                        f"run's by more than max({TIE_MARGIN_MIN}, TIE_MARGIN x its checked outputs); default "
                        "0.01, i.e. 1%%")
    p.add_argument("--assistant_noise", type=float, default=0.02,
                   help="relative Gaussian noise on the assistant copy's weights (config 'assisted')")
    p.add_argument("--configs", default="all",
                   help=f"comma list of {', '.join(CONFIGS)}, or all (every one whose adapters are given)")
    p.add_argument("--sequential_prefill", action="store_true",
                   help="run the drafter's prefill after the target's instead of beside it (to measure overlap)")
    add_model_args(p)
    p.add_argument("--static_cache", action="store_true",
                   help="the target decodes in a preallocated KV cache, every verify pass gamma_decode+1 wide; "
                        "roll-out adapters draft in preallocated caches too")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the target's decode/verify step and the roll-out adapters' draft step "
                        "(CUDA graphs on CUDA); implies --static_cache")
    p.add_argument("--max_cache_len", type=int, default=4096,
                   help="static cache positions (prompt + answer + one verify window must fit)")
    p.add_argument("--warmup", type=int, default=3, help="untimed samples run through every configuration first")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the samples (paired per repeat)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights, adapters and sampling")
    p.add_argument("--output_dir", type=Path, default=Path("results/e2e"), help="where the JSON/MD/PNG go")
    add_config_flag(p)
    add_dry_run_flag(p)
    args = parse_with_config(p, argv)
    args.gamma_prefill = gamma_prefill_arg(p, args.gamma_prefill, PREFILL_WINDOW_CAP, minimum=0)
    every = args.configs == "all"
    args.configs = list(CONFIGS) if every else [c.strip() for c in args.configs.split(",") if c]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    # "all" is every configuration whose adapters were given; one named in --configs without its adapter is
    # refused by the check before loading
    args.left_out = []
    if every:
        for name, roles in ADAPTER_CONFIGS.items():
            missing = [f"--{role}_adapter" for role in roles if not getattr(args, f"{role}_adapter", None)]
            if missing:
                args.configs.remove(name)
                args.left_out.append(f"{name} (needs {' and '.join(missing)})")
    if "target" not in args.configs:
        args.configs.insert(0, "target")  # every speed-up is measured against it
    args.tree_auto = args.tree_budget == "auto"
    if args.tree_topk < 1 or args.tree_depth < 0 or args.tree_frontier < 0:
        p.error("--tree_depth and --tree_frontier must be >= 0, --tree_topk >= 1")
    args.tree_depth = args.tree_depth or args.gamma_decode
    try:
        frontier = args.tree_frontier or args.tree_topk
        args.tree_budget = (min(sum(tree_sizes(args.tree_depth, args.tree_topk, frontier)), AUTO_TREE_MAX)
                            if args.tree_auto else int(args.tree_budget))
    except ValueError:
        args.tree_budget = -1
    if args.tree_budget < 0:
        p.error("--tree_budget takes a node count >= 0 or auto")
    if args.tree_auto and args.random_adapters:
        p.error("--tree_budget auto reads the calibration stored in trained checkpoints, not random adapters")
    if args.tree_budget and args.temperature > 0 and "decode" in args.configs:
        args.left_out.append("decode[LEVEL,tree] (sampling drafts chains)")
    for name in ("max_samples", "max_new_tokens", "gamma_decode", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0 or args.gamma_prefill < 0 or args.temperature < 0:
        p.error("--warmup, --gamma_prefill and --temperature must be >= 0")
    try:
        args.synthetic_cost_ms = float(args.synthetic_cost_ms)
        bad_cost = not 0 <= args.synthetic_cost_ms < float("inf")  # also refuses nan
    except ValueError:
        try:
            args.synthetic_cost_ms = canonical_name(args.synthetic_cost_ms)
        except ValueError:
            args.synthetic_cost_ms = ""
        bad_cost = args.synthetic_cost_ms not in NEXT_POSITION_LEVELS
    if bad_cost:
        p.error(f"--synthetic_cost_ms takes milliseconds >= 0 or one of {', '.join(NEXT_POSITION_LEVELS)}")
    if not 0.0 <= args.draft_confidence < 1.0:
        p.error("--draft_confidence must be in [0, 1)")
    args.draft_stop = [x.strip() for x in args.draft_stop.split(",") if x.strip()]
    bad = sorted(set(args.draft_stop) - set(DRAFT_STOPS))
    if bad or not args.draft_stop:
        p.error(f"--draft_stop takes a comma list of {', '.join(DRAFT_STOPS)}; got {bad or 'nothing'}")
    if args.draft_confidence > 0 and args.draft_stop == ["fixed"]:
        args.draft_stop = ["confidence"]  # the flag's meaning before --draft_stop existed
    if "confidence" in args.draft_stop and args.draft_confidence <= 0:
        p.error("--draft_stop confidence needs --draft_confidence > 0")
    if "expected" in args.draft_stop and args.random_adapters:
        p.error("--draft_stop expected reads the calibration stored in trained checkpoints, not random adapters")
    if str(args.reference_profile).lower() == "none":
        args.reference_profile = None
    try:
        args.synthetic_acceptance = [float(x) for x in args.synthetic_acceptance.split(",") if x.strip()]
    except ValueError:
        p.error("--synthetic_acceptance takes a comma list of numbers in [0, 1]")
    if not all(0 <= x <= 1 for x in args.synthetic_acceptance):
        p.error("--synthetic_acceptance values must be in [0, 1]")
    try:
        args.verify_widths = tuple(int(x) for x in args.verify_widths.split(",") if x.strip())
    except ValueError:
        p.error("--verify_widths takes a comma list of widths >= 1")
    if args.synthetic_tree_width < 0 or any(w < 1 for w in args.verify_widths):
        p.error("--synthetic_tree_width must be >= 0 and --verify_widths >= 1")
    for name in ("prompt_lookup_tokens", "prompt_lookup_ngram"):
        try:
            values = [int(x) for x in getattr(args, name).split(",") if x.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            p.error(f"--{name} takes a comma list of integers >= 1")
        setattr(args, name, values)
    if not 0 <= args.tie_margin < 1:
        p.error("--tie_margin must be in [0, 1)")
    check_model_args(p, args)
    args.static_cache = args.static_cache or args.compile
    if args.static_cache and args.quant in ("4bit", "8bit"):
        p.error("--static_cache/--compile are not for bitsandbytes --quant 4bit/8bit (use int8_ao or int4_ao)")
    if args.static_cache and args.max_cache_len < args.max_new_tokens + args.gamma_decode + 2:
        p.error("--max_cache_len must hold the prompt, --max_new_tokens and one verify window")
    return args


# ----------------------------------------------------------------------------------- building blocks


def load_adapters(args: argparse.Namespace, vl: Any, eg: Any) -> dict[str, list[Any]]:
    """{"prefill": [adapter], "decode": [adapter, ...]} for the configurations that need them."""
    from adapter_checkpoint import load_adapter
    from hidden_adapter import create_adapter, level_config

    needed = sorted({role for c in args.configs for role in ADAPTER_CONFIGS.get(c, ())})
    out: dict[str, list[Any]] = {}
    for role in needed:
        specs = getattr(args, f"{role}_adapter")
        if not specs:
            users = [c for c in args.configs if role in ADAPTER_CONFIGS.get(c, ())]
            raise UserError(f"config(s) {', '.join(users)} need --{role}_adapter (a checkpoint from "
                            f"train_hidden_adapter.py, or a level with --random_adapters), or leave them out of "
                            "--configs")
        out[role] = []
        for spec in specs:
            if args.random_adapters:
                try:  # E3, E3E fuse EAGLE-3's layers of this target
                    layers = ({"target_layers": list(eagle3_layer_ids(vl.num_layers))}
                              if level_config(spec).reads_layers else {})
                    adapter = create_adapter(spec, target_dim=vl.hidden_size, drafter_dim=eg.hidden_size, dropout=0.0,
                                             **layers)
                except ValueError as err:
                    raise UserError(f"--{role}_adapter {spec!r}: {err}") from err
                adapter.extra = {}
                adapter.source = f"random {spec}"
            else:
                adapter, extra = load_adapter(spec, drafter_dim=eg.hidden_size, target_dim=vl.hidden_size)
                adapter.extra = extra  # training record: the draft-length calibration lives here
                adapter.source = str(spec)
            problem = drafter_problem(adapter.config, role)
            if adapter.config.reads_layers and max(adapter.config.target_layers) > vl.num_layers:
                problem = (f"it fuses the target's layers {adapter.config.target_layers}, but the target has "
                           f"{vl.num_layers} decoder layers (an adapter of another target)")
            if problem:
                raise UserError(f"--{role}_adapter {spec}: {problem}")
            adapter = adapter.to(vl.device, vl.dtype).eval()
            if adapter.config.token_input:  # the target's own input embeddings, shared, not copied per adapter
                try:
                    adapter.attach_token_table(vl.decoder.get_input_embeddings().weight)
                except ValueError as err:
                    raise UserError(f"--{role}_adapter {spec}: {err}") from err
            out[role].append(adapter)
    return out


def length_rule(stop: str, adapter: Any, args: argparse.Namespace, profile: Any,
                draft_ms: dict[str, float]) -> tuple[DraftLength, str]:
    """(draft-length rule, config-name suffix) for one decode adapter under one --draft_stop rule."""
    if stop == "fixed":
        return DraftLength(), ""
    if stop == "confidence":
        return ConfidenceStop(args.draft_confidence), f",conf{args.draft_confidence:g}"
    calibration = (getattr(adapter, "extra", None) or {}).get("draft_calibration")
    if not calibration:
        raise UserError(f"--draft_stop expected: the {adapter.config.name} checkpoint holds no draft_calibration "
                        "(train it with this release of train_hidden_adapter.py and --lm_head)")
    # on the static and compiled paths every verify pass is padded to gamma + 1: an extra draft costs no verify time
    rule = ExpectedGainStop.from_profile(calibration, adapter.config, profile, args.gamma_decode,
                                         draft_ms[adapter.config.name], padded_verify=args.static_cache)
    return rule, ",expected"


def adapter_record(adapter: Any) -> dict[str, Any] | None:
    """What the result records of a configuration's adapter: level, pairing and checkpoint (file content)."""
    if adapter is None:
        return None
    return {"level": adapter.config.name, "pairs": (getattr(adapter, "extra", None) or {}).get("pairs"),
            "checkpoint": getattr(adapter, "source", None)}


def build_engines(args: argparse.Namespace, vl: Any, eg: Any, adapters: dict[str, list[Any]],
                  gen: torch.Generator, profile: Any = None, draft_ms: dict[str, float] | None = None,
                  ) -> tuple[dict[str, sd.SpeculativeDecoder], dict[str, tuple], dict[str, dict[str, Any]]]:
    """Engines by config name (`decode[B1]`, `decode[B1,expected]`, `two_phase[L1+B1]`, `synthetic_p0.8`,
    ...), each one's (prefill level, decode level) for the cost model, and what each one drafts with as the
    result records it (kind, adapters with level, pairing and checkpoint, draft-length rule): readers of the
    result take these fields, never the config's name apart."""
    head = vl.lm_head_weight()
    lm = DrafterLM(eg)  # one EventGPT state for every drafter of an answer
    common = {"temperature": args.temperature, "generator": gen, "concurrent_prefill": not args.sequential_prefill,
              "static_cache": args.static_cache, "compile": args.compile, "max_cache_len": args.max_cache_len}
    engines = {"target": sd.SpeculativeDecoder(vl, NoDrafter(), gamma_decode=0, **common)}
    levels: dict[str, tuple] = {"target": (None, None)}
    drafting: dict[str, dict[str, Any]] = {"target": {"kind": "target"}}
    pre_adapter = adapters.get("prefill", [None])[0]
    pre = (make_drafter(pre_adapter, head, lm=lm, phase="prefill", temperature=args.temperature, generator=gen)
           if pre_adapter is not None else None)
    p_name = pre_adapter.config.name if pre_adapter is not None else None
    if "prefill" in args.configs:
        engines[f"prefill[{p_name}]"] = sd.SpeculativeDecoder(vl, NoDrafter(), gamma_decode=0, prefill_drafter=pre,
                                                              gamma_prefill=args.gamma_prefill, **common)
        levels[f"prefill[{p_name}]"] = (p_name, None)
        drafting[f"prefill[{p_name}]"] = {"kind": "prefill", "prefill": adapter_record(pre_adapter)}
    for adapter in adapters.get("decode", []):
        for stop in args.draft_stop:
            d_name = adapter.config.name
            rule, suffix = length_rule(stop, adapter, args, profile, draft_ms or {})
            try:  # the drafting mode follows the adapter's roles (drafters.make_drafter)
                dec = make_drafter(adapter, head, lm=lm, temperature=args.temperature, generator=gen, length=rule)
            except ValueError as err:
                raise UserError(f"--decode_adapter {d_name}: {err}") from err
            if "decode" in args.configs:
                engines[f"decode[{d_name}{suffix}]"] = sd.SpeculativeDecoder(vl, dec, gamma_decode=args.gamma_decode,
                                                                             **common)
                levels[f"decode[{d_name}{suffix}]"] = (None, d_name)
                drafting[f"decode[{d_name}{suffix}]"] = {"kind": "decode", "decode": adapter_record(adapter),
                                                         "draft_stop": stop}
            tree = tree_spec(args, adapter, profile, draft_ms or {})
            if tree is not None and "decode" in args.configs and adapter.config.rolls_out and stop == "fixed":
                name = f"decode[{d_name},tree]"  # beside its chain: same adapter, one tree per window
                engines[name] = sd.SpeculativeDecoder(vl, tree_drafter(adapter, head, tree, lm=lm, generator=gen),
                                                      gamma_decode=tree.depth, **common)
                levels[name] = (None, d_name)
                drafting[name] = {"kind": "decode", "decode": adapter_record(adapter), "draft_stop": "fixed",
                                  "tree": tree.record()}
            if "two_phase" in args.configs:
                name = f"two_phase[{p_name}+{d_name}{suffix}]"
                engines[name] = sd.SpeculativeDecoder(vl, dec, gamma_decode=args.gamma_decode, prefill_drafter=pre,
                                                      gamma_prefill=args.gamma_prefill, **common)
                levels[name] = (p_name, d_name)
                drafting[name] = {"kind": "two_phase", "prefill": adapter_record(pre_adapter),
                                  "decode": adapter_record(adapter), "draft_stop": stop}
    if "synthetic" in args.configs:
        for p in args.synthetic_acceptance:
            drafter = SyntheticDrafter(p, vl.vocab_size, args.synthetic_cost_ms, seed=args.seed)
            engines[f"synthetic_p{p:g}"] = sd.SpeculativeDecoder(vl, drafter, gamma_decode=args.gamma_decode, **common)
            levels[f"synthetic_p{p:g}"] = (None, None)
            drafting[f"synthetic_p{p:g}"] = {"kind": "synthetic", "p": p}
            if args.synthetic_tree_width:  # the same p per sibling, as a tree: the engine's tree path measured
                name, w = f"synthetic_tree_p{p:g}_w{args.synthetic_tree_width}", args.synthetic_tree_width
                tree = SyntheticTreeDrafter(p, vl.vocab_size, w, args.synthetic_cost_ms, seed=args.seed)
                engines[name] = sd.SpeculativeDecoder(vl, tree, gamma_decode=args.gamma_decode, **common)
                levels[name] = (None, None)
                drafting[name] = {"kind": "synthetic", "p": p, "tree_width": w}
    return engines, levels, drafting


def tree_spec(args: argparse.Namespace, adapter: Any = None, profile: Any = None,
              draft_ms: dict[str, float] | None = None) -> TreeSpec | None:
    """The draft tree of this run (None where it drafts chains only: sampling, or no budget); with --tree_budget
    auto, `adapter`'s per-window budget rule at `profile`'s verify costs and its measured draft step."""
    if not args.tree_budget or args.temperature > 0:
        return None
    auto = None
    if args.tree_auto and adapter is not None:
        calibration = (getattr(adapter, "extra", None) or {}).get("draft_calibration")
        if not calibration:
            raise UserError(f"--tree_budget auto: the {adapter.config.name} checkpoint holds no draft_calibration "
                            "(train it with this release of train_hidden_adapter.py and --lm_head)")
        auto = AutoTreeBudget.from_calibration(calibration, profile.verify_ms, (draft_ms or {})[adapter.config.name])
    return TreeSpec(depth=args.tree_depth, topk=args.tree_topk, budget=args.tree_budget, auto=auto,
                    frontier=args.tree_frontier)


def trees_beside_chains(configs: dict[str, Any]) -> dict[str, str]:
    """{tree configuration: the chain configuration of the same adapter (fixed draft length)}."""
    chains = {str(c["drafting"].get("decode")): n for n, c in configs.items()
              if c.get("drafting", {}).get("kind") == "decode" and c["drafting"].get("draft_stop") == "fixed"
              and not c["drafting"].get("tree")}
    return {n: chains[str(c["drafting"]["decode"])] for n, c in configs.items()
            if c.get("drafting", {}).get("tree") and str(c["drafting"]["decode"]) in chains}


def tree_widths(args: argparse.Namespace) -> tuple[int, ...]:
    """Verify widths the profile times for the trees: the largest tree's, and for auto every 8 up to it; the
    controlled tree's (gamma x width + 1); and --verify_widths."""
    extra = (*args.verify_widths, *((args.gamma_decode * args.synthetic_tree_width + 1,)
                                    if args.synthetic_tree_width and "synthetic" in args.configs else ()))
    if tree_spec(args) is None:
        return extra
    top = args.tree_budget + 1
    return (*range(8, top, 8), top, *extra) if args.tree_auto else (top, *extra)


def lookup_configs(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """The prompt-lookup grid, {`prompt_lookup[K5,N2]`: (K, N)}, when the configuration is asked for."""
    if "prompt_lookup" not in args.configs:
        return {}
    return {f"prompt_lookup[K{k},N{n}]": (k, n) for k in args.prompt_lookup_tokens for n in args.prompt_lookup_ngram}


# ----------------------------------------------------------------------------------- the timed runs


def run_config(name: str, engine: sd.SpeculativeDecoder | None, vl: Any, eg: Any, split_dir: Path, clip: dict,
               question: str, reference: list[int], args: argparse.Namespace,
               lookup: tuple[int, int] | None = None) -> dict[str, Any]:
    """One sample through one configuration (an engine; transformers' `generate`, or its prompt lookup
    decoding with `lookup` = (K, N)): ms, tokens, stage times, acceptance; greedy checked at every
    position, the numeric ties listed."""
    def target_prompt() -> VLMInputs:
        return vl.build_inputs([vl.clip_features(split_dir, clip)], [question])

    def drafter_prompt() -> VLMInputs:
        return eg.build_inputs([eg.clip_features(split_dir, clip)], [question])

    out = None
    if name == "hf_generate" or lookup is not None:
        watch = Stopwatch(vl.device)
        inputs = target_prompt()
        vision = watch.ms()
        if lookup is None:
            tokens, stats = hf_generate(vl, inputs, args.max_new_tokens), {}
        else:
            tokens, stats = prompt_lookup(vl, inputs, question, args.max_new_tokens, *lookup,
                                          ids=lookup_ids(vl, inputs, question))  # the ids are tokenising, timed
        rec = {"ms": watch.ms(), "vision_ms": vision, "tokens": len(tokens), **stats}
        prompt: Any = inputs
    else:
        if isinstance(engine.drafter, SyntheticDrafter):
            engine.drafter.set_reference(reference)
        out = engine.generate(target_prompt, drafter_prompt, args.max_new_tokens)
        tokens = out.tokens
        summary = sd.summarise_trace(out.trace)
        rec = {"ms": out.trace.total_ms, "vision_ms": out.trace.phase1.get("target_vision_ms", 0.0),
               "tokens": len(tokens), "phase1": out.trace.phase1, **summary,
               "foreign_tokens": out.trace.foreign_tokens}
        prompt = target_prompt
    if args.temperature == 0:
        ties = sd.check_lossless(tokens, reference, f"{name} on clip {clip.get('id')} / {question!r}",
                                 recompute=sd.TargetRecompute(vl, prompt, args.max_new_tokens, engine=out),
                                 dtype=vl.dtype)
        rec["numeric_ties"] = [asdict(t) for t in ties]
    return rec


def aggregate(runs: dict[str, list[list[dict[str, Any]]]], gamma: int) -> dict[str, Any]:
    """Per configuration: speed-up per repeat (target ms per token / its ms per token over the same samples,
    also without the target's vision),
    tokens/s, stage medians, acceptance length with and without the bonus token, per-position rates."""
    base = runs["target"]
    out = {}
    for name, reps in runs.items():
        flat = [r for rep in reps for r in rep]
        # Time per generated token, so sampled answers of different lengths compare fairly; in greedy mode
        # every configuration writes the same tokens and this is the ratio of answer times.
        def per_token(rep: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> float:
            return sum(key(r) for r in rep) / sum(r["tokens"] for r in rep)

        def total(r: dict[str, Any]) -> float:
            return r["ms"]

        def llm_only(r: dict[str, Any]) -> float:
            return r["ms"] - r["vision_ms"]

        speed = [per_token(base[i], total) / per_token(rep, total) for i, rep in enumerate(reps)]
        llm = [per_token(base[i], llm_only) / per_token(rep, llm_only) for i, rep in enumerate(reps)]
        res: dict[str, Any] = {
            "speedup": spread(speed), "speedup_llm_only": spread(llm),
            # what a user runs today: transformers' eager generate on the same samples
            "speedup_vs_hf_generate": spread([per_token(runs["hf_generate"][i], total) / per_token(rep, total)
                                               for i, rep in enumerate(reps)]) if "hf_generate" in runs else None,
            "tokens_per_s": sum(r["tokens"] for r in flat) / (sum(r["ms"] for r in flat) / 1e3),
            "ms_per_answer": statistics.median(r["ms"] for r in flat),
            "tokens_per_answer": statistics.mean(r["tokens"] for r in flat),
        }
        if "forwards" in flat[0]:  # transformers' prompt lookup: every pass after the prompt's verifies candidates
            verify_passes = sum(r["forwards"] - 1 for r in flat)
            accepted, drafted = sum(r["tokens"] - r["forwards"] for r in flat), sum(r["drafted"] for r in flat)
            res.update(accepted_per_iteration=accepted / max(verify_passes, 1),
                       drafted_per_iteration=drafted / max(verify_passes, 1),
                       tokens_per_verify=(accepted + verify_passes) / max(verify_passes, 1),
                       acceptance_rate=accepted / drafted if drafted else None)
        if "iterations" in flat[0]:
            accepted, drafted = sum(r["accepted"] for r in flat), sum(r["drafted"] for r in flat)
            verify_passes = sum(r["iterations"] for r in flat)
            tries: dict[int, int] = {}
            hits: dict[int, int] = {}
            for r in flat:
                for k, v in r["per_position_tries"].items():
                    tries[int(k)] = tries.get(int(k), 0) + v
                for k, v in r["per_position_hits"].items():
                    hits[int(k)] = hits.get(int(k), 0) + v
            stages = {}
            for key in ("target_vision_ms", "target_prefill_ms", "drafter_vision_ms", "drafter_prefill_ms",
                        "prefill_draft_ms", "overlap_ms"):
                vals = [r["phase1"][key] for r in flat if key in r["phase1"]]
                if vals:
                    stages[key.removesuffix("_ms")] = statistics.median(vals)
            for key in ("draft", "verify", "crop"):
                stages[key] = statistics.median(r["stage_ms"].get(key, 0.0) for r in flat)
            res.update(
                accepted_per_iteration=accepted / max(verify_passes, 1),
                drafted_per_iteration=drafted / max(verify_passes, 1),
                tokens_per_verify=(accepted + verify_passes) / max(verify_passes, 1),
                acceptance_rate=accepted / drafted if drafted else None,
                per_position_acceptance={k: hits.get(k, 0) / tries[k] for k in sorted(tries)},
                nodes_per_verify=sum(r.get("nodes", 0) for r in flat) / max(verify_passes, 1),
                prefill_drafted=statistics.mean(r["phase1"].get("drafted", 0) for r in flat),
                prefill_accepted=statistics.mean(r["prefill_accepted"] for r in flat),
                stage_ms_median_per_answer=stages,
                foreign_tokens=sum(r["foreign_tokens"] for r in flat),
            )
        out[name] = res
    return out


def tie_verdicts(checks: dict[str, dict[str, Any]], margin: float) -> dict[str, dict[str, Any]]:
    """Per configuration, from {"outputs": checked, "ties": [NumericTie as dict]}: the ties beside the
    target-alone run's count, and whether they stay within max(TIE_MARGIN_MIN, margin x outputs) of it.
    The target alone shares the reference's path (one decode step per token), so its ties measure how far
    that path repeats itself; it is the baseline and is not failed."""
    base = len(checks["target"]["ties"])
    out = {}
    for name, c in checks.items():
        allowed = base + max(TIE_MARGIN_MIN, math.ceil(margin * c["outputs"]))
        out[name] = {"outputs_checked": c["outputs"], "numeric_tie_count": len(c["ties"]), "target_ties": base,
                     "max_ties": allowed, "passed": name == "target" or len(c["ties"]) <= allowed,
                     "numeric_ties": c["ties"]}
    return out


def reference_profile(args: argparse.Namespace) -> Any:
    """The --reference_profile (None when skipped); a missing file is one warning, not an error."""
    from cost_model import load_timing_profile

    if args.reference_profile is None:
        return None
    if not args.reference_profile.is_file():
        log.warning("reference profile %s not found; no second modelled column", args.reference_profile)
        return None
    return load_timing_profile(args.reference_profile)


def modelled(name: str, res: dict[str, Any], profile: Any, args: argparse.Namespace,
             levels: tuple[str | None, str | None]) -> float | None:
    """The offline cost model's speed-up for this configuration at the acceptance measured here."""
    from cost_model import DECODE_ADAPTERS, estimate_two_phase

    kind = res.get("drafting", {}).get("kind")
    if "accepted_per_iteration" not in res or kind not in (*ADAPTER_CONFIGS, "synthetic"):
        return None  # the target itself, and transformers' loops: no configuration of the cost model
    if name.startswith("synthetic"):  # decode phase only: (alpha + 1) x t_step / (t_verify + gamma x t_draft)
        g = args.gamma_decode  # a tree verifies its nodes (g x width) in one pass, one draft step per depth
        width = 1 + res["nodes_per_verify"] if res.get("drafting", {}).get("tree_width") else g + 1
        return (res["tokens_per_verify"] * profile.vl_decode_ms
                / (profile.verify_ms(width) + g * args.synthetic_cost_ms))
    pre, dec = levels
    if dec is not None and dec not in DECODE_ADAPTERS:
        return None  # mode c (EventGPT + per-position adapter while decoding) is not in the cost model
    tree = res.get("drafting", {}).get("tree")  # a tree: verify at its width, one adapter step per depth
    est = estimate_two_phase(profile, num_tokens=res["tokens_per_answer"],
                             free_tokens=res["prefill_accepted"],
                             accept_len=res["accepted_per_iteration"],
                             gamma_decode=tree["depth"] if tree else args.gamma_decode,
                             gamma_prefill=max(args.gamma_prefill, 1), prefill_adapter=pre, decode_adapter=dec,
                             drafts_per_iter=res.get("drafted_per_iteration"),
                             verify_width=1 + res["nodes_per_verify"] if tree else None)
    return float(est["speedup"])


# ----------------------------------------------------------------------------------- reporting


def tie_cell(verdict: dict[str, Any] | None) -> str:
    """`ties (target alone) / most allowed`, with FAILED where the margin is exceeded."""
    if not verdict:
        return "-"
    cell = f"{verdict['numeric_tie_count']} ({verdict['target_ties']}) / {verdict['max_ties']}"
    return cell if verdict["passed"] else f"{cell} FAILED"


def best_lookup(configs: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The fastest prompt-lookup configuration of the grid (median speed-up over the target alone)."""
    grid = [(n, c) for n, c in configs.items() if (c.get("drafting") or {}).get("kind") == "prompt_lookup"]
    return max(grid, key=lambda nc: nc[1]["speedup"]["median"], default=None)


def format_report(result: dict[str, Any]) -> str:
    rows = []
    for name, r in result["configs"].items():
        s, ll = r["speedup"], r["speedup_llm_only"]
        est, ref = r.get("modelled_speedup"), r.get("modelled_speedup_reference")
        rows.append([
            name, f"{r['ms_per_answer']:.1f}", f"{r['tokens_per_s']:.1f}",
            f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})",
            f"{ll['median']:.3f} ({ll['min']:.3f}-{ll['max']:.3f})",
            "-" if r.get("speedup_vs_hf_generate") is None else f"{r['speedup_vs_hf_generate']['median']:.3f}",
            "-" if est is None else f"{est:.3f}",
            "-" if ref is None else f"{ref:.3f}",
            "-" if r.get("tokens_per_verify") is None else f"{r['tokens_per_verify']:.2f}",
            "-" if r.get("accepted_per_iteration") is None else f"{r['accepted_per_iteration']:.2f}",
            "-" if r.get("drafted_per_iteration") is None else f"{r['drafted_per_iteration']:.2f}",
            "-" if r.get("prefill_accepted") is None else f"{r['prefill_accepted']:.2f}/{r['prefill_drafted']:.1f}",
            tie_cell(r.get("lossless")),
        ])
    lines = [f"# Live speculative decoding: measured wall clock ({result['device']})", "",
             f"Command: `{result['command']}`", "",
             "Target decode path: " + ", ".join(f"{k} {v}" for k, v in result["decode_path"].items()) + ".", "",
             f"{result['num_samples']} samples x {result['repeats']} repeats, "
             f"max_new_tokens {result['max_new_tokens']}, "
             f"gamma_decode {result['gamma_decode']}, gamma_prefill {result['gamma_prefill']}, draft stop rules "
             f"{', '.join(result.get('draft_stop') or ['fixed'])} "
             f"(confidence {result.get('draft_confidence', 0.0):g}), "
             f"temperature {result['temperature']}; greedy outputs checked equal to the target's at every "
             f"position: {result['lossless_checked']} ({result['lossless_outputs_checked']} outputs, "
             f"{result.get('numeric_tie_count', 0)} numeric ties: a differing token whose top-2 logit margin was "
             "within the dtype's rounding on every recomputed path, the engine's own verify pass included, after "
             "which the check went on against the target's own continuation; listed per configuration under "
             "lossless in the JSON). 'ties' = this configuration's ties (the target alone's) / the most allowed, "
             f"the target alone's + max({result['tie_margin']['minimum']}, {result['tie_margin']['fraction']:g} x "
             "its checked outputs)"
             + (": " + "; ".join(result["lossless_failures"]) if result.get("lossless_failures") else "") + ".",
             "", "Speed-up = target-alone time per token / configuration time per token on the same samples (in "
             "greedy mode both write the same tokens), median (min-max) over repeats; 'LLM only' leaves out the "
             "target's vision (video decoding + tower); 'vs hf generate' is the same ratio against transformers' eager "
             "`generate` on the same samples (config hf_generate). 'modelled' is the cost model at the acceptance "
             "and drafts measured here under this run's timing profile; 'modelled ref' the same under "
             f"{result.get('reference_profile') or 'no reference profile'}.", "",
             markdown_table(["config", "ms/answer", "tokens/s", "speed-up", "speed-up LLM only", "vs hf generate",
                             "modelled",
                             "modelled ref", "tokens/verify", "accepted/iter", "drafted/iter", "prefill acc/drafted",
                             "ties"],
                            rows), ""]
    lookup = best_lookup(result["configs"])
    if lookup is not None:
        name, c = lookup
        vs_hf = c.get("speedup_vs_hf_generate")
        lines += [f"Prompt lookup decoding (transformers' `generate(..., prompt_lookup_num_tokens=K, "
                  f"max_matching_ngram_size=N)`, no trained drafter): fastest of the grid `{name}` at "
                  f"{c['speedup']['median']:.3f} the target alone"
                  + (f", {vs_hf['median']:.3f} `generate`" if vs_hf else "")
                  + f", {c['tokens_per_verify']:.2f} tokens per verify pass (picked on these timed runs, which "
                  "favours it).", ""]
    stage_rows = [[n, *(f"{r['stage_ms_median_per_answer'].get(k, 0.0):.2f}" for k in
                        ("target_vision", "target_prefill", "drafter_vision", "drafter_prefill", "prefill_draft",
                         "overlap", "draft", "verify", "crop"))]
                  for n, r in result["configs"].items() if "stage_ms_median_per_answer" in r]
    lines += ["## Stage times (ms per answer, medians)", "",
              markdown_table(["config", "target vision", "target prefill", "drafter vision", "drafter prefill",
                              "prefill drafting", "overlap", "draft", "verify", "crop+resync"], stage_rows), ""]
    pos = [[n, ", ".join(f"{v:.2f}" for v in r["per_position_acceptance"].values())]
           for n, r in result["configs"].items() if r.get("per_position_acceptance")]
    if pos:
        lines += ["## Per-position acceptance (decode drafts 1..gamma)", "",
                  markdown_table(["config", "rate"], pos), ""]
    trees = [(n, r) for n, r in result["configs"].items() if r.get("chain")]
    if trees:
        def depths(r: dict[str, Any]) -> str:
            return ", ".join(f"{v:.2f}" for v in r["per_position_acceptance"].values())

        rows = []
        for name, r in trees:
            c, t = result["configs"][r["chain"]], r["drafting"]["tree"]
            rows.append([name, tree_shape(t), f"{r['nodes_per_verify']:.1f}",
                         f"{c['tokens_per_verify']:.2f} -> {r['tokens_per_verify']:.2f}", depths(c), depths(r),
                         f"{c['speedup']['median']:.3f} -> {r['speedup']['median']:.3f}",
                         "{median:.3f} ({min:.3f}-{max:.3f})".format(**r["tree_over_chain"]),
                         "-" if r.get("modelled_speedup_reference") is None else
                         f"{c['modelled_speedup_reference']:.3f} -> {r['modelled_speedup_reference']:.3f}"])
        lines += ["## Draft trees beside their chains (same adapter, same samples)", "",
                  "Tree = depth d, k frontier nodes expanded per depth into k children each, the best n nodes "
                  "verified in one pass (ancestor mask); 'by depth' = share of iterations whose path held to depth "
                  "1, 2, ...; 'tree/chain' = chain time per token / tree time per token, paired per repeat.", "",
                  markdown_table(["tree config", "shape", "nodes/verify", "tokens/verify chain -> tree",
                                  "by depth (chain)", "by depth (tree)", "speed-up chain -> tree", "tree/chain",
                                  "modelled ref chain -> tree"], rows), ""]
    if result.get("assisted"):
        a = result["assisted"]
        lines += ["## Against transformers' assisted generation (text-only, target LM + perturbed copy)", "",
                  markdown_table(["", "tokens/s", "speed-up vs theirs"],
                                 [["ours", f"{a['ours_tokens_per_s']:.1f}", f"{a['ours_over_theirs']['median']:.3f} "
                                   f"({a['ours_over_theirs']['min']:.3f}-{a['ours_over_theirs']['max']:.3f})"],
                                  ["transformers", f"{a['theirs_tokens_per_s']:.1f}", "1"]]),
                  f"\nOutputs identical to the target's greedy answer on every prompt (both); mean accepted drafts "
                  f"per iteration (ours) {a['accepted_per_iteration']:.2f}.", ""]
    p = result["profile"]
    lines += ["## Timing profile (ms, medians; timing_profile.json)", "",
              markdown_table(["vl vision", "egpt vision", "vl prefill", "egpt prefill", "vl decode", "egpt decode"],
                             [[f"{p[k]:.2f}" for k in ("vl_vision_ms", "egpt_vision_ms", "vl_prefill_ms",
                                                       "egpt_prefill_ms", "vl_decode_ms", "egpt_decode_ms")]]),
              "", "verify k: " + ", ".join(f"{k}: {v:.2f}" for k, v in p["vl_verify_ms"].items()),
              "", "adapter step: " + ", ".join(f"{k}: {v:.3f}" for k, v in p["adapter_step_ms"].items()), ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(result["configs"])
    med = [result["configs"][n]["speedup"]["median"] for n in names]
    lo = [m - result["configs"][n]["speedup"]["min"] for n, m in zip(names, med, strict=True)]
    hi = [result["configs"][n]["speedup"]["max"] - m for n, m in zip(names, med, strict=True)]
    ax1.bar(names, med, yerr=[lo, hi], color="tab:blue")
    ax1.axhline(1.0, color="grey", lw=1)
    ax1.set_ylabel("speed-up vs target alone")
    ax1.tick_params(axis="x", rotation=60)
    syn = [(r["tokens_per_verify"], r["speedup"]["median"], r.get("modelled_speedup"))
           for n, r in result["configs"].items() if n.startswith("synthetic")]
    if syn:
        syn.sort()
        ax2.plot([s[0] for s in syn], [s[1] for s in syn], "o-", label="measured")
        if all(s[2] is not None for s in syn):
            ax2.plot([s[0] for s in syn], [s[2] for s in syn], "x--", label="modelled (decode phase)")
        ax2.set_xlabel("tokens per verify pass (accepted + 1)")
        ax2.set_ylabel("speed-up")
        ax2.set_title("controlled drafter")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    from clip_data import ClipReadError, load_index, load_questions, plan_samples

    if args.left_out:
        print(f"left out: {', '.join(args.left_out)}; give a checkpoint from train_hidden_adapter.py (or a level "
              "with --random_adapters) to run them")
    checks = preflight(args, {role: [c for c in args.configs if role in ADAPTER_CONFIGS.get(c, ())]
                              for role in ("prefill", "decode")})  # seconds, before the models load
    if args.dry_run:
        return dry_run_report("benchmark_e2e_wallclock.py", checks, [
            f"time configurations {', '.join(args.configs)} on {args.max_samples} samples of {args.split}, "
            f"{args.repeats} repeats, into {args.output_dir}"])
    set_seed(args.seed)
    split_dir = args.dataset_dir / args.split
    clips = load_index(args.dataset_dir, args.split)
    questions = load_questions(args.questions or args.dataset_dir, args.max_questions)
    samples = plan_samples(len(clips), len(questions), args.max_samples)
    eg, vl = load_runners(args, questions)
    adapters = load_adapters(args, vl, eg)
    if args.static_cache:  # before the profile and the references, so every timing is on one path
        vl.use_static_cache(args.max_cache_len, args.gamma_decode + 1, args.compile)
    gen = torch.Generator(device=vl.device).manual_seed(args.seed)
    # The profile comes first: the expected-gain draft stop weighs this machine's measured costs.
    device = str(vl.device) + (f" ({torch.cuda.get_device_name(vl.device)})" if vl.device.type == "cuda" else "")
    command = "python " + " ".join(sys.argv) if sys.argv and sys.argv[0].endswith(".py") else "main(args)"
    source = (f"benchmark_e2e_wallclock.py, {device}, {str(vl.dtype).removeprefix('torch.')}, quant {args.quant}, "
              f"path {vl.decode_path['name']}, "
              f"{'random:' + args.random_shape if args.random_shape else vl.model_path}, "
              f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}, {command}")
    c0, q0 = samples[0]
    used = {a.config.name for a in adapters.get("decode", [])}
    used |= {args.synthetic_cost_ms} if isinstance(args.synthetic_cost_ms, str) else set()
    profile = measure_profile(vl, eg, split_dir, clips[c0], questions[q0], args.gamma_decode, source,
                              decode_adapters=adapters.get("decode"), compiled_levels=used,
                              verify_widths=tree_widths(args))
    args.synthetic_cost_level = None
    if isinstance(args.synthetic_cost_ms, str):  # a level: its roll-out draft step as just measured on this path
        args.synthetic_cost_level = args.synthetic_cost_ms
        args.synthetic_cost_ms = profile.adapter_step_ms[args.synthetic_cost_level]
        log.info("controlled drafter: %.3f ms per draft, the measured %s draft step (%s path)",
                 args.synthetic_cost_ms, args.synthetic_cost_level, vl.decode_path["name"])
    engines, levels, drafting = build_engines(args, vl, eg, adapters, gen, profile, profile.adapter_step_ms)
    lookups = lookup_configs(args)
    drafting |= {n: {"kind": "prompt_lookup", "num_tokens": k, "max_ngram": m} for n, (k, m) in lookups.items()}
    names = [n for n in engines if n != "target"]
    names = ["target", *(["hf_generate"] if "hf_generate" in args.configs else []), *lookups, *names]
    log.info("configs: %s; %d samples x %d repeats (+%d warm-up)", ", ".join(names), len(samples), args.repeats,
             args.warmup)

    references = {}
    checked = 0  # greedy outputs compared with the target's own (run_config raises on a mismatch)
    checks = {n: {"outputs": 0, "ties": []} for n in names}  # per configuration, warm-up included
    try:
        for c, q in tqdm(samples, desc="reference answers", unit="sample"):
            inputs = vl.build_inputs([vl.clip_features(split_dir, clips[c])], [questions[q]])
            references[(c, q)] = sd.greedy_reference(vl, inputs, args.max_new_tokens)
        runs: dict[str, list[list[dict[str, Any]]]] = {n: [[] for _ in range(args.repeats)] for n in names}
        warm = [samples[i % len(samples)] for i in range(args.warmup)]
        bar = tqdm(total=len(names) * (len(warm) + args.repeats * len(samples)), desc="timed runs", unit="run")
        for rep in [-1, *range(args.repeats)]:
            order = names[rep % len(names):] + names[: rep % len(names)] if rep >= 0 else names
            for c, q in warm if rep < 0 else samples:
                for name in order:
                    rec = run_config(name, engines.get(name), vl, eg, split_dir, clips[c], questions[q],
                                     references[(c, q)], args, lookup=lookups.get(name))
                    checked += args.temperature == 0
                    checks[name]["outputs"] += args.temperature == 0
                    checks[name]["ties"] += rec.get("numeric_ties", [])
                    if rep >= 0:
                        runs[name][rep].append(rec)
                    bar.update(1)
        bar.close()
    except ClipReadError as err:
        raise UserError(f"{err} (the benchmark needs every clip it times; for missing event PNGs run "
                        "preprocess_event_images.py on the data set)") from err
    except sd.LosslessError as err:
        log.error("LOSSLESS CHECK FAILED: %s", err)
        return 1
    for rep in runs.values():  # runs are appended in sample order per repeat, whatever the config order
        assert all(len(r) == len(samples) for r in rep)

    configs = aggregate(runs, args.gamma_decode)
    reference = reference_profile(args)
    for name, res in configs.items():
        res["drafting"] = drafting.get(name, {"kind": name})
        res["modelled_speedup"] = modelled(name, res, profile, args, levels.get(name, (None, None)))
        if reference is not None:
            res["modelled_speedup_reference"] = modelled(name, res, reference, args, levels.get(name, (None, None)))
    for name, chain in trees_beside_chains(configs).items():  # paired per repeat, as every speed-up
        def ms_per_token(rep: list[dict[str, Any]]) -> float:
            return sum(r["ms"] for r in rep) / sum(r["tokens"] for r in rep)

        configs[name]["tree_over_chain"] = spread([ms_per_token(c) / ms_per_token(t)
                                                   for c, t in zip(runs[chain], runs[name], strict=True)])
        configs[name]["chain"] = chain

    assisted = None
    if "assisted" in args.configs:
        pair = text_pair(vl, args.assistant_noise, args.seed, args.draft_confidence)
        # classic two-model drafting: the perturbed copy's own greedy tokens through its own head
        drafter = make_drafter(None, pair.runner.lm_head_weight(), lm=DrafterLM(pair.runner),
                               min_confidence=args.draft_confidence)
        drafter.name = "assistant (own head)"
        engine = sd.SpeculativeDecoder(vl, drafter, gamma_decode=args.gamma_decode)
        try:
            warm_runs = [assisted_run(pair, vl, q, args.gamma_decode, args.max_new_tokens, engine)
                         for q in questions[: max(args.warmup, 1)]]
            reps = [[assisted_run(pair, vl, q, args.gamma_decode, args.max_new_tokens, engine)
                     for q in questions[: args.max_samples]] for _ in range(args.repeats)]
        except sd.LosslessError as err:
            log.error("LOSSLESS CHECK FAILED: %s", err)
            return 1
        flat = [r for rep in reps for r in rep]
        checked += 2 * (len(flat) + len(warm_runs))  # ours and transformers', warm-up included
        checks["assisted"] = {"outputs": 2 * (len(flat) + len(warm_runs)),
                              "ties": [t for r in warm_runs + flat for t in r["numeric_ties"]]}
        tokens = sum(r["tokens"] for r in flat)
        assisted = {
            "ours_tokens_per_s": tokens / (sum(r["ours_ms"] for r in flat) / 1e3),
            "theirs_tokens_per_s": tokens / (sum(r["theirs_ms"] for r in flat) / 1e3),
            "ours_over_theirs": spread([sum(r["theirs_ms"] for r in rep) / sum(r["ours_ms"] for r in rep)
                                         for rep in reps]),
            "accepted_per_iteration": sum(r["accepted"] for r in flat) / max(sum(r["iterations"] for r in flat), 1),
            "assistant_noise": args.assistant_noise, "prompts": len(reps[0]),
        }

    verdicts = tie_verdicts(checks, args.tie_margin)
    for name, res in configs.items():
        res["lossless"] = verdicts[name]
    if assisted is not None:
        assisted["lossless"] = verdicts["assisted"]
    failures = [f"{n}: {v['numeric_tie_count']} numeric ties in {v['outputs_checked']} outputs, the target alone "
                f"{v['target_ties']}, at most {v['max_ties']} allowed" for n, v in verdicts.items() if not v["passed"]]

    result = {
        "format": "xmodal_sd.e2e_wallclock", "format_version": E2E_FORMAT_VERSION, "command": command, "device": device,
        "platform": platform.platform(), "torch": torch.__version__, "num_samples": len(samples),
        "repeats": args.repeats, "warmup": args.warmup, "max_new_tokens": args.max_new_tokens,
        "gamma_decode": args.gamma_decode, "gamma_prefill": args.gamma_prefill, "temperature": args.temperature,
        "draft_confidence": args.draft_confidence, "draft_stop": args.draft_stop,
        "reference_profile": str(args.reference_profile) if reference is not None else None,
        "decode_path": {**vl.decode_path, "adapter_steps": adapter_path(vl)},
        "cuda_max_memory_gib": torch.cuda.max_memory_allocated(vl.device) / 2**30 if vl.device.type == "cuda" else None,
        "lossless_checked": args.temperature == 0,
        "lossless_outputs_checked": checked,
        "numeric_tie_count": sum(v["numeric_tie_count"] for v in verdicts.values()),
        "tie_margin": {"fraction": args.tie_margin, "minimum": TIE_MARGIN_MIN},
        "lossless_passed": not failures, "lossless_failures": failures,
        "random_adapters": args.random_adapters,
        "adapters": {role: [a.config.name for a in group] for role, group in adapters.items()},
        "decode_modes": {n: e.drafter.name for n, e in engines.items() if n.startswith("decode")},
        "synthetic_cost_ms": args.synthetic_cost_ms,
        "synthetic_cost_level": args.synthetic_cost_level,
        "models": {"eventgpt": model_description(eg), "video_llava": model_description(vl)},
        "left_out": args.left_out, "configs": configs, "assisted": assisted, "profile": profile.to_json(),
        "runs": runs,
    }
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out / "e2e_wallclock.json")
    atomic_write_json(profile.to_json(), out / "timing_profile.json")
    report = format_report(result)
    (out / "e2e_wallclock.md").write_text(report + "\n")
    plot(result, out / "e2e_wallclock.png")
    print(report)
    log.info("wrote %s/{e2e_wallclock.json,e2e_wallclock.md,e2e_wallclock.png,timing_profile.json}", out)
    for failure in failures:
        log.error("LOSSLESS CHECK FAILED (numeric ties beyond the margin): %s", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    run_cli(main, parse_args)
