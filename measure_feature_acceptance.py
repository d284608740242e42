"""Offline acceptance of one trained adapter on a test split: hidden-state and token-level metrics.

The adapter runs over the stored paired hidden states; its outputs are compared with the target's
states (cosine, Accept@tau, Consecutive@tau) and, through the target's LM head, with the target's
own greedy tokens (top-1/top-5 at the same position and, for next-position adapters, at the next
one; prefill free tokens; accepted drafts per decode iteration). Next-position adapters are also rolled
out as drafting runs them: --gamma_decode steps from every start position, each fed the adapter's own
previous outputs, scored from every start and on the live engine's schedule of iterations, beside the
same figures for teacher-forced one-step drafts. Definitions: docs/METRICS.md.

    # toy world (CPU, seconds)
    python measure_feature_acceptance.py --checkpoint tasks/toy/L1_free_20260101_120000/best_model.pt \
        --test_data data/toy/hidden/test --lm_head data/toy/vl_lm_head.pt --output_dir results/toy/acceptance/L1_free
    # the real models' test split (GPU when present)
    python measure_feature_acceptance.py --checkpoint tasks/L5F_teacher_forced_.../best_model.pt \
        --test_data data/hidden/test --lm_head data/vl_lm_head.pt --gamma_decode 5

Writes, in --output_dir: acceptance_metrics.json, per_position.csv, per_position.png,
acceptance_metrics.md, and for next-position adapters draft_positions.png (acceptance by draft
position 1..gamma, roll-out vs teacher-forced). Token-level figures come first everywhere: they decide speed; the
hidden-state ones are the training signal.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adapter_checkpoint import load_adapter
from cli import add_config_flag, gamma_prefill_arg, parse_with_config, run_cli
from common import UserError, atomic_write_bytes, atomic_write_json, markdown_table, resolve_device, save_figure
from cost_model import REFERENCE_PREFILL_WINDOW
from draft_trees import TreeSpec, tree_drafter
from drafters import make_drafter, replay_schedule
from hidden_adapter import BaseAdapter, adapter_inputs, draft_outputs, rollout_problem
from hidden_data import (
    LAYERS_KEY,
    PAIRS,
    check_layer_ids,
    differing_models,
    iter_chunks,
    load_lm_head,
    load_manifest,
    model_hashes,
    select_pairs,
)
from metrics import THRESHOLDS, AcceptanceAccumulator, RolloutAccumulator, draft_tokens, strict_json, tau_key

log = logging.getLogger("xmodal_sd.acceptance")
RESULT_FORMAT = "xmodal_sd.acceptance_metrics"
OFFLINE_NOTE = {
    "same": "same-position adapter: draft token t = argmax LM(adapter(drafter state t)); in live prefill drafting "
            "EventGPT decodes freely, as in the 'free' pairs",
    "next": "next-position adapter: the one-step figures (shifted top-1, accept_len) read true states up to t; the "
            "roll-out figures feed the adapter's own outputs back for the later drafts of an iteration, as live "
            "drafting does, and the live-schedule roll-out places iterations where the engine does",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="adapter best_model.pt written by train_hidden_adapter.py")
    p.add_argument("--test_data", required=True, help="test split folder written by extract_hidden_states.py")
    p.add_argument("--lm_head", required=True, help="target LM head file written by extract_vl_lm_head.py")
    p.add_argument("--output_dir", default=None,
                   help="where results go (default: acceptance_{pairs}[_target_input]/ next to the checkpoint)")
    p.add_argument("--gamma_prefill", default="auto",
                   help="prefill drafting window of the headline prefill_free (every window is also recorded "
                   f"in prefill_free_by_window); auto = {REFERENCE_PREFILL_WINDOW}, the reference's")
    p.add_argument("--gamma_decode", type=int, default=5,
                   help="drafts per decode iteration (accept_len is capped here)")
    p.add_argument("--batch_size", type=int, default=64, help="samples per adapter forward")
    p.add_argument("--pairs", choices=PAIRS, default=None,
                   help="which drafter states and mask to use (default: the pairing the checkpoint was trained on)")
    p.add_argument("--input_states", choices=("trained", "target"), default="trained",
                   help="trained: the states the adapter was trained to read; target: feed the target's states to "
                   "an adapter trained on the drafter's (how the live engine rolls out L5; widths must match)")
    p.add_argument("--tree_budget", type=int, default=0,
                   help="> 0: also replay the live engine's decode schedule on each recorded answer with this draft "
                        "tree and with the chain (B1: a level that reads only the target's states), tokens per "
                        "verify pass beside the live benchmark's (docs/LIVE_DECODING.md, draft trees)")
    p.add_argument("--tree_topk", type=int, default=4, help="the replayed tree's branching (as the live benchmark's)")
    p.add_argument("--tree_depth", type=int, default=0, help="the replayed tree's depth (0 = --gamma_decode)")
    p.add_argument("--tree_frontier", type=int, default=0,
                   help="the replayed tree's nodes expanded per depth (0 = --tree_topk; as the live benchmark's)")
    p.add_argument("--lm_head_batch", type=int, default=4096, help="rows projected through the LM head at a time")
    p.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N samples (quick checks)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--allow_model_mismatch", action="store_true",
                   help="evaluate even if the checkpoint was trained on states of other models (not recommended)")
    add_config_flag(p)
    args = parse_with_config(p, argv)
    args.gamma_prefill = gamma_prefill_arg(p, args.gamma_prefill, REFERENCE_PREFILL_WINDOW)
    for name in ("gamma_prefill", "gamma_decode", "batch_size", "lm_head_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max_samples must be >= 1")
    if args.tree_budget < 0 or args.tree_topk < 1 or args.tree_depth < 0 or args.tree_frontier < 0:
        p.error("--tree_budget, --tree_depth and --tree_frontier must be >= 0, --tree_topk >= 1")
    return args


def schedule_replay(adapter: BaseAdapter, test_data: Path, head: torch.Tensor, args: argparse.Namespace,
                    device: torch.device) -> dict[str, Any] | None:
    """The live schedule replayed on every recorded answer (drafters.replay_schedule) by the chain drafter and
    by the --tree_budget tree: tokens per verify pass and acceptance by depth of each, on the same samples.
    None for a level that reads EventGPT (the chunks do not hold what its live drafter reads per iteration)."""
    cfg = adapter.config
    if not args.tree_budget or not cfg.rolls_out or cfg.reads_drafter:
        return None
    tree = TreeSpec(args.tree_depth or args.gamma_decode, args.tree_topk, args.tree_budget,
                    frontier=args.tree_frontier)
    out: dict[str, Any] = {"tree_spec": tree.record()}
    passes: dict[str, list[tuple[int, int]]] = {"chain": [], "tree": []}
    done = 0
    reads_layers = bool(getattr(cfg, "reads_layers", False))  # E3, E3E: the chunks' layer states feed it
    for chunk in iter_chunks(test_data, expect_teacher_forced=False, expect_layers=reads_layers):
        for i in range(chunk["vl_tokens"].shape[0]):
            if args.max_samples is not None and done >= args.max_samples:
                break
            n = int(chunk["vl_mask"][i].sum())
            tokens, states = chunk["vl_tokens"][i, :n].tolist(), chunk["vl_hidden"][i, :n].to(device, torch.float32)
            layers = chunk[LAYERS_KEY][i, :n].to(device, torch.float32) if reads_layers else None
            if n:
                for name, spec in (("chain", None), ("tree", tree)):
                    gamma = tree.depth if spec else args.gamma_decode
                    drafter = make_drafter(adapter, head) if spec is None else tree_drafter(adapter, head, spec)
                    passes[name] += replay_schedule(drafter, states, tokens, gamma,
                                                    chunk["vl_tokens"].shape[1], layers)
            done += 1
    for name, ps in passes.items():
        depth = max((d for d, _ in ps), default=0)
        tries = [sum(d > j for d, _ in ps) for j in range(depth)]
        out[name] = {"verify_passes": len(ps), "tokens_per_verify": sum(a + 1 for _, a in ps) / max(len(ps), 1),
                     "by_depth": [sum(a > j for _, a in ps) / t if t else None for j, t in enumerate(tries)]}
    return out


# ----------------------------------------------------------------------------- inputs


def check_same_models(checkpoint: str, extra: dict[str, Any], manifest: dict[str, Any], allow: bool) -> None:
    """Refuse (one line) a checkpoint trained on states of other models than the test data's."""
    trained, tested = model_hashes(extra.get("data")), model_hashes(manifest)
    if not trained or not tested:
        log.warning("cannot check that %s was trained on states of the test data's models "
                    "(no config hashes recorded)", checkpoint)
        return
    differ = differing_models(trained, tested)
    if differ and not allow:
        raise UserError(f"{checkpoint} was trained on states of another {' and '.join(differ)} model than the test "
                        "data (config hashes differ); evaluate on data extracted with the same models")
    if differ:
        log.warning("model mismatch (%s) accepted by --allow_model_mismatch", ", ".join(differ))


