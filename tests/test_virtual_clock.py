"""The virtual clock wired into the fleet: deadlines and stragglers, availability traces, budgets
that change per round, and the fleet-level answers in summary.json and `fedpeft compare`.

The simulations run on mobilenet_v2_035 with 4 clients; jitter is off so times are exact."""
import json
import math

import pytest
from flwr.app import ArrayRecord

from clients.local_update import Conditions, client_round
from fedpeft.cli import main
from fedpeft.fleet.config import RunConfig
from fedpeft.fleet.simulation import run_fleet
from fedpeft.report import read_jsonl

# Clients 0-2: Raspberry Pi 4 (4 GFLOP/s); client 3: the same board at 0.1 GFLOP/s, 2 s a LoRA step.
FLEET = ('[[group]]\ndevice = "raspberry_pi_4_4gb"\ncount = 3\navailability = 1.0\n\n'
         '[[group]]\ndevice = "raspberry_pi_4_4gb"\ncount = 1\navailability = 1.0\nflops_per_s = 1.0e8\n')
DEADLINE_S = 10.0


def clock_config(tmp_path, **overrides) -> RunConfig:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    values = dict(model="mobilenet_v2_035", num_clients=4, rounds=1, pretrain_epochs=1, batch_size=32, fleet=str(fleet),
                  out=str(tmp_path / "run"), cache_dir=str(tmp_path.parent / "fleet-cache"), clock_jitter=False,
                  round_deadline_s=DEADLINE_S)
    values.update(overrides)
    return RunConfig(**values)


def lines_by(run_dir, round_):
    return {c["client_id"]: c for c in read_jsonl(run_dir / "clients.jsonl") if c["round"] == round_}


@pytest.mark.slow
def test_deadline_drop_trace_dropout_and_a_budget_that_shrinks_for_one_round(tmp_path):
    """Under `drop` the slow client is a straggler every round (not aggregated, its energy spent and
    wasted) and each round lasts exactly the deadline; client 2's window closes mid-round 1
    (`dropped_out`) and reopens for round 2; client 1's RAM shrinks during round 2 only, so it
    picks a smaller batch in round 2 and the requested one in rounds 1 and 3."""
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start_s,end_s,ram_train_bytes\n"
                     f"1,0,{DEADLINE_S},\n1,{DEADLINE_S},{2 * DEADLINE_S},20000000\n1,{2 * DEADLINE_S},inf,\n"
                     f"2,0,0.2,\n2,{DEADLINE_S},inf,\n")
    cfg = clock_config(tmp_path, rounds=3, trace=str(trace))
    summary = run_fleet(cfg)
    run = tmp_path / "run"
    rounds = {r["round"]: r for r in read_jsonl(run / "rounds.jsonl")}
    for n in (1, 2, 3):
        assert rounds[n]["sim_time_s"] == pytest.approx(DEADLINE_S)  # the straggler was cut by the deadline
        assert rounds[n]["sim_clock_s"] == pytest.approx(n * DEADLINE_S)
        slow = lines_by(run, n)[3]
        assert slow["status"] == "straggler" and slow["aggregated"] is False
        assert slow["energy_j"] > 0 and slow["sim_finish_s"] > rounds[n]["sim_clock_s"]  # it did all its work
        assert rounds[n]["clients_straggler"] == 1
    first = lines_by(run, 1)
    assert first[2]["status"] == "dropped_out" and first[2]["aggregated"] is False
    assert first[2]["sim_finish_s"] == pytest.approx(0.2) and first[2]["energy_j"] > 0
    assert [lines_by(run, n)[2]["status"] for n in (2, 3)] == ["ok", "ok"]
    assert [lines_by(run, n)[1]["batch_size"] for n in (1, 2, 3)][0::2] == [32, 32]
    shrunk = lines_by(run, 2)[1]
    assert shrunk["batch_size"] < 32 and shrunk["status"] == "ok" and shrunk["ram_budget_bytes"] == 20_000_000
    assert shrunk["peak_memory_bytes"] <= 20_000_000
    # wasted work = the stragglers' and the drop-out's energy and bytes
    wasted = [c for c in read_jsonl(run / "clients.jsonl") if c["status"] in ("straggler", "dropped_out")]
    assert summary["wasted"]["energy_j"] == pytest.approx(sum(c["energy_j"] for c in wasted))
    assert summary["wasted"]["by_status"]["dropped_out"]["clients"] == 1
    assert summary["sim_time_s"] == pytest.approx(3 * DEADLINE_S)


