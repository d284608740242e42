"""Generate RESULTS.md from the files one pipeline run wrote: nothing in it is typed by hand.

Reads the extraction manifests, the newest finished training run of every level and pairing, the
offline acceptance results (measure_feature_acceptance.py), the two-phase estimates (eval_two_phase.py)
and the live benchmark (benchmark_e2e_wallclock.py), and writes one Markdown page with the tables and
plots. Token-level figures come first everywhere; every table names the files it was read from.

    # after `bash run_pipeline.sh` (the pipeline calls this as its last stage)
    python write_results.py --world toy --data_dir data/toy --tasks_dir tasks/toy --results_dir results/toy \
        --output results/toy/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path
from typing import Any

from adapter_checkpoint import load_adapter
from cli import run_cli
from common import UserError, atomic_write_bytes, markdown_table, read_json
from draft_trees import tree_shape
from hidden_adapter import ADAPTER_NAMES, count_parameters
from metrics import acceptance_results
from training_runs import newest_runs

# a live config name: kind[level] / kind[prefill+decode,rule], e.g. decode[B1,expected], two_phase[L1+L5F]
PAIRINGS = ("free", "teacher_forced")
TAUS = ("0.80", "0.85", "0.90", "0.95")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="toy", help="name of the run (toy, dsec, ...): the page's title")
    p.add_argument("--data_dir", default="data/toy",
                   help="folder holding hidden/{train,val,test} (and models/ for the toy)")
    p.add_argument("--tasks_dir", default="tasks/toy",
                   help="folder of training runs (each best_model.pt names its level and pairing)")
    p.add_argument("--results_dir", default="results/toy",
                   help="results of the run: acceptance/, two_phase/, e2e/, benchmark JSONs")
    p.add_argument("--output", default=None, help="the page to write (default RESULTS_DIR/RESULTS.md)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ helpers


def pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def num(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{float(x):.{digits}f}"


def span(d: dict[str, float] | None, digits: int = 2) -> str:
    """`median (min-max)` of a {median, min, max} dict."""
    if not d:
        return "-"
    return f"{d['median']:.{digits}f}x ({d['min']:.{digits}f}-{d['max']:.{digits}f})"


class Page:
    """Collects Markdown; links are written relative to the page's folder."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines = path, []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def rel(self, target: str | Path) -> str:
        return os.path.relpath(Path(target), self.path.parent)

    def source(self, *files: str | Path) -> None:
        self.add("", "Source: " + ", ".join(f"`{f}`" for f in files), "")

    def image(self, path: str | Path, alt: str) -> None:
        if Path(path).is_file():
            self.add(f"![{alt}]({self.rel(path)})", "")


def training_facts(run: Path) -> dict[str, Any]:
    """Parameters, epochs and the selected epoch's validation scores of one run."""
    adapter, extra = load_adapter(run / "best_model.pt")
    history = read_json(run / "history.json", "training history", "rerun train_hidden_adapter.py")["history"]
    best = next((h for h in reversed(history) if h.get("best")), history[-1])
    return {"params": count_parameters(adapter), "epochs": len(history), "best_epoch": best["epoch"],
            "val": best["val"], "loss_mix": extra.get("loss_mix"), "predicts": adapter.predicts,
            "drafting": extra.get("drafting") or {}}


# ------------------------------------------------------------------------------------------ sections


def data_section(page: Page, data_dir: Path) -> None:
    page.add("## Data", "")
    rows, files = [], []
    for split in ("train", "val", "test"):
        f = data_dir / "hidden" / split / "manifest.json"
        if not f.is_file():
            raise UserError(f"{f} is missing; run extract_hidden_states.py --split {split} (or run_pipeline.sh) first")
        m = read_json(f, "hidden-state manifest", "rerun extract_hidden_states.py")
        files.append(f)
        rows.append([split, str(m["num_samples"]), str(len(m["chunks"])), str(len(m.get("failed_clips", []))),
                     str(m.get("max_new_tokens")), "yes" if m.get("teacher_forced") else "no"])
    models = m.get("models", {})
    page.add(markdown_table(["split", "samples", "chunks", "failed clips", "positions", "teacher-forced"], rows))
    page.add("", "Models: " + "; ".join(
        f"{role} `{d.get('path')}` (config {d.get('config_hash')}, width {d.get('hidden_size')}, "
        f"vocabulary {d.get('vocab_size')}, {d.get('dtype')})" for role, d in models.items()) + ".")
    toy = data_dir / "models" / "toy_world.json"
    if toy.is_file():
        files.append(toy)
        page.add("", "The toy world's two models were trained by make_toy_world.py; how often they agree on the "
                 f"test split is in `{page.rel(toy)}`.")
    page.source(*files)


