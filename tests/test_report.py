"""fedpeft.report on synthetic run directories with hand-checked numbers."""
import csv
import json

import pytest

from fedpeft import report
from fedpeft.errors import UsageError

MiB = 2**20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BUDGET = {"pi5": 512 * MiB, "jetson": 2048 * MiB, "mcu": 1 * MiB}


def client(rnd, cid, device, status, *, peak=None, up=0, down=0, gflop=None, dt=None, energy=None, loss=None):
    ok = status == "ok"
    return {
        "round": rnd, "client_id": cid, "node_id": 1000 + cid, "device": device, "method": "lora",
        "rank": 4 if ok else None, "batch_size": 32, "status": status, "chosen": "lora r=4 batch=32",
        "adapted": False, "examples": 64 if ok else 0, "steps": 2 if ok else 0, "loss": loss,
        "peak_memory_bytes": peak,
        "memory_by_category": {k: 0 for k in ("parameter", "buffer", "gradient", "activation", "temporary",
                                                "optimizer_state", "other")},
        "ram_budget_bytes": BUDGET[device],
        "flops": None if gflop is None else {"forward": int(gflop * 1e9 / 3), "backward": int(gflop * 2e9 / 3),
                                             "optimizer": 0, "total": int(gflop * 1e9)},
        "bytes_up": up, "bytes_down": down, "upload_codec": "fp32", "quant_error": 0.0, "wall_s": 0.25,
        "compute_s": dt, "comm_s": 0.0 if dt is not None else None, "device_time_s": dt, "energy_j": energy,
        "error": None if status in ("ok", "unavailable") else f"{status} here",
    }


# Round 1: c0 pi5 ok, c1 jetson ok, c2 mcu over budget, c3 pi5 unavailable.
# Round 2: c0 pi5 ok, c1 jetson failed, c2 mcu over budget, c3 pi5 ok.
CLIENTS = [
    client(1, 0, "pi5", "ok", peak=100 * MiB, up=1000, down=5000, gflop=2, dt=10.0, energy=20.0, loss=1.0),
    client(1, 1, "jetson", "ok", peak=300 * MiB, up=1000, down=5000, gflop=1, dt=2.0, energy=30.0, loss=0.8),
    client(1, 2, "mcu", "over_budget", peak=50 * MiB, down=5000, gflop=0, dt=0.5, energy=0.1),
    client(1, 3, "pi5", "unavailable", peak=0, down=5000, dt=0.0, energy=0.0),
    client(2, 0, "pi5", "ok", peak=120 * MiB, up=1200, down=6000, gflop=2, dt=12.0, energy=24.0, loss=0.7),
    client(2, 1, "jetson", "failed", down=6000),
    client(2, 2, "mcu", "over_budget", peak=50 * MiB, down=6000, gflop=0, dt=0.5, energy=0.1),
    client(2, 3, "pi5", "ok", peak=140 * MiB, up=800, down=6000, gflop=2, dt=14.0, energy=28.0, loss=0.9),
]
ROUNDS = [
    {"round": 0, "accuracy": 0.10, "loss": 2.3, "clients_sampled": 0, "clients_ok": 0, "clients_failed": 0,
     "clients_over_budget": 0, "clients_unavailable": 0, "clients_rejected": 0, "bytes_up": 0, "bytes_down": 0,
     "wall_s": 1.0},
    {"round": 1, "accuracy": 0.50, "loss": 1.5, "clients_sampled": 4, "clients_ok": 2, "clients_failed": 0,
     "clients_over_budget": 1, "clients_unavailable": 1, "clients_rejected": 0, "bytes_up": 2000,
     "bytes_down": 20000, "wall_s": 2.0},
    {"round": 2, "accuracy": 0.45, "loss": float("nan"), "clients_sampled": 4, "clients_ok": 2,
     "clients_failed": 1, "clients_over_budget": 1, "clients_unavailable": 0, "clients_rejected": 0,
     "bytes_up": 2000, "bytes_down": 24000, "wall_s": 3.0},
]
CONFIG = {"model": "mobilenet_v2", "method": "lora", "rounds": 2, "num_clients": 4, "seed": 0}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_run(path, clients=CLIENTS, rounds=ROUNDS, config=CONFIG):
    path.mkdir(parents=True, exist_ok=True)
    write_jsonl(path / "clients.jsonl", clients)
    write_jsonl(path / "rounds.jsonl", rounds)
    (path / "config.json").write_text(json.dumps(config))
    return path


