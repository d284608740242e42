"""Draft trees (issue 26): EAGLE-2-style dynamic trees from the roll-out heads, their budget rule, and the
controlled tree drafter. A tree is a `drafters.Draft` with `parents`; the engine verifies it in one target
pass (speculative_decoding, runner.verify_tree) and keeps the longest accepted root path.

    from draft_trees import TreeSpec, tree_drafter
    drafter = tree_drafter(b1_adapter, head, TreeSpec(depth=5, topk=4, budget=16))
    engine = SpeculativeDecoder(vl, drafter, gamma_decode=5)       # greedy: every answer the target's own

  - `TreeSpec`             the tree's shape: depth, branching (topk) and node budget, or `auto`.
  - `AutoTreeBudget`       EAGLE-2's `total_token=-1`: per window the budget of most expected tokens per ms,
                           from the calibrated acceptance and the run's measured verify cost by width.
  - `build_tree`           the EAGLE-2 builder: expand the best frontier nodes by cumulative log-probability,
                           one batched adapter step per depth, then rerank every candidate to the budget.
  - `tree_step`            that batched step on an adapter cache: each node attends to the verified positions
                           and its own ancestors' entries only.
  - `TreeRolloutDrafter`   a roll-out level (B1, L5, L5E) drafting trees; `tree_drafter` makes one (sampling
                           drafts chains: trees are verified greedily).
  - `SyntheticTreeDrafter` the controlled drafter as a tree, at a known acceptance per sibling.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from common import log
from drafters import (
    ROLLOUT_LEVELS,
    Draft,
    Drafter,
    DrafterLM,
    DynamicAdapterCache,
    RolloutDrafter,
    StaticAdapterCache,
    SyntheticDrafter,
    _dtype,
    make_drafter,
)
from hidden_adapter import ProjectedContext

# ----------------------------------------------------------------------------------------------
# The tree's shape, its budget rule and the builder
# ----------------------------------------------------------------------------------------------


class AutoTreeBudget:
    """EAGLE-2's `total_token=-1`: each window's node budget chosen for the most expected tokens per
    millisecond. A node is accepted iff its whole path is, so the expected accepted drafts of a tree is the
    sum over its nodes of the product of the calibrated acceptance of each token's own draft probability
    along its path (`accept_by_bin`: equal-width bins over [0, 1], a checkpoint's draft_calibration, measured
    on top-1 roll-out drafts and read here for every candidate). Keeping the n best nodes costs one verify
    of n + 1 positions (`verify_ms`, the run's measured costs) plus one adapter step per depth (`draft_ms`)."""

    def __init__(self, accept_by_bin: list[float], verify_ms: Callable[[float], float], draft_ms: float) -> None:
        if not accept_by_bin or any(not 0.0 <= a <= 1.0 for a in accept_by_bin) or draft_ms < 0:
            raise ValueError("accept_by_bin must hold acceptance rates in [0, 1] and draft_ms must be >= 0")
        self.accept, self.verify_ms, self.draft_ms = list(accept_by_bin), verify_ms, draft_ms

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any], verify_ms: Callable[[float], float],
                         draft_ms: float) -> AutoTreeBudget:
        return cls([0.0 if a is None else float(a) for a in calibration["accept"]], verify_ms, draft_ms)

    def calibrated(self, prob: float) -> float:
        return self.accept[min(int(prob * len(self.accept)), len(self.accept) - 1)]

    def choose(self, path_accept: list[float], depth: int) -> int:
        """The n (>= 1) of most (1 + sum of the n best nodes' path acceptance) / cost(n), nodes best first."""
        best, best_n, expected = -1.0, 1, 1.0
        for n, p in enumerate(path_accept, 1):
            expected += p
            rate = expected / (self.verify_ms(n + 1) + depth * self.draft_ms)
            if rate > best:
                best, best_n = rate, n
        return best_n