def adapter_section(page: Page, runs: dict, acc: dict) -> None:
    page.add("## Adapters: offline acceptance on the test split", "",
             "Token level first (the ground truth for speed), then the hidden-state level (the training signal). "
             "Same-position levels (L1-L4) are scored on draft t vs target token t: their use is prefill drafting, "
             "where `free tokens` counts the leading matches within the prefill window. Next-position levels "
             "(L5, B1, L5F, L5E) are scored on output t vs target token t+1: `accepted/iter` is the mean number "
             "of drafts accepted per decode iteration (gamma as stated), without the bonus token: from one-step "
             "drafts (each from true states) counted from every start position, the same on the live engine's "
             "schedule of iterations, and from the adapter's roll-out on its own outputs on that schedule "
             "(`roll-out`, the offline figure of what drafting does). Live iterations start right after a "
             "rejection, where drafting is hardest, so every-start figures run higher.", "")
    header = ["level", "pairs", "params", "epochs (best)", "token top-1", "free tokens", "shifted top-1",
              "accepted/iter one-step, every start", "one-step, live schedule", "roll-out, live schedule",
              "roll-out by draft position", "cos", *[f"Accept@{t}" for t in TAUS], "run"]
    rows, files = [], []
    for level in ADAPTER_NAMES:
        for pairs in PAIRINGS:
            if (level, pairs) not in acc:
                continue
            f, r = acc[(level, pairs)]
            m = r["metrics"]
            run = Path(r["checkpoint"]).parent
            facts = training_facts(run) if (run / "history.json").is_file() else {}
            files.append(f)
            roll = (r.get("drafting") or {}).get("rollout") or {}
            tf = (r.get("drafting") or {}).get("teacher_forced") or {}
            rows.append([level, pairs, f"{facts.get('params', 0):,}" if facts else "-",
                         f"{facts['epochs']} ({facts['best_epoch']})" if facts else "-",
                         pct(m.get("token_top1")), num(m.get("prefill_free")), pct(m.get("shifted_top1")),
                         num(m.get("accept_len")), num(tf.get("live_accepted_per_iteration")),
                         num(roll.get("live_accepted_per_iteration")),
                         ", ".join(num(v) for v in roll.get("per_position", [])) or "-", num(m.get("cos_mean"), 3),
                         *[pct(m.get(f"accept@{t}")) for t in TAUS], f"`{run.name}`"])
    if not rows:
        raise UserError(f"no acceptance results under {page.path.parent}/acceptance; run run_all_eval.sh first")
    gammas = {(r["gamma_prefill"], r["gamma_decode"]) for _, r in acc.values()}
    page.add(markdown_table(header, rows), "",
             "Windows: " + ", ".join(f"gamma_prefill {gp}, gamma_decode {gd}" for gp, gd in sorted(gammas)) + ".")
    page.source(*files)
    for level, pairs in (("L1", "free"), ("L5F", "teacher_forced"), ("B1", "teacher_forced")):
        if (level, pairs) in acc:
            page.image(acc[(level, pairs)][0].parent / "per_position.png", f"per-position acceptance, {level} {pairs}")
    for level in ("B1", "L5E"):
        if (level, "teacher_forced") in acc:
            page.image(acc[(level, "teacher_forced")][0].parent / "draft_positions.png",
                       f"acceptance along the draft window, {level}")
    del runs  # the runs are named in the rows; training curves follow in their own section


def pairing_section(page: Page, acc: dict) -> None:
    page.add("## Free pairs vs teacher-forced pairs", "",
             "The same level trained and scored on EventGPT's states over its own answer (free) or over the "
             "target's answer (teacher-forced, what the drafter sees after each verification). The key token "
             "figure is same-position top-1 for L1-L4 and shifted top-1 for L5, B1, L5F, L5E.", "")
    rows = []
    for level in ADAPTER_NAMES:
        cells = [level]
        for pairs in PAIRINGS:
            r = acc.get((level, pairs), (None, None))[1]
            if r is None:
                cells += ["-", "-", "-"]
                continue
            m = r["metrics"]
            key = "shifted_top1" if r["predicts"] == "next" else "token_top1"
            second = m.get("accept_len") if r["predicts"] == "next" else m.get("prefill_free")
            cells += [pct(m.get(key)), num(second), num(m.get("cos_mean"), 3)]
        rows.append(cells)
    header = ["level", *[f"{p}: {what}" for p in ("free", "teacher-forced")
                         for what in ("token", "accepted/free", "cos")]]
    page.add(markdown_table(header, rows), "")


