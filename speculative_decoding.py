"""Live lossless speculative decoding: EventGPT (or an adapter) drafts, Video-LLaVA verifies.

The engine works over the shared runner interface of vlm_runners.py (prefill, multi-token decode,
crop_cache, lm_head_weight) and is batch 1 only: one user, one GPU is the product case, and batch 1
keeps every cache a plain prefix that can be cropped.

    engine = SpeculativeDecoder(vl, decode_drafter=EventGPTDrafter(lm, adapter, head), gamma_decode=5,
                                prefill_drafter=EventGPTDrafter(lm, prefill_adapter, head), gamma_prefill=8)
    out = engine.generate(target_prompt, drafter_prompt, max_new_tokens=50)
    out.tokens, out.trace                 # list[int]; per-phase and per-iteration record (drafted, accepted, ms)

Two phases per answer:
  1. prefill hiding: the target's vision + prefill runs on the calling thread while a second thread
     (its own CUDA stream) runs EventGPT's vision + prefill and then drafts with the prefill adapter
     (L1-L4) until the target's prefill ends or `gamma_prefill` drafts exist. The intervals of both
     are recorded, so the overlap is measured, not assumed.
  2. decode: `gamma_decode` drafts, one verify pass of the target over [last token, drafts], keep the
     accepted prefix plus the target's own next token, crop both caches, re-sync the drafter.

Drafters (one small protocol, `Drafter`: begin / draft / accept):
  - `RolloutDrafter`   (mode a) B1 (from verified target states), L5E (B1 plus EventGPT's prompt-end state,
                       computed once by EventGPT's prefill beside the target's) or L5 (from EventGPT's states
                       of the verified text, one EventGPT pass per iteration) rolled out on its own outputs;
                       adapters with a token input read each verified or drafted token's embedding.
  - `FusedDrafter`     (mode b) L5F over EventGPT states and target states; EventGPT steps in
                       lockstep on the accepted text (not concurrently).
  - `EventGPTDrafter`  (mode c) EventGPT decodes the draft text itself, each of its states goes through
                       a per-position adapter (L1-L4) and the target's LM head; also the prefill drafter.
                       With no adapter and the drafter's own head it is classic two-model drafting.
  - `SyntheticDrafter` the controlled drafter: the target's own greedy continuation, each draft
                       corrupted with probability 1 - p, with a chosen cost per draft step.
  - `NoDrafter`        drafts nothing: the engine is then the target alone on the same code path.

How many drafts a window holds (at most gamma_decode) is a `DraftLength`: fixed, transformers' confidence
stop (`ConfidenceStop`), or `ExpectedGainStop`, which drafts on while the calibrated acceptance estimate
says another draft raises the iteration's tokens per millisecond. All read only the drafter's side, so
every one of them is lossless.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from hidden_adapter import AdapterConfig, ProjectedContext, StaticAdapterCache, levels, rollout_problem
from vlm_runners import VLMInputs, to_drafter_vocab

PER_POSITION_LEVELS = levels(predicts="same")  # output[t] estimates the target state at t
ROLLOUT_LEVELS = levels(rolls_out=True)


class LosslessError(AssertionError):
    """A greedy speculative output differs from the target's own greedy output."""


# ----------------------------------------------------------------------------------------------
# Small shared pieces: choosing a token, accepting drafts, stage timing
# ----------------------------------------------------------------------------------------------


@dataclass
class Draft:
    tokens: list[int]
    probs: Tensor | None = None  # [k, V] float32 draft distribution (sampling only)

    def cut(self, start: int, stop: int | None = None) -> Draft:
        """Drafts [start, stop) (Python slice semantics)."""
        return Draft(self.tokens[start:stop], None if self.probs is None else self.probs[start:stop])


def choose(logits: Tensor, temperature: float, generator: torch.Generator | None) -> tuple[int, Tensor | None]:
    """Greedy argmax, or a sample from softmax(logits / T) and that distribution [V]."""
    if temperature <= 0:
        return int(logits.argmax()), None
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)), probs


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
    the machine the engine runs on, so the same drafter drafts longer where target steps are dear.
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


