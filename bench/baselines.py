"""Baseline codecs, each writing a real, self-contained file.

Every non-PEFT baseline file is ``b"SLBB"`` + one zstd frame (level 19; stored without the frame's
4-byte magic number, as .solar files since format v5 store theirs) of

    u32 header length | header (compact JSON) | payload (binary)

compressed with solar's own public metadata dictionary (docs/metadata-dictionary-v1.txt) so the
header (adapter_config.json verbatim, module names, shapes, method parameters, passthrough
descriptors) costs what it costs a .solar file. The payload holds the quantised tensors, their
scales and the passthrough tensors (byte-exact, or int8 rows exactly as solar's
``--passthrough int8`` codes them when the run asks for that). The size on disk of that file is the figure
reported: everything needed to rebuild the PEFT adapter directory is counted.

The PEFT points are ``adapter_model.safetensors`` written as PEFT writes it (safetensors,
``{"format": "pt"}`` metadata); adapter_config.json is not counted for them.

Each codec is ``encode(adapter, path, **params) -> info`` and ``decode(adapter, path) -> state dict``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import save_file

from bench.adapters import Adapter, int8_rows_apply

MAGIC = b"SLBB"
ZSTD_MAGIC = zstandard.FRAME_HEADER  # the first 4 bytes of every zstd frame
ZSTD_LEVEL = 19
_DICT_PATH = Path(__file__).resolve().parents[1] / "docs" / "metadata-dictionary-v1.txt"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TORCH = {v: k for k, v in _DTYPES.items()}


def _zdict():
    return zstandard.ZstdCompressionDict(_DICT_PATH.read_bytes(), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


# --------------------------------------------------------------------------- container
def _int_rows(t: torch.Tensor, bits: int) -> bytes:
    """A head as b-bit rows (the "matched" passthrough coding of a b-bit baseline): float32 row
    scales max|row| / (2^(b-1) - 1), then the rounded values as packed b-bit fields."""
    x = t.float().reshape(t.shape[0], -1).numpy()
    q, scales = quantize_sym(x, bits, axis=1)
    return scales.astype("<f4").tobytes() + pack_bits(q, bits)


def _from_int_rows(raw: bytes, bits: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    rows = shape[0]
    scales = np.frombuffer(raw[:4 * rows], "<f4")
    count = int(np.prod(shape))
    q = unpack_bits(raw[4 * rows:], count, bits).reshape(rows, -1).astype(np.float32)
    return torch.from_numpy(q * scales[:, None]).to(dtype).reshape(shape)


def _int8_rows(t: torch.Tensor) -> bytes:
    """solar's int8 passthrough coding (docs/FORMAT.md): float32 row scales max|row| / 127, then
    the values rounded half away from zero, as int8."""
    x = t.float().reshape(t.shape[0], -1)
    scales = x.abs().amax(1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
    v = x / safe
    whole = torch.trunc(v)  # half away from zero, exactly: no rounding in adding 0.5
    q = torch.clamp(whole + torch.sign(v) * ((v - whole).abs() >= 0.5), -127, 127).to(torch.int8)
    return scales.numpy().astype("<f4").tobytes() + q.numpy().tobytes()


def _from_int8_rows(raw: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    rows = shape[0]
    scales = torch.from_numpy(np.frombuffer(raw[:4 * rows], "<f4").copy())
    q = torch.from_numpy(np.frombuffer(raw[4 * rows:], np.int8).copy()).reshape(rows, -1).float()
    return (q * scales[:, None]).to(dtype).reshape(shape)


def _write(adapter: Adapter, path: Path, method: str, params: dict, modules: list[dict], payload: bytes,
           head_bits: int = 8) -> dict:
    """`head_bits`: the method's own bit width, which the "matched" passthrough coding stores 2-D
    passthrough tensors at when it is below 8 (int8 rows otherwise)."""
    pt_desc, pt_bytes = [], b""
    for k, t in adapter.passthrough.items():
        coded = adapter.passthrough_coding in ("int8", "matched") and int8_rows_apply(t)
        bits = head_bits if coded and adapter.passthrough_coding == "matched" and head_bits < 8 else 8
        if coded:
            raw = _int8_rows(t) if bits == 8 else _int_rows(t, bits)
        else:
            raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        pt_desc.append({"key": k, "dtype": _DTYPES[t.dtype], "shape": list(t.shape), "blob": len(raw),
                        **({"coding": f"int{bits}"} if coded else {})})
        pt_bytes += raw
    header = json.dumps({"method": method, "params": params, "peft_config": json.loads(adapter.config_text),
                         "key_prefix": adapter.key_prefix, "file_metadata": adapter.file_metadata,
                         "layers": modules, "passthrough": pt_desc}, separators=(",", ":")).encode()
    body = struct.pack("<I", len(header)) + header + payload + pt_bytes
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=_zdict()).compress(body)
    assert frame[:4] == ZSTD_MAGIC
    data = MAGIC + frame[4:]  # without the frame's magic number, as .solar v5 stores its frames
    Path(path).write_bytes(data)
    # What each part would cost alone (zstd'd the same way), for the report's breakdown.
    zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=_zdict())
    return {"header_bytes_alone": len(zc.compress(header)), "payload_raw": len(payload), "passthrough_raw": len(pt_bytes)}


def _read(path: Path) -> tuple[dict, memoryview]:
    data = Path(path).read_bytes()
    assert data[:4] == MAGIC, path
    body = zstandard.ZstdDecompressor(dict_data=_zdict()).decompress(ZSTD_MAGIC + data[4:])
    (hl,) = struct.unpack_from("<I", body, 0)
    header = json.loads(body[4: 4 + hl])
    return header, memoryview(body)[4 + hl:]


def _restore(adapter: Adapter, header: dict, payload: memoryview, factors: dict, used: int) -> dict[str, torch.Tensor]:
    """State dict with the decoded factors plus the passthrough tensors read back from the file."""
    sd = adapter.state_dict(factors)
    off = used
    for d in header["passthrough"]:
        raw = bytes(payload[off: off + d["blob"]])
        off += d["blob"]
        if d.get("coding") == "int8":
            sd[d["key"]] = _from_int8_rows(raw, _TORCH[d["dtype"]], d["shape"])
            continue
        if d.get("coding"):  # "int<b>", b < 8
            sd[d["key"]] = _from_int_rows(raw, int(d["coding"][3:]), _TORCH[d["dtype"]], d["shape"])
            continue
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(_TORCH[d["dtype"]]).reshape(d["shape"])
        sd[d["key"]] = t.clone()
    assert off == len(payload), "payload length mismatch"
    return sd


# --------------------------------------------------------------------------- integers
def quantize_sym(x: np.ndarray, bits: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel quantisation: one float32 scale per slice along ``axis``
    (scale = max|x| / (2^(bits-1) - 1), q = round(x / scale))."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.max(np.abs(x), axis=axis, keepdims=True).astype(np.float64)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    q = np.clip(np.rint(x / scale), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32).reshape(-1)


def pack_bits(q: np.ndarray, bits: int) -> bytes:
    """Signed ints in [-(2^(b-1)-1), 2^(b-1)-1] -> offset-binary b-bit fields, LSB first."""
    if bits == 8:
        return q.astype(np.int8).tobytes()
    u = (q.astype(np.int16).reshape(-1) + (2 ** (bits - 1) - 1)).astype(np.uint8)
    bitplanes = ((u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return np.packbits(bitplanes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes, count: int, bits: int) -> np.ndarray:
    if bits == 8:
        return np.frombuffer(buf, np.int8, count).astype(np.int16)
    flat = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[: count * bits].reshape(count, bits)
    u = (flat.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(1)
    return u - (2 ** (bits - 1) - 1)


def packed_len(count: int, bits: int) -> int:
    return count if bits == 8 else (count * bits + 7) // 8


# --------------------------------------------------------------------------- PEFT files
def encode_peft(adapter: Adapter, path: Path, dtype: str = "fp16") -> dict:
    tdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    sd = {}
    for k, v in adapter.state_dict().items():
        sd[k] = v.to(tdt) if (".lora_A." in k or ".lora_B." in k) else v  # passthrough: as trained
    save_file(sd, str(path), metadata=adapter.file_metadata or {"format": "pt"})
    return {}


def decode_peft(adapter: Adapter, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    return {k: (v.float() if (".lora_A." in k or ".lora_B." in k) else v) for k, v in sd.items()}


# --------------------------------------------------------------------------- per-channel int
def _quantize_factors(a: np.ndarray, b: np.ndarray, bits: int, layout: str) -> tuple[bytes, dict]:
    """A quantised per row (rank component), B per column; returns payload bytes (scales, then ints)."""
    qa, sa = quantize_sym(a, bits, axis=1)
    qb, sb = quantize_sym(b, bits, axis=0)
    if layout == "packed":
        ints = pack_bits(qa, bits) + pack_bits(qb, bits)
    else:  # one byte per value: zstd's entropy stage then codes the few distinct symbols
        ints = qa.astype(np.int8).tobytes() + qb.astype(np.int8).tobytes()
    return sa.tobytes() + sb.tobytes() + ints, {}


def _dequantize_factors(buf: memoryview, off: int, shape, bits: int, layout: str):
    m, n, k = shape
    sa = np.frombuffer(buf, np.float32, k, off); off += 4 * k
    sb = np.frombuffer(buf, np.float32, k, off); off += 4 * k
    if layout == "packed":
        la, lb = packed_len(k * n, bits), packed_len(m * k, bits)
        qa = unpack_bits(bytes(buf[off: off + la]), k * n, bits).reshape(k, n); off += la
        qb = unpack_bits(bytes(buf[off: off + lb]), m * k, bits).reshape(m, k); off += lb
    else:
        qa = np.frombuffer(buf, np.int8, k * n, off).reshape(k, n); off += k * n
        qb = np.frombuffer(buf, np.int8, m * k, off).reshape(m, k); off += m * k
    a = (qa.astype(np.float32) * sa[:, None]).astype(np.float32)
    b = (qb.astype(np.float32) * sb[None, :]).astype(np.float32)
    return a, b, off


def _encode_factor_sets(adapter: Adapter, path: Path, method: str, params: dict,
                        factor_sets: dict[str, tuple[np.ndarray, np.ndarray]], bits: int | None) -> dict:
    """Writes factors (possibly of lowered rank) either as fp16 (bits None) or per-channel ints.
    For bits < 8 both int layouts (packed fields / one byte per value) are written and the smaller
    file is kept: the baseline gets its best shot."""
    best = None
    layouts = ["fp16"] if bits is None else (["bytes"] if bits == 8 else ["packed", "bytes"])
    for layout in layouts:
        payload, layers = b"", []
        for m in adapter.modules:
            a, b = factor_sets[m.name]
            k = a.shape[0]
            layers.append({"module": m.name, "shape": [m.shape[0], m.shape[1], k]})
            if layout == "fp16":
                payload += a.astype(np.float16).tobytes() + b.astype(np.float16).tobytes()
            else:
                p, _ = _quantize_factors(a, b, bits, layout)
                payload += p
        tmp = Path(str(path) + f".{layout}")
        info = _write(adapter, tmp, method, {**params, "layout": layout}, layers, payload, head_bits=bits or 8)
        size = tmp.stat().st_size
        if best is None or size < best[0]:
            if best is not None:
                best[1].unlink()
            best = (size, tmp, info)
        else:
            tmp.unlink()
    best[1].rename(path)
    return best[2]


def _decode_factor_sets(adapter: Adapter, path: Path) -> dict[str, torch.Tensor]:
    header, payload = _read(path)
    p = header["params"]
    layout, bits = p["layout"], p.get("bits")
    off, factors = 0, {}
    for l in header["layers"]:
        m, n, k = l["shape"]
        if layout == "fp16":
            a = np.frombuffer(payload, np.float16, k * n, off).reshape(k, n).astype(np.float32); off += 2 * k * n
            b = np.frombuffer(payload, np.float16, m * k, off).reshape(m, k).astype(np.float32); off += 2 * m * k
        else:
            a, b, off = _dequantize_factors(payload, off, (m, n, k), bits, layout)
        factors[l["module"]] = (a, b)
    return _restore(adapter, header, payload, factors, off)


def encode_quant(adapter: Adapter, path: Path, bits: int = 8) -> dict:
    return _encode_factor_sets(adapter, path, "quant", {"bits": bits}, {m.name: (m.A, m.B) for m in adapter.modules}, bits)


decode_quant = _decode_factor_sets


# --------------------------------------------------------------------------- SVD rank cut
def svd_factors(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-k factors of B A (PEFT-style split: B' = U_k sqrt(S_k), A' = sqrt(S_k) V_k^T),
    from the r x r core of the two thin QRs (never forming B A)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    qb, rb = np.linalg.qr(b64)
    qa, ra = np.linalg.qr(a64.T)
    uc, s, vct = np.linalg.svd(rb @ ra.T)
    u, v = qb @ uc, qa @ vct.T
    sq = np.sqrt(s[:k])
    return (sq[:, None] * v[:, :k].T).astype(np.float32), (u[:, :k] * sq[None, :]).astype(np.float32)


def encode_svd(adapter: Adapter, path: Path, rank: int = 1, bits: int | None = None) -> dict:
    fs = {m.name: svd_factors(m.A, m.B, min(rank, m.shape[2])) for m in adapter.modules}
    return _encode_factor_sets(adapter, path, "svd", {"rank": rank, "bits": bits}, fs, bits)


decode_svd = _decode_factor_sets


# --------------------------------------------------------------------------- ComPEFT-style
def _compeft_matrix(x: np.ndarray, density: float) -> tuple[bytes, bytes, float, int]:
    flat = x.reshape(-1).astype(np.float64)
    k = max(1, int(round(density * flat.size)))
    order = np.argsort(-np.abs(flat), kind="stable")[:k]
    keep = np.sort(order)
    mask = np.zeros(flat.size, bool)
    mask[keep] = True
    scale = float(np.mean(np.abs(flat[keep])))
    signs = flat[keep] < 0
    return (np.packbits(mask, bitorder="little").tobytes(), np.packbits(signs, bitorder="little").tobytes(),
            scale, k)


def encode_compeft(adapter: Adapter, path: Path, density: float = 0.1) -> dict:
    """Top-k entries of A and of B by magnitude; each kept entry becomes sign x one scale per
    matrix (scale = mean |kept|, as ComPEFT); mask and sign bitmaps, zstd'd."""
    payload, layers = b"", []
    for m in adapter.modules:
        rec = {"module": m.name, "shape": list(m.shape), "k": []}
        for x in (m.A, m.B):
            mask, signs, scale, k = _compeft_matrix(x, density)
            payload += struct.pack("<f", scale) + mask + signs
            rec["k"].append(k)
        layers.append(rec)
    return _write(adapter, path, "compeft", {"density": density}, layers, payload)


