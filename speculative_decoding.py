"""Live lossless speculative decoding: EventGPT (or an adapter) drafts, Video-LLaVA verifies.

The engine works over the shared runner interface of vlm_runners.py (prefill, multi-token decode,
crop_cache, lm_head_weight) and is batch 1 only: one user, one GPU is the product case, and batch 1
keeps every cache a plain prefix that can be cropped. The drafters, their draft-length rules and the
adapters' caches live in drafters.py; this module is the engine: draft, verify, accept, roll back, the
trace, and the lossless check.

    from drafters import DrafterLM, make_drafter
    lm = DrafterLM(eventgpt_runner)
    engine = SpeculativeDecoder(vl, make_drafter(decode_adapter, head, lm=lm), gamma_decode=5,
                                prefill_drafter=make_drafter(prefill_adapter, head, lm=lm, phase="prefill"),
                                gamma_prefill=8)
    out = engine.generate(target_prompt, drafter_prompt, max_new_tokens=50)
    out.tokens, out.trace                 # list[int]; per-phase and per-iteration record (drafted, accepted, ms)

Two phases per answer:
  1. prefill hiding: the target's vision + prefill runs on the calling thread while a second thread
     (its own CUDA stream) runs EventGPT's vision + prefill and then drafts with the prefill adapter
     (L1-L4) until the target's prefill ends or `gamma_prefill` drafts exist. The intervals of both
     are recorded, so the overlap is measured, not assumed.
  2. decode: `gamma_decode` drafts, one verify pass of the target over [last token, drafts], keep the
     accepted prefix plus the target's own next token, crop both caches, re-sync the drafter.

Every drafting mode plugs in through the three-method `Drafter` protocol (drafters.py: begin / draft /
accept), so the loop has no branch on the mode.

Greedy (`temperature=0`) is lossless by construction: a draft is kept only where it equals the
target's argmax. With `temperature > 0` drafts are checked by rejection sampling against the real
draft distribution (softmax of the target LM head on the adapted state), lossless in distribution.

Demo on the toy world (CPU, seconds): the benchmark drives this module,
    python benchmark_e2e_wallclock.py --dataset_dir data/toy/dataset --max_samples 4 --max_new_tokens 16 \\
        --configs target,synthetic --output_dir /tmp/e2e_demo
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from drafters import Draft, Drafter
from timing import StageClock, sync_stream
from vlm_runners import VLMInputs


class LosslessError(AssertionError):
    """A greedy speculative output differs from the target's own greedy output."""


# ----------------------------------------------------------------------------------------------
# The acceptance rule
# ----------------------------------------------------------------------------------------------


def accept_drafts(logits: Tensor, draft: Draft, temperature: float,
                  generator: torch.Generator | None) -> tuple[int, int | None]:
    """Verify `draft` against target logits [m, V] (row i scores draft position i; m = k + 1 normally).

    Returns (accepted count n, the target's token at position n), the token being None when all k
    drafts were accepted and no row k exists. Greedy: keep drafts while they equal the argmax.
    Sampling: keep draft x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
    sample from max(p_i - q_i, 0) renormalised; if all pass, sample the bonus from p_k. This is the
    standard rule that leaves the output distributed exactly as the target's (Leviathan et al. 2023).
    """
    k = len(draft.tokens)
    if temperature <= 0:
        target = logits.argmax(-1).tolist()
        n = 0
        while n < k and draft.tokens[n] == target[n]:
            n += 1
        return n, (target[n] if n < logits.shape[0] else None)
    p = torch.softmax(logits.float() / temperature, dim=-1)
    q = draft.probs
    if q is None:  # a deterministic drafter: its distribution is one-hot on its token
        q = torch.zeros(k, p.shape[-1], device=p.device)
        q[torch.arange(k), torch.tensor(draft.tokens, dtype=torch.long, device=p.device)] = 1.0
    q = q.to(p.device)
    for i, tok in enumerate(draft.tokens):
        u = float(torch.rand((), generator=generator, device=generator.device if generator else "cpu"))
        if u * float(q[i, tok]) < float(p[i, tok]):  # u < p/q without dividing by a zero q
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        residual = residual if float(residual.sum()) > 0 else p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    if k < p.shape[0]:
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    return k, None