def _sync(device: torch.device) -> None:
    """Wait for the current stream only: the other thread's stream keeps running (phase 1)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class StageClock:
    """Milliseconds per named stage. `stage` times between device synchronisations (phase 1, where the
    two threads' intervals are compared on the wall clock); `lap` times the decode loop's stages without
    any: on CUDA it records a pair of events on the current stream and reads them all in `settle()`
    (once per answer), so the loop keeps one host sync per iteration, the read of the verified tokens."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.origin = time.perf_counter()
        self._laps: list[tuple[dict[str, float], str, Any, Any]] = []

    def now_ms(self) -> float:
        return (time.perf_counter() - self.origin) * 1e3

    @contextlib.contextmanager
    def stage(self, record: dict[str, float], name: str) -> Iterator[None]:
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        record[name] = record.get(name, 0.0) + (time.perf_counter() - start) * 1e3

    @contextlib.contextmanager
    def lap(self, record: dict[str, float], name: str) -> Iterator[None]:
        if self.device.type != "cuda":  # CPU work is synchronous: `stage`'s wall clock, whose syncs are no-ops
            with self.stage(record, name):
                yield
            return
        stream = torch.cuda.current_stream(self.device)  # the clock's device, whichever device is current
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        yield
        end.record(stream)
        self._laps.append((record, name, begin, end))

    def settle(self) -> None:
        """Add every pending lap to its record (waits for the last one)."""
        if self._laps:
            self._laps[-1][3].synchronize()
        for record, name, begin, end in self._laps:
            record[name] = record.get(name, 0.0) + begin.elapsed_time(end)
        self._laps.clear()


# ----------------------------------------------------------------------------------------------
# Drafters
# ----------------------------------------------------------------------------------------------


class Drafter(Protocol):
    """What the loop needs from a drafting mode.

    begin(inputs): start a new answer (drafter prompt inputs, None for drafters without a model).
    draft(k, stop): up to k draft tokens for the next positions (fewer if `stop` gets set).
    accept(tokens, states): the newly verified tokens (accepted drafts + the target's own token) and
        the target states [n, D] that chose them; the drafter re-synchronises on them.
    """

    name: str
    uses_drafter_model: bool

    def begin(self, inputs: VLMInputs | None) -> None: ...

    def draft(self, k: int, stop: threading.Event | None = None) -> Draft: ...

    def accept(self, tokens: list[int], states: Tensor) -> None: ...


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


def _level(adapter: Any) -> str:
    return adapter.config.name


def _dtype(adapter: Any) -> torch.dtype:
    return next(iter(adapter.parameters()), torch.empty(0)).dtype


def _crop_adapter_cache(past: list | None, length: int) -> list | None:
    """An adapter's KV cache (list of (k, v) [B, H, T, Dh]) cut to its first `length` positions."""
    if not past or length == 0:
        return None
    return [(k[:, :, :length], v[:, :, :length]) for k, v in past]


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
        if adapter is not None and _level(adapter) not in PER_POSITION_LEVELS:
            raise ValueError(f"EventGPT drafting needs a per-position adapter {PER_POSITION_LEVELS}, "
                             f"got {_level(adapter)}")
        self.lm, self.adapter, self.head = lm, adapter, head
        self.temperature, self.generator = temperature, generator
        self.length = draft_length(length, min_confidence)
        self.name = f"eventgpt+{_level(adapter) if adapter is not None else 'own-head'}"

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
        if _level(self.adapter) == "L4":  # bidirectional: attend over the whole prefix seen so far
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

    def accept(self, tokens: list[int], states: Tensor) -> None:
        self.verified += tokens


class _VerifiedStates:
    """What the adapter drafters (modes a and b) keep per answer: the verified tokens and target states,
    the adapter's KV cache and how many verified positions it holds. The cache grows per step (the
    default) or is preallocated (`use_static_cache`, the engine's static and compiled paths)."""

    static: StaticAdapterCache | None = None

    def use_static_cache(self, width: int, compile: bool = False) -> None:
        """Draft on a preallocated adapter cache: steps of one position (roll-out drafts) or `width` (one
        iteration's verified positions, padded), compiled with `compile` (CUDA graphs on CUDA). Each
        (width, compile) keeps its own cache, so engines of different paths can share this drafter:
        each engine selects its path at the start of every answer."""
        if not hasattr(self, "_statics"):
            self._statics: dict[tuple[int, bool], StaticAdapterCache] = {}
        key = (width, compile)
        if key not in self._statics:
            self._statics[key] = StaticAdapterCache(self.adapter, width=width, compile=compile)
        self.static = self._statics[key]

    def use_dynamic_cache(self) -> None:
        """Draft on a cache grown per step (the default)."""
        self.static = None

    @property
    def decode_path(self) -> str:
        """The adapter-cache path this drafter drafts on now: dynamic, static or compiled."""
        return "dynamic" if self.static is None else "compiled" if self.static.compiled else "static"

    def _reset(self) -> None:
        self.verified: list[int] = []
        self.states: list[Tensor] = []  # verified target states, [D] each
        self.past: list | None = None
        self.fed = 0  # verified positions inside the adapter's cache (rolled-out entries come after them)
        if self.static is not None:
            self.static.reset()

    def _rewind(self) -> None:
        """Drop the rolled-out positions: keep the `fed` verified ones."""
        if self.static is not None:
            self.static.crop(self.fed)
        else:
            self.past = _crop_adapter_cache(self.past, self.fed)

    def _adapter_step(self, x: Tensor, **kw: Any) -> Tensor:
        """The adapter's outputs for the new positions x, its cache extended by them."""
        if self.static is not None:
            return self.static(x, **kw)
        out, self.past = self.adapter.step(x, self.past, **kw)
        return out

    def accept(self, tokens: list[int], states: Tensor) -> None:
        self.verified += tokens
        self.states += list(states)

    @staticmethod
    def _check_table(adapter: Any) -> None:
        if adapter.config.token_input and getattr(adapter, "token_table", None) is None:
            raise ValueError(f"{_level(adapter)} has a token input: attach_token_table(the target's input "
                             "embeddings) before drafting")

    def _tokens(self, ids: list[int]) -> dict[str, Tensor]:
        """`token_ids` [1, len(ids)] for an adapter with a token input, else nothing."""
        if not self.adapter.config.uses_tokens:
            return {}
        return {"token_ids": torch.tensor([ids], dtype=torch.long, device=self.head.device)}


class RolloutDrafter(_VerifiedStates):
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
        if _level(adapter) not in ROLLOUT_LEVELS:
            raise ValueError(f"roll-out drafting needs {ROLLOUT_LEVELS}, got {_level(adapter)}")
        if adapter.config.reads_drafter != (lm is not None):
            raise ValueError(f"{_level(adapter)} consumes {adapter.config.consumes} states"
                             f"{' and EventGPT context' if adapter.config.context else ''}: pass lm (EventGPT) "
                             "exactly when it reads EventGPT states")
        self._check_table(adapter)
        problem = rollout_problem(adapter.config) if isinstance(adapter.config, AdapterConfig) else None
        if problem:
            raise ValueError(problem)
        self.adapter, self.head, self.lm = adapter, head, lm
        self.temperature, self.generator = temperature, generator
        self.length = draft_length(length, min_confidence)
        self.uses_drafter_model = lm is not None
        self.name = f"rollout+{_level(adapter)}"

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

    @torch.no_grad()
    def draft(self, k: int, stop: threading.Event | None = None) -> Draft:
        if k == 0:
            return Draft([])
        n = len(self.states)
        self._rewind()
        out = self._adapter_step(self._context(n), **self._tokens(self.verified[self.fed : n]), **self.context)
        self.fed = n
        if self.temperature <= 0 and not self.length.needs_prob:
            return self._greedy_window(out[:, -1:], k)

        def step(i: int, tokens: list[int], h: Tensor) -> Tensor:  # the adapter reads its own output
            return self._adapter_step(h, **self._tokens(tokens[i:]), **self.context)

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
                h = self._adapter_step(h, **kw, **self.context)
        return Draft(torch.cat(drafted, dim=1)[0].tolist())


class FusedDrafter(_VerifiedStates):
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
        if _level(adapter) != "L5F":
            raise ValueError(f"fused drafting needs an L5F adapter, got {_level(adapter)}")
        self._check_table(adapter)
        self.lm, self.adapter, self.head = lm, adapter, head
        self.temperature, self.generator = temperature, generator
        self.length = draft_length(length, min_confidence)
        self.name = "fused+L5F"

    def begin(self, inputs: VLMInputs | None) -> None:
        if inputs is None:
            raise ValueError("L5F drafting runs EventGPT and needs its prompt inputs")
        self.lm.start(inputs)
        self._reset()

    @torch.no_grad()
    def draft(self, k: int, stop: threading.Event | None = None) -> Draft:
        n = len(self.verified)
        if k == 0:
            return Draft([])
        dt = _dtype(self.adapter)
        g = self.lm.states_for(self.verified[: n - 1])  # g_0 .. g_{N-1}
        self._rewind()
        x = g[self.fed : n][None].to(self.head.device, dt)
        v = torch.stack(self.states[self.fed : n])[None].to(dt)
        out = self._adapter_step(x, h_target=v, **self._tokens(self.verified[self.fed : n]))
        self.fed = n

        def step(i: int, tokens: list[int], h: Tensor) -> Tensor:  # EventGPT fed drafts 0..i-1 gives g_{N+i}
            g_next = self.lm.states_for(self.verified + tokens[:i])[-1]
            return self._adapter_step(g_next[None, None].to(self.head.device, dt), h_target=h,
                                      **self._tokens(tokens[i:]))

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

    def accept(self, tokens: list[int], states: Tensor) -> None:
        self.n += len(tokens)


class NoDrafter:
    """Drafts nothing: every iteration is one ordinary decode step of the target."""

    uses_drafter_model = False
    name = "target-alone"

    def begin(self, inputs: VLMInputs | None) -> None:
        pass

    def draft(self, k: int, stop: threading.Event | None = None) -> Draft:
        return Draft([])

    def accept(self, tokens: list[int], states: Tensor) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


@dataclass
class Iteration:
    drafted: int
    accepted: int
    from_prefill: bool = False  # verified drafts written during the target's prefill (phase 1)
    ms: dict[str, float] = field(default_factory=dict)  # draft, verify, crop (crop includes drafter re-sync)


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
        if static_cache or compile:  # the prefill window's wider verify runs in gamma_decode + 1 pieces
            # None keeps a cache the caller sized with runner.use_static_cache (4096 positions if none).
            size = max_cache_len or getattr(target, "max_cache_len", None) or 4096
            target.use_static_cache(size, verify_width=gamma_decode + 1, compile=compile)
        # The roll-out adapters' steps take the target's path (selected again at every answer: a drafter
        # may serve several engines).
        self._adapter_path = (gamma_decode + 1, compile) if static_cache or compile else None
        self._select_adapter_path(decode_drafter, prefill_drafter)
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
            _sync(self.drafter_device)
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
        out, prompt_len, pre = self._phase1(target_prompt, drafter_prompt, clock, trace.phase1)
        if out.logits.shape[0] != 1:
            raise ValueError("the engine is batch 1: pass one prompt")
        # Position 0 is the target's prefill token; the first prefill draft is checked against it, the
        # rest wait for the first verify pass (they were drafted after that first draft).
        n0, first = accept_drafts(out.logits[0, -1:], pre.cut(0, 1), self.temperature, self.generator)
        tokens = [pre.tokens[0] if first is None else first]
        pending = pre.cut(1) if n0 else Draft([])
        trace.phase1.update(drafted=len(pre.tokens), first_accepted=n0)
        drafter.accept(tokens, out.hidden[0, -1:])
        cache = out.cache
        while tokens[-1] != self.eos and len(tokens) < max_new_tokens:
            it = Iteration(0, 0, from_prefill=bool(pending.tokens))
            k = min(self.gamma if not pending.tokens else len(pending.tokens), max_new_tokens - len(tokens) - 1)
            with clock.lap(it.ms, "draft"):
                draft = (pending if pending.tokens else drafter.draft(k)).cut(0, k)
            pending = Draft([])
            ids = torch.tensor([[tokens[-1], *draft.tokens]], device=target.device)
            mask = self._mask(prompt_len + len(tokens) + len(draft.tokens))
            with clock.lap(it.ms, "verify"):
                step = target.decode(ids, cache, mask)  # row i scores position len(tokens) + i
                n, nxt = accept_drafts(step.logits[0], draft, self.temperature, self.generator)
            new = [*draft.tokens[:n], nxt]
            with clock.lap(it.ms, "crop"):
                target.crop_cache(cache, prompt_len + len(tokens) + n)  # prompt + every token but the newest
                drafter.accept(new, step.hidden[0, : n + 1])
            it.drafted, it.accepted = len(draft.tokens), n
            trace.iterations.append(it)
            tokens += new[: new.index(self.eos) + 1] if self.eos in new else new
        _sync(target.device)
        trace.total_ms = clock.now_ms()
        clock.settle()
        lms = {id(d.lm): d.lm for d in (drafter, self.prefill_drafter) if getattr(d, "lm", None) is not None}
        trace.foreign_tokens = sum(lm.foreign_tokens for lm in lms.values())
        return SpecOutput(tokens[:max_new_tokens], trace)


# ----------------------------------------------------------------------------------------------
# Helpers shared by the benchmark and the tests
# ----------------------------------------------------------------------------------------------


def greedy_reference(target: Any, inputs: VLMInputs, max_new_tokens: int) -> list[int]:
    """The target's own greedy answer (runner.generate), up to and including EOS."""
    out = target.generate(inputs, max_new_tokens)
    return out.tokens[0, : int(out.mask[0].sum())].tolist()


# Rounding unit of each dtype; fp32 gets 0 so the CPU fp32 checks stay exact. A near-tie counts as a
# numeric tie when the two tokens' logits are within TIE_ULPS rounding units of their size on every path:
# 8 for fp16 (0.8% of the logit), 2 for bf16 (1.6%: its unit is 8x coarser, and a looser rule would
# let a real difference of several percent pass as rounding).
ROUNDING_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 0.0, torch.float64: 0.0}
TIE_ULPS = {torch.float16: 8, torch.bfloat16: 2}


