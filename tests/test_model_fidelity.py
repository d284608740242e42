"""Issue 19: the models get the inputs their released code gives them, and loads cannot go silently wrong.

Each test names the point of the issue it covers. Release-style toy checkpoints (toy_models.py) stand
in for the 7B weights; the released code's rules are transcribed here as the reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import clip_data as cd
import event_frames as ef
import model_builders as mb
import preprocess_event_images as pe
import toy_models as tm
import vlm_runners as vr
from common import UserError, resolve_dtype
from tests.conftest import ROOT
from tests.test_model_loaders import TEXTS, _write_mp4

QUESTIONS = ["what is in the scene?", "which way does the car move?"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: these models are tiny


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fidelity")
    tok = mb.build_toy_tokenizer(TEXTS, vocab_size=300)
    llm = tm.make_base_llm(tok, seed=0)
    return {"root": root,
            "egpt": tm.write_eventgpt_checkpoint(root / "eventgpt", llm.state_dict(), tok, seed=1),
            "vl": tm.write_video_llava_checkpoint(root / "video_llava", llm.state_dict(), tok, seed=2)}


def edit_weights(src: Path, dst: Path, drop: tuple[str, ...] = (), add: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of checkpoint folder `src` with tensors removed from / added to its model.safetensors."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    for key in drop:
        del state[key]
    state.update(add or {})
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ---------------------------------------------------------------- points 1 and 2: event frames


def release_event_frames(x: np.ndarray, y: np.ndarray, p: np.ndarray, t: np.ndarray, n: int = 5) -> list[np.ndarray]:
    """EventGPT's released `get_event_images_list` + `generate_event_image` (common/common.py),
    transcribed loop and all: equal counts, canvas (max y + 1, max x + 1) per slice, p == 0 blue."""
    per = len(t) // n
    frames = []
    for i in range(n):
        start, end = i * per, (i + 1) * per if i < n - 1 else len(t)
        xs, ys, ps = x[start:end], y[start:end], p[start:end]
        image = np.ones((ys.max() + 1, xs.max() + 1, 3), dtype=np.uint8) * 255
        for x_, y_, p_ in zip(xs, ys, ps, strict=True):
            image[y_, x_] = np.array([0, 0, 255]) if p_ == 0 else np.array([255, 0, 0])
        frames.append(image)
    return frames


# Eight events early in the top-left corner, two late ones further out: equal counts put two events in
# every slice; equal durations put the first eight in frame 0. No event reaches the sensor's edges.
HAND = {"x": np.array([1, 2, 3, 4, 5, 6, 7, 8, 12, 15]), "y": np.array([1, 1, 2, 2, 3, 3, 4, 4, 9, 11]),
        "t": np.array([0, 1, 2, 3, 4, 5, 6, 7, 1000, 2000]), "p": np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])}


def test_default_split_is_the_releases_equal_count():
    """Point 1: frame 0 holds the events the model was trained on (N // 5 of them), not a time window."""
    assert ef.split_indices(HAND["t"], 5) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert ef.split_indices(HAND["t"], 5, "time")[0] == (0, 8)  # the earlier default: other events
    first = ef.render_event_frames(HAND["x"], HAND["y"], HAND["t"], HAND["p"])[0]
    assert int((first != 255).any(axis=-1).sum()) == 2
    old = ef.render_event_frames(HAND["x"], HAND["y"], HAND["t"], HAND["p"], split_mode="time", canvas="sensor")[0]
    assert int((old != 255).any(axis=-1).sum()) == 8


def test_default_canvas_ends_at_each_slices_last_row_and_column():
    """Point 2: each slice is drawn on (max y + 1, max x + 1) of its own events, not the 480 x 640 sensor."""
    frames = ef.render_event_frames(HAND["x"], HAND["y"], HAND["t"], HAND["p"])
    assert [f.shape for f in frames] == [(2, 3, 3), (3, 5, 3), (4, 7, 3), (5, 9, 3), (12, 16, 3)]
    sensor = ef.render_event_frames(HAND["x"], HAND["y"], HAND["t"], HAND["p"], canvas="sensor")
    assert [f.shape for f in sensor] == [(480, 640, 3)] * 5
    # the same pixels, only the canvas differs
    for small, full in zip(frames, sensor, strict=True):
        assert np.array_equal(full[: small.shape[0], : small.shape[1]], small) and (full == 255).sum() > small.size


def test_default_frames_equal_the_released_code_bit_for_bit():
    """Points 1 and 2 together, on the hand-made stream and on a dense random one (repeated pixels, the
    latest event wins as in the release's loop)."""
    rng = np.random.default_rng(0)
    n = 3_001
    dense = {"x": rng.integers(0, 40, n), "y": rng.integers(0, 30, n), "t": np.sort(rng.integers(0, 50_000, n)),
             "p": rng.integers(0, 2, n)}
    for ev in (HAND, dense):
        ours = ef.render_event_frames(ev["x"], ev["y"], ev["t"], ev["p"], num_frames=5)
        ref = release_event_frames(ev["x"], ev["y"], ev["p"], ev["t"], 5)
        assert len(ours) == len(ref) == 5
        for a, b in zip(ours, ref, strict=True):
            assert a.shape == b.shape and np.array_equal(a, b)


def write_dataset(root: Path, events: dict[str, np.ndarray]) -> Path:
    split = root / "train"
    (split / "event_npy").mkdir(parents=True)
    np.save(split / "event_npy" / "c.npy", events)
    record = {"id": "s/c", "sequence": "s", "clip": "c", "event_npy": "event_npy/c.npy",
              "event_image_prefix": "event_image/s/c", "height": 480, "width": 640}
    (split / "index.json").write_text(json.dumps([record]))
    return root


def render(root: Path, *flags: str) -> int:
    return pe.main(pe.parse_args(["--dataset_dir", str(root), "--allow_pickle", "--num_workers", "0", *flags]))


def test_cli_defaults_reproduce_the_release_and_the_manifest_says_so(tmp_path):
    root = write_dataset(tmp_path / "ds", HAND)
    assert render(root) == 0
    out = root / "train" / "event_image"
    ref = release_event_frames(HAND["x"], HAND["y"], HAND["p"], HAND["t"])
    for i, frame in enumerate(ref):
        with Image.open(out / "s" / f"c_{i}.png") as img:
            assert np.array_equal(np.asarray(img.convert("RGB")), frame)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["split_mode"], manifest["canvas"], manifest["num_frames"]) == ("count", "slice", 5)
    assert manifest["matches_eventgpt_release"] and manifest["format_version"] == 2
    assert ef.read_frame_settings(out) == {"num_frames": 5, "split_mode": "count", "canvas": "slice",
                                           "height": None, "width": None}


