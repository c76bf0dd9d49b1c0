"""Federated LoRA fine-tuning on Flower with plain vs solar-compressed client replies.

10 clients fine-tune a LoRA (r=8 on query/value, classifier head in modules_to_save) of
all-MiniLM-L6-v2 for SST-2 with Flower's simulation engine (Ray backend), on an IID split and
on a non-IID split (Dirichlet alpha=0.5 over the labels). Each setting runs three times from
the same seed-initialised model: with plain LoRA replies (``get_peft_model_state_dict``, as
FlowerTune sends them), with :func:`solar.flower.solar_mod` replies, and with solar replies and
a solar broadcast (``SolarStrategy(..., broadcast=...)``: the global adapter goes down to the
clients as a payload too). The server is :class:`solar.flower.SolarStrategy` around FedAvg in
every run (same aggregation); it measures every instruction as sent and every reply as received,
and evaluates the global model on the SST-2 dev set after each round.

    python -m bench.federated                      # IID + Dirichlet, plain + solar, 5 rounds
    python -m bench.federated --split iid --rounds 3
    python -m bench.federated --quick              # 4 clients, 2 rounds, tiny: a smoke run

Writes bench/results/federated_<split>.json, bench/results/federated.png and bench/FEDERATED.md
(``--quick``: bench/results/federated_quick_*.{json,png,md}, the report is left alone).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# torch's OpenMP workers spin after each op and starve NumPy's OpenBLAS threads on a small
# machine (a 384 x 384 SVD took 2 s instead of 0.03 s); let them sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# Ray's worker processes import this module by name: give them the repository on their path.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)

import numpy as np  # noqa: E402

RESULTS = REPO / "bench" / "results"


@dataclasses.dataclass(frozen=True)
class Settings:
    clients: int = 10
    rounds: int = 5
    split: str = "iid"  # iid | dirichlet
    alpha: float = 0.5  # Dirichlet concentration over labels
    pool: int = 8000  # SST-2 train examples shared out among the clients (seeded shuffle)
    local_steps: int = 20  # optimiser steps per client per round
    batch_size: int = 16
    lr: float = 3e-3
    rank: int = 8
    targets: tuple = ("query", "value")
    seed: int = 1234
    dev_limit: int | None = None  # None: the whole SST-2 dev set (872)
    mode: str = "spectral"
    target_error: float = 0.1
    # The head rides in the payload coded with the layers ("int8": as int8 rows; "exact": sent as it is).
    passthrough: str = "spectral"
    aggregation: str = "delta"
    # The "solar+broadcast" run's server codes the global adapter at this target and passthrough
    # (None: the replies' passthrough).
    broadcast_target_error: float = 0.1
    broadcast_passthrough: str | None = None
    client_threads: int = 1
    server_threads: int = 2


# ---- data ------------------------------------------------------------------------------------

_CACHE: dict = {}


def _pool(s: Settings):
    key = ("pool", s.pool, s.seed)
    if key not in _CACHE:
        from bench.fixtures.train_minilm_sst2 import load_sst2

        train = load_sst2("train")
        random.Random(s.seed).shuffle(train)
        _CACHE[key] = train[: s.pool]
    return _CACHE[key]


def partitions(s: Settings) -> list[list[int]]:
    """Indices into the pool for every client: IID (equal random shards) or Dirichlet(alpha)
    over the labels (each label's examples split by proportions drawn per label, redrawn until
    every client has at least two batches)."""
    labels = np.array([y for _, y in _pool(s)])
    rng = np.random.default_rng(s.seed)
    if s.split == "iid":
        return [sorted(p.tolist()) for p in np.array_split(rng.permutation(len(labels)), s.clients)]
    if s.split != "dirichlet":
        raise ValueError(f"unknown split {s.split!r}")
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(s.clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([s.alpha] * s.clients)) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= 2 * s.batch_size:
            return [sorted(p) for p in parts]
    raise RuntimeError("could not draw a Dirichlet split with two batches per client")


def _tokenizer():
    if "tok" not in _CACHE:
        from bench.fixtures.train_minilm_sst2 import load_tokenizer

        _CACHE["tok"] = load_tokenizer()
    return _CACHE["tok"]


def _dev(s: Settings):
    key = ("dev", s.dev_limit)
    if key not in _CACHE:
        from bench.fixtures.train_minilm_sst2 import load_sst2

        _CACHE[key] = load_sst2("dev", limit=s.dev_limit)
    return _CACHE[key]


# ---- model -----------------------------------------------------------------------------------


def lora_config(s: Settings):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.SEQ_CLS, r=s.rank, lora_alpha=2 * s.rank, target_modules=list(s.targets),
                      lora_dropout=0.0, bias="none")


def _model(s: Settings):
    """The PEFT model, built once per process from the same seed (base + LoRA init + head);
    every use loads the arrays it needs into it. Its seed-initialised adapter is kept aside
    for :func:`initial_arrays`."""
    key = ("model", s.rank, s.targets, s.seed)
    if key not in _CACHE:
        import torch
        from peft import get_peft_model, get_peft_model_state_dict

        from bench.fixtures.train_minilm_sst2 import load_base_model

        base = load_base_model(s.seed)
        torch.manual_seed(s.seed)
        model = get_peft_model(base, lora_config(s))
        init = {k: np.ascontiguousarray(v.detach().cpu().numpy()).copy()
                for k, v in get_peft_model_state_dict(model).items()}
        _CACHE[key] = (model, init)
    return _CACHE[key][0]


def initial_arrays(s: Settings):
    """The seed-initialised global adapter (LoRA A random, B zero, the head's init)."""
    from flwr.app import Array, ArrayRecord

    _model(s)
    init = _CACHE[("model", s.rank, s.targets, s.seed)][1]
    return ArrayRecord({k: Array(v.copy()) for k, v in init.items()})


def _load(model, arrays) -> None:
    import torch
    from peft import set_peft_model_state_dict

    state = {k: torch.from_numpy(np.array(arrays[k].numpy())) for k in arrays.keys()}
    res = set_peft_model_state_dict(model, state)
    bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k or "classifier" in k]
    if bad:
        raise RuntimeError(f"arrays not loaded into the model: {bad[:3]}")


