"""The solar Python API: compress a PEFT LoRA adapter against its base model, and restore it.

All work is done by the C++ core (the same code as the ``solar`` command line tool), so the
Python API and the CLI write byte-identical ``.solar`` files for the same inputs and seed.
"""
from __future__ import annotations

import enum
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from . import _ext
from ._tensors import from_core, state_dict_items, tensors_to_core

__all__ = ["CompressedAdapter", "compress", "load", "restore", "restore_to_dir", "restore_to_peft"]

PathLike = Union[str, "os.PathLike[str]"]

# Written into adapter_model.safetensors' metadata by PEFT's save_pretrained.
_PEFT_FILE_METADATA = {"format": "pt"}


class CompressedAdapter:
    """A compressed adapter: a validated ``.solar`` container.

    Get one from :func:`compress` or :func:`load`; turn it back into LoRA weights with
    :func:`restore`, :func:`restore_to_dir` or :func:`restore_to_peft`.
    """

    # refinement: what solar.refine (and solar.polish, under "polish") measured on its way to
    # this file (None otherwise).
    __slots__ = ("_c", "refinement")

    def __init__(self, _compressed: "_ext.Compressed"):
        if not isinstance(_compressed, _ext.Compressed):
            raise TypeError("use solar.compress() or solar.load() to make a CompressedAdapter")
        self._c = _compressed
        self.refinement = None

    def to_bytes(self) -> bytes:
        """The ``.solar`` file contents."""
        return self._c.to_bytes()

    def __bytes__(self) -> bytes:
        return self._c.to_bytes()

    def save(self, path: PathLike) -> Path:
        """Writes the ``.solar`` file atomically (temp file + fsync + rename); returns the path."""
        self._c.save(os.fspath(path))
        return Path(path)

    @property
    def nbytes(self) -> int:
        """Size of the ``.solar`` file in bytes."""
        return self._c.nbytes

    def report(self) -> dict:
        """What each part of the file costs, and what the adapter costs as a PEFT file.

        Keys: file_bytes, header_bytes, metadata_bytes, metadata_raw_bytes, payload_bytes,
        payload_raw_bytes, passthrough_raw_bytes, lora_params, peft_fp32_bytes, peft_fp16_bytes,
        ratio_vs_fp16, layers (module, mode, shape [out, in, r], params, payload_bytes),
        magnitudes (coded DoRA magnitudes: key, module, step_code, blob_bytes), needs_base (whether
        :func:`restore` reads the base model) and needs_base_for (why: "paper layers",
        "DoRA magnitudes", ...). Same as ``solar inspect --json``.
        """
        return json.loads(self._c.report_json())

    @property
    def layers(self) -> list:
        """One dict per coded layer (each LoRA module, then each head coded as a layer with
        ``passthrough="spectral"``): module, base_key, transpose_base, shape
        [out, in, r], a_dtype, b_dtype, base_fingerprint, mode, params, payload_bytes."""
        return json.loads(self._c.layers_json())

    @property
    def peft_config(self) -> dict:
        """The adapter's adapter_config.json, as stored."""
        return json.loads(self._c.peft_config_json())

    @property
    def seed(self) -> int:
        return self._c.seed

    @property
    def producer(self) -> str:
        return self._c.producer

    def __repr__(self) -> str:
        return f"<CompressedAdapter: {len(self.layers)} layers, {self.nbytes} bytes, seed {self.seed}>"


# ---- inputs --------------------------------------------------------------------------------


def _json_default(value: Any):
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"adapter config value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def _config_json(config: Any) -> str:
    if callable(getattr(config, "to_dict", None)):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"adapter config must be a dict or a PEFT config, got {type(config).__name__}")
    # Sets become lists, as PEFT's save_pretrained does.
    return json.dumps(dict(config), default=_json_default, allow_nan=False, sort_keys=True)


def _is_peft_model(obj: Any) -> bool:
    return hasattr(obj, "peft_config") and callable(getattr(obj, "state_dict", None)) and hasattr(obj, "active_adapter")


def _adapter_source(adapter: Any, adapter_name: Optional[str]) -> "_ext.Adapter":
    if isinstance(adapter, _ext.Adapter):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        return _ext.Adapter.from_dir(os.fspath(adapter))
    if _is_peft_model(adapter):
        from peft import get_peft_model_state_dict

        name = adapter_name or adapter.active_adapter
        if name not in adapter.peft_config:
            raise KeyError(f"the PEFT model has no adapter named {name!r} (it has {sorted(adapter.peft_config)})")
        state = get_peft_model_state_dict(adapter, adapter_name=name)
        config = adapter.peft_config[name].to_dict()
        config["inference_mode"] = True  # as save_pretrained writes it
        where = f"<PeftModel adapter '{name}'>"
        return _ext.Adapter.from_tensors(_config_json(config), tensors_to_core(state.items()), _PEFT_FILE_METADATA, where)
    if isinstance(adapter, (tuple, list)) and len(adapter) == 2:
        state, config = adapter
        if not isinstance(state, Mapping):
            raise TypeError(f"expected (state_dict, config), got a {type(state).__name__} as the state dict")
        return _ext.Adapter.from_tensors(
            _config_json(config), tensors_to_core(state.items()), _PEFT_FILE_METADATA, "<adapter state dict>"
        )
    raise TypeError(
        "adapter must be a PEFT adapter directory, a peft.PeftModel or a (state_dict, config) pair, "
        f"not {type(adapter).__name__}"
    )


