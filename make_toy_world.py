"""Write the toy world: a synthetic DSEC-like data set plus tiny EventGPT and Video-LLaVA checkpoints
in the real formats, briefly trained on CPU so that their answers depend on the scene.

    python make_toy_world.py --output_dir data/toy            # a few minutes on 2 CPU cores
    python make_toy_world.py --output_dir /tmp/t --quick      # seconds: tiny data, few steps (tests)

Writes
    DIR/dataset/       event .npy + mp4 per clip, index.json per split, questions.json (toy_dataset.py)
    DIR/models/eventgpt/       EventGPT release layout (model_type EventChat_llama)
    DIR/models/video_llava/    transformers' VideoLlavaForConditionalGeneration + processor
    DIR/models/toy_world.json  settings, training losses, and how often the two models agree
    DIR/dsec/          with --layout dsec: the same scenes as DSEC recordings (docs/TOY_WORLD.md)

    python make_toy_world.py --layout dsec --output_dir data/toy_dsec   # then prepare_dsec_index.py --dsec_root

How the pair is made (it should behave like EventGPT and Video-LLaVA, which both descend from
Vicuna-7B): one small Llama is pre-trained on the toy world's text (questions, answers, captions);
both VLMs start from it (EventGPT's copy slightly perturbed), then each language model is
fine-tuned on its own modality (one event frame / eight video frames) to answer the toy questions,
with its random vision tower and projector frozen. Events carry no colour, so the drafter gets
colour words wrong while motion and shape words often agree: it agrees with the target often but
not always. Everything is seeded and single-process, so the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import add_config_flag, alias_help, parse_with_config, run_cli
from common import UserError, atomic_write_json, markdown_table, read_json, set_seed

log = logging.getLogger("xmodal_sd.toy")
WORLD_VERSION = 3  # 2: the loop check covers both models' answers; 3: answers of 30-50 tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output_dir", "--output", dest="output_dir", required=True,
                   help=alias_help("folder of the toy world (e.g. data/toy)", "--output"))
    p.add_argument("--layout", choices=("clips", "dsec"), default="clips",
                   help="clips: the toy data set only (DIR/dataset); dsec: also its recordings in DSEC's native "
                        "layout under DIR/dsec (events.h5, rectify_map.h5, rectified PNGs, timestamps), the input "
                        "of prepare_dsec_index.py --dsec_root")
    p.add_argument("--seed", type=int, default=0, help="seed of everything: data, weights, training order")
    p.add_argument(
        "--quick", action="store_true", help="tiny data set and few training steps (for tests; answers are poor)"
    )
    p.add_argument("--hidden_size", type=int, default=64, help="width of both toy language models")
    p.add_argument("--num_layers", type=int, default=2, help="decoder layers of both toy language models")
    p.add_argument("--pretrain_steps", type=int, default=None, help="text pre-training steps of the shared base")
    p.add_argument("--finetune_steps", type=int, default=None, help="fine-tuning steps of each VLM on its modality")
    p.add_argument("--batch_size", type=int, default=16, help="training batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (cosine decay)")
    p.add_argument(
        "--perturbation", type=float, default=0.05, help="EventGPT's base copy = base + this x (per-tensor std) x noise"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed, so results are repeatable)")
    p.add_argument("--overwrite", action="store_true", help="retrain the models even if they are up to date")
    add_config_flag(p)
    args = parse_with_config(p, argv)
    quick = args.quick
    args.pretrain_steps = args.pretrain_steps if args.pretrain_steps is not None else (20 if quick else 600)
    args.finetune_steps = args.finetune_steps if args.finetune_steps is not None else (10 if quick else 800)
    if min(args.pretrain_steps, args.finetune_steps) < 0 or args.batch_size < 1:
        p.error("steps must be >= 0 and --batch_size >= 1")
    if args.hidden_size < 16 or args.hidden_size % 16 or args.num_layers < 1 or args.threads < 1:
        p.error("--hidden_size must be a positive multiple of 16 (heads of 16); --num_layers, --threads >= 1")
    args.output_dir = Path(args.output_dir)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        p.error(f"--output_dir {args.output_dir} is a file, not a folder")
    return args


def dataset_settings(quick: bool) -> dict[str, Any]:
    """Sizes of the generated data set (`--quick`: one sequence per split, three clips each)."""
    # The full world needs a few hundred training clips: with fewer, the toy Video-LLaVA memorises
    # its training scenes and answers unseen ones with word salad.
    if quick:
        return {"num_sequences": (1, 1, 1), "clips_per_sequence": 3}
    return {"num_sequences": (20, 3, 3), "clips_per_sequence": 12}


# ----------------------------------------------------------------------------- text side


def qa_texts(metas: list[dict], questions: list[str]) -> list[tuple[str, str]]:
    """(question, reference answer) for every scene and question."""
    from toy_dataset import scene_answer

    return [(q, scene_answer(m, q)) for m in metas for q in questions]


def pretrain_base(
    llm: Any, tokenizer: Any, texts: list[str], steps: int, batch_size: int, lr: float, rng: random.Random
) -> list[float]:
    """Causal-LM pre-training of the shared base on plain text; returns the loss curve."""
    llm.train().requires_grad_(True)
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    losses = []
    for _ in tqdm(range(steps), desc="pre-train base LM", unit="step", disable=None):
        batch = [texts[rng.randrange(len(texts))] + tokenizer.eos_token for _ in range(batch_size)]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        out = llm(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    llm.eval().requires_grad_(False)
    return losses


def perturbed(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A copy of `state` with Gaussian noise of `scale` x each tensor's std (the drafter's start)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sorted(state.items()):
        noise = torch.randn(v.shape, generator=gen)
        out[k] = v + scale * (v.float().std() if v.numel() > 1 else 0.0) * noise
    return out


# ----------------------------------------------------------------------------- visual side


def first_event_frame(split_dir: Path, clip: dict) -> np.ndarray:
    """The first of 5 event frames, exactly as preprocess_event_images.py renders it by default (the
    EventGPT release's rule: equal event counts per slice, canvas up to the slice's last row/column)."""
    from clip_data import read_clip_events
    from event_frames import render_event_frames

    ev = read_clip_events(split_dir, clip, allow_pickle=True)  # our own file
    frames = render_event_frames(ev["x"], ev["y"], ev["t"], ev["p"], num_frames=5, height=clip["height"],
                                 width=clip["width"])
    return frames[0]


def embed_clip_from_sources(runner: Any, split_dir: Path, clip: dict) -> torch.Tensor:
    """A clip's visual embeddings while the world is being built: EventGPT's event frame is rendered in
    memory from the event file (its PNG does not exist yet), Video-LLaVA reads the mp4 as usual."""
    if runner.name == "eventgpt":
        return runner.encode_event_images([first_event_frame(split_dir, clip)])
    return runner.clip_features(split_dir, clip)


def finetune_vlm(
    runner: Any,
    samples: list[tuple[torch.Tensor, str, str]],
    steps: int,
    batch_size: int,
    lr: float,
    rng: random.Random,
) -> list[float]:
    """Teacher-forced answer loss through the runner's own prompt building; trains the language model
    (decoder + LM head), keeps the visual front end frozen. Returns the loss curve."""
    params = [*runner.decoder.parameters(), *runner.lm_head.parameters()]
    for prm in params:
        prm.requires_grad_(True)
    runner.decoder.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    tok, eos = runner.tokenizer, runner.eos_token_id
    losses = []
    for _ in tqdm(range(steps), desc=f"fine-tune {runner.name}", unit="step", disable=None):
        batch = [samples[rng.randrange(len(samples))] for _ in range(batch_size)]
        prompt = runner.build_inputs([f for f, _, _ in batch], [q for _, q, _ in batch])
        answers = [[*tok(" " + a, add_special_tokens=False).input_ids, eos] for _, _, a in batch]
        length = max(map(len, answers))
        ids = torch.full((len(batch), length), runner.pad_token_id, dtype=torch.long)
        amask = torch.zeros(len(batch), length, dtype=torch.long)
        for i, a in enumerate(answers):
            ids[i, : len(a)] = torch.tensor(a)
            amask[i, : len(a)] = 1
        embeds = torch.cat([prompt.inputs_embeds, runner.embed_ids(ids)], dim=1)
        mask = torch.cat([prompt.attention_mask, amask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = runner.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        plen = prompt.inputs_embeds.shape[1]
        logits = runner.lm_head(hidden[:, plen - 1 : plen - 1 + length]).float()
        labels = ids.masked_fill(amask == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    runner.decoder.eval()
    for prm in params:
        prm.requires_grad_(False)
    return losses


def save_eventgpt_llm(ckpt_dir: Path, llm: Any) -> None:
    """Replace the language-model tensors of an EventGPT release checkpoint (vision keys untouched)."""
    from safetensors.torch import load_file, save_file

    path = ckpt_dir / "model.safetensors"
    tensors = load_file(str(path))
    for key, value in llm.state_dict().items():
        if key not in tensors:
            raise RuntimeError(f"trained key {key} is not in {path}")
        tensors[key] = value.detach().to(torch.float32).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file({k: tensors[k] for k in sorted(tensors)}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- agreement report


def looping(tokens: torch.Tensor) -> bool:
    """An answer stuck in a loop: one token fills more than half of its (>= 4) positions."""
    n = int(tokens.numel())
    return n >= 4 and int(torch.bincount(tokens.long()).max()) * 2 > n


def answer_rows(
    egpt: Any, vl: Any, split_dir: Path, clips: list[dict], questions: list[str], max_new_tokens: int = 50
) -> tuple[list[dict[str, Any]], int]:
    """Greedy answers of both models on every (clip, question), plus the drafter's teacher-forced guesses.

    Returns (rows, foreign): a row holds the clip id, question, reference answer, both decoded answers
    and three token lists: `vl_tokens` (the target's answer up to and including EOS), `egpt_tokens`
    (the drafter's own answer, likewise) and `tf_tokens` (the drafter's next-token guess at each of the
    target's positions, given the target's prefix: what speculative decoding would accept).
    `foreign` counts target tokens the drafter's vocabulary lacks (fed to it as id 0).
    """
    from toy_dataset import scene_answer
    from vlm_runners import to_drafter_vocab

    rows, foreign = [], 0
    for clip in tqdm(clips, desc="agreement", unit="clip", disable=None):
        ei = egpt.build_inputs([embed_clip_from_sources(egpt, split_dir, clip)] * len(questions), questions)
        vi = vl.build_inputs([embed_clip_from_sources(vl, split_dir, clip)] * len(questions), questions)
        ge, gv = egpt.generate(ei, max_new_tokens), vl.generate(vi, max_new_tokens)
        tf_input, n_foreign = to_drafter_vocab(gv.tokens, egpt.vocab_size, gv.mask)
        foreign += n_foreign
        tf_pred = (egpt.teacher_forced_hidden(ei, tf_input, gv.mask) @ egpt.lm_head_weight().T).argmax(-1)
        for i, q in enumerate(questions):
            vt, et = gv.tokens[i, gv.mask[i]], ge.tokens[i, ge.mask[i]]
            rows.append({
                "clip": clip["id"],
                "question": q,
                "ref": scene_answer(clip["meta"], q),
                "vl": vl.tokenizer.decode(vt, skip_special_tokens=True).strip(),
                "egpt": egpt.tokenizer.decode(et, skip_special_tokens=True).strip(),
                "vl_tokens": vt.tolist(),
                "egpt_tokens": et.tolist(),
                "tf_tokens": tf_pred[i, gv.mask[i]].tolist(),
            })
    return rows, foreign


def summarise_answers(rows: list[dict[str, Any]], foreign: int = 0) -> dict[str, Any]:
    """Agreement statistics over `answer_rows` rows; every fraction is a mean over samples.

    token_agreement_free_running: per sample, the share of the target's positions at which the
    drafter's own answer has the same token (positions past the drafter's answer disagree).
    token_agreement_teacher_forced: per sample, the share of the target's positions the drafter
    guesses right from the target's prefix. *_exact_match_reference / identical_answers compare
    decoded text; degenerate fractions count answers stuck in a loop (`looping`).
    """
    per_row = []
    for r in rows:
        vt, et, tf = r["vl_tokens"], r["egpt_tokens"], r["tf_tokens"]
        n = len(vt)
        per_row.append({
            "free_agree": sum(a == b for a, b in zip(vt, et, strict=False)) / n if n else 0.0,
            "tf_agree": sum(a == b for a, b in zip(vt, tf, strict=True)) / n if n else 0.0,
            "degenerate": looping(torch.tensor(vt)),
            "egpt_degenerate": looping(torch.tensor(et)),
        })
    n = max(len(rows), 1)
    examples = [{k: r[k] for k in ("clip", "question", "ref", "vl", "egpt")} | p
                for r, p in zip(rows, per_row, strict=True)][:: max(1, len(rows) // 6)][:6]
    return {
        "samples": len(rows),
        "distinct_vl_answers": len({r["vl"] for r in rows}),
        "distinct_egpt_answers": len({r["egpt"] for r in rows}),
        "degenerate_fraction": sum(p["degenerate"] for p in per_row) / n,
        "egpt_degenerate_fraction": sum(p["egpt_degenerate"] for p in per_row) / n,
        "vl_exact_match_reference": sum(r["vl"] == r["ref"] for r in rows) / n,
        "egpt_exact_match_reference": sum(r["egpt"] == r["ref"] for r in rows) / n,
        "token_agreement_free_running": sum(p["free_agree"] for p in per_row) / n,
        "token_agreement_teacher_forced": sum(p["tf_agree"] for p in per_row) / n,
        "identical_answers": sum(r["vl"] == r["egpt"] for r in rows) / n,
        "tf_tokens_outside_drafter_vocab": foreign,
        "examples": examples,
    }


def answer_stats(
    egpt: Any, vl: Any, split_dir: Path, clips: list[dict], questions: list[str], max_new_tokens: int = 50
) -> dict[str, Any]:
    """Greedy answers of both models on every (clip, question): degeneracy, accuracy and agreement."""
    return summarise_answers(*answer_rows(egpt, vl, split_dir, clips, questions, max_new_tokens))


# ----------------------------------------------------------------------------- main


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "seed",
        "quick",
        "hidden_size",
        "num_layers",
        "pretrain_steps",
        "finetune_steps",
        "batch_size",
        "lr",
        "perturbation",
        "threads",
    )
    return {"world_version": WORLD_VERSION, **{k: getattr(args, k) for k in keys}}


def build_models(args: argparse.Namespace, data_dir: Path, models_dir: Path) -> dict[str, Any]:
    from clip_data import load_index, load_questions
    from model_builders import build_toy_tokenizer, load_eventgpt, load_video_llava
    from toy_dataset import scene_description, toy_text_corpus
    from toy_models import ToyDims, make_base_llm, write_eventgpt_checkpoint, write_video_llava_checkpoint

    rng = random.Random(args.seed)
    questions = load_questions(data_dir)
    train = load_index(data_dir, "train")
    metas = [c["meta"] for c in train]
    corpus = toy_text_corpus(seed=args.seed)
    tokenizer = build_toy_tokenizer(corpus)
    heads = max(1, args.hidden_size // 16)
    dims = ToyDims(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=heads,
                   intermediate_size=2 * args.hidden_size)

    texts = [f"USER: {q} ASSISTANT: {a}" for q, a in qa_texts(metas, questions)]
    texts += [scene_description(m) for m in metas] + corpus[:2000]
    base = make_base_llm(tokenizer, dims, seed=args.seed)
    pre_losses = pretrain_base(base, tokenizer, texts, args.pretrain_steps, args.batch_size * 2, args.lr, rng)

    tmp = {name: models_dir / f".{name}.tmp" for name in ("eventgpt", "video_llava")}
    for d in tmp.values():
        shutil.rmtree(d, ignore_errors=True)
    base_state = base.state_dict()
    write_video_llava_checkpoint(tmp["video_llava"], base_state, tokenizer, dims, seed=args.seed)
    write_eventgpt_checkpoint(
        tmp["eventgpt"], perturbed(base_state, args.perturbation, args.seed + 7), tokenizer, dims, seed=args.seed
    )

    runners = {
        "eventgpt": load_eventgpt(tmp["eventgpt"], device="cpu", dtype="fp32"),
        "video_llava": load_video_llava(tmp["video_llava"], device="cpu", dtype="fp32"),
    }
    split_dir = data_dir / "train"
    losses = {"pretrain": pre_losses}
    for name, runner in runners.items():
        feats = [embed_clip_from_sources(runner, split_dir, c) for c in train]
        samples = [(f, q, a) for f, c in zip(feats, train, strict=True) for q, a in qa_texts([c["meta"]], questions)]
        losses[name] = finetune_vlm(runner, samples, args.finetune_steps, args.batch_size, args.lr, rng)
    runners["video_llava"].model.save_pretrained(tmp["video_llava"])
    save_eventgpt_llm(tmp["eventgpt"], runners["eventgpt"].llm)
    for name, d in tmp.items():
        final = models_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(d, final)
    return {
        "losses": {
            k: {"first": v[0] if v else None, "last": float(np.mean(v[-10:])) if v else None} for k, v in losses.items()
        },
        "tokenizer_vocab": len(tokenizer),
        "questions": questions,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    from clip_data import load_index, load_questions
    from model_builders import load_eventgpt, load_video_llava
    from toy_dataset import write_dsec_layout, write_toy_dataset

    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    start = time.perf_counter()
    out = args.output_dir
    data_dir, models_dir = out / "dataset", out / "models"
    summary = write_toy_dataset(data_dir, seed=args.seed, progress=True, **dataset_settings(args.quick))
    if args.layout == "dsec":
        write_dsec_layout(data_dir, out / "dsec")
    models_dir.mkdir(parents=True, exist_ok=True)
    report_path = models_dir / "toy_world.json"
    want = settings(args)
    report = read_json(report_path, "toy world report", "rerun with --overwrite") if report_path.is_file() else None
    up_to_date = (
        report is not None
        and report.get("settings") == want
        and not args.overwrite
        and all((models_dir / n / "config.json").is_file() for n in ("eventgpt", "video_llava"))
    )
    if up_to_date:
        log.info("models in %s are up to date (same settings); pass --overwrite to retrain", models_dir)
    else:
        trained = build_models(args, data_dir, models_dir)
        # Reload from disk: the report describes the files, through the loaders every stage uses.
        egpt = load_eventgpt(models_dir / "eventgpt", device="cpu", dtype="fp32")
        vl = load_video_llava(models_dir / "video_llava", device="cpu", dtype="fp32")
        split = "test" if load_index(data_dir, "test") else "train"
        stats = answer_stats(egpt, vl, data_dir / split, load_index(data_dir, split), load_questions(data_dir))
        report = {
            "settings": want,
            "dataset": {k: summary[k] for k in ("clips_total", "events_total", "codec")},
            "training": trained,
            "agreement_split": split,
            "agreement": stats,
        }
        degenerate = (max(stats["degenerate_fraction"], stats["egpt_degenerate_fraction"]) > 0.1
                      or min(stats["distinct_vl_answers"], stats["distinct_egpt_answers"]) < 3)
        if degenerate and args.quick:
            log.warning("--quick models give degenerate answers (expected with so few steps)")
        elif degenerate:
            atomic_write_json(report, report_path.with_suffix(".failed.json"))
            raise UserError(
                f"toy answers are degenerate (distinct: {stats['distinct_vl_answers']} Video-LLaVA, "
                f"{stats['distinct_egpt_answers']} EventGPT; loops: {stats['degenerate_fraction']:.0%}, "
                f"{stats['egpt_degenerate_fraction']:.0%}); train longer "
                "(--finetune_steps) and see toy_world.failed.json"
            )
        atomic_write_json(report, report_path)
    stats = report["agreement"]
    rows = [
        [k, f"{stats[k]:.3f}" if isinstance(stats[k], float) else str(stats[k])]
        for k in (
            "samples",
            "distinct_vl_answers",
            "distinct_egpt_answers",
            "degenerate_fraction",
            "egpt_degenerate_fraction",
            "vl_exact_match_reference",
            "egpt_exact_match_reference",
            "token_agreement_free_running",
            "token_agreement_teacher_forced",
            "identical_answers",
            "tf_tokens_outside_drafter_vocab",
        )
        if k in stats  # reports written before the count existed lack it
    ]
    print(
        f"toy world in {out} ({time.perf_counter() - start:.0f}s); two models on the {report['agreement_split']} split:"
    )
    print(markdown_table(["measure", "value"], rows))
    for ex in stats["examples"][:3]:
        print(f"  ref : {ex['ref']}\n  VL  : {ex['vl']}\n  EGPT: {ex['egpt']}")
    return report


if __name__ == "__main__":
    run_cli(main, parse_args)
