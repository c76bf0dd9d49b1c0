"""Self-generated calibration statistics for the causal LMs of the benchmark: no data at all, the
fine-tuned model writes its own calibration text (``solar.self_calibrate``: 32 sequences of 256
tokens sampled from the adapted model, seed 0) and K-FAC statistics are collected on it.
Cached under bench/results/cache/ like bench/calibration.py's.

    python -m bench.self_calibration {stories260k|smollm2_e2e}
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.calibration import CACHE, cached  # noqa: E402

# Models the family applies to (causal LMs), with what sample_text needs beyond the model's config.
SELF_CALIBRATED: dict[str, dict] = {"stories260k": {"bos_token_id": 1}, "smollm2_e2e": {}}


def self_stats_path(model: str) -> Path:
    return CACHE / f"{model}_self.safetensors"


def ensure_self(model: str, task=None) -> Path:
    """The self-generated statistics file for `model`, computed once (`task`: an already built
    bench.evaluate task, to reuse its PeftModel)."""
    def make(tmp: Path) -> None:
        import solar
        from bench.evaluate import TASKS

        solar.self_calibrate((task or TASKS[model]()).model, attention_mixing=False, out=tmp, **SELF_CALIBRATED[model])

    return cached(self_stats_path(model), make)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(SELF_CALIBRATED))
    print(ensure_self(ap.parse_args().model))
