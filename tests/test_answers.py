"""Fleet-level answers (fedpeft/fleet/answers.py) on a hand-made log, every number worked out by hand."""
import pytest

from fedpeft.errors import UsageError
from fedpeft.fleet.answers import WASTED, costs, fleet_answers, target_for, to_accuracy, wasted_work

ROUNDS = [
    {"round": 0, "accuracy": 0.20, "sim_time_s": 0.0, "sim_clock_s": 0.0},
    {"round": 1, "accuracy": 0.50, "sim_time_s": 10.0, "sim_clock_s": 10.0},
    {"round": 2, "accuracy": None, "sim_time_s": 15.0, "sim_clock_s": 25.0},  # not evaluated
    {"round": 3, "accuracy": 0.80, "sim_time_s": 15.0, "sim_clock_s": 40.0},
    {"round": 4, "accuracy": 0.70, "sim_time_s": 10.0, "sim_clock_s": 50.0},
]


def client(n, status, energy, up, down):
    return {"round": n, "status": status, "energy_j": energy, "bytes_up": up, "bytes_down": down}


CLIENTS = [
    client(0, "ok", 1.0, 10, 0),  # round 0: calibration
    client(1, "ok", 5.0, 100, 1000), client(1, "straggler", 7.0, 100, 1000), client(1, "unavailable", 0.0, 0, 0),
    client(2, "ok", 5.0, 100, 1000), client(2, "dropped_out", 2.5, 0, 1000),
    client(3, "ok", 6.0, 100, 1000), client(3, "failed", 1.5, 0, 1000), client(3, "rejected", 4.0, 100, 1000),
    client(4, "ok", 9.0, 100, 1000), client(4, "over_budget", 0.5, 0, 1000),
]


def test_default_target_is_95_percent_of_the_best():
    assert target_for(ROUNDS) == pytest.approx(0.76)
    assert target_for(ROUNDS, 0.5) == 0.5
    assert target_for([{"round": 0, "accuracy": None}]) is None
    with pytest.raises(UsageError, match=r"^target_accuracy: must be in \(0, 1\]"):
        target_for(ROUNDS, 1.5)


def test_to_accuracy_by_hand():
    # 0.95 x 0.80 = 0.76: first reached in round 3; costs of rounds 0..3 inclusive, every status
    got = to_accuracy(ROUNDS, CLIENTS, target_for(ROUNDS))
    assert got == {"round": 3, "sim_time_s": 40.0,
                   "energy_j": pytest.approx(1.0 + 5 + 7 + 0 + 5 + 2.5 + 6 + 1.5 + 4),
                   "bytes": 10 + 1100 + 1100 + 0 + 1100 + 1000 + 1100 + 1000 + 1100}
    # a target met exactly counts as reached
    assert to_accuracy(ROUNDS, CLIENTS, 0.5) == {"round": 1, "sim_time_s": 10.0, "energy_j": pytest.approx(13.0),
                                                 "bytes": 2210}
    # round 0 counts: the pre-trained model may already be there
    assert to_accuracy(ROUNDS, CLIENTS, 0.2) == {"round": 0, "sim_time_s": 0.0, "energy_j": 1.0, "bytes": 10}


def test_a_run_that_never_reaches_the_target_reports_none():
    assert to_accuracy(ROUNDS, CLIENTS, 0.81) is None  # None, not 0
    assert to_accuracy(ROUNDS, CLIENTS, None) is None
    assert to_accuracy([{"round": 0, "accuracy": None, "sim_clock_s": 0.0}], [], 0.1) is None


def test_exactly_95_percent_of_the_best_reaches_despite_float_rounding():
    rounds = [{"round": 1, "accuracy": 0.5206, "sim_clock_s": 3.0}, {"round": 2, "accuracy": 0.548, "sim_clock_s": 6.0}]
    assert 0.95 * 0.548 > 0.5206  # 0.5206000000000001
    assert to_accuracy(rounds, [], target_for(rounds))["round"] == 1


def test_rounds_out_of_order_are_read_in_round_order():
    shuffled = [ROUNDS[3], ROUNDS[0], ROUNDS[4], ROUNDS[1], ROUNDS[2]]
    assert to_accuracy(shuffled, CLIENTS, 0.5)["round"] == 1


def test_wasted_work_by_hand():
    got = wasted_work(CLIENTS)
    assert got["energy_j"] == pytest.approx(7.0 + 2.5 + 1.5 + 4.0 + 0.5)
    assert got["bytes"] == 1100 + 1000 + 1000 + 1100 + 1000
    assert got["clients"] == 5
    assert got["by_status"]["straggler"] == {"energy_j": 7.0, "bytes": 1100, "clients": 1}
    assert got["by_status"]["dropped_out"] == {"energy_j": 2.5, "bytes": 1000, "clients": 1}
    assert set(got["by_status"]) == set(WASTED)
    assert wasted_work([client(1, "ok", 3.0, 1, 1)])["energy_j"] == 0.0


def test_missing_costs_add_nothing():
    died = {"round": 1, "status": "failed", "bytes_up": 0, "bytes_down": 500}  # no energy_j: it never reported
    assert wasted_work([died])["energy_j"] == 0.0 and wasted_work([died])["bytes"] == 500
    assert costs([{"round": 1, "status": "ok", "energy_j": None}]) == {"energy_j": 0.0, "bytes": 0}


def test_fleet_answers_by_hand():
    got = fleet_answers(ROUNDS, CLIENTS)
    assert got["final_accuracy"] == 0.70 and got["best_accuracy"] == 0.80
    assert got["target_accuracy"] == pytest.approx(0.76)
    assert got["sim_time_s"] == 50.0
    assert got["energy_j"] == pytest.approx(1.0 + 5 + 7 + 5 + 2.5 + 6 + 1.5 + 4 + 9 + 0.5)
    assert got["bytes"] == 10 + 1100 * 6 + 1000 * 3
    assert got["to_target"]["round"] == 3 and got["wasted"]["clients"] == 5
    assert fleet_answers(ROUNDS, CLIENTS, target_accuracy=0.9)["to_target"] is None


def test_bad_logs_are_named():
    with pytest.raises(UsageError, match=r"^rounds.jsonl round 1: sim_clock_s: missing"):
        to_accuracy([{"round": 1, "accuracy": 0.9}], [], 0.5)
    with pytest.raises(UsageError, match=r"^clients\[1\]\.energy_j: must be a finite number >= 0"):
        costs([client(1, "ok", 1.0, 0, 0), client(1, "ok", -1.0, 0, 0)])
    with pytest.raises(UsageError, match=r"^rounds\[0\]\.round: must be an integer"):
        target_for([{"accuracy": 0.5}])
    with pytest.raises(UsageError, match=r"^rounds\[0\]\.accuracy: must be a number in \[0, 1\]"):
        target_for([{"round": 0, "accuracy": 95.0}])
