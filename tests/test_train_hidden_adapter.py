"""Training: loss falls for every level, exact resume, early stopping, every validation position
scored, one-line errors naming the file, self-describing outputs, YAML config, DDP over 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

import train_hidden_adapter as tha
from adapter_hub import load_hf
from common import UserError
from hidden_adapter import ADAPTER_NAMES, adapter_inputs, load_adapter
from hidden_data import ChunkStream, chunk_name, load_chunk, select_pairs
from tests.conftest import ROOT
from tests.test_hidden_data import D, make_split, write_head

CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    make_split(root / "train", 48, 16, seed=0)
    make_split(root / "val", 21, 8, seed=1)  # 8 + 8 + 5: batches of 6 straddle nothing, leave remainders
    write_head(root / "head.pt")
    return root


def flags(data: Path, out: Path, level: str, *extra: str) -> list[str]:
    return ["--train_data", str(data / "train"), "--val_data", str(data / "val"), "--adapter_level", level,
            "--output_dir", str(out), "--batch_size", "6", "--num_epochs", "3", "--learning_rate", "2e-2",
            "--lm_head", str(data / "head.pt"), "--no_progress", "--device", "cpu", *extra]


def train(*argv: str) -> dict:
    return tha.main(tha.parse_args(list(argv)))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("level", ADAPTER_NAMES)
def test_loss_falls_for_every_level(data, tmp_path, level):
    # w = 0.5 keeps an alignment term: in these synthetic pairs the target state at t+1 depends on the
    # drafter's state t+1, which a next-position adapter never sees, so prediction alone (the default
    # w = 1) has little to learn here. Which w drafts better is measured on the toy world (TRAINING.md).
    # Selected on the loss here (next-position levels default to the roll-out's accepted drafts, which
    # these random tokens barely reach), and without the token input: these tokens are the argmax of a random
    # head, so their embeddings carry nothing to learn (the token input is measured on the toy world).
    result = train(*flags(data, tmp_path, level, "--pairs", "free", "--dropout", "0", "--num_epochs", "5",
                          "--prediction_weight", "0.5", "--select_metric", "loss", "--token_input", "off"))
    history = json.loads((Path(result["run_dir"]) / "history.json").read_text())
    initial = history["initial_val"]["loss"]
    assert result["finished"] and result["best_val"]["loss"] < 0.97 * initial, (initial, result["best_val"])
    assert history["history"][-1]["train_loss"] < history["history"][0]["train_loss"]


def test_run_folder_files_and_checkpoint_description(data, tmp_path):
    result = train(*flags(data, tmp_path, "5", "--pairs", "teacher_forced"))
    run = Path(result["run_dir"])
    assert run.parent == tmp_path and run.name.startswith("L5_teacher_forced_") and len(run.name) == len(
        "L5_teacher_forced_20260101_120000")
    assert {"best_model.pt", "last.pt", "history.json", "training_curves.png", "config.yaml", "hf"} <= {
        p.name for p in run.iterdir()}
    adapter, extra = load_adapter(run / "best_model.pt", expected_level="L5", drafter_dim=D, target_dim=D)
    assert extra["pairs"] == "teacher_forced" and extra["loss_mix"] == tha.DEFAULT_LOSS_MIX
    assert extra["epoch"] == result["best_epoch"] and extra["args"]["adapter_level"] == "5"
    assert extra["data"]["models"]["target"]["config_hash"] == "bbbb"
    assert extra["data"]["train"]["num_samples"] == 48 and extra["data"]["val"]["manifest"].endswith("manifest.json")
    assert {"loss", "cos_mean", "accept@0.90", "shifted_top1", "accept_len", "rollout_accept"} <= set(
        extra["val_metrics"])
    # trained as it drafts by default: token input, roll-outs of gamma_decode steps, the token loss, selected on
    # the validation roll-out; the checkpoint says so and carries the draft-length calibration
    assert adapter.config.token_input and extra["drafting"] == {
        "token_input": True, "rollout_steps": tha.DEFAULT_ROLLOUT_STEPS, "rollout_decay": tha.DEFAULT_ROLLOUT_DECAY,
        "token_loss_weight": tha.DEFAULT_TOKEN_LOSS_WEIGHT, "loss_mix": tha.DEFAULT_LOSS_MIX,
        "prediction_weight": tha.DEFAULT_PREDICTION_WEIGHT, "spec_loss": False, "select_metric": "rollout_accept",
        "lm_head": str(data / "head.pt")}
    cal = extra["draft_calibration"]
    assert len(cal["accept"]) == 20 and sum(cal["count"]) > 0
    table = torch.load(data / "head.pt", weights_only=True)["embed_weight"].float()
    hf = load_hf(run / "hf").attach_token_table(table)
    adapter.attach_token_table(table)
    x, ids = torch.randn(2, 6, D), torch.randint(0, 10, (2, 6))
    assert torch.equal(hf(x, token_ids=ids), adapter(x, token_ids=ids))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["learning_rate"] == 2e-2 and saved["pairs"] == "teacher_forced"


# ----------------------------------------------------------------------------- resume and stopping


def test_resume_after_epoch_k_equals_an_uninterrupted_run(data, tmp_path):
    base = ("--num_epochs", "4", "--seed", "7", "--early_stopping", "0")
    whole = train(*flags(data, tmp_path / "a", "L5F", *base))
    part = train(*flags(data, tmp_path / "b", "L5F", *base, "--stop_after_epoch", "2"))
    assert not part["finished"] and part["epochs"] == 2
    resumed = train("--resume", part["run_dir"], "--no_progress")
    assert resumed["run_dir"] == part["run_dir"] and resumed["epochs"] == 4
    a, b = Path(whole["run_dir"]), Path(resumed["run_dir"])
    for name in ("best_model.pt", "last.pt"):
        wa = weights(a / name) if name == "best_model.pt" else torch.load(a / name, weights_only=True)["adapter"]
        wb = weights(b / name) if name == "best_model.pt" else torch.load(b / name, weights_only=True)["adapter"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    ha, hb = (json.loads((p / "history.json").read_text())["history"] for p in (a, b))
    assert [h["val"]["loss"] for h in ha] == [h["val"]["loss"] for h in hb]


def test_early_stopping_fires_after_patience_epochs(data, tmp_path):
    # min_delta so large that no epoch after the first counts as better
    result = train(*flags(data, tmp_path, "L1", "--num_epochs", "10", "--early_stopping", "2", "--min_delta", "1e9"))
    assert result["epochs"] == 3 and result["best_epoch"] == 1 and "early stopping" in result["stop_reason"]


def test_max_steps_stops_a_smoke_run(data, tmp_path):
    result = train(*flags(data, tmp_path, "L2", "--max_steps", "3"))
    assert result["steps"] == 3 and result["epochs"] == 1 and result["finished"]


# ----------------------------------------------------------------------------- validation covers everything


def expected_positions(folder: Path, pairs: str, predicts: str) -> int:
    total = 0
    for entry in json.loads((folder / "manifest.json").read_text())["chunks"]:
        _, mask = select_pairs(load_chunk(folder / entry["file"], expect_teacher_forced=True), pairs)
        total += int((mask[:, :-1] & mask[:, 1:]).sum() if predicts == "next" else mask.sum())
    return total


@pytest.mark.parametrize("level,pairs", [("L1", "free"), ("B1", "teacher_forced")])
def test_validation_scores_every_position_every_epoch(data, tmp_path, level, pairs):
    result = train(*flags(data, tmp_path, level, "--pairs", pairs))
    predicts = "next" if level == "B1" else "same"
    want = expected_positions(data / "val", pairs, predicts)
    history = json.loads((Path(result["run_dir"]) / "history.json").read_text())["history"]
    assert want > 0 and [h["val"]["num_positions"] for h in history] == [want] * 3
    key = "shifted_positions" if predicts == "next" else "token_positions"
    assert history[0]["val"][key] == want


def test_the_test_split_is_never_read(data, tmp_path, monkeypatch):
    read = []
    original = ChunkStream.__init__

    def spy(self, data_dir, **kw):
        read.append(Path(data_dir).name)
        original(self, data_dir, **kw)

    monkeypatch.setattr(ChunkStream, "__init__", spy)
    train(*flags(data, tmp_path, "L1", "--num_epochs", "1"))
    assert sorted(read) == ["train", "val"]


# ----------------------------------------------------------------------------- errors: one line naming the file


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_wrong_width_between_train_and_val(data, tmp_path):
    make_split(tmp_path / "wide", 4, 4, dim=D + 8)
    argv = flags(data, tmp_path / "o", "L1")
    argv[argv.index("--val_data") + 1] = str(tmp_path / "wide")
    with pytest.raises(UserError) as err:
        train(*argv)
    assert "wide" in one_line(err) and "widths" in str(err.value)


def test_wrong_level_on_resume_and_on_the_command_line(data, tmp_path):
    part = train(*flags(data, tmp_path, "L1", "--stop_after_epoch", "1"))
    with pytest.raises(SystemExit):  # a changed flag on --resume is refused unless --override
        train("--resume", part["run_dir"], "--adapter_level", "L2", "--no_progress")
    with pytest.raises(UserError) as err:
        train("--resume", part["run_dir"], "--adapter_level", "L2", "--no_progress", "--override")
    assert "last.pt is an L1 run" in one_line(err)
    with pytest.raises(SystemExit):
        tha.parse_args(flags(data, tmp_path, "L7"))


def test_truncated_missing_chunk_and_unfinished_folder(data, tmp_path):
    import shutil

    broken = tmp_path / "train"
    shutil.copytree(data / "train", broken)
    argv = flags(data, tmp_path / "o", "L1")
    argv[argv.index("--train_data") + 1] = str(broken)
    path = broken / chunk_name(0, 1)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError) as err:
        train(*argv)
    assert chunk_name(0, 1) in one_line(err) and "truncated" in str(err.value)
    path.unlink()
    with pytest.raises(UserError) as err:
        train(*argv)
    assert chunk_name(0, 1) in one_line(err) and "missing" in str(err.value)
    shutil.rmtree(broken)
    shutil.copytree(data / "train", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(UserError) as err:
        train(*argv)
    assert str(broken) in one_line(err) and "not finished" in str(err.value)


def test_cli_prints_one_error_line(data, tmp_path):
    proc = subprocess.run([sys.executable, "train_hidden_adapter.py", *flags(tmp_path, tmp_path / "o", "L1")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **CPU_ONLY_ENV})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "manifest.json" in errors[0] and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- config


def test_yaml_defaults_and_command_line_wins(data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"train_data": str(data / "train"), "val_data": str(data / "val"),
                                   "adapter_level": "L3", "batch_size": 5, "learning_rate": 0.02}))
    args = tha.parse_args(["--config", str(cfg), "--learning_rate", "0.005"])
    assert args.level_name == "L3" and args.batch_size == 5 and args.learning_rate == 0.005
    cfg.write_text(yaml.safe_dump({"adapter_levl": 3}))
    with pytest.raises(SystemExit):
        tha.parse_args(["--config", str(cfg)])


# ----------------------------------------------------------------------------- the toy world and DDP


@pytest.mark.slow
def test_cli_on_the_quick_world(quick_hidden, tmp_path):
    argv = ["--train_data", str(quick_hidden / "train"), "--val_data", str(quick_hidden / "val"),
            "--adapter_level", "L5F", "--pairs", "teacher_forced", "--num_epochs", "2",
            "--lm_head", str(quick_hidden / "vl_lm_head.pt"), "--output_dir", str(tmp_path), "--no_progress"]
    proc = subprocess.run([sys.executable, "train_hidden_adapter.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **CPU_ONLY_ENV})
    assert proc.returncode == 0, proc.stderr[-2000:]
    closing = proc.stdout.strip().splitlines()[-1]
    assert closing.startswith("L5F teacher_forced: best epoch") and "Accept@0.90" in closing
    (run,) = tmp_path.iterdir()
    _, extra = load_adapter(run / "best_model.pt", expected_level="L5F")
    manifest = json.loads((quick_hidden / "train" / "manifest.json").read_text())
    assert extra["data"]["models"] == manifest["models"]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(data, tmp_path):
    """DDP over gloo: chunks split across ranks, validation reduced to the full count, one writer."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train_hidden_adapter.py",
           *flags(data, tmp_path, "L5", "--num_epochs", "2")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **CPU_ONLY_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    history = json.loads((run / "history.json").read_text())["history"]
    assert [h["val"]["num_positions"] for h in history] == [expected_positions(data / "val", "teacher_forced",
                                                                               "next")] * 2
    # train chunks of 16 samples over 2 ranks (3 chunks): the smaller share sets the steps of both
    assert history[0]["train_samples"] > 0 and proc.stdout.count("best epoch") == 1
    # the larger share's extra batches are left out, and said so
    assert sum(h["train_samples_dropped"] for h in history) > 0 and "left out to keep the 2 processes" in proc.stdout
    assert (run / "log.txt").read_text().count("$ python ") == 1
    _, extra = load_adapter(run / "best_model.pt")
    assert extra["world_size"] == 2


