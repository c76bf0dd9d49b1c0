"""solar: make fine-tuned LoRA adapters small enough to ship.

Compresses Hugging Face PEFT LoRA adapters against their base model (the SOLAR method) into
``.solar`` files, and restores them. A thin binding of the same C++ core as the ``solar``
command line tool, so both write identical files.

    import solar
    packed = solar.compress("my-adapter/", None, mode="spectral", target_error=0.1)  # recommended
    paper = solar.compress("my-adapter/", "base-model/", pool=1000, keep_fraction=0.3, bits=8)  # SOLAR paper
    packed.save("my-adapter.solar")
    stats = solar.self_calibrate(peft_model)   # causal LMs: statistics without data (or solar.calibrate)
    packed = solar.compress(peft_model, None, target_bytes=6000, calibration=stats)
    stats = solar.reweigh(peft_model, batches, None, calibration=stats, target_bytes=6000)  # model in the loop, once
    packed = solar.refine(peft_model, batches, None, target_bytes=6000, calibration=stats)  # ... for one file
    packed = solar.polish(peft_model, batches, packed)   # its uniform-quantiser integers, against the model
    print(packed.report()["ratio_vs_fp16"])

    tensors = solar.restore("my-adapter.solar", "base-model/")       # {PEFT key: torch.Tensor}
    solar.restore_to_dir("my-adapter.solar", "base-model/", "restored-adapter/")
    peft_model = solar.restore_to_peft("my-adapter.solar", base_model)  # a peft.PeftModel

Errors are :class:`SolarError` subclasses carrying the core's message.
"""
from . import _ext
from .api import CompressedAdapter, compress, load, restore, restore_to_dir, restore_to_peft
from .calibrate import calibrate, sample_text, self_calibrate
from .polish import polish
from .refine import refine, reweigh
from .errors import (
    CorruptError,
    FormatError,
    InvalidInputError,
    MismatchError,
    SolarError,
    SolarIOError,
    UnsupportedError,
)

__version__ = _ext.__version__
FORMAT_VERSION = _ext.FORMAT_VERSION

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "CompressedAdapter",
    "compress",
    "load",
    "restore",
    "restore_to_dir",
    "restore_to_peft",
    "calibrate",
    "self_calibrate",
    "refine",
    "reweigh",
    "polish",
    "sample_text",
    "SolarError",
    "FormatError",
    "CorruptError",
    "MismatchError",
    "InvalidInputError",
    "UnsupportedError",
    "SolarIOError",
]
