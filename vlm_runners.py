"""EventGPT and Video-LLaVA behind one step-by-step interface (`VLMRunner`): the runner contract.

Later stages (hidden-state extraction, live speculative decoding) drive either model through the
same calls without knowing which one it is, or whether it is a toy, a random-weight 7B shape or a
release checkpoint. This module is the interface and the two front ends only; every way of getting a
runner (checkpoints, quantisation, tokenizer, random weights) is in model_builders.py:

    from model_builders import load_eventgpt
    runner = load_eventgpt("checkpoints/EventGPT-7b", quant="4bit")     # an EventGPTRunner
    feats = runner.clip_features(split_dir, clip)                       # [P, D], once per clip
    inputs = runner.build_inputs([feats, feats], ["Q1?", "Q2?"])         # left-padded batch
    out = runner.generate(inputs, max_new_tokens=50)                    # tokens, hidden, mask

Low-level steps: `prefill`, `decode` (KV cache, dynamic or static), `crop_cache`, `lm_head_weight`,
`teacher_forced_hidden`. Hidden states are always the last decoder layer AFTER the final RMSNorm,
so `logits = hidden @ lm_head_weight().T` (transformers' `LlamaModel.last_hidden_state`). After
`capture_layers(ids)` every pass (prefill, decode, verify; dynamic, static or compiled) also returns the
decoder's states at those hidden-state indices (`StepOutput.layers`, `GenerationOutput.layers`) from the
same forward; `eagle3_layer_ids(depth)` is EAGLE-3's low / middle / high choice. Also here:
the release prompts and their constants, `model_description` (what manifests record about a runner)
and `to_drafter_vocab` (target tokens made safe for the drafter's vocabulary). See docs/MODELS.md.

Example (tiny CPU smoke run on the toy checkpoints that make_toy_world.py writes):
    python -c "import model_builders as mb; r = mb.load_video_llava('data/toy/models/video_llava', \
device='cpu'); print(type(r).__name__, r.hidden_size, r.vocab_size, r.config_hash)"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clip_data import (
    DEFAULT_FRAME_PICK,
    FRAME_PICKS,
    ClipReadError,
    event_frame_path,
    read_rgb,
    render_hint,
    sample_video_frames,
)
from common import UserError

# 4bit/8bit: bitsandbytes (NF4 / LLM.int8) at load time; int8_ao/int4_ao: torchao weight-only int8 / int4
# (group size 128) of the language model's decoder layers after loading (optional package, fast kernels
# that also run under torch.compile). Here, not with the builders, because a runner's decode path depends
# on which kind it holds (bitsandbytes kernels do not capture into a static, compiled step).
QUANT_CHOICES = ("none", "4bit", "8bit", "int8_ao", "int4_ao")
BNB_QUANTS = ("4bit", "8bit")
AO_QUANTS = ("int8_ao", "int4_ao")
# --- EventGPT's prompt (dataset/constants.py, dataset/conversation.py of the release) ---
EVENT_TOKEN_INDEX = -200  # the release's in-sequence marker for "splice event features here"
EVENTGPT_EVENT_TOKEN = "<event>"
EVENTGPT_EV_START = "<ev_start>"
EVENTGPT_EV_END = "<ev_end>"
EVENTGPT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# --- Video-LLaVA's prompt (LanguageBind/Video-LLaVA-7B-hf model card) ---
VIDEO_LLAVA_PROMPT = "USER: <video>\n{question} ASSISTANT:"


def eventgpt_prompt(question: str) -> str:
    """The release's `eventgpt_v1` (Vicuna-v1, sep " " / "</s>") prompt for one question.

    The release always wraps the placeholder as `<ev_start><event><ev_end>`; with
    `mm_use_im_start_end` false those two markers are plain text to the tokenizer.
    """
    message = f"{EVENTGPT_EV_START}{EVENTGPT_EVENT_TOKEN}{EVENTGPT_EV_END}\n{question}"
    return f"{EVENTGPT_SYSTEM} USER: {message} ASSISTANT:"


def video_llava_prompt(question: str) -> str:
    """Video-LLaVA's documented single-turn prompt."""
    return VIDEO_LLAVA_PROMPT.format(question=question)


# ----------------------------------------------------------------------------------------------
# Data classes of the interface
# ----------------------------------------------------------------------------------------------


@dataclass
class VLMInputs:
    """A left-padded batch of prompts with the visual features merged in."""

    inputs_embeds: Tensor  # [B, L, D] model dtype
    attention_mask: Tensor  # [B, L] long, 0 on left padding


@dataclass
class StepOutput:
    logits: Tensor  # [B, T, V] float32 (T=1 when only the last position was asked for)
    hidden: Tensor  # [B, T, D] float32, last decoder layer after the final norm
    cache: Any  # transformers Cache (DynamicCache)
    layers: Tensor | None = None  # [B, T, K, D] float32 at runner.layer_ids (capture_layers), else None


