"""Every way to get the two runners of vlm_runners.py: release checkpoints, random weights at a named shape,
quantisation, the tokenizer, and the model flags the model-loading stages share.

- Checkpoints: `load_eventgpt` (release layout: LLaMA through `LlamaForCausalLM.from_pretrained`, so
  bitsandbytes 4-bit/8-bit works unchanged, and the CLIP tower, projector and feature adaptor built around it
  from the checkpoint's tensors), `load_video_llava` (transformers' own model and processor), `load_runner`
  by name. Every tensor must fit (`check_weight_keys`); `checkpoint_tensors` is the one checkpoint-file reader.
- Quantisation: bitsandbytes at load (`bnb_config`), torchao weight-only after it (`torchao_quantize`).
- Random weights (`--random_shape`): `SHAPES` ("7b": Vicuna-7B + CLIP ViT-L/14; "tiny"), `resolve_shape`,
  `build_random_runners`, built in memory on the device from the same architecture builders
  (`llama_config`, `vision_config`, `video_llava_config`, ...) that toy_models.py writes its checkpoints with.
- One `load_runners(args, questions)` for both ways; `add_model_args` / `check_model_args` are the model-flag
  block of extract_hidden_states.py, benchmark_extraction.py and benchmark_e2e_wallclock.py.

See docs/MODELS.md for the release semantics this follows. Example (the toy world's checkpoints, CPU):
    python -c "import model_builders as mb; r = mb.load_eventgpt('data/toy/models/eventgpt', device='cpu'); \
print(r.name, r.hidden_size, r.vocab_size, r.config_hash)"
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import hashlib
import importlib.util
import json
import logging
import os
import string
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from clip_data import DEFAULT_FRAME_PICK, FRAME_PICKS
from common import DTYPE_CHOICES, UserError, first_line, read_json, resolve_device, resolve_dtype, set_seed
from preflight import EVENTGPT_MODEL_TYPE, VIDEO_LLAVA_MODEL_TYPE
from vlm_runners import (
    AO_QUANTS,
    BNB_QUANTS,
    EVENTGPT_EV_END,
    EVENTGPT_EV_START,
    EVENTGPT_EVENT_TOKEN,
    EVENTGPT_SYSTEM,
    QUANT_CHOICES,
    VIDEO_LLAVA_PROMPT,
    EventGPTRunner,
    VideoLlavaRunner,
    VLMRunner,
)

if TYPE_CHECKING:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
        VideoLlavaConfig,
        VideoLlavaProcessor,
    )

log = logging.getLogger("xmodal_sd.model_builders")

RUNNER_NAMES = (EventGPTRunner.name, VideoLlavaRunner.name)
# --- EventGPT's checkpoint layout (model/EventChatModel.py of the release; its model_type: preflight.py) ---
EVENTGPT_TOWER_PREFIX = "model.visual_tower.visual_tower."
EVENTGPT_PROJECTOR_PREFIX = "model.visual_projector."
EVENTGPT_ADAPTOR_PREFIX = "model.feature_adaptor."
EVENTGPT_PATCH_TOKEN = "<ev_patch>"  # added by inference.py with mm_use_im_patch_token, never in a prompt
# --- Video-LLaVA's (LanguageBind/Video-LLaVA-7B-hf, transformers' format) ---
VL_EXTRA_TOKENS = ("<image>", "<video>", "<pad>")  # ids base, base+1, base+2 after Vicuna's 32000


# ----------------------------------------------------------------------------------------------
# Quantisation, and the checks every checkpoint load runs
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
    check_quant(quant, device)
    dtype = next(decoder.parameters()).dtype
    if quant == "int4_ao" and dtype != torch.bfloat16:
        # The tinygemm int4 kernel (torch's own _weight_int4pack_mm) takes bfloat16 activations only.
        raise UserError(f"--quant int4_ao runs in bfloat16 (its int4 kernel), this model is {dtype}; "
                        "add --dtype bf16 (or --vl_dtype/--egpt_dtype bf16)")
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    # int4: the tile-packed layout of torch's tinygemm kernel; torchao's default (plain) needs the
    # separate mslk package.
    config = (Int8WeightOnlyConfig() if quant == "int8_ao"
              else Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    try:
        quantize_(decoder.layers, config)
    except (ImportError, RuntimeError, ValueError, AssertionError, NotImplementedError) as err:
        raise UserError(f"--quant {quant} failed in torchao ({type(err).__name__}: {first_line(err)}); "
                        "use --quant int8_ao or none") from err


def check_quant(quant: str, device: torch.device) -> None:
    """Refuse, before any weight is read, a `quant` this machine cannot run: an unknown name, bitsandbytes
    off CUDA or not installed, torchao not installed, int4_ao off CUDA (its int4 kernels)."""
    bnb_config(quant, device)
    if quant in AO_QUANTS and importlib.util.find_spec("torchao") is None:
        raise UserError(f"--quant {quant} needs the torchao package: pip install torchao")
    if quant == "int4_ao" and device.type != "cuda":
        raise UserError("--quant int4_ao needs a CUDA GPU (its int4 kernels); use int8_ao or none on CPU")


def _resolve(device: str | torch.device, dtype: str | torch.dtype, quant: str, name: str
             ) -> tuple[torch.device, torch.dtype, dict[str, Any]]:
    """(device, dtype, `from_pretrained` keywords) of model `name`; the quantisation is checked first, before
    the dtype is even looked at. Strings are resolved here (logged), a device/dtype object is taken as is."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    check_quant(quant, dev)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev, model=name)
    if quant == "4bit" and dt == torch.float32:
        log.info("%s: 4-bit layers compute in float32, as --dtype asked (slow; fp16/bf16 is usual)", name)
    load_kwargs: dict[str, Any] = {"dtype": dt}
    quant_cfg = bnb_config(quant, dev, compute_dtype=dt)
    if quant_cfg is not None:
        load_kwargs["quantization_config"] = quant_cfg
    if dev.type == "cuda":
        load_kwargs["device_map"] = {"": dev}
    return dev, dt, load_kwargs


