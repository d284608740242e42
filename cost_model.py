"""Latency model of two-phase cross-modal speculative decoding, fed by a measured timing profile.

Two cost models (docs/METRICS.md, "Cost model"):

- `reference=True` charges what the reference system's documents charged: per decode iteration one
  verify pass plus one adapter pass, and free prefill drafts. With the reference's own constants
  this reproduces its two-phase table (L1+L5F 1.54x ... B1-only 1.31x).
- the default (honest) model charges what each configuration really runs (as speculative_decoding.py
  runs it): every drafted position's adapter step, EventGPT's decode steps where the drafter states
  need them (L5F: one per drafted position; prefill drafting), and the verify pass of the prefill
  drafts. B1 and L5E are rolled out from the target's verified states: adapter steps only (L5E also
  runs EventGPT's vision + prefill once, beside the target's). L5 reads EventGPT's states of the
  verified text: one EventGPT pass per iteration besides its adapter steps. With a draft-length rule
  the adapter steps per iteration are the measured mean drafts (`drafts_per_iter`), not gamma.

Timing profiles: the two files in timings/ (interpreted as docs/METRICS.md states) and
this project's own JSON/YAML format (`xmodal_sd.timing_profile`, written by the live benchmark).

Usage:
    python cost_model.py --timings timings/h100_fp16_eager_7b.json          # the profile as read
    python cost_model.py --timings timings/rtx4090_4bit_reference.json --output results/4090.json

    >>> from cost_model import load_timing_profile, estimate_two_phase
    >>> p = load_timing_profile("timings/rtx4090_4bit_reference.json")
    >>> estimate_two_phase(p, num_tokens=50, free_tokens=3.82, accept_len=0.73, gamma_decode=5,
    ...                    gamma_prefill=7, prefill_adapter="L1", decode_adapter="L5F", reference=True)["speedup"]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import UserError, atomic_write_json, markdown_table
from hidden_adapter import levels

# Prefill drafting window, one default everywhere: `auto` = as many drafts as EventGPT finishes while the
# target prefills. The live engine stops drafting when the target's prefill ends, so there auto is only a
# cap (PREFILL_WINDOW_CAP, the two-phase model's longest window); the two-phase model fits the window to
# each timing profile; offline measurement records every window and headlines the reference's 7.
PREFILL_WINDOW_CAP = 16
REFERENCE_PREFILL_WINDOW = 7

PROFILE_FORMAT = "xmodal_sd.timing_profile"
PROFILE_VERSION = 1
# The roles come from the adapter config (hidden_adapter.LEVEL_ROLES), never from a list of names here.
PREFILL_ADAPTERS = levels(predicts="same")
DECODE_ADAPTERS = levels(predicts="next")
# Decode adapters whose drafter states come from EventGPT at every drafted position (the live engine's
# lockstep L5F drafter); B1 and L5E are rolled out from the target's verified states (no EventGPT step).
EGPT_EVERY_DRAFT = set(levels(egpt_per_draft=True))
# L5's context is EventGPT's states of the verified text: one EventGPT pass over the accepted tokens per iteration.
EGPT_EVERY_ITERATION = set(levels(egpt_per_iteration=True))
# Decode adapters that need EventGPT's prefill (run beside the target's vision + prefill).
EGPT_PREFILL = set(levels(predicts="next", reads_drafter=True))
# A level a profile may lack, costed as the level whose step it shares: L5E's step is B1's plus one add of
# a vector projected once per answer (profiles measured before L5E existed have no entry for it); a drafted
# position of E3 and E3E reads the head's own output, so their draft step is B1's (their layer fusion runs on
# verified positions only, once per verify pass).
STEP_LIKE = {"L5E": "B1", "E3": "B1", "E3E": "B1"}
# Decode adapters that read the target's layer states from every verify pass (E3, E3E): each pass costs
# `verify_layers_extra_ms` more (0 in profiles that did not measure it).
READS_LAYERS = set(levels(reads_layers=True))


@dataclass
class TimingProfile:
    """Per-operation latencies in ms, batch 1. Vision is separate from the LLM prefill (0 where the
    source folded it into the prefill figure). `vl_verify_ms` maps k (tokens in one target forward)
    to ms; `verify_ms(k)` interpolates it."""

    source: str
    vl_vision_ms: float
    egpt_vision_ms: float
    vl_prefill_ms: float
    egpt_prefill_ms: float
    vl_decode_ms: float
    vl_verify_ms: dict[int, float]
    egpt_decode_ms: float
    adapter_step_ms: dict[str, float]
    notes: list[str] = field(default_factory=list)
    # ms a verify pass of gamma + 1 tokens takes more when the target also returns EAGLE-3's three layer states
    # (runner.capture_layers; measured by the live benchmark when it drafts with E3 / E3E, else 0)
    verify_layers_extra_ms: float = 0.0

    def verify_ms(self, k: float) -> float:
        """One target forward over k new tokens: linear between measured k, the nearest measured k
        outside them; never less than one decode step (a pass over k >= 1 tokens does at least its work)."""
        if not self.vl_verify_ms:
            return self.vl_decode_ms
        ks = sorted(self.vl_verify_ms)
        if k <= ks[0]:
            value = self.vl_verify_ms[ks[0]]
        elif k >= ks[-1]:
            value = self.vl_verify_ms[ks[-1]]
        else:
            hi = next(x for x in ks if x >= k)
            lo = max(x for x in ks if x <= k)
            w = 0.0 if hi == lo else (k - lo) / (hi - lo)
            value = (1 - w) * self.vl_verify_ms[lo] + w * self.vl_verify_ms[hi]
        return max(value, self.vl_decode_ms)

    def adapter_ms(self, level: str) -> float:
        if level not in self.adapter_step_ms and STEP_LIKE.get(level) in self.adapter_step_ms:
            return self.adapter_step_ms[STEP_LIKE[level]]
        if level not in self.adapter_step_ms:
            raise UserError(f"timing profile '{self.source}' has no adapter step time for {level}; "
                            f"it has {sorted(self.adapter_step_ms)}")
        return self.adapter_step_ms[level]

    @property
    def vl_prefill_total_ms(self) -> float:
        return self.vl_vision_ms + self.vl_prefill_ms

    @property
    def egpt_prefill_total_ms(self) -> float:
        return self.egpt_vision_ms + self.egpt_prefill_ms

    def to_json(self) -> dict[str, Any]:
        """This project's profile format (what `load_timing_profile` reads back)."""
        data = asdict(self)
        data["vl_verify_ms"] = {str(k): v for k, v in sorted(self.vl_verify_ms.items())}
        return {"format": PROFILE_FORMAT, "format_version": PROFILE_VERSION, **data}