def test_frames_made_the_earlier_way_are_never_mixed_in(tmp_path):
    """A folder rendered by the earlier code (manifest version 1: time split, sensor canvas, canvas not
    recorded) is refused by a default run and accepted only with the flags that reproduce it."""
    root = write_dataset(tmp_path / "ds", HAND)
    assert render(root, "--split_mode", "time", "--canvas", "sensor") == 0
    out = root / "train" / "event_image"
    legacy = {"format_version": 1, "writer": "preprocess_event_images.py", "num_frames": 5, "split_mode": "time",
              "height": None, "width": None, "canvas": "full sensor size of each clip"}
    (out / "manifest.json").write_text(json.dumps(legacy))
    assert ef.read_frame_settings(out)["canvas"] == "sensor"
    with pytest.raises(UserError, match="--overwrite"):
        render(root)
    with pytest.raises(UserError, match="--overwrite"):
        render(root, "--split_mode", "time")  # the canvas still differs
    assert render(root, "--split_mode", "time", "--canvas", "sensor") == 0
    assert render(root, "--overwrite") == 0
    assert ef.read_frame_settings(out)["split_mode"] == "count"


def test_toy_world_renders_with_the_release_defaults(quick_world):
    """The toy world trains on the same frame the pipeline renders: the release's frame 0."""
    import make_toy_world
    from clip_data import load_index

    split_dir = quick_world / "dataset" / "train"
    assert ef.read_frame_settings(split_dir / "event_image")["split_mode"] == "count"
    clip = load_index(quick_world / "dataset", "train")[0]
    ev = cd.load_events(split_dir / clip["event_npy"], allow_pickle=True)
    ref = release_event_frames(ev["x"], ev["y"], ev["p"], ev["t"])[0]
    assert np.array_equal(make_toy_world.first_event_frame(split_dir, clip), ref)
    with Image.open(split_dir / f"{clip['event_image_prefix']}_0.png") as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), ref)


# ---------------------------------------------------------------- point 3: video frames


