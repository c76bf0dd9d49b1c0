"""Core errors reach Python as typed exceptions carrying the core's message."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import solar


@pytest.fixture(scope="module")
def packed(stories_adapter, stories_ckpt):
    return solar.compress(stories_adapter, stories_ckpt, pool=64, seed=5)


def test_hierarchy():
    for cls in (solar.FormatError, solar.CorruptError, solar.MismatchError, solar.InvalidInputError,
                solar.UnsupportedError, solar.SolarIOError):
        assert issubclass(cls, solar.SolarError)
    assert issubclass(solar.SolarIOError, OSError)
    assert issubclass(solar.InvalidInputError, ValueError)


def test_truncated_bytes_are_format_errors(packed):
    data = packed.to_bytes()
    for n in sorted({0, 1, 4, 8, 16, len(data) // 3, len(data) // 2, len(data) - 9, len(data) - 1}):
        with pytest.raises(solar.FormatError) as e:
            solar.load(data[:n])
        assert str(e.value).startswith("<bytes>: ") and len(str(e.value)) > len("<bytes>: ") + 5
        assert e.value.kind == "format" and e.value.where == "<bytes>"


def test_bit_flips_are_detected(packed, tmp_path):
    data = packed.to_bytes()
    # Past the header every flip is caught by the checksum.
    for pos in (len(data) // 2, len(data) - 20, len(data) - 1):
        damaged = bytearray(data)
        damaged[pos] ^= 0x04
        with pytest.raises(solar.CorruptError, match="checksum"):
            solar.load(bytes(damaged))
        path = tmp_path / "damaged.solar"
        path.write_bytes(bytes(damaged))
        with pytest.raises(solar.CorruptError) as e:
            solar.load(path)
        assert str(path) in str(e.value) and e.value.where == str(path)
    # Anywhere else, it is refused as malformed, damaged or unknown: never accepted.
    for pos in range(0, len(data), max(1, len(data) // 97)):
        for bit in (0, 7):
            damaged = bytearray(data)
            damaged[pos] ^= 1 << bit
            with pytest.raises((solar.FormatError, solar.CorruptError, solar.UnsupportedError)) as e:
                solar.load(bytes(damaged))
            assert str(e.value)


def test_wrong_base_names_the_tensor(packed, stories_ckpt):
    base = load_file(str(stories_ckpt))
    base["layers.3.attention.wv.weight"] = base["layers.3.attention.wv.weight"] + 1e-3
    with pytest.raises(solar.MismatchError, match=r"'layers\.3\.attention\.wv\.weight' differs from the base") as e:
        solar.restore(packed, base)
    assert e.value.kind == "mismatch"
    # A base without the tensor at all.
    del base["layers.3.attention.wv.weight"]
    with pytest.raises(solar.MismatchError, match=r"layers\.3\.attention\.wv"):
        solar.restore_to_dir(packed, base, "/nonexistent-dir/never-written")
    # Compressing against a base of another shape.
    base = load_file(str(stories_ckpt))
    base["layers.0.attention.wq.weight"] = torch.zeros(64, 32)
    with pytest.raises(solar.MismatchError, match=r"layers\.0\.attention\.wq"):
        solar.compress(packed_adapter_pair(stories_ckpt), base, mode="paper")


def packed_adapter_pair(stories_ckpt):
    g = torch.Generator().manual_seed(0)
    state = {
        "base_model.model.layers.0.attention.wq.lora_A.weight": torch.randn(4, 64, generator=g),
        "base_model.model.layers.0.attention.wq.lora_B.weight": torch.randn(64, 4, generator=g),
    }
    return state, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["wq"]}


def test_missing_paths_are_io_errors(stories_adapter, stories_ckpt, tmp_path):
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(solar.SolarIOError, match="no-such-adapter") as e:
        solar.compress(missing, stories_ckpt)
    assert isinstance(e.value, OSError) and e.value.kind == "io"
    with pytest.raises(solar.SolarIOError, match="no-such-base"):
        solar.compress(stories_adapter, tmp_path / "no-such-base.safetensors")
    with pytest.raises(solar.SolarIOError, match="missing.solar"):
        solar.load(tmp_path / "missing.solar")
    with pytest.raises(OSError):
        solar.restore(tmp_path / "missing.solar", stories_ckpt)


def test_bad_options_and_inputs(stories_adapter, stories_ckpt, tmp_path):
    with pytest.raises(solar.InvalidInputError, match="bits"):
        solar.compress(stories_adapter, stories_ckpt, bits=5)
    with pytest.raises(solar.InvalidInputError, match="pool"):
        solar.compress(stories_adapter, stories_ckpt, pool=0)
    with pytest.raises(ValueError, match="keep"):
        solar.compress(stories_adapter, stories_ckpt, pool=10, keep=11)
    with pytest.raises(solar.InvalidInputError, match="mode"):
        solar.compress(stories_adapter, stories_ckpt, mode="zip")

    state, config = packed_adapter_pair(stories_ckpt)
    state["base_model.model.layers.0.attention.wq.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(solar.InvalidInputError, match="NaN"):
        solar.compress((state, config), stories_ckpt)
    state, config = packed_adapter_pair(stories_ckpt)
    with pytest.raises(solar.UnsupportedError, match="IA3"):
        solar.compress((state, dict(config, peft_type="IA3")), stories_ckpt)
    with pytest.raises(solar.MismatchError, match="rank"):
        solar.compress((state, dict(config, r=8)), stories_ckpt)
    with pytest.raises(solar.UnsupportedError, match="complex"):
        solar.compress(({**state, "x.lora_A.weight": torch.zeros(2, 2, dtype=torch.complex64)}, config), stories_ckpt)

    bad_json = tmp_path / "bad-adapter"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(solar.FormatError, match="adapter_config.json"):
        solar.compress(bad_json, stories_ckpt)

    with pytest.raises(TypeError):
        solar.load(12)
    with pytest.raises(TypeError):
        solar.compress(object(), stories_ckpt)
    with pytest.raises(TypeError):
        solar.CompressedAdapter(b"not made by solar")


def test_error_messages_match_the_cli(solar_cli, stories_ckpt, tmp_path):
    import subprocess

    damaged = tmp_path / "x.solar"
    damaged.write_bytes(b"\x89SOLAR-but-not-really" * 4)
    r = subprocess.run([solar_cli, "inspect", str(damaged)], capture_output=True, text=True)
    with pytest.raises(solar.SolarError) as e:
        solar.load(damaged)
    assert r.returncode == 1
    assert r.stderr.strip() == f"solar: error: {e.value}"


def test_config_sets_are_serialised_like_peft(stories_ckpt):
    state, config = packed_adapter_pair(stories_ckpt)
    c = solar.compress((state, dict(config, target_modules={"wq"})), stories_ckpt, pool=16)
    assert c.peft_config["target_modules"] == ["wq"]
    assert json.dumps(c.peft_config)
