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
import re
from pathlib import Path
from typing import Any

from common import UserError, atomic_write_bytes, markdown_table, read_json, run_cli
from hidden_adapter import ADAPTER_NAMES, count_parameters, load_adapter

RUN_NAME = re.compile(r"^(L1|L2|L3|L4|L5|B1|L5F)_(free|teacher_forced)_(\d{8}_\d{6})$")
PAIRINGS = ("free", "teacher_forced")
TAUS = ("0.80", "0.85", "0.90", "0.95")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="toy", help="name of the run (toy, dsec, ...): the page's title")
    p.add_argument("--data_dir", default="data/toy",
                   help="folder holding hidden/{train,val,test} (and models/ for the toy)")
    p.add_argument("--tasks_dir", default="tasks/toy", help="training runs, {LEVEL}_{pairs}_{timestamp}/")
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


def newest_runs(tasks_dir: Path) -> dict[tuple[str, str], Path]:
    """(level, pairing) -> newest run folder with a best_model.pt (timestamps in names sort lexically)."""
    runs: dict[tuple[str, str], Path] = {}
    for d in sorted(tasks_dir.glob("*")):
        m = RUN_NAME.match(d.name)
        if m and (d / "best_model.pt").is_file():
            runs[(m.group(1), m.group(2))] = d
    return runs


def training_facts(run: Path) -> dict[str, Any]:
    """Parameters, epochs and the selected epoch's validation scores of one run."""
    adapter, extra = load_adapter(run / "best_model.pt")
    history = read_json(run / "history.json", "training history", "rerun train_hidden_adapter.py")["history"]
    best = next((h for h in reversed(history) if h.get("best")), history[-1])
    return {"params": count_parameters(adapter), "epochs": len(history), "best_epoch": best["epoch"],
            "val": best["val"], "loss_mix": extra.get("loss_mix"), "predicts": adapter.predicts}


