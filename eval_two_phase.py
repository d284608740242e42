"""Offline two-phase evaluation: prefill adapter x decode adapter, modelled end-to-end speed-up.

Phase 1 (prefill hiding): while Video-LLaVA encodes its frames and prefills, EventGPT (faster) drafts
the first gamma_prefill tokens; a same-position adapter (L1-L4) maps its states to target tokens.
Phase 2 (decode): a next-position adapter (L5F, B1, L5E or L5) drafts gamma_decode tokens per
iteration and the target verifies them in one pass. Decode adapters are scored by their roll-out on
the live engine's schedule (--decode_acceptance rollout, the offline figure that tracks live drafting)
or by one-step teacher-forced drafts (one_step, an upper estimate; also what the best-gamma search reads).
The token-level acceptance of each adapter (from
measure_feature_acceptance.py) goes into the cost model of cost_model.py, under every timing profile,
with the honest and the reference cost model side by side (docs/METRICS.md).

    # toy world, after run_all_eval.sh (seconds)
    python eval_two_phase.py --acceptance_dir results/toy/acceptance --label toy \
        --timings timings/h100_fp16_eager_7b.json timings/rtx4090_4bit_reference.json
    # the reference's own inputs (its free tokens and alphas) under its own cost model: its table
    python eval_two_phase.py --reference_inputs --reference_cost_model --label reference \
        --timings timings/rtx4090_4bit_reference.json

Writes two_phase_results_{label}.json and two_phase_results_{label}.md in --output_dir.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from cli import add_config_flag, parse_with_config, run_cli
from common import UserError, atomic_write_bytes, atomic_write_json, markdown_table
from cost_model import (
    DECODE_ADAPTERS,
    PREFILL_ADAPTERS,
    TimingProfile,
    break_even_accept_len,
    estimate_two_phase,
    load_timing_profile,
    prefill_window,
)
from hidden_data import PAIRS
from metrics import acceptance_results

log = logging.getLogger("xmodal_sd.two_phase")
RESULT_FORMAT = "xmodal_sd.two_phase_results"
REFERENCE_CONFIGS = "L1+L5F,L2+L5F,L3+L5F,L4+L5F,L5F,B1"  # the reference's table (002)
DEFAULT_CONFIGS = REFERENCE_CONFIGS + ",L5E,L5,L1+B1,E3"

# The reference's published token-level inputs (002): prefill free tokens within 7 slots and consecutive
# shifted accepts per decode iteration, for 50-token answers. Used only with --reference_inputs.
REFERENCE_INPUTS = {
    "free_tokens": {"L1": 3.82, "L2": 4.72, "L3": 4.85, "L4": 4.59},
    "accept_len": {"L5F": 0.73, "B1": 0.51, "L5": 0.73},
    "num_tokens": 50.0, "gamma_prefill": 7, "gamma_decode": 5,
}
MAX_GAMMA_SEARCH = 16


def parse_config(text: str) -> tuple[str | None, str | None]:
    """`L1+L5F` -> ("L1", "L5F"); `B1` -> (None, "B1"); `L3` -> ("L3", None); `none` -> (None, None)."""
    parts = [p.strip().upper() for p in text.split("+")]
    pre = dec = None
    for part in parts:
        if part in ("NONE", ""):
            continue
        if part in PREFILL_ADAPTERS and pre is None:
            pre = part
        elif part in DECODE_ADAPTERS and dec is None:
            dec = part
        else:
            raise ValueError(f"bad configuration {text!r}: use PREFILL+DECODE with PREFILL in "
                             f"{'/'.join(PREFILL_ADAPTERS)} and DECODE in {'/'.join(DECODE_ADAPTERS)}, either optional")
    return pre, dec


def config_name(pre: str | None, dec: str | None) -> str:
    return "+".join(x for x in (pre, dec) if x) or "none"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--acceptance_dir",
                     help="folder of */acceptance_metrics.json (run_all_eval.sh; each names its level and pairing)")
    src.add_argument("--reference_inputs", action="store_true",
                     help="use the reference's published free tokens and alphas instead of measured ones")
    p.add_argument("--timings", nargs="+", required=True,
                   help="timing profiles: timings/*.json and/or profiles of the live benchmark (JSON/YAML)")
    p.add_argument("--configs", default=None,
                   help="comma-separated PREFILL+DECODE configurations (default: the reference's six, plus L5E, L5, "
                        "L1+B1 and E3 for measured acceptance)")
    p.add_argument("--decode_acceptance", choices=("rollout", "one_step"), default="rollout",
                   help="accepted drafts per iteration of decode adapters: their roll-out on the live schedule "
                        "(as drafting runs) or one-step teacher-forced drafts (from every start; an upper estimate)")
    p.add_argument("--prefill_pairs", choices=PAIRS, default="free",
                   help="pairing whose acceptance scores prefill adapters (EventGPT drafts freely there)")
    p.add_argument("--decode_pairs", choices=PAIRS, default="teacher_forced",
                   help="pairing whose acceptance scores decode adapters (after verification both read the same text)")
    p.add_argument("--num_tokens", default="auto",
                   help="answer length N; 'auto' = the test split's mean target answer length "
                   "(50 with --reference_inputs)")
    p.add_argument("--gamma_prefill", default="auto",
                   help="prefill drafts; 'auto' = as many as EventGPT finishes within the target's prefill under "
                   "each profile (what the live engine drafts), 7 with --reference_inputs")
    p.add_argument("--gamma_decode", type=int, default=None, help="drafts per decode iteration (default 5)")
    p.add_argument("--concurrent_drafter", action="store_true",
                   help="assume EventGPT's decode steps run concurrently with the target (not charged; an upper bound)")
    p.add_argument("--reference_cost_model", action="store_true",
                   help="make the reference's cost model the headline 'speedup' (both are always computed)")
    p.add_argument("--label", default="offline", help="name in the output files: two_phase_results_{label}.json")
    p.add_argument("--output_dir", default="results/two_phase", help="where the JSON and Markdown table go")
    add_config_flag(p)
    args = parse_with_config(p, argv)
    args.configs_named = args.configs is not None  # the defaults leave out what has no acceptance result
    if args.configs is None:
        args.configs = REFERENCE_CONFIGS if args.reference_inputs else DEFAULT_CONFIGS
    try:
        args.config_list = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    except ValueError as err:
        p.error(str(err))
    if not args.config_list:
        p.error("--configs is empty")
    for name, cast, kind, valid, rule in (("num_tokens", float, "a number", lambda v: v > 0, "positive"),
                                          ("gamma_prefill", int, "an integer", lambda v: v >= 1, ">= 1")):
        if getattr(args, name) == "auto":
            continue
        try:
            setattr(args, name, cast(getattr(args, name)))
        except ValueError:
            p.error(f"--{name} must be {kind} or 'auto'")
        if not valid(getattr(args, name)):
            p.error(f"--{name} must be {rule}")
    if args.gamma_decode is not None and args.gamma_decode < 1:
        p.error("--gamma_decode must be >= 1")
    if args.reference_inputs and args.gamma_decode not in (None, REFERENCE_INPUTS["gamma_decode"]):
        p.error("--reference_inputs gives alphas for gamma_decode 5 only")
    if args.reference_inputs and args.gamma_prefill not in ("auto", REFERENCE_INPUTS["gamma_prefill"]):
        p.error("--reference_inputs gives free tokens for gamma_prefill 7 only")
    return args


# ----------------------------------------------------------------------------- acceptance inputs


def curve_value(curve: list[float | None] | None, g: int) -> float | None:
    """Entry g (1-based) of a by-window curve, the last entry past its end (runs cannot grow further)."""
    if not curve:
        return None
    value = curve[min(g, len(curve)) - 1]
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class AcceptanceInputs:
    """Token-level inputs per adapter: free tokens for prefill adapters, accept_len for decode ones."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.reference = args.reference_inputs
        self.loaded: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self._found: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        # every result under the folder, keyed by the level and pairing it records (not by folder names)
        self.results = {} if self.reference else acceptance_results(args.acceptance_dir)

    def _load(self, level: str, want: str) -> tuple[dict[str, Any], str]:
        """The acceptance result of `level` for pairing `want`, else the other pairing (noted once)."""
        if (level, want) in self._found:
            return self._found[level, want]
        for pairs in (want, *(p for p in PAIRS if p != want)):
            if (level, pairs) in self.results:
                path, result = self.results[level, pairs]
                if pairs != want:
                    note = f"{level}: no {want} result, used the {pairs} one ({path})"
                    log.warning(note)
                    self.notes.append(note)
                self.loaded[f"{level}_{pairs}"] = result
                self._found[level, want] = result, str(path)
                return result, str(path)
        raise UserError(f"no acceptance result for {level} in {self.args.acceptance_dir} (for pairing {want} or "
                        "the other); run run_all_eval.sh (or measure_feature_acceptance.py) for it first")

    def check_available(self, configs: list[tuple[str | None, str | None]], named: bool = True
                        ) -> list[tuple[str | None, str | None]]:
        """The configurations to run. Named ones (--configs) must all have their acceptance results: one error
        line names every adapter without one (in either pairing). The default list leaves out a configuration
        whose adapter has none, and says so in one line (an error only when nothing is left)."""
        if self.reference:
            return configs
        have = {lvl for lvl, _ in self.results}
        if not named:
            kept = [c for c in configs if all(lvl in have for lvl in c if lvl)]
            left = [c for c in configs if c not in kept]
            if left and kept:
                names = ", ".join("+".join(lvl for lvl in c if lvl) for c in left)
                absent = sorted({lvl for c in left for lvl in c if lvl and lvl not in have})
                line = (f"left out: {names} (no acceptance result for {', '.join(absent)} in "
                        f"{self.args.acceptance_dir}; --configs names configurations explicitly)")
                print(line)
                self.notes.append(line)
                return kept
        needed = sorted({lvl for pair in configs for lvl in pair if lvl})
        missing = [lvl for lvl in needed if lvl not in have]
        if missing:
            raise UserError(f"no acceptance result for {', '.join(missing)} in {self.args.acceptance_dir}; run "
                            "run_all_eval.sh (or measure_feature_acceptance.py) for them first")
        return configs

    def free_tokens(self, level: str, gamma: int) -> tuple[float, str]:
        if self.reference:
            return REFERENCE_INPUTS["free_tokens"][level], "reference documents (002), 7 slots"
        result, path = self._load(level, self.args.prefill_pairs)
        value = curve_value(result.get("prefill_free_by_window"), gamma)
        if value is None:
            raise UserError(f"{path} has no prefill free-token curve; rerun measure_feature_acceptance.py")
        return value, path

    def accept_len(self, level: str, gamma: int) -> tuple[float, str, list[float | None] | None]:
        if self.reference:
            return REFERENCE_INPUTS["accept_len"][level], "reference documents (002), gamma 5", None
        result, path = self._load(level, self.args.decode_pairs)
        curve = result.get("accept_len_by_gamma")
        roll = (result.get("drafting") or {}).get("rollout") or {}
        if self.args.decode_acceptance == "rollout" and roll.get("gamma") == gamma \
                and roll.get("live_accepted_per_iteration") is not None:
            return float(roll["live_accepted_per_iteration"]), f"{path} (roll-out, live schedule)", curve
        note = f"{level}: no roll-out figure for gamma {gamma} in {path}; one-step drafts used"
        if self.args.decode_acceptance == "rollout" and note not in self.notes:
            self.notes.append(note)
        value = curve_value(curve, gamma)
        if value is None:
            raise UserError(f"{path} has no accepted-length curve (is {level} a next-position adapter?); "
                            "rerun measure_feature_acceptance.py")
        return value, path, curve

    def num_tokens(self) -> float:
        if self.args.num_tokens != "auto":
            return float(self.args.num_tokens)
        if self.reference:
            return REFERENCE_INPUTS["num_tokens"]
        lengths = {k: r["counts"]["mean_target_answer_tokens"] for k, r in self.loaded.items()}
        if len(set(round(v, 6) for v in lengths.values())) > 1:
            self.notes.append(f"mean answer lengths differ between acceptance files: {lengths}; the first is used")
        return next(iter(lengths.values()))


