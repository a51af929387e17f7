import fedpeft  # noqa: F401  (torchvision shim first)

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedpeft.errors import UsageError
from fedpeft.payload import (
    decode, encode, expected_shapes, npy_header_bytes, record_bytes,
)


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


def npy_header_len(tensor: torch.Tensor) -> int:
    """Independent count of the .npy header np.save writes: magic + version + len + padded dict."""
    buf = io.BytesIO()
    arr = tensor.numpy()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return len(buf.getvalue())


def test_roundtrip_none_is_exact_and_bytes_are_tensor_bytes_plus_npy_headers():
    delta = sample_delta()
    record, info = encode(delta)
    assert isinstance(record, ArrayRecord) and set(record) == set(delta)
    out = decode(record, expected_shapes(delta))
    for k, v in delta.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    raw = sum(v.numel() * v.element_size() for v in delta.values())
    headers = sum(npy_header_len(v) for v in delta.values())
    assert headers == 128 * len(delta)  # every header here pads to 128 bytes
    assert info.bytes == record_bytes(record) == raw + headers
    assert sum(len(a.data) for a in record.values()) == info.bytes
    assert info.tensor_bytes == info.raw_bytes == raw and info.header_bytes == headers
    assert info.max_abs_error == 0.0
    assert npy_header_bytes((8, 3, 3, 3), "float32") == 128


def test_fp16_and_int8_are_small_and_accurate():
    delta = {"w": torch.randn(256, 256), "v": torch.randn(4096) * 1e-3, "idx": torch.arange(10)}
    raw = sum(v.numel() * v.element_size() for v in delta.values())
    _, none = encode(delta)
    rec16, fp16 = encode(delta, "fp16")
    rec8, int8 = encode(delta, "int8")
    assert 0.49 < fp16.bytes / none.bytes < 0.51
    assert 0.24 < int8.bytes / none.bytes < 0.26
    # exact counts: float tensors at 2 / 1 bytes per entry, int64 indices unchanged, + headers, + scales
    n_float = 256 * 256 + 4096
    assert fp16.tensor_bytes == 2 * n_float + 80
    assert int8.tensor_bytes == n_float + 80 + 2 * 4  # two float32 scales
    assert int8.num_arrays == 5 and int8.header_bytes == 5 * 128
    assert raw == none.tensor_bytes
    out16, out8 = decode(rec16), decode(rec8)
    assert torch.equal(out16["idx"], delta["idx"]) and out16["idx"].dtype == torch.int64
    assert torch.equal(out8["idx"], delta["idx"])
    err16 = max(float((out16[k] - delta[k]).abs().max()) for k in ("w", "v"))
    err8 = max(float((out8[k] - delta[k]).abs().max()) for k in ("w", "v"))
    assert fp16.max_abs_error == pytest.approx(err16) and int8.max_abs_error == pytest.approx(err8)
    assert 0 < err16 < 5e-3
    # int8 error is at most half a quantization step of the largest tensor
    assert 0 < err8 <= float(delta["w"].abs().max()) / 127 / 2 * 1.001
    assert float((out8["v"] - delta["v"]).abs().max()) <= float(delta["v"].abs().max()) / 127 / 2 * 1.001
    assert out8["w"].dtype == torch.float32


def test_int_tensors_never_quantized():
    delta = sample_delta()
    rec, _ = encode(delta, "int8")
    assert rec["features.1.weight.indices"].dtype == "int64"
    assert rec["features.0.1.num_batches_tracked"].dtype == "int64"
    assert rec["classifier.1.weight@int8"].dtype == "int8"
    out = decode(rec, expected_shapes(delta))
    assert torch.equal(out["features.1.weight.indices"], delta["features.1.weight.indices"])
    assert torch.equal(out["zeros"], delta["zeros"])  # all-zero tensor: scale 0


def _bad(record: dict, key: str, array: Array) -> ArrayRecord:
    record = dict(record)
    record[key] = array
    return ArrayRecord(record)


def test_bad_payloads_rejected():
    delta = {"w": torch.randn(4, 3), "i": torch.arange(3)}
    rec, _ = encode(delta)
    exp = expected_shapes(delta)
    base = dict(rec.items())
    nan = torch.tensor([[float("nan"), 1.0, 2.0]] * 4)
    cases = {
        "NaN": _bad(base, "w", Array(nan.numpy())),
        "inf": _bad(base, "w", Array(torch.full((4, 3), float("inf")).numpy())),
        "shape": _bad(base, "w", Array(torch.ones(3, 4).numpy())),
        "unknown dtype": _bad(base, "w", Array("complex64", (4, 3), "numpy.ndarray", b"x" * 96)),
        "unknown serialization": _bad(base, "w", Array("float32", (4, 3), "safetensors", b"x" * 48)),
        "unreadable": _bad(base, "w", Array("float32", (4, 3), "numpy.ndarray", b"garbage")),
        "metadata says": _bad(base, "w", Array("float32", (2, 2), "numpy.ndarray", rec["w"].data)),
        "unknown codec": ArrayRecord({"w@zstd": rec["w"], "i": rec["i"]}),
        "without its scale": ArrayRecord({"w@int8": Array(np.zeros((4, 3), np.int8)), "i": rec["i"]}),
        "unexpected": _bad(base, "extra", Array(np.zeros(2, np.float32))),
        "missing": ArrayRecord({"w": rec["w"]}),
    }
    for what, bad in cases.items():
        with pytest.raises(UsageError, match=what) as err:
            decode(bad, exp)
        assert "\n" not in str(err.value)
    # a negative scale is rejected, as is a wrong dtype under the int8 codec
    q = Array(np.zeros((4, 3), np.int8))
    with pytest.raises(UsageError, match="scale"):
        decode(ArrayRecord({"w@int8": q, "w@int8_scale": Array(np.array([-1.0], np.float32))}))
    with pytest.raises(UsageError, match="int8 codec needs"):
        decode(ArrayRecord({"w@int8": Array(np.zeros((4, 3), np.float32)), "w@int8_scale": Array(np.ones(1, np.float32))}))
    # wildcard dimension for variable-length sparse values
    assert decode(rec, {"w": (None, 3), "i": (None,)})["w"].shape == (4, 3)


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
