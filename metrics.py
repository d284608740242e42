"""Acceptance metrics of an adapter's output against the target's hidden states and tokens.

Two levels (formulas and conventions: docs/METRICS.md):

- hidden-state level, the training signal: cosine similarity per valid position, Accept@tau (share of
  positions with cos > tau), Consecutive@tau (run of accepted positions from position 0);
- token level, the ground truth for speed: the adapter's output goes through the target's LM head
  and its argmax (top-5) is compared with the target's own greedy token, at the same position and,
  for next-position adapters, at the next one; runs of matches from position 0 (prefill free tokens)
  and from every start position (accepted drafts per decode iteration).

`AcceptanceAccumulator` keeps running sums only, so it can be fed batch by batch (validation every
epoch, evaluation of a whole test split) and merged across DDP ranks:

    >>> acc = AcceptanceAccumulator(predicts="next", lm_head=weight)      # weight [V, D]
    >>> for batch in loader:
    ...     acc.update(adapter(x, mask), batch["vl_hidden"], mask, batch["vl_tokens"])
    >>> t = acc.totals().to(device); torch.distributed.all_reduce(t); acc.load_totals(t)
    >>> acc.compute()["shifted_top1"]

Only valid positions count: padded rows are never projected, and a padded position ends every run.
Masks are right-padded prefixes (True up to and including EOS), as the extraction writes them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from common import read_json

log = logging.getLogger("xmodal_sd.metrics")

THRESHOLDS = (0.80, 0.85, 0.90, 0.95)
TOPK = 5


def tau_key(tau: float) -> str:
    """`0.8` -> `"0.80"`: the suffix of every per-threshold key."""
    return f"{tau:.2f}"


def run_from_start(ok: Tensor) -> Tensor:
    """ok [B, T] bool -> [B] long: number of leading True values (consecutive successes from position 0)."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def runs_from_every_start(ok: Tensor) -> Tensor:
    """ok [B, T] bool -> [B, T] long: at t, the number of consecutive True values starting at t."""
    run = torch.zeros_like(ok, dtype=torch.long)
    nxt = torch.zeros(ok.shape[0], dtype=torch.long, device=ok.device)
    for t in range(ok.shape[1] - 1, -1, -1):
        nxt = torch.where(ok[:, t], nxt + 1, torch.zeros_like(nxt))
        run[:, t] = nxt
    return run


