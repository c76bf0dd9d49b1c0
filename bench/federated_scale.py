"""What a Flower server spends on one round of many solar-compressed replies, against plain ones.

    python -m bench.federated_scale                       # 1,000 replies from 100 client updates
    python -m bench.federated_scale --clients 200 --distinct 20

Client updates come from the MiniLM SST-2 LoRA fixture (r = 8 on query/value of 6 layers, the
trained classifier head): each is the fixture's factors and head plus seeded noise of 10% of each
tensor's spread, standing in for different clients' updates. Each becomes a train reply twice:
through :func:`solar.flower.solar_mod` (spectral, target error 0.1, the head coded in the stream,
as ``bench.federated`` runs it) and as the plain arrays. The replies cycle through the
``--distinct`` updates up to ``--clients`` (each reply is decoded afresh: nothing is cached).
The server side is timed on the same replies in the same run:

- ``SolarStrategy(FedAvg())`` on the solar replies (decode every payload, average ΔW = B A
  reply by reply, re-factor to rank 8), the configuration ``bench.federated`` measures;
- the same, with every client's ΔW handed to the wrapped strategy (what SolarStrategy does for
  strategies other than FedAvg, and did for FedAvg too before it took the mean itself);
- ``SolarStrategy(FedAvg())`` on the plain replies (no decoding, the same ΔW mean);
- plain ``FedAvg()`` on the plain replies (A and B averaged separately, as FlowerTune does).

Each row's peak of traced memory (tracemalloc: NumPy's buffers included) is reported with its
time. The way down is timed too: ``configure_train`` sending the global adapter (the fixture's
update) to every client, as plain arrays and as a solar broadcast (``SolarStrategy(...,
broadcast={"target_error": 0.1, "passthrough": "spectral"})``, encoded once for all), with the
bytes the clients download. Prints two tables and writes bench/results/federated_scale.json.
"""
from __future__ import annotations

import argparse
import json
import tracemalloc
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "minilm_sst2_lora_r8"
RESULTS = REPO / "bench" / "results"


