"""No top-level module grows past 1,000 lines (the layout issue's rule: a module that long holds more than one
job); the toy world's data writer is the one exception, being data generation only."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1000
EXEMPT = {"toy_dataset.py"}


def test_no_top_level_module_exceeds_the_limit() -> None:
    long = {p.name: n for p in sorted(ROOT.glob("*.py")) if p.name not in EXEMPT
            and (n := len(p.read_text().splitlines())) > LIMIT}
    assert not long, f"over {LIMIT} lines (split by job, docs/ARCHITECTURE.md): {long}"
