"""Shared fixtures: flat top-level modules importable, a tiny toy world built once per test session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny models (no thread overhead or contention on a shared box);
    the previous count is restored after it. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make_toy_world.py --quick` (tiny data, briefly trained models) plus its event frames.

    Returns the world folder: dataset/ (with event_image/ PNGs) and models/{eventgpt,video_llava}.
    """
    import make_toy_world
    import preprocess_event_images

    out = tmp_path_factory.mktemp("quick_world")
    make_toy_world.main(make_toy_world.parse_args(["--output_dir", str(out), "--quick", "--threads", "2"]))
    status = preprocess_event_images.main(preprocess_event_images.parse_args(
        ["--dataset_dir", str(out / "dataset"), "--allow_pickle", "--num_workers", "0"]))
    assert status == 0
    return out


QUICK_T = 8  # max_new_tokens of the quick extracted data


@pytest.fixture(scope="session")
def quick_hidden(quick_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick world's paired hidden states for every split plus the target's LM head.

    Returns a folder holding `{train,val,test}/` (chunks + manifest, teacher-forced pairs included,
    2 questions per clip, `QUICK_T` positions, chunks of 4 samples) and `vl_lm_head.pt`.
    """
    import extract_hidden_states as ehs
    import extract_vl_lm_head

    out = tmp_path_factory.mktemp("quick_hidden")
    models = quick_world / "models"
    for split in ("train", "val", "test"):
        status = ehs.main(ehs.parse_args([
            "--split", split, "--chunked", "--chunk_size", "4", "--batch_size", "4", "--teacher_forced",
            "--dataset_dir", str(quick_world / "dataset"), "--output_dir", str(out / split),
            "--egpt_model", str(models / "eventgpt"), "--vl_model", str(models / "video_llava"),
            "--max_questions", "2", "--max_new_tokens", str(QUICK_T), "--device", "cpu", "--dtype", "fp32"]))
        assert status == 0, f"quick extraction of {split} failed"
    extract_vl_lm_head.main(extract_vl_lm_head.parse_args(
        ["--vl_model", str(models / "video_llava"), "--output", str(out / "vl_lm_head.pt"), "--device", "cpu"]))
    return out
