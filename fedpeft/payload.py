"""Encode a delta (named tensors) into a Flower `ArrayRecord` and back, counting the bytes Flower sends.

How Flower 1.42 sends an ArrayRecord
------------------------------------
A Message travels as content-addressed objects (flwr.supercore.inflatable): Message -> RecordDict ->
ArrayRecord -> Array -> ArrayChunk. Each object deflates to `<type> <child ids> <body length>\\0<body>`
and its id is the SHA-256 of those bytes. For an ArrayRecord:

- the ArrayRecord object: the head lists every distinct Array id (64 hex + comma each), the body is
  JSON `{"key": "<64-hex Array id>", ...}` (so every key costs its name plus ~70 bytes);
- one Array object per distinct Array: head with its chunk ids, body JSON with dtype, shape, stype
  and chunk indices (~170 bytes);
- one ArrayChunk per distinct 5 MiB slice of `Array.data` (the .npy file here: 128-byte header +
  tensor bytes), plus a ~17-byte head.

The sender registers the object tree and pushes only the objects the receiver does not hold, each
once: identical objects (the same Array under two keys, equal chunks) cost nothing the second time.

What fedpeft counts: `wire_bytes(obj)` = the sum of `len(o.deflate())` over the distinct objects
(by object id) of `obj` and its descendants, computed with Flower's own deflate. For an ArrayRecord
that is exactly what Flower pushes for the record; `wire_bytes` also takes a whole Message or
RecordDict. Not counted: the RecordDict/Message objects around the record (~100-300 bytes plus the
config/metric records), the protobuf framing of each push/pull (the object id again, node/run/session
ids; the ObjectTree sent with the message, ~70 bytes per object), HTTP/gRPC and TLS framing.
`record_bytes(record)` (what bytes_up/bytes_down report) is `wire_bytes(record)`, except that an
empty record counts 0 (it is a 16-byte placeholder object: a reply with no payload sent nothing).

Flower's dedup is per message on the edge link: a SuperNode pulls every object of its message it
does not hold, and drops them once the message is delivered. So a downlink sent to N clients costs
N x `record_bytes(record)` on the edge links (`downlink_wire_bytes`), whatever the round; only the
ServerApp -> SuperLink push sends the objects shared by the N messages once.

Packed format (fedpeft's payload)
---------------------------------
Flower's per-Array cost (~360 bytes besides the .npy header) is why fedpeft does not send one Array
per tensor: a mobilenet_v2 LoRA delta has 72 tensors of ~4.8 kB. A payload holds instead:

- `@manifest`: uint8, the zlib-compressed JSON `{"v": 1, "codec": C, "tensors": [[key, shape,
  dtype, tag], ...]}` in delta order;
- `@<dtype>` (e.g. `@float32`, `@float16`, `@int8`, `@int64`): one 1-D array per wire dtype, the
  concatenation of the flattened tensors of that dtype in manifest order;
- `@int8_scales`: float32, one scale per `int8` entry in manifest order (codec int8 only).

Tags: `raw` (the tensor as is: every tensor under codec "none", integer/bool tensors under any
codec); `fp16` (codec "fp16": a floating tensor sent as float16); `int8` (codec "int8": q = round(x
/ s) clamped to [-127, 127], s = max|x| / 127, decoded as q * s); `zero` (a tensor whose bytes are
all zero, or an empty one: no data, decoded as zeros of `dtype`, e.g. LoRA B at initialisation).
All arrays are `numpy.ndarray` (np.save bytes, read with allow_pickle=False). Quantized entries
decode to float32 (fedpeft trains in fp32); codec "none" round-trips exactly. Delta keys must not
contain "@".

`decode` validates what a client sent so the server can reject a bad payload with a UsageError naming
the key instead of crashing: record keys, serialization type, dtypes, readable data, metadata
matching the data, the manifest (size-limited decompression, structure, unique keys, tags, dtypes),
data lengths matching the manifest exactly, one finite non-negative scale per int8 tensor (none
missing or orphaned), finite values, and optionally the expected keys and shapes (checked on the
manifest, before anything is materialised).
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects

from fedpeft.errors import UsageError, choice, require

Delta = dict[str, torch.Tensor]

CODECS = ("none", "fp16", "int8")
SEP = "@"
MANIFEST_KEY = SEP + "manifest"
SCALES_KEY = SEP + "int8_scales"
MANIFEST_VERSION = 1
TAGS = ("raw", "fp16", "int8", "zero")
STYPE = "numpy.ndarray"
FLOAT_DTYPES = ("float16", "float32", "float64")
INT_DTYPES = ("int8", "uint8", "int16", "int32", "int64", "bool")
ALLOWED_DTYPES = FLOAT_DTYPES + INT_DTYPES
DATA_KEYS = tuple(SEP + d for d in ALLOWED_DTYPES)
INT8_MAX = 127
MAX_MANIFEST_BYTES = 16 << 20  # decompressed JSON; a 10,000-tensor manifest is < 1 MiB
MAX_NUMEL = 1 << 28  # elements in a decoded delta (1 GiB in float32); bounds what `zero` entries allocate
MAX_NDIM = 32


@dataclass(frozen=True)
class EncodeInfo:
    """What `encode` produced. `bytes` = `record_bytes(record)` (wire bytes) = `tensor_bytes` (the tensor
    values as sent: numel x itemsize of the data arrays and the scales) + `header_bytes` (everything
    else Flower sends for the record: .npy headers, the manifest, object heads, Array metadata, keys)."""

    bytes: int
    max_abs_error: float
    codec: str = "none"
    tensor_bytes: int = 0
    header_bytes: int = 0
    num_arrays: int = 0  # Arrays in the record
    raw_bytes: int = 0  # numel x itemsize of the delta before encoding (for the compression ratio)
    num_objects: int = 0  # distinct Flower objects pushed for the record (ArrayRecord, Arrays, chunks)


def _as_inflatable(obj) -> InflatableObject:
    if isinstance(obj, InflatableObject):
        return obj
    require(isinstance(obj, Mapping), f"wire_bytes: needs an ArrayRecord, Message or RecordDict, got {type(obj).__name__}")
    return ArrayRecord(dict(obj))


def wire_objects(obj) -> dict[str, InflatableObject]:
    """The distinct Flower objects (by object id) that serialize `obj`: itself and its descendants."""
    return get_all_nested_objects(_as_inflatable(obj))


def wire_bytes(obj: ArrayRecord | Mapping[str, Array] | InflatableObject) -> int:
    """Bytes of the serialized objects Flower pushes for `obj` (an ArrayRecord, RecordDict or Message):
    sum of len(deflate()) over its distinct objects, as Flower deduplicates them."""
    return sum(len(o.deflate()) for o in wire_objects(obj).values())


def record_bytes(record: ArrayRecord | Mapping[str, Array]) -> int:
    """Wire bytes of a payload record (`wire_bytes`); 0 for an empty record (no payload sent)."""
    return wire_bytes(record) if len(record) else 0


def downlink_wire_bytes(record: ArrayRecord | Mapping[str, Array], num_clients: int) -> int:
    """Edge-link bytes when the same record goes to `num_clients` SuperNodes in one round: each node
    pulls its message's objects (deduplicated within the message only), so N x `record_bytes`."""
    require(isinstance(num_clients, int) and num_clients >= 0, f"num_clients: must be an integer >= 0, got {num_clients!r}")
    return num_clients * record_bytes(record)