# ----------------------------------------------------------------------------- evaluation


def best_gamma(profile: TimingProfile, base: dict[str, Any], curve: list[float | None] | None,
               concurrent: bool) -> dict[str, float] | None:
    """The gamma_decode that maximises the honest speed-up, given the measured accepted-length curve."""
    if not curve:
        return None
    best = None
    for g in range(1, min(len(curve), MAX_GAMMA_SEARCH) + 1):
        alpha = curve_value(curve, g)
        if alpha is None:
            continue
        est = estimate_two_phase(profile, **{**base, "gamma_decode": g, "accept_len": alpha},
                                 concurrent_drafter=concurrent)
        if best is None or est["speedup"] > best["speedup"]:
            best = {"gamma_decode": g, "accept_len": alpha, "speedup": est["speedup"]}
    return best


def window_for(profile: TimingProfile, pre: str | None, args: argparse.Namespace) -> int:
    """The prefill window of one configuration under one profile."""
    if args.gamma_prefill != "auto":
        return args.gamma_prefill
    if args.reference_inputs or pre is None:
        return REFERENCE_INPUTS["gamma_prefill"]
    return prefill_window(profile, pre, MAX_GAMMA_SEARCH)


def evaluate_profile(profile: TimingProfile, path: str, inputs: AcceptanceInputs, args: argparse.Namespace,
                     n: float, gamma_decode: int) -> dict[str, Any]:
    rows = []
    for pre, dec in args.config_list:
        gamma_prefill = window_for(profile, pre, args)
        free, free_src = inputs.free_tokens(pre, gamma_prefill) if pre else (0.0, None)
        alpha, alpha_src, curve = inputs.accept_len(dec, gamma_decode) if dec else (0.0, None, None)
        base = {"num_tokens": n, "free_tokens": free, "accept_len": alpha, "gamma_decode": gamma_decode,
                "gamma_prefill": gamma_prefill, "prefill_adapter": pre, "decode_adapter": dec}
        honest = estimate_two_phase(profile, **base, concurrent_drafter=args.concurrent_drafter)
        reference = estimate_two_phase(profile, **base, reference=True)
        row = {"config": config_name(pre, dec), "prefill_adapter": pre, "decode_adapter": dec,
               "gamma_prefill": gamma_prefill if pre else None, "free_tokens": free, "accept_len": alpha,
               "tokens_per_iter": alpha + 1 if dec else None,
               "inputs_from": {"prefill": free_src, "decode": alpha_src},
               "honest": honest, "reference": reference,
               "speedup": (reference if args.reference_cost_model else honest)["speedup"]}
        if dec:
            row["honest_break_even_accept_len"] = break_even_accept_len(profile, dec, gamma_decode,
                                                                        args.concurrent_drafter)
            row["honest_best_gamma_decode"] = best_gamma(profile, base, curve, args.concurrent_drafter)
        rows.append(row)
    return {"timing_profile": path, "source": profile.source, "profile_notes": profile.notes,
            "profile": profile.to_json(), "configs": rows}