@pytest.mark.slow
def test_partial_trains_the_steps_that_fit_and_is_aggregated(tmp_path):
    cfg = clock_config(tmp_path, straggler_policy="partial", trace="off")
    run_fleet(cfg)
    lines = lines_by(tmp_path / "run", 1)
    slow, fast = lines[3], lines[0]
    assert slow["status"] == "ok" and slow["aggregated"] is True and slow["partial"] is True
    assert 0 < slow["steps"] < slow["steps_planned"] == fast["steps"]
    assert slow["sim_finish_s"] <= DEADLINE_S
    assert slow["sim_finish_s"] + slow["compute_s"] / slow["steps"] > DEADLINE_S  # one more step would not fit
    rounds = {r["round"]: r for r in read_jsonl(tmp_path / "run" / "rounds.jsonl")}
    assert rounds[1]["sim_time_s"] == pytest.approx(max(c["sim_finish_s"] for c in lines.values()))
    assert rounds[1]["sim_time_s"] < DEADLINE_S  # nobody was cut: the round ends with its slowest client


def test_a_budget_that_shrinks_for_one_round_changes_that_rounds_setting_only(tmp_path):
    """The client re-runs its budget choice under each round's conditions (no Ray: the client alone)."""
    cfg = clock_config(tmp_path, round_deadline_s=0.0)
    node = {"partition-id": 1}
    chosen = [client_round(cfg, node, ArrayRecord(), n, cond).metrics["batch_size"]
              for n, cond in enumerate([Conditions(), Conditions(ram_train_bytes=20_000_000), Conditions()], 1)]
    assert chosen[0] == chosen[2] == 32 and chosen[1] < 32
    tiny = client_round(cfg, node, ArrayRecord(), 4, Conditions(ram_train_bytes=1000))
    assert tiny.info["status"] == "over_budget" and "1,000 B" in tiny.info["error"]


def test_train_config_conditions_out_of_range_are_refused():
    from fedpeft.errors import UsageError

    assert Conditions.from_config({}) == Conditions()
    assert Conditions.from_config({"sim-ram-train-bytes": 5, "sim-compute-fraction": 0.5, "sim-jitter": 2.0}) == \
        Conditions(5, 0.5, 2.0)
    for bad in ({"sim-compute-fraction": 0.0}, {"sim-jitter": -1.0}, {"sim-ram-train-bytes": 0}):
        with pytest.raises(UsageError, match="sim-"):
            Conditions.from_config(bad)


def test_the_clock_uses_the_servers_flops_not_the_clients_claim(tmp_path):
    """A client that reports 1 FLOP a step still takes its setting's profiled time on the clock."""
    from strategies.server_app import server_flops_per_step, server_traffic_per_step
    from strategies.virtual_clock import FleetClock
    from fedpeft.devices import compute_time_s
    from fedpeft.fleet import setup

    cfg = clock_config(tmp_path, trace="off")
    per_step, traffic = server_flops_per_step(cfg), server_traffic_per_step(cfg)
    clock = FleetClock(cfg, setup.fleet_for(cfg), flops_per_step=per_step, traffic_per_step=traffic)
    cond = clock.conditions(3, 1)
    line = {"round": 1, "client_id": 3, "status": "ok", "method": "lora", "rank": 4, "batch_size": 32, "steps": 8,
            "flops": {"total": 8}, "flops_per_step": 1, "bytes_up": 1000, "bytes_down": 1000}
    fields = clock.settle([line])
    profiled = per_step(line)
    assert profiled > 1e8 and cond.to_config()["sim-jitter"] == 1.0
    board = setup.fleet_for(cfg)[3].device  # client 3: 0.1 GFLOP/s; the roofline of the server's FLOPs and traffic
    assert traffic(line)["total"] > 0 and board.memory_bytes_per_s
    assert line["compute_s"] == pytest.approx(8 * compute_time_s(board, profiled, traffic(line)))
    assert line["compute_s"] >= 8 * profiled / 1.0e8 * (1 - 1e-9)
    assert line["status"] == "straggler" and fields["sim_time_s"] == pytest.approx(DEADLINE_S)
    # a setting the budget walk would never pick is not profiled on the server's dime
    assert per_step({**line, "batch_size": 10**9}) is None and traffic({**line, "batch_size": 10**9}) is None


def test_over_selection_samples_more_and_keeps_the_first_to_finish(tmp_path):
    from fedpeft.fleet import setup
    from strategies.virtual_clock import FleetClock

    cfg = clock_config(tmp_path, trace="off", clients_per_round=2, over_selection=0.5, round_deadline_s=0.0)
    assert cfg.sample_size == 3
    clock = FleetClock(cfg, setup.fleet_for(cfg))
    lines = []
    for cid in (0, 1, 3):
        clock.conditions(cid, 1)
        lines.append({"round": 1, "client_id": cid, "status": "ok", "steps": 8, "flops_per_step": 2e8,
                      "bytes_up": 1000, "bytes_down": 1000})
    fields = clock.settle(lines)
    assert [c["status"] for c in lines] == ["ok", "ok", "straggler"]  # client 3 (slow) finishes last
    assert fields["sim_time_s"] == pytest.approx(max(c["sim_finish_s"] for c in lines[:2]))