def strict_json(obj: Any) -> Any:
    """Metric dicts/lists with NaN and inf replaced by None, so json.dumps writes strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def capped_mean(hist: Tensor, cap: int) -> float:
    """Mean of min(r, cap) for a histogram `hist[r]` = how many runs had length r."""
    n = float(hist.sum())
    if n == 0:
        return math.nan
    r = torch.arange(hist.numel(), dtype=hist.dtype)
    return float((hist * r.clamp(max=cap)).sum()) / n


class RunningSums:
    """Named float64 running sums that merge across DDP ranks as one vector: `totals()` gives it (the same
    length on every rank; all_reduce it), `load_totals()` puts the summed vector back."""

    def _init_sums(self, shapes: dict[str, int]) -> None:
        self._shapes = shapes
        self._sums = {name: torch.zeros(n, dtype=torch.float64) for name, n in shapes.items()}

    def totals(self) -> Tensor:
        return torch.cat(list(self._sums.values()))

    def load_totals(self, totals: Tensor) -> None:
        """Replace the running sums by `totals` (e.g. after summing them across ranks)."""
        totals = totals.detach().to("cpu", torch.float64).flatten()
        expected = sum(self._shapes.values())
        if totals.numel() != expected:
            raise ValueError(f"totals has {totals.numel()} values, this accumulator keeps {expected}")
        offset = 0
        for name, n in self._shapes.items():
            self._sums[name] = totals[offset:offset + n].clone()
            offset += n

    def _add(self, name: str, value: Tensor | float) -> None:
        if isinstance(value, Tensor):
            value = value.detach().to("cpu", torch.float64).flatten()
        self._sums[name] += value


class AcceptanceAccumulator(RunningSums):
    """Running sums of every acceptance metric; see the module docstring and docs/METRICS.md.

    predicts: "same" (output[t] estimates target state t: L1-L4) or "next" (output[t] estimates
        target state t+1: L5, B1, L5F, L5E). The hidden-state keys (`cos_mean`, `accept@tau`,
        `consecutive@tau`) compare the output with the state it estimates; "next" adapters also get
        the same-position hidden keys with a `same_` prefix.
    lm_head: the target's LM head weight [V, D] (from extract_vl_lm_head.py); without it only the
        hidden-state level is computed. Moved once to the device of the first batch, as float32.
    gamma_prefill / gamma_decode: the drafting windows of the two phases.
    lm_head_batch: rows projected at a time, so the [rows, V] logits stay bounded.
    max_positions: per-position statistics and run histograms cover positions 0..max_positions-1;
        later positions still count in every overall figure (set it >= the sequence length).
    """

    def __init__(
        self,
        *,
        predicts: str = "same",
        lm_head: Tensor | None = None,
        thresholds: Sequence[float] = THRESHOLDS,
        gamma_prefill: int = 7,
        gamma_decode: int = 5,
        lm_head_batch: int = 4096,
        max_positions: int = 128,
    ):
        if predicts not in ("same", "next"):
            raise ValueError(f"predicts must be 'same' or 'next', got {predicts!r}")
        if lm_head is not None and lm_head.dim() != 2:
            raise ValueError(f"lm_head must be the [V, D] weight, got shape {tuple(lm_head.shape)}")
        if min(gamma_prefill, gamma_decode, lm_head_batch, max_positions) < 1:
            raise ValueError("gamma_prefill, gamma_decode, lm_head_batch and max_positions must be >= 1")
        self.predicts = predicts
        self.thresholds = tuple(float(t) for t in thresholds)
        self.gamma_prefill = gamma_prefill
        self.gamma_decode = gamma_decode
        self.lm_head_batch = lm_head_batch
        self.max_positions = max_positions
        self._lm_head = lm_head
        self._lm_head_dev: Tensor | None = None
        self.has_tokens = False  # set by the first update that had token-level input
        k, p = len(self.thresholds), max_positions
        shapes: dict[str, int] = {
            # hidden level, primary pairing (what the adapter predicts)
            "n_pos": 1, "cos_sum": 1, "accept": k, "n_samples": 1, "run_cos": k,
            "pos_n": p, "pos_cos": p, "pos_accept": p * k,
            # hidden level, same position (for "next" adapters; equals the primary for "same")
            "same_n": 1, "same_cos_sum": 1, "same_accept": k,
            # token level, same position
            "tok_n": 1, "top1": 1, "top5": 1, "pos_tok_n": p, "pos_top1": p, "pos_top5": p,
            "tok_samples": 1, "run_top1_hist": p + 1,
            # token level, primary pairing vs hidden threshold: count(cos > tau), count(cos > tau & match)
            "cond_n": k, "cond_match": k,
            # token level, shifted (output[t] vs target token t+1)
            "sh_n": 1, "sh_top1": 1, "sh_top5": 1, "pos_sh_n": p, "pos_sh_top1": p, "pos_sh_top5": p,
            "sh_samples": 1, "sh_run0_hist": p + 1, "start_hist": p + 1, "n_starts": 1,
        }
        self._init_sums(shapes)

    # ------------------------------------------------------------------ running sums

    def totals(self) -> Tensor:
        """Every running sum as one 1-D float64 tensor (same length on every rank): all_reduce it,
        then `load_totals`. The last element flags whether token-level input was seen."""
        flag = torch.tensor([1.0 if self.has_tokens else 0.0], dtype=torch.float64)
        return torch.cat([super().totals(), flag])

    def load_totals(self, totals: Tensor) -> None:
        """Replace the running sums by `totals` (e.g. after summing them across ranks)."""
        totals = totals.detach().to("cpu", torch.float64).flatten()
        expected = sum(self._shapes.values()) + 1
        if totals.numel() != expected:
            raise ValueError(f"totals has {totals.numel()} values, this accumulator keeps {expected}")
        super().load_totals(totals[:-1])
        self.has_tokens = bool(totals[-1] > 0)

    def _per_position(self, values: Tensor, valid: Tensor) -> Tensor:
        """Sum over the batch of values [B, T] at valid positions, cut or padded to max_positions."""
        # where, not a product: padding may hold NaN or inf, and NaN * 0 is NaN
        col = torch.where(valid, values.double(), 0.0).sum(dim=0)[: self.max_positions]
        return F.pad(col, (0, self.max_positions - col.numel()))

    def _hist(self, runs: Tensor, where: Tensor) -> Tensor:
        """Histogram of run lengths (clamped to max_positions) over the entries selected by `where`."""
        return torch.bincount(runs[where].clamp(max=self.max_positions), minlength=self.max_positions + 1)

    # ------------------------------------------------------------------ update

    def _draft_topk(self, pred: Tensor, valid: Tensor) -> Tensor:
        """[B, T, k] token ids of the k highest LM-head logits of pred at valid positions (-1 elsewhere),
        projecting at most `lm_head_batch` rows at a time on pred's device."""
        assert self._lm_head is not None
        if self._lm_head_dev is None or self._lm_head_dev.device != pred.device:
            self._lm_head_dev = self._lm_head.to(pred.device, torch.float32)
        weight = self._lm_head_dev
        if weight.shape[1] != pred.shape[-1]:
            raise ValueError(f"lm_head width {weight.shape[1]} differs from the states' width {pred.shape[-1]}")
        k = min(TOPK, weight.shape[0])
        rows = pred[valid]
        out = torch.full((*valid.shape, TOPK), -1, dtype=torch.long, device=pred.device)
        top = torch.empty(rows.shape[0], k, dtype=torch.long, device=pred.device)
        for start in range(0, rows.shape[0], self.lm_head_batch):
            logits = rows[start:start + self.lm_head_batch].float() @ weight.T
            top[start:start + logits.shape[0]] = logits.topk(k, dim=-1).indices
        out[valid] = F.pad(top, (0, TOPK - k), value=-1)
        return out

    def _target_tokens(self, target: Tensor, valid: Tensor) -> Tensor:
        """The target's greedy tokens from its own states (when the caller has no stored tokens)."""
        return self._draft_topk(target, valid)[..., 0]

    def _hidden(self, cos: Tensor, valid: Tensor, prefix: str = "") -> Tensor:
        """Accumulate cos statistics over valid positions; returns the accepted mask [k, B, T]."""
        taus = torch.tensor(self.thresholds, device=cos.device)[:, None, None]
        accepted = (cos[None] > taus) & valid[None]
        if prefix:
            self._add("same_n", valid.sum())
            self._add("same_cos_sum", cos[valid].double().sum())
            self._add("same_accept", accepted.sum(dim=(1, 2)))
            return accepted
        self._add("n_pos", valid.sum())
        self._add("cos_sum", cos[valid].double().sum())
        self._add("accept", accepted.sum(dim=(1, 2)))
        has_any = valid[:, 0]
        self._add("n_samples", has_any.sum())
        self._add("run_cos", torch.stack([run_from_start(a)[has_any].sum() for a in accepted]))
        self._add("pos_n", self._per_position(torch.ones_like(cos), valid))
        self._add("pos_cos", self._per_position(cos, valid))
        self._add("pos_accept", torch.stack([self._per_position(a.double(), valid) for a in accepted], dim=1))
        return accepted

    def _tokens(self, top: Tensor, tokens: Tensor, valid: Tensor, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """Accumulate top-1/top-5 matches of draft top-k `top` [B, T, 5] vs `tokens` [B, T]; returns
        (top1 match [B, T] bool restricted to valid, run-from-0 lengths [B])."""
        n, t1, t5, pn, p1, p5, ns, hist = names
        m1 = (top[..., 0] == tokens) & valid
        m5 = (top == tokens[..., None]).any(dim=-1) & valid
        self._add(n, valid.sum())
        self._add(t1, m1.sum())
        self._add(t5, m5.sum())
        self._add(pn, self._per_position(torch.ones_like(tokens), valid))
        self._add(p1, self._per_position(m1.double(), valid))
        self._add(p5, self._per_position(m5.double(), valid))
        has_any = valid[:, 0]
        runs = run_from_start(m1)
        self._add(ns, has_any.sum())
        self._add(hist, self._hist(runs, has_any))
        return m1, runs

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, mask: Tensor, target_tokens: Tensor | None = None) -> None:
        """Add one batch. pred/target [B, T, D] (any float dtype), mask [B, T] bool (valid positions),
        target_tokens [B, T] the target's greedy tokens (optional; derived from `target` through the
        LM head when missing). Token-level sums need `lm_head`."""
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [B, T, D]")
        if mask.shape != pred.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} must be [B, T] = {tuple(pred.shape[:2])}")
        valid = mask.to(pred.device).bool()
        target = target.to(pred.device)
        same_cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)
        if self.predicts == "same":
            cos, pair_valid = same_cos, valid
        else:
            # output[t] vs target[t+1]; the last position has no successor inside the window
            pair_valid = torch.zeros_like(valid)
            pair_valid[:, :-1] = valid[:, :-1] & valid[:, 1:]
            cos = torch.zeros_like(same_cos)
            cos[:, :-1] = F.cosine_similarity(pred[:, :-1].float(), target[:, 1:].float(), dim=-1, eps=1e-6)
            self._hidden(same_cos, valid, prefix="same_")
        accepted = self._hidden(cos, pair_valid)

        if self._lm_head is None:
            return
        self.has_tokens = True
        top = self._draft_topk(pred, valid)
        tokens = (self._target_tokens(target, valid) if target_tokens is None
                  else target_tokens.to(pred.device).long())
        same_names = ("tok_n", "top1", "top5", "pos_tok_n", "pos_top1", "pos_top5", "tok_samples", "run_top1_hist")
        match, _ = self._tokens(top, tokens, valid, same_names)
        if self.predicts == "next":
            next_tokens = torch.full_like(tokens, -2)
            next_tokens[:, :-1] = tokens[:, 1:]
            sh_names = ("sh_n", "sh_top1", "sh_top5", "pos_sh_n", "pos_sh_top1", "pos_sh_top5",
                        "sh_samples", "sh_run0_hist")
            match, _ = self._tokens(top, next_tokens, pair_valid, sh_names)
            starts = runs_from_every_start(match)
            self._add("start_hist", self._hist(starts, pair_valid))
            self._add("n_starts", pair_valid.sum())
        self._add("cond_n", accepted.sum(dim=(1, 2)))
        self._add("cond_match", (accepted & match[None]).sum(dim=(1, 2)))

    # ------------------------------------------------------------------ results

    def _ratio(self, num: str | Tensor, den: str | Tensor) -> Tensor:
        a = self._sums[num] if isinstance(num, str) else num
        b = self._sums[den] if isinstance(den, str) else den
        return torch.where(b > 0, a / b.clamp(min=1), torch.full_like(a, math.nan))

    def prefill_free_by_window(self) -> list[float]:
        """Mean consecutive same-position token matches from position 0 within a window of g drafts,
        for g = 1..max_positions (entry g-1)."""
        hist = self._sums["run_top1_hist"]
        return [capped_mean(hist, g) for g in range(1, self.max_positions + 1)]

    def accept_len_by_gamma(self) -> list[float]:
        """Mean accepted drafts per decode iteration (no bonus token) for gamma = 1..max_positions."""
        hist = self._sums["start_hist"]
        return [capped_mean(hist, g) for g in range(1, self.max_positions + 1)]

    def compute(self) -> dict[str, float]:
        """Every overall metric as a flat dict of floats (NaN where nothing was counted)."""
        s = self._sums
        out: dict[str, float] = {"num_positions": float(s["n_pos"]), "num_samples": float(s["n_samples"])}
        out["cos_mean"] = float(self._ratio("cos_sum", "n_pos"))
        accept = self._ratio(s["accept"], s["n_pos"].expand(len(self.thresholds)))
        runs = self._ratio(s["run_cos"], s["n_samples"].expand(len(self.thresholds)))
        for i, tau in enumerate(self.thresholds):
            out[f"accept@{tau_key(tau)}"] = float(accept[i])
            out[f"consecutive@{tau_key(tau)}"] = float(runs[i])
        if self.predicts == "next":
            out["same_num_positions"] = float(s["same_n"])
            out["same_cos_mean"] = float(self._ratio("same_cos_sum", "same_n"))
            same_accept = self._ratio(s["same_accept"], s["same_n"].expand(len(self.thresholds)))
            for i, tau in enumerate(self.thresholds):
                out[f"same_accept@{tau_key(tau)}"] = float(same_accept[i])
        if not self.has_tokens:
            return out
        out["token_positions"] = float(s["tok_n"])
        out["token_top1"] = float(self._ratio("top1", "tok_n"))
        out["token_top5"] = float(self._ratio("top5", "tok_n"))
        out["token_consecutive"] = capped_mean(s["run_top1_hist"], self.max_positions)
        out["prefill_free"] = capped_mean(s["run_top1_hist"], self.gamma_prefill)
        cond = self._ratio(s["cond_match"], s["cond_n"])
        for i, tau in enumerate(self.thresholds):
            out[f"p_match_given_cos>{tau_key(tau)}"] = float(cond[i])
        if self.predicts == "next":
            out["shifted_positions"] = float(s["sh_n"])
            out["shifted_top1"] = float(self._ratio("sh_top1", "sh_n"))
            out["shifted_top5"] = float(self._ratio("sh_top5", "sh_n"))
            out["shifted_consecutive"] = capped_mean(s["sh_run0_hist"], self.max_positions)
            out["accept_len"] = capped_mean(s["start_hist"], self.gamma_decode)
            out["tokens_per_iter"] = out["accept_len"] + 1.0
        return out

    def per_position(self) -> dict[str, list[float]]:
        """Per-position means (index = position t; NaN where no sample is valid). For "next"
        adapters the hidden-state and shifted columns at t score the prediction of position t+1."""
        s = self._sums
        cols: dict[str, list[float]] = {
            "position": list(range(self.max_positions)),
            "count": s["pos_n"].tolist(),
            "cos_mean": self._ratio("pos_cos", "pos_n").tolist(),
        }
        accept = self._ratio(s["pos_accept"].view(self.max_positions, -1),
                             s["pos_n"][:, None].expand(-1, len(self.thresholds)))
        for i, tau in enumerate(self.thresholds):
            cols[f"accept@{tau_key(tau)}"] = accept[:, i].tolist()
        if self.has_tokens:
            cols["token_count"] = s["pos_tok_n"].tolist()
            cols["token_top1"] = self._ratio("pos_top1", "pos_tok_n").tolist()
            cols["token_top5"] = self._ratio("pos_top5", "pos_tok_n").tolist()
            if self.predicts == "next":
                cols["shifted_top1"] = self._ratio("pos_sh_top1", "pos_sh_n").tolist()
                cols["shifted_top5"] = self._ratio("pos_sh_top5", "pos_sh_n").tolist()
        return cols