def training_section(page: Page, runs: dict) -> None:
    page.add("## Training", "",
             "Validation scores of the selected epoch (the test split is never read in training).", "")
    rows, files = [], []
    for (level, pairs), run in sorted(runs.items(), key=lambda kv: (ADAPTER_NAMES.index(kv[0][0]), kv[0][1])):
        if not (run / "history.json").is_file():
            continue
        f = training_facts(run)
        v = f["val"]
        token = v.get("shifted_top1") if f["predicts"] == "next" else v.get("token_top1")
        files.append(run / "history.json")
        d = f["drafting"]
        how = "-" if f["predicts"] != "next" else (
            f"{'token input, ' if d.get('token_input') else ''}{d.get('rollout_steps', 1)}-step roll-out"
            f"{', token loss ' + num(d.get('token_loss_weight')) if d.get('token_loss_weight') else ''}"
            f"{', spec loss' if d.get('spec_loss') else ''}")
        rows.append([level, pairs, str(f["epochs"]), str(f["best_epoch"]), num(v.get("loss"), 4), pct(token),
                     num(v.get("rollout_accept")), pct(v.get("accept@0.90")), str(f["loss_mix"] or "-"), how,
                     f"`{run.name}`"])
    page.add(markdown_table(["level", "pairs", "epochs", "best epoch", "val loss", "val token top-1",
                             "val roll-out accepted/iter", "val Accept@0.90", "loss mix", "trained as", "run"], rows))
    page.source(*files[:2], "...") if len(files) > 2 else page.source(*files)
    for key in (("L1", "free"), ("L5F", "teacher_forced")):
        if key in runs:
            page.image(runs[key] / "training_curves.png", f"training curves, {key[0]} {key[1]}")


def two_phase_section(page: Page, results_dir: Path, world: str) -> None:
    page.add("## Two-phase estimates (cost model, offline acceptance)", "",
             "Modelled speed-up of prefill adapter x decode adapter under each timing profile. `honest` charges "
             "what each configuration runs (EventGPT's decode steps for L5F, adapter steps for roll-outs); "
             "`reference` charges as the reference documents did (one verify plus one adapter pass per "
             "iteration). These are estimates; the live table below is the measurement.", "")
    for label, what in ((world, "measured acceptance"), (f"{world}_concurrent", "EventGPT assumed concurrent"),
                        ("reference_inputs", "the reference's own published inputs")):
        f = results_dir / "two_phase" / f"two_phase_results_{label}.json"
        if not f.is_file():
            raise UserError(f"{f} is missing; run run_two_phase_eval.sh first")
        r = read_json(f, "two-phase result", "rerun run_two_phase_eval.sh")
        profiles = r["profiles"]
        names = [profile_name(p["timing_profile"]) for p in profiles]
        header = ["config", "accepted/iter", "free tokens",
                  *[f"{n}: {model}" for n in names for model in ("honest", "reference")]]
        rows = []
        for i, cfg in enumerate(profiles[0]["configs"]):
            cells = [cfg["config"], num(cfg.get("accept_len")), num(cfg.get("free_tokens"))]
            for p in profiles:
                c = p["configs"][i]
                cells += [f"{c['honest']['speedup']:.2f}x", f"{c['reference']['speedup']:.2f}x"]
            rows.append(cells)
        page.add(f"### {what}", "", markdown_table(header, rows))
        page.source(f)


def profile_name(path: str) -> str:
    """A timing profile's short name: its file stem, or for a measured `timing_profile.json` its folder."""
    p = Path(path)
    return f"measured here ({p.parent.name})" if p.stem == "timing_profile" else p.stem