def _base_source(base: Any) -> "_ext.Base":
    if isinstance(base, _ext.Base):
        return base
    if isinstance(base, (str, os.PathLike)):
        return _ext.Base.checkpoint(os.fspath(base))
    label = f"<{type(base).__name__} state dict>" if not isinstance(base, Mapping) else "<base state dict>"
    items = list(state_dict_items(base))
    if any(".base_layer." in name for name, _ in items):
        # A model PEFT has wrapped in place: its original weights sit at "<module>.base_layer.weight"
        # beside the LoRA parameters; present it as the unwrapped model.
        items = [(n.replace(".base_layer.", "."), v) for n, v in items if ".lora_" not in n]
    # Tensors the core has no dtype for (complex buffers, float8, ...) cannot be LoRA base weights.
    return _ext.Base.in_memory(tensors_to_core(items, skip_unsupported=True), label)


def _base_or_empty(base: Any) -> "_ext.Base":
    # Modes that never read W (spectral) restore without a base.
    return _ext.Base.in_memory([], "<no base given>") if base is None else _base_source(base)


def _opt(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)


def _compressed(compressed: Any) -> "_ext.Compressed":
    if isinstance(compressed, CompressedAdapter):
        return compressed._c
    return load(compressed)._c


# ---- API -----------------------------------------------------------------------------------


def compress(
    adapter: Any,
    base: Any,
    *,
    mode: Optional[str] = None,
    pool: Optional[int] = None,
    pool_a: Optional[int] = None,
    pool_b: Optional[int] = None,
    keep: Optional[int] = None,
    keep_fraction: Optional[float] = None,
    bits: Optional[int] = None,
    seed: int = 0,
    noise: Optional[float] = None,
    threads: int = 0,
    adapter_name: Optional[str] = None,
    target_bytes: Optional[int] = None,
    target_error: Optional[float] = None,
    calibration: Any = None,
    proxy: str = "",
    solver: Optional[str] = None,
    calibration_damping: Optional[float] = None,
    balance: Optional[float] = None,
    quantiser: str = "auto",
    passthrough: str = "exact",
    dora_magnitudes: str = "coded",
) -> CompressedAdapter:
    """Compresses a PEFT LoRA adapter against its base model.

    Args:
        adapter: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), a
            ``peft.PeftModel`` (its adapter ``adapter_name``, default the active one), or a
            ``(state_dict, config)`` pair in PEFT's key layout (``base_model.model.<path>.lora_A.weight``).
        base: the base model's weights: a checkpoint path (.safetensors file, or a directory,
            sharded ok), a torch model (its ``state_dict()``), or a dict name -> tensor/array.
            In-memory CPU tensors are read in place, not copied.
        mode: codec mode; by default ``"paper"`` if any paper option (pool, keep, keep_fraction,
            bits, noise, solver) is given, else ``"spectral"`` — as the CLI decides. ``"paper"`` is
            the SOLAR method as published (defaults N = 1000, 30% kept, 8 bits, noise 1); ``"spectral"`` (the
            recommended mode) codes B A's own singular components with a global rate-distortion
            plan and needs no base; ``"spectral-w"`` codes them in W's singular basis.
        target_bytes: spectral modes: the whole file is at most this many bytes.
        target_error: spectral modes: relative error of the updates in the mode's metric
            (default 0.05 when neither target is given).
        balance: spectral modes: how the budget is shared between layers, from 0 (errors count
            as they are: layers with large updates get most bytes) to 1 (every layer's relative
            error counts the same). Default 1 with the plain metric, 0 with ``calibration`` or
            ``proxy`` (their metric already weighs each layer by its effect).
        calibration: spectral modes: statistics from :func:`solar.calibrate` (a dict or a
            .safetensors path); errors are then weighed by what they do to the loss.
        calibration_damping: share of each statistic's mean diagonal added to its diagonal, so
            directions the calibration data did not exercise still count (default 0.1).
        proxy: spectral modes without calibration: ``"base-gram"`` weighs errors by W^T W.
        quantiser: spectral modes: ``"dependent"`` (uniform or dependent/trellis-coded
            quantisation, whichever the plan finds better per layer), ``"uniform"``, or ``"auto"``
            (the default: dependent with ``calibration``, uniform without).
        passthrough: tensors besides the LoRA factors (``modules_to_save`` heads, ...):
            ``"exact"`` (the default) stores them verbatim; ``"int8"`` stores every floating-point
            one of 2 or more dimensions as int8 with a float32 scale per row (vectors stay exact);
            ``"spectral"`` (mode ``"spectral"``) codes each head whose smaller side is at most 64
            (a classifier's ``num_labels x hidden``) as one more layer of the stream, its bytes
            planned with the LoRA layers' (with ``calibration``, statistics for the head too, as
            :func:`solar.calibrate` records them; a head without them falls back to int8 rows),
            and the others as ``"int8"`` does.
        dora_magnitudes: DoRA magnitude vectors: ``"coded"`` (the default; spectral modes, with a
            ``base`` that has the module's W) codes each as its residual from W's row norms, one
            step per vector planned with the layers, so ``restore`` then needs the base too;
            ``"exact"`` stores them verbatim (as they are without a base).
        pool, pool_a, pool_b: pool sizes N_A, N_B (``pool`` for both unless overridden).
        keep: coefficients kept per factor (k_A = k_B); overrides ``keep_fraction``.
        keep_fraction: fraction of each pool kept when ``keep`` is not given.
        bits: coefficient precision: 32, 16, 8 or 4.
        seed: seed of the basis pool (stored in the file).
        noise: sigma of the Gaussian perturbation of the basis.
        solver: paper mode's coefficient choice: ``"paper"`` (as published: least squares, then
            top-k), ``"refit"`` (least squares again on the kept support) or ``"omp"``
            (orthogonal matching pursuit). Same file format and decoder for all three.
        threads: worker threads, 0 for all cores; the output does not depend on it.

    The same inputs and options give the same bytes as ``solar compress``.
    """
    paper_options = (pool, pool_a, pool_b, keep, keep_fraction, bits, noise, solver)
    if mode is None:
        mode = "paper" if any(v is not None for v in paper_options) else "spectral"
    src = _adapter_source(adapter, adapter_name)
    weights = _base_or_empty(base)
    calib = None if calibration is None else _base_source(calibration)
    c = _ext.compress(
        src,
        weights,
        mode,
        # Unset paper options keep the core's defaults (N = 1000, 30% kept, 8 bits, noise 1).
        _opt(int, pool if pool_a is None else pool_a),
        _opt(int, pool if pool_b is None else pool_b),
        _opt(int, keep),
        _opt(float, keep_fraction),
        _opt(int, bits),
        int(seed),
        _opt(float, noise),
        int(threads),
        _opt(int, target_bytes),
        _opt(float, target_error),
        calib,
        str(proxy),
        _opt(str, solver),
        _opt(float, calibration_damping),
        _opt(float, balance),
        str(quantiser),
        str(passthrough),
        str(dora_magnitudes),
    )
    return CompressedAdapter(c)


