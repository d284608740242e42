"""vlm_runners.py + model_builders.py + toy_models.py on tiny random checkpoints (CPU, fp32, a few seconds)."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import clip_data as cd
import model_builders as mb
import toy_models as tm
import vlm_runners as vr
from common import UserError

TEXTS = [
    f"the {c} {o} moves {d} on the road." for c in ("red", "blue", "green") for o in ("car", "truck", "person")
    for d in ("left", "right")
] + ["what is in the scene?", "which way does the car move?"]
Q_SHORT = "what?"
Q_LONG = "which way does the red car on the left side of the road move?"
SEQ, CLIP = "seq_000", "000003"
N_VIDEO_FRAMES = 20


def _write_mp4(path: Path, values: list[int], size: tuple[int, int] = (48, 64)) -> None:
    """Uniform grey frames whose brightness encodes their index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=20)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for v in values:
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), v, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these models are tiny


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("toy_models")
    tok = mb.build_toy_tokenizer(TEXTS, vocab_size=300)
    llm = tm.make_base_llm(tok, seed=0)
    egpt_dir = tm.write_eventgpt_checkpoint(root / "eventgpt", llm.state_dict(), tok, seed=1)
    vl_dir = tm.write_video_llava_checkpoint(root / "video_llava", llm.state_dict(), tok, seed=2)

    split = root / "data" / "test"
    rng = np.random.default_rng(0)
    clip = {
        "id": f"{SEQ}/{CLIP}",
        "video": f"mp4/{SEQ}/{CLIP}.mp4",
        "event_image_prefix": f"event_image/{SEQ}/{CLIP}",
    }
    images = []
    for i in range(3):
        img = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
        path = split / f"{clip['event_image_prefix']}_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        images.append(img)
    _write_mp4(split / clip["video"], [12 * i for i in range(N_VIDEO_FRAMES)])
    return {
        "root": root,
        "tok": tok,
        "egpt_dir": egpt_dir,
        "vl_dir": vl_dir,
        "split": split,
        "clip": clip,
        "images": images,
        "egpt": mb.load_eventgpt(egpt_dir, device="cpu"),
        "vl": mb.load_video_llava(vl_dir, device="cpu"),
    }


@pytest.fixture(params=["egpt", "vl"])
def runner(request: pytest.FixtureRequest, world: dict) -> vr.VLMRunner:
    return world[request.param]


# --------------------------------------------------------------------------------------------
# toy_models (and the tokenizer model_builders trains)
# --------------------------------------------------------------------------------------------


def test_toy_tokenizer_is_llama_like(world: dict) -> None:
    tok = world["tok"]
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2]
    ids = tok("the red car moves left.").input_ids
    assert ids[0] == 1 and 0 not in ids  # BOS first, nothing unknown
    assert tok.convert_ids_to_tokens(ids[1]).startswith("▁")  # Metaspace prefix on the first word
    again = mb.build_toy_tokenizer(TEXTS, vocab_size=300)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_video_llava_tokens_follow_the_real_layout(world: dict) -> None:
    vl, base = world["vl"], len(world["tok"])
    ids = vl.tokenizer.convert_tokens_to_ids(["<image>", "<video>", "<pad>"])
    assert ids == [base, base + 1, base + 2]
    assert vl.pad_token_id == base + 2 and vl.video_token_id == base + 1
    assert vl.vocab_size % 64 == 0 and vl.vocab_size >= base + 3
    assert world["egpt"].vocab_size == base  # EventGPT keeps the base vocabulary


def test_toy_writes_are_deterministic(world: dict, tmp_path: Path) -> None:
    tok = world["tok"]
    llm = tm.make_base_llm(tok, seed=0)
    e = tm.write_eventgpt_checkpoint(tmp_path / "e", llm.state_dict(), tok, seed=1)
    v = tm.write_video_llava_checkpoint(tmp_path / "v", llm.state_dict(), tok, seed=2)
    for new, old in ((e, world["egpt_dir"]), (v, world["vl_dir"])):
        assert (new / "model.safetensors").read_bytes() == (old / "model.safetensors").read_bytes()
        assert (new / "config.json").read_bytes() == (old / "config.json").read_bytes()


