"""The live engine: greedy losslessness on hundreds of toy prompts, no late draft, cache crops, the
sampling rule's distribution, and the measured prefill overlap."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import speculative_decoding as sd
from hidden_adapter import adapter_loss, create_adapter
from hidden_data import iter_chunks

MAX_NEW = 8
CONFIDENCE = 0.5  # the drafters' confidence stop where a test uses one
NUM_PROMPTS = 200
QUESTION_VARIANTS = ("{q}", "{q} Answer briefly.", "Look closely. {q}")


@pytest.fixture(scope="module")
def world(quick_world: Path) -> SimpleNamespace:
    """Both quick-world runners and NUM_PROMPTS (target inputs, drafter inputs) pairs with greedy answers."""
    import model_loaders as ml
    from toy_dataset import load_index, load_questions

    vl = ml.load_video_llava(quick_world / "models" / "video_llava", device="cpu", dtype="fp32")
    eg = ml.load_eventgpt(quick_world / "models" / "eventgpt", device="cpu", dtype="fp32")
    ds = quick_world / "dataset"
    questions = load_questions(ds)
    prompts = []
    for split in ("train", "val", "test"):
        for clip in load_index(ds, split):
            fv, fe = vl.clip_features(ds / split, clip), eg.clip_features(ds / split, clip)
            for q in questions:
                for form in QUESTION_VARIANTS:
                    text = form.format(q=q)
                    prompts.append((vl.build_inputs([fv], [text]), eg.build_inputs([fe], [text])))
    prompts = prompts[:NUM_PROMPTS]
    refs = [sd.greedy_reference(vl, t, MAX_NEW) for t, _ in prompts]
    return SimpleNamespace(vl=vl, eg=eg, prompts=prompts, refs=refs, head=vl.lm_head_weight())


def fitted_adapter(level: str, quick_hidden: Path, steps: int = 150) -> nn.Module:
    """A quickly trained adapter (Adam on adapter_loss over the quick train chunks): a drafter that
    sometimes matches. L1 maps teacher-forced EventGPT states to target states; B1 target to target."""
    torch.manual_seed(0)
    chunks = list(iter_chunks(quick_hidden / "train", expect_teacher_forced=True))
    x_key = "vl_hidden" if level == "B1" else "egpt_hidden_tf"
    x = torch.cat([c[x_key] for c in chunks]).float()
    y = torch.cat([c["vl_hidden"] for c in chunks]).float()
    m = torch.cat([c["vl_mask"] for c in chunks])
    adapter = create_adapter(level, x.shape[-1], dropout=0.0)
    opt = torch.optim.Adam(adapter.parameters(), lr=3e-3)
    for _ in range(steps):
        loss, _ = adapter_loss(adapter, adapter(x, m), y, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapter.eval()


# ----------------------------------------------------------------------------- the acceptance rule


def test_greedy_accepts_prefix_plus_target_token() -> None:
    logits = torch.full((4, 6), -1.0)
    logits[torch.arange(4), torch.tensor([2, 3, 1, 5])] = 1.0  # target argmax per row
    assert sd.accept_drafts(logits, sd.Draft([2, 3, 4]), 0.0, None) == (2, 1)
    assert sd.accept_drafts(logits, sd.Draft([2, 3, 1]), 0.0, None) == (3, 5)  # all + bonus
    assert sd.accept_drafts(logits, sd.Draft([0, 3, 1]), 0.0, None) == (0, 2)
    assert sd.accept_drafts(logits[:1], sd.Draft([2]), 0.0, None) == (1, None)  # no row for a bonus


def test_rejection_sampling_leaves_target_distribution() -> None:
    """The token emitted at the first position is distributed as p whatever q drafted it."""
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([[2.0, 0.5, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(p_logits[0], -1)
    q = torch.tensor([0.05, 0.6, 0.3, 0.04, 0.01])  # far from p on purpose
    n = 20000
    counts = torch.zeros(5)
    naive = torch.zeros(5)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=gen))
        acc, nxt = sd.accept_drafts(p_logits, sd.Draft([d], q[None]), 1.0, gen)
        counts[d if acc == 1 else nxt] += 1
        naive[d] += 1
    tv = 0.5 * (counts / n - p).abs().sum()
    assert tv < 0.02, f"total variation {tv:.4f} from the target distribution"
    assert 0.5 * (naive / n - p).abs().sum() > 0.3  # the check would see a drafter that is not corrected


# ----------------------------------------------------------------------------- losslessness


class _Oracle(nn.Module):
    """Stands in for B1 / L5 / L5F: maps a state to the true next target state by nearest neighbour
    among known states (`keys[i]` -> `values[i]`). It can only match if every draft is taken from the
    right state."""

    def __init__(self, name: str, consumes: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.config = SimpleNamespace(name=name, consumes=consumes, use_token_embed=False)
        self.scale = nn.Parameter(torch.ones(()))
        self.keys, self.values = keys, values

    @torch.no_grad()
    def step(self, x, past=None, *, h_target=None, token_ids=None):
        src = h_target if h_target is not None else x
        out = self.values[torch.cdist(src[0], self.keys).argmin(-1)][None]
        kv = torch.zeros(1, 1, src.shape[1], 1)
        past = [(kv, kv)] if past is None else [(torch.cat([past[0][0], kv], 2), torch.cat([past[0][1], kv], 2))]
        return out, past


def _next_state_oracle(name: str, consumes: str, states: torch.Tensor, egpt_states: torch.Tensor | None) -> _Oracle:
    """s_t -> s_{t+1} (and, for L5, EventGPT's g_t -> s_{t+1}); the last state maps to itself."""
    following = torch.cat([states[1:], states[-1:]])
    if egpt_states is None:
        return _Oracle(name, consumes, states, following)
    g = egpt_states[: len(states)]
    return _Oracle(name, consumes, torch.cat([g, states]), torch.cat([following[: len(g)], following]))


def test_no_draft_is_one_position_late(world: SimpleNamespace) -> None:
    """Drafters that know the target exactly accept every draft: with the target as its own drafter
    (mode c, no adapter, target head) and with oracle adapters in modes a and b. A draft taken one
    position late would be rejected almost always."""
    vl, head = world.vl, world.head
    for t_in, e_in in world.prompts[:12]:
        gen = vl.generate(t_in, 12)
        length = int(gen.mask[0].sum())
        if length < 6:
            continue
        ref_states = gen.hidden[0, :length]
        reference = gen.tokens[0, :length].tolist()
        self_lm = sd.DrafterLM(vl)
        egpt = sd.DrafterLM(world.eg)
        egpt.start(e_in)
        g_states = egpt.states_for(reference).clone()  # g_t: EventGPT after the target's first t tokens
        for drafter, drafter_in in (
            (sd.EventGPTDrafter(self_lm, None, head), t_in),
            (sd.RolloutDrafter(_next_state_oracle("B1", "target", ref_states, None), head), None),
            (sd.RolloutDrafter(_next_state_oracle("L5", "drafter", ref_states, g_states), head,
                               lm=sd.DrafterLM(world.eg)), e_in),
            (sd.FusedDrafter(sd.DrafterLM(world.eg), _next_state_oracle("L5F", "both", ref_states, None), head),
             e_in),
        ):
            out = sd.SpeculativeDecoder(vl, drafter, gamma_decode=3).generate(t_in, drafter_in, 12)
            assert out.tokens == reference
            its = [it for it in out.trace.iterations if it.drafted]
            assert its and all(it.accepted == it.drafted for it in its[:-1]), (drafter.name, its)
        # the same with the prefill drafter: every prefill draft is accepted too
        eng = sd.SpeculativeDecoder(vl, sd.NoDrafter(), prefill_drafter=sd.EventGPTDrafter(self_lm, None, head),
                                    gamma_prefill=4, concurrent_prefill=False)
        out = eng.generate(t_in, t_in, 12)
        assert out.tokens == reference
        assert out.trace.phase1["drafted"] == 4 and out.trace.phase1["first_accepted"] == 1
        assert out.trace.iterations[0].accepted == 3
        return
    pytest.skip("quick world gave no answer of 6+ tokens")


def test_lossless_on_200_prompts(world: SimpleNamespace, quick_hidden: Path) -> None:
    vl, eg, head = world.vl, world.eg, world.head
    assert len(world.prompts) >= NUM_PROMPTS
    torch.manual_seed(0)
    lm = sd.DrafterLM(eg)
    trained_l1 = fitted_adapter("L1", quick_hidden)
    trained_b1 = fitted_adapter("B1", quick_hidden)
    never, always = sd.SyntheticDrafter(0.0, vl.vocab_size), sd.SyntheticDrafter(1.0, vl.vocab_size)
    # Every prompt runs both synthetic drafters, one trained and one random drafter (they take turns).
    random_configs = [
        sd.SpeculativeDecoder(vl, sd.EventGPTDrafter(lm, create_adapter("L1", 64).eval(), head), gamma_decode=3,
                              prefill_drafter=sd.EventGPTDrafter(lm, create_adapter("L2", 64).eval(), head),
                              gamma_prefill=3),
        sd.SpeculativeDecoder(vl, sd.RolloutDrafter(create_adapter("B1", 64).eval(), head), gamma_decode=3),
        sd.SpeculativeDecoder(vl, sd.RolloutDrafter(create_adapter("L5", 64).eval(), head, lm=lm), gamma_decode=3),
        sd.SpeculativeDecoder(vl, sd.FusedDrafter(lm, create_adapter("L5F", 64).eval(), head), gamma_decode=3),
    ]
    configs = {
        "trained L1 (c) + prefill / B1 (a)": [
            sd.SpeculativeDecoder(vl, sd.EventGPTDrafter(lm, trained_l1, head), gamma_decode=3,
                                  prefill_drafter=sd.EventGPTDrafter(lm, trained_l1, head), gamma_prefill=3),
            sd.SpeculativeDecoder(vl, sd.RolloutDrafter(trained_b1, head), gamma_decode=3)],
        "trained, confidence stop": [
            sd.SpeculativeDecoder(vl, sd.EventGPTDrafter(lm, trained_l1, head, min_confidence=CONFIDENCE),
                                  gamma_decode=3, prefill_drafter=sd.EventGPTDrafter(lm, trained_l1, head),
                                  gamma_prefill=3),
            sd.SpeculativeDecoder(vl, sd.RolloutDrafter(trained_b1, head, min_confidence=CONFIDENCE), gamma_decode=3)],
        "never matching": [sd.SpeculativeDecoder(vl, never, gamma_decode=3)],
        "always matching": [sd.SpeculativeDecoder(vl, always, gamma_decode=3)],
        "random L1+L2 (c) / B1, L5 (a) / L5F (b)": random_configs,
    }
    accepted = {}
    for name, engines in configs.items():
        acc = drafted = 0
        for i, ((t_in, e_in), ref) in enumerate(zip(world.prompts, world.refs, strict=True)):
            for synthetic in (never, always):
                synthetic.set_reference(ref)
            out = engines[i % len(engines)].generate(t_in, e_in, MAX_NEW)
            sd.check_lossless(out.tokens, ref, name)
            acc += sum(it.accepted for it in out.trace.iterations)
            drafted += sum(it.drafted for it in out.trace.iterations)
        accepted[name] = (acc, drafted)
    assert accepted["never matching"][0] == 0 and accepted["never matching"][1] > 0
    assert accepted["always matching"][0] == accepted["always matching"][1] > 0
    assert accepted["trained L1 (c) + prefill / B1 (a)"][0] > 0, accepted
    # The same drafters on the same prompts, stopped at unsure drafts: fewer drafts, a higher share accepted.
    (acc_all, drafted_all), (acc_stop, drafted_stop) = (accepted["trained L1 (c) + prefill / B1 (a)"],
                                                        accepted["trained, confidence stop"])
    assert 0 < drafted_stop < drafted_all, accepted
    assert acc_stop / drafted_stop > acc_all / drafted_all, accepted


def test_confidence_stop_keeps_the_unsure_draft_and_stops_there() -> None:
    """roll_out with states whose drafts are sure, unsure, sure: the stop keeps draft 1 (unsure) and
    calls no further adapter step; without a stop all k drafts come."""
    head = torch.eye(4) * 10.0
    states = [torch.eye(4)[0], torch.full((4,), 0.1), torch.eye(4)[2]]  # p(top) ~1.0, 0.25, ~1.0
    for min_confidence, want_tokens, want_steps in ((0.0, 3, 2), (0.5, 2, 1), (0.2, 3, 2)):
        calls = []

        def step(i: int, tokens: list[int], h: torch.Tensor, calls: list = calls) -> torch.Tensor:
            calls.append(i)
            return states[i + 1][None, None]

        draft = sd.roll_out(states[0][None, None], 3, head, 0.0, None, step, min_confidence)
        assert len(draft.tokens) == want_tokens and len(calls) == want_steps, (min_confidence, draft, calls)
        assert draft.tokens[0] == 0
    assert not sd.unsure(torch.tensor([9.0, 0.0]), 0, None, 0.0)
    assert sd.unsure(torch.tensor([0.0, 0.0]), 0, None, 0.6)  # p = 0.5
    assert not sd.unsure(torch.zeros(2), 1, torch.tensor([0.3, 0.7]), 0.6)  # sampling: q of the drawn token


def test_lossless_check_fails_loudly() -> None:
    with pytest.raises(sd.LosslessError, match="position 1"):
        sd.check_lossless([1, 2, 3], [1, 4, 3], "demo")


# ----------------------------------------------------------------------------- caches


def test_target_cache_crop_then_continue_equals_fresh(world: SimpleNamespace) -> None:
    vl = world.vl
    t_in, _ = world.prompts[0]
    length = t_in.attention_mask.shape[1]
    out = vl.prefill(t_in, logits_for="last")
    ones = lambda n: torch.ones(1, n, dtype=torch.long)  # noqa: E731
    vl.decode(torch.tensor([[5, 6, 7, 8]]), out.cache, ones(length + 4))
    vl.crop_cache(out.cache, length + 2)  # keep 5, 6; drop the rejected 7, 8
    cropped = vl.decode(torch.tensor([[9, 10]]), out.cache, ones(length + 4))
    fresh_cache = vl.prefill(t_in, logits_for="last").cache
    fresh = vl.decode(torch.tensor([[5, 6, 9, 10]]), fresh_cache, ones(length + 4))
    torch.testing.assert_close(cropped.hidden, fresh.hidden[:, 2:], atol=1e-4, rtol=1e-4)
    assert out.cache.get_seq_length() == length + 4


def test_drafter_resync_equals_fresh_and_counts_foreign_tokens(world: SimpleNamespace) -> None:
    eg = world.eg
    _, e_in = world.prompts[1]
    lm = sd.DrafterLM(eg)
    lm.start(e_in)
    lm.states_for([3, 4, 5, 6])
    resynced = lm.states_for([3, 4, 9]).clone()  # crop to [3, 4], feed 9
    fresh = sd.DrafterLM(eg)
    fresh.start(sd.VLMInputs(e_in.inputs_embeds.clone(), e_in.attention_mask.clone()))
    torch.testing.assert_close(resynced, fresh.states_for([3, 4, 9]), atol=1e-4, rtol=1e-4)
    assert lm.cache.get_seq_length() == e_in.attention_mask.shape[1] + 3
    assert world.vl.vocab_size > eg.vocab_size  # the toy pair differs as the 7B pair does
    lm.states_for([3, 4, 9, eg.vocab_size + 1])
    assert lm.foreign_tokens == 1


# ----------------------------------------------------------------------------- phase 1


def test_prefill_overlap_is_measured(world: SimpleNamespace) -> None:
    vl, eg, head = world.vl, world.eg, world.head
    t_in, e_in = world.prompts[2]

    def slow_target_vision() -> sd.VLMInputs:
        time.sleep(0.15)  # a slow vision tower: the drafter's whole prefill fits inside it
        return t_in

    lm = sd.DrafterLM(eg)
    pre = sd.EventGPTDrafter(lm, create_adapter("L1", 64).eval(), head)
    threaded = sd.SpeculativeDecoder(vl, sd.NoDrafter(), prefill_drafter=pre, gamma_prefill=100_000)
    p1 = threaded.generate(slow_target_vision, e_in, 4).trace.phase1
    assert p1["overlap_ms"] > 0
    assert p1["drafter_start_ms"] < p1["target_end_ms"]
    assert 1 <= p1["drafted"] < 100_000  # drafting stopped when the target's prefill ended
    sequential = sd.SpeculativeDecoder(vl, sd.NoDrafter(), prefill_drafter=pre, gamma_prefill=5,
                                       concurrent_prefill=False)
    p1 = sequential.generate(t_in, e_in, 4).trace.phase1
    assert p1["overlap_ms"] == 0 and p1["drafted"] == 5


# ----------------------------------------------------------------------------- sampling, end to end


def _tiny_runner(seed: int, vocab: int = 4) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_loaders import VLMRunner

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    llm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        llm.lm_head.weight.mul_(8.0)  # peaked enough that the drafter matters, not uniform
    tok = SimpleNamespace(eos_token_id=vocab + 5, pad_token_id=0, unk_token_id=0)  # EOS never sampled
    return VLMRunner(tokenizer=tok, decoder=llm.model, lm_head=llm.lm_head, device=torch.device("cpu"),
                     dtype=torch.float32, model_path="tiny", config_hash="tiny")


@pytest.mark.parametrize("min_confidence", [0.0, 0.3])
def test_sampling_engine_is_lossless_in_distribution(min_confidence: float) -> None:
    """First two tokens of a tiny model at temperature 1: SD (drafter = a perturbed copy with its own
    head, real draft probabilities) against the exact target distribution, enumerated; also with drafts
    stopped at the first unsure one (the stop reads the sampled draft's probability)."""
    target, draft_model = _tiny_runner(0), _tiny_runner(1)
    prompt = sd.VLMInputs(target.embed_ids([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    d_prompt = sd.VLMInputs(draft_model.embed_ids([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    exact = torch.zeros(4, 4)
    first = torch.softmax(target.prefill(prompt).logits[0, -1], -1)
    for a in range(4):
        out = target.prefill(prompt)
        second = torch.softmax(target.decode(torch.tensor([[a]]), out.cache, torch.ones(1, 4)).logits[0, -1], -1)
        exact[a] = first[a] * second
    gen = torch.Generator().manual_seed(0)
    drafter = sd.EventGPTDrafter(sd.DrafterLM(draft_model), None, draft_model.lm_head_weight(), 1.0, gen,
                                 min_confidence=min_confidence)
    engine = sd.SpeculativeDecoder(target, drafter, gamma_decode=2, prefill_drafter=drafter, gamma_prefill=2,
                                   temperature=1.0, generator=gen, concurrent_prefill=False)
    n = 1500
    counts = torch.zeros(4, 4)
    accepted = stopped = 0
    for _ in range(n):
        out = engine.generate(prompt, d_prompt, 2)
        counts[out.tokens[0], out.tokens[1]] += 1
        accepted += out.trace.phase1["first_accepted"]
        stopped += out.trace.phase1["drafted"] < 2
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert tv < 0.06, f"total variation {tv:.3f} between SD samples and the target's distribution"
    assert 0 < accepted < n  # the drafter was sometimes right and sometimes corrected
    assert (0 < stopped < n) if min_confidence else stopped == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_streams_stay_lossless(quick_world: Path) -> None:
    """The GPU path: phase 1 on a side stream, every stage timed between stream syncs, same answers."""
    import model_loaders as ml
    from toy_dataset import load_index, load_questions

    vl = ml.load_video_llava(quick_world / "models" / "video_llava", device="cuda", dtype="fp32")
    eg = ml.load_eventgpt(quick_world / "models" / "eventgpt", device="cuda", dtype="fp32")
    ds = quick_world / "dataset"
    head = vl.lm_head_weight()
    lm = sd.DrafterLM(eg)
    adapter = create_adapter("L1", 64).cuda().eval()
    engine = sd.SpeculativeDecoder(vl, sd.EventGPTDrafter(lm, adapter, head), gamma_decode=3,
                                   prefill_drafter=sd.EventGPTDrafter(lm, adapter, head), gamma_prefill=4)
    for clip in load_index(ds, "test"):
        for q in load_questions(ds)[:3]:
            t_in = vl.build_inputs([vl.clip_features(ds / "test", clip)], [q])
            e_in = eg.build_inputs([eg.clip_features(ds / "test", clip)], [q])
            out = engine.generate(t_in, e_in, 12)
            sd.check_lossless(out.tokens, sd.greedy_reference(vl, t_in, 12), q)
            assert "overlap_ms" in out.trace.phase1
