"""docs/FORMAT.md is complete for the spectral mode: a decoder written from the document alone, in
plain Python (container, metadata, range coder, adaptive integer model, uniform and dependent
quantisation, passthrough tensors exact, int8-coded and coded as layers, the v5 stream syntax, DoRA
magnitudes coded against the base), must restore the golden v2 to v7 files to exactly the tensors
the C++ core does.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import zstandard
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


# --- Layout ---------------------------------------------------------------------------------------

def leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def parse(data: bytes) -> tuple[int, dict, bytes]:
    assert data[:4] == b"\x89SLR"
    version, flags = data[4], data[5]
    pos = 6
    meta_stored, pos = leb128(data, pos)
    meta_raw, pos = leb128(data, pos)
    payload_stored, pos = leb128(data, pos)
    payload_raw, pos = leb128(data, pos)
    assert pos + meta_stored + payload_stored + 4 == len(data)
    meta = data[pos:pos + meta_stored]
    payload = data[pos + meta_stored:pos + meta_stored + payload_stored]
    frame = b"\x28\xb5\x2f\xfd" if version >= 5 else b""  # v5 stores zstd frames without their magic
    if flags & 1:
        dictionary = None
        if flags & 2:
            raw = (ROOT / "docs" / "metadata-dictionary-v1.txt").read_bytes()
            dictionary = zstandard.ZstdCompressionDict(raw, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        meta = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(frame + meta, max_output_size=meta_raw)
    if flags & 4:
        payload = zstandard.ZstdDecompressor().decompress(frame + payload, max_output_size=payload_raw)
    return version, json.loads(meta), payload


# --- Entropy coding -------------------------------------------------------------------------------

class RangeDecoder:
    def __init__(self, data: bytes):
        self.data, self.pos, self.range, self.code = data, 0, 0xFFFFFFFF, 0
        for _ in range(4):
            self.code = (self.code << 8) | self.next()

    def next(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def normalise(self) -> None:
        while self.range < 1 << 24:
            self.range = (self.range << 8) & 0xFFFFFFFF
            self.code = ((self.code << 8) | self.next()) & 0xFFFFFFFF

    def bit(self, probs: list, i: int) -> int:
        p = probs[i]  # probability of a 0, 11-bit fixed point
        bound = (self.range >> 11) * p
        if self.code < bound:
            self.range, probs[i], b = bound, p + ((2048 - p) >> 5), 0
        else:
            self.code -= bound
            self.range -= bound
            probs[i], b = p - (p >> 5), 1
        self.normalise()
        return b

    def direct(self, nbits: int) -> int:
        v = 0
        for _ in range(nbits):
            self.range >>= 1
            b = 1 if self.code >= self.range else 0
            if b:
                self.code -= self.range
            v = (v << 1) | b
            self.normalise()
        return v


class IntModel:
    def __init__(self):
        self.len = [[1024] * 31]
        for c in range(1, 8):
            t = c - 1
            self.len.append([256 if i + 1 < t else 640 if i + 1 == t else 1024 if i == t else 1600 for i in range(31)])
        self.mant = [1024] * 31
        self.reset_run()

    def reset_run(self) -> None:
        self.sum = self.count = 0

    def decode(self, d: RangeDecoder, signed: bool = True) -> int:
        if self.count == 0:
            c = 0
        else:
            mean = (2 * self.sum + self.count) // (2 * self.count)
            c = min(7, mean.bit_length() + 1)
        length = 0
        while length < 30 and d.bit(self.len[c], length):
            length += 1
        mag = 1 << length >> 1 if length else 0  # the leading one
        if length >= 2:
            mag |= d.bit(self.mant, length) << (length - 2)
        if length >= 3:
            mag |= d.direct(length - 2)
        negative = d.direct(1) if length >= 1 and signed else 0
        self.sum += mag
        self.count += 1
        return -mag if negative else mag


# --- The spectral mode ----------------------------------------------------------------------------

NEXT = [[0, 2], [2, 0], [1, 3], [3, 1]]


def levels(q: list[int], dependent: bool) -> list[int]:
    if not dependent:
        return q
    out, s = [], 0
    for v in q:
        out.append(2 * v if s < 2 else 2 * v - (v > 0) + (v < 0))
        s = NEXT[s][v & 1]
    return out


def read_columns(d, m0, m1, dependent, rows, k, positive_lead=False):
    cols = []
    for _ in range(k):
        m0.reset_run()
        m1.reset_run()
        col, s, lead = [], 0, positive_lead
        for _ in range(rows):
            v = (m1 if dependent and s >= 2 else m0).decode(d, signed=not lead)
            lead = lead and v == 0
            if dependent:
                s = NEXT[s][v & 1]
            col.append(v)
        cols.append(col)
    return cols


def decode_spectral(version: int, meta: dict, payload: bytes) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Every layer's (A, B, whether it used dependent quantisation)."""
    layers = meta["layers"]
    assert all(layer["mode"] == "spectral" for layer in layers)
    stream = payload[:layers[0]["blobs"][0]]
    d = RangeDecoder(stream)
    models = {name: IntModel() for name in ("step_change", "step_gap", "x", "y", "x1", "y1")}
    dependent_prob = [1024]
    previous_tx = 200
    k_trees, group_steps, last_steps = {}, {}, None  # v5
    out = []
    for layer in layers:
        m, n, r = layer["shape"]
        a, b = np.zeros((r, n), np.float32), np.zeros((m, r), np.float32)
        bits = r.bit_length()
        if version >= 5:
            tree = k_trees.setdefault(bits, [1024] * (1 << bits))
            node = 1
            for _ in range(bits):
                node = 2 * node + d.bit(tree, node)
            k = node - (1 << bits)
        else:
            k = d.direct(bits)
        assert k <= r
        dependent = False
        if k:
            group = layer["module"].rsplit(".", 1)[-1]
            if version >= 5:
                ptx, pty = group_steps.get(group, last_steps or (200, None))
                tx = ptx + models["step_change"].decode(d)
                ty = (tx if pty is None else pty) + models["step_gap"].decode(d)
            else:
                tx = previous_tx + models["step_change"].decode(d)
                ty = tx + models["step_gap"].decode(d)
            previous_tx = tx
            group_steps[group] = last_steps = (tx, ty)
            dependent = version >= 3 and d.bit(dependent_prob, 0) == 1
            xs = read_columns(d, models["x"], models["x1"], dependent, m, k, positive_lead=version >= 5)
            ys = read_columns(d, models["y"], models["y1"], dependent, n, k)
            step_x, step_y = 2.0 ** ((tx - 200) / 8), 2.0 ** ((ty - 200) / 8)
            for j in range(k):
                b[:, j] = [lv * step_x for lv in levels(xs[j], dependent)]
                a[j, :] = [lv * step_y for lv in levels(ys[j], dependent)]
        out.append((a, b, dependent))
    return out