def client_updates(distinct: int, noise: float = 0.1) -> list[dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    fixture = load_file(str(FIXTURE / "adapter_model.safetensors"))
    out = []
    for c in range(distinct):
        g = np.random.default_rng(1000 + c)
        out.append({k: (v + noise * v.std() * g.standard_normal(v.shape)).astype(v.dtype) for k, v in fixture.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1000, help="replies in the round")
    ap.add_argument("--distinct", type=int, default=100, help="distinct client updates they cycle through")
    ap.add_argument("--threads", type=int, default=2, help="server decode threads")
    ap.add_argument("--out", default=str(RESULTS / "federated_scale.json"))
    args = ap.parse_args()

    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from solar.flower import SolarStrategy, message_nbytes, solar_mod

    # Messages built outside a running app need a task identity (a running ServerApp sets it).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    config = json.loads((FIXTURE / "adapter_config.json").read_text())
    mod = solar_mod("spectral", target_error=0.1, passthrough="spectral", peft_config=config, threads=1, verbose=False)

    def reply(node: int, arrays: dict, compress: bool):
        record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        ins = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                      message_type=MessageType.TRAIN)

        def app(msg, _ctx):
            return Message(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 100})}), reply_to=msg)

        return mod(ins, None, app) if compress else app(ins, None)

    updates = client_updates(args.distinct)
    t0 = time.perf_counter()
    solar_replies = [reply(i + 1, u, True) for i, u in enumerate(updates)]
    encode_s = (time.perf_counter() - t0) / len(updates)
    plain_replies = [reply(i + 1, u, False) for i, u in enumerate(updates)]

    def round_of(replies: list) -> list:
        # Fresh messages (distinct node ids, their own records: strategies rewrite them) cycling
        # through the distinct replies.
        out = []
        for i in range(args.clients):
            src = replies[i % len(replies)].content
            ins = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=i + 1,
                          message_type=MessageType.TRAIN)
            content = RecordDict({"arrays": ArrayRecord(dict(src.array_records["arrays"].items())),
                                  "metrics": MetricRecord(dict(src.metric_records["metrics"].items()))})
            out.append(Message(content, reply_to=ins))
        return out

    # Warm-up outside the timings: the first restore imports torch (seconds, once per process).
    SolarStrategy(FedAvg(), threads=args.threads).remember_global(ArrayRecord({}))
    from solar.flower import decode_arrays
    decode_arrays(bytes(solar_replies[0].content.array_records["arrays"]["solar.payload"].data))

    class HandedEveryDelta(FedAvg):
        """FedAvg behind its own aggregate_train: SolarStrategy hands it every client's ΔW."""

        def aggregate_train(self, server_round, replies):
            return super().aggregate_train(server_round, replies)

    global_arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in updates[0].items()})
    rows = {}
    for name, make, replies in (
        ("solar replies, SolarStrategy(FedAvg()) delta", lambda: SolarStrategy(FedAvg(), threads=args.threads), solar_replies),
        ("solar replies, every client's dW handed to FedAvg", lambda: SolarStrategy(HandedEveryDelta(), threads=args.threads),
         solar_replies),
        ("plain replies, SolarStrategy(FedAvg()) delta", lambda: SolarStrategy(FedAvg(), threads=args.threads), plain_replies),
        ("plain replies, FedAvg() (A, B averaged)", FedAvg, plain_replies),
    ):
        strategy = make()
        if isinstance(strategy, SolarStrategy):
            strategy.remember_global(global_arrays)
        msgs = round_of(replies)
        upload = sum(message_nbytes(m) for m in msgs)
        tracemalloc.start()
        base_mem = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, msgs)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - base_mem
        tracemalloc.stop()
        assert arrays is not None
        info = strategy.rounds[-1] if isinstance(strategy, SolarStrategy) else {}
        rows[name] = {"aggregate_seconds": round(seconds, 3), "upload_bytes": upload, "peak_traced_bytes": peak,
                      "decode_seconds": info.get("decode_seconds"), "refactor_error": info.get("refactor_error"),
                      "accepted": len(info.get("accepted", msgs))}
        print(f"{name}: {seconds:.2f} s, peak {peak / 1e6:.0f} MB, for {args.clients} replies, "
              f"{upload / 1e6:.2f} MB uploaded", flush=True)
        del msgs, arrays, strategy

    class Grid:  # every client connected
        def get_node_ids(self):
            return range(1, args.clients + 1)

    down = {}
    for name, codec in (("plain broadcast", None),
                        ("solar broadcast", {"target_error": 0.1, "passthrough": "spectral"})):
        strategy = SolarStrategy(FedAvg(min_available_nodes=args.clients), threads=args.threads, broadcast=codec)
        t0 = time.perf_counter()
        msgs = strategy.configure_train(1, global_arrays, ConfigRecord(), Grid())
        seconds = time.perf_counter() - t0
        sent = strategy._sent_train
        down[name] = {"configure_seconds": round(seconds, 3), "messages": len(msgs),
                      "download_bytes": sum(sent["downloads"].values()),
                      "broadcast_bytes": sent.get("broadcast_bytes"), "broadcast_seconds": sent.get("broadcast_seconds"),
                      "broadcast_error": sent.get("broadcast_error")}
        print(f"{name}: configure_train {seconds:.2f} s for {len(msgs)} clients, "
              f"{down[name]['download_bytes'] / 1e6:.2f} MB downloaded", flush=True)

    result = {"clients": args.clients, "distinct_updates": args.distinct, "server_threads": args.threads,
              "client_encode_seconds_mean": round(encode_s, 3), "rows": rows, "broadcast_rows": down,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nclient side: {encode_s:.2f} s per reply to encode (one thread)\n")
    print("| server, one round | replies | uploaded | aggregate_train | of it decoding | peak memory |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        dec = f"{r['decode_seconds']:.2f} s" if r["decode_seconds"] is not None else ""
        print(f"| {name} | {r['accepted']:,} | {r['upload_bytes'] / 1e6:.2f} MB | {r['aggregate_seconds']:.2f} s | {dec} "
              f"| {r['peak_traced_bytes'] / 1e6:,.0f} MB |")
    print("\n| server, sending one round | clients | downloaded | configure_train | of it encoding | B A error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in down.items():
        enc = f"{r['broadcast_seconds']:.2f} s" if r["broadcast_seconds"] is not None else ""
        err = f"{r['broadcast_error']:.3f}" if r["broadcast_error"] is not None else ""
        print(f"| {name} | {r['messages']:,} | {r['download_bytes'] / 1e6:.2f} MB | {r['configure_seconds']:.2f} s | {enc} "
              f"| {err} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
