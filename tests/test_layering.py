"""The shared modules are imported in layers (docs/ARCHITECTURE.md): every import, lazy ones inside
functions included, goes to a lower layer; common.py imports no project module; no module imports a
stage script except that stage's own benchmark; only the toy world's entry point imports the toy
modules; and there is no import cycle. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Library modules by layer: a module may import only from lower layers (docs/ARCHITECTURE.md draws this).
LAYERS: dict[str, int] = {
    "common": 0,
    "cli": 1, "timing": 1, "trackers": 1,
    "clip_data": 2, "adapter_layers": 2, "losses": 2, "metrics": 2,
    "event_frames": 3, "hidden_adapter": 3,
    "hidden_data": 4, "adapter_checkpoint": 4, "adapter_hub": 4, "cost_model": 4,
    "preflight": 5, "training_runs": 5, "vlm_runners": 5,
    "model_builders": 6,
    "drafters": 7,
    "speculative_decoding": 8, "draft_trees": 8,
    "e2e_measure": 9,
    "toy_dataset": 10, "toy_models": 10,
}
TOY = ("toy_dataset", "toy_models")
# The stage scripts: the pipeline, its benchmarks and the data/toy-world entry points. A stage imports any
# library module and no other stage, except that a benchmark imports the stage it measures.
STAGES = ("prepare_dsec_index", "make_toy_world", "preprocess_event_images", "extract_hidden_states",
          "extract_vl_lm_head", "train_hidden_adapter", "measure_feature_acceptance", "eval_two_phase",
          "benchmark_e2e_wallclock", "write_results", "benchmark_extraction", "benchmark_training",
          "benchmark_adapter_latency")
OWN_STAGE = {"benchmark_extraction": "extract_hidden_states", "benchmark_training": "train_hidden_adapter"}
TOY_USERS = ("make_toy_world",)


def project_modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(ROOT.glob("*.py"))}


def imports_of(path: Path, known: set[str]) -> dict[str, int]:
    """{project module: first line importing it}, every import statement of the file (lazy ones too)."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        for name in names:
            if name in known and name != path.stem:
                found.setdefault(name, node.lineno)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    modules = project_modules()
    return {name: imports_of(path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_place(graph):
    unplaced = sorted(set(graph) - set(LAYERS) - set(STAGES))
    assert not unplaced, f"place {unplaced} in LAYERS or STAGES (and in docs/ARCHITECTURE.md)"
    assert not set(LAYERS) & set(STAGES)
    assert not sorted(set(LAYERS) - set(graph)), "LAYERS names a module that no longer exists"


def test_common_imports_no_project_module(graph):
    assert graph["common"] == {}, f"common.py imports {sorted(graph['common'])}"


def test_library_modules_import_downward_only(graph):
    wrong = [f"{name} (layer {LAYERS[name]}) imports {dep} (layer {LAYERS.get(dep, 'stage')}) at line {line}"
             for name in LAYERS for dep, line in graph[name].items()
             if dep not in LAYERS or LAYERS[dep] >= LAYERS[name]]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_stage_but_its_own_benchmark(graph):
    wrong = [f"{name} imports the stage {dep} at line {line}" for name, deps in graph.items()
             for dep, line in deps.items() if dep in STAGES and OWN_STAGE.get(name) != dep]
    assert not wrong, "\n".join(wrong)


def test_no_real_data_path_goes_through_a_toy_module(graph):
    wrong = [f"{name} imports {dep} at line {line}" for name, deps in graph.items() for dep, line in deps.items()
             if dep in TOY and name not in (*TOY_USERS, *TOY)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle(graph):
    """Depth-first search over every import (lazy ones included); a cycle is reported as a path."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name], _ = "open", stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[name], _ = "done", stack.pop()
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
