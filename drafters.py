"""The drafting side of the live engine: the `Drafter` protocol, every drafter, the draft-length rules,
the adapters' KV caches, and `make_drafter`, the one way from an adapter to the drafter it drafts with.

    from drafters import DrafterLM, make_drafter
    lm = DrafterLM(eventgpt_runner)                 # EventGPT's language model, re-synced by cropping
    decode = make_drafter(b1_adapter, head)         # B1 rolls out: a RolloutDrafter (no EventGPT needed)
    fused = make_drafter(l5f_adapter, head, lm=lm)  # L5F: a FusedDrafter, EventGPT in lockstep
    prefill = make_drafter(l1_adapter, head, lm=lm, phase="prefill", min_confidence=0.5)
    engine = SpeculativeDecoder(vl, decode, gamma_decode=5, prefill_drafter=prefill, gamma_prefill=8)

Which drafter an adapter needs follows from its config's roles (`AdapterConfig.predicts`, `rolls_out`,
`egpt_per_draft`, `reads_drafter`; hidden_adapter.LEVEL_ROLES), never from its name:
  - `RolloutDrafter`   (mode a) B1 (from verified target states), L5E (B1 plus EventGPT's prompt-end state,
                       computed once by EventGPT's prefill beside the target's) or L5 (from EventGPT's states
                       of the verified text, one EventGPT pass per iteration) rolled out on its own outputs;
                       E3 and E3E as B1 and L5E, from the target's low/middle/high layer states of the verify
                       pass (`target_layers`: the engine has the target return them from the same pass);
                       adapters with a token input read each verified or drafted token's embedding.
  - `FusedDrafter`     (mode b) L5F over EventGPT states and target states; EventGPT steps in
                       lockstep on the accepted text (not concurrently).
  - `EventGPTDrafter`  (mode c) EventGPT decodes the draft text itself, each of its states goes through
                       a per-position adapter (L1-L4) and the target's LM head; also the prefill drafter.
                       With no adapter and the drafter's own head it is classic two-model drafting.
  - `SyntheticDrafter` the controlled drafter: the target's own greedy continuation, each draft
                       corrupted with probability 1 - p, with a chosen cost per draft step.
  - `NoDrafter`        drafts nothing: the engine is then the target alone on the same code path.
A `Draft` is a chain or a tree (`parents`); the roll-out levels' dynamic trees, their budget rule and the
controlled tree drafter are draft_trees.py's.

How many drafts a window holds (at most gamma_decode) is a `DraftLength`: fixed, transformers' confidence
stop (`ConfidenceStop`), or `ExpectedGainStop`, which drafts on while the calibrated acceptance estimate
says another draft raises the iteration's tokens per millisecond. All read only the drafter's side, so
every one of them is lossless.

The causal adapters (modes a and b) keep their keys/values in an adapter cache with one interface
(`reset`, `crop(length)`, `cache(x, h_target=, token_ids=, context=)`, `length`): `DynamicAdapterCache`
grows per step (the engine's eager path), `StaticAdapterCache` is preallocated, optionally compiled (the
static and compiled paths). `draft_step` sets up one roll-out draft on either, for the benchmarks' timers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from hidden_adapter import (
    NEXT_POSITION_LEVELS,
    AdapterConfig,
    EAGLEStyleAdapter,
    ProjectedContext,
    levels,
    rollout_problem,
)
from vlm_runners import VLMInputs, to_drafter_vocab

PER_POSITION_LEVELS = levels(predicts="same")  # output[t] estimates the target state at t
ROLLOUT_LEVELS = levels(rolls_out=True)
PHASES = ("prefill", "decode")


# ----------------------------------------------------------------------------------------------
# Drafts, choosing a token, rolling out
# ----------------------------------------------------------------------------------------------


@dataclass
class Draft:
    """One window's drafts: a chain (`parents` None: token i follows token i - 1) or a tree, node i a child
    of node parents[i] (-1: the root, i.e. the last verified token; parents[i] < i). A chain is the tree
    with one branch, so a drafter that returns chains needs no tree code."""

    tokens: list[int]
    probs: Tensor | None = None  # [k, V] float32 draft distribution (sampling only; chains only)
    parents: list[int] | None = None

    def cut(self, start: int, stop: int | None = None) -> Draft:
        """Drafts [start, stop) (Python slice semantics); of a tree (start 0), the nodes at depth <= stop."""
        if self.parents is None:
            return Draft(self.tokens[start:stop], None if self.probs is None else self.probs[start:stop])
        if start != 0:
            raise ValueError("a draft tree is cut from its root")
        depth = self.depths()
        keep = [i for i, d in enumerate(depth) if stop is None or d <= stop]
        index = {old: new for new, old in enumerate(keep)}
        return Draft([self.tokens[i] for i in keep], None, [index.get(self.parents[i], -1) for i in keep])

    def depths(self) -> list[int]:
        """Each node's depth (the root's children: 1); a chain's node i lies at depth i + 1."""
        if self.parents is None:
            return list(range(1, len(self.tokens) + 1))
        depth: list[int] = []
        for parent in self.parents:
            depth.append(1 if parent < 0 else depth[parent] + 1)
        return depth


def choose(logits: Tensor, temperature: float, generator: torch.Generator | None) -> tuple[int, Tensor | None]:
    """Greedy argmax, or a sample from softmax(logits / T) and that distribution [V]."""
    if temperature <= 0:
        return int(logits.argmax()), None
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)), probs


# ----------------------------------------------------------------------------------------------
# How long a drafting window runs
# ----------------------------------------------------------------------------------------------


class DraftLength:
    """How long a drafting window runs (the engine's gamma is the most it drafts): `begin()` opens a
    window, `more(prob)` is asked after each draft with the drafter's own probability of the token it
    drafted and says whether to draft another. This base class always drafts the full window."""

    name = "fixed"
    needs_prob = False  # the drafter skips computing probabilities a rule does not read

    def begin(self) -> None:
        pass

    def more(self, prob: float) -> bool:
        return True


