"""Writers of tiny, randomly initialised checkpoints in the two real on-disk formats: the toy world's models.

The toy world needs an "EventGPT" and a "Video-LLaVA" that load through exactly the code paths the
7B checkpoints use (`model_builders.load_eventgpt` / `load_video_llava`), only small enough to run
on a laptop CPU. This module writes them; it does not train them (make_toy_world.py does that). The
architectures (LLaMA and CLIP configs, Video-LLaVA's tokenizer, config and processor) and the small BPE
tokenizer come from model_builders.py, which builds its random-weight runners from the same pieces.

- `make_base_llm(tokenizer, ToyDims(...))`: one `LlamaForCausalLM` both toy VLMs can start from.
- `write_eventgpt_checkpoint(...)`: EventGPT's release layout (config.json with model_type
  `EventChat_llama`, one safetensors file with the release key names, the tokenizer, and the CLIP
  vision tower as a sub-folder with its own config.json + preprocessor_config.json).
- `write_video_llava_checkpoint(...)`: a `VideoLlavaForConditionalGeneration` + `VideoLlavaProcessor`
  saved with transformers' own `save_pretrained`; the tokenizer gains `<image>`, `<video>`, `<pad>`
  right after the base vocabulary and the LM vocabulary is padded to a multiple of 64, as in
  LanguageBind/Video-LLaVA-7B-hf (32000 base tokens, ids 32000-32002, vocab_size 32064).

Example (tiny, CPU, a few seconds):
    python -c "import model_builders as mb, toy_models as t; tok = mb.build_toy_tokenizer(['a red car drives']); \
t.write_eventgpt_checkpoint('/tmp/egpt', None, tok); t.write_video_llava_checkpoint('/tmp/vl', None, tok)"
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    VideoLlavaForConditionalGeneration,
)

from common import atomic_write_json
from model_builders import (
    EVENTGPT_ADAPTOR_PREFIX,
    EVENTGPT_MODEL_TYPE,
    EVENTGPT_PROJECTOR_PREFIX,
    EVENTGPT_TOWER_PREFIX,
    llama_config,
    video_llava_config,
    video_llava_processor,
    video_llava_tokenizer,
    vision_config,
)

# Toy vision defaults: 32 px images cut into 8 px patches -> 16 patches + CLS = 17 tokens per frame.
DEFAULT_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "layers": 2, "heads": 2}
VL_VOCAB_MULTIPLE = 64  # Video-LLaVA-7B-hf pads 32003 tokens to a 32064-row embedding
TOWER_SUBDIR = "clip_vision_tower"
MAX_POSITIONS = 1024


@dataclass(frozen=True)
class ToyDims:
    """The toy language model's widths, shared by the base LLaMA and both toy VLMs built on it."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128

    def llama(self, vocab_size: int) -> LlamaConfig:
        """The `LlamaConfig` of these widths over `vocab_size` tokens."""
        return llama_config(vocab_size, self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size,
                            MAX_POSITIONS)


