"""The README's main job on the bundled real example: a LoRA trained on TinyShakespeare for the
real pretrained stories260K model (tests/fixtures/stories260k_lora_r4), compressed with the
`solar` CLI in the paper's mode and in the recommended `spectral` mode (also with calibration
statistics from training text, and from the model's own text), restored, and evaluated
on held-out text. Prints every command it runs and a table of bytes vs. what the adapter keeps.

    python -m bench.example [--out DIR] [--windows N]
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def solar_cli() -> str:
    return os.environ.get("SOLAR_CLI") or shutil.which("solar") or str(Path(__file__).resolve().parents[1] / "build" / "solar")


def run(args: list[str]) -> str:
    print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    if out.stdout.strip():
        print(out.stdout.rstrip(), flush=True)
    return out.stdout


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/example", help="where the .solar files and restored adapters go")
    ap.add_argument("--windows", type=int, default=64, help="validation windows of 256 tokens to score")
    a = ap.parse_args(argv)

    import torch
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from bench.fixtures.paths import fixtures_dir, stories260k_dir
    from bench.fixtures.stories import Tokenizer, eval_loss, load_stories260k
    from bench.fixtures.train_stories_lora import shakespeare_splits

    torch.set_num_threads(2)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = str(stories260k_dir() / "stories260K.safetensors")
    adapter = str(fixtures_dir() / "stories260k_lora_r4")
    cli = solar_cli()

    jobs = {
        "paper (N=1000, 30% kept, 8-bit)": ["--mode", "paper", "--pool", "1000", "--keep-fraction", "0.3", "--bits", "8"],
        "paper (N=100, k=30, 8-bit)": ["--mode", "paper", "--pool", "100", "--keep", "30", "--bits", "8"],
        "spectral, target error 0.1": ["--mode", "spectral", "--target-error", "0.1"],
        "spectral, target error 0.05": ["--mode", "spectral", "--target-error", "0.05"],
        "spectral, at most 1500 bytes": ["--mode", "spectral", "--target-bytes", "1500"],
    }
    # Calibration statistics (K-FAC, from 32 windows of the *training* text) for the calibrated rows.
    from bench.calibration import ensure
    calib = str(ensure("stories260k"))
    print(f"calibration statistics: {calib}")
    jobs["spectral + calibration, target 0.3"] = ["--mode", "spectral", "--target-error", "0.3", "--calib", calib]
    jobs["spectral + calibration, <= 1500 bytes"] = ["--mode", "spectral", "--target-bytes", "1500", "--calib", calib]
    # No data at all: the adapted model writes its own calibration text (solar.self_calibrate).
    from bench.self_calibration import ensure_self
    self_calib = str(ensure_self("stories260k"))
    print(f"self-generated calibration statistics: {self_calib}")
    jobs["spectral + self-calibration, <= 1500 B"] = ["--mode", "spectral", "--target-bytes", "1500", "--calib", self_calib]
    files = {}
    for i, (name, flags) in enumerate(jobs.items()):
        f = out / f"stories_{i}.solar"
        run([cli, "compress", "--base", base, "--adapter", adapter, "--out", str(f), "-q", *flags])
        restored = out / f"restored_{i}"
        run([cli, "decompress", str(f), "--base", base, "--out", str(restored), "-q"])
        files[name] = (f, restored)
    run([cli, "inspect", str(files["spectral, target error 0.05"][0])])

    tok = Tokenizer(str(stories260k_dir() / "tok512.bin"))
    _, val = shakespeare_splits(tok)
    model = PeftModel.from_pretrained(load_stories260k(), adapter)
    original = load_file(f"{adapter}/adapter_model.safetensors")

    def loss_with(state):
        set_peft_model_state_dict(model, state)
        return eval_loss(model, val, 256, max_windows=a.windows)

    lora = loss_with(original)
    no_adapter = loss_with({k: torch.zeros_like(v) for k, v in original.items()})
    fp16_tensor_bytes = sum(v.numel() for v in original.values()) * 2
    print(f"\nvalidation loss on TinyShakespeare ({a.windows} windows of 256 tokens):")
    print(f"  base model (no adapter): {no_adapter:.4f}    LoRA: {lora:.4f}")
    print(f"  fp16 LoRA tensors: {fp16_tensor_bytes} bytes; PEFT file as stored: {os.path.getsize(f'{adapter}/adapter_model.safetensors')} bytes\n")
    print(f"  {'method':38s} {'bytes':>7s} {'% fp16':>7s} {'val loss':>9s} {'retention':>10s}")
    for name, (f, restored) in files.items():
        loss = loss_with(load_file(f"{restored}/adapter_model.safetensors"))
        size = f.stat().st_size
        retention = (no_adapter - loss) / (no_adapter - lora)
        print(f"  {name:38s} {size:7d} {100 * size / fp16_tensor_bytes:6.1f}% {loss:9.4f} {100 * retention:9.1f}%")
    print("\nretention = (loss without adapter - loss restored) / (loss without adapter - LoRA loss)")


if __name__ == "__main__":
    sys.exit(main())
