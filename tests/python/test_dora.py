"""DoRA adapters (format v7): a real trained DoRA adapter (tests/fixtures/stories260k_dora_r4, PEFT
use_dora=True) compresses with its magnitudes coded against the base's row norms, restores to a
directory that real PEFT loads, and the restored model is the adapted one within the codec's error.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import solar
from conftest import FIXTURES

DORA = FIXTURES / "stories260k_dora_r4"
MAG = ".lora_magnitude_vector"


@pytest.fixture(scope="module")
def dora_models(stories_ckpt):
    from peft import PeftModel

    from bench.fixtures.stories import load_stories260k

    def load(adapter_dir):
        return PeftModel.from_pretrained(load_stories260k(stories_ckpt), str(adapter_dir)).eval()

    return load


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_real_dora_adapter_round_trips_through_peft(stories_ckpt, dora_models, tmp_path):
    packed = solar.compress(DORA, stories_ckpt, target_error=0.05)
    report = packed.report()
    assert report["version"] == 7 and report["passthrough_magnitude_tensors"] == 10
    exact = solar.compress(DORA, stories_ckpt, target_error=0.05, dora_magnitudes="exact")
    assert exact.report()["passthrough_magnitude_tensors"] == 0
    # The exact magnitudes (10 F32 vectors, 1,920 B raw) are most of the difference.
    assert packed.nbytes + 800 < exact.nbytes, (packed.nbytes, exact.nbytes)

    out = solar.restore_to_dir(solar.load(packed.to_bytes()), stories_ckpt, tmp_path / "restored")
    original, restored = load_file(str(DORA / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert sorted(original) == sorted(restored)
    for key in (k for k in original if k.endswith(MAG)):
        assert restored[key].dtype == original[key].dtype and restored[key].shape == original[key].shape
        rel = float((restored[key] - original[key]).norm() / original[key].norm())
        assert rel < 0.05, (key, rel)

    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    model = dora_models(DORA)
    want, got = _logits(model, ids), _logits(dora_models(out), ids)
    with model.disable_adapter():
        base = _logits(model, ids)
    # The restored model's logits move as the adapter's do, up to the codec's error.
    err = float((got - want).norm() / (want - base).norm())
    assert err < 0.2, err


def test_coded_magnitudes_keep_more_than_exact_ones_at_equal_bytes(stories_ckpt):
    """At the same file size the bytes exact magnitudes take are the layers' loss: the restored
    update (LoRA and magnitudes, in weight units) is nearer the trained one with them coded."""
    base = load_file(str(stories_ckpt))
    original = load_file(str(DORA / "adapter_model.safetensors"))
    scaling = 8 / 4

    def weight_error(adapter: dict) -> float:
        num = den = 0.0
        for key in (k for k in original if k.endswith(MAG)):
            module = key[len("base_model.model."):-len(MAG)]
            w = base[module + ".weight"].double()

            def adapted(t):
                v = w + scaling * t[f"base_model.model.{module}.lora_B.weight"].double() @ t[f"base_model.model.{module}.lora_A.weight"].double()
                return t[key].double()[:, None] * v / v.norm(dim=1, keepdim=True)

            ref = adapted(original)
            num += float((adapted(adapter) - ref).pow(2).sum())
            den += float((ref - w).pow(2).sum())
        return math.sqrt(num / den)

    errors = {}
    for mags in ("coded", "exact"):
        packed = solar.compress(DORA, stories_ckpt, target_bytes=3000, dora_magnitudes=mags)
        assert packed.nbytes <= 3000
        errors[mags] = weight_error(solar.restore(packed, stories_ckpt))
    assert errors["coded"] < 0.5 * errors["exact"], errors


def test_coded_magnitudes_need_the_base(stories_ckpt):
    packed = solar.compress(DORA, stories_ckpt, target_error=0.1)
    with pytest.raises(solar.SolarError, match="DoRA magnitude of module layers.0.attention.wq"):
        solar.restore(packed, None)
    # Without a base at compress time they stay exact (and the file restores without one).
    assert packed.report()["needs_base"] and packed.report()["needs_base_for"] == "DoRA magnitudes"
    free = solar.compress(DORA, None, target_error=0.1)
    assert free.report()["passthrough_magnitude_tensors"] == 0 and not free.report()["needs_base"]
    restored = solar.restore(free, None)
    original = load_file(str(DORA / "adapter_model.safetensors"))
    key = next(k for k in original if k.endswith(MAG))
    assert torch.equal(restored[key], original[key])


def test_real_minilm_dora_adapter_with_its_head_round_trips_through_peft(tmp_path):
    """MiniLM r=8 DoRA with a trained classifier head (modules_to_save), head coded in the stream:
    real PEFT loads the restored directory and its logits follow the adapted model's."""
    from peft import PeftModel

    from bench.fixtures.paths import minilm_dir
    from bench.fixtures.train_minilm_sst2 import load_base_model, load_tokenizer

    adapter = FIXTURES / "minilm_sst2_dora_r8"
    packed = solar.compress(adapter, minilm_dir(), target_bytes=9000, passthrough="spectral")
    report = packed.report()
    assert packed.nbytes <= 9000 and report["passthrough_magnitude_tensors"] == 12
    out = solar.restore_to_dir(packed, minilm_dir(), tmp_path / "restored")
    enc = load_tokenizer()(["a gorgeous, witty film", "flat and lifeless"], padding=True, return_tensors="pt")
    models = [PeftModel.from_pretrained(load_base_model(), str(d)).eval() for d in (adapter, out)]
    with torch.no_grad():
        want, got = (m(**enc).logits for m in models)
        with models[0].disable_adapter():
            frozen = models[0](**enc).logits
    assert float((got - want).norm() / (want - frozen).norm()) < 0.25
    assert torch.equal(got.argmax(-1), want.argmax(-1))
