"""Hostile and broken replies in a real `aggregate_train`: each is rejected or neutralised, the
round goes on, and the global adapter stays finite and of the template's dtypes."""
import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import _reply_message
from clients.local_update import client_round
from fedpeft.fleet.budget import step_cost
from fedpeft.payload import decode, encode
from strategies.robust import update_norm
from test_fleet import small_config, strategy_for


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps messages with the run's identity; outside a run, give it one."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """Three clients' real round-1 replies (two local steps each), and their config."""
    tmp = tmp_path_factory.mktemp("hostile")
    cfg = small_config(tmp)
    per_step = step_cost(cfg, "lora", 4, 32, 10).total_flops
    cfg = small_config(tmp, max_flops_per_round=2.5 * per_step)
    return cfg, [client_round(cfg, {"partition-id": i}, ArrayRecord(), 1) for i in range(3)]


def roll_call_of(replies) -> dict:
    """What the server's roll call learns before round 1: node 100 + i is client i."""
    return {100 + i: {"client_id": i, "device": r.info["device"]} for i, r in enumerate(replies)}


def as_message(reply, node_id: int) -> Message:
    sent = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return _reply_message(sent, reply, 1)


def with_content(msg: Message, **records) -> Message:
    """The same reply with some records replaced (None: removed)."""
    content = {k: v for k, v in msg.content.items()}
    for key, value in records.items():
        if value is None:
            content.pop(key)
        else:
            content[key] = value
    sent = Message(content=RecordDict({}), dst_node_id=int(msg.metadata.src_node_id), message_type=MessageType.TRAIN)
    return Message(content=RecordDict(content), reply_to=sent)


def metrics_with(msg: Message, **changes) -> MetricRecord:
    return MetricRecord({**dict(msg.content["metrics"]), **changes})


def strict_json_lines(path) -> list[dict]:
    def no_constant(name):
        raise ValueError(f"invalid JSON constant {name}")

    return [json.loads(line, parse_constant=no_constant) for line in path.read_text().splitlines()]


def hostile_cases(honest_msg: Message) -> dict[str, Message]:
    delta = decode(honest_msg.content["arrays"])
    key = next(k for k in delta if "lora_B" in k)
    cases = {
        "no arrays": with_content(honest_msg, arrays=None),
        "float64 1e300": with_content(honest_msg, arrays=encode({**delta, key: torch.full(delta[key].shape, 1e300,
                                                                                          dtype=torch.float64)})[0]),
        "int64 under a float key": with_content(honest_msg, arrays=encode({**delta, key: torch.ones(delta[key].shape,
                                                                                                   dtype=torch.int64)})[0]),
        "bool under a float key": with_content(honest_msg, arrays=encode({**delta, key: torch.ones(delta[key].shape,
                                                                                                  dtype=torch.bool)})[0]),
        "norm 1e6": with_content(honest_msg, arrays=encode({**delta, key: delta[key] + 1e6 / math.sqrt(delta[key].numel())})[0]),
        "examples 1e15": with_content(honest_msg, metrics=metrics_with(honest_msg, examples=10**15, **{"num-examples": 10**15})),
        "examples 0": with_content(honest_msg, metrics=metrics_with(honest_msg, examples=0, **{"num-examples": 0})),
        "NaN loss": with_content(honest_msg, metrics=metrics_with(honest_msg, loss=float("nan"))),
        "inf energy": with_content(honest_msg, metrics=metrics_with(honest_msg, energy_j=float("inf"))),
        # claims that would stall the virtual clock, or take a status only the server gives
        "steps 1e12": with_content(honest_msg, metrics=metrics_with(honest_msg, steps=10**12, steps_planned=10**12)),
        "status straggler": with_content(honest_msg, info=ConfigRecord({**dict(honest_msg.content["info"]),
                                                                        "status": "straggler"})),
    }
    return cases


@pytest.mark.parametrize("case", ["no arrays", "float64 1e300", "int64 under a float key", "bool under a float key",
                                  "norm 1e6", "examples 1e15", "examples 0", "NaN loss", "inf energy", "steps 1e12",
                                  "status straggler"])
def test_each_hostile_reply_is_rejected_or_weightless_and_the_round_goes_on(honest, tmp_path, case):
    cfg, replies = honest
    strategy = strategy_for(cfg, tmp_path)
    strategy.known_nodes = roll_call_of(replies)
    template = dict(strategy.template)
    messages = [as_message(r, node_id=100 + i) for i, r in enumerate(replies)]
    hostile = hostile_cases(messages[2])[case]
    record, metrics = strategy.aggregate_train(1, messages[:2] + [hostile])

    assert record is not None, strategy.round_stats[1]
    new_global = decode(record)
    assert set(new_global) == set(template)
    for k, v in new_global.items():
        assert v.dtype == template[k].dtype, k
        assert not v.is_floating_point() or bool(torch.isfinite(v).all()), k
    # The global is the mean of the two honest clients alone (the hostile one carries no weight).
    honest_only = strategy_for(cfg, tmp_path / "clean")
    clean = decode(honest_only.aggregate_train(1, messages[:2])[0])
    for k in clean:
        torch.testing.assert_close(new_global[k], clean[k])
    assert update_norm(new_global, template) < 1e3

    lines = strict_json_lines(tmp_path / "log" / "clients.jsonl")
    assert len(lines) == 3 and [r["aggregated"] for r in lines] == [True, True, False]
    bad = lines[2]
    assert bad["client_id"] == 2 and bad["node_id"] == 102
    if case == "examples 0":
        assert bad["status"] == "ok" and "weight 0" in bad["error"]
    else:
        assert bad["status"] == "rejected" and bad["error"], bad
    assert metrics["clients-aggregated"] == 2


