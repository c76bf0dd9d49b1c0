"""How the byte budget is shared between layers (`--balance`), checked on tuning splits rather
than on the benchmark's evaluation sets, so that the default is not picked on the data it is
scored on.

Retention at equal file size (`--target-bytes`) for balance 0 (the whole adapter's error counts:
layers with large updates get most bytes), 0.5, 1 (every layer's relative error counts the same)
and 1.5, data-free and with the benchmark's K-FAC statistics. Tuning splits: stories260K on the
TinyShakespeare validation windows the benchmark does not score (windows 64-272); MiniLM on
SST-2 training sentences 20,000-20,871 (the fixture was trained on the first 12,800 and
calibrated on the last 512).

    python -m bench.balance_check [--models stories260k minilm_sst2] [--balances 0 0.5 1 1.5]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BUDGETS = {"stories260k": [1100, 1400, 1700, 2100, 2500], "minilm_sst2": [4500, 5500, 7000, 9000]}


def tuning_task(model: str):
    from bench.evaluate import MiniLMTask, StoriesTask

    if model == "stories260k":
        from bench.fixtures.stories import Tokenizer, eval_windows
        from bench.fixtures.paths import stories260k_dir
        from bench.fixtures.train_stories_lora import shakespeare_splits

        task = StoriesTask()
        _, val = shakespeare_splits(Tokenizer(str(stories260k_dir() / "tok512.bin")))
        task.data = eval_windows(val, task.seq_len)[task.windows:]  # the windows the benchmark leaves out
        return task
    if model == "smollm2_e2e":  # the 128 E2E test pairs halfway between the ones the benchmark scores
        from bench.evaluate import SmolLM2Task
        from bench.fixtures import train_smollm2_e2e as e2e

        task = SmolLM2Task()
        test, n = e2e.load_e2e("test"), e2e.EVAL_EXAMPLES
        task.batches = e2e.eval_batches(e2e.load_tokenizer(),
                                        [test[i * len(test) // n + len(test) // (2 * n)] for i in range(n)])
        return task
    from bench.fixtures.train_minilm_sst2 import load_sst2

    task = MiniLMTask()
    tune = load_sst2("train")[20000:20872]
    lengths = [len(ids) for ids in task.tokenizer([s for s, _ in tune], truncation=True, max_length=64)["input_ids"]]
    task.dev = [tune[i] for i in sorted(range(len(tune)), key=lambda i: (lengths[i], i))]
    return task


def references(task) -> tuple[dict, dict]:
    """The task's metrics with the LoRA zeroed (base) and as trained."""
    from safetensors.torch import load_file

    lora = load_file(str(task.adapter_dir / "adapter_model.safetensors"))
    base = task.evaluate({k: torch.zeros_like(v) if "lora_" in k else v for k, v in lora.items()})
    return base, task.evaluate(lora)


def stories_loss_retention():
    """packed -> stories260K's loss retention in % on the benchmark's evaluation set and the tuning
    split, as "eval / tuning" (the model-in-the-loop checks' cells; spectral files need no base)."""
    import solar
    from bench.evaluate import TASKS, retention

    tasks = {"eval": TASKS["stories260k"](), "tuning": tuning_task("stories260k")}
    refs = {k: references(t) for k, t in tasks.items()}

    def cells(packed) -> str:
        state = {k: v.float() for k, v in solar.restore(packed, None).items()}
        return " / ".join(f"{100 * retention(*refs[s], t.evaluate(state))['loss']:.2f}" for s, t in tasks.items())
    return cells


def print_table_head(model: str, refs: tuple[dict, dict], columns: list[str], budgets: list[int]) -> None:
    """The model's reference metrics, then a markdown table head: `columns`, then one per budget."""
    print(f"\n{model}, tuning split: base {refs[0]}, LoRA {refs[1]}")
    print("| " + " | ".join(columns) + " | " + " | ".join(f"{b} B" for b in budgets) + " |")
    print("|" + "---|" * (len(columns) + len(budgets)))


