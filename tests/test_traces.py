"""Availability traces (fedpeft/fleet/traces.py): the file format and its validation, the seeded
generator, the budget process."""
import json
import math

import pytest

from fedpeft.devices import ClientSpec, load_catalog, with_overrides
from fedpeft.errors import UsageError
from fedpeft.fleet.traces import (BUDGET_PERIOD_S, DAY_S, Window, available_at, budget_at, dynamics_for,
                                  generate_trace, load_trace, next_opening)

CATALOG = load_catalog()
NAMES = ["phone_low", "raspberry_pi_4_4gb", "phone_high", "phone_low", "jetson_nano"]
FLEET = [ClientSpec(i, CATALOG[name]) for i, name in enumerate(NAMES)]


def write(tmp_path, text: str, name: str = "trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- files -----------------------------------------------------------------------------------------

GOOD_CSV = """client,device,start_s,end_s,ram_train_bytes,compute_fraction
,phone_low,0,100,,
,phone_low,200,300,200000000,0.5
3,,50,60,,
1,,10,20,100000000,
1,,20,inf,,0.25
"""


def test_csv_trace(tmp_path):
    trace = load_trace(write(tmp_path, GOOD_CSV), FLEET)
    # client 0 follows its device's rows; client 3's own row replaces them
    assert available_at(trace, 0, 0.0) == Window(0.0, 100.0)
    assert available_at(trace, 0, 100.0) is None  # windows are [start, end)
    assert available_at(trace, 0, 250.0).end_s == 300.0
    assert available_at(trace, 3, 10.0) is None and available_at(trace, 3, 55.0) == Window(50.0, 60.0)
    assert budget_at(trace, 0, 250.0) == (200_000_000, 0.5)
    assert budget_at(trace, 0, 50.0) == (CATALOG["phone_low"].ram_train_bytes, 1.0)  # the window sets nothing
    # touching windows are fine: the budget changes at 20 s while the client stays reachable
    assert budget_at(trace, 1, 15.0) == (100_000_000, 1.0)
    assert budget_at(trace, 1, 20.0) == (CATALOG["raspberry_pi_4_4gb"].ram_train_bytes, 0.25)
    assert available_at(trace, 1, 1e9).end_s == math.inf
    assert available_at(trace, 1, 5.0) is None
    # no rows: always reachable, with the catalog budget
    assert available_at(trace, 4, 123456.0).end_s == math.inf
    assert budget_at(trace, 4, 5.0) == (CATALOG["jetson_nano"].ram_train_bytes, 1.0)


def test_json_trace_list_and_object(tmp_path):
    rows = [{"client": 2, "start_s": 0, "end_s": 30.5, "compute_fraction": 0.8},
            {"device": "jetson_nano", "start_s": 5, "end_s": "inf"}]
    for data in (rows, {"windows": rows}):
        trace = load_trace(write(tmp_path, json.dumps(data), "t.json"), FLEET)
        assert available_at(trace, 2, 30.0) == Window(0.0, 30.5, None, 0.8)
        assert budget_at(trace, 2, 1.0) == (CATALOG["phone_high"].ram_train_bytes, 0.8)
        assert available_at(trace, 4, 1.0) is None and available_at(trace, 4, 5.0) is not None


HEADER = "client,device,start_s,end_s,ram_train_bytes,compute_fraction\n"
BAD_CSV_ROWS = [
    ("0,,100,50,,", "end_s", "must be > start_s"),  # end before start
    ("0,,100,100,,", "end_s", "must be > start_s"),
    ("12,,0,10,,", "client", "unknown client 12"),
    ("-1,,0,10,,", "client", "unknown client -1"),
    ("0,,-5,10,,", "start_s", "must be >= 0"),  # negative time
    ("0,,-20,-10,,", "start_s", "must be >= 0"),
    ("x,,0,10,,", "client", "must be an integer"),
    ("0.5,,0,10,,", "client", "must be an integer"),
    ("--1,,0,10,,", "client", "must be an integer"),
    (",esp32_s3,0,10,,", "device", "no client of the fleet"),
    (",no_such_device,0,10,,", "device", "no client of the fleet"),
    ("0,phone_low,0,10,,", "client, device", "not both"),
    (",,0,10,,", "client", "missing"),
    ("0,,,10,,", "start_s", "missing"),
    ("0,,0,,,", "end_s", "missing"),
    ("0,,soon,10,,", "start_s", "must be a finite number"),
    ("0,,inf,10,,", "start_s", "must be a finite number"),
    ("0,,0,nan,,", "end_s", "must be a number or inf"),
    ("0,,0,10,lots,", "ram_train_bytes", "must be an integer"),
    ("0,,0,10,0,", "ram_train_bytes", "must be > 0"),
    ("0,,0,10,99000000000,", "ram_train_bytes", "ram_total_bytes"),
    ("0,,0,10,,0", "compute_fraction", "(0, 1]"),
    ("0,,0,10,,1.5", "compute_fraction", "(0, 1]"),
    ("0,,0,10,,,extra", None, "more cells than the header"),
]


@pytest.mark.parametrize("row, field, problem", BAD_CSV_ROWS)
def test_bad_csv_row_names_file_row_and_field(tmp_path, row, field, problem):
    path = write(tmp_path, HEADER + "1,,0,10,,\n" + row + "\n")
    with pytest.raises(UsageError) as info:
        load_trace(path, FLEET)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path} line 3: ")  # the header is line 1, the good row line 2
    if field:
        assert f": {field}: " in message
    assert problem in message