def _np_dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _all_zero_bytes(value: np.ndarray) -> bool:
    return value.size == 0 or not value.reshape(-1).view(np.uint8).any()


def _pack_manifest(codec: str, entries: list[list]) -> Array:
    text = json.dumps({"v": MANIFEST_VERSION, "codec": codec, "tensors": entries}, separators=(",", ":"))
    return Array(np.frombuffer(zlib.compress(text.encode("utf-8"), 9), dtype=np.uint8))


def encode(delta: Mapping[str, torch.Tensor], codec: str = "none") -> tuple[ArrayRecord, EncodeInfo]:
    """Serialize `delta` into an ArrayRecord with `codec`; return it with its EncodeInfo.

    max_abs_error is max |decoded - original| over all entries (0.0 for codec none)."""
    choice("codec", codec, CODECS)
    require(isinstance(delta, Mapping) and len(delta) > 0, "delta: must be a non-empty dict of tensors")
    entries: list[list] = []
    groups: dict[str, list[np.ndarray]] = {}
    scales: list[float] = []
    max_err = 0.0
    raw = 0
    for key, tensor in delta.items():
        require(isinstance(key, str) and key and SEP not in key,
                f"delta key {key!r}: must be a non-empty string without {SEP!r} (reserved for the payload's own arrays)")
        require(isinstance(tensor, torch.Tensor), f"delta[{key}]: must be a torch.Tensor, got {type(tensor).__name__}")
        t = tensor.detach().cpu().contiguous()
        dtype = _np_dtype_name(t)
        require(dtype in ALLOWED_DTYPES, f"delta[{key}]: dtype {dtype} cannot be sent; allowed: {', '.join(ALLOWED_DTYPES)}")
        raw += t.numel() * t.element_size()
        shape = list(t.shape)
        is_float = dtype in FLOAT_DTYPES
        if is_float:
            require(bool(torch.isfinite(t).all()), f"delta[{key}]: contains NaN or inf; refusing to send it")
        quantized = is_float and codec != "none"
        value = t.numpy()
        if _all_zero_bytes(value):
            entries.append([key, shape, "float32" if quantized else dtype, "zero"])
            continue
        if not quantized:
            entries.append([key, shape, dtype, "raw"])
            groups.setdefault(dtype, []).append(value.reshape(-1))
            continue
        original = t.to(torch.float64)
        if codec == "fp16":
            q = t.to(torch.float16)
            require(bool(torch.isfinite(q).all()),
                    f"delta[{key}]: values exceed the float16 range (|x| > 65504); use codec int8 or none")
            entries.append([key, shape, "float16", "fp16"])
            groups.setdefault("float16", []).append(q.numpy().reshape(-1))
            decoded = q.to(torch.float32)
        else:  # int8, per-tensor symmetric
            scale = torch.tensor(float(t.abs().max()) / INT8_MAX, dtype=torch.float32)
            if float(scale) > 0:
                q = torch.round(t.to(torch.float32) / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
            else:  # only subnormal values: they quantize to zero
                q = torch.zeros_like(t, dtype=torch.int8)
            entries.append([key, shape, "int8", "int8"])
            groups.setdefault("int8", []).append(q.numpy().reshape(-1))
            scales.append(float(scale))
            decoded = q.to(torch.float32) * scale
        max_err = max(max_err, float((decoded.to(torch.float64) - original).abs().max()))
    arrays: dict[str, Array] = {MANIFEST_KEY: _pack_manifest(codec, entries)}
    tensor_bytes = 0
    for dtype, parts in groups.items():
        data = np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])
        arrays[SEP + dtype] = Array(data)
        tensor_bytes += data.nbytes
    if scales:
        scale_array = np.asarray(scales, dtype=np.float32)
        arrays[SCALES_KEY] = Array(scale_array)
        tensor_bytes += scale_array.nbytes
    record = ArrayRecord(arrays)
    objects = wire_objects(record)
    total = sum(len(o.deflate()) for o in objects.values())
    info = EncodeInfo(bytes=total, max_abs_error=max_err, codec=codec, tensor_bytes=tensor_bytes,
                      header_bytes=total - tensor_bytes, num_arrays=len(arrays), raw_bytes=raw,
                      num_objects=len(objects))
    return record, info