def test_both_language_models_start_from_the_shared_init(world: dict) -> None:
    e = load_file(str(world["egpt_dir"] / "model.safetensors"))
    v = load_file(str(world["vl_dir"] / "model.safetensors"))
    base = len(world["tok"])
    # transformers saves Video-LLaVA in the hub layout (language_model.model.*, language_model.lm_head)
    assert torch.equal(e["model.layers.0.self_attn.q_proj.weight"],
                       v["language_model.model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(e["lm_head.weight"], v["language_model.lm_head.weight"][:base])
    extra = v["language_model.lm_head.weight"][base:]
    torch.testing.assert_close(extra, e["lm_head.weight"].mean(0).expand_as(extra))


def test_eventgpt_checkpoint_uses_release_key_names(world: dict) -> None:
    cfg = json.loads((world["egpt_dir"] / "config.json").read_text())
    assert cfg["model_type"] == "EventChat_llama" and cfg["event_feature_adaptor"] is True
    assert cfg["mm_hidden_size"] == 32 and (world["egpt_dir"] / cfg["mm_visual_tower"]).is_dir()
    keys = set(load_file(str(world["egpt_dir"] / "model.safetensors")))
    for key in (
        "model.visual_tower.visual_tower.vision_model.embeddings.patch_embedding.weight",
        "model.visual_tower.visual_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "model.visual_projector.0.weight",
        "model.visual_projector.2.bias",
        "model.feature_adaptor.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert key in keys, key


# --------------------------------------------------------------------------------------------
# EventGPT semantics
# --------------------------------------------------------------------------------------------


def test_eventgpt_prompt_follows_the_release(world: dict) -> None:
    prompt = vr.eventgpt_prompt("what is in the scene?")
    assert prompt == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <ev_start><event><ev_end>\n"
        "what is in the scene? ASSISTANT:"
    )
    tok = world["tok"]
    head, tail = prompt.split("<event>")
    expected = [*tok(head).input_ids, -200, *tok(tail).input_ids[1:]]
    assert world["egpt"].prompt_ids("what is in the scene?") == expected


def test_spatio_temporal_pool_order() -> None:
    feats = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # [T=2, S=3, D=4]
    pooled = vr.spatio_temporal_pool(feats)
    assert pooled.shape == (2 + 3, 4)
    assert torch.equal(pooled[0], feats[0].mean(0)) and torch.equal(pooled[1], feats[1].mean(0))
    assert torch.equal(pooled[2:], (feats[0] + feats[1]) / 2)


def _reference_eventgpt_logits(world: dict, images: list[np.ndarray], question: str) -> torch.Tensor:
    """EventGPT's forward rebuilt from the raw tensors, sharing no code with vlm_runners."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    ckpt = world["egpt_dir"]
    sd = load_file(str(ckpt / "model.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    tower_dir = ckpt / cfg["mm_visual_tower"]

    clip = CLIPVisionModel(CLIPVisionConfig.from_pretrained(tower_dir)).eval()
    prefix = "model.visual_tower.visual_tower.vision_model."
    clip.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    pixels = CLIPImageProcessorPil.from_pretrained(tower_dir)(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-1] == 32  # read from the tower's preprocessor config, not hard-coded
    with torch.no_grad():
        h = clip(pixel_values=pixels).last_hidden_state  # [T, 1 + patches, C], CLS included
        h = F.linear(h, sd["model.visual_projector.0.weight"], sd["model.visual_projector.0.bias"])
        h = F.gelu(h)
        h = F.linear(h, sd["model.visual_projector.2.weight"], sd["model.visual_projector.2.bias"])
        h = F.linear(h, sd["model.feature_adaptor.weight"], sd["model.feature_adaptor.bias"])
        temporal = torch.stack([h[t].mean(dim=0) for t in range(h.shape[0])])
        spatial = torch.stack([h[:, s].mean(dim=0) for s in range(h.shape[1])])
        visual = torch.cat([temporal, spatial])

        llama_keys = {k: v for k, v in sd.items() if k.startswith(("model.embed_tokens", "model.layers",
                                                                      "model.norm", "lm_head"))}
        llm_cfg = {k: v for k, v in cfg.items() if k in LlamaConfig().to_dict() and k != "model_type"}
        llm = LlamaForCausalLM(LlamaConfig(**llm_cfg)).eval()
        llm.load_state_dict(llama_keys)
        tok = world["tok"]
        system = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                  "gives helpful, detailed, and polite answers to the human's questions.")
        before = tok(f"{system} USER: <ev_start>").input_ids
        after = tok(f"<ev_end>\n{question} ASSISTANT:").input_ids[1:]
        emb = llm.get_input_embeddings()
        seq = torch.cat([emb(torch.tensor(before)), visual, emb(torch.tensor(after))])
        return llm(inputs_embeds=seq[None]).logits[0]


def test_eventgpt_matches_independent_reference(world: dict) -> None:
    runner = mb.load_eventgpt(world["egpt_dir"], device="cpu", num_event_frames=2)
    feats = runner.clip_features(world["split"], world["clip"])
    assert feats.shape == (2 + 17, runner.hidden_size)  # 2 temporal + (16 patches + CLS) spatial
    out = runner.prefill(runner.build_inputs([feats], [Q_LONG]))
    ref = _reference_eventgpt_logits(world, world["images"][:2], Q_LONG)
    assert out.logits.shape[1:] == ref.shape
    torch.testing.assert_close(out.logits[0], ref, rtol=1e-4, atol=1e-4)


def test_eventgpt_uses_first_frame_by_default(world: dict) -> None:
    feats = world["egpt"].clip_features(world["split"], world["clip"])
    assert feats.shape == (1 + 17, world["egpt"].hidden_size)
    torch.testing.assert_close(feats, world["egpt"].encode_event_images(world["images"][:1]))


def test_eventgpt_loads_sharded_checkpoints(world: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "sharded"
    shutil.copytree(world["egpt_dir"], ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, names in shards.items():
        save_file({k: sd[k] for k in names}, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, name))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = mb.load_eventgpt(ckpt, device="cpu")
    a = sharded.prefill(sharded.build_inputs([sharded.clip_features(world["split"], world["clip"])], [Q_SHORT]))
    egpt = world["egpt"]
    b = egpt.prefill(egpt.build_inputs([egpt.clip_features(world["split"], world["clip"])], [Q_SHORT]))
    torch.testing.assert_close(a.logits, b.logits)


# --------------------------------------------------------------------------------------------
# Video-LLaVA semantics
# --------------------------------------------------------------------------------------------


def test_sample_video_frames_uniform(world: dict) -> None:
    frames = cd.sample_video_frames(world["split"] / world["clip"]["video"], num_frames=8)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    expected = np.linspace(0, N_VIDEO_FRAMES - 1, 8, dtype=int)  # 0 2 5 8 10 13 16 19, as LanguageBind
    brightness = frames.reshape(8, -1).mean(axis=1)
    np.testing.assert_allclose(brightness, 12 * expected, atol=4)


def test_video_llava_prompt(world: dict) -> None:
    assert vr.video_llava_prompt("what is in the scene?") == "USER: <video>\nwhat is in the scene? ASSISTANT:"


def test_video_llava_prefill_equals_model_forward(world: dict) -> None:
    vl = world["vl"]
    frames = cd.sample_video_frames(world["split"] / world["clip"]["video"], 8)
    inputs = vl.processor(text=vr.video_llava_prompt(Q_LONG), videos=[frames], return_tensors="pt")
    with torch.no_grad():
        ref = vl.model(**inputs).logits[0].float()
    feats = vl.clip_features(world["split"], world["clip"])
    assert feats.shape == (8 * 17, vl.hidden_size)  # CLS kept for video, 16 patches + 1 per frame
    assert int((inputs["input_ids"] == vl.video_token_id).sum()) == feats.shape[0]
    out = vl.prefill(vl.build_inputs([feats], [Q_LONG]))
    assert out.logits.shape[1:] == ref.shape
    torch.testing.assert_close(out.logits[0], ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# The shared step interface
# --------------------------------------------------------------------------------------------


def _features(runner: vr.VLMRunner, world: dict) -> torch.Tensor:
    return runner.clip_features(world["split"], world["clip"])


def test_positions_restart_after_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert vr.VLMRunner._positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_left_padded_batch_equals_one_by_one(runner: vr.VLMRunner, world: dict) -> None:
    feats = _features(runner, world)
    batch = runner.build_inputs([feats, feats], [Q_SHORT, Q_LONG])
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[1].all()  # the short one is padded
    together = runner.generate(batch, max_new_tokens=6)
    for row, question in enumerate([Q_SHORT, Q_LONG]):
        alone = runner.generate(runner.build_inputs([feats], [question]), max_new_tokens=6)
        assert torch.equal(together.tokens[row], alone.tokens[0])
        assert torch.equal(together.mask[row], alone.mask[0])
        torch.testing.assert_close(together.hidden[row], alone.hidden[0], rtol=1e-4, atol=1e-4)


def test_decode_after_crop_reproduces_logits(runner: vr.VLMRunner, world: dict) -> None:
    feats = _features(runner, world)
    inputs = runner.build_inputs([feats, feats], [Q_SHORT, Q_LONG])
    n = inputs.attention_mask.shape[1]
    step = runner.prefill(inputs)
    assert step.logits.shape[:2] == (2, n) and step.hidden.shape == (2, n, runner.hidden_size)
    new = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.cat([inputs.attention_mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    first = runner.decode(new, step.cache, mask)
    assert step.cache.get_seq_length() == n + 3
    runner.crop_cache(step.cache, n + 1)
    assert step.cache.get_seq_length() == n + 1
    again = runner.decode(new[:, 1:], step.cache, mask)
    torch.testing.assert_close(again.logits, first.logits[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.hidden, first.hidden[:, 1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        runner.crop_cache(step.cache, n + 10)


def test_generate_hidden_reproduces_tokens(runner: vr.VLMRunner, world: dict) -> None:
    feats = _features(runner, world)
    out = runner.generate(runner.build_inputs([feats, feats], [Q_SHORT, Q_LONG]), max_new_tokens=7)
    assert out.tokens.shape == (2, 7) and out.hidden.shape == (2, 7, runner.hidden_size)
    weight = runner.lm_head_weight()
    assert weight.shape == (runner.vocab_size, runner.hidden_size) and weight.dtype == torch.float32
    predicted = (out.hidden @ weight.T).argmax(-1)
    assert torch.equal(predicted[out.mask], out.tokens[out.mask])


def test_teacher_forced_hidden_matches_generate(runner: vr.VLMRunner, world: dict) -> None:
    feats = _features(runner, world)
    inputs = runner.build_inputs([feats, feats], [Q_SHORT, Q_LONG])
    out = runner.generate(inputs, max_new_tokens=6)
    forced = runner.teacher_forced_hidden(inputs, out.tokens, out.mask)
    assert forced.shape == out.hidden.shape
    torch.testing.assert_close(forced, out.hidden, rtol=1e-4, atol=1e-4)


def test_generate_pads_and_masks_after_eos(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = world["egpt"]
    feats = _features(runner, world)
    inputs = runner.build_inputs([feats, feats], [Q_SHORT, Q_LONG])
    free = runner.generate(inputs, max_new_tokens=6)
    # Pretend the token row 0 emits at step 2 is EOS: row 0 stops there, row 1 must be unaffected
    # unless it emits the same token.
    fake_eos = int(free.tokens[0, 2])
    monkeypatch.setattr(runner, "eos_token_id", fake_eos)
    stopped = runner.generate(inputs, max_new_tokens=6)
    assert stopped.mask[0].tolist() == [True, True, True, False, False, False]
    assert (stopped.tokens[0, 3:] == runner.pad_token_id).all()
    assert (stopped.hidden[0, 3:] == 0).all()
    torch.testing.assert_close(stopped.hidden[0, :3], free.hidden[0, :3])
    hits = (free.tokens[1] == fake_eos).nonzero()
    end = int(hits[0]) + 1 if len(hits) else 6
    assert torch.equal(stopped.tokens[1, :end], free.tokens[1, :end])
    assert stopped.mask[1].sum() == end


def test_runner_calls_raise_no_deprecation(runner: vr.VLMRunner, world: dict,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step of the interface uses the installed transformers' current API: no FutureWarning or
    DeprecationWarning, and none of transformers' own `logger.warning_once` deprecation notes (which
    is how 5.24 reports reading `out.past_key_values`)."""
    import logging

    notes: list[str] = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: notes.append(str(msg)))
    feats = _features(runner, world)
    inputs = runner.build_inputs([feats, feats], [Q_SHORT, Q_LONG])
    n = inputs.attention_mask.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        step = runner.prefill(inputs, logits_for="last")
        mask = torch.cat([inputs.attention_mask, torch.ones(2, 2, dtype=torch.long)], dim=1)
        runner.decode(torch.tensor([[5, 6], [7, 8]]), step.cache, mask)
        runner.crop_cache(step.cache, n + 1)
        out = runner.generate(inputs, max_new_tokens=3)
        runner.teacher_forced_hidden(inputs, out.tokens, out.mask)
    assert not [m for m in notes if "deprecat" in m.lower()], notes


def test_to_drafter_vocab_maps_and_counts() -> None:
    """Hand-made case: vocabulary of 10; ids 10, 12 and -1 are foreign, and only valid positions count."""
    tokens = torch.tensor([[3, 10, 9, 12], [11, 0, -1, 4]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    mapped, counted = vr.to_drafter_vocab(tokens, 10, mask)
    assert mapped.tolist() == [[3, 0, 9, 0], [0, 0, 0, 4]]
    assert counted == 3  # 10, 11 and -1; the 12 sits on a padded position
    assert vr.to_drafter_vocab(tokens, 10)[1] == 4
    assert vr.to_drafter_vocab(tokens, 13, mask)[1] == 1
    assert tokens.tolist()[0] == [3, 10, 9, 12]  # the input is not modified


def test_config_hash_and_attributes(runner: vr.VLMRunner) -> None:
    expected = hashlib.sha256((Path(runner.model_path) / "config.json").read_bytes()).hexdigest()[:16]
    assert runner.config_hash == expected and len(expected) == 16
    assert runner.name in mb.RUNNER_NAMES
    assert runner.eos_token_id == 2 and runner.device == torch.device("cpu") and runner.dtype == torch.float32
    description = vr.model_description(runner)
    visual = ({"num_frames": 8, "frame_pick": "floor"} if runner.name == "video_llava"
              else {"num_event_frames": 1})
    assert description == {
        "name": runner.name, "path": runner.model_path, "config_hash": expected, "dtype": "float32",
        "quant": "none", "quant_scope": "none", "hidden_size": runner.hidden_size, "vocab_size": runner.vocab_size,
        "eos_token_id": 2, "pad_token_id": runner.pad_token_id, "device": "cpu", **visual,
    }


# --------------------------------------------------------------------------------------------
# Errors a user can make
# --------------------------------------------------------------------------------------------


def test_missing_checkpoint_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint folder not found"):
        mb.load_eventgpt(tmp_path / "nope", device="cpu")
    with pytest.raises(UserError, match="checkpoint folder not found"):
        mb.load_video_llava(tmp_path / "nope", device="cpu")


def test_wrong_model_type(world: dict) -> None:
    with pytest.raises(UserError, match="model_type 'video_llava'"):
        mb.load_eventgpt(world["vl_dir"], device="cpu")
    with pytest.raises(UserError, match="model_type 'EventChat_llama'"):
        mb.load_video_llava(world["egpt_dir"], device="cpu")
    with pytest.raises(UserError, match="eventgpt, video_llava"):
        mb.load_runner("llava", world["vl_dir"])


def test_quantisation_needs_cuda(world: dict) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the CPU refusal cannot be seen here")
    with pytest.raises(UserError, match="4-bit needs a CUDA GPU; use --quant none on CPU"):
        mb.load_eventgpt(world["egpt_dir"], quant="4bit", device="cpu")
    with pytest.raises(UserError, match="8-bit needs a CUDA GPU"):
        mb.load_video_llava(world["vl_dir"], quant="8bit", device="cpu")
    with pytest.raises(UserError, match="unknown quant"):
        mb.load_video_llava(world["vl_dir"], quant="3bit", device="cpu")


def test_tower_crop_must_match_tower(world: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "bad_tower"
    shutil.copytree(world["egpt_dir"], ckpt)
    cfg_path = ckpt / "clip_vision_tower" / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["crop_size"] = {"height": 224, "width": 224}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="expects 32 px"):
        mb.load_eventgpt(ckpt, device="cpu")


def _with_start_end_tokens(world: dict, folder: Path, extra_rows: int, patch_token: bool | None = None) -> Path:
    """The toy EventGPT with `mm_use_im_start_end` set and `extra_rows` more embedding (and LM head) rows, as a
    checkpoint trained with the release's added tokens has them."""
    shutil.copytree(world["egpt_dir"], folder)
    sd = load_file(str(folder / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[key] = torch.cat([sd[key], sd[key][:extra_rows] * 0.5])
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(mm_use_im_start_end=True, vocab_size=cfg["vocab_size"] + extra_rows)
    if patch_token is None:
        del cfg["mm_use_im_patch_token"]  # the release's default: True
    else:
        cfg["mm_use_im_patch_token"] = patch_token
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_mm_use_im_start_end_makes_single_special_tokens_as_the_release(world: dict, tmp_path: Path) -> None:
    """inference.py of the release: with mm_use_im_start_end, <ev_patch> (mm_use_im_patch_token, default on) and
    then <ev_start>/<ev_end> are added as special tokens, so each marker is one id after those of the vocabulary."""
    base = len(world["tok"])
    runner = mb.load_eventgpt(_with_start_end_tokens(world, tmp_path / "start_end", 3), device="cpu")
    ids = runner.prompt_ids("what is in the scene?")
    start, end = runner.tokenizer.convert_tokens_to_ids(["<ev_start>", "<ev_end>"])
    assert (start, end) == (base + 1, base + 2)  # base + 0 is <ev_patch>
    marker = ids.index(-200)
    assert ids[marker - 1] == start and ids[marker + 1] == end
    plain = world["egpt"].prompt_ids("what is in the scene?")
    assert len(plain) > len(ids)  # as text, each marker took several tokens
    assert runner.tokenizer.tokenize("<ev_start>") == ["<ev_start>"]
    # the prompt runs: prefill over the new ids gives finite logits
    feats = runner.clip_features(world["split"], world["clip"])
    out = runner.prefill(runner.build_inputs([feats], ["what is in the scene?"]))
    assert torch.isfinite(out.logits).all()
    # without the patch token the two markers take the first two new ids
    no_patch = mb.load_eventgpt(_with_start_end_tokens(world, tmp_path / "no_patch", 2, patch_token=False),
                                device="cpu")
    assert no_patch.tokenizer.convert_tokens_to_ids(["<ev_start>", "<ev_end>"]) == [base, base + 1]


def test_mm_use_im_start_end_without_embedding_rows_is_refused_in_one_line(world: dict, tmp_path: Path) -> None:
    folder = _with_start_end_tokens(world, tmp_path / "no_rows", 0)
    base = len(world["tok"])
    with pytest.raises(UserError, match=rf"sets mm_use_im_start_end, .*<ev_start>/<ev_end> tokens of their own "
                       rf"\(ids {base + 1}, {base + 2}\), but the checkpoint has {base} embedding rows") as err:
        mb.load_eventgpt(folder, device="cpu")
    assert "\n" not in str(err.value)


def test_incomplete_eventgpt_checkpoint(world: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "incomplete"
    shutil.copytree(world["egpt_dir"], ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"1 missing \(model\.layers\.1\.mlp\.down_proj\.weight\)"):
        mb.load_eventgpt(ckpt, device="cpu")


def test_vision_tower_override(world: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "moved_tower"
    shutil.copytree(world["egpt_dir"], ckpt)
    tower = tmp_path / "elsewhere"
    shutil.move(ckpt / "clip_vision_tower", tower)
    with pytest.raises(UserError, match="vision_tower="):
        mb.load_eventgpt(ckpt, device="cpu")
    moved = mb.load_eventgpt(ckpt, device="cpu", vision_tower=str(tower))
    torch.testing.assert_close(moved.encode_event_images(world["images"][:1]),
                               world["egpt"].encode_event_images(world["images"][:1]))


def test_missing_or_corrupt_event_png(world: dict, tmp_path: Path) -> None:
    egpt = world["egpt"]
    clip = {**world["clip"], "event_image_prefix": "event_image/seq_000/missing"}
    with pytest.raises(cd.ClipReadError, match=r"missing_0\.png") as err:
        egpt.clip_features(world["split"], clip)
    assert f"python preprocess_event_images.py --dataset_dir {world['split'].parent}" in str(err.value)
    bad = tmp_path / "event_image" / "broken_0.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    with pytest.raises(cd.ClipReadError, match=r"broken_0\.png"):
        egpt.clip_features(tmp_path, {"event_image_prefix": "event_image/broken"})
    too_many = mb.load_eventgpt(world["egpt_dir"], device="cpu", num_event_frames=4)  # only 3 PNGs exist
    with pytest.raises(cd.ClipReadError, match=rf"{CLIP}_3\.png"):
        too_many.clip_features(world["split"], world["clip"])


def test_missing_or_corrupt_mp4(world: dict, tmp_path: Path) -> None:
    with pytest.raises(cd.ClipReadError, match=r"gone\.mp4"):
        world["vl"].clip_features(world["split"], {"video": "mp4/gone.mp4"})
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(cd.ClipReadError, match=r"broken\.mp4"):
        cd.sample_video_frames(bad)
    assert issubclass(cd.ClipReadError, ValueError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit/8-bit needs a CUDA GPU")
@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantised_runners_on_gpu(world: dict, quant: str) -> None:
    for loader, path in ((mb.load_eventgpt, world["egpt_dir"]), (mb.load_video_llava, world["vl_dir"])):
        runner = loader(path, quant=quant, device="cuda")
        # auto: EventGPT bf16, Video-LLaVA fp16, and the 4-bit layers compute in that dtype
        assert runner.dtype == (torch.bfloat16 if runner.name == "eventgpt" else torch.float16)
        assert runner.quant_scope == ("language_model" if runner.name == "eventgpt" else "whole_model")
        feats = runner.clip_features(world["split"], world["clip"])
        out = runner.generate(runner.build_inputs([feats, feats], [Q_SHORT, Q_LONG]), max_new_tokens=5)
        weight = runner.lm_head_weight()
        assert weight.shape == (runner.vocab_size, runner.hidden_size) and weight.dtype == torch.float32
        predicted = (out.hidden @ weight.T).argmax(-1)
        agree = (predicted[out.mask] == out.tokens[out.mask]).float().mean()
        assert agree >= 0.8  # bf16/fp16 compute: near-ties may flip