# ----------------------------------------------------------------------------- drafting roll-outs

CALIBRATION_BINS = 20


@torch.no_grad()
def draft_tokens(outs: Sequence[Tensor], lm_head: Tensor, valid: Tensor, rows_at_a_time: int = 4096
                 ) -> tuple[Tensor, Tensor]:
    """Greedy drafts of a roll-out: for outs[k-1] [B, T, D] (`adapter.rollout`), the LM head's argmax
    token [K, B, T] and its softmax probability (the drafter's confidence) [K, B, T], at positions where
    `valid` [B, T] holds (-1 and 0 elsewhere). Rows go through the head `rows_at_a_time` at a time."""
    weight = lm_head.to(outs[0].device, torch.float32)
    k, (b, t) = len(outs), valid.shape
    tok = torch.full((k, b, t), -1, dtype=torch.long, device=outs[0].device)
    conf = torch.zeros((k, b, t), dtype=torch.float32, device=outs[0].device)
    for i, out in enumerate(outs):
        rows = out[valid].float()
        top = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
        prob = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], rows_at_a_time):
            logits = rows[start:start + rows_at_a_time] @ weight.T
            best = logits.max(dim=-1)
            top[start:start + logits.shape[0]] = best.indices
            prob[start:start + logits.shape[0]] = torch.exp(best.values - torch.logsumexp(logits, dim=-1))
        tok[i][valid] = top
        conf[i][valid] = prob
    return tok, conf


