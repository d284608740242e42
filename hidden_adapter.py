"""The adapter zoo: small networks that map drafter (EventGPT) hidden states into the target's
(Video-LLaVA) hidden space, the roles of each level, and the factory that builds them.

Its layers are in adapter_layers.py, its training losses in losses.py, its checkpoint (`best_model.pt`:
save_adapter / load_adapter) in adapter_checkpoint.py.

Levels (see docs/ADAPTER_ARCHITECTURES.md for the full table):

    L1  bottleneck                 drafter -> target, same position      ~2.1M at width 4096
    L2  3 stacked bottlenecks      drafter -> target, same position      ~6.3M
    L3  2 wide (1024) bottlenecks  drafter -> target, same position      ~16.8M
    L4  bidirectional attention    drafter -> target, same position      ~101M
    L5  EAGLE-style causal         drafter -> target, next position      ~103M
    B1  L5 trained target->target  target  -> target, next position      ~103M
    L5F gated fusion, causal       drafter + target -> target, next      ~170M
    L5E B1 + EventGPT context      target (+ drafter prompt) -> target   ~120M
    E3  B1 on EAGLE-3's features   target low/mid/high layers -> target  ~153M
    E3E E3 + EventGPT context      E3 (+ drafter prompt) -> target       ~170M

Usage:
    python hidden_adapter.py --summary                       # parameter table at width 4096
    python hidden_adapter.py --summary --hidden_dim 64       # the toy world's width

    >>> from hidden_adapter import create_adapter
    >>> adapter = create_adapter("L1", hidden_dim=64)
    >>> aligned = adapter(h_egpt, mask)                       # [B, T, 64] -> [B, T, 64]

Every adapter takes `forward(x, mask=None, *, h_target=None, token_ids=None, context=None)`: `x` is
the state it consumes first (drafter states; target states for B1 and L5E), `h_target` the verified
target states (L5F only), `mask` [B, T] bool marks valid positions, `token_ids` [B, T] the token each
position's state chose (next-position levels with a token input), `context` [B, D_drafter] EventGPT's
prompt-end state (L5E, E3E). `adapter.consumes` / `adapter.predicts` / `adapter.config.context` say which
states go in and whether output[t] estimates the target state at t ("same") or t+1 ("next"); `adapter.reads()`
says it in words. For E3 and E3E (`adapter.config.reads_layers`) `x` holds the target's states at the layers
`config.target_layers` names, [B, T, K * D_target] (`adapter_inputs` builds it from a batch's `layers`
[B, T, K, D_target]). An input the level does not read is refused (it is never silently dropped), and states
are cast to the adapter's dtype (fp16 chunks into an fp32 adapter).

Next-position levels can read the token of each position (EAGLE's shifted token): `token_input=True`
takes its embedding from the target's own frozen input-embedding table, attached at run time with
`adapter.attach_token_table(weight)` (stored once in the LM head file, never in the checkpoint).
`adapter.rollout(...)` runs several drafting steps from every start position at once, each step fed
the adapter's own previous outputs (training on roll-outs, and offline drafting metrics).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapter_layers import (
    BottleneckBlock,
    KVCache,
    TransformerLayer,
    WideBlock,
    attention_mask,
    input_projection,
)

# What each level reads and what it predicts: (consumes, predicts, context, features). Every role a stage asks
# about (prefill or decode, roll-out or lockstep, what it costs EventGPT, which target states it needs) is
# derived from this one table through `AdapterConfig`'s properties and `levels(...)`.
#   consumes: "drafter" (EventGPT's states), "target" (Video-LLaVA's verified states) or "both"
#   predicts: "same" (output[t] estimates the target state at t) or "next" (at t + 1)
#   context:  "drafter" when the level also reads EventGPT's prompt-end state, else None
#   features: which target states a verified position gives it: "last" (the last layer after the final norm)
#             or "layers" (EAGLE-3's low, middle and high layer, `AdapterConfig.target_layers`)
LEVEL_ROLES: dict[str, tuple[str, str, str | None, str]] = {
    "L1": ("drafter", "same", None, "last"),
    "L2": ("drafter", "same", None, "last"),
    "L3": ("drafter", "same", None, "last"),
    "L4": ("drafter", "same", None, "last"),
    "L5": ("drafter", "next", None, "last"),
    "B1": ("target", "next", None, "last"),
    "L5F": ("both", "next", None, "last"),
    "L5E": ("target", "next", "drafter", "last"),
    "E3": ("target", "next", None, "layers"),
    "E3E": ("target", "next", "drafter", "layers"),
}
# Canonical names; level numbers follow the reference (`--adapter_level 1..6`, 6 = L5F, B1 = 5 + vlm_only).
ADAPTER_NAMES = tuple(LEVEL_ROLES)
LEVEL_TO_NAME = {1: "L1", 2: "L2", 3: "L3", 4: "L4", 5: "L5", 6: "L5F", 7: "L5E", 8: "E3", 9: "E3E"}
NEXT_POSITION_LEVELS = tuple(name for name, roles in LEVEL_ROLES.items() if roles[1] == "next")
# The target layers a layer-fusing level reads when its config names none: EAGLE-3's choice for a 32-layer
# LLaMA (vlm_runners.eagle3_layer_ids(32)); training sets them from the data's manifest.
DEFAULT_TARGET_LAYERS = (2, 16, 29)


def canonical_name(level: int | str, vlm_only: bool = False) -> str:
    """Normalise `1..6`, `"3"`, `"l5f"`, `"B1"` ... to one of ADAPTER_NAMES; raise ValueError otherwise."""
    name: str | None = None
    if isinstance(level, bool):
        name = None
    elif isinstance(level, int):
        name = LEVEL_TO_NAME.get(level)
    elif isinstance(level, str):
        text = level.strip().upper()
        if text.isdigit():
            name = LEVEL_TO_NAME.get(int(text))
        elif text in ADAPTER_NAMES:
            name = text
    if name is None:
        valid = ", ".join(ADAPTER_NAMES)
        raise ValueError(f"unknown adapter level {level!r}; valid: {valid} or levels 1-9 (6 = L5F, 7 = L5E, 8 = E3, "
                         "9 = E3E)")
    if vlm_only:
        if name not in ("L5", "B1"):
            raise ValueError(f"vlm_only (target->target training) applies to the EAGLE level L5 only, not {name}")
        name = "B1"
    return name


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter; stored in every checkpoint (plain types only)."""

    name: str
    drafter_dim: int = 4096
    target_dim: int = 4096
    # None = the level's default for target_dim (default_options); filled in by __post_init__, so a
    # config built by hand gets the same architecture as create_adapter's, and explicit values
    # (e.g. stored in older checkpoints) are kept as they are.
    bottleneck_dim: int | None = None
    num_blocks: int | None = None
    num_heads: int | None = None
    ffn_dim: int | None = None
    num_layers: int = 1
    max_seq_len: int = 512
    dropout: float = 0.1
    alpha_init: float = 0.1
    use_token_embed: bool = False  # the specification's optional fusion: a trainable [vocab, D] embedding
    vocab_size: int = 32000
    prediction_weight: float = 0.5
    # EAGLE's token input from the target's frozen input embeddings (attach_token_table); only the fusion
    # layer is trained, so the embedding table is stored once (with the LM head), not in each adapter.
    token_input: bool = False
    # E3, E3E: the target's hidden-state indices they fuse (vlm_runners.LAYER_IDS_MEANING), from the data's
    # manifest; None = DEFAULT_TARGET_LAYERS for those levels, [] for the others.
    target_layers: list[int] | None = None

    def __post_init__(self) -> None:
        self.name = canonical_name(self.name)
        for key, value in default_options(self.name, self.target_dim).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        # fields a level does not use still get a definite value, so asdict() holds no None
        for key, value in (("bottleneck_dim", 256), ("num_blocks", 1), ("num_heads", 8), ("ffn_dim", 2048)):
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.token_input and self.use_token_embed:
            raise ValueError("token_input (the target's frozen embeddings) and use_token_embed (a trainable "
                             "embedding) are two ways of the same input; choose one")
        if (self.token_input or self.use_token_embed) and self.predicts != "next":
            raise ValueError(f"a token input belongs to the next-position levels {NEXT_POSITION_LEVELS}, "
                             f"not {self.name}")
        self._check_target_layers()

    def _check_target_layers(self) -> None:
        """target_layers: a list of >= 2 distinct indices >= 0 for the layer-fusing levels, [] for the others."""
        if not self.reads_layers:
            if self.target_layers:
                raise ValueError(f"{self.name} reads the target's last-layer state only; target_layers is for "
                                 f"{', '.join(levels(reads_layers=True))}")
            self.target_layers = []
            return
        ids = list(DEFAULT_TARGET_LAYERS if self.target_layers is None else self.target_layers)
        if len(ids) < 2 or len(set(ids)) != len(ids) or min(ids) < 0:
            raise ValueError(f"{self.name} fuses two or more distinct target layers (hidden-state indices >= 0), "
                             f"got {ids}")
        self.target_layers = [int(i) for i in ids]

    @property
    def consumes(self) -> str:
        """ "drafter", "target" or "both": the states `x` (and `h_target`) carry (`LEVEL_ROLES`)."""
        return LEVEL_ROLES[self.name][0]

    @property
    def predicts(self) -> str:
        """ "same" (output[t] estimates the target state at t) or "next" (at t + 1)."""
        return LEVEL_ROLES[self.name][1]

    @property
    def context(self) -> str | None:
        """ "drafter" when the adapter also reads EventGPT's prompt-end state (L5E), else None."""
        return LEVEL_ROLES[self.name][2]

    @property
    def reads_layers(self) -> bool:
        """Whether a verified position gives the level the target's states at several layers (E3, E3E: EAGLE-3's
        features, `target_layers`) instead of its last-layer state alone."""
        return LEVEL_ROLES[self.name][3] == "layers"

    @property
    def rolls_out(self) -> bool:
        """Whether the level drafts by feeding its own outputs back (a next-position level that needs no fresh
        EventGPT state per draft: L5, B1, L5E). L5F reads EventGPT's state at every draft (lockstep)."""
        return self.predicts == "next" and self.consumes != "both"

    @property
    def egpt_per_draft(self) -> bool:
        """Whether every draft also costs EventGPT a decode step (L5F's lockstep)."""
        return self.consumes == "both"

    @property
    def egpt_per_iteration(self) -> bool:
        """Whether EventGPT runs once per iteration over the accepted tokens (L5: its states are the input)."""
        return self.predicts == "next" and self.consumes == "drafter"

    @property
    def reads_drafter(self) -> bool:
        """Whether the adapter reads anything of EventGPT's (its states, or for L5E its prompt-end state)."""
        return self.consumes != "target" or self.context == "drafter"

    @property
    def uses_tokens(self) -> bool:
        """Whether forward/step need `token_ids` (either token input)."""
        return self.token_input or self.use_token_embed

    @property
    def in_dim(self) -> int:
        """Width of the primary input `x` at a verified position (K * D_target for the layer-fusing levels)."""
        if self.reads_layers:
            return len(self.target_layers) * self.target_dim
        return self.target_dim if self.consumes == "target" else self.drafter_dim


