"""EventGPT and Video-LLaVA behind one step-by-step interface (`VLMRunner`).

Later stages (hidden-state extraction, live speculative decoding) drive either model through the
same calls without knowing which one it is, or whether it is a toy or a 7B checkpoint:

    runner = load_eventgpt("checkpoints/EventGPT-7b", quant="4bit")      # or load_video_llava(...)
    feats = runner.clip_features(split_dir, clip)                       # [P, D], once per clip
    inputs = runner.build_inputs([feats, feats], ["Q1?", "Q2?"])         # left-padded batch
    out = runner.generate(inputs, max_new_tokens=50)                    # tokens, hidden, mask

Low-level steps: `prefill`, `decode` (KV cache), `crop_cache`, `lm_head_weight`,
`teacher_forced_hidden`. Hidden states are always the last decoder layer AFTER the final RMSNorm,
so `logits = hidden @ lm_head_weight().T` (transformers' `LlamaModel.last_hidden_state`).

Video-LLaVA loads with transformers' own `VideoLlavaForConditionalGeneration`/`VideoLlavaProcessor`.
EventGPT (model_type `EventChat_llama`, not registered in transformers) loads its language model
with `LlamaForCausalLM.from_pretrained` (so 4-bit/8-bit quantisation works unchanged) and assembles
the CLIP tower, projector and feature adaptor around it from the checkpoint's tensors. See
docs/MODELS.md for the release semantics this follows.

Example (tiny CPU smoke run on the toy checkpoints that make_toy_world.py writes):
    python -c "import model_loaders as m; r = m.load_video_llava('data/toy/models/video_llava', \
device='cpu'); print(r.name, r.hidden_size, r.vocab_size, r.config_hash)"
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator
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
from common import UserError, first_line, read_json, resolve_device, resolve_dtype

log = logging.getLogger("xmodal_sd.model_loaders")

# 4bit/8bit: bitsandbytes (NF4 / LLM.int8) at load time; int8_ao/int4_ao: torchao weight-only int8 / int4
# (group size 128) of the language model's decoder layers after loading (optional package, fast kernels
# that also run under torch.compile).
QUANT_CHOICES = ("none", "4bit", "8bit", "int8_ao", "int4_ao")
BNB_QUANTS = ("4bit", "8bit")
AO_QUANTS = ("int8_ao", "int4_ao")
RUNNER_NAMES = ("eventgpt", "video_llava")
# --- EventGPT release constants (dataset/constants.py, dataset/conversation.py of the release) ---
EVENTGPT_MODEL_TYPE = "EventChat_llama"
EVENT_TOKEN_INDEX = -200  # the release's in-sequence marker for "splice event features here"
EVENTGPT_EVENT_TOKEN = "<event>"
EVENTGPT_EV_START = "<ev_start>"
EVENTGPT_EV_END = "<ev_end>"
EVENTGPT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
EVENTGPT_TOWER_PREFIX = "model.visual_tower.visual_tower."
EVENTGPT_PROJECTOR_PREFIX = "model.visual_projector."
EVENTGPT_ADAPTOR_PREFIX = "model.feature_adaptor."

# --- Video-LLaVA (LanguageBind/Video-LLaVA-7B-hf model card) ---
VIDEO_LLAVA_MODEL_TYPE = "video_llava"
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


# ----------------------------------------------------------------------------------------------
# Small shared helpers
# ----------------------------------------------------------------------------------------------


def config_hash(path: str | os.PathLike) -> str:
    """First 16 hex characters of the sha256 of a config.json file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def bnb_config(quant: str, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """`BitsAndBytesConfig` for `quant` (None for "none"); raises `UserError` off CUDA.

    `compute_dtype` is the 4-bit layers' compute dtype: the model's own dtype (bf16 EventGPT, fp16
    Video-LLaVA under "auto"), so quantising a model does not change its precision elsewhere.
    """
    if quant not in QUANT_CHOICES:
        raise UserError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    if quant == "none" or quant in AO_QUANTS:
        return None
    if device.type != "cuda":
        raise UserError(f"{quant[0]}-bit needs a CUDA GPU; use --quant none on CPU")
    try:
        import bitsandbytes  # noqa: F401  (imported only to fail early with a clear message)
    except ImportError as err:
        raise UserError(f"--quant {quant} needs the bitsandbytes package: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def torchao_quantize(decoder: nn.Module, quant: str, device: torch.device) -> None:
    """Weight-only torchao quantisation (`int8_ao`, or `int4_ao` at group size 128, CUDA only) of every
    Linear of a decoder's layers, in place; embeddings, norms and the LM head stay in the model dtype.
    torchao is optional: imported only here, one error line when it is missing."""
    if quant not in AO_QUANTS:
        raise UserError(f"unknown torchao quant {quant!r}; choose one of {', '.join(AO_QUANTS)}")
    if quant == "int4_ao" and device.type != "cuda":
        raise UserError("--quant int4_ao needs a CUDA GPU (its int4 kernels); use int8_ao or none on CPU")
    dtype = next(decoder.parameters()).dtype
    if quant == "int4_ao" and dtype != torch.bfloat16:
        # The tinygemm int4 kernel (torch's own _weight_int4pack_mm) takes bfloat16 activations only.
        raise UserError(f"--quant int4_ao runs in bfloat16 (its int4 kernel), this model is {dtype}; "
                        "add --dtype bf16 (or --vl_dtype/--egpt_dtype bf16)")
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise UserError(f"--quant {quant} needs the torchao package: pip install torchao") from err
    # int4: the tile-packed layout of torch's tinygemm kernel; torchao's default (plain) needs the
    # separate mslk package.
    config = (Int8WeightOnlyConfig() if quant == "int8_ao"
              else Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    try:
        quantize_(decoder.layers, config)
    except (ImportError, RuntimeError, ValueError, AssertionError, NotImplementedError) as err:
        raise UserError(f"--quant {quant} failed in torchao ({type(err).__name__}: {first_line(err)}); "
                        "use --quant int8_ao or none") from err


def _resolve(device: str, dtype: str, quant: str, name: str) -> tuple[torch.device, torch.dtype, Any]:
    dev = resolve_device(device)
    bnb_config(quant, dev)  # fails early (and off CUDA) before the dtype is even looked at
    if quant in AO_QUANTS and importlib.util.find_spec("torchao") is None:
        raise UserError(f"--quant {quant} needs the torchao package: pip install torchao")
    if quant == "int4_ao" and dev.type != "cuda":
        raise UserError("--quant int4_ao needs a CUDA GPU (its int4 kernels); use int8_ao or none on CPU")
    dt = resolve_dtype(dtype, dev, model=name)
    if quant == "4bit" and dt == torch.float32:
        log.info("%s: 4-bit layers compute in float32, as --dtype asked (slow; fp16/bf16 is usual)", name)
    return dev, dt, bnb_config(quant, dev, compute_dtype=dt)


def accepted_key(key: str, patterns: Iterable[str]) -> bool:
    """Whether a tensor name matches one of `patterns`: the whole name, its last dotted parts
    (`position_ids` matches `vision_model.embeddings.position_ids`), or a glob (`*.rotary_emb.inv_freq`)."""
    return any(key == pat or key.endswith("." + pat) or fnmatch.fnmatchcase(key, pat) for pat in patterns)


def check_weight_keys(what: str, source: Any, missing: Iterable[str], unexpected: Iterable[str],
                      accept_keys: Iterable[str] = ()) -> None:
    """Raise one `UserError` naming every tensor the model lacks or does not know (`accept_keys` excepted).

    A missing tensor would silently stay at its random initialisation and an unexpected one would be
    silently dropped; both mean the checkpoint is not the model the loader builds.
    """
    accept_keys = tuple(accept_keys)
    missing = sorted(k for k in missing if not accepted_key(k, accept_keys))
    unexpected = sorted(k for k in unexpected if not accepted_key(k, accept_keys))
    if not missing and not unexpected:
        return

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")

    parts = [f"{len(missing)} missing ({listed(missing)})"] if missing else []
    parts += [f"{len(unexpected)} unexpected ({listed(unexpected)})"] if unexpected else []
    raise UserError(f"{what} checkpoint {source}: {' and '.join(parts)} tensors; re-download it if it is incomplete, "
                    "or, for keys known to be harmless (e.g. position_ids buffers of older transformers), accept "
                    "them with --accept_weight_keys KEY")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (expected unexpected-key notes) for one block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def spatio_temporal_pool(features: Tensor) -> Tensor:
    """EventGPT's aggregator: [T, S, D] -> [T + S, D].

    The first T rows are per-frame means over the S tokens (temporal tokens), the next S rows are
    per-token means over the T frames (spatial tokens). The release pads the temporal part only
    when asked for more temporal tokens than frames; its default asks for exactly T, so no padding.
    """
    if features.ndim != 3:
        raise ValueError(f"expected features [T, S, D], got {tuple(features.shape)}")
    return torch.cat([features.mean(dim=1), features.mean(dim=0)], dim=0)


def checkpoint_tensors(ckpt_dir: str | os.PathLike, prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Load only the tensors whose names start with one of `prefixes` from a HF checkpoint folder.

    Handles a single `model.safetensors`/`pytorch_model.bin` and sharded ones with an
    `*.index.json`; only the shards that hold matching keys are opened.
    """
    ckpt = Path(ckpt_dir)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = ckpt / index_name
        if index.is_file():
            weight_map = read_json(index, "checkpoint index", "re-download the checkpoint")["weight_map"]
            files = sorted({f for k, f in weight_map.items() if k.startswith(prefixes)})
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (ckpt / n).is_file()][:1]
        if not files:
            raise UserError(
                f"no weights in {ckpt}: expected model.safetensors, pytorch_model.bin or a sharded index "
                "(point --checkpoint at the downloaded model folder)"
            )
    out: dict[str, Tensor] = {}
    for name in files:
        file = ckpt / name
        if not file.is_file():
            raise UserError(f"checkpoint shard {file} listed in the index is missing (re-download it)")
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                    if key.startswith(prefixes):
                        out[key] = handle.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            out.update({k: v for k, v in state.items() if k.startswith(prefixes)})
    return out


def _check_model_dir(path: str | os.PathLike, model_type: str, what: str, fix: str) -> tuple[Path, dict]:
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{what} checkpoint folder not found: {folder} ({fix})")
    cfg = read_json(folder / "config.json", f"{what} config", fix)
    found = cfg.get("model_type")
    if found != model_type:
        raise UserError(
            f"{folder / 'config.json'} has model_type {found!r}, but a {what} checkpoint has {model_type!r} "
            f"({fix})"
        )
    return folder, cfg


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
        )
        hidden = out.last_hidden_state  # post final norm (LlamaModel applies self.norm)
        if logits_for == "all":
            logits = self._lm_head(hidden).float()
        elif logits_for == "last":
            logits = self._lm_head(hidden[:, -1:]).float()
        else:
            logits = hidden.new_zeros(hidden.shape[0], 0, self.vocab_size, dtype=torch.float32)
        return StepOutput(logits=logits, hidden=hidden.float(), cache=out.cache)

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

    def _decode_step(self, token_ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> tuple[Tensor, Tensor]:
        """(logits [B, T, V] float32, hidden [B, T, D] float32) of one static-cache step; compiled as a unit."""
        out = self._decoder(inputs_embeds=self._embed(token_ids).to(self.dtype), attention_mask=mask,
                            position_ids=positions, cache=cache, use_cache=True)
        hidden = out.last_hidden_state
        return self._lm_head(hidden).float(), hidden.float()

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
        return StepOutput(logits=out.logits, hidden=out.hidden, cache=kv)

    def _static_decode(self, token_ids: Tensor, kv: StaticKV) -> StepOutput:
        n = token_ids.shape[1]
        if n > self.verify_width:
            # A step wider than the verify pass (the prefill window's drafts, once per answer) runs as
            # verify-width pieces, so the compiled step keeps its two shapes (1 and verify_width).
            parts = [self._static_decode(token_ids[:, i:i + self.verify_width], kv)
                     for i in range(0, n, self.verify_width)]
            return StepOutput(logits=torch.cat([p.logits for p in parts], dim=1),
                              hidden=torch.cat([p.hidden for p in parts], dim=1), cache=kv)
        width = self.verify_width if 1 < n < self.verify_width else n
        if width > n:  # pad to the one verify shape; the pad positions are rolled back below
            token_ids = torch.cat([token_ids, token_ids.new_full((1, width - n), self.pad_token_id)], dim=1)
        if kv.length + width > self.max_cache_len:
            raise UserError(f"the static cache of {self.max_cache_len} positions is full (raise --max_cache_len)")
        positions = torch.arange(kv.length - kv.pad, kv.length - kv.pad + width, device=self.device)[None]
        logits, hidden = self._step(token_ids, kv.mask, positions, kv.cache)
        if self.compiled:  # CUDA-graph outputs are overwritten by the next replay; callers keep these
            logits, hidden = logits.clone(), hidden.clone()
        if width > n:
            kv.cache.crop(n - width)
        kv.length += n
        return StepOutput(logits=logits[:, :n], hidden=hidden[:, :n], cache=kv)

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
        if max_new_tokens <= 0:
            return GenerationOutput(tokens=tokens, hidden=hidden, mask=valid)
        step = self.prefill(inputs, logits_for="last")
        mask = inputs.attention_mask.to(self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for t in range(max_new_tokens):
            alive = ~done
            next_tok = step.logits[:, -1].argmax(-1)
            tokens[:, t] = torch.where(alive, next_tok, self.pad_token_id)
            hidden[:, t] = step.hidden[:, -1] * alive[:, None]
            valid[:, t] = alive
            done |= next_tok == self.eos_token_id
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=self.device)], dim=1)
            step = self.decode(tokens[:, t : t + 1], step.cache, mask)
        return GenerationOutput(tokens=tokens, hidden=hidden, mask=valid)

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


def _tower_dir(ckpt: Path, name: str) -> str:
    """`mm_visual_tower` as a folder (relative to the checkpoint, the working dir, or absolute) or a hub id."""
    candidate = Path(name).expanduser()
    for folder in ((candidate,) if candidate.is_absolute() else (ckpt / candidate, candidate)):
        if folder.is_dir():
            return str(folder)
    if candidate.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise UserError(
            f"vision tower folder {name!r} (mm_visual_tower in {ckpt / 'config.json'}) not found; pass "
            "vision_tower= a local CLIP folder or a hub id such as openai/clip-vit-large-patch14-336"
        )
    return name  # a hub id such as openai/clip-vit-large-patch14-336


def _clip_vision_config(tower: str) -> Any:
    from transformers import CLIPVisionConfig

    local = Path(tower) / "config.json"
    if local.is_file():
        cfg = read_json(local, "CLIP vision tower config", "re-download the vision tower")
        if "vision_config" in cfg:  # a full CLIPConfig, as in openai/clip-vit-large-patch14-336
            cfg = cfg["vision_config"]
        cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}
        return CLIPVisionConfig(**cfg)
    return CLIPVisionConfig.from_pretrained(tower)  # hub id (base_config_key picks vision_config)


def _clip_image_processor(tower: str) -> Any:
    # The release ran transformers 4.x's PIL-based CLIPImageProcessor; 5.x keeps it as *Pil.
    try:
        from transformers import CLIPImageProcessorPil as ProcessorClass
    except ImportError:  # older transformers: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as ProcessorClass
    return ProcessorClass.from_pretrained(tower)


def _output_size(processor: Any) -> tuple[Any, Any]:
    """(height, width) a CLIP image processor produces: its crop size, or a fixed resize size."""

    def hw(size: Any) -> tuple[Any, Any]:
        if size is None:
            return None, None
        if isinstance(size, dict):
            return size.get("height"), size.get("width")
        return getattr(size, "height", None), getattr(size, "width", None)

    if getattr(processor, "do_center_crop", False):
        return hw(getattr(processor, "crop_size", None))
    return hw(getattr(processor, "size", None))


def _fit_tower_state(tower: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map release keys (`vision_model.*`, transformers 4.x) onto the installed CLIPVisionModel."""
    own = set(tower.state_dict())
    fitted = {}
    for key, value in state.items():
        if key not in own and key.startswith("vision_model.") and key[len("vision_model."):] in own:
            key = key[len("vision_model."):]
        elif key not in own and f"vision_model.{key}" in own:
            key = f"vision_model.{key}"
        fitted[key] = value
    return fitted


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_exactly(module: nn.Module, state: dict[str, Tensor], prefix: str, ckpt: Path,
                  accept_keys: tuple[str, ...]) -> None:
    """`load_state_dict` that names every missing or unexpected tensor (with its checkpoint prefix)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    check_weight_keys("EventGPT", ckpt, [prefix + k for k in missing], [prefix + k for k in unexpected], accept_keys)


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """A checkpoint's tokenizer, also from a folder that ships only sentencepiece's `tokenizer.model`.

    Release-style LLaMA folders (EventGPT's among them) often have `tokenizer.model` without
    `tokenizer.json`. transformers 5.x then converts the sentencepiece model, which needs `protobuf`
    (without it, it falls back to a tiktoken reader and fails with an unrelated message). Such a
    folder loads as a `LlamaTokenizer` and, unless its tokenizer_config.json says otherwise, adds BOS,
    as the slow `LlamaTokenizer` (`use_fast=False`) the release ran does; 5.x's default would not.
    """
    from transformers import AutoTokenizer, LlamaTokenizer

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        with _quiet_transformers():  # AutoTokenizer peeks at config.json and does not know EventChat_llama
            return AutoTokenizer.from_pretrained(str(folder))
    if not (folder / "tokenizer.model").is_file():
        raise UserError(f"{folder} holds no tokenizer (tokenizer.json or sentencepiece tokenizer.model); copy the "
                        "tokenizer files of the checkpoint into it")
    if importlib.util.find_spec("google.protobuf") is None:
        raise UserError(f"{folder / 'tokenizer.model'} is a sentencepiece tokenizer, which transformers converts with "
                        "protobuf: pip install -r requirements.txt (or pip install protobuf)")
    config_file = folder / "tokenizer_config.json"
    config = read_json(config_file, "tokenizer config", "re-download the checkpoint") if config_file.is_file() else {}
    kwargs = {} if "add_bos_token" in config else {"add_bos_token": True}
    cls = LlamaTokenizer if config.get("tokenizer_class") in (None, "LlamaTokenizer", "LlamaTokenizerFast") else None
    with _quiet_transformers():
        if cls is None:
            return AutoTokenizer.from_pretrained(str(folder), **kwargs)
        return cls.from_pretrained(str(folder), **kwargs)


def load_eventgpt(
    path: str | os.PathLike,
    quant: str = "none",
    device: str = "auto",
    dtype: str = "auto",
    num_event_frames: int = 1,
    vision_tower: str | None = None,
    accept_keys: Iterable[str] = (),
) -> EventGPTRunner:
    """Load an EventGPT checkpoint folder (release layout) as an `EventGPTRunner`.

    The LLaMA part goes through `LlamaForCausalLM.from_pretrained` (quantised with bitsandbytes
    when `quant` is 4bit/8bit); tower, projector and adaptor are built here in `dtype` (`auto`: bf16
    on CUDA, as the release; they are never quantised). `num_event_frames`: event PNGs per clip
    (`{prefix}_0.png` .. `_{n-1}.png`); the paper's extraction uses the first only. `vision_tower`
    overrides the config's `mm_visual_tower` (a CLIP folder or hub id; only its config and
    preprocessor config are read when the checkpoint holds the tower tensors, as the release's does).
    Every tensor of the checkpoint must be used and every weight of the model must be in it;
    `accept_keys` names exceptions known to be harmless (see `accepted_key`).
    """
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    if num_event_frames < 1:
        raise UserError(f"num_event_frames must be >= 1, got {num_event_frames}")
    accept_keys = tuple(accept_keys)
    fix = "point it at an EventGPT checkpoint folder (config.json with model_type EventChat_llama)"
    ckpt, cfg = _check_model_dir(path, EVENTGPT_MODEL_TYPE, "EventGPT", fix)
    dev, dt, quant_cfg = _resolve(device, dtype, quant, "eventgpt")

    llama_cfg = LlamaConfig.from_dict({k: v for k, v in cfg.items() if k != "model_type"})
    load_kwargs: dict[str, Any] = {"config": llama_cfg, "dtype": dt}
    if quant_cfg is not None:
        load_kwargs["quantization_config"] = quant_cfg
    if dev.type == "cuda":
        load_kwargs["device_map"] = {"": dev}
    prefixes = (EVENTGPT_TOWER_PREFIX, EVENTGPT_PROJECTOR_PREFIX, EVENTGPT_ADAPTOR_PREFIX)
    with _quiet_transformers():  # the vision tensors in the same files are "unexpected" to LLaMA
        llm, info = LlamaForCausalLM.from_pretrained(str(ckpt), output_loading_info=True, **load_kwargs)
    # from_pretrained would leave missing tensors randomly initialised and drop unknown ones silently;
    # only the three vision prefixes, which are loaded below, are expected to be foreign to LLaMA.
    check_weight_keys("EventGPT", ckpt, info.get("missing_keys", []),
                      [k for k in info.get("unexpected_keys", []) if not k.startswith(prefixes)], accept_keys)
    llm = llm.to(dev) if dev.type != "cuda" else llm

    tower_name = vision_tower or cfg.get("mm_visual_tower")
    if not tower_name:
        raise UserError(f"{ckpt / 'config.json'} has no mm_visual_tower; is this an EventGPT checkpoint?")
    tower_path = _tower_dir(ckpt, str(tower_name))
    vision_cfg = _clip_vision_config(tower_path)
    image_processor = _clip_image_processor(tower_path)
    crop_hw = _output_size(image_processor)
    if crop_hw != (vision_cfg.image_size, vision_cfg.image_size):
        raise UserError(
            f"vision tower {tower_path}: preprocessor crops to {crop_hw} but the tower expects "
            f"{vision_cfg.image_size} px (fix its preprocessor_config.json)"
        )

    state = checkpoint_tensors(ckpt, prefixes)
    tower_state = _strip(state, EVENTGPT_TOWER_PREFIX)
    if tower_state:
        tower = CLIPVisionModel(vision_cfg)
        fitted = _fit_tower_state(tower, tower_state)
        missing, unexpected = tower.load_state_dict(fitted, strict=False)
        check_weight_keys("EventGPT", ckpt, [EVENTGPT_TOWER_PREFIX + k for k in missing],
                          [EVENTGPT_TOWER_PREFIX + k for k in unexpected], accept_keys)
    else:  # a checkpoint without tower tensors uses the tower's own pre-trained weights
        log.info("EventGPT: no %s* tensors in %s; loading the tower from %s", EVENTGPT_TOWER_PREFIX, ckpt,
                 tower_path)
        tower = CLIPVisionModel.from_pretrained(tower_path, config=vision_cfg)

    proj_state = _strip(state, EVENTGPT_PROJECTOR_PREFIX)
    if not {"0.weight", "0.bias", "2.weight", "2.bias"} <= set(proj_state):
        raise UserError(f"{ckpt} lacks the projector tensors {EVENTGPT_PROJECTOR_PREFIX}{{0,2}}.{{weight,bias}}")
    text_dim = int(llama_cfg.hidden_size)
    mm_dim = int(proj_state["0.weight"].shape[1])
    if mm_dim != vision_cfg.hidden_size or cfg.get("mm_hidden_size", mm_dim) != mm_dim:
        raise UserError(f"{ckpt}: projector input {mm_dim}, mm_hidden_size {cfg.get('mm_hidden_size')} and "
                        f"tower width {vision_cfg.hidden_size} disagree")
    projector = nn.Sequential(nn.Linear(mm_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
    _load_exactly(projector, proj_state, EVENTGPT_PROJECTOR_PREFIX, ckpt, accept_keys)

    adaptor_state = _strip(state, EVENTGPT_ADAPTOR_PREFIX)
    adaptor = None
    if adaptor_state:
        adaptor = nn.Linear(text_dim, text_dim)
        _load_exactly(adaptor, adaptor_state, EVENTGPT_ADAPTOR_PREFIX, ckpt, accept_keys)
    elif cfg.get("event_feature_adaptor"):
        raise UserError(f"{ckpt / 'config.json'} sets event_feature_adaptor but no {EVENTGPT_ADAPTOR_PREFIX}* "
                        "tensors are in the checkpoint")

    for module in (tower, projector, adaptor):
        if module is not None:
            module.to(dev, dt).eval().requires_grad_(False)
    llm.eval().requires_grad_(False)
    runner = EventGPTRunner(
        llm=llm,
        tower=tower,
        projector=projector,
        adaptor=adaptor,
        image_processor=image_processor,
        num_event_frames=num_event_frames,
        tokenizer=load_tokenizer(ckpt),
        device=dev,
        dtype=dt,
        model_path=str(ckpt),
        config_hash=config_hash(ckpt / "config.json"),
        quant=quant,
        # The research fork also quantised the vision side; here it stays in `dt` (recorded, since
        # its features, and so every hidden state, differ between the two).
        quant_scope="none" if quant == "none" else "language_model" if quant in BNB_QUANTS else "decoder_layers",
    )
    if quant in AO_QUANTS:
        torchao_quantize(runner.decoder, quant, dev)
    log.info("EventGPT loaded from %s (quant %s, %s, %d event frame(s), tower %s px)", ckpt, quant, dt,
             num_event_frames, vision_cfg.image_size)
    return runner


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


def load_video_llava(
    path: str | os.PathLike,
    quant: str = "none",
    device: str = "auto",
    dtype: str = "auto",
    num_frames: int = 8,
    frame_pick: str = DEFAULT_FRAME_PICK,
    accept_keys: Iterable[str] = (),
) -> VideoLlavaRunner:
    """Load Video-LLaVA (a local folder, or a hub id such as LanguageBind/Video-LLaVA-7B-hf).

    `dtype` `auto` is fp16 on CUDA (the model card's and LanguageBind's precision), fp32 on CPU.
    `num_frames` frames are picked from each video by `frame_pick` (see `frame_indices`). Missing or
    unexpected checkpoint tensors are an error unless `accept_keys` names them (see `accepted_key`).
    """
    from transformers import VideoLlavaForConditionalGeneration, VideoLlavaProcessor

    if num_frames < 1:
        raise UserError(f"num_frames must be >= 1, got {num_frames}")
    if frame_pick not in FRAME_PICKS:
        raise UserError(f"unknown frame_pick {frame_pick!r}; choose one of {', '.join(FRAME_PICKS)}")
    fix = "point it at a Video-LLaVA folder (config.json with model_type video_llava) or a hub id"
    source = str(path)
    local = Path(source)
    looks_like_hub_id = (not local.exists() and source.count("/") == 1
                         and not source.startswith((".", "/", "~")))
    if looks_like_hub_id:
        from transformers.utils import cached_file

        try:
            cfg_file = Path(cached_file(source, "config.json"))
        except OSError as err:  # offline, gated, or a mistyped local folder that looks like "org/name"
            raise UserError(f"{source!r} is neither a local folder nor reachable on the model hub "
                            f"({first_line(err, 160)}); {fix}") from err
    else:
        local, _ = _check_model_dir(local, VIDEO_LLAVA_MODEL_TYPE, "Video-LLaVA", fix)
        cfg_file = local / "config.json"
    dev, dt, quant_cfg = _resolve(device, dtype, quant, "video_llava")
    load_kwargs: dict[str, Any] = {"dtype": dt}
    if quant_cfg is not None:
        load_kwargs["quantization_config"] = quant_cfg
    if dev.type == "cuda":
        load_kwargs["device_map"] = {"": dev}
    model, info = VideoLlavaForConditionalGeneration.from_pretrained(source, output_loading_info=True,
                                                                     **load_kwargs)
    # Missing tensors would run at their random initialisation, unexpected ones would be dropped.
    check_weight_keys("Video-LLaVA", source, info.get("missing_keys", []), info.get("unexpected_keys", []),
                      accept_keys)
    if dev.type != "cuda":
        model = model.to(dev)
    model.eval().requires_grad_(False)
    with _quiet_transformers():  # "no torchvision image processor for Video-LLaVA, using PIL" notes
        processor = VideoLlavaProcessor.from_pretrained(source)
    runner = VideoLlavaRunner(
        model=model,
        processor=processor,
        num_frames=num_frames,
        frame_pick=frame_pick,
        tokenizer=processor.tokenizer,
        device=dev,
        dtype=dt,
        model_path=source,
        config_hash=config_hash(cfg_file),
        quant=quant,
        # transformers' bitsandbytes integration: every Linear of towers, projector and language model
        # except the LM head.
        quant_scope="none" if quant == "none" else "whole_model" if quant in BNB_QUANTS else "decoder_layers",
    )
    if quant in AO_QUANTS:
        torchao_quantize(runner.decoder, quant, dev)
    log.info("Video-LLaVA loaded from %s (quant %s, %s, %d frames, %s indices)", source, quant, dt, num_frames,
             frame_pick)
    return runner


def load_runner(name: str, path: str | os.PathLike, **kwargs: Any) -> VLMRunner:
    """`load_eventgpt` or `load_video_llava` by name; unknown names fail listing the valid ones."""
    if name == "eventgpt":
        return load_eventgpt(path, **kwargs)
    if name == "video_llava":
        return load_video_llava(path, **kwargs)
    raise UserError(f"unknown model {name!r}; choose one of {', '.join(RUNNER_NAMES)}")


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


runner_manifest = model_description  # the earlier name, kept for callers


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


__all__ = [
    "EventGPTRunner",
    "GenerationOutput",
    "StepOutput",
    "VLMInputs",
    "VLMRunner",
    "VideoLlavaRunner",
    "accepted_key",
    "bnb_config",
    "check_weight_keys",
    "checkpoint_tensors",
    "config_hash",
    "eventgpt_prompt",
    "load_eventgpt",
    "load_runner",
    "load_tokenizer",
    "load_video_llava",
    "model_description",
    "runner_manifest",
    "spatio_temporal_pool",
    "to_drafter_vocab",
    "video_llava_prompt",
]