class RolloutAccumulator(RunningSums):
    """Acceptance of drafting roll-outs, i.e. of what live drafting computes (docs/METRICS.md).

    Fed with the greedy drafts of `adapter.rollout` (`draft_tokens`): drafts[k-1][b, t] is the token
    drafted for position t+k after the target verified positions 0..t, conf its probability under the
    drafter. A draft counts as accepted while it and every earlier draft of its iteration equal the
    target's tokens (positions past the answer's end are never accepted). Two schedules:

    - every start: each valid position t starts an iteration of min(gamma, answer end - t) drafts;
    - live: iterations where the engine runs them: the first after the prefill token (t = 0), each
      next one after the accepted drafts plus the target's own token, each drafting
      min(gamma, max_new_tokens - verified - 1) tokens (the engine's rule), to the answer's end.

    On the accepted path a roll-out's drafted tokens equal the target's tokens, which is why a
    roll-out fed the target's tokens gives the acceptance live drafting gets. Also kept: the
    confidence calibration of on-path drafts (acceptance rate per confidence bin), which the
    engine's expected-gain stop reads. Running sums only (merge across ranks with totals/load_totals).
    """

    def __init__(self, gamma: int = 5, max_new_tokens: int | None = None, bins: int = CALIBRATION_BINS):
        if gamma < 1 or bins < 1:
            raise ValueError("gamma and bins must be >= 1")
        self.gamma, self.max_new_tokens, self.bins = gamma, max_new_tokens, bins
        g = gamma
        self._init_sums({"starts": 1, "start_accepted": 1, "start_drafted": 1, "start_tries": g, "start_hits": g,
                         "iterations": 1, "accepted": 1, "drafted": 1, "live_tries": g, "live_hits": g,
                         "samples": 1, "tokens": 1, "cal_n": bins, "cal_hit": bins, "cal_conf": bins})

    @torch.no_grad()
    def update(self, drafts: Tensor, conf: Tensor, tokens: Tensor, mask: Tensor) -> None:
        """drafts/conf [K, B, T] (K >= gamma steps), tokens [B, T] the target's tokens, mask [B, T] valid
        positions (a right-padded prefix up to and including EOS)."""
        if drafts.shape[0] < self.gamma:
            raise ValueError(f"a roll-out of {drafts.shape[0]} steps cannot score gamma {self.gamma}")
        drafts, conf = drafts[: self.gamma].cpu(), conf[: self.gamma].cpu()
        tokens, mask = tokens.cpu().long(), mask.cpu().bool()
        g, (b, t) = self.gamma, tokens.shape
        lengths = mask.long().sum(dim=1)
        # hit[k-1, b, s]: the step-k draft from start s equals the target's token s + k (inside the answer)
        hit = torch.zeros(g, b, t, dtype=torch.bool)
        for k in range(1, min(g, t - 1) + 1):  # a window shorter than gamma has no later steps to score
            inside = torch.arange(t)[None, :] + k < lengths[:, None]
            hit[k - 1, :, : t - k] = (drafts[k - 1, :, : t - k] == tokens[:, k:]) & inside[:, : t - k]
        on_path = hit.long().cumprod(dim=0).bool()  # accepted: this and every earlier draft hit
        depth = torch.arange(1, g + 1)[:, None, None]
        exists = (torch.arange(t)[None, None, :] + depth < lengths[None, :, None])  # a target token to check
        starts = mask & (torch.arange(t)[None, :] + 1 < lengths[:, None])
        self._add("starts", starts.sum())
        self._add("start_accepted", (on_path & starts[None]).sum())
        self._add("start_drafted", (exists & starts[None]).sum())
        self._add("start_tries", (exists & starts[None]).sum(dim=(1, 2)))
        self._add("start_hits", (on_path & starts[None]).sum(dim=(1, 2)))
        # calibration: drafts whose earlier drafts were all accepted, by confidence bin
        before = torch.cat([torch.ones(1, b, t, dtype=torch.bool), on_path[:-1]], dim=0) & exists & starts[None]
        c = conf[before].double()
        idx = (c * self.bins).long().clamp(0, self.bins - 1)
        self._add("cal_n", torch.bincount(idx, minlength=self.bins))
        self._add("cal_hit", torch.bincount(idx, weights=hit[before].double(), minlength=self.bins))
        self._add("cal_conf", torch.bincount(idx, weights=c, minlength=self.bins))
        self._live(on_path, lengths, t)

    def _live(self, on_path: Tensor, lengths: Tensor, window: int) -> None:
        cap = self.max_new_tokens or window
        accepted_at = on_path.long().sum(dim=0)  # [B, T]: leading accepted drafts from each start
        tries = torch.zeros(self.gamma, dtype=torch.float64)
        hits = torch.zeros(self.gamma, dtype=torch.float64)
        its = acc = drafted = 0
        for b in range(on_path.shape[1]):
            n_b = int(lengths[b])
            if n_b == 0:
                continue
            self._add("samples", 1)
            self._add("tokens", n_b)
            verified = 1  # the prefill's token
            while verified < n_b:
                k = max(0, min(self.gamma, cap - verified - 1))
                n = min(int(accepted_at[b, verified - 1]), k)
                its, acc, drafted = its + 1, acc + n, drafted + k
                tries[:k] += 1
                hits[:n] += 1
                verified += n + 1
        self._add("iterations", its)
        self._add("accepted", acc)
        self._add("drafted", drafted)
        self._add("live_tries", tries)
        self._add("live_hits", hits)

    def calibration(self) -> dict[str, list[float]]:
        """Per confidence bin (edges i/bins): on-path drafts seen, their acceptance rate (NaN where
        none), their mean confidence; plus `accept` made monotone in confidence by pooling adjacent
        violators (isotonic regression, weighted by counts), which is what the engine's stop reads."""
        n, hit, conf = self._sums["cal_n"], self._sums["cal_hit"], self._sums["cal_conf"]
        rate = torch.where(n > 0, hit / n.clamp(min=1), torch.full_like(n, math.nan))
        return {"edges": [i / self.bins for i in range(self.bins + 1)], "count": n.tolist(),
                "rate": rate.tolist(), "mean_confidence": torch.where(n > 0, conf / n.clamp(min=1), n).tolist(),
                "accept": isotonic(rate.tolist(), n.tolist())}

    def compute(self) -> dict[str, Any]:
        s = self._sums
        starts, its = float(s["starts"]), float(s["iterations"])
        out: dict[str, Any] = {
            "gamma": self.gamma,
            "accept_len": float(s["start_accepted"]) / starts if starts else math.nan,
            "drafts_per_start": float(s["start_drafted"]) / starts if starts else math.nan,
            "per_position": [float(h / n) if n else math.nan for h, n in zip(s["start_hits"], s["start_tries"],
                                                                             strict=True)],
            "live_iterations": its,
            "live_accepted_per_iteration": float(s["accepted"]) / its if its else math.nan,
            "live_tokens_per_verify": (float(s["accepted"]) + its) / its if its else math.nan,
            "live_drafted_per_iteration": float(s["drafted"]) / its if its else math.nan,
            "live_per_position": [float(h / n) if n else math.nan for h, n in zip(s["live_hits"], s["live_tries"],
                                                                                  strict=True)],
            "samples": float(s["samples"]),
            "answer_tokens": float(s["tokens"]),
        }
        return out