def accept_tree(logits: Tensor, draft: Draft) -> tuple[list[int], int]:
    """Greedy verify of a draft tree against target logits [1 + nodes, V] (row 0: the root, row i + 1: node
    i; each row scores the position after it). Returns (the accepted path, node indices from the root's
    child down: the longest root path whose every token is the target's argmax at its parent, the target's
    own token after it). Siblings hold different tokens, so at most one child can match. A chain's path
    is 0..n-1, the n that accept_drafts returns."""
    target = logits.argmax(-1).tolist()
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(draft.parents if draft.parents is not None else range(-1, len(draft.tokens) - 1)):
        children.setdefault(parent, []).append(i)
    path: list[int] = []
    node = -1
    while True:
        want = target[node + 1]
        node = next((c for c in children.get(node, ()) if draft.tokens[c] == want), None)
        if node is None:
            return path, want
        path.append(node)


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


@dataclass
class Iteration:
    drafted: int
    accepted: int  # drafts accepted up to the answer's end: none after an accepted EOS (as offline, metrics.py)
    from_prefill: bool = False  # verified drafts written during the target's prefill (phase 1)
    ms: dict[str, float] = field(default_factory=dict)  # draft, verify, crop (crop includes drafter re-sync)
    draft: list[int] = field(default_factory=list)  # the drafts verified (the lossless check replays the pass)
    parents: list[int] | None = None  # a draft tree's parents (None: a chain); `drafted` is then its depth
    path: list[int] = field(default_factory=list)  # a tree's accepted nodes (compaction keeps them)
    nodes: int = 0  # a tree's node count (the verify pass's width minus one)


@dataclass
class Trace:
    phase1: dict[str, Any] = field(default_factory=dict)
    iterations: list[Iteration] = field(default_factory=list)
    total_ms: float = 0.0
    foreign_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SpecOutput:
    tokens: list[int]  # the answer, up to and including EOS
    trace: Trace


Prompt = VLMInputs | Callable[[], VLMInputs]


def _build(prompt: Prompt | None) -> VLMInputs | None:
    return prompt() if callable(prompt) else prompt


