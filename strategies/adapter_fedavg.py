"""AdapterFedAvg: Flower's FedAvg over adapter deltas instead of whole models.

Only what the method trains crosses the wire. Every reply is validated (strategies/validation.py:
keys, shapes, dtypes, finite values and metrics, a credible example count) and screened by its
update's norm (strategies/robust.py) before it can touch the global state; a bad one is logged
`rejected` with its reason, never fatal. Aggregation is method-aware: weighted FedAvg, LoRA
fedit / ffa / exact, TaskEdge's per-entry average or shared mask, FedBN; or coordinate-wise median
/ trimmed mean. The round loop itself (roll call, timeouts, checkpoints) is strategies/run_loop.py.
"""
from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft.errors import UsageError, require
from fedpeft.fleet.config import WEIGHT_SPACE_METHODS, RunConfig
from fedpeft.fleet.runlog import RunLog
from fedpeft.payload import decode, encode, record_bytes
from fedpeft.profiling.memory import CATEGORIES
from fedpeft.methods.galore_upload import expand_upload
from strategies.aggregation import aggregate, fedavg, lora_pairs, taskedge_average
from strategies.mixed import MixedFleet
from strategies.robust import coordinate_median, screen, trimmed_mean
from strategies.validation import check_dtypes, check_examples, check_finite, check_metrics

#: statuses a clients.jsonl line can have; a client itself reports only CLIENT_STATUSES, the rest are
#: the server's (unavailable, straggler and dropped_out come from the virtual clock)
STATUSES = ("ok", "over_budget", "unavailable", "failed", "rejected", "straggler", "dropped_out")
CLIENT_STATUSES = ("ok", "over_budget", "failed")


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
        "error": info["error"] or None, "flops_per_step": int(m.get("flops_per_step", 0)),
    }
    for key in ("steps_planned", "galore_dense_weights"):  # present only where they apply
        if key in m:
            rec[key] = int(m[key])
    for key in ("worker_node", "train_device"):  # where it ran: the Ray node (host/node id), the torch device
        if key in info:
            rec[key] = str(info[key])[:200]
    for key in ("density_realised", "density_requested"):  # TaskEdge: its mask's share of the masked weights
        if key in m:
            rec[key] = float(m[key])
    if "predicted_s" in m:  # method=auto with a deadline: the round time its setting was chosen by
        rec["predicted_s"] = float(m["predicted_s"])
    if "start" in info:  # a mixed run: did the client start from the form the server sent?
        rec["start"] = str(info["start"])
    if rec["status"] not in CLIENT_STATUSES:
        raise ValueError(f"status: a client may report {', '.join(CLIENT_STATUSES)}, got {rec['status']!r}")
    return rec


