"""An independent implementation of the randomness spec in docs/FORMAT.md ("Randomness"),
written from the document alone in plain Python, must reproduce the golden values the C++ core
is pinned to. This is what lets another implementation regenerate the basis pool."""
import json
import math
import struct
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "philox_golden.json"
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def normals(seed, layer, member, stream, first, count):
    key = (seed & MASK, seed >> 32)
    out = []
    for e in range(first, first + count):
        w = philox4x32_10((e // 4, member, layer, stream), key)
        lane = e % 4
        x0, x1 = (w[0], w[1]) if lane < 2 else (w[2], w[3])
        u1 = (x0 + 1.0) / 4294967296.0
        u2 = x1 / 4294967296.0
        radius = math.sqrt(-2.0 * math.log(u1))
        angle = 2.0 * math.pi * u2
        out.append(f32(radius * (math.cos(angle) if lane % 2 == 0 else math.sin(angle))))
    return out


def distinct_indices(seed, layer, member, stream, bound, count):
    key = (seed & MASK, seed >> 32)
    out, block = [], 0
    while len(out) < count:
        for w in philox4x32_10((block, member, layer, stream), key):
            idx = (w * bound) >> 32
            if len(out) < count and idx not in out:
                out.append(idx)
        block += 1
    return out


def test_known_answer_vectors():
    # Random123 tests/kat_vectors, philox4x32 10.
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((MASK,) * 4, (MASK, MASK)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def test_normals_match_golden():
    golden = json.loads(GOLDEN.read_text())
    for case in golden["normals"]:
        got = normals(int(case["seed"]), case["layer"], case["member"], case["stream"], case["first"], len(case["values"]))
        assert got == [f32(v) for v in case["values"]], case


def test_indices_match_golden():
    golden = json.loads(GOLDEN.read_text())
    for case in golden["indices"]:
        got = distinct_indices(int(case["seed"]), case["layer"], case["member"], case["stream"], case["bound"], len(case["values"]))
        assert got == case["values"], case