@dataclass(frozen=True)
class TreeSpec:
    """The shape of an EAGLE-2-style dynamic draft tree: at most `depth` levels (the engine's gamma caps
    it); at each depth the `frontier` nodes of highest cumulative log-probability (0: `topk`, EAGLE-2's
    choice) are expanded, each into its `topk` most likely tokens; then every candidate is reranked and the
    `budget` best nodes (by cumulative log-probability, ancestors always kept) are verified. With `auto` the
    budget is chosen per window (AutoTreeBudget), at most `budget` nodes. Frontier 1 is the greedy chain with
    each depth's runners-up as leaves: it drafts at the chain's cost (one position per step, no tree mask)."""

    depth: int = 5
    topk: int = 4
    budget: int = 16
    auto: AutoTreeBudget | None = field(default=None, compare=False)
    frontier: int = 0

    def __post_init__(self) -> None:
        if self.depth < 1 or self.topk < 1 or self.budget < 1 or self.frontier < 0:
            raise ValueError(f"a draft tree needs depth, topk and budget >= 1 and frontier >= 0, got {self}")
        if not self.frontier:
            object.__setattr__(self, "frontier", self.topk)

    @property
    def name(self) -> str:
        f = f"f{self.frontier}," if self.frontier != self.topk else ""
        return f"tree(d{self.depth},k{self.topk},{f}n{'auto<=' if self.auto else ''}{self.budget})"

    def record(self) -> dict[str, Any]:
        """What a result records of the tree: its shape, and whether the budget is chosen per window."""
        return {"depth": self.depth, "topk": self.topk, "frontier": self.frontier, "budget": self.budget,
                "auto": self.auto is not None}

    def max_nodes(self, depth: int) -> int:
        """The most nodes a tree of at most `depth` levels verifies: its candidates (`tree_sizes`), at most the
        budget."""
        return min(self.budget, sum(tree_sizes(min(depth, self.depth), self.topk, self.frontier)))


def tree_sizes(depth: int, topk: int, frontier: int) -> list[int]:
    """Candidates per depth of a tree expanding `frontier` nodes per depth into `topk` children each: topk at
    depth 1 (one parent, the root), then topk x the nodes the depth above could expand."""
    sizes, parents = [], 1
    for _ in range(depth):
        sizes.append(parents * topk)
        parents = min(frontier, parents * topk)
    return sizes


def tree_shape(record: dict[str, Any]) -> str:
    """A tree's shape (TreeSpec.record) in a table cell: d5 k4 n15, or d5 k5 f1 n25 where the frontier is
    not topk (records written before the frontier existed expanded topk nodes)."""
    frontier = record.get("frontier", record["topk"])
    f = f" f{frontier}" if frontier != record["topk"] else ""
    return f"d{record['depth']} k{record['topk']}{f} n{'auto<=' if record.get('auto') else ''}{record['budget']}"


