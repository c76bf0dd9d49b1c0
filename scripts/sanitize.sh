#!/usr/bin/env bash
# The C++ and C tests again, built with AddressSanitizer and UndefinedBehaviorSanitizer: the
# container parser and the decoders read untrusted bytes, so a memory error or undefined
# behaviour must fail the suite rather than pass by luck. Build dir: build-sanitize/.
set -euo pipefail
cd "$(dirname "$0")/.."
SAN="-fsanitize=address,undefined"
FLAGS="$SAN -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake -S . -B build-sanitize -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSOLAR_BUILD_BENCH=OFF \
  -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DCMAKE_EXE_LINKER_FLAGS="$SAN" -DCMAKE_SHARED_LINKER_FLAGS="$SAN" >/dev/null
cmake --build build-sanitize -j "$(nproc)"
cd build-sanitize
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j 2