def load(source: Union[PathLike, bytes, bytearray, memoryview]) -> CompressedAdapter:
    """Reads and validates a ``.solar`` file (a path) or its contents (bytes)."""
    if isinstance(source, CompressedAdapter):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return CompressedAdapter(_ext.Compressed.from_bytes(bytes(source), "<bytes>"))
    if isinstance(source, (str, os.PathLike)):
        return CompressedAdapter(_ext.Compressed.from_file(os.fspath(source)))
    raise TypeError(f"expected a path or bytes, got {type(source).__name__}")


def restore(compressed: Any, base: Any, *, threads: int = 0) -> dict:
    """Restores the adapter's tensors, in PEFT's key layout and their original dtypes.

    ``compressed`` is a :class:`CompressedAdapter`, a ``.solar`` path or its bytes; ``base`` is as
    for :func:`compress` and must be the model the file was built against. Returns
    ``{key: torch.Tensor}`` (``{key: numpy.ndarray}`` when torch is not installed), LoRA factors
    first (``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``), then any other tensors
    the adapter stored, under their original keys.
    """
    c = _compressed(compressed)
    weights = _base_or_empty(base)
    _config, tensors, _meta = _ext.decompress(c, weights, int(threads))
    try:
        import torch  # noqa: F401

        as_torch = True
    except ImportError:
        as_torch = False
    return {key: from_core(dtype, tuple(shape), data, as_torch) for key, dtype, shape, data in tensors}


def restore_to_dir(compressed: Any, base: Any, out_dir: PathLike, *, threads: int = 0) -> Path:
    """Writes the restored adapter as a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors), atomically: ``out_dir`` is replaced only on success.
    Same output as ``solar decompress``."""
    c = _compressed(compressed)
    weights = _base_or_empty(base)
    _ext.restore_to_dir(c, weights, os.fspath(out_dir), int(threads))
    return Path(out_dir)


def restore_to_peft(compressed: Any, base_model: Any, *, adapter_name: str = "default", threads: int = 0, **kwargs):
    """Restores the adapter onto ``base_model`` (a transformers/torch model, not yet wrapped by
    PEFT) and returns ``peft.PeftModel.from_pretrained(base_model, <restored dir>, ...)``.
    The base weights are read from ``base_model`` itself; extra keyword arguments go to
    ``from_pretrained`` (e.g. ``is_trainable=True``)."""
    from peft import PeftModel

    c = _compressed(compressed)
    with tempfile.TemporaryDirectory(prefix="solar-restore-") as tmp:
        out = os.path.join(tmp, "adapter")
        _ext.restore_to_dir(c, _base_source(base_model), out, int(threads))
        return PeftModel.from_pretrained(base_model, out, adapter_name=adapter_name, **kwargs)