def live_section(page: Page, results_dir: Path) -> dict[str, Any]:
    f = results_dir / "e2e" / "e2e_wallclock.json"
    if not f.is_file():
        raise UserError(f"{f} is missing; run benchmark_e2e_wallclock.py (run_pipeline.sh stage 9) first")
    r = read_json(f, "live benchmark result", "rerun benchmark_e2e_wallclock.py")
    page.add("## Live speculative decoding (measured)", "",
             f"{r['num_samples']} test samples x {r['repeats']} repeats on {r['device']}, max_new_tokens "
             f"{r['max_new_tokens']}, gamma_decode {r['gamma_decode']}, gamma_prefill {r['gamma_prefill']}, "
             f"temperature {r['temperature']}. Speed-up = time of the target alone / time of the configuration on "
             "the same samples, median (min-max) over repeats. Lossless: every greedy output was compared with "
             f"the target's own greedy output, {lossless_text(r)}.", "")
    rows = []
    for name, c in r["configs"].items():
        rows.append([name, span(c.get("speedup")), span(c.get("speedup_vs_hf_generate")),
                     num(c.get("modelled_speedup")),
                     num(c.get("modelled_speedup_reference")), num(c.get("accepted_per_iteration")),
                     num(c.get("tokens_per_verify")), num(c.get("drafted_per_iteration")),
                     f"{num(c.get('prefill_accepted'))}/{num(c.get('prefill_drafted'), 1)}"
                     if c.get("prefill_drafted") else "-", num(c.get("ms_per_answer"), 1), ties_cell(c)])
    ref = profile_name(r["reference_profile"]) if r.get("reference_profile") else "no reference profile"
    page.add(f"`modelled` is the cost model at the acceptance and drafts measured here under this run's own timing "
             f"profile; `modelled {ref}` the same under that measured 7B profile, i.e. what these drafters would "
             "give at the real models' costs if they accepted there as here. Draft-length rules: `fixed` configs "
             "always draft gamma tokens, `,expected` ones stop where the calibrated acceptance estimate says "
             "another draft does not pay at this machine's costs.", "")
    page.add("`vs generate` is the same ratio against transformers' `generate` on the same samples; `ties` the "
             "configuration's numeric ties (the target alone's) / the most allowed, the target alone's + "
             f"{tie_rule(r)}, every output checked at every position.", "")
    page.add(markdown_table(["config", "speed-up (measured)", "vs generate", "modelled", f"modelled {ref}",
                             "accepted/iter", "tokens/verify", "drafted/iter", "prefill accepted/drafted", "ms/answer",
                             "ties"], rows))
    lookup = prompt_lookup_text(r)
    if lookup:
        page.add("", lookup)
    a = r.get("assisted")
    if a:
        page.add("", f"Against transformers' assisted generation on a text-only pair ({a['prompts']} prompts): ours "
                 f"{a['ours_tokens_per_s']:.0f} tokens/s, theirs {a['theirs_tokens_per_s']:.0f} tokens/s, "
                 f"ratio {span(a['ours_over_theirs'])}.")
    page.source(f, r["command"])
    page.image(f.with_suffix(".png"), "live benchmark")
    return r


def lossless_text(r: dict[str, Any]) -> str:
    """What the lossless check found: outputs checked, numeric ties, and any configuration over the margin."""
    if not r.get("lossless_checked"):
        return "NOT checked (sampling run)"
    ties = r.get("numeric_tie_count", 0)
    text = (f"{r.get('lossless_outputs_checked')} outputs checked at every position, all equal to the target's "
            f"own greedy output{f' but for {ties} numeric ties' if ties else ''}")
    if r.get("lossless_failures"):
        text += "; FAILED (numeric ties beyond the margin): " + "; ".join(r["lossless_failures"])
    return text


def tie_rule(r: dict[str, Any]) -> str:
    margin = r.get("tie_margin") or {"fraction": 0.01, "minimum": 2}
    return f"max({margin['minimum']}, {margin['fraction']:g} x its checked outputs)"


def ties_cell(c: dict[str, Any]) -> str:
    v = c.get("lossless")
    if not v:
        return "-"
    cell = f"{v['numeric_tie_count']} ({v['target_ties']}) / {v['max_ties']}"
    return cell if v["passed"] else f"{cell} FAILED"


def prompt_lookup_text(r: dict[str, Any]) -> str | None:
    """The prompt-lookup row: transformers' prompt lookup decoding (no trained drafter), the fastest point
    of its grid, beside plain `generate`, the target alone and the best fixed-window trained decoder."""
    grid = [(n, c) for n, c in r["configs"].items() if (c.get("drafting") or {}).get("kind") == "prompt_lookup"]
    if not grid:
        return None
    name, c = max(grid, key=lambda nc: nc[1]["speedup"]["median"])
    ours = [(n, d) for n, d in r["configs"].items() if (d.get("drafting") or {}).get("kind") == "decode"
            and (d.get("drafting") or {}).get("draft_stop", "fixed") == "fixed"]
    best = max(ours, key=lambda nd: nd[1]["speedup"]["median"], default=None)
    text = (f"**prompt_lookup** (transformers' prompt lookup decoding: `generate(..., prompt_lookup_num_tokens=K, "
            f"max_matching_ngram_size=N)`, no trained drafter; {len(grid)} (K, N) points timed, the fastest picked "
            f"on the same runs): `{name}` at {span(c['speedup'])} the target alone and "
            f"{span(c.get('speedup_vs_hf_generate'))} transformers' `generate`, "
            f"{num(c.get('tokens_per_verify'))} tokens per verify pass")
    if best:
        text += (f"; the best trained decoder here, `{best[0]}`, at {span(best[1]['speedup'])} the target alone, "
                 f"{num(best[1].get('tokens_per_verify'))} tokens per verify pass")
    return text + "."


