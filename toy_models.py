"""Writers of tiny, randomly initialised checkpoints in the two real on-disk formats.

The toy world needs an "EventGPT" and a "Video-LLaVA" that load through exactly the code paths the
7B checkpoints use (`model_loaders.load_eventgpt` / `load_video_llava`), only small enough to run
on a laptop CPU. This module writes them; it does not train them (make_toy_world.py does that).

- `build_toy_tokenizer(texts)`: a small Llama-style BPE tokenizer (`<unk>`=0, `<s>`=1, `</s>`=2,
  Metaspace pre-tokeniser, BOS added), trained deterministically on the given texts.
- `make_base_llm(tokenizer, ...)`: one `LlamaForCausalLM` both toy VLMs can start from.
- `write_eventgpt_checkpoint(...)`: EventGPT's release layout (config.json with model_type
  `EventChat_llama`, one safetensors file with the release key names, the tokenizer, and the CLIP
  vision tower as a sub-folder with its own config.json + preprocessor_config.json).
- `write_video_llava_checkpoint(...)`: a `VideoLlavaForConditionalGeneration` + `VideoLlavaProcessor`
  saved with transformers' own `save_pretrained`; the tokenizer gains `<image>`, `<video>`, `<pad>`
  right after the base vocabulary and the LM vocabulary is padded to a multiple of 64, as in
  LanguageBind/Video-LLaVA-7B-hf (32000 base tokens, ids 32000-32002, vocab_size 32064).

- `build_random_runners(SHAPES["7b"], ...)` / `load_runners(args, questions)`: both runners with random
  weights at a real shape, built in memory on the device (the benchmarks' `--random_shape`), or loaded
  from checkpoints.

Example (tiny, CPU, a few seconds):
    python -c "import toy_models as t; tok = t.build_toy_tokenizer(['a red car drives left']); \
t.write_eventgpt_checkpoint('/tmp/egpt', None, tok); t.write_video_llava_checkpoint('/tmp/vl', None, tok)"
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaProcessor,
)
from transformers.models.video_llava import VideoLlavaImageProcessor, VideoLlavaVideoProcessor

from clip_data import DEFAULT_FRAME_PICK
from common import atomic_write_json, resolve_device, resolve_dtype, set_seed
from model_loaders import (
    AO_QUANTS,
    EVENTGPT_EV_END,
    EVENTGPT_EV_START,
    EVENTGPT_MODEL_TYPE,
    EVENTGPT_SYSTEM,
    EVENTGPT_TOWER_PREFIX,
    VIDEO_LLAVA_PROMPT,
    torchao_quantize,
)

# Toy vision defaults: 32 px images cut into 8 px patches -> 16 patches + CLS = 17 tokens per frame.
DEFAULT_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "layers": 2, "heads": 2}
VL_VOCAB_MULTIPLE = 64  # Video-LLaVA-7B-hf pads 32003 tokens to a 32064-row embedding
VL_EXTRA_TOKENS = ("<image>", "<video>", "<pad>")  # ids base, base+1, base+2 as in the real tokenizer
TOWER_SUBDIR = "clip_vision_tower"

# Strings every prompt template puts around the question; the tokenizer must cover them.
_SCAFFOLD_TEXTS = (
    EVENTGPT_SYSTEM,
    f"USER: {EVENTGPT_EV_START}<event>{EVENTGPT_EV_END}\n ASSISTANT:",
    VIDEO_LLAVA_PROMPT.format(question="?"),
)


def build_toy_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small Llama-style BPE tokenizer on `texts` (plus the prompt scaffolding).

    Special ids follow Llama: `<unk>`=0, `<s>`=1, `</s>`=2; `<s>` is prepended to every encoding.
    Every printable ASCII character and newline is in the base alphabet, so no prompt text maps to
    `<unk>`. Deterministic: the same texts give the same vocabulary and merges.
    """
    corpus = sorted(set(texts) | set(_SCAFFOLD_TEXTS))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Llama's Metaspace: spaces become "▁", a "▁" is prepended to the first word only.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c") | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",  # LLaVA-family convention: pad with <unk> (EventGPT never pads in the release)
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    if [fast.unk_token_id, fast.bos_token_id, fast.eos_token_id] != [0, 1, 2]:
        raise RuntimeError("toy tokenizer special ids are not <unk>=0, <s>=1, </s>=2")
    return fast


