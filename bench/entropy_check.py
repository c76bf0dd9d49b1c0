"""How much an entropy model could still save: a spectral file's coded integers against what ideal
memoryless models of each column would spend on them.

    python -m bench.entropy_check [--file F.solar ...]

Without --file, writes the stories260K calibrated file of the README's example (--target-error 0.3,
K-FAC statistics from bench/calibration.py) and the MiniLM and SmolLM2 calibrated files at their
benchmark budgets. The integers are read by the independent decoder written from docs/FORMAT.md
(tests/python/test_format_portable.py). For each column (and, for the trellis quantiser, each
pair of states, which the format codes with separate models) it prices the integers with

- its empirical entropy: the best any static model of that column could do, with the model for
  free (a bound no real coder reaches);
- a sequential Krichevsky–Trofimov estimate over the column's own alphabet (an ideal adaptive
  model of that column alone, its alphabet known for free);
- a discretised Laplace law fitted to the column, plus 8 bits per column for its scale;

and prints them against the stream's real size. Not a bound on every coder (a model with memory
across columns could in principle do better), but the gap says what better adaptation alone can
buy.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _portable():
    spec = importlib.util.spec_from_file_location("format_portable", ROOT / "tests" / "python" / "test_format_portable.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _empirical_bits(values: list[int]) -> float:
    n = len(values)
    return -sum(c * math.log2(c / n) for c in Counter(values).values()) if n else 0.0


def _kt_bits(values: list[int]) -> float:
    """Sequential KT code length: each value at (count + 1/2) / (seen + A/2), A the column's alphabet."""
    alphabet = len(set(values))
    counts: Counter = Counter()
    bits = 0.0
    for t, v in enumerate(values):
        bits -= math.log2((counts[v] + 0.5) / (t + alphabet / 2))
        counts[v] += 1
    return bits


def _laplace_bits(values: list[int]) -> float:
    """Integers under a discretised Laplace law P(v) ∝ θ^|v| with the ML θ, plus 8 bits for θ."""
    if not values:
        return 0.0
    mean_abs = sum(abs(v) for v in values) / len(values)
    if mean_abs == 0:
        return 8.0
    # P(v) = (1-θ)/(1+θ) θ^|v|; the ML θ solves E|v| = 2θ/(1-θ²).
    theta = (math.sqrt(1 + mean_abs * mean_abs) - 1) / mean_abs
    log_norm = math.log2((1 - theta) / (1 + theta))
    return 8.0 - sum(log_norm + abs(v) * math.log2(theta) for v in values)


def column_groups(fmt, data: bytes) -> tuple[list[list[int]], int]:
    """Every coded column split by the model class that codes it; and the stream's size in bytes."""
    version, meta, payload = fmt.parse(data)
    groups: list[list[int]] = []
    original = fmt.read_columns

    def recording(d, m0, m1, dependent, rows, k, positive_lead=False):
        cols = original(d, m0, m1, dependent, rows, k, positive_lead)
        for col in cols:
            if not dependent:
                groups.append(col)
                continue
            low, high, s = [], [], 0
            for v in col:
                (high if s >= 2 else low).append(v)
                s = fmt.NEXT[s][v & 1]
            groups.extend([low, high])
        return cols

    fmt.read_columns = recording
    try:
        fmt.decode_spectral(version, meta, payload)
    finally:
        fmt.read_columns = original
    spectral = [layer for layer in meta["layers"] if layer["mode"] == "spectral"]
    return groups, spectral[0]["blobs"][0]


def default_files(out: Path) -> list[tuple[str, Path]]:
    from bench.calibration import ensure

    cli = str(ROOT / "build" / "solar")
    jobs = [
        ("stories260K, t = 0.3", "stories260k", ["--target-error", "0.3"], "stories260k_lora_r4", []),
        ("MiniLM, 4,325 B", "minilm_sst2", ["--target-bytes", "4325"], "minilm_sst2_lora_r8", ["--passthrough", "spectral"]),
        ("SmolLM2, 6,500 B", "smollm2_e2e", ["--target-bytes", "6500"], "smollm2_e2e_lora_r8", []),
    ]
    files = []
    for label, model, target, adapter, extra in jobs:
        path = out / f"{model}.solar"
        subprocess.run([cli, "compress", "--adapter", str(ROOT / "tests" / "fixtures" / adapter), "--out", str(path),
                        "--calib", str(ensure(model)), *target, *extra, "-q"], check=True, capture_output=True)
        files.append((label, path))
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", action="append", default=[], help=".solar files to check (default: see above)")
    args = ap.parse_args()
    fmt = _portable()
    with tempfile.TemporaryDirectory() as tmp:
        files = [(f, Path(f)) for f in args.file] or default_files(Path(tmp))
        print("| file | stream | empirical entropy per column | KT-adaptive per column | Laplace per column (+8 bits each) | integers |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for label, path in files:
            groups, stream = column_groups(fmt, path.read_bytes())
            emp = sum(_empirical_bits(g) for g in groups) / 8
            kt = sum(_kt_bits(g) for g in groups) / 8
            lap = sum(_laplace_bits(g) for g in groups) / 8
            n = sum(len(g) for g in groups)
            print(f"| {label} | {stream:,} B | {emp:,.0f} B ({emp / stream:.1%}) | {kt:,.0f} B ({kt / stream:.1%}) "
                  f"| {lap:,.0f} B ({lap / stream:.1%}) | {n:,} |")


if __name__ == "__main__":
    main()
