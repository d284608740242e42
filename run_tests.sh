#!/usr/bin/env bash
# Set up (if needed) and run the CPU test suite. Extra arguments go to pytest, e.g. `bash run_tests.sh -k adapter`.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
.venv/bin/python -m pytest -q "$@"
