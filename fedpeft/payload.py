"""Encode a delta (named tensors) into a Flower `ArrayRecord` and back, with exact byte counts.

Wire format (one `flwr.app.Array` per entry, `stype = "numpy.ndarray"`, i.e. `np.save` bytes):

- codec "none": key `K` holds the tensor as is (any dtype in ALLOWED_DTYPES).
- codec "fp16": a floating tensor `K` travels as key `K@fp16` (float16); integer/bool tensors
  (indices, num_batches_tracked, masks) travel unchanged under `K`.
- codec "int8": a floating tensor `K` travels as key `K@int8` (int8, q = round(x / s) clamped to
  [-127, 127]) plus key `K@int8_scale` (float32, shape (1,)), with the per-tensor symmetric scale
  s = max|x| / 127 (s = 0 for an all-zero tensor). Integer/bool tensors travel unchanged.
  Decoding gives q * s.

Quantized entries decode to float32 (fedpeft trains in fp32). Delta keys must not contain "@".

Byte counts: `record_bytes(record)` is the sum of `len(Array.data)` over the record's arrays,
i.e. exactly the bytes Flower serializes for the array contents. Each `Array.data` is a full .npy
file: the raw tensor bytes (numel x itemsize) plus the .npy header (magic, version, header length
and a dict with dtype/shape, padded to a multiple of 64 bytes: 128 bytes for ordinary
shapes). Not counted: the key strings and Flower's per-array JSON metadata and message framing
(dtype/shape/stype/chunk ids, object ids), which are the same for every codec except for the
extra scale arrays. `EncodeInfo` reports the split (`tensor_bytes` + `header_bytes` = `bytes`).

`decode` validates what a client sent so the server can reject a bad payload with a UsageError
instead of crashing: serialization type, dtype, readable data, metadata matching the data,
codec suffixes and their scale arrays, finite values, and optionally the expected keys and shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedpeft.errors import UsageError, choice, require

Delta = dict[str, torch.Tensor]

CODECS = ("none", "fp16", "int8")
SEP = "@"
FP16_SUFFIX = SEP + "fp16"
INT8_SUFFIX = SEP + "int8"
SCALE_SUFFIX = SEP + "int8_scale"
STYPE = "numpy.ndarray"
FLOAT_DTYPES = ("float16", "float32", "float64")
INT_DTYPES = ("int8", "uint8", "int16", "int32", "int64", "bool")
ALLOWED_DTYPES = FLOAT_DTYPES + INT_DTYPES
INT8_MAX = 127


@dataclass(frozen=True)
class EncodeInfo:
    """What `encode` produced. `bytes` = `record_bytes(record)` = `tensor_bytes` + `header_bytes`."""

    bytes: int
    max_abs_error: float
    codec: str = "none"
    tensor_bytes: int = 0
    header_bytes: int = 0
    num_arrays: int = 0
    raw_bytes: int = 0  # numel x itemsize of the delta before encoding (for the compression ratio)


def record_bytes(record: ArrayRecord | Mapping[str, Array]) -> int:
    """Bytes of serialized array data in `record`: sum of len(Array.data) (.npy header + raw data)."""
    return sum(len(array.data) for array in record.values())


def _np_dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _array(np_value: np.ndarray) -> Array:
    return Array(np_value if np_value.flags.c_contiguous else np_value.copy(order="C"))


def encode(delta: Mapping[str, torch.Tensor], codec: str = "none") -> tuple[ArrayRecord, EncodeInfo]:
    """Serialize `delta` into an ArrayRecord with `codec`; return it with its EncodeInfo.

    max_abs_error is max |decoded - original| over all entries (0.0 for codec none)."""
    choice("codec", codec, CODECS)
    require(isinstance(delta, Mapping) and len(delta) > 0, "delta: must be a non-empty dict of tensors")
    arrays: dict[str, Array] = {}
    max_err = 0.0
    raw = 0
    for key, tensor in delta.items():
        require(isinstance(key, str) and key and SEP not in key,
                f"delta key {key!r}: must be a non-empty string without {SEP!r} (reserved for codec suffixes)")
        require(isinstance(tensor, torch.Tensor), f"delta[{key}]: must be a torch.Tensor, got {type(tensor).__name__}")
        t = tensor.detach().cpu()
        dtype = _np_dtype_name(t)
        require(dtype in ALLOWED_DTYPES, f"delta[{key}]: dtype {dtype} cannot be sent; allowed: {', '.join(ALLOWED_DTYPES)}")
        raw += t.numel() * t.element_size()
        is_float = dtype in FLOAT_DTYPES
        if is_float:
            require(bool(torch.isfinite(t).all()), f"delta[{key}]: contains NaN or inf; refusing to send it")
        if codec == "none" or not is_float:
            arrays[key] = _array(t.contiguous().numpy())
            continue
        original = t.to(torch.float64)
        if codec == "fp16":
            q = t.to(torch.float16)
            require(bool(torch.isfinite(q).all()),
                    f"delta[{key}]: values exceed the float16 range (|x| > 65504); use codec int8 or none")
            arrays[key + FP16_SUFFIX] = _array(q.numpy())
            decoded = q.to(torch.float32)
        else:  # int8, per-tensor symmetric
            amax = float(t.abs().max()) if t.numel() else 0.0
            scale = torch.tensor([amax / INT8_MAX], dtype=torch.float32)
            if float(scale) > 0:
                q = torch.round(t.to(torch.float32) / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
            else:
                q = torch.zeros_like(t, dtype=torch.int8)
            arrays[key + INT8_SUFFIX] = _array(q.numpy())
            arrays[key + SCALE_SUFFIX] = _array(scale.numpy())
            decoded = q.to(torch.float32) * scale
        if t.numel():
            max_err = max(max_err, float((decoded.to(torch.float64) - original).abs().max()))
    record = ArrayRecord(arrays)
    total = record_bytes(record)
    tensor_bytes = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays.values())
    info = EncodeInfo(bytes=total, max_abs_error=max_err, codec=codec, tensor_bytes=tensor_bytes,
                      header_bytes=total - tensor_bytes, num_arrays=len(arrays), raw_bytes=raw)
    return record, info


def _read(key: str, array) -> np.ndarray:
    """Deserialize one Array, checking stype, dtype and that metadata matches the data."""
    require(isinstance(array, Array), f"payload[{key}]: not a flwr Array ({type(array).__name__})")
    require(array.stype == STYPE, f"payload[{key}]: unknown serialization {array.stype!r}; allowed: {STYPE}")
    require(array.dtype in ALLOWED_DTYPES, f"payload[{key}]: unknown dtype {array.dtype!r}; allowed: {', '.join(ALLOWED_DTYPES)}")
    try:
        value = array.numpy()
    except Exception as exc:  # np.load raises ValueError/EOFError/OSError on corrupt bytes
        raise UsageError(f"payload[{key}]: unreadable array data ({type(exc).__name__}: {exc})") from None
    require(str(value.dtype) == array.dtype,
            f"payload[{key}]: data has dtype {value.dtype}, metadata says {array.dtype}")
    require(tuple(value.shape) == tuple(array.shape),
            f"payload[{key}]: data has shape {tuple(value.shape)}, metadata says {tuple(array.shape)}")
    return value


def _shape_ok(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or int(e) == s for s, e in zip(shape, expected))


def decode(record: ArrayRecord | Mapping[str, Array],
           expected: Mapping[str, tuple] | None = None) -> Delta:
    """Rebuild the delta from `record`, validating it (UsageError on anything wrong).

    `expected` maps each key the delta must hold to its shape (a dimension given as None matches
    any size, e.g. `(None,)` for TaskEdge values whose count varies); missing or extra keys and
    other shapes are rejected."""
    require(isinstance(record, Mapping), f"payload: must be an ArrayRecord, got {type(record).__name__}")
    require(len(record) > 0, "payload: empty record")
    out: Delta = {}
    scales_used: set[str] = set()
    for wire_key, array in record.items():
        require(isinstance(wire_key, str) and wire_key != "", f"payload key {wire_key!r}: must be a non-empty string")
        if wire_key.endswith(SCALE_SUFFIX):
            continue  # read together with its int8 array
        base, sep, suffix = wire_key.partition(SEP)
        require(base != "", f"payload key {wire_key!r}: empty tensor name")
        if sep and SEP + suffix not in (FP16_SUFFIX, INT8_SUFFIX):
            raise UsageError(f"payload[{wire_key}]: unknown codec {suffix!r}; allowed suffixes: "
                             f"{FP16_SUFFIX}, {INT8_SUFFIX} (+ {SCALE_SUFFIX})")
        require(base not in out, f"payload[{base}]: sent twice (under more than one codec)")
        value = _read(wire_key, array)
        if not sep:
            tensor = torch.from_numpy(value.copy())
        elif SEP + suffix == FP16_SUFFIX:
            require(value.dtype == np.float16, f"payload[{wire_key}]: fp16 codec needs dtype float16, got {value.dtype}")
            tensor = torch.from_numpy(value.astype(np.float32))
        else:
            require(value.dtype == np.int8, f"payload[{wire_key}]: int8 codec needs dtype int8, got {value.dtype}")
            scale_key = base + SCALE_SUFFIX
            require(scale_key in record, f"payload[{wire_key}]: int8 data without its scale array {scale_key!r}")
            scale = _read(scale_key, record[scale_key])
            require(scale.dtype == np.float32 and scale.shape == (1,),
                    f"payload[{scale_key}]: must be float32 with shape (1,), got {scale.dtype} {scale.shape}")
            s = float(scale[0])
            require(math.isfinite(s) and s >= 0, f"payload[{scale_key}]: scale must be finite and >= 0, got {s}")
            scales_used.add(scale_key)
            tensor = torch.from_numpy(value.astype(np.float32)) * torch.tensor(s, dtype=torch.float32)
        if tensor.is_floating_point():
            require(bool(torch.isfinite(tensor).all()), f"payload[{base}]: contains NaN or inf")
        out[base] = tensor
    orphans = [k for k in record if k.endswith(SCALE_SUFFIX) and k not in scales_used]
    require(not orphans, f"payload[{orphans[0] if orphans else ''}]: scale array without int8 data")
    if expected is not None:
        missing = [k for k in expected if k not in out]
        extra = [k for k in out if k not in expected]
        require(not missing, f"payload: missing {len(missing)} expected key(s), e.g. {missing[:3]}")
        require(not extra, f"payload: {len(extra)} unexpected key(s), e.g. {extra[:3]}")
        for key, shape in expected.items():
            got = tuple(out[key].shape)
            require(_shape_ok(got, tuple(shape)), f"payload[{key}]: shape {got}, expected {tuple(shape)}")
    return out


def expected_shapes(delta: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """The `expected` argument for `decode` built from a reference delta (e.g. the global adapter)."""
    return {k: tuple(v.shape) for k, v in delta.items()}


def npy_header_bytes(shape: tuple, dtype: str) -> int:
    """Size of the .npy header `np.save` writes for an array of this shape/dtype (format 1.0)."""
    import io

    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return len(buffer.getvalue())
