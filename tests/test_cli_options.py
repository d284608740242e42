"""The shared command-line features (common.py): --config defaults with the command line winning, old flag
spellings kept as aliases, one --gamma_prefill default, and the checks a 7B stage runs before it loads a
model (--dry_run). No model is loaded anywhere in this file."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import benchmark_e2e_wallclock as e2e
import benchmark_extraction as bx
import benchmark_training as bt
import extract_hidden_states as ehs
import extract_vl_lm_head as evl
import measure_feature_acceptance as mfa
import preprocess_event_images as pei
from adapter_checkpoint import save_adapter
from cli import parse_with_config
from common import UserError
from cost_model import PREFILL_WINDOW_CAP, REFERENCE_PREFILL_WINDOW
from hidden_adapter import create_adapter
from preflight import preflight
from tests.conftest import ROOT


def toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, help="a required flag")
    p.add_argument("--epochs", type=int, default=3, help="an int")
    p.add_argument("--fast", action="store_true", help="a bool")
    p.add_argument("--output_dir", "--output", dest="output_dir", default="x", help="a renamed flag")
    p.add_argument("--config", default=None, help="defaults file")
    return p


def write(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


# ----------------------------------------------------------------------------- --config


def test_config_values_are_used_and_the_command_line_wins(tmp_path):
    cfg = write(tmp_path, {"data": "d", "epochs": 7, "fast": True})
    args = parse_with_config(toy_parser(), ["--config", cfg])
    assert (args.data, args.epochs, args.fast) == ("d", 7, True)  # a required flag may come from the file
    args = parse_with_config(toy_parser(), ["--config", cfg, "--epochs", "2", "--data", "e"])
    assert (args.data, args.epochs) == ("e", 2)


def test_config_bool_false_and_old_spelling_keys(tmp_path):
    cfg = write(tmp_path, {"data": "d", "fast": False, "output": "old_name_dir"})
    args = parse_with_config(toy_parser(), ["--config", cfg])
    assert args.fast is False and args.output_dir == "old_name_dir"
    assert parse_with_config(toy_parser(), ["--config", cfg, "--fast"]).fast is True


def test_unknown_config_key_is_one_line_naming_file_and_key(tmp_path, capsys):
    cfg = write(tmp_path, {"data": "d", "epochz": 3})
    with pytest.raises(SystemExit) as exc:
        parse_with_config(toy_parser(), ["--config", cfg])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert cfg in err and "'epochz'" in err and "Traceback" not in err


def test_missing_config_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_with_config(toy_parser(), ["--config", str(tmp_path / "none.yaml"), "--data", "d"])
    assert "config file not found" in capsys.readouterr().err


def test_stage_scripts_read_config_files(tmp_path):
    cfg = write(tmp_path, {"dataset_dir": "ds", "egpt_model": "e", "vl_model": "v", "max_new_tokens": 9,
                           "teacher_forced": True, "num_frames": 6})
    args = ehs.parse_args(["--config", cfg, "--max_new_tokens", "4"])
    assert args.max_new_tokens == 4 and args.teacher_forced and args.num_frames == 6
    assert str(args.dataset_dir) == "ds"
    cfg = write(tmp_path, {"dataset_dir": "ds", "gamma_decode": 3, "configs": "synthetic"})
    args = e2e.parse_args(["--config", cfg])
    assert args.gamma_decode == 3 and args.configs == ["target", "synthetic"]
    cfg = write(tmp_path, {"checkpoint": "c", "test_data": "t", "lm_head": "h", "gamma_decode": 4})
    assert mfa.parse_args(["--config", cfg]).gamma_decode == 4


def test_shipped_configs_parse():
    import train_hidden_adapter as tha

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        args = tha.parse_args(["--config", str(path), "--adapter_level", "L1"])  # the command line wins
        assert args.train_data and args.output_dir


# ----------------------------------------------------------------------------- aliases


@pytest.mark.parametrize("parse, base, new, old, dest, value", [
    (bt.parse_args, ["--data_dir", "d"], "--adapter_level", "--level", "level", "L3"),
    (ehs.parse_args, ["--dataset_dir", "d", "--egpt_model", "e", "--vl_model", "v"], "--num_video_frames",
     "--num_frames", "num_frames", 6),
    (pei.parse_args, ["--benchmark"], "--event_frames_per_clip", "--num_frames", "num_frames", 3),
    (bx.parse_args, ["--dataset_dir", "d"], "--allow_output_mismatch", "--allow_mismatch", "allow_mismatch", True),
], ids=["benchmark_training --level", "extract --num_frames", "preprocess --num_frames", "benchmark --allow_mismatch"])
def test_old_spellings_still_work(parse, base, new, old, dest, value):
    extra = [] if value is True else [str(value)]
    assert getattr(parse([*base, new, *extra]), dest) == value
    assert getattr(parse([*base, old, *extra]), dest) == value


# ----------------------------------------------------------------------------- --gamma_prefill


def test_gamma_prefill_default_is_auto_everywhere():
    import eval_two_phase

    assert e2e.parse_args(["--dataset_dir", "d"]).gamma_prefill == PREFILL_WINDOW_CAP
    assert e2e.parse_args(["--dataset_dir", "d", "--gamma_prefill", "5"]).gamma_prefill == 5
    assert mfa.parse_args(["--checkpoint", "c", "--test_data", "t", "--lm_head", "h"]).gamma_prefill \
        == REFERENCE_PREFILL_WINDOW
    assert eval_two_phase.parse_args(["--acceptance_dir", "a", "--timings", "t"]).gamma_prefill == "auto"
    with pytest.raises(SystemExit):
        mfa.parse_args(["--checkpoint", "c", "--test_data", "t", "--lm_head", "h", "--gamma_prefill", "soon"])


# ----------------------------------------------------------------------------- checks before loading


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A data-set folder with an index, the files it names (empty) and questions: enough for the checks."""
    root = tmp_path_factory.mktemp("ds")
    (root / "test").mkdir()
    record = {"id": "c0", "sequence": "s0", "clip": 0, "video": "c0.mp4", "event_npy": "c0.npy",
              "event_image_prefix": "event_images/c0", "height": 8, "width": 8}
    (root / "test" / "index.json").write_text(__import__("json").dumps([record]))
    (root / "test" / "event_images").mkdir()
    for name in ("c0.mp4", "c0.npy", "event_images/c0_0.png"):
        (root / "test" / name).write_bytes(b"")
    (root / "questions.json").write_text('[{"question": "What is there?", "count": 3}]')
    for name, model_type in (("eventgpt", "EventChat_llama"), ("video_llava", "video_llava")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(f'{{"model_type": "{model_type}"}}')  # what the check reads
    return root


def adapter_file(tmp_path: Path, level: str) -> str:
    path = tmp_path / f"{level}.pt"
    save_adapter(path, create_adapter(level, hidden_dim=8), pairs="free")
    return str(path)


def e2e_argv(ds: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--dataset_dir", str(ds), "--egpt_model", str(ds / "eventgpt"), "--vl_model", str(ds / "video_llava"),
            "--device", "cpu", "--output_dir", str(tmp_path / "out"), *extra]


def test_e2e_dry_run_checks_adapters_against_roles_before_loading(dataset, tmp_path, capsys):
    l1, b1 = adapter_file(tmp_path, "L1"), adapter_file(tmp_path, "B1")
    args = e2e.parse_args(e2e_argv(dataset, tmp_path, "--configs", "two_phase", "--prefill_adapter", l1,
                                   "--decode_adapter", b1, "--dry_run"))
    assert e2e.main(args) == 0
    out = capsys.readouterr().out
    assert "no model loaded" in out and "L1" in out and "B1" in out
    args = e2e.parse_args(e2e_argv(dataset, tmp_path, "--configs", "prefill", "--prefill_adapter", b1, "--dry_run"))
    with pytest.raises(UserError, match="same-position"):
        e2e.main(args)
    args = e2e.parse_args(e2e_argv(dataset, tmp_path, "--configs", "decode", "--dry_run"))
    with pytest.raises(UserError, match="--decode_adapter"):
        e2e.main(args)


def test_checks_name_the_wrong_path(dataset, tmp_path):
    base = e2e_argv(dataset, tmp_path, "--configs", "synthetic", "--dry_run")
    for flag, bad, match in (("--dataset_dir", str(tmp_path / "nope"), "index"),
                             ("--egpt_model", str(tmp_path / "no_model"), "--egpt_model"),
                             ("--split", "val", "val index")):
        args = e2e.parse_args([*base, flag, bad])  # the last spelling of a flag wins
        with pytest.raises(UserError, match=match):
            preflight(args)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="not a folder"):
        preflight(e2e.parse_args([*base, "--output_dir", str(blocker / "sub")]))


