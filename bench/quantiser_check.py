"""Dependent (trellis-coded) quantisation against the uniform quantiser alone, checked on tuning
splits rather than on the benchmark's evaluation sets: retention at equal file size
(`--target-bytes`) with `--quantiser uniform` and `--quantiser dependent` (the plan picks uniform
or trellis per layer). At equal *metric* error dependent files are 2-7% smaller; this checks
whether the bytes saved buy held-out retention (it decided `--quantiser auto`: dependent with
calibration statistics only). Tuning splits as in bench/balance_check.py (stories260K: the validation
windows the benchmark does not score; MiniLM: SST-2 training sentences 20,000-20,871; SmolLM2:
the 128 E2E test pairs halfway between the scored ones).

    python -m bench.quantiser_check [--models stories260k minilm_sst2 smollm2_e2e]
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BUDGETS = {"stories260k": [1100, 1300, 1500, 1800, 2100], "minilm_sst2": [4500, 5500, 7000, 9000],
           "smollm2_e2e": [6000, 9000, 14000, 21000, 29000]}


def statistics(model: str) -> list[tuple[str, list[str]]]:
    """The (label, CLI flags) of the statistics each model is checked with."""
    from bench.calibration import ensure

    if model == "smollm2_e2e":  # ~40 s per calibrated point: the winning family only
        return [("K-FAC", ["--calib", str(ensure(model))])]
    return [("none", []), ("K-FAC", ["--calib", str(ensure(model))])]


def main(argv: list[str] | None = None) -> None:
    from bench.balance_check import print_table_head, references, retention_cells, tuning_task
    from bench.run import find_cli

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories260k", "minilm_sst2", "smollm2_e2e"])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cli = find_cli()
    for model in args.models:
        task = tuning_task(model)
        refs = references(task)
        print_table_head(model, refs, ["statistics", "quantiser"], BUDGETS[model])
        with tempfile.TemporaryDirectory() as td:
            for label, extra in statistics(model):
                for quantiser in ("uniform", "dependent"):
                    cells = retention_cells(task, cli, BUDGETS[model], ["--quantiser", quantiser, *extra], refs, td)
                    print(f"| {label} | {quantiser} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