class SpeculativeDecoder:
    """Batch-1 speculative decoding of `target` with a decode drafter and an optional prefill drafter."""

    def __init__(self, target: Any, decode_drafter: Drafter, *, gamma_decode: int = 5,
                 prefill_drafter: Drafter | None = None, gamma_prefill: int = 0, temperature: float = 0.0,
                 generator: torch.Generator | None = None, concurrent_prefill: bool = True,
                 drafter_device: torch.device | None = None, static_cache: bool = False, compile: bool = False,
                 max_cache_len: int | None = None) -> None:
        """`static_cache` (implied by `compile`) switches the target to a preallocated KV cache of
        `max_cache_len` positions with every verify pass one width (runner.use_static_cache); `compile`
        also compiles its decode/verify step (CUDA graphs on CUDA). The loop is the same on every path."""
        if gamma_decode < 0 or gamma_prefill < 0:
            raise ValueError("gamma_decode and gamma_prefill must be >= 0")
        tree = getattr(decode_drafter, "tree", None)
        if static_cache or compile:  # the prefill window's wider verify runs in gamma_decode + 1 pieces
            # None keeps a cache the caller sized with runner.use_static_cache (4096 positions if none).
            size = max_cache_len or getattr(target, "max_cache_len", None) or 4096
            target.use_static_cache(size, verify_width=gamma_decode + 1, compile=compile)
            if tree is not None:  # every tree pass padded to the largest tree: one graph
                target.use_tree_width(tree.max_nodes(gamma_decode) + 1)
        # The roll-out adapters' steps take the target's path (selected again at every answer: a drafter
        # may serve several engines).
        self._adapter_path = (gamma_decode + 1, compile) if static_cache or compile else None
        self._select_adapter_path(decode_drafter, prefill_drafter)
        # E3's drafter reads the target's low/middle/high layer states: every target pass returns them too
        self._layers = tuple(getattr(decode_drafter, "target_layers", ()))
        self.target, self.drafter, self.gamma = target, decode_drafter, gamma_decode
        self.prefill_drafter, self.gamma_prefill = prefill_drafter, gamma_prefill
        self.temperature, self.generator = temperature, generator
        self.concurrent_prefill = concurrent_prefill
        self.drafter_device = drafter_device or target.device
        # One side stream for the engine's life (a new one per answer would strand allocator pools).
        self._stream = torch.cuda.Stream(self.drafter_device) if self.drafter_device.type == "cuda" else None
        self.eos = target.eos_token_id
        self._ones = torch.ones(1, 0, dtype=torch.long)  # attention masks are views of it, not rebuilt per step

    def _select_adapter_path(self, *drafters: Drafter | None) -> None:
        for d in drafters:
            if hasattr(d, "use_static_cache"):
                if self._adapter_path is None:
                    d.use_dynamic_cache()
                else:
                    d.use_static_cache(*self._adapter_path)

    def _verify(self, root: int, draft: Draft, cache: Any, mask: Tensor) -> tuple[Any, list[int], int | None]:
        """One target pass over [root, drafts] (a chain, or a tree with its ancestor mask): (the step, the
        accepted drafts' indices, the target's own next token)."""
        ids = torch.tensor([[root, *draft.tokens]], device=self.target.device)
        if draft.parents is None:
            step = self.target.decode(ids, cache, mask)  # row i scores position len(tokens) + i
            n, nxt = accept_drafts(step.logits[0], draft, self.temperature, self.generator)
            return step, list(range(n)), nxt
        if self.temperature > 0:
            raise ValueError("draft trees are verified greedily; sampling drafts chains (docs/LIVE_DECODING.md)")
        step = self.target.verify_tree(ids, draft.parents, cache, mask)
        return step, *accept_tree(step.logits[0], draft)

    def _roll_back(self, cache: Any, start: int, rows: list[int]) -> None:
        """Keep the cached rows `rows` of the last verify pass (from cache position `start`): a crop when they
        are its first rows (every chain), else a tree's compaction (runner.compact_cache)."""
        if rows == list(range(len(rows))):
            self.target.crop_cache(cache, start + len(rows))
        else:
            self.target.compact_cache(cache, start, rows)

    def _mask(self, width: int) -> Tensor:
        if self._ones.shape[1] < width:
            self._ones = torch.ones(1, max(2 * width, 4096), dtype=torch.long, device=self.target.device)
        return self._ones[:, :width]

    # -- phase 1 -----------------------------------------------------------------------------------
    def _drafter_side(self, prompt: Prompt | None, stop: threading.Event, clock: StageClock,
                      rec: dict[str, Any]) -> Draft:
        """EventGPT vision + prefill, then prefill drafts until `stop`; runs on its own thread/stream."""
        stream = self._stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            rec["drafter_start_ms"] = clock.now_ms()
            inputs = None
            drafters = [d for d in (self.prefill_drafter, self.drafter) if d is not None]
            if any(d.uses_drafter_model for d in drafters):
                with clock.stage(rec, "drafter_vision_ms"):
                    inputs = _build(prompt)
            for d in dict.fromkeys(drafters):  # the same object may serve both phases
                with clock.stage(rec, "drafter_prefill_ms"):
                    d.begin(inputs)
            draft = Draft([])
            if self.prefill_drafter is not None and self.gamma_prefill > 0:
                with clock.stage(rec, "prefill_draft_ms"):
                    draft = self.prefill_drafter.draft(self.gamma_prefill, stop=stop)
            sync_stream(self.drafter_device)
            rec["drafter_end_ms"] = clock.now_ms()
        return draft

    def _phase1(self, target_prompt: Prompt, drafter_prompt: Prompt | None, clock: StageClock,
                rec: dict[str, Any]) -> tuple[Any, int, Draft]:
        stop = threading.Event()
        box: dict[str, Any] = {}

        def side() -> None:
            try:
                box["draft"] = self._drafter_side(drafter_prompt, stop, clock, rec)
            except BaseException as err:  # re-raised on the calling thread
                box["error"] = err

        drafters = [d for d in (self.prefill_drafter, self.drafter) if d is not None]
        threaded = self.concurrent_prefill and (any(d.uses_drafter_model for d in drafters) or self.gamma_prefill > 0)
        thread = threading.Thread(target=side, name="drafter-prefill")
        if threaded:
            thread.start()
        rec["target_start_ms"] = clock.now_ms()
        with clock.stage(rec, "target_vision_ms"):
            inputs = _build(target_prompt)
        with clock.stage(rec, "target_prefill_ms"):
            out = self.target.prefill(inputs, logits_for="last")
        rec["target_end_ms"] = clock.now_ms()
        stop.set()
        if not threaded:
            stop.clear()  # sequential: the drafter may draft its full gamma_prefill
            thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        rec["overlap_ms"] = max(0.0, min(rec["target_end_ms"], rec["drafter_end_ms"])
                                - max(rec["target_start_ms"], rec["drafter_start_ms"]))
        return out, inputs.attention_mask.shape[1], box["draft"]

    # -- the loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, target_prompt: Prompt, drafter_prompt: Prompt | None = None,
                 max_new_tokens: int = 50) -> SpecOutput:
        """Answer one prompt; `*_prompt` are VLMInputs or zero-argument callables building them (timed
        as vision). Batch 1."""
        clock = StageClock(self.target.device)
        trace = Trace()
        target, drafter = self.target, self.drafter
        self._select_adapter_path(drafter, self.prefill_drafter)
        if self._layers or getattr(target, "layer_ids", ()):  # per answer: engines may share the target
            target.capture_layers(self._layers)
        out, prompt_len, pre = self._phase1(target_prompt, drafter_prompt, clock, trace.phase1)
        if out.logits.shape[0] != 1:
            raise ValueError("the engine is batch 1: pass one prompt")
        # Position 0 is the target's prefill token; the first prefill draft is checked against it, the
        # rest wait for the first verify pass (they were drafted after that first draft).
        n0, first = accept_drafts(out.logits[0, -1:], pre.cut(0, 1), self.temperature, self.generator)
        tokens = [pre.tokens[0] if first is None else first]
        pending = pre.cut(1) if n0 else Draft([])
        trace.phase1.update(drafted=len(pre.tokens), first_accepted=n0)
        drafter.accept(tokens, out.hidden[0, -1:], layers=_rows(out.layers, slice(-1, None)))
        cache = out.cache
        while tokens[-1] != self.eos and len(tokens) < max_new_tokens:
            it = Iteration(0, 0, from_prefill=bool(pending.tokens))
            k = min(self.gamma if not pending.tokens else len(pending.tokens), max_new_tokens - len(tokens) - 1)
            with clock.lap(it.ms, "draft"):
                draft = (pending if pending.tokens else drafter.draft(k)).cut(0, k)
            pending = Draft([])
            mask = self._mask(prompt_len + len(tokens) + len(draft.tokens))
            with clock.lap(it.ms, "verify"):
                step, path, nxt = self._verify(tokens[-1], draft, cache, mask)
            n, rows = len(path), [0, *(i + 1 for i in path)]  # the root's row and the accepted nodes'
            new = [*(draft.tokens[i] for i in path), nxt]
            with clock.lap(it.ms, "crop"):  # keep prompt + every token but the newest
                self._roll_back(cache, prompt_len + len(tokens) - 1, rows)
                drafter.accept(new, step.hidden[0, rows], layers=_rows(step.layers, rows))
            if self.eos in new:  # the answer ends at EOS: drafts accepted after it are neither kept nor counted
                new = new[: new.index(self.eos) + 1]
            it.drafted, it.accepted, it.draft = max(draft.depths(), default=0), min(n, len(new)), draft.tokens
            if draft.parents is not None:
                it.parents, it.path, it.nodes = draft.parents, path, len(draft.tokens)
            trace.iterations.append(it)
            tokens += new
        sync_stream(target.device)
        trace.total_ms = clock.now_ms()
        clock.settle()
        lms = {id(d.lm): d.lm for d in (drafter, self.prefill_drafter) if getattr(d, "lm", None) is not None}
        trace.foreign_tokens = sum(lm.foreign_tokens for lm in lms.values())
        return SpecOutput(tokens[:max_new_tokens], trace)


