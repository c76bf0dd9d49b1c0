"""Moving tensors between Python (torch / numpy) and the core, without copies where possible.

The core sees a tensor as (dtype name, C-contiguous little-endian bytes, shape). CPU torch
tensors are handed over through ``.numpy()`` (shared memory); bfloat16, which numpy lacks, is
viewed as int16 and labelled "BF16". torch is never imported here unless the caller already did.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from .errors import UnsupportedError

_NUMPY_TO_CORE = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_CORE_TO_NUMPY = {v: k for k, v in _NUMPY_TO_CORE.items()}


def _torch():
    """The torch module if it has been imported (by the caller or anything else), else None."""
    return sys.modules.get("torch")


def is_torch_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def to_core(name: str, value: Any) -> tuple[str, str, np.ndarray]:
    """(name, core dtype, array) for a torch tensor or array-like; shares memory when it can."""
    if is_torch_tensor(value):
        torch = _torch()
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return name, "BF16", t.view(torch.int16).numpy()
        try:
            arr = t.resolve_conj().resolve_neg().numpy()
        except TypeError as e:
            raise UnsupportedError(f"tensor '{name}' has dtype {t.dtype}, which solar does not support") from e
    else:
        arr = np.asarray(value)
    if arr.dtype.name == "bfloat16":  # ml_dtypes.bfloat16
        return name, "BF16", np.ascontiguousarray(arr).view(np.int16)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    dtype = _NUMPY_TO_CORE.get(np.dtype(arr.dtype.type)) if arr.dtype.kind in "fiub" else None
    if dtype is None:
        raise UnsupportedError(f"tensor '{name}' has dtype {arr.dtype}, which solar does not support")
    return name, dtype, np.ascontiguousarray(arr)


def tensors_to_core(items: Iterable[tuple[str, Any]], skip_unsupported: bool = False) -> list[tuple[str, str, np.ndarray]]:
    out = []
    for name, value in items:
        try:
            out.append(to_core(name, value))
        except UnsupportedError:
            if not skip_unsupported:
                raise
    return out


def from_core(dtype: str, shape: tuple[int, ...], data: np.ndarray, as_torch: bool):
    """A tensor (torch if `as_torch`, else numpy) over the core's buffer `data` (uint8), no copy."""
    if dtype == "BF16":
        raw = data.view(np.int16).reshape(shape)
        if as_torch:
            torch = _torch()
            return torch.from_numpy(raw).view(torch.bfloat16)
        try:
            import ml_dtypes  # type: ignore

            return raw.view(ml_dtypes.bfloat16)
        except ImportError:  # no bfloat16 in numpy: give the raw bit patterns
            return raw.view(np.uint16)
    arr = data.view(_CORE_TO_NUMPY[dtype]).reshape(shape)
    if as_torch:
        return _torch().from_numpy(arr)
    return arr


def state_dict_items(obj: Any) -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs of a module (anything with .state_dict()) or a mapping."""
    sd = obj.state_dict() if callable(getattr(obj, "state_dict", None)) else obj
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a model, a state dict or a path, got {type(obj).__name__}")
    return iter(sd.items())
