"""The committed SmolLM2 E2E adapter (tests/fixtures/smollm2_e2e_lora_r8, made by
bench/fixtures/train_smollm2_e2e.py): PEFT loads it onto the GGUF model, it has 60 LoRA modules of
rank 8, and it lowers the target-token loss on held-out E2E test pairs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.fixtures import paths  # noqa: E402

pytestmark = pytest.mark.slow  # loading the GGUF dominates (~15 s)

FIXTURE = paths.fixtures_dir() / "smollm2_e2e_lora_r8"


def test_committed_smollm2_metrics():
    m = json.loads((FIXTURE / "METRICS.json").read_text())
    assert m["rank"] == 8 and sorted(m["targets"]) == ["q_proj", "v_proj"]
    assert m["lora_eval_loss"] < m["base_eval_loss"] - 0.3, m


def test_committed_smollm2_adapter_loads_and_helps():
    try:
        paths.smollm2_dir()
        paths.e2e_dir()
    except paths.DataNotFoundError as e:
        pytest.skip(str(e))
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from bench.fixtures import train_smollm2_e2e as e2e

    torch.set_num_threads(2)
    model = PeftModel.from_pretrained(e2e.load_base_model(), str(FIXTURE)).eval()
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(lora) == 60 and all(m.r["default"] == 8 for m in lora)
    batches = e2e.eval_batches(e2e.load_tokenizer(), e2e.eval_examples()[:8])
    with model.disable_adapter():
        base = e2e.evaluate(model, batches)
    assert e2e.evaluate(model, batches) < base - 0.3