def make_base_llm(tokenizer: PreTrainedTokenizerFast, dims: ToyDims = ToyDims(), seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised tiny `LlamaForCausalLM` over the tokenizer's base vocabulary."""
    config = dims.llama(len(tokenizer))
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def toy_vision_config(vision: dict[str, Any] | None) -> CLIPVisionConfig:
    """The toy CLIP tower: `DEFAULT_VISION` with `vision`'s entries instead."""
    return vision_config(**{**DEFAULT_VISION, **(vision or {})})


def _prepare(out_dir: str | os.PathLike, llm_state_dict: dict[str, torch.Tensor] | None,
             tokenizer: PreTrainedTokenizerFast, dims: ToyDims, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the created output folder, the language model's float32 state): `llm_state_dict` checked against the
    tokenizer and `dims`, or a fresh `make_base_llm` when it is None."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if llm_state_dict is None:
        llm_state_dict = make_base_llm(tokenizer, dims, seed=seed).state_dict()
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in llm_state_dict.items()}
    rows, width = state["model.embed_tokens.weight"].shape
    layers = len({k.split(".")[2] for k in state if k.startswith("model.layers.")})
    if (rows, width, layers) != (len(tokenizer), dims.hidden_size, dims.num_layers):
        raise ValueError(
            f"llm_state_dict has vocab {rows}, hidden size {width}, {layers} layers; the writer was given "
            f"vocab {len(tokenizer)} (tokenizer), hidden_size={dims.hidden_size}, num_layers={dims.num_layers}"
        )
    return out, state


def write_eventgpt_checkpoint(out_dir: str | os.PathLike, llm_state_dict: dict[str, torch.Tensor] | None,
                              tokenizer: PreTrainedTokenizerFast, dims: ToyDims = ToyDims(),
                              vision: dict[str, Any] | None = None, seed: int = 0,
                              event_feature_adaptor: bool = True) -> Path:
    """Write a tiny EventGPT checkpoint in the release layout and return its folder.

    Layout: config.json (model_type `EventChat_llama`, LLaMA fields, `mm_visual_tower` pointing at
    the `clip_vision_tower/` sub-folder, `mm_hidden_size`, `event_feature_adaptor`),
    model.safetensors with the release key names (`model.visual_tower.visual_tower.vision_model.*`,
    `model.visual_projector.{0,2}.*`, `model.feature_adaptor.*`, LLaMA `model.*` and `lm_head.*`),
    the tokenizer files, and the tower folder (config.json + preprocessor_config.json).
    `llm_state_dict` (from `make_base_llm(...).state_dict()`, at `dims`) fixes the language model;
    None makes one.
    """
    out, state = _prepare(out_dir, llm_state_dict, tokenizer, dims, seed)
    vcfg = toy_vision_config(vision)
    gen = torch.Generator().manual_seed(seed + 1)

    torch.manual_seed(seed + 1)
    tower = CLIPVisionModel(vcfg)
    for key, value in tower.state_dict().items():
        # transformers 5.x flattens CLIPVisionModel; the release (4.x) keys carry `vision_model.`
        key = key if key.startswith("vision_model.") else f"vision_model.{key}"
        state[f"{EVENTGPT_TOWER_PREFIX}{key}"] = value.detach().float().contiguous()

    def linear(name: str, d_in: int, d_out: int) -> None:
        bound = 1.0 / d_in**0.5
        state[f"{name}.weight"] = (torch.rand(d_out, d_in, generator=gen) * 2 - 1) * bound
        state[f"{name}.bias"] = (torch.rand(d_out, generator=gen) * 2 - 1) * bound

    width = dims.hidden_size
    linear(f"{EVENTGPT_PROJECTOR_PREFIX}0", vcfg.hidden_size, width)
    linear(f"{EVENTGPT_PROJECTOR_PREFIX}2", width, width)
    if event_feature_adaptor:
        linear(EVENTGPT_ADAPTOR_PREFIX.rstrip("."), width, width)

    tower_dir = out / TOWER_SUBDIR
    tower_dir.mkdir(parents=True, exist_ok=True)
    vcfg.save_pretrained(tower_dir)
    CLIPImageProcessor(
        size={"shortest_edge": vcfg.image_size},
        crop_size={"height": vcfg.image_size, "width": vcfg.image_size},
    ).save_pretrained(tower_dir)

    config = dims.llama(len(tokenizer)).to_dict()
    for key in ("transformers_version", "architectures", "model_type", "dtype", "torch_dtype"):
        config.pop(key, None)
    config.update(
        architectures=["EventChatModel"],
        model_type=EVENTGPT_MODEL_TYPE,
        torch_dtype="float32",
        mm_visual_tower=TOWER_SUBDIR,  # the release names a hub id; the toy a folder beside config.json
        mm_hidden_size=vcfg.hidden_size,
        event_feature_adaptor=event_feature_adaptor,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
    atomic_write_json(dict(sorted(config.items())), out / "config.json")

    tensors = {k: state[k].contiguous() for k in sorted(state)}
    tmp = out / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    tokenizer.save_pretrained(out)
    return out


def write_video_llava_checkpoint(out_dir: str | os.PathLike, llm_state_dict: dict[str, torch.Tensor] | None,
                                 tokenizer: PreTrainedTokenizerFast, dims: ToyDims = ToyDims(),
                                 vision: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Write a tiny Video-LLaVA checkpoint (model + processor) with transformers' `save_pretrained`.

    The tokenizer gets `<image>`, `<video>`, `<pad>` appended after the base vocabulary; the LM
    embedding and head are padded to a multiple of 64 rows. Rows of `llm_state_dict` (base vocabulary)
    are copied; the new rows are the mean of the copied ones.
    """
    out, state = _prepare(out_dir, llm_state_dict, tokenizer, dims, seed)
    vl_tok = video_llava_tokenizer(tokenizer)
    vocab = -(-len(vl_tok) // VL_VOCAB_MULTIPLE) * VL_VOCAB_MULTIPLE
    vcfg = toy_vision_config(vision)
    config = video_llava_config(vl_tok, vcfg, dims.llama(vocab))
    torch.manual_seed(seed + 2)
    model = VideoLlavaForConditionalGeneration(config).eval()

    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            # New rows = mean of the old ones (transformers' resize default): the padded ids then
            # score the mean logit and never win the argmax of an untrained toy.
            extra = value.mean(dim=0, keepdim=True).expand(vocab - value.shape[0], -1)
            value = torch.cat([value, extra])
        if key.startswith("model."):
            key = "model.language_model." + key[len("model."):]
        mapped[key] = value
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    lm_missing = [k for k in missing if k.startswith(("model.language_model.", "lm_head."))]
    if lm_missing or unexpected:
        raise ValueError(f"LLM state dict does not fit Video-LLaVA: missing {lm_missing}, unexpected {unexpected}")
    model.save_pretrained(out)

    processor = video_llava_processor(vl_tok, vcfg)
    processor.save_pretrained(out)
    return out
