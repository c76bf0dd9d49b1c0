"""Value projections' statistics as attention sees them (`solar.calibrate(attention_mixing=True)`)
against plain K-FAC statistics, at equal bytes, both with plain `compress`.

The benchmark's K-FAC statistics (bench.calibration.ensure) and the same data's attention-mixed
ones (ensure(model, mixed=True)), each compressed at every size (MiniLM's head coded with the
layers, as in the benchmark). Retention of the fine-tuning gain (loss; MiniLM also accuracy) on the
benchmark's evaluation set and on the tuning split the other checks use
(bench.balance_check.tuning_task); last, each column's mean over the sizes.

    python -m bench.mixing_check --models stories260k [--bytes 1000 1050 ...]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BUDGETS = {"stories260k": list(range(1000, 2001, 50)),
           "minilm_sst2": [2000, 2500, 3000, 3500, 4000, 4325, 5000, 6000],
           "smollm2_e2e": [3813, 4565, 6494, 10317, 14511, 24116]}


def main(argv: list[str] | None = None) -> None:
    import solar

    from bench.balance_check import references, tuning_task
    from bench.calibration import ensure
    from bench.evaluate import TASKS, retention

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=sorted(BUDGETS), default=["stories260k"])
    ap.add_argument("--bytes", type=int, nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    for model in args.models:
        tasks = {"eval": TASKS[model](), "tuning": tuning_task(model)}
        refs = {k: references(t) for k, t in tasks.items()}
        base = str(tasks["eval"].base_path)
        files = {"K-FAC": str(ensure(model)), "attention-mixed": str(ensure(model, mixed=True))}
        options = {"passthrough": "spectral"} if model == "minilm_sst2" else {}
        metrics = [(s, m) for s, t in tasks.items() for m in t.metrics]
        sums = {name: [0.0] * len(metrics) for name in files}
        budgets = args.bytes or BUDGETS[model]
        print(f"\n{model}: retention in % ({', '.join(f'{m} {s}' for s, m in metrics)})")
        print("| bytes | " + " | ".join(files) + " |")
        print("|---:|" + "---|" * len(files))
        for budget in budgets:
            cells = []
            for name, stats in files.items():
                packed = solar.compress(tasks["eval"].adapter_dir, base, target_bytes=budget, calibration=stats, **options)
                restored = {k: v.float() for k, v in solar.restore(packed, base).items()}
                scores = {s: retention(*refs[s], t.evaluate(restored)) for s, t in tasks.items()}
                values = [100 * scores[s][m] for s, m in metrics]
                sums[name] = [a + v for a, v in zip(sums[name], values)]
                cells.append(" / ".join(f"{v:.2f}" for v in values) + f" ({packed.nbytes:,} B)")
            print(f"| {budget:,} | " + " | ".join(cells) + " |", flush=True)
        print("| mean | " + " | ".join(" / ".join(f"{v / len(budgets):.2f}" for v in sums[n]) for n in files) + " |")


if __name__ == "__main__":
    main()
