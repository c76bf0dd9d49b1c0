"""Statistics re-weighed with the model in the loop (`solar.reweigh`) against the statistics as
they are, at equal bytes, both with plain `compress`.

The benchmark's K-FAC statistics (bench.calibration) and the same statistics re-weighed once
(bench.calibration.ensure_reweighed: 3 rounds on 128 training windows, weights measured on files
of 1,284 B), at sizes from 1,000 to 2,600 B. Retention of the loss gain on the benchmark's
evaluation windows and on the tuning split the other checks use (bench.balance_check.tuning_task);
the layers' weights as measured.

    python -m bench.reweigh_check [--bytes 1000 1100 ...]
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BUDGETS = [1000, 1100, 1284, 1400, 1620, 1835, 2200, 2600]


def main(argv: list[str] | None = None) -> None:
    import solar
    from safetensors import safe_open

    from bench.balance_check import references, tuning_task
    from bench.calibration import ensure, ensure_reweighed
    from bench.evaluate import TASKS, retention

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bytes", type=int, nargs="+", default=BUDGETS)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = "stories260k"
    tasks = {"eval": TASKS[model](), "tuning": tuning_task(model)}
    refs = {k: references(t) for k, t in tasks.items()}
    base = str(tasks["eval"].base_path)
    plain_stats, reweighed_stats = str(ensure(model)), str(ensure_reweighed(model))
    with safe_open(reweighed_stats, "pt") as f:
        weights = json.loads(f.metadata()["solar.layer_weights"])
    print("layer weights: " + ", ".join(f"{p} {w:.2f}" for p, w in weights.items()))

    def cells(packed) -> str:
        restored = {k: v.float() for k, v in solar.restore(packed, base).items()}
        return " / ".join(f"{100 * retention(*refs[s], t.evaluate(restored))['loss']:.2f}" for s, t in tasks.items())

    adapter = tasks["eval"].adapter_dir
    print("\n| bytes | K-FAC statistics | re-weighed |")
    print("|---:|---|---|")
    for budget in args.bytes:
        plain = solar.compress(adapter, None, target_bytes=budget, calibration=plain_stats)
        steered = solar.compress(adapter, None, target_bytes=budget, calibration=reweighed_stats)
        print(f"| {budget:,} | {cells(plain)}% ({plain.nbytes:,} B) | {cells(steered)}% ({steered.nbytes:,} B) |",
              flush=True)


if __name__ == "__main__":
    main()
