"""Does the loss's first-order term pay? (`solar.calibrate(..., first_order=True)`; docs/FORMAT.md,
"Calibration statistics"). K-FAC prices an error as if the adapter sat at a minimum of the loss it
is judged on; on data it was not trained on it does not, and dropping a component also costs
-<s dL/dW, component> to first order.

1. MiniLM, per layer: component 1 (0-based, of the K-FAC metric's components) of one layer dropped,
   all else exact: its first-order price, its quadratic price (c/2)|component|^2 in the metric
   (c from the loss curvature, as the codec converts), and the loss change on the 512 calibration
   sentences (held out from training), the tuning split and the dev set;
2. MiniLM: the exact components at the ranks the benchmark's K-FAC file keeps at --budget B, then
   with the n dropped components of largest first-order price restored (no quantisation at all);
3. MiniLM files at equal bytes (loss / accuracy retention in %, tuning split then dev set):
   K-FAC against K-FAC + first order (the benchmark's statistics);
4. stories260K (its calibration windows are training text) and SmolLM2 (the last 64 pairs of
   valid.txt, partly training data, which the benchmark calibrated on until 2026-11-30; 64 and 256
   pairs the fixture never trained on, the benchmark's since), tuning splits: K-FAC against K-FAC +
   first order from the same data;
5. stories260K with held-out text: first-order statistics from validation windows the benchmark
   does not score (the first 104 of the 209 after its 64), scored on the other 105 and on the
   benchmark's 64: K-FAC from the 32 training windows (the benchmark's), K-FAC from the held-out
   windows with and without their first-order entries, and the training windows' K-FAC with the
   held-out windows' first-order entries.

    python -m bench.first_order_check [--parts 1 2 3 4 5] [--budget 4300]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.topend_check import _keys, _lora_modules, whitened_svd  # noqa: E402


def _component(u, s, vt, gih, sih, i: int) -> torch.Tensor:
    return gih @ torch.outer(u[:, i] * s[i], vt[i]) @ sih


def _with_update(lora: dict, module: str, dw: torch.Tensor) -> dict:
    """The adapter with one module's B A replaced by dw (rank <= r), split by its SVD."""
    ka, kb = _keys(module)
    r = lora[ka].shape[0]
    uu, ss, vv = torch.linalg.svd(dw)
    out = dict(lora)
    out[kb], out[ka] = (uu[:, :r] * ss[:r].sqrt()).float(), (ss[:r].sqrt()[:, None] * vv[:r]).float()
    return out


def _calibration_task():
    """The MiniLM task scored on the 512 calibration sentences."""
    from bench.evaluate import MiniLMTask
    from bench.fixtures.train_minilm_sst2 import load_sst2

    task = MiniLMTask()
    task.dev = load_sst2("train")[-512:]
    return task