def isotonic(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Non-decreasing least-squares fit of `values` (NaN entries, or weight 0, are skipped and then
    filled from the nearest fitted neighbour on their left, else right), pool-adjacent-violators."""
    pts = [(i, v, w) for i, (v, w) in enumerate(zip(values, weights, strict=True)) if w > 0 and not math.isnan(v)]
    blocks: list[list[float]] = []  # [value, weight, first index, last index]
    for i, v, w in pts:
        blocks.append([v, w, i, i])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, _, e2 = blocks.pop()
            v1, w1, s1, _ = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, s1, e2])
    out = [math.nan] * len(values)
    for v, _, first, last in blocks:
        for j in range(int(first), int(last) + 1):
            out[j] = v
    fitted = [i for i in range(len(out)) if not math.isnan(out[i])]
    for j in range(len(out)):
        if math.isnan(out[j]) and fitted:
            left = [i for i in fitted if i < j]
            out[j] = out[left[-1]] if left else out[fitted[0]]
    return out


__all__ = [
    "CALIBRATION_BINS",
    "THRESHOLDS",
    "AcceptanceAccumulator",
    "RolloutAccumulator",
    "acceptance_results",
    "capped_mean",
    "draft_tokens",
    "isotonic",
    "run_from_start",
    "runs_from_every_start",
    "strict_json",
    "tau_key",
]


def acceptance_results(folder: str | Path) -> dict[tuple[str, str], tuple[Path, dict[str, Any]]]:
    """(level, pairing) -> (file, result) of every `*/acceptance_metrics.json` under `folder` (what
    measure_feature_acceptance.py writes) whose adapter was fed the states it was trained on, keyed by what
    each file records (the checkpoint's level and pairing), never by the name of its folder."""
    out = {}
    for path in sorted(Path(folder).glob("*/acceptance_metrics.json")):
        result = read_json(path, "acceptance result", "rerun run_all_eval.sh (or measure_feature_acceptance.py)")
        if result.get("input_states", "trained") == "trained" and "level" in result and "pairs" in result:
            key = (result["level"], result["pairs"])
            if key in out:
                log.warning("two acceptance results of %s %s under %s: %s wins over %s", *key, folder, path,
                            out[key][0])
            out[key] = (path, result)
    return out

