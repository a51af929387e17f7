"""Fuzzing the two doors a hostile client knocks on: the payload decoder and the reply validator.
Random and mutated records may only ever be rejected cleanly (UsageError / a `rejected` line);
no other exception may escape."""
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.errors import UsageError
from fedpeft.payload import decode, encode

DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int32", "int64", "bool", "complex64", "object", "<U3", "bogus"]
VALID = {"layer.weight": torch.randn(4, 3), "layer.bias": torch.zeros(4), "idx.indices": torch.arange(5, dtype=torch.int32)}
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_rejects(record, expected=None) -> None:
    try:
        decode(record, expected=expected)
    except UsageError:
        pass


arrays = st.builds(
    lambda dtype, shape, stype, data: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data),
    st.sampled_from(DTYPES), st.lists(st.integers(-2, 6), max_size=3),
    st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]), st.binary(max_size=300))
keys = st.one_of(st.sampled_from(["@manifest", "@float32", "@int8", "@int8_scales", "@int32", "layer.weight"]),
                 st.text(max_size=12))


@FUZZ
@given(st.dictionaries(keys, arrays, max_size=5))
def test_random_records_are_rejected_cleanly(content):
    decodes_or_rejects(ArrayRecord(content))
    decodes_or_rejects(ArrayRecord(content), expected={"layer.weight": (4, 3)})


@FUZZ
@given(codec=st.sampled_from(["none", "fp16", "int8"]), victim=st.integers(0, 10), offset=st.integers(0, 4000),
       flip=st.integers(1, 255), cut=st.integers(0, 400), how=st.sampled_from(["flip", "truncate", "extend", "drop",
                                                                                 "dtype", "shape", "swap"]))
def test_mutated_valid_records_are_rejected_cleanly(codec, victim, offset, flip, cut, how):
    record, _ = encode(VALID, codec)
    content = dict(record.items())
    key = sorted(content)[victim % len(content)]
    array = content[key]
    data = bytearray(array.data)
    if how == "flip":
        data[offset % len(data)] ^= flip
        content[key] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=bytes(data))
    elif how == "truncate":
        content[key] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=bytes(data[: cut % len(data)]))
    elif how == "extend":
        content[key] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=bytes(data) + bytes(cut))
    elif how == "drop":
        content.pop(key)
    elif how == "dtype":
        content[key] = Array(dtype=DTYPES[flip % len(DTYPES)], shape=array.shape, stype=array.stype, data=bytes(data))
    elif how == "shape":
        content[key] = Array(dtype=array.dtype, shape=(cut,), stype=array.stype, data=bytes(data))
    else:  # another array's contents under this key
        other = sorted(content)[(victim + 1) % len(content)]
        content[key], content[other] = content[other], content[key]
    decodes_or_rejects(ArrayRecord(content))
    decodes_or_rejects(ArrayRecord(content), expected={k: tuple(v.shape) for k, v in VALID.items()})


@pytest.fixture(scope="module")
def strategy(tmp_path_factory):
    import test_fleet

    tmp = tmp_path_factory.mktemp("fuzz")
    return test_fleet.strategy_for(test_fleet.small_config(tmp), tmp)


numbers = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                    st.lists(st.floats(allow_nan=True), max_size=3))
metric_keys = st.sampled_from(["round", "client_id", "examples", "steps", "rank", "batch_size", "bytes_up", "bytes_down",
                               "ram_budget_bytes", "wall_s", "compute_s", "comm_s", "device_time_s", "energy_j",
                               "loss", "num-examples", "mem.activation", "flops.total"])
info_values = st.one_of(st.sampled_from(["ok", "failed", "rejected", "over_budget", "lora", "raspberry_pi_5", ""]),
                        st.text(max_size=8), st.booleans(), st.integers(-5, 5))
info_keys = st.sampled_from(["device", "method", "status", "chosen", "adapted", "upload_codec", "error"])


@FUZZ
@given(metrics=st.dictionaries(metric_keys, numbers, max_size=18), info=st.dictionaries(info_keys, info_values, max_size=7),
       with_arrays=st.booleans())
def test_random_replies_get_a_line_and_never_raise(strategy, metrics, info, with_arrays):
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        setattr(TaskIdentity, name, value)
    try:
        content = {"metrics": MetricRecord(metrics), "info": ConfigRecord(info)}
    except (TypeError, ValueError):
        return  # Flower itself refuses to build such a record: it never reaches the server
    if with_arrays:
        content["arrays"] = encode({"x": torch.ones(2)})[0]
    sent = Message(content=RecordDict({}), dst_node_id=7, message_type=MessageType.TRAIN)
    reply = Message(content=RecordDict(content), reply_to=sent)
    lines = strategy.collect(1, [reply], strategy.decode_delta)
    assert len(lines) == 1
    rec, payload = lines[0]
    assert rec["status"] in ("ok", "failed", "rejected", "over_budget", "unavailable")
    assert payload is None or rec["status"] == "ok"
    strategy.known_nodes.clear()
