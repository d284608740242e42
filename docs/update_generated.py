"""Regenerate the figures of the docs: each block

    <!-- generated: COMMAND @ COMMIT -->
    ...what COMMAND printed...
    <!-- /generated -->

of README.md and docs/*.md is replaced by what COMMAND (run with bash from the repository root) prints now,
and COMMIT by the commit it ran at. A figure measured by the project lives only in such a block or in a
run's RESULTS.md (tests/test_docs.py checks that no speed-up is typed anywhere else).

    python docs/update_generated.py                # every doc, the work tree committed first
    python docs/update_generated.py docs/METRICS.md --check   # exit 1 when a block is not what its command prints
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPEN = re.compile(r"^<!-- generated: (?P<command>.+) @ (?P<commit>[0-9a-f]{7,40}) -->$")
CLOSE = "<!-- /generated -->"


@dataclass
class Block:
    """One generated block: its command and commit, and the lines between its markers (0-based, exclusive)."""

    command: str
    commit: str
    start: int  # the opening marker's line
    end: int  # the closing marker's line


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(lines: list[str], where: str = "") -> list[Block]:
    """The generated blocks of a document's lines; a marker out of place raises ValueError naming the line."""
    found: list[Block] = []
    current: Block | None = None
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("<!-- generated"):
            m = OPEN.match(text)
            if m is None or current is not None:
                why = "a block opened inside another" if m else "write <!-- generated: COMMAND @ COMMIT -->"
                raise ValueError(f"{where}:{i + 1}: {why}")
            current = Block(m["command"], m["commit"], i, -1)
        elif text == CLOSE:
            if current is None:
                raise ValueError(f"{where}:{i + 1}: {CLOSE} without an opening marker")
            current.end = i
            found.append(current)
            current = None
    if current is not None:
        raise ValueError(f"{where}:{current.start + 1}: block never closed with {CLOSE}")
    return found


def run(command: str, env: dict[str, str] | None = None) -> list[str]:
    """What `command` prints (stdout), run with bash from the repository root; a failure raises."""
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{command!r} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout.rstrip("\n").splitlines()


def update(path: Path, commit: str, check: bool) -> list[str]:
    """Rerun the blocks of one doc; write it (unless `check`); returns the commands whose output changed."""
    lines = path.read_text().splitlines()
    changed = []
    for block in reversed(blocks(lines, str(path))):
        fresh = run(block.command)
        if fresh != lines[block.start + 1 : block.end]:
            changed.append(block.command)
        lines[block.start : block.end] = [f"<!-- generated: {block.command} @ {commit} -->", *fresh]
    if not check:
        path.write_text("\n".join(lines) + "\n")
    return changed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("docs", nargs="*", type=Path, help="markdown files (default README.md and docs/*.md)")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 when a block is not what its command prints now")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
    if dirty and not args.check:
        print("error: commit first, so that each block names the code that printed it", file=sys.stderr)
        return 2
    stale = 0
    for path in args.docs or docs():
        for command in update(path.resolve(), head, args.check):
            stale += 1
            print(f"{path}: {'stale' if args.check else 'updated'}: {command}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
