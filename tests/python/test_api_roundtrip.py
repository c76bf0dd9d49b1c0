"""The Python API end to end on a real PEFT adapter for the stories260K checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import solar

LOSSLESS = dict(pool=512, keep_fraction=1.0, bits=32, seed=3)  # pool = 2 x the largest factor (4 x 64)
PAPER = dict(pool=100, keep_fraction=0.3, bits=8, seed=0)


def relative_errors(original: dict, restored: dict) -> dict:
    out = {}
    for key_a in original:
        if not key_a.endswith(".lora_A.weight"):
            continue
        key_b = key_a.replace(".lora_A.weight", ".lora_B.weight")
        d1 = original[key_b].double() @ original[key_a].double()
        d2 = restored[key_b].double() @ restored[key_a].double()
        out[key_a[: -len(".lora_A.weight")]] = (torch.linalg.norm(d1 - d2) / torch.linalg.norm(d1)).item()
    return out


@pytest.fixture(scope="module")
def original(stories_adapter):
    return load_file(str(stories_adapter / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def lossless(stories_adapter, stories_ckpt):
    return solar.compress(stories_adapter, stories_ckpt, **LOSSLESS)


def test_lossless_setting_restores_BA(lossless, original, stories_ckpt):
    restored = solar.restore(lossless, stories_ckpt)
    assert list(restored) == sorted(k for k in original if ".lora_" in k) + [k for k in original if ".lora_" not in k]
    for k, t in restored.items():
        assert isinstance(t, torch.Tensor)
        assert t.dtype == original[k].dtype and t.shape == original[k].shape, k
    errors = relative_errors(original, restored)
    assert len(errors) == 10
    assert max(errors.values()) < 1e-4, errors


def test_paper_settings_beat_the_fp16_peft_file(stories_adapter, stories_ckpt, original, tmp_path):
    c = solar.compress(stories_adapter, stories_ckpt, **PAPER)
    fp16_file = tmp_path / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in original.items()}, str(fp16_file), metadata={"format": "pt"})
    report = c.report()
    assert c.nbytes == report["file_bytes"] == len(c.to_bytes())
    assert c.nbytes < report["peft_fp16_bytes"]
    assert c.nbytes < fp16_file.stat().st_size
    errors = relative_errors(original, solar.restore(c, stories_ckpt))
    assert all(0 < e < 1.5 for e in errors.values()), errors  # lossy, but an approximation


def test_save_load_and_metadata(lossless, stories_adapter, tmp_path):
    path = lossless.save(tmp_path / "a.solar")
    assert path.read_bytes() == lossless.to_bytes() == bytes(lossless)
    assert solar.load(path).to_bytes() == lossless.to_bytes()
    assert solar.load(str(path)).to_bytes() == lossless.to_bytes()
    assert solar.load(lossless.to_bytes()).to_bytes() == lossless.to_bytes()
    assert solar.load(bytearray(lossless.to_bytes())).nbytes == lossless.nbytes
    assert lossless.seed == 3 and lossless.producer == f"solar {solar.__version__}"
    assert lossless.peft_config == json.loads((stories_adapter / "adapter_config.json").read_text())

    layers = lossless.layers
    assert [l["module"] for l in layers] == sorted(
        f"layers.{i}.attention.{m}" for i in range(5) for m in ("wq", "wv"))
    wq = layers[0]
    assert wq["base_key"] == "layers.0.attention.wq.weight"
    assert wq["shape"] == [64, 64, 4] and wq["mode"] == "paper"
    assert wq["a_dtype"] == wq["b_dtype"] == "F32"
    report = lossless.report()
    assert [l["module"] for l in report["layers"]] == [l["module"] for l in layers]
    assert report["lora_params"] == sum(l["shape"][2] * (l["shape"][0] + l["shape"][1]) for l in layers)
    assert "10 layers" in repr(lossless)


def test_restore_to_dir_writes_a_peft_adapter(lossless, stories_adapter, stories_ckpt, original, tmp_path):
    out = solar.restore_to_dir(lossless, stories_ckpt, tmp_path / "restored")
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (stories_adapter / "adapter_config.json").read_text())
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    restored = load_file(str(out / "adapter_model.safetensors"))
    assert set(restored) == set(original)
    assert max(relative_errors(original, restored).values()) < 1e-4
    # Same tensors as restore() in memory.
    in_memory = solar.restore(lossless, stories_ckpt)
    for k in restored:
        assert torch.equal(restored[k], in_memory[k])


def test_in_memory_inputs_give_the_same_bytes(lossless, stories_adapter, stories_ckpt, original):
    config = json.loads((stories_adapter / "adapter_config.json").read_text())
    base_torch = load_file(str(stories_ckpt))
    base_numpy = {k: v.numpy() for k, v in base_torch.items()}
    for adapter in (stories_adapter, (original, config), ({k: v.numpy() for k, v in original.items()}, config)):
        for base in (stories_ckpt, str(stories_ckpt), base_torch, base_numpy):
            assert solar.compress(adapter, base, **LOSSLESS).to_bytes() == lossless.to_bytes()
    # Restoring against in-memory weights works too, and gives the same tensors.
    from_path = solar.restore(lossless, stories_ckpt)
    for base in (base_torch, base_numpy):
        for k, t in solar.restore(lossless, base).items():
            assert torch.equal(t, from_path[k])


def test_thread_count_does_not_change_the_output(lossless, stories_adapter, stories_ckpt):
    for threads in (1, 3):
        assert solar.compress(stories_adapter, stories_ckpt, threads=threads, **LOSSLESS).to_bytes() == lossless.to_bytes()


def test_pool_and_keep_options(stories_adapter, stories_ckpt):
    c = solar.compress(stories_adapter, stories_ckpt, pool_a=64, pool_b=32, keep=10, bits=4)
    params = c.layers[0]["params"]
    assert params["pool"] == [64, 32] and params["keep"] == [10, 10] and params["bits"] == 4
    assert solar.compress(stories_adapter, stories_ckpt, pool=50, keep_fraction=0.5).layers[0]["params"]["keep"] == [25, 25]
    assert c.nbytes < solar.compress(stories_adapter, stories_ckpt, pool_a=64, pool_b=32, keep=10, bits=8).nbytes


def test_bf16_and_fp16_adapters_round_trip_in_their_dtype(original, stories_adapter, stories_ckpt):
    config = json.loads((stories_adapter / "adapter_config.json").read_text())
    base = load_file(str(stories_ckpt))
    for dtype in (torch.bfloat16, torch.float16):
        adapter = {k: v.to(dtype) for k, v in original.items()}
        base_lp = {k: v.to(dtype) for k, v in base.items()}  # zero-copy views into these tensors
        c = solar.compress((adapter, config), base_lp, **LOSSLESS)
        assert {l["a_dtype"] for l in c.layers} == {"BF16" if dtype == torch.bfloat16 else "F16"}
        restored = solar.restore(c, base_lp)
        assert all(t.dtype == dtype for t in restored.values())
        errors = relative_errors(adapter, restored)
        assert max(errors.values()) < 2e-2, errors  # the restored factors are rounded to 16 bits
        # The fingerprint is of the base as given: the float32 checkpoint is a different W.
        with pytest.raises(solar.MismatchError, match="differs from the base"):
            solar.restore(c, stories_ckpt)


def test_peft_wrapped_model_works_as_the_base(stories_adapter, stories_ckpt, lossless):
    """A state dict with PEFT's in-place wrapping (base_layer + lora_ params) restores like the
    plain base."""
    base = load_file(str(stories_ckpt))
    wrapped = {}
    for k, v in base.items():
        if k.endswith(("attention.wq.weight", "attention.wv.weight")):
            wrapped["base_model.model." + k.replace(".weight", ".base_layer.weight")] = v
            wrapped["base_model.model." + k.replace(".weight", ".lora_A.default.weight")] = torch.zeros(4, v.shape[1])
        else:
            wrapped["base_model.model." + k] = v
    expected = solar.restore(lossless, stories_ckpt)
    for k, t in solar.restore(lossless, wrapped).items():
        assert torch.equal(t, expected[k])


def test_restore_without_torch_gives_numpy(lossless, stories_ckpt, tmp_path):
    path = lossless.save(tmp_path / "a.solar")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import numpy as np, solar
        out = solar.restore({str(path)!r}, {str(stories_ckpt)!r})
        assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in out.values())
        print(len(out), sorted(out)[0])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["20", "base_model.model.layers.0.attention.wq.lora_A.weight"]



def test_gil_is_released_while_compressing(stories_adapter, stories_ckpt):
    import threading

    done = threading.Event()
    result = {}

    def work():
        result["c"] = solar.compress(stories_adapter, stories_ckpt, pool=1500, threads=1)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    spins = 0
    while not done.is_set():  # runs only if the compressing thread let go of the GIL
        spins += 1
    t.join()
    assert result["c"].nbytes > 0
    assert spins > 1000


def test_import_is_light_and_versioned():
    from importlib.metadata import version

    assert solar.__version__ == version("solar-adapters") == "0.1.0"
    r = subprocess.run([sys.executable, "-c", "import sys, solar; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr  # the extension does not need torch


def test_restored_config_keeps_peft_pattern_semantics(stories_adapter, tmp_path):
    """PEFT takes the first rank/alpha pattern key that matches, in the file's order. A hand-written
    config with unsorted keys comes back in its own order, so PEFT gives every module the same
    alpha from the restored directory as from the original (sorted keys would give layers.0's wq
    alpha 5 instead of 2)."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    src = tmp_path / "in"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes((stories_adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((stories_adapter / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"wq": 2, "layers.0.attention.wq": 5}
    (src / "adapter_config.json").write_text(json.dumps(config, indent=2))
    packed = solar.compress(str(src), None, mode="spectral")
    solar.restore_to_dir(packed, None, tmp_path / "out")

    def alphas(directory):
        cfg = LoraConfig.from_pretrained(str(directory))
        keys = load_file(str(directory / "adapter_model.safetensors")).keys()
        modules = sorted({k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in keys if "lora_A" in k})
        return {m: cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), m), cfg.lora_alpha) for m in modules}

    original, restored = alphas(src), alphas(tmp_path / "out")
    assert original["layers.0.attention.wq"] == 2
    assert restored == original