def test_adapter_inputs_follow_what_the_level_consumes():
    from hidden_adapter import create_adapter

    d, t = torch.randn(1, 2, D), torch.randn(1, 2, D)
    assert adapter_inputs(create_adapter("B1", D), d, t)[0] is t
    x, kw = adapter_inputs(create_adapter("L5F", D), d, t)
    assert x is d and kw["h_target"] is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("level", ["L1", "L5F"])
def test_cuda_bf16_training_runs_and_learns(data, tmp_path, level):
    argv = flags(data, tmp_path, level, "--num_epochs", "5")
    argv[argv.index("--device") + 1] = "cuda"
    result = train(*argv)
    history = json.loads((Path(result["run_dir"]) / "history.json").read_text())
    assert result["best_val"]["loss"] < history["initial_val"]["loss"]


def test_drafting_flags_resolve_per_level_and_spec_loss_restores_the_specification(data, tmp_path, capsys):
    base = ["--train_data", str(data / "train"), "--val_data", str(data / "val"), "--output_dir", str(tmp_path)]
    head = ["--lm_head", str(data / "head.pt")]
    a = tha.parse_args([*base, *head, "--adapter_level", "B1"])
    assert (a.use_token_input, a.steps, a.ce_weight, a.select) == (True, 3, tha.DEFAULT_TOKEN_LOSS_WEIGHT,
                                                                    "rollout_accept")
    s = tha.parse_args([*base, *head, "--adapter_level", "B1", "--spec_loss"])
    assert (s.use_token_input, s.steps, s.ce_weight, s.prediction_weight, s.loss_mix, s.select) == (
        False, 1, 0.0, 0.5, "convex", "loss")
    same = tha.parse_args([*base, *head, "--adapter_level", "L3", "--rollout_steps", "4"])
    assert (same.use_token_input, same.steps, same.ce_weight, same.select) == (False, 1, 0.0, "loss")
    bare = tha.parse_args([*base, "--adapter_level", "L5F", "--token_input", "off", "--gamma_decode", "2"])
    assert (bare.use_token_input, bare.steps, bare.ce_weight, bare.select) == (False, 2, 0.0, "loss")
    spec = tha.parse_args([*base, "--adapter_level", "B1"])  # no LM head anywhere: the specification's head
    assert (spec.use_token_input, spec.ce_weight, spec.select) == (False, 0.0, "loss")
    assert "no LM head" in spec.lm_head_note and "--lm_head FILE" in spec.lm_head_note
    for argv, message in (([*base, "--adapter_level", "B1", "--token_input", "on"], "--lm_head"),
                          ([*base, *head, "--adapter_level", "L2", "--token_input", "on"], "next-position"),
                          ([*base, *head, "--adapter_level", "L1", "--spec_loss"], "next-position"),
                          ([*base, *head, "--adapter_level", "B1", "--rollout_decay", "0"], "rollout_decay"),
                          ([*base, *head, "--adapter_level", "L2", "--select_metric", "rollout_accept"],
                           "drafting roll-outs")):
        with pytest.raises(SystemExit):
            tha.parse_args(argv)
        assert message in capsys.readouterr().err


