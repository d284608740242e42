"""EAGLE-3-grade heads: the target's low / middle / high layer states taken from the same passes on every
path (dynamic, static, compiled), stored by extraction with their ids in the manifest, the E3 / E3E heads
that fuse them (roll-out equals drafting on both adapter caches, E3 starts as B1 on a 2-layer target),
the distillation loss and the regression weight, training and offline evaluation on layer data, and the
engine handing each verify pass's layer states to the drafter, lossless."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import drafters as dr
import extract_hidden_states as ehs
import hidden_data
import speculative_decoding as sd
import train_hidden_adapter as tha
from adapter_checkpoint import load_adapter, save_adapter
from common import UserError
from hidden_adapter import AdapterConfig, adapter_inputs, create_adapter, level_config, levels
from losses import distill_loss, drafting_loss
from tests.conftest import ROOT
from tests.test_hidden_data import make_split, write_head
from vlm_runners import eagle3_layer_ids

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_NEW = 10
D_TOY = 64  # the quick world's width


# ----------------------------------------------------------------------------- which layers


def test_eagle3_rule_scales_to_the_depth() -> None:
    assert eagle3_layer_ids(32) == (2, 16, 29)  # EAGLE-3's own choice for LLaMA-3.1-8B / Vicuna-7B
    assert eagle3_layer_ids(2) == (0, 1, 2)  # the toy world: embeddings, middle, last (after the final norm)
    for depth in range(2, 101):
        ids = eagle3_layer_ids(depth)
        assert ids[0] < ids[1] < ids[2] <= depth and ids[0] >= 0, (depth, ids)
    with pytest.raises(ValueError, match="at least 2 layers"):
        eagle3_layer_ids(1)


def test_levels_derive_their_roles_from_the_table() -> None:
    assert levels(reads_layers=True) == ("E3", "E3E")
    assert set(levels(rolls_out=True)) >= {"B1", "E3", "E3E"}
    e3, e3e = level_config("E3"), level_config("E3E")
    assert (e3.consumes, e3.predicts, e3.reads_drafter, e3.target_layers) == ("target", "next", False, [2, 16, 29])
    assert e3e.reads_drafter and e3e.context == "drafter" and e3e.reads_layers
    assert e3.in_dim == 3 * e3.target_dim
    assert level_config("B1").target_layers == [] and not level_config("B1").reads_layers
    with pytest.raises(ValueError, match="last-layer state only"):
        AdapterConfig(name="B1", target_layers=[0, 1])
    with pytest.raises(ValueError, match="distinct"):
        AdapterConfig(name="E3", target_layers=[1, 1])


# ----------------------------------------------------------------------------- the runner's layer states


@pytest.fixture(scope="module")
def runners(quick_world: Path) -> SimpleNamespace:
    import model_builders as mb
    from clip_data import load_index, load_questions

    vl = mb.load_video_llava(quick_world / "models" / "video_llava", device="cpu", dtype="fp32")
    ds = quick_world / "dataset"
    questions = load_questions(ds)
    prompts = [vl.build_inputs([vl.clip_features(ds / split, clip)], [q])
               for split in ("train", "val", "test") for clip in load_index(ds, split) for q in questions[:2]]
    refs = [sd.greedy_reference(vl, p, MAX_NEW) for p in prompts]
    return SimpleNamespace(vl=vl, prompts=prompts, refs=refs, world=quick_world)


def full_states(vl, inputs, tokens: list[int]) -> tuple:
    """Every hidden state of one full forward over prompt + tokens (the reference the passes must equal)."""
    embeds = torch.cat([inputs.inputs_embeds, vl.embed_ids(tokens)[None]], dim=1) if tokens else inputs.inputs_embeds
    with torch.no_grad():
        return vl.decoder(inputs_embeds=embeds, output_hidden_states=True).hidden_states


def check_passes(vl, inputs, tokens: list[int], ids: tuple[int, ...]) -> None:
    """Prefill, then one verify pass over 3 tokens: their layer states equal a full forward's."""
    length = inputs.attention_mask.shape[1]
    full = full_states(vl, inputs, tokens[:3])
    out = vl.prefill(inputs, logits_for="last")
    assert out.layers is not None and out.layers.shape == (1, length, len(ids), vl.hidden_size)
    step = vl.decode(torch.tensor([tokens[:3]]), out.cache, torch.ones(1, length + 3, dtype=torch.long))
    for k, i in enumerate(ids):
        torch.testing.assert_close(out.layers[0, :, k], full[i][0, :length], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step.layers[0, :, k], full[i][0, length:], atol=1e-4, rtol=1e-4)
    # the last index is the state the LM head reads: the pass's own `hidden`
    if ids[-1] == vl.num_layers:
        torch.testing.assert_close(step.layers[0, :, -1], step.hidden[0])


