import fedpeft  # noqa: F401  (torchvision shim first)

import json
import math
import zlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, pull_objects, push_objects
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

from fedpeft.errors import UsageError
from fedpeft.payload import (
    MAX_MANIFEST_BYTES, MAX_NUMEL, decode, downlink_wire_bytes, encode, expected_shapes, npy_header_bytes,
    record_bytes, wire_bytes,
)

RUN = 7


def sample_delta(seed=0, n=4096):
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.features.0.0.lora_A.weight": torch.randn(8, 3, 3, 3, generator=g),
        "base_model.model.features.0.0.lora_B.weight": torch.randn(32, 8, 1, 1, generator=g) * 0.01,
        "classifier.1.weight": torch.randn(n // 64, 64, generator=g),
        "features.1.weight.values": torch.randn(100, generator=g),
        "features.1.weight.indices": torch.randperm(1000, generator=g)[:100],
        "features.0.1.num_batches_tracked": torch.tensor(17),
        "zeros": torch.zeros(5),
    }


def lora_like_delta(seed=0, layers=36, channels=(16, 32, 64, 96, 160, 320)):
    """Shaped like a trained rank-4 LoRA delta of a MobileNetV2 (A: r x C_in, B: C_out x r, 1x1 convs)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        c_in, c_out = channels[i % len(channels)], channels[(i + 1) % len(channels)] * 6
        out[f"base_model.model.features.{i}.conv.0.0.lora_A.weight"] = torch.randn(4, c_in, 1, 1, generator=g)
        out[f"base_model.model.features.{i}.conv.0.0.lora_B.weight"] = torch.randn(c_out, 4, 1, 1, generator=g) * 1e-2
    return out


# -- Flower's own wire path: object store registration decides what is pushed, push_objects deflates it --
def metadata(dst: int) -> Metadata:
    return Metadata(run_id=RUN, message_id="", src_node_id=1, dst_node_id=dst, reply_to_message_id="",
                    group_id="1", created_at=1.0, ttl=3600.0, message_type="train")


def message(record: ArrayRecord, dst: int = 5) -> Message:
    return Message(RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1})}), metadata=metadata(dst))


def flower_push(messages: list[Message]) -> tuple[InMemoryObjectStore, dict[str, int]]:
    """What a ServerApp pushes to the SuperLink for these messages (as flwr's HttpGrid does): every
    message's tree is registered with the (verifying) store, then the objects it asks for are pushed.
    Returns the store and {object id: bytes pushed} (an id pushed twice counts twice)."""
    store = InMemoryObjectStore(verify=True)
    objects, wanted = {}, []
    for msg in messages:
        objects.update(get_all_nested_objects(msg))
        wanted += store.preregister(RUN, get_object_tree(msg))
    sent: dict[str, int] = {}

    def push(object_id: str, content: bytes) -> None:
        store.put(object_id, content)
        sent[object_id] = sent.get(object_id, 0) + len(content)

    push_objects(objects, push, object_ids_to_push=set(wanted), keep_objects=True)
    return store, sent


def flower_pull(link: InMemoryObjectStore, msg: Message) -> tuple[Message, int]:
    """What a SuperNode pulls from the SuperLink for `msg` (a fresh node store), and the message inflated
    from the pulled contents."""
    node = InMemoryObjectStore(verify=True)
    ids = node.preregister(RUN, get_object_tree(msg))
    pulled = []

    def pull(object_id: str) -> bytes:
        content = link.get(object_id)
        pulled.append(len(content))
        return content

    contents = pull_objects(ids, pull)
    for object_id, content in contents.items():
        node.put(object_id, content)
    return inflate_object_from_contents(msg.object_id, contents, keep_object_contents=True), sum(pulled)


def subtree_ids(msg: Message, root_id: str) -> set[str]:
    for tree in iterate_object_tree(get_object_tree(msg)):
        if tree.object_id == root_id:
            return {t.object_id for t in iterate_object_tree(tree)}
    raise AssertionError("record not in the message tree")


def manifest_array(tensors, codec="none", v=1, raw_json: bytes | None = None) -> Array:
    """A manifest built from the documented format (independently of fedpeft.payload)."""
    text = raw_json if raw_json is not None else json.dumps({"v": v, "codec": codec, "tensors": tensors}).encode()
    return Array(np.frombuffer(zlib.compress(text), dtype=np.uint8))


# -- tests --------------------------------------------------------------------------------------
def test_roundtrip_none_is_exact_and_packs_one_array_per_dtype():
    delta = {**sample_delta(), "negzero": torch.tensor([-0.0, 0.0]), "empty": torch.zeros(0, 3),
             "mask": torch.tensor([True, False, True]), "half": torch.randn(6).half()}
    record, info = encode(delta)
    assert isinstance(record, ArrayRecord)
    assert list(record) == ["@manifest", "@float32", "@int64", "@bool", "@float16"]
    out = decode(record, expected_shapes(delta))
    assert list(out) == list(delta)
    for k, v in delta.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v), k
    assert torch.equal(torch.signbit(out["negzero"]), torch.tensor([True, False]))  # bit-exact, so not elided
    raw = sum(v.numel() * v.element_size() for v in delta.values())
    assert info.raw_bytes == raw and info.max_abs_error == 0.0
    # all-zero and empty tensors travel in the manifest only
    assert info.tensor_bytes == raw - 5 * 4 == sum(len(a.data) - npy_header_bytes(a.shape, a.dtype)
                                                   for k, a in record.items() if k != "@manifest")
    assert info.bytes == record_bytes(record) == wire_bytes(record) == wire_bytes(dict(record.items()))
    assert info.header_bytes == info.bytes - info.tensor_bytes > 0
    assert info.num_arrays == 5 and info.num_objects == 1 + 5 + 5  # record, arrays, one chunk each
    assert npy_header_bytes((8, 3, 3, 3), "float32") == 128


def test_wire_bytes_of_a_tiny_record_follow_flowers_object_layout():
    """Flower 1.42's layout, spelled out: `<type> <child ids> <body length>\\0<body>` per object."""
    array = Array(np.arange(3, dtype=np.float32))
    npy = 128 + 12
    chunk = len(f"ArrayChunk  {npy}\0") + npy
    chunk_id = next(iter(array.children))
    body = json.dumps({"dtype": "float32", "shape": [3], "stype": "numpy.ndarray", "arraychunk_ids": [0]})
    array_obj = len(f"Array {chunk_id} {len(body)}\0") + len(body)
    refs = json.dumps({"w": array.object_id})
    record_obj = len(f"ArrayRecord {array.object_id} {len(refs)}\0") + len(refs)
    assert wire_bytes(ArrayRecord({"w": array})) == chunk + array_obj + record_obj
    # the same Array under a second key: one more reference in the record object, nothing else
    refs2 = json.dumps({"w": array.object_id, "v": array.object_id})
    assert wire_bytes(ArrayRecord({"w": array, "v": Array(np.arange(3, dtype=np.float32))})) == \
        chunk + array_obj + len(f"ArrayRecord {array.object_id} {len(refs2)}\0") + len(refs2)
    assert record_bytes(ArrayRecord()) == 0 < wire_bytes(ArrayRecord()) == len("ArrayRecord  2\0{}")


@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
def test_wire_bytes_equal_what_flower_pushes_and_pulls(codec):
    delta = {**lora_like_delta(), "head.weight": torch.randn(10, 64), "head.bias": torch.zeros(10),
             "idx": torch.arange(50, dtype=torch.int32)}
    record, info = encode(delta, codec)
    msg = message(record)
    link, sent = flower_push([msg])
    ids = subtree_ids(msg, record.object_id)
    assert sum(sent[i] for i in ids) == info.bytes == record_bytes(record)
    assert set(sent) >= ids and len(ids) == info.num_objects
    # the whole message (record + config record + RecordDict + Message objects) is within 1%
    total = sum(sent.values())
    assert info.bytes < total <= 1.01 * info.bytes
    assert total == wire_bytes(msg)
    # and the SuperNode pulls exactly as much, and what it inflates decodes to the same delta
    received, pulled = flower_pull(link, msg)
    assert pulled == total
    assert record_bytes(received.content["arrays"]) == info.bytes
    got, want = decode(received.content["arrays"], expected_shapes(delta)), decode(record)
    assert all(torch.equal(got[k], want[k]) for k in delta)


def test_flower_dedup_identical_objects_and_multi_chunk_arrays():
    big = np.arange(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE // 4 + 1000, dtype=np.float32)  # > 5 MiB: two chunks
    zeros = np.zeros(300, np.float32)
    record = ArrayRecord({"big": Array(big), "a": Array(zeros), "b": Array(zeros.copy()), "c": Array(np.ones(2))})
    assert len(record["big"].children) == 2
    link, sent = flower_push([message(record)])
    ids = subtree_ids(message(record), record.object_id)
    assert sum(sent[i] for i in ids) == wire_bytes(record)
    naive = sum(len(obj.deflate()) for arr in record.values() for obj in [arr, *arr.children.values()])
    assert wire_bytes(record) < naive + len(record.deflate())  # "a" and "b" are one object


def test_downlink_to_n_clients_costs_n_records_on_the_edge():
    """One round's downlink: the ServerApp pushes the objects shared by the N messages once, but each
    SuperNode pulls the whole record for its own message (dedup is within one message)."""
    record, info = encode(lora_like_delta(layers=8))
    messages = [message(record, dst) for dst in (11, 12, 13)]
    link, sent = flower_push(messages)
    ids = subtree_ids(messages[0], record.object_id)
    assert sum(sent[i] for i in ids) == info.bytes  # pushed to the SuperLink once, not 3 times
    pulled = [flower_pull(link, m)[1] - (wire_bytes(m) - info.bytes) for m in messages]
    assert pulled == [info.bytes] * 3
    assert downlink_wire_bytes(record, 3) == sum(pulled) == 3 * record_bytes(record)
    assert downlink_wire_bytes(ArrayRecord(), 3) == 0
    with pytest.raises(UsageError, match="num_clients"):
        downlink_wire_bytes(record, -1)


def test_round1_zero_tensors_cost_nothing():
    """A fresh LoRA adapter has B = 0: the zero tensors travel as manifest entries only."""
    trained = lora_like_delta()
    fresh = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in trained.items()}
    b_bytes = sum(v.numel() * 4 for k, v in trained.items() if "lora_B" in k)
    _, t_info = encode(trained)
    record, f_info = encode(fresh)
    assert f_info.tensor_bytes == t_info.tensor_bytes - b_bytes
    assert f_info.bytes < t_info.bytes - b_bytes + 200
    out = decode(record)
    assert all(torch.equal(out[k], v) and out[k].dtype == torch.float32 for k, v in fresh.items())


def test_lora_upload_meets_the_wire_targets():
    delta = lora_like_delta()
    raw = sum(v.numel() * 4 for v in delta.values())
    ratios = {codec: encode(delta, codec)[1].bytes / raw for codec in ("none", "fp16", "int8")}
    assert ratios["none"] <= 1.05 and ratios["fp16"] <= 0.52 and ratios["int8"] <= 0.27, ratios
    # the old layout (one .npy Array per tensor, one scale Array per int8 tensor) missed all three
    per_tensor = {k: Array(v.numpy()) for k, v in delta.items()}
    assert wire_bytes(ArrayRecord(per_tensor)) / raw > 1.05


def test_fp16_and_int8_are_small_and_accurate():
    delta = {"w": torch.randn(256, 256), "v": torch.randn(4096) * 1e-3, "idx": torch.arange(10)}
    raw = sum(v.numel() * v.element_size() for v in delta.values())
    _, none = encode(delta)
    rec16, fp16 = encode(delta, "fp16")
    rec8, int8 = encode(delta, "int8")
    assert 0.49 < fp16.bytes / none.bytes < 0.51
    assert 0.24 < int8.bytes / none.bytes < 0.26
    # exact counts: float tensors at 2 / 1 bytes per entry, int64 indices unchanged, + scales
    n_float = 256 * 256 + 4096
    assert none.tensor_bytes == raw
    assert fp16.tensor_bytes == 2 * n_float + 80
    assert int8.tensor_bytes == n_float + 80 + 2 * 4  # two float32 scales, in one array
    assert list(rec16) == ["@manifest", "@float16", "@int64"] and fp16.num_arrays == 3
    assert list(rec8) == ["@manifest", "@int8", "@int64", "@int8_scales"] and int8.num_arrays == 4
    assert rec8["@int8_scales"].shape == (2,) and rec8["@int8"].shape == (n_float,)
    out16, out8 = decode(rec16), decode(rec8)
    assert torch.equal(out16["idx"], delta["idx"]) and out16["idx"].dtype == torch.int64
    assert torch.equal(out8["idx"], delta["idx"])
    err16 = max(float((out16[k] - delta[k]).abs().max()) for k in ("w", "v"))
    err8 = max(float((out8[k] - delta[k]).abs().max()) for k in ("w", "v"))
    assert fp16.max_abs_error == pytest.approx(err16) and int8.max_abs_error == pytest.approx(err8)
    assert 0 < err16 < 5e-3
    # int8 error is at most half a quantization step of each tensor (per-tensor scales)
    assert 0 < err8 <= float(delta["w"].abs().max()) / 127 / 2 * 1.001
    assert float((out8["v"] - delta["v"]).abs().max()) <= float(delta["v"].abs().max()) / 127 / 2 * 1.001
    assert out8["w"].dtype == out16["w"].dtype == torch.float32
    scales = rec8["@int8_scales"].numpy()
    assert scales[0] == pytest.approx(float(delta["w"].abs().max()) / 127)
    assert scales[1] == pytest.approx(float(delta["v"].abs().max()) / 127)


def test_int_tensors_never_quantized():
    delta = sample_delta()
    rec, _ = encode(delta, "int8")
    assert rec["@int64"].dtype == "int64" and rec["@int64"].shape == (101,)
    assert rec["@int8"].dtype == "int8"
    out = decode(rec, expected_shapes(delta))
    assert torch.equal(out["features.1.weight.indices"], delta["features.1.weight.indices"])
    assert torch.equal(out["features.0.1.num_batches_tracked"], delta["features.0.1.num_batches_tracked"])
    assert torch.equal(out["zeros"], delta["zeros"])  # all-zero tensor: no data, no scale
    assert rec["@int8_scales"].shape == (4,)


def _with(record: ArrayRecord, **arrays) -> ArrayRecord:
    """`record` with arrays replaced (value None drops the key); key names use _ for @."""
    out = dict(record.items())
    for key, array in arrays.items():
        key = "@" + key
        if array is None:
            out.pop(key)
        else:
            out[key] = array
    return ArrayRecord(out)


def test_bad_payloads_rejected():
    delta = {"w": torch.randn(4, 3), "i": torch.arange(3)}
    rec, _ = encode(delta)
    exp = expected_shapes(delta)
    w = ["w", [4, 3], "float32", "raw"]
    i = ["i", [3], "int64", "raw"]
    f32 = rec["@float32"]
    nan = np.array([float("nan")] + [1.0] * 11, np.float32)
    bomb = Array(np.frombuffer(zlib.compress(b" " * (MAX_MANIFEST_BYTES + 1)), np.uint8))
    trailing = Array(np.frombuffer(zlib.compress(b"{}") + b"xx", np.uint8))
    cases = {
        "NaN": _with(rec, float32=Array(nan)),
        "inf": _with(rec, float32=Array(np.full(12, np.inf, np.float32))),
        "shape \\(4, 3\\), expected": decode_args(rec, {"w": (3, 4), "i": (3,)}),
        "unknown dtype": _with(rec, float32=Array("complex64", (12,), "numpy.ndarray", b"x" * 96)),
        "unknown serialization": _with(rec, float32=Array("float32", (12,), "safetensors", f32.data)),
        "unreadable array data": _with(rec, float32=Array("float32", (12,), "numpy.ndarray", b"garbage")),
        "metadata says": _with(rec, float32=Array("float32", (6,), "numpy.ndarray", f32.data)),
        "dtype float64, must be float32": _with(rec, float32=Array(np.zeros(12))),
        "must be 1-D": _with(rec, float32=Array(np.zeros((4, 3), np.float32))),
        "holds 11 values, the manifest needs 12": _with(rec, float32=Array(np.zeros(11, np.float32))),
        "payload key 'w': unknown": ArrayRecord({**dict(rec.items()), "w": f32}),
        "no '@manifest' array": _with(rec, manifest=None),
        "missing data array '@int64'": _with(rec, int64=None),
        "@float64\\]: data array not referenced": _with(rec, float64=Array(np.zeros(2))),
        "unreadable \\(zlib": _with(rec, manifest=Array(np.frombuffer(b"not zlib", np.uint8))),
        "larger than": _with(rec, manifest=bomb),
        "trailing": _with(rec, manifest=trailing),
        "not JSON": _with(rec, manifest=manifest_array(None, raw_json=b"{")),
        "keys v, codec, tensors": _with(rec, manifest=manifest_array(None, raw_json=b'{"v": 1}')),
        "unknown version 2": _with(rec, manifest=manifest_array([w, i], v=2)),
        "unknown codec 'zstd'": _with(rec, manifest=manifest_array([w, i], codec="zstd")),
        "entry 1 must be": _with(rec, manifest=manifest_array([w, ["i", [3], "int64"]])),
        "payload\\[w\\]: sent twice": _with(rec, manifest=manifest_array([w, w, i])),
        "without '@'": _with(rec, manifest=manifest_array([["w@int8", [4, 3], "float32", "raw"], i])),
        "payload\\[w\\]: shape must be": _with(rec, manifest=manifest_array([["w", [4, -3], "float32", "raw"], i])),
        "payload\\[i\\]: shape must be": _with(rec, manifest=manifest_array([w, ["i", [True, 3], "int64", "raw"]])),
        "payload\\[w\\]: unknown dtype 'complex64'": _with(rec, manifest=manifest_array([["w", [12], "complex64", "raw"], i])),
        "payload\\[w\\]: unknown codec tag 'zip'": _with(rec, manifest=manifest_array([["w", [4, 3], "float32", "zip"], i])),
        "payload\\[w\\]: codec fp16 sends floating tensors quantized": _with(rec, manifest=manifest_array([w, i], codec="fp16")),
        "payload\\[w\\]: fp16 entry in a codec none": _with(rec, manifest=manifest_array([["w", [4, 3], "float16", "fp16"], i])),
        "payload\\[huge\\]: the delta exceeds": _with(rec, manifest=manifest_array([w, i, ["huge", [MAX_NUMEL], "float32", "zero"]])),
        "unexpected key": decode_args(ArrayRecord({**dict(encode({**delta, "extra": torch.ones(2)})[0].items())}), exp),
        "missing 1 expected key": decode_args(encode({"w": delta["w"]})[0], exp),
    }
    for what, bad in cases.items():
        record, expected = bad if isinstance(bad, tuple) else (bad, exp)
        with pytest.raises(UsageError, match=what) as err:
            decode(record, expected)
        assert "\n" not in str(err.value), what
    # wildcard dimension for variable-length sparse values
    assert decode(rec, {"w": (None, 3), "i": (None,)})["w"].shape == (4, 3)


def decode_args(record, expected):
    return record, expected


def test_expected_shapes_are_checked_before_anything_is_allocated():
    rec = _with(encode({"w": torch.ones(2)})[0],
                manifest=manifest_array([["w", [MAX_NUMEL // 2], "float64", "zero"]]))
    with pytest.raises(UsageError, match=r"payload\[w\]: shape \(134217728,\), expected \(2,\)"):
        decode(rec, {"w": (2,)})


def test_int8_scales_validated():
    delta = {"w": torch.randn(4, 3), "v": torch.randn(5), "i": torch.arange(3)}
    rec, _ = encode(delta, "int8")
    assert decode(rec)["w"].shape == (4, 3)
    scales = rec["@int8_scales"].numpy()
    cases = {
        "payload\\[w\\]: int8 data without its scale array '@int8_scales'": _with(rec, int8_scales=None),
        "scale of v must be finite and >= 0, got -1": _with(rec, int8_scales=Array(np.array([scales[0], -1], np.float32))),
        "scale of w must be finite and >= 0, got nan": _with(rec, int8_scales=Array(np.array([np.nan, 1], np.float32))),
        "scale of w must be finite and >= 0, got inf": _with(rec, int8_scales=Array(np.array([np.inf, 1], np.float32))),
        "@int8_scales\\]: 3 scales for 2 int8 tensors": _with(rec, int8_scales=Array(np.ones(3, np.float32))),
        "@int8_scales\\]: 1 scales for 2 int8 tensors": _with(rec, int8_scales=Array(np.ones(1, np.float32))),
        "@int8_scales\\]: dtype float64, must be float32": _with(rec, int8_scales=Array(np.ones(2))),
        "payload\\[w\\]: contains NaN or inf": _with(rec, int8_scales=Array(np.array([3e38, 1], np.float32))),
    }
    none_rec, _ = encode(delta)
    cases["@int8_scales\\]: scale array without int8 data"] = _with(none_rec, int8_scales=Array(np.ones(1, np.float32)))
    i8 = ["w", [4, 3], "int8", "int8"]
    cases["payload\\[w\\]: int8 codec needs dtype int8, got float32"] = _with(
        rec, manifest=manifest_array([["w", [4, 3], "float32", "int8"], ["v", [5], "int8", "int8"], ["i", [3], "int64", "raw"]],
                                     codec="int8"))
    cases["@int8\\]: data array not referenced"] = _with(
        rec, manifest=manifest_array([["w", [4, 3], "float32", "zero"], ["v", [5], "float32", "zero"], ["i", [3], "int64", "raw"]],
                                     codec="int8"))
    assert decode(_with(rec, manifest=manifest_array([i8, ["v", [5], "int8", "int8"], ["i", [3], "int64", "raw"]],
                                                     codec="int8")))["v"].shape == (5,)  # the test's manifest is valid
    for what, bad in cases.items():
        with pytest.raises(UsageError, match=what) as err:
            decode(bad)
        assert "\n" not in str(err.value), what


def test_encode_rejects_bad_input():
    with pytest.raises(UsageError, match="codec"):
        encode({"w": torch.ones(2)}, "int4")
    with pytest.raises(UsageError, match="NaN"):
        encode({"w": torch.tensor([float("nan")])})
    with pytest.raises(UsageError, match="float16 range"):
        encode({"w": torch.tensor([1e6])}, "fp16")
    with pytest.raises(UsageError, match="reserved"):
        encode({"w@fp16": torch.ones(2)})
    with pytest.raises(UsageError, match="dtype"):
        encode({"w": torch.ones(2, dtype=torch.bfloat16)})
    with pytest.raises(UsageError, match="non-empty"):
        encode({})


def test_encode_is_deterministic():
    a, _ = encode(sample_delta(), "int8")
    b, _ = encode(sample_delta(), "int8")
    assert a.object_id == b.object_id and math.isclose(record_bytes(a), record_bytes(b))
