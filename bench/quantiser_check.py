"""Dependent (trellis-coded) quantisation against the uniform quantiser alone, checked on tuning
splits rather than on the benchmark's evaluation sets: retention at equal file size
(`--target-bytes`) with `--quantiser uniform` and `--quantiser dependent` (the plan picks uniform
or trellis per layer). At equal *metric* error dependent files are 2-7% smaller; this checks
whether the bytes saved buy held-out retention (it decided `--quantiser auto`: dependent with
calibration statistics only). Tuning splits as in bench/balance_check.py (stories260K: the validation
windows the benchmark does not score; MiniLM: SST-2 training sentences 20,000-20,871; SmolLM2:
the 128 E2E test pairs halfway between the scored ones).

    python -m bench.quantiser_check [--models stories260k minilm_sst2 smollm2_e2e] [--statistics self]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUDGETS = {"stories260k": [1100, 1300, 1500, 1800, 2100], "minilm_sst2": [4500, 5500, 7000, 9000],
           "smollm2_e2e": [6000, 9000, 14000, 21000, 29000]}


def statistics(model: str, task=None) -> list[tuple[str, list[str]]]:
    """The (label, CLI flags) of the statistics each model is checked with: none, K-FAC from data,
    and for the causal LMs the self-generated ones (`solar.self_calibrate`)."""
    from bench.calibration import ensure
    from bench.self_calibration import SELF_CALIBRATED, ensure_self

    own = [("self", ["--calib", str(ensure_self(model, task))])] if model in SELF_CALIBRATED else []
    if model == "smollm2_e2e":  # ~40 s per calibrated point: no plain row
        return [("K-FAC", ["--calib", str(ensure(model, earlier=True))])] + own
    return [("none", []), ("K-FAC", ["--calib", str(ensure(model, earlier=True))])] + own


def main(argv: list[str] | None = None) -> None:
    from bench.balance_check import print_tuning_tables

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories260k", "minilm_sst2", "smollm2_e2e"])
    ap.add_argument("--statistics", nargs="+", default=None, help="only these rows: none, K-FAC, self")
    args = ap.parse_args(argv)

    def rows(model, task):
        for label, extra in statistics(model, task):
            if args.statistics and label not in args.statistics:
                continue
            for quantiser in ("uniform", "dependent"):
                yield [label, quantiser], ["--quantiser", quantiser, *extra]

    print_tuning_tables(args.models, BUDGETS, ["statistics", "quantiser"], rows)


if __name__ == "__main__":
    main()