def run_adapter(adapter: BaseAdapter, drafter: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                tokens: torch.Tensor, input_states: str = "trained", steps: int = 1,
                layers: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The adapter's outputs, fed as in training (hidden_adapter.adapter_inputs): [B, T, D_target] for one
    step, or the `steps` outputs of a roll-out for next-position adapters (outs[0] is the one-step
    output); `input_states="target"` feeds the target's states in place of the drafter's; `layers`
    [B, T, K, D_target] the target's layer states (E3, E3E)."""
    x, kwargs = adapter_inputs(adapter, target if input_states == "target" else drafter, target, tokens, layers)
    return draft_outputs(adapter, x, mask, steps, **kwargs)


def one_step_drafts(top1: torch.Tensor, conf: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced drafting in the roll-out layout: step k from start t is the one-step draft made at
    t + k - 1 (from the true state there). top1/conf [B, T] -> [steps, B, T] (-1 / 0 past the end)."""
    b, t = top1.shape
    drafts = torch.full((steps, b, t), -1, dtype=top1.dtype, device=top1.device)
    probs = torch.zeros((steps, b, t), dtype=conf.dtype, device=conf.device)
    for k in range(min(steps, t)):
        drafts[k, :, : t - k] = top1[:, k:]
        probs[k, :, : t - k] = conf[:, k:]
    return drafts, probs


def evaluate(adapter: BaseAdapter, test_data: Path, pairs: str, head: torch.Tensor, args: argparse.Namespace,
             device: torch.device) -> tuple[AcceptanceAccumulator, dict[str, RolloutAccumulator], dict[str, float]]:
    """Feed every test batch to the accumulators; returns the one-step accumulator, the drafting ones
    ({"rollout", "teacher_forced"}, empty for same-position adapters) and the data counts."""
    nxt = adapter.predicts == "next"
    rolls = {k: RolloutAccumulator(args.gamma_decode) for k in ("rollout", "teacher_forced")} if nxt else {}
    counts = {"samples": 0, "samples_without_valid_positions": 0, "target_tokens": 0, "drafter_tokens": 0}
    limit = args.max_samples
    manifest = load_manifest(test_data)
    total = min(manifest["num_samples"], limit or manifest["num_samples"])
    with tqdm(total=total, desc=f"{adapter.config.name} {pairs}", unit="sample") as bar:  # closed before errors
        acc = _evaluate_chunks(adapter, test_data, pairs, head, args, device, rolls, counts, bar)
    if acc is None or counts["samples"] == 0:
        raise UserError(f"{test_data} holds no samples; extract the test split first")
    return acc, rolls, counts


def _evaluate_chunks(adapter: BaseAdapter, test_data: Path, pairs: str, head: torch.Tensor, args: argparse.Namespace,
                     device: torch.device, rolls: dict[str, RolloutAccumulator], counts: dict[str, int], bar: Any
                     ) -> AcceptanceAccumulator | None:
    acc: AcceptanceAccumulator | None = None
    nxt = adapter.predicts == "next"
    limit = args.max_samples
    layered = adapter.config.reads_layers
    for chunk in iter_chunks(test_data, expect_teacher_forced=pairs == "teacher_forced", expect_layers=layered):
        drafter_all, mask_all = select_pairs(chunk, pairs)
        n = drafter_all.shape[0] if limit is None else min(drafter_all.shape[0], limit - counts["samples"])
        if acc is None:
            acc = AcceptanceAccumulator(predicts=adapter.predicts, lm_head=head, gamma_prefill=args.gamma_prefill,
                                        gamma_decode=args.gamma_decode, lm_head_batch=args.lm_head_batch,
                                        max_positions=mask_all.shape[1])
        for start in range(0, n, args.batch_size):
            sl = slice(start, min(start + args.batch_size, n))
            mask = mask_all[sl].to(device)
            drafter = drafter_all[sl].to(device, torch.float32)
            target = chunk["vl_hidden"][sl].to(device, torch.float32)
            tokens = chunk["vl_tokens"][sl].to(device)
            layers = chunk[LAYERS_KEY][sl].to(device, torch.float32) if layered else None
            outs = run_adapter(adapter, drafter, target, mask, tokens, args.input_states,
                               steps=args.gamma_decode if nxt else 1, layers=layers)
            acc.update(outs[0], target, mask, tokens)
            if nxt:
                drafts, conf = draft_tokens(outs, head, mask, args.lm_head_batch)
                rolls["rollout"].update(drafts, conf, tokens, mask)
                rolls["teacher_forced"].update(*one_step_drafts(drafts[0], conf[0], args.gamma_decode), tokens, mask)
            counts["samples_without_valid_positions"] += int((~mask.any(dim=1)).sum())
        counts["target_tokens"] += int(chunk["vl_mask"][:n].sum())
        counts["drafter_tokens"] += int(chunk["egpt_mask"][:n].sum())
        counts["samples"] += n
        bar.update(n)
        if limit is not None and counts["samples"] >= limit:
            break
    return acc


# ----------------------------------------------------------------------------- outputs


def _fmt(value: float, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}%" if pct else f"{value:.3f}"


def token_rows(m: dict[str, Any], gamma_prefill: int, gamma_decode: int) -> list[list[str]]:
    rows = [["same-position top-1", _fmt(m.get("token_top1"), True)],
            ["same-position top-5 (target token in draft's top 5)", _fmt(m.get("token_top5"), True)],
            ["consecutive same-position matches from 0", _fmt(m.get("token_consecutive"))],
            [f"prefill free tokens (within {gamma_prefill})", _fmt(m.get("prefill_free"))]]
    if "shifted_top1" in m:
        rows += [["shifted top-1 (output t vs token t+1)", _fmt(m["shifted_top1"], True)],
                 ["shifted top-5", _fmt(m["shifted_top5"], True)],
                 ["consecutive shifted matches from 0", _fmt(m["shifted_consecutive"])],
                 [f"accepted drafts per iteration, gamma {gamma_decode} (no bonus; vLLM counter)",
                  _fmt(m["accept_len"])],
                 [f"tokens per iteration, gamma {gamma_decode} (with bonus; EAGLE's tau)", _fmt(m["tokens_per_iter"])]]
    return rows


def drafting_rows(result: dict[str, Any]) -> list[list[str]]:
    """Accepted drafts per iteration as drafting runs (roll-out) and from teacher-forced one-step drafts."""
    d = result.get("drafting")
    if not d:
        return []
    g = result["gamma_decode"]
    rows = []
    for key, label in (("rollout", "roll-out"), ("teacher_forced", "one-step teacher-forced")):
        r = d[key]
        rows += [[f"{label}: accepted drafts per iteration, every start, gamma {g}", _fmt(r["accept_len"])],
                 [f"{label}: accepted drafts per iteration, live schedule", _fmt(r["live_accepted_per_iteration"])],
                 [f"{label}: tokens per verify pass, live schedule", _fmt(r["live_tokens_per_verify"])],
                 [f"{label}: acceptance by draft position 1..{g}, every start",
                  ", ".join(_fmt(v) for v in r["per_position"])]]
    return rows


def draft_position_plot(result: dict[str, Any], path: Path) -> None:
    """Share of iterations whose first k drafts are all accepted, k = 1..gamma: roll-out vs one-step."""

    def draw(fig: Any, ax: Any) -> None:
        for key, style, label in (("rollout", "-o", "roll-out, every start"),
                                  ("teacher_forced", "--s", "one-step, every start")):
            r = result["drafting"][key]
            ax.plot(range(1, len(r["per_position"]) + 1), r["per_position"], style, label=label)
        live = result["drafting"]["rollout"]["live_per_position"]
        ax.plot(range(1, len(live) + 1), live, ":^", label="roll-out, live schedule")
        ax.set_xlabel("draft position in the window")
        ax.set_ylabel("drafts 1..k all accepted")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{result['level']} ({result['pairs']} pairs): acceptance along the draft window")
        ax.legend()

    save_figure(path, draw)


def hidden_rows(m: dict[str, Any]) -> list[list[str]]:
    rows = [["cosine similarity, mean", _fmt(m["cos_mean"])]]
    rows += [[f"Accept@{tau_key(t)}", _fmt(m[f"accept@{tau_key(t)}"], True)] for t in THRESHOLDS]
    rows += [[f"Consecutive@{tau_key(t)} (from 0)", _fmt(m[f"consecutive@{tau_key(t)}"])] for t in THRESHOLDS]
    if "same_cos_mean" in m:
        rows += [["same-position cosine, mean", _fmt(m["same_cos_mean"])]]
        rows += [[f"same-position Accept@{tau_key(t)}", _fmt(m[f"same_accept@{tau_key(t)}"], True)]
                 for t in THRESHOLDS]
    return rows


def markdown_report(result: dict[str, Any]) -> str:
    m, g_p, g_d = result["metrics"], result["gamma_prefill"], result["gamma_decode"]
    pairing = "output t vs target t+1" if result["predicts"] == "next" else "output t vs target t"
    lines = [f"# Acceptance of {result['level']} ({result['pairs']} pairs)", "",
             f"checkpoint `{result['checkpoint']}`, test data `{result['test_data']}`: "
             f"{result['counts']['samples']} samples, {int(m['token_positions'])} valid positions "
             f"({result['counts']['samples_without_valid_positions']} samples without any valid position).", "",
             f"Offline assumption: {result['offline_assumption']}.", "",
             "## Token level (ground truth for speed)", "",
             markdown_table(["metric", "value"], token_rows(m, g_p, g_d)), "",
             *(["## Drafting: roll-out vs one-step (accepted drafts, no bonus token)", "",
                markdown_table(["metric", "value"], drafting_rows(result)), ""] if result.get("drafting") else []),
             f"## Hidden-state level ({pairing}; the training signal)", "",
             markdown_table(["metric", "value"], hidden_rows(m)), "",
             "## Token match given the cosine passes tau", "",
             markdown_table(["tau", "P(token match | cos > tau)", "Accept@tau"],
                            [[tau_key(t), _fmt(m[f"p_match_given_cos>{tau_key(t)}"], True),
                              _fmt(m[f"accept@{tau_key(t)}"], True)] for t in THRESHOLDS]), "",
             "## Per position", "", per_position_table(result["per_position"]), ""]
    return "\n".join(lines)


def per_position_columns(per: dict[str, list[float]]) -> list[str]:
    token = [c for c in ("token_top1", "token_top5", "shifted_top1", "shifted_top5") if c in per]
    return ["position", "count", *token, "cos_mean", *(f"accept@{tau_key(t)}" for t in THRESHOLDS)]


def per_position_table(per: dict[str, list[float]]) -> str:
    cols = per_position_columns(per)
    rows = []
    for i in range(len(per["position"])):
        if per["count"][i] == 0:
            continue
        rows.append([str(per["position"][i]), str(int(per["count"][i]))]
                    + [_fmt(per[c][i], c != "cos_mean") for c in cols[2:]])
    return markdown_table(cols, rows)


def per_position_csv(per: dict[str, list[float]]) -> bytes:
    cols = per_position_columns(per)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(cols)
    for i in range(len(per["position"])):
        writer.writerow(["" if isinstance(per[c][i], float) and math.isnan(per[c][i]) else per[c][i] for c in cols])
    return buf.getvalue().encode()


def per_position_plot(result: dict[str, Any], path: Path) -> None:
    """Two panels over answer positions: token-level acceptance (top), hidden-state Accept@tau (bottom)."""
    per = result["per_position"]
    keep = [i for i, c in enumerate(per["count"]) if c > 0]
    x = [per["position"][i] for i in keep]

    def draw(fig: Any, axes: Any) -> None:
        ax_tok, ax_hid = axes
        for col, style in (("token_top1", "-o"), ("token_top5", "--o"), ("shifted_top1", "-s"),
                           ("shifted_top5", "--s")):
            if col in per:
                ax_tok.plot(x, [per[col][i] for i in keep], style, ms=3, label=col.replace("_", " "))
        ax_tok.set_ylabel("token match rate")
        ax_tok.set_ylim(0, 1.02)
        ax_tok.legend(fontsize=8)
        ax_tok.set_title(f"{result['level']} ({result['pairs']} pairs): per-position acceptance")
        for t in THRESHOLDS:
            ax_hid.plot(x, [per[f"accept@{tau_key(t)}"][i] for i in keep], "-o", ms=3, label=f"Accept@{tau_key(t)}")
        ax_hid.plot(x, [per["cos_mean"][i] for i in keep], "k:", label="mean cosine")
        ax_hid.set_ylabel("hidden-state level")
        ax_hid.set_xlabel("answer position t" + (" (predicting t+1)" if result["predicts"] == "next" else ""))
        ax_hid.set_ylim(0, 1.02)
        ax_hid.legend(fontsize=8)

    save_figure(path, draw, nrows=2, figsize=(7, 6), sharex=True)


# ----------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    test_data = Path(args.test_data)
    manifest = load_manifest(test_data)
    adapter, extra = load_adapter(args.checkpoint, map_location="cpu")
    pairs = args.pairs or extra.get("pairs") or "free"
    if pairs not in PAIRS:
        raise UserError(f"{args.checkpoint} records pairs={pairs!r}; pass --pairs free or --pairs teacher_forced")
    if pairs == "teacher_forced" and not manifest.get("teacher_forced", True):
        raise UserError(f"{test_data} has no teacher-forced states; "
                        "extract it with --teacher_forced or pass --pairs free")
    check_same_models(args.checkpoint, extra, manifest, args.allow_model_mismatch)
    if adapter.config.reads_layers:
        check_layer_ids(manifest, adapter.config.target_layers, test_data,
                        "evaluate on data extracted with the layers the adapter was trained on")
    widths = manifest.get("widths")
    if not isinstance(widths, dict) or not widths.get("target"):
        raise UserError(f"{test_data / 'manifest.json'} records no state widths (written by an older release); "
                        "re-extract the test split with extract_hidden_states.py")
    # the checkpoint against the data first: a checkpoint of other models is not a bad LM head
    for role, have in (("drafter", adapter.config.drafter_dim), ("target", adapter.config.target_dim)):
        if widths.get(role) not in (None, have):
            raise UserError(f"{args.checkpoint} expects {role} width {have}, {test_data} has {widths[role]}; "
                            "evaluate an adapter trained on states of the test data's models")
    head_file = load_lm_head(args.lm_head, hidden_dim=int(widths["target"]),
                             need_embeddings=adapter.config.token_input, data=manifest, data_name=str(test_data))
    if args.input_states == "target" and adapter.config.drafter_dim != adapter.config.target_dim:
        raise UserError(f"--input_states target needs equal widths; {args.checkpoint} maps "
                        f"{adapter.config.drafter_dim} -> {adapter.config.target_dim}")
    problem = rollout_problem(adapter.config) if adapter.predicts == "next" else None
    if problem:
        raise UserError(f"{args.checkpoint}: {problem}")
    adapter = adapter.to(device).eval()
    if adapter.config.token_input:
        try:
            adapter.attach_token_table(head_file["embed_weight"])
        except ValueError as err:
            raise UserError(f"{args.checkpoint} and {args.lm_head}: {err}") from err
    suffix = "_target_input" if args.input_states == "target" else ""
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.checkpoint).parent / f"acceptance_{pairs}{suffix}"

    with torch.inference_mode():
        acc, rolls, counts = evaluate(adapter, test_data, pairs, head_file["weight"], args, device)
        replay = schedule_replay(adapter, test_data, head_file["weight"].to(device, torch.float32), args, device)
    metrics = acc.compute()
    result = {
        "format": RESULT_FORMAT, "format_version": 1,
        "level": adapter.config.name, "predicts": adapter.predicts, "consumes": adapter.consumes, "pairs": pairs,
        "input_states": args.input_states,
        "checkpoint": str(args.checkpoint), "test_data": str(test_data), "lm_head": str(args.lm_head),
        "gamma_prefill": args.gamma_prefill, "gamma_decode": args.gamma_decode,
        "offline_assumption": OFFLINE_NOTE[adapter.predicts],
        "counts": {**counts, "mean_target_answer_tokens": counts["target_tokens"] / counts["samples"]},
        "metrics": metrics,
        "prefill_free_by_window": acc.prefill_free_by_window(),
        "accept_len_by_gamma": acc.accept_len_by_gamma() if adapter.predicts == "next" else None,
        "per_position": acc.per_position(),
        "drafting": {name: r.compute() for name, r in rolls.items()} or None,
        "calibration": rolls["rollout"].calibration() if rolls else None,
        "schedule_replay": replay,
        "trained": {k: extra.get(k) for k in ("pairs", "data", "drafting") if k in extra},
    }
    result = strict_json(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out_dir / "acceptance_metrics.json")
    atomic_write_bytes(per_position_csv(result["per_position"]), out_dir / "per_position.csv")
    report = markdown_report(result)
    atomic_write_bytes(report.encode(), out_dir / "acceptance_metrics.md")
    per_position_plot(result, out_dir / "per_position.png")
    if result["drafting"]:
        draft_position_plot(result, out_dir / "draft_positions.png")
    print(markdown_table(["metric", "value"], token_rows(result["metrics"], args.gamma_prefill, args.gamma_decode)
                         + drafting_rows(result) + hidden_rows(result["metrics"])))
    c = result["counts"]
    print(f"{result['level']} on {pairs} pairs: {c['samples']} samples ({c['samples_without_valid_positions']} without "
          f"any valid position, counted nowhere), {int(metrics.get('token_positions', metrics['num_positions']))} "
          f"valid positions")
    print(f"wrote {out_dir}/acceptance_metrics.json, .md, per_position.csv, per_position.png")
    return result


if __name__ == "__main__":
    run_cli(main, parse_args)
