"""Data-free calibration for causal LMs (solar.sample_text / solar.self_calibrate) on the real
stories260K model and its trained TinyShakespeare adapter: the model writes its own calibration
text, and the statistics of it must steer the codec as real data does."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import solar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@pytest.fixture(scope="module")
def stories_peft(stories_ckpt, stories_adapter):
    from peft import PeftModel

    from bench.fixtures.stories import load_stories260k

    return PeftModel.from_pretrained(load_stories260k(stories_ckpt), str(stories_adapter)).eval()


def test_sample_text_is_seeded_and_starts_at_bos(stories_peft):
    a = solar.sample_text(stories_peft, sequences=3, length=20, bos_token_id=1, seed=5)
    b = solar.sample_text(stories_peft, sequences=3, length=20, bos_token_id=1, seed=5)
    c = solar.sample_text(stories_peft, sequences=3, length=20, bos_token_id=1, seed=6)
    assert a.shape == (3, 21) and a.dtype == torch.long
    assert bool((a[:, 0] == 1).all()) and int(a.max()) < 512 and int(a.min()) >= 0
    assert not torch.equal(a, c)
    assert torch.equal(a, b)
    assert stories_peft.training is False
    with pytest.raises(ValueError, match="bos_token_id"):
        solar.sample_text(stories_peft, sequences=1, length=4)  # llama2.c model: no config to name it
    with pytest.raises(ValueError, match="positive"):
        solar.sample_text(stories_peft, sequences=0, bos_token_id=1)


def _loss(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(windows[:, :-1])
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1)))


def test_self_calibration_keeps_more_of_the_gain_than_no_statistics(stories_ckpt, stories_adapter, stories_peft,
                                                                    tmp_path):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from bench.fixtures.stories import Tokenizer, eval_windows
    from bench.fixtures.train_stories_lora import shakespeare_splits

    torch.set_num_threads(2)
    stats = solar.self_calibrate(stories_peft, sequences=16, length=128, bos_token_id=1, seed=0,
                                 out=tmp_path / "self.safetensors")
    assert set(stats) == {f"layers.{i}.attention.{w}.{kind}" for i in range(5) for w in ("wq", "wv")
                          for kind in ("input_moment", "output_grad_moment")}
    g = stats["layers.1.attention.wv.output_grad_moment"]
    assert g.shape == (32, 32) and torch.allclose(g, g.T) and float(g.diagonal().min()) >= 0
    assert all(not p.requires_grad for n, p in stories_peft.named_parameters() if "lora_" in n)

    # Held-out text the adapter was not trained on (validation windows the benchmark does not score).
    _, val = shakespeare_splits(Tokenizer(str(stories_ckpt.parent / "tok512.bin")))
    windows = eval_windows(val, 256)[64:96]
    lora = load_file(str(stories_adapter / "adapter_model.safetensors"))
    set_peft_model_state_dict(stories_peft, {k: torch.zeros_like(v) for k, v in lora.items()})
    base_loss = _loss(stories_peft, windows)
    set_peft_model_state_dict(stories_peft, lora)
    lora_loss = _loss(stories_peft, windows)
    assert base_loss - lora_loss > 1.0  # the adapter learned something to keep

    def retention(**kw) -> float:
        packed = solar.compress(stories_adapter, None, mode="spectral", target_bytes=1100, **kw)
        assert packed.nbytes <= 1100
        set_peft_model_state_dict(stories_peft, solar.restore(packed, None))
        got = _loss(stories_peft, windows)
        set_peft_model_state_dict(stories_peft, lora)
        return (base_loss - got) / (base_loss - lora_loss)

    plain, steered = retention(), retention(calibration=tmp_path / "self.safetensors")
    # Measured on the tuning split (bench.calibration_check): ~71% without statistics, ~87% with
    # self-generated ones at this size.
    assert steered > plain + 0.05, (plain, steered)