class AdapterFedAvg(FedAvg):
    def __init__(self, cfg: RunConfig, log: RunLog, global_delta: dict, template: dict,
                 numels: dict[str, int] | None = None, examples_cap: Callable[[int], int | None] | None = None,
                 clock=None, **kwargs):
        """`global_delta`: the adapter state sent in round 1; `template`: an upload of this method
        (`aggregation.client_upload`), whose keys, shapes and dtypes every reply must match; `numels`:
        TaskEdge's {"<layer>.weight": weight.numel()}, to range-check uploaded indices; `examples_cap`:
        the most examples a client may claim (its partition size x local epochs); `clock`: the virtual
        clock (strategies/virtual_clock.FleetClock; None: none, every sampled client is asked)."""
        # fraction_evaluate stays at its default: configure_evaluate below sends nothing anyway, and 0.0 makes
        # Flower log a warning every run.
        super().__init__(min_available_nodes=cfg.per_round, min_train_nodes=cfg.per_round, **kwargs)
        self.cfg = cfg
        self.log = log
        self.global_delta = global_delta
        self.template = template
        self.expected = expected_shapes(cfg, template)
        self.numels = numels
        self.examples_cap = examples_cap or (lambda client_id: None)
        self.round_stats: dict[int, dict] = {}
        self.known_nodes: dict[int, dict] = {}  # node id -> client id and device (the roll call, then replies)
        self.sent_bytes: dict[int, int] = {}  # node id -> bytes of what this round sent it
        self.clock = clock
        self.unavailable: list[dict] = []  # this round's sampled clients the clock found unreachable
        self.clock_fields: dict = {}  # this round's sim_time_s and sim_clock_s, once settled
        # mixed-method runs (strategies/mixed.py): the weight-space state once clients mix methods, and
        # predict(client id, conditions) -> the (method, rank) a client will pick (None: never mixes)
        self.mixed: MixedFleet | None = None
        self.predict: Callable[[int, dict], tuple[str, int]] | None = None

    def summary(self) -> None:  # Flower logs this at start; our run log has the config
        pass

    # -- sampling and replies ----------------------------------------------------------------------
    def sample(self, nodes: Iterable[int], server_round: int) -> list[int]:
        """This round's clients: a seeded draw of client ids (node ids are random in a simulation),
        so a seed repeats the run; nodes the roll call did not identify are drawn by node id."""
        nodes = sorted(nodes)
        by_client = {info["client_id"]: n for n, info in self.known_nodes.items()
                     if n in nodes and info.get("client_id") is not None}
        keys = sorted(by_client) + [("node", n) for n in nodes if n not in by_client.values()]
        k = min(self.cfg.sample_size, len(keys))
        picked = random.Random(self.cfg.seed * 7919 + server_round).sample(keys, k)
        return sorted(by_client[key] if key in by_client else key[1] for key in picked)

    def unreported(self, node_id: int, server_round: int, status: str, error: str) -> dict:
        """The line of a reply that says nothing usable about itself: who it was comes from what the
        server knows of the node (the roll call), never from the reply."""
        return {"round": server_round, "client_id": None, "device": None,
                **self.known_nodes.get(node_id, {}), "node_id": node_id, "status": status,
                "error": error, "bytes_up": 0, "bytes_down": self.sent_bytes.get(node_id, 0)}

    def record(self, msg: Message, server_round: int) -> dict:
        """The run-log line of one reply, checked: a reply that is an error (the client process died)
        or is malformed still gets a line, with the client and device the server knows for its node."""
        node_id = int(msg.metadata.src_node_id)
        if msg.has_error():
            reason = msg.error.reason.strip().splitlines()[-1][:500] if msg.error.reason else "failed"
            return self.unreported(node_id, server_round, "failed", reason)
        try:
            check_metrics(dict(msg.content["metrics"]))  # first: a NaN or inf would break the parsing below
            rec = client_record(msg)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # UsageError is a ValueError
            return self.unreported(node_id, server_round, "rejected", f"malformed reply: {exc}")
        known = self.known_nodes.get(node_id)
        try:
            require(known is None or known["client_id"] == rec["client_id"],
                    f"client_id: node {node_id} is client {known and known['client_id']}, the reply claims {rec['client_id']}")
            cap = self.examples_cap(rec["client_id"])
            rec["examples"] = check_examples(rec["examples"], cap)
            for key in ("steps", "steps_planned"):  # a step takes at least one example: the clock's input is bounded
                require(cap is None or rec.get(key, 0) <= cap,
                        f"{key}: {rec.get(key)} steps cannot come from the client's {cap} examples")
        except UsageError as exc:
            rec.update(status="rejected", error=str(exc), **(known or {}))
        if known is None:
            self.known_nodes[node_id] = {"client_id": rec["client_id"], "device": rec["device"]}
        # Bytes as the server saw them: what came up, and no more than what went down.
        arrays = msg.content.array_records.get("arrays")
        rec["bytes_up"] = record_bytes(arrays) if arrays is not None else 0
        rec["bytes_down"] = min(rec["bytes_down"], self.sent_bytes.get(node_id, rec["bytes_down"]))
        return rec

    def decode_delta(self, payload: ArrayRecord, rec: dict | None = None) -> dict:
        """A client's upload, validated: keys, shapes and dtypes, and what decoding cannot see, TaskEdge
        entries (lengths, duplicate or out-of-range indices); in a mixed run, against the method the
        reply `rec` names, as its dense change. Raises UsageError."""
        if self.mixed is not None:
            return self.mixed.decode(payload, rec or {})
        if self.cfg.factored_galore and self.cfg.method == "galore":  # factors stand in for some weights
            delta = expand_upload(decode(payload), self.global_delta, self.expected)
        else:
            delta = decode(payload, expected=self.expected)
        check_dtypes(delta, self.template)
        if self.cfg.method == "taskedge" and not self.cfg.shares_mask:
            taskedge_average([delta], [1.0], numels=self.numels)
        return delta

    def reachable(self, nodes: list[int], server_round: int) -> dict[int, dict]:
        """{node: its `sim-*` conditions} of the sampled nodes the virtual clock finds reachable; the
        others get an `unavailable` line and no message (they download nothing, cost nothing)."""
        self.unavailable = []
        if self.clock is None:
            return {n: {} for n in nodes}
        self.clock.begin_round()
        out = {}
        for n in nodes:
            client_id = self.known_nodes.get(n, {}).get("client_id")
            cond = self.clock.conditions(client_id, server_round) if client_id is not None else None
            if client_id is not None and cond is None:
                self.unavailable.append({**self.unreported(n, server_round, "unavailable", None), "bytes_down": 0})
            else:
                out[n] = cond.to_config() if cond is not None else {}
        return out

    def collect(self, server_round: int, replies: Iterable[Message], decode_payload: Callable[[ArrayRecord], dict],
                wanted: Callable[[dict], bool] = lambda rec: True, on_clock: bool = False) -> list[tuple[dict, dict | None]]:
        """(line, payload) of every reply, then this round's `unavailable` lines; with `on_clock`, the
        virtual clock settles the round first (stragglers and drop-outs are never decoded). payload is
        None unless the line is `ok`, `wanted` and its payload decodes and validates (a bad one is
        marked `rejected` with the reason)."""
        replies = list(replies)
        lines = [self.record(msg, server_round) for msg in replies]
        # Replies arrive in whatever order Ray finishes them. In that order the aggregation's float
        # sums would differ run to run (fft's final accuracy moved by 2 test images between two runs
        # of one seed); in client order a run is a function of its seed.
        order = sorted(range(len(lines)), key=lambda i: (lines[i].get("client_id") is None,
                                                        lines[i].get("client_id") or 0, lines[i].get("node_id") or 0))
        replies, lines = [replies[i] for i in order], [lines[i] for i in order] + self.unavailable
        if on_clock and self.clock is not None:
            self.clock_fields = self.clock.settle(lines)
        out = []
        for rec, msg in zip(lines, replies + [None] * len(self.unavailable)):
            payload = None
            if msg is not None and rec["status"] == "ok" and wanted(rec):
                try:
                    require("arrays" in msg.content.array_records, "reply has no arrays record")
                    payload = decode_payload(msg.content.array_records["arrays"], rec)
                except UsageError as exc:
                    rec.update(status="rejected", error=f"payload: {exc}")
            rec["aggregated"] = False
            out.append((rec, payload))
        return out

    def write_lines(self, server_round: int, lines: list[dict], missing: Iterable[int] = ()) -> None:
        """Log every reply's line (and a `failed` line for each node that did not answer in time) and
        the round's counts and bytes."""
        lines = lines + [self.unreported(n, server_round, "failed", f"no reply within {self.cfg.round_timeout_s:g} s "
                                         "(round_timeout_s)") for n in missing]
        counts = dict.fromkeys(STATUSES, 0)
        for rec in lines:
            counts[rec["status"]] += 1
            self.log.client(rec)
        self.round_stats[server_round] = {"clients_sampled": len(lines), **{f"clients_{s}": n for s, n in counts.items()},
                                          "bytes_up": sum(r["bytes_up"] for r in lines),
                                          "bytes_down": sum(r["bytes_down"] for r in lines),
                                          **self.clock_fields}
        self.clock_fields = {}

    # -- shared-mask TaskEdge: calibration before round 1 -----------------------------------------
    def calibration_messages(self, nodes: Iterable[int]) -> list[Message]:
        """Round 0's query to the sampled clients that are reachable at the clock's start."""
        config = ConfigRecord({"server-round": 0, "phase": "calibrate"})
        return [Message(content=RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n)
                for n in self.reachable(self.sample(nodes, 0), 0)]

    def calibration_sums(self, replies: Iterable[Message], expected: dict[str, tuple],
                         missing: Iterable[int] = ()) -> dict | None:
        """Sum this round-0 sample's activation statistics (None if nobody answered)."""
        sums: dict | None = None
        lines = self.collect(0, replies, lambda payload, _rec: decode(payload, expected=expected))
        for rec, part in lines:
            if part is not None:
                sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
                rec["aggregated"] = True
        self.write_lines(0, [rec for rec, _ in lines], missing)
        return sums

    # -- training --------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        nodes = self.reachable(self.sample(grid.get_node_ids(), server_round), server_round)
        payloads = self.payloads(nodes, arrays)
        self.sent_bytes = {n: record_bytes(record) for n, (record, _) in payloads.items()}
        return [Message(content=RecordDict({"arrays": payloads[n][0],
                                            "config": ConfigRecord({**config, **conditions, **payloads[n][1]})}),
                        message_type=MessageType.TRAIN, dst_node_id=n) for n, conditions in nodes.items()]

    def payloads(self, nodes: dict[int, dict], arrays: ArrayRecord) -> dict[int, tuple[ArrayRecord, dict]]:
        """(record, extra config) per node: the global adapter for all, or in a mixed run each node
        the state in the form of the setting it will pick (nothing for a node whose client is
        unknown or will pick a method without a weight-space form: it starts fresh)."""
        forms = self.predicted_forms(nodes)
        if self.mixed is None:
            return {n: (arrays, {}) for n in nodes}
        self.mixed.begin_round()
        return {n: (self.mixed.form(forms[n])[1], {"form-method": forms[n][0], "form-rank": forms[n][1]})
                if n in forms else (ArrayRecord(), {}) for n in nodes}

    def predicted_forms(self, nodes: dict[int, dict]) -> dict[int, tuple[str, int]]:
        """Each known node's predicted (method, rank), for methods with a weight-space form; the
        first time one differs from the run's method, the run turns mixed: its global adapter
        becomes the weight-space state."""
        if self.predict is None:
            return {}
        ids = {n: self.known_nodes.get(n, {}).get("client_id") for n in nodes}
        forms = {n: self.predict(cid, nodes[n]) for n, cid in ids.items() if cid is not None}
        forms = {n: f for n, f in forms.items() if f[0] in WEIGHT_SPACE_METHODS}
        if self.mixed is None and any(method != self.cfg.method for method, _ in forms.values()):
            self.mixed = MixedFleet.from_global(self.cfg, self.global_delta)
            self.global_delta = self.mixed.dense
        return forms

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        missing: Iterable[int] = ()) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, screen and aggregate; whatever fails, the previous global adapter stays and the
        round's line says why."""
        self.clock_fields = {}
        mixed = self.mixed is not None
        lines = self.collect(server_round, replies, self.decode_delta, on_clock=True,
                             wanted=lambda rec: rec["method"] in WEIGHT_SPACE_METHODS if mixed else rec["method"] == self.cfg.method)
        live = []
        for rec, delta in lines:
            if delta is not None and rec["examples"] == 0:
                rec["error"] = "reported 0 examples: weight 0"
            elif delta is not None:
                live.append((rec, delta))
        new_global, record, error = None, None, None
        try:
            uploads, rejected, norms = self._screen(live)
            for i, (rec, _) in enumerate(live):
                rec["update_norm"] = norms[i]
                if i in rejected:
                    rec.update(status="rejected", error=rejected[i])
            kept = [rec for i, (rec, _) in enumerate(live) if i not in rejected]
            if uploads and mixed:  # weight space: each tensor over the clients that changed it
                new_global = self.mixed.aggregate(uploads, [rec["examples"] for rec in kept])
                check_finite(new_global)
                self.mixed.commit(new_global)
                record = ArrayRecord()  # the next round sends each client its own form
            elif uploads:
                new_global = self._aggregate(uploads, [rec["examples"] for rec in kept])
                check_finite(new_global)
                check_dtypes({k: v for k, v in new_global.items() if k in self.template}, self.template)
                record, _ = encode(new_global)
            for rec in kept if uploads else []:
                rec["aggregated"] = True
        except Exception as exc:  # noqa: BLE001  (never fatal: keep the previous global state)
            new_global, record = None, None
            error = f"aggregation failed, global adapter unchanged: {type(exc).__name__}: {exc}"[:500]
            print(f"round {server_round}: {error}", file=sys.stderr)
        self.write_lines(server_round, [rec for rec, _ in lines], missing)
        if error:
            self.round_stats[server_round]["error"] = error
        if new_global is None:
            return None, None
        self.global_delta = new_global
        return record, MetricRecord({"clients-aggregated": sum(rec["aggregated"] for rec, _ in lines)})

    def _screen(self, live: list[tuple[dict, dict]]) -> tuple[list[dict], dict[int, str], list[float]]:
        """Norm screening (strategies/robust.screen). In a mixed run each method's updates are
        screened among themselves: a BN+H update (BatchNorm statistics) and a LoRA one are not
        comparable in size."""
        groups: dict[str, list[int]] = {}
        for i, (rec, _) in enumerate(live):
            groups.setdefault(rec["method"] if self.mixed is not None else "", []).append(i)
        screened, rejected, norms = [None] * len(live), {}, [0.0] * len(live)
        for members in groups.values():
            kept, out, group_norms = screen([live[i][1] for i in members], self.global_delta,
                                            reject_multiple=self.cfg.reject_norm_multiple, clip_norm=self.cfg.clip_norm,
                                            clip_median_multiple=self.cfg.clip_median_multiple)
            survivors = iter(kept)
            for j, i in enumerate(members):
                norms[i] = group_norms[j]
                if j in out:
                    rejected[i] = out[j]
                else:
                    screened[i] = next(survivors)
        return [u for u in screened if u is not None], rejected, norms

    def _aggregate(self, deltas: list[dict], weights: list[float]) -> dict:
        cfg = self.cfg
        indices = {k: v for k, v in self.global_delta.items() if k.endswith(".indices")} if cfg.shares_mask else {}
        if cfg.aggregator == "median":  # config validation allows these only for same-shape uploads
            return {**indices, **coordinate_median(deltas)}
        if cfg.aggregator == "trimmed_mean":
            return {**indices, **trimmed_mean(deltas, cfg.trim_fraction)}
        if cfg.shares_mask:
            # One mask for every client: values (or LoRA pairs) and head average entry by entry; the
            # mask itself stays on the server and goes back down with the values.
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
