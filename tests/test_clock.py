"""The virtual clock (fedpeft/fleet/clock.py): timings and round settlement, against numbers worked
out by hand on a device with round rates (no model, no Flower)."""
import math
import statistics

import pytest

from fedpeft.devices import Device, device_time_s, energy_j, load_catalog
from fedpeft.errors import UsageError
from fedpeft.fleet.clock import (ClientPlan, ClientTiming, client_timing, jitter_factor, settle_round,
                                 steps_within)
from fedpeft.fleet.traces import Window

# 1 GFLOP/s; 2 MB/s down, 1 MB/s up (bits/s = bytes/s x 8); 2 W
DEV = Device(name="round_numbers", ram_train_bytes=10**9, flops_per_s=1e9, uplink_bps=8e6, downlink_bps=16e6,
             power_w=2.0, availability=1.0)


def plan(client_id: int, compute_steps: int, step_flops: float = 1e8, status: str = "ok") -> ClientPlan:
    """download 1 s (2 MB), compute_steps x 0.1 s, upload 1 s (1 MB)."""
    timing = client_timing(DEV, step_flops, compute_steps, bytes_down=2_000_000, bytes_up=1_000_000)
    return ClientPlan(client_id, DEV, timing, bytes_down=2_000_000, bytes_up=1_000_000, status=status)


def test_client_timing_by_hand():
    t = client_timing(DEV, 1e8, 10, bytes_down=2_000_000, bytes_up=1_000_000)
    assert (t.download_s, t.compute_s, t.upload_s, t.steps) == (1.0, 1.0, 1.0, 10)
    assert t.total_s == 3.0 and t.comm_s == 2.0 and t.step_s == pytest.approx(0.1)
    half = client_timing(DEV, 1e8, 10, 2_000_000, 1_000_000, compute_fraction=0.5)
    assert (half.download_s, half.compute_s, half.upload_s) == (1.0, 2.0, 1.0)  # only compute is shared
    slow = client_timing(DEV, 1e8, 10, 2_000_000, 1_000_000, jitter=1.5)
    assert (slow.download_s, slow.compute_s, slow.upload_s) == (1.5, 1.5, 1.5)  # jitter stretches every phase
    assert t.with_steps(4) == ClientTiming(1.0, pytest.approx(0.4), 1.0, 4)


def test_client_timing_matches_the_cost_log():
    pi = load_catalog()["raspberry_pi_4_4gb"]
    t = client_timing(pi, 3.3e9, 7, bytes_down=123_456, bytes_up=65_432)
    assert t.total_s == pytest.approx(device_time_s(pi, 3.3e9 * 7, 65_432, 123_456))