def _apply_quant(runner: VLMRunner, quant: str, bnb_scope: str) -> None:
    """Record what `quant` covers on a built runner (`quant_scope`: "none", `bnb_scope` for bitsandbytes, which
    quantised at load, "decoder_layers" for torchao) and apply torchao's weight-only quantisation now."""
    runner.quant = quant
    runner.quant_scope = "none" if quant == "none" else bnb_scope if quant in BNB_QUANTS else "decoder_layers"
    if quant in AO_QUANTS:
        torchao_quantize(runner.decoder, quant, runner.device)


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


def checkpoint_tensors(ckpt_dir: str | os.PathLike, prefixes: tuple[str, ...] = (),
                       suffixes: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Load only the tensors whose names start with one of `prefixes` or end with one of `suffixes` from a
    HF checkpoint folder, without building a model: the one reader of checkpoint files.

    Handles a single `model.safetensors`/`pytorch_model.bin` and sharded ones with an
    `*.index.json`; only the shards that hold matching keys are opened.
    """
    ckpt = Path(ckpt_dir)

    def wanted(key: str) -> bool:
        return key.startswith(prefixes) or key.endswith(suffixes)

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = ckpt / index_name
        if index.is_file():
            weight_map = read_json(index, "checkpoint index", "re-download the checkpoint")["weight_map"]
            files = sorted({f for k, f in weight_map.items() if wanted(k)})
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (ckpt / n).is_file()][:1]
        files = files or sorted(p.name for p in ckpt.glob("*.safetensors"))  # shards without an index
        if not files:
            raise UserError(
                f"no weights in {ckpt}: expected model.safetensors, pytorch_model.bin or a sharded index "
                "(point the model flag at the downloaded model folder)"
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
                    if wanted(key):
                        out[key] = handle.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            out.update({k: v for k, v in state.items() if wanted(k)})
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


# ----------------------------------------------------------------------------------------------
# EventGPT (release layout)
# ----------------------------------------------------------------------------------------------


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


def _clip_image_processor_class() -> Any:
    """The release ran transformers 4.x's PIL-based CLIPImageProcessor; 5.x keeps it as *Pil."""
    try:
        from transformers import CLIPImageProcessorPil as ProcessorClass
    except ImportError:  # older transformers: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as ProcessorClass
    return ProcessorClass


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


def eventgpt_tokenizer(ckpt: Path, cfg: dict[str, Any]) -> Any:
    """EventGPT's tokenizer, set up as the release's inference.py does. With `mm_use_im_start_end` in
    config.json, `<ev_start>` and `<ev_end>` become single special tokens, added after `<ev_patch>` when
    `mm_use_im_patch_token` is set (the release's default), so their ids are the release's; without it they
    stay plain text, and nothing is added. A checkpoint whose embeddings lack rows for the added ids (the
    release would resize them into new, untrained rows) is refused in one line."""
    tokenizer = load_tokenizer(ckpt)
    if not cfg.get("mm_use_im_start_end", False):
        return tokenizer
    if cfg.get("mm_use_im_patch_token", True):
        tokenizer.add_tokens([EVENTGPT_PATCH_TOKEN], special_tokens=True)
    tokenizer.add_tokens([EVENTGPT_EV_START, EVENTGPT_EV_END], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids([EVENTGPT_EV_START, EVENTGPT_EV_END])
    rows = int(cfg.get("vocab_size") or 0)
    if max(ids) >= rows:
        raise UserError(f"{ckpt / 'config.json'} sets mm_use_im_start_end, which makes {EVENTGPT_EV_START}/"
                        f"{EVENTGPT_EV_END} tokens of their own (ids {ids[0]}, {ids[1]}), but the checkpoint has "
                        f"{rows} embedding rows (vocab_size): use a checkpoint trained with those tokens, or set "
                        "mm_use_im_start_end to false in its config.json")
    log.info("EventGPT: mm_use_im_start_end, so %s/%s are single tokens (ids %d, %d), as in the release",
             EVENTGPT_EV_START, EVENTGPT_EV_END, ids[0], ids[1])
    return tokenizer


def load_eventgpt(path: str | os.PathLike, quant: str = "none", device: str | torch.device = "auto",
                  dtype: str | torch.dtype = "auto", num_event_frames: int = 1, vision_tower: str | None = None,
                  accept_keys: Iterable[str] = ()) -> EventGPTRunner:
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
    tokenizer = eventgpt_tokenizer(ckpt, cfg)  # before the weights: a refusal costs no load
    dev, dt, load_kwargs = _resolve(device, dtype, quant, "eventgpt")

    llama_cfg = LlamaConfig.from_dict({k: v for k, v in cfg.items() if k != "model_type"})
    prefixes = (EVENTGPT_TOWER_PREFIX, EVENTGPT_PROJECTOR_PREFIX, EVENTGPT_ADAPTOR_PREFIX)
    with _quiet_transformers():  # the vision tensors in the same files are "unexpected" to LLaMA
        llm, info = LlamaForCausalLM.from_pretrained(str(ckpt), config=llama_cfg, output_loading_info=True,
                                                     **load_kwargs)
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
    image_processor = _clip_image_processor_class().from_pretrained(tower_path)
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
    runner = EventGPTRunner(llm=llm, tower=tower, projector=projector, adaptor=adaptor,
                            image_processor=image_processor, num_event_frames=num_event_frames,
                            tokenizer=tokenizer, device=dev, dtype=dt, model_path=str(ckpt),
                            config_hash=config_hash(ckpt / "config.json"))
    # The research fork also quantised the vision side; here it stays in `dt` (recorded, since its
    # features, and so every hidden state, differ between the two).
    _apply_quant(runner, quant, bnb_scope="language_model")
    log.info("EventGPT loaded from %s (quant %s, %s, %d event frame(s), tower %s px)", ckpt, quant, dt,
             num_event_frames, vision_cfg.image_size)
    return runner


# ----------------------------------------------------------------------------------------------
# Video-LLaVA (transformers layout)
# ----------------------------------------------------------------------------------------------


def load_video_llava(path: str | os.PathLike, quant: str = "none", device: str | torch.device = "auto",
                     dtype: str | torch.dtype = "auto", num_frames: int = 8, frame_pick: str = DEFAULT_FRAME_PICK,
                     accept_keys: Iterable[str] = ()) -> VideoLlavaRunner:
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
    dev, dt, load_kwargs = _resolve(device, dtype, quant, "video_llava")
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
    runner = VideoLlavaRunner(model=model, processor=processor, num_frames=num_frames, frame_pick=frame_pick,
                              tokenizer=processor.tokenizer, device=dev, dtype=dt, model_path=source,
                              config_hash=config_hash(cfg_file))
    # transformers' bitsandbytes integration: every Linear of towers, projector and language model
    # except the LM head.
    _apply_quant(runner, quant, bnb_scope="whole_model")
    log.info("Video-LLaVA loaded from %s (quant %s, %s, %d frames, %s indices)", source, quant, dt, num_frames,
             frame_pick)
    return runner


def load_runner(name: str, path: str | os.PathLike, **kwargs: Any) -> VLMRunner:
    """`load_eventgpt` or `load_video_llava` by name; unknown names fail listing the valid ones."""
    if name == EventGPTRunner.name:
        return load_eventgpt(path, **kwargs)
    if name == VideoLlavaRunner.name:
        return load_video_llava(path, **kwargs)
    raise UserError(f"unknown model {name!r}; choose one of {', '.join(RUNNER_NAMES)}")


# ----------------------------------------------------------------------------------------------
# The target's LM head and input embeddings, for the LM head file (hidden_data.load_lm_head reads it)
# ----------------------------------------------------------------------------------------------

LM_HEAD_KEYS = ("lm_head.weight", "embed_tokens.weight")  # the LM head and the input embeddings, by key suffix


def read_lm_head(vl_model: str | os.PathLike, quant: str = "none", device: str = "auto",
                 load_model: bool = True) -> dict[str, Any] | None:
    """The LM head file's contents for a Video-LLaVA checkpoint: {"format", "weight": [V, D] fp16,
    "embed_weight": [V, D] fp16, "vocab_size", "hidden_dim", "model", "config_hash"}.

    A local folder is read straight from its files (only those two tensors: no model is built; vision
    towers' embeddings never match, their keys end otherwise). Otherwise (a hub id, or files without the
    tensors) the model is loaded (`quant`, `device`; 4-bit layers are dequantised by `lm_head_weight`),
    unless `load_model` is False, which returns None instead."""
    from hidden_data import LM_HEAD_FORMAT

    folder = Path(vl_model)
    weight = embed = None
    if folder.is_dir():
        cfg = read_json(folder / "config.json", "model config", "point --vl_model at a Video-LLaVA folder")
        if cfg.get("model_type") != VIDEO_LLAVA_MODEL_TYPE:
            raise UserError(f"{folder / 'config.json'} has model_type {cfg.get('model_type')!r}, not "
                            f"{VIDEO_LLAVA_MODEL_TYPE!r}: the LM head must be the target's (Video-LLaVA's)")
        found = checkpoint_tensors(folder, suffixes=LM_HEAD_KEYS)
        weight, embed = (next((v for k, v in found.items() if k.endswith(suffix)), None) for suffix in LM_HEAD_KEYS)
    if weight is not None and embed is not None:
        log.info("read the LM head and input embeddings from the files in %s", folder)
        chash = config_hash(folder / "config.json")
    elif not load_model:
        return None
    else:
        runner = load_video_llava(vl_model, quant=quant, device=device)
        weight = runner.lm_head_weight()
        embed = runner.decoder.get_input_embeddings().weight  # bitsandbytes leaves embeddings unquantised
        chash = runner.config_hash
    if tuple(embed.shape) != tuple(weight.shape):
        raise UserError(f"{vl_model}: input embeddings {tuple(embed.shape)} and LM head {tuple(weight.shape)} differ "
                        "in shape; this is not a Video-LLaVA language model")
    return {
        "format": LM_HEAD_FORMAT,
        "weight": weight.detach().float().cpu().half().contiguous(),
        "embed_weight": embed.detach().float().cpu().half().contiguous(),
        "vocab_size": int(weight.shape[0]),
        "hidden_dim": int(weight.shape[1]),
        "model": str(vl_model),
        "config_hash": chash,
    }


# ----------------------------------------------------------------------------------------------
# Architectures: the configs, tokenizer and processor the random builder and the toy writers share
# ----------------------------------------------------------------------------------------------

# Strings every prompt template puts around the question; a tokenizer trained here must cover them.
_SCAFFOLD_TEXTS = (
    EVENTGPT_SYSTEM,
    f"USER: {EVENTGPT_EV_START}{EVENTGPT_EVENT_TOKEN}{EVENTGPT_EV_END}\n ASSISTANT:",
    VIDEO_LLAVA_PROMPT.format(question="?"),
)


def build_toy_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small Llama-style BPE tokenizer on `texts` (plus the prompt scaffolding).

    Special ids follow Llama: `<unk>`=0, `<s>`=1, `</s>`=2; `<s>` is prepended to every encoding.
    Every printable ASCII character and newline is in the base alphabet, so no prompt text maps to
    `<unk>`. Deterministic: the same texts give the same vocabulary and merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

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


def llama_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, max_position_embeddings: int) -> LlamaConfig:
    """A Vicuna-style LLaMA config (separate LM head, <unk>=0 / <s>=1 / </s>=2) at the given widths."""
    from transformers import LlamaConfig

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


def vision_config(image_size: int, patch_size: int, hidden_size: int, layers: int, heads: int,
                  intermediate_size: int | None = None) -> CLIPVisionConfig:
    """A CLIP ViT vision config (MLP width 2 x hidden_size unless given)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=hidden_size,
        hidden_act="quick_gelu",  # as openai/clip-vit-large-patch14(-336)
    )


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
    from transformers import VideoLlavaConfig

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
    from transformers import VideoLlavaProcessor
    from transformers.models.video_llava import VideoLlavaImageProcessor, VideoLlavaVideoProcessor

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
# Random-weight runners at real shapes (the benchmarks' --random_shape), built in memory
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
                         frame_pick: str = DEFAULT_FRAME_PICK, quant: str = "none", num_event_frames: int = 1
                         ) -> tuple[EventGPTRunner, VideoLlavaRunner]:
    """EventGPT and Video-LLaVA runners with random weights at `shape`, built on `device` (no files); EventGPT
    reads `num_event_frames` event frames per clip.

    EventGPT is built in `dtype`, Video-LLaVA in `vl_dtype` (default: `dtype` too); `quant` int8_ao or
    int4_ao quantises both decoders' layers with torchao after building (bitsandbytes quantises only at
    checkpoint load, so 4bit/8bit are refused).

    The tokenizer is the toy BPE trained on the questions (prompt text is a small part of the
    sequence; the visual tokens dominate: 578 for EventGPT and 2056 for Video-LLaVA at 7b shape).
    Both runners get eos_token_id -1: random weights would stop at an EOS only by chance, and
    timing every position is the worst case, which is what we want to know.
    """
    from transformers import CLIPVisionModel, LlamaForCausalLM, VideoLlavaForConditionalGeneration

    if quant in BNB_QUANTS:
        raise UserError(f"bitsandbytes --quant {quant} applies to loaded checkpoints; random shapes take none, "
                        "int8_ao or int4_ao")
    set_seed(seed)
    s = shape
    tag = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]
    tokenizer = build_toy_tokenizer(questions)

    def llama(vocab: int) -> LlamaConfig:
        return llama_config(vocab, s["hidden"], s["layers"], s["heads"], s["intermediate"], s["max_positions"])

    def clip(image_size: int) -> CLIPVisionConfig:
        return vision_config(image_size, s["patch"], s["vision_hidden"], s["vision_layers"], s["vision_heads"],
                             s["vision_intermediate"])

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
    image_processor = _clip_image_processor_class()(size={"shortest_edge": size},
                                                    crop_size={"height": size, "width": size})
    egpt = EventGPTRunner(llm=llm, tower=tower, projector=projector, adaptor=adaptor,
                          image_processor=image_processor, num_event_frames=num_event_frames,
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
        _apply_quant(runner, quant, bnb_scope="none")
    return egpt, vl


# ----------------------------------------------------------------------------------------------
# One way for the stages: the shared model flags and load_runners
# ----------------------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser, *, required: bool = False, random_shape: bool = True,
                   device_note: str = "") -> None:
    """The model flags of the stages that load both models, one dest per meaning, in a "models" group:
    --egpt_model, --vision_tower, --num_event_frames, --vl_model, --quant, --device, --dtype, --egpt_dtype, --vl_dtype,
    --frame_pick, --accept_weight_keys and, with `random_shape`, --random_shape with its shape overrides
    (--hidden, --layers, ...). `required`: the two model paths have no default (else the toy world's);
    `device_note` is added to --device's help. Call `check_model_args` after parsing."""
    g = p.add_argument_group("models")
    default = "" if required else "; default %(default)s"
    g.add_argument("--egpt_model", required=required, default=None if required else "data/toy/models/eventgpt",
                   help=f"EventGPT checkpoint folder (release layout{default})")
    g.add_argument("--vision_tower", default=None,
                   help="EventGPT's CLIP tower (a local CLIP folder or a hub id), instead of the checkpoint "
                   "config's mm_visual_tower")
    g.add_argument("--num_event_frames", type=int, default=1,
                   help="event frames EventGPT reads per clip, the first N rendered (default 1, the specification's "
                   "extraction; 5 is the release's inference, which pools all five); extraction, the benchmarks "
                   "and the live drafters must use the same N")
    g.add_argument("--vl_model", required=required, default=None if required else "data/toy/models/video_llava",
                   help=f"Video-LLaVA folder or hub id (transformers format{default})")
    g.add_argument("--quant", default="none", choices=QUANT_CHOICES,
                   help="quantisation of both language models: bitsandbytes 4bit/8bit (CUDA"
                   + ("; not with --random_shape" if random_shape else "") + "), torchao int8_ao or int4_ao "
                   "(weight-only; int4_ao needs CUDA and bf16)")
    if random_shape:
        g.add_argument("--random_shape", default=None, choices=sorted(SHAPES),
                       help="build both models in memory with random weights at this shape instead of loading "
                       "checkpoints (7b: Vicuna-7B + CLIP ViT-L/14; tiny: a CPU-sized stand-in)")
        for name in OVERRIDES:
            g.add_argument(f"--{name}", type=int, default=None,
                           help=f"with --random_shape: override the shape's {name.replace('_', ' ')}")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N" + device_note)
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="both models' dtype unless --egpt_dtype/--vl_dtype say otherwise (auto: each model's "
                   "released precision on CUDA, fp32 on CPU)")
    g.add_argument("--egpt_dtype", default=None, choices=DTYPE_CHOICES,
                   help="EventGPT's dtype (default --dtype; auto = bf16 on CUDA, as the release runs it)")
    g.add_argument("--vl_dtype", default=None, choices=DTYPE_CHOICES,
                   help="Video-LLaVA's dtype (default --dtype; auto = fp16 on CUDA, as its model card and "
                   "LanguageBind run it)")
    g.add_argument("--frame_pick", default=DEFAULT_FRAME_PICK, choices=FRAME_PICKS,
                   help="how Video-LLaVA's frames are indexed: floor of linspace(0, n-1, num_frames) (default, as "
                   "LanguageBind and the research fork) or round (this project's earlier choice)")
    g.add_argument("--accept_weight_keys", nargs="+", default=[], metavar="KEY",
                   help="checkpoint tensor names (a full name, its last dotted parts, or a glob) that may be "
                   "missing from or unknown to either model without stopping the load, e.g. position_ids")