def test_layer_states_come_from_the_same_pass_on_every_path(runners: SimpleNamespace) -> None:
    import model_builders as mb

    vl, inputs, tokens = runners.vl, runners.prompts[0], runners.refs[0]
    ids = eagle3_layer_ids(vl.num_layers)
    vl.capture_layers(ids)
    try:
        check_passes(vl, inputs, tokens, ids)
        gen = vl.generate(inputs, MAX_NEW)
        n = int(gen.mask[0].sum())
        full = full_states(vl, inputs, gen.tokens[0, : n - 1].tolist())
        start = inputs.attention_mask.shape[1] - 1  # the state at t chose token t
        for k, i in enumerate(ids):
            torch.testing.assert_close(gen.layers[0, :n, k], full[i][0, start : start + n], atol=1e-4, rtol=1e-4)
        assert (gen.layers[0, n:] == 0).all()
    finally:
        vl.capture_layers(())
    assert vl.prefill(inputs, logits_for="last").layers is None
    for bad in ((0, 0), (vl.num_layers + 1,), (-1,)):
        with pytest.raises(ValueError, match="hidden-state indices"):
            vl.capture_layers(bad)
    longest = max(p.attention_mask.shape[1] for p in runners.prompts[:1]) + MAX_NEW + 8
    for compile in (False, True):  # the static path, then its compiled step (inductor on CPU, one compile)
        static = mb.load_video_llava(runners.world / "models" / "video_llava", device="cpu", dtype="fp32")
        static.use_static_cache(longest, verify_width=4, compile=compile)
        static.capture_layers(ids)
        check_passes(static, inputs, tokens, ids)


# ----------------------------------------------------------------------------- extraction


def test_extraction_stores_the_layers_and_records_their_ids(quick_hidden: Path) -> None:
    manifest = hidden_data.load_manifest(quick_hidden / "train")
    record = manifest["target_layers"]
    assert record["ids"] == list(eagle3_layer_ids(record["num_layers"])) and record["num_layers"] == 2
    assert manifest["target_layers_flag"] == "auto"
    assert manifest["dtypes"]["vl_layers"] == "float16"
    for chunk in hidden_data.iter_chunks(quick_hidden / "train", True, expect_layers=True):
        layers, mask = chunk["vl_layers"], chunk["vl_mask"]
        assert layers.dtype == torch.float16 and layers.shape == (*chunk["vl_hidden"].shape[:2], 3, D_TOY)
        torch.testing.assert_close(layers[:, :, -1], chunk["vl_hidden"])  # index 2 of 2 layers = the last state
        assert (layers[~mask] == 0).all()
    assert hidden_data.verify_folder(quick_hidden / "train") == []


def test_extraction_without_layers_and_a_folder_from_before_them(quick_world: Path, tmp_path: Path) -> None:
    models = quick_world / "models"

    def argv(out: Path, *extra: str) -> list[str]:
        return ["--split", "val", "--dataset_dir", str(quick_world / "dataset"), "--output_dir", str(out),
                "--egpt_model", str(models / "eventgpt"), "--vl_model", str(models / "video_llava"),
                "--max_questions", "1", "--max_new_tokens", "4", "--device", "cpu", "--dtype", "fp32", *extra]

    out = tmp_path / "plain"
    assert ehs.main(ehs.parse_args(argv(out, "--target_layers", "none"))) == 0
    manifest = hidden_data.load_manifest(out)
    assert hidden_data.manifest_layer_ids(manifest) is None
    assert all("vl_layers" not in c for c in hidden_data.iter_chunks(out))
    # a folder whose records predate --target_layers: adding chunks with layer states to it is refused
    for path in [out / "manifest.json", *out.glob("shard_*.json")]:
        data = json.loads(path.read_text())
        data.get("settings", data).pop("target_layers_flag", None)
        path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="without the target's layer states"):
        ehs.main(ehs.parse_args(argv(out)))
    given = tmp_path / "given"
    assert ehs.main(ehs.parse_args(argv(given, "--target_layers", "1,2"))) == 0
    assert hidden_data.manifest_layer_ids(hidden_data.load_manifest(given)) == (1, 2)
    with pytest.raises(UserError, match="indices go up to 2"):
        ehs.main(ehs.parse_args(argv(tmp_path / "deep", "--target_layers", "1,5")))
    for bad in ("a,b", "1,1", "-1"):
        with pytest.raises(SystemExit):
            ehs.parse_args(argv(tmp_path / "x", "--target_layers", bad))