def _f(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def profile_table(block: dict[str, Any], reference_first: bool) -> str:
    first, second = ("reference", "honest") if reference_first else ("honest", "reference")
    header = ["config", "prefill drafts", "free tokens", "accepted/iter", "tokens/iter", f"speed-up {first}",
              f"speed-up {second}", f"iters {first}", f"SD ms {first}", f"SD ms {second}", "baseline ms"]
    rows = []
    for r in block["configs"]:
        free = _f(r["free_tokens"]) if r["prefill_adapter"] else "-"
        rows.append([r["config"], str(r["gamma_prefill"] or "-"), free,
                     _f(r["accept_len"]) if r["decode_adapter"] else "-", _f(r["tokens_per_iter"]),
                     _f(r[first]["speedup"], suffix="x"), _f(r[second]["speedup"], suffix="x"),
                     _f(r[first]["iterations"], 1), _f(r[first]["sd_ms"], 0), _f(r[second]["sd_ms"], 0),
                     _f(r["honest"]["baseline_ms"], 0)])
    return markdown_table(header, rows)


def markdown_report(result: dict[str, Any]) -> str:
    s = result["settings"]
    egpt = "run concurrently (not charged: an upper bound)" if s["concurrent_drafter"] else "are charged"
    lines = [f"# Two-phase speculative decoding, modelled ({result['label']})", "",
             f"Inputs: {s['inputs']}; N = {s['num_tokens']:.2f} tokens, prefill drafts {s['gamma_prefill']}, "
             f"gamma_decode {s['gamma_decode']}; prefill adapters scored on {s['prefill_pairs']} pairs, decode "
             f"adapters on {s['decode_pairs']} pairs.",
             f"EventGPT decode steps {egpt} in the honest model. Offline accepted lengths are teacher-forced "
             "one-step predictions (upper estimates of a live roll-out); only the live benchmark measures speed.", ""]
    lines += [f"- {note}" for note in result["notes"]]
    for block in result["profiles"]:
        lines += ["", f"## {block['source']}", "", profile_table(block, s["reference_cost_model"]), ""]
        extra = [f"{r['config']}: honest break-even {r['honest_break_even_accept_len']:.2f} accepted/iter"
                 + (f"; best gamma_decode {r['honest_best_gamma_decode']['gamma_decode']} -> "
                    f"{r['honest_best_gamma_decode']['speedup']:.2f}x" if r.get("honest_best_gamma_decode") else "")
                 for r in block["configs"] if r.get("honest_break_even_accept_len") is not None]
        lines += [f"- {x}" for x in extra]
        lines += [f"- profile: {note}" for note in block["profile_notes"]]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict[str, Any]:
    inputs = AcceptanceInputs(args)
    args.config_list = inputs.check_available(args.config_list, args.configs_named)
    gamma_decode = args.gamma_decode or REFERENCE_INPUTS["gamma_decode"]
    gamma_prefill = REFERENCE_INPUTS["gamma_prefill"] if args.gamma_prefill == "auto" else args.gamma_prefill
    profiles = [(str(path), load_timing_profile(path)) for path in args.timings]
    # load every acceptance file once before N is fixed ('auto' reads their answer lengths)
    for pre, dec in args.config_list:
        if pre:
            inputs.free_tokens(pre, gamma_prefill)
        if dec:
            inputs.accept_len(dec, gamma_decode)
    if args.num_tokens == "auto" and not args.reference_inputs and not inputs.loaded:
        raise UserError("--num_tokens auto needs at least one adapter configuration; pass --num_tokens N")
    n = inputs.num_tokens()
    blocks = [evaluate_profile(profile, path, inputs, args, n, gamma_decode)
              for path, profile in profiles]
    result = {
        "format": RESULT_FORMAT, "format_version": 1, "label": args.label,
        "settings": {"inputs": "reference documents (002)" if args.reference_inputs else str(args.acceptance_dir),
                     "num_tokens": n, "gamma_decode": gamma_decode,
                     "gamma_prefill": "7 (the reference's)" if args.reference_inputs and args.gamma_prefill == "auto"
                     else args.gamma_prefill if args.gamma_prefill != "auto"
                     else "auto: the drafts that fit in the target's prefill, per profile",
                     "prefill_pairs": args.prefill_pairs, "decode_pairs": args.decode_pairs,
                     "decode_acceptance": args.decode_acceptance,
                     "concurrent_drafter": args.concurrent_drafter,
                     "reference_cost_model": args.reference_cost_model,
                     "headline": "reference" if args.reference_cost_model else "honest"},
        "notes": inputs.notes,
        "profiles": blocks,
    }
    out = Path(args.output_dir)
    atomic_write_json(result, out / f"two_phase_results_{args.label}.json")
    report = markdown_report(result)
    atomic_write_bytes(report.encode(), out / f"two_phase_results_{args.label}.md")
    print(report)
    print(f"wrote {out / f'two_phase_results_{args.label}.json'} and .md")
    return result


if __name__ == "__main__":
    run_cli(main, parse_args)