# --- Passthrough tensors -------------------------------------------------------------------------

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16 as its bit patterns


def to_dtype(values: np.ndarray, name: str) -> np.ndarray:
    """float32 values converted to a safetensors dtype, rounding to nearest even."""
    if name != "BF16":
        return values.astype(DTYPES[name])
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def decode_magnitude(blob: bytes, w: np.ndarray) -> np.ndarray:
    """v7: a DoRA magnitude, the residual from the row norms of the canonical W (float32 values)."""
    norms = []
    for row in w.astype(np.float32):
        acc = 0.0
        for x in row.tolist():  # binary64, j = 0, 1, ... in order
            acc += x * x
        norms.append(math.sqrt(acc))
    d = RangeDecoder(blob)
    t = d.direct(8)
    if t == 0:
        return np.array(norms, np.float64).astype(np.float32)
    model, step = IntModel(), 2.0 ** ((t - 200) / 8)
    return np.array([n + step * model.decode(d) for n in norms], np.float64).astype(np.float32)


def decode_passthrough(version: int, meta: dict, payload: bytes, layers: list, base: dict | None = None) -> dict[str, np.ndarray]:
    """Every passthrough tensor, by key, in its own dtype (`layers`: decode_spectral's output;
    `base`: the base weights by name, for v7 magnitudes)."""
    pos = sum(sum(layer.get("blobs", [])) for layer in meta["layers"])
    out = {}
    for entry in meta["passthrough"]:
        dtype, shape = np.dtype(DTYPES[entry["dtype"]]), entry["shape"]
        if entry.get("coding") == "layer":  # v6: the product of the layer's restored factors
            assert version >= 6 and "blob" not in entry
            a, b, _ = layers[entry["layer"]]
            acc = np.zeros((b.shape[0], a.shape[1]), np.float64)
            for j in range(b.shape[1]):  # binary64, in increasing j
                acc += b[:, j, None].astype(np.float64) * a[None, j, :].astype(np.float64)
            out[entry["key"]] = acc.astype(np.float32).astype(dtype).reshape(shape)
            continue
        blob = payload[pos:pos + entry["blob"]]
        pos += entry["blob"]
        numel = int(np.prod(shape))
        if entry.get("coding") == "magnitude":
            assert version >= 7 and len(shape) == 1
            layer = meta["layers"][entry["layer"]]
            w = base[layer["base"]]
            out[entry["key"]] = to_dtype(decode_magnitude(blob, w.T if layer.get("transpose") else w), entry["dtype"])
            continue
        if entry.get("coding") == "int8":
            assert version >= 4 and len(shape) >= 2
            rows = shape[0]
            scales = np.frombuffer(blob[:4 * rows], "<f4").astype(np.float32)
            q = np.frombuffer(blob[4 * rows:], np.int8).reshape(rows, -1)
            assert q.size == numel and (q >= -127).all()
            out[entry["key"]] = (q.astype(np.float32) * scales[:, None]).astype(dtype).reshape(shape)
            continue
        assert "coding" not in entry and len(blob) == numel * dtype.itemsize
        raw = np.frombuffer(blob, np.uint8)
        if version >= 2:  # byte planes
            raw = raw.reshape(dtype.itemsize, numel).T.copy()
        out[entry["key"]] = raw.view(dtype.newbyteorder("<")).reshape(shape)
    assert pos == len(payload)
    return out