@pytest.mark.parametrize("kwargs, field", [
    ({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"), ({"flops_per_step": -1.0}, "flops_per_step"),
    ({"bytes_up": math.nan}, "bytes_up"), ({"compute_fraction": 0.0}, "compute_fraction"),
    ({"compute_fraction": 1.5}, "compute_fraction"), ({"jitter": 0.0}, "jitter"),
])
def test_client_timing_rejects_bad_input(kwargs, field):
    args = {"flops_per_step": 1e8, "steps": 10, "bytes_down": 1, "bytes_up": 1, **kwargs}
    with pytest.raises(UsageError, match=rf"^{field}: "):
        client_timing(DEV, args.pop("flops_per_step"), args.pop("steps"), args.pop("bytes_down"),
                      args.pop("bytes_up"), **args)


def test_jitter_factor_seeded_and_mean_one():
    assert jitter_factor(0, 3, 1, 0.0) == 1.0
    assert jitter_factor(7, 3, 1, 0.3) == jitter_factor(7, 3, 1, 0.3)
    assert len({jitter_factor(7, 3, r, 0.3) for r in range(5)}) == 5
    assert jitter_factor(7, 3, 1, 0.3) != jitter_factor(8, 3, 1, 0.3)
    draws = [jitter_factor(1, c, r, 0.3) for c in range(100) for r in range(100)]
    assert statistics.fmean(draws) == pytest.approx(1.0, abs=0.01)  # mean one, not median one
    assert statistics.median(draws) == pytest.approx(math.exp(-0.3 ** 2 / 2), abs=0.01)
    with pytest.raises(UsageError, match="^jitter_sigma: "):
        jitter_factor(0, 0, 0, -0.1)


def test_steps_within():
    t = client_timing(DEV, 1e8, 10, 2_000_000, 1_000_000)  # 1 s + 10 x 0.1 s + 1 s
    assert steps_within(2.5, t) == 5
    assert steps_within(2.3, t) == 3  # 0.3 s of compute: exactly 3 steps despite float rounding
    assert steps_within(3.0, t) == 10 and steps_within(100.0, t) == 10
    assert steps_within(2.0, t) == 0 and steps_within(1.9, t) == 0
    assert steps_within(5.0, t.with_steps(0)) == 0
    with pytest.raises(UsageError, match="^deadline_s: "):
        steps_within(-1.0, t)


def test_no_deadline_waits_for_the_slowest():
    out = settle_round(0.0, [plan(0, 10), plan(1, 30), plan(2, 20)])  # totals 3, 5, 4 s
    assert out.duration_s == pytest.approx(5.0) and out.end_s == pytest.approx(5.0)
    assert [c.status for c in out.clients] == ["ok", "ok", "ok"] and out.accepted == [0, 1, 2]
    c1 = out.by_client()[1]
    assert (c1.start_s, c1.finish_s, c1.steps, c1.partial) == (0.0, pytest.approx(5.0), 30, False)
    assert c1.energy_j == pytest.approx(2.0 * 5.0)  # 2 W x 5 busy seconds
    assert (c1.bytes_down, c1.bytes_up) == (2_000_000, 1_000_000)
    assert out.log_fields() == {"sim_time_s": pytest.approx(5.0), "sim_clock_s": pytest.approx(5.0)}


def test_deadline_drop_makes_a_straggler_that_still_pays():
    out = settle_round(100.0, [plan(0, 10), plan(1, 30)], deadline_s=4.0, policy="drop")
    assert out.duration_s == pytest.approx(4.0) and out.end_s == pytest.approx(104.0)  # the deadline
    ok, late = out.clients
    assert ok.status == "ok" and ok.finish_s == pytest.approx(103.0)
    assert late.status == "straggler" and not late.accepted
    assert late.finish_s == pytest.approx(105.0) and late.steps == 30
    assert late.energy_j == pytest.approx(10.0) and (late.bytes_down, late.bytes_up) == (2_000_000, 1_000_000)
    fields = late.log_fields()
    assert fields["status"] == "straggler" and fields["sim_start_s"] == 100.0
    assert fields["device_time_s"] == pytest.approx(5.0) and fields["comm_s"] == pytest.approx(2.0)


def test_deadline_partial_trains_what_fits():
    out = settle_round(0.0, [plan(0, 10), plan(1, 30)], deadline_s=4.0, policy="partial")
    short = out.by_client()[1]
    assert short.status == "ok" and short.accepted and short.partial
    assert short.steps == 20  # (4 s - 2 s of transfers) / 0.1 s
    assert short.finish_s == pytest.approx(4.0) and short.compute_s == pytest.approx(2.0)
    assert short.energy_j == pytest.approx(8.0)
    assert out.duration_s == pytest.approx(4.0)
    assert not out.by_client()[0].partial


def test_partial_gives_up_when_no_step_fits():
    out = settle_round(0.0, [plan(0, 10)], deadline_s=1.5, policy="partial")  # the transfers alone take 2 s
    c = out.clients[0]
    assert c.status == "straggler" and c.steps == 0 and c.partial
    assert (c.download_s, c.compute_s, c.upload_s) == (1.0, 0.0, 0.0)
    assert (c.bytes_down, c.bytes_up) == (2_000_000, 0) and c.energy_j == pytest.approx(2.0)
    assert c.finish_s == pytest.approx(1.0) and out.duration_s == pytest.approx(1.0)


def test_window_closing_mid_compute_drops_out():
    out = settle_round(0.0, [plan(0, 10), plan(1, 10)], windows={0: Window(0.0, 1.55), 1: Window(0.0, 50.0)})
    gone = out.by_client()[0]
    assert gone.status == "dropped_out" and not gone.accepted
    assert gone.finish_s == pytest.approx(1.55) and gone.steps == 5  # 0.55 s of compute: 5 whole steps
    assert gone.compute_s == pytest.approx(0.55) and gone.upload_s == 0.0
    assert (gone.bytes_down, gone.bytes_up) == (2_000_000, 0) and gone.energy_j == pytest.approx(3.1)
    assert out.accepted == [1]


def test_window_closing_mid_upload_carries_bytes_pro_rata():
    out = settle_round(10.0, [plan(0, 10)], windows={0: Window(5.0, 12.5)})
    c = out.clients[0]
    assert c.status == "dropped_out" and c.steps == 10
    assert c.upload_s == pytest.approx(0.5) and c.bytes_up == 500_000
    assert out.duration_s == pytest.approx(2.5)  # the server learns of it when it goes


def test_dropout_after_the_last_accepted_client_still_holds_the_round():
    out = settle_round(0.0, [plan(0, 10), plan(1, 30)], windows={1: Window(0.0, 4.0)})
    assert [c.status for c in out.clients] == ["ok", "dropped_out"]
    assert out.duration_s == pytest.approx(4.0)


def test_deadline_before_window_end_makes_a_straggler_that_stops_when_gone():
    out = settle_round(0.0, [plan(0, 30)], deadline_s=4.0, windows={0: Window(0.0, 4.5)})
    c = out.clients[0]
    assert c.status == "straggler" and c.finish_s == pytest.approx(4.5)
    assert c.energy_j == pytest.approx(9.0) and c.bytes_up == 500_000  # half its upload, then gone
    assert out.duration_s == pytest.approx(4.0)
    gone_first = settle_round(0.0, [plan(0, 30)], deadline_s=4.0, windows={0: Window(0.0, 3.5)}).clients[0]
    assert gone_first.status == "dropped_out" and gone_first.finish_s == pytest.approx(3.5)


def test_unavailable_clients_cost_nothing_and_hold_nothing():
    out = settle_round(100.0, [plan(0, 10), plan(1, 10), plan(2, 10)],
                       windows={0: None, 1: Window(150.0, 200.0), 2: Window(0.0, 101.0)})
    statuses = {c.client_id: c.status for c in out.clients}
    assert statuses == {0: "unavailable", 1: "unavailable", 2: "dropped_out"}
    u = out.by_client()[0]
    assert (u.energy_j, u.bytes_down, u.bytes_up, u.steps, u.finish_s) == (0.0, 0, 0, 0, 100.0)
    assert out.duration_s == pytest.approx(1.0)
    assert settle_round(7.0, [plan(0, 10)], windows={0: None}).duration_s == 0.0


def test_over_selection_keeps_the_first_k():
    out = settle_round(0.0, [plan(0, 10), plan(1, 30), plan(2, 20), plan(3, 40)], keep_first=2)  # 3, 5, 4, 6 s
    assert out.accepted == [0, 2] and out.duration_s == pytest.approx(4.0)
    late = out.by_client()[1]
    assert late.status == "straggler" and late.energy_j == pytest.approx(10.0)  # it did all its work
    # fewer than K make it: the round waits as without over-selection
    few = settle_round(0.0, [plan(0, 10), plan(1, 30)], deadline_s=4.0, keep_first=2)
    assert few.accepted == [0] and few.duration_s == pytest.approx(4.0)
    # ties: the lower client id first
    tie = settle_round(0.0, [plan(5, 10), plan(4, 10), plan(6, 10)], keep_first=2)
    assert tie.accepted == [5, 4] and tie.by_client()[6].status == "straggler"


def test_reported_statuses_pass_through_and_are_never_accepted():
    over = plan(0, 0, status="over_budget")  # downloaded, trained nothing
    out = settle_round(0.0, [over, plan(1, 10)], keep_first=1)
    c = out.by_client()[0]
    assert c.status == "over_budget" and not c.accepted and c.energy_j == pytest.approx(4.0)
    assert out.accepted == [1]


def test_settle_round_is_deterministic():
    plans = [plan(i, 5 * i + 1) for i in range(6)]
    windows = {1: Window(0.0, 2.2), 4: None}
    one = settle_round(3.0, plans, 3.5, "partial", 3, windows)
    two = settle_round(3.0, list(plans), 3.5, "partial", 3, dict(windows))
    assert one == two


@pytest.mark.parametrize("kwargs, field", [
    ({"policy": "wait"}, "straggler_policy"), ({"deadline_s": -1.0}, "round_deadline_s"),
    ({"keep_first": -2}, "over_selection"), ({"start_s": math.inf}, "start_s"),
])
def test_settle_round_rejects_bad_settings(kwargs, field):
    args = {"start_s": 0.0, **kwargs}
    with pytest.raises(UsageError, match=rf"^{field}: "):
        settle_round(args.pop("start_s"), [plan(0, 1)], **args)


def test_settle_round_rejects_a_client_planned_twice():
    with pytest.raises(UsageError, match="^clients: "):
        settle_round(0.0, [plan(0, 1), plan(0, 2)])


def test_energy_is_the_cost_log_formula():
    out = settle_round(0.0, [plan(0, 10)])
    c = out.clients[0]
    assert c.energy_j == pytest.approx(energy_j(DEV, c.compute_s, c.download_s + c.upload_s))


def test_plan_from_a_clients_jsonl_line():
    from fedpeft.fleet.clock import plan_from_record

    rec = {"client_id": 4, "status": "ok", "steps": 10, "flops": {"total": 1e9}, "bytes_down": 2_000_000,
           "bytes_up": 1_000_000}
    p = plan_from_record(rec, DEV, compute_fraction=0.5)
    assert p == ClientPlan(4, DEV, ClientTiming(1.0, 2.0, 1.0, 10), 2_000_000, 1_000_000, "ok")
    died = plan_from_record({"client_id": 2, "status": "failed", "bytes_up": 0, "bytes_down": 2_000_000}, DEV)
    assert died.timing == ClientTiming(1.0, 0.0, 0.0, 0) and died.status == "failed"
    # a client that trained 20 of 30 steps to meet the deadline: settling finds the same 20 and marks it partial
    capped = {"client_id": 1, "status": "ok", "steps": 20, "steps_planned": 30, "flops": {"total": 2e9},
              "bytes_down": 2_000_000, "bytes_up": 1_000_000}
    settled = settle_round(0.0, [plan_from_record(capped, DEV)], deadline_s=4.0, policy="partial").clients[0]
    assert (settled.status, settled.steps, settled.partial) == ("ok", 20, True)