# Inner widths as fractions of the target width: at 4096 they are the reference's 256 (L1, L2),
# 1024 (L3) and 2048 (FFN of L4/L5/B1/L5F). Narrower models (the toy world) keep the same shape
# instead of a "bottleneck" wider than its input.
_INNER = {"L1": ("bottleneck_dim", 16), "L2": ("bottleneck_dim", 16), "L3": ("bottleneck_dim", 4)}
_BLOCKS = {"L1": 1, "L2": 3, "L3": 2}
MIN_INNER_DIM = 4


def level_config(level: int | str) -> AdapterConfig:
    """The default config of a level (its roles; widths at 4096): `level_config("B1").rolls_out`."""
    return AdapterConfig(name=canonical_name(level))


def levels(**roles: Any) -> tuple[str, ...]:
    """The level names whose config has every given role, in ADAPTER_NAMES order:
    `levels(predicts="same")` -> L1-L4 (prefill), `levels(rolls_out=True)` -> L5, B1, L5E, E3, E3E."""
    configs = [level_config(name) for name in ADAPTER_NAMES]
    return tuple(c.name for c in configs if all(getattr(c, key) == value for key, value in roles.items()))


def default_options(name: str, target_dim: int) -> dict[str, Any]:
    """Per-level defaults for a target width (num_blocks, bottleneck_dim or ffn_dim, num_heads)."""
    if name in _INNER:
        key, ratio = _INNER[name]
        return {"num_blocks": _BLOCKS[name], key: max(MIN_INNER_DIM, target_dim // ratio)}
    return {"ffn_dim": max(MIN_INNER_DIM, target_dim // 2), "num_heads": 8}


# ----------------------------------------------------------------------------- roll-out helpers


def _zero_padding(x: Tensor, h_target: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """x and h_target with padded positions set to zero. Attention gives padded keys zero weight, but
    0 * NaN is NaN: padded inputs holding NaN or inf would leak into every valid output."""
    if mask is None:
        return x, h_target
    keep = mask.bool()[..., None]
    return x.masked_fill(~keep, 0.0), None if h_target is None else h_target.masked_fill(~keep, 0.0)


def _ahead(z: Tensor | None, j: int) -> Tensor | None:
    """z [B, T, ...] shifted j positions to the left (entry t holds z[t + j]), zeros past the end."""
    if z is None:
        return None
    j = min(j, z.shape[1])
    return torch.cat([z[:, j:], z.new_zeros(z.shape[0], j, *z.shape[2:])], dim=1)


def rollout_problem(config: AdapterConfig) -> str | None:
    """Why an adapter cannot be rolled out on its own outputs (None when it can): L5 feeds its output
    (target width) back where its input (drafter width) goes, so its two widths must be equal."""
    if config.predicts != "next":
        return f"{config.name} is a same-position level; only next-position levels draft by roll-out"
    if config.consumes == "drafter" and config.drafter_dim != config.target_dim:
        return (f"{config.name} rolls out on its own outputs, which have the target width {config.target_dim}, "
                f"but reads drafter states of width {config.drafter_dim}; with models of different widths use "
                "B1, L5E or L5F")
    return None


# ----------------------------------------------------------------------------- the adapters


class BaseAdapter(nn.Module):
    """Shared plumbing: config, what goes in/out, width checks."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config

    @property
    def consumes(self) -> str:
        """ "drafter", "target" or "both": which hidden states the adapter reads."""
        return self.config.consumes

    @property
    def predicts(self) -> str:
        """ "same": output[t] estimates target state t; "next": output[t] estimates target state t+1."""
        return self.config.predicts

    def extra_repr(self) -> str:
        c = self.config
        return (f"level={c.name}, drafter_dim={c.drafter_dim}, target_dim={c.target_dim}, "
                f"consumes={self.consumes}, predicts={self.predicts}, params={count_parameters(self):,}")

    def reads(self) -> str:
        """What `forward` reads, in words with shapes (the message of a call that passes something else)."""
        c = self.config
        states = "Video-LLaVA's (the target's)" if c.consumes == "target" else "EventGPT's (the drafter's)"
        parts = [f"x = {states} states [B, T, {c.in_dim}]", "mask [B, T]"]
        if c.reads_layers:  # E3, E3E: the K layer states at a verified position, the head's own output at a draft
            parts[0] = (f"x = Video-LLaVA's (the target's) states at layers {c.target_layers} [B, T, {c.in_dim}] "
                        f"(at a drafted position its own output states [B, T, {c.target_dim}])")
        if c.consumes == "both":
            parts.append(f"h_target = Video-LLaVA's states [B, T, {c.target_dim}]")
        if c.uses_tokens:
            parts.append("token_ids [B, T]")
        if c.context:
            parts.append(f"context = EventGPT's prompt-end state [B, {c.drafter_dim}]")
        return ", ".join(parts)

    def _inputs(self, x: Tensor, mask: Tensor | None, h_target: Tensor | None, token_ids: Tensor | None,
                context: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """The inputs of a call, checked and cast: an input this level does not read is refused, naming what it
        reads (`B1(h, mask, h_target=...)` would otherwise run B1 on the wrong states); states are cast to the
        adapter's dtype (fp16 chunks into an fp32 adapter), the mask to bool, token ids to int64."""
        c = self.config
        unread = [name for name, value, used in (("h_target", h_target, c.consumes == "both"),
                                                 ("token_ids", token_ids, c.uses_tokens),
                                                 ("context", context, c.context is not None))
                  if value is not None and not used]
        if unread:
            hint = " (L5F is the level that reads both models' states)" if "h_target" in unread else ""
            raise ValueError(f"{c.name} does not read {', '.join(unread)}; it reads {self.reads()}{hint}")
        ref = next(self.parameters())
        for name, value in (("x", x), ("h_target", h_target), ("context", context)):
            if value is None or isinstance(value, ProjectedContext):  # drafting's context, already projected
                continue
            if not value.is_floating_point():
                raise ValueError(f"{c.name}: {name} must hold floating-point hidden states, got {value.dtype}")
            if value.device != ref.device:
                raise ValueError(f"{c.name}: {name} is on {value.device} but the adapter is on {ref.device}; move "
                                 f"the inputs with .to({str(ref.device)!r}) (or the adapter with .to(device))")
        if token_ids is not None and token_ids.is_floating_point():
            raise ValueError(f"{c.name}: token_ids must be integer token ids, got {token_ids.dtype}")

        def cast(v: Any) -> Any:
            return v if v is None or isinstance(v, ProjectedContext) else v.to(ref.dtype)

        return (x.to(ref.dtype), None if mask is None else mask.to(torch.bool), cast(h_target),
                None if token_ids is None else token_ids.long(), cast(context))

    def _check(self, x: Tensor, dim: int, what: str) -> None:
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(
                f"{self.config.name} expects {what} of shape [B, T, {dim}], got {tuple(x.shape)}; "
                "was the adapter built for another model width?"
            )


class HiddenStateAdapter(BaseAdapter):
    """L1: one bottleneck block plus a final LayerNorm, applied at every position independently."""

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        self.input_proj = input_projection(config.drafter_dim, config.target_dim)
        self.blocks = nn.ModuleList(
            BottleneckBlock(config.target_dim, config.bottleneck_dim, config.dropout, config.alpha_init)
            for _ in range(config.num_blocks)
        )
        self.final_norm = nn.LayerNorm(config.target_dim)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, *, h_target: Tensor | None = None,
        token_ids: Tensor | None = None, context: Tensor | None = None,
    ) -> Tensor:
        x = self._inputs(x, mask, h_target, token_ids, context)[0]
        self._check(x, self.config.drafter_dim, "drafter states")
        h = self._project(x)
        for block in self.blocks:
            h = block(h)
        return self.final_norm(h)

    def _project(self, x: Tensor) -> Tensor:
        return self.input_proj(x)


class MultiLayerBottleneckAdapter(HiddenStateAdapter):
    """L2: three stacked L1 blocks (each with its own alpha) and one final LayerNorm."""


class WideBottleneckAdapter(HiddenStateAdapter):
    """L3: input LayerNorm, two wide (1024) residual blocks with a mid LayerNorm, final LayerNorm."""

    def __init__(self, config: AdapterConfig):
        BaseAdapter.__init__(self, config)  # its own blocks, not L1's
        dim = config.target_dim
        self.input_proj = input_projection(config.drafter_dim, dim)
        self.input_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            WideBlock(dim, config.bottleneck_dim, config.dropout, config.alpha_init) for _ in range(config.num_blocks)
        )
        self.final_norm = nn.LayerNorm(dim)

    def _project(self, x: Tensor) -> Tensor:
        return self.input_norm(self.input_proj(x))


class AttentionAdapter(BaseAdapter):
    """L4: one bidirectional transformer layer over the whole sequence, an identity-initialised output
    projection, alpha, and a residual from the input. Padded positions are hidden from attention."""

    causal = False

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        dim = config.target_dim
        self.input_proj = input_projection(config.in_dim, dim)
        self.layers = nn.ModuleList(
            TransformerLayer(dim, config.num_heads, config.ffn_dim, config.dropout) for _ in range(config.num_layers)
        )
        self.output_norm = nn.LayerNorm(dim)
        self.output_proj = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.tensor(float(config.alpha_init)))
        self._init_output()

    def _init_output(self) -> None:
        nn.init.eye_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def _encode(self, x: Tensor, mask: Tensor | None, h_target: Tensor | None, token_ids: Tensor | None,
                offset: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return (transformer input, residual) for positions offset..offset+T-1."""
        self._check(x, self.config.drafter_dim, "drafter states")
        h = self.input_proj(x)
        return h, h

    def _output(self, h: Tensor, residual: Tensor) -> Tensor:
        return residual + self.alpha * self.output_proj(self.output_norm(h))

    def _run(
        self, x: Tensor, mask: Tensor | None, h_target: Tensor | None, token_ids: Tensor | None,
        past: KVCache | None, context: Tensor | None = None,
    ) -> tuple[Tensor, KVCache]:
        x, mask, h_target, token_ids, context = self._inputs(x, mask, h_target, token_ids, context)
        past_len = past[0][0].shape[2] if past else 0
        x, h_target = _zero_padding(x, h_target, mask)
        h, residual = self._encode(x, mask, h_target, token_ids, past_len, context)
        if mask is not None and past_len:
            mask = torch.cat([mask.new_ones(mask.shape[0], past_len), mask], dim=1)
        # One new position without padding may attend to every cached one: no mask to build (drafting).
        single = mask is None and h.shape[1] == 1
        attn_mask = None if single else attention_mask(mask, h.shape[1], self.causal, h.device, past_len)
        new_past: KVCache = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, attn_mask, past[i] if past else None)
            new_past.append(kv)
        return self._output(h, residual), new_past

    def forward(
        self, x: Tensor, mask: Tensor | None = None, *, h_target: Tensor | None = None,
        token_ids: Tensor | None = None, context: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, D_in], mask [B, T] bool (True = valid) -> [B, T, D_target]."""
        return self._run(x, mask, h_target, token_ids, None, context)[0]


class EAGLEStyleAdapter(AttentionAdapter):
    """L5 (and B1): LayerNorm, learned positions, a causal transformer layer, output LayerNorm and a
    zero-initialised output projection scaled by alpha, plus a residual from the input. Output[t]
    sees inputs 0..t only; it is trained to match the target state at t+1 (and, weighted, at t).

    Token input (EAGLE's shifted token): with `token_input=True` the normalised state at t is
    concatenated with LayerNorm(embedding of token t), the token that state chose, i.e. the token the
    target reads next, and projected back to the width (8192 -> 4096 at 7B). The embedding comes from
    the target's frozen input-embedding table (`attach_token_table`). `use_token_embed=True` is the
    specification's variant with a trainable embedding of its own (+164.6M parameters at 7B: its table and
    the fusion layer).
    """

    causal = True

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        dim = config.target_dim
        if config.consumes != "both":  # L5F normalises after its fusion instead
            self.input_norm = nn.LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_seq_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if config.use_token_embed:
            self.token_embed = nn.Embedding(config.vocab_size, dim)
        if config.token_input:
            self.token_norm = nn.LayerNorm(dim)
            # not a parameter and not saved: the target's table, attached by whoever loads the adapter
            self.register_buffer("token_table", None, persistent=False)
        if config.uses_tokens:
            self.token_fusion = nn.Linear(2 * dim, dim)

    def _init_output(self) -> None:
        # Zero output projection: the adapter starts as the identity (L5, B1) or as h_target (L5F).
        nn.init.zeros_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    @torch.no_grad()
    def attach_token_table(self, weight: Tensor) -> EAGLEStyleAdapter:
        """Give a `token_input` adapter the target's input-embedding table [V, D_target] (frozen; moved to
        the adapter's device and dtype; kept out of the state dict). Returns self."""
        if not self.config.token_input:
            raise ValueError(f"{self.config.name} was built without token_input; it reads no token table")
        if weight.dim() != 2 or weight.shape[1] != self.config.target_dim:
            raise ValueError(f"token table must be [V, {self.config.target_dim}] (the target's input embeddings), "
                             f"got {tuple(weight.shape)}")
        if weight.shape[0] != self.config.vocab_size:
            raise ValueError(f"token table has {weight.shape[0]} rows but the adapter was trained with a "
                             f"{self.config.vocab_size}-token vocabulary; attach the table of the target it was "
                             "trained for")
        ref = self.pos_embed
        self.token_table = weight.detach().to(ref.device, ref.dtype)
        return self

    def _positions(self, h: Tensor, offset: int | Tensor) -> Tensor:
        if isinstance(offset, Tensor | slice):  # the static step's positions [T], a tree depth's one position
            return h + self.pos_embed[:, offset]
        end = offset + h.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(
                f"{self.config.name} has learned positions for {self.config.max_seq_len} steps, got {end}; "
                "rebuild with a larger max_seq_len"
            )
        return h + self.pos_embed[:, offset:end]

    def _fuse_tokens(self, h: Tensor, token_ids: Tensor | None) -> Tensor:
        if not self.config.uses_tokens:
            return h
        if token_ids is None:
            raise ValueError(f"{self.config.name} reads the token of each position: pass token_ids [B, T]")
        if self.config.use_token_embed:
            emb = self.token_embed(token_ids)
        else:
            if self.token_table is None:
                raise ValueError(f"{self.config.name} has a token input but no token table: call "
                                 "attach_token_table(the target's input embeddings, from the LM head file) first")
            emb = self.token_norm(F.embedding(token_ids, self.token_table).to(h.dtype))
        return self.token_fusion(torch.cat([h, emb], dim=-1))

    def _add_context(self, h: Tensor, context: Tensor | None) -> Tensor:
        return h  # L5E adds EventGPT's context here

    def _encode(self, x, mask, h_target, token_ids, offset, context=None):
        self._check(x, self.config.in_dim, f"{self.consumes} states")
        residual = self.input_proj(x)
        h = self._add_context(self._fuse_tokens(self.input_norm(residual), token_ids), context)
        return self._positions(h, offset), residual

    @torch.no_grad()
    def step(
        self, x: Tensor, past: KVCache | None = None, *, h_target: Tensor | None = None,
        token_ids: Tensor | None = None, context: Tensor | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Incremental forward for drafting: x [B, T_new, D] continues a sequence whose keys/values
        are in `past`; returns outputs for the new positions and the extended cache. Equals
        `forward` over the whole sequence at those positions (no padding inside a drafting batch)."""
        return self._run(x, None, h_target, token_ids, past, context)

    def static_step(
        self, x: Tensor, pos: Tensor, keys: list[Tensor], values: list[Tensor], *, h_target: Tensor | None = None,
        token_ids: Tensor | None = None, context: Tensor | None = None,
    ) -> Tensor:
        """`step` on a preallocated cache (drafters.StaticAdapterCache, which calls it): x [1, T, D] at positions
        `pos` [T]; each layer writes its keys/values at `pos` of `keys[i]`/`values[i]` [1, H, S, Dh]. Fixed
        shapes and no host reads, so torch.compile can capture it whole. `context` is L5E's projected
        context vector [1, D_target] (ProjectedContext.vector)."""
        projected = None if context is None else ProjectedContext(context)
        h, residual = self._encode(x, None, h_target, token_ids, pos, projected)
        slots = torch.arange(keys[0].shape[2], device=x.device)
        allowed = (slots[None, :] <= pos[:, None])[None, None]  # causal over the slots written so far
        for layer, k, v in zip(self.layers, keys, values, strict=True):
            h = layer.static_forward(h, allowed, pos, k, v)
        return self._output(h, residual)

    def buffer_step(
        self, x: Tensor, keys: list[Tensor], values: list[Tensor], start: int, *,
        positions: Tensor | slice | None = None,
        allowed: Tensor | None = None, h_target: Tensor | None = None, token_ids: Tensor | None = None,
        context: Tensor | ProjectedContext | None = None,
    ) -> Tensor:
        """`step` on growing buffers (drafters.DynamicAdapterCache, which calls it; eval mode): x [1, T, D] goes
        into slots start..start+T-1 of `keys[i]`/`values[i]` [1, H, S, Dh] at positions start.. (or `positions`
        [T], or slice(p, p + 1): every node of one draft-tree depth at p)
        and attends over slots 0..start+T-1: causally, or as `allowed` [1, 1, T,
        start + T] says. No cache copied per step: a CPU draft step is mostly per-op overhead."""
        x, _, h_target, token_ids, context = self._inputs(x, None, h_target, token_ids, context)
        t = x.shape[1]
        h, residual = self._encode(x, None, h_target, token_ids, start if positions is None else positions, context)
        if allowed is None and t > 1:
            allowed = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)[None, None]
        for layer, k, v in zip(self.layers, keys, values, strict=True):
            h = layer.buffer_forward(h, allowed, start, k, v)
        return self._output(h, residual)

    # -- roll-outs: several drafting steps from every start position at once -------------------------
    def _rollout_inputs(self, j: int, prev: Tensor, x: Tensor, h_target: Tensor | None,
                        token_ids: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Inputs of drafting step j+1 (j >= 1) at every index t, i.e. position t+j: the adapter's own
        estimate of target state t+j (`prev`) where the target state would go, and the token of position
        t+j (on the accepted path the drafted token equals it). Positions past the end are zero/0."""
        return prev, None, _ahead(token_ids, j)

    def rollout(
        self, x: Tensor, mask: Tensor | None, steps: int, *, h_target: Tensor | None = None,
        token_ids: Tensor | None = None, context: Tensor | None = None,
    ) -> list[Tensor]:
        """`steps` drafting steps from every start position in one batch of passes (EAGLE-3's
        "training-time test"): returns outs with outs[k-1][:, t] [B, T, D_target] the estimate of target
        state t+k made from the true inputs 0..t and the adapter's own outputs for t+1..t+k-1, exactly
        what drafting k tokens after verifying position t computes.

        Step k attends to the true keys 0..t (causal, padding hidden) and to the keys of its own earlier
        steps at the same index (a diagonal per step), so every start position keeps its own draft
        chain. outs[0] equals `forward`. Used with gradients in training and without in evaluation.
        """
        if steps < 1:
            raise ValueError("rollout needs steps >= 1")
        problem = rollout_problem(self.config)
        if problem:
            raise ValueError(problem)
        x, mask, h_target, token_ids, context = self._inputs(x, mask, h_target, token_ids, context)
        x, h_target = _zero_padding(x, h_target, mask)
        b, t = x.shape[:2]
        dev = x.device
        h, residual = self._encode(x, mask, h_target, token_ids, 0, context)
        first_mask = attention_mask(mask, t, True, dev)
        true_kv: list[tuple[Tensor, Tensor]] = []  # per layer: keys/values of the true positions
        for layer in self.layers:
            h, kv = layer(h, first_mask, None)
            true_kv.append(kv)
        outs = [self._output(h, residual)]
        valid_keys = mask.bool() if mask is not None else torch.ones(b, t, dtype=torch.bool, device=dev)
        causal = torch.arange(t, device=dev)[None, :] <= torch.arange(t, device=dev)[:, None]  # [query, key]
        # a query always has its own diagonal key, so no row is empty even where the true keys are hidden
        true_mask = (causal[None] & valid_keys[:, None, :])[:, None]
        diag: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.layers]  # per layer, one (k, v) per step
        for j in range(1, steps):
            xj, vj, tj = self._rollout_inputs(j, outs[-1], x, h_target, token_ids)
            hj, res_j = self._encode(xj, None, vj, tj, j, context)
            for i, layer in enumerate(self.layers):
                hj, kv = layer.rollout_step(hj, true_kv[i], true_mask, diag[i])
                diag[i].append(kv)
            outs.append(self._output(hj, res_j))
        return outs


class FusedEAGLEAdapter(EAGLEStyleAdapter):
    """L5F: gated fusion of drafter and verified target states, then the L5 causal stack, with the
    residual taken from the target states.

        gate  = sigmoid(W_g [e; v]);  fused = gate * e + (1 - gate) * v
        x     = LN(fused + W_p [e; v])
    where e is the drafter state (projected when widths differ) and v the target state. Output[t]
    estimates the target state at t+1 from inputs 0..t. Because the target state at t is only known
    once the target has verified position t, a drafting window longer than one token must feed the
    adapter's own outputs back in as the target states of the still-unverified positions.
    """

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        de, dv = config.drafter_dim, config.target_dim
        self.gate = nn.Linear(de + dv, dv)
        self.fusion_proj = nn.Linear(de + dv, dv)
        self.fusion_norm = nn.LayerNorm(dv)

    def _encode(self, x, mask, h_target, token_ids, offset, context=None):
        self._check(x, self.config.drafter_dim, "drafter states")
        if h_target is None:
            raise ValueError("L5F fuses drafter and target states: pass h_target=[B, T, D_target]")
        self._check(h_target, self.config.target_dim, "target states (h_target)")
        if h_target.shape[:2] != x.shape[:2]:
            raise ValueError(f"h_target {tuple(h_target.shape)} and drafter states {tuple(x.shape)} differ in [B, T]")
        both = torch.cat([x, h_target], dim=-1)
        gate = torch.sigmoid(self.gate(both))
        fused = gate * self.input_proj(x) + (1 - gate) * h_target
        h = self._fuse_tokens(self.fusion_norm(fused + self.fusion_proj(both)), token_ids)
        return self._positions(h, offset), h_target

    def _rollout_inputs(self, j, prev, x, h_target, token_ids):
        """Step j+1 of L5F: EventGPT's state at position t+j (in lockstep drafting EventGPT reads the
        drafts, which equal the true tokens on the accepted path, so the teacher-forced state is the one
        it computes there) and the adapter's own estimate of target state t+j."""
        return _ahead(x, j), prev, _ahead(token_ids, j)

    def rollout(self, x, mask, steps, *, h_target=None, token_ids=None, context=None):
        if h_target is None:
            raise ValueError("L5F fuses drafter and target states: pass h_target=[B, T, D_target]")
        return super().rollout(x, mask, steps, h_target=h_target, token_ids=token_ids, context=context)


class EventContextAdapter(EAGLEStyleAdapter):
    """L5E: the B1 head (target states in, target state t+1 out; token input by default in training)
    plus EventGPT's prompt-end state as one context vector, ViSpec-style: LN, a projection to the
    target width that starts at zero (so L5E starts as B1), added to every position's input.

    The context is EventGPT's last-layer state at the end of its prompt (event frame + question),
    the state that would produce EventGPT's first answer token: computed once per answer by its
    prefill, which runs beside the target's vision and prefill, so each draft costs one adapter step.
    """

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        self.context_norm = nn.LayerNorm(config.drafter_dim)
        self.context_proj = nn.Linear(config.drafter_dim, config.target_dim)
        nn.init.zeros_(self.context_proj.weight)
        nn.init.zeros_(self.context_proj.bias)

    def context_vector(self, context: Tensor) -> Tensor:
        """[B, D_drafter] EventGPT prompt-end state -> [B, D_target] added to every input position."""
        if context.dim() != 2 or context.shape[-1] != self.config.drafter_dim:
            raise ValueError(f"L5E expects context of shape [B, {self.config.drafter_dim}] (EventGPT's prompt-end "
                             f"state), got {tuple(context.shape)}")
        return self.context_proj(self.context_norm(context))

    def _add_context(self, h: Tensor, context: Tensor | ProjectedContext | None) -> Tensor:
        if context is None:
            raise ValueError("L5E reads EventGPT's prompt-end state: pass context=[B, D_drafter]")
        vec = context.vector if isinstance(context, ProjectedContext) else self.context_vector(context.to(h.dtype))
        return h + vec.to(h.dtype)[:, None]


@dataclass
class ProjectedContext:
    """L5E's context already through `context_vector` ([B, D_target]): drafting projects it once per answer
    and passes this at every step instead of the raw state."""

    vector: Tensor


# ----------------------------------------------------------------------------- EAGLE-3's features: E3, E3E


class LayerFusionAdapter(EAGLEStyleAdapter):
    """E3: the B1 head on EAGLE-3's features. At a verified position t it reads the target's states at a low,
    a middle and a high layer (`config.target_layers`, K of them; EAGLE-3's rule scaled to the target's depth),
    concatenated [B, T, K * D] and fused into the head's width by one bias-free linear layer (EAGLE-3's `fc`,
    K*D -> D); at a drafted position it reads its own previous output [B, T, D], as B1 does, so every draft
    step costs what B1's does. Then B1's path: LayerNorm, the token input, learned positions, the causal
    layer, output LayerNorm, a zero-initialised output projection scaled by alpha, and a residual from the
    fused input. Output[t] estimates the target's last-layer state at t+1 (the frozen LM head reads it).

    The fusion starts as the identity on the highest layer (its block of the weight is I, the others 0), so
    an untrained E3 is B1 fed that layer's state: on a 2-layer target, whose highest index is its last layer,
    exactly the untrained B1."""

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        # AttentionAdapter built input_proj as Linear(K * D -> D, no bias): EAGLE-3's fc
        with torch.no_grad():
            d = config.target_dim
            self.input_proj.weight.zero_()
            self.input_proj.weight[:, -d:] = torch.eye(d)

    def _encode(self, x, mask, h_target, token_ids, offset, context=None):
        """Layer states [.., K * D] (a verified position) are fused; a [.., D] input is the head's own output."""
        if x.dim() == 3 and x.shape[-1] == self.config.in_dim:
            residual = self.input_proj(x)
        elif x.dim() == 3 and x.shape[-1] == self.config.target_dim:
            residual = x
        else:
            raise ValueError(f"{self.config.name} expects the target's {len(self.config.target_layers)} layer states "
                             f"[B, T, {self.config.in_dim}] or its own outputs [B, T, {self.config.target_dim}], got "
                             f"{tuple(x.shape)}; was the adapter built for another model width or layer set?")
        h = self._add_context(self._fuse_tokens(self.input_norm(residual), token_ids), context)
        return self._positions(h, offset), residual


class LayerContextAdapter(LayerFusionAdapter, EventContextAdapter):
    """E3E: E3 plus L5E's context, EventGPT's prompt-end state through LayerNorm and a zero-initialised
    projection added to every position's input (so an untrained E3E is E3), computed once per answer by
    EventGPT's prefill beside the target's: the cross-modal variant of the EAGLE-3 head."""


_CLASSES: dict[str, type[BaseAdapter]] = {
    "L1": HiddenStateAdapter,
    "L2": MultiLayerBottleneckAdapter,
    "L3": WideBottleneckAdapter,
    "L4": AttentionAdapter,
    "L5": EAGLEStyleAdapter,
    "B1": EAGLEStyleAdapter,
    "L5F": FusedEAGLEAdapter,
    "L5E": EventContextAdapter,
    "E3": LayerFusionAdapter,
    "E3E": LayerContextAdapter,
}


def create_adapter(
    level: int | str,
    hidden_dim: int = 4096,
    *,
    drafter_dim: int | None = None,
    target_dim: int | None = None,
    vlm_only: bool = False,
    **overrides: Any,
) -> BaseAdapter:
    """Build an adapter by level (1-9) or name (L1..L5, B1, L5F, L5E, E3, E3E; any case).

    `hidden_dim` sets both widths; `drafter_dim` / `target_dim` override them separately when the
    two models differ. Inner widths follow the reference's ratios to the target width (bottleneck
    1/16 for L1/L2, 1/4 for L3, FFN 1/2 for the attention levels; 256/1024/2048 at 4096). Other
    keyword arguments override AdapterConfig fields (e.g. `dropout=0.0`, `use_token_embed=True`,
    `bottleneck_dim=256`); an unknown one raises ValueError.
    """
    name = canonical_name(level, vlm_only)
    known = {f.name for f in fields(AdapterConfig)} - {"name", "drafter_dim", "target_dim"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown adapter option(s) {unknown}; valid: {sorted(known)}")
    target_dim = target_dim or hidden_dim
    params = {**default_options(name, target_dim), **overrides}
    config = AdapterConfig(name=name, drafter_dim=drafter_dim or hidden_dim, target_dim=target_dim, **params)
    return build_adapter(config)


def build_adapter(config: AdapterConfig) -> BaseAdapter:
    """Instantiate the class for `config.name`."""
    return _CLASSES[canonical_name(config.name)](config)


def adapter_inputs(
    adapter: BaseAdapter, drafter: Tensor | None, target: Tensor, tokens: Tensor | None = None,
    layers: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(x, keyword arguments) to call `adapter(x, mask, **kwargs)` (or `adapter.rollout`) with, from what
    it consumes: drafter states (L1-L5), target states (B1, L5E) or both (L5F), the target's layer states
    `layers` [B, T, K, D] flattened to [B, T, K * D] (E3, E3E); token ids when it reads tokens; EventGPT's
    prompt-end state (`drafter[:, 0]`, the state before its first answer token) for L5E and E3E."""
    x = target if adapter.consumes == "target" else drafter
    if adapter.config.reads_layers:
        if layers is None:
            raise ValueError(f"{adapter.config.name} fuses the target's layer states {adapter.config.target_layers}; "
                             "none were given (extract with --target_layers)")
        x = layers.flatten(-2)
    if x is None:
        raise ValueError(f"{adapter.config.name} consumes drafter states, none were given")
    kwargs: dict[str, Tensor] = {}
    if adapter.consumes == "both":
        kwargs["h_target"] = target
    if adapter.config.context == "drafter":
        if drafter is None:
            raise ValueError(f"{adapter.config.name} reads EventGPT's prompt-end state; drafter states are needed")
        kwargs["context"] = drafter[:, 0]
    if adapter.config.uses_tokens:
        if tokens is None:
            raise ValueError(f"{adapter.config.name} reads the token of each position and needs token ids")
        kwargs["token_ids"] = tokens.long().clamp(0, adapter.config.vocab_size - 1)
    return x, kwargs


def draft_outputs(adapter: BaseAdapter, x: Tensor, mask: Tensor | None, steps: int = 1,
                  **kwargs: Tensor) -> list[Tensor]:
    """The outputs training and evaluation score: `steps` drafting steps of a next-position adapter
    (`adapter.rollout`; one step equals `forward`), or the one forward of a same-position adapter."""
    if adapter.predicts == "next":
        return adapter.rollout(x, mask, steps, **kwargs)
    return [adapter(x, mask, **kwargs)]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- summary CLI


def summary_rows(hidden_dim: int = 4096) -> list[dict[str, Any]]:
    """One row per level, built on the meta device (no memory), with exact parameter counts."""
    rows = []
    for name in ADAPTER_NAMES:
        with torch.device("meta"):
            adapter = create_adapter(name, hidden_dim)
        attn = "none"
        if isinstance(adapter, AttentionAdapter):
            attn = "causal" if adapter.causal else "bidirectional"
        rows.append(
            {
                "level": name,
                "class": type(adapter).__name__,
                "params": count_parameters(adapter),
                "consumes": "layers" if adapter.config.reads_layers else adapter.consumes,  # E3: target layers
                "predicts": adapter.predicts,
                "attention": attn,
            }
        )
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    cols = f"| {'level':5} | {'class':28} | {'params':>12} | {'consumes':8} | {'output[t] estimates':19} "
    head = cols + "| attention     |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        est = "target state t" if r["predicts"] == "same" else "target state t+1"
        lines.append(
            f"| {r['level']:5} | {r['class']:28} | {r['params']:>12,} | {r['consumes']:8} | {est:19} "
            f"| {r['attention']:13} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--summary", action="store_true", help="print the parameter table of every level")
    parser.add_argument(
        "--hidden_dim", type=int, default=4096, help="hidden width used for the table (4096 = Vicuna-7B, both models)"
    )
    args = parser.parse_args(argv)
    if not args.summary:
        parser.error("nothing to do: pass --summary")
    if args.hidden_dim <= 0 or args.hidden_dim % 8:
        parser.error("--hidden_dim must be a positive multiple of 8 (8 attention heads)")
    return args


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = summary_rows(args.hidden_dim)
    print(f"Adapters at hidden width {args.hidden_dim} (drafter = target width):")
    print(format_summary(rows))
    return rows


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main, parse_args)


__all__ = [
    "ADAPTER_NAMES",
    "LEVEL_ROLES",
    "NEXT_POSITION_LEVELS",
    "AdapterConfig",
    "AttentionAdapter",
    "BaseAdapter",
    "EAGLEStyleAdapter",
    "EventContextAdapter",
    "FusedEAGLEAdapter",
    "HiddenStateAdapter",
    "LayerContextAdapter",
    "LayerFusionAdapter",
    "MultiLayerBottleneckAdapter",
    "ProjectedContext",
    "WideBottleneckAdapter",
    "adapter_inputs",
    "canonical_name",
    "count_parameters",
    "create_adapter",
    "draft_outputs",
    "level_config",
    "levels",
    "rollout_problem",
]
