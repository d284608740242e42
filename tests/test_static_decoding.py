"""The target's static-cache path (preallocated KV cache, one verify width, explicit positions) and the
compiled step: the same answers as the dynamic path and as the target's greedy output, token for
token, on the 200 toy prompts; the length-only roll-back; one inductor compile on CPU that fails on a
graph break; on CUDA the compiled (CUDA-graph) path checked the same way."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import speculative_decoding as sd
from common import UserError
from hidden_adapter import create_adapter
from tests.test_speculative_decoding import MAX_NEW, NUM_PROMPTS, world  # noqa: F401 (the shared fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def static_runner(quick_world: Path, prompts: list, width: int, compile: bool = False, device: str = "cpu") -> object:
    """A second Video-LLaVA runner (the shared one stays dynamic) on the static path, sized for `prompts`."""
    import model_loaders as ml

    vl = ml.load_video_llava(quick_world / "models" / "video_llava", device=device, dtype="fp32")
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
    lm = sd.DrafterLM(world.eg)
    torch.manual_seed(0)
    synthetic = sd.SyntheticDrafter(0.7, vl.vocab_size)
    engines = [
        sd.SpeculativeDecoder(vl, synthetic, gamma_decode=3),
        sd.SpeculativeDecoder(vl, sd.RolloutDrafter(create_adapter("B1", 64).eval(), head), gamma_decode=3),
        sd.SpeculativeDecoder(vl, sd.EventGPTDrafter(lm, create_adapter("L1", 64).eval(), head), gamma_decode=3,
                              prefill_drafter=sd.EventGPTDrafter(lm, create_adapter("L2", 64).eval(), head),
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
    raises) and give the target's greedy answers, plain and speculative."""
    prompts = world.prompts[:2]
    vl = static_runner(quick_world, prompts, width=3, compile=True)
    assert vl.decode_path["name"] == "compiled"
    synthetic = sd.SyntheticDrafter(0.7, vl.vocab_size)
    engine = sd.SpeculativeDecoder(vl, synthetic, gamma_decode=2, compile=True)
    for (t_in, _), ref in zip(prompts, world.refs[:2], strict=True):
        assert sd.greedy_reference(vl, t_in, MAX_NEW) == ref
        synthetic.set_reference(ref)
        sd.check_lossless(engine.generate(t_in, None, MAX_NEW).tokens, ref, "compiled on CPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_cuda_graph_path_is_lossless(world: SimpleNamespace, quick_world: Path) -> None:  # noqa: F811
    """On CUDA: reduce-overhead (CUDA graphs) target steps, fp32, same answers as the CPU reference."""
    prompts = [(t.__class__(t.inputs_embeds.cuda(), t.attention_mask.cuda()), e) for t, e in world.prompts[:40]]
    vl = static_runner(quick_world, prompts, width=4, compile=True, device="cuda")
    synthetic = sd.SyntheticDrafter(0.8, vl.vocab_size)
    engine = sd.SpeculativeDecoder(vl, synthetic, gamma_decode=3, compile=True)
    for i, ((t_in, _), ref) in enumerate(zip(prompts, world.refs, strict=False)):
        synthetic.set_reference(ref)
        out = engine.generate(t_in, None, MAX_NEW)
        tie = sd.check_lossless(out.tokens, ref, f"compiled CUDA, prompt {i}", dtype=vl.dtype,
                                recompute=lambda prefix, t_in=t_in: sd.tie_logits(vl, t_in, prefix))
        assert tie is None  # fp32: no rounding ties are allowed


def test_torchao_int8_path_is_lossless_against_its_own_greedy(world: SimpleNamespace,  # noqa: F811
                                                             quick_world: Path) -> None:
    """Weight-only int8 (torchao) of the decoder layers on CPU, static path: the engine gives the
    quantised target's own greedy answers; without torchao the load is one clear error."""
    import importlib.util

    import model_loaders as ml
    from common import UserError

    path = quick_world / "models" / "video_llava"
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(UserError, match="pip install torchao"):
            ml.load_video_llava(path, device="cpu", dtype="fp32", quant="int8_ao")
        pytest.skip("torchao is not installed (optional: pip install torchao)")
    with pytest.raises(UserError, match="int4_ao needs a CUDA GPU"):
        ml.load_video_llava(path, device="cpu", dtype="fp32", quant="int4_ao")
    vl = ml.load_video_llava(path, device="cpu", dtype="fp32", quant="int8_ao")
    assert type(vl.decoder.layers[0].mlp.down_proj.weight).__name__ != "Parameter"  # a torchao tensor
    assert ml.model_description(vl)["quant"] == "int8_ao"
    prompts = world.prompts[:12]
    refs = [sd.greedy_reference(vl, t, MAX_NEW) for t, _ in prompts]
    vl.use_static_cache(max(t.attention_mask.shape[1] for t, _ in prompts) + MAX_NEW + 5, verify_width=4)
    synthetic = sd.SyntheticDrafter(0.7, vl.vocab_size)
    engine = sd.SpeculativeDecoder(vl, synthetic, gamma_decode=3)
    for (t_in, _), ref in zip(prompts, refs, strict=True):
        synthetic.set_reference(ref)
        sd.check_lossless(engine.generate(t_in, None, MAX_NEW).tokens, ref, "int8_ao static")
    assert sum(r == w for r, w in zip(refs, world.refs, strict=False)) > 0  # int8 keeps most toy answers
