"""AdapterFedAvg: Flower's FedAvg over adapter deltas instead of whole models.

Only what the method trains crosses the wire. Replies are validated against the global adapter's
keys and shapes before they are aggregated (a bad payload is rejected, never fatal), every
client's costs go to the run log as they arrive, and aggregation is method-aware: weighted FedAvg,
LoRA fedit / ffa / exact, TaskEdge's per-entry average, FedBN.
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterable

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
from strategies.aggregation import aggregate, fedavg, lora_pairs

STATUSES = ("ok", "over_budget", "unavailable", "failed", "rejected")


def expected_shapes(cfg: RunConfig, global_delta: dict) -> dict | None:
    """Keys and shapes a client's delta must have; None marks a dimension that may vary."""
    if cfg.method == "taskedge":
        return {k: (None,) if k.endswith((".values", ".indices")) else tuple(v.shape) for k, v in global_delta.items()}
    shapes = {k: tuple(v.shape) for k, v in global_delta.items()}
    if cfg.method in ("lora", "dora") and cfg.lora_mode == "exact":
        for a_key, b_key in lora_pairs(global_delta).items():  # ranks may differ between clients
            shapes[a_key] = (None,) + shapes[a_key][1:]
            shapes[b_key] = shapes[b_key][:1] + (None,) + shapes[b_key][2:]
    if cfg.fedbn:
        return None  # BN keys stay on the devices; aggregation checks the rest
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
    return rec


class AdapterFedAvg(FedAvg):
    def __init__(self, cfg: RunConfig, log: RunLog, global_delta: dict, template: dict, **kwargs):
        """`global_delta`: the adapter state sent in round 1; `template`: a delta of this method,
        whose keys and shapes every reply must match."""
        # fraction_evaluate stays at its default: configure_evaluate below sends nothing anyway, and 0.0 makes
        # Flower log a warning every run.
        super().__init__(min_available_nodes=cfg.per_round, min_train_nodes=cfg.per_round, **kwargs)
        self.cfg = cfg
        self.log = log
        self.global_delta = global_delta
        self.expected = expected_shapes(cfg, template)
        self.round_stats: dict[int, dict] = {}

    def summary(self) -> None:  # Flower logs this at start; our run log has the config
        pass

    # -- training --------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, self.cfg.per_round)
        # Flower's sampling is unseeded; re-draw from the sorted ids so a seed repeats the run.
        node_ids = sorted(random.Random(self.cfg.seed * 7919 + server_round).sample(sorted(node_ids), self.cfg.per_round))
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in node_ids]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        counts = dict.fromkeys(STATUSES, 0)
        deltas, weights = [], []
        bytes_up = bytes_down = 0
        for msg in replies:
            if msg.has_error():
                rec = {"round": server_round, "client_id": None, "node_id": int(msg.metadata.src_node_id),
                       "status": "failed", "error": msg.error.reason.strip().splitlines()[-1][:500] if msg.error.reason else "failed"}
                counts["failed"] += 1
                self.log.client(rec)
                continue
            try:
                rec = client_record(msg)
            except (KeyError, TypeError, ValueError) as exc:
                rec = {"round": server_round, "client_id": None, "node_id": int(msg.metadata.src_node_id),
                       "status": "rejected", "error": f"malformed reply: {exc}"}
                counts["rejected"] += 1
                self.log.client(rec)
                continue
            if rec["status"] == "ok" and rec["method"] == self.cfg.method:
                try:
                    deltas.append(decode(msg.content["arrays"], expected=self.expected))
                    weights.append(max(rec["examples"], 1))
                except UsageError as exc:
                    rec.update(status="rejected", error=f"payload: {exc}")
            rec["aggregated"] = rec["status"] == "ok" and rec["method"] == self.cfg.method
            counts[rec["status"]] += 1
            bytes_up += rec["bytes_up"]
            bytes_down += rec["bytes_down"]
            self.log.client(rec)

        new_global = self._aggregate(deltas, weights) if deltas else None
        if new_global is not None:
            self.global_delta = new_global
        self.round_stats[server_round] = {
            "clients_sampled": len(replies), **{f"clients_{s}": n for s, n in counts.items()},
            "bytes_up": bytes_up, "bytes_down": bytes_down,
        }
        if new_global is None:
            return None, None
        record, _ = encode(self.global_delta)
        return record, MetricRecord({"clients-aggregated": len(deltas)})

    def _aggregate(self, deltas: list[dict], weights: list[float]) -> dict:
        cfg = self.cfg
        if cfg.method == "taskedge":
            averaged = aggregate(cfg.method, None, deltas, weights)
            return merge_sparse(self.global_delta, averaged)
        if cfg.method == "taskedge_lora":
            # Clients adopt the mask the server sent in round 1, so all share one mask: average the
            # LoRA pairs and the head; fedavg refuses indices that differ between clients.
            return fedavg(deltas, weights)
        kwargs = {}
        if cfg.method in ("lora", "dora"):
            if cfg.lora_mode == "exact":
                kwargs = {"ranks_out": cfg.rank, "lora_alpha": cfg.alpha}
            elif cfg.lora_mode == "ffa":
                kwargs = {"global_state": self.global_delta}
        mode = cfg.lora_mode if cfg.method in ("lora", "dora") else None
        merged = aggregate(cfg.method, mode, deltas, weights, fedbn=cfg.fedbn, **kwargs)
        if cfg.fedbn:  # BN stays local: keep the global copy's BN keys as they were
            merged = {**{k: v for k, v in self.global_delta.items() if k not in merged}, **merged}
        return merged

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
        out[key], out[base + ".values"] = idx[order], val[order]
    return out