def gap_section(page: Page, live: dict[str, Any], acc: dict, results_dir: Path) -> None:
    page.add("## Offline vs live acceptance", "",
             "The offline figures of the checkpoint the live benchmark ran, beside what the live loop accepted. "
             "For decode drafters the offline figures place iterations where the engine does, on the live "
             "benchmark's own samples: the roll-out feeds the adapter its own outputs (the figure meant to match "
             "live drafting), the one-step figure drafts every position from true states. "
             "Configurations with a draft-length rule draft fewer tokens than the fixed-gamma offline figures "
             "assume, so only fixed-gamma rows are compared.", "")
    rows = []
    same = acceptance_results(results_dir / "acceptance_e2e_samples")
    for name, c in live["configs"].items():
        roles = c.get("drafting") or {}
        kind = roles.get("kind")
        if kind not in ("prefill", "decode") or roles.get("draft_stop", "fixed") != "fixed" or roles.get("tree"):
            continue  # trees: their offline replay is in the draft-tree section
        adapter = roles[kind] or {}
        key = (adapter.get("level"), adapter.get("pairs"))
        entry = acc.get(key)
        if entry is None or not same_file(entry[1].get("checkpoint"), adapter.get("checkpoint")):
            continue  # offline figures of another checkpoint than the one the live run drafted with
        _, r = entry
        same_r = same[key][1] if key in same and same_file(same[key][1].get("checkpoint"),
                                                              adapter.get("checkpoint")) else None
        if kind == "prefill":
            g = live["gamma_prefill"]
            offline = _window(r.get("prefill_free_by_window"), g)
            offline_same = _window(same_r.get("prefill_free_by_window"), g) if same_r else None
            rows.append([name, f"prefill free tokens (window {g})", "-", num(offline), num(offline_same),
                         num(c.get("prefill_accepted")), "-"])
            continue
        g = live["gamma_decode"]
        if r["predicts"] != "next":  # mode c: EventGPT decodes the drafts itself; no offline roll-out
            rows.append([name, f"accepted/iter (gamma {g})", "-", "-", "-", num(c.get("accepted_per_iteration")), "-"])
            continue
        drafting = (same_r or {}).get("drafting") or {}
        one_step = (drafting.get("teacher_forced") or {}).get("live_accepted_per_iteration")
        roll = drafting.get("rollout") or {}
        whole = ((r.get("drafting") or {}).get("rollout") or {}).get("live_accepted_per_iteration")
        offline_same = roll.get("live_accepted_per_iteration") if roll.get("gamma") == g else None
        gap = (c["accepted_per_iteration"] - offline_same
               if offline_same is not None and c.get("accepted_per_iteration") is not None else None)
        rows.append([name, f"accepted/iter (gamma {g})", num(one_step), num(whole), num(offline_same),
                     num(c.get("accepted_per_iteration")), "-" if gap is None else f"{gap:+.2f}"])
    page.add(markdown_table(["live config", "figure", "offline one-step, live samples", "offline, whole test split",
                             "offline, live samples", "live", "live - offline"], rows), "",
             "Decode rows: the offline columns after the first are the roll-out on the live schedule; prefill "
             "rows: free tokens within the window.", "")


def share_of_perfect(run: dict[str, Any], c: dict[str, Any]) -> float | None:
    """A configuration's measured speed-up as a share of its own run's perfect drafter's (synthetic_p1)."""
    perfect = ((run["configs"].get("synthetic_p1") or {}).get("speedup") or {}).get("median")
    return c["speedup"]["median"] / perfect if perfect and c.get("speedup") else None


def decode_section(page: Page, live: dict[str, Any], acc: dict) -> None:
    """The decode drafters side by side: what they accept along the window, what it buys, events or not."""
    page.add("## Decode drafters", "",
             "Every trained decode drafter of the live run: tokens per verify pass (accepted drafts + the "
             "target's own token), the share of iterations whose first k drafts were all accepted, drafts per "
             "iteration, the measured speed-up here, and the cost model's speed-up at these acceptances under "
             "the measured H200 7B profile. B1 reads the target's states only; L5E is B1 plus EventGPT's "
             "prompt-end state (an adapter's price per draft: EventGPT only prefills); L5F adds EventGPT's state "
             "of every drafted position (one EventGPT 7B step per draft, the specification's lockstep); L5 reads "
             "EventGPT's states of the verified text.", "")
    rows = []
    for name, c in live["configs"].items():
        if (c.get("drafting") or {}).get("kind") != "decode" or "tokens_per_verify" not in c:
            continue
        pos = list((c.get("per_position_acceptance") or {}).values())
        rows.append([name, num(c["tokens_per_verify"]), ", ".join(num(v) for v in pos) or "-",
                     num(c.get("drafted_per_iteration")), span(c.get("speedup")), num(share_of_perfect(live, c)),
                     num(c.get("modelled_speedup_reference"))])
    page.add(markdown_table(["config", "tokens/verify", "drafts 1..k all accepted, k = 1..gamma", "drafted/iter",
                             "speed-up here (measured)", "share of the perfect drafter's (synthetic_p1)",
                             "modelled, H200 7B profile"], rows), "")
    eagle3_paragraph(page, live, acc)
    b1, l5e = acc.get(("B1", "teacher_forced")), acc.get(("L5E", "teacher_forced"))
    if b1 and l5e:
        def fig(entry: tuple[Path, dict[str, Any]]) -> float | None:
            return ((entry[1].get("drafting") or {}).get("rollout") or {}).get("live_accepted_per_iteration")

        fb, fe = fig(b1), fig(l5e)
        lb, le = (live_fixed_decode(live, level).get("accepted_per_iteration") for level in ("B1", "L5E"))
        page.add("Do the events add acceptance? L5E and B1 are trained the same way (same data, flags and "
                 f"epochs). Offline roll-out on the whole test split: B1 {num(fb)}, L5E {num(fe)} accepted drafts "
                 f"per iteration ({'-' if fb is None or fe is None else f'{fe - fb:+.2f}'}); live on the benchmark's "
                 f"samples: B1 {num(lb)}, L5E {num(le)} "
                 f"({'-' if lb is None or le is None else f'{le - lb:+.2f}'}).", "")


