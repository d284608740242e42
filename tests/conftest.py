"""Shared fixtures: flat top-level modules importable, a tiny toy world built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


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