# ---- Flower apps -----------------------------------------------------------------------------


def make_client_app(s: Settings, solar: bool, extra_mods: tuple = ()):
    """The ClientApp: local LoRA training on the client's partition; replies with
    get_peft_model_state_dict (FlowerTune's reply), through solar_mod when ``solar``.
    ``extra_mods`` go outside solar_mod (they see the compressed reply)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    mods = list(extra_mods)
    if solar:
        from solar.flower import solar_mod

        mods.append(solar_mod(s.mode, target_error=s.target_error, peft_config=lora_config(s),
                              threads=s.client_threads, report_metrics=True, passthrough=s.passthrough))
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context) -> Message:
        import torch
        import torch.nn.functional as F
        from peft import get_peft_model_state_dict

        from bench.fixtures.train_minilm_sst2 import batches

        torch.set_num_threads(s.client_threads)
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        examples = [_pool(s)[i] for i in partitions(s)[pid]]
        model = _model(s)
        _load(model, msg.content["arrays"])
        rng = random.Random(s.seed * 1_000_003 + server_round * 1009 + pid)
        order: list = []
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
        model.train()
        t0, losses = time.perf_counter(), []
        for _ in range(s.local_steps):
            if len(order) < s.batch_size:
                order += rng.sample(examples, len(examples))
            chunk, order = order[: s.batch_size], order[s.batch_size:]
            enc, y = next(batches(chunk, _tokenizer(), s.batch_size))
            loss = F.cross_entropy(model(**enc).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        state = get_peft_model_state_dict(model)
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in state.items()})
        metrics = MetricRecord({"num-examples": len(examples), "train-loss": float(np.mean(losses)),
                                "train-seconds": time.perf_counter() - t0})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def make_server_app(s: Settings, strategy, log: dict, evaluate: bool = True):
    """The ServerApp: ``strategy.start`` for ``s.rounds`` rounds, evaluating the global model on
    the dev set before round 1 and after every round; results go into ``log``."""
    from flwr.app import MetricRecord
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    def evaluate_fn(server_round: int, arrays) -> MetricRecord:
        import torch

        from bench.fixtures.train_minilm_sst2 import evaluate as eval_model

        torch.set_num_threads(s.server_threads)
        t0 = time.perf_counter()
        model = _model(s)
        _load(model, arrays)
        acc, loss = eval_model(model, _dev(s), _tokenizer())
        log.setdefault("eval", {})[server_round] = {"dev_accuracy": acc, "dev_loss": loss,
                                                    "eval_seconds": time.perf_counter() - t0,
                                                    "time": time.perf_counter()}
        print(f"[{s.split}] round {server_round}: dev accuracy {acc:.4f} loss {loss:.4f}", flush=True)
        return MetricRecord({"dev-accuracy": acc, "dev-loss": loss})

    @app.main()
    def main(grid: Grid, context) -> None:
        log["result"] = strategy.start(grid=grid, initial_arrays=initial_arrays(s), num_rounds=s.rounds,
                                       evaluate_fn=evaluate_fn if evaluate else None)

    return app


def make_strategy(s: Settings, broadcast: bool = False):
    from flwr.serverapp.strategy import FedAvg

    from solar.flower import SolarStrategy

    fedavg = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=s.clients,
                    min_available_nodes=s.clients)
    codec = ({"mode": s.mode, "target_error": s.broadcast_target_error,
              "passthrough": s.broadcast_passthrough or s.passthrough} if broadcast else None)
    return SolarStrategy(fedavg, base=None, aggregation=s.aggregation, broadcast=codec, threads=s.server_threads)


def simulate(s: Settings, client_app, server_app, backend: str = "ray") -> None:
    from flwr.simulation import run_simulation

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=s.clients, backend_name=backend,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": max(1, os.cpu_count() or 1),
                                                 "include_dashboard": False}})


RUNS = ("plain", "solar", "solar+broadcast")  # what the clients upload / what the server sends


def run_one(s: Settings, solar: bool, broadcast: bool = False) -> dict:
    """One federated run; returns per-round accuracy, traffic and timings."""
    import flwr

    import solar as solar_pkg

    strategy = make_strategy(s, broadcast)
    log: dict = {}
    t0 = time.perf_counter()
    simulate(s, make_client_app(s, solar), make_server_app(s, strategy, log))
    wall = time.perf_counter() - t0
    result = log.get("result")
    if result is None or len(strategy.rounds) != s.rounds:
        raise RuntimeError(f"the simulation did not complete {s.rounds} rounds ({len(strategy.rounds)} aggregated)")
    train_metrics = {int(k): dict(v) for k, v in result.train_metrics_clientapp.items()}
    rounds, cumulative, cumulative_down = [], 0, 0
    ev = log["eval"]
    for info in strategy.rounds:
        r = info["round"]
        uploads = sorted(info["uploads"].values())
        downloads = sorted(info["downloads"].values())
        cumulative += sum(uploads)
        cumulative_down += sum(downloads)
        tm = train_metrics.get(r, {})
        rounds.append({
            "round": r,
            "dev_accuracy": ev[r]["dev_accuracy"],
            "dev_loss": ev[r]["dev_loss"],
            "clients": len(uploads),
            "rejected": info["rejected"],
            "upload_bytes_per_client": uploads,
            "upload_bytes": sum(uploads),
            "cumulative_upload_bytes": cumulative,
            "download_bytes_per_client": downloads,
            "download_bytes": sum(downloads),
            "cumulative_download_bytes": cumulative_down,
            "broadcast_bytes": info.get("broadcast_bytes"),
            "broadcast_error": info.get("broadcast_error"),
            "broadcast_seconds": info.get("broadcast_seconds"),
            "payload_bytes_per_client": sorted(info["payload_bytes"].values()),
            "refactor_error": info["refactor_error"],
            "server_decode_seconds": info["decode_seconds"],
            "train_loss": tm.get("train-loss"),
            "client_train_seconds": tm.get("train-seconds"),
            "client_encode_seconds": tm.get("solar-encode-seconds"),
            "round_seconds": ev[r]["time"] - ev[r - 1]["time"],
        })
    return {
        "replies": "solar" if solar else "plain",
        "broadcast": "solar" if broadcast else "plain",
        "initial": {"dev_accuracy": ev[0]["dev_accuracy"], "dev_loss": ev[0]["dev_loss"]},
        "rounds": rounds,
        "final_dev_accuracy": rounds[-1]["dev_accuracy"],
        "total_upload_bytes": cumulative,
        "total_download_bytes": cumulative_down,
        "mean_upload_bytes_per_client_round": cumulative / sum(r["clients"] for r in rounds),
        "wall_seconds": wall,
        "flwr": flwr.__version__,
        "solar": solar_pkg.__version__,
    }


# ---- report ----------------------------------------------------------------------------------

SPLIT_NAMES = {"iid": "IID", "dirichlet": "non-IID (Dirichlet α=0.5 over labels)"}


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f} MB" if b >= 1e6 else f"{b / 1e3:.1f} kB"


STYLES = {"plain": dict(color="tab:blue", marker="o"), "solar": dict(color="tab:red", marker="s"),
          "solar+broadcast": dict(color="tab:green", marker="^")}


def _traffic(run: dict) -> int:
    return run["total_upload_bytes"] + run.get("total_download_bytes", 0)


def _label(name: str, st: dict) -> str:
    if name == "plain":
        return "plain LoRA both ways (fp32 arrays)"
    up = f"solar replies (t={st['target_error']})"
    if name == "solar":
        return up + ", plain broadcast"
    return up + f", solar broadcast (t={st.get('broadcast_target_error', st['target_error'])})"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [k for k in ("iid", "dirichlet") if k in results]
    fig, axes = plt.subplots(1, len(splits), figsize=(6.2 * len(splits), 4.4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        res = results[split]
        for name in RUNS:
            run = res["runs"].get(name)
            if not run:
                continue
            style = STYLES[name]
            xs = [(r["cumulative_upload_bytes"] + r.get("cumulative_download_bytes", 0)) / 1e6 for r in run["rounds"]]
            ys = [r["dev_accuracy"] for r in run["rounds"]]
            ax.plot(xs, ys, label=f"{_label(name, res['settings'])}: {_mb(_traffic(run))}", **style)
            for x, y, r in zip(xs, ys, run["rounds"]):
                ax.annotate(str(r["round"]), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=style["color"])
        init = res["runs"]["plain"]["initial"]["dev_accuracy"] if "plain" in res["runs"] else None
        if init is not None:
            ax.axhline(init, color="gray", ls=":", lw=1, label=f"before round 1: {init:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative bytes sent and received by all clients (MB, log scale)")
        ax.set_ylabel("SST-2 dev accuracy of the global model")
        st = res["settings"]
        ax.set_title(f"{SPLIT_NAMES[split]}: {st['clients']} clients, {st['rounds']} rounds", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Federated LoRA (r=8, MiniLM-L6, SST-2) on Flower: accuracy vs traffic, both directions "
                 "(numbers: rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def report(results: dict, plot_name: str, prefix: str = "federated") -> str:
    splits = [k for k in ("iid", "dirichlet") if k in results]
    any_res = results[splits[0]]
    st = any_res["settings"]
    some_run = next(iter(any_res["runs"].values()))
    L = []
    L.append("# Federated fine-tuning on Flower with solar-compressed updates and broadcasts\n")
    L.append(f"Generated by `python -m bench.federated` (flwr {some_run['flwr']}, solar {some_run['solar']}, Ray "
             f"simulation engine, {platform.machine()} with {os.cpu_count()} cores) from the current code; the "
             "numbers below are that run's. Raw results: "
             + ", ".join(f"`bench/results/{prefix}_{k}.json`" for k in splits) + ".\n")
    head = (f", passthrough=\"{st['passthrough']}\")`, which replaces the 24 LoRA arrays and the 3 kB head's weight "
            "by one `.solar` payload (the head's weight " + ("coded as one more layer of the stream, planned with "
            "the LoRA layers" if st["passthrough"] == "spectral" else "as int8 rows") + "; its 2-value bias passes "
            "through as it is). "
            if st.get("passthrough", "exact") in ("int8", "spectral") else
            ")`, which replaces the 24 LoRA arrays by one `.solar` payload; the 3 kB head passes through unchanged. ")
    L.append(
        f"Setting: {st['clients']} Flower clients (SuperNodes in the simulation engine) fine-tune a LoRA "
        f"(r={st['rank']} on {', '.join(st['targets'])}, lora_alpha={2 * st['rank']}; the classifier head in "
        f"`modules_to_save`) of all-MiniLM-L6-v2 for SST-2, all from the same seed-initialised model. "
        f"The clients share out {st['pool']} SST-2 training sentences (IID, or Dirichlet α={st['alpha']} over the "
        f"labels); each round every client runs {st['local_steps']} AdamW steps (batch {st['batch_size']}, "
        f"lr {st['lr']}) from the global adapter and replies with `get_peft_model_state_dict(model)`, as "
        "FlowerTune does. Three runs per split:\n\n"
        "- **plain**: the server sends the global arrays as they are (fp32) and the clients reply with theirs;\n"
        f"- **solar**: the replies go through `solar.flower.solar_mod(mode=\"{st['mode']}\", "
        f"target_error={st['target_error']}" + head + "The server's broadcast is plain;\n"
        "- **solar+broadcast**: the same replies, and the server sends the global adapter as a payload too "
        f"(`SolarStrategy(..., broadcast={{\"target_error\": {st.get('broadcast_target_error', st['target_error'])}, "
        f"\"passthrough\": \"{st.get('broadcast_passthrough') or st['passthrough']}\"}})`): the clients' mod decodes it and re-initialises, "
        "as PEFT initialises LoRA, the components it does not carry (round 1's global has B = 0: all of them).\n\n"
        f"The server is `SolarStrategy(FedAvg(), aggregation=\"{st['aggregation']}\")` in every run (weighted by "
        "client examples). Accuracy: the server's global model (the exact aggregate, not the decoded broadcast) on "
        f"the SST-2 dev set ({'all 872 sentences' if st['dev_limit'] is None else str(st['dev_limit']) + ' sentences'}) "
        "after each round. Bytes: measured on the messages as sent (train instructions, downloaded) and as the "
        "server received them (replies, uploaded) with `solar.flower.message_nbytes`: the deflated message tree "
        "Flower's transport pushes, i.e. arrays with their headers, config, metrics and message metadata.\n")
    L.append("## Result\n")
    L.append("| split | run | final dev acc | uploaded | downloaded | both ways | vs plain |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for split in splits:
        runs = results[split]["runs"]
        plain_total = _traffic(runs["plain"]) if "plain" in runs else None
        for name in RUNS:
            if name not in runs:
                continue
            run = runs[name]
            ratio = f"{plain_total / _traffic(run):.1f}x less" if (plain_total and name != "plain") else "1x"
            L.append(f"| {SPLIT_NAMES[split]} | {name} | {run['final_dev_accuracy']:.4f} | "
                     f"{run['total_upload_bytes']:,} B | {run.get('total_download_bytes', 0):,} B | "
                     f"{_traffic(run):,} B ({_mb(_traffic(run))}) | {ratio} |")
    L.append("")
    L.append(f"![accuracy vs traffic](results/{plot_name})\n")
    L.append(reading_notes(results))
    L.append("## Per round\n")
    fe = lambda e: "–" if e is None else f"{e:.1e}"  # noqa: E731
    span = lambda xs: f"{min(xs):,}–{max(xs):,}" if xs else "–"  # noqa: E731
    for split in splits:
        runs = results[split]["runs"]
        L.append(f"### {SPLIT_NAMES[split]}\n")
        sizes = results[split]["partition_sizes"]
        pos = results[split]["partition_positive_fraction"]
        L.append(f"Client partition sizes: {sizes}; fraction of positive labels: "
                 f"{[round(x, 2) for x in pos]}.\n")
        names = [n for n in RUNS if n in runs]
        L.append("| round | " + " | ".join(f"{n} acc" for n in names)
                 + " | " + " | ".join(f"{n} up/client" for n in names)
                 + " | down/client plain / solar broadcast | broadcast error | re-factor error "
                 + " / ".join(names) + " | round time " + " / ".join(names) + " |")
        L.append("| ---: " * (1 + 2 * len(names) + 4) + "|")
        L.append(f"| 0 | " + " | ".join(f"{runs[n]['initial']['dev_accuracy']:.4f}" for n in names)
                 + " |" + " |" * (len(names) + 4))
        for rows in zip(*(runs[n]["rounds"] for n in names)):
            by = dict(zip(names, rows))
            accs = " | ".join(f"{r['dev_accuracy']:.4f}" + (f" ({len(r['rejected'])} rejected)" if r["rejected"] else "")
                              for r in rows)
            ups = " | ".join(span(r["upload_bytes_per_client"]) for r in rows)
            down_plain = span(by["plain"].get("download_bytes_per_client", [])) if "plain" in by else "–"
            bro = by.get("solar+broadcast", {})
            down_solar = span(bro.get("download_bytes_per_client", []))
            L.append(f"| {rows[0]['round']} | {accs} | {ups} | {down_plain} / {down_solar} | "
                     f"{fe(bro.get('broadcast_error'))} | " + " / ".join(fe(r["refactor_error"]) for r in rows)
                     + " | " + " / ".join(f"{r['round_seconds']:.0f} s" for r in rows) + " |")
        L.append("")
        walls = ", ".join(f"{n} {runs[n]['wall_seconds']:.0f} s" for n in names)
        L.append(f"Wall time (simulation start to end, incl. Ray start-up and evaluation): {walls}.")
        solar_runs = [runs[n] for n in names if n != "plain"]
        if solar_runs:
            enc = np.mean([r["client_encode_seconds"] for run in solar_runs for r in run["rounds"]])
            dec = np.mean([r["server_decode_seconds"] for run in solar_runs for r in run["rounds"]])
            L.append(f"Mean client encode time ({st['mode']}, 1 thread): {enc:.2f} s; server decode of all "
                     f"payloads per round: {dec:.2f} s.")
        if "solar+broadcast" in runs:
            b = runs["solar+broadcast"]["rounds"]
            L.append(f"Server encode of the broadcast ({st['server_threads']} threads, once per round for every "
                     f"client): {np.mean([r['broadcast_seconds'] for r in b]):.2f} s.")
        L.append("")
    L.append(AGGREGATION_NOTE)
    L.append("## Reproduce\n")
    L.append("```sh\npython -m bench.federated                 # IID + non-IID, plain / solar / solar+broadcast "
             f"({st['rounds']} rounds)\npython -m bench.federated --split dirichlet --rounds 10\n"
             "python -m bench.federated --quick         # smoke run, writes bench/results/federated_quick_*\n```\n")
    L.append("Options: `--clients`, `--rounds`, `--split iid|dirichlet|both`, `--alpha`, `--local-steps`, "
             "`--target-error`, `--broadcast-target-error`, `--broadcast-passthrough`, `--mode`, "
             "`--passthrough spectral|int8|exact`, `--aggregation delta|factors`, `--dev-limit`; `--runs` picks some of "
             "the three runs (written to `bench/results/federated_runs_<split>.json`, the report left alone). The test "
             "`tests/python/test_flower.py` runs two-client, one-round versions on the same engine (replies, and "
             "replies and broadcast), and the rejection of corrupt payloads.\n")
    return "\n".join(L)


# Spread of the final dev accuracy over repeated runs of the same script (README: IID plain
# 0.8062-0.8177, solar 0.8039-0.8119; non-IID plain 0.7775-0.7901, solar 0.7833-0.7924).
NOISE = 0.015


def reading_notes(results: dict) -> str:
    """What the numbers do and do not show, computed from the results."""
    L = ["Reading the numbers:\n"]
    for split in [k for k in ("iid", "dirichlet") if k in results]:
        runs, st = results[split]["runs"], results[split]["settings"]
        if "plain" not in runs or "solar" not in runs:
            continue
        p, q = runs["plain"], runs["solar"]
        accs = ", ".join(f"{r['dev_accuracy']:.3f}" for r in p["rounds"])
        head = np.mean([b - pl for r in q["rounds"] for b, pl in zip(r["upload_bytes_per_client"],
                                                                      r["payload_bytes_per_client"])])
        enc = np.mean([r["client_encode_seconds"] for r in q["rounds"]])
        train = np.mean([r["client_train_seconds"] for r in q["rounds"]])
        line = (f"- {SPLIT_NAMES[split]}: final accuracy plain {p['final_dev_accuracy']:.4f}, solar "
                f"{q['final_dev_accuracy']:.4f} ({q['final_dev_accuracy'] - p['final_dev_accuracy']:+.4f})")
        b = runs.get("solar+broadcast")
        if b:
            line += f", solar+broadcast {b['final_dev_accuracy']:.4f} ({b['final_dev_accuracy'] - p['final_dev_accuracy']:+.4f})"
        gaps = {n: runs[n]["final_dev_accuracy"] - p["final_dev_accuracy"] for n in runs if n != "plain"}
        beyond = [n for n, g in gaps.items() if abs(g) > NOISE]
        line += (f". Plain's accuracy by round was {accs}. One seed per setting: repeated runs of the same "
                 f"script spread by up to ~{NOISE:.3f} in final accuracy (README), so "
                 + ("every difference here is within that noise" if not beyond else
                    "the " + ", ".join(f"{n} run's {gaps[n]:+.4f}" for n in beyond) + " is larger than that noise")
                 + ". Uploads: solar "
                 f"replies are {p['total_upload_bytes'] / q['total_upload_bytes']:.1f}x smaller, but with a plain "
                 f"broadcast the clients still download {p.get('total_download_bytes', 0):,} B, so the run's traffic "
                 f"both ways falls only {_traffic(p) / _traffic(q):.1f}x")
        if b:
            errors = [r["broadcast_error"] for r in b["rounds"][1:]] or [0.0]  # round 1's B A is zero
            line += (f"; the solar broadcast takes the downloads to {b['total_download_bytes']:,} B, "
                     f"{_traffic(p) / _traffic(b):.1f}x less traffic than plain both ways (B A's relative "
                     f"error in what the clients received: {min(errors):.3f}–{max(errors):.3f} after round 1)")
        line += (". A solar reply is the payload plus "
                 f"{head:,.0f} B of " + ("" if st.get("passthrough", "exact") in ("int8", "spectral") else "uncompressed head, ")
                 + "metrics and message metadata. Encoding took "
                 f"{enc:.1f} s per client per round (one thread, two simulated clients per two cores), "
                 f"{100 * enc / train:.0f}% of the {train:.1f} s of local training.")
        L.append(line)
    return "\n".join(L) + "\n"


AGGREGATION_NOTE = """## How the server aggregates, and what the clients send