# ----------------------------------------------------------------------------- reading profiles


def _num(data: dict[str, Any], key: str, path: Path) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise UserError(f"timing profile {path}: '{key}' must be a non-negative number, got {value!r}")
    return float(value)


def _from_own(data: dict[str, Any], path: Path) -> TimingProfile:
    if data.get("format_version") != PROFILE_VERSION:
        raise UserError(f"timing profile {path} has format_version {data.get('format_version')!r}; "
                        f"this code reads {PROFILE_VERSION}")
    verify = data.get("vl_verify_ms") or {}
    adapters = data.get("adapter_step_ms") or {}
    if not isinstance(verify, dict) or not isinstance(adapters, dict):
        raise UserError(f"timing profile {path}: vl_verify_ms and adapter_step_ms must be mappings")
    try:
        verify_ms = {int(k): _num(verify, k, path) for k in verify}
    except ValueError as err:
        raise UserError(f"timing profile {path}: vl_verify_ms keys must be token counts ({err})") from err
    return TimingProfile(
        source=str(data.get("source", path.name)),
        **{k: _num(data, k, path) for k in ("vl_vision_ms", "egpt_vision_ms", "vl_prefill_ms", "egpt_prefill_ms",
                                            "vl_decode_ms", "egpt_decode_ms")},
        vl_verify_ms=verify_ms,
        adapter_step_ms={str(k): _num(adapters, k, path) for k in adapters},
        notes=list(data.get("notes", [])),
        verify_layers_extra_ms=_num(data, "verify_layers_extra_ms", path) if "verify_layers_extra_ms" in data else 0.0,
    )


