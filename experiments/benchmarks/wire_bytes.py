"""Bytes Flower puts on the wire for a LoRA upload, per codec, against fedpeft's targets.

    .venv/bin/python experiments/benchmarks/wire_bytes.py [--models mobilenet_v2 resnet18] [--rank 4]
                                                          [--out runs/benchmarks/wire_bytes.json]

For each model: build it (random init, no pre-training: byte counts do not depend on the weights),
attach fedpeft's LoRA (default rank 4, head trained), take the delta and add small noise to every
tensor, so it looks like a trained upload (LoRA B is no longer zero). Encode it with each codec and
count:

  * wire: `fedpeft.payload.record_bytes`, the bytes of the distinct Flower objects (ArrayRecord,
    Arrays, ArrayChunks: `len(deflate())`, deduplicated by object id) Flower pushes for the record;
  * pushed: the same record inside a real Message, registered with Flower's InMemoryObjectStore and
    pushed with flwr's push_objects, as a ServerApp does: the record's share must equal `wire`, the
    whole message (with a config record and the RecordDict/Message objects) is printed too;
  * legacy: the layout fedpeft used before (one .npy Array per tensor, `K@fp16` / `K@int8` plus one
    `K@int8_scale` Array per int8 tensor): its real wire bytes, and how far they exceed the count it
    reported (the sum of the .npy files).

Targets (fp32 raw = numel x 4 of the delta): codec none <= 1.05x, fp16 <= 0.52x, int8 <= 0.27x.
Also printed: the round-1 downlink (the untrained adapter, LoRA B = 0) and what it costs for 10
clients (each SuperNode pulls its own message's objects: N x the record). Exits 1 if a target fails
or a Flower push does not match the count.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import fedpeft  # noqa: E402,F401  (torchvision shim first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import (  # noqa: E402
    get_all_nested_objects, get_object_tree, iterate_object_tree,
)
from flwr.supercore.inflatable.inflatable_utils import push_objects  # noqa: E402
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore  # noqa: E402

from fedpeft.methods import make_method  # noqa: E402
from fedpeft.models import build_model  # noqa: E402
from fedpeft.payload import decode, downlink_wire_bytes, encode, expected_shapes, record_bytes, wire_bytes  # noqa: E402

TARGETS = {"none": 1.05, "fp16": 0.52, "int8": 0.27}
CLIENTS = 10


def lora_delta(model_name: str, rank: int, num_classes: int) -> dict[str, torch.Tensor]:
    adapter = make_method("lora", rank=rank).attach(build_model(model_name, num_classes=num_classes))
    return adapter.delta()


def as_trained(delta: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in delta.items()}


def legacy_record(delta: dict[str, torch.Tensor], codec: str) -> ArrayRecord:
    """The previous layout: one .npy Array per tensor (+ one scale Array per int8 tensor)."""
    arrays = {}
    for key, t in delta.items():
        if codec == "none":
            arrays[key] = Array(t.numpy())
        elif codec == "fp16":
            arrays[key + "@fp16"] = Array(t.half().numpy())
        else:
            scale = torch.tensor([float(t.abs().max()) / 127], dtype=torch.float32)
            q = torch.round(t / scale).clamp(-127, 127).to(torch.int8) if float(scale) > 0 else torch.zeros_like(t, dtype=torch.int8)
            arrays[key + "@int8"] = Array(q.numpy())
            arrays[key + "@int8_scale"] = Array(scale.numpy())
    return ArrayRecord(arrays)


def flower_pushed(record: ArrayRecord) -> tuple[int, int]:
    """(bytes pushed for the record's objects, bytes pushed for the whole message) through Flower's
    object store registration and push_objects."""
    msg = Message(RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1})}),
                  metadata=Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=2, reply_to_message_id="",
                                    group_id="1", created_at=0.0, ttl=3600.0, message_type="train"))
    store = InMemoryObjectStore(verify=True)
    wanted = set(store.preregister(1, get_object_tree(msg)))
    sent: dict[str, int] = {}

    def push(object_id: str, content: bytes) -> None:
        store.put(object_id, content)
        sent[object_id] = sent.get(object_id, 0) + len(content)

    push_objects(get_all_nested_objects(msg), push, object_ids_to_push=wanted, keep_objects=True)
    tree = next(t for t in iterate_object_tree(get_object_tree(msg)) if t.object_id == record.object_id)
    return sum(sent.get(t.object_id, 0) for t in iterate_object_tree(tree)), sum(sent.values())


def measure(model_name: str, rank: int, num_classes: int) -> dict:
    fresh = lora_delta(model_name, rank, num_classes)
    delta = as_trained(fresh)
    raw = sum(t.numel() * t.element_size() for t in delta.values())
    row = {"model": model_name, "rank": rank, "tensors": len(delta), "raw_fp32_bytes": raw, "codecs": {}}
    for codec, target in TARGETS.items():
        record, info = encode(delta, codec)
        decoded = decode(record, expected_shapes(delta))
        assert all(decoded[k].shape == delta[k].shape for k in delta)
        pushed_record, pushed_message = flower_pushed(record)
        legacy = legacy_record(delta, codec)
        legacy_wire = wire_bytes(legacy)
        legacy_npy = sum(len(a.data) for a in legacy.values())
        row["codecs"][codec] = {
            "wire_bytes": info.bytes, "wire_over_raw": info.bytes / raw, "target": target,
            "ok": info.bytes / raw <= target, "tensor_bytes": info.tensor_bytes, "overhead_bytes": info.header_bytes,
            "arrays": info.num_arrays, "objects": info.num_objects, "max_abs_error": info.max_abs_error,
            "flower_pushed_record": pushed_record, "flower_pushed_message": pushed_message,
            "push_matches": pushed_record == info.bytes,
            "legacy_wire_bytes": legacy_wire, "legacy_wire_over_raw": legacy_wire / raw,
            "legacy_npy_count": legacy_npy, "legacy_wire_over_count": legacy_wire / legacy_npy - 1,
        }
    record, info = encode(fresh)
    legacy = legacy_record(fresh, "none")
    row["round1_downlink"] = {
        "zero_tensors": sum(1 for t in fresh.values() if not t.any()),
        "wire_bytes": record_bytes(record), "wire_over_raw": record_bytes(record) / raw,
        "legacy_wire_bytes": wire_bytes(legacy), "legacy_npy_count": sum(len(a.data) for a in legacy.values()),
        f"wire_bytes_{CLIENTS}_clients": downlink_wire_bytes(record, CLIENTS),
    }
    return row


def print_row(row: dict) -> None:
    print(f"\n{row['model']} LoRA r={row['rank']}: {row['tensors']} tensors, fp32 raw {row['raw_fp32_bytes']:,} B")
    print(f"  {'codec':<6} {'wire B':>9} {'wire/raw':>9} {'target':>7} {'':>4} {'objects':>7} {'pushed msg B':>12}"
          f" | {'legacy wire/raw':>15} {'legacy wire vs its count':>24}")
    for codec, c in row["codecs"].items():
        print(f"  {codec:<6} {c['wire_bytes']:>9,} {c['wire_over_raw']:>9.4f} {c['target']:>7.2f} "
              f"{'ok' if c['ok'] else 'FAIL':>4} {c['objects']:>7} {c['flower_pushed_message']:>12,}"
              f" | {c['legacy_wire_over_raw']:>15.4f} {c['legacy_wire_over_count']:>+23.1%}"
              + ("" if c["push_matches"] else "   PUSH MISMATCH"))
    d = row["round1_downlink"]
    print(f"  round-1 downlink (untrained, {d['zero_tensors']} zero tensors): {d['wire_bytes']:,} B "
          f"({d['wire_over_raw']:.3f}x raw; legacy layout {d['legacy_wire_bytes']:,} B on the wire, "
          f"{d['legacy_npy_count']:,} B counted); {CLIENTS} clients: {d[f'wire_bytes_{CLIENTS}_clients']:,} B")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (fedpeft's default: 4)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--out", default="runs/benchmarks/wire_bytes.json", help="JSON results file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(m, args.rank, args.num_classes) for m in args.models]
    for row in rows:
        print_row(row)
    ok = all(c["ok"] and c["push_matches"] for row in rows for c in row["codecs"].values())
    print(f"\nverdict: {'all targets met' if ok else 'TARGET MISSED'} (none <= {TARGETS['none']}x, "
          f"fp16 <= {TARGETS['fp16']}x, int8 <= {TARGETS['int8']}x fp32 raw)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta, "targets": TARGETS, "rows": rows, "ok": ok}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
