"""What else could carry MiniLM's missed cells: statistics, rank cuts and the data-free path at
equal file size, on the tuning split (SST-2 training sentences 20,000-20,871) and on the dev set
the benchmark scores.

Rows: the benchmark's K-FAC statistics; input moments only (G = I); no statistics with
`--balance 0`; the adapter cut to SVD rank 2 or 3 (zero-padded back to r = 8) before coding, with
K-FAC or without statistics. Cells: retention of loss / accuracy (%), tuning split then dev set.
Every file stores the classifier head as int8 rows, as the benchmark's do.

    python -m bench.minilm_variants_check [--budgets 2200 3000 4500 6500] [--rows kfac input-only ...]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROWS = ["kfac", "input-only", "free-b0", "rank2+kfac", "rank3+kfac", "rank2+free-b0"]


def rank_cut(src: Path, dst: Path, rank: int) -> None:
    """A copy of the adapter whose every B A is its best rank-`rank` approximation (B' = U√S,
    A' = √S Vᵀ), zero-padded back to the adapter's rank."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(src / "adapter_model.safetensors"))
    out = dict(sd)
    for key, a in sd.items():
        if "lora_A" not in key:
            continue
        kb = key.replace("lora_A", "lora_B")
        u, s, vh = torch.linalg.svd(sd[kb].double() @ a.double())
        b_new, a_new = torch.zeros_like(sd[kb], dtype=torch.float64), torch.zeros_like(a, dtype=torch.float64)
        b_new[:, :rank] = u[:, :rank] * s[:rank].sqrt()
        a_new[:rank] = s[:rank].sqrt()[:, None] * vh[:rank]
        out[key], out[kb] = a_new.to(a.dtype), b_new.to(sd[kb].dtype)
    save_file(out, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import load_file, save_file

    from bench.balance_check import minilm_setup, split_cells

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[2200, 3000, 4500, 6500])
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    args = ap.parse_args(argv)
    setup = minilm_setup()
    cli, tasks, refs, adapter, kfac = setup.cli, setup.tasks, setup.refs, setup.adapter, setup.kfac
    print("| MiniLM | " + " | ".join(f"{b:,} B" for b in args.budgets) + " |")
    print("|---" * (len(args.budgets) + 1) + "|")
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        stats = load_file(str(kfac))
        save_file({k: v for k, v in stats.items() if k.endswith(".input_moment")}, str(work / "input_only.safetensors"))
        for rank in (2, 3):
            rank_cut(adapter, work / f"rank{rank}", rank)
        rows = {
            "kfac": (adapter, ["--calib", str(kfac)]),
            "input-only": (adapter, ["--calib", str(work / "input_only.safetensors")]),
            "free-b0": (adapter, ["--balance", "0"]),
            "rank2+kfac": (work / "rank2", ["--calib", str(kfac)]),
            "rank3+kfac": (work / "rank3", ["--calib", str(kfac)]),
            "rank2+free-b0": (work / "rank2", ["--balance", "0"]),
        }
        for name in args.rows:
            src, flags = rows[name]
            cells = split_cells(cli, src, args.budgets, ["--passthrough", "int8", *flags], tasks, refs, work)
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