def test_overlapping_windows_are_rejected(tmp_path):
    path = write(tmp_path, HEADER + "1,,0,10,,\n1,,20,30,,\n1,,25,40,,\n")
    with pytest.raises(UsageError, match=rf"^{path} line 4: start_s: client 1's window overlaps the one at "
                                         rf"{path} line 3"):
        load_trace(path, FLEET)
    # device rows are checked per client too
    path = write(tmp_path, HEADER + ",phone_low,0,10,,\n,phone_low,5,15,,\n")
    with pytest.raises(UsageError, match=rf"^{path} line 3: start_s: client 0's window overlaps"):
        load_trace(path, FLEET)


@pytest.mark.parametrize("data, where, field", [
    ([{"client": 0, "start_s": 10, "end_s": 5}], "[0]", "end_s"),
    ([{"client": 0, "start_s": 0, "end_s": 5}, {"client": 99, "start_s": 0, "end_s": 5}], "[1]", "client"),
    ([{"client": 0, "start_s": -1, "end_s": 5}], "[0]", "start_s"),
    ([{"client": True, "start_s": 0, "end_s": 5}], "[0]", "client"),
    ([{"client": 0, "start_s": "0", "end_s": 5, "colour": "red"}], "[0]", "colour"),
    ([{"client": 0, "start_s": False, "end_s": 5}], "[0]", "start_s"),
    ([[0, 0, 5]], "[0]", None),
])
def test_bad_json_row_names_file_index_and_field(tmp_path, data, where, field):
    path = write(tmp_path, json.dumps(data), "t.json")
    with pytest.raises(UsageError) as info:
        load_trace(path, FLEET)
    message = str(info.value)
    assert message.startswith(f"{path} {where}: ") and "\n" not in message
    if field:
        assert f": {field}: " in message


@pytest.mark.parametrize("name, text, problem", [
    ("t.csv", "client,start_s,end_s,when\n0,0,1,2\n", "line 1: when: unknown column"),
    ("t.csv", "client,start_s,start_s,end_s\n0,0,1,2\n", "line 1: start_s: column given twice"),
    ("t.csv", "", "no windows"),
    ("t.csv", HEADER, "no windows"),
    ("t.json", "[]", "no windows"),
    ("t.json", "{not json", "not valid JSON"),
    ("t.json", '{"rows": []}', "must be a list of windows"),
    ("t.txt", "client,start_s,end_s\n", "unknown format '.txt'; allowed: .csv, .json"),
])
def test_bad_trace_files(tmp_path, name, text, problem):
    path = write(tmp_path, text, name)
    with pytest.raises(UsageError, match=problem) as info:
        load_trace(path, FLEET)
    assert str(path) in str(info.value)


def test_binary_csv_is_rejected(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"client,start_s,end_s\n\xff\xfe,0,1\n")
    with pytest.raises(UsageError, match="is not a readable CSV file"):
        load_trace(path, FLEET)


def test_missing_trace_file(tmp_path):
    with pytest.raises(UsageError, match="^trace: no such file"):
        load_trace(tmp_path / "nope.csv", FLEET)


def test_queries_check_client_and_time(tmp_path):
    trace = load_trace(write(tmp_path, GOOD_CSV), FLEET)
    with pytest.raises(UsageError, match="^client_id: unknown client 9"):
        available_at(trace, 9, 0.0)
    with pytest.raises(UsageError, match="^t: "):
        budget_at(trace, 0, -1.0)


# -- generator -------------------------------------------------------------------------------------

def windows_of(trace, days: float):
    return {c: trace.windows_between(c, 0.0, days * DAY_S) for c in trace.devices}


