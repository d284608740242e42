"""The target's static-cache path (preallocated KV cache, one verify width, explicit positions) and the
compiled step: the same answers as the dynamic path and as the target's greedy output, token for
token, on the 200 toy prompts; the length-only roll-back; one inductor compile on CPU that fails on a
graph break; on CUDA the compiled (CUDA-graph) path checked the same way. The drafting adapters' side:
preallocated adapter caches equal to the growing ones, the same drafts in the engine, their compiled
step; and the target-alone loop no heavier per token than transformers' generate."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import drafters as dr
import speculative_decoding as sd
from common import UserError
from hidden_adapter import create_adapter
from tests.test_speculative_decoding import MAX_NEW, NUM_PROMPTS, VerifySpy, world  # noqa: F401 (the shared fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def static_runner(quick_world: Path, prompts: list, width: int, compile: bool = False, device: str = "cpu") -> object:
    """A second Video-LLaVA runner (the shared one stays dynamic) on the static path, sized for `prompts`."""
    import model_builders as mb

    vl = mb.load_video_llava(quick_world / "models" / "video_llava", device=device, dtype="fp32")
    longest = max(t.attention_mask.shape[1] for t, _ in prompts)
    vl.use_static_cache(longest + MAX_NEW + width + 1, verify_width=width, compile=compile)
    return vl


def test_static_path_is_lossless_on_200_prompts(world: SimpleNamespace, quick_world: Path) -> None:  # noqa: F811
    """Greedy answers on the static path equal the dynamic path's; the engine on the static path (verify
    passes padded to gamma + 1, prefill drafts, roll-out and EventGPT drafters) equals them too."""
    assert len(world.prompts) >= NUM_PROMPTS
    vl = static_runner(quick_world, world.prompts, width=4)
    assert vl.decode_path["cache"] == "static" and vl.decode_path["name"] == "static"
    head = vl.lm_head_weight()
    lm = dr.DrafterLM(world.eg)
    torch.manual_seed(0)
    synthetic = dr.SyntheticDrafter(0.7, vl.vocab_size)
    engines = [
        sd.SpeculativeDecoder(vl, synthetic, gamma_decode=3),
        sd.SpeculativeDecoder(vl, dr.RolloutDrafter(create_adapter("B1", 64).eval(), head), gamma_decode=3),
        sd.SpeculativeDecoder(vl, dr.EventGPTDrafter(lm, create_adapter("L1", 64).eval(), head), gamma_decode=3,
                              prefill_drafter=dr.EventGPTDrafter(lm, create_adapter("L2", 64).eval(), head),
                              gamma_prefill=4),
    ]
    accepted = 0
    for i, ((t_in, e_in), ref) in enumerate(zip(world.prompts, world.refs, strict=True)):
        assert sd.greedy_reference(vl, t_in, MAX_NEW) == ref, f"static greedy differs on prompt {i}"
        synthetic.set_reference(ref)
        out = engines[i % len(engines)].generate(t_in, e_in, MAX_NEW)
        sd.check_lossless(out.tokens, ref, f"static path, prompt {i}")
        accepted += sum(it.accepted for it in out.trace.iterations)
    assert accepted > 0  # drafts were kept, so rolled-back and padded verify passes were exercised
    # the lossless check's replay of the engine's verify passes gives the padded static rows the engine saw
    t_in, _ = world.prompts[0]
    VerifySpy(vl, t_in.attention_mask.shape[1]).check_replay(t_in, world.refs[0], gamma=3)


def test_static_cache_pads_the_verify_pass_and_rolls_back_by_length(world: SimpleNamespace,  # noqa: F811
                                                                     quick_world: Path) -> None:
    """A 2-token step on a width-4 path returns 2 rows equal to the dynamic path's, leaves the cache at
    +2 (the pad rolled back), and a crop then continue equals a fresh run, as on the dynamic path."""
    t_in, _ = world.prompts[0]
    vl = static_runner(quick_world, world.prompts[:1], width=4)
    length = t_in.attention_mask.shape[1]
    ones = lambda n: torch.ones(1, n, dtype=torch.long)  # noqa: E731
    out = vl.prefill(t_in, logits_for="last")
    step = vl.decode(torch.tensor([[5, 6]]), out.cache, ones(length + 2))
    assert step.logits.shape[1] == 2 and out.cache.get_seq_length() == length + 2
    dyn = world.vl.prefill(t_in, logits_for="last")
    want = world.vl.decode(torch.tensor([[5, 6]]), dyn.cache, ones(length + 2))
    torch.testing.assert_close(step.hidden, want.hidden, atol=1e-4, rtol=1e-4)
    vl.decode(torch.tensor([[7, 8]]), out.cache, ones(length + 4))
    vl.crop_cache(out.cache, length + 2)  # keep 5, 6; drop 7, 8 by moving the length
    cropped = vl.decode(torch.tensor([[9, 10]]), out.cache, ones(length + 4))
    want = world.vl.decode(torch.tensor([[9, 10]]), dyn.cache, ones(length + 4))
    torch.testing.assert_close(cropped.hidden, want.hidden, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot crop"):
        vl.crop_cache(out.cache, length + 5)
    # A step wider than the verify width (the prefill window's drafts) runs in width-4 pieces: 6 rows,
    # equal to the dynamic path's one 6-token pass, the cache 6 longer.
    wide = vl.decode(torch.arange(11, 17)[None], out.cache, ones(length + 10))
    want = world.vl.decode(torch.arange(11, 17)[None], dyn.cache, ones(length + 10))
    assert wide.logits.shape[1] == 6 and out.cache.get_seq_length() == length + 10
    torch.testing.assert_close(wide.hidden, want.hidden, atol=1e-4, rtol=1e-4)


def test_static_path_refuses_bitsandbytes_and_overflow(world: SimpleNamespace, quick_world: Path) -> None:  # noqa: F811
    t_in, _ = world.prompts[0]
    vl = static_runner(quick_world, world.prompts[:1], width=2)
    vl.use_static_cache(t_in.attention_mask.shape[1] + 1, verify_width=2)
    with pytest.raises(UserError, match="does not fit"):
        vl.prefill(t_in)
    vl.quant = "4bit"
    with pytest.raises(ValueError, match="bitsandbytes"):
        vl.use_static_cache(4096)


def test_compiled_step_on_cpu_has_no_graph_break(world: SimpleNamespace, quick_world: Path) -> None:  # noqa: F811
    """The decode and the padded verify step compile under inductor with fullgraph=True (a graph break
    raises) and give the target's greedy answers, plain and speculative; with a roll-out drafter its
    adapter step is compiled too."""
    prompts = world.prompts[:3]
    vl = static_runner(quick_world, prompts, width=3, compile=True)
    assert vl.decode_path["name"] == "compiled"
    synthetic = dr.SyntheticDrafter(0.7, vl.vocab_size)
    engine = sd.SpeculativeDecoder(vl, synthetic, gamma_decode=2, compile=True)
    table = vl.decoder.get_input_embeddings().weight
    rollout = dr.RolloutDrafter(busy_adapter("B1", True, vocab_size=table.shape[0]).attach_token_table(table),
                                vl.lm_head_weight())
    drafting = sd.SpeculativeDecoder(vl, rollout, gamma_decode=2, compile=True)
    assert rollout.decode_path == "compiled" and rollout.cache.compiled
    for (t_in, _), ref in zip(prompts, world.refs[:3], strict=True):
        assert sd.greedy_reference(vl, t_in, MAX_NEW) == ref
        synthetic.set_reference(ref)
        sd.check_lossless(engine.generate(t_in, None, MAX_NEW).tokens, ref, "compiled on CPU")
        sd.check_lossless(drafting.generate(t_in, None, MAX_NEW).tokens, ref, "compiled drafter on CPU")
    # the lossless check's replay of the engine's verify passes runs the compiled, padded step the engine ran
    VerifySpy(vl, prompts[0][0].attention_mask.shape[1]).check_replay(prompts[0][0], world.refs[0], gamma=2,
                                                                      compile=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_cuda_graph_path_is_lossless(world: SimpleNamespace, quick_world: Path) -> None:  # noqa: F811
    """On CUDA: reduce-overhead (CUDA graphs) target steps, fp32, same answers as the CPU reference."""
    prompts = [(t.__class__(t.inputs_embeds.cuda(), t.attention_mask.cuda()), e) for t, e in world.prompts[:40]]
    vl = static_runner(quick_world, prompts, width=4, compile=True, device="cuda")
    synthetic = dr.SyntheticDrafter(0.8, vl.vocab_size)
    engine = sd.SpeculativeDecoder(vl, synthetic, gamma_decode=3, compile=True)
    table = vl.decoder.get_input_embeddings().weight
    adapter = busy_adapter("B1", True, vocab_size=table.shape[0]).cuda().attach_token_table(table)
    drafting = sd.SpeculativeDecoder(vl, dr.RolloutDrafter(adapter, vl.lm_head_weight()), gamma_decode=3,
                                     compile=True)  # the adapter's step under CUDA graphs too
    for i, ((t_in, _), ref) in enumerate(zip(prompts, world.refs, strict=False)):
        synthetic.set_reference(ref)
        out = (engine if i % 2 else drafting).generate(t_in, None, MAX_NEW)
        ties = sd.check_lossless(out.tokens, ref, f"compiled CUDA, prompt {i}", dtype=vl.dtype,
                                 recompute=sd.TargetRecompute(vl, t_in, MAX_NEW, engine=out))
        assert ties == []  # fp32: no rounding ties are allowed


def test_torchao_int8_path_is_lossless_against_its_own_greedy(world: SimpleNamespace,  # noqa: F811
                                                             quick_world: Path) -> None:
    """Weight-only int8 (torchao) of the decoder layers on CPU, static path: the engine gives the
    quantised target's own greedy answers; without torchao the load is one clear error."""
    import importlib.util

    import model_builders as mb
    from common import UserError
    from vlm_runners import model_description

    path = quick_world / "models" / "video_llava"
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(UserError, match="pip install torchao"):
            mb.load_video_llava(path, device="cpu", dtype="fp32", quant="int8_ao")
        pytest.skip("torchao is not installed (optional: pip install torchao)")
    with pytest.raises(UserError, match="int4_ao needs a CUDA GPU"):
        mb.load_video_llava(path, device="cpu", dtype="fp32", quant="int4_ao")
    vl = mb.load_video_llava(path, device="cpu", dtype="fp32", quant="int8_ao")
    assert type(vl.decoder.layers[0].mlp.down_proj.weight).__name__ != "Parameter"  # a torchao tensor
    assert model_description(vl)["quant"] == "int8_ao"
    prompts = world.prompts[:12]
    refs = [sd.greedy_reference(vl, t, MAX_NEW) for t, _ in prompts]
    vl.use_static_cache(max(t.attention_mask.shape[1] for t, _ in prompts) + MAX_NEW + 5, verify_width=4)
    synthetic = dr.SyntheticDrafter(0.7, vl.vocab_size)
    engine = sd.SpeculativeDecoder(vl, synthetic, gamma_decode=3)
    for (t_in, _), ref in zip(prompts, refs, strict=True):
        synthetic.set_reference(ref)
        sd.check_lossless(engine.generate(t_in, None, MAX_NEW).tokens, ref, "int8_ao static")
    assert sum(r == w for r, w in zip(refs, world.refs, strict=False)) > 0  # int8 keeps most toy answers