# ----------------------------------------------------------------------------- the heads


def noisy(adapter, seed: int = 0):
    """Perturbed weights, so a test does not pass on an identity-initialised head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return adapter.eval()


@pytest.mark.parametrize("level", ["E3", "E3E"])
def test_rollout_equals_drafting_on_both_adapter_caches(level: str) -> None:
    torch.manual_seed(0)
    a = noisy(create_adapter(level, 32, target_layers=[0, 1, 2], token_input=True, vocab_size=40, dropout=0.0))
    a.attach_token_table(torch.randn(40, 32))
    b, t = 2, 7
    layers, tokens = torch.randn(b, t, 3, 32), torch.randint(0, 40, (b, t))
    drafter_states = torch.randn(b, t, 32)
    x, kw = adapter_inputs(a, drafter_states, layers[:, :, -1], tokens, layers)
    assert x.shape == (b, t, 96)
    with torch.no_grad():
        outs = a.rollout(x, None, 4, **kw)
        torch.testing.assert_close(outs[0], a(x, None, **kw))
    ctx = {"context": drafter_states[:1, 0]} if level == "E3E" else {}
    for cache in (dr.DynamicAdapterCache(a), dr.StaticAdapterCache(a, width=4)):
        cache.reset()
        with torch.no_grad():
            h = cache(x[:1, :3], token_ids=tokens[:1, :3], **ctx)[:, -1:]  # verified 0..2: fused layer states
            torch.testing.assert_close(h, outs[0][:1, 2:3], atol=1e-5, rtol=1e-5)
            for k in range(1, 4):  # drafted positions: its own previous output
                h = cache(h, token_ids=tokens[:1, 2 + k : 3 + k], **ctx)
                torch.testing.assert_close(h, outs[k][:1, 2:3], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer states"):
        a(torch.randn(1, 3, 50), **({"context": drafter_states[:1, 0]} if level == "E3E" else {}))


def test_untrained_e3_is_b1_on_the_highest_layer() -> None:
    b1 = noisy(create_adapter("B1", 32, dropout=0.0))
    e3 = create_adapter("E3", 32, target_layers=[0, 1, 2], dropout=0.0).eval()
    missing, unexpected = e3.load_state_dict(b1.state_dict(), strict=False)
    assert missing == ["input_proj.weight"] and not unexpected  # the fusion is E3's one extra layer
    layers = torch.randn(2, 6, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(e3(layers.flatten(-2)), b1(layers[:, :, -1]))


def test_checkpoint_keeps_the_layer_ids(tmp_path: Path) -> None:
    a = create_adapter("E3", 32, target_layers=[1, 4, 7])
    save_adapter(tmp_path / "e3.pt", a)
    loaded, _ = load_adapter(tmp_path / "e3.pt")
    assert loaded.config.target_layers == [1, 4, 7] and loaded.config.in_dim == 96


def test_draft_step_times_a_drafted_position() -> None:
    a = create_adapter("E3", 32, target_layers=[0, 1, 2], dropout=0.0).eval()
    for path in ("dynamic", "static"):
        out = dr.draft_step(a, 5, path)()
        assert out.shape == (1, 1, 32)


# ----------------------------------------------------------------------------- losses


def test_distillation_is_zero_at_the_teacher_and_top_k_renormalises() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(5, 30)
    assert float(distill_loss(teacher.clone(), teacher)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(5, 30, requires_grad=True)
    full = distill_loss(student, teacher)
    assert float(full.detach()) > 0
    full.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    torch.testing.assert_close(distill_loss(student, teacher, topk=30), full)
    assert float(distill_loss(student, teacher, topk=3).detach()) != pytest.approx(float(full.detach()))
    # the student matching the teacher's top-3 (renormalised) exactly gives zero on them
    top = teacher.topk(3, dim=-1)
    matched = torch.full_like(teacher, -1e4).scatter(-1, top.indices, top.values)
    assert float(distill_loss(matched, teacher, topk=3)) == pytest.approx(0.0, abs=1e-4)


def test_drafting_loss_without_regression_is_the_distillation() -> None:
    torch.manual_seed(0)
    a = create_adapter("B1", 16, dropout=0.0)
    head = torch.randn(20, 16)
    target, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    tokens = (target @ head.T).argmax(-1)
    outs = [torch.randn(2, 6, 16, requires_grad=True) for _ in range(3)]
    loss, parts = drafting_loss(a, outs, target, mask, tokens=tokens, lm_head=head, decay=0.8,
                                regression_weight=0.0, distill_weight=1.0)
    assert "kd" in parts and "step2" not in parts and parts["kd"] > 0
    w = [0.8 ** k for k in range(3)]
    want = sum(wk / sum(w) * distill_loss(o[:, : 6 - k - 1].reshape(-1, 16) @ head.T,
                                          target[:, k + 1 :].reshape(-1, 16) @ head.T)
               for k, (o, wk) in enumerate(zip(outs, w, strict=True)))
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="LM head"):
        drafting_loss(a, outs, target, mask, distill_weight=1.0)


# ----------------------------------------------------------------------------- training and evaluation


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e3_data")
    make_split(root / "train", 36, 12, seed=0)
    make_split(root / "val", 12, 12, seed=1)
    make_split(root / "plain", 12, 12, seed=2, layers=False)
    write_head(root / "head.pt")
    return root


def flags(data: Path, out: Path, level: str, *extra: str, val: str = "val") -> list[str]:
    return ["--train_data", str(data / "train"), "--val_data", str(data / val), "--adapter_level", level,
            "--output_dir", str(out), "--batch_size", "6", "--num_epochs", "2", "--learning_rate", "1e-2",
            "--lm_head", str(data / "head.pt"), "--no_progress", "--device", "cpu", "--report_to", "none", *extra]


def test_e3_trains_eagle3_style_on_the_data_layers(data: Path, tmp_path: Path) -> None:
    result = tha.main(tha.parse_args(flags(data, tmp_path, "E3", "--rollout_steps", "4", "--gamma_decode", "4",
                                           "--regression_weight", "0", "--distill_weight", "1",
                                           "--distill_topk", "5")))
    adapter, extra = load_adapter(Path(result["run_dir"]) / "best_model.pt")
    assert adapter.config.target_layers == [0, 1, 2]  # from the data's manifest
    d = extra["drafting"]
    assert (d["rollout_steps"], d["regression_weight"], d["distill_weight"], d["distill_topk"]) == (4, 0.0, 1.0, 5)
    history = json.loads((Path(result["run_dir"]) / "history.json").read_text())
    assert history["history"][-1]["train_loss"] < history["history"][0]["train_loss"]
    assert "rollout_accept" in history["history"][0]["val"]


def test_e3_refuses_data_without_layers_and_the_loss_flags_are_checked(data: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError, match="--target_layers"):
        tha.main(tha.parse_args(flags(data, tmp_path, "E3", val="plain")))
    base = flags(data, tmp_path, "B1")
    for extra, message in ((["--regression_weight", "0", "--token_loss_weight", "0", "--distill_weight", "0"],
                             "leaves no loss"),
                           (["--distill_weight", "-1"], "--distill_weight"),
                           (["--distill_temperature", "0"], "--distill_temperature")):
        with pytest.raises(SystemExit):
            tha.parse_args([*base, *extra])
        assert message in capsys.readouterr().err
    no_head = [a for a in base if a not in ("--lm_head", str(data / "head.pt"))]
    with pytest.raises(SystemExit):
        tha.parse_args([*no_head, "--token_input", "off", "--distill_weight", "1"])
    assert "--lm_head" in capsys.readouterr().err
    spec = tha.parse_args([*base, "--spec_loss", "--regression_weight", "0", "--distill_weight", "1"])
    assert (spec.regression_weight, spec.distill_weight) == (1.0, 0.0)  # the specification's loss, reachable


def test_offline_acceptance_of_an_e3_checkpoint(quick_hidden: Path, tmp_path: Path) -> None:
    import measure_feature_acceptance as mfa

    head = quick_hidden / "vl_lm_head.pt"
    run = tha.main(tha.parse_args([
        "--train_data", str(quick_hidden / "train"), "--val_data", str(quick_hidden / "val"), "--adapter_level", "E3",
        "--output_dir", str(tmp_path), "--batch_size", "4", "--num_epochs", "1", "--lm_head", str(head),
        "--no_progress", "--device", "cpu", "--report_to", "none", "--gamma_decode", "3"]))
    ckpt = Path(run["run_dir"]) / "best_model.pt"
    result = mfa.main(mfa.parse_args(["--checkpoint", str(ckpt), "--test_data", str(quick_hidden / "test"),
                                      "--lm_head", str(head), "--gamma_decode", "3", "--tree_budget", "21",
                                      "--tree_topk", "3", "--output_dir", str(tmp_path / "acc")]))
    roll = result["drafting"]["rollout"]
    assert result["level"] == "E3" and roll["samples"] > 0 and 0 <= roll["live_accepted_per_iteration"] <= 3
    # the live schedule replayed on the chunks' layer states (as the pipeline runs it): chain = roll-out's figure;
    # the tree keeps all 3 + 9 + 9 candidates, so it holds the chain's path (a smaller budget may prune it from
    # a one-epoch head's flat distributions)
    replay = result["schedule_replay"]
    assert replay["chain"]["tokens_per_verify"] == pytest.approx(roll["live_tokens_per_verify"], abs=1e-6)
    assert replay["tree"]["tokens_per_verify"] >= replay["chain"]["tokens_per_verify"]
    # a checkpoint of other layers than the test data's is refused in one line
    adapter, extra = load_adapter(ckpt)
    other = create_adapter("E3", 64, target_layers=[0, 2], token_input=adapter.config.token_input,
                           vocab_size=adapter.config.vocab_size)
    save_adapter(tmp_path / "other.pt", other, **extra)
    with pytest.raises(UserError, match="fuses layers"):
        mfa.main(mfa.parse_args(["--checkpoint", str(tmp_path / "other.pt"), "--test_data",
                                 str(quick_hidden / "test"), "--lm_head", str(head)]))


# ----------------------------------------------------------------------------- the live engine


class LayerRecorder(dr.SyntheticDrafter):
    """The controlled drafter asking for layer states, recording what the engine hands it."""

    def __init__(self, ids: tuple[int, ...], vocab: int) -> None:
        super().__init__(0.7, vocab, seed=0)
        self.target_layers = ids
        self.rows: list[torch.Tensor] = []

    def begin(self, inputs) -> None:
        super().begin(inputs)
        self.rows = []

    def accept(self, tokens, states, layers=None) -> None:
        super().accept(tokens, states, layers)
        assert layers is not None and layers.shape[0] == states.shape[0] == len(tokens)
        self.rows.append(layers)


def test_engine_hands_each_verify_pass_layer_states_to_the_drafter(runners: SimpleNamespace) -> None:
    vl = runners.vl
    ids = eagle3_layer_ids(vl.num_layers)
    recorder = LayerRecorder(ids, vl.vocab_size)
    engine = sd.SpeculativeDecoder(vl, recorder, gamma_decode=3)
    checked = 0
    for inputs, ref in list(zip(runners.prompts, runners.refs, strict=True))[:6]:
        recorder.set_reference(ref)
        out = engine.generate(inputs, None, MAX_NEW)
        sd.check_lossless(out.tokens, ref, "layer recorder")
        got = torch.cat(recorder.rows)[: len(out.tokens)]  # row t: the states that chose token t
        full = full_states(vl, inputs, out.tokens[:-1])
        start = inputs.attention_mask.shape[1] - 1
        for k, i in enumerate(ids):
            torch.testing.assert_close(got[:, k], full[i][0, start : start + got.shape[0]], atol=1e-4, rtol=1e-4)
        checked += sum(it.accepted for it in out.trace.iterations)
    assert checked > 0  # accepted drafts, so multi-position verify passes were checked
    plain = sd.SpeculativeDecoder(vl, dr.NoDrafter(), gamma_decode=0)
    plain.generate(runners.prompts[0], None, 4)
    assert vl.layer_ids == ()  # an engine whose drafter reads no layers switches the capture off


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("path", ["dynamic", "static", pytest.param("cuda_compiled", marks=CUDA)])
def test_e3_drafts_losslessly_on_many_prompts(runners: SimpleNamespace, path: str) -> None:
    import model_builders as mb

    vl, refs = runners.vl, runners.refs
    if path != "dynamic":
        device = "cuda" if path == "cuda_compiled" else "cpu"
        vl = mb.load_video_llava(runners.world / "models" / "video_llava", device=device, dtype="fp32")
        longest = max(p.attention_mask.shape[1] for p in runners.prompts)
        vl.use_static_cache(longest + MAX_NEW + 8, verify_width=4, compile=path == "cuda_compiled")
        if device == "cuda":  # the references of this device's arithmetic
            refs = [sd.greedy_reference(vl, p, MAX_NEW) for p in runners.prompts]
    ids = list(eagle3_layer_ids(vl.num_layers))
    head = vl.lm_head_weight()
    e3 = noisy(create_adapter("E3", vl.hidden_size, target_layers=ids, dropout=0.0), seed=1).to(vl.device)
    engine = sd.SpeculativeDecoder(vl, dr.make_drafter(e3, head), gamma_decode=3, static_cache=path != "dynamic",
                                   compile=path == "cuda_compiled")
    for i, (inputs, ref) in enumerate(zip(runners.prompts, refs, strict=True)):
        out = engine.generate(inputs, None, MAX_NEW)
        sd.check_lossless(out.tokens, ref, f"E3 on the {path} path, prompt {i}")
    assert vl.layer_ids == tuple(ids)
    drafter = dr.make_drafter(e3, head)
    with pytest.raises(ValueError, match="must return them"):
        drafter.begin(None)
        drafter.accept([1], torch.zeros(1, vl.hidden_size, device=vl.device))


def test_e3_drafts_the_same_trees_on_both_paths_losslessly(runners: SimpleNamespace) -> None:
    """E3 among the roll-out heads that draft trees (issue 26): the layer states of the tree pass's accepted
    rows feed it, on the dynamic and the static path alike; the same trees, the target's own answers."""
    import draft_trees as dt
    import model_builders as mb

    vl = runners.vl
    static = mb.load_video_llava(runners.world / "models" / "video_llava", device="cpu", dtype="fp32")
    longest = max(p.attention_mask.shape[1] for p in runners.prompts)
    static.use_static_cache(longest + MAX_NEW + 16, verify_width=4)
    ids = list(eagle3_layer_ids(vl.num_layers))
    e3 = noisy(create_adapter("E3", vl.hidden_size, target_layers=ids, dropout=0.0), seed=1)
    spec = dt.TreeSpec(depth=3, topk=3, budget=8)
    engines = [sd.SpeculativeDecoder(r, dt.tree_drafter(e3, r.lm_head_weight(), spec), gamma_decode=3,
                                     static_cache=r is static) for r in (vl, static)]
    assert isinstance(engines[1].drafter, dt.TreeRolloutDrafter) and engines[1].drafter.decode_path == "static"
    branched = 0
    for i, (inputs, ref) in enumerate(zip(runners.prompts, runners.refs, strict=True)):
        dyn, stat = (e.generate(inputs, None, MAX_NEW) for e in engines)
        sd.check_lossless(dyn.tokens, ref, f"E3 trees, dynamic path, prompt {i}")
        assert stat.tokens == dyn.tokens
        trees = [[(it.draft, it.parents, it.path) for it in o.trace.iterations] for o in (dyn, stat)]
        assert trees[0] == trees[1]
        branched += sum(it.parents is not None and len(set(it.parents)) < len(it.parents)
                        for it in dyn.trace.iterations)
    assert branched > 0  # real trees were drafted, not chains