def test_when_nobody_sampled_is_reachable_the_clock_skips_to_the_next_check_in(tmp_path):
    from fedpeft.fleet import setup
    from strategies.virtual_clock import FleetClock

    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([{"client": c, "start_s": 500.0, "end_s": "inf"} for c in range(4)]))
    cfg = clock_config(tmp_path, trace=str(trace))
    clock = FleetClock(cfg, setup.fleet_for(cfg))
    assert clock.conditions(0, 1) is None
    fields = clock.settle([{"round": 1, "client_id": 0, "status": "unavailable", "bytes_up": 0, "bytes_down": 0}])
    assert fields == {"sim_time_s": 500.0, "sim_clock_s": 500.0}
    assert clock.conditions(0, 2) is not None


def test_a_bad_trace_row_is_one_line_naming_row_and_field(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start_s,end_s\n0,0,100\n1,50,20\n")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    assert main(["simulate", "--fleet", str(fleet), "--trace", str(trace), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 3" in err[0] and "end_s" in err[0]
    trace.write_text("client,start_s,end_s\n7,0,100\n")
    assert main(["simulate", "--fleet", str(fleet), "--trace", str(trace), "--out", str(tmp_path / "r")]) == 2
    assert "client: unknown client 7" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_with_a_deadline_shows_fft_losing_clients_where_lora_does_not(tmp_path, capsys):
    """Client 3's uplink is 1 Mbit/s: fft's 1.6 MB upload takes ~13 s, LoRA's ~1.4 s, bn_head's less."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[group]]\ndevice = "raspberry_pi_4_4gb"\ncount = 3\navailability = 1.0\n\n'
                     '[[group]]\ndevice = "raspberry_pi_4_4gb"\ncount = 1\navailability = 1.0\nuplink_bps = 1.0e6\n')
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "fft,lora,bn_head", "--model", "mobilenet_v2_035", "--fleet", str(fleet),
            "--rounds", "1", "--pretrain-epochs", "1", "--round-deadline-s", "5", "--set", "clock_jitter=false",
            "--out", str(out), "--cache-dir", str(tmp_path.parent / "fleet-cache")]
    assert main(argv) == 0
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())}
    assert list(rows) == ["fft", "lora", "bn_head"]
    assert rows["fft"]["clients_straggler"] == 1 and rows["fft"]["wasted_energy_j"] > 0
    assert rows["lora"]["clients_straggler"] == 0 and rows["bn_head"]["clients_straggler"] == 0
    assert rows["fft"]["sim_time_s"] == pytest.approx(5.0)
    assert rows["lora"]["sim_time_s"] < 5.0
    assert rows["lora"]["bytes_up"] < rows["fft"]["bytes_up"] / 3
    assert math.isclose(rows["lora"]["bytes_up_vs_fft"], rows["lora"]["bytes_up"] / rows["fft"]["bytes_up"])
    for method, r in rows.items():  # every run reaches its own default target (95% of its best), at its cost
        spent = [c for c in read_jsonl(out / method / "clients.jsonl") if c["round"] <= r["round_to_target"]]
        assert r["energy_to_target_j"] == pytest.approx(sum(c.get("energy_j") or 0 for c in spent))
        assert r["bytes_to_target"] == sum(c["bytes_up"] + c["bytes_down"] for c in spent)
    assert (out / "compare.csv").read_text().count("\n") == 4
    assert (out / "compare.png").stat().st_size > 0 and (out / "compare_curves.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "late" in table and "to target" in table


def test_claims_that_would_break_the_clock_are_not_believed(tmp_path):
    """A reply claiming absurd steps is rejected before the clock sees it; an `ok` line whose setting
    the server will not profile is rejected; a rejected line adds only its download to the clock."""
    from fedpeft.fleet import setup
    from strategies.server_app import server_flops_per_step
    from strategies.virtual_clock import FleetClock

    cfg = clock_config(tmp_path, trace="off", round_deadline_s=0.0)
    clock = FleetClock(cfg, setup.fleet_for(cfg), flops_per_step=server_flops_per_step(cfg))
    for cid in (0, 1):
        clock.conditions(cid, 1)
    odd = {"round": 1, "client_id": 0, "status": "ok", "method": "lora", "rank": 4, "batch_size": 7, "steps": 10**12,
           "flops_per_step": 1e300, "bytes_up": 0, "bytes_down": 1000}
    liar = {"round": 1, "client_id": 1, "status": "rejected", "steps": 10**12, "flops_per_step": 1e300,
            "bytes_up": 0, "bytes_down": 1000}
    fields = clock.settle([odd, liar])
    assert odd["status"] == "rejected" and "budget walk" in odd["error"]
    assert math.isfinite(fields["sim_clock_s"]) and fields["sim_time_s"] < 1.0
    assert odd["compute_s"] == liar["compute_s"] == 0.0

