"""The layers the adapter zoo is built from (hidden_adapter.py): residual bottleneck blocks (L1-L3) and a
pre-norm transformer layer (L4, L5 and the EAGLE-style heads) whose attention runs four ways: a full or
cached forward, a drafting step on growing buffers (`buffer_forward`, the engine's eager path) or on a
preallocated cache (`static_forward`, the static path), and one roll-out training step (`rollout_step`).
Shapes are [B, T, D]; masks are bool, True = may attend.

    >>> layer = TransformerLayer(dim=64, num_heads=8, ffn_dim=32, dropout=0.0)
    >>> y, (k, v) = layer(torch.randn(2, 5, 64), attention_mask(None, 5, causal=True, device=torch.device("cpu")))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def input_projection(in_dim: int, out_dim: int) -> nn.Module:
    """Identity when widths match (so counts at 4096 equal the spec); a bias-free Linear otherwise."""
    if in_dim == out_dim:
        return nn.Identity()
    proj = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.xavier_uniform_(proj.weight)
    return proj


class BottleneckBlock(nn.Module):
    """LoRA-style residual block: x + alpha * up(dropout(gelu(down(LN(x))))). [B, T, D] -> [B, T, D]."""

    def __init__(self, dim: int, bottleneck: int, dropout: float, alpha_init: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down_proj = nn.Linear(dim, bottleneck, bias=False)
        self.up_proj = nn.Linear(bottleneck, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        nn.init.kaiming_uniform_(self.down_proj.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.up_proj.weight)  # the block starts as the identity

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * self.up_proj(self.dropout(F.gelu(self.down_proj(self.norm(x)))))


class WideBlock(nn.Module):
    """L3 block: x + alpha * dropout(up(dropout(gelu(LN_mid(down(x)))))), bottleneck 1024."""

    def __init__(self, dim: int, bottleneck: int, dropout: float, alpha_init: float):
        super().__init__()
        self.down_proj = nn.Linear(dim, bottleneck, bias=False)
        self.mid_norm = nn.LayerNorm(bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        nn.init.kaiming_uniform_(self.down_proj.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.up_proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(F.gelu(self.mid_norm(self.down_proj(x))))
        return x + self.alpha * self.dropout(self.up_proj(h))


KVCache = list[tuple[Tensor, Tensor]]


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout (fused in_proj with
    bias, out_proj with bias) but on scaled_dot_product_attention, so it can also run one decode
    step against cached keys/values."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, T, D]; attn_mask bool [B, 1, T, S] (True = may attend) or None; returns out, (k, v)."""
        b, t, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d)), (k, v)

    def static_forward(self, x: Tensor, allowed: Tensor, pos: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """One drafting step on a preallocated cache: the new keys/values are written in place at `pos` [T]
        of `keys`/`values` [1, H, S, Dh], and the queries attend over all S slots as `allowed` [1, 1, T, S]
        lets them (slots past the answer so far are masked, so what they hold never counts)."""
        b, t, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2) for z in (q, k, v))
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))

    def buffer_forward(self, x: Tensor, allowed: Tensor | None, start: int, keys: Tensor, values: Tensor) -> Tensor:
        """A drafting step on growing buffers (the eager path): the T new keys/values go into slots
        start..start+T-1 of `keys`/`values` [1, H, S, Dh] and the queries attend over slots 0..start+T-1 only,
        as `allowed` [1, 1, T, start + T] lets them (None: every one, a single new position)."""
        b, t, d = x.shape
        end = start + t
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        out = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=allowed)
        return F.linear(out.transpose(1, 2).reshape(b, t, d), self.out_proj.weight, self.out_proj.bias)

    def rollout_step(self, x: Tensor, true_kv: tuple[Tensor, Tensor], true_mask: Tensor,
                     diag_kv: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attention of one roll-out step: query t attends to the true keys the mask allows [B, 1, T, T]
        and to one key per earlier step at its own index t (`diag_kv`, each [B, H, T, Dh]) plus its own.
        The diagonal keys cost O(T) each instead of a dense [T, T] block. Returns out, own (k, v)."""
        b, t, d = x.shape
        h = self.num_heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(d, dim=-1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        scale = (d // h) ** -0.5
        dk = torch.stack([*(kk for kk, _ in diag_kv), k], dim=-2)  # [B, H, T, J, Dh]
        dv = torch.stack([*(vv for _, vv in diag_kv), v], dim=-2)
        scores = torch.cat([(q @ true_kv[0].transpose(-1, -2)).masked_fill(~true_mask, float("-inf")),
                            (q[..., None, :] * dk).sum(-1)], dim=-1) * scale  # [B, H, T, T + J]
        p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        p = F.dropout(p, self.dropout, self.training)
        out = p[..., :t] @ true_kv[1] + (p[..., t:, None] * dv).sum(-2)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d)), (k, v)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(LN(x)), then + FFN(LN(.)) with FFN dim -> ffn_dim -> dim."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim), nn.Dropout(dropout)
        )

    def forward(
        self, x: Tensor, attn_mask: Tensor | None, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.attn_norm(x), attn_mask, past)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), kv

    def static_forward(self, x: Tensor, allowed: Tensor, pos: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """`forward` for one step on a preallocated cache (see SelfAttention.static_forward)."""
        x = x + self.attn.static_forward(self.attn_norm(x), allowed, pos, keys, values)
        return x + self.ffn(self.ffn_norm(x))

    def buffer_forward(self, x: Tensor, allowed: Tensor | None, start: int, keys: Tensor, values: Tensor) -> Tensor:
        """`forward` for a drafting step on growing buffers (see SelfAttention.buffer_forward), in eval mode:
        the functional ops without the modules' call overhead (a draft step on CPU is mostly overhead)."""
        an, fn, (up, _, _, down, _) = self.attn_norm, self.ffn_norm, self.ffn
        x = x + self.attn.buffer_forward(F.layer_norm(x, an.normalized_shape, an.weight, an.bias, an.eps),
                                         allowed, start, keys, values)
        y = F.linear(F.gelu(F.linear(F.layer_norm(x, fn.normalized_shape, fn.weight, fn.bias, fn.eps),
                                     up.weight, up.bias)), down.weight, down.bias)
        return x + y

    def rollout_step(self, x: Tensor, true_kv: tuple[Tensor, Tensor], true_mask: Tensor,
                     diag_kv: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """`forward` for one roll-out step (see SelfAttention.rollout_step)."""
        a, kv = self.attn.rollout_step(self.attn_norm(x), true_kv, true_mask, diag_kv)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), kv


def attention_mask(mask: Tensor | None, t: int, causal: bool, device: torch.device, past_len: int = 0) -> Tensor | None:
    """Boolean [B or 1, 1, T, past_len + T] mask (True = may attend).

    Padded keys are hidden from every query, so padding never changes valid outputs. Each query may
    always attend to itself, so a padded query never sees an empty row (which would give NaN).
    """
    s = past_len + t
    allowed: Tensor | None = None
    if causal:
        q_pos = torch.arange(past_len, s, device=device)[:, None]
        allowed = (torch.arange(s, device=device)[None, :] <= q_pos)[None, None]
    if mask is not None:
        keys = mask.bool()
        if keys.shape[1] != s:
            raise ValueError(f"mask covers {keys.shape[1]} positions but attention spans {s}")
        keys = keys[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    if allowed is None:
        return None
    self_pos = torch.zeros(t, s, dtype=torch.bool, device=device)
    self_pos[torch.arange(t), torch.arange(past_len, s)] = True
    return allowed | self_pos[None, None]