def eagle3_paragraph(page: Page, live: dict[str, Any], acc: dict) -> None:
    """E3 beside B1: the EAGLE-3 features against the last-layer state, offline (whole test split) and live
    (the benchmark's samples, the same depth), with the training each checkpoint records."""
    b1, e3 = acc.get(("B1", "teacher_forced")), acc.get(("E3", "teacher_forced"))
    if not (b1 and e3):
        return

    def offline(entry: tuple[Path, dict[str, Any]]) -> float | None:
        return ((entry[1].get("drafting") or {}).get("rollout") or {}).get("live_tokens_per_verify")

    def recipe(entry: tuple[Path, dict[str, Any]]) -> str:
        d = (entry[1].get("trained") or {}).get("drafting") or {}
        return (f"{d.get('rollout_steps')}-step roll-out, regression {d.get('regression_weight', 1.0) or 0:g}, "
                f"distillation {d.get('distill_weight') or 0:g}, token loss {d.get('token_loss_weight') or 0:g}")

    lb, le = (live_fixed_decode(live, lv).get("tokens_per_verify") for lv in ("B1", "E3"))
    sb, se = ((live_fixed_decode(live, lv).get("speedup") or {}).get("median") for lv in ("B1", "E3"))
    fb, fe = offline(b1), offline(e3)
    page.add("Does the EAGLE-3 head add acceptance? E3 reads the target's low, middle and high layer states where "
             f"B1 reads its last-layer state; B1 trained with {recipe(b1)}; E3 with {recipe(e3)}. Tokens per verify "
             f"pass, offline roll-out on the whole test split at gamma {e3[1].get('gamma_decode')}: B1 {num(fb)}, E3 "
             f"{num(fe)}; live on the benchmark's samples at gamma {live['gamma_decode']}: B1 {num(lb)}, E3 {num(le)} "
             f"(speed-up here {num(sb)} and {num(se)}).", "")


def depth_section(page: Page, live: dict[str, Any], deep: dict[str, Any] | None, f: Path) -> None:
    """B1 and E3 at the main run's window and at the deeper one of run_pipeline.sh's second live run (DEEP_GAMMA),
    each beside the perfect drafter of its own run: the head's gain at equal depth, and what depth adds."""
    if deep is None:
        return
    rows = []
    for run in (live, deep):
        levels = (d["level"] for c in deep["configs"].values() if (d := (c.get("drafting") or {}).get("decode")))
        for level in dict.fromkeys(levels):  # a level's chain and tree configs name it twice; its row is the chain's
            c = live_fixed_decode(run, level)
            if not c.get("tokens_per_verify"):
                continue
            pos = list((c.get("per_position_acceptance") or {}).values())
            rows.append([level, str(run["gamma_decode"]), num(c["tokens_per_verify"]),
                         ", ".join(num(v) for v in pos) or "-", span(c.get("speedup")),
                         num(share_of_perfect(run, c)), num(c.get("modelled_speedup_reference"))])
    page.add("## Draft depth: the decode heads at two windows", "",
             f"The heads of `{f.parent.name}` drafted again in a second live run at gamma {deep['gamma_decode']} "
             "(fixed windows, the same samples), each run with its own perfect drafter (synthetic_p1): at equal "
             "depth the difference is the head's; between the windows, what depth adds.", "")
    page.add(markdown_table(["level", "gamma", "tokens/verify", "drafts 1..k all accepted", "speed-up here (measured)",
                             "share of the perfect drafter's", "modelled, H200 7B profile"], rows))
    page.source(f, deep["command"])
    page.add("")


