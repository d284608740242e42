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

import drafters as dr
import speculative_decoding as sd
from hidden_adapter import create_adapter
from hidden_data import iter_chunks
from losses import adapter_loss
from vlm_runners import VLMInputs

MAX_NEW = 8
CONFIDENCE = 0.5  # the drafters' confidence stop where a test uses one
NUM_PROMPTS = 200
QUESTION_VARIANTS = ("{q}", "{q} Answer briefly.", "Look closely. {q}")


@pytest.fixture(scope="module")
def world(quick_world: Path) -> SimpleNamespace:
    """Both quick-world runners and NUM_PROMPTS (target inputs, drafter inputs) pairs with greedy answers."""
    import model_builders as mb
    from clip_data import load_index, load_questions

    vl = mb.load_video_llava(quick_world / "models" / "video_llava", device="cpu", dtype="fp32")
    eg = mb.load_eventgpt(quick_world / "models" / "eventgpt", device="cpu", dtype="fp32")
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


def fitted_adapter(level: str, quick_hidden: Path, steps: int = 150, token_table: torch.Tensor | None = None,
                   rollout: int = 1) -> nn.Module:
    """A quickly trained adapter (Adam over the quick train chunks): a drafter that sometimes matches.
    L1 maps teacher-forced EventGPT states to target states; B1/L5E target to target (L5E with EventGPT's
    prompt-end state); L5F both. With `token_table` the next-position levels read tokens; `rollout` > 1
    trains on roll-outs (drafting_loss), as train_hidden_adapter.py does."""
    from hidden_adapter import adapter_inputs
    from losses import drafting_loss

    torch.manual_seed(0)
    chunks = list(iter_chunks(quick_hidden / "train", expect_teacher_forced=True))
    g = torch.cat([c["egpt_hidden_tf"] for c in chunks]).float()
    y = torch.cat([c["vl_hidden"] for c in chunks]).float()
    m = torch.cat([c["vl_mask"] for c in chunks])
    tokens = torch.cat([c["vl_tokens"] for c in chunks]).long()
    kw = {"token_input": True, "vocab_size": token_table.shape[0]} if token_table is not None else {}
    adapter = create_adapter(level, y.shape[-1], dropout=0.0, **kw)
    if token_table is not None:
        adapter.attach_token_table(token_table)
    opt = torch.optim.Adam(adapter.parameters(), lr=3e-3)
    x, inputs = adapter_inputs(adapter, g, y, tokens)
    for _ in range(steps):
        if adapter.predicts == "next":
            loss, _ = drafting_loss(adapter, adapter.rollout(x, m, rollout, **inputs), y, m)
        else:
            loss, _ = adapter_loss(adapter, adapter(x, m, **inputs), y, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapter.eval()


# ----------------------------------------------------------------------------- the acceptance rule


def test_greedy_accepts_prefix_plus_target_token() -> None:
    logits = torch.full((4, 6), -1.0)
    logits[torch.arange(4), torch.tensor([2, 3, 1, 5])] = 1.0  # target argmax per row
    assert sd.accept_drafts(logits, dr.Draft([2, 3, 4]), 0.0, None) == (2, 1)
    assert sd.accept_drafts(logits, dr.Draft([2, 3, 1]), 0.0, None) == (3, 5)  # all + bonus
    assert sd.accept_drafts(logits, dr.Draft([0, 3, 1]), 0.0, None) == (0, 2)
    assert sd.accept_drafts(logits[:1], dr.Draft([2]), 0.0, None) == (1, None)  # no row for a bonus


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
        acc, nxt = sd.accept_drafts(p_logits, dr.Draft([d], q[None]), 1.0, gen)
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
        self.config = SimpleNamespace(name=name, consumes=consumes, use_token_embed=False, token_input=False,
                                      uses_tokens=False, context="drafter" if name == "L5E" else None,
                                      reads_drafter=consumes != "target" or name == "L5E", predicts="next",
                                      rolls_out=consumes != "both", egpt_per_draft=consumes == "both")
        self.scale = nn.Parameter(torch.ones(()))
        self.keys, self.values = keys, values

    @torch.no_grad()
    def step(self, x, past=None, *, h_target=None, token_ids=None, context=None):
        src = h_target if h_target is not None else x
        assert (context is not None) == (self.config.context is not None)  # L5E gets EventGPT's context
        out = self.values[torch.cdist(src[0], self.keys).argmin(-1)][None]
        kv = torch.zeros(1, 1, src.shape[1], 1)
        past = [(kv, kv)] if past is None else [(torch.cat([past[0][0], kv], 2), torch.cat([past[0][1], kv], 2))]
        return out, past

    def context_vector(self, context: torch.Tensor) -> torch.Tensor:
        return context


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
        self_lm = dr.DrafterLM(vl)
        egpt = dr.DrafterLM(world.eg)
        egpt.start(e_in)
        g_states = egpt.states_for(reference).clone()  # g_t: EventGPT after the target's first t tokens
        for drafter, drafter_in in (
            (dr.EventGPTDrafter(self_lm, None, head), t_in),
            (dr.RolloutDrafter(_next_state_oracle("B1", "target", ref_states, None), head), None),
            (dr.RolloutDrafter(_next_state_oracle("L5E", "target", ref_states, None), head,
                               lm=dr.DrafterLM(world.eg)), e_in),
            (dr.RolloutDrafter(_next_state_oracle("L5", "drafter", ref_states, g_states), head,
                               lm=dr.DrafterLM(world.eg)), e_in),
            (dr.FusedDrafter(dr.DrafterLM(world.eg), _next_state_oracle("L5F", "both", ref_states, None), head),
             e_in),
        ):
            out = sd.SpeculativeDecoder(vl, drafter, gamma_decode=3).generate(t_in, drafter_in, 12)
            assert out.tokens == reference
            its = [it for it in out.trace.iterations if it.drafted]
            assert its and all(it.accepted == it.drafted for it in its[:-1]), (drafter.name, its)
        # the same with the prefill drafter: every prefill draft is accepted too
        eng = sd.SpeculativeDecoder(vl, dr.NoDrafter(), prefill_drafter=dr.EventGPTDrafter(self_lm, None, head),
                                    gamma_prefill=4, concurrent_prefill=False)
        out = eng.generate(t_in, t_in, 12)
        assert out.tokens == reference
        assert out.trace.phase1["drafted"] == 4 and out.trace.phase1["first_accepted"] == 1
        assert out.trace.iterations[0].accepted == 3
        return
    pytest.skip("quick world gave no answer of 6+ tokens")


def test_live_acceptance_stops_at_eos(world: SimpleNamespace) -> None:
    """A controlled drafter that drafts the target's own greedy tokens through its EOS and on past it: the
    verify pass accepts the drafts after EOS too (they are the target's continuation), but the answer
    ends at EOS and so do the figures, as offline (metrics.RolloutAccumulator): the window counts its
    drafts up to and including EOS, every token of the answer comes from exactly one accepted draft or
    target token, and no draft position after EOS counts as a hit. (The quick world's answers never
    reach its EOS in a few tokens, so a token the target writes early is made its EOS for this test.)"""
    vl = world.vl
    eos = vl.eos_token_id
    for t_in, _ in world.prompts[:20]:
        through = sd.greedy_reference(vl, t_in, 24)  # no EOS in it: the target's tokens "past" the one chosen
        end = next((e for e in range(1, 12) if through[e] not in through[:e]), None)
        if eos in through or end is None:
            continue
        gamma = end + 2  # one window drafts positions 1..gamma: EOS at draft end - 1, two drafts after it
        try:
            vl.eos_token_id = through[end]
            ref = sd.greedy_reference(vl, t_in, 24)
            drafter = dr.SyntheticDrafter(1.0, vl.vocab_size)
            drafter.set_reference(through)  # drafts on past the EOS
            out = sd.SpeculativeDecoder(vl, drafter, gamma_decode=gamma).generate(t_in, None, 24)
        finally:
            vl.eos_token_id = eos
        assert ref == through[: end + 1] and out.tokens == ref
        (it,) = out.trace.iterations
        assert it.draft == through[1 : gamma + 1] and it.drafted == gamma
        assert it.accepted == end  # drafts 1..end (EOS included), though the verify pass accepted all gamma
        summary = sd.summarise_trace(out.trace)
        assert summary["accepted"] + summary["iterations"] == len(ref)  # prefill token + accepted drafts
        assert summary["per_position_tries"] == dict.fromkeys(range(gamma), 1)
        assert summary["per_position_hits"] == dict.fromkeys(range(end), 1)  # no hit after EOS
        return
    pytest.skip("no quick-world answer had a token to serve as an early EOS")


def test_lossless_on_200_prompts(world: SimpleNamespace, quick_hidden: Path) -> None:
    vl, eg, head = world.vl, world.eg, world.head
    assert len(world.prompts) >= NUM_PROMPTS
    torch.manual_seed(0)
    lm = dr.DrafterLM(eg)
    trained_l1 = fitted_adapter("L1", quick_hidden)
    trained_b1 = fitted_adapter("B1", quick_hidden)
    never, always = dr.SyntheticDrafter(0.0, vl.vocab_size), dr.SyntheticDrafter(1.0, vl.vocab_size)
    table = vl.decoder.get_input_embeddings().weight
    tok_b1 = fitted_adapter("B1", quick_hidden, token_table=table, rollout=2)
    tok_l5e = fitted_adapter("L5E", quick_hidden, token_table=table)
    tok_l5f = fitted_adapter("L5F", quick_hidden, token_table=table)
    calibrated = [0.05 * i for i in range(20)]  # acceptance estimate rising with the drafter's confidence

    def gain() -> dr.ExpectedGainStop:  # a cost ratio where only confident drafts pay
        return dr.ExpectedGainStop(calibrated, 0.5, draft_ms=0.3, verify_ms=0.9, verify_token_ms=0.03)

    def with_table(adapter: nn.Module) -> nn.Module:
        return adapter.attach_token_table(table).eval()

    token_configs = [
        sd.SpeculativeDecoder(vl, dr.RolloutDrafter(tok_b1, head), gamma_decode=4),
        sd.SpeculativeDecoder(vl, dr.RolloutDrafter(tok_l5e, head, lm=lm), gamma_decode=4),
        sd.SpeculativeDecoder(vl, dr.FusedDrafter(lm, tok_l5f, head), gamma_decode=4),
    ]
    stopped_configs = [
        sd.SpeculativeDecoder(vl, dr.RolloutDrafter(tok_b1, head, length=gain()), gamma_decode=4),
        sd.SpeculativeDecoder(vl, dr.RolloutDrafter(tok_l5e, head, lm=lm, length=gain()), gamma_decode=4),
        sd.SpeculativeDecoder(vl, dr.FusedDrafter(lm, tok_l5f, head, length=gain()), gamma_decode=4),
    ]
    random_token_configs = [
        sd.SpeculativeDecoder(vl, dr.RolloutDrafter(with_table(create_adapter(lv, 64, token_input=True,
                                                                              vocab_size=table.shape[0])),
                                                    head, lm=lm if lv != "B1" else None), gamma_decode=3)
        for lv in ("B1", "L5", "L5E")
    ] + [sd.SpeculativeDecoder(vl, dr.FusedDrafter(lm, with_table(create_adapter(
        "L5F", 64, token_input=True, vocab_size=table.shape[0])), head), gamma_decode=3)]
    # Every prompt runs both synthetic drafters, one trained and one random drafter (they take turns).
    random_configs = [
        sd.SpeculativeDecoder(vl, dr.EventGPTDrafter(lm, create_adapter("L1", 64).eval(), head), gamma_decode=3,
                              prefill_drafter=dr.EventGPTDrafter(lm, create_adapter("L2", 64).eval(), head),
                              gamma_prefill=3),
        sd.SpeculativeDecoder(vl, dr.RolloutDrafter(create_adapter("B1", 64).eval(), head), gamma_decode=3),
        sd.SpeculativeDecoder(vl, dr.RolloutDrafter(create_adapter("L5", 64).eval(), head, lm=lm), gamma_decode=3),
        sd.SpeculativeDecoder(vl, dr.FusedDrafter(lm, create_adapter("L5F", 64).eval(), head), gamma_decode=3),
    ]
    configs = {
        "trained L1 (c) + prefill / B1 (a)": [
            sd.SpeculativeDecoder(vl, dr.EventGPTDrafter(lm, trained_l1, head), gamma_decode=3,
                                  prefill_drafter=dr.EventGPTDrafter(lm, trained_l1, head), gamma_prefill=3),
            sd.SpeculativeDecoder(vl, dr.RolloutDrafter(trained_b1, head), gamma_decode=3)],
        "trained, confidence stop": [
            sd.SpeculativeDecoder(vl, dr.EventGPTDrafter(lm, trained_l1, head, min_confidence=CONFIDENCE),
                                  gamma_decode=3, prefill_drafter=dr.EventGPTDrafter(lm, trained_l1, head),
                                  gamma_prefill=3),
            sd.SpeculativeDecoder(vl, dr.RolloutDrafter(trained_b1, head, min_confidence=CONFIDENCE), gamma_decode=3)],
        "trained token input B1, L5E (a) / L5F (b)": token_configs,
        "trained token input, expected-gain stop": stopped_configs,
        "random token input B1, L5, L5E (a) / L5F (b)": random_token_configs,
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
    # The same drafters on the same prompts, stopped at unsure drafts: fewer drafts. (Whether a higher share
    # of them is accepted depends on how well the confidence predicts acceptance: checked below for the
    # better-trained token-input heads and the calibrated stop.)
    (_, drafted_all), (_, drafted_stop) = (accepted["trained L1 (c) + prefill / B1 (a)"],
                                           accepted["trained, confidence stop"])
    assert 0 < drafted_stop < drafted_all, accepted
    (acc_tok, drafted_tok), (acc_gain, drafted_gain) = (accepted["trained token input B1, L5E (a) / L5F (b)"],
                                                        accepted["trained token input, expected-gain stop"])
    assert acc_tok > 0 and 0 < drafted_gain < drafted_tok and acc_gain / drafted_gain > acc_tok / drafted_tok, accepted


def test_make_drafter_follows_the_level_roles() -> None:
    """make_drafter picks the drafter from the adapter's config: per-position levels draft on EventGPT's text
    (both phases), B1 rolls out without EventGPT, L5 and L5E roll out with it, L5F in lockstep; no adapter
    is two-model drafting with EventGPT, or the target alone. A level a phase or a drafter cannot run, or a
    missing EventGPT, is one line naming what it needs."""
    head = torch.randn(300, 64)
    lm = dr.DrafterLM(SimpleNamespace())  # never started here
    picks = {"L1": ("EventGPTDrafter", True), "L4": ("EventGPTDrafter", True), "B1": ("RolloutDrafter", False),
             "L5": ("RolloutDrafter", True), "L5E": ("RolloutDrafter", True), "L5F": ("FusedDrafter", True)}
    for level, (cls, uses_egpt) in picks.items():
        drafter = dr.make_drafter(create_adapter(level, 64).eval(), head, lm=lm, min_confidence=CONFIDENCE)
        assert type(drafter).__name__ == cls == dr.drafter_for(create_adapter(level, 64).config), level
        assert drafter.uses_drafter_model == uses_egpt and isinstance(drafter.length, dr.ConfidenceStop), level
        assert getattr(drafter, "lm", None) is (lm if uses_egpt else None), level
    assert type(dr.make_drafter(create_adapter("L2", 64), head, lm=lm, phase="prefill")) is dr.EventGPTDrafter
    assert dr.make_drafter(None, head, lm=lm).name == "eventgpt+own-head"
    assert type(dr.make_drafter(None, head)) is dr.NoDrafter
    for call, message in (
        (lambda: dr.make_drafter(create_adapter("B1", 64), head, lm=lm, phase="prefill"),
         "per-position level.*got B1.*RolloutDrafter"),
        (lambda: dr.make_drafter(create_adapter("L5F", 64), head, phase="prefill"), "got L5F.*FusedDrafter"),
        (lambda: dr.make_drafter(create_adapter("L5E", 64), head), "L5E .RolloutDrafter. reads EventGPT's prompt-end"),
        (lambda: dr.make_drafter(create_adapter("L1", 64), head), "pass lm="),
        (lambda: dr.make_drafter(None, head, phase="verify"), "phase must be one of prefill, decode"),
        (lambda: dr.RolloutDrafter(create_adapter("L1", 64), head), "got L1 .it drafts with EventGPTDrafter"),
        (lambda: dr.FusedDrafter(lm, create_adapter("B1", 64), head), "got B1 .it drafts with RolloutDrafter"),
        (lambda: dr.EventGPTDrafter(lm, create_adapter("L5F", 64), head), "got L5F .it drafts with FusedDrafter"),
    ):
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


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

        draft = dr.roll_out(states[0][None, None], 3, head, 0.0, None, step, dr.draft_length(None, min_confidence))
        assert len(draft.tokens) == want_tokens and len(calls) == want_steps, (min_confidence, draft, calls)
        assert draft.tokens[0] == 0
    assert dr.draft_prob(torch.tensor([0.0, 0.0]), 0, None) == pytest.approx(0.5)
    assert dr.draft_prob(torch.zeros(2), 1, torch.tensor([0.3, 0.7])) == pytest.approx(0.7)  # sampling: q
    with pytest.raises(ValueError, match="min_confidence"):
        dr.ConfidenceStop(1.5)


def test_expected_gain_stop_by_hand() -> None:
    """Acceptance 0.9 for confident drafts (bin >= 0.5), 0.2 below; drafts cost 1 ms, a verify pass 10 ms.
    After draft 1 (p=0.9): E = 1.9, C = 11, another draft adds ~0.9 * 0.8 = 0.72 tokens for 1 ms: go on.
    After an unsure draft the chance that all drafts so far hold falls to 0.18 and 0.18 * 0.8 * 12 < 1 * 2.08:
    stop. Where a verify pass is cheap (2 ms), the same confident drafts stop after two."""
    accept = [0.2] * 10 + [0.9] * 10
    rule = dr.ExpectedGainStop(accept, 0.8, draft_ms=1.0, verify_ms=10.0)
    rule.begin()
    assert rule.more(0.95) is True
    assert rule.more(0.3) is False
    rule.begin()
    assert all(rule.more(0.99) for _ in range(3))  # 0.9, 0.81, 0.73 all pay at these costs
    cheap = dr.ExpectedGainStop(accept, 0.8, draft_ms=1.0, verify_ms=2.0)
    cheap.begin()
    assert [cheap.more(0.99) for _ in range(2)] == [True, False]  # 0.72 * 3 >= 1.9, then 0.648 * 4 < 2.71
    cal = {"count": [0, 10, 30], "rate": [None, 0.5, 0.9], "accept": [0.5, 0.5, 0.9]}
    built = dr.ExpectedGainStop.from_calibration(cal, draft_ms=1.0, verify_ms=10.0)
    assert built.mean == pytest.approx((5 + 27) / 40) and built.accept == [0.5, 0.5, 0.9]
    with pytest.raises(ValueError):
        dr.ExpectedGainStop([1.5], 0.5, 1.0, 10.0)


def test_expected_gain_stop_prices_the_paths_real_verify_cost() -> None:
    """From a timing profile whose verify pass grows 2 ms per token (10 ms for one, 20 ms for gamma + 1 = 6):
    on the eager path an extra draft costs its 1 ms step plus 2 ms of verify; on the static and compiled
    paths every verify pass with a draft is padded to gamma + 1 anyway, so it costs 20 ms whatever the window
    and an extra draft only its step. At 40% acceptance for the first draft (mean 0.5) the eager rule stops
    after it (0.2 x 13 < 3 x 1.4), the padded one drafts on (0.2 x 21 >= 1 x 1.4)."""
    profile = SimpleNamespace(verify_ms=lambda k: 10.0 + 2.0 * (k - 1), egpt_decode_ms=4.0)
    cal = {"count": [10, 10], "rate": [0.5, 0.5], "accept": [0.4, 0.4]}
    b1 = create_adapter("B1", 64).config
    eager = dr.ExpectedGainStop.from_profile(cal, b1, profile, gamma=5, draft_ms=1.0)
    padded = dr.ExpectedGainStop.from_profile(cal, b1, profile, gamma=5, draft_ms=1.0, padded_verify=True)
    assert (eager.verify_ms, eager.step_ms) == (10.0, 3.0) and (padded.verify_ms, padded.step_ms) == (20.0, 1.0)
    for rule, goes_on in ((eager, False), (padded, True)):
        rule.begin()
        assert rule.more(0.3) is goes_on
    # a lockstep level still pays EventGPT's step per draft on the padded path, L5 its pass per verify
    l5f = dr.ExpectedGainStop.from_profile(cal, create_adapter("L5F", 64).config, profile, 5, 1.0, padded_verify=True)
    l5 = dr.ExpectedGainStop.from_profile(cal, create_adapter("L5", 64).config, profile, 5, 1.0, padded_verify=True)
    assert (l5f.verify_ms, l5f.step_ms) == (20.0, 5.0) and (l5.verify_ms, l5.step_ms) == (24.0, 1.0)


def test_lossless_check_fails_loudly() -> None:
    with pytest.raises(sd.LosslessError, match="position 1"):
        sd.check_lossless([1, 2, 3], [1, 4, 3], "demo")


def _fp16_pair(a: int, b: int, size: float = 20.0, gap: float = 2.0**-6, v: int = 10) -> list[torch.Tensor]:
    """Two logits rows [v] whose best two tokens a, b sit `gap` apart at `size` (2^-6 is one fp16 rounding
    unit at 20: eps 2^-10 x 16), each row preferring a different one: one tie on two paths."""
    rows = [torch.zeros(v), torch.zeros(v)]
    rows[0][a], rows[0][b] = size, size - gap
    rows[1][a], rows[1][b] = size - gap, size
    return rows


class _ScriptedTarget:
    """A TieOracle with scripted answers: `rows[position]` are the logits rows at that position, and
    `continuations[prefix]` the target's own greedy continuation of that prefix."""

    def __init__(self, rows: dict[int, list[torch.Tensor]], continuations: dict[tuple[int, ...], list[int]]) -> None:
        self.rows, self.continuations = rows, continuations
        self.asked: list[tuple[int, ...]] = []

    def logits(self, prefix: list[int]) -> list[torch.Tensor]:
        return self.rows[len(prefix)]

    def continuation(self, prefix: list[int]) -> list[int]:
        self.asked.append(tuple(prefix))
        return self.continuations[tuple(prefix)]


def test_numeric_tie_within_rounding_is_counted_and_a_real_divergence_fails() -> None:
    """Hand-built logits at position 1: tokens 2 and 4 one fp16 rounding unit apart (on both recomputed
    paths, each preferring a different one) are a numeric tie in fp16, never in fp32; the check then goes
    on against the target's continuation of [1, 2]. A margin of 0.5 at the same size, a third token on
    top, or a tie that holds on the clean paths but not on the engine's own verify row is a real
    divergence and raises."""
    tie_rows = _fp16_pair(2, 4)
    target = _ScriptedTarget({1: tie_rows}, {(1, 2): [1, 2, 3]})
    ties = sd.check_lossless([1, 2, 3], [1, 4, 5], "demo", recompute=target, dtype=torch.float16)
    assert [(t.position, t.tokens, t.paths) for t in ties] == [(1, (2, 4), 2)]
    assert 0 < ties[0].margin <= ties[0].tolerance and target.asked == [(1, 2)]
    with pytest.raises(sd.LosslessError, match="position 1"):  # fp32 stays exact
        sd.check_lossless([1, 2, 3], [1, 4, 5], "demo", recompute=target)
    real = torch.zeros(10)
    real[2], real[4] = 20.0, 19.5
    with pytest.raises(sd.LosslessError, match="not a rounding tie"):
        sd.check_lossless([1, 2, 3], [1, 4, 5], "demo", recompute=_ScriptedTarget({1: [real, tie_rows[1]]}, {}),
                          dtype=torch.float16)
    third = tie_rows[0].clone()
    third[0] = 25.0  # neither answer chose the target's best token: not a tie between the two
    with pytest.raises(sd.LosslessError):
        sd.check_lossless([1, 2, 3], [1, 4, 5], "demo", recompute=_ScriptedTarget({1: [third]}, {}),
                          dtype=torch.float16)
    # the clean paths tie, the engine's verify row (appended last by TargetRecompute) is 0.5 apart: not excused
    with pytest.raises(sd.LosslessError, match="not a rounding tie"):
        sd.check_lossless([1, 2, 3], [1, 4, 5], "demo", recompute=_ScriptedTarget({1: [*tie_rows, real]}, {}),
                          dtype=torch.float16)
    assert sd.check_lossless([1, 2], [1, 2], "demo", recompute=_ScriptedTarget({}, {})) == []


def test_a_tie_then_a_divergence_raises() -> None:
    """After the tie at position 1 the answer is compared with the target's own continuation of [1, 2]
    (not with the reference, which went another way, and not left unchecked): the difference there at
    position 3 is beyond rounding and raises, naming the earlier tie."""
    rows3 = torch.zeros(10)
    rows3[7], rows3[9] = 20.0, 18.0
    target = _ScriptedTarget({1: _fp16_pair(2, 4), 3: [rows3]}, {(1, 2): [1, 2, 3, 9, 5]})
    with pytest.raises(sd.LosslessError, match=r"position 3 .*after numeric ties at \[1\]"):
        sd.check_lossless([1, 2, 3, 7, 5], [1, 4, 5, 6, 5], "demo", recompute=target, dtype=torch.float16)
    # and a length the continuation does not share (it ends at EOS where the answer goes on) raises too
    target = _ScriptedTarget({1: _fp16_pair(2, 4)}, {(1, 2): [1, 2, 3]})
    with pytest.raises(sd.LosslessError, match=r"position 3 \(lengths 4 vs 3"):
        sd.check_lossless([1, 2, 3, 7], [1, 4, 5], "demo", recompute=target, dtype=torch.float16)


def test_a_tie_then_a_tie_counts_two() -> None:
    """Two rounding ties on one answer: each is checked on its own logits, the second against the
    continuation after the first, and the answer then matches the continuation after the second."""
    target = _ScriptedTarget({1: _fp16_pair(2, 4), 3: _fp16_pair(7, 9)},
                             {(1, 2): [1, 2, 3, 9, 8], (1, 2, 3, 7): [1, 2, 3, 7, 6]})
    ties = sd.check_lossless([1, 2, 3, 7, 6], [1, 4, 5, 6, 5], "demo", recompute=target, dtype=torch.float16)
    assert [(t.position, t.tokens) for t in ties] == [(1, (2, 4)), (3, (7, 9))]
    assert target.asked == [(1, 2), (1, 2, 3, 7)]


class VerifySpy:
    """A runner wrapper recording, per answer position, the logits row the engine's last pass over it
    produced (the prefill's, then each verify pass's rows; a later pass re-scores positions after a
    rejection)."""

    def __init__(self, runner: Any, prompt_len: int) -> None:
        self.runner, self.prompt_len = runner, prompt_len
        self.rows: dict[int, torch.Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def prefill(self, inputs: VLMInputs, logits_for: str = "all") -> Any:
        out = self.runner.prefill(inputs, logits_for=logits_for)
        self.rows[0] = out.logits[0, -1].clone()
        return out

    def decode(self, ids: torch.Tensor, cache: Any, mask: torch.Tensor) -> Any:
        out = self.runner.decode(ids, cache, mask)
        start = mask.shape[1] - self.prompt_len - ids.shape[1] + 1  # the position row 0 scores
        for i in range(ids.shape[1]):
            self.rows[start + i] = out.logits[0, i].clone()
        return out

    def check_replay(self, t_in: VLMInputs, ref: list[int], gamma: int, **engine: Any) -> sd.SpecOutput:
        """Answer with a controlled drafter (70% right) through this spy, and check that verify_logits gives,
        at every position of the answer, the very row the engine's own pass produced."""
        sometimes = dr.SyntheticDrafter(0.7, self.runner.vocab_size, seed=1)
        sometimes.set_reference(ref)
        out = sd.SpeculativeDecoder(self, sometimes, gamma_decode=gamma, **engine).generate(t_in, None, MAX_NEW)
        assert out.tokens == ref and any(it.accepted for it in out.trace.iterations)
        for pos in range(len(out.tokens)):
            row = sd.verify_logits(self.runner, t_in, out, pos)
            assert torch.equal(row, self.rows[pos]), pos
            assert int(row.argmax()) == out.tokens[pos]
        return out


def test_greedy_continuation_and_the_engines_verify_rows(world: SimpleNamespace) -> None:
    """greedy_continuation of the reference's own prefix is the reference; of a prefix that leaves it, the
    target's greedy answer after that prefix. verify_logits replays the engine's verify passes: on every
    position of the engine's answer it gives the very logits row the engine's pass produced (recorded by a
    spy on the runner), and TargetRecompute appends that row to the four clean ones."""
    vl = world.vl
    (t_in, _), ref = world.prompts[0], world.refs[0]
    assert sd.greedy_continuation(vl, t_in, ref[:2], MAX_NEW) == ref
    other = (ref[1] + 1) % vl.vocab_size
    forced = sd.greedy_continuation(vl, t_in, [ref[0], other], MAX_NEW)
    assert forced[:2] == [ref[0], other] and len(forced) <= MAX_NEW
    assert forced[2] == int(sd.tie_logits(vl, t_in, [ref[0], other])[1].argmax())

    spy = VerifySpy(vl, t_in.attention_mask.shape[1])
    out = spy.check_replay(t_in, ref, gamma=3)
    rows = sd.TargetRecompute(vl, lambda: t_in, MAX_NEW, engine=out).logits(out.tokens[:2])
    assert len(rows) == 5 and torch.equal(rows[-1], spy.rows[2])
    assert len(sd.TargetRecompute(vl, t_in, MAX_NEW).logits(out.tokens[:2])) == 4


def test_tie_logits_recomputes_the_same_position_both_ways(world: SimpleNamespace) -> None:
    """On CPU fp32 the wide and the one-step recomputation agree, and their argmax is the reference's
    token after the prefix."""
    (t_in, _), ref = world.prompts[0], world.refs[0]
    rows = sd.tie_logits(world.vl, t_in, ref[:3])
    assert len(rows) == 4
    for row in rows:
        torch.testing.assert_close(row, rows[0], atol=1e-3, rtol=1e-4)
    if len(ref) > 3:
        assert int(rows[1].argmax()) == ref[3]


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
    lm = dr.DrafterLM(eg)
    lm.start(e_in)
    lm.states_for([3, 4, 5, 6])
    resynced = lm.states_for([3, 4, 9]).clone()  # crop to [3, 4], feed 9
    fresh = dr.DrafterLM(eg)
    fresh.start(VLMInputs(e_in.inputs_embeds.clone(), e_in.attention_mask.clone()))
    torch.testing.assert_close(resynced, fresh.states_for([3, 4, 9]), atol=1e-4, rtol=1e-4)
    assert lm.cache.get_seq_length() == e_in.attention_mask.shape[1] + 3
    assert world.vl.vocab_size > eg.vocab_size  # the toy pair differs as the 7B pair does
    lm.states_for([3, 4, 9, eg.vocab_size + 1])
    assert lm.foreign_tokens == 1


# ----------------------------------------------------------------------------- phase 1


def test_prefill_overlap_is_measured(world: SimpleNamespace) -> None:
    vl, eg, head = world.vl, world.eg, world.head
    t_in, e_in = world.prompts[2]

    def slow_target_vision() -> VLMInputs:
        time.sleep(0.15)  # a slow vision tower: the drafter's whole prefill fits inside it
        return t_in

    lm = dr.DrafterLM(eg)
    pre = dr.EventGPTDrafter(lm, create_adapter("L1", 64).eval(), head)
    threaded = sd.SpeculativeDecoder(vl, dr.NoDrafter(), prefill_drafter=pre, gamma_prefill=100_000)
    p1 = threaded.generate(slow_target_vision, e_in, 4).trace.phase1
    assert p1["overlap_ms"] > 0
    assert p1["drafter_start_ms"] < p1["target_end_ms"]
    assert 1 <= p1["drafted"] < 100_000  # drafting stopped when the target's prefill ended
    sequential = sd.SpeculativeDecoder(vl, dr.NoDrafter(), prefill_drafter=pre, gamma_prefill=5,
                                       concurrent_prefill=False)
    p1 = sequential.generate(t_in, e_in, 4).trace.phase1
    assert p1["overlap_ms"] == 0 and p1["drafted"] == 5


# ----------------------------------------------------------------------------- sampling, end to end


def _tiny_runner(seed: int, vocab: int = 4) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm_runners import VLMRunner

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    llm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        llm.lm_head.weight.mul_(8.0)  # peaked enough that the drafter matters, not uniform
    tok = SimpleNamespace(eos_token_id=vocab + 5, pad_token_id=0, unk_token_id=0)  # EOS never sampled
    return VLMRunner(tokenizer=tok, decoder=llm.model, lm_head=llm.lm_head, device=torch.device("cpu"),
                     dtype=torch.float32, model_path="tiny", config_hash="tiny")


SAMPLING_DRAFTERS = ["eventgpt", "eventgpt-confidence", "b1-token", "l5e-token-gain", "l5f-token"]


@pytest.mark.parametrize("kind", SAMPLING_DRAFTERS)
def test_sampling_engine_is_lossless_in_distribution(kind: str) -> None:
    """First two tokens of a tiny model at temperature 1: SD against the exact target distribution,
    enumerated. Drafters: a perturbed copy with its own head (plain, and stopped at its first unsure
    draft), and random-weight token-input heads in roll-out mode (B1; L5E with EventGPT's context and
    the expected-gain stop) and in lockstep mode (L5F), whose drafts come from the target's LM head."""
    target, draft_model = _tiny_runner(0), _tiny_runner(1)
    prompt = VLMInputs(target.embed_ids([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    d_prompt = VLMInputs(draft_model.embed_ids([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    exact = torch.zeros(4, 4)
    first = torch.softmax(target.prefill(prompt).logits[0, -1], -1)
    for a in range(4):
        out = target.prefill(prompt)
        second = torch.softmax(target.decode(torch.tensor([[a]]), out.cache, torch.ones(1, 4)).logits[0, -1], -1)
        exact[a] = first[a] * second
    gen = torch.Generator().manual_seed(0)
    lm, head = dr.DrafterLM(draft_model), target.lm_head_weight()
    table = target.decoder.get_input_embeddings().weight

    def head_of(level: str) -> nn.Module:
        torch.manual_seed(2)
        adapter = create_adapter(level, 16, dropout=0.0, token_input=True, vocab_size=4)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.3 * torch.randn_like(p))
        return adapter.attach_token_table(table).eval()

    gain = dr.ExpectedGainStop([0.05 * i for i in range(20)], 0.5, draft_ms=0.5, verify_ms=1.0)
    drafter = {
        "eventgpt": lambda: dr.EventGPTDrafter(lm, None, draft_model.lm_head_weight(), 1.0, gen),
        "eventgpt-confidence": lambda: dr.EventGPTDrafter(lm, None, draft_model.lm_head_weight(), 1.0, gen,
                                                          min_confidence=0.3),
        "b1-token": lambda: dr.RolloutDrafter(head_of("B1"), head, 1.0, gen),
        "l5e-token-gain": lambda: dr.RolloutDrafter(head_of("L5E"), head, 1.0, gen, lm=lm, length=gain),
        "l5f-token": lambda: dr.FusedDrafter(lm, head_of("L5F"), head, 1.0, gen),
    }[kind]()
    prefill = drafter if kind.startswith("eventgpt") else None
    engine = sd.SpeculativeDecoder(target, drafter, gamma_decode=2, prefill_drafter=prefill,
                                   gamma_prefill=2 if prefill else 0, temperature=1.0, generator=gen,
                                   concurrent_prefill=False)
    n = 1500
    counts = torch.zeros(4, 4)
    accepted = stopped = 0
    for _ in range(n):
        # decode drafting needs room for a draft: 3 tokens give one draft at position 1 (its first two are scored)
        out = engine.generate(prompt, d_prompt, 2 if prefill else 3)
        counts[out.tokens[0], out.tokens[1]] += 1
        if prefill:
            accepted += out.trace.phase1["first_accepted"]
            stopped += out.trace.phase1["drafted"] < 2
        else:
            accepted += sum(it.accepted for it in out.trace.iterations)
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert tv < 0.06, f"total variation {tv:.3f} between SD samples and the target's distribution"
    assert 0 < accepted < n  # the drafter was sometimes right and sometimes corrected
    if prefill:
        assert (0 < stopped < n) if kind == "eventgpt-confidence" else stopped == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_streams_stay_lossless(quick_world: Path) -> None:
    """The GPU path: phase 1 on a side stream, every stage timed between stream syncs, same answers."""
    import model_builders as mb
    from clip_data import load_index, load_questions

    vl = mb.load_video_llava(quick_world / "models" / "video_llava", device="cuda", dtype="fp32")
    eg = mb.load_eventgpt(quick_world / "models" / "eventgpt", device="cuda", dtype="fp32")
    ds = quick_world / "dataset"
    head = vl.lm_head_weight()
    lm = dr.DrafterLM(eg)
    adapter = create_adapter("L1", 64).cuda().eval()
    engine = sd.SpeculativeDecoder(vl, dr.EventGPTDrafter(lm, adapter, head), gamma_decode=3,
                                   prefill_drafter=dr.EventGPTDrafter(lm, adapter, head), gamma_prefill=4)
    for clip in load_index(ds, "test"):
        for q in load_questions(ds)[:3]:
            t_in = vl.build_inputs([vl.clip_features(ds / "test", clip)], [q])
            e_in = eg.build_inputs([eg.clip_features(ds / "test", clip)], [q])
            out = engine.generate(t_in, e_in, 12)
            sd.check_lossless(out.tokens, sd.greedy_reference(vl, t_in, 12), q)
            assert "overlap_ms" in out.trace.phase1


def test_offline_rollout_matches_live_acceptance(world: SimpleNamespace, quick_world: Path,
                                                  quick_hidden: Path) -> None:
    """The offline roll-out on the live schedule (metrics.RolloutAccumulator over adapter.rollout on the
    stored test states) predicts what the live engine accepts on the same samples: same drafter, same
    gamma, same answer cap. They differ only where fp16 storage or batched extraction moves a near-tie."""
    from clip_data import load_index, load_questions
    from hidden_adapter import adapter_inputs
    from metrics import RolloutAccumulator, draft_tokens
    from tests.conftest import QUICK_T

    vl, head, gamma = world.vl, world.head, 3
    b1 = fitted_adapter("B1", quick_hidden, token_table=vl.decoder.get_input_embeddings().weight, rollout=2)
    offline = RolloutAccumulator(gamma, max_new_tokens=QUICK_T)
    ids: list[str] = []
    with torch.no_grad():
        for chunk in iter_chunks(quick_hidden / "test", expect_teacher_forced=True):
            x, kw = adapter_inputs(b1, chunk["egpt_hidden_tf"].float(), chunk["vl_hidden"].float(), chunk["vl_tokens"])
            outs = b1.rollout(x, chunk["vl_mask"], gamma, **kw)
            offline.update(*draft_tokens(outs, head, chunk["vl_mask"]), chunk["vl_tokens"], chunk["vl_mask"])
            ids += chunk["sample_ids"]
    ds = quick_world / "dataset"
    clips = {c["id"]: c for c in load_index(ds, "test")}
    questions = load_questions(ds)
    engine = sd.SpeculativeDecoder(vl, dr.RolloutDrafter(b1, head), gamma_decode=gamma)
    accepted = iterations = 0
    for sample in ids:
        clip_id, q = sample.split("#q")
        t_in = vl.build_inputs([vl.clip_features(ds / "test", clips[clip_id])], [questions[int(q)]])
        out = engine.generate(t_in, None, QUICK_T)
        sd.check_lossless(out.tokens, sd.greedy_reference(vl, t_in, QUICK_T), sample)
        accepted += sum(it.accepted for it in out.trace.iterations)
        iterations += len(out.trace.iterations)
    m = offline.compute()
    assert accepted > 0 and m["live_accepted_per_iteration"] > 0  # a drafter that sometimes matches
    assert m["live_iterations"] == pytest.approx(iterations, abs=len(ids))  # at most one iteration apart per answer
    assert abs(accepted / iterations - m["live_accepted_per_iteration"]) < 0.1, (accepted / iterations, m)