def minilm_parts(parts: list[int], budget: int) -> None:
    from safetensors.torch import load_file

    from bench.balance_check import minilm_setup, references, split_cells
    from bench.calibration import ensure
    from bench.evaluate import retention
    from bench.topend_check import _compress

    setup = minilm_setup()
    cli, tasks, refs, adapter, kfac_file = setup.cli, setup.tasks, setup.refs, setup.adapter, setup.kfac
    first_file = ensure("minilm_sst2", first_order=True)
    stats = load_file(str(first_file))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    modules = _lora_modules(lora)
    layers = {m: whitened_svd(lora, stats, m) for m in modules}
    energy = sum(float((s ** 2).sum()) for _, _, s, _, _, _ in layers.values())  # sum_l E_l / scaling^2
    curvature = float(stats["solar.loss_curvature"])

    def price(module: str, i: int) -> float:
        dw, u, s, vt, gih, sih = layers[module]
        return -scaling * float((stats[f"{module}.update_gradient"].double() * _component(u, s, vt, gih, sih, i)).sum())

    if 1 in parts:
        scored = {"calibration": _calibration_task(), **tasks}
        losses = {name: references(t)[1]["loss"] for name, t in scored.items()}
        print("1. component 1 of one layer dropped, all else exact: first-order price, quadratic price; loss change on "
              "the calibration sentences, tuning split, dev set (nats)", flush=True)
        for m in modules:
            dw, u, s, vt, gih, sih = layers[m]
            dropped = _with_update(lora, m, dw - _component(u, s, vt, gih, sih, 1))
            change = ", ".join(f"{t.evaluate(dropped)['loss'] - losses[n]:+.1e}" for n, t in scored.items())
            quadratic = curvature * float(s[1]) ** 2 / (2 * energy)
            print(f"   {m[len('bert.encoder.'):]}: {price(m, 1):+.1e}, {quadratic:.1e}; {change}", flush=True)

    with tempfile.TemporaryDirectory() as td:
        if 2 in parts:
            _, ranks, size = _compress(cli, adapter, kfac_file, budget, td)
            kept = {m: list(range(ranks.get(m, 0))) for m in modules}
            dropped = sorted(((price(m, i), m, i) for m in modules for i in range(ranks.get(m, 0), lora[_keys(m)[0]].shape[0])),
                             reverse=True)
            print(f"2. exact components at the ranks of the K-FAC file of {size} B ({[len(kept[m]) for m in modules]})",
                  flush=True)
            for n in (0, 2, 4, 12):
                keep = {m: list(v) for m, v in kept.items()}
                for _, m, i in dropped[:n]:
                    keep[m].append(i)
                restored = dict(lora)
                for m in modules:
                    dw, u, s, vt, gih, sih = layers[m]
                    part = sum((_component(u, s, vt, gih, sih, i) for i in keep[m]), torch.zeros_like(dw))
                    restored = _with_update(restored, m, part)
                cell = ", ".join("/".join(f"{100 * retention(*refs[n_], t.evaluate(restored))[k]:.2f}" for k in t.metrics)
                                 for n_, t in tasks.items())
                print(f"   + the {n} dropped components of largest first-order price: {cell}", flush=True)
        if 3 in parts:
            budgets = [3500, 4000, 4300, 5000, 5500]
            print("3. equal bytes: " + ", ".join(f"{b} B" for b in budgets), flush=True)
            for label, path in (("K-FAC", kfac_file), ("K-FAC + first order", first_file)):
                cells = split_cells(cli, adapter, budgets, ["--passthrough", "spectral", "--calib", str(path)], tasks, refs, td)
                print(f"   {label}: " + "; ".join(cells), flush=True)


def _kfac_only(path: Path, out: Path) -> Path:
    """The same statistics without their first-order entries."""
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(str(path)).items()
               if not (k.endswith(".update_gradient") or k.startswith("solar."))}, str(out))
    return out


def _smollm2_stats(examples: list, out: Path) -> None:
    from peft import PeftModel

    import solar
    from bench.fixtures.paths import fixtures_dir
    from bench.fixtures.train_smollm2_e2e import collate, load_base_model, load_tokenizer, target_loss

    tok = load_tokenizer()
    model = PeftModel.from_pretrained(load_base_model(), str(fixtures_dir() / "smollm2_e2e_lora_r8"))
    batches = [collate(tok, examples[i: i + 16]) for i in range(0, len(examples), 16)]
    solar.calibrate(model, batches, loss_fn=target_loss, first_order=True, attention_mixing=False, out=out)


