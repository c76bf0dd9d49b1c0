"""`python -m bench.run --smoke` end to end: real adapter, real files, report, plot, JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, data_dir

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")
pytest.importorskip("zstandard")


def test_bench_smoke(tmp_path, solar_cli):
    d = data_dir()
    if d is None or not (d / "models" / "stories260K" / "stories260K.safetensors").is_file():
        pytest.skip("shared real data (stories260K, TinyShakespeare) absent")
    if not (REPO / "tests" / "fixtures" / "stories260k_lora_r4" / "adapter_model.safetensors").is_file():
        pytest.skip("stories260K LoRA fixture absent")
    env = {**os.environ, "SOLAR_CLI": str(solar_cli), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out-dir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "HEADLINE" in r.stdout
    _check_noise_check(tmp_path, env)

    report = tmp_path / "REPORT.md"
    plot = tmp_path / "rd_stories260k.png"
    res = json.loads((tmp_path / "stories260k.json").read_text())
    assert report.is_file() and "smallest at ≥99%" in report.read_text()
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    pts = {p["name"]: p for p in res["points"]}
    assert not [p for p in res["points"] if "error" in p], [p.get("error") for p in res["points"]]
    families = {p["family"] for p in res["points"]}
    assert {"peft", "int-quant", "svd-fp16", "compeft", "nola", "solar-paper", "solar-spectral"} <= families
    assert res["base"]["loss"] > res["lora"]["loss"] + 0.5  # the LoRA really helps on Shakespeare

    fp32, fp16, i8, i4 = pts["PEFT fp32"], pts["PEFT fp16"], pts["int8 per-channel"], pts["int4 per-channel"]
    # lossless point: exactly the LoRA
    assert fp32["rel_error"] == 0.0 and abs(fp32["retention"]["loss"] - 1.0) < 1e-6
    assert fp32["bytes"] == (REPO / "tests/fixtures/stories260k_lora_r4/adapter_model.safetensors").stat().st_size
    assert abs(fp16["retention"]["loss"] - 1.0) < 0.005
    assert abs(i8["retention"]["loss"] - 1.0) < 0.01 and i8["rel_error"] < 0.02
    # bytes go down as precision goes down
    assert fp32["bytes"] > fp16["bytes"] > i8["bytes"] > i4["bytes"]
    assert fp16["bytes"] > res["adapter"]["fp16_tensor_bytes"]  # safetensors header on top of the tensors
    sp = sorted((p for p in res["points"] if p["family"] == "solar-spectral"), key=lambda p: p["rel_error"])
    assert sp[0]["bytes"] > sp[-1]["bytes"]  # a tighter target error costs more bytes
    for p in res["points"]:
        assert p["bytes"] > 0 and 0 <= p["rel_error"] < 2 and p["passthrough_exact"]
        assert p["ratio_fp16_tensors"] == pytest.approx(p["bytes"] / res["adapter"]["fp16_tensor_bytes"])
        assert p["compress_s"] >= 0 and p["decompress_s"] >= 0
        assert p["retention"]["loss"] <= 1.05
    # The half-size checks: each aimed at half the best other file at a level the grid missed,
    # within its budget (the noise check above re-created them like any grid point, at every level).
    half = [p for p in res["points"] if "target_bytes" in p]
    assert half and all(p["bytes"] <= p["target_bytes"] and p["name"].endswith(f"B={p['target_bytes']}") for p in half)
    assert "of 10 levels" in report.read_text()  # every whole level from 90 to 99% of the one model


def test_half_size_checks_aim_at_half_the_best_other_file_where_the_grid_misses():
    """A level gets a half-size point per size-aimed family only when its smallest solar file is
    more than half the smallest other file, once per budget."""
    from bench.report import GOAL_LEVELS, goals_section
    from bench.run import half_size_methods

    def pt(name, family, nbytes, ret):
        return {"name": name, "family": family, "bytes": nbytes, "retention": {"loss": ret}}

    res = {"model": "m", "metrics": ["loss"], "adapter": {"fp16_tensor_bytes": 100_000, "passthrough_bytes": 0},
           "points": [pt("int4", "int-quant", 2_000, 0.985), pt("int8", "int-quant", 4_000, 0.999),
                      pt("s t=0.3", "solar-spectral", 900, 0.93), pt("s t=0.2", "solar-spectral", 1_200, 0.97),
                      pt("c t=0.2", "solar-spectral-cal", 1_500, 0.992), pt("r t=0.2", "solar-spectral-rw", 1_400, 0.99)]}
    todo = half_size_methods("stories260k", res)
    # 90-93%: 900 B vs 2,000 B (met); 94-97%: 1,200 vs 2,000 (missed: budget 1,000); 98%: 1,500 vs
    # 2,000 (missed, same budget); 99%: 1,500 vs 4,000 (met).
    # stories260K's calibrated family also runs with the model in the loop (solar.refine), and its
    # data-free file polished against the model (solar.polish).
    assert sorted((m.family, b) for m, b in todo) == [("solar-spectral", 1_000), ("solar-spectral-cal", 1_000),
                                                       ("solar-spectral-polish", 1_000), ("solar-spectral-refine", 1_000),
                                                       ("solar-spectral-rw", 1_000)]
    assert all(m.name.endswith("B=1000") for m, _ in todo)
    in_loop = ("solar-spectral-refine", "solar-spectral-polish")
    assert all(m.cli[-2:] == ["--target-bytes", "1000"] for m, _ in todo if m.family not in in_loop)
    reweighed = next(m for m, _ in todo if m.family == "solar-spectral-rw")
    assert reweighed.cli[reweighed.cli.index("--calib") + 1].endswith("stories260k_kfac_reweighed.safetensors")
    refine = next(m for m, _ in todo if m.family == "solar-spectral-refine")
    assert refine.kind == "python" and refine.params == {"model": "stories260k", "target_bytes": 1_000}
    polish = next(m for m, _ in todo if m.family == "solar-spectral-polish")
    assert polish.kind == "python" and polish.codec[0] is not refine.codec[0] and polish.params == refine.params
    assert "solar-spectral-polish" not in {m.family for m, _ in half_size_methods("stories260k", res, smoke=True)}
    assert sorted(m.family for m, _ in half_size_methods("minilm_sst2", res)) == ["solar-spectral", "solar-spectral-cal",
                                                                                  "solar-spectral-rw"]
    text = goals_section([res])
    assert len(GOAL_LEVELS) == 10 and "met at 5 of 10 levels" in text and "m 94% (1.67×)" in text


def test_baselines_store_the_head_as_solar_does(tmp_path):
    """With `--passthrough int8` every method pays the same for MiniLM's classifier head: the
    baselines' files hold exactly the bytes solar's core writes for it (docs/FORMAT.md)."""
    import torch

    import solar
    from bench.adapters import load_adapter
    from bench.baselines import _int8_rows, decode_quant, encode_quant

    adapter_dir = REPO / "tests" / "fixtures" / "minilm_sst2_lora_r8"
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        pytest.skip("MiniLM LoRA fixture absent")
    packed = solar.compress(adapter_dir, None, target_error=0.3, passthrough="int8")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_format_portable import parse

    _, meta, payload = parse(packed.to_bytes())
    offset = sum(sum(layer.get("blobs", [])) for layer in meta["layers"])
    adapter = load_adapter(adapter_dir)
    adapter.passthrough_coding = "int8"
    coded = 0
    for entry in meta["passthrough"]:
        blob = payload[offset: offset + entry["blob"]]
        offset += entry["blob"]
        if entry.get("coding") == "int8":
            assert blob == _int8_rows(adapter.passthrough[entry["key"]])
            coded += 1
    assert coded == 1
    # A baseline file restores the head to what solar restores it to.
    encode_quant(adapter, tmp_path / "b.bin", bits=4)
    sd = decode_quant(adapter, tmp_path / "b.bin")
    core = solar.restore(packed, None)
    for key in adapter.passthrough:
        assert torch.equal(sd[key], core[key]), key


def test_matched_baselines_store_the_head_at_their_own_bits(tmp_path):
    """`--passthrough matched` (the benchmark's default): a b-bit baseline stores the head as b-bit
    rows (b < 8), within half a step of every value, and an 8-bit one as solar's int8 rows."""
    import torch

    from bench.adapters import load_adapter
    from bench.baselines import _read, decode_quant, encode_quant

    adapter_dir = REPO / "tests" / "fixtures" / "minilm_sst2_lora_r8"
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        pytest.skip("MiniLM LoRA fixture absent")
    adapter = load_adapter(adapter_dir)
    adapter.passthrough_coding = "matched"
    (key,) = [k for k in adapter.passthrough if k.endswith("classifier.weight")]
    head = adapter.passthrough[key].float()
    sizes = {}
    for bits in (8, 3, 2):
        path = tmp_path / f"q{bits}.bin"
        encode_quant(adapter, path, bits=bits)
        header, _ = _read(path)
        (entry,) = [e for e in header["passthrough"] if e["key"] == key]
        assert entry["coding"] == f"int{bits}"
        sizes[bits] = entry["blob"]
        got = decode_quant(adapter, path)[key].float()
        step = head.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert torch.all((got - head).abs() <= step / 2 * (1 + 1e-5)), bits
    assert sizes[8] == 2 * 4 + 2 * 384 and sizes[3] == 2 * 4 + 2 * 384 * 3 // 8 and sizes[2] == 2 * 4 + 2 * 384 // 4


def test_noise_check_headline_samples_without_resampling():
    """A 'resample' that keeps every example once gives the measured retention; loss and accuracy
    are combined by their minimum, per resample."""
    import torch

    from bench.noise_check import headline_samples

    g = torch.Generator().manual_seed(1)
    n = 50
    ones = torch.ones(n, dtype=torch.float64)
    loss = lambda shift: (torch.rand(n, generator=g, dtype=torch.float64) + shift, ones)  # noqa: E731
    acc = lambda p: ((torch.rand(n, generator=g, dtype=torch.float64) < p).double(), ones)  # noqa: E731
    base, lora, point = ({"loss": loss(s), "accuracy": acc(p)} for s, p in ((1.0, 0.5), (0.2, 0.9), (0.3, 0.85)))
    idx = torch.stack([torch.arange(n), torch.randint(0, n, (n,), generator=g)])
    got = headline_samples(point, base, lora, idx)

    def measured(rows):
        ret = [(base[m][0][rows].mean() - point[m][0][rows].mean()) / (base[m][0][rows].mean() - lora[m][0][rows].mean())
               for m in ("loss", "accuracy")]
        return min(ret)

    assert got[0].item() == pytest.approx(float(measured(torch.arange(n))), rel=1e-12)
    assert got[1].item() == pytest.approx(float(measured(idx[1])), rel=1e-12)
    assert got[0].item() != pytest.approx(got[1].item())


def _check_noise_check(results, env):
    """bench.noise_check re-creates the smoke run's deciding points at every level from 90 to 99%,
    half-size checks included (it exits non-zero if their bytes or metrics differ from the JSON's),
    and brackets their retention."""
    r = subprocess.run([sys.executable, "-m", "bench.noise_check", "--models", "stories260k", "--results", str(results),
                        "--resamples", "200", "--all-levels"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| stories260k |")]
    assert rows and {row[2] for row in rows} <= {"W", "O", "C"}
    for row in rows:
        measured = float(row[5].rstrip("%"))
        lo, hi = (float(x) for x in row[6].rstrip("%").split("–"))
        assert lo <= measured <= hi, row  # one metric: the measured value sits inside its interval


def test_entropy_check_reads_every_coded_integer_and_prices_it(stories_adapter):
    """bench.entropy_check sees each coded integer once (m + n per kept component, split by the
    trellis's model classes), and its ideal models order as they must: the free empirical
    entropy below the adaptive estimate, both near the real stream."""
    import solar
    from bench import entropy_check as ec

    packed = solar.compress(stories_adapter, None, mode="spectral", target_error=0.3, quantiser="dependent")
    groups, stream = ec.column_groups(ec._portable(), packed.to_bytes())
    report = packed.report()
    expected = sum((layer["shape"][0] + layer["shape"][1]) * layer["stream"]["components"] for layer in report["layers"])
    assert sum(len(g) for g in groups) == expected
    assert stream == report["payload_bytes"]
    emp = sum(ec._empirical_bits(g) for g in groups) / 8
    kt = sum(ec._kt_bits(g) for g in groups) / 8
    assert 0.6 * stream < emp < kt < 1.2 * stream
    assert ec._empirical_bits([0, 0, 1, -1]) == 6.0  # 2 x 1 bit + 2 x 2 bits


def test_dora_check_scores_coded_against_exact_magnitudes_at_equal_bytes(stories_ckpt):
    """bench.dora_check on a few windows: both files at the budget, the coded one keeping more of
    the DoRA adapter's gain (at 2,500 B the exact magnitudes leave the layers ~1,300 B fewer)."""
    from bench import dora_check

    rows = dora_check.main(["--models", "stories260k", "--bytes", "2500", "--no-calib", "--windows", "4"])
    assert {r["method"] for r in rows if r["statistics"] == "baseline"} >= {"int4 per-channel", "SVD rank 2 int4"}
    by = {r["magnitudes"]: r for r in rows if "magnitudes" in r}
    assert set(by) == {"coded", "exact"}
    assert all(r["bytes"] <= 2500 for r in by.values())
    assert by["coded"]["retention"] > by["exact"]["retention"] + 0.1, rows


def test_dora_speed_times_one_layer_with_and_without_coded_magnitudes():
    from bench import dora_check

    rows = dora_check.speed(64, rank=4, repeats=1)
    assert [r["magnitudes"] for r in rows] == ["exact", "coded"]
    assert all(r["seconds"] > 0 for r in rows) and rows[1]["bytes"] < rows[0]["bytes"]
