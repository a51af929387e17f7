"""The virtual clock: how long each client-round takes in simulated time, and how a round settles.

A client-round runs three phases back to back on the clock: download the global adapter, train
`steps` local steps, upload the delta. Each phase's nominal time comes from fedpeft.devices (the
same formulas as the cost log); a REDS compute fraction (< 1: the device lends only part of its
FLOP/s this round) stretches the compute phase (a step's time: the roofline of its FLOPs and memory traffic where
the profile's traffic is known, see fedpeft.devices.compute_time_s), and a jitter factor stretches all three phases
(the device or its link is slower this round). Energy stays power_w x busy seconds.

`settle_round` is what the server waits for. Per sampled client, in this order:

- no availability window open at the round's start: `unavailable` (downloads nothing, costs nothing);
- its window closes before it finishes, and before the deadline cut it: `dropped_out` at the
  window's end; the work done until then is spent (bytes of a cut transfer pro rata);
- it finishes after the deadline: policy `drop` makes it a `straggler` (it still does, and pays
  for, all its work; the server ignores the result); policy `partial` instead trains only the
  steps that fit (`steps_within`), and is a `straggler` (download spent, nothing else) if none fits;
- with over-selection (`keep_first` = K), only the first K `ok` clients to finish are accepted;
  the later ones are `straggler`s (ties broken by client id);
- a client that reported another status itself (over_budget, failed, rejected) keeps it unless it
  was unavailable or dropped out; it is never accepted.

The server waits until it knows every reachable client's fate (finished, dropped out, gave up, or
replied with its own status), stops early once K are accepted, and never waits past the deadline:
`duration_s` is the slowest accepted client's finish (or a later drop-out), or the deadline when
someone was cut by it. Everything here is pure: the same inputs give the same outcome.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from fedpeft.devices import Device, comm_time_s, compute_time_s, energy_j
from fedpeft.errors import choice, require

POLICIES = ("drop", "partial")
#: statuses settle_round gives; a plan's own status (over_budget, failed, rejected) passes through
STATUSES = ("ok", "straggler", "dropped_out", "unavailable")
_EPS = 1e-9  # float slack in time comparisons: a client finishing exactly at the deadline is on time


class WindowLike(Protocol):
    """An availability window on the clock, [start_s, end_s) (fedpeft.fleet.traces.Window)."""

    start_s: float
    end_s: float


@dataclass(frozen=True)
class ClientTiming:
    """Simulated seconds of one client-round's phases, in the order they run."""

    download_s: float
    compute_s: float
    upload_s: float
    steps: int

    @property
    def comm_s(self) -> float:
        return self.download_s + self.upload_s

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s

    @property
    def step_s(self) -> float:
        """Compute seconds of one local step (0 when there are no steps)."""
        return self.compute_s / self.steps if self.steps else 0.0

    def with_steps(self, steps: int) -> "ClientTiming":
        """The same round training only `steps` steps (the payload, hence upload time, is unchanged)."""
        return replace(self, compute_s=self.step_s * steps, steps=steps)


def client_timing(device: Device, flops_per_step: float, steps: int, bytes_down: float, bytes_up: float, *,
                  compute_fraction: float = 1.0, jitter: float = 1.0,
                  traffic_per_step: Mapping | None = None) -> ClientTiming:
    """Phases of one client-round on `device`: download and upload over its link rates, `steps` x
    one step's compute time over `compute_fraction`; every phase x `jitter`. A step's compute time
    is fedpeft.devices.compute_time_s: the roofline of `flops_per_step` and the step's memory
    traffic (the profile's `traffic`) where both it and the device's bandwidth are known, else
    flops_per_step / flops_per_s."""
    require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0,
            f"steps: must be an integer >= 0, got {steps!r}")
    for name, value in (("flops_per_step", flops_per_step), ("bytes_down", bytes_down), ("bytes_up", bytes_up)):
        require(_finite(value) and value >= 0, f"{name}: must be a finite number >= 0, got {value!r}")
    require(_finite(compute_fraction) and 0 < compute_fraction <= 1,
            f"compute_fraction: must be in (0, 1], got {compute_fraction!r}")
    require(_finite(jitter) and jitter > 0, f"jitter: must be a finite number > 0, got {jitter!r}")
    return ClientTiming(download_s=comm_time_s(device, 0, bytes_down) * jitter,
                        compute_s=_compute_s(device, flops_per_step, steps, traffic_per_step) / compute_fraction * jitter,
                        upload_s=comm_time_s(device, bytes_up, 0) * jitter, steps=steps)


def _compute_s(device: Device, flops_per_step: float, steps: int, traffic_per_step: Mapping | None) -> float:
    if traffic_per_step:  # the roofline is per step: one step's time x steps
        return compute_time_s(device, flops_per_step, traffic_per_step) * steps
    return compute_time_s(device, flops_per_step * steps)


