"""The adapters' training losses, shared by training and evaluation: the alignment loss (MSE + cosine)
of same-position levels, the next-position mix of alignment and prediction (`adapter_loss`), and the
roll-out loss of a drafting head over several steps on its own outputs with an optional token
cross-entropy through the target's frozen LM head, an optional distillation of the target's whole
distribution or its top-K (soft labels through the same head, `distill_loss`) and an optional weight on
the regression terms (EAGLE-3 drops them) (`drafting_loss`). Every loss is masked: padded positions
contribute exactly zero, even when they hold NaN or inf.

    >>> loss, parts = adapter_loss(adapter, pred, target, mask, mix="convex")     # [B, T, D], mask [B, T]
    >>> loss, parts = drafting_loss(adapter, adapter.rollout(x, mask, 3, token_ids=tok), target, mask)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _valid(mask: Tensor | None, like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.bool()


def _empty_loss(pred: Tensor) -> Tensor:
    """Zero for a batch without valid positions; still differentiable, so `.backward()` works."""
    return torch.zeros((), device=pred.device, requires_grad=pred.requires_grad)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Mean squared error over valid positions only ([B, T, D], mask [B, T]); padded positions
    contribute exactly zero, even when they hold NaN or inf."""
    valid = _valid(mask, pred)
    if not valid.any():
        return _empty_loss(pred)
    diff = (pred[valid].float() - target[valid].float()).pow(2)
    return diff.mean()