def _from_h100(data: dict[str, Any], path: Path) -> TimingProfile:
    """The shared H100 measurement: decode = the warmed same-process eager step (the k=1 entry of the
    forward table was the first measured and carries warm-up noise); EventGPT's decode step = the
    target's (same LLaMA-7B, launch-bound, so the shorter context barely matters)."""
    forward = data["llm_forward_k_new_tokens_after_2100_cached_ms"]
    decode = float(data["decode_step_same_process_ms"]["eager_one_token"])
    return TimingProfile(
        source=f"{path.name}: {data.get('measured', 'H100')}",
        vl_vision_ms=float(data["vision_ms"]["video_llava_clip_l14_224_eight_frames"]),
        egpt_vision_ms=float(data["vision_ms"]["eventgpt_clip_l14_336_one_frame"]),
        vl_prefill_ms=float(data["llm_prefill_ms"]["video_llava_2080_tokens"]),
        egpt_prefill_ms=float(data["llm_prefill_ms"]["eventgpt_640_tokens"]),
        vl_decode_ms=decode,
        vl_verify_ms={int(k): float(v) for k, v in forward.items() if int(k) > 1},
        egpt_decode_ms=decode,
        adapter_step_ms={k: float(v["decode_step_ms"]) for k, v in data["adapters_fp16_width_4096_ms"].items()},
        notes=[
            "decode step = decode_step_same_process_ms.eager_one_token (warmed); "
            "the forward table's k=1 entry (37 ms) is dropped as warm-up noise",
            "verify(k) = measured forward of k tokens, never below one decode step",
            "EventGPT decode step = Video-LLaVA decode step (same LLaMA-7B shape, launch-bound)",
            "adapter step = adapters_fp16_width_4096_ms.*.decode_step_ms",
        ],
    )


def _from_reference(data: dict[str, Any], path: Path) -> TimingProfile:
    """The reference's RTX 4090 constants: its prefill figures include vision; one verify pass costs a
    decode step whatever k; one adapter time for every level."""
    adapter = _num(data, "adapter_ms", path)
    return TimingProfile(
        source=f"{path.name}: {data.get('source', 'reference constants')}",
        vl_vision_ms=0.0,
        egpt_vision_ms=0.0,
        vl_prefill_ms=_num(data, "vl_prefill_ms", path),
        egpt_prefill_ms=_num(data, "egpt_prefill_ms", path),
        vl_decode_ms=_num(data, "vl_decode_ms_per_token", path),
        vl_verify_ms={1: _num(data, "vl_verify_ms", path)},
        egpt_decode_ms=_num(data, "egpt_decode_ms_per_token", path),
        adapter_step_ms={name: adapter for name in (*PREFILL_ADAPTERS, *DECODE_ADAPTERS)},
        notes=[
            "prefill figures include the vision encoders (vision_ms = 0)",
            "verify(k) = vl_verify_ms for every k (the reference's assumption)",
            "EventGPT decode step is not stated by the reference; the file assumes the target's",
        ],
    )


def load_timing_profile(path: str | Path) -> TimingProfile:
    """Read a timing profile: this project's format (JSON or YAML) or one of the two shared files."""
    path = Path(path)
    fix = "pass timings/*.json or a profile written by benchmark_e2e_wallclock.py"
    if not path.is_file():
        raise UserError(f"timing profile not found: {path} ({fix})")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml and json raise different types
        raise UserError(f"timing profile {path} cannot be parsed: {str(err).splitlines()[0]} ({fix})") from err
    if not isinstance(data, dict):
        raise UserError(f"timing profile {path} is not a mapping ({fix})")
    try:
        if data.get("format") == PROFILE_FORMAT:
            return _from_own(data, path)
        if "llm_forward_k_new_tokens_after_2100_cached_ms" in data:
            return _from_h100(data, path)
        if "vl_decode_ms_per_token" in data:
            return _from_reference(data, path)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"timing profile {path} lacks an expected entry: {err!r} ({fix})") from err
    raise UserError(f"{path} is not a timing profile this code knows (no format '{PROFILE_FORMAT}') ({fix})")


# ----------------------------------------------------------------------------- the cost model


