#!/usr/bin/env bash
# Download, on this machine, the wheels the GPU machine lacks into .whl/ (about 53 MB, under the device's
# 64 MiB transfer cap): transformers 5.24 (its python has 5.17, without `cache=`), regex (5.24 wants a
# newer one), PyAV (the toy world's videos) and torchao (the int8_ao / int4_ao paths). Its python is
# CPython 3.12 on x86-64; timings/gpu_check.sh installs whatever lies in .whl/ before its first step.
#   bash timings/gpu_wheels.sh        then carry .whl with the checkout (device `carry: [".whl"]`)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
PY=${PY:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "transformers>=5.24,<5.25" "regex>=2025.10.22" "av>=12.0" "torchao>=0.18,<0.19"
ls -la .whl
du -sh .whl