def other_models() -> None:
    from bench.balance_check import references, retention_cells, tuning_task
    from bench.calibration import CACHE, CALIBRATORS, cached
    from bench.fixtures import train_smollm2_e2e as e2e
    from bench.run import find_cli

    cli = find_cli()
    runs = {
        "stories260k": ([1000, 1100, 1300, 1500, 1700, 2100],
                        {"training windows": lambda out: CALIBRATORS["stories260k"](out, first_order=True)}),
        "smollm2_e2e": ([4000, 8500, 23000],
                        {"the last 64 pairs": lambda out: _smollm2_stats(e2e.calib_examples(), out),
                         "64 held-out pairs": lambda out: _smollm2_stats(e2e.heldout_examples(64), out),
                         "256 held-out pairs": lambda out: _smollm2_stats(e2e.heldout_examples(256), out)}),
    }
    for model, (budgets, sources) in runs.items():
        task = tuning_task(model)
        refs = references(task)
        print(f"4. {model}, tuning split: " + ", ".join(f"{b} B" for b in budgets), flush=True)
        for source, make in sources.items():
            name = source.replace("'", "").replace(" ", "_")
            first = cached(CACHE / f"{model}_first_order_check_{name}.safetensors", make)
            with tempfile.TemporaryDirectory() as td:
                kfac = _kfac_only(first, Path(td) / "kfac.safetensors")
                for label, path in (("K-FAC", kfac), ("K-FAC + first order", first)):
                    cells = retention_cells(task, cli, budgets, ["--calib", str(path)], refs, td)
                    print(f"   {source}, {label}: " + "; ".join(cells), flush=True)


STORIES_HELD_OUT = 104  # validation windows after the benchmark's 64 used for calibration in part 5


def stories_held_out(budgets: list[int]) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    import solar
    from bench.balance_check import references, retention_cells, tuning_task
    from bench.calibration import CACHE, cached, ensure, stories_lm_loss
    from bench.evaluate import StoriesTask
    from bench.fixtures.paths import fixtures_dir, stories260k_dir
    from bench.fixtures.stories import Tokenizer, eval_windows, load_stories260k
    from bench.fixtures.train_stories_lora import shakespeare_splits
    from bench.run import find_cli

    _, val = shakespeare_splits(Tokenizer(str(stories260k_dir() / "tok512.bin")))
    windows = eval_windows(val, 256)
    scored = StoriesTask().windows
    calib = windows[scored: scored + STORIES_HELD_OUT]

    def make(out: Path) -> None:
        torch.manual_seed(0)
        model = PeftModel.from_pretrained(load_stories260k(), str(fixtures_dir() / "stories260k_lora_r4"))
        solar.calibrate(model, [{"input_ids": calib[i: i + 8]} for i in range(0, len(calib), 8)], loss_fn=stories_lm_loss,
                        first_order=True, attention_mixing=False, out=out)

    held = cached(CACHE / f"stories260k_first_order_check_held_out_{STORIES_HELD_OUT}.safetensors", make)
    train = ensure("stories260k")
    tune = tuning_task("stories260k")
    tune.data = windows[scored + STORIES_HELD_OUT:]
    cli = find_cli()
    with tempfile.TemporaryDirectory() as td:
        mixed = dict(load_file(str(train)))
        mixed.update({k: v for k, v in load_file(str(held)).items() if k.endswith(".update_gradient") or k.startswith("solar.")})
        save_file(mixed, f"{td}/mixed.safetensors")
        files = {"K-FAC, training windows (the benchmark's)": str(train),
                 "K-FAC, held-out windows": str(_kfac_only(held, Path(td) / "held_kfac.safetensors")),
                 "K-FAC + first order, held-out windows": str(held),
                 "K-FAC of the training windows + first order of the held-out ones": f"{td}/mixed.safetensors"}
        for split, task in (("the other held-out windows", tune), ("the benchmark's 64 windows", StoriesTask())):
            refs = references(task)
            print(f"5. stories260K, {split} ({len(task.data)}): " + ", ".join(f"{b} B" for b in budgets), flush=True)
            for label, path in files.items():
                cells = retention_cells(task, cli, budgets, ["--calib", path], refs, td)
                print(f"   {label}: " + "; ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--budget", type=int, default=4300, help="file size of part 2")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if set(args.parts) & {1, 2, 3}:
        minilm_parts(args.parts, args.budget)
    if 4 in args.parts:
        other_models()
    if 5 in args.parts:
        stories_held_out([1000, 1100, 1200, 1284, 1400, 1600])


if __name__ == "__main__":
    main()