def estimate_two_phase(
    profile: TimingProfile,
    *,
    num_tokens: float,
    free_tokens: float,
    accept_len: float,
    gamma_decode: int,
    gamma_prefill: int,
    prefill_adapter: str | None,
    decode_adapter: str | None,
    concurrent_drafter: bool = False,
    reference: bool = False,
    drafts_per_iter: float | None = None,
    verify_width: float | None = None,
) -> dict[str, Any]:
    """Modelled latency (ms) of one answer of `num_tokens` tokens, baseline vs two-phase SD.

    baseline = VL prefill (vision included) + N x VL decode step
    SD       = prefill phase + decode phase; see docs/METRICS.md for both cost models.
    free_tokens: mean consecutive prefill drafts accepted (within gamma_prefill; ignored without a
        prefill adapter). accept_len: mean accepted drafts per decode iteration, without the bonus
        token (ignored without a decode adapter). Iterations are expected values (fractional).
        drafts_per_iter: adapter steps per decode iteration when a draft-length rule ends windows early
        (default gamma_decode); the honest model only.
        verify_width: positions of each decode verify pass when it is not the chain's (a draft tree: its
        nodes + 1; its adapter steps stay one batched step per depth, `drafts_per_iter`); honest model only.
    """
    if prefill_adapter is not None and prefill_adapter not in PREFILL_ADAPTERS:
        raise ValueError(f"prefill adapter must be one of {PREFILL_ADAPTERS} or None, got {prefill_adapter!r}")
    if decode_adapter is not None and decode_adapter not in DECODE_ADAPTERS:
        raise ValueError(f"decode adapter must be one of {DECODE_ADAPTERS} or None, got {decode_adapter!r}")
    if num_tokens <= 0 or gamma_decode < 1 or gamma_prefill < 1:
        raise ValueError("num_tokens, gamma_decode and gamma_prefill must be positive")
    n = float(num_tokens)
    free = min(max(float(free_tokens), 0.0), float(gamma_prefill), n) if prefill_adapter else 0.0
    alpha = min(max(float(accept_len), 0.0), float(gamma_decode)) if decode_adapter else 0.0
    egpt_free = concurrent_drafter and not reference
    out: dict[str, Any] = {"cost_model": "reference" if reference else "honest",
                           "concurrent_drafter": bool(concurrent_drafter and not reference),
                           "num_tokens": n, "free_tokens": free, "accept_len": alpha,
                           "tokens_per_iter": alpha + 1.0 if decode_adapter else 1.0,
                           "gamma_prefill": gamma_prefill, "gamma_decode": gamma_decode}
    out["baseline_ms"] = profile.vl_prefill_total_ms + n * profile.vl_decode_ms

    # ---- prefill phase: both models read their inputs side by side; EventGPT drafts while VL prefills
    vl_side = profile.vl_prefill_total_ms
    uses_egpt = prefill_adapter is not None or decode_adapter in (EGPT_EVERY_DRAFT if reference else EGPT_PREFILL)
    egpt_side = profile.egpt_prefill_total_ms if uses_egpt else 0.0
    prefill_verify = 0.0
    remaining = n
    if prefill_adapter is not None:
        if reference:
            egpt_side += profile.adapter_ms(prefill_adapter)
            remaining = n - free
        else:
            # EventGPT's prefill yields its first token's state; each further draft is one decode step.
            egpt_side += (gamma_prefill - 1) * profile.egpt_decode_ms + profile.adapter_ms(prefill_adapter)
            # the target checks the drafts in one pass: accepted drafts plus its own next token
            prefill_verify = profile.verify_ms(gamma_prefill)
            remaining = max(n - free - 1.0, 0.0)
    out.update(vl_prefill_ms=vl_side, egpt_prefill_ms=egpt_side, prefill_verify_ms=prefill_verify,
               prefill_ms=max(vl_side, egpt_side) + prefill_verify, remaining_tokens=remaining)

    # ---- decode phase
    if decode_adapter is None:
        iterations, verify, adapter_iter, egpt_iter = remaining, profile.vl_decode_ms, 0.0, 0.0
    else:
        iterations = remaining / (alpha + 1.0)
        # a window cut short by a draft-length rule is verified with its own width (interpolated)
        verify = profile.verify_ms(gamma_decode + 1 if drafts_per_iter is None or reference
                                   else min(max(drafts_per_iter, 0.0), gamma_decode) + 1)
        if verify_width is not None and not reference:
            verify = profile.verify_ms(verify_width)
        if decode_adapter in READS_LAYERS and not reference:
            verify += profile.verify_layers_extra_ms
        if reference:
            adapter_iter, egpt_iter = profile.adapter_ms(decode_adapter), 0.0
        else:
            drafts = float(gamma_decode if drafts_per_iter is None else min(max(drafts_per_iter, 0.0), gamma_decode))
            adapter_iter = drafts * profile.adapter_ms(decode_adapter)
            egpt_steps = drafts if decode_adapter in EGPT_EVERY_DRAFT else (
                1.0 if decode_adapter in EGPT_EVERY_ITERATION else 0.0)
            egpt_iter = 0.0 if egpt_free else egpt_steps * profile.egpt_decode_ms
    per_iter = verify + adapter_iter + egpt_iter
    out.update(iterations=iterations, verify_ms=verify, adapter_ms_per_iter=adapter_iter,
               egpt_ms_per_iter=egpt_iter, per_iter_ms=per_iter, decode_ms=iterations * per_iter)
    out["sd_ms"] = out["prefill_ms"] + out["decode_ms"]
    out["speedup"] = out["baseline_ms"] / out["sd_ms"]
    return out