def decode_compeft(adapter: Adapter, path: Path) -> dict[str, torch.Tensor]:
    header, payload = _read(path)
    off, factors = 0, {}
    for l in header["layers"]:
        m, n, r = l["shape"]
        out = []
        for shape, k in (((r, n), l["k"][0]), ((m, r), l["k"][1])):
            numel = shape[0] * shape[1]
            (scale,) = struct.unpack_from("<f", payload, off); off += 4
            nm = (numel + 7) // 8
            mask = np.unpackbits(np.frombuffer(payload, np.uint8, nm, off), bitorder="little")[:numel].astype(bool); off += nm
            ns = (k + 7) // 8
            signs = np.unpackbits(np.frombuffer(payload, np.uint8, ns, off), bitorder="little")[:k].astype(bool); off += ns
            x = np.zeros(numel, np.float32)
            x[mask] = np.where(signs, -scale, scale)
            out.append(x.reshape(shape))
        factors[l["module"]] = (out[0], out[1])
    return _restore(adapter, header, payload, factors, off)


# --------------------------------------------------------------------------- NOLA-style
def solar_quantize(c: np.ndarray, bits: int) -> bytes:
    """solar's coefficient block (docs/FORMAT.md, "Coefficients"): float32 scale + ints."""
    if len(c) == 0:
        return b""
    if bits == 32:
        return c.astype(np.float32).tobytes()
    qmax = 2 ** (bits - 1) - 1
    amax = float(np.max(np.abs(c)))
    scale = np.float32(amax / qmax if amax > 0 else 1.0)
    v = c / float(scale)
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)  # ties away from zero
    q = np.clip(q, -qmax, qmax)
    if bits == 16:
        ints = q.astype(np.int16).tobytes()
    elif bits == 8:
        ints = q.astype(np.int8).tobytes()
    else:  # 4: two per byte, low nibble first
        u = (q & 0xF).astype(np.uint8)
        if len(u) % 2:
            u = np.append(u, 0)
        ints = (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()
    return struct.pack("<f", scale) + ints


def solar_dequantize(buf: memoryview, off: int, count: int, bits: int) -> tuple[np.ndarray, int]:
    if count == 0:
        return np.zeros(0), off
    if bits == 32:
        return np.frombuffer(buf, np.float32, count, off).astype(np.float64), off + 4 * count
    (scale,) = struct.unpack_from("<f", buf, off); off += 4
    if bits == 16:
        q = np.frombuffer(buf, np.int16, count, off).astype(np.int64); off += 2 * count
    elif bits == 8:
        q = np.frombuffer(buf, np.int8, count, off).astype(np.int64); off += count
    else:
        nb = (count + 1) // 2
        by = np.frombuffer(buf, np.uint8, nb, off); off += nb
        u = np.empty(2 * nb, np.int64)
        u[0::2], u[1::2] = by & 0xF, by >> 4
        q = np.where(u[:count] >= 8, u[:count] - 16, u[:count])
    return q * float(scale), off


def nola_pool(seed: int, layer: int, factor: int, length: int, pool: int) -> np.ndarray:
    """Pure Gaussian basis (no W): (length x pool), column i = member i. Counter-based (Philox)
    so a decoder regenerates it from (seed, layer, factor)."""
    rng = np.random.Generator(np.random.Philox(key=[seed, (layer << 1) | factor]))
    return rng.standard_normal((pool, length)).T


_LSTSQ_CACHE: dict = {}


def nola_coefficients(adapter: Adapter, pool: int, seed: int) -> tuple[dict, float]:
    """Min-norm least-squares coefficients of every factor on its pool (cached per (adapter,
    pool, seed): the keep/bits points of one pool share this solve). Returns (coefs, seconds)."""
    import time

    key = (str(adapter.path), pool, seed)
    if key not in _LSTSQ_CACHE:
        t0 = time.perf_counter()
        coefs = {}
        for li, m in enumerate(adapter.modules):
            for f, x in enumerate((m.A, m.B)):
                d = nola_pool(seed, li, f, x.size, pool)
                coefs[(m.name, f)] = np.linalg.lstsq(d, x.reshape(-1).astype(np.float64), rcond=None)[0]
        _LSTSQ_CACHE[key] = (coefs, time.perf_counter() - t0)
    return _LSTSQ_CACHE[key]


def encode_nola(adapter: Adapter, path: Path, pool: int = 1000, keep_fraction: float = 0.3, bits: int = 8,
                seed: int = 0) -> dict:
    """solar's paper-mode pipeline with a pure Gaussian basis (NOLA-style): least squares on the
    whole pool, top-k by |coefficient| without refit, solar's coefficient quantiser, N-bit masks.
    Same accounting as a .solar paper file: per factor ceil(N/8) mask bytes + 4 + ceil(k b / 8)."""
    coefs, lstsq_s = nola_coefficients(adapter, pool, seed)
    k = int(round(keep_fraction * pool))
    payload, layers = b"", []
    for m in adapter.modules:
        for f in (0, 1):
            c = coefs[(m.name, f)]
            keep = np.sort(np.argsort(-np.abs(c), kind="stable")[:k])
            mask = np.zeros(pool, bool)
            mask[keep] = True
            payload += np.packbits(mask, bitorder="little").tobytes() + solar_quantize(c[keep], bits)
        layers.append({"module": m.name, "shape": list(m.shape)})
    info = _write(adapter, path, "nola", {"pool": pool, "keep": k, "bits": bits, "seed": seed}, layers, payload)
    info["shared_lstsq_seconds"] = lstsq_s
    return info


def decode_nola(adapter: Adapter, path: Path) -> dict[str, torch.Tensor]:
    header, payload = _read(path)
    p = header["params"]
    pool, k, bits, seed = p["pool"], p["keep"], p["bits"], p["seed"]
    off, factors = 0, {}
    for li, l in enumerate(header["layers"]):
        m, n, r = l["shape"]
        out = []
        for f, shape in enumerate(((r, n), (m, r))):
            nm = (pool + 7) // 8
            mask = np.unpackbits(np.frombuffer(payload, np.uint8, nm, off), bitorder="little")[:pool].astype(bool); off += nm
            c, off = solar_dequantize(payload, off, k, bits)
            sel = np.flatnonzero(mask)
            d = nola_pool(seed, li, f, shape[0] * shape[1], pool)
            out.append((d[:, sel] @ c).reshape(shape).astype(np.float32))
        factors[l["module"]] = (out[0], out[1])
    return _restore(adapter, header, payload, factors, off)


CODECS = {
    "peft": (encode_peft, decode_peft),
    "quant": (encode_quant, decode_quant),
    "svd": (encode_svd, decode_svd),
    "compeft": (encode_compeft, decode_compeft),
    "nola": (encode_nola, decode_nola),
}
