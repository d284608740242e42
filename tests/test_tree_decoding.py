"""Draft trees: the ancestor mask, one verify pass over a tree through transformers' own model (eager and
sdpa), compaction against a fresh prefill, greedy losslessness with controlled and roll-out tree drafters
on many prompts, acceptance counts, and the refusals (sampling, static path, levels that keep chains)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import draft_trees as dt
import drafters as dr
import speculative_decoding as sd
from hidden_adapter import create_adapter
from vlm_runners import VLMInputs, VLMRunner, tree_ancestors

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 48
NUM_PROMPTS = 40
MAX_NEW = 12


def tiny_runner(attn: str = "sdpa", seed: int = 0, kv_heads: int = 2) -> VLMRunner:
    """A two-layer random LLaMA behind the runner interface, its head sharpened so greedy answers vary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      attn_implementation=attn)
    llm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        llm.lm_head.weight.mul_(6.0)
    tok = SimpleNamespace(eos_token_id=VOCAB - 1, pad_token_id=0, unk_token_id=0)
    return VLMRunner(tokenizer=tok, decoder=llm.model, lm_head=llm.lm_head, device=torch.device("cpu"),
                     dtype=torch.float32, model_path="tiny", config_hash=f"tiny-{attn}")


def prompts(runner: VLMRunner, n: int = NUM_PROMPTS) -> list[VLMInputs]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB - 1, (1, 3 + i % 5), generator=gen)
        out.append(VLMInputs(runner.embed_ids(ids), torch.ones(1, ids.shape[1], dtype=torch.long)))
    return out


@pytest.fixture(scope="module")
def world() -> SimpleNamespace:
    vl = tiny_runner()
    ps = prompts(vl)
    return SimpleNamespace(vl=vl, prompts=ps, refs=[sd.greedy_reference(vl, p, MAX_NEW) for p in ps])