class ConfidenceStop(DraftLength):
    """transformers' `assistant_confidence_threshold` rule: a draft whose probability is below
    `min_confidence` is kept, none follow it."""

    needs_prob = True

    def __init__(self, min_confidence: float) -> None:
        if not 0.0 < min_confidence < 1.0:
            raise ValueError(f"min_confidence must lie in (0, 1), got {min_confidence}")
        self.min_confidence = min_confidence
        self.name = f"confidence<{min_confidence:g}"

    def more(self, prob: float) -> bool:
        return prob >= self.min_confidence


class ExpectedGainStop(DraftLength):
    """Draft another token while that is expected to raise the iteration's tokens per millisecond.

    After i drafts the window expects E = 1 + P_1 + ... + P_i tokens (the bonus token included) for a
    cost C = verify_ms + i * (draft_ms + verify_token_ms), where P_j, the chance that drafts 1..j are
    all accepted, multiplies the calibrated acceptance of each draft's confidence (`accept_by_bin`,
    equal-width bins over [0, 1], measured on validation roll-outs by train_hidden_adapter.py). One
    more draft adds about P_i * mean_accept tokens for draft_ms + verify_token_ms, which pays iff
    P_i * mean_accept * C >= (draft_ms + verify_token_ms) * E. Costs come from a timing profile of
    the machine the engine runs on, so the same drafter drafts longer where target steps are dear, and
    from the path it runs: on the static and compiled paths every verify pass is padded to gamma + 1
    positions, so there verify_token_ms is 0 and an extra draft costs its draft step only
    (`from_profile(..., padded_verify=True)`).
    """

    needs_prob = True

    def __init__(self, accept_by_bin: list[float], mean_accept: float, draft_ms: float, verify_ms: float,
                 verify_token_ms: float = 0.0) -> None:
        if not accept_by_bin or any(not 0.0 <= a <= 1.0 for a in accept_by_bin) or not 0.0 <= mean_accept <= 1.0:
            raise ValueError("accept_by_bin and mean_accept must be acceptance rates in [0, 1]")
        if draft_ms < 0 or verify_ms <= 0 or verify_token_ms < 0:
            raise ValueError("draft_ms and verify_token_ms must be >= 0 and verify_ms > 0")
        self.accept, self.mean = list(accept_by_bin), mean_accept
        self.step_ms, self.verify_ms = draft_ms + verify_token_ms, verify_ms
        self.name = "expected-gain"
        self.begin()

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any], draft_ms: float, verify_ms: float,
                         verify_token_ms: float = 0.0) -> ExpectedGainStop:
        """From a checkpoint's `draft_calibration` (metrics.RolloutAccumulator.calibration)."""
        counts, rates = calibration["count"], calibration["rate"]
        seen = [(n, r) for n, r in zip(counts, rates, strict=True) if n and r is not None]
        mean = sum(n * r for n, r in seen) / sum(n for n, _ in seen) if seen else 0.0
        accept = [0.0 if a is None else float(a) for a in calibration["accept"]]
        return cls(accept, mean, draft_ms, verify_ms, verify_token_ms)

    @classmethod
    def from_profile(cls, calibration: dict[str, Any], config: AdapterConfig, profile: Any, gamma: int,
                     draft_ms: float, padded_verify: bool = False) -> ExpectedGainStop:
        """At a timing profile's costs (cost_model.TimingProfile) for an adapter of `config` whose draft step
        takes `draft_ms`, on the engine's path: on the eager path a verify pass grows with its drafts, one
        verified token costing (verify(gamma + 1) - verify(1)) / gamma on top of verify(1); with
        `padded_verify` (the static and compiled paths, where every verify pass with a draft is padded to
        gamma + 1 positions) each pass costs verify(gamma + 1) and an extra draft no verify time. A lockstep
        level (`egpt_per_draft`) adds EventGPT's decode step to every draft, a level that reads EventGPT
        once per iteration (`egpt_per_iteration`) adds it to every verify pass."""
        if padded_verify:
            verify, verify_token = profile.verify_ms(gamma + 1), 0.0
        else:
            verify_token = max(0.0, (profile.verify_ms(gamma + 1) - profile.verify_ms(1)) / gamma)
            verify = profile.verify_ms(1)
        if config.egpt_per_draft:
            draft_ms += profile.egpt_decode_ms
        elif config.egpt_per_iteration:
            verify += profile.egpt_decode_ms
        return cls.from_calibration(calibration, draft_ms, verify, verify_token)

    def begin(self) -> None:
        self.p, self.expected, self.cost = 1.0, 1.0, self.verify_ms

    def more(self, prob: float) -> bool:
        self.p *= self.accept[min(int(prob * len(self.accept)), len(self.accept) - 1)]
        self.expected += self.p
        self.cost += self.step_ms
        return self.p * self.mean * self.cost >= self.step_ms * self.expected


def draft_length(rule: DraftLength | None, min_confidence: float = 0.0) -> DraftLength:
    """The rule a drafter uses: `rule` if given, else the confidence stop at `min_confidence` (0 = fixed)."""
    if rule is not None:
        return rule
    return ConfidenceStop(min_confidence) if min_confidence > 0 else DraftLength()


def draft_prob(logits: Tensor, token: int, q: Tensor | None) -> float:
    """The drafter's own probability of `token`: q[token] when sampling, else softmax(logits)[token]."""
    probs = q if q is not None else torch.softmax(logits.float(), dim=-1)
    return float(probs[token])



def roll_out(h: Tensor, k: int, head: Tensor, temperature: float, generator: torch.Generator | None,
             step: Callable[[int, list[int], Tensor], Tensor], length: DraftLength | None = None) -> Draft:
    """Up to k drafts from a target-state estimate h [1, 1, D]: draft i is chosen from LM_head(h), then
    `step(i, drafts so far, h)` gives the estimate for the next position (not called after the last,
    nor when the `length` rule ends the window)."""
    length = length or DraftLength()
    length.begin()
    tokens: list[int] = []
    probs: list[Tensor] = []
    for i in range(k):
        logits = h[0, 0].float() @ head.T
        tok, q = choose(logits, temperature, generator)
        tokens.append(tok)
        if q is not None:
            probs.append(q)
        if i == k - 1 or (length.needs_prob and not length.more(draft_prob(logits, tok, q))):
            break
        h = step(i, tokens, h)
    return Draft(tokens, torch.stack(probs) if probs else None)



