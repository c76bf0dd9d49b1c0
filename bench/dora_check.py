"""DoRA magnitudes coded against the base (format v7) against stored exactly, on real DoRA adapters.

Two fixtures trained like the LoRA ones with PEFT's use_dora=True:
stories260K r=4 on wq,wv on TinyShakespeare (`python -m bench.fixtures.train_stories_lora --dora`,
tests/fixtures/stories260k_dora_r4; held-out loss on the benchmark's 64 validation windows) and
all-MiniLM-L6-v2 r=8 on query,value on SST-2 with its trained classifier head
(`python -m bench.fixtures.train_minilm_sst2 --dora --no-probe`, tests/fixtures/minilm_sst2_dora_r8;
the dev set, the smaller of loss and accuracy retention, the head coded with the layers:
`--passthrough spectral`). Retention of the fine-tuning gain and file bytes for
`solar compress --dora-magnitudes coded` (the default) and `exact`, data-free and with K-FAC
statistics of the DoRA model (as bench.calibration takes them for the LoRA fixtures: 32 training
windows; the last 512 SST-2 training sentences, held out from training), at the same file sizes
(`--target-bytes`; a size below a file's smallest encoding is reported as such). The reference
"no adapter" is each B zeroed and each magnitude at W's row norms (where DoRA starts it: the
weight is W), the trained head kept. Against them, the baselines a DoRA user would otherwise pick,
files written by bench.baselines: per-channel int8 / int4 / int3 and SVD rank cuts of B A then
int4 / int3, each with the magnitudes as fp16 (their best shot: the fixtures store them in F32)
and the head as its bits' rows (as the benchmark's "matched" passthrough).

    python -m bench.dora_check [--models stories260k minilm_sst2] [--bytes ...]
    python -m bench.dora_check --speed 4096   # what coding a magnitude adds to a calibrated layer's time
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MAG = ".lora_magnitude_vector"
PREFIX = "base_model.model."
BUDGETS = {"stories260k": [1600, 2000, 2500, 3000, 3500, 4500],
           "minilm_sst2": [2000, 3000, 4500, 6500, 9000, 13000, 18000, 24000]}


def dora_dir(model: str) -> Path:
    from bench.fixtures.paths import fixtures_dir

    return fixtures_dir() / {"stories260k": "stories260k_dora_r4", "minilm_sst2": "minilm_sst2_dora_r8"}[model]


def make_task(model: str, windows: int | None):
    from bench.evaluate import MiniLMTask, StoriesTask

    if model == "stories260k":
        return StoriesTask(windows=windows or 64, adapter_dir=dora_dir(model))
    return MiniLMTask(dev_limit=windows, adapter_dir=dora_dir(model))


def calibration_stats(model: str) -> Path:
    """K-FAC statistics of the DoRA model, on bench.calibration's data for the LoRA fixture."""
    from bench.calibration import CACHE, CALIBRATORS, cached

    def make(tmp: Path) -> None:
        torch.manual_seed(0)
        CALIBRATORS[model](tmp, adapter_dir=dora_dir(model))

    return cached(CACHE / f"{model}_dora_kfac.safetensors", make)


def no_adapter(task, sd: dict) -> dict:
    """The adapter's state dict with every B zeroed and every magnitude at W's row norms."""
    out = {}
    for key, t in sd.items():
        if ".lora_B." in key:
            t = torch.zeros_like(t)
        elif key.endswith(MAG):
            layer = task.model.get_submodule(key[: -len(MAG)])
            t = layer.base_layer.weight.float().norm(dim=1).to(t.dtype)
        out[key] = t
    return out


def score(task, refs: tuple[dict, dict], sd: dict) -> float:
    """Retention of the fine-tuning gain: the smaller over the task's metrics."""
    from bench.evaluate import retention

    ret = retention(*refs, task.evaluate(sd))
    return min(ret[m] for m in task.metrics)


def baselines(model: str, task, refs: tuple[dict, dict], workdir: Path):
    """(name, file bytes, retention) of the baselines, magnitudes cast to fp16."""
    from bench import baselines as bl
    from bench.adapters import load_adapter

    adapter = load_adapter(dora_dir(model))
    adapter.passthrough = {k: v.half() if k.endswith(MAG) else v for k, v in adapter.passthrough.items()}
    adapter.passthrough_coding = "matched"
    methods = [("int8 per-channel", bl.encode_quant, {"bits": 8}), ("int4 per-channel", bl.encode_quant, {"bits": 4}),
               ("int3 per-channel", bl.encode_quant, {"bits": 3}), ("SVD rank 1 int4", bl.encode_svd, {"rank": 1, "bits": 4}),
               ("SVD rank 2 int4", bl.encode_svd, {"rank": 2, "bits": 4}), ("SVD rank 3 int4", bl.encode_svd, {"rank": 3, "bits": 4}),
               ("SVD rank 2 int3", bl.encode_svd, {"rank": 2, "bits": 3})]
    for name, encode, params in methods:
        path = workdir / "baseline.bin"
        encode(adapter, path, **params)
        sd = {k: v.float() if k.endswith(MAG) else v for k, v in bl.decode_quant(adapter, path).items()}
        yield name, path.stat().st_size, score(task, refs, sd)