@pytest.mark.parametrize("name", ["golden_v2_spectral", "golden_v3_spectral", "golden_v4_spectral", "golden_v5_spectral",
                                  "golden_v6_spectral", "golden_v7_spectral"])
def test_independent_decoder_restores_the_golden_files(name):
    version, meta, payload = parse((FIXTURES / f"{name}.solar").read_bytes())
    assert version == int(name[8])
    restored = decode_spectral(version, meta, payload)
    if version >= 7:  # BF16 magnitudes: compared as bit patterns
        import torch
        from safetensors.torch import load_file as load_torch

        expected = {k: (v.view(torch.int16).numpy().view(np.uint16) if v.dtype == torch.bfloat16 else v.numpy())
                    for k, v in load_torch(str(FIXTURES / f"{name}_expected.safetensors")).items()}
    else:
        expected = load_file(str(FIXTURES / f"{name}_expected.safetensors"))
    lora = restored[:4] if version >= 6 else restored  # v6: the fifth layer is the head
    for i, (a, b, _) in enumerate(lora):
        np.testing.assert_array_equal(a, expected[f"A{i}"])
        np.testing.assert_array_equal(b, expected[f"B{i}"])
    assert any(dq for _, _, dq in restored) == (version >= 3)  # the v3 and v4 files exercise the trellis
    base = load_file(str(FIXTURES / "golden_v7_base.safetensors")) if version >= 7 else None
    passthrough = decode_passthrough(version, meta, payload, restored, base)
    if version >= 5:  # four layers in two groups (v5, v6: the last one dropped)
        assert [layer["module"] for layer in meta["layers"]][:4] == ["layers.0.attn.q", "layers.0.attn.v", "layers.1.attn.q", "layers.1.attn.v"]
        assert (not restored[3][0].any() and not restored[3][1].any()) == (version < 7)
    if version >= 7:  # the v6 head and vector, then two magnitudes: one coded, one at step code 0
        assert [e.get("coding") for e in meta["passthrough"]] == ["layer", None, "magnitude", "magnitude"]
        mags = meta["passthrough"][2:]
        np.testing.assert_array_equal(passthrough[mags[0]["key"]], expected["M0"])
        np.testing.assert_array_equal(passthrough[mags[1]["key"]], expected["M1"])
        np.testing.assert_array_equal(passthrough["base_model.model.head.weight"], expected["P0"])
    elif version >= 6:  # the head coded as a fifth layer of the stream, the vector exact
        assert [e.get("coding") for e in meta["passthrough"]] == ["layer", None] and meta["passthrough"][0]["layer"] == 4
        assert restored[4][0].any()
        np.testing.assert_array_equal(passthrough["base_model.model.head.weight"], expected["P0"])
    elif version >= 4:  # an int8-coded head and an exact F16 vector
        assert [e.get("coding") for e in meta["passthrough"]] == ["int8", None]
        np.testing.assert_array_equal(passthrough["base_model.model.head.weight"], expected["P0"])
    else:
        np.testing.assert_array_equal(passthrough["base_model.model.head.weight"],
                                      np.array([[1, -2, 3.5], [0.25, 8, -0.5]], np.float32))


def test_independent_decoder_matches_the_core_on_a_real_adapter(stories_adapter, tmp_path):
    """A file of the real stories260K adapter as this build writes it (v7), the trellis quantiser
    offered without statistics."""
    import solar

    packed = solar.compress(stories_adapter, None, mode="spectral", target_error=0.3, quantiser="dependent")
    version, meta, payload = parse(packed.to_bytes())
    assert version == 7
    restored = decode_spectral(version, meta, payload)
    used = [dq for _, _, dq in restored]
    assert any(used) and [layer["stream"]["quantiser"] == "dependent" for layer in packed.report()["layers"]] == used
    core = solar.restore(packed, None)
    prefix = meta["key_prefix"]
    for layer, (a, b, _) in zip(meta["layers"], restored):
        np.testing.assert_array_equal(a, core[prefix + layer["module"] + ".lora_A.weight"].numpy())
        np.testing.assert_array_equal(b, core[prefix + layer["module"] + ".lora_B.weight"].numpy())
