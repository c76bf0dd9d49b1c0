"""The server's broadcast as a .solar payload (SolarStrategy(..., broadcast=...)): what goes out,
what the clients' mod hands the ClientApp, the components it re-initialises, and a real round."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from solar.flower import (  # noqa: E402
    PAYLOAD_KEY,
    SolarStrategy,
    lora_to_delta,
    message_nbytes,
    receive_arrays,
    revive,
    solar_mod,
)
from test_flower import HEAD, P, federated, lora_state, record, simulate, task_identity, tiny, train_reply  # noqa: E402,F401

LORA = [P.format(i, m) for i in (0, 1) for m in ("query", "value")]


class Grid:
    """What FedAvg.configure_train asks of a grid: the connected nodes."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def initial_state(seed: int = 5) -> dict:
    """A freshly initialised global adapter: A random, B zero (what round 1 sends)."""
    return {k: (np.zeros_like(v) if ".lora_B." in k else v) for k, v in lora_state(seed).items()}


def configure(strategy: SolarStrategy, state: dict, nodes=(11, 12), server_round: int = 1) -> tuple[list, ArrayRecord]:
    arrays = record(state)
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid(nodes)))
    return messages, arrays


def client_sees(mod, msg: Message) -> dict:
    """The arrays the ClientApp behind ``mod`` is handed for ``msg``."""
    seen: dict = {}

    def app(m, _ctx):
        arrays = m.content["arrays"]
        seen.update({k: arrays[k].numpy() for k in arrays.keys()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)

    node = int(msg.metadata.dst_node_id)
    mod(msg, Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={}), app)
    return seen


def relative_error(exact: dict, got: dict) -> float:
    num = den = 0.0
    for mod in LORA:
        d = lora_to_delta(exact[mod + ".lora_A.weight"], exact[mod + ".lora_B.weight"])
        e = lora_to_delta(got[mod + ".lora_A.weight"], got[mod + ".lora_B.weight"]) - d
        num, den = num + np.sum(e**2), den + np.sum(d**2)
    return float(np.sqrt(num / den))


def test_revive_reinitialises_exactly_the_dead_components():
    state = lora_state(seed=1)
    a_key, b_key = LORA[0] + ".lora_A.weight", LORA[0] + ".lora_B.weight"
    state[a_key][[2, 5]] = 0
    state[b_key][:, [2, 5]] = 0
    state[b_key][:, 6] = 0  # B column zero, A row not: the component can still learn; left alone
    out = revive(state)
    a = out[a_key]
    assert a[[2, 5]].any(axis=1).all()
    np.testing.assert_array_equal(np.delete(a, [2, 5], axis=0), np.delete(state[a_key], [2, 5], axis=0))
    np.testing.assert_array_equal(out[b_key], state[b_key])
    np.testing.assert_array_equal(out[b_key] @ out[a_key], state[b_key] @ state[a_key])  # B A unchanged
    for k in state:
        if k != a_key:
            assert out[k] is state[k]
    # PEFT's kaiming-uniform scale: std 1/sqrt(3 * in)
    assert np.std(a[[2, 5]]) == pytest.approx(1 / np.sqrt(3 * a.shape[1]), rel=0.15)
    assert a.dtype == state[a_key].dtype
    # the same arrays give the same noise; different components get different streams
    np.testing.assert_array_equal(revive(state)[a_key], a)
    assert not np.allclose(a[2], a[5])


