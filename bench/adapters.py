"""A PEFT LoRA adapter as the benchmark sees it: its LoRA modules (A, B, scaling), its passthrough
tensors (``modules_to_save`` etc.), and the error measure shared by every method."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class LoraModule:
    name: str  # PEFT module path after the key prefix, e.g. "layers.0.attention.wq"
    A: np.ndarray  # r x n, float32
    B: np.ndarray  # m x r, float32
    scaling: float  # what PEFT multiplies B A by
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.B.shape[0], self.A.shape[1], self.A.shape[0]


@dataclass
class Adapter:
    path: Path
    config: dict
    config_text: str
    key_prefix: str
    file_metadata: dict
    modules: list[LoraModule]
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)
    # How the methods' files store the passthrough tensors (a classifier head): "exact" or "int8"
    # (solar's `--passthrough int8`, docs/FORMAT.md "Passthrough coding"), the same for every
    # method; or "matched", each as a user of that method would: solar's spectral points code it
    # as a layer of their stream (`--passthrough spectral`), a baseline quantising to b < 8 bits
    # stores it as b-bit rows, and every other method as int8 rows.
    passthrough_coding: str = "exact"

    @property
    def rank(self) -> int:
        return max(m.shape[2] for m in self.modules)

    @property
    def lora_params(self) -> int:
        return sum(m.A.size + m.B.size for m in self.modules)

    @property
    def fp16_tensor_bytes(self) -> int:
        """The denominator of every ratio: numel of all LoRA A and B factors x 2 bytes."""
        return 2 * self.lora_params

    @property
    def passthrough_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.passthrough.values())

    @property
    def passthrough_stored_bytes(self) -> int:
        """What the passthrough tensors' blobs take under `passthrough_coding` (before any zstd)."""
        return sum(4 * t.shape[0] + t.numel() if self.passthrough_coding in ("int8", "matched") and int8_rows_apply(t)
                   else t.numel() * t.element_size() for t in self.passthrough.values())

    def key(self, module: str, which: str) -> str:
        return self.key_prefix + module + (LORA_A if which == "A" else LORA_B)

    def state_dict(self, factors: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   zero: bool = False) -> dict[str, torch.Tensor]:
        """PEFT state dict (saved-file keys) with the given factors (default: the original ones),
        padded with zeros up to the module's rank when a method lowered it; passthrough as is."""
        sd: dict[str, torch.Tensor] = {}
        for m in self.modules:
            a, b = (m.A, m.B) if factors is None else factors[m.name]
            r = m.shape[2]
            a, b = pad_rank(np.asarray(a, np.float32), np.asarray(b, np.float32), r)
            if zero:
                a, b = np.zeros_like(a), np.zeros_like(b)
            sd[self.key(m.name, "A")] = torch.from_numpy(np.ascontiguousarray(a)).to(m.dtype)
            sd[self.key(m.name, "B")] = torch.from_numpy(np.ascontiguousarray(b)).to(m.dtype)
        sd.update(self.passthrough)
        return sd


def int8_rows_apply(t: torch.Tensor) -> bool:
    """The tensors `--passthrough int8` codes: floating point, 2-D or more, all finite."""
    return t.is_floating_point() and t.dim() >= 2 and t.numel() > 0 and bool(torch.isfinite(t).all())


def pad_rank(a: np.ndarray, b: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    k = a.shape[0]
    if k == r:
        return a, b
    a2 = np.zeros((r, a.shape[1]), np.float32)
    b2 = np.zeros((b.shape[0], r), np.float32)
    a2[:k], b2[:, :k] = a, b
    return a2, b2


def _scaling(config: dict, module: str, r: int) -> float:
    alpha = config.get("lora_alpha", r)
    for pat, a in (config.get("alpha_pattern") or {}).items():
        if module.endswith(pat):
            alpha = a
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def load_adapter(path: str | Path) -> Adapter:
    path = Path(path)
    config_text = (path / "adapter_config.json").read_text()
    config = json.loads(config_text)
    st = path / "adapter_model.safetensors"
    with safe_open(str(st), "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(st))
    a_keys = sorted(k for k in tensors if k.endswith(LORA_A))
    prefix = "base_model.model."
    modules = []
    for ka in a_keys:
        name = ka[: -len(LORA_A)]
        kb = name + LORA_B
        name = name[len(prefix):] if name.startswith(prefix) else name
        A, B = tensors[ka], tensors[kb]
        r = A.shape[0]
        modules.append(LoraModule(name, A.float().numpy(), B.float().numpy(), _scaling(config, name, r), A.dtype))
    lora_keys = {k for k in tensors if k.endswith(LORA_A) or k.endswith(LORA_B)}
    passthrough = {k: v for k, v in tensors.items() if k not in lora_keys}
    return Adapter(path, config, config_text, prefix, meta, modules, passthrough)


def factors_from_state_dict(adapter: Adapter, sd: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {m.name: (sd[adapter.key(m.name, "A")].float().numpy(), sd[adapter.key(m.name, "B")].float().numpy())
            for m in adapter.modules}


def relative_error(adapter: Adapter, sd: dict[str, torch.Tensor]) -> float:
    """sqrt(sum_l ||s_l (B A - B~ A~)||^2 / sum_l ||s_l B A||^2), in float64."""
    num = den = 0.0
    for m in adapter.modules:
        a2 = sd[adapter.key(m.name, "A")].double().numpy()
        b2 = sd[adapter.key(m.name, "B")].double().numpy()
        dw = m.B.astype(np.float64) @ m.A.astype(np.float64)
        dw2 = b2 @ a2
        num += m.scaling ** 2 * float(np.sum((dw - dw2) ** 2))
        den += m.scaling ** 2 * float(np.sum(dw ** 2))
    return math.sqrt(num / den) if den > 0 else 0.0


def passthrough_identical(adapter: Adapter, sd: dict[str, torch.Tensor]) -> bool:
    return all(k in sd and sd[k].dtype == v.dtype and torch.equal(sd[k], v) for k, v in adapter.passthrough.items())