# ----------------------------------------------------------------------------- the drafting adapters' side


def busy_adapter(level: str, token_input: bool = False, seed: int = 0, vocab_size: int = 32000) -> torch.nn.Module:
    """An adapter at width 64 whose zero-initialised output projection is given weights, so its outputs
    depend on every input (an untrained one starts as the identity)."""
    torch.manual_seed(seed)
    adapter = create_adapter(level, 64, token_input=token_input, vocab_size=vocab_size).eval()
    with torch.no_grad():
        torch.nn.init.normal_(adapter.output_proj.weight, std=0.2)
        if level == "L5E":
            torch.nn.init.normal_(adapter.context_proj.weight, std=0.2)
    return adapter


@pytest.mark.parametrize("level,token_input", [("B1", True), ("L5", False), ("L5F", True), ("L5E", False)])
def test_static_adapter_cache_matches_the_growing_cache(level: str, token_input: bool) -> None:
    """Both adapter caches (StaticAdapterCache, DynamicAdapterCache: one interface) give the outputs of
    `adapter.step` with a growing cache: single positions, a padded narrow step, a step wider than its
    width (pieces), and a roll-back followed by new input."""
    from drafters import DynamicAdapterCache, StaticAdapterCache
    from hidden_adapter import ProjectedContext

    adapter = busy_adapter(level, token_input)
    if token_input:
        adapter.attach_token_table(torch.randn(adapter.config.vocab_size, 64))
    t = 14
    x = torch.randn(1, t, 64)
    v = torch.randn(1, t, 64) if level == "L5F" else None
    ids = torch.randint(0, 100, (1, t)) if adapter.config.uses_tokens else None
    ctx = {"context": ProjectedContext(adapter.context_vector(torch.randn(1, 64)))} if level == "L5E" else {}
    cut = lambda z, c: None if z is None else z[:, c]  # noqa: E731
    cache, grown = StaticAdapterCache(adapter, width=4), DynamicAdapterCache(adapter)
    past = None
    for c in (slice(0, 1), slice(1, 3), slice(3, 7), slice(7, 13), slice(13, 14)):
        want, past = adapter.step(x[:, c], past, h_target=cut(v, c), token_ids=cut(ids, c), **ctx)
        for each in (cache, grown):
            got = each(x[:, c], h_target=cut(v, c), token_ids=cut(ids, c), **ctx)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.length == grown.length == t
    past = [(k[:, :, :5], vv[:, :, :5]) for k, vv in past]
    x2 = torch.randn(1, 3, 64)
    v2 = None if v is None else torch.randn(1, 3, 64)
    ids2 = None if ids is None else torch.randint(0, 100, (1, 3))
    want, _ = adapter.step(x2, past, h_target=v2, token_ids=ids2, **ctx)
    for each in (cache, grown):
        each.crop(5)  # roll back to 5 positions and feed other inputs there
        torch.testing.assert_close(each(x2, h_target=v2, token_ids=ids2, **ctx), want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="cannot crop"):
            each.crop(9)
    assert (cache.path, cache.width, grown.path, grown.width) == ("static", 4, "dynamic", None)
    with pytest.raises(ValueError, match="larger max_seq_len"):
        cache(torch.randn(1, adapter.config.max_seq_len, 64), h_target=None if v is None else
              torch.randn(1, adapter.config.max_seq_len, 64))
    for each in (cache, grown):
        each.reset()
        assert each.length == 0