@CUDA
def test_compiled_cuda_path_returns_the_same_layer_states(quick_world: Path, runners: SimpleNamespace) -> None:
    import model_builders as mb

    inputs = runners.prompts[0]
    vl = mb.load_video_llava(quick_world / "models" / "video_llava", device="cuda", dtype="fp32")
    vl.use_static_cache(inputs.attention_mask.shape[1] + MAX_NEW + 8, verify_width=4, compile=True)
    ids = eagle3_layer_ids(vl.num_layers)
    vl.capture_layers(ids)
    cuda_inputs = type(inputs)(inputs.inputs_embeds.cuda(), inputs.attention_mask.cuda())
    check_passes(vl, cuda_inputs, runners.refs[0], ids)


def test_benchmark_runs_e3_from_level_names(quick_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "e2e"
    cmd = [sys.executable, str(ROOT / "benchmark_e2e_wallclock.py"), "--dataset_dir", str(quick_world / "dataset"),
           "--egpt_model", str(quick_world / "models" / "eventgpt"), "--vl_model",
           str(quick_world / "models" / "video_llava"), "--device", "cpu", "--random_adapters", "--decode_adapter",
           "E3", "B1", "--configs", "decode", "--max_samples", "2", "--max_new_tokens", "6", "--warmup", "0",
           "--repeats", "1", "--reference_profile", "none", "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1",
                                                                              "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "e2e_wallclock.json").read_text())
    assert {"decode[E3]", "decode[B1]"} <= set(result["configs"]) and result["lossless_checked"]
    assert "E3" in result["profile"]["adapter_step_ms"]
