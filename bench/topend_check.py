"""What keeps MiniLM's calibrated files below 99% of the loss gain at 3.5-5.5 KB (the 99% cell of
issue 8 needs >= 99% at <= 4,325 B). Retention of loss / accuracy (%), tuning split (SST-2 training
sentences 20,000-20,871) then dev set; head in the stream (`--passthrough spectral`), the
benchmark's K-FAC statistics.

1. where the loss goes: the file at --budget, then each layer (and the head) restored exactly;
2. rank alone: every layer's exact components in the K-FAC metric (SVD of G^1/2 B A S^1/2, the
   basis the codec codes), truncated to the ranks the file keeps, then one and two more: no
   quantisation at all;
3. per-channel steps: the factors and statistics rescaled per channel (A D, E B with D, E from
   the statistics' diagonals, S and G rescaled to match) before coding and back after, as if the
   decoder knew a finer step for loud channels at no cost;
4. true Fisher: statistics whose gradients use labels drawn from the adapted model (exact
   expectation over both classes) instead of the true labels.

    python -m bench.topend_check [--budget 4300] [--budgets 4300 5000]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PREFIX = "base_model.model."
DAMPING = 0.1  # the CLI's default --calib-damping


def _damped(m: torch.Tensor) -> torch.Tensor:
    return m + DAMPING * m.diagonal().mean() * torch.eye(m.shape[0], dtype=m.dtype)


def _sqrt_pair(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e, q = torch.linalg.eigh(m)
    return (q * e.sqrt()) @ q.T, (q / e.sqrt()) @ q.T


def _lora_modules(lora: dict) -> list[str]:
    """Module names (as in the statistics) of the LoRA layers, in file order."""
    return sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in lora if ".lora_A." in k},
                  key=lambda m: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", m)])


def _keys(module: str) -> tuple[str, str]:
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def _score(tasks: dict, refs: dict, tensors: dict) -> str:
    from bench.evaluate import retention

    return ", ".join("/".join(f"{100 * retention(*refs[s], t.evaluate(tensors))[m]:.2f}" for m in t.metrics)
                     for s, t in tasks.items())


def _compress(cli: str, adapter: Path, stats: Path, budget: int, workdir: str) -> tuple[dict, list[int], int]:
    """The file at `budget` restored, the ranks it keeps per LoRA layer, and its size."""
    from safetensors.torch import load_file

    out = f"{workdir}/a.solar"
    subprocess.run([cli, "compress", "--adapter", str(adapter), "--out", out, "-q", "--no-verify", "--target-bytes",
                    str(budget), "--passthrough", "spectral", "--calib", str(stats)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cli, "decompress", out, "--out", f"{workdir}/r", "-q"], check=True, stdout=subprocess.DEVNULL)
    restored = load_file(f"{workdir}/r/adapter_model.safetensors")
    ranks = {}
    for line in subprocess.run([cli, "inspect", out], check=True, capture_output=True, text=True).stdout.splitlines():
        m = re.search(r"^(\S+)\s+spectral\s.*kept (\d+) of", line)
        if m:
            ranks[m.group(1)] = int(m.group(2))
    return restored, ranks, os.path.getsize(out)


def whitened_svd(lora: dict, stats: dict, module: str):
    """B A, the SVD (u, s, vt) of G^1/2 B A S^1/2 (the basis the codec codes; statistics damped
    as the CLI does), and G^-1/2, S^-1/2 to map components back."""
    ka, kb = _keys(module)
    dw = lora[kb].double() @ lora[ka].double()
    sh, sih = _sqrt_pair(_damped(stats[f"{module}.input_moment"].double()))
    gh, gih = _sqrt_pair(_damped(stats[f"{module}.output_grad_moment"].double()))
    u, s, vt = torch.linalg.svd(gh @ dw @ sh)
    return dw, u, s, vt, gih, sih


def _truncated(lora: dict, stats: dict, ranks: dict[str, int], extra: int) -> dict:
    out = dict(lora)
    for module in _lora_modules(lora):
        ka, kb = _keys(module)
        _, u, s, vt, gih, sih = whitened_svd(lora, stats, module)
        k = min(lora[ka].shape[0], ranks.get(module, 0) + extra)
        b, a = torch.zeros_like(lora[kb]), torch.zeros_like(lora[ka])
        b[:, :k] = (gih @ u[:, :k] * s[:k].sqrt()).float()
        a[:k] = ((s[:k].sqrt()[:, None] * vt[:k]) @ sih).float()
        out[kb], out[ka] = b, a
    return out


def _per_channel(cli: str, adapter: Path, lora: dict, stats: dict, alpha: float, budget: int, workdir: str) -> dict:
    """Codes A D and E B (D = diag(S_ii / mean)^(alpha/2), E likewise from G) with statistics
    D^-1 S D^-1 and E^-1 G E^-1, then undoes the scaling on the restored factors."""
    from safetensors.torch import save_file

    scaled, scaled_stats, scales = dict(lora), dict(stats), {}
    for module in _lora_modules(lora):
        ka, kb = _keys(module)
        s, g = stats[f"{module}.input_moment"].double(), stats[f"{module}.output_grad_moment"].double()
        d = (s.diagonal() / s.diagonal().mean()) ** (alpha / 2)
        e = (g.diagonal() / g.diagonal().mean()) ** (alpha / 2)
        scaled[ka] = (lora[ka].double() * d).float()
        scaled[kb] = (e[:, None] * lora[kb].double()).float()
        scaled_stats[f"{module}.input_moment"] = (s / d[:, None] / d[None, :]).float()
        scaled_stats[f"{module}.output_grad_moment"] = (g / e[:, None] / e[None, :]).float()
        scales[module] = (d, e)
    directory = Path(workdir) / "scaled"
    directory.mkdir(exist_ok=True)
    shutil.copy(adapter / "adapter_config.json", directory)
    save_file(scaled, str(directory / "adapter_model.safetensors"))
    save_file(scaled_stats, f"{workdir}/scaled_stats.safetensors")
    restored, _, _ = _compress(cli, directory, Path(f"{workdir}/scaled_stats.safetensors"), budget, workdir)
    for module, (d, e) in scales.items():
        ka, kb = _keys(module)
        restored[ka] = (restored[ka].double() / d).float()
        restored[kb] = (restored[kb].double() / e[:, None]).float()
    return restored


def true_fisher_stats(out: Path) -> None:
    """K-FAC statistics of the benchmark's 512 calibration sentences with the gradients' labels
    drawn from the adapted model: each batch twice, class y weighted by sqrt(p(y | x)) so that the
    gradient moments are E_y~p[g g^T]."""
    from peft import PeftModel

    import solar
    from bench.fixtures.paths import fixtures_dir
    from bench.fixtures.train_minilm_sst2 import load_base_model, load_sst2, load_tokenizer

    tok = load_tokenizer()
    model = PeftModel.from_pretrained(load_base_model(), str(fixtures_dir() / "minilm_sst2_lora_r8"))
    examples = load_sst2("train")[-512:]

    def batches():
        for i in range(0, len(examples), 32):
            enc = dict(tok([t for t, _ in examples[i: i + 32]], padding=True, truncation=True, max_length=64,
                           return_tensors="pt"))
            for y in (0, 1):
                yield {**enc, "fisher_label": y}

    def loss_fn(m, batch):
        logits = m(**{k: v for k, v in batch.items() if k != "fisher_label"}).logits
        weight = torch.softmax(logits.detach(), -1)[:, batch["fisher_label"]].sqrt()
        target = torch.full((logits.shape[0],), batch["fisher_label"])
        return (weight * torch.nn.functional.cross_entropy(logits, target, reduction="none")).mean()

    solar.calibrate(model, batches(), loss_fn=loss_fn, attention_mixing=False, out=out)


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import load_file

    from bench.balance_check import minilm_setup, split_cells

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=4300, help="file size of parts 1 and 2")
    ap.add_argument("--budgets", type=int, nargs="+", default=[4300, 5000], help="file sizes of parts 3 and 4")
    args = ap.parse_args(argv)
    setup = minilm_setup()
    cli, tasks, refs, adapter, stats_file = setup.cli, setup.tasks, setup.refs, setup.adapter, setup.kfac
    stats = load_file(str(stats_file))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    with tempfile.TemporaryDirectory() as td:
        restored, ranks, size = _compress(cli, adapter, stats_file, args.budget, td)
        print(f"1. file of {size} B: {_score(tasks, refs, restored)}", flush=True)
        for module in [*_lora_modules(lora), "classifier"]:
            swapped = dict(restored)
            for key in (k for k in lora if k[len(PREFIX):].startswith(module + ".")):
                swapped[key] = lora[key]
            print(f"   {module} exact: {_score(tasks, refs, swapped)}", flush=True)
        print(f"2. ranks kept: {[ranks.get(m, 0) for m in _lora_modules(lora)]}")
        for extra in (0, 1, 2):
            print(f"   exact components, ranks + {extra}: {_score(tasks, refs, _truncated(lora, stats, ranks, extra))}",
                  flush=True)
        for alpha in (0.0, 0.5, 1.0):
            for budget in args.budgets:
                got = _per_channel(cli, adapter, lora, stats, alpha, budget, td)
                print(f"3. per-channel steps, exponent {alpha:g}, {budget} B: {_score(tasks, refs, got)}", flush=True)
        fisher = Path(td) / "true_fisher.safetensors"
        true_fisher_stats(fisher)
        for label, path in (("labelled gradients (the benchmark's)", stats_file), ("true Fisher", fisher)):
            cells = split_cells(cli, adapter, args.budgets, ["--passthrough", "spectral", "--calib", str(path)], tasks,
                                refs, td)
            print(f"4. {label}: " + "; ".join(f"{b} B: {c}" for b, c in zip(args.budgets, cells)), flush=True)


if __name__ == "__main__":
    main()
