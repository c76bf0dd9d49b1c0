"""Would an incoherence rotation (a seeded random orthogonal / Hadamard transform) help?

Quantises each layer's spectral component matrix X = U sqrt(S) (the thing the spectral mode codes)
with one uniform step, directly and after a random orthogonal rotation, and prints the summed
zeroth-order entropy of the integers and the squared error, for both fixtures' adapters.

    python -m bench.rotation_check

Measured: the rotated version costs as much or slightly more at the same error: the singular
components are already incoherent (no outliers for a rotation to spread), so solar has no
rotation option.
"""
from __future__ import annotations

import numpy as np


def _entropy_bits(q: np.ndarray) -> float:
    _, counts = np.unique(q, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def main() -> None:
    from safetensors.numpy import load_file

    from bench.fixtures.paths import fixtures_dir

    for name in ("stories260k_lora_r4", "minilm_sst2_lora_r8"):
        tensors = load_file(str(fixtures_dir() / name / "adapter_model.safetensors"))
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
        rng = np.random.default_rng(0)
        print(f"{name}: step (x rms) | plain: bytes, squared error | rotated: bytes, squared error")
        for step_rel in (0.1, 0.3, 1.0):
            tot = {"plain": [0.0, 0.0], "rotated": [0.0, 0.0]}
            for m in modules:
                b = tensors[m + ".lora_B.weight"].astype(np.float64)
                a = tensors[m + ".lora_A.weight"].astype(np.float64)
                u, s, _ = np.linalg.svd(b @ a, full_matrices=False)
                r = b.shape[1]
                x = u[:, :r] * np.sqrt(s[:r])
                step = step_rel * np.sqrt(np.mean(x ** 2))
                rot, _ = np.linalg.qr(rng.standard_normal((x.shape[0], x.shape[0])))
                for kind, v in (("plain", x), ("rotated", rot.T @ x)):
                    q = np.round(v / step)
                    tot[kind][0] += _entropy_bits(q) / 8
                    tot[kind][1] += float(np.sum((v - q * step) ** 2))
            print(f"  {step_rel:4g} | {tot['plain'][0]:8.0f} B, {tot['plain'][1]:.3g} | "
                  f"{tot['rotated'][0]:8.0f} B, {tot['rotated'][1]:.3g}")


if __name__ == "__main__":
    main()