def make_base_llm(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised tiny `LlamaForCausalLM` over the tokenizer's base vocabulary."""
    config = llama_config(len(tokenizer), hidden_size, num_layers, num_heads, intermediate_size,
                           max_position_embeddings)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def llama_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                  intermediate_size: int, max_position_embeddings: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,  # Vicuna-7B keeps a separate lm_head
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def vision_config(vision: dict[str, Any] | None) -> CLIPVisionConfig:
    v = {**DEFAULT_VISION, **(vision or {})}
    return CLIPVisionConfig(
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        hidden_size=v["hidden_size"],
        intermediate_size=v.get("intermediate_size", 2 * v["hidden_size"]),
        num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"],
        projection_dim=v["hidden_size"],
        hidden_act="quick_gelu",  # as openai/clip-vit-large-patch14(-336)
    )


def _llm_state(
    llm_state_dict: dict[str, torch.Tensor] | None,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    if llm_state_dict is None:
        llm = make_base_llm(tokenizer, hidden_size, num_layers, num_heads, intermediate_size, seed=seed)
        llm_state_dict = llm.state_dict()
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in llm_state_dict.items()}
    rows, width = state["model.embed_tokens.weight"].shape
    layers = len({k.split(".")[2] for k in state if k.startswith("model.layers.")})
    if (rows, width, layers) != (len(tokenizer), hidden_size, num_layers):
        raise ValueError(
            f"llm_state_dict has vocab {rows}, hidden size {width}, {layers} layers; the writer was given "
            f"vocab {len(tokenizer)} (tokenizer), hidden_size={hidden_size}, num_layers={num_layers}"
        )
    return state


def write_eventgpt_checkpoint(
    out_dir: str | os.PathLike,
    llm_state_dict: dict[str, torch.Tensor] | None,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    vision: dict[str, Any] | None = None,
    seed: int = 0,
    event_feature_adaptor: bool = True,
) -> Path:
    """Write a tiny EventGPT checkpoint in the release layout and return its folder.

    Layout: config.json (model_type `EventChat_llama`, LLaMA fields, `mm_visual_tower` pointing at
    the `clip_vision_tower/` sub-folder, `mm_hidden_size`, `event_feature_adaptor`),
    model.safetensors with the release key names (`model.visual_tower.visual_tower.vision_model.*`,
    `model.visual_projector.{0,2}.*`, `model.feature_adaptor.*`, LLaMA `model.*` and `lm_head.*`),
    the tokenizer files, and the tower folder (config.json + preprocessor_config.json).
    `llm_state_dict` (from `make_base_llm(...).state_dict()`) fixes the language model; None makes one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _llm_state(llm_state_dict, tokenizer, hidden_size, num_layers, num_heads, intermediate_size, seed)
    vcfg = vision_config(vision)
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

    linear("model.visual_projector.0", vcfg.hidden_size, hidden_size)
    linear("model.visual_projector.2", hidden_size, hidden_size)
    if event_feature_adaptor:
        linear("model.feature_adaptor", hidden_size, hidden_size)

    tower_dir = out / TOWER_SUBDIR
    tower_dir.mkdir(parents=True, exist_ok=True)
    vcfg.save_pretrained(tower_dir)
    CLIPImageProcessor(
        size={"shortest_edge": vcfg.image_size},
        crop_size={"height": vcfg.image_size, "width": vcfg.image_size},
    ).save_pretrained(tower_dir)

    llama = llama_config(len(tokenizer), hidden_size, num_layers, num_heads, intermediate_size, 1024)
    config = llama.to_dict()
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


def write_video_llava_checkpoint(
    out_dir: str | os.PathLike,
    llm_state_dict: dict[str, torch.Tensor] | None,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    vision: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny Video-LLaVA checkpoint (model + processor) with transformers' `save_pretrained`.

    The tokenizer gets `<image>`, `<video>`, `<pad>` appended after the base vocabulary; the LM
    embedding and head are padded to a multiple of 64 rows. Rows of `llm_state_dict` (base vocabulary)
    are copied; the new rows are the mean of the copied ones.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _llm_state(llm_state_dict, tokenizer, hidden_size, num_layers, num_heads, intermediate_size, seed)
    vl_tok = video_llava_tokenizer(tokenizer)
    vocab = -(-len(vl_tok) // VL_VOCAB_MULTIPLE) * VL_VOCAB_MULTIPLE
    vcfg = vision_config(vision)
    text_cfg = llama_config(vocab, hidden_size, num_layers, num_heads, intermediate_size, 1024)
    config = video_llava_config(vl_tok, vcfg, text_cfg)
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


def video_llava_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A copy of the base tokenizer with `<image>`, `<video>`, `<pad>` right after its vocabulary."""
    vl_tok = copy.deepcopy(tokenizer)
    base = len(vl_tok)
    vl_tok.add_special_tokens({"additional_special_tokens": list(VL_EXTRA_TOKENS)})
    vl_tok.pad_token = "<pad>"
    vl_tok.padding_side = "left"
    ids = vl_tok.convert_tokens_to_ids(list(VL_EXTRA_TOKENS))
    if ids != [base, base + 1, base + 2]:
        raise RuntimeError(f"Video-LLaVA special tokens got ids {ids}, expected {[base, base + 1, base + 2]}")
    return vl_tok


def video_llava_config(vl_tok: PreTrainedTokenizerFast, vcfg: CLIPVisionConfig, text_cfg: LlamaConfig,
                       num_frames: int = 8) -> VideoLlavaConfig:
    """Video-LLaVA config around a CLIP vision config and a Llama text config (pad = `<pad>`)."""
    image_id, video_id, pad_id = vl_tok.convert_tokens_to_ids(list(VL_EXTRA_TOKENS))
    text_cfg.pad_token_id = pad_id
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    return VideoLlavaConfig(
        vision_config=vcfg.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_index=image_id,
        video_token_index=video_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=patches,
        video_seq_length=num_frames * (patches + 1),
        tie_word_embeddings=False,
    )


def video_llava_processor(vl_tok: PreTrainedTokenizerFast, vcfg: CLIPVisionConfig) -> VideoLlavaProcessor:
    """Processor whose image and video processors resize and crop to the tower's image size."""
    size = {"shortest_edge": vcfg.image_size}
    crop = {"height": vcfg.image_size, "width": vcfg.image_size}
    return VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(size=size, crop_size=crop),
        video_processor=VideoLlavaVideoProcessor(size=size, crop_size=crop),
        tokenizer=vl_tok,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


# ----------------------------------------------------------------------------------------------
# Random-weight runners at real shapes (the GPU benchmarks' --random_shape), built in memory
# ----------------------------------------------------------------------------------------------

# Random-weight shapes. 7b: Vicuna-7B for both language models (EventGPT keeps Vicuna's 32000 rows,
# Video-LLaVA-7B-hf pads to 32064), CLIP ViT-L/14 towers: 336 px for EventGPT, 224 px for
# Video-LLaVA's LanguageBind image and video towers. tiny: the same code path at toy size.
SHAPES: dict[str, dict[str, int]] = {
    "7b": {
        "hidden": 4096, "layers": 32, "heads": 32, "intermediate": 11008, "egpt_vocab": 32000, "vl_vocab": 32064,
        "vision_hidden": 1024, "vision_layers": 24, "vision_heads": 16, "vision_intermediate": 4096,
        "patch": 14, "egpt_image_size": 336, "vl_image_size": 224, "max_positions": 4096,
    },
    "tiny": {
        "hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "egpt_vocab": 32000, "vl_vocab": 32064,
        "vision_hidden": 32, "vision_layers": 2, "vision_heads": 2, "vision_intermediate": 64,
        "patch": 8, "egpt_image_size": 32, "vl_image_size": 32, "max_positions": 4096,
    },
}
OVERRIDES = ("hidden", "layers", "heads", "intermediate", "vision_hidden", "vision_layers")



def resolve_shape(name: str, overrides: dict[str, int]) -> dict[str, int]:
    """The preset with overrides; heads and MLP width follow a new width at the preset's ratios."""
    shape = dict(SHAPES[name])
    for key, value in overrides.items():
        if value < 1:
            raise ValueError(f"--{key} must be >= 1")
    if "hidden" in overrides:
        head_dim = shape["hidden"] // shape["heads"]
        shape["heads"] = max(1, overrides["hidden"] // head_dim)
        shape["intermediate"] = round(overrides["hidden"] * shape["intermediate"] / shape["hidden"])
    if "vision_hidden" in overrides:
        head_dim = shape["vision_hidden"] // shape["vision_heads"]
        shape["vision_heads"] = max(1, overrides["vision_hidden"] // head_dim)
        shape["vision_intermediate"] = 4 * overrides["vision_hidden"]
    shape.update(overrides)
    if shape["hidden"] % shape["heads"] or shape["vision_hidden"] % shape["vision_heads"]:
        raise ValueError(f"hidden sizes must be multiples of the head counts: {shape}")
    return shape



def build_random_runners(shape: dict[str, int], questions: list[str], device: torch.device,
                         dtype: torch.dtype, seed: int, vl_dtype: torch.dtype | None = None,
                         frame_pick: str = DEFAULT_FRAME_PICK, quant: str = "none") -> tuple[Any, Any]:
    """EventGPT and Video-LLaVA runners with random weights at `shape`, built on `device` (no files).

    EventGPT is built in `dtype`, Video-LLaVA in `vl_dtype` (default: `dtype` too); `quant` int8_ao or
    int4_ao quantises both decoders' layers with torchao after building.

    The tokenizer is the toy BPE trained on the questions (prompt text is a small part of the
    sequence; the visual tokens dominate: 578 for EventGPT and 2056 for Video-LLaVA at 7b shape).
    Both runners get eos_token_id -1: random weights would stop at an EOS only by chance, and
    timing every position is the worst case, which is what we want to know.
    """
    from torch import nn
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionModel,
        LlamaForCausalLM,
        VideoLlavaForConditionalGeneration,
    )

    from model_loaders import EventGPTRunner, VideoLlavaRunner

    set_seed(seed)
    s = shape
    tag = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]
    tokenizer = build_toy_tokenizer(questions)

    def llama(vocab: int) -> Any:
        return llama_config(vocab, s["hidden"], s["layers"], s["heads"], s["intermediate"], s["max_positions"])

    def clip(image_size: int) -> Any:
        return vision_config({"image_size": image_size, "patch_size": s["patch"], "hidden_size": s["vision_hidden"],
                              "intermediate_size": s["vision_intermediate"], "layers": s["vision_layers"],
                              "heads": s["vision_heads"]})

    # Parameters are created on the device in the target dtype: a 7B model never sits in host memory.
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(llama(s["egpt_vocab"]), dtype=dtype)
        tower = CLIPVisionModel._from_config(clip(s["egpt_image_size"]), dtype=dtype)
        projector = nn.Sequential(nn.Linear(s["vision_hidden"], s["hidden"]), nn.GELU(),
                                  nn.Linear(s["hidden"], s["hidden"]))
        adaptor = nn.Linear(s["hidden"], s["hidden"])
    for module in (llm, tower, projector, adaptor):
        module.to(device, dtype).eval().requires_grad_(False)
    size = s["egpt_image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    egpt = EventGPTRunner(llm=llm, tower=tower, projector=projector, adaptor=adaptor,
                          image_processor=image_processor, num_event_frames=1,
                          tokenizer=tokenizer, device=device, dtype=dtype, model_path="random:eventgpt",
                          config_hash=tag)

    vl_tok = video_llava_tokenizer(tokenizer)
    vcfg = clip(s["vl_image_size"])
    config = video_llava_config(vl_tok, vcfg, llama(s["vl_vocab"]))
    vl_dtype = vl_dtype or dtype
    with torch.device(device):
        model = VideoLlavaForConditionalGeneration._from_config(config, dtype=vl_dtype)
    model.to(device, vl_dtype).eval().requires_grad_(False)
    vl = VideoLlavaRunner(model=model, processor=video_llava_processor(vl_tok, vcfg), num_frames=8,
                          frame_pick=frame_pick, tokenizer=vl_tok, device=device, dtype=vl_dtype,
                          model_path="random:video_llava", config_hash=tag)
    for runner in (egpt, vl):
        runner.eos_token_id = -1
        if quant in AO_QUANTS:  # torchao weight-only (bitsandbytes quantises only at checkpoint load)
            torchao_quantize(runner.decoder, quant, device)
            runner.quant, runner.quant_scope = quant, "decoder_layers"
    return egpt, vl


def load_runners(args: argparse.Namespace, questions: list[str]) -> tuple[Any, Any]:
    """(EventGPT runner, Video-LLaVA runner): loaded checkpoints, or random weights built in memory.

    Reads args.egpt_model, vl_model, quant, device, dtype, random_shape, shape, seed and, where the
    caller has them, egpt_dtype and vl_dtype (default: dtype), frame_pick (default floor) and
    accept_weight_keys (default none), so scripts without those flags get the defaults.
    """
    from model_loaders import load_eventgpt, load_video_llava

    egpt_dtype = getattr(args, "egpt_dtype", None) or args.dtype
    vl_dtype = getattr(args, "vl_dtype", None) or args.dtype
    frame_pick = getattr(args, "frame_pick", None) or DEFAULT_FRAME_PICK
    accept_keys = getattr(args, "accept_weight_keys", None) or ()
    if args.random_shape is None:
        egpt = load_eventgpt(args.egpt_model, quant=args.quant, device=args.device, dtype=egpt_dtype,
                             accept_keys=accept_keys, vision_tower=getattr(args, "vision_tower", None))
        vl = load_video_llava(args.vl_model, quant=args.quant, device=args.device, dtype=vl_dtype,
                              frame_pick=frame_pick, accept_keys=accept_keys)
        return egpt, vl
    device = resolve_device(args.device)
    return build_random_runners(args.shape, questions, device, resolve_dtype(egpt_dtype, device, model="eventgpt"),
                                args.seed, vl_dtype=resolve_dtype(vl_dtype, device, model="video_llava"),
                                frame_pick=frame_pick, quant=getattr(args, "quant", "none"))
