#!/usr/bin/env bash
# Set up (if needed) and run the CPU test suite. Extra arguments go to pytest, e.g. `bash run_tests.sh -k adapter`.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=shell_help.sh
source ./shell_help.sh && shell_help "$(basename "$0")" "${1:-}"  # --help: settings, then exit
bash setup.sh
.venv/bin/python -m pytest -q "$@"