def _read(key: str, array, dtype: str | None = None) -> np.ndarray:
    """Deserialize one Array, checking stype, dtype (== `dtype` if given), 1-D, and metadata vs data."""
    require(isinstance(array, Array), f"payload[{key}]: not a flwr Array ({type(array).__name__})")
    require(array.stype == STYPE, f"payload[{key}]: unknown serialization {array.stype!r}; allowed: {STYPE}")
    require(array.dtype in ALLOWED_DTYPES, f"payload[{key}]: unknown dtype {array.dtype!r}; allowed: {', '.join(ALLOWED_DTYPES)}")
    if dtype is not None:
        require(array.dtype == dtype, f"payload[{key}]: dtype {array.dtype}, must be {dtype}")
    try:
        value = array.numpy()
    except Exception as exc:  # np.load raises ValueError/EOFError/OSError on corrupt bytes
        raise UsageError(f"payload[{key}]: unreadable array data ({type(exc).__name__}: {exc})") from None
    require(str(value.dtype) == array.dtype,
            f"payload[{key}]: data has dtype {value.dtype}, metadata says {array.dtype}")
    require(tuple(value.shape) == tuple(array.shape),
            f"payload[{key}]: data has shape {tuple(value.shape)}, metadata says {tuple(array.shape)}")
    require(value.ndim == 1, f"payload[{key}]: must be 1-D, got shape {tuple(value.shape)}")
    return value