@dataclass
class StaticKV:
    """A preallocated KV cache (transformers' StaticCache, allocated once per runner and reused by every
    answer so compiled graphs keep their addresses) with its length and left padding held on the host:
    reading them never waits for the device. Rolling back only moves the length (no copy)."""

    cache: Any  # transformers StaticCache, [B, heads, max_cache_len, head_dim] per layer
    mask: Tensor  # [B, max_cache_len] long: the prompt's mask, then ones (causality hides later slots)
    length: int = 0
    pad: int = 0  # left padding of the prompt: position = cache index - pad

    def get_seq_length(self) -> int:
        return self.length


@dataclass
class GenerationOutput:
    tokens: Tensor  # [B, N] long, pad_token_id after EOS (N = max_new_tokens)
    hidden: Tensor  # [B, N, D] float32; hidden[t] produced the logits that chose tokens[t]; 0 where masked
    mask: Tensor  # [B, N] bool, True up to and including EOS
    layers: Tensor | None = None  # [B, N, K, D] float32: the states at runner.layer_ids of the same positions


# ----------------------------------------------------------------------------------------------
# Which layers: EAGLE-3's low, middle and high layer, scaled to a model's depth
# ----------------------------------------------------------------------------------------------

# EAGLE-3 fuses the inputs of decoder layers 2, L/2 and L-3 (for a 32-layer LLaMA: 2, 16 and 29). As fractions
# of the depth these are 2/32, 1/2 and 29/32; `eagle3_layer_ids` applies them to any depth (rounded half up).
EAGLE3_LAYER_FRACTIONS = (2 / 32, 1 / 2, 29 / 32)
LAYER_IDS_MEANING = ("hidden-state index i of the target's decoder: 0 = the token embeddings (the input of layer 0), "
                     "i = the output of decoder layer i-1 (the input of layer i), num_layers = the last layer after "
                     "the final norm (the state the LM head reads)")


