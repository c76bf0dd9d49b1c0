"""The extension's Philox streams (the core's own code) reproduce the committed golden values."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from solar import _ext

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "philox_golden.json").read_text())


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def test_normals_match_golden():
    for case in GOLDEN["normals"]:
        got = _ext._philox_normals(int(case["seed"]), case["layer"], case["member"], case["stream"], case["first"],
                                   len(case["values"]))
        assert got == [f32(v) for v in case["values"]], case


def test_indices_match_golden():
    for case in GOLDEN["indices"]:
        got = _ext._philox_indices(int(case["seed"]), case["layer"], case["member"], case["stream"], case["bound"],
                                   len(case["values"]))
        assert got == case["values"], case


def test_streams_are_addressable():
    # Element e of a stream does not depend on where the read starts.
    whole = _ext._philox_normals(9, 1, 2, 0, 0, 12)
    assert _ext._philox_normals(9, 1, 2, 0, 5, 7) == whole[5:]