`SolarStrategy(strategy, base=None, aggregation=...)` decodes every `.solar` payload back into the
client's LoRA arrays (against `base`, which the `spectral` codec does not need and the `paper` codec
does), then hands the replies to the wrapped strategy.

- `aggregation="delta"` (default; used above): each client's pair is turned into dW = B A, and their
  mean weighted by examples is taken — the update the averaged model should apply; with FedAvg,
  `SolarStrategy` takes it reply by reply, so one dW per module is in memory (`bench.federated_scale`,
  README) — and the
  server re-factors the average to the global rank r by truncated SVD, B'A' = U_r S_r V_rᵀ. By
  Eckart–Young this is the best rank-r approximation of the average; what it loses is measured every
  round (the "re-factor error" column: ‖avg − B'A'‖_F / ‖avg‖_F over all modules; the average of ten
  rank-8 updates has rank up to 80, so it is not zero). The product is split evenly, B' = U_r S_r^½,
  A' = S_r^½ V_rᵀ. A decoded `.solar` payload carries B A, not the client's own A and B, so the clients'
  factors cannot be used to pick the split (tried during development: the split taken from the averaged
  decoded A made the run collapse to chance accuracy in round 2).
- `aggregation="factors"`: A and B are averaged separately (what plain FlowerTune does). mean(B_k) mean(A_k)
  is not mean(B_k A_k): the cross terms B_j A_k enter the model, increasingly so when clients drift apart.
  With `.solar` replies the server first re-expresses each decoded pair in the basis of the global A it
  sent (`solar.flower.regauge`, exact in the product), otherwise it would average unrelated bases.