def eagle3_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low, middle and high hidden-state indices for a decoder of `num_layers` layers (see
    LAYER_IDS_MEANING): (2, 16, 29) at 32 layers, (0, 1, 2) for the toy world's 2. Always three distinct,
    increasing indices in [0, num_layers] (needs num_layers >= 2)."""
    if num_layers < 2:
        raise ValueError(f"EAGLE-3's three layers need a decoder of at least 2 layers, got {num_layers}")
    ids = [min(num_layers, int(f * num_layers + 0.5)) for f in EAGLE3_LAYER_FRACTIONS]
    for i in range(1, 3):  # shallow models: keep them distinct and increasing
        ids[i] = max(ids[i], ids[i - 1] + 1)
    for i in (1, 0):
        ids[i] = min(ids[i], ids[i + 1] - 1)
    return ids[0], ids[1], ids[2]


def spatio_temporal_pool(features: Tensor) -> Tensor:
    """EventGPT's aggregator: [T, S, D] -> [T + S, D].

    The first T rows are per-frame means over the S tokens (temporal tokens), the next S rows are
    per-token means over the T frames (spatial tokens). The release pads the temporal part only
    when asked for more temporal tokens than frames; its default asks for exactly T, so no padding.
    """
    if features.ndim != 3:
        raise ValueError(f"expected features [T, S, D], got {tuple(features.shape)}")
    return torch.cat([features.mean(dim=1), features.mean(dim=0)], dim=0)


def _weight_is_quantized(weight: Tensor) -> bool:
    return type(weight).__name__ in ("Params4bit", "Int8Params") or weight.dtype in (torch.uint8, torch.int8)


# ----------------------------------------------------------------------------------------------
# The shared runner
# ----------------------------------------------------------------------------------------------


class VLMRunner:
    """Step-by-step greedy driver of a LLaMA-decoder VLM; subclasses add the visual front end.

    Subclasses set `_decoder` (a `LlamaModel`: embed_tokens, layers, final norm) and `_lm_head`.
    """

    name: str = "base"

    def __init__(
        self,
        *,
        tokenizer: Any,
        decoder: nn.Module,
        lm_head: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        model_path: str,
        config_hash: str,
        quant: str = "none",
        quant_scope: str = "none",
    ) -> None:
        self.tokenizer = tokenizer
        self._decoder = decoder.eval()
        self._lm_head = lm_head.eval()
        self._embed = decoder.get_input_embeddings()
        self.device = device
        self.dtype = dtype
        self.model_path = model_path
        self.config_hash = config_hash
        self.quant = quant
        self.quant_scope = quant_scope  # which modules `quant` applies to (see model_description)
        self.hidden_size = int(decoder.config.hidden_size)
        self.vocab_size = int(lm_head.out_features)
        self.eos_token_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad)
        self._lm_head_cache: Tensor | None = None
        self._lm_head_version: tuple[int, int] | None = None
        # Decode path (see `use_static_cache`): dynamic cache and eager steps unless switched.
        self.max_cache_len: int | None = None
        self.verify_width = 1
        self.compiled = False
        self._static: StaticKV | None = None
        self._step = self._decode_step
        self.num_layers = int(decoder.config.num_hidden_layers)
        self.layer_ids: tuple[int, ...] = ()  # capture_layers: extra states every pass returns

    # -- visual front end (subclasses) ---------------------------------------------------------
    def clip_features(self, split_dir: Path, clip: dict) -> Tensor:
        """Visual embeddings of one clip, [P, D] in model dtype on the model device."""
        raise NotImplementedError

    def prompt_embeds(self, features: Tensor, question: str) -> Tensor:
        """One prompt's embeddings [L, D] with the clip's visual embeddings spliced in."""
        raise NotImplementedError

    @torch.no_grad()
    def build_inputs(self, features: list[Tensor], questions: list[str]) -> VLMInputs:
        """One prompt per (features, question) pair, visual embeddings spliced in, left padded."""
        if len(features) != len(questions):
            raise ValueError(f"{len(features)} feature sets for {len(questions)} questions")
        return self._left_pad([self.prompt_embeds(f, q) for f, q in zip(features, questions, strict=True)])

    @property
    def decoder(self) -> nn.Module:
        """The language model's decoder (embeddings, layers, final norm); trainable by the toy world."""
        return self._decoder

    @property
    def lm_head(self) -> nn.Module:
        """The language model's output layer."""
        return self._lm_head

    # -- text helpers --------------------------------------------------------------------------
    def embed_ids(self, ids: Tensor | list[int]) -> Tensor:
        """Token embeddings [..., D] in model dtype."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self._embed(ids).to(self.dtype)

    def _left_pad(self, sequences: list[Tensor]) -> VLMInputs:
        """Stack [L_i, D] embedding sequences into a left-padded batch (pad = pad token embedding)."""
        if not sequences:
            raise ValueError("build_inputs needs at least one prompt")
        length = max(s.shape[0] for s in sequences)
        pad = self.embed_ids([self.pad_token_id])[0]
        embeds = pad.expand(len(sequences), length, -1).clone()
        mask = torch.zeros(len(sequences), length, dtype=torch.long, device=self.device)
        for row, seq in enumerate(sequences):
            embeds[row, length - seq.shape[0]:] = seq.to(self.device, self.dtype)
            mask[row, length - seq.shape[0]:] = 1
        return VLMInputs(inputs_embeds=embeds, attention_mask=mask)

    # -- layer states from the same passes (EAGLE-3 features) ------------------------------------
    def capture_layers(self, ids: tuple[int, ...] | list[int] = ()) -> None:
        """From now on every pass also returns the decoder's states at hidden-state indices `ids`
        (LAYER_IDS_MEANING) as `layers` [B, T, K, D] float32 in `ids`' order, taken from the same forward
        through transformers' output capture (`output_hidden_states=[...]`, which also traces under
        torch.compile); `()` stops it. Cheap to switch: the engine sets it per answer (a compiled step keeps
        one graph per setting)."""
        ids = tuple(int(i) for i in ids)
        bad = [i for i in ids if not 0 <= i <= self.num_layers]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"layer ids must be distinct hidden-state indices in [0, {self.num_layers}] "
                             f"({self.name} has {self.num_layers} decoder layers), got {list(ids)}")
        self.layer_ids = ids

    def _capture_kwargs(self) -> dict[str, Any]:
        return {"output_hidden_states": list(self.layer_ids)} if self.layer_ids else {}

    def _layer_states(self, out: Any) -> Tensor | None:
        """[B, T, K, D] float32 of the captured indices from a decoder output, or None."""
        if not self.layer_ids:
            return None
        return torch.stack([out.hidden_states[i] for i in self.layer_ids], dim=2).float()

    # -- the decoder steps -----------------------------------------------------------------------
    def _forward(
        self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any, logits_for: str
    ) -> StepOutput:
        out = self._decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,  # transformers >= 5.24 (`past_key_values=` is deprecated there, removed in 5.40)
            use_cache=cache is not None or logits_for != "none",
            **self._capture_kwargs(),
        )
        hidden = out.last_hidden_state  # post final norm (LlamaModel applies self.norm)
        if logits_for == "all":
            logits = self._lm_head(hidden).float()
        elif logits_for == "last":
            logits = self._lm_head(hidden[:, -1:]).float()
        else:
            logits = hidden.new_zeros(hidden.shape[0], 0, self.vocab_size, dtype=torch.float32)
        return StepOutput(logits=logits, hidden=hidden.float(), cache=out.cache, layers=self._layer_states(out))

    @staticmethod
    def _positions(attention_mask: Tensor) -> Tensor:
        # Left padding: the first real token of every row sits at position 0.
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    # -- the decode path: dynamic (default) or static cache, eager or compiled steps --------------
    def use_static_cache(self, max_cache_len: int, verify_width: int = 1, compile: bool = False) -> None:
        """Decode batch-1 answers in one preallocated KV cache of `max_cache_len` positions (prompt + answer
        + one verify window) instead of a growing DynamicCache. A multi-token step narrower than
        `verify_width` (gamma_decode + 1) is padded to it and a wider one (the prefill window's drafts)
        runs in pieces of it, so one shape serves every verify pass; padded positions are rolled back at once.
        `compile` puts the decode/verify step under torch.compile
        (CUDA: mode reduce-overhead, i.e. CUDA graphs; CPU: inductor, full graph); prefill stays eager.
        Widths only grow when several engines share this runner. bitsandbytes 4/8-bit keeps the dynamic
        path (its kernels do not capture). One live answer per runner: a new prefill reuses the cache."""
        if self.quant in BNB_QUANTS:
            raise ValueError(f"the static-cache path is not for bitsandbytes {self.quant} (use --quant int8_ao or "
                             "int4_ao, or the dynamic path)")
        if max_cache_len < 2 or verify_width < 1:
            raise ValueError("max_cache_len must be >= 2 and verify_width >= 1")
        if self.max_cache_len != max_cache_len:
            self._static = None  # reallocated at the next prefill
        self.max_cache_len = max_cache_len
        self.verify_width = max(self.verify_width, verify_width)
        if compile and not self.compiled:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._step = torch.compile(self._decode_step, mode=mode, fullgraph=True, dynamic=False)
            self.compiled = True

    @property
    def decode_path(self) -> dict[str, Any]:
        """What a timing is measured on: cache kind, compiled or not, dtype and quantisation."""
        return {"cache": "static" if self.max_cache_len else "dynamic", "compiled": self.compiled,
                "max_cache_len": self.max_cache_len, "verify_width": self.verify_width,
                "dtype": str(self.dtype).removeprefix("torch."), "quant": self.quant,
                "name": ("compiled" if self.compiled else "static" if self.max_cache_len else "eager")}

    def _decode_step(self, token_ids: Tensor, mask: Tensor, positions: Tensor, cache: Any
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(logits [B, T, V] float32, hidden [B, T, D] float32, layers [B, T, K, D] float32 or None) of one
        static-cache step; compiled as a unit (the captured layers are outputs of the same graph)."""
        out = self._decoder(inputs_embeds=self._embed(token_ids).to(self.dtype), attention_mask=mask,
                            position_ids=positions, cache=cache, use_cache=True, **self._capture_kwargs())
        hidden = out.last_hidden_state
        return self._lm_head(hidden).float(), hidden.float(), self._layer_states(out)

    def _static_prefill(self, inputs: VLMInputs, logits_for: str) -> StepOutput:
        from transformers import StaticCache

        mask = inputs.attention_mask.to(self.device)
        length = mask.shape[1]
        if length + self.verify_width > self.max_cache_len:
            raise UserError(f"a prompt of {length} positions does not fit the static cache of {self.max_cache_len} "
                            "(raise --max_cache_len)")
        if self._static is None:
            cache = StaticCache(config=self._decoder.config, max_cache_len=self.max_cache_len)
            self._static = StaticKV(cache, torch.ones(1, self.max_cache_len, dtype=torch.long, device=self.device))
        kv = self._static
        if kv.length:
            kv.cache.crop(-kv.length)  # the previous answer's positions are overwritten, not cleared
        kv.mask[:, :length] = mask
        kv.mask[:, length:] = 1
        kv.length, kv.pad = length, length - int(mask.sum())  # one host sync per answer
        out = self._forward(inputs.inputs_embeds.to(self.device, self.dtype), kv.mask, self._positions(mask),
                            kv.cache, logits_for)
        return StepOutput(logits=out.logits, hidden=out.hidden, cache=kv, layers=out.layers)

    def _static_decode(self, token_ids: Tensor, kv: StaticKV) -> StepOutput:
        n = token_ids.shape[1]
        if n > self.verify_width:
            # A step wider than the verify pass (the prefill window's drafts, once per answer) runs as
            # verify-width pieces, so the compiled step keeps its two shapes (1 and verify_width).
            parts = [self._static_decode(token_ids[:, i:i + self.verify_width], kv)
                     for i in range(0, n, self.verify_width)]
            return StepOutput(logits=torch.cat([p.logits for p in parts], dim=1),
                              hidden=torch.cat([p.hidden for p in parts], dim=1), cache=kv,
                              layers=None if parts[0].layers is None else torch.cat([p.layers for p in parts], dim=1))
        width = self.verify_width if 1 < n < self.verify_width else n
        if width > n:  # pad to the one verify shape; the pad positions are rolled back below
            token_ids = torch.cat([token_ids, token_ids.new_full((1, width - n), self.pad_token_id)], dim=1)
        if kv.length + width > self.max_cache_len:
            raise UserError(f"the static cache of {self.max_cache_len} positions is full (raise --max_cache_len)")
        positions = torch.arange(kv.length - kv.pad, kv.length - kv.pad + width, device=self.device)[None]
        logits, hidden, layers = self._step(token_ids, kv.mask, positions, kv.cache)
        if self.compiled:  # CUDA-graph outputs are overwritten by the next replay; callers keep these
            logits, hidden = logits.clone(), hidden.clone()
            layers = None if layers is None else layers.clone()
        if width > n:
            kv.cache.crop(n - width)
        kv.length += n
        return StepOutput(logits=logits[:, :n], hidden=hidden[:, :n], cache=kv,
                          layers=None if layers is None else layers[:, :n])

    @torch.no_grad()
    def prefill(self, inputs: VLMInputs, logits_for: str = "all") -> StepOutput:
        """Run the whole prompt; logits/hidden for all positions (`logits_for="last"`: last only)."""
        if logits_for not in ("all", "last"):
            raise ValueError(f"logits_for must be 'all' or 'last', got {logits_for!r}")
        if self.max_cache_len and inputs.inputs_embeds.shape[0] == 1:
            return self._static_prefill(inputs, logits_for)
        from transformers import DynamicCache

        mask = inputs.attention_mask.to(self.device)
        cache = DynamicCache(config=self._decoder.config)
        return self._forward(inputs.inputs_embeds.to(self.device, self.dtype), mask,
                             self._positions(mask), cache, logits_for)

    @torch.no_grad()
    def decode(self, token_ids: Tensor, cache: Any, attention_mask: Tensor) -> StepOutput:
        """Feed `token_ids` [B, T] after the cached positions; `attention_mask` [B, cache+T] (on the static
        path only its width is checked: every new position is attended)."""
        token_ids = token_ids.to(self.device)
        expected = cache.get_seq_length() + token_ids.shape[1]
        if attention_mask.shape[1] != expected:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, cache+new is {expected}")
        if isinstance(cache, StaticKV):
            return self._static_decode(token_ids, cache)
        mask = attention_mask.to(self.device)
        positions = self._positions(mask)[:, -token_ids.shape[1]:]
        return self._forward(self.embed_ids(token_ids), mask, positions, cache, "all")

    def crop_cache(self, cache: Any, length: int) -> None:
        """Drop cached positions >= `length` (in place; on the static path only the length moves)."""
        current = cache.get_seq_length()
        if not 0 <= length <= current:
            raise ValueError(f"cannot crop a cache of length {current} to {length}")
        if length < current:
            if isinstance(cache, StaticKV):
                cache.cache.crop(length - current)
                cache.length = length
            else:
                cache.crop(length - current)  # negative = number of positions to remove (transformers 5.x)

    # -- draft trees: one verify pass over a tree, then compaction ---------------------------------
    @torch.no_grad()
    def verify_tree(self, token_ids: Tensor, parents: list[int], cache: Any, attention_mask: Tensor) -> StepOutput:
        """One target pass over a draft tree, through the model's own forward: `token_ids` [1, T] are the root
        (the last verified token) and T - 1 nodes, node i (row i + 1) a child of node `parents[i]` (-1: the
        root; parents[i] < i). Each row attends to every cached position `attention_mask` [1, cache + T]
        allows and to its own ancestors in the tree (itself included), at position root + depth; row r's
        logits score the position after it. The mask is 4D and additive (0 / the dtype's minimum): eager
        attention adds it to the scores, so a bool mask would be silently wrong there; sdpa reads either.
        The cache then holds all T rows (`compact_cache` keeps the accepted path). On the static and compiled
        paths the pass is padded to `use_tree_width`'s width (one graph per width)."""
        impl = getattr(self._decoder.config, "_attn_implementation", "eager") or "eager"
        if impl not in ("eager", "sdpa"):
            raise UserError(f"tree verify needs eager or sdpa attention (a 4D mask), the target runs {impl}")
        token_ids = token_ids.to(self.device)
        width, past = token_ids.shape[1], cache.get_seq_length()
        if token_ids.shape[0] != 1 or len(parents) != width - 1:
            raise ValueError(f"a tree verify is batch 1 with one parent per node: {width - 1} nodes, "
                             f"{len(parents)} parents")
        if attention_mask.shape[1] != past + width:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, cache+new is {past + width}")
        if isinstance(cache, StaticKV):
            return self._static_verify_tree(token_ids, parents, cache)
        ancestors, depth = tree_ancestors(parents, self.device)
        mask = attention_mask.to(self.device)
        allowed = torch.cat([mask[:, None, None, :past].bool().expand(1, 1, width, past), ancestors[None, None]], -1)
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        positions = self._positions(mask)[:, past:past + 1] + depth[None]
        return self._forward(self.embed_ids(token_ids), additive, positions, cache, "all")

    def use_tree_width(self, width: int) -> None:
        """On the static and compiled paths, pad every tree verify pass to `width` positions (root + nodes), so
        one compiled graph serves every tree (widths only grow when several engines share this runner)."""
        if width < 2:
            raise ValueError("a tree verify pass holds the root and at least one node")
        self.tree_width = max(getattr(self, "tree_width", 0), width)

    def _static_verify_tree(self, token_ids: Tensor, parents: list[int], kv: StaticKV) -> StepOutput:
        """verify_tree on the preallocated cache: padded to `tree_width` rows (each pad row sees only itself and
        is cropped at once), the mask over all max_cache_len slots (the static cache's keys are its whole
        buffer): cached slots as the prompt's mask says, the new rows as the ancestor mask says, nothing beyond."""
        n = token_ids.shape[1]
        width = max(getattr(self, "tree_width", 0), n)
        if kv.length + width > self.max_cache_len:
            raise UserError(f"the static cache of {self.max_cache_len} positions is full (raise --max_cache_len)")
        ancestors, depth = tree_ancestors(parents, self.device)
        rows = torch.eye(width, dtype=torch.bool, device=self.device)
        rows[:n, :n] = ancestors
        allowed = torch.zeros(1, 1, width, self.max_cache_len, dtype=torch.bool, device=self.device)
        allowed[..., : kv.length] = kv.mask[:, None, None, : kv.length].bool()
        allowed[0, 0, :, kv.length : kv.length + width] = rows
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        positions = torch.full((1, width), kv.length - kv.pad, dtype=torch.long, device=self.device)
        positions[0, :n] += depth
        if width > n:
            token_ids = torch.cat([token_ids, token_ids.new_full((1, width - n), self.pad_token_id)], dim=1)
        logits, hidden, layers = self._step(token_ids, additive, positions, kv.cache)
        if self.compiled:  # CUDA-graph outputs are overwritten by the next replay; callers keep these
            logits, hidden = logits.clone(), hidden.clone()
            layers = None if layers is None else layers.clone()
        if width > n:
            kv.cache.crop(n - width)
        kv.length += n
        return StepOutput(logits=logits[:, :n], hidden=hidden[:, :n], cache=kv,
                          layers=None if layers is None else layers[:, :n])

    def compact_cache(self, cache: Any, start: int, keep: list[int]) -> None:
        """Roll back a tree verify: of the rows cached from `start` on, keep rows `keep` (ascending, the
        accepted path) at consecutive positions start, start + 1, ... and drop the rest. The kept keys move
        in place (their rotary positions are already the path's: root + depth), so the cache's tensors keep
        their addresses (CUDA graphs captured on a static cache stay valid); then the cache is cropped to
        start + len(keep)."""
        moved = next((i for i, row in enumerate(keep) if row != i), len(keep))  # rows before it are in place
        if moved < len(keep):
            rows = torch.tensor(keep[moved:], device=self.device) + start
            at = slice(start + moved, start + len(keep))
            for layer in (cache.cache if isinstance(cache, StaticKV) else cache).layers:
                layer.keys[:, :, at] = layer.keys.index_select(2, rows)
                layer.values[:, :, at] = layer.values.index_select(2, rows)
        self.crop_cache(cache, start + len(keep))

    @torch.no_grad()
    def lm_head_weight(self) -> Tensor:
        """The LM head as a dense float32 [V, D] matrix on the model device (dequantised if needed).

        Built once and kept (about 0.5 GB for a 32k x 4096 head), so callers may call it freely.
        """
        weight = self._lm_head.weight
        version = (weight.data_ptr(), weight._version)  # rebuilt if the head is trained in place
        if self._lm_head_cache is None or self._lm_head_version != version:
            self._lm_head_version = version
            if _weight_is_quantized(weight):
                # Multiplying the identity through the quantised layer returns W^T exactly as the
                # layer itself uses it, for any bitsandbytes format.
                rows = []
                for start in range(0, self.hidden_size, 1024):
                    stop = min(start + 1024, self.hidden_size)
                    eye = torch.zeros(stop - start, self.hidden_size, device=self.device, dtype=self.dtype)
                    eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
                    rows.append(self._lm_head(eye).float())
                self._lm_head_cache = torch.cat(rows).T.contiguous()
            else:
                self._lm_head_cache = weight.detach().to(self.device, torch.float32, copy=True)
        return self._lm_head_cache

    @torch.no_grad()
    def generate(self, inputs: VLMInputs, max_new_tokens: int) -> GenerationOutput:
        """Greedy decoding with the KV cache until every row emitted EOS or `max_new_tokens`."""
        batch = inputs.inputs_embeds.shape[0]
        tokens = torch.full((batch, max_new_tokens), self.pad_token_id, dtype=torch.long, device=self.device)
        hidden = torch.zeros(batch, max_new_tokens, self.hidden_size, device=self.device)
        valid = torch.zeros(batch, max_new_tokens, dtype=torch.bool, device=self.device)
        layers = (torch.zeros(batch, max_new_tokens, len(self.layer_ids), self.hidden_size, device=self.device)
                  if self.layer_ids else None)
        if max_new_tokens <= 0:
            return GenerationOutput(tokens=tokens, hidden=hidden, mask=valid, layers=layers)
        step = self.prefill(inputs, logits_for="last")
        mask = inputs.attention_mask.to(self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for t in range(max_new_tokens):
            alive = ~done
            next_tok = step.logits[:, -1].argmax(-1)
            tokens[:, t] = torch.where(alive, next_tok, self.pad_token_id)
            hidden[:, t] = step.hidden[:, -1] * alive[:, None]
            if layers is not None:
                layers[:, t] = step.layers[:, -1] * alive[:, None, None]
            valid[:, t] = alive
            done |= next_tok == self.eos_token_id
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=self.device)], dim=1)
            step = self.decode(tokens[:, t : t + 1], step.cache, mask)
        return GenerationOutput(tokens=tokens, hidden=hidden, mask=valid, layers=layers)

    @torch.no_grad()
    def teacher_forced_hidden(self, inputs: VLMInputs, tokens: Tensor, mask: Tensor) -> Tensor:
        """[B, N, D]: the state that predicts tokens[t] from prompt + tokens[:t], one forward pass.

        Positions where `mask` is False are zero (as in `generate`).
        """
        tokens = tokens.to(self.device)
        mask = mask.to(self.device).bool()
        n = tokens.shape[1]
        prompt_len = inputs.inputs_embeds.shape[1]
        ids = torch.where(mask, tokens, torch.full_like(tokens, self.pad_token_id))
        embeds = torch.cat([inputs.inputs_embeds.to(self.device, self.dtype), self.embed_ids(ids)], dim=1)
        attn = torch.cat([inputs.attention_mask.to(self.device), torch.ones_like(ids)], dim=1)
        out = self._forward(embeds, attn, self._positions(attn), None, "none")
        states = out.hidden[:, prompt_len - 1 : prompt_len - 1 + n]
        return states * mask[..., None]


