#!/usr/bin/env bash
# Create .venv, install the pinned requirements, then the project itself (`pip install -e .`: its flat modules
# import from any folder, a notebook included). Idempotent: each step is skipped while its inputs are unchanged.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=shell_help.sh
source ./shell_help.sh && shell_help "$(basename "$0")" "${1:-}"  # --help: settings, then exit
PYTHON=${PYTHON:-python3.11}  # interpreter that creates .venv (python3 if python3.11 is missing)
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import torch, transformers" 2>/dev/null; }; then
  echo "setup: installing requirements into .venv (first run takes a few minutes)"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  echo "$want" > "$stamp"
  .venv/bin/python -c "import torch, torchvision, transformers; print('setup: torch', torch.__version__, '| torchvision', torchvision.__version__, '| transformers', transformers.__version__)"
fi
# The editable install lists the modules (pyproject.toml's py-modules) and points at this clone: redone when
# either changes (a few seconds).
install_stamp=.venv/.install.sha256
want=$( (cat pyproject.toml; pwd -P) | sha256sum | cut -d' ' -f1)
if [ ! -f "$install_stamp" ] || [ "$(cat "$install_stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --no-deps -e .
  echo "$want" > "$install_stamp"
fi
