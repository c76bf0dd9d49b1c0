"""Calibration damping, checked on a tuning split rather than on the benchmark's dev set.

MiniLM + SST-2: retention (loss and accuracy) of calibrated spectral files at several byte
budgets and dampings, scored on SST-2 training sentences 20,000-20,871 (the fixture was trained
on the first 12,800, calibrated on the last 512; the benchmark scores the dev set).

    python -m bench.damping_check [--dampings 0.1 0.3 1] [--budgets 6000 7000 9000 10000]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import load_file

    from bench.calibration import ensure
    from bench.evaluate import MiniLMTask, retention
    from bench.fixtures.train_minilm_sst2 import load_sst2
    from bench.run import find_cli

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dampings", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[6000, 7000, 9000, 10000])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    task = MiniLMTask()
    tune = load_sst2("train")[20000:20872]
    lengths = [len(ids) for ids in task.tokenizer([s for s, _ in tune], truncation=True, max_length=64)["input_ids"]]
    task.dev = [tune[i] for i in sorted(range(len(tune)), key=lambda i: (lengths[i], i))]  # scored instead of dev
    lora = load_file(str(task.adapter_dir / "adapter_model.safetensors"))
    base = task.evaluate({k: torch.zeros_like(v) if "lora_" in k else v for k, v in lora.items()})
    tuned = task.evaluate(lora)
    stats, cli = ensure("minilm_sst2", earlier=True), find_cli()
    print(f"tuning split: base {base}, LoRA {tuned}")
    print("damping  budget   bytes  ret. loss  ret. accuracy")
    with tempfile.TemporaryDirectory() as td:
        for damping in args.dampings:
            for budget in args.budgets:
                subprocess.run([cli, "compress", "--adapter", str(task.adapter_dir), "--out", f"{td}/a.solar", "-q",
                                "--no-verify", "--calib", str(stats), "--calib-damping", str(damping),
                                "--target-bytes", str(budget)], check=True, stdout=subprocess.DEVNULL)
                subprocess.run([cli, "decompress", f"{td}/a.solar", "--out", f"{td}/r", "-q"], check=True,
                               stdout=subprocess.DEVNULL)
                ret = retention(base, tuned, task.evaluate(load_file(f"{td}/r/adapter_model.safetensors")))
                print(f"{damping:7g} {budget:7d} {os.path.getsize(f'{td}/a.solar'):7d} {100 * ret['loss']:9.2f}% "
                      f"{100 * ret['accuracy']:13.2f}%", flush=True)


if __name__ == "__main__":
    main()