A reply whose payload is corrupt (`CorruptError`/`FormatError`), was built against another base
(`MismatchError`), decodes to non-finite values or does not fit the global model is dropped with one
ERROR line naming the node and the reason (`SolarStrategy: round 3: rejected the update of node …:
CorruptError: <bytes>: checksum mismatch: the file is damaged`); the round aggregates the rest.

The clients send their adapter (as FlowerTune does), not the round's change to it. The codec's error is
then relative to the whole adapter and does not build up over rounds; coding the change instead would
spend the same relative error on a smaller quantity, but its errors add up over rounds unless the
client keeps an error-feedback residual.

With `broadcast=` the server codes the global adapter the same way, once per round for every client
(a client that skipped rounds needs nothing older). The clients train from the decoded global, and the
next global is built from their replies, so the server and the clients never drift apart: each round's
coding error enters the model once, as a perturbation that the next round's training sees. The server
keeps the exact aggregate (it is what the accuracy column evaluates and what a deployment would
publish). A component the broadcast does not carry (zero in both factors after decoding) would never
learn again, so the clients' mod re-initialises its A row from seeded noise of PEFT's init scale, B
column zero (`solar.flower.revive`); round 1's global (B = 0) is entirely such components, and the
clients start from the same seeded A.
"""


# ---- main ------------------------------------------------------------------------------------


def run_split(s: Settings, names: tuple = RUNS) -> dict:
    parts = partitions(s)
    pool = _pool(s)
    out = {"settings": dataclasses.asdict(s),
           "partition_sizes": [len(p) for p in parts],
           "partition_positive_fraction": [float(np.mean([pool[i][1] for i in p])) for p in parts],
           "runs": {}}
    for name in names:
        print(f"== {s.split}: {name}, {s.clients} clients, {s.rounds} rounds", flush=True)
        out["runs"][name] = run_one(s, solar=(name != "plain"), broadcast=(name == "solar+broadcast"))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--split", choices=["iid", "dirichlet", "both"], default="both")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--target-error", type=float, default=0.1)
    ap.add_argument("--broadcast-target-error", type=float, default=0.1,
                    help="the solar+broadcast run's target for the global adapter the server sends")
    ap.add_argument("--passthrough", choices=["spectral", "int8", "exact"], default="spectral",
                    help="spectral: the head's weight rides in the payload coded with the layers; int8: as int8 "
                         "rows; exact: sent as it is")
    ap.add_argument("--broadcast-passthrough", choices=["spectral", "int8", "exact"], default=None,
                    help="the solar+broadcast run's head (default: as --passthrough)")
    ap.add_argument("--runs", default=",".join(RUNS),
                    help="comma-separated subset of " + ", ".join(RUNS) + "; a subset is written to "
                         "bench/results/federated_runs_<split>.json and leaves the report alone")
    ap.add_argument("--mode", default="spectral")
    ap.add_argument("--aggregation", choices=["delta", "factors"], default="delta")
    ap.add_argument("--dev-limit", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="4 clients, 2 rounds, 3 local steps, 128 dev sentences")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report and plot from the JSON results")
    args = ap.parse_args(argv)
    kw = dict(rounds=args.rounds, clients=args.clients, alpha=args.alpha, local_steps=args.local_steps,
              target_error=args.target_error, mode=args.mode, aggregation=args.aggregation, dev_limit=args.dev_limit,
              passthrough=args.passthrough, broadcast_target_error=args.broadcast_target_error,
              broadcast_passthrough=args.broadcast_passthrough)
    names = tuple(n.strip() for n in args.runs.split(",") if n.strip())
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        ap.error(f"--runs: unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    prefix = "federated"
    if args.quick:
        kw.update(rounds=2, clients=4, local_steps=3, pool=800, dev_limit=128)
        prefix = "federated_quick"
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits = ["iid", "dirichlet"] if args.split == "both" else [args.split]
    if set(names) != set(RUNS):  # some runs only: their results, and the report is left alone
        for split in ([] if args.report_only else splits):
            res = run_split(Settings(split=split, **kw), names)
            (RESULTS / f"federated_runs_{split}.json").write_text(json.dumps(res, indent=1) + "\n")
            for name, run in res["runs"].items():
                print(f"SUMMARY {split:9s} {name:15s} by round {[round(r['dev_accuracy'], 4) for r in run['rounds']]} "
                      f"uploaded {run['total_upload_bytes']:,} B downloaded {run['total_download_bytes']:,} B")
        return {}
    for split in ([] if args.report_only else splits):
        res = run_split(Settings(split=split, **kw))
        (RESULTS / f"{prefix}_{split}.json").write_text(json.dumps(res, indent=1) + "\n")
    # The report covers whatever splits have results (a split run alone keeps the other's).
    results = {}
    for split in ("iid", "dirichlet"):
        f = RESULTS / f"{prefix}_{split}.json"
        if f.is_file():
            results[split] = json.loads(f.read_text())
    plot_name = f"{prefix}.png"
    plot(results, RESULTS / plot_name)
    text = report(results, plot_name, prefix)
    report_path = REPO / "bench" / "FEDERATED.md" if not args.quick else RESULTS / f"{prefix}.md"
    if args.quick:
        text = text.replace("](results/", "](")
    report_path.write_text(text)
    print(f"wrote {report_path} and {RESULTS / plot_name} in {time.perf_counter() - t0:.0f} s")
    for split, res in results.items():
        for name, run in res["runs"].items():
            print(f"SUMMARY {split:9s} {name:15s} final acc {run['final_dev_accuracy']:.4f} "
                  f"uploaded {run['total_upload_bytes']:,} B downloaded {run.get('total_download_bytes', 0):,} B")
    return results


if __name__ == "__main__":
    main()
