"""Speed of solar's per-layer kernels (C++, single-threaded BLAS) next to a same-run dgemm peak.

    python -m bench.speed [--quick] [--out bench/results/speed.json]

Runs ``build/bench/speed_bench`` (bench/speed_bench.cpp, Google Benchmark; built on demand, or
``$SOLAR_SPEED_BENCH``) and tabulates: full_svd of W (n x n), the Philox pool of one factor
(N members of r*n normals), the min-norm least squares of the (r*n) x N pool (dgelsd), and the
top-k selection; plus paper mode's estimated per-layer cost, svd + 2 x (pool + lstsq + top-k).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def find_bench() -> Path:
    env = os.environ.get("SOLAR_SPEED_BENCH")
    if env:
        return Path(env)
    exe = REPO / "build" / "bench" / "speed_bench"
    if not exe.is_file():
        subprocess.run(["cmake", "-S", str(REPO), "-B", str(REPO / "build"), "-G", "Ninja"], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["ninja", "-C", str(REPO / "build"), "speed_bench"], check=True, stdout=subprocess.DEVNULL)
    return exe


def _ms(b: dict, key: str = "cpu_time") -> float:
    unit = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
    return b[key] * unit


def parse(raw: dict) -> dict:
    rows = []
    for b in raw["benchmarks"]:
        parts = b["name"].split("/")
        args = [int(x) for x in parts[1:] if x.isdigit()]
        rows.append({"kernel": parts[0], "args": args, "cpu_ms": _ms(b), "real_ms": _ms(b, "real_time"),
                     "gflops": b.get("GFLOPs"), "mnormals_per_s": b.get("Mnormals_per_s"),
                     "melems_per_s": b.get("Melems_per_s"), "iterations": b.get("iterations"),
                     "points": b.get("points")})
    ctx = raw.get("context", {})
    peak = float(ctx.get("dgemm_peak_GFLOPs_1024", "nan"))
    return {"context": {k: ctx.get(k) for k in ("host_name", "num_cpus", "mhz_per_cpu", "load_avg", "library_build_type",
                                                  "dgemm_peak_GFLOPs_1024", "flop_model_svd", "flop_model_lstsq")},
            "dgemm_peak_gflops": peak, "rows": rows}


def markdown(sp: dict) -> str:
    peak = sp["dgemm_peak_gflops"]
    rows = sp["rows"]
    by = lambda k: [r for r in rows if r["kernel"] == k]  # noqa: E731
    ctx = sp["context"]
    out = [f"C++ kernels, `bench/speed_bench` (Google Benchmark), BLAS pinned to one thread as in solar. Times are "
           f"CPU time (the machine was shared; wall time was up to ~2x higher). Reference peak: a 1024³ dgemm in the "
           f"same run, **{peak:.1f} GFLOP/s** (one core). GFLOP/s use flop models: SVD `{ctx.get('flop_model_svd')}`, "
           f"least squares `{ctx.get('flop_model_lstsq')}` — effective rates, not hardware counts."
           f" Load average during the run: {ctx.get('load_avg')}.", "",
           "| kernel | shape | time (ms) | GFLOP/s | % of dgemm peak |", "|---|---|---|---|---|"]
    for r in by("dgemm"):
        n = r["args"][0]
        out.append(f"| dgemm | {n}×{n}×{n} | {r['cpu_ms']:.1f} | {r['gflops']:.1f} | {100 * r['gflops'] / peak:.0f}% |")
    for r in by("full_svd"):
        n = r["args"][0]
        out.append(f"| full_svd (W) | {n}×{n} | {r['cpu_ms']:.1f} | {r['gflops']:.1f} | {100 * r['gflops'] / peak:.0f}% |")
    for r in by("lstsq"):
        n, k, p = r["args"]
        out.append(f"| lstsq_min_norm (dgelsd) | ({k}·{n})×{p} = {k * n}×{p} | {r['cpu_ms']:.1f} | {r['gflops']:.1f} | "
                   f"{100 * r['gflops'] / peak:.0f}% |")
    out += ["", "| kernel | shape | time (ms) | throughput |", "|---|---|---|---|"]
    for r in by("pool"):
        n, k, p = r["args"]
        out.append(f"| philox_normals pool | N={p} members × {k}·{n} | {r['cpu_ms']:.2f} | {r['mnormals_per_s']:.0f} M normals/s |")
    for r in by("topk"):
        out.append(f"| top-k (stable sort by abs, keep 30%) | N={r['args'][0]} | {r['cpu_ms']:.3f} | "
                   f"{r['melems_per_s']:.0f} M elements/s |")
    # paper mode per layer: svd(W) + for A and B: pool + lstsq + topk (A and B have r*n and n*r entries when m = n)
    svd = {r["args"][0]: r["cpu_ms"] for r in by("full_svd")}
    pool = {tuple(r["args"]): r["cpu_ms"] for r in by("pool")}
    lsq = {tuple(r["args"]): r["cpu_ms"] for r in by("lstsq")}
    topk = {r["args"][0]: r["cpu_ms"] for r in by("topk")}
    est = []
    for key in sorted(lsq):
        n, k, p = key
        if n in svd and key in pool and p in topk:
            per_factor = pool[key] + lsq[key] + topk[p]
            est.append(f"| n={n}, r={k}, N={p} | {svd[n]:.0f} | {pool[key]:.0f} | {lsq[key]:.0f} | {svd[n] + 2 * per_factor:.0f} |")
    if est:
        out += ["", "Paper mode, estimated per square layer (n×n W): SVD of W + 2 factors × (pool + least squares + "
                "top-k), one core. The least squares dominates as soon as N approaches r·n; cases above "
                "1.5e11 model flops (minutes per call) are not run.", "",
                "| layer | SVD ms | pool ms (per factor) | lstsq ms (per factor) | total ms |", "|---|---|---|---|---|"] + est
    spec = by("spectral")
    if spec:
        gemm = peak * 1e9  # flop/s
        out += ["", "Spectral mode, analysis of one n×n layer of rank r (every operating point — step × dead zone × k "
                "× Y step, and with statistics the trellis quantiser's points too — quantised, its distortion computed "
                "and its bits counted), one core; random factors, and for the calibrated case random SPD moments. Ratio: time / time of one n×n×n dgemm at the same-run "
                "peak.", "",
                "| layer | statistics | points priced | time (ms) | × n³ dgemm |", "|---|---|---|---|---|"]
        for r in spec:
            n, k, c = r["args"]
            dgemm_ms = 2.0 * n ** 3 / gemm * 1e3
            out.append(f"| n={n}, r={k} | {'K-FAC (calibrated)' if c else 'none (data-free)'} | "
                       f"{r.get('points') or 0:.0f} | {r['cpu_ms']:.0f} | {r['cpu_ms'] / dgemm_ms:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape per kernel")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "speed.json"))
    args = ap.parse_args(argv)
    exe = find_bench()
    t0 = time.time()
    cmd = [str(exe), "--benchmark_format=json"] + (["--quick"] if args.quick else [])
    print(f"speed: {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    sp = parse(json.loads(r.stdout))
    sp["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(sp, indent=1) + "\n")
    print(markdown(sp), flush=True)
    return sp


if __name__ == "__main__":
    main()
