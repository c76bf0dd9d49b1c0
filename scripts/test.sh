#!/usr/bin/env bash
# The whole test suite on a fresh machine: install, build, C++ tests (ctest), Python tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bash scripts/setup.sh
bash scripts/build.sh
echo "== C++ tests (ctest)"
(cd build && ctest --output-on-failure -j 2)
echo "== Python tests (pytest)"
python3 -m pytest -q tests/python