def acceptance_results(results_dir: Path) -> dict[tuple[str, str], tuple[Path, dict[str, Any]]]:
    out = {}
    for f in sorted(results_dir.glob("acceptance/*/acceptance_metrics.json")):
        r = read_json(f, "acceptance result", "rerun run_all_eval.sh")
        if r.get("input_states", "trained") == "trained":
            out[(r["level"], r["pairs"])] = (f, r)
    return out


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
             "(L5, B1, L5F) are scored on output t vs target token t+1: `accepted/iter` is the mean number of "
             "drafts accepted per decode iteration (gamma as stated), without the bonus token, from a "
             "teacher-forced one-step prediction (an upper estimate of a live roll-out).", "")
    header = ["level", "pairs", "params", "epochs (best)", "token top-1", "free tokens", "shifted top-1",
              "accepted/iter", "cos", *[f"Accept@{t}" for t in TAUS], "run"]
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
            rows.append([level, pairs, f"{facts.get('params', 0):,}" if facts else "-",
                         f"{facts['epochs']} ({facts['best_epoch']})" if facts else "-",
                         pct(m.get("token_top1")), num(m.get("prefill_free")), pct(m.get("shifted_top1")),
                         num(m.get("accept_len")), num(m.get("cos_mean"), 3),
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
    del runs  # the runs are named in the rows; training curves follow in their own section


def pairing_section(page: Page, acc: dict) -> None:
    page.add("## Free pairs vs teacher-forced pairs", "",
             "The same level trained and scored on EventGPT's states over its own answer (free) or over the "
             "target's answer (teacher-forced, what the drafter sees after each verification). The key token "
             "figure is same-position top-1 for L1-L4 and shifted top-1 for L5, B1, L5F.", "")
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
        rows.append([level, pairs, str(f["epochs"]), str(f["best_epoch"]), num(v.get("loss"), 4), pct(token),
                     pct(v.get("accept@0.90")), str(f["loss_mix"] or "-"), f"`{run.name}`"])
    page.add(markdown_table(["level", "pairs", "epochs", "best epoch", "val loss", "val token top-1",
                             "val Accept@0.90", "loss mix", "run"], rows))
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
        rows.append([name, span(c.get("speedup")), num(c.get("modelled_speedup")),
                     num(c.get("accepted_per_iteration")), num(c.get("tokens_per_verify")),
                     f"{num(c.get('prefill_accepted'))}/{num(c.get('prefill_drafted'), 1)}"
                     if c.get("prefill_drafted") else "-", num(c.get("ms_per_answer"), 1)])
    page.add(markdown_table(["config", "speed-up (measured)", "modelled", "accepted/iter", "tokens/verify",
                             "prefill accepted/drafted", "ms/answer"], rows))
    a = r.get("assisted")
    if a:
        page.add("", f"Against transformers' assisted generation on a text-only pair ({a['prompts']} prompts): ours "
                 f"{a['ours_tokens_per_s']:.0f} tokens/s, theirs {a['theirs_tokens_per_s']:.0f} tokens/s, "
                 f"ratio {span(a['ours_over_theirs'])}.")
    page.source(f, r["command"])
    page.image(f.with_suffix(".png"), "live benchmark")
    return r


def lossless_text(r: dict[str, Any]) -> str:
    checked = r.get("lossless_outputs_checked")
    if checked is not None:
        return f"{checked} outputs checked, all equal" if r.get("lossless_checked") else "a mismatch was found"
    return "all equal" if r.get("lossless_checked") else "NOT checked (sampling run)"


def gap_section(page: Page, live: dict[str, Any], acc: dict, results_dir: Path) -> None:
    page.add("## Offline vs live acceptance", "",
             "The offline figure of the checkpoint the live benchmark ran, beside what the live loop accepted. "
             "Offline decode acceptance is a teacher-forced one-step prediction; live drafts roll out on the "
             "adapter's own outputs (or EventGPT's states on the accepted text), so the two can differ.", "")
    rows = []
    same = results_dir / "acceptance_e2e_samples"
    for name, c in live["configs"].items():
        m = re.match(r"^(decode|prefill)\[(\w+)\]$", name)
        if not m:
            continue
        kind, level = m.groups()
        pairs = "free" if kind == "prefill" else "teacher_forced"
        entry = acc.get((level, pairs))
        if entry is None:
            continue
        _, r = entry
        same_file = same / f"{level}_{pairs}" / "acceptance_metrics.json"
        same_r = read_json(same_file, "acceptance result", "rerun run_pipeline.sh") if same_file.is_file() else None
        if kind == "prefill":
            g = live["gamma_prefill"]
            offline = _window(r.get("prefill_free_by_window"), g)
            offline_same = _window(same_r.get("prefill_free_by_window"), g) if same_r else None
            rows.append([name, f"prefill free tokens (window {g})", num(offline), num(offline_same),
                         num(c.get("prefill_accepted"))])
        else:
            g = live["gamma_decode"]
            key = "shifted" if r["predicts"] == "next" else "same-position"
            offline = _window(r.get("accept_len_by_gamma"), g) if r["predicts"] == "next" else None
            offline_same = (_window(same_r.get("accept_len_by_gamma"), g)
                            if same_r and same_r["predicts"] == "next" else None)
            rows.append([name, f"accepted/iter ({key}, gamma {g})", num(offline), num(offline_same),
                         num(c.get("accepted_per_iteration"))])
    page.add(markdown_table(["live config", "figure", "offline, whole test split", "offline, the live samples",
                             "live"], rows), "")


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
    runs = newest_runs(tasks_dir)
    acc = acceptance_results(results_dir)
    live = read_json(results_dir / "e2e" / "e2e_wallclock.json", "live benchmark result",
                     "run benchmark_e2e_wallclock.py (run_pipeline.sh stage 9) first")
    best = max(((k, c) for k, c in live["configs"].items() if c.get("speedup") and not k.startswith("synthetic")
                and k not in ("target", "hf_generate")), key=lambda kc: kc[1]["speedup"]["median"], default=None)
    if best:
        page.add(f"**Headline (measured, live):** best trained configuration `{best[0]}` ran at "
                 f"{span(best[1]['speedup'])} the speed of the target alone on {live['device']}; lossless check: "
                 f"{lossless_text(live)}.", "")
    data_section(page, data_dir)
    adapter_section(page, runs, acc)
    pairing_section(page, acc)
    training_section(page, runs)
    two_phase_section(page, results_dir, args.world)
    live_section(page, results_dir)
    gap_section(page, live, acc, results_dir)
    benchmarks_section(page, results_dir)
    atomic_write_bytes(("\n".join(page.lines).rstrip() + "\n").encode(), out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main, parse_args)