def _rows(layers: Tensor | None, rows: slice | list[int]) -> Tensor | None:
    """Rows `rows` of a pass's layer states [1, T, K, D] (None when the target returned none)."""
    return None if layers is None else layers[0, rows]


# ----------------------------------------------------------------------------------------------
# The lossless check
# ----------------------------------------------------------------------------------------------


def greedy_reference(target: Any, inputs: VLMInputs, max_new_tokens: int) -> list[int]:
    """The target's own greedy answer (runner.generate), up to and including EOS."""
    out = target.generate(inputs, max_new_tokens)
    return out.tokens[0, : int(out.mask[0].sum())].tolist()


@torch.no_grad()
def greedy_continuation(target: Any, inputs: VLMInputs, prefix: list[int], max_new_tokens: int) -> list[int]:
    """`prefix`, then the target's own greedy tokens after it, up to and including EOS or `max_new_tokens`
    tokens in all: runner.generate's path (the prompt in one pass, then one decode step per token) forced
    through `prefix`. With the reference's own prefix it is the reference."""
    step = target.prefill(inputs, logits_for="last")
    length = inputs.attention_mask.shape[1]
    answer: list[int] = []
    while len(answer) < max_new_tokens:
        tok = prefix[len(answer)] if len(answer) < len(prefix) else int(step.logits[0, -1].argmax())
        answer.append(tok)
        if tok == target.eos_token_id or len(answer) == max_new_tokens:
            break
        length += 1
        step = target.decode(torch.tensor([[tok]], device=target.device), step.cache,
                             torch.ones(1, length, dtype=torch.long, device=target.device))
    return answer