def test_spec_loss_run_trains_one_teacher_forced_step(data, tmp_path):
    result = train(*flags(data, tmp_path, "B1", "--spec_loss", "--num_epochs", "2"))
    _, extra = load_adapter(Path(result["run_dir"]) / "best_model.pt")
    assert extra["drafting"]["rollout_steps"] == 1 and extra["drafting"]["token_input"] is False
    assert extra["prediction_weight"] == 0.5 and "step2" not in json.dumps(extra["val_metrics"])


def test_resume_of_a_run_from_before_the_drafting_flags(data, tmp_path):
    """Its config.yaml lacks token_input and the roll-out flags: it trained one teacher-forced step without the
    token input, and resumes that way instead of failing on weights that do not fit."""
    part = train(*flags(data, tmp_path, "B1", "--token_input", "off", "--rollout_steps", "1",
                        "--token_loss_weight", "0", "--num_epochs", "2", "--stop_after_epoch", "1"))
    cfg = Path(part["run_dir"]) / "config.yaml"
    old = {k: v for k, v in yaml.safe_load(cfg.read_text()).items()
           if k not in ("token_input", "rollout_steps", "token_loss_weight", "rollout_decay", "gamma_decode",
                        "spec_loss")}
    cfg.write_text(yaml.safe_dump(old))
    resumed = train("--resume", part["run_dir"], "--no_progress")
    assert resumed["finished"] and resumed["epochs"] == 2