def test_static_adapter_cache_is_for_causal_levels_and_fills_to_the_last_position() -> None:
    """A bidirectional level is refused in one line; near the end of the learned positions a padded step
    no longer fits, so the last positions go one at a time and every position up to the last is usable."""
    from drafters import StaticAdapterCache

    with pytest.raises(ValueError, match="causal levels"):
        StaticAdapterCache(create_adapter("L4", 64))
    adapter = create_adapter("B1", 64, max_seq_len=10).eval()
    cache = StaticAdapterCache(adapter, width=4)
    x = torch.randn(1, 10, 64)
    want, past = adapter.step(x[:, :8])
    torch.testing.assert_close(cache(x[:, :8]), want, atol=1e-5, rtol=1e-5)
    want, _ = adapter.step(x[:, 8:], past)
    torch.testing.assert_close(cache(x[:, 8:]), want, atol=1e-5, rtol=1e-5)  # 2 positions, no room for 4
    assert cache.length == 10


def test_draft_step_is_one_step_after_the_cached_positions() -> None:
    """drafters.draft_step (what both benchmarks time): on every cache path, each call crops back to the
    cached positions and gives the same output, equal across paths for the same random inputs, and the
    adapter's own step after those positions; with a head, the draft token."""
    from drafters import draft_step

    for level, token_input in (("B1", True), ("L5F", False), ("L5E", False)):
        adapter = busy_adapter(level, token_input, vocab_size=300)
        if token_input:
            adapter.attach_token_table(torch.randn(300, 64))
        outs = []
        for path in ("dynamic", "static", "compiled"):
            torch.manual_seed(1)
            once = draft_step(adapter, 5, path)
            first = once()
            torch.testing.assert_close(once(), first)  # the same step again, not a sixth position
            outs.append(first)
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
        assert outs[0].shape == (1, 1, 64)
        head = torch.randn(300, 64)
        torch.manual_seed(1)
        assert draft_step(adapter, 5, "dynamic", head=head)() == int((outs[0][0, 0] @ head.T).argmax())
    with pytest.raises(ValueError, match="path must be"):
        draft_step(adapter, 5, "eager")