def check_model_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Complete and check the flags of `add_model_args` after parsing (errors through `p.error`, one line):
    --egpt_dtype/--vl_dtype default to --dtype; with --random_shape, args.shape is the shape with its
    overrides (None without it), the overrides need it and bitsandbytes --quant is refused."""
    args.egpt_dtype = args.egpt_dtype or args.dtype
    args.vl_dtype = args.vl_dtype or args.dtype
    if args.num_event_frames < 1:
        p.error("--num_event_frames must be >= 1")
    if not hasattr(args, "random_shape"):
        return
    given = {n: getattr(args, n) for n in OVERRIDES if getattr(args, n) is not None}
    if args.random_shape is None and given:
        p.error(f"--{next(iter(given))} only applies with --random_shape")
    if args.random_shape is not None and args.quant in BNB_QUANTS:
        p.error("bitsandbytes --quant applies to loaded checkpoints; random shapes take none, int8_ao or int4_ao")
    args.shape = None
    if args.random_shape is not None:
        try:
            args.shape = resolve_shape(args.random_shape, given)
        except ValueError as err:
            p.error(str(err))


def resolve_compute(args: argparse.Namespace, device: str | None = None
                    ) -> tuple[torch.device, dict[str, torch.dtype]]:
    """The device (`device`, default args.device) and each model's dtype (args.egpt_dtype / vl_dtype, default
    args.dtype, under each model's "auto" rule), resolved and logged once, before anything loads."""
    dev = resolve_device(device or args.device)
    return dev, {"eventgpt": resolve_dtype(getattr(args, "egpt_dtype", None) or args.dtype, dev, model="eventgpt"),
                 "video_llava": resolve_dtype(getattr(args, "vl_dtype", None) or args.dtype, dev,
                                              model="video_llava")}