def test_extract_and_lm_head_dry_runs(dataset, tmp_path, capsys):
    argv = ["--split", "test", "--dataset_dir", str(dataset), "--egpt_model", str(dataset / "eventgpt"),
            "--vl_model", str(dataset / "video_llava"), "--device", "cpu", "--output_dir", str(tmp_path / "h"),
            "--dry_run", "--vision_tower", "openai/clip-vit-large-patch14-336"]
    assert ehs.main(ehs.parse_args(argv)) == 0
    assert not (tmp_path / "h").exists()  # nothing written
    assert evl.main(evl.parse_args(["--vl_model", str(dataset / "video_llava"), "--output",
                                    str(tmp_path / "head.pt"), "--dry_run"])) == 0
    assert "would" in capsys.readouterr().out


def test_dry_run_from_the_command_line_is_one_line_on_error(dataset, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark_e2e_wallclock.py"),
                           *e2e_argv(dataset, tmp_path, "--configs", "decode", "--dry_run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--decode_adapter" in errors[0] and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- the docs' commands


def test_readme_checkpoint_path_follows_the_run_folder_layout():
    import train_hidden_adapter as tha

    readme = (ROOT / "README.md").read_text()
    # train_hidden_adapter.make_run_dir: {output_dir}/{LEVEL}_{pairs}_{YYYYmmdd_HHMMSS}/
    assert "tasks/toy/{LEVEL}_{pairs}_{time}/best_model.pt" in readme, "README says where trained adapters are"
    assert "load_adapter(" in readme
    assert "{LEVEL}_{pairs}_{YYYYmmdd_HHMMSS}" in tha.__doc__


def test_pipeline_doc_config_command_parses():
    import shlex

    import train_hidden_adapter as tha

    lines = [ln for ln in (ROOT / "docs" / "PIPELINE.md").read_text().splitlines()
             if ln.startswith("python train_hidden_adapter.py --config")]
    assert lines
    args = tha.parse_args(shlex.split(lines[0])[2:])
    assert args.level_name == "L1" and args.pairs == "free" and args.num_epochs == 4  # file + command line


def test_dry_run_names_a_clip_file_that_is_missing(dataset, tmp_path):
    video = dataset / "test" / "c0.mp4"
    video.rename(tmp_path / "moved.mp4")
    try:
        args = e2e.parse_args(e2e_argv(dataset, tmp_path, "--configs", "synthetic", "--dry_run"))
        with pytest.raises(UserError, match=r"c0\.mp4 is missing"):
            e2e.main(args)
    finally:
        (tmp_path / "moved.mp4").rename(video)


# ----------------------------------------------------------------------------- one torch thread on the CPU


@pytest.mark.parametrize(("device", "env", "threads", "expected"), [
    ("cpu", None, None, 1),            # a CPU run: one thread
    ("cpu", "3", None, "unchanged"),   # OMP_NUM_THREADS says otherwise (torch read it at start)
    ("cpu", None, 2, "unchanged"),     # the stage's own --threads sets the count in main
    ("cuda", None, None, "unchanged"),  # a GPU run is left as it is
])
def test_run_cli_gives_a_cpu_run_one_thread_unless_told_otherwise(monkeypatch, device, env, threads, expected):
    import torch

    from cli import run_cli

    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        run_cli(lambda args: seen.append(torch.get_num_threads()),
                lambda: argparse.Namespace(device=device, threads=threads))
    finally:
        torch.set_num_threads(before)
    assert seen == [1 if expected == 1 else 2]
