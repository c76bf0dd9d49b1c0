"""Exceptions raised by solar.

Every error of the C++ core arrives as one of these, with the core's message unchanged (it names
the file or object concerned and the problem). Each instance also carries ``kind`` (the core's
error kind, e.g. ``"corrupt"``) and ``where`` (the file or object, possibly empty).
"""
from __future__ import annotations

from . import _ext

__all__ = [
    "SolarError",
    "FormatError",
    "CorruptError",
    "MismatchError",
    "InvalidInputError",
    "UnsupportedError",
    "SolarIOError",
]


class SolarError(Exception):
    """Base class of every error solar raises."""

    kind: str | None = None
    where: str | None = None


class FormatError(SolarError):
    """A file or buffer is not what it claims to be (bad magic, malformed header, out of bounds)."""


class CorruptError(SolarError):
    """A checksum does not match: the bytes were damaged."""


class MismatchError(SolarError):
    """Inputs disagree: wrong base model, shape mismatch, missing base tensor."""


class InvalidInputError(SolarError, ValueError):
    """Values or options the codec refuses (NaN/Inf, impossible budget, bad option)."""


class UnsupportedError(SolarError):
    """A valid input this version cannot handle (unknown dtype, newer format, non-LoRA adapter)."""


class SolarIOError(SolarError, OSError):
    """A file is missing, unreadable or unwritable."""


_ext._register_errors(
    {
        "io": SolarIOError,
        "format": FormatError,
        "corrupt": CorruptError,
        "mismatch": MismatchError,
        "invalid-input": InvalidInputError,
        "unsupported": UnsupportedError,
    }
)