# ----------------------------------------------------------------------------------------------
# Adapter caches: one interface, grown per step or preallocated
# ----------------------------------------------------------------------------------------------


class AdapterCache(Protocol):
    """A causal adapter's keys/values while drafting, batch 1: `cache(x, h_target=, token_ids=, context=)`
    gives the outputs [1, T, D_target] for T new positions and keeps their keys/values; `crop(n)` keeps the
    first n positions; `reset()` starts a new answer; `length` is the positions held; `path` names the
    engine path it serves (dynamic, static or compiled) and `width` its multi-position step (None: any)."""

    length: int
    path: str
    width: int | None

    def reset(self) -> None: ...

    def crop(self, length: int) -> None: ...

    def __call__(self, x: Tensor, *, h_target: Tensor | None = None, token_ids: Tensor | None = None,
                 context: Tensor | ProjectedContext | None = None) -> Tensor: ...


class DynamicAdapterCache:
    """The adapter's drafting steps on the engine's eager path: keys/values in per-layer buffers [1, H, S, Dh]
    grown by doubling (`EAGLEStyleAdapter.buffer_step`: nothing copied per step, attention over the slots
    written so far only); another adapter, or one in training mode, keeps `adapter.step` on a (k, v) list.
    Rolling back moves the length; any step width runs as it comes.

        cache = DynamicAdapterCache(adapter)
        out = cache(x)                 # adapter.step(x, past) with the past held here
        cache.crop(n)                  # keep the first n positions
    """

    path = "dynamic"
    width = None

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.reset()

    def reset(self) -> None:
        """Start a new answer (the buffers are kept)."""
        self.past: list | None = None
        self.length = 0

    def crop(self, length: int) -> None:
        """Keep the first `length` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a drafting cache of length {self.length} to {length}")
        self.past = [(k[:, :, :length], v[:, :, :length]) for k, v in self.past] if self.past and length else None
        self.length = length

    def _buffered(self, n: int) -> bool:
        """Whether this step goes into the buffers (grown to hold `n` more positions)."""
        a = self.adapter
        if not isinstance(a, EAGLEStyleAdapter) or a.training:
            return False
        need = self.length + n
        if not self.keys or self.keys[0].shape[2] < need:
            cfg, ref = a.config, a.pos_embed
            size = max(need, 2 * self.keys[0].shape[2] if self.keys else 64)
            shape = (1, cfg.num_heads, size, cfg.target_dim // cfg.num_heads)
            grown = [[torch.zeros(shape, device=ref.device, dtype=ref.dtype) for _ in a.layers] for _ in range(2)]
            for new, old in zip(grown[0] + grown[1], self.keys + self.values, strict=False):
                new[:, :, : old.shape[2]] = old
            self.keys, self.values = grown
        return True

    @torch.no_grad()
    def __call__(self, x: Tensor, *, h_target: Tensor | None = None, token_ids: Tensor | None = None,
                 context: Tensor | ProjectedContext | None = None, positions: Tensor | slice | None = None,
                 allowed: Tensor | None = None) -> Tensor:
        """Outputs [1, T, D_target] for the T new positions of x [1, T, D_in] (as `adapter.step`); a draft tree's
        nodes give their `positions` [T] and `allowed` [1, 1, T, length + T] (EAGLEStyleAdapter.buffer_step)."""
        n = x.shape[1]
        if self._buffered(n):
            out = self.adapter.buffer_step(x, self.keys, self.values, self.length, positions=positions,
                                           allowed=allowed, h_target=h_target, token_ids=token_ids, context=context)
        elif positions is not None or allowed is not None:
            raise ValueError(f"tree steps need an EAGLE-style adapter in eval mode, got {self.adapter.config.name}")
        else:
            out, self.past = self.adapter.step(x, self.past, h_target=h_target, token_ids=token_ids, context=context)
        self.length += n
        return out


class StaticAdapterCache:
    """A causal adapter's drafting steps on preallocated keys/values (one [1, H, max_seq_len, Dh] pair per
    layer, reused by every answer), with the length held on the host: the adapter's side of the engine's
    static path. Steps are one position (a roll-out draft) or `width` positions (the verified positions
    of one iteration, padded to `width`; wider inputs run in pieces), so a compiled step sees two shapes.
    Rolling back (`crop`) moves only the length; later steps overwrite what lies beyond it.

        cache = StaticAdapterCache(adapter, width=6, compile=True)
        out = cache(x)                 # like adapter.step(x, past) with the past held here
        cache.crop(n)                  # keep the first n positions
    """

    def __init__(self, adapter: EAGLEStyleAdapter, width: int = 1, compile: bool = False) -> None:
        if not isinstance(adapter, EAGLEStyleAdapter):
            raise ValueError(f"a static drafting cache is for the causal levels {NEXT_POSITION_LEVELS}, "
                             f"got {adapter.config.name}")
        if width < 1:
            raise ValueError("width must be >= 1")
        cfg, ref = adapter.config, adapter.pos_embed
        shape = (1, cfg.num_heads, cfg.max_seq_len, cfg.target_dim // cfg.num_heads)
        self.keys = [torch.zeros(shape, device=ref.device, dtype=ref.dtype) for _ in adapter.layers]
        self.values = [torch.zeros(shape, device=ref.device, dtype=ref.dtype) for _ in adapter.layers]
        for buf in (*self.keys, *self.values):  # fixed addresses, so CUDA graphs can write them in place
            torch._dynamo.mark_static_address(buf)
        self.adapter, self.width, self.compiled = adapter, width, compile
        self.path = "compiled" if compile else "static"
        self.max_len = cfg.max_seq_len
        self.length = 0
        self._step = adapter.static_step
        if compile:
            # Every adapter shares static_step's code, and each one is compiled at two widths: leave room
            # for several adapters in one process (a benchmark runs one per decode configuration).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            mode = "reduce-overhead" if ref.device.type == "cuda" else "default"
            self._step = torch.compile(adapter.static_step, mode=mode, fullgraph=True, dynamic=False)

    def reset(self) -> None:
        """Start a new answer."""
        self.length = 0

    def crop(self, length: int) -> None:
        """Keep the first `length` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a drafting cache of length {self.length} to {length}")
        self.length = length

    @torch.no_grad()
    def __call__(self, x: Tensor, *, h_target: Tensor | None = None, token_ids: Tensor | None = None,
                 context: Tensor | ProjectedContext | None = None) -> Tensor:
        """Outputs [1, T, D_target] for the T new positions of x [1, T, D_in] (h_target, token_ids as in step)."""
        n = x.shape[1]
        if x.shape[0] != 1:
            raise ValueError("the static drafting cache is batch 1")
        if self.length + n > self.max_len:
            raise ValueError(f"{self.adapter.config.name} has learned positions for {self.max_len} steps, got "
                             f"{self.length + n}; rebuild with a larger max_seq_len")
        if not self.adapter.config.context:
            context = None  # as `step`: a level without a context input ignores one
        elif isinstance(context, ProjectedContext):
            context = context.vector
        elif context is not None:
            context = self.adapter.context_vector(context.to(self.adapter.pos_embed.dtype))
        if n == 0:
            return x.new_zeros(1, 0, self.adapter.config.target_dim)
        outs, i = [], 0
        while i < n:
            m = min(self.width, n - i)
            if m > 1 and self.length + self.width > self.max_len:
                m = 1  # no room left to pad: the last positions go one at a time
            cut = slice(i, i + m)
            outs.append(self._piece(x[:, cut], None if h_target is None else h_target[:, cut],
                                    None if token_ids is None else token_ids[:, cut], context))
            i += m
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _piece(self, x: Tensor, h_target: Tensor | None, token_ids: Tensor | None, context: Tensor | None) -> Tensor:
        m = x.shape[1]
        width = 1 if m == 1 else self.width
        # fresh strides: a compiled step is specialised to its inputs' strides as well as their shapes (a
        # slice of a longer input keeps the longer one's batch stride even where it is "contiguous")
        x, h_target, token_ids = (None if t is None else t.clone(memory_format=torch.contiguous_format)
                                  for t in (x, h_target, token_ids))
        if width > m:  # pad to the one multi-position shape; the pad slots lie beyond the new length
            x = F.pad(x, (0, 0, 0, width - m))
            h_target = None if h_target is None else F.pad(h_target, (0, 0, 0, width - m))
            token_ids = None if token_ids is None else F.pad(token_ids, (0, width - m))
        pos = torch.arange(self.length, self.length + width, device=x.device)
        out = self._step(x, pos, self.keys, self.values, h_target=h_target, token_ids=token_ids, context=context)
        if self.compiled:  # CUDA-graph outputs are overwritten by the next replay
            out = out.clone()
        self.length += m
        return out[:, :m]