# ----------------------------------------------------------------------------------------------
# EventGPT
# ----------------------------------------------------------------------------------------------


class EventGPTRunner(VLMRunner):
    """EventGPT: CLIP ViT -> projector (Linear-GELU-Linear) -> feature adaptor -> pooling -> Vicuna."""

    name = "eventgpt"

    def __init__(
        self,
        *,
        llm: nn.Module,
        tower: nn.Module,
        projector: nn.Module,
        adaptor: nn.Module | None,
        image_processor: Any,
        num_event_frames: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(decoder=llm.model, lm_head=llm.lm_head, **kwargs)
        self.llm = llm
        self.tower = tower.eval()
        self.projector = projector.eval()
        self.adaptor = adaptor.eval() if adaptor is not None else None
        self.image_processor = image_processor
        self.num_event_frames = num_event_frames

    def event_image_paths(self, split_dir: Path, clip: dict) -> list[Path]:
        prefix = clip["event_image_prefix"]
        return [event_frame_path(Path(split_dir) / prefix, i) for i in range(self.num_event_frames)]

    @torch.no_grad()
    def encode_event_images(self, images: list[np.ndarray]) -> Tensor:
        """RGB uint8 event frames -> spliced embeddings [T + S, D] (S = CLIP tokens incl. CLS)."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)
        # The release uses CLIPVisionModel(...).last_hidden_state: the last encoder layer, all
        # tokens including CLS, no post_layernorm.
        feats = self.tower(pixel_values=pixels).last_hidden_state  # [T, S, C]
        feats = self.projector(feats)
        if self.adaptor is not None:
            feats = self.adaptor(feats)
        return spatio_temporal_pool(feats).to(self.dtype)

    def clip_features(self, split_dir: Path, clip: dict) -> Tensor:
        paths = self.event_image_paths(split_dir, clip)
        missing = next((p for p in paths if not p.is_file()), None)
        if missing is not None:
            raise ClipReadError(f"event image not found: {missing} ({render_hint(Path(split_dir).parent)})")
        return self.encode_event_images([read_rgb(p) for p in paths])

    def prompt_ids(self, question: str) -> list[int]:
        """The release's `tokenizer_event_token`: chunks around `<event>` tokenised separately,
        BOS kept once, `EVENT_TOKEN_INDEX` where the features go."""
        chunks = [self.tokenizer(c).input_ids for c in eventgpt_prompt(question).split(EVENTGPT_EVENT_TOKEN)]
        bos = self.tokenizer.bos_token_id
        offset = 1 if chunks and chunks[0] and chunks[0][0] == bos else 0
        ids: list[int] = [chunks[0][0]] if offset else []
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids.append(EVENT_TOKEN_INDEX)
            ids.extend(chunk[offset:])
        return ids

    def prompt_embeds(self, features: Tensor, question: str) -> Tensor:
        parts, text = [], []
        for tok in self.prompt_ids(question):
            if tok == EVENT_TOKEN_INDEX:
                if text:
                    parts.append(self.embed_ids(text))
                    text = []
                parts.append(features.to(self.device, self.dtype))
            else:
                text.append(tok)
        if text:
            parts.append(self.embed_ids(text))
        return torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# Video-LLaVA
# ----------------------------------------------------------------------------------------------


class VideoLlavaRunner(VLMRunner):
    """Video-LLaVA through transformers' own model and processor."""

    name = "video_llava"

    def __init__(self, *, model: nn.Module, processor: Any, num_frames: int, frame_pick: str = DEFAULT_FRAME_PICK,
                 **kwargs: Any) -> None:
        super().__init__(decoder=model.model.language_model, lm_head=model.lm_head, **kwargs)
        if frame_pick not in FRAME_PICKS:
            raise UserError(f"unknown frame_pick {frame_pick!r}; choose one of {', '.join(FRAME_PICKS)}")
        self.model = model.eval()
        self.processor = processor
        self.num_frames = num_frames
        self.frame_pick = frame_pick
        self.video_token_id = int(model.config.video_token_index)
        self.video_token = processor.video_token

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> Tensor:
        """uint8 [F, H, W, 3] -> projected video tower tokens [F * tokens_per_frame, D] (CLS kept)."""
        pixels = self.processor.video_processor(videos=[np.asarray(frames)], return_tensors="pt")
        pixels = pixels["pixel_values_videos"].to(self.device, self.dtype)
        out = self.model.model.get_video_features(pixel_values_videos=pixels, return_dict=True)
        return out.pooler_output.reshape(-1, self.hidden_size).to(self.dtype)

    def clip_features(self, split_dir: Path, clip: dict) -> Tensor:
        return self.encode_frames(sample_video_frames(Path(split_dir) / clip["video"], self.num_frames,
                                                      self.frame_pick))

    def prompt_embeds(self, features: Tensor, question: str) -> Tensor:
        # As VideoLlavaProcessor: repeat the <video> token once per visual token, then tokenise.
        text = video_llava_prompt(question).replace(self.video_token, self.video_token * features.shape[0])
        ids = torch.tensor(self.tokenizer(text).input_ids, device=self.device)
        slots = ids == self.video_token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"prompt has {int(slots.sum())} video slots for {features.shape[0]} features")
        embeds = self.embed_ids(ids)
        embeds[slots] = features.to(self.device, self.dtype)
        return embeds


