"""Every stage script follows the project skeleton: parse_args(argv) -> main(args) -> __main__ guard,
every flag has help text, booleans are store_true, and importing a script has no side effects."""

from __future__ import annotations

import ast
import importlib

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(p for p in ROOT.glob("*.py") if "__main__" in p.read_text())


def add_argument_calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "add_argument"]


def test_there_are_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"hidden_adapter.py", "extract_hidden_states.py", "make_toy_world.py", "preprocess_event_images.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_skeleton_and_flags(path):
    tree = ast.parse(path.read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "parse_args" in functions and "main" in functions, f"{path.name} lacks parse_args/main"
    assert functions["parse_args"].args.args[0].arg == "argv", f"{path.name}: parse_args(argv=None)"
    assert ast.get_docstring(tree), f"{path.name} has no module docstring"
    calls = add_argument_calls(tree)
    assert calls, f"{path.name} defines no flags"
    for call in calls:
        kwargs = {k.arg: k.value for k in call.keywords}
        flag = ast.unparse(call.args[0]) if call.args else "?"
        assert "help" in kwargs, f"{path.name}: {flag} has no help text"
        if "type" in kwargs:
            assert ast.unparse(kwargs["type"]) != "bool", f"{path.name}: {flag} uses type=bool"


def flag_block_calls(tree: ast.AST) -> list[ast.Call]:
    """The add_argument calls inside a shared module's `add_*` functions (the flag blocks stages call)."""
    return [c for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name.startswith("add_")
            for c in add_argument_calls(f)]


# Shared modules whose `add_*` functions add flags for the stages (model_builders.add_model_args, cli's
# add_config_flag): every flag has help there too.
FLAG_MODULES = sorted(p for p in ROOT.glob("*.py") if p not in SCRIPTS and flag_block_calls(ast.parse(p.read_text())))


@pytest.mark.parametrize("path", FLAG_MODULES, ids=lambda p: p.name)
def test_shared_flag_blocks_have_help(path):
    for call in flag_block_calls(ast.parse(path.read_text())):
        kwargs = {k.arg: k.value for k in call.keywords}
        flag = ast.unparse(call.args[0]) if call.args else "?"
        assert "help" in kwargs, f"{path.name}: {flag} has no help text"
        if "type" in kwargs:
            assert ast.unparse(kwargs["type"]) != "bool", f"{path.name}: {flag} uses type=bool"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_import_has_no_side_effects(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    importlib.import_module(path.stem)
    assert not any(tmp_path.iterdir()), f"importing {path.name} wrote files"


# ----------------------------------------------------------------------------- one name per meaning

# Stages with more than a handful of flags take --config (cli.add_config_flag). The data helper's
# scripts (make_toy_world.py, prepare_dsec_index.py, toy_dataset.py) are listed once they have it.
CONFIG_STAGES = ("train_hidden_adapter.py", "extract_hidden_states.py", "benchmark_e2e_wallclock.py",
                 "benchmark_extraction.py", "preprocess_event_images.py", "eval_two_phase.py",
                 "measure_feature_acceptance.py", "benchmark_training.py")
# Stages that load the 7B models check everything cheap first and have --dry_run.
DRY_RUN_STAGES = ("extract_hidden_states.py", "benchmark_e2e_wallclock.py", "benchmark_extraction.py",
                  "extract_vl_lm_head.py")
# Old spellings: one meaning, one name; the old one still parses for a release.
RENAMED = {"benchmark_training.py": ("--adapter_level", "--level"),
           "extract_hidden_states.py": ("--num_video_frames", "--num_frames"),
           "preprocess_event_images.py": ("--event_frames_per_clip", "--num_frames"),
           "benchmark_extraction.py": ("--allow_output_mismatch", "--allow_mismatch")}


def option_strings(path) -> list[list[str]]:
    """The option strings of every add_argument call of a script, as written."""
    return [[ast.literal_eval(a) for a in call.args if isinstance(a, ast.Constant)]
            for call in add_argument_calls(ast.parse(path.read_text()))]


def source_of(name: str) -> str:
    return (ROOT / name).read_text()


@pytest.mark.parametrize("name", CONFIG_STAGES)
def test_many_flag_stages_take_a_config_file(name):
    text = source_of(name)
    assert "add_config_flag(" in text and ("parse_with_config(" in text or "read_config(" in text), name


@pytest.mark.parametrize("name", DRY_RUN_STAGES)
def test_model_loading_stages_check_first_and_have_dry_run(name):
    text = source_of(name)
    assert "add_dry_run_flag(" in text and "preflight(args" in text and "dry_run_report(" in text, name


@pytest.mark.parametrize("name", sorted(RENAMED))
def test_renamed_flags_keep_the_old_spelling_with_a_note(name):
    new, old = RENAMED[name]
    module = importlib.import_module(name[:-3])
    text = source_of(name)
    assert f'"{new}", "{old}"' in text, f"{name}: {new} should list {old} as an alias"
    call = next(c for c in add_argument_calls(ast.parse(text)) if c.args and ast.literal_eval(c.args[0]) == new)
    assert "alias_help" in ast.unparse(call), f"{name}: {new}'s help should say {old} is the old spelling"
    assert module.parse_args is not None


def test_aliases_always_carry_the_note():
    for path in SCRIPTS:
        for call in add_argument_calls(ast.parse(path.read_text())):
            longs = [a.value for a in call.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
            if len(longs) > 1:
                assert "alias_help" in ast.unparse(call), f"{path.name}: {longs} without the old-spelling note"


def test_flag_names_mean_one_thing(capsys):
    """--output names a file, --output_dir a folder; --num_frames, --level and --allow_mismatch survive
    only as aliases; --vision_tower is on every stage that loads EventGPT (through the shared model flags)."""
    for path in SCRIPTS + FLAG_MODULES:
        for opts in option_strings(path):
            if opts and opts[0] in ("--num_frames", "--level", "--allow_mismatch"):
                raise AssertionError(f"{path.name}: {opts[0]} is an old spelling; use the new name first")
    for name in ("extract_hidden_states", "benchmark_extraction", "benchmark_e2e_wallclock"):
        with pytest.raises(SystemExit):
            importlib.import_module(name).parse_args(["--help"])
        assert "--vision_tower" in capsys.readouterr().out, name