def run_model(model: str, budgets: list[int], windows: int | None, calib: bool, cli: str) -> list[dict]:
    from safetensors.torch import load_file

    task = make_task(model, windows)
    trained = load_file(str(dora_dir(model) / "adapter_model.safetensors"))
    refs = (task.evaluate(no_adapter(task, trained)), task.evaluate(trained))
    print(f"\nDoRA {model}: no adapter {refs[0]}, adapted {refs[1]}")
    flags = ["--passthrough", "spectral"] if model == "minilm_sst2" else []
    rows = []
    with tempfile.TemporaryDirectory() as td:
        print("| baseline (magnitudes fp16) | bytes | retention |")
        print("|---|---:|---:|")
        for name, size, ret in baselines(model, task, refs, Path(td)):
            rows.append({"model": model, "statistics": "baseline", "method": name, "bytes": size, "retention": ret})
            print(f"| {name} | {size:,} | {100 * ret:.2f}% |", flush=True)
        families = {"data-free": []}
        if calib:
            families["K-FAC"] = ["--calib", str(calibration_stats(model))]
        print("| statistics | --target-bytes | magnitudes | bytes | % of fp16 | retention |")
        print("|---|---:|---|---:|---:|---:|")
        for family, stats in families.items():
            for budget in budgets:
                for mags in ("coded", "exact"):
                    out = f"{td}/a.solar"
                    run = subprocess.run([cli, "compress", "--adapter", str(dora_dir(model)), "--base", str(task.base_path),
                                          "--out", out, "-q", "--no-verify", "--target-bytes", str(budget),
                                          "--dora-magnitudes", mags, *flags, *stats],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    row = {"model": model, "statistics": family, "target_bytes": budget, "magnitudes": mags}
                    if run.returncode != 0:
                        if "below the smallest file" not in run.stderr:
                            raise RuntimeError(run.stderr)
                        rows.append({**row, "bytes": None})
                        print(f"| {family} | {budget:,} | {mags} | below its smallest file | | |", flush=True)
                        continue
                    report = json.loads(subprocess.run([cli, "inspect", "--json", out], check=True, capture_output=True,
                                                       text=True).stdout)
                    subprocess.run([cli, "decompress", out, "--base", str(task.base_path), "--out", f"{td}/r", "-q"],
                                   check=True, stdout=subprocess.DEVNULL)
                    size = Path(out).stat().st_size
                    ret = score(task, refs, load_file(f"{td}/r/adapter_model.safetensors"))
                    rows.append({**row, "bytes": size, "fp16_share": size / report["peft_fp16_bytes"], "retention": ret})
                    print(f"| {family} | {budget:,} | {mags} | {size:,} | {100 * size / report['peft_fp16_bytes']:.1f}% | "
                          f"{100 * ret:.2f}% |", flush=True)
    return rows


def speed(n: int, rank: int = 16, repeats: int = 2) -> list[dict]:
    """One n x n rank-`rank` DoRA layer (random W, factors, magnitudes 1% off W's row norms, SPD
    statistics), compressed on one thread at --target-error 0.1 with K-FAC statistics, magnitudes
    exact then coded, `repeats` times: the coded magnitude's cost is the difference."""
    import time

    import numpy as np

    import solar

    g = np.random.default_rng(0)
    w = (g.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    p = "base_model.model.layer.proj"
    state = {p + ".lora_A.weight": (g.standard_normal((rank, n)) / np.sqrt(n)).astype(np.float32),
             p + ".lora_B.weight": (g.standard_normal((n, rank)) * 0.01).astype(np.float32),
             p + MAG: (np.linalg.norm(w, axis=1) * (1 + 0.01 * g.standard_normal(n))).astype(np.float32)}
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["proj"], "use_dora": True}
    moments = [g.standard_normal((n, 256)).astype(np.float32) for _ in range(2)]
    calib = {f"layer.proj.{name}": (x @ x.T / 256 + 0.01 * np.eye(n, dtype=np.float32)).astype(np.float32)
             for name, x in zip(("input_moment", "output_grad_moment"), moments)}
    rows = []
    for _ in range(repeats):
        for mags in ("exact", "coded"):
            t0 = time.perf_counter()
            c = solar.compress((state, config), {"layer.proj.weight": w}, target_error=0.1, calibration=calib, threads=1,
                               dora_magnitudes=mags)
            rows.append({"n": n, "magnitudes": mags, "seconds": time.perf_counter() - t0, "bytes": c.nbytes})
            print(f"{n}x{n} r={rank}, magnitudes {mags}: {rows[-1]['seconds']:.1f} s, {c.nbytes:,} B", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    from bench.run import find_cli

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories260k", "minilm_sst2"], choices=sorted(BUDGETS))
    ap.add_argument("--bytes", type=int, nargs="+", default=None, help="file sizes (default: per model)")
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows / dev sentences (default: all the benchmark's)")
    ap.add_argument("--no-calib", action="store_true", help="data-free only")
    ap.add_argument("--speed", type=int, default=None, metavar="N", help="time one synthetic N x N layer instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.speed:
        return speed(args.speed)
    cli = find_cli()
    rows = []
    for model in args.models:
        if not (dora_dir(model) / "adapter_model.safetensors").is_file():
            raise SystemExit(f"{dora_dir(model)}: no DoRA fixture (see this module's docstring for the command that trains it)")
        rows += run_model(model, args.bytes or BUDGETS[model], args.windows, not args.no_calib, cli)
    return rows


if __name__ == "__main__":
    main()
