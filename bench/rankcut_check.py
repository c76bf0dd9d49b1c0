"""Whether cutting an adapter's rank before `spectral` coding helps (the rank cut + int4 baseline
is the strongest other method at 99% on MiniLM and SmolLM2), checked on a SmolLM2 tuning split:
the 128 E2E test pairs halfway between the ones the benchmark scores. Retention at equal bytes
(`--target-bytes`) of the adapter as it is and cut to rank 2 and 1 (truncated SVD of each B A),
without statistics and with bench/calibration.py's K-FAC statistics.

    python -m bench.rankcut_check
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BUDGETS = {"none": [16000, 24000, 32000, 48000], "K-FAC": [6000, 9000, 14000, 21000, 29000]}


def cut_adapter(src: Path, k: int, out: Path) -> Path:
    """The adapter with every B A replaced by its best rank-k approximation (same rank r, zero-padded)."""
    from safetensors.torch import load_file, save_file

    lora = load_file(str(src / "adapter_model.safetensors"))
    cut = {}
    for key, a in lora.items():
        if not key.endswith("lora_A.weight"):
            continue
        bkey = key.replace("lora_A", "lora_B")
        b = lora[bkey]
        u, s, vt = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
        a2, b2 = torch.zeros_like(a, dtype=torch.float64), torch.zeros_like(b, dtype=torch.float64)
        a2[:k], b2[:, :k] = s[:k, None].sqrt() * vt[:k], u[:, :k] * s[:k].sqrt()
        cut[key], cut[bkey] = a2.to(a.dtype), b2.to(b.dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(cut, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return out


def main() -> None:
    from bench.balance_check import references, retention_cells, tuning_task
    from bench.calibration import ensure
    from bench.run import find_cli

    torch.set_num_threads(2)
    cli = find_cli()
    task = tuning_task("smollm2_e2e")
    refs = references(task)
    print(f"smollm2_e2e, tuning split: base {refs[0]}, LoRA {refs[1]}")
    with tempfile.TemporaryDirectory() as td:
        variants = [("as trained", task.adapter_dir)] + [(f"cut to rank {k}", cut_adapter(task.adapter_dir, k, Path(td) / f"r{k}"))
                                                        for k in (2, 1)]
        for stats, extra in (("none", []), ("K-FAC", ["--calib", str(ensure("smollm2_e2e", earlier=True))])):
            print(f"\n| adapter ({stats}) | " + " | ".join(f"{b} B" for b in BUDGETS[stats]) + " |")
            print("|---|" + "---|" * len(BUDGETS[stats]))
            for label, src in variants:
                task.adapter_dir = Path(src)
                cells = retention_cells(task, cli, BUDGETS[stats], extra, refs, td)
                print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
