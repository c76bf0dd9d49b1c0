#!/usr/bin/env bash
# Builds the C++ library, CLI, tests and benchmarks into build/ (CMake + Ninja).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