def _path(parents: list[int], node: int) -> list[int]:
    """Node indices from the root's child down to `node`."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


# a tree over the root (row 0): nodes 0 1 2 at depth 1, 3 4 under 0, 5 under 4, 6 under 2
PARENTS = [-1, -1, -1, 0, 0, 4, 2]


def test_ancestor_mask_and_depths() -> None:
    allowed, depth = tree_ancestors(PARENTS)
    assert depth.tolist() == [0, 1, 1, 1, 2, 2, 3, 2]
    assert allowed[6].nonzero().flatten().tolist() == [0, 1, 5, 6]  # node 5: root, 0, 4, itself
    assert allowed[7].nonzero().flatten().tolist() == [0, 3, 7]
    draft = dr.Draft([10, 11, 12, 13, 14, 15, 16], parents=PARENTS)
    assert draft.depths() == [1, 1, 1, 2, 2, 3, 2]
    assert draft.cut(0, 2) == dr.Draft([10, 11, 12, 13, 14, 16], parents=[-1, -1, -1, 0, 0, 2])
    with pytest.raises(ValueError, match="parent"):
        tree_ancestors([0])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tree_verify_rows_equal_each_paths_own_pass(attn: str) -> None:
    """Row r of one tree pass = the last row of a chain pass over the prefix, the root and r's path:
    positions are prefix + depth and each row sees its ancestors only (eager adds the mask: a bool mask
    would pass a wrong row here)."""
    vl = tiny_runner(attn, kv_heads=1)
    prompt = prompts(vl, 1)[0]
    tokens = [5, 9, 17, 3, 22, 30, 8]
    step = vl.prefill(prompt, logits_for="last")
    length = prompt.attention_mask.shape[1]
    step = vl.decode(torch.tensor([[7]]), step.cache, torch.ones(1, length + 1, dtype=torch.long))
    tree = vl.verify_tree(torch.tensor([[4, *tokens]]), PARENTS, step.cache,
                          torch.ones(1, length + 2 + len(tokens), dtype=torch.long))
    for row in range(len(tokens) + 1):
        path = [] if row == 0 else _path(PARENTS, row - 1)
        fresh = vl.prefill(prompt, logits_for="last")
        ids = [7, 4, *(tokens[i] for i in path)]
        chain = vl.decode(torch.tensor([ids]), fresh.cache, torch.ones(1, length + len(ids), dtype=torch.long))
        torch.testing.assert_close(tree.logits[0, row], chain.logits[0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tree.hidden[0, row], chain.hidden[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_compaction_equals_a_fresh_prefill(attn: str) -> None:
    """After a tree pass, keeping the root and an accepted path leaves the cache a fresh prefill of the
    prompt, root and path would hold (keys at consecutive positions, rotary phases of the path's own)."""
    vl = tiny_runner(attn)
    prompt = prompts(vl, 1)[0]
    tokens = [5, 9, 17, 3, 22, 30, 8]
    length = prompt.attention_mask.shape[1]
    for path in ([], [0], [1], [2, 6], [0, 4, 5], [0, 3]):
        step = vl.prefill(prompt, logits_for="last")
        vl.verify_tree(torch.tensor([[4, *tokens]]), PARENTS, step.cache,
                       torch.ones(1, length + 1 + len(tokens), dtype=torch.long))
        vl.compact_cache(step.cache, length, [0, *(i + 1 for i in path)])
        ids = [4, *(tokens[i] for i in path)]
        embeds = torch.cat([prompt.inputs_embeds, vl.embed_ids([ids])], dim=1)
        fresh = vl.prefill(VLMInputs(embeds, torch.ones(1, embeds.shape[1], dtype=torch.long)))
        assert step.cache.get_seq_length() == fresh.cache.get_seq_length() == length + len(ids)
        for mine, theirs in zip(step.cache.layers, fresh.cache.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)


def test_greedy_tree_acceptance_by_hand() -> None:
    logits = torch.full((8, VOCAB), -1.0)
    # the target's argmax: after the root 11, after node 1 (11) 14, after node 4 (14) 40
    for row, tok in ((0, 11), (2, 14), (5, 40)):
        logits[row, tok] = 1.0
    draft = dr.Draft([10, 11, 12, 13, 14, 15, 16], parents=PARENTS)
    assert sd.accept_tree(logits, draft) == ([1], 14)  # node 1's children: none
    draft = dr.Draft([10, 11, 12, 13, 14, 15, 16], parents=[-1, -1, -1, 1, 1, 4, 2])
    assert sd.accept_tree(logits, draft) == ([1, 4], 40)
    chain = dr.Draft([11, 14, 3])
    n, nxt = sd.accept_drafts(logits[[0, 2, 5, 1]], chain, 0.0, None)
    assert sd.accept_tree(logits[[0, 2, 5, 1]], chain) == (list(range(n)), nxt)


class ScriptedTreeDrafter:
    """Trees with known right and wrong branches: at each depth `width` siblings, the reference token at
    sibling `right` (wrong tokens elsewhere) for the first `hits` depths of a window, none after."""

    uses_drafter_model = False
    name = "scripted-tree"
    tree = dt.TreeSpec()

    def __init__(self, width: int, right: int, hits: int, vocab: int = VOCAB) -> None:
        self.width, self.right, self.hits, self.vocab = width, right, hits, vocab
        self.reference: list[int] = []

    def begin(self, inputs: Any) -> None:
        self.n = 0

    def draft(self, k: int, stop: Any = None) -> dr.Draft:
        tokens: list[int] = []
        parents: list[int] = []
        parent = -1
        for depth in range(k):
            pos = self.n + depth
            true = self.reference[pos] if pos < len(self.reference) else 0
            row = [(true + 1 + j) % self.vocab for j in range(self.width)]
            if depth < self.hits:
                row[self.right] = true
            first = len(tokens)
            tokens += row
            parents += [parent] * self.width
            parent = first + self.right
        return dr.Draft(tokens, parents=parents)

    def accept(self, tokens: list[int], states: torch.Tensor, layers: torch.Tensor | None = None) -> None:
        self.n += len(tokens)


@pytest.mark.parametrize("width,right,hits", [(1, 0, 5), (3, 2, 5), (3, 1, 2), (2, 0, 0), (4, 3, 3)])
def test_scripted_trees_are_lossless_with_known_acceptance(world: SimpleNamespace, width: int, right: int,
                                                           hits: int) -> None:
    drafter = ScriptedTreeDrafter(width, right, hits)
    engine = sd.SpeculativeDecoder(world.vl, drafter, gamma_decode=5)
    for prompt, ref in zip(world.prompts, world.refs, strict=True):
        drafter.reference = ref
        out = engine.generate(prompt, None, MAX_NEW)
        assert out.tokens == ref
        for it in out.trace.iterations:
            assert it.nodes == width * it.drafted and it.parents is not None
            # EOS or the answer's end cut the last window; elsewhere exactly `hits` depths hold
            assert it.accepted <= min(hits, it.drafted)
            if it is not out.trace.iterations[-1]:
                assert it.accepted == min(hits, it.drafted)
        summary = sd.summarise_trace(out.trace)
        assert summary["accepted"] == sum(it.accepted for it in out.trace.iterations)


@pytest.mark.parametrize("p,width", [(0.5, 1), (0.5, 3), (0.8, 2), (1.0, 2), (0.0, 3)])
def test_synthetic_trees_are_lossless_and_hold_as_designed(world: SimpleNamespace, p: float, width: int) -> None:
    """The controlled tree drafter: every answer the target's; the first depth of a window holds with
    probability 1 - (1 - p)^width (windows the answer's end does not cut)."""
    drafter = dt.SyntheticTreeDrafter(p, VOCAB, width=width, seed=3)
    engine = sd.SpeculativeDecoder(world.vl, drafter, gamma_decode=4)
    first_held = windows = 0
    for prompt, ref in zip(world.prompts, world.refs, strict=True):
        drafter.set_reference(ref)
        out = engine.generate(prompt, None, MAX_NEW)
        assert out.tokens == ref
        for it in out.trace.iterations[:-1]:
            windows += 1
            first_held += it.accepted >= 1
            assert it.nodes == width * it.drafted
    rate = first_held / windows
    assert abs(rate - (1 - (1 - p) ** width)) < 0.15, rate
    if p == 1.0:
        assert rate == 1.0


def random_b1(vl: VLMRunner, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    adapter = create_adapter("B1", vl.hidden_size, dropout=0.0, token_input=True, vocab_size=VOCAB)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return adapter.attach_token_table(vl.decoder.get_input_embeddings().weight).eval()


@pytest.mark.parametrize("spec", [dt.TreeSpec(4, 1, 4), dt.TreeSpec(4, 3, 10), dt.TreeSpec(5, 4, 24),
                                  dt.TreeSpec(3, 2, 2), dt.TreeSpec(5, 4, 20, frontier=1),
                                  dt.TreeSpec(4, 3, 7, frontier=1), dt.TreeSpec(4, 3, 20, frontier=2)])
def test_rollout_trees_are_lossless(world: SimpleNamespace, spec: dt.TreeSpec) -> None:
    """B1's dynamic trees (one batched adapter step per depth) on every prompt: the target's greedy answer;
    topk 1 with the budget at the depth is the chain, same drafts and acceptance as the chain drafter."""
    head = world.vl.lm_head_weight()
    adapter = random_b1(world.vl)
    tree = sd.SpeculativeDecoder(world.vl, dt.tree_drafter(adapter, head, spec), gamma_decode=spec.depth)
    chain = sd.SpeculativeDecoder(world.vl, dr.make_drafter(adapter, head), gamma_decode=spec.depth)
    for prompt, ref in zip(world.prompts, world.refs, strict=True):
        out = tree.generate(prompt, None, MAX_NEW)
        assert out.tokens == ref
        for it in out.trace.iterations:
            assert it.nodes <= spec.budget and it.drafted <= spec.depth
            assert it.nodes > 0 or not it.draft  # the answer's last token is drafted as nothing
        if spec.topk == 1 and spec.budget == spec.depth:
            base = chain.generate(prompt, None, MAX_NEW)
            assert [it.draft for it in out.trace.iterations] == [it.draft for it in base.trace.iterations]
            assert [it.accepted for it in out.trace.iterations] == [it.accepted for it in base.trace.iterations]


@pytest.mark.parametrize("budget", [20, 9])
def test_frontier_one_is_the_chain_with_its_runners_up(world: SimpleNamespace, budget: int) -> None:
    """Frontier 1: the draft's first nodes are the greedy path, and with every candidate kept (budget 20: no
    scores read) that path is exactly the chain drafter's window; every other node is a leaf under a path
    node, one of the k likeliest tokens there. With budget 9 the rerank keeps a prefix of the path and the
    best leaves. The engine's answers are the target's, and a window accepted along the path is a crop."""
    head = world.vl.lm_head_weight()
    adapter = random_b1(world.vl, seed=3)
    spec = dt.TreeSpec(5, 4, budget, frontier=1)
    tree, chain = dt.tree_drafter(adapter, head, spec), dr.make_drafter(adapter, head)
    assert spec.max_nodes(5) == budget and spec.name == f"tree(d5,k4,f1,n{budget})"
    for prompt, ref in list(zip(world.prompts, world.refs, strict=True))[:6]:
        states = world.vl.generate(prompt, MAX_NEW).hidden[0, : len(ref)]
        for d in (tree, chain):
            d.begin(None)
            d.accept(ref[:1], states[:1])
        for done in range(1, len(ref) - 2, 2):
            t, c = tree.draft(5), chain.draft(5)
            n = next((i for i, p in enumerate(t.parents) if p != i - 1), len(t.parents))  # the leading path
            assert (n == 5) if budget == 20 else (1 <= n <= 5)
            assert t.tokens[:n] == c.tokens[:n] and len(t.tokens) == budget
            assert all(0 <= p < n or p == -1 for p in t.parents[n:])  # the rest are leaves under the path
            assert not set(range(n, budget)) & set(t.parents)
            for i in range(n, budget):  # a leaf is a runner-up at its depth: not the path's own token there
                if t.parents[i] + 1 < n:
                    assert t.tokens[i] != t.tokens[t.parents[i] + 1]
            for d in (tree, chain):
                d.accept(ref[done:done + 2], states[done:done + 2])
    engine = sd.SpeculativeDecoder(world.vl, tree, gamma_decode=5)
    crops = 0
    for prompt, ref in zip(world.prompts, world.refs, strict=True):
        out = engine.generate(prompt, None, MAX_NEW)
        assert out.tokens == ref
        crops += sum(bool(it.path) and it.path == list(range(len(it.path))) for it in out.trace.iterations)
    assert crops > 0


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_tree_nodes_see_only_their_ancestors(path: str) -> None:
    """Each tree node's adapter output equals a chain roll-out along that node's own path (on a dynamic
    cache), whether the tree was drafted on the adapter's dynamic or its static cache."""
    vl = tiny_runner()
    head = vl.lm_head_weight()
    adapter = random_b1(vl, seed=2)
    drafter = dt.tree_drafter(adapter, head, dt.TreeSpec(3, 3, 27))
    if path == "static":
        drafter.use_static_cache(4)
        buffers = [k.data_ptr() for k in drafter.cache.keys]
    assert drafter.decode_path == path
    prompt = prompts(vl, 1)[0]
    step = vl.prefill(prompt, logits_for="last")
    drafter.begin(None)
    first = int(step.logits[0, -1].argmax())
    drafter.accept([first], step.hidden[0, -1:])
    draft = drafter.draft(3)
    assert len(draft.tokens) == 3 + 9 + 9  # budget above the tree's size: every candidate kept
    cache = dr.DynamicAdapterCache(adapter)
    h0 = cache(torch.stack(drafter.states)[None], token_ids=torch.tensor([[first]]))
    for node in [-1, *range(len(draft.tokens))]:
        children = {draft.tokens[c] for c, p in enumerate(draft.parents) if p == node}
        if not children:
            continue
        cache.crop(1)  # a chain roll-out along the node's own path, one step per token
        h = h0[:, -1:]
        for a in ([] if node < 0 else _path(draft.parents, node)):
            h = cache(h, token_ids=torch.tensor([[draft.tokens[a]]]))
        assert children == set((h[0, 0] @ head.T).topk(3).indices.tolist())
    if path == "static":  # written in place after the verified position, 3 nodes expanded per depth
        assert [k.data_ptr() for k in drafter.cache.keys] == buffers and drafter.cache.length == 1 + 3 * 2


def test_tree_trace_replays_for_the_lossless_check(world: SimpleNamespace) -> None:
    """verify_logits replays a tree answer's passes (ancestor mask, compaction): its rows are the target's."""
    drafter = dt.SyntheticTreeDrafter(0.7, VOCAB, width=3, seed=0)
    engine = sd.SpeculativeDecoder(world.vl, drafter, gamma_decode=4)
    prompt, ref = world.prompts[3], world.refs[3]
    drafter.set_reference(ref)
    out = engine.generate(prompt, None, MAX_NEW)
    assert any(it.path and it.path != list(range(len(it.path))) for it in out.trace.iterations), "no compaction"
    for pos in range(len(ref)):
        row = sd.verify_logits(world.vl, prompt, out, pos)
        assert int(row.argmax()) == ref[pos]
    assert sd.check_lossless(out.tokens, ref, "tree", sd.TargetRecompute(world.vl, prompt, MAX_NEW, engine=out)) == []


def test_sampling_and_other_levels_keep_chains(world: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    head = world.vl.lm_head_weight()
    adapter = random_b1(world.vl)
    with caplog.at_level(logging.WARNING, logger="xmodal_sd"):
        sampled = dt.tree_drafter(adapter, head, dt.TreeSpec(), temperature=1.0)
    assert isinstance(sampled, dr.RolloutDrafter) and not hasattr(sampled, "tree") and "drafts chains" in caplog.text
    engine = sd.SpeculativeDecoder(world.vl, dt.SyntheticTreeDrafter(1.0, VOCAB), temperature=1.0)
    with pytest.raises(ValueError, match="greedily"):
        engine.generate(world.prompts[0], None, MAX_NEW)
    l5f = create_adapter("L5F", world.vl.hidden_size, dropout=0.0)
    with pytest.raises(ValueError, match="keeps chains"):
        dt.tree_drafter(l5f, head, dt.TreeSpec(), lm=object())


@pytest.mark.parametrize("compile,spec", [(False, dt.TreeSpec(4, 3, 9)), (True, dt.TreeSpec(4, 3, 9)),
                                          (False, dt.TreeSpec(4, 2, 8, frontier=1))])
def test_static_path_drafts_the_same_trees_and_answers(world: SimpleNamespace, compile: bool,
                                                       spec: dt.TreeSpec) -> None:
    """The static (and compiled) path: every tree pass padded to one width over the full-width mask, the
    compaction in place (the cache's buffers keep their addresses); same drafts, acceptance and answers as
    the dynamic path, for B1's trees (EAGLE-2's frontier, and frontier 1 on the chain's own static step) and
    the controlled tree drafter."""
    static = tiny_runner()  # the same weights as world.vl (seed 0), on its own static cache
    head = world.vl.lm_head_weight()
    adapter = random_b1(world.vl)
    n = 3 if compile else 16
    for make in (lambda: dt.tree_drafter(adapter, head, spec), lambda: dt.SyntheticTreeDrafter(0.6, VOCAB, 2)):
        fast = sd.SpeculativeDecoder(static, make(), gamma_decode=4, static_cache=True, compile=compile,
                                     max_cache_len=64)
        slow = sd.SpeculativeDecoder(world.vl, make(), gamma_decode=4)
        assert static.tree_width == 9 + 1 - (spec.frontier == 1)  # B1's tree; the controlled tree's 4 x 2 fit
        if isinstance(fast.drafter, dt.TreeRolloutDrafter):  # B1 drafts its trees on its own static cache
            assert fast.drafter.decode_path == ("compiled" if compile else "static")
            assert slow.drafter.decode_path == "dynamic"
        for prompt, ref in list(zip(world.prompts, world.refs, strict=True))[:n]:
            for engine in (fast, slow):
                if isinstance(engine.drafter, dt.SyntheticTreeDrafter):
                    engine.drafter.rng.manual_seed(0)
                    engine.drafter.set_reference(ref)
            a, b = fast.generate(prompt, None, MAX_NEW), slow.generate(prompt, None, MAX_NEW)
            assert a.tokens == b.tokens == ref
            assert [(it.draft, it.parents, it.path) for it in a.trace.iterations] == \
                   [(it.draft, it.parents, it.path) for it in b.trace.iterations]
        kv = static._static
        before = [layer.keys.data_ptr() for layer in kv.cache.layers]
        oracle = sd.TargetRecompute(static, prompt, MAX_NEW, engine=a)  # replays the tree passes on this path
        assert sd.check_lossless(a.tokens, ref, "static tree", oracle) == []
        assert [layer.keys.data_ptr() for layer in kv.cache.layers] == before


@pytest.mark.parametrize("spec", [None, dt.TreeSpec(4, 3, 12), dt.TreeSpec(4, 4, 16, frontier=1)])
def test_offline_schedule_replay_matches_live(world: SimpleNamespace, spec: dt.TreeSpec | None) -> None:
    """replay_schedule on the recorded greedy answers and their states gives the live engine's passes:
    the same depth drafted and drafts accepted per verify pass, chain and tree."""
    head = world.vl.lm_head_weight()
    adapter = random_b1(world.vl, seed=1)

    def make() -> dr.Drafter:
        return dr.make_drafter(adapter, head) if spec is None else dt.tree_drafter(adapter, head, spec)

    engine = sd.SpeculativeDecoder(world.vl, make(), gamma_decode=4)
    same = 0
    for prompt, ref in zip(world.prompts, world.refs, strict=True):
        live = [(it.drafted, it.accepted) for it in engine.generate(prompt, None, MAX_NEW).trace.iterations]
        states = world.vl.generate(prompt, MAX_NEW).hidden[0, : len(ref)]
        offline = dr.replay_schedule(make(), states, ref, 4, MAX_NEW)
        same += offline == live
    assert same >= 0.95 * len(world.prompts)


def test_offline_replay_in_measure_feature_acceptance(tmp_path: Any) -> None:
    """measure_feature_acceptance --tree_budget: the chain's replay of the live schedule equals the offline
    roll-out's live-schedule figure (two implementations of one schedule), and a one-branch tree is the chain."""
    import measure_feature_acceptance as mfa
    from tests.test_measure_feature_acceptance import checkpoint, write_test_data

    _, _, head = write_test_data(tmp_path / "test")
    _, ckpt = checkpoint(tmp_path, "B1", "teacher_forced")
    common = ["--checkpoint", str(ckpt), "--test_data", str(tmp_path / "test"), "--lm_head", str(head),
              "--device", "cpu", "--gamma_decode", "3"]
    for topk, budget in ((1, 3), (3, 8)):
        result = mfa.main(mfa.parse_args([*common, "--output_dir", str(tmp_path / f"out{topk}"), "--tree_budget",
                                          str(budget), "--tree_topk", str(topk)]))
        replay = result["schedule_replay"]
        assert replay["tree_spec"] == {"depth": 3, "topk": topk, "frontier": topk, "budget": budget, "auto": False}
        live = result["drafting"]["rollout"]["live_tokens_per_verify"]
        assert replay["chain"]["tokens_per_verify"] == pytest.approx(live, abs=1e-6)
        assert replay["chain"]["verify_passes"] == result["drafting"]["rollout"]["live_iterations"]
        if topk == 1:
            assert replay["tree"] == replay["chain"]
        else:
            assert replay["tree"]["tokens_per_verify"] >= replay["chain"]["tokens_per_verify"]


def test_auto_budget_picks_the_most_tokens_per_ms() -> None:
    # verify costs 1 ms up to 8 positions, then 1 ms more per position; draft steps free
    auto = dt.AutoTreeBudget([0.0, 0.5, 1.0], lambda k: 1.0 if k <= 8 else k - 7.0, 0.0)
    assert auto.calibrated(0.1) == 0.0 and auto.calibrated(0.5) == 0.5 and auto.calibrated(1.0) == 1.0
    assert auto.choose([0.9] * 20, 3) == 7  # free width up to 8 positions, then each node costs more than it adds
    assert auto.choose([0.9, 0.0, 0.0], 3) == 1  # ties keep the smallest tree
    costly = dt.AutoTreeBudget([1.0], lambda k: float(k), 0.0)  # every position costs a verify step
    assert costly.choose([0.9, 0.5, 0.1], 2) == 1


def test_auto_budget_trees_are_lossless_and_vary_per_window(world: SimpleNamespace) -> None:
    head = world.vl.lm_head_weight()
    adapter = random_b1(world.vl)
    auto = dt.AutoTreeBudget([0.1 * i for i in range(11)], lambda k: 1.0 + 0.05 * k, 0.1)
    spec = dt.TreeSpec(4, 3, 20, auto=auto)
    assert spec.name == "tree(d4,k3,nauto<=20)" and spec.record()["auto"]
    engine = sd.SpeculativeDecoder(world.vl, dt.tree_drafter(adapter, head, spec), gamma_decode=4)
    sizes = set()
    for prompt, ref in zip(world.prompts, world.refs, strict=True):
        out = engine.generate(prompt, None, MAX_NEW)
        assert out.tokens == ref
        sizes |= {it.nodes for it in out.trace.iterations if it.draft}
    assert len(sizes) > 1 and max(sizes) <= 20


def test_a_tree_pass_is_one_pass_at_its_width_on_the_static_path() -> None:
    """Why the timing profile times a tree's width with verify_tree (e2e_measure.measure_profile): on the
    static path `decode` runs 16 positions as passes of gamma + 1 = 6, while a tree of 16 rows is one pass."""
    vl = tiny_runner()
    vl.use_static_cache(64, 6, False)
    prompt = prompts(vl, 1)[0]
    widths: list[int] = []
    step = vl._step

    def counted(token_ids: torch.Tensor, *args: Any) -> Any:
        widths.append(token_ids.shape[1])
        return step(token_ids, *args)

    vl._step = counted
    out = vl.prefill(prompt, logits_for="last")
    length = prompt.attention_mask.shape[1]
    ids, mask = torch.full((1, 16), 5), torch.ones(1, length + 16, dtype=torch.long)
    widths.clear()
    vl.decode(ids, out.cache, mask)
    assert widths == [6, 6, 6]
    vl.crop_cache(out.cache, length)
    widths.clear()
    vl.verify_tree(ids, list(range(-1, 14)), out.cache, mask)
    assert widths == [16]