def scaled_uplink(factor, method):
    return [{**c, "bytes_up": int(c["bytes_up"] * factor), "method": method} for c in CLIENTS]


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


# -- read_jsonl ------------------------------------------------------------------------------------
def test_read_jsonl_skips_truncated_final_line(tmp_path):
    path = tmp_path / "clients.jsonl"
    write_jsonl(path, CLIENTS[:3])
    with open(path, "a") as fh:
        fh.write('{"round": 2, "client_id": 0, "dev')  # killed mid-write, no newline
    records = report.read_jsonl(path)
    assert [r["client_id"] for r in records] == [0, 1, 2]


def test_read_jsonl_skips_truncated_multibyte_final_line(tmp_path):
    path = tmp_path / "rounds.jsonl"
    write_jsonl(path, ROUNDS[:1])
    with open(path, "ab") as fh:
        fh.write('{"note": "\u00e9'.encode()[:-1])  # cut inside a UTF-8 sequence
    assert len(report.read_jsonl(path)) == 1


def test_read_jsonl_bad_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "clients.jsonl"
    lines = [json.dumps(c) for c in CLIENTS[:4]]
    lines[2] = lines[2][:20]  # line 3 is corrupt, lines 4 follows
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=r"clients\.jsonl: line 3 "):
        report.read_jsonl(path)


