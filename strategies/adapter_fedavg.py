"""AdapterFedAvg: Flower's FedAvg over adapter deltas instead of whole models.

Only what the method trains crosses the wire. Replies are validated against the global adapter's
keys and shapes before they are aggregated (a bad payload is rejected, never fatal), every
client's costs go to the run log as they arrive, and aggregation is method-aware: weighted FedAvg,
LoRA fedit / ffa / exact, TaskEdge's per-entry average or shared mask, FedBN.
"""
from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedpeft.errors import UsageError
from fedpeft.fleet.config import RunConfig
from fedpeft.fleet.runlog import RunLog
from fedpeft.payload import decode, encode
from fedpeft.profiling.memory import CATEGORIES
from strategies.aggregation import aggregate, fedavg, lora_pairs, taskedge_average

STATUSES = ("ok", "over_budget", "unavailable", "failed", "rejected")


def expected_shapes(cfg: RunConfig, template: dict) -> dict:
    """Keys and shapes a client's upload must have; None marks a dimension that may vary.
    `template` is a delta of this method as the clients upload it (`aggregation.client_upload`)."""
    if cfg.method == "taskedge" and not cfg.shares_mask:  # every client its own mask: any length
        return {k: (None,) if k.endswith((".values", ".indices")) else tuple(v.shape) for k, v in template.items()}
    shapes = {k: tuple(v.shape) for k, v in template.items()}
    if cfg.method in ("lora", "dora") and cfg.lora_mode == "exact":
        for a_key, b_key in lora_pairs(template).items():  # ranks may differ between clients
            shapes[a_key] = (None,) + shapes[a_key][1:]
            shapes[b_key] = shapes[b_key][:1] + (None,) + shapes[b_key][2:]
    return shapes


def client_record(msg: Message) -> dict:
    """One clients.jsonl line from a reply's MetricRecord and ConfigRecord."""
    m = dict(msg.content["metrics"])
    info = dict(msg.content["info"])
    rec = {
        "round": int(m["round"]), "client_id": int(m["client_id"]), "node_id": int(msg.metadata.src_node_id),
        "device": info["device"], "method": info["method"], "rank": int(m["rank"]) or None,
        "batch_size": int(m["batch_size"]), "status": info["status"], "chosen": info["chosen"],
        "adapted": bool(info["adapted"]), "examples": int(m["examples"]), "steps": int(m["steps"]),
        "loss": m.get("loss"), "peak_memory_bytes": int(m.get("peak_memory_bytes", 0)),
        "memory_by_category": {c: int(m.get(f"mem.{c}", 0)) for c in CATEGORIES},
        "ram_budget_bytes": int(m["ram_budget_bytes"]),
        "flops": {k: int(m.get(f"flops.{k}", 0)) for k in ("forward", "backward", "optimizer", "total")},
        "bytes_up": int(m["bytes_up"]), "bytes_down": int(m["bytes_down"]),
        "upload_codec": info["upload_codec"], "quant_error": float(m.get("quant_error", 0.0)),
        "wall_s": float(m["wall_s"]), "compute_s": float(m["compute_s"]), "comm_s": float(m["comm_s"]),
        "device_time_s": float(m["device_time_s"]), "energy_j": float(m["energy_j"]),
        "error": info["error"] or None,
    }
    if rec["status"] not in STATUSES:
        raise ValueError(f"unknown status {rec['status']!r}")
    return rec


