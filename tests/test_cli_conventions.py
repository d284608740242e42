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


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_import_has_no_side_effects(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    importlib.import_module(path.stem)
    assert not any(tmp_path.iterdir()), f"importing {path.name} wrote files"
