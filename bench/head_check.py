"""MiniLM's classifier head stored as int8 rows or coded as a layer of the spectral stream
(`--passthrough spectral`, format v6), at equal file size, on the tuning split (SST-2 training
sentences 20,000-20,871) and on the dev set the benchmark scores; with the benchmark's K-FAC
statistics (which hold the head's too) and data-free (balance 1, the default).
Cells: retention of loss / accuracy (%), tuning split then dev set. First, how much the head
itself matters: the LoRA exact, the head alone rounded to 8, 4, 3 or 2 bits per value.

    python -m bench.head_check [--budgets 1800 2200 2600 3000 4500]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import load_file

    from bench.balance_check import minilm_setup, split_cells
    from bench.baselines import _from_int_rows, _int_rows
    from bench.evaluate import retention

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[1800, 2200, 2600, 3000, 4500])
    args = ap.parse_args(argv)
    setup = minilm_setup()
    cli, tasks, refs, adapter, kfac = setup.cli, setup.tasks, setup.refs, setup.adapter, str(setup.kfac)
    rows = {
        "K-FAC, head as int8 rows": ["--calib", kfac, "--passthrough", "int8"],
        "K-FAC, head in the stream": ["--calib", kfac, "--passthrough", "spectral"],
        "data-free, head as int8 rows": ["--passthrough", "int8"],
        "data-free, head in the stream": ["--passthrough", "spectral"],
    }
    # How much the head itself matters: the LoRA exact, the head stored as the b-bit baselines'
    # "matched" coding stores it (one scale per row, max |row| / (2^(b-1) - 1)).
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    (head,) = [k for k in saved if k.endswith("classifier.weight")]
    w = saved[head]
    for bits in (8, 4, 3, 2):
        sd = {**saved, head: _from_int_rows(_int_rows(w, bits), bits, w.dtype, list(w.shape))}
        parts = ["/".join(f"{100 * v:.1f}" for v in (retention(*refs[split], task.evaluate(sd))[m] for m in task.metrics))
                 for split, task in tasks.items()]
        print(f"head alone at {bits} bits: " + ", ".join(parts), flush=True)
    print("| MiniLM | " + " | ".join(f"{b:,} B" for b in args.budgets) + " |")
    print("|---" * (len(args.budgets) + 1) + "|")
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        for name, flags in rows.items():
            cells = split_cells(cli, adapter, args.budgets, flags, tasks, refs, work)
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