def masked_cosine_loss(pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of (1 - cos(pred_t, target_t)) over valid positions."""
    valid = _valid(mask, pred)
    if not valid.any():
        return _empty_loss(pred)
    cos = F.cosine_similarity(pred[valid].float(), target[valid].float(), dim=-1, eps=1e-6)
    return (1 - cos).mean()


def alignment_loss(pred: Tensor, target: Tensor, mask: Tensor | None, cos_weight: float = 0.5) -> Tensor:
    """MSE + cos_weight * (1 - cos), both masked."""
    return masked_mse(pred, target, mask) + cos_weight * masked_cosine_loss(pred, target, mask)


def shifted(pred: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Pair output[t] with target[t+1]: returns (pred[:, :-1], target[:, 1:], mask valid at both t and t+1)."""
    valid = _valid(mask, pred)
    return pred[:, :-1], target[:, 1:], valid[:, :-1] & valid[:, 1:]


LOSS_MIXES = ("sum", "convex")


def adapter_loss(
    adapter: Any,
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None,
    *,
    mix: str = "sum",
    prediction_weight: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Training loss shared by training and evaluation.

    Alignment: output[t] vs target[t]. Next-position levels (L5, B1, L5F, L5E) add the prediction term,
    output[t] vs target[t+1], with weight w (`prediction_weight`, default the config's 0.5):

        mix="sum"     align + w * pred          (per position the MSE optimum is (v_t + w v_{t+1}) / (1 + w))
        mix="convex"  (1 - w) * align + w * pred  (the reference's mix; w = 1 trains prediction only)

    Same-position levels ignore `mix` and `w`. Returns (loss, {"align": .., "pred": ..}).
    """
    if mix not in LOSS_MIXES:
        raise ValueError(f"unknown loss mix {mix!r}; valid: {', '.join(LOSS_MIXES)}")
    config = getattr(adapter, "config", adapter)  # an adapter or its AdapterConfig
    w = config.prediction_weight if prediction_weight is None else prediction_weight
    align = alignment_loss(pred, target, mask)
    parts = {"align": float(align.detach())}
    loss = align
    if config.predicts == "next":
        pred_loss = alignment_loss(*shifted(pred, target, mask))
        parts["pred"] = float(pred_loss.detach())
        loss = align + w * pred_loss if mix == "sum" else (1 - w) * align + w * pred_loss
    return loss, parts


def step_weights(steps: int, decay: float) -> list[float]:
    """Per-step weights decay**k (k = 0..steps-1) normalised to sum to 1."""
    raw = [decay**k for k in range(steps)]
    return [w / sum(raw) for w in raw]


def distill_loss(student: Tensor, teacher: Tensor, topk: int = 0, temperature: float = 1.0) -> Tensor:
    """KL(p || q) of the target's next-token distribution p (teacher logits [N, V]) and the draft head's q
    (student logits [N, V]), both at `temperature`, mean over rows, times temperature**2 (so gradients keep
    their scale across temperatures). `topk` > 0 keeps the teacher's K most likely tokens, renormalised,
    and scores q's full-vocabulary log-probabilities there (HASS-style top-K distillation); 0 = the whole
    distribution. Rows are fp32."""
    t = float(temperature)
    teacher, student = teacher.float() / t, student.float() / t
    log_q = F.log_softmax(student, dim=-1)
    if topk and topk < teacher.shape[-1]:
        top = teacher.topk(topk, dim=-1)
        log_p = F.log_softmax(top.values, dim=-1)
        log_q = log_q.gather(-1, top.indices)
    else:
        log_p = F.log_softmax(teacher, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


def drafting_loss(
    adapter: Any,
    outs: list[Tensor],
    target: Tensor,
    mask: Tensor | None,
    *,
    tokens: Tensor | None = None,
    lm_head: Tensor | None = None,
    decay: float = 1.0,
    token_loss_weight: float = 0.0,
    mix: str = "convex",
    prediction_weight: float | None = None,
    regression_weight: float = 1.0,
    distill_weight: float = 0.0,
    distill_topk: int = 0,
    distill_temperature: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Loss of a next-position adapter over a roll-out (`adapter.rollout`): outs[k-1][:, t] is compared
    with target state t+k at positions where t and t+k are valid, each step weighted decay**(k-1)
    (weights normalised to sum to 1). Step 1 is `adapter_loss` (its mix and prediction weight, so one
    step and no token term is exactly the one-step loss). The regression terms are scaled by
    `regression_weight` (0 drops them, as EAGLE-3 does). With `token_loss_weight` > 0, each step adds
    that times the cross-entropy of `lm_head` logits against the target's token t+k (EAGLE's
    classification term; needs `lm_head` [V, D] and `tokens` [B, T]). With `distill_weight` > 0 each step
    adds that times `distill_loss` between the head's logits and the target's own logits at t+k (its stored
    state through the same frozen `lm_head`: soft labels; `distill_topk` 0 = the whole distribution).
    Returns (loss, parts) with parts "align", "pred" (step 1), "step{k}" (regression of step k), "ce" and
    "kd" (means over steps)."""
    if adapter.predicts != "next":
        raise ValueError(f"drafting_loss is for next-position levels, not {adapter.config.name}")
    if (token_loss_weight > 0 or distill_weight > 0) and (lm_head is None or tokens is None):
        raise ValueError("the token and distillation losses need the target's LM head and the target's tokens")
    if regression_weight < 0 or distill_weight < 0 or distill_topk < 0 or distill_temperature <= 0:
        raise ValueError("regression_weight, distill_weight, distill_topk must be >= 0 and distill_temperature > 0")
    weights = step_weights(len(outs), decay)
    head = lm_head.to(outs[0].device, torch.float32) if token_loss_weight > 0 or distill_weight > 0 else None
    first, parts = adapter_loss(adapter, outs[0], target, mask, mix=mix, prediction_weight=prediction_weight)
    valid = _valid(mask, outs[0])
    total = regression_weight * weights[0] * first
    ce_sum, ce_parts, kd_sum, kd_parts = 0.0, [], 0.0, []
    for k, (out, w) in enumerate(zip(outs, weights, strict=True), start=1):
        t = out.shape[1]
        if k >= t:
            continue
        pair = valid[:, : t - k] & valid[:, k:]
        if k > 1 and regression_weight > 0:
            reg = alignment_loss(out[:, : t - k], target[:, k:], pair)
            parts[f"step{k}"] = float(reg.detach())
            total = total + regression_weight * w * reg
        if head is None or not pair.any():
            continue
        logits = out[:, : t - k][pair].float() @ head.T
        if token_loss_weight > 0:
            ce = F.cross_entropy(logits, tokens[:, k:][pair].long().to(out.device))
            ce_parts.append(float(ce.detach()))
            ce_sum = ce_sum + w * ce
        if distill_weight > 0:
            with torch.no_grad():
                teacher = target[:, k:][pair].float() @ head.T
            kd = distill_loss(logits, teacher, distill_topk, distill_temperature)
            kd_parts.append(float(kd.detach()))
            kd_sum = kd_sum + w * kd
    if token_loss_weight > 0:
        total = total + token_loss_weight * ce_sum
        parts["ce"] = sum(ce_parts) / max(len(ce_parts), 1)
    if distill_weight > 0:
        total = total + distill_weight * kd_sum
        parts["kd"] = sum(kd_parts) / max(len(kd_parts), 1)
    return total, parts
