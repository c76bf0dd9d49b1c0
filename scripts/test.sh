#!/usr/bin/env bash
# The whole test suite on a fresh machine: install, build, C++ and C tests (ctest), the same
# under AddressSanitizer + UndefinedBehaviorSanitizer, Python tests (pytest).
# SOLAR_SKIP_SANITIZERS=1 skips the sanitizer pass (a local shortcut; CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bash scripts/setup.sh
bash scripts/build.sh
echo "== C++ tests (ctest)"
(cd build && ctest --output-on-failure -j 2)
if [ "${SOLAR_SKIP_SANITIZERS:-0}" != 1 ]; then
  echo "== C++ and C tests under ASan + UBSan"
  bash scripts/sanitize.sh
fi
echo "== Python tests (pytest)"
python3 -m pytest -q tests/python