def _manifest_entries(record: Mapping) -> tuple[str, list[tuple[str, tuple, str, str]]]:
    """(codec, [(key, shape, dtype, tag), ...]) from the record's manifest, validated."""
    require(MANIFEST_KEY in record, f"payload: no {MANIFEST_KEY!r} array (not a fedpeft payload, "
                                    f"keys: {sorted(record)[:5]})")
    blob = _read(MANIFEST_KEY, record[MANIFEST_KEY], "uint8").tobytes()
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(blob, MAX_MANIFEST_BYTES)
    except zlib.error as exc:
        raise UsageError(f"payload[{MANIFEST_KEY}]: unreadable (zlib: {exc})") from None
    require(not inflater.unconsumed_tail, f"payload[{MANIFEST_KEY}]: larger than {MAX_MANIFEST_BYTES} bytes decompressed")
    require(inflater.eof and not inflater.unused_data, f"payload[{MANIFEST_KEY}]: truncated or trailing bytes")
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"payload[{MANIFEST_KEY}]: not JSON ({type(exc).__name__}: {exc})") from None
    require(isinstance(manifest, dict) and set(manifest) == {"v", "codec", "tensors"},
            f"payload[{MANIFEST_KEY}]: must be an object with keys v, codec, tensors")
    require(manifest["v"] == MANIFEST_VERSION and type(manifest["v"]) is int,
            f"payload[{MANIFEST_KEY}]: unknown version {manifest['v']!r}; allowed: {MANIFEST_VERSION}")
    codec = manifest["codec"]
    require(isinstance(codec, str) and codec in CODECS,
            f"payload[{MANIFEST_KEY}]: unknown codec {codec!r}; allowed: {', '.join(CODECS)}")
    tensors = manifest["tensors"]
    require(isinstance(tensors, list) and tensors, f"payload[{MANIFEST_KEY}]: tensors must be a non-empty list")
    out, seen, numel = [], set(), 0
    for i, entry in enumerate(tensors):
        require(isinstance(entry, list) and len(entry) == 4, f"payload[{MANIFEST_KEY}]: entry {i} must be [key, shape, dtype, tag]")
        key, shape, dtype, tag = entry
        require(isinstance(key, str) and key != "" and SEP not in key,
                f"payload[{MANIFEST_KEY}]: entry {i}: tensor name {key!r} must be a non-empty string without {SEP!r}")
        require(key not in seen, f"payload[{key}]: sent twice")
        seen.add(key)
        require(isinstance(shape, list) and len(shape) <= MAX_NDIM and all(type(s) is int and s >= 0 for s in shape),
                f"payload[{key}]: shape must be a list of at most {MAX_NDIM} integers >= 0, got {shape!r}")
        require(isinstance(dtype, str) and dtype in ALLOWED_DTYPES,
                f"payload[{key}]: unknown dtype {dtype!r}; allowed: {', '.join(ALLOWED_DTYPES)}")
        require(isinstance(tag, str) and tag in TAGS, f"payload[{key}]: unknown codec tag {tag!r}; allowed: {', '.join(TAGS)}")
        if tag == "raw":
            require(codec == "none" or dtype in INT_DTYPES,
                    f"payload[{key}]: codec {codec} sends floating tensors quantized, not raw {dtype}")
        elif tag in ("fp16", "int8"):
            need = "float16" if tag == "fp16" else "int8"
            require(codec == tag, f"payload[{key}]: {tag} entry in a codec {codec} payload")
            require(dtype == need, f"payload[{key}]: {tag} codec needs dtype {need}, got {dtype}")
        numel += math.prod(shape)
        require(numel <= MAX_NUMEL, f"payload[{key}]: the delta exceeds {MAX_NUMEL} elements")
        out.append((key, tuple(shape), dtype, tag))
    return codec, out