# ----------------------------------------------------------------------------------------------
# The drafters
# ----------------------------------------------------------------------------------------------


class Drafter(Protocol):
    """What the loop needs from a drafting mode.

    begin(inputs): start a new answer (drafter prompt inputs, None for drafters without a model).
    draft(k, stop): up to k draft tokens for the next positions (fewer if `stop` gets set).
    accept(tokens, states, layers): the newly verified tokens (accepted drafts + the target's own token) and
        the target states [n, D] that chose them; the drafter re-synchronises on them. `layers` [n, K, D]:
        the same positions' states at the layers the drafter's `target_layers` names (taken from the same
        verify pass), None when it names none.
    A drafter may set `target_layers` (hidden-state indices, vlm_runners.LAYER_IDS_MEANING): the engine then
    has the target return those layers' states from every pass.
    """

    name: str
    uses_drafter_model: bool

    def begin(self, inputs: VLMInputs | None) -> None: ...

    def draft(self, k: int, stop: threading.Event | None = None) -> Draft: ...

    def accept(self, tokens: list[int], states: Tensor, layers: Tensor | None = None) -> None: ...


class DrafterLM:
    """EventGPT's language model stepped on a token sequence it is told, re-synced by cropping.

    `states_for(tokens)` returns g_0..g_n [n + 1, D] (g_i: post-norm state after the prompt and
    tokens[:i], so g_i predicts position i); only the part of `tokens` that differs from what the
    cache already holds is fed, in one pass. Target ids outside EventGPT's vocabulary become <unk>
    (0) and are counted in `foreign_tokens`.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self._inputs: VLMInputs | None = None
        self.foreign_tokens = 0
        self.steps = 0

    def start(self, inputs: VLMInputs) -> None:
        if inputs is self._inputs:  # shared by the prefill and the decode drafter of one answer
            return
        out = self.runner.prefill(inputs, logits_for="last")
        self._inputs, self.cache = inputs, out.cache
        self.prompt_len = inputs.attention_mask.shape[1]
        self.fed: list[int] = []
        self.states = out.hidden[0, -1:]  # [1, D]
        self.foreign_tokens = 0
        self.steps = 0

    def states_for(self, tokens: list[int]) -> Tensor:
        p = 0
        limit = min(len(tokens), len(self.fed))
        while p < limit and tokens[p] == self.fed[p]:
            p += 1
        if p < len(self.fed):
            self.runner.crop_cache(self.cache, self.prompt_len + p)
            self.fed, self.states = self.fed[:p], self.states[: p + 1]
        if p < len(tokens):
            new = torch.tensor([tokens[p:]], device=self.runner.device)
            ids, foreign = to_drafter_vocab(new, self.runner.vocab_size)
            self.foreign_tokens += foreign
            mask = torch.ones(1, self.prompt_len + len(tokens), dtype=torch.long, device=self.runner.device)
            out = self.runner.decode(ids, self.cache, mask)
            self.fed = list(tokens)
            self.states = torch.cat([self.states, out.hidden[0]])
            self.steps += 1
        return self.states


def _dtype(adapter: Any) -> torch.dtype:
    return next(iter(adapter.parameters()), torch.empty(0)).dtype


def drafter_for(config: Any, phase: str = "decode") -> str:
    """The drafter class a level drafts with in `phase`, from its roles: a per-position level
    (predicts "same") drafts on EventGPT's text (EventGPTDrafter, both phases), a level that rolls out
    RolloutDrafter, a lockstep one (EventGPT state at every draft) FusedDrafter; the prefill phase takes
    per-position levels only ("" for the others)."""
    if config.predicts == "same":
        return "EventGPTDrafter"
    if phase == "prefill":
        return ""
    return "RolloutDrafter" if config.rolls_out else "FusedDrafter" if config.egpt_per_draft else ""


def _refuse(config: Any, drafter: str, needs: str) -> ValueError:
    """The one-line error for a level given to a drafter that cannot run it, naming the one that can."""
    right = drafter_for(config)
    return ValueError(f"{drafter} needs {needs}, got {config.name}"
                      + (f" (it drafts with {right}; make_drafter picks it)" if right else ""))


class EventGPTDrafter:
    """Mode (c) and the prefill drafter: EventGPT writes the draft text, a per-position adapter maps
    each of its states into the target's space, the target's LM head picks the draft token.

    `adapter=None` uses EventGPT's states as they are (equal widths), so with `head` = the
    drafter's own LM head this is plain two-model drafting (EventGPT's own greedy tokens).
    """

    uses_drafter_model = True

    def __init__(self, lm: DrafterLM, adapter: Any | None, head: Tensor, temperature: float = 0.0,
                 generator: torch.Generator | None = None, min_confidence: float = 0.0,
                 length: DraftLength | None = None) -> None:
        if adapter is not None and adapter.config.predicts != "same":
            raise _refuse(adapter.config, "EventGPTDrafter",
                          f"a per-position adapter ({', '.join(PER_POSITION_LEVELS)})")
        self.lm, self.adapter, self.head = lm, adapter, head
        self.temperature, self.generator = temperature, generator
        self.length = draft_length(length, min_confidence)
        self.name = f"eventgpt+{adapter.config.name if adapter is not None else 'own-head'}"
        # a bidirectional adapter (L4) attends over the whole prefix seen so far, the others read one state
        self._whole_prefix = adapter is not None and getattr(adapter, "causal", None) is False

    def begin(self, inputs: VLMInputs | None) -> None:
        if inputs is None:
            raise ValueError(f"{self.name} drafts with EventGPT and needs its prompt inputs")
        self.lm.start(inputs)
        self.verified: list[int] = []

    def _adapt(self, states: Tensor) -> Tensor:
        states = states.to(self.head.device)  # EventGPT may sit on a second device
        if self.adapter is None:
            return states[-1]
        dt = _dtype(self.adapter)
        if self._whole_prefix:
            return self.adapter(states[None].to(dt))[0, -1]
        return self.adapter(states[-1:][None].to(dt))[0, 0]

    @torch.no_grad()
    def draft(self, k: int, stop: threading.Event | None = None) -> Draft:
        tokens: list[int] = []
        probs: list[Tensor] = []
        self.length.begin()
        for _ in range(k):
            if stop is not None and stop.is_set():
                break
            state = self._adapt(self.lm.states_for(self.verified + tokens))
            logits = state.float() @ self.head.T
            tok, q = choose(logits, self.temperature, self.generator)
            tokens.append(tok)
            if q is not None:
                probs.append(q)
            if self.length.needs_prob and not self.length.more(draft_prob(logits, tok, q)):
                break
        return Draft(tokens, torch.stack(probs) if probs else None)

    def accept(self, tokens: list[int], states: Tensor, layers: Tensor | None = None) -> None:
        self.verified += tokens


class _AdapterDrafter:
    """What the causal adapter drafters (modes a and b) share: per answer the verified tokens and target
    states, the adapter's cache (`self.cache`, one AdapterCache: grown per step by default, preallocated
    after `use_static_cache`) and how many verified positions it holds (`fed`)."""

    def _setup(self, adapter: Any, head: Tensor, temperature: float, generator: torch.Generator | None,
               min_confidence: float, length: DraftLength | None) -> None:
        if adapter.config.token_input and getattr(adapter, "token_table", None) is None:
            raise ValueError(f"{adapter.config.name} has a token input: attach_token_table(the target's input "
                             "embeddings) before drafting")
        self.adapter, self.head = adapter, head
        self.temperature, self.generator = temperature, generator
        self.length = draft_length(length, min_confidence)
        self.cache: AdapterCache = DynamicAdapterCache(adapter)
        self._caches: dict[tuple[int, bool] | None, AdapterCache] = {None: self.cache}
        # E3, E3E: the target layers whose states a verified position gives the adapter (the engine has the
        # target return them from each verify pass)
        self.target_layers: tuple[int, ...] = tuple(adapter.config.target_layers) \
            if getattr(adapter.config, "reads_layers", False) else ()

    def use_static_cache(self, width: int, compile: bool = False) -> None:
        """Draft on a preallocated adapter cache: steps of one position (roll-out drafts) or `width` (one
        iteration's verified positions, padded), compiled with `compile` (CUDA graphs on CUDA). Each
        (width, compile) keeps its own cache, so engines of different paths can share this drafter:
        each engine selects its path at the start of every answer."""
        key = (width, compile)
        if key not in self._caches:
            self._caches[key] = StaticAdapterCache(self.adapter, width=width, compile=compile)
        self.cache = self._caches[key]

    def use_dynamic_cache(self) -> None:
        """Draft on a cache grown per step (the default)."""
        self.cache = self._caches[None]

    @property
    def decode_path(self) -> str:
        """The adapter-cache path this drafter drafts on now: dynamic, static or compiled."""
        return self.cache.path

    def _reset(self) -> None:
        self.verified: list[int] = []
        self.states: list[Tensor] = []  # verified target states, [D] each
        self.fed = 0  # verified positions inside the adapter's cache (rolled-out entries come after them)
        self.cache.reset()

    def accept(self, tokens: list[int], states: Tensor, layers: Tensor | None = None) -> None:
        self.verified += tokens
        if self.target_layers:  # E3: a verified position's input is its K layer states, [K * D]
            if layers is None or layers.shape[-2] != len(self.target_layers):
                raise ValueError(f"{self.adapter.config.name} reads the target's layer states "
                                 f"{list(self.target_layers)} of every verified position: the target must return them "
                                 "(runner.capture_layers)")
            states = layers.flatten(-2)
        self.states += list(states)

    def _tokens(self, ids: list[int]) -> dict[str, Tensor]:
        """`token_ids` [1, len(ids)] for an adapter with a token input, else nothing."""
        if not self.adapter.config.uses_tokens:
            return {}
        return {"token_ids": torch.tensor([ids], dtype=torch.long, device=self.head.device)}


class RolloutDrafter(_AdapterDrafter):
    """Mode (a): an EAGLE-style adapter rolled out on its own outputs. Its context is the verified
    positions 0..N-1: target states s_t for B1 and L5E (trained target -> target), EventGPT's states
    g_t for L5 (trained on them; `lm` given, EventGPT fed the accepted text in one pass per iteration,
    in lockstep). The output at N-1 estimates s_N (-> draft N); each further draft feeds the previous
    output back in as the next input, one adapter step each. With a token input each position also
    reads the embedding of its token: the verified token, or the token just drafted from it. L5E also
    reads EventGPT's prompt-end state, computed once per answer by EventGPT's prefill (`lm` given;
    EventGPT never decodes for it).
    """

    def __init__(self, adapter: Any, head: Tensor, temperature: float = 0.0,
                 generator: torch.Generator | None = None, lm: DrafterLM | None = None,
                 min_confidence: float = 0.0, length: DraftLength | None = None) -> None:
        cfg = adapter.config
        if not cfg.rolls_out:
            raise _refuse(cfg, "RolloutDrafter", f"a level that rolls out ({', '.join(ROLLOUT_LEVELS)})")
        if cfg.reads_drafter != (lm is not None):
            raise ValueError(f"{cfg.name} consumes {cfg.consumes} states"
                             f"{' and EventGPT context' if cfg.context else ''}: pass lm (EventGPT) "
                             "exactly when it reads EventGPT states")
        problem = rollout_problem(cfg) if isinstance(cfg, AdapterConfig) else None
        if problem:
            raise ValueError(problem)
        self._setup(adapter, head, temperature, generator, min_confidence, length)
        self.lm = lm
        self.uses_drafter_model = lm is not None
        self.name = f"rollout+{cfg.name}"

    def begin(self, inputs: VLMInputs | None) -> None:
        self.context: dict[str, Tensor] = {}
        if self.lm is not None:
            if inputs is None:
                raise ValueError(f"{self.name} reads EventGPT states and needs its prompt inputs")
            self.lm.start(inputs)
            if self.adapter.config.context == "drafter":  # g_0: EventGPT's state at the end of its prompt
                g0 = self.lm.states[:1].to(self.head.device, _dtype(self.adapter))
                with torch.no_grad():  # projected once per answer, not at every draft
                    self.context = {"context": ProjectedContext(self.adapter.context_vector(g0))}
        self._reset()

    def _context(self, n: int) -> Tensor:
        """Inputs of the verified positions fed..n-1, [1, n - fed, D]."""
        if self.adapter.config.consumes == "drafter":
            ctx = self.lm.states_for(self.verified[: n - 1])[self.fed : n]  # g_fed .. g_{N-1}
        else:
            ctx = torch.stack(self.states[self.fed : n])
        return ctx[None].to(self.head.device, _dtype(self.adapter))

    def _feed(self) -> Tensor:
        """The verified positions the cache lacks go in (the previous window's rolled-out entries cropped
        off first); the adapter's outputs for them [1, n - fed, D], the last estimating the next state."""
        n = len(self.states)
        self.cache.crop(self.fed)  # drop the previous window's rolled-out positions
        out = self.cache(self._context(n), **self._tokens(self.verified[self.fed : n]), **self.context)
        self.fed = n
        return out

    @torch.no_grad()
    def draft(self, k: int, stop: threading.Event | None = None) -> Draft:
        if k == 0:
            return Draft([])
        out = self._feed()
        if self.temperature <= 0 and not self.length.needs_prob:
            return self._greedy_window(out[:, -1:], k)

        def step(i: int, tokens: list[int], h: Tensor) -> Tensor:  # the adapter reads its own output
            return self.cache(h, **self._tokens(tokens[i:]), **self.context)

        # out[:, -1:] estimates the target state at the next position
        return roll_out(out[:, -1:], k, self.head, self.temperature, self.generator, step, self.length)


    def _greedy_window(self, h: Tensor, k: int) -> Draft:
        """`roll_out` for a greedy fixed-length window with the tokens kept on the device: each draft's
        argmax feeds the next step as it is, and the k tokens are read once (one host sync per window,
        not one per draft)."""
        self.length.begin()
        drafted: list[Tensor] = []
        for i in range(k):
            tok = (h[0, 0].float() @ self.head.T).argmax().view(1, 1)
            drafted.append(tok)
            if i < k - 1:
                kw = {"token_ids": tok} if self.adapter.config.uses_tokens else {}
                h = self.cache(h, **kw, **self.context)
        return Draft(torch.cat(drafted, dim=1)[0].tolist())


class FusedDrafter(_AdapterDrafter):
    """Mode (b): L5F over pairs (EventGPT state g_t, target state s_t); output at t estimates s_{t+1}.

    EventGPT steps in lockstep on the accepted text plus the drafts (not concurrently): draft N uses
    g_{N-1} and the verified s_{N-1}; draft N+i uses g_{N+i-1} (EventGPT fed the earlier drafts) and the
    adapter's own previous output in place of the not yet verified target state. With a token input
    each position also reads its (verified or drafted) token's embedding.
    """

    uses_drafter_model = True

    def __init__(self, lm: DrafterLM, adapter: Any, head: Tensor, temperature: float = 0.0,
                 generator: torch.Generator | None = None, min_confidence: float = 0.0,
                 length: DraftLength | None = None) -> None:
        if not adapter.config.egpt_per_draft:
            raise _refuse(adapter.config, "FusedDrafter",
                          f"a lockstep level ({', '.join(levels(egpt_per_draft=True))})")
        self._setup(adapter, head, temperature, generator, min_confidence, length)
        self.lm = lm
        self.name = f"fused+{adapter.config.name}"

    def begin(self, inputs: VLMInputs | None) -> None:
        if inputs is None:
            raise ValueError(f"{self.name} runs EventGPT and needs its prompt inputs")
        self.lm.start(inputs)
        self._reset()

    @torch.no_grad()
    def draft(self, k: int, stop: threading.Event | None = None) -> Draft:
        n = len(self.verified)
        if k == 0:
            return Draft([])
        dt = _dtype(self.adapter)
        g = self.lm.states_for(self.verified[: n - 1])  # g_0 .. g_{N-1}
        self.cache.crop(self.fed)  # drop the previous window's rolled-out positions
        x = g[self.fed : n][None].to(self.head.device, dt)
        v = torch.stack(self.states[self.fed : n])[None].to(dt)
        out = self.cache(x, h_target=v, **self._tokens(self.verified[self.fed : n]))
        self.fed = n

        def step(i: int, tokens: list[int], h: Tensor) -> Tensor:  # EventGPT fed drafts 0..i-1 gives g_{N+i}
            g_next = self.lm.states_for(self.verified + tokens[:i])[-1]
            return self.cache(g_next[None, None].to(self.head.device, dt), h_target=h, **self._tokens(tokens[i:]))

        return roll_out(out[:, -1:], k, self.head, self.temperature, self.generator, step, self.length)


class SyntheticDrafter:
    """The controlled drafter: drafts the target's own greedy continuation (`set_reference` before each
    answer), each draft independently replaced by another token with probability 1 - p, and spends
    `cost_ms` per draft step (a busy wait, so the figure is exact). It measures the engine itself at
    a known acceptance, also at shapes where no trained drafter exists."""

    uses_drafter_model = False

    def __init__(self, p: float, vocab_size: int, cost_ms: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"synthetic acceptance must be in [0, 1], got {p}")
        self.p, self.vocab_size, self.cost_ms = p, vocab_size, cost_ms
        self.rng = torch.Generator().manual_seed(seed)
        self.reference: list[int] = []
        self.name = f"synthetic(p={p:g},{cost_ms:g}ms)"

    def set_reference(self, tokens: list[int]) -> None:
        self.reference = list(tokens)

    def begin(self, inputs: VLMInputs | None) -> None:
        self.n = 0

    def draft(self, k: int, stop: threading.Event | None = None) -> Draft:
        tokens = []
        for i in range(k):
            pos = self.n + i
            true = self.reference[pos] if pos < len(self.reference) else 0
            if float(torch.rand((), generator=self.rng)) >= self.p:
                true = (true + 1 + int(torch.randint(self.vocab_size - 1, (), generator=self.rng))) % self.vocab_size
            tokens.append(true)
            if self.cost_ms > 0:
                end = time.perf_counter() + self.cost_ms / 1e3
                while time.perf_counter() < end:
                    pass
        return Draft(tokens)

    def accept(self, tokens: list[int], states: Tensor, layers: Tensor | None = None) -> None:
        self.n += len(tokens)


class NoDrafter:
    """Drafts nothing: every iteration is one ordinary decode step of the target."""

    uses_drafter_model = False
    name = "target-alone"

    def begin(self, inputs: VLMInputs | None) -> None:
        pass

    def draft(self, k: int, stop: threading.Event | None = None) -> Draft:
        return Draft([])

    def accept(self, tokens: list[int], states: Tensor, layers: Tensor | None = None) -> None:
        pass




@torch.no_grad()
def replay_schedule(drafter: Drafter, states: Tensor, tokens: list[int], gamma: int,
                    max_new_tokens: int, layers: Tensor | None = None) -> list[tuple[int, int]]:
    """The live engine's decode schedule replayed offline on a recorded greedy answer: `tokens` [N] the
    target's answer (up to and including EOS), `states` [N, D] the target states that chose them (a chunk's
    vl_hidden). Each window drafts min(gamma, max_new_tokens - done - 1) positions (a chain or a tree), is
    scored as the greedy verify would score it (the target's argmax after a verified prefix is the recorded
    next token) and the drafter re-syncs on the accepted tokens plus the target's own, with their recorded
    states. Returns (depth drafted, drafts accepted) per verify pass, so chains and trees compare on the
    same samples and the same schedule (accepted + 1 per pass: tokens per verify). `layers` [N, K, D]: the
    same positions' states at the target layers an E3/E3E drafter reads (a chunk's vl_layers)."""
    drafter.begin(None)
    drafter.accept(tokens[:1], states[:1], layers=None if layers is None else layers[:1])
    done, passes = 1, []
    while done < len(tokens):
        draft = drafter.draft(min(gamma, max_new_tokens - done - 1))
        parents = draft.parents if draft.parents is not None else list(range(-1, len(draft.tokens) - 1))
        node, n = -1, 0
        while done + n < len(tokens):
            node = next((c for c, p in enumerate(parents) if p == node and draft.tokens[c] == tokens[done + n]), None)
            if node is None:
                break
            n += 1
        passes.append((max(draft.depths(), default=0), n))
        n = min(n, len(tokens) - done - 1)  # the target's own token follows the accepted drafts
        cut = slice(done, done + n + 1)
        drafter.accept(tokens[cut], states[cut], layers=None if layers is None else layers[cut])
        done += n + 1
    return passes


# ----------------------------------------------------------------------------------------------
# One constructor, and one drafting step for the benchmarks' timers
# ----------------------------------------------------------------------------------------------


def drafter_problem(config: Any | None, phase: str) -> str | None:
    """Why a level (config None: no adapter) cannot draft in `phase` ("prefill" or "decode"), or None: the
    prefill drafter is an EventGPTDrafter, which takes the per-position levels only; every level drafts
    while decoding."""
    if phase not in PHASES:
        return f"phase must be one of {', '.join(PHASES)}, got {phase!r}"
    if config is not None and phase == "prefill" and config.predicts != "same":
        return (f"the prefill drafter (EventGPTDrafter) needs a per-position level ({', '.join(PER_POSITION_LEVELS)}), "
                f"got {config.name}, a decode level (it drafts with {drafter_for(config)})")
    return None


def make_drafter(adapter: Any | None, head: Tensor, *, lm: DrafterLM | None = None, phase: str = "decode",
                 temperature: float = 0.0, generator: torch.Generator | None = None,
                 length: DraftLength | None = None, min_confidence: float = 0.0) -> Drafter:
    """The drafter `adapter` drafts with in `phase`, chosen from its config's roles (`drafter_for`):
    a per-position level -> EventGPTDrafter (mode c; the prefill drafter), a level that rolls out ->
    RolloutDrafter (mode a; given `lm` only where it reads EventGPT), a lockstep level -> FusedDrafter
    (mode b). No adapter: EventGPT's own states through `head` with `lm` (two-model drafting, `head` then
    EventGPT's own LM head), or NoDrafter without. `head` [V, D] is the target's LM head; `lm` is EventGPT's
    DrafterLM (share one between the drafters of an answer); `length` (or `min_confidence`) the draft-length
    rule (draft_trees.tree_drafter makes a roll-out level draft trees). A level the phase cannot run, or a
    missing `lm`, is one ValueError line naming what it needs."""
    problem = drafter_problem(None if adapter is None else adapter.config, phase)
    if problem:
        raise ValueError(problem)
    opts = {"temperature": temperature, "generator": generator, "length": length, "min_confidence": min_confidence}
    if adapter is None:
        return EventGPTDrafter(lm, None, head, **opts) if lm is not None else NoDrafter()
    cfg = adapter.config
    if cfg.reads_drafter and lm is None:
        what = "prompt-end state" if cfg.consumes == "target" else "states"
        raise ValueError(f"{cfg.name} ({drafter_for(cfg)}) reads EventGPT's {what}: "
                         "pass lm=DrafterLM(EventGPT's runner)")
    if cfg.predicts == "same":
        return EventGPTDrafter(lm, adapter, head, **opts)
    if cfg.rolls_out:
        return RolloutDrafter(adapter, head, lm=lm if cfg.reads_drafter else None, **opts)
    return FusedDrafter(lm, adapter, head, **opts)


@torch.no_grad()
def draft_step(adapter: Any, cached: int, path: str = "dynamic", head: Tensor | None = None) -> Callable[[], Any]:
    """One drafting step of a causal adapter at batch 1 after `cached` positions, as a zero-argument
    function for a timer. The adapter cache of `path` ("dynamic": grown per step; "static": preallocated;
    "compiled": preallocated, the step compiled, so warm it up before timing) is filled with `cached`
    positions of random inputs (with h_target, token ids and L5E's projected context where the level reads
    them); every call crops back to them and steps one more position. With `head` [V, D_target] the call
    also picks the draft token (LM head, argmax read on the host): one roll-out draft as the engine drafts."""
    if path not in ("dynamic", "static", "compiled"):
        raise ValueError(f"path must be dynamic, static or compiled, got {path!r}")
    cfg, ref = adapter.config, next(adapter.parameters())
    dev, dt = ref.device, ref.dtype
    x = torch.randn(1, cached + 1, cfg.in_dim, device=dev, dtype=dt)
    v = torch.randn(1, cached + 1, cfg.target_dim, device=dev, dtype=dt) if cfg.consumes == "both" else None
    ids = torch.zeros(1, cached + 1, dtype=torch.long, device=dev) if cfg.uses_tokens else None
    ctx = ProjectedContext(adapter.context_vector(torch.randn(1, cfg.drafter_dim, device=dev, dtype=dt))) \
        if cfg.context == "drafter" else None

    def inputs(cut: slice) -> dict[str, Any]:
        return {"h_target": None if v is None else v[:, cut], "token_ids": None if ids is None else ids[:, cut],
                "context": ctx}

    # width 1: the cached positions go in one at a time, so a compiled step has a single shape
    cache = DynamicAdapterCache(adapter) if path == "dynamic" else \
        StaticAdapterCache(adapter, width=1, compile=path == "compiled")
    cache(x[:, :cached], **inputs(slice(0, cached)))
    last, step_inputs = x[:, cached:], inputs(slice(cached, cached + 1))
    if getattr(cfg, "reads_layers", False):  # E3: the cached positions hold layer states, a draft its own output
        last = torch.randn(1, 1, cfg.target_dim, device=dev, dtype=dt)

    def once() -> Any:
        cache.crop(cached)
        h = cache(last, **step_inputs)
        return h if head is None else int((h[0, 0].float() @ head.T).argmax())

    return once


__all__ = [
    "PER_POSITION_LEVELS",
    "ROLLOUT_LEVELS",
    "AdapterCache",
    "ConfidenceStop",
    "Draft",
    "DraftLength",
    "Drafter",
    "DrafterLM",
    "DynamicAdapterCache",
    "EventGPTDrafter",
    "ExpectedGainStop",
    "FusedDrafter",
    "NoDrafter",
    "RolloutDrafter",
    "StaticAdapterCache",
    "SyntheticDrafter",
    "choose",
    "draft_length",
    "draft_prob",
    "draft_step",
    "drafter_for",
    "drafter_problem",
    "make_drafter",
    "replay_schedule",
    "roll_out",
]
