"""Fleet-level answers from a run's logs: what it reached, and what reaching it cost.

Inputs are the records of rounds.jsonl (`round`, `accuracy`, `sim_clock_s`: the virtual clock at
the round's end) and clients.jsonl (`round`, `status`, `energy_j`, `bytes_up`, `bytes_down`), as
lists of dicts. The rules:

- Round 0 counts. Its accuracy is the pre-trained model's before any federated round, and its
  clients (the shared-mask calibration, where there is one) spent real energy and bytes: a run
  whose round 0 already meets the target reached it at round 0, for what round 0 cost.
- A round's accuracy is measured after it aggregated, so the cost of reaching the target covers
  every client record of the rounds up to AND INCLUDING the first round whose accuracy >= target,
  whatever their status (wasted work is still spent); its time is that round's `sim_clock_s`.
- A round whose accuracy is null (not evaluated) cannot reach the target.
- A missing or null `energy_j` or byte count adds nothing (a client that died before reporting).
- Wasted work: the energy and bytes (up + down) of client records with a status in WASTED, over all
  rounds. `over_budget` is included: such a client downloaded the model, then could not train.
  `unavailable` clients spend nothing and `ok` ones are useful, so neither is counted.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from fedpeft.errors import require

DEFAULT_TARGET_SHARE = 0.95  # of the best accuracy the run reached
WASTED = ("straggler", "dropped_out", "failed", "rejected", "over_budget")
_TOLERANCE = 1e-12  # 0.95 x best is rounded in floating point; a round at exactly that reaches it


def _value(record: dict, key: str, where: str) -> float:
    value = record.get(key)
    if value is None:
        return 0.0
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0,
            f"{where}.{key}: must be a finite number >= 0, got {value!r}")
    return float(value)


def _round_of(record: dict, where: str) -> int:
    n = record.get("round")
    require(isinstance(n, int) and not isinstance(n, bool) and n >= 0,
            f"{where}.round: must be an integer >= 0, got {n!r}")
    return n


def _evaluated(rounds: Sequence[dict]) -> list[tuple[int, float, dict]]:
    """(round, accuracy, record) of the rounds with an accuracy, in round order."""
    out = []
    for i, rec in enumerate(rounds):
        n, acc = _round_of(rec, f"rounds[{i}]"), rec.get("accuracy")
        if acc is not None:
            require(isinstance(acc, (int, float)) and not isinstance(acc, bool) and 0.0 <= acc <= 1.0,
                    f"rounds[{i}].accuracy: must be a number in [0, 1] or null, got {acc!r}")
            out.append((n, float(acc), rec))
    return sorted(out, key=lambda item: item[0])


def target_for(rounds: Sequence[dict], target_accuracy: float | None = None) -> float | None:
    """`target_accuracy` if given (a fraction in (0, 1]), else 95% of the best accuracy any round
    reached; None when no round has an accuracy."""
    if target_accuracy is not None:
        require(isinstance(target_accuracy, (int, float)) and not isinstance(target_accuracy, bool)
                and 0.0 < target_accuracy <= 1.0, f"target_accuracy: must be in (0, 1], got {target_accuracy!r}")
        return float(target_accuracy)
    evaluated = _evaluated(rounds)
    return DEFAULT_TARGET_SHARE * max(acc for _, acc, _ in evaluated) if evaluated else None


def costs(clients: Sequence[dict], up_to_round: int | None = None) -> dict:
    """Energy (J) and bytes (up + down) of every client record of rounds <= `up_to_round` (all if None)."""
    energy, n_bytes = 0.0, 0
    for i, rec in enumerate(clients):
        where = f"clients[{i}]"
        if up_to_round is None or _round_of(rec, where) <= up_to_round:
            energy += _value(rec, "energy_j", where)
            n_bytes += int(_value(rec, "bytes_up", where) + _value(rec, "bytes_down", where))
    return {"energy_j": energy, "bytes": n_bytes}


def to_accuracy(rounds: Sequence[dict], clients: Sequence[dict], target: float | None) -> dict | None:
    """What reaching `target` took: {"round", "sim_time_s", "energy_j", "bytes"} at the first round
    whose accuracy >= target, or None when no round reached it (or target is None)."""
    if target is None:
        return None
    for n, acc, rec in _evaluated(rounds):
        if acc >= target - _TOLERANCE:
            require(rec.get("sim_clock_s") is not None,
                    f"rounds.jsonl round {n}: sim_clock_s: missing; a run logged before the virtual clock has no time")
            return {"round": n, "sim_time_s": _value(rec, "sim_clock_s", f"round {n}"), **costs(clients, n)}
    return None


def wasted_work(clients: Sequence[dict]) -> dict:
    """Energy and bytes of the client records whose status is in WASTED: totals, and by status
    ({"energy_j", "bytes", "clients"} each, every WASTED status present, zero where none)."""
    by_status = {s: {"energy_j": 0.0, "bytes": 0, "clients": 0} for s in WASTED}
    for i, rec in enumerate(clients):
        status = rec.get("status")
        if status in by_status:
            part = costs([rec])
            row = by_status[status]
            row["energy_j"] += part["energy_j"]
            row["bytes"] += part["bytes"]
            row["clients"] += 1
    return {"energy_j": sum(r["energy_j"] for r in by_status.values()),
            "bytes": sum(r["bytes"] for r in by_status.values()),
            "clients": sum(r["clients"] for r in by_status.values()), "by_status": by_status}


def fleet_answers(rounds: Sequence[dict], clients: Sequence[dict], target_accuracy: float | None = None) -> dict:
    """The run's fleet-level answers: final and best accuracy, the target, the simulated time,
    energy and bytes of the whole run, what reaching the target took (None if never), wasted work."""
    evaluated = _evaluated(rounds)
    target = target_for(rounds, target_accuracy)
    clocks = [(_round_of(r, f"rounds[{i}]"), r.get("sim_clock_s")) for i, r in enumerate(rounds)]
    last_clock = max(clocks, key=lambda c: c[0])[1] if clocks else None
    return {
        "final_accuracy": evaluated[-1][1] if evaluated else None,
        "best_accuracy": max((acc for _, acc, _ in evaluated), default=None),
        "target_accuracy": target,
        "sim_time_s": last_clock,
        **costs(clients),
        "to_target": to_accuracy(rounds, clients, target),
        "wasted": wasted_work(clients),
    }