def prefill_window(profile: TimingProfile, prefill_adapter: str, max_window: int = PREFILL_WINDOW_CAP) -> int:
    """Prefill drafts EventGPT finishes before the target's vision + prefill end (what the live engine
    drafts: it stops at the target's prefill): its prefill yields the first draft, each decode step one
    more, plus one adapter pass. At least 1 (then the honest model charges the overrun), at most
    `max_window`."""
    spare = profile.vl_prefill_total_ms - profile.egpt_prefill_total_ms - profile.adapter_ms(prefill_adapter)
    if spare < 0:
        return 1
    steps = math.floor(spare / profile.egpt_decode_ms) if profile.egpt_decode_ms > 0 else max_window
    return int(min(max_window, 1 + steps))


def break_even_accept_len(profile: TimingProfile, decode_adapter: str, gamma_decode: int,
                          concurrent_drafter: bool = False) -> float:
    """Accepted drafts per iteration at which the honest decode phase costs what plain decoding does
    (per token: per_iter / (alpha + 1) = VL decode step). May exceed gamma_decode (never pays off)."""
    est = estimate_two_phase(profile, num_tokens=1.0, free_tokens=0.0, accept_len=0.0, gamma_decode=gamma_decode,
                             gamma_prefill=1, prefill_adapter=None, decode_adapter=decode_adapter,
                             concurrent_drafter=concurrent_drafter)
    return est["per_iter_ms"] / profile.vl_decode_ms - 1.0


# ----------------------------------------------------------------------------- CLI


def profile_table(profile: TimingProfile) -> str:
    rows = [[name, f"{getattr(profile, name):.3f}"] for name in
            ("vl_vision_ms", "vl_prefill_ms", "egpt_vision_ms", "egpt_prefill_ms", "vl_decode_ms", "egpt_decode_ms")]
    rows += [[f"verify_ms(k={k})", f"{profile.verify_ms(k):.3f}"] for k in (1, 2, 4, 6, 8)]
    rows += [[f"adapter_step_ms[{k}]", f"{v:.3f}"] for k, v in profile.adapter_step_ms.items()]
    return markdown_table(["quantity", "ms"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timings", required=True, help="timing profile (timings/*.json or this project's JSON/YAML)")
    parser.add_argument("--output", default=None, help="write the profile as read, in this project's JSON format")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> TimingProfile:
    profile = load_timing_profile(args.timings)
    print(f"timing profile: {profile.source}")
    print(profile_table(profile))
    for note in profile.notes:
        print(f"- {note}")
    if args.output:
        atomic_write_json(profile.to_json(), args.output)
        print(f"wrote {args.output}")
    return profile


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main, parse_args)


__all__ = ["DECODE_ADAPTERS", "PREFILL_ADAPTERS", "TimingProfile", "break_even_accept_len", "estimate_two_phase",
           "load_timing_profile", "prefill_window"]