def test_engine_drafts_the_same_on_the_static_adapter_path(world: SimpleNamespace,  # noqa: F811
                                                           quick_world: Path) -> None:
    """With static_cache the roll-out drafters (B1 with its token input, L5 on EventGPT's states, L5E with
    EventGPT's context) and the fused one (L5F) draft on preallocated adapter caches: the same draft
    tokens, window by window, as on the growing caches, and the target's greedy answers, on 60 prompts.
    Each drafter object serves both engines, which select their own path at every answer."""
    vl = static_runner(quick_world, world.prompts, width=4)
    assert world.eg.hidden_size == vl.hidden_size == 64
    head = vl.lm_head_weight()
    table = vl.decoder.get_input_embeddings().weight
    lm = dr.DrafterLM(world.eg)
    drafters = [dr.RolloutDrafter(busy_adapter("B1", True, vocab_size=table.shape[0]).attach_token_table(table), head),
                dr.RolloutDrafter(busy_adapter("L5", seed=2), head, lm=lm),
                dr.RolloutDrafter(busy_adapter("L5E", seed=3), head, lm=lm),
                dr.FusedDrafter(lm, busy_adapter("L5F", seed=1), head)]
    windows: list[list[int]] = []
    for d in drafters:  # record every window a drafter hands the engine
        d.draft = (lambda k, stop=None, _draft=d.draft: windows.append(_draft(k, stop).tokens)
                   or dr.Draft(windows[-1]))
    dynamic = [sd.SpeculativeDecoder(world.vl, d, gamma_decode=3) for d in drafters]
    static = [sd.SpeculativeDecoder(vl, d, gamma_decode=3, static_cache=True) for d in drafters]
    accepted = 0
    for i, ((t_in, e_in), ref) in enumerate(zip(world.prompts[:60], world.refs, strict=False)):
        j = i % len(drafters)
        windows.clear()
        a = dynamic[j].generate(t_in, e_in, MAX_NEW)
        assert drafters[j].decode_path == "dynamic"
        grown, windows[:] = list(windows), []
        b = static[j].generate(t_in, e_in, MAX_NEW)
        assert drafters[j].decode_path == "static" and drafters[j].cache.width == 4
        sd.check_lossless(b.tokens, ref, f"static adapter path, prompt {i}")
        assert windows == grown, f"{drafters[j].name} drafts differently on prompt {i}"
        assert [it.accepted for it in b.trace.iterations] == [it.accepted for it in a.trace.iterations]
        accepted += sum(it.accepted for it in b.trace.iterations)
    assert accepted > 0