# ----------------------------------------------------------------------------------------------
# What a runner is, and tokens between the two vocabularies
# ----------------------------------------------------------------------------------------------


def tree_ancestors(parents: list[int], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """A draft tree's (ancestor mask [T, T] bool, depth [T] long) over its root (row 0) and nodes (node i at
    row i + 1, child of node parents[i], -1 = the root): row r may see row c iff c is r or an ancestor of r."""
    width = len(parents) + 1
    seen: list[list[int]] = [[0]]  # each row's ancestors (itself included), built on the host: one tensor op
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i}'s parent {parent} is not the root (-1) or an earlier node")
        seen.append([*seen[parent + 1], i + 1])
    rows = [r for r, cols in enumerate(seen) for _ in cols]
    allowed = torch.zeros(width, width, dtype=torch.bool)
    allowed[rows, [c for cols in seen for c in cols]] = True
    return allowed.to(device), torch.tensor([len(cols) - 1 for cols in seen]).to(device)


def model_description(runner: VLMRunner) -> dict[str, Any]:
    """The one description of a loaded model that data folders, checkpoints and reports record.

    `config_hash` and `dtype` identify the computation (extraction refuses to mix data of other
    values); `quant` and `quant_scope` say what was quantised ("language_model": EventGPT's LLaMA
    only, its vision side in `dtype`; "whole_model": transformers' integration over Video-LLaVA);
    the visual-input fields say how the clip's frames were chosen; the rest lets a reader rebuild or
    check the model: where it came from, its widths and special tokens, and the device it ran on.
    """
    description = {
        "name": runner.name,
        "path": str(runner.model_path),
        "config_hash": runner.config_hash,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "quant": getattr(runner, "quant", "none"),
        "quant_scope": getattr(runner, "quant_scope", "none"),
        "hidden_size": runner.hidden_size,
        "vocab_size": runner.vocab_size,
        "eos_token_id": runner.eos_token_id,
        "pad_token_id": runner.pad_token_id,
        "device": str(runner.device),
    }
    if isinstance(runner, VideoLlavaRunner):
        description.update(num_frames=runner.num_frames, frame_pick=runner.frame_pick)
    elif isinstance(runner, EventGPTRunner):
        description.update(num_event_frames=runner.num_event_frames)
    return description


def to_drafter_vocab(tokens: Tensor, vocab_size: int, mask: Tensor | None = None) -> tuple[Tensor, int]:
    """Target token ids made safe to feed to a drafter whose vocabulary has `vocab_size` rows.

    The target may emit ids the drafter cannot embed (Video-LLaVA's added image/video/pad tokens sit
    above Vicuna's 32000): those become 0 (`<unk>`). Returns (ids, how many were replaced), counting
    only positions where `mask` is True (all positions without a mask), so callers can report the
    count instead of hiding it. Negative ids are also out of range and replaced.
    """
    foreign = (tokens >= vocab_size) | (tokens < 0)
    mapped = torch.where(foreign, torch.zeros_like(tokens), tokens)
    counted = foreign if mask is None else foreign & mask.to(foreign.device).bool()
    return mapped, int(counted.sum())