def load_runners(args: argparse.Namespace, questions: list[str],
                 compute: tuple[torch.device, dict[str, torch.dtype]] | None = None
                 ) -> tuple[EventGPTRunner, VideoLlavaRunner]:
    """(EventGPT runner, Video-LLaVA runner): the checkpoints args.egpt_model and args.vl_model, or, with
    args.random_shape, random weights at args.shape built in memory (tokenizer trained on `questions`, seed
    args.seed).

    Reads the flags of `add_model_args`; where a caller lacks them, egpt_dtype / vl_dtype default to dtype,
    frame_pick to floor, accept_weight_keys to none, num_event_frames to 1 and extraction's num_frames to 8.
    `compute`: (device, dtypes) from `resolve_compute`, when the caller resolved them already.
    """
    device, dtypes = compute or resolve_compute(args)
    frame_pick = getattr(args, "frame_pick", None) or DEFAULT_FRAME_PICK
    if getattr(args, "random_shape", None) is not None:
        return build_random_runners(args.shape, questions, device, dtypes["eventgpt"], args.seed,
                                    vl_dtype=dtypes["video_llava"], frame_pick=frame_pick, quant=args.quant,
                                    num_event_frames=getattr(args, "num_event_frames", 1))
    accept_keys = getattr(args, "accept_weight_keys", None) or ()
    egpt = load_eventgpt(args.egpt_model, quant=args.quant, device=device, dtype=dtypes["eventgpt"],
                         num_event_frames=getattr(args, "num_event_frames", 1), accept_keys=accept_keys,
                         vision_tower=getattr(args, "vision_tower", None))
    vl = load_video_llava(args.vl_model, quant=args.quant, device=device, dtype=dtypes["video_llava"],
                          num_frames=getattr(args, "num_frames", 8), frame_pick=frame_pick, accept_keys=accept_keys)
    return egpt, vl