def same_file(a: str | None, b: str | None) -> bool:
    """Whether two recorded paths name one file (one may be relative to this folder, the other absolute)."""
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def live_fixed_decode(live: dict[str, Any], level: str) -> dict[str, Any]:
    """The live result of the fixed-window decode configuration of `level`, found by what it drafted with."""
    return next((c for c in live["configs"].values() if (d := c.get("drafting") or {}).get("kind") == "decode"
                 and d.get("draft_stop") == "fixed" and not d.get("tree")
                 and (d.get("decode") or {}).get("level") == level), {})


def tree_section(page: Page, live: dict[str, Any], results_dir: Path) -> None:
    """Each roll-out head's draft tree beside its chain, from one live run (same adapter, same samples), with
    the offline replay of the live schedule on the same samples (measure_feature_acceptance --tree_budget)."""
    trees = [(n, c) for n, c in live["configs"].items() if c.get("chain") in live["configs"]]
    if not trees:
        return
    same = acceptance_results(results_dir / "acceptance_e2e_samples")

    def replay(t: dict[str, Any], which: str) -> str:
        adapter = t["drafting"]["decode"] or {}
        entry = same.get((adapter.get("level"), adapter.get("pairs")))
        if entry is None or not same_file(entry[1].get("checkpoint"), adapter.get("checkpoint")):
            return "-"
        rep = entry[1].get("schedule_replay") or {}
        if rep.get("tree_spec") != t["drafting"]["tree"]:
            return "-"  # replayed with another tree (or none)
        return num((rep.get(which) or {}).get("tokens_per_verify"))
    page.add("## Draft trees beside chains (measured, live)", "",
             "Each roll-out head drafts a dynamic tree (docs/LIVE_DECODING.md, draft trees): per depth the best "
             "f frontier nodes by cumulative log-probability are expanded in one batched adapter step into their k "
             "likeliest tokens (f1: the greedy chain with each depth's runners-up as leaves), then the best "
             "n nodes are verified in one target pass with an ancestor mask, and the accepted path is compacted in "
             "the cache. `by depth`: share of iterations whose accepted path reached depth 1, 2, ...; `tree/chain`: "
             "the chain's time per token over the tree's on the same samples, median (min-max) over repeats; "
             "`offline replay`: the live schedule replayed on the recorded answers of the same samples "
             "(tokens/verify, chain / tree); every greedy output checked equal to the target's.", "")
    rows = []
    for name, t in trees:
        c, shape = live["configs"][t["chain"]], t["drafting"]["tree"]
        rows.append([f"{t['chain']} / {name}", tree_shape(shape),
                     num(t.get("nodes_per_verify"), 1),
                     f"{num(c.get('tokens_per_verify'))} / {num(t.get('tokens_per_verify'))}",
                     f"{replay(t, 'chain')} / {replay(t, 'tree')}",
                     ", ".join(num(v) for v in (c.get("per_position_acceptance") or {}).values()),
                     ", ".join(num(v) for v in (t.get("per_position_acceptance") or {}).values()),
                     f"{span(c.get('speedup'))} / {span(t.get('speedup'))}", span(t.get("tree_over_chain")),
                     f"{num(c.get('modelled_speedup_reference'))} / {num(t.get('modelled_speedup_reference'))}"])
    ref = profile_name(live["reference_profile"]) if live.get("reference_profile") else "no reference profile"
    page.add(markdown_table(["chain / tree", "tree shape", "nodes/verify", "tokens/verify",
                             "offline replay, same samples", "by depth (chain)",
                             "by depth (tree)", "speed-up here", "tree/chain", f"modelled {ref}"], rows), "")


def _window(values: list[float] | None, g: int) -> float | None:
    """values[i] is the figure for window i + 1 (measure_feature_acceptance's *_by_window / *_by_gamma lists)."""
    if not values:
        return None
    return values[min(g, len(values)) - 1]


def benchmarks_section(page: Page, results_dir: Path) -> None:
    page.add("## Stage benchmarks", "")
    ext = results_dir / "extraction_benchmark.json"
    if ext.is_file():
        r = read_json(ext, "extraction benchmark", "rerun benchmark_extraction.py")
        sp = r.get("speedup") or {}
        eq = r.get("equality", {})
        page.add(f"Extraction, batched vs the reference's one-by-one loop: {span(sp)} on {r.get('device', '?')}, "
                 f"{r.get('num_samples')} samples; outputs {'equal' if eq.get('passed') else 'NOT equal'} "
                 f"({eq.get('samples_with_equal_tokens')}/{eq.get('samples')} token-equal, largest hidden-state "
                 f"difference {eq.get('hidden_max_abs_diff')}).")
        page.source(ext)
    lat = results_dir / "adapter_latency.json"
    if lat.is_file():
        page.add(f"Adapter latency per level: `{page.rel(lat)}`.", "")


