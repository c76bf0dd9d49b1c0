"""How well does the calibrated metric predict what a compressed layer costs? (stories260K)

Compresses the stories260K LoRA with calibration at one target, then restores one layer at a time
(the others exact) and compares, per layer, on the evaluation windows the benchmark scores:

* actual: the held-out loss increase with that layer compressed;
* K-FAC: tr(G E S E^T) / 2 from calibration statistics of the same 32 training windows as
  bench/calibration.py, but with the loss summed over tokens (so that G is the per-token gradient
  moment and the prediction is in nats per token; the encoder's file differs from it by a
  constant factor, which does not change a plan), E = the layer's update error;
* K-FAC - first order: the same minus <grad of the held-out loss, E>, the first-order term, which
  the encoder cannot know (it is measured here on the evaluation windows themselves).

    python -m bench.kfac_check [--target-error 0.3]

The spread of actual / K-FAC across layers shows how much a per-layer plan can misjudge; when
subtracting the held-out first-order term closes most of the gap, the misjudgement is noise of
the evaluation set (the sign of a random-looking linear term), not a fault of the metric.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _summed_stats() -> dict:
    import solar
    from peft import PeftModel

    from bench.fixtures.paths import fixtures_dir, stories260k_dir
    from bench.fixtures.stories import Tokenizer, load_stories260k
    from bench.fixtures.train_stories_lora import shakespeare_splits

    tok = Tokenizer(str(stories260k_dir() / "tok512.bin"))
    train, _ = shakespeare_splits(tok)
    model = PeftModel.from_pretrained(load_stories260k(), str(fixtures_dir() / "stories260k_lora_r4"))
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(train) - 257, (32,), generator=g).tolist()  # as bench/calibration.py

    def summed_loss(m, batch):
        x = batch["input_ids"]
        logits = m(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")

    return solar.calibrate(model, [{"input_ids": train[s: s + 257][None]} for s in starts], loss_fn=summed_loss,
                           attention_mixing=False)


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import load_file

    from bench.calibration import ensure
    from bench.evaluate import StoriesTask
    from bench.run import find_cli

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-error", type=float, default=0.3)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    task = StoriesTask()
    stats_file = ensure("stories260k")  # what the encoder uses (bench/calibration.py)
    stats = _summed_stats()
    lora = load_file(str(task.adapter_dir / "adapter_model.safetensors"))
    with tempfile.TemporaryDirectory() as td:
        cli = find_cli()
        subprocess.run([cli, "compress", "--adapter", str(task.adapter_dir), "--out", f"{td}/a.solar", "-q",
                        "--calib", str(stats_file), "--target-error", str(args.target_error)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([cli, "decompress", f"{td}/a.solar", "--out", f"{td}/r", "-q"], check=True,
                       stdout=subprocess.DEVNULL)
        comp = load_file(f"{td}/r/adapter_model.safetensors")

    # Per-token inputs and loss gradients of every LoRA layer on the evaluation windows.
    model = task.model
    modules = {n[len("base_model.model."):]: m for n, m in model.named_modules()
               if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    xs: dict[str, list] = {k: [] for k in modules}
    gs: dict[str, list] = {k: [] for k in modules}
    hooks = []
    for k, m in modules.items():
        hooks.append(m.register_forward_hook(lambda _m, i, _o, k=k: xs[k].append(i[0].detach().reshape(-1, i[0].shape[-1]).double())))
        hooks.append(m.register_full_backward_hook(lambda _m, _gi, go, k=k: gs[k].append(go[0].detach().reshape(-1, go[0].shape[-1]).double())))
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(model, lora)
    lora_params = [p for m in modules.values() for n, p in m.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.requires_grad_(True)
    tokens = 0
    for i in range(0, len(task.data), 16):
        w = task.data[i: i + 16]
        logits = model(w[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1), reduction="sum").backward()
        tokens += w[:, 1:].numel()
    for h in hooks:
        h.remove()
    for p in lora_params:
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)

    base_loss = task.evaluate(lora)["loss"]
    all_loss = task.evaluate(comp)["loss"]
    scale = {k: m.scaling["default"] for k, m in modules.items()}
    print(f"stories260K, spectral + calibration --target-error {args.target_error}: held-out loss "
          f"{base_loss:.4f} -> {all_loss:.4f} (+{all_loss - base_loss:.4f})")
    print(f"{'module':28s} {'actual':>8s} {'K-FAC':>8s} {'ratio':>6s} {'K-FAC-1st':>10s} {'ratio':>6s}")
    sums = [0.0, 0.0, 0.0]
    for k in sorted(modules):
        pre = "base_model.model." + k
        e = scale[k] * (lora[pre + ".lora_B.weight"].double() @ lora[pre + ".lora_A.weight"].double()
                        - comp[pre + ".lora_B.weight"].double() @ comp[pre + ".lora_A.weight"].double())
        s_in, g_out = stats[k + ".input_moment"].double(), stats[k + ".output_grad_moment"].double()
        kfac = 0.5 * torch.trace(g_out @ e @ s_in @ e.T).item()
        x, g = torch.cat(xs[k]), torch.cat(gs[k])
        first = ((g.T @ x) * e).sum().item() / tokens  # <d loss / d(delta W), E>, held-out, per token
        sd = dict(lora)
        for part in ("lora_A", "lora_B"):
            sd[f"{pre}.{part}.weight"] = comp[f"{pre}.{part}.weight"]
        actual = task.evaluate(sd)["loss"] - base_loss
        sums = [sums[0] + actual, sums[1] + kfac, sums[2] + kfac - first]
        print(f"{k:28s} {actual:8.4f} {kfac:8.4f} {actual / kfac:6.2f} {kfac - first:10.4f} {actual / (kfac - first):6.2f}")
    print(f"{'sum':28s} {sums[0]:8.4f} {sums[1]:8.4f} {sums[0] / sums[1]:6.2f} {sums[2]:10.4f} {sums[0] / sums[2]:6.2f}")


if __name__ == "__main__":
    main()