@dataclass
class NumericTie:
    """A greedy difference explained by rounding: at `position` the speculative answer chose `tokens[0]`
    and the reference `tokens[1]`, the two best logits of the target there, at most `margin` apart on
    every recomputed path (within `tolerance`)."""

    position: int
    tokens: tuple[int, int]
    margin: float
    tolerance: float


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
    return NumericTie(position, (a, b), margin, tolerance)


@torch.no_grad()
def tie_logits(target: Any, inputs: VLMInputs, prefix: list[int]) -> list[Tensor]:
    """The target's logits [V] for the position after `prefix`, recomputed both ways the engine and the
    reference compute them (one wide pass over the prefix, and one decode step per token), each through
    the model's own LM head and through the fp32 head (`lm_head_weight`) on the same state."""
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


def check_lossless(spec: list[int], reference: list[int], what: str,
                   recompute: Callable[[list[int]], list[Tensor]] | None = None,
                   dtype: torch.dtype = torch.float32) -> NumericTie | None:
    """None when equal. At the first differing position, `recompute(prefix)` (e.g. `tie_logits`) gives
    the target's logits there on several paths: a NumericTie is returned when the difference is within
    rounding (`numeric_tie`); otherwise, or without `recompute`, LosslessError names the position."""
    if spec == reference:
        return None
    pos = next((i for i, (a, b) in enumerate(zip(spec, reference, strict=False)) if a != b),
               min(len(spec), len(reference)))
    margin = ""
    if recompute is not None and pos < min(len(spec), len(reference)):
        rows = recompute(spec[:pos])
        tie = numeric_tie(rows, spec[pos], reference[pos], dtype, pos)
        if tie is not None:
            return tie
        top = rows[0].float().flatten().topk(2)
        margin = f"; target top-2 margin there {float(top.values[0] - top.values[1]):.4g} (not a rounding tie)"
    raise LosslessError(f"{what}: speculative output differs from the target's greedy output at position "
                        f"{pos} (lengths {len(spec)} vs {len(reference)}){margin}")


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
        "per_position_tries": per_pos_tries,
        "per_position_hits": per_pos_hits,
        "stage_ms": ms,
    }


__all__ = [
    "ConfidenceStop",
    "Draft",
    "DraftLength",
    "Drafter",
    "DrafterLM",
    "EventGPTDrafter",
    "ExpectedGainStop",
    "FusedDrafter",
    "LosslessError",
    "NoDrafter",
    "NumericTie",
    "RolloutDrafter",
    "SpecOutput",
    "SpeculativeDecoder",
    "StageClock",
    "SyntheticDrafter",
    "Trace",
    "accept_drafts",
    "check_lossless",
    "choose",
    "greedy_reference",
    "numeric_tie",
    "summarise_trace",
    "tie_logits",
]