def retention_cells(task, cli: str, budgets: list[int], extra: list[str], refs: tuple[dict, dict], workdir: str) -> list[str]:
    """Retention (each metric, in %) of `solar compress --target-bytes B *extra` for every budget."""
    from safetensors.torch import load_file

    from bench.evaluate import retention

    cells = []
    for budget in budgets:
        subprocess.run([cli, "compress", "--base", str(task.base_path), "--adapter", str(task.adapter_dir),
                        "--out", f"{workdir}/a.solar", "-q", "--no-verify", "--target-bytes", str(budget), *extra],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([cli, "decompress", f"{workdir}/a.solar", "--base", str(task.base_path), "--out",
                        f"{workdir}/r", "-q"], check=True, stdout=subprocess.DEVNULL)
        ret = retention(*refs, task.evaluate(load_file(f"{workdir}/r/adapter_model.safetensors")))
        cells.append(" / ".join(f"{100 * ret[k]:.1f}%" for k in task.metrics))
    return cells


def minilm_splits() -> tuple[dict, dict]:
    """MiniLM's tuning split and the dev set the benchmark scores, with their reference metrics."""
    from bench.evaluate import MiniLMTask

    tasks = {"tune": tuning_task("minilm_sst2"), "dev": MiniLMTask()}
    return tasks, {name: references(task) for name, task in tasks.items()}


def minilm_setup():
    """What the MiniLM tuning-split checks share: the CLI, the two splits with their reference
    metrics, the fixture's adapter directory and the benchmark's K-FAC statistics file (two BLAS
    threads, as the benchmark runs)."""
    from types import SimpleNamespace

    from bench.calibration import ensure
    from bench.run import find_cli

    torch.set_num_threads(2)
    tasks, refs = minilm_splits()
    return SimpleNamespace(cli=find_cli(), tasks=tasks, refs=refs, adapter=tasks["dev"].adapter_dir,
                           kfac=ensure("minilm_sst2", earlier=True))


def split_cells(cli: str, adapter_dir, budgets: list[int], flags: list[str], tasks: dict, refs: dict, workdir) -> list[str]:
    """One cell per budget for `solar compress --adapter adapter_dir --target-bytes B *flags` (a
    mode that needs no base), scored on several splits of one task: each split's retention per
    metric in % joined by "/", the splits (in `tasks`' order) by ", "."""
    from safetensors.torch import load_file

    from bench.evaluate import retention

    cells = []
    for budget in budgets:
        subprocess.run([cli, "compress", "--adapter", str(adapter_dir), "--out", f"{workdir}/a.solar", "-q", "--no-verify",
                        "--target-bytes", str(budget), *flags], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([cli, "decompress", f"{workdir}/a.solar", "--out", f"{workdir}/r", "-q"], check=True,
                       stdout=subprocess.DEVNULL)
        restored = load_file(f"{workdir}/r/adapter_model.safetensors")
        parts = []
        for split, task in tasks.items():
            ret = retention(*refs[split], task.evaluate(restored))
            parts.append("/".join(f"{100 * ret[m]:.1f}" for m in task.metrics))
        cells.append(", ".join(parts))
    return cells


def print_tuning_tables(models: list[str], budgets: dict[str, list[int]], columns: list[str], rows) -> None:
    """For each model, its tuning split's reference metrics and a table of retention at equal file
    size: one row per (labels, CLI flags) that `rows(model, task)` yields."""
    from bench.run import find_cli

    torch.set_num_threads(2)
    cli = find_cli()
    for model in models:
        task = tuning_task(model)
        refs = references(task)
        print_table_head(model, refs, columns, budgets[model])
        with tempfile.TemporaryDirectory() as td:
            for labels, flags in rows(model, task):
                cells = retention_cells(task, cli, budgets[model], flags, refs, td)
                print("| " + " | ".join([*labels, *cells]) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    from bench.calibration import ensure

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories260k", "minilm_sst2"])
    ap.add_argument("--balances", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    ap.add_argument("--calibrated-balances", type=float, nargs="+", default=[0.0, 1.0])
    args = ap.parse_args(argv)

    def rows(model, _task):
        stats = ensure(model, earlier=True)
        variants = [("none", b, []) for b in args.balances] + [("K-FAC", b, ["--calib", str(stats)])
                                                                for b in args.calibrated_balances]
        for label, balance, extra in variants:
            yield [label, f"{balance:g}"], ["--balance", f"{balance:g}", *extra]

    print_tuning_tables(args.models, BUDGETS, ["statistics", "balance"], rows)


if __name__ == "__main__":
    main()