@torch.no_grad()
def verify_logits(target: Any, inputs: VLMInputs, out: SpecOutput, position: int) -> Tensor:
    """The target's logits [V] at `position` of the engine's answer `out` as the engine's own passes
    computed them: the same prefill, then the trace's verify passes replayed (each [last token, drafts]
    at its width, or a tree's pass with its ancestor mask; the cache cropped or compacted as the engine did)
    on the runner's current path (dynamic, static or compiled), so the rows come from the kernels and shapes
    the engine ran."""
    tokens = out.tokens
    step = target.prefill(inputs, logits_for="last")
    if position == 0:
        return step.logits[0, -1]
    length = inputs.attention_mask.shape[1]
    done, cache = 1, step.cache  # tokens verified so far (the prefill's own is the first)
    for it in out.trace.iterations:
        ids = torch.tensor([[tokens[done - 1], *it.draft]], device=target.device)
        mask = torch.ones(1, length + done + len(it.draft), dtype=torch.long, device=target.device)
        if it.parents is None:
            step, rows = target.decode(ids, cache, mask), list(range(it.accepted + 1))  # row i: position done + i
        else:  # a tree: the accepted path's rows, in order
            step, rows = target.verify_tree(ids, it.parents, cache, mask), [0, *(i + 1 for i in it.path)]
        if position <= done + it.accepted:
            return step.logits[0, rows[position - done]]
        if it.parents is None:
            target.crop_cache(cache, length + done + it.accepted)
        else:
            target.compact_cache(cache, length + done - 1, rows[: it.accepted + 1])
        done += it.accepted + 1
    raise ValueError(f"position {position} lies beyond the {done} tokens the trace verified")


# Rounding unit of each dtype; fp32 gets 0 so the CPU fp32 checks stay exact. A near-tie counts as a
# numeric tie when the two tokens' logits are within TIE_ULPS rounding units of their size on every path:
# 8 for fp16 (0.8% of the logit), 2 for bf16 (1.6%: its unit is 8x coarser, and a looser rule would
# let a real difference of several percent pass as rounding).
ROUNDING_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 0.0, torch.float64: 0.0}
TIE_ULPS = {torch.float16: 8, torch.bfloat16: 2}