def test_read_jsonl_counts_lines_past_blank_lines_and_rejects_non_objects(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text('{"round": 0}\n\n[1, 2]\n{"round": 1}\n')
    with pytest.raises(UsageError, match="line 3 is a JSON list"):
        report.read_jsonl(path)
    path.write_text('{"round": 0}\n\n{"round": 1}\n')
    assert [r["round"] for r in report.read_jsonl(path)] == [0, 1]


# -- summarize -------------------------------------------------------------------------------------
def test_summary_totals_equal_hand_sums(run):
    s = report.summarize(run)
    assert s["config"] == CONFIG and s["model"] == "mobilenet_v2" and s["method"] == "lora"
    assert s["rounds"] == 2
    assert s["initial_accuracy"] == 0.10
    assert s["final_accuracy"] == 0.45 and s["final_round"] == 2
    assert s["best_accuracy"] == 0.50 and s["best_round"] == 1
    assert s["bytes_up"] == 4000
    assert s["bytes_down"] == 44000
    assert s["bytes_up_per_round"] == 2000
    assert [(r["round"], r["bytes_up"], r["bytes_up_cumulative"]) for r in s["per_round"]] == [
        (0, 0, 0), (1, 2000, 2000), (2, 2000, 4000)]
    assert s["total_flops"] == 7_000_000_000 and s["flops"]["total"] == 7_000_000_000
    assert s["device_time_s"] == pytest.approx(39.0)
    assert s["energy_j"] == pytest.approx(102.2)
    assert s["peak_memory_mean_bytes"] == 165 * MiB  # (100 + 300 + 120 + 140) / 4, ok clients only
    assert s["peak_memory_max_bytes"] == 300 * MiB
    assert s["wall_s"] == pytest.approx(6.0)
    assert s["clients"] == 4 and s["client_records"] == 8


def test_status_counts(run):
    s = report.summarize(run)
    assert s["status_counts"] == {"ok": 4, "over_budget": 2, "unavailable": 1, "failed": 1, "rejected": 0, "straggler": 0, "dropped_out": 0}


def test_per_device_aggregates(run):
    d = report.summarize(run)["devices"]
    assert sorted(d) == ["jetson", "mcu", "pi5"]
    pi5, jetson, mcu = d["pi5"], d["jetson"], d["mcu"]
    assert (pi5["clients"], pi5["records"], pi5["ok"], pi5["unavailable"], pi5["over_budget"]) == (2, 4, 3, 1, 0)
    assert pi5["peak_memory_mean_bytes"] == 120 * MiB and pi5["peak_memory_max_bytes"] == 140 * MiB
    assert pi5["ram_budget_bytes"] == 512 * MiB
    assert pi5["device_time_mean_s"] == pytest.approx(12.0) and pi5["device_time_s"] == pytest.approx(36.0)
    assert pi5["energy_j"] == pytest.approx(72.0)
    assert pi5["bytes_up"] == 3000 and pi5["total_flops"] == 6_000_000_000
    assert (jetson["clients"], jetson["ok"], jetson["failed"]) == (1, 1, 1)
    assert jetson["peak_memory_mean_bytes"] == 300 * MiB and jetson["energy_j"] == pytest.approx(30.0)
    assert (mcu["ok"], mcu["over_budget"]) == (0, 2)
    assert mcu["peak_memory_mean_bytes"] is None and mcu["peak_memory_needed_bytes"] == 50 * MiB
    assert mcu["ram_budget_bytes"] == 1 * MiB and mcu["energy_j"] == pytest.approx(0.2)


def test_summary_json_written_strict_and_tolerates_truncation(run):
    with open(run / "clients.jsonl", "a") as fh:
        fh.write('{"round": 3, "client_id": 0, "bytes_up": 99999')
    s = report.summarize(run)
    assert s["bytes_up"] == 4000  # the cut-short line is not counted
    text = (run / "summary.json").read_text()

    def reject(token):
        raise AssertionError(f"summary.json holds non-standard JSON constant {token}")

    on_disk = json.loads(text, parse_constant=reject)  # the NaN loss became null
    assert on_disk["bytes_up"] == 4000 and on_disk["per_round"][2]["loss"] is None
    assert not list(run.glob(".summary.json.*"))  # no temp file left behind


def test_summary_bad_middle_line_raises(run):
    lines = (run / "rounds.jsonl").read_text().splitlines()
    lines[1] = "not json"
    (run / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=r"rounds\.jsonl: line 2"):
        report.summarize(run)


def test_final_accuracy_is_last_round_with_accuracy(tmp_path):
    rounds = ROUNDS + [{"round": 3, "accuracy": None, "loss": None, "wall_s": 1.0}]
    s = report.summarize(make_run(tmp_path / "r", rounds=rounds))
    assert s["rounds"] == 3
    assert s["final_accuracy"] == 0.45 and s["final_round"] == 2


def test_empty_logs_never_fail(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "clients.jsonl").write_text("")
    s = report.summarize(empty)  # no rounds.jsonl, no config.json
    assert s["rounds"] == 0 and s["bytes_up"] == 0 and s["total_flops"] == 0 and s["energy_j"] == 0
    assert s["initial_accuracy"] is None and s["final_accuracy"] is None and s["best_accuracy"] is None
    assert s["peak_memory_max_bytes"] is None and s["status_counts"]["ok"] == 0 and s["devices"] == {}
    assert (empty / "summary.json").is_file()
    for path in report.plot_run(empty, s):
        assert path.read_bytes().startswith(PNG_MAGIC)
    assert "total" in report.run_table(s)


def test_missing_run_dir_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        report.summarize(tmp_path / "nope")


# -- plots and tables ------------------------------------------------------------------------------
def test_plots_are_nonempty_pngs(run):
    paths = report.plot_run(run)
    assert sorted(p.name for p in paths) == sorted(report.PLOT_NAMES)
    for path in paths:
        data = path.read_bytes()
        assert path.parent == run and data.startswith(PNG_MAGIC) and len(data) > 5000, path.name


def test_run_table_lists_every_device_and_totals(run):
    table = report.run_table(report.summarize(run))
    lines = table.splitlines()
    for device in ("pi5", "jetson", "mcu"):
        assert any(line.startswith(device) for line in lines), device
    total = next(line for line in lines if line.startswith("total"))
    for cell in ("7.00", "3.91 KiB", "42.97 KiB", "39.0", "102.2", "300.0 max"):
        assert cell in total, cell
    pi5 = next(line for line in lines if line.startswith("pi5"))
    for cell in ("120.0", "512", "6.00", "2.93 KiB", "36.0", "72.0"):
        assert cell in pi5, cell
    assert "needs 50.0" in next(line for line in lines if line.startswith("mcu"))
    assert "0.1000 -> 0.4500" in lines[-2] and "uplink 3.91 KiB" in lines[-2]
    # these logs predate the virtual clock: no simulated time, but what reaching 95% of the best cost
    assert lines[-1].startswith("simulated time -; reached 0.4750 at round 1: -,"), lines[-1]


def test_formatting_helpers():
    assert report.fmt_bytes(512) == "512 B"
    assert report.fmt_bytes(1536) == "1.50 KiB"
    assert report.fmt_bytes(3 * MiB) == "3.00 MiB"
    assert report.fmt_bytes(300 * 2**30) == "300.0 GiB"
    assert report.fmt_bytes(None) == "-"
    assert report.fmt_flops(950) == "950 FLOP"
    assert report.fmt_flops(1.5e9) == "1.50 GFLOP"
    assert report.fmt_flops(2.5e12) == "2.50 TFLOP"


# -- compare ---------------------------------------------------------------------------------------
def test_compare_writes_outputs_and_fft_ratio(tmp_path):
    runs = {
        "fft": make_run(tmp_path / "fft", clients=scaled_uplink(10, "fft"), config={**CONFIG, "method": "fft"}),
        "lora": make_run(tmp_path / "lora"),
        "bn_head": make_run(tmp_path / "bn", clients=scaled_uplink(0.25, "bn_head"),
                            config={**CONFIG, "method": "bn_head"}),
    }
    out = tmp_path / "cmp"
    rows = report.compare(runs, out)
    assert [r["method"] for r in rows] == ["fft", "lora", "bn_head"]
    by = {r["method"]: r for r in rows}
    assert by["fft"]["bytes_up"] == 40000 and by["lora"]["bytes_up"] == 4000 and by["bn_head"]["bytes_up"] == 1000
    assert by["fft"]["bytes_up_vs_fft"] == 1.0
    assert by["lora"]["bytes_up_vs_fft"] == pytest.approx(0.1)
    assert by["bn_head"]["bytes_up_vs_fft"] == pytest.approx(0.025)
    assert by["lora"]["final_accuracy"] == 0.45 and by["lora"]["clients_over_budget"] == 2
    assert by["lora"]["peak_memory_max_bytes"] == 300 * MiB and by["lora"]["total_flops"] == 7_000_000_000
    assert by["lora"]["energy_j"] == pytest.approx(102.2) and by["lora"]["device_time_s"] == pytest.approx(39.0)

    with open(out / "compare.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["method"] for r in csv_rows] == ["fft", "lora", "bn_head"]
    assert csv_rows[1]["bytes_up"] == "4000" and float(csv_rows[2]["bytes_up_vs_fft"]) == pytest.approx(0.025)
    assert json.loads((out / "compare.json").read_text()) == rows
    png = (out / "compare.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000

    table = report.compare_table(rows)
    assert "up/fft" in table
    lines = {line.split()[0]: line for line in table.splitlines()[2:-1]}  # the last line is the note
    assert table.splitlines()[-1].startswith("time s: ")
    assert set(lines) == {"fft", "lora", "bn_head"}
    assert "0.1x" in lines["lora"] and "0.025x" in lines["bn_head"] and " 1x" in lines["fft"]


def test_compare_without_fft_has_no_ratio(tmp_path):
    rows = report.compare({"lora": make_run(tmp_path / "a"), "dora": make_run(tmp_path / "b")}, tmp_path / "o")
    assert all(r["bytes_up_vs_fft"] is None for r in rows)
    assert "up/fft" not in report.compare_table(rows)
    with pytest.raises(UsageError):
        report.compare({}, tmp_path / "o")


def test_minimal_failed_and_rejected_records_from_the_server(tmp_path):
    # A reply that errored or was malformed leaves only round, node and status: no device, no costs.
    extra = [{"round": 2, "client_id": None, "node_id": 7, "status": "failed", "error": "boom"},
             {"round": 2, "client_id": None, "node_id": 8, "status": "rejected", "error": "malformed reply"}]
    s = report.summarize(make_run(tmp_path / "r", clients=CLIENTS + extra))
    assert s["status_counts"] == {"ok": 4, "over_budget": 2, "unavailable": 1, "failed": 2, "rejected": 1, "straggler": 0, "dropped_out": 0}
    assert s["bytes_up"] == 4000 and s["energy_j"] == pytest.approx(102.2) and s["clients"] == 4
    unknown = s["devices"]["unknown"]
    assert (unknown["records"], unknown["failed"], unknown["rejected"], unknown["ram_budget_bytes"]) == (2, 1, 1, None)
    assert any(line.startswith("unknown") for line in report.run_table(s).splitlines())