# ----------------------------------------------------------------------------- hardening (issue 18)


def test_resume_with_changed_flags_is_refused_then_overridden(data, tmp_path, capsys):
    part = train(*flags(data, tmp_path, "L1", "--stop_after_epoch", "1"))
    run = Path(part["run_dir"])
    with pytest.raises(SystemExit):
        train("--resume", str(run), "--learning_rate", "0.005", "--no_progress")
    err = capsys.readouterr().err
    assert "--learning_rate 0.02 -> 0.005" in err and "--override" in err
    # runtime flags and flags equal to the saved ones are no change
    assert tha.parse_args(["--resume", str(run), "--no_progress", "--device", "cpu", "--batch_size", "6"]).overridden \
        == {}
    assert tha.parse_args(["--resume", str(run), "--adapter_level", "l1"]).overridden == {}  # one level, two spellings
    resumed = train("--resume", str(run), "--learning_rate", "0.005", "--no_progress", "--override")
    assert resumed["finished"] and yaml.safe_load((run / "config.yaml").read_text())["learning_rate"] == 0.005
    text = (run / "log.txt").read_text()
    assert text.count("$ python ") == 2 and "--override: continuing with learning_rate 0.02 -> 0.005" in text
    assert "L1 teacher_forced: best epoch" in text  # what was printed


