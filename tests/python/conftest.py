"""Shared fixtures for the Python tests: real data locations, the stories260K adapter, the CLI."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the Hugging Face hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def data_dir() -> Path | None:
    """SOLAR_DATA_DIR, else <repo>/../shared/data; None when absent."""
    env = os.environ.get("SOLAR_DATA_DIR")
    d = (Path(env) if env else REPO.parent / "shared" / "data").resolve()
    return d if d.is_dir() else None


@pytest.fixture(scope="session")
def stories_ckpt() -> Path:
    d = data_dir()
    if d is None:
        pytest.skip("shared real data absent (set SOLAR_DATA_DIR or put it at <repo>/../shared/data)")
    p = d / "models" / "stories260K" / "stories260K.safetensors"
    if not p.is_file():
        pytest.skip(f"stories260K checkpoint absent: {p}")
    return p


def _write_hand_made_adapter(out: Path, ckpt: Path) -> Path:
    """A PEFT LoRA adapter (r=4 on wq, wv of every layer) for stories260K, built by hand with
    non-zero A and B, in PEFT's exact key layout and file format."""
    import torch
    from safetensors.torch import load_file, save_file

    base = load_file(str(ckpt))
    layers = sorted({int(k.split(".")[1]) for k in base if k.startswith("layers.")})
    g = torch.Generator().manual_seed(1234)
    tensors = {}
    for i in layers:
        for m in ("wq", "wv"):
            out_f, in_f = base[f"layers.{i}.attention.{m}.weight"].shape
            p = f"base_model.model.layers.{i}.attention.{m}"
            tensors[p + ".lora_A.weight"] = torch.randn(4, in_f, generator=g) / in_f**0.5
            tensors[p + ".lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.05
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["wq", "wv"],
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "task_type": None,
        "base_model_name_or_path": None, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


@pytest.fixture(scope="session")
def stories_adapter(stories_ckpt, tmp_path_factory) -> Path:
    """The committed trained adapter tests/fixtures/stories260k_lora_r4 when present, else a
    hand-made one with the same layout."""
    committed = FIXTURES / "stories260k_lora_r4"
    if (committed / "adapter_model.safetensors").is_file() and (committed / "adapter_config.json").is_file():
        return committed
    return _write_hand_made_adapter(tmp_path_factory.mktemp("stories_adapter"), stories_ckpt)


def _is_solar_cli(path: str) -> bool:
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return r.returncode == 0


@pytest.fixture(scope="session")
def solar_cli() -> str:
    """The `solar` executable installed with this Python's package (pip puts it in the scripts
    directory), else one on PATH, else the CMake build directory."""
    import solar

    candidates = [
        os.path.join(sysconfig.get_path("scripts"), "solar"),
        shutil.which("solar"),
        str(REPO / "build" / "solar"),
    ]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK) and _is_solar_cli(c):
            out = subprocess.run([c, "--version"], capture_output=True, text=True).stdout.strip()
            if out.endswith(solar.__version__):
                return c
    pytest.skip(f"no `solar` CLI found (looked at {candidates}); `pip install .` installs it")