def test_video_frames_are_floored_like_languagebind(ckpts, tmp_path):
    """Point 3: 20 frames -> 0,2,5,8,10,13,16,19 (np.linspace(0, n - 1, 8, dtype=int)), not rounded."""
    video = tmp_path / "v.mp4"
    _write_mp4(video, [12 * i for i in range(20)])  # brightness = 12 x frame index

    def picked(frames: np.ndarray) -> list[int]:
        return [round(float(f.mean()) / 12) for f in frames]

    assert picked(cd.sample_video_frames(video, 8)) == [0, 2, 5, 8, 10, 13, 16, 19]
    assert cd.frame_indices(20, 8).tolist() == np.linspace(0, 19, 8, dtype=int).tolist()
    assert cd.frame_indices(20, 8, "round").tolist() == [0, 3, 5, 8, 11, 14, 16, 19]
    assert cd.frame_indices(3, 8).tolist() == [0, 0, 0, 0, 1, 1, 1, 2]  # short videos repeat frames
    assert picked(cd.sample_video_frames(video, 8, pick="round")) == [0, 3, 5, 8, 11, 14, 16, 19]
    with pytest.raises(UserError, match="frame_pick"):
        cd.sample_video_frames(video, 8, pick="ceil")
    # The runner uses its pick, and says which in its description.
    split = tmp_path
    clip = {"video": "v.mp4"}
    for pick in cd.FRAME_PICKS:
        vl = mb.load_video_llava(ckpts["vl"], device="cpu", frame_pick=pick)
        assert vr.model_description(vl)["frame_pick"] == pick
        torch.testing.assert_close(vl.clip_features(split, clip),
                                   vl.encode_frames(cd.sample_video_frames(video, 8, pick=pick)))
    assert mb.load_video_llava(ckpts["vl"], device="cpu").frame_pick == "floor"


def test_video_decodes_on_one_thread(tmp_path):
    """PyAV's threaded decoding costs more than it saves on short clips (docs/MODELS.md)."""
    import av

    video = tmp_path / "v.mp4"
    _write_mp4(video, [0, 50, 100])
    with av.open(str(video)) as container:
        frames = list(cd._decode(container))
        assert container.streams.video[0].thread_type.name == "NONE"
    assert len(frames) == 3


# ---------------------------------------------------------------- point 4: sentencepiece tokenizer


def train_sentencepiece(path: Path, texts: list[str], vocab_size: int = 400) -> bytes:
    """A tiny Llama-like sentencepiece model (BPE, byte fallback, identity normaliser, dummy prefix)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 3), model_writer=buf, vocab_size=vocab_size, model_type="bpe", unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def sp_texts() -> list[str]:
    return TEXTS + [chunk for q in QUESTIONS for chunk in vr.eventgpt_prompt(q).split(vr.EVENTGPT_EVENT_TOKEN)]


def test_tokenizer_model_only_folder_loads_through_the_eventgpt_loader(tmp_path):
    """Point 4: a release-style EventGPT folder whose tokenizer is only sentencepiece's tokenizer.model
    loads through `load_eventgpt` (the 7B path), and tokenises as the release's slow LlamaTokenizer:
    BOS + sentencepiece's own ids, chunk by chunk around <event>."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    proto = train_sentencepiece(tmp_path / "sp" / "tokenizer.model", sp_texts())
    sp = spm.SentencePieceProcessor(model_proto=proto)
    # Only to size and write the toy checkpoint; what is tested below is the loader's own tokenizer.
    writer_tok = LlamaTokenizer.from_pretrained(str(tmp_path / "sp"), add_bos_token=True)
    ckpt = tm.write_eventgpt_checkpoint(tmp_path / "eventgpt", None, writer_tok, seed=3)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (ckpt / name).unlink(missing_ok=True)
    shutil.copy(tmp_path / "sp" / "tokenizer.model", ckpt / "tokenizer.model")
    assert sorted(p.name for p in ckpt.iterdir() if "token" in p.name) == ["tokenizer.model"]

    runner = mb.load_eventgpt(ckpt, device="cpu")
    for q in QUESTIONS:
        before, after = vr.eventgpt_prompt(q).split(vr.EVENTGPT_EVENT_TOKEN)
        release_ids = [sp.bos_id(), *sp.encode(before), vr.EVENT_TOKEN_INDEX, *sp.encode(after)]
        assert runner.prompt_ids(q) == release_ids
    for text in ["Hello  World\n  x", *TEXTS[:3]]:
        assert runner.tokenizer(text).input_ids == [1, *sp.encode(text)]
    assert (runner.eos_token_id, runner.pad_token_id, runner.vocab_size) == (2, 0, 400)  # pad falls back to <unk>
    feats = torch.zeros(3, runner.hidden_size)
    out = runner.generate(runner.build_inputs([feats], [QUESTIONS[0]]), max_new_tokens=3)
    assert out.tokens.shape == (1, 3)
    # The same loader on a folder holding nothing but tokenizer.model
    bare = mb.load_tokenizer(tmp_path / "sp")
    assert len(bare) == 400 and bare(QUESTIONS[1]).input_ids == [1, *sp.encode(QUESTIONS[1])]