def test_manifest_counting_more_samples_than_a_chunk_stops_before_any_run_folder(data, tmp_path):
    import shutil

    broken = tmp_path / "train"
    shutil.copytree(data / "train", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["chunks"][2]["num_samples"] += 4
    manifest["num_samples"] += 4
    (broken / "manifest.json").write_text(json.dumps(manifest))
    argv = flags(data, tmp_path / "o", "L1")
    argv[argv.index("--train_data") + 1] = str(broken)
    with pytest.raises(UserError) as err:
        train(*argv)
    assert f"{chunk_name(0, 2)} holds 16 samples but the manifest says 20" in one_line(err)
    assert not (tmp_path / "o").exists()


def test_ddp_dropped_samples_are_counted(data):
    stream = ChunkStream(data / "train", pairs="free", batch_size=6, rank=0, world_size=2, shuffle=False)
    # 3 chunks of 16 (3 batches each): rank 0 reads two (6 batches), rank 1 one (3), so rank 0's second is left out
    assert stream.even_num_batches(0) == 3 and stream.dropped_samples(0) == 16
    single = ChunkStream(data / "train", pairs="free", batch_size=6)
    assert single.dropped_samples(0) == 0 and single.samples_in_batches(0, 0, 4) == 22


class FakeTracker:
    """Stands in for accelerate's TensorBoardTracker (tensorboard may not be installed)."""

    requires_logging_directory = True
    calls: ClassVar[list[tuple[str, object]]] = []

    def __init__(self, run_name, logging_dir):
        FakeTracker.calls.append(("init", Path(logging_dir) / run_name))

    def start(self):
        FakeTracker.calls.append(("start", None))

    def store_init_configuration(self, values):
        assert all(isinstance(v, bool | int | float | str) for v in values.values())
        FakeTracker.calls.append(("config", values))

    def log(self, values, step=None):
        FakeTracker.calls.append(("log", (step, values)))

    def finish(self):
        FakeTracker.calls.append(("finish", None))


def test_metrics_reach_the_trackers(data, tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setitem(accelerate.tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", FakeTracker)
    FakeTracker.calls = []
    args = tha.parse_args(flags(data, tmp_path, "L1", "--num_epochs", "2", "--report_to", "none"))
    assert args.trackers == []
    args.trackers = ["tensorboard"]
    result = tha.main(args)
    kinds = [c[0] for c in FakeTracker.calls]
    assert kinds == ["init", "start", "config", "log", "log", "finish"]
    assert FakeTracker.calls[0][1] == Path(result["run_dir"]) / "tensorboard"
    steps = [c[1][0] for c in FakeTracker.calls if c[0] == "log"]
    logged = [c[1][1] for c in FakeTracker.calls if c[0] == "log"]
    history = json.loads((Path(result["run_dir"]) / "history.json").read_text())["history"]
    assert steps == [1, 2] and [v["val/loss"] for v in logged] == [h["val"]["loss"] for h in history]
    assert {"train/loss", "lr", "val/accept@0.90", "val/token_top1"} <= set(logged[0])


def test_report_to_an_uninstalled_tracker_is_refused(data, tmp_path, capsys):
    from accelerate.utils import is_tensorboard_available

    assert tha.resolve_trackers("none") == []
    assert tha.resolve_trackers("auto") == (["tensorboard"] if is_tensorboard_available() else [])
    if is_tensorboard_available():
        pytest.skip("tensorboard is installed")
    with pytest.raises(SystemExit):
        tha.parse_args(flags(data, tmp_path, "L1", "--report_to", "tensorboard"))
    assert "pip install tensorboard" in capsys.readouterr().err


class FakeHub:
    calls: ClassVar[list[tuple[str, dict]]] = []

    def create_repo(self, repo_id, **kw):
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"me/{repo_id}"})()

    def upload_folder(self, **kw):
        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        FakeHub.calls.append(("upload_folder", {**kw, "files": files}))


def test_push_to_hub_uploads_the_hf_export(data, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    result = train(*flags(data, tmp_path, "L1", "--num_epochs", "1", "--push_to_hub", "--hub_model_id", "me/l1"))
    (create, upload) = FakeHub.calls
    assert create == ("create_repo", {"repo_id": "me/l1", "repo_type": "model", "exist_ok": True})
    assert upload[1]["folder_path"] == str(Path(result["run_dir"]) / "hf") and upload[1]["repo_id"] == "me/l1"
    assert {"config.json", "model.safetensors"} <= set(upload[1]["files"])
    assert result["hub_url"] == "https://huggingface.co/me/l1"

    class Offline(FakeHub):
        def create_repo(self, repo_id, **kw):
            raise OSError("no network\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(UserError) as err:
        train(*flags(data, tmp_path, "L1", "--num_epochs", "1", "--push_to_hub"))
    assert "cannot push" in one_line(err) and "no network" in str(err.value)
    with pytest.raises(SystemExit):
        tha.parse_args(flags(data, tmp_path, "L1", "--hub_model_id", "me/x"))


def test_token_input_levels_find_the_lm_head_without_the_flag(data, tmp_path):
    """The specification's commands name no --lm_head: the head is found beside the data (the file the
    pipeline writes), else read from the target model folder the extraction recorded (hash checked)."""
    import shutil

    import hidden_data

    root = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(data / split, root / split)
    base = ["--train_data", str(root / "train"), "--val_data", str(root / "val"), "--output_dir", str(tmp_path),
            "--adapter_level", "5", "--vlm_only"]
    shutil.copy(data / "head.pt", root / tha.LM_HEAD_NAME)
    beside = tha.parse_args(base)
    assert beside.lm_head == str(root / tha.LM_HEAD_NAME) and beside.use_token_input
    assert "found beside the training data" in beside.lm_head_note
    # a head of another target beside the data is passed over
    head = torch.load(data / "head.pt", weights_only=True)
    torch.save({**head, "config_hash": "another"}, root / tha.LM_HEAD_NAME)
    other = tha.parse_args(base)
    assert other.lm_head is None and not other.use_token_input
    off = tha.parse_args([*base, "--token_input", "off"])
    assert off.lm_head is None  # only token-input levels look for a head: other runs keep their defaults
    # the recorded target folder: its config.json must hash to what the manifest recorded
    folder = tmp_path / "target_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "video_llava"}')
    from model_builders import config_hash

    for split in ("train", "val"):
        manifest = json.loads((root / split / "manifest.json").read_text())
        manifest["models"]["target"].update(path=str(folder), config_hash=config_hash(folder / "config.json"))
        (root / split / "manifest.json").write_text(json.dumps(manifest))
    (root / tha.LM_HEAD_NAME).unlink()
    found = tha.parse_args(base)
    assert found.lm_head == str(folder) and found.use_token_input
    assert "read from" in found.lm_head_note
    assert hidden_data.model_hashes(json.loads((root / "train" / "manifest.json").read_text()))["target"] == \
        config_hash(folder / "config.json")