def build_tree(h: Tensor, depth: int, spec: TreeSpec, head: Tensor,
               expand: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> Draft:
    """A dynamic draft tree (greedy: no distribution kept) from the estimate h [1, 1, D] of the state after
    the root. Candidates are scored by cumulative log-probability of `head`'s softmax along their path;
    per depth the best `spec.frontier` candidates are expanded through `expand(inputs [1, K, D], token_ids
    [1, K], parent_rows)` (one batched adapter step; parent_rows [K]: the row of each node's parent in the
    previous call's batch, None at the first call, whose nodes are the root's children), which returns
    their outputs [1, K, D]. The per-depth work stays on the device (one softmax, one or two top-k, no host
    read); the candidates are read once at the end. Then the `spec.budget` best candidates are kept; a
    parent's score is never below its child's, ties go to the shallower, so the kept set holds every kept
    node's ancestors. Nodes come out parents first: the greedy path (from the root, each node's best-scored
    kept child) leads, then the rest in creation order, so when the target accepts a prefix of the greedy
    path the engine's roll-back is a crop. A frontier of one that keeps every candidate (the greedy chain and
    each depth's runners-up) needs no scores: the top-k of the raw logits, nothing reranked."""
    k = min(spec.topk, head.shape[0])
    sizes = tree_sizes(depth, k, spec.frontier)  # candidates per depth
    # scores are needed to pick a frontier among several parents or to rerank to a budget; a frontier of one
    # keeping every candidate (the greedy chain and its runners-up) reads the top-k of the raw logits only
    scored = spec.frontier > 1 or spec.budget < sum(sizes) or spec.auto is not None
    rows, score = h[0], None  # the expanded nodes' outputs and path scores (None: the root, 0)
    found: list[tuple[Tensor, Tensor, Tensor]] = []  # per depth: tokens [R, k], scores [R, k], own log-probs
    frontiers: list[Tensor | None] = []  # per depth below the first: the expanded nodes as indices of the
    parent_rows = None                   # depth above's candidates (None: its first ones, from one parent)
    first = torch.zeros(min(spec.frontier, k), dtype=torch.long, device=h.device)  # one parent's rows
    for d in range(1, depth + 1):
        logits = rows.float() @ head.T
        top = (torch.log_softmax(logits, dim=-1) if scored else logits).topk(k, dim=-1)
        cum = top.values if score is None or not scored else score[:, None] + top.values
        found.append((top.indices, cum, top.values))
        if d == depth:
            break
        n = min(spec.frontier, cum.numel())
        if cum.shape[0] == 1:  # one parent: its children come sorted, so the frontier is the first n
            best, score, ids, src = None, cum[0, :n], top.indices[0, :n], first[:n]
            x = rows[:1] if n == 1 else rows[:1].expand(n, -1)
        else:
            score, best = cum.view(-1).topk(n)
            src = torch.div(best, k, rounding_mode="floor")  # its parents' rows of `rows`
            x, ids = rows[src], top.indices.view(-1)[best]
        rows = expand(x[None], ids[None], parent_rows)[0]
        parent_rows = src
        frontiers.append(best)
    if not scored:  # every candidate kept; the greedy path is each depth's first, then the rest in order
        tokens = torch.cat([f[0].view(-1) for f in found]).tolist()
        starts = [sum(sizes[:d]) for d in range(len(found))]
        order = starts + [i for i in range(len(tokens)) if i not in starts]
        index = {old: new for new, old in enumerate(order)}
        parents = [starts[j - 1] if j else -1 for j, size in enumerate(sizes[:len(found)]) for _ in range(size)]
        return Draft([tokens[i] for i in order], None, [index[parents[i]] if parents[i] >= 0 else -1 for i in order])
    tokens, scores = (torch.cat([f[c].view(-1) for f in found]).tolist() for c in range(2))
    parents, base = [-1] * found[0][0].numel(), 0  # a candidate's parent: the frontier node it was drafted from
    for above, f, best in zip(found, found[1:], frontiers, strict=False):
        picks = range(f[0].shape[0]) if best is None else best.tolist()
        parents += [base + b for b in picks for _ in range(f[0].shape[1])]
        base += above[0].numel()
    depth_of = [d for d, f in enumerate(found, 1) for _ in range(f[0].numel())]
    ranked = sorted(range(len(tokens)), key=lambda i: (-scores[i], depth_of[i]))[: spec.budget]
    budget = spec.budget
    if spec.auto is not None:  # a node's chance to be accepted: its path's calibrated acceptance
        local = torch.cat([f[2].view(-1) for f in found]).tolist()  # each candidate's own draft log-probability
        path_accept: dict[int, float] = {}
        for i in range(len(tokens)):  # parents come first
            up = path_accept[parents[i]] if parents[i] >= 0 else 1.0
            path_accept[i] = up * spec.auto.calibrated(math.exp(local[i]))
        budget = spec.auto.choose([path_accept[i] for i in ranked], max(depth_of, default=1))
    keep = sorted(ranked[:budget])  # creation order: parents first
    best_child: dict[int, int] = {}
    for i in keep:
        if parents[i] not in best_child or scores[i] > scores[best_child[parents[i]]]:
            best_child[parents[i]] = i
    path, node = [], -1
    while node in best_child:
        node = best_child[node]
        path.append(node)
    on_path = set(path)
    order = path + [i for i in keep if i not in on_path]
    index = {old: new for new, old in enumerate(order)}
    return Draft([tokens[i] for i in order], None, [index[parents[i]] if parents[i] >= 0 else -1 for i in order])


# ----------------------------------------------------------------------------------------------
# The adapter's tree step, and the roll-out heads drafting trees
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def tree_step(cache: Any, x: Tensor, positions: list[int], allowed: Tensor, *, token_ids: Tensor | None = None,
              context: Tensor | ProjectedContext | None = None) -> Tensor:
    """One batched step over K draft-tree nodes of one depth on an adapter cache, dynamic or static: x
    [1, K, D_in] at adapter positions `positions` (K ints), query j attending to the cached entries `allowed`
    [1, 1, K, length + K] lets it (the verified prefix, its own ancestors' entries, itself); their
    keys/values go after the cache's `length`, written in place into either cache's buffers, and the queries
    attend over the slots written so far (`EAGLEStyleAdapter.buffer_step` with explicit positions and mask),
    so a one-node step equals the cache's own step. Eager on a compiled cache too (the nodes of a depth are
    a third shape; the buffers keep their addresses). Outputs [1, K, D_target]."""
    if not isinstance(cache, DynamicAdapterCache | StaticAdapterCache):
        raise ValueError(f"a draft tree steps an adapter's DynamicAdapterCache or StaticAdapterCache, "
                         f"got {type(cache).__name__}")
    a, start, k = cache.adapter, cache.length, x.shape[1]
    limit = a.config.max_seq_len
    if max(positions) >= limit or (isinstance(cache, StaticAdapterCache) and start + k > limit):
        raise ValueError(f"{a.config.name} has learned positions (and static cache slots) for {limit} steps, got "
                         f"{max(max(positions) + 1, start + k)}; rebuild with a larger max_seq_len")
    same = min(positions) == positions[0] == max(positions)  # one depth's nodes: one position, a view
    pos = slice(positions[0], positions[0] + 1) if same else torch.tensor(positions, device=x.device)
    if isinstance(cache, DynamicAdapterCache):  # into its buffers, attending over the slots written so far
        return cache(x, token_ids=token_ids, context=context, positions=pos, allowed=allowed)
    out = a.buffer_step(x, cache.keys, cache.values, start, positions=pos, allowed=allowed, token_ids=token_ids,
                        context=context)  # in place into the static buffers, over the slots written so far
    cache.length = start + k
    return out


class TreeRolloutDrafter(RolloutDrafter):
    """A roll-out level (B1, L5, L5E: `RolloutDrafter`) drafting one dynamic tree per window (`build_tree`,
    greedy): the verified positions go into the adapter's cache as for a chain, then each depth's expanded
    nodes go through the adapter in one step (`tree_step`) at position fed + depth - 1, each attending to the
    verified positions and its own ancestors' entries only, on the adapter cache of the engine's path (dynamic,
    or static on the static and compiled paths). The next window crops those entries off again (the verified
    positions are re-fed from the target's own states), which is the adapter cache's compaction. While each
    depth expands one node (frontier 1) the step is the chain's own: one position, no tree mask."""

    def __init__(self, adapter: Any, head: Tensor, tree: TreeSpec, lm: DrafterLM | None = None) -> None:
        super().__init__(adapter, head, lm=lm)
        self.tree = tree
        self.name = f"rollout+{adapter.config.name}+{tree.name}"

    @torch.no_grad()
    def draft(self, k: int, stop: threading.Event | None = None) -> Draft:
        if k == 0:
            return Draft([])
        h = self._feed()[:, -1:]  # the estimate of the state after the last verified token
        fed, dtype = self.fed, _dtype(self.adapter)
        tree: list[Tensor | None] = [None]  # the last batch's mask over the cache (None: every batch one node)
        depth = [fed]  # the adapter position of the next batch: one batch per depth, from fed on

        def expand(x: Tensor, ids: Tensor, parent_rows: Tensor | None) -> Tensor:
            width = x.shape[1]
            tokens = {"token_ids": ids} if self.adapter.config.uses_tokens else {}
            depth[0] += 1
            if width == 1 and tree[0] is None:  # one node per depth so far: the window's entries are all its
                return self.cache(x.to(dtype), **tokens, **self.context)  # ancestors, the chain's own step
            own = torch.eye(width, dtype=torch.bool, device=x.device)
            if parent_rows is None:  # the root's children: each sees the verified positions and itself
                tree[0] = torch.cat([own.new_ones(width, fed), own], dim=1)
            else:  # a node sees what its parent saw, and itself
                above = own.new_ones(1, self.cache.length) if tree[0] is None else tree[0]
                tree[0] = torch.cat([above[parent_rows], own], dim=1)
            return tree_step(self.cache, x.to(dtype), [depth[0] - 1] * width, tree[0][None, None], **tokens,
                             **self.context)

        return build_tree(h, min(k, self.tree.depth), self.tree, self.head, expand)


def tree_drafter(adapter: Any, head: Tensor, tree: TreeSpec, *, lm: DrafterLM | None = None,
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> Drafter:
    """The drafter of a roll-out level drafting `tree`s while decoding (TreeRolloutDrafter; `lm` as for
    make_drafter, given where the level reads EventGPT). Trees are verified greedily, so with a temperature
    the level drafts chains (make_drafter's, logged in one line). Any other level is one ValueError line:
    L5F and the prefill drafters keep chains."""
    if adapter is None or not adapter.config.rolls_out:
        raise ValueError(f"draft trees are for the roll-out levels ({', '.join(ROLLOUT_LEVELS)}) while decoding; "
                         f"{'no adapter' if adapter is None else adapter.config.name} keeps chains")
    if temperature > 0:
        log.warning("temperature %g: %s drafts chains (trees are verified greedily only)", temperature,
                    adapter.config.name)
        return make_drafter(adapter, head, lm=lm, temperature=temperature, generator=generator)
    return TreeRolloutDrafter(adapter, head, tree, lm=lm if adapter.config.reads_drafter else None)


# ----------------------------------------------------------------------------------------------
# The controlled drafter as a tree
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiblingTree:
    """SyntheticTreeDrafter's shape: `width` siblings per depth, one of them grown on, so `depth` levels
    verify depth x width nodes (the engine sizes the static path's tree passes by `max_nodes`)."""

    width: int

    def max_nodes(self, depth: int) -> int:
        return depth * self.width

    def record(self) -> dict[str, Any]:
        return {"width": self.width}


class SyntheticTreeDrafter(SyntheticDrafter):
    """The controlled drafter as a tree: at each depth `width` siblings under the node on the reference
    path, each independently right with probability p (the first right one holds the reference token, the
    others distinct wrong tokens); the next depth grows under the right sibling (under the first when none
    is), so a depth holds with probability 1 - (1 - p)^width and `width` 1 is SyntheticDrafter's chain."""

    def __init__(self, p: float, vocab_size: int, width: int = 2, cost_ms: float = 0.0, seed: int = 0) -> None:
        super().__init__(p, vocab_size, cost_ms, seed)
        if not 1 <= width < vocab_size:
            raise ValueError(f"width must lie in [1, vocab_size), got {width}")
        self.width, self.tree = width, SiblingTree(width)
        self.name = f"synthetic-tree(p={p:g},w{width},{cost_ms:g}ms)"

    def _wrong(self, avoid: set[int]) -> int:
        while True:
            tok = int(torch.randint(self.vocab_size, (), generator=self.rng))
            if tok not in avoid:
                return tok

    def draft(self, k: int, stop: threading.Event | None = None) -> Draft:
        tokens: list[int] = []
        parents: list[int] = []
        parent = -1
        for depth in range(k):
            pos = self.n + depth
            true = self.reference[pos] if pos < len(self.reference) else 0
            right = [float(torch.rand((), generator=self.rng)) < self.p for _ in range(self.width)]
            hit = right.index(True) if any(right) else None
            row = [true if j == hit else -1 for j in range(self.width)]
            for j in range(self.width):
                if row[j] < 0:
                    row[j] = self._wrong({true, *row})
            first = len(tokens)
            tokens += row
            parents += [parent] * self.width
            parent = first + (hit or 0)
            if self.cost_ms > 0:
                end = time.perf_counter() + self.cost_ms / 1e3
                while time.perf_counter() < end:
                    pass
        return Draft(tokens, parents=parents)


__all__ = [
    "AutoTreeBudget",
    "SiblingTree",
    "SyntheticTreeDrafter",
    "TreeRolloutDrafter",
    "TreeSpec",
    "build_tree",
    "tree_drafter",
    "tree_shape",
    "tree_sizes",
    "tree_step",
]
