"""The server's virtual clock: who is reachable when a round starts, under what budget, and how the
round settles (fedpeft/fleet/clock.py has the timing rules, fedpeft/fleet/traces.py the windows).

Per round, at clock time `now_s`:

1. `conditions(client, round)`: a sampled client outside its availability window is not asked at
   all (logged `unavailable`, costs nothing); a reachable one is sent its current training RAM and
   compute fraction (the trace's, or the generated budget process's) and its seeded jitter factor,
   so it picks its setting under today's budget and, under `straggler_policy = partial`, trains
   only the steps that fit the deadline.
2. `settle(round, lines)`: once the replies are in, each client's simulated phases (download,
   compute, upload) are rebuilt from what it ran, and `settle_round` decides who made it: an `ok`
   client can become a `straggler` (deadline, or over-selection's first K) or `dropped_out` (its
   window closed). The clock advances by the round's simulated duration. When no sampled client was
   reachable, the clock skips to the next moment any client of the fleet is.

The compute time uses the server's own profile of the setting the client ran (model, method, rank,
batch), not FLOPs the client reports, so a client cannot make itself look fast. Real boards
(`flwr run` with `device=` in the node config) are always reachable with their catalog budget and
no jitter: their windows are the real world's, and their measured `wall_s` is logged beside the
clock's prediction. Round 0 (TaskEdge's shared-mask calibration) is not put on the clock.
"""
from __future__ import annotations

from dataclasses import dataclass

from fedpeft.devices import ClientSpec, Device, load_catalog
from fedpeft.fleet.clock import ClientPlan, ClientTiming, jitter_factor, plan_from_record, settle_round
from fedpeft.fleet.config import RunConfig
from fedpeft.fleet.traces import (Trace, Window, available_at, budget_at, dynamics_for, generate_trace, load_trace,
                                  next_opening)


@dataclass(frozen=True)
class Conditions:
    """A reachable client's conditions this round, as sent to it (`to_config`)."""

    window: Window | None  # None: not on a trace (always reachable)
    ram_train_bytes: int | None  # None: the client's own device budget
    compute_fraction: float
    jitter: float

    def to_config(self) -> dict:
        ram = {} if self.ram_train_bytes is None else {"sim-ram-train-bytes": int(self.ram_train_bytes)}
        return {**ram, "sim-compute-fraction": float(self.compute_fraction), "sim-jitter": float(self.jitter)}


class FleetClock:
    def __init__(self, cfg: RunConfig, fleet: list[ClientSpec], now_s: float = 0.0, flops_per_step=None,
                 traffic_per_step=None):
        """`flops_per_step(rec)`: the server's FLOPs of one step of the setting a line reports, None
        for a setting it will not profile (strategies.server_app.server_flops_per_step);
        `traffic_per_step(rec)`: that step's memory traffic, for the roofline (None: FLOPs only)."""
        self.cfg = cfg
        self.devices: dict[int, Device] = {spec.client_id: spec.device for spec in fleet}
        if cfg.trace == "off":
            self.trace: Trace | None = None
        else:
            self.trace = load_trace(cfg.trace, fleet) if cfg.trace else generate_trace(fleet, cfg.seed)
        self.now_s = now_s
        self.real: set[int] = set()  # clients on real boards: their own clock
        self.flops_per_step = flops_per_step  # None: the clients' own figures (tests, tools)
        self.traffic_per_step = traffic_per_step
        self.sent: dict[int, Conditions] = {}  # this round's conditions, by client id

    def identify(self, known_nodes: dict[int, dict]) -> None:
        """Take in the roll call: real boards, and the catalog device a board says it is."""
        catalog = None
        for info in known_nodes.values():
            cid = info.get("client_id")
            if info.get("clock") != "real" or cid is None:
                continue
            self.real.add(cid)
            if cid not in self.devices or self.devices[cid].name != info.get("device"):
                catalog = catalog or load_catalog()
                if info.get("device") in catalog:
                    self.devices[cid] = catalog[info["device"]]

    def conditions(self, client_id: int, server_round: int) -> Conditions | None:
        """The client's conditions at the clock's current time, or None when it is unreachable."""
        device = self.devices.get(client_id)
        if device is None:  # not a client of this fleet: no clock for it (its reply will be rejected)
            return Conditions(None, None, 1.0, 1.0)
        if client_id in self.real or self.trace is None:
            window, ram, fraction = None, device.ram_train_bytes, 1.0
        else:
            window = available_at(self.trace, client_id, self.now_s)
            if window is None:
                return None
            ram, fraction = budget_at(self.trace, client_id, self.now_s)
        jitter = 1.0
        if self.cfg.clock_jitter and client_id not in self.real:
            jitter = jitter_factor(self.cfg.seed, client_id, server_round, dynamics_for(device).jitter_sigma)
        cond = Conditions(window, ram, fraction, jitter)
        self.sent[client_id] = cond
        return cond

    def begin_round(self) -> None:
        self.sent = {}

    def _trusted(self, rec: dict) -> dict:
        """What the clock may take from a line: its steps with the server's FLOPs per step. A
        rejected line's claims are not used (only its download counts), and an `ok` line whose
        setting the server cannot profile is rejected (a run's budget walk never chooses it)."""
        if rec.get("status") == "rejected":
            return {k: rec[k] for k in ("client_id", "status", "bytes_down") if k in rec}
        if self.flops_per_step is None:
            return rec
        server_flops = self.flops_per_step(rec)
        if server_flops is None and rec.get("status") == "ok":
            rec.update(status="rejected", error=f"setting {rec.get('chosen') or rec.get('method')!r} is not one this "
                                                "run's budget walk can choose")
            return self._trusted(rec)
        traffic = self.traffic_per_step(rec) if self.traffic_per_step is not None and server_flops else None
        return {**rec, "flops_per_step": server_flops or 0.0, "traffic_per_step": traffic}

    def settle(self, lines: list[dict]) -> dict:
        """Settle the round's lines (replies, and the `unavailable` lines of clients not asked) in
        place: each line gets the clock's status, steps, times, bytes and energy. Returns the round's
        `sim_time_s` and `sim_clock_s`."""
        plans: list[ClientPlan] = []
        windows: dict[int, Window | None] = {}
        by_id: dict[int, dict] = {}
        for rec in lines:
            cid = rec.get("client_id")
            if cid is None or cid not in self.devices or cid in by_id:
                continue  # an unidentified node or a duplicate claim: not on the clock
            by_id[cid] = rec
            cond = self.sent.get(cid)
            if rec.get("status") == "unavailable" or cond is None:
                windows[cid] = None
                plans.append(ClientPlan(cid, self.devices[cid], ClientTiming(0.0, 0.0, 0.0, 0), 0, 0, "unavailable"))
                continue
            if cond.window is not None:
                windows[cid] = cond.window
            planned = self._trusted(rec)
            plans.append(plan_from_record(planned, self.devices[cid], compute_fraction=cond.compute_fraction,
                                          jitter=cond.jitter))
        keep_first = self.cfg.per_round if self.cfg.over_selection > 0 else None
        outcome = settle_round(self.now_s, plans, self.cfg.round_deadline_s or None, self.cfg.straggler_policy,
                               keep_first, windows)
        for client in outcome.clients:
            by_id[client.client_id].update(client.log_fields())
        end = outcome.end_s
        if self.trace is not None and plans and all(c.status == "unavailable" for c in outcome.clients):
            later = next_opening(self.trace, sorted(self.devices), self.now_s)  # the server waits for a check-in
            end = later if later is not None else end
        fields = {"sim_time_s": end - self.now_s, "sim_clock_s": end}
        self.now_s = end
        return fields
