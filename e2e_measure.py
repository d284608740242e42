"""What the live benchmark (benchmark_e2e_wallclock.py) measures beside its engine configurations: the
per-operation timing profile, on the run's decode path, that the cost model reads, and transformers' own
baselines on the same prompts (greedy `generate`, prompt lookup decoding, and assisted generation with a
perturbed copy).

    from e2e_measure import hf_generate, measure_profile, prompt_lookup
    tokens = hf_generate(vl, inputs, max_new_tokens=50)        # what a user runs today
    tokens, stats = prompt_lookup(vl, inputs, question, 50, num_tokens=5, max_ngram=2)  # no drafter to train
    profile = measure_profile(vl, eg, split_dir, clip, question, gamma=5, source="...")
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

import speculative_decoding as sd
from drafters import draft_step
from timing import Stopwatch, time_ms
from vlm_runners import VLMInputs, VLMRunner, video_llava_prompt

PROFILE_VERIFY_K = (1, 2, 4, 6, 8, 16)


def _generate(vl: Any, max_new_tokens: int, prompt_len: int = 0, **kwargs: Any) -> list[int]:
    """transformers' greedy `generate` on the target's model; the answer up to and including EOS (output
    positions from `prompt_len` on: the prompt's ids come back first when they were passed)."""
    model = vl.model if hasattr(vl, "model") else vl.llm
    extra = {"min_new_tokens": max_new_tokens} if vl.eos_token_id < 0 else {"eos_token_id": vl.eos_token_id}
    out = model.generate(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=vl.pad_token_id, **extra,
                         **kwargs)
    tokens = out[0, prompt_len:].tolist()
    tokens = tokens[-max_new_tokens:] if len(tokens) > max_new_tokens else tokens
    return tokens[: tokens.index(vl.eos_token_id) + 1] if vl.eos_token_id in tokens else tokens


def hf_generate(vl: Any, inputs: VLMInputs, max_new_tokens: int) -> list[int]:
    """transformers' own greedy `generate` on the target (same prompt embeddings)."""
    return _generate(vl, max_new_tokens, inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask)


# ----------------------------------------------------------------------------------- prompt lookup


def lookup_ids(vl: Any, inputs: VLMInputs, question: str) -> Tensor:
    """The prompt's token ids [1, L] that transformers' prompt lookup searches for n-grams: Video-LLaVA's
    prompt with the video token once per visual position (as its processor expands it), checked against
    the prompt embeddings at every text position, and the last id replaced by one the prompt does not
    hold. Why the last: transformers' assisted loop (5.24, `_assisted_decoding`) runs its first forward
    on `inputs_embeds` and ignores candidate tokens there, so a match at the first step misaligns the
    logits and the answer is wrong (Video-LLaVA's prompt ends in ':' as 'USER:' does; reproduced on the
    toy world with a question holding 'ASSISTANT:'). With a unique last id the first step finds no match;
    every later step looks the answer's n-grams up in the prompt and the answer as transformers does."""
    ids = vl.tokenizer(video_llava_prompt(question)).input_ids
    at = ids.index(vl.video_token_id)
    length = inputs.inputs_embeds.shape[1]
    ids = ids[:at] + [vl.video_token_id] * (length - len(ids) + 1) + ids[at + 1:]
    ids_t = torch.tensor([ids], device=vl.device)
    text = ids_t[0] != vl.video_token_id
    if inputs.inputs_embeds.shape[0] != 1 or len(ids) != length or not torch.equal(
            vl.embed_ids(ids_t[0][text]), inputs.inputs_embeds[0][text].to(vl.dtype)):
        raise ValueError("the lookup ids do not match the target's prompt embeddings (batch 1, Video-LLaVA prompt)")
    taken = set(ids) | {vl.eos_token_id, vl.pad_token_id}
    ids_t[0, -1] = next(i for i in range(vl.vocab_size) if i not in taken)
    return ids_t


def prompt_lookup(vl: Any, inputs: VLMInputs, question: str, max_new_tokens: int, num_tokens: int,
                  max_ngram: int, ids: Tensor | None = None) -> tuple[list[int], dict[str, int]]:
    """transformers' prompt lookup decoding (`generate(..., prompt_lookup_num_tokens=num_tokens,
    max_matching_ngram_size=max_ngram)`, greedy) on the target's prompt embeddings, with `lookup_ids` for
    the n-gram search (pass `ids` to reuse them). Returns the answer and its passes: `forwards` (the
    prompt's pass included) and `drafted` (candidate tokens verified after the prompt's pass), counted by
    a forward hook on the model."""
    model = vl.model if hasattr(vl, "model") else vl.llm
    ids = lookup_ids(vl, inputs, question) if ids is None else ids
    widths: list[int] = []

    def count(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids")
        widths.append((kwargs["inputs_embeds"] if x is None else x).shape[1])

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        tokens = _generate(vl, max_new_tokens, prompt_len=ids.shape[1], input_ids=ids,
                           inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                           prompt_lookup_num_tokens=num_tokens, max_matching_ngram_size=max_ngram)
    finally:
        handle.remove()
    return tokens, {"forwards": len(widths), "drafted": sum(w - 1 for w in widths[1:])}


# ----------------------------------------------------------------------------------- assisted generation


def text_pair(vl: Any, noise: float, seed: int, confidence: float = 0.0) -> SimpleNamespace:
    """The target's language model as a LlamaForCausalLM (shared weights) and a perturbed copy that
    drafts with a fixed gamma and the given confidence stop (as our engine is run)."""
    from transformers import LlamaForCausalLM

    cfg = vl.decoder.config
    with torch.device("meta"):
        target = LlamaForCausalLM(cfg)
    target.model, target.lm_head = vl.decoder, vl.lm_head
    target.eval()
    assistant = copy.deepcopy(target)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for param in assistant.parameters():
            if param.is_floating_point():
                scale = param.float().std().item() if param.numel() > 1 else 0.0
                param.add_((torch.randn(param.shape, generator=gen) * noise * scale).to(param.device, param.dtype))
    g = assistant.generation_config
    g.num_assistant_tokens_schedule, g.assistant_confidence_threshold = "constant", confidence
    runner = VLMRunner(tokenizer=vl.tokenizer, decoder=assistant.model, lm_head=assistant.lm_head, device=vl.device,
                       dtype=vl.dtype, model_path="perturbed-copy", config_hash=vl.config_hash)
    runner.eos_token_id = vl.eos_token_id
    return SimpleNamespace(target=target, assistant=assistant, runner=runner)


def assisted_run(pair: SimpleNamespace, vl: Any, question: str, gamma: int, max_new_tokens: int,
                 engine: sd.SpeculativeDecoder) -> dict[str, Any]:
    """One text prompt through transformers' assisted generation and through our engine, timed."""
    ids = vl.tokenizer(f"USER: {question} ASSISTANT:", return_tensors="pt").input_ids.to(vl.device)
    inputs = VLMInputs(vl.embed_ids(ids), torch.ones_like(ids))
    pair.assistant.generation_config.num_assistant_tokens = gamma
    extra = {"min_new_tokens": max_new_tokens} if vl.eos_token_id < 0 else {"eos_token_id": vl.eos_token_id}
    watch = Stopwatch(vl.device)
    out = pair.target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=pair.assistant,
                               do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=vl.pad_token_id, **extra)
    theirs_ms = watch.ms()
    theirs = out[0, ids.shape[1]:].tolist()
    theirs = theirs[: theirs.index(vl.eos_token_id) + 1] if vl.eos_token_id in theirs else theirs
    ours = engine.generate(inputs, inputs, max_new_tokens)
    reference = sd.greedy_reference(vl, inputs, max_new_tokens)
    answers = (("ours", ours.tokens, ours), ("transformers", theirs, None))
    ties = [{"who": who, **asdict(tie)} for who, tokens, out in answers
            for tie in sd.check_lossless(tokens, reference, f"assisted ({who})", dtype=vl.dtype,
                                         recompute=sd.TargetRecompute(vl, inputs, max_new_tokens, engine=out))]
    return {"ours_ms": ours.trace.total_ms, "theirs_ms": theirs_ms, "tokens": len(reference),
            "numeric_ties": ties,
            "accepted": sum(it.accepted for it in ours.trace.iterations),
            "iterations": len(ours.trace.iterations)}


# ----------------------------------------------------------------------------------- timing profile


def _median_ms(fn: Callable[[], Any], device: torch.device, n: int = 10, warmup: int = 2) -> float:
    """The profile's figure for one operation: the median of n timed runs after `warmup` (timing.time_ms)."""
    return statistics.median(time_ms(fn, device, warmup, n))


def adapter_path(vl: Any) -> str:
    """The adapter-cache path the engine drafts on beside target `vl`: dynamic (the target's eager path),
    static or compiled, as SpeculativeDecoder sets its roll-out drafters."""
    return {"compiled": "compiled", "static": "static"}.get(vl.decode_path["name"], "dynamic")


def draft_step_ms(adapter: Any, vl: Any, path: str = "dynamic") -> float:
    """Median ms of one roll-out draft of a causal adapter at batch 1 after 32 cached positions
    (drafters.draft_step with the target's LM head: the adapter step, with its token input and context
    when it has them, plus the LM head and argmax). `path`: the adapter cache of the engine's decode path,
    "dynamic" (grown per step), "static" (preallocated) or "compiled" (preallocated, the step compiled;
    warmed up before timing)."""
    if adapter.config.token_input and getattr(adapter, "token_table", None) is None:
        adapter.attach_token_table(vl.decoder.get_input_embeddings().weight)
    return _median_ms(draft_step(adapter, 32, path, head=vl.lm_head_weight()), vl.device)


@torch.no_grad()
def measure_profile(vl: Any, eg: Any, split_dir: Path, clip: dict, question: str, gamma: int,
                    source: str, decode_adapters: list[Any] | None = None,
                    compiled_levels: set[str] | None = None, verify_widths: tuple[int, ...] = ()) -> Any:
    """Per-operation medians (ms) in the cost model's TimingProfile format, batch 1. Adapter steps are
    roll-out drafts (`draft_step_ms`, on the decode path of `vl`): every level at random weights, then the run's
    own decode adapters. On the compiled path only the levels in `compiled_levels` (the ones the run drafts
    with or costs the controlled drafter at; None = all) are compiled, each compile taking seconds to
    a minute; the others are timed on the static path, and the profile's notes say so. Verify passes are
    timed at PROFILE_VERIFY_K and gamma + 1 as the chain's `decode` runs them, and at `verify_widths` (a draft
    tree's widths, the chain's gamma + 1 excepted) as one tree pass (`verify_tree`): on the static and compiled
    paths `decode` pads or splits a pass to gamma + 1, so a width-16 decode there is three passes, while a
    tree is one pass at its width (the engine pads every tree to its largest, the width a fixed budget sets)."""
    from cost_model import TimingProfile
    from hidden_adapter import ADAPTER_NAMES, NEXT_POSITION_LEVELS, create_adapter

    dev = vl.device
    fv, fe = vl.clip_features(split_dir, clip), eg.clip_features(split_dir, clip)
    t_in, e_in = vl.build_inputs([fv], [question]), eg.build_inputs([fe], [question])

    def step_ms(runner: Any, inputs: VLMInputs, k: int, tree: bool = False) -> float:
        """One verify pass of k positions after the prompt, rolled back each time: as the chain's `decode` runs
        it, or with `tree` as one `verify_tree` pass of the root and k - 1 nodes (here one branch), which is one
        pass of width k on every path where `decode` pads or splits a static path's pass to gamma + 1."""
        out = runner.prefill(inputs, logits_for="last")
        length = inputs.attention_mask.shape[1]
        ids = torch.full((1, k), 5, device=dev)
        mask = torch.ones(1, length + k, dtype=torch.long, device=dev)

        def once() -> None:
            if tree:
                runner.verify_tree(ids, list(range(-1, k - 2)), out.cache, mask)
            else:
                runner.decode(ids, out.cache, mask)
            runner.crop_cache(out.cache, length)
        return _median_ms(once, dev)

    adapter_ms = {}
    path = adapter_path(vl)

    def level_path(level: str) -> str:
        return "static" if path == "compiled" and compiled_levels is not None and level not in compiled_levels else path

    x = torch.randn(1, 1, eg.hidden_size, device=dev, dtype=vl.dtype)
    for level in ADAPTER_NAMES:
        a = create_adapter(level, target_dim=vl.hidden_size, drafter_dim=eg.hidden_size).to(dev, vl.dtype).eval()
        adapter_ms[level] = (draft_step_ms(a, vl, level_path(level)) if hasattr(a, "step")
                             else _median_ms(lambda a=a: a(x), dev))
    for a in decode_adapters or []:  # the adapters this run drafts with, as they are configured
        adapter_ms[a.config.name] = draft_step_ms(a, vl, path)
    static_only = sorted(lv for lv in adapter_ms if lv in NEXT_POSITION_LEVELS and level_path(lv) != path)
    note = f"adapter steps on the {path} path"
    if static_only:
        note += f"; {', '.join(static_only)} on the static path (not compiled: this run does not draft with them)"
    notes = [note]
    # E3 / E3E draft from the target's layer states: what returning them costs a verify pass of gamma + 1
    layer_ids = next((tuple(a.config.target_layers) for a in decode_adapters or []
                      if getattr(a.config, "reads_layers", False)), ())
    extra_ms = 0.0
    if layer_ids:
        before = vl.layer_ids
        plain = step_ms(vl, t_in, gamma + 1)
        vl.capture_layers(layer_ids)
        extra_ms = max(0.0, step_ms(vl, t_in, gamma + 1) - plain)
        vl.capture_layers(before)
        notes.append(f"verify of {gamma + 1} tokens returning the target's layers {list(layer_ids)}: "
                     f"+{extra_ms:.3f} ms ({plain:.3f} ms without)")
    return TimingProfile(
        source=source,
        vl_vision_ms=_median_ms(lambda: vl.clip_features(split_dir, clip), dev, n=5, warmup=1),
        egpt_vision_ms=_median_ms(lambda: eg.clip_features(split_dir, clip), dev, n=5, warmup=1),
        vl_prefill_ms=_median_ms(lambda: vl.prefill(t_in, logits_for="last"), dev, n=5, warmup=1),
        egpt_prefill_ms=_median_ms(lambda: eg.prefill(e_in, logits_for="last"), dev, n=5, warmup=1),
        vl_decode_ms=step_ms(vl, t_in, 1),
        vl_verify_ms=dict(sorted({**{k: step_ms(vl, t_in, k) for k in {*PROFILE_VERIFY_K, gamma + 1}},
                                  **{k: step_ms(vl, t_in, k, tree=True)
                                     for k in verify_widths if k > 1 and k != gamma + 1}}.items())),
        egpt_decode_ms=step_ms(eg, e_in, 1),
        adapter_step_ms=adapter_ms,
        notes=notes,
        verify_layers_extra_ms=extra_ms,
    )