@dataclass
class NumericTie:
    """A greedy difference explained by rounding: at `position` the speculative answer chose `tokens[0]`
    and the target's own greedy path `tokens[1]`, the two best logits of the target there, at most
    `margin` apart on every one of `paths` recomputed paths (within `tolerance`)."""

    position: int
    tokens: tuple[int, int]
    margin: float
    tolerance: float
    paths: int = 0


def numeric_tie(logits: list[Tensor], a: int, b: int, dtype: torch.dtype, position: int = 0) -> NumericTie | None:
    """A NumericTie if tokens a and b are the top two of every logits row [V] (one per recomputed path)
    and |l[a] - l[b]| <= TIE_ULPS[dtype] * eps(dtype) * max(|l[a]|, |l[b]|, 1) on each; else None (a real
    divergence)."""
    eps = ROUNDING_EPS.get(dtype, 0.0) * TIE_ULPS.get(dtype, 0)
    margin, tolerance = 0.0, float("inf")
    for row in logits:
        row = row.float().flatten()
        if set(row.topk(2).indices.tolist()) != {a, b}:
            return None
        la, lb = float(row[a]), float(row[b])
        margin, tolerance = max(margin, abs(la - lb)), min(tolerance, eps * max(abs(la), abs(lb), 1.0))
    if not logits or margin > tolerance:
        return None
    return NumericTie(position, (a, b), margin, tolerance, len(logits))


@torch.no_grad()
def tie_logits(target: Any, inputs: VLMInputs, prefix: list[int]) -> list[Tensor]:
    """The target's logits [V] for the position after `prefix`, recomputed on the two clean paths (one
    wide pass over the prefix, and one decode step per token as the reference runs), each through the
    model's own LM head and through the fp32 head (`lm_head_weight`) on the same state."""
    head = target.lm_head_weight()
    rows = []
    for wide in (True, False):
        out = target.prefill(inputs, logits_for="last")
        length = inputs.attention_mask.shape[1]
        chunks = [prefix] if wide else [[t] for t in prefix]
        for chunk in (c for c in chunks if c):
            length += len(chunk)
            out = target.decode(torch.tensor([chunk], device=target.device), out.cache,
                                torch.ones(1, length, dtype=torch.long, device=target.device))
        rows += [out.logits[0, -1], out.hidden[0, -1].float() @ head.T]
    return rows


class TieOracle(Protocol):
    """What the lossless check asks the target: its logits [V] after `prefix` on every path a tie must
    hold on, and its own greedy continuation of `prefix`."""

    def logits(self, prefix: list[int]) -> list[Tensor]: ...

    def continuation(self, prefix: list[int]) -> list[int]: ...


class TargetRecompute:
    """The TieOracle of one prompt on a runner: `logits` gives tie_logits' four clean rows plus, for an
    engine answer (`engine` = its SpecOutput), the engine's own verify-pass row at that position
    (verify_logits), so a difference the engine's verify path makes is never excused by clean paths
    alone; `continuation` is greedy_continuation. `prompt` may be a zero-argument callable (built once,
    only when a difference needs it)."""

    def __init__(self, target: Any, prompt: Prompt, max_new_tokens: int, engine: SpecOutput | None = None) -> None:
        self.target, self.prompt, self.max_new_tokens, self.engine = target, prompt, max_new_tokens, engine
        self._inputs: VLMInputs | None = None

    @property
    def inputs(self) -> VLMInputs:
        if self._inputs is None:
            self._inputs = _build(self.prompt)
        return self._inputs

    def logits(self, prefix: list[int]) -> list[Tensor]:
        rows = tie_logits(self.target, self.inputs, prefix)
        if self.engine is not None:
            if self.engine.tokens[: len(prefix)] != prefix:
                raise ValueError("the engine's verify row exists only on the engine's own answer")
            rows.append(verify_logits(self.target, self.inputs, self.engine, len(prefix)))
        return rows

    def continuation(self, prefix: list[int]) -> list[int]:
        return greedy_continuation(self.target, self.inputs, prefix, self.max_new_tokens)