def test_broadcast_goes_out_as_one_payload_that_the_mod_decodes():
    state = lora_state(seed=3)
    plain = SolarStrategy(FedAvg(), aggregation="delta")
    packed = SolarStrategy(FedAvg(), aggregation="factors", broadcast={"target_error": 0.05})
    plain_msgs, _ = configure(plain, state)
    msgs, arrays = configure(packed, state)
    assert len(msgs) == 2
    sent = msgs[0].content["arrays"]
    assert list(sent.keys()) == [PAYLOAD_KEY, *HEAD]  # the head goes as it is (no passthrough asked)
    assert msgs[1].content["arrays"] is sent  # encoded once for every client
    # what the clients download: measured, and far less than the plain broadcast
    for strat, ms in ((plain, plain_msgs), (packed, msgs)):
        assert strat._sent_train["downloads"] == {int(m.metadata.dst_node_id): message_nbytes(m) for m in ms}
    downloads = dict(packed._sent_train["downloads"])
    assert max(downloads.values()) * 3 < min(plain._sent_train["downloads"].values())
    # every client's ClientApp sees the decoded arrays, all of them, and the same ones
    mod = solar_mod("spectral", target_error=0.1, threads=1)
    seen = [client_sees(mod, m) for m in msgs]
    expected = receive_arrays(sent)
    assert list(seen[0]) == list(state) and list(seen[1]) == list(state)
    for k in state:
        assert seen[0][k].shape == state[k].shape and seen[0][k].dtype == state[k].dtype
        np.testing.assert_array_equal(seen[0][k], expected[k].numpy())
        np.testing.assert_array_equal(seen[1][k], seen[0][k])
    err = relative_error(state, seen[0])
    assert 0 < err < 0.1
    assert packed._sent_train["broadcast_error"] == pytest.approx(err, rel=1e-3)
    # the server re-gauges replies to the A the clients received, not to the exact one
    for mod_path in LORA:
        np.testing.assert_array_equal(packed._global_a[mod_path + ".lora_A.weight"], seen[0][mod_path + ".lora_A.weight"])
    # and the round's record carries what went down
    replies = [train_reply(int(m.metadata.dst_node_id), record(state), 5) for m in msgs]
    packed.aggregate_train(1, replies)
    info = packed.rounds[0]
    assert info["downloads"] == downloads
    assert info["broadcast_bytes"] == len(sent[PAYLOAD_KEY].data)
    assert sorted(info["accepted"]) == [11, 12]


def test_first_round_broadcast_keeps_every_component_alive():
    # Round 1's global has B = 0: B A is zero, the codec carries no component, and a client that
    # got A = 0 and B = 0 could never train them. The mod re-initialises them as PEFT does.
    state = initial_state()
    strat = SolarStrategy(FedAvg(), broadcast={"target_error": 0.1})
    msgs, _ = configure(strat, state)
    assert strat._sent_train["broadcast_error"] == 0.0
    seen = client_sees(solar_mod(threads=1), msgs[0])
    for mod_path in LORA:
        a, b = seen[mod_path + ".lora_A.weight"], seen[mod_path + ".lora_B.weight"]
        assert not b.any()
        assert a.any(axis=1).all()  # every component can learn
        assert np.std(a) == pytest.approx(1 / np.sqrt(3 * a.shape[1]), rel=0.1)


def test_the_global_is_encoded_once_per_model():
    state = lora_state(seed=4)
    strat = SolarStrategy(FedAvg(fraction_evaluate=1.0), broadcast={"target_error": 0.1})
    msgs, arrays = configure(strat, state)
    evals = list(strat.configure_evaluate(1, arrays, ConfigRecord(), Grid([11, 12])))
    assert evals and all(m.content["arrays"] is msgs[0].content["arrays"] for m in evals)
    again, _ = configure(strat, state)  # a new global (another object): encoded afresh
    assert again[0].content["arrays"] is not msgs[0].content["arrays"]


def test_a_damaged_broadcast_fails_the_client_with_the_codecs_error():
    strat = SolarStrategy(FedAvg(), broadcast={"target_error": 0.1})
    msgs, _ = configure(strat, lora_state(seed=6))
    sent = msgs[0].content["arrays"]
    blob = sent[PAYLOAD_KEY]
    bad = bytearray(blob.data)
    bad[len(bad) // 2] ^= 0x5A
    damaged = ArrayRecord({k: (type(blob)(dtype=blob.dtype, shape=blob.shape, stype=blob.stype, data=bytes(bad))
                               if k == PAYLOAD_KEY else sent[k]) for k in sent.keys()})
    msg = Message(RecordDict({"arrays": damaged, "config": ConfigRecord({"server-round": 1})}), dst_node_id=11,
                  message_type=MessageType.TRAIN)
    import solar

    with pytest.raises(solar.CorruptError):
        client_sees(solar_mod(threads=1), msg)


def test_broadcast_must_be_codec_options():
    with pytest.raises(TypeError, match="broadcast"):
        SolarStrategy(FedAvg(), broadcast=0.1)


def test_two_clients_one_round_with_a_solar_broadcast_on_flower(federated):
    s = tiny(federated)
    plain, _ = simulate(federated, s, solar_replies=True)
    both, log = simulate(federated, s, solar_replies=True, broadcast=True)
    info = both.rounds[0]
    assert len(info["accepted"]) == 2 and not info["rejected"]
    assert log["result"].arrays is not None and 1 in log["eval"]
    down_plain = sorted(plain.rounds[0]["downloads"].values())
    down_solar = sorted(info["downloads"].values())
    assert len(down_solar) == 2 and max(down_solar) * 3 < min(down_plain), (down_solar, down_plain)
    assert info["broadcast_bytes"] < max(down_solar)
    assert list(log["result"].arrays.keys()) == list(federated.initial_arrays(s).keys())