def test_the_global_and_the_log_do_not_depend_on_the_order_replies_arrive(honest, tmp_path):
    """Ray delivers replies in the order clients finish; the aggregate must be bit-identical anyway."""
    cfg, replies = honest
    results = []
    for name, order in (("forward", [0, 1, 2]), ("shuffled", [2, 0, 1])):
        strategy = strategy_for(cfg, tmp_path / name)
        strategy.known_nodes = roll_call_of(replies)
        record, _ = strategy.aggregate_train(1, [as_message(replies[i], node_id=100 + i) for i in order])
        lines = strict_json_lines(tmp_path / name / "log" / "clients.jsonl")
        results.append((decode(record), [r["client_id"] for r in lines]))
    (first, first_ids), (second, second_ids) = results
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first_ids == second_ids == [0, 1, 2]


def test_a_failed_reply_is_logged_with_the_client_and_device_the_roll_call_named(honest, tmp_path):
    cfg, replies = honest
    strategy = strategy_for(cfg, tmp_path)
    strategy.known_nodes = {100: {"client_id": 0, "device": "raspberry_pi_4_4gb"}}
    sent = Message(content=RecordDict({}), dst_node_id=100, message_type=MessageType.TRAIN)
    crashed = Message(Error(code=0, reason="Traceback ...\nRuntimeError: the device lost power"), reply_to=sent)
    assert strategy.aggregate_train(1, [crashed, as_message(replies[1], 101)], missing=[105])[0] is not None
    lines = strict_json_lines(tmp_path / "log" / "clients.jsonl")
    failed = {r["node_id"]: r for r in lines if r["status"] == "failed"}
    assert failed[100]["client_id"] == 0 and failed[100]["device"] == "raspberry_pi_4_4gb"
    assert "lost power" in failed[100]["error"]
    assert "round_timeout_s" in failed[105]["error"]  # sent, never answered
    assert strategy.round_stats[1]["clients_failed"] == 2 and strategy.round_stats[1]["clients_ok"] == 1


def test_a_reply_that_changes_its_client_id_is_rejected(honest, tmp_path):
    cfg, replies = honest
    strategy = strategy_for(cfg, tmp_path)
    strategy.known_nodes = {100: {"client_id": 1, "device": "raspberry_pi_4_4gb"}}
    strategy.aggregate_train(1, [as_message(replies[0], 100)])  # client 0's reply from client 1's node
    line = strict_json_lines(tmp_path / "log" / "clients.jsonl")[0]
    assert line["status"] == "rejected" and "client_id" in line["error"]


def test_an_aggregation_that_goes_non_finite_keeps_the_previous_global(honest, tmp_path):
    cfg, replies = honest
    strategy = strategy_for(cfg, tmp_path)
    before = dict(strategy.global_delta)
    real = strategy._aggregate

    def overflowing(deltas, weights):  # a numerical blow-up inside the aggregation
        out = real(deltas, weights)
        key = next(iter(out))
        return {**out, key: out[key] * float("inf")}

    strategy._aggregate = overflowing
    record, _ = strategy.aggregate_train(1, [as_message(r, 100 + i) for i, r in enumerate(replies)])
    assert record is None
    assert "global adapter unchanged" in strategy.round_stats[1]["error"]
    assert all(torch.equal(strategy.global_delta[k], before[k]) for k in before)
    assert not any(r["aggregated"] for r in strict_json_lines(tmp_path / "log" / "clients.jsonl"))


def test_run_timings_pass_over_error_and_malformed_replies(tmp_path):
    """Regression (found merging the timers): an error reply has no content, and reading it raised
    inside the server's reply callback, so one crashing client took the whole run down."""
    from strategies.run_timings import RunTimings

    timings = RunTimings(tmp_path)
    sent = Message(content=RecordDict({}), dst_node_id=100, message_type=MessageType.TRAIN)
    timings.client(Message(Error(code=0, reason="RuntimeError: injected failure"), reply_to=sent))
    timings.client(Message(RecordDict({"metrics": MetricRecord({"t.train_s": float("inf"), "round": 1})}), reply_to=sent))
    timings.client(Message(RecordDict({"metrics": MetricRecord({"t.train_s": 1.5, "round": 1, "client_id": 3})}),
                           reply_to=sent))
    lines = [json.loads(line) for line in (tmp_path / "timings.jsonl").read_text().splitlines()]
    assert [(line["client_id"], line["train_s"]) for line in lines if line["kind"] == "client"] == [(3, 1.5)]
