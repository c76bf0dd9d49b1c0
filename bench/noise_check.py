"""How sure are the headline cells? Each cell of issue 8's table (bench/REPORT.md, "Where the goals
stand") is decided by one evaluation set: 64 windows (stories260K), 872 sentences (MiniLM), 128
pairs (SmolLM2). This re-creates the points that decide each cell from the benchmark's results
JSON (same commands, checked to give the same bytes and metrics), scores them example by example,
and resamples the examples (a paired bootstrap: base, LoRA and every point on the same resample):

- W, the smallest solar file at the level; O, the smallest file of any other method there;
- C, when W is more than half of O: the solar point of at most half O's bytes that keeps the most
  (the file that would have met the 2x goal);

each with its measured retention (as in the headline: for MiniLM the smaller of loss and accuracy
retention), a 95% interval and the share of resamples in which it reaches the level.

    python -m bench.noise_check [--models stories260k minilm_sst2 smollm2_e2e] [--resamples 2000] [--results DIR]
                                [--levels 99 95 90 | --all-levels]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.report import GOAL_LEVELS, LEVELS, cell_winners, headline_retention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cell_points(res: dict, level: float) -> dict[str, dict]:
    """W, O and (if W misses the 2x goal) C for one level, as points of the results JSON."""
    w, o = cell_winners(res, level)
    out = {k: p for k, p in (("W", w), ("O", o)) if p}
    if w and o and 2 * w["bytes"] > o["bytes"]:
        small = [p for p in res["points"] if "retention" in p and p["family"].startswith("solar") and 2 * p["bytes"] <= o["bytes"]]
        if small:
            out["C"] = max(small, key=lambda p: (headline_retention(res, p), -p["bytes"]))
    return out


def headline_samples(per: dict, base: dict, lora: dict, idx: torch.Tensor) -> torch.Tensor:
    """The headline retention of one point on every resample (rows of idx), paired with the base
    and the LoRA on the same examples."""
    def mean(pe, m):
        v, w = pe[m]
        return v[idx].sum(1) / w[idx].sum(1)

    rets = [(mean(base, m) - mean(per, m)) / (mean(base, m) - mean(lora, m)) for m in per]
    return torch.stack(rets).min(0).values


def check_model(model: str, resamples: int, cli: str, results: Path = RESULTS, levels=LEVELS) -> list[str]:
    from bench.adapters import load_adapter
    from bench.evaluate import TASKS
    from bench.methods import method_of_point
    from bench.run import ensure_statistics, restore_point

    res = json.loads((results / f"{model}.json").read_text())
    task = TASKS[model](**res["eval"])
    adapter = load_adapter(task.adapter_dir)
    adapter.passthrough_coding = res["adapter"].get("passthrough_coding", "exact")
    cells = {lv: cell_points(res, lv) for lv in levels}
    wanted = {p["name"]: method_of_point(model, adapter.rank, res["run"]["smoke"], p) for c in cells.values() for p in c.values()}
    ensure_statistics(model, task, list(wanted.values()))

    base, lora = task.per_example(adapter.state_dict(zero=True)), task.per_example(adapter.state_dict())
    n = len(next(iter(base.values()))[0])
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(0))
    per_point = {}
    for name in sorted(wanted):
        recorded = next(p for p in res["points"] if p["name"] == name)
        with tempfile.TemporaryDirectory(prefix="solar-noise-") as d:
            rec, sd = restore_point(wanted[name], task, adapter, cli, Path(d))
        per = task.per_example(sd)
        metrics = {m: float(v.sum() / w.sum()) for m, (v, w) in per.items()}
        if rec["bytes"] != recorded["bytes"] or any(abs(metrics[m] - recorded["metrics"][m]) > 1e-5 for m in metrics):
            raise SystemExit(f"{model}: '{name}' gives {rec['bytes']} B, {metrics} now against {recorded['bytes']} B, "
                             f"{recorded['metrics']} in {results / (model + '.json')}: re-run the benchmark first")
        per_point[name] = headline_samples(per, base, lora, idx)
        print(f"   {model}: {name} re-created ({rec['bytes']} B)", flush=True)

    rows = []
    for lv, pts in cells.items():
        for role, p in pts.items():
            s = per_point[p["name"]]
            lo, hi = torch.quantile(s, torch.tensor([0.025, 0.975], dtype=s.dtype)).tolist()
            rows.append(f"| {model} | ≥{lv:.0%} | {role} | `{p['name']}` | {p['bytes']:,} | {100 * headline_retention(res, p):.2f}% "
                        f"| {100 * lo:.2f}–{100 * hi:.2f}% | {100 * float((s >= lv).double().mean()):.0f}% |")
    return rows


def main(argv: list[str] | None = None) -> None:
    from bench.run import find_cli

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories260k", "minilm_sst2", "smollm2_e2e"])
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--levels", nargs="+", type=float, default=None,
                    help="retention levels in %% (default the headline's: 99 95 90)")
    ap.add_argument("--all-levels", action="store_true", help="every whole level from 90 to 99%%, as the goals table")
    ap.add_argument("--results", type=Path, default=RESULTS, help="directory of the benchmark's <model>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cli = find_cli()
    rows = []
    for model in args.models:
        levels = GOAL_LEVELS if args.all_levels else tuple(v / 100 for v in args.levels) if args.levels else LEVELS
        rows += check_model(model, args.resamples, cli, args.results, levels)
    print("\n| model | level | point | name | bytes | retention | 95% interval | resamples ≥ level |")
    print("|---|---|---|---|---:|---:|---|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