def check_lossless(spec: list[int], reference: list[int], what: str, recompute: TieOracle | None = None,
                   dtype: torch.dtype = torch.float32) -> list[NumericTie]:
    """The numeric ties between a greedy answer `spec` and the target's (`reference`), every position
    compared: [] when equal. At each differing position i, `recompute.logits(spec[:i])` gives the
    target's logits there on every path: within rounding (`numeric_tie`) the difference is a NumericTie,
    and the check goes on against the target's own greedy continuation of spec[:i + 1]
    (`recompute.continuation`), where each later difference is again a tie or an error. A difference
    beyond rounding, a length mismatch, or any difference without `recompute` raises LosslessError
    naming the position."""
    ties: list[NumericTie] = []
    while spec != reference:
        pos = next((i for i, (a, b) in enumerate(zip(spec, reference, strict=False)) if a != b),
                   min(len(spec), len(reference)))
        after = f" (after numeric ties at {[t.position for t in ties]}, against the target's own greedy " \
                "continuation of the speculative prefix)" if ties else ""
        margin = ""
        if recompute is not None and pos < min(len(spec), len(reference)):
            rows = recompute.logits(spec[:pos])
            tie = numeric_tie(rows, spec[pos], reference[pos], dtype, pos)
            if tie is not None:
                ties.append(tie)
                reference = recompute.continuation(spec[: pos + 1])
                continue
            top = rows[0].float().flatten().topk(2)
            margin = f"; target top-2 margin there {float(top.values[0] - top.values[1]):.4g} (not a rounding tie)"
        raise LosslessError(f"{what}: speculative output differs from the target's greedy output at position "
                            f"{pos} (lengths {len(spec)} vs {len(reference)}){after}{margin}")
    return ties


# ----------------------------------------------------------------------------------------------
# The trace's figures
# ----------------------------------------------------------------------------------------------


def summarise_trace(trace: Trace) -> dict[str, Any]:
    """Decode-phase drafts and acceptance (per iteration, per draft position), prefill drafts accepted
    (the first checked against the prefill's token, the rest in the first verify pass), stage ms."""
    its = [it for it in trace.iterations if not it.from_prefill]
    drafted = [it.drafted for it in its if it.drafted > 0]
    accepted = [it.accepted for it in its if it.drafted > 0]
    per_pos_tries: dict[int, int] = {}
    per_pos_hits: dict[int, int] = {}
    for it in its:
        for i in range(it.drafted):
            per_pos_tries[i] = per_pos_tries.get(i, 0) + 1
            if i < it.accepted:
                per_pos_hits[i] = per_pos_hits.get(i, 0) + 1
    ms: dict[str, float] = {}
    for it in trace.iterations:
        for key, value in it.ms.items():
            ms[key] = ms.get(key, 0.0) + value
    prefill_accepted = trace.phase1.get("first_accepted", 0) + sum(
        it.accepted for it in trace.iterations if it.from_prefill)
    return {
        "prefill_drafted": trace.phase1.get("drafted", 0),
        "prefill_accepted": prefill_accepted,
        "iterations": len(its),
        "drafted": sum(drafted),
        "accepted": sum(accepted),
        "nodes": sum(it.nodes for it in its),  # draft-tree nodes verified (0 for chains)
        "per_position_tries": per_pos_tries,
        "per_position_hits": per_pos_hits,
        "stage_ms": ms,
    }


__all__ = [
    "Iteration",
    "LosslessError",
    "NumericTie",
    "SpecOutput",
    "SpeculativeDecoder",
    "TargetRecompute",
    "TieOracle",
    "Trace",
    "accept_drafts",
    "accept_tree",
    "check_lossless",
    "greedy_continuation",
    "greedy_reference",
    "numeric_tie",
    "summarise_trace",
    "tie_logits",
    "verify_logits",
]
