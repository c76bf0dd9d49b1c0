"""DoRA magnitudes coded against the base (format v7) against stored exactly, on a real DoRA adapter.

stories260K with DoRA r=4 on wq,wv, trained like the LoRA fixture on TinyShakespeare
(`python -m bench.fixtures.train_stories_lora --dora`, tests/fixtures/stories260k_dora_r4);
retention of the held-out loss gain (the benchmark's 64 validation windows) and file bytes, for
`solar compress --dora-magnitudes coded` (the default) and `exact`, data-free and with K-FAC
statistics of the DoRA model (32 training windows, as the LoRA fixture's), at the same file sizes
(`--target-bytes`; a size below a file's smallest encoding is reported as such).
The base model is the adapter disabled (DoRA's magnitudes start at W's row norms). Against them,
the baselines a DoRA user would otherwise pick, files written by bench.baselines: per-channel
int8 / int4 / int3 and SVD rank cuts of B A then int4 / int3, each with the magnitudes as fp16
(their best shot: the fixture stores them in F32).

    python -m bench.dora_check [--bytes 1600 2000 2500 3000 3500 4500]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def dora_dir() -> Path:
    from bench.fixtures.paths import fixtures_dir

    return fixtures_dir() / "stories260k_dora_r4"


def calibration_stats(out: Path) -> Path:
    """K-FAC statistics of the DoRA model on 32 training windows (bench.calibration's recipe)."""
    import torch.nn.functional as F
    from peft import PeftModel

    import solar
    from bench.calibration import cached
    from bench.fixtures.paths import stories260k_dir
    from bench.fixtures.stories import Tokenizer, load_stories260k
    from bench.fixtures.train_stories_lora import shakespeare_splits

    def make(tmp: Path) -> None:
        torch.manual_seed(0)
        train, _ = shakespeare_splits(Tokenizer(str(stories260k_dir() / "tok512.bin")))
        model = PeftModel.from_pretrained(load_stories260k(), str(dora_dir()))
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, len(train) - 257, (32,), generator=g).tolist()

        def lm_loss(m, batch):
            x = batch["input_ids"]
            logits = m(x[:, :-1])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

        solar.calibrate(model, [{"input_ids": train[s: s + 257][None]} for s in starts], loss_fn=lm_loss, out=tmp)

    return cached(out, make)


def baselines(task, base: dict, lora: dict, workdir: Path):
    """(name, file bytes, retention) of the baselines, magnitudes cast to fp16."""
    from bench import baselines as bl
    from bench.adapters import load_adapter
    from bench.evaluate import retention

    adapter = load_adapter(dora_dir())
    adapter.passthrough = {k: v.half() if k.endswith(".lora_magnitude_vector") else v for k, v in adapter.passthrough.items()}
    methods = [("int8 per-channel", bl.encode_quant, bl.decode_quant, {"bits": 8}),
               ("int4 per-channel", bl.encode_quant, bl.decode_quant, {"bits": 4}),
               ("int3 per-channel", bl.encode_quant, bl.decode_quant, {"bits": 3}),
               ("SVD rank 2 int4", bl.encode_svd, bl.decode_quant, {"rank": 2, "bits": 4}),
               ("SVD rank 3 int4", bl.encode_svd, bl.decode_quant, {"rank": 3, "bits": 4}),
               ("SVD rank 3 int3", bl.encode_svd, bl.decode_quant, {"rank": 3, "bits": 3})]
    for name, encode, decode, params in methods:
        path = workdir / "baseline.bin"
        encode(adapter, path, **params)
        sd = {k: v.float() if k.endswith(".lora_magnitude_vector") else v for k, v in decode(adapter, path).items()}
        yield name, path.stat().st_size, retention(base, lora, task.evaluate(sd))["loss"]


def main(argv: list[str] | None = None) -> list[dict]:
    from safetensors.torch import load_file

    from bench.calibration import CACHE
    from bench.evaluate import StoriesTask, retention
    from bench.run import find_cli

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bytes", type=int, nargs="+", default=[1600, 2000, 2500, 3000, 3500, 4500])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--no-calib", action="store_true", help="data-free only")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cli = find_cli()
    task = StoriesTask(windows=args.windows, adapter_dir=dora_dir())
    with task.model.disable_adapter():  # the base model: DoRA's zeroed B and initial magnitudes
        base = {m: float(v.sum() / w.sum()) for m, (v, w) in task._per_example().items()}
    lora = task.evaluate(load_file(str(dora_dir() / "adapter_model.safetensors")))
    fp16 = None
    print(f"DoRA stories260K: base loss {base['loss']:.4f}, adapted {lora['loss']:.4f}")
    families = {"data-free": []}
    if not args.no_calib:
        families["K-FAC"] = ["--calib", str(calibration_stats(CACHE / "stories260k_dora_kfac.safetensors"))]
    rows = []
    with tempfile.TemporaryDirectory() as td:
        print("| baseline (magnitudes fp16) | bytes | retention |")
        print("|---|---:|---:|")
        for name, size, ret in baselines(task, base, lora, Path(td)):
            rows.append({"statistics": "baseline", "method": name, "bytes": size, "retention": ret})
            print(f"| {name} | {size:,} | {100 * ret:.2f}% |", flush=True)
        print("| statistics | --target-bytes | magnitudes | bytes | % of fp16 | retention |")
        print("|---|---:|---|---:|---:|---:|")
        for family, flags in families.items():
            for t in args.bytes:
                for mags in ("coded", "exact"):
                    out = f"{td}/a.solar"
                    run = subprocess.run([cli, "compress", "--adapter", str(dora_dir()), "--base", str(task.base_path), "--out",
                                          out, "-q", "--no-verify", "--target-bytes", str(t), "--dora-magnitudes", mags, *flags],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    if run.returncode != 0:
                        if "below the smallest file" not in run.stderr:
                            raise RuntimeError(run.stderr)
                        rows.append({"statistics": family, "target_bytes": t, "magnitudes": mags, "bytes": None})
                        print(f"| {family} | {t:,} | {mags} | below its smallest file | | |", flush=True)
                        continue
                    if fp16 is None:
                        import json

                        rep = json.loads(subprocess.run([cli, "inspect", "--json", out], check=True, capture_output=True,
                                                        text=True).stdout)
                        fp16 = rep["peft_fp16_bytes"]
                    subprocess.run([cli, "decompress", out, "--base", str(task.base_path), "--out", f"{td}/r", "-q"],
                                   check=True, stdout=subprocess.DEVNULL)
                    size = Path(out).stat().st_size
                    ret = retention(base, lora, task.evaluate(load_file(f"{td}/r/adapter_model.safetensors")))["loss"]
                    rows.append({"statistics": family, "target_bytes": t, "magnitudes": mags, "bytes": size,
                                 "fp16_share": size / fp16, "retention": ret})
                    print(f"| {family} | {t:,} | {mags} | {size:,} | {100 * size / fp16:.1f}% | {100 * ret:.2f}% |", flush=True)
    return rows


if __name__ == "__main__":
    main()