def test_generator_is_deterministic_for_a_seed():
    one, two, other = generate_trace(FLEET, seed=3), generate_trace(FLEET, seed=3), generate_trace(FLEET, seed=4)
    assert windows_of(one, 10) == windows_of(two, 10) != windows_of(other, 10)
    # asking in another order (lazy generation) gives the same answers
    late_first = generate_trace(FLEET, seed=3)
    assert available_at(late_first, 0, 9 * DAY_S) == available_at(one, 0, 9 * DAY_S)
    assert [budget_at(one, c, 7777.0) for c in range(5)] == [budget_at(two, c, 7777.0) for c in range(5)]


def test_generated_fraction_available_is_the_catalog_availability():
    days = 365
    fleet = [ClientSpec(i, CATALOG[n]) for i, n in enumerate(["phone_high", "phone_low", "raspberry_pi_5"] * 3)]
    trace = generate_trace(fleet, seed=0)
    for cid, windows in windows_of(trace, days).items():
        up = sum(min(w.end_s, days * DAY_S) - w.start_s for w in windows)
        assert up / (days * DAY_S) == pytest.approx(fleet[cid].device.availability, abs=0.02), cid
        for before, after in zip(windows, windows[1:]):
            assert after.start_s >= before.end_s  # disjoint, in time order


def test_phones_have_one_charging_window_a_day_and_boards_rare_outages():
    trace = generate_trace(FLEET, seed=1)
    phone = trace.windows_between(2, DAY_S, 31 * DAY_S)  # phone_high
    assert 29 <= len(phone) <= 31
    assert all(0.3 * DAY_S < w.end_s - w.start_s < 0.7 * DAY_S for w in phone)  # 50% +- 25% of a day
    board = trace.windows_between(1, 0.0, 30 * DAY_S)  # raspberry_pi_4_4gb, 95%, 30 min outages
    gaps = [b.start_s - a.end_s for a, b in zip(board, board[1:])]
    assert 20 < len(gaps) < 120 and 900 < sum(gaps) / len(gaps) < 3600
    assert dynamics_for(CATALOG["phone_low"]).pattern == "daily"
    assert dynamics_for(CATALOG["esp32_s3"]).pattern == "always_on"


def test_availability_one_and_zero():
    fleet = [ClientSpec(0, with_overrides(CATALOG["phone_low"], availability=1.0)),
             ClientSpec(1, with_overrides(CATALOG["raspberry_pi_5"], availability=0.0))]
    trace = generate_trace(fleet, seed=0)
    assert available_at(trace, 0, 1e7) == Window(0.0, math.inf)
    assert available_at(trace, 1, 0.0) is None and next_opening(trace, [1], 0.0) is None
    assert next_opening(trace, [0, 1], 50.0) == 50.0


def test_next_opening():
    trace = generate_trace(FLEET, seed=2)
    t = next(t for t in range(0, int(3 * DAY_S), 600) if available_at(trace, 0, float(t)) is None)
    opening = next_opening(trace, [0], float(t))
    assert opening > t and available_at(trace, 0, opening) is not None
    assert available_at(trace, 0, (t + opening) / 2) is None


def test_budget_process():
    trace = generate_trace(FLEET, seed=5)
    phone = CATALOG["phone_high"]
    budgets = [budget_at(trace, 2, k * BUDGET_PERIOD_S + 1.0) for k in range(200)]
    assert all(0.5 * phone.ram_train_bytes <= ram <= phone.ram_train_bytes and 0.5 <= f <= 1 for ram, f in budgets)
    assert len(set(budgets)) == 200  # a new draw every slot
    assert budget_at(trace, 2, 3.0) == budget_at(trace, 2, BUDGET_PERIOD_S - 1.0)  # constant within a slot
    board = CATALOG["raspberry_pi_4_4gb"]
    assert {budget_at(trace, 1, k * BUDGET_PERIOD_S) for k in range(50)} == {(board.ram_train_bytes, 1.0)}


def test_dynamics_per_device():
    from fedpeft.fleet.traces import Dynamics

    steady_phones = {"phone_high": Dynamics("always_on", ram_min_fraction=1.0, compute_min_fraction=0.25)}
    trace = generate_trace(FLEET, seed=5, dynamics=steady_phones)
    assert trace.dynamics[2] == steady_phones["phone_high"] and trace.dynamics[0].pattern == "daily"
    ram, fraction = budget_at(trace, 2, 10.0)
    assert ram == CATALOG["phone_high"].ram_train_bytes and 0.25 <= fraction <= 1
    assert len(trace.windows_between(2, 0.0, 10 * DAY_S)) > 10  # outages, not one window a day
    with pytest.raises(UsageError, match=r"^dynamics.pattern: unknown value 'weekly'"):
        Dynamics("weekly")
    with pytest.raises(UsageError, match=r"^dynamics.compute_min_fraction: must be in \(0, 1\]"):
        Dynamics("daily", compute_min_fraction=0.0)