def test_greedy_window_drafts_what_roll_out_drafts() -> None:
    """The device-side greedy window (tokens read once per window) gives roll_out's tokens: with and
    without a token input, on both adapter caches, for windows of 1 to 5 drafts."""
    torch.manual_seed(0)
    head = torch.randn(300, 64)
    for token_input in (False, True):
        adapter = busy_adapter("B1", token_input, vocab_size=300)
        if token_input:
            adapter.attach_token_table(torch.randn(300, 64))
        for static in (False, True):
            drafter = dr.RolloutDrafter(adapter, head)
            if static:
                drafter.use_static_cache(4)
            drafter.begin(None)
            states = torch.randn(12, 64)
            drafter.accept([1, 2, 3], states[:3])
            for k in (1, 2, 5, 3):
                fed = drafter.fed
                got = drafter.draft(k).tokens
                drafter.fed = fed  # the same window again through roll_out (the host-sync path)
                drafter.cache.crop(drafter.fed)
                n = len(drafter.states)
                out = drafter.cache(drafter._context(n), **drafter._tokens(drafter.verified[drafter.fed:n]))
                drafter.fed = n

                def step(i: int, tokens: list[int], h: torch.Tensor, d: dr.RolloutDrafter = drafter) -> torch.Tensor:
                    return d.cache(h, **d._tokens(tokens[i:]))

                want = dr.roll_out(out[:, -1:], k, head, 0.0, None, step).tokens
                assert got == want and len(got) == k, (token_input, static, k)
                drafter.accept([*got[:1], 7], states[len(drafter.states):len(drafter.states) + 2])