def jitter_factor(seed: int, client_id: int, server_round: int, sigma: float) -> float:
    """A seeded lognormal slowdown factor with MEAN one (median exp(-sigma^2/2) < 1), so the
    catalog's sustained rates stay the long-run average. sigma = 0 gives exactly 1.0."""
    require(_finite(sigma) and sigma >= 0, f"jitter_sigma: must be a finite number >= 0, got {sigma!r}")
    if sigma == 0:
        return 1.0
    # A string seed is hashed with SHA-512 by random.Random: the same on every machine and run.
    return random.Random(f"jitter:{seed}:{client_id}:{server_round}").lognormvariate(-sigma * sigma / 2, sigma)


def steps_within(deadline_s: float, timing: ClientTiming) -> int:
    """How many of `timing.steps` local steps fit, with the download before and the upload after,
    in `deadline_s` seconds from the round's start (0 when not even the transfers fit)."""
    require(_finite(deadline_s) and deadline_s >= 0, f"deadline_s: must be a finite number >= 0, got {deadline_s!r}")
    spare = deadline_s - timing.comm_s
    if spare < -_EPS:
        return 0
    if timing.step_s == 0:
        return timing.steps
    return max(0, min(timing.steps, math.floor(spare / timing.step_s + _EPS)))


@dataclass(frozen=True)
class ClientPlan:
    """One sampled client as the server settles it: its device (for energy), its full timing, the
    bytes its transfers carry, and the status it reported itself ("ok" for a normal reply)."""

    client_id: int
    device: Device
    timing: ClientTiming
    bytes_down: int
    bytes_up: int
    status: str = "ok"


def plan_from_record(rec: dict, device: Device, *, compute_fraction: float = 1.0, jitter: float = 1.0) -> ClientPlan:
    """The plan of a clients.jsonl line (strategies.adapter_fedavg.client_record): FLOPs per step as
    the client reports them (`flops_per_step`), else its round FLOPs over the steps it trained;
    steps: `steps_planned` where a client that cut its steps for the deadline logs it (so settling
    marks it `partial`), else `steps`; bytes; status; the step's memory traffic where the line
    carries it (`traffic_per_step`, set by the server from its own profile). A line without steps
    or FLOPs (a client that died) plans no compute."""
    trained = int(rec.get("steps") or 0)
    steps = int(rec.get("steps_planned") or trained)
    total_flops = float((rec.get("flops") or {}).get("total") or 0)
    per_step = float(rec.get("flops_per_step") or (total_flops / trained if trained else 0.0))
    timing = client_timing(device, per_step, steps, rec.get("bytes_down") or 0,
                           rec.get("bytes_up") or 0, compute_fraction=compute_fraction, jitter=jitter,
                           traffic_per_step=rec.get("traffic_per_step") if per_step else None)
    return ClientPlan(int(rec["client_id"]), device, timing, int(rec.get("bytes_down") or 0),
                      int(rec.get("bytes_up") or 0), str(rec.get("status") or "ok"))


@dataclass(frozen=True)
class ClientOutcome:
    """What a client-round did on the clock: when it started and stopped, the steps it trained, the
    seconds, bytes and energy it spent (all spent work, wasted or not), and whether the round keeps it."""

    client_id: int
    status: str
    accepted: bool
    start_s: float
    finish_s: float  # when it stopped: its upload's end, or the moment it dropped out or gave up
    steps: int
    partial: bool  # trained fewer steps than planned to meet the deadline
    download_s: float
    compute_s: float
    upload_s: float
    bytes_down: int
    bytes_up: int
    energy_j: float

    def log_fields(self) -> dict:
        """The clients.jsonl fields the virtual clock sets (they replace the reply's own values)."""
        return {"status": self.status, "sim_start_s": self.start_s, "sim_finish_s": self.finish_s,
                "steps": self.steps, "partial": self.partial, "compute_s": self.compute_s,
                "comm_s": self.download_s + self.upload_s,
                "device_time_s": self.download_s + self.compute_s + self.upload_s,
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up, "energy_j": self.energy_j}


@dataclass(frozen=True)
class RoundOutcome:
    start_s: float
    duration_s: float
    clients: tuple[ClientOutcome, ...]  # in the order of the plans

    @property
    def end_s(self) -> float:
        """The clock when the round closes: the next round's start_s."""
        return self.start_s + self.duration_s

    @property
    def accepted(self) -> list[int]:
        return [c.client_id for c in self.clients if c.accepted]

    def by_client(self) -> dict[int, ClientOutcome]:
        return {c.client_id: c for c in self.clients}

    def log_fields(self) -> dict:
        """The rounds.jsonl fields: this round's simulated seconds and the clock at its end."""
        return {"sim_time_s": self.duration_s, "sim_clock_s": self.end_s}


