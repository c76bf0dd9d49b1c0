"""solar.polish (a file's integers moved against the model) on the real stories260K model and its
trained TinyShakespeare adapter: the polished file honours the budget, is the file measured, moves
integers by at most one step and never out of zero, leaves the model as it was, and keeps more of
the adapter's gain on text it never saw."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import solar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from test_refine import _kl, _next_token, _retention, splits, stories_peft  # noqa: E402,F401  (fixtures)

BUDGET = 1284


def test_polish_moves_integers_against_the_model(stories_peft, stories_adapter, splits):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    torch.set_num_threads(2)
    batches, held_out = splits
    batches = [b[:12] for b in batches]  # 24 training windows: enough to steer, quick to run
    before = {k: v.clone() for k, v in get_peft_model_state_dict(stories_peft).items()}
    with torch.no_grad():
        teacher = [torch.log_softmax(_next_token(stories_peft, b).float(), -1) for b in batches]

    packed = solar.compress(stories_adapter, None, mode="spectral", target_bytes=BUDGET, quantiser="uniform")
    polished = solar.polish(stories_peft, batches, packed, steps=100, lr=0.02, output_fn=_next_token)
    history = polished.refinement["polish"]
    assert polished.nbytes <= packed.nbytes and len(history["divergence"]) == 101
    kept = history["best"]
    # The smallest divergence among the iterates whose re-coded file fits (one that did not fit
    # may have been smaller).
    assert history["divergence"][kept] <= history["divergence"][0]
    assert set(history["layers"]) == {f"layers.{i}.attention.{w}" for i in range(5) for w in ("wq", "wv")}

    # The model is left as it was: its adapter, its parameters, nothing made trainable.
    after = get_peft_model_state_dict(stories_peft)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for n, p in stories_peft.named_parameters() if "lora_" in n)
    assert all(isinstance(m.weight, torch.nn.Parameter) for n, m in stories_peft.named_modules() if n.endswith("lora_A.default"))

    # The file kept is the one measured, and it is smaller-divergence than the encoder's own.
    set_peft_model_state_dict(stories_peft, solar.restore(polished, None))
    assert _kl(stories_peft, batches, teacher) == pytest.approx(history["divergence"][kept], rel=1e-4)
    set_peft_model_state_dict(stories_peft, solar.restore(packed, None))
    assert _kl(stories_peft, batches, teacher) == pytest.approx(history["divergence"][0], rel=1e-4)
    set_peft_model_state_dict(stories_peft, before)
    assert kept > 0 and history["moved"] > 0
    assert history["divergence"][kept] < 0.95 * history["divergence"][0], history["divergence"]

    # Integers moved by at most one step, zeros stayed zero, steps and components as they were
    # (the sign of a whole component may flip: the format fixes each X column's leading sign).
    old, new = packed._c.stream_symbols(), polished._c.stream_symbols()
    for a, b in zip(old, new):
        assert a[:4] == b[:4] and len(a) == len(b)
        a, b = torch.tensor(a[4:]), torch.tensor(b[4:])
        assert not b[a == 0].any()  # zeros stay zero (an integer may reach zero)
        assert int((a.abs() - b.abs()).abs().max()) <= 1

    # On validation text neither the adapter nor polish saw, more of the gain survives.
    retention = _retention(stories_peft, stories_adapter, held_out)
    assert retention(polished) > retention(packed) + 0.005, (retention(packed), retention(polished))


def test_polish_refuses_what_it_cannot_use(stories_peft, stories_adapter, splits):
    batches, _ = splits
    packed = solar.compress(stories_adapter, None, mode="spectral", target_bytes=BUDGET, quantiser="uniform")
    with pytest.raises(ValueError, match="polish: steps"):
        solar.polish(stories_peft, batches, packed, steps=-1, output_fn=_next_token)
    with pytest.raises(ValueError, match="lr must be positive"):
        solar.polish(stories_peft, batches, packed, lr=0, output_fn=_next_token)
    with pytest.raises(ValueError, match="over target_bytes"):
        solar.polish(stories_peft, batches, packed, target_bytes=packed.nbytes - 1, output_fn=_next_token)
    # Files of another adapter: one that lacks a layer, one whose layers are of another rank.
    import json

    from safetensors.torch import load_file

    state = load_file(str(Path(stories_adapter) / "adapter_model.safetensors"))
    config = json.loads((Path(stories_adapter) / "adapter_config.json").read_text())
    fewer = {k: v for k, v in state.items() if ".layers.4.attention.wv." not in k}
    other = solar.compress((fewer, config), None, mode="spectral", target_bytes=BUDGET, quantiser="uniform")
    with pytest.raises(ValueError, match=r"layers\.4\.attention\.wv is not in the file"):
        solar.polish(stories_peft, batches, other, steps=1, output_fn=_next_token)
    wider = {k: torch.cat([v, v], dim=0 if "lora_A" in k else 1) for k, v in state.items()}
    other = solar.compress((wider, dict(config, r=8)), None, mode="spectral", target_bytes=BUDGET, quantiser="uniform")
    with pytest.raises(ValueError, match="of rank 8, the adapter's is not"):
        solar.polish(stories_peft, batches, other, steps=1, output_fn=_next_token)
    # A trellis-coded file has no integers that can move alone: it comes back as it was.
    stats = solar.calibrate(stories_peft, [{"input_ids": b[:4]} for b in batches],
                            loss_fn=lambda m, b: torch.nn.functional.cross_entropy(
                                _next_token(m, b["input_ids"]).reshape(-1, 512), b["input_ids"][:, 1:].reshape(-1)))
    trellis = solar.compress(stories_peft, None, target_bytes=BUDGET, calibration=stats, quantiser="dependent")
    moving = [l for l, s in zip(trellis.layers, trellis._c.stream_symbols()) if len(s) > 4 and s[3] == 0]
    same = solar.polish(stories_peft, batches, trellis, steps=3, output_fn=_next_token)
    if not moving:
        assert same is trellis and same.refinement["polish"]["layers"] == []
    else:
        assert set(same.refinement["polish"]["layers"]) == {l["module"] for l in moving}