def test_a_drafter_shared_by_engines_of_different_paths_follows_each() -> None:
    """One drafter, three engines (growing cache; static at gamma 2; static at gamma 5): each answer
    drafts on its own engine's path and width, and a raw L5E context is cast to the adapter's dtype."""
    from drafters import StaticAdapterCache

    drafter = dr.RolloutDrafter(busy_adapter("B1"), torch.randn(300, 64))
    target = SimpleNamespace(use_static_cache=lambda *a, **k: None, device=torch.device("cpu"), eos_token_id=0)
    engines = [sd.SpeculativeDecoder(target, drafter, gamma_decode=g, static_cache=s)
               for g, s in ((2, False), (2, True), (5, True))]
    for engine, path, width in zip(engines, ("dynamic", "static", "static"), (None, 3, 6), strict=True):
        engine._select_adapter_path(drafter)
        assert drafter.decode_path == path and drafter.cache.width == width
    l5e = busy_adapter("L5E")
    cache = StaticAdapterCache(l5e, width=2)
    x, ctx = torch.randn(1, 3, 64), torch.randn(1, 64, dtype=torch.float64)
    want, _ = l5e.step(x, context=ctx.float())
    torch.testing.assert_close(cache(x, context=ctx), want, atol=1e-5, rtol=1e-5)
    assert cache(x[:, :0]).shape == (1, 0, 64)


def test_compiled_adapter_step_on_cpu_has_no_graph_break() -> None:
    """Every causal level's static step compiles under inductor with fullgraph=True (a graph break
    raises) at its two widths, and gives the eager static step's outputs."""
    from drafters import StaticAdapterCache
    from hidden_adapter import ProjectedContext

    for level, token_input in (("B1", True), ("L5F", True), ("L5E", False)):
        adapter = busy_adapter(level, token_input)
        if token_input:
            adapter.attach_token_table(torch.randn(adapter.config.vocab_size, 64))
        x = torch.randn(1, 6, 64)
        kw = {"h_target": torch.randn(1, 6, 64)} if level == "L5F" else {}
        if adapter.config.uses_tokens:
            kw["token_ids"] = torch.randint(0, 100, (1, 6))
        if level == "L5E":
            kw["context"] = ProjectedContext(adapter.context_vector(torch.randn(1, 64)))
        eager, compiled = StaticAdapterCache(adapter, width=3), StaticAdapterCache(adapter, width=3, compile=True)
        for c in (slice(0, 2), slice(2, 3), slice(3, 6)):
            part = {k: (w[:, c] if isinstance(w, torch.Tensor) else w) for k, w in kw.items()}
            torch.testing.assert_close(compiled(x[:, c], **part), eager(x[:, c], **part), atol=1e-5, rtol=1e-5)


def test_target_alone_loop_issues_no_more_ops_per_token_than_generate() -> None:
    """The engine's target-alone loop (the baseline of every speed-up) dispatches no more ATen operations
    per generated token than transformers' `generate` on the same model and prompt. On a GPU in eager
    mode each operation is a kernel launch, and at batch 1 launches set the pace."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    import e2e_measure as be
    from model_builders import build_random_runners, resolve_shape

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> object:
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    _, vl = build_random_runners(resolve_shape("tiny", {"layers": 3}), ["what is ahead?"], torch.device("cpu"),
                                 torch.float32, seed=0)
    prompt = vl._left_pad([torch.cat([torch.randn(40, vl.hidden_size), vl.embed_ids([5, 6, 7])])])
    engine = sd.SpeculativeDecoder(vl, dr.NoDrafter(), gamma_decode=0)
    runs = {"engine": lambda n: engine.generate(prompt, None, n).tokens,
            "generate": lambda n: be.hf_generate(vl, prompt, n)}
    per_token = {}
    for name, run in runs.items():
        counts = []
        for n in (4, 20):
            with Count() as mode:
                assert len(run(n)) == n  # eos -1: every answer runs to its cap
            counts.append(sum(mode.ops.values()))
        per_token[name] = (counts[1] - counts[0]) / 16
    assert per_token["engine"] <= per_token["generate"], per_token
