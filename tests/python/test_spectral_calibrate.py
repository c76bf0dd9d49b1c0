"""The spectral modes and output-aware calibration through the Python API, on the real
stories260K model and its trained adapter."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import solar

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))


def _delta_error(original: dict, restored: dict, balance: float) -> float:
    """The error a target bounds: sqrt(sum v_l D_l / sum v_l E_l), v_l = E_l^-balance (balance 0:
    the aggregate relative error; 1: the root mean square of the layers' relative errors)."""
    num = den = 0.0
    for key, a in original.items():
        if not key.endswith("lora_A.weight"):
            continue
        bkey = key.replace("lora_A", "lora_B")
        d1 = original[bkey].double() @ a.double()
        d2 = restored[bkey].double() @ restored[key].double()
        energy = float((d1 ** 2).sum())
        v = energy ** -balance
        num += v * float(((d1 - d2) ** 2).sum())
        den += v * energy
    return (num / den) ** 0.5


def test_spectral_meets_targets_without_a_base(stories_adapter):
    from safetensors.torch import load_file

    original = load_file(str(stories_adapter / "adapter_model.safetensors"))
    for balance in (None, 0.0):  # default: every layer's relative error counts the same (1)
        sizes = []
        for target in (0.02, 0.1, 0.3):
            packed = solar.compress(stories_adapter, None, mode="spectral", target_error=target, balance=balance)
            restored = solar.restore(packed, None)
            assert _delta_error(original, restored, 1.0 if balance is None else balance) <= target * 1.0001
            sizes.append(packed.nbytes)
        assert sizes[0] > sizes[1] > sizes[2]
    packed = solar.compress(stories_adapter, None, mode="spectral", target_bytes=1000)
    assert packed.nbytes <= 1000
    with pytest.raises(solar.InvalidInputError, match="smallest file"):
        solar.compress(stories_adapter, None, mode="spectral", target_bytes=10)
    with pytest.raises(solar.InvalidInputError, match="balance"):
        solar.compress(stories_adapter, None, mode="spectral", balance=-1)


def test_spectral_cli_and_python_write_identical_bytes(stories_adapter, solar_cli, tmp_path):
    out = tmp_path / "cli.solar"
    subprocess.run([solar_cli, "compress", "--adapter", str(stories_adapter), "--out", str(out), "--mode", "spectral",
                    "--target-error", "0.07", "-q", "--no-verify"], check=True)
    packed = solar.compress(stories_adapter, None, mode="spectral", target_error=0.07)
    assert out.read_bytes() == packed.to_bytes()
    subprocess.run([solar_cli, "compress", "--adapter", str(stories_adapter), "--out", str(out), "--mode", "spectral",
                    "--target-error", "0.07", "--balance", "0", "-q", "--no-verify"], check=True)
    absolute = solar.compress(stories_adapter, None, mode="spectral", target_error=0.07, balance=0)
    assert out.read_bytes() == absolute.to_bytes() != packed.to_bytes()


def test_inspect_shows_each_streamed_layer(stories_adapter, solar_cli, tmp_path):
    import json

    packed = solar.compress(stories_adapter, None, mode="spectral", target_bytes=1200)
    path = packed.save(tmp_path / "a.solar")
    report = packed.report()
    shares = [layer["stream"] for layer in report["layers"]]
    assert all(0 <= s["components"] <= 4 for s in shares) and any(s["components"] < 4 for s in shares)
    assert abs(sum(s["bytes"] for s in shares) - report["payload_raw_bytes"]) < 4  # one stream, shared out
    inspected = json.loads(subprocess.run([solar_cli, "inspect", "--json", str(path)], check=True,
                                          capture_output=True, text=True).stdout)
    assert [layer["stream"] for layer in inspected["layers"]] == shares
    text = subprocess.run([solar_cli, "inspect", str(path)], check=True, capture_output=True, text=True).stdout
    assert "kept 4 of 4 components" in text or "kept 3 of 4 components" in text


def test_calibrate_collects_kfac_statistics_and_they_steer_the_codec(stories_ckpt, stories_adapter, tmp_path):
    from peft import PeftModel

    from bench.fixtures.stories import Tokenizer, load_stories260k

    torch.manual_seed(0)
    model = PeftModel.from_pretrained(load_stories260k(stories_ckpt), str(stories_adapter))
    tok = Tokenizer(str(stories_ckpt.parent / "tok512.bin"))
    text = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. " * 6
    ids = torch.tensor(tok.encode(text))[None, :129]
    batches = [{"input_ids": ids}]

    def lm_loss(m, batch):
        x = batch["input_ids"]
        logits = m(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    stats = solar.calibrate(model, batches, loss_fn=lm_loss, out=tmp_path / "calib.safetensors")
    assert set(stats) == {f"layers.{i}.attention.{w}.{kind}" for i in range(5) for w in ("wq", "wv")
                          for kind in ("input_moment", "output_grad_moment")}
    assert stats["layers.0.attention.wq.input_moment"].shape == (64, 64)
    assert stats["layers.0.attention.wv.output_grad_moment"].shape == (32, 32)
    g = stats["layers.2.attention.wq.output_grad_moment"]
    assert torch.allclose(g, g.T) and float(g.diagonal().min()) >= 0 and float(g.abs().max()) > 0
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" in n), "calibrate must restore flags"

    plain = solar.compress(stories_adapter, None, mode="spectral", target_bytes=1500)
    steered = solar.compress(stories_adapter, None, mode="spectral", target_bytes=1500,
                             calibration=tmp_path / "calib.safetensors")
    assert plain.nbytes <= 1500 and steered.nbytes <= 1500
    assert plain.to_bytes() != steered.to_bytes()
    # The same statistics from memory or from the file give the same file.
    again = solar.compress(stories_adapter, None, mode="spectral", target_bytes=1500, calibration=stats)
    assert again.to_bytes() == steered.to_bytes()
    # With statistics the default quantiser ("auto") offers the trellis quantiser, and the plan
    # takes it for some layers; without them (plain) it does not. At the same target error the
    # uniform quantiser alone needs more bytes.
    quantisers = lambda packed: {layer["stream"]["quantiser"] for layer in packed.report()["layers"]}
    assert "dependent" in quantisers(steered)
    assert quantisers(plain) == {"uniform"}
    auto = solar.compress(stories_adapter, None, mode="spectral", target_error=0.3, calibration=stats)
    uniform = solar.compress(stories_adapter, None, mode="spectral", target_error=0.3, calibration=stats,
                             quantiser="uniform")
    assert quantisers(uniform) == {"uniform"} and auto.nbytes < uniform.nbytes
    with pytest.raises(solar.InvalidInputError, match="quantiser"):
        solar.compress(stories_adapter, None, mode="spectral", quantiser="lattice")


def test_calibrate_records_small_heads_and_not_large_ones():
    """`solar.calibrate` records `modules_to_save` linear heads the codec can code as layers
    (min(out, in) <= 64), with input moments over the head's own rows (one per sequence here,
    after pooling) and the same gradient divisor as the LoRA layers; a larger copy (an lm_head's
    shape) gets none: it is stored as int8 rows, and its m x m gradient moment would not fit."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(16, 72)
            self.head = torch.nn.Linear(72, 3)
            self.big = torch.nn.Linear(72, 96)  # min(out, in) = 72 > 64

        def forward(self, x, labels=None):
            h = self.body(x)                       # (batch, tokens, 72)
            logits = self.head(h.mean(1))          # pooled: one row per sequence
            loss = torch.nn.functional.cross_entropy(logits, labels) + 1e-3 * self.big(h).pow(2).mean()
            return type("Out", (), {"loss": loss, "logits": logits})()

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["body"], modules_to_save=["head", "big"], init_lora_weights=False)
    model = peft.get_peft_model(Net(), config)
    batches = [{"x": torch.randn(4, 5, 16), "labels": torch.randint(0, 3, (4,))} for _ in range(3)]
    stats = solar.calibrate(model, batches)
    assert set(stats) == {"body.input_moment", "body.output_grad_moment", "head.input_moment", "head.output_grad_moment"}
    pooled = torch.cat([model.base_model.model.body(b["x"]).mean(1) for b in batches]).double()
    expected = (pooled.T @ pooled / pooled.shape[0]).float()  # 12 sequences, not 60 tokens
    torch.testing.assert_close(stats["head.input_moment"], expected, rtol=1e-4, atol=1e-6)
    assert stats["head.output_grad_moment"].shape == (3, 3)


def test_calibrate_first_order_is_the_weights_gradient_and_the_curvature_along_the_adapter(tmp_path):
    """`update_gradient` is the mean over batches of dL/dW for each LoRA layer's weight (padded
    rows left out), as autograd computes it on the base weight; `solar.loss_curvature` is the
    central second difference of the mean loss with every LoRA update scaled by 1 +- 0.1. Both
    are left out with first_order=False, and a head gets no gradient (it is coded whole)."""
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(16, 24)
            self.head = torch.nn.Linear(24, 3)

        def forward(self, x, attention_mask, labels=None):
            h = torch.tanh(self.body(x)) * attention_mask[..., None]
            logits = self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))
            return type("Out", (), {"loss": F.cross_entropy(logits, labels), "logits": logits})()

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["body"], modules_to_save=["head"], init_lora_weights=False)
    model = peft.get_peft_model(Net(), config)
    masks = [torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]) for _ in range(3)]
    batches = [{"x": torch.randn(4, 5, 16), "attention_mask": m, "labels": torch.randint(0, 3, (4,))} for m in masks]
    stats = solar.calibrate(model, batches, first_order=True)
    assert set(stats) == {"body.input_moment", "body.output_grad_moment", "body.update_gradient",
                          "head.input_moment", "head.output_grad_moment", "solar.loss_curvature"}

    weight = model.base_model.model.body.base_layer.weight
    weight.requires_grad_(True)
    total = torch.zeros_like(weight)
    for b in batches:
        weight.grad = None
        model(**b).loss.backward()
        total += weight.grad
    weight.requires_grad_(False)
    torch.testing.assert_close(stats["body.update_gradient"], total / len(batches), rtol=1e-4, atol=1e-7)

    lora_b = model.base_model.model.body.lora_B["default"].weight
    def mean_loss(factor):
        original = lora_b.detach().clone()
        with torch.no_grad():
            lora_b.mul_(factor)
            loss = sum(float(model(**b).loss) for b in batches) / len(batches)
            lora_b.copy_(original)
        return loss
    expected = (mean_loss(1.1) + mean_loss(0.9) - 2 * mean_loss(1.0)) / 0.01
    assert expected > 0
    # float32 losses: their second difference is good to ~1e-5 here
    assert float(stats["solar.loss_curvature"]) == pytest.approx(expected, rel=2e-3)
    assert model.base_model.model.body.scaling["default"] == 2.0, "calibrate must restore the scaling"
    assert "body.update_gradient" not in solar.calibrate(model, batches)  # off by default

    # The codec takes them from memory or from the file alike.
    from safetensors.torch import save_file

    path = tmp_path / "first_order.safetensors"
    save_file(stats, str(path))
    in_memory = solar.compress(model, None, mode="spectral", target_error=0.2, calibration=stats)
    assert in_memory.to_bytes() == solar.compress(model, None, mode="spectral", target_error=0.2, calibration=path).to_bytes()
    stats.pop("solar.loss_curvature")
    with pytest.raises(solar.MismatchError, match="solar.loss_curvature"):
        solar.compress(model, None, mode="spectral", target_error=0.2, calibration=stats)

    # An adapter that does not move the loss (B = 0, PEFT's initialisation) has no curvature to
    # convert with: the first-order entries are left out, with a warning.
    untrained = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["body"]))
    with pytest.warns(UserWarning, match="curvature along the adapter is 0"):
        plain = solar.calibrate(untrained, batches, first_order=True)
    assert set(plain) == {"body.input_moment", "body.output_grad_moment"}