def main(args: argparse.Namespace) -> Path:
    results_dir, tasks_dir, data_dir = Path(args.results_dir), Path(args.tasks_dir), Path(args.data_dir)
    out = Path(args.output) if args.output else results_dir / "RESULTS.md"
    page = Page(out)
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page.add(f"# Results: {args.world}", "",
             f"Generated by `write_results.py` on {now} from the files of this run: data `{data_dir}`, adapters "
             f"`{tasks_dir}`, results `{results_dir}`. Nothing on this page is typed by hand; rerun "
             "`bash run_pipeline.sh` to regenerate it.", "")
    # level, pairing from best_model.pt; the finished runs only, as run_all_eval.sh and the pipeline choose them
    runs = {key: run.folder for key, run in newest_runs(tasks_dir, only_finished=True)[0].items()}
    acc = acceptance_results(results_dir / "acceptance")
    live = read_json(results_dir / "e2e" / "e2e_wallclock.json", "live benchmark result",
                     "run benchmark_e2e_wallclock.py (run_pipeline.sh stage 9) first")
    if live.get("format_version", 1) < 2:  # before each configuration recorded its adapters (`drafting`)
        raise UserError(f"{results_dir / 'e2e' / 'e2e_wallclock.json'} was written by an older release; rerun the "
                        "live benchmark (FORCE=1 bash run_pipeline.sh, or benchmark_e2e_wallclock.py)")
    trained = [(k, c) for k, c in live["configs"].items() if c.get("speedup")
               and (c.get("drafting") or {}).get("kind") in ("prefill", "decode", "two_phase")]
    best = max(trained, key=lambda kc: kc[1]["speedup"]["median"], default=None)
    if best:
        page.add(f"**Headline (measured, live):** best trained configuration `{best[0]}` ran at "
                 f"{span(best[1]['speedup'])} the speed of the target alone on {live['device']}; lossless check: "
                 f"{lossless_text(live)}.", "")
    decoders = [(k, c) for k, c in trained if c["drafting"]["kind"] == "decode"
                and c["drafting"].get("draft_stop") == "fixed" and c.get("tokens_per_verify")]
    top = max(decoders, key=lambda kc: kc[1]["tokens_per_verify"], default=None)
    if top:
        pos = list((top[1].get("per_position_acceptance") or {}).values())
        third = f"{pos[2]:.2f}" if len(pos) > 2 else "-"
        modelled = max(trained, key=lambda kc: kc[1].get("modelled_speedup_reference") or 0)
        page.add(f"**Best decode drafter (live, gamma {live['gamma_decode']}):** `{top[0]}` at "
                 f"{top[1]['tokens_per_verify']:.2f} tokens per verify pass, its first three drafts all accepted in "
                 f"{third} of iterations. Under the measured H200 7B profile the best trained configuration, "
                 f"`{modelled[0]}`, is modelled at {num(modelled[1].get('modelled_speedup_reference'))}x.", "")
    deep_file = results_dir / "e2e_deep" / "e2e_wallclock.json"  # run_pipeline.sh's second live run (DEEP_GAMMA)
    deep = (read_json(deep_file, "live benchmark result", "rerun run_pipeline.sh (DEEP_GAMMA)")
            if deep_file.is_file() else None)
    if deep:
        heads = [(k, c) for k, c in deep["configs"].items() if (c.get("drafting") or {}).get("kind") == "decode"
                 and c.get("tokens_per_verify")]
        best_deep = max(heads, key=lambda kc: kc[1]["tokens_per_verify"], default=None)
        share = share_of_perfect(deep, best_deep[1]) if best_deep else None
        if share is not None:
            c = best_deep[1]
            page.add(f"**At gamma {deep['gamma_decode']} (the second live run, \"Draft depth\"):** `{best_deep[0]}` at "
                     f"{c['tokens_per_verify']:.2f} tokens per verify pass, {span(c['speedup'])} the target alone, "
                     f"{share:.2f} of the perfect drafter's speed-up in that run; "
                     f"modelled under the H200 7B profile at {num(c.get('modelled_speedup_reference'))}x.", "")
    lookup = prompt_lookup_text(live)
    if lookup:
        page.add(lookup, "")
    data_section(page, data_dir)
    adapter_section(page, runs, acc)
    pairing_section(page, acc)
    training_section(page, runs)
    two_phase_section(page, results_dir, args.world)
    live_section(page, results_dir)
    decode_section(page, live, acc)
    tree_section(page, live, results_dir)
    depth_section(page, live, deep, deep_file)
    gap_section(page, live, acc, results_dir)
    benchmarks_section(page, results_dir)
    atomic_write_bytes(("\n".join(page.lines).rstrip() + "\n").encode(), out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main, parse_args)