def test_tokenizer_model_without_protobuf_is_one_clear_error(tmp_path, monkeypatch):
    train_sentencepiece(tmp_path / "sp" / "tokenizer.model", sp_texts())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "google.protobuf"
                        else real(name, *a))
    with pytest.raises(UserError, match="protobuf") as err:
        mb.load_tokenizer(tmp_path / "sp")
    assert "requirements.txt" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="holds no tokenizer"):
        mb.load_tokenizer(tmp_path)


def test_requirements_name_protobuf_and_the_installed_one_fits():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    reqs = {Requirement(line).name: Requirement(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert "protobuf" in reqs and reqs["protobuf"].specifier.contains(version("protobuf"))
    assert reqs["sentencepiece"].specifier.contains(version("sentencepiece"))


# ---------------------------------------------------------------- point 5 (and 7): weights


def test_video_llava_with_missing_weights_is_refused(ckpts, tmp_path):
    """Point 5: a tensor missing from Video-LLaVA was only logged, and the model ran it at random init."""
    key = "multi_modal_projector.linear_1.bias"
    bad = edit_weights(ckpts["vl"], tmp_path / "vl", drop=(key,))
    with pytest.raises(UserError, match=r"1 missing \(.*multi_modal_projector\.linear_1\.bias\)") as err:
        mb.load_video_llava(bad, device="cpu")
    assert "--accept_weight_keys" in str(err.value) and "\n" not in str(err.value)


def test_unexpected_weights_are_refused_in_either_checkpoint(ckpts, tmp_path):
    """Point 5: tensors the model does not use were silently dropped (Video-LLaVA, EventGPT's LLaMA part),
    e.g. attention biases of a checkpoint whose config says attention_bias false; they are an error
    naming them, and the explicit flag accepts known-harmless ones."""
    bias = torch.zeros(64)
    vl_key = "language_model.model.layers.0.self_attn.o_proj.bias"
    vl_bad = edit_weights(ckpts["vl"], tmp_path / "vl", add={vl_key: bias})
    with pytest.raises(UserError, match=r"1 unexpected \(.*layers\.0\.self_attn\.o_proj\.bias\)"):
        mb.load_video_llava(vl_bad, device="cpu")
    assert mb.load_video_llava(vl_bad, device="cpu", accept_keys=["*.o_proj.bias"]).name == "video_llava"

    eg_bad = edit_weights(ckpts["egpt"], tmp_path / "eg", add={"model.layers.0.self_attn.o_proj.bias": bias,
                                                                 "model.mm_projector.weight": torch.ones(2)})
    with pytest.raises(UserError, match=r"2 unexpected \(model\.layers\.0\.self_attn\.o_proj\.bias, "
                                        r"model\.mm_projector\.weight\)"):
        mb.load_eventgpt(eg_bad, device="cpu")
    with pytest.raises(UserError, match="mm_projector"):  # accepting one key does not accept the others
        mb.load_eventgpt(eg_bad, device="cpu", accept_keys=["o_proj.bias"])
    mb.load_eventgpt(eg_bad, device="cpu", accept_keys=["o_proj.bias", "model.mm_projector.weight"])

    proj_bad = edit_weights(ckpts["egpt"], tmp_path / "proj", add={"model.visual_projector.4.weight": torch.ones(2)})
    with pytest.raises(UserError, match=r"unexpected \(model\.visual_projector\.4\.weight\)"):
        mb.load_eventgpt(proj_bad, device="cpu")


def test_tower_position_ids_need_the_flag(ckpts, tmp_path):
    """Point 7: transformers 4.x wrote CLIP's position_ids buffer; it stopped the load with no way round."""
    key = f"{mb.EVENTGPT_TOWER_PREFIX}vision_model.embeddings.position_ids"
    bad = edit_weights(ckpts["egpt"], tmp_path / "eg", add={key: torch.arange(17)[None]})
    with pytest.raises(UserError, match=r"1 unexpected \(model\.visual_tower\.visual_tower\.vision_model\."
                                        r"embeddings\.position_ids\)"):
        mb.load_eventgpt(bad, device="cpu")
    runner = mb.load_eventgpt(bad, device="cpu", accept_keys=["position_ids"])
    good = mb.load_eventgpt(ckpts["egpt"], device="cpu")
    image = np.full((40, 56, 3), 90, dtype=np.uint8)
    torch.testing.assert_close(runner.encode_event_images([image]), good.encode_event_images([image]))


def test_accepted_key_patterns():
    assert mb.accepted_key("vision_model.embeddings.position_ids", ["position_ids"])
    assert mb.accepted_key("a.b.rotary_emb.inv_freq", ["*.inv_freq"])
    assert not mb.accepted_key("model.my_position_ids", ["position_ids"])  # whole dotted parts only
    assert not mb.accepted_key("model.norm.weight", [])


# ---------------------------------------------------------------- point 6: one dtype per model


def test_auto_dtype_is_each_models_released_precision_on_cuda(monkeypatch):
    """Point 6: under auto, EventGPT runs bf16 (its release) and Video-LLaVA fp16 (model card, LanguageBind)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda, model="eventgpt") == torch.bfloat16
    assert resolve_dtype("auto", cuda, model="video_llava") == torch.float16
    assert resolve_dtype("bf16", cuda, model="video_llava") == torch.bfloat16  # explicit wins
    assert resolve_dtype("auto", cpu, model="eventgpt") == resolve_dtype("auto", cpu, model="video_llava")
    assert resolve_dtype("auto", cpu, model="eventgpt") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda, model="eventgpt") == torch.float16
    with pytest.raises(UserError, match="unknown model"):
        resolve_dtype("auto", cpu, model="llava")


def test_4bit_computes_in_the_models_own_dtype():
    """Point 6: 4-bit no longer forces bf16 on Video-LLaVA; its layers compute in the model's dtype."""
    pytest.importorskip("bitsandbytes")
    assert mb.bnb_config("4bit", torch.device("cuda"), torch.float16).bnb_4bit_compute_dtype == torch.float16
    assert mb.bnb_config("4bit", torch.device("cuda")).bnb_4bit_compute_dtype == torch.bfloat16


def test_each_model_loads_in_its_own_dtype(ckpts):
    egpt = mb.load_eventgpt(ckpts["egpt"], device="cpu", dtype="bf16")
    vl = mb.load_video_llava(ckpts["vl"], device="cpu", dtype="fp16")
    assert {p.dtype for p in egpt.llm.parameters()} | {p.dtype for p in egpt.tower.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vl.model.parameters()} == {torch.float16}
    assert (vr.model_description(egpt)["dtype"], vr.model_description(vl)["dtype"]) == ("bfloat16", "float16")


def test_description_records_what_is_quantised(ckpts, monkeypatch):
    """Point 7: EventGPT's 4-bit path quantises its language model only (the fork also quantised the
    vision side), Video-LLaVA's the whole model; the description says which. Quantisation itself needs
    CUDA, so the config is stubbed out here: only what is recorded is checked."""
    monkeypatch.setattr(mb, "bnb_config", lambda quant, device, compute_dtype=None: None)
    egpt = mb.load_eventgpt(ckpts["egpt"], device="cpu", quant="4bit")
    vl = mb.load_video_llava(ckpts["vl"], device="cpu", quant="8bit")
    assert {k: vr.model_description(egpt)[k] for k in ("quant", "quant_scope")} == {
        "quant": "4bit", "quant_scope": "language_model"}
    assert {k: vr.model_description(vl)[k] for k in ("quant", "quant_scope")} == {
        "quant": "8bit", "quant_scope": "whole_model"}
    plain = mb.load_eventgpt(ckpts["egpt"], device="cpu")
    assert vr.model_description(plain)["quant_scope"] == "none"


def test_shared_runner_builder_takes_per_model_dtypes_with_old_callers_unchanged():
    """model_builders.load_runners serves both benchmarks; args with only --dtype still work."""
    base = {"random_shape": "tiny", "shape": mb.resolve_shape("tiny", {"hidden": 32, "layers": 1}), "device": "cpu",
            "dtype": "fp32", "seed": 0, "quant": "none", "egpt_model": None, "vl_model": None}
    egpt, vl = mb.load_runners(argparse.Namespace(**base), QUESTIONS)
    assert (egpt.dtype, vl.dtype, vl.frame_pick) == (torch.float32, torch.float32, "floor")
    egpt, vl = mb.load_runners(argparse.Namespace(**base, egpt_dtype="bf16", vl_dtype="fp16", frame_pick="round"),
                               QUESTIONS)
    assert (egpt.dtype, vl.dtype, vl.frame_pick) == (torch.bfloat16, torch.float16, "round")
    assert next(vl.model.parameters()).dtype == torch.float16 and next(egpt.llm.parameters()).dtype == torch.bfloat16