def _shape_ok(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or int(e) == s for s, e in zip(shape, expected))


def _check_expected(entries: list[tuple[str, tuple, str, str]], expected: Mapping[str, tuple]) -> None:
    shapes = {key: shape for key, shape, _, _ in entries}
    missing = [k for k in expected if k not in shapes]
    extra = [k for k in shapes if k not in expected]
    require(not missing, f"payload: missing {len(missing)} expected key(s), e.g. {missing[:3]}")
    require(not extra, f"payload: {len(extra)} unexpected key(s), e.g. {extra[:3]}")
    for key, shape in expected.items():
        require(_shape_ok(shapes[key], tuple(shape)), f"payload[{key}]: shape {shapes[key]}, expected {tuple(shape)}")


def decode(record: ArrayRecord | Mapping[str, Array],
           expected: Mapping[str, tuple] | None = None) -> Delta:
    """Rebuild the delta from `record`, validating it (UsageError on anything wrong).

    `expected` maps each key the delta must hold to its shape (a dimension given as None matches
    any size, e.g. `(None,)` for TaskEdge values whose count varies); missing or extra keys and
    other shapes are rejected."""
    require(isinstance(record, Mapping), f"payload: must be an ArrayRecord, got {type(record).__name__}")
    require(len(record) > 0, "payload: empty record")
    for key in record:
        require(isinstance(key, str) and (key in (MANIFEST_KEY, SCALES_KEY) or key in DATA_KEYS),
                f"payload key {key!r}: unknown; a fedpeft payload holds {MANIFEST_KEY}, {SCALES_KEY} and "
                f"@<dtype> data arrays ({', '.join(DATA_KEYS)})")
    codec, entries = _manifest_entries(record)
    if expected is not None:
        _check_expected(entries, expected)
    needed: dict[str, int] = {}
    for _, shape, dtype, tag in entries:
        if tag != "zero":
            needed[SEP + dtype] = needed.get(SEP + dtype, 0) + math.prod(shape)
    for key in record:
        if key in DATA_KEYS:
            require(key in needed, f"payload[{key}]: data array not referenced by the manifest")
    data: dict[str, np.ndarray] = {}
    for key, count in needed.items():
        require(key in record, f"payload: missing data array {key!r} ({count} values in the manifest)")
        data[key] = _read(key, record[key], key[len(SEP):])
        require(data[key].size == count, f"payload[{key}]: holds {data[key].size} values, the manifest needs {count}")
    int8_keys = [key for key, _, _, tag in entries if tag == "int8"]
    scales = None
    if int8_keys:
        require(SCALES_KEY in record, f"payload[{int8_keys[0]}]: int8 data without its scale array {SCALES_KEY!r}")
        scales = _read(SCALES_KEY, record[SCALES_KEY], "float32")
        require(scales.size == len(int8_keys),
                f"payload[{SCALES_KEY}]: {scales.size} scales for {len(int8_keys)} int8 tensors")
        bad = np.flatnonzero(~(np.isfinite(scales) & (scales >= 0)))
        require(bad.size == 0, f"payload[{SCALES_KEY}]: scale of {int8_keys[int(bad[0])] if bad.size else ''} "
                               f"must be finite and >= 0, got {float(scales[bad[0]]) if bad.size else 0.0}")
    else:
        require(SCALES_KEY not in record, f"payload[{SCALES_KEY}]: scale array without int8 data")
    out: Delta = {}
    offsets = dict.fromkeys(data, 0)
    next_scale = 0
    for key, shape, dtype, tag in entries:
        if tag == "zero":
            out[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
            continue
        group = SEP + dtype
        start, offsets[group] = offsets[group], offsets[group] + math.prod(shape)
        value = data[group][start:offsets[group]].reshape(shape)
        if tag == "raw":
            tensor = torch.from_numpy(value.copy())
        elif tag == "fp16":
            tensor = torch.from_numpy(value.astype(np.float32))
        else:
            scale = torch.tensor(float(scales[next_scale]), dtype=torch.float32)
            next_scale += 1
            tensor = torch.from_numpy(value.astype(np.float32)) * scale
        if tensor.is_floating_point():
            require(bool(torch.isfinite(tensor).all()), f"payload[{key}]: contains NaN or inf")
        out[key] = tensor
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