def settle_round(start_s: float, clients: Sequence[ClientPlan], deadline_s: float | None = None,
                 policy: str = "drop", keep_first: int | None = None,
                 windows: Mapping[int, WindowLike | None] | None = None) -> RoundOutcome:
    """Settle one round that starts at `start_s` on the clock (rules in the module docstring).

    `deadline_s`: seconds after the start; None or 0: no deadline. `keep_first`: over-selection's K
    (None or 0: keep every client that makes it). `windows`: each client's availability window open
    at `start_s` (traces.available_at), None for a client unreachable then; a client missing from
    the mapping, or `windows=None`, is always available."""
    require(_finite(start_s) and start_s >= 0, f"start_s: must be a finite number >= 0, got {start_s!r}")
    require(deadline_s is None or (_finite(deadline_s) and deadline_s >= 0),
            f"round_deadline_s: must be a number >= 0 (0: none), got {deadline_s!r}")
    choice("straggler_policy", policy, POLICIES)
    require(keep_first is None or (isinstance(keep_first, int) and keep_first >= 0),
            f"over_selection: K must be an integer >= 0 (0: off), got {keep_first!r}")
    ids = [p.client_id for p in clients]
    require(len(set(ids)) == len(ids), f"clients: each client may be planned once, got ids {ids}")
    cutoff = start_s + deadline_s if deadline_s else math.inf
    windows = windows or {}
    outcomes = [_settle_client(start_s, p, cutoff, policy, windows.get(p.client_id, _ALWAYS)) for p in clients]

    end = start_s
    for o in outcomes:  # the server waits to hear from every client that was reachable ...
        if o.status != "unavailable":
            end = max(end, o.finish_s)
    end = min(end, cutoff)  # ... but not past the deadline
    if keep_first:
        on_time = sorted((o for o in outcomes if o.accepted), key=lambda o: (o.finish_s, o.client_id))
        if len(on_time) >= keep_first:
            end = on_time[keep_first - 1].finish_s  # the K-th result is in: the round closes
            late = {o.client_id for o in on_time[keep_first:]}
            outcomes = [replace(o, status="straggler", accepted=False) if o.client_id in late else o
                        for o in outcomes]
    return RoundOutcome(start_s=start_s, duration_s=end - start_s, clients=tuple(outcomes))


class _Always:
    """The window of a client without a trace: open from the clock's start, never closing."""

    start_s = 0.0
    end_s = math.inf


_ALWAYS = _Always()


def _settle_client(start_s: float, plan: ClientPlan, cutoff: float, policy: str,
                   window: WindowLike | None) -> ClientOutcome:
    timing = plan.timing
    if window is None or not (window.start_s <= start_s + _EPS and start_s < window.end_s):
        return ClientOutcome(plan.client_id, "unavailable", False, start_s, start_s, 0, False,
                             0.0, 0.0, 0.0, 0, 0, 0.0)
    status, work, bytes_up = plan.status, timing, plan.bytes_up
    if status == "ok" and start_s + timing.total_s > cutoff + _EPS:
        status = "straggler"  # policy drop: it still does, and pays for, all its work
        if policy == "partial":
            steps = steps_within(cutoff - start_s, timing)
            if steps > 0 or timing.steps == 0:
                status, work = "ok", timing.with_steps(steps)
            else:  # not one step fits: it gives up once it has the model
                work, bytes_up = ClientTiming(timing.download_s, 0.0, 0.0, 0), 0
    stop = start_s + work.total_s
    gone = window.end_s if window.end_s < stop - _EPS else math.inf  # its window closes before it is done
    if gone < math.inf and gone <= cutoff + _EPS:  # ... and before the deadline could cut it
        status = "dropped_out"
    busy_s = min(stop, gone) - start_s  # a straggler whose window closes after the deadline stops then too
    left, spent = busy_s, []
    for phase_s in (work.download_s, work.compute_s, work.upload_s):  # the phases run in this order
        spent.append(min(phase_s, max(left, 0.0)))
        left -= phase_s
    down_s, compute_s, up_s = spent
    steps = work.steps if compute_s >= work.compute_s - _EPS else math.floor(compute_s / work.step_s + _EPS)
    return ClientOutcome(
        client_id=plan.client_id, status=status, accepted=status == "ok", start_s=start_s,
        finish_s=start_s + busy_s, steps=steps, partial=work.steps < timing.steps,
        download_s=down_s, compute_s=compute_s, upload_s=up_s,
        bytes_down=_pro_rata(plan.bytes_down, down_s, work.download_s),
        bytes_up=_pro_rata(bytes_up, up_s, work.upload_s),
        energy_j=energy_j(plan.device, compute_s, down_s + up_s))


def _pro_rata(total_bytes: int, done_s: float, phase_s: float) -> int:
    """Bytes a transfer of `phase_s` seconds has carried after `done_s` of them."""
    if done_s >= phase_s - _EPS:
        return int(total_bytes)
    return int(total_bytes * done_s / phase_s)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