class AdapterFedAvg(FedAvg):
    def __init__(self, cfg: RunConfig, log: RunLog, global_delta: dict, template: dict,
                 numels: dict[str, int] | None = None, **kwargs):
        """`global_delta`: the adapter state sent in round 1; `template`: an upload of this method
        (`aggregation.client_upload`), whose keys and shapes every reply must match; `numels`: TaskEdge's
        {"<layer>.weight": weight.numel()}, to range-check uploaded indices."""
        # fraction_evaluate stays at its default: configure_evaluate below sends nothing anyway, and 0.0 makes
        # Flower log a warning every run.
        super().__init__(min_available_nodes=cfg.per_round, min_train_nodes=cfg.per_round, **kwargs)
        self.cfg = cfg
        self.log = log
        self.global_delta = global_delta
        self.expected = expected_shapes(cfg, template)
        self.numels = numels
        self.round_stats: dict[int, dict] = {}
        self.known_nodes: dict[int, dict] = {}  # node id -> client id and device, for replies that carry neither

    def summary(self) -> None:  # Flower logs this at start; our run log has the config
        pass

    # -- sampling and replies ----------------------------------------------------------------------
    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """This round's clients: a seeded draw from every connected node, so a seed repeats the run."""
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, self.cfg.per_round)
        return sorted(random.Random(self.cfg.seed * 7919 + server_round).sample(sorted(all_nodes), self.cfg.per_round))

    def record(self, msg: Message, server_round: int) -> dict:
        """The run-log line of one reply. A reply that is an error (the client process died) or is
        malformed still gets a line, with the client and device when the node answered before."""
        node_id = int(msg.metadata.src_node_id)

        def unreported(status: str, error: str) -> dict:
            return {"round": server_round, **self.known_nodes.get(node_id, {"client_id": None}), "node_id": node_id,
                    "status": status, "error": error, "bytes_up": 0, "bytes_down": 0}

        if msg.has_error():
            return unreported("failed", msg.error.reason.strip().splitlines()[-1][:500] if msg.error.reason else "failed")
        try:
            rec = client_record(msg)
        except (KeyError, TypeError, ValueError) as exc:
            return unreported("rejected", f"malformed reply: {exc}")
        self.known_nodes[node_id] = {"client_id": rec["client_id"], "device": rec["device"]}
        return rec

    def decode_delta(self, payload: ArrayRecord) -> dict:
        """A client's upload, validated: keys and shapes, and what decoding cannot see, TaskEdge
        entries (lengths, duplicate or out-of-range indices). Raises UsageError."""
        delta = decode(payload, expected=self.expected)
        if self.cfg.method == "taskedge" and not self.cfg.shares_mask:
            taskedge_average([delta], [1.0], numels=self.numels)
        return delta

    def collect(self, server_round: int, replies: Iterable[Message], decode_payload: Callable[[ArrayRecord], dict],
                wanted: Callable[[dict], bool] = lambda rec: True) -> list[tuple[dict, dict]]:
        """Log one clients.jsonl line per reply and the round's counts and bytes; return (line, payload)
        of every `ok` reply that is `wanted` and whose payload decodes (a bad one is logged `rejected`)."""
        replies = list(replies)
        counts = dict.fromkeys(STATUSES, 0)
        accepted, bytes_up, bytes_down = [], 0, 0
        for msg in replies:
            rec = self.record(msg, server_round)
            if rec["status"] == "ok" and wanted(rec):
                try:
                    accepted.append((rec, decode_payload(msg.content["arrays"])))
                except UsageError as exc:
                    rec.update(status="rejected", error=f"payload: {exc}")
            rec["aggregated"] = rec["status"] == "ok" and wanted(rec)
            counts[rec["status"]] += 1
            bytes_up, bytes_down = bytes_up + rec["bytes_up"], bytes_down + rec["bytes_down"]
            self.log.client(rec)
        self.round_stats[server_round] = {"clients_sampled": len(replies), **{f"clients_{s}": n for s, n in counts.items()},
                                          "bytes_up": bytes_up, "bytes_down": bytes_down}
        return accepted

    # -- shared-mask TaskEdge: calibration before round 1 -----------------------------------------
    def calibrate(self, grid: Grid, expected: dict[str, tuple]) -> dict | None:
        """Ask this round-0 sample for activation statistics and sum them (None if nobody answered)."""
        self._round_start = time.perf_counter()
        config = ConfigRecord({"server-round": 0, "phase": "calibrate"})
        messages = [Message(content=RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n)
                    for n in self.sample(grid, 0)]
        sums: dict | None = None
        for _, part in self.collect(0, grid.send_and_receive(messages), lambda payload: decode(payload, expected=expected)):
            sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
        return sums

    # -- training --------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n)
                for n in self.sample(grid, server_round)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.collect(server_round, replies, self.decode_delta, wanted=lambda rec: rec["method"] == self.cfg.method)
        deltas = [delta for _, delta in accepted]
        weights = [max(rec["examples"], 1) for rec, _ in accepted]

        new_global, error = None, None
        if deltas:
            try:
                new_global = self._aggregate(deltas, weights)
            except (UsageError, RuntimeError, ValueError) as exc:  # never fatal: keep the previous global state
                error = f"aggregation failed, global adapter unchanged: {exc}"
                print(f"round {server_round}: {error}", file=sys.stderr)
        if new_global is not None:
            self.global_delta = new_global
        if error:
            self.round_stats[server_round]["error"] = error
        if new_global is None:
            return None, None
        record, _ = encode(self.global_delta)
        return record, MetricRecord({"clients-aggregated": len(deltas)})

    def _aggregate(self, deltas: list[dict], weights: list[float]) -> dict:
        cfg = self.cfg
        if cfg.shares_mask:
            # One mask for every client: values (or LoRA pairs) and head average entry by entry; the
            # mask itself stays on the server and goes back down with the values.
            indices = {k: v for k, v in self.global_delta.items() if k.endswith(".indices")}
            return {**indices, **fedavg(deltas, weights)}
        if cfg.method == "taskedge":
            averaged = aggregate(cfg.method, None, deltas, weights, numels=self.numels)
            return merge_sparse(self.global_delta, averaged)
        kwargs = {}
        if cfg.method in ("lora", "dora"):
            if cfg.lora_mode == "exact":
                kwargs = {"ranks_out": cfg.rank, "lora_alpha": cfg.alpha}
            elif cfg.lora_mode == "ffa":
                kwargs = {"global_state": self.global_delta}
        mode = cfg.lora_mode if cfg.method in ("lora", "dora") else None
        return aggregate(cfg.method, mode, deltas, weights, **kwargs)  # FedBN: uploads carry no BN keys

    # -- no client-side evaluation: the server evaluates the global adapter on a held-out set --
    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []


def merge_sparse(previous: dict, averaged: dict) -> dict:
    """TaskEdge's global state: entries trained this round take their new average; entries only
    earlier rounds trained keep their value (a round's average covers only its own clients)."""
    out = dict(averaged)
    for key in [k for k in previous if k.endswith(".indices")]:
        base = key[: -len(".indices")]
        if key not in averaged:
            out[key], out[base + ".values"] = previous[key], previous[base + ".values"]
            continue
        old_idx, old_val = previous[key].to(torch.int64), previous[base + ".values"]
        new_idx, new_val = averaged[key].to(torch.int64), averaged[base + ".values"]
        keep = ~torch.isin(old_idx, new_idx)
        idx = torch.cat([old_idx[keep], new_idx])
        val = torch.cat([old_val[keep].to(new_val.dtype), new_val])
        order = idx.argsort()
        out[key], out[base + ".values"] = idx[order].to(averaged[key].dtype), val[order]
    return out
