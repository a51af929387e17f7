"""The federated fleet: a real Flower simulation on Ray, budgets, adapter-only exchange, faults."""
import json
import math
import subprocess
import sys
import time

import psutil
import pytest
import torch
from flwr.app import ArrayRecord

from clients.local_update import client_round
from fedpeft.errors import UsageError
from fedpeft.fleet.budget import step_cost
from fedpeft.fleet.config import RunConfig
from fedpeft.payload import decode, encode, record_bytes

CLIENT_FIELDS = {
    "round", "client_id", "node_id", "device", "method", "rank", "batch_size", "status", "chosen", "adapted",
    "examples", "steps", "loss", "peak_memory_bytes", "memory_by_category", "ram_budget_bytes", "flops",
    "bytes_up", "bytes_down", "upload_codec", "quant_error", "wall_s", "compute_s", "comm_s",
    "device_time_s", "energy_j", "error",
}
ROUND_FIELDS = {"round", "accuracy", "loss", "clients_sampled", "clients_ok", "clients_failed",
                "clients_over_budget", "clients_unavailable", "clients_rejected", "bytes_up", "bytes_down", "wall_s"}


def small_config(tmp_path, **overrides) -> RunConfig:
    fleet = tmp_path / "fleet.toml"
    if not fleet.exists():
        fleet.write_text(
            '[[group]]\ndevice = "raspberry_pi_4_4gb"\ncount = 2\navailability = 1.0\n\n'
            '[[group]]\ndevice = "jetson_orin_nano"\ncount = 2\navailability = 1.0\n'
        )
    values = dict(model="mobilenet_v2_035", num_clients=4, rounds=2, pretrain_epochs=1, batch_size=32,
                  fleet=str(fleet), out=str(tmp_path / "run"), cache_dir=str(tmp_path.parent / "fleet-cache"))
    values.update(overrides)
    return RunConfig(**values)


def is_adapter_key(method: str, key: str) -> bool:
    if method in ("lora", "dora"):
        return "lora_" in key or ".classifier." in key
    if method == "taskedge":
        return key.endswith((".values", ".indices")) or key.startswith("classifier.")
    if method == "taskedge_lora":
        return key.endswith((".lora_A", ".lora_B", ".indices")) or key.startswith("classifier.")
    raise AssertionError(method)


# -- one client's round, without Ray ---------------------------------------------------------------
def test_lora_client_uploads_exactly_its_serialized_adapter(tmp_path):
    cfg = small_config(tmp_path)
    reply = client_round(cfg, {"partition-id": 0}, ArrayRecord(), server_round=1)
    assert reply.info["status"] == "ok", reply.info
    delta = decode(reply.arrays)
    assert delta and all(is_adapter_key("lora", k) for k in delta), sorted(delta)[:5]
    assert reply.metrics["bytes_up"] == record_bytes(reply.arrays) == encode(delta)[1].bytes
    tensor_bytes = sum(t.numel() * t.element_size() for t in delta.values())
    assert tensor_bytes < reply.metrics["bytes_up"] <= tensor_bytes + 128 * len(delta)  # + one .npy header each

    # Round 2 starts from the global adapter: what comes down is adapter tensors only, and counted.
    second = client_round(cfg, {"partition-id": 1}, reply.arrays, server_round=2)
    assert second.metrics["bytes_down"] == record_bytes(reply.arrays)
    assert set(decode(second.arrays)) == set(delta)

    fft = client_round(small_config(tmp_path, method="fft"), {"partition-id": 0}, ArrayRecord(), server_round=1)
    assert fft.info["status"] == "ok"
    assert fft.metrics["bytes_up"] > 3 * reply.metrics["bytes_up"]


def test_over_budget_client_adapts_or_is_skipped(tmp_path):
    cfg = small_config(tmp_path)
    big = step_cost(cfg, "lora", 4, 32, 10).peak_bytes
    small = step_cost(cfg, "lora", 4, 8, 10).peak_bytes
    assert small < big
    fleet = tmp_path / "tight.toml"
    fleet.write_text(f'[[client]]\ndevice = "phone_low"\nram_train_bytes = {(small + big) // 2}\navailability = 1.0\n'
                     '[[client]]\ndevice = "phone_low"\navailability = 1.0\n')
    adapt = client_round(small_config(tmp_path, fleet=str(fleet), num_clients=2), {"partition-id": 0}, ArrayRecord(), 1)
    assert adapt.info["status"] == "ok" and adapt.info["adapted"] is True
    assert adapt.metrics["batch_size"] < 32 and "adapted from lora r=4 batch=32" in adapt.info["chosen"]
    assert adapt.metrics["peak_memory_bytes"] <= adapt.metrics["ram_budget_bytes"]

    strict_cfg = small_config(tmp_path, fleet=str(fleet), num_clients=2, budget_policy="strict")
    strict = client_round(strict_cfg, {"partition-id": 0}, ArrayRecord(), 1)
    assert strict.info["status"] == "over_budget" and strict.info["error"]
    assert strict.metrics["bytes_up"] == 0 and len(strict.arrays) == 0 and strict.metrics["steps"] == 0


def test_adapt_falls_back_to_a_cheaper_method_when_nothing_else_fits(tmp_path):
    cfg = small_config(tmp_path, method="fft")
    fft_min = step_cost(cfg, "fft", None, 2, 10).peak_bytes
    lora_min = step_cost(cfg, "lora", 4, 2, 10).peak_bytes
    assert lora_min < fft_min
    fleet = tmp_path / "tiny.toml"
    fleet.write_text(f'[[client]]\ndevice = "esp32_s3"\nram_train_bytes = {(lora_min + fft_min) // 2}\navailability = 1.0\n')
    reply = client_round(small_config(tmp_path, method="fft", fleet=str(fleet), num_clients=1),
                         {"partition-id": 0}, ArrayRecord(), 1)
    assert reply.info["status"] == "ok" and reply.info["method"] == "lora", reply.info
    assert "adapted from fft" in reply.info["chosen"]
    assert reply.metrics["peak_memory_bytes"] <= reply.metrics["ram_budget_bytes"]


def test_flop_budget_bounds_local_steps(tmp_path):
    cfg = small_config(tmp_path)
    cost = step_cost(cfg, "lora", 4, 32, 10)
    per_step = cost.total_flops
    reply = client_round(small_config(tmp_path, max_flops_per_round=3.5 * per_step), {"partition-id": 0}, ArrayRecord(), 1)
    assert reply.metrics["steps"] == 3
    assert reply.metrics["flops.total"] == 3 * per_step
    from fedpeft.devices import compute_time_s, load_catalog

    device = load_catalog()["raspberry_pi_4_4gb"]  # partition 0 of the test fleet
    # device time is the roofline of one step's FLOPs and memory traffic, times the steps
    assert math.isclose(reply.metrics["compute_s"], 3 * compute_time_s(device, per_step, cost.traffic))
    assert reply.metrics["compute_s"] > 3 * per_step / device.flops_per_s  # the memory term counts
    assert math.isclose(reply.metrics["energy_j"], device.power_w * (reply.metrics["compute_s"] + reply.metrics["comm_s"]))


def test_real_board_node_config_names_its_device(tmp_path):
    cfg = small_config(tmp_path)
    reply = client_round(cfg, {"partition-id": 2, "device": "raspberry_pi_5"}, ArrayRecord(), 1)
    assert reply.info["device"] == "raspberry_pi_5"
    with pytest.raises(UsageError, match="device"):
        client_round(cfg, {"partition-id": 2, "device": "toaster"}, ArrayRecord(), 1)


def test_bad_run_config_names_the_field():
    with pytest.raises(UsageError, match="^lora_mode"):
        RunConfig.from_mapping({"lora-mode": "average"})
    with pytest.raises(UsageError, match="^config: unknown field 'colour'"):
        RunConfig.from_mapping({"colour": "red"})
    with pytest.raises(UsageError, match="^rounds"):
        RunConfig.from_mapping({"rounds": "two"})


# -- a real Flower simulation on Ray ---------------------------------------------------------------
def ray_processes(grace_s: float = 10.0):
    """Ray processes still running under this test process. A zombie (exited, not yet reaped) or a
    process gone between listing and reading is not left behind; Ray's shutdown is asynchronous,
    so survivors get a short grace period (CI once caught a zombie mid-reap)."""

    def running_ray():
        found = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and "ray" in " ".join(proc.cmdline()).lower():
                    found.append(proc)
            except psutil.Error:  # gone, or a zombie, between listing and reading
                continue
        return found

    deadline = time.monotonic() + grace_s
    while (found := running_ray()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def test_ray_processes_passes_over_a_zombie_but_not_a_running_process():
    """Reproduces CI's failure at stop 15: an exited, unreaped child made the check raise."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass  # fake ray worker"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)  # fake ray worker"])
    try:
        for _ in range(100):  # wait until the first has exited; nobody reaps it yet
            if psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.05)
        assert psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE
        assert [p.pid for p in ray_processes(grace_s=0.5)] == [running.pid]
    finally:
        running.kill()
        running.wait()
        zombie.wait()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "taskedge", "taskedge_lora"])
def test_simulation_logs_every_client_every_round_and_survives_faults(tmp_path, method):
    from fedpeft.fleet.simulation import run_fleet

    cfg = small_config(tmp_path, method=method, fail_clients="1", corrupt_clients="2")
    assert cfg.shares_mask == (method == "taskedge_lora")
    summary = run_fleet(cfg)
    run = tmp_path / "run"
    clients = [json.loads(line) for line in (run / "clients.jsonl").read_text().splitlines()]
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]

    # A shared mask costs one calibration exchange before round 1, logged as round 0.
    calibration = [rec for rec in clients if rec["round"] == 0]
    assert len(calibration) == (cfg.num_clients if cfg.shares_mask else 0)
    for rec in calibration:
        assert rec["status"] == "ok" and rec["bytes_up"] > 0 and rec["flops"]["forward"] > 0
    clients = [rec for rec in clients if rec["round"] > 0]
    assert len(clients) == cfg.num_clients * cfg.rounds
    by_status = {}
    for rec in clients:
        by_status.setdefault(rec["status"], []).append(rec)
    # Client 1 crashes each round: Flower's error reply reaches the server, which logs it and goes on.
    assert len(by_status["failed"]) == cfg.rounds and "injected failure" in by_status["failed"][0]["error"]
    assert len(by_status["rejected"]) == cfg.rounds and all(r["client_id"] == 2 for r in by_status["rejected"])
    ok = by_status["ok"]
    assert len(ok) == 2 * cfg.rounds
    for rec in ok:
        assert CLIENT_FIELDS <= set(rec), CLIENT_FIELDS - set(rec)
        assert rec["bytes_up"] > 0 and rec["flops"]["total"] > 0 and rec["peak_memory_bytes"] > 0
        assert rec["device_time_s"] > 0 and rec["energy_j"] > 0 and rec["examples"] > 0
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert ROUND_FIELDS <= set(r) and isinstance(r["accuracy"], float) and 0 <= r["accuracy"] <= 1
    assert rounds[1]["clients_ok"] == 2 and rounds[1]["clients_failed"] == 1 and rounds[1]["clients_rejected"] == 1

    # Only adapter tensors crossed: the saved global state holds nothing else.
    global_state = torch.load(run / "global_adapter.pt", weights_only=True)
    assert global_state and all(is_adapter_key(method, k) for k in global_state)
    # The tiny, briefly pre-trained model may sit at one predicted class; its loss still moves.
    assert rounds[2]["loss"] != rounds[0]["loss"], "the global adapter changed nothing"
    for name in ("summary.json", "accuracy.png", "uplink.png", "memory.png", "device_time.png"):
        assert (run / name).stat().st_size > 0, name
    assert summary["rounds"] == 2 and summary["status_counts"]["ok"] == len(ok) + len(calibration)
    assert not ray_processes(), "the run left Ray processes behind"


def test_a_client_whose_round_breaks_reports_failed_with_its_device(tmp_path):
    cfg = small_config(tmp_path)
    broken = encode({"classifier.1.weight": torch.zeros(3, 3)})[0]  # a global state of the wrong shape
    reply = client_round(cfg, {"partition-id": 3}, broken, server_round=2)
    assert reply.info["status"] == "failed" and reply.info["device"] == "jetson_orin_nano"
    assert reply.metrics["client_id"] == 3 and reply.metrics["bytes_up"] == 0 and len(reply.arrays) == 0
    assert reply.metrics["bytes_down"] == record_bytes(broken) > 0 and reply.info["error"]


# -- aggregation modes as clients see them -----------------------------------------------------------
def test_ffa_client_trains_and_sends_only_b(tmp_path):
    cfg = small_config(tmp_path, lora_mode="ffa")
    reply = client_round(cfg, {"partition-id": 0}, ArrayRecord(), 1)
    keys = set(decode(reply.arrays))
    assert keys and not any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)


def test_exact_mode_gives_a_lower_rank_client_its_own_rank(tmp_path):
    from clients.local_update import _refactor_lora
    from fedpeft.fleet import setup
    from strategies.aggregation import lora_effective_update, lora_pairs

    cfg = small_config(tmp_path, lora_mode="exact")
    first = decode(client_round(cfg, {"partition-id": 0}, ArrayRecord(), 1).arrays)  # rank 4
    mine = _refactor_lora(cfg, first, rank=2)
    pairs = lora_pairs(mine)
    assert pairs and all(mine[a].shape[0] == 2 for a in pairs)
    # The rank-2 factors are the best rank-2 approximation of the global update: never larger than it.
    a_key = next(iter(pairs))
    full = lora_effective_update(first, a_key, lora_alpha=cfg.alpha)
    low = lora_effective_update(mine, a_key, lora_alpha=cfg.alpha)
    assert torch.linalg.matrix_rank(low.double()) <= 2 and torch.linalg.norm(low) <= torch.linalg.norm(full) * 1.0001
    adapter = setup.attach(cfg, "lora", 2, calibration=None)
    adapter.start_from(mine)  # loads cleanly into a rank-2 adapter


def test_fedbn_keeps_batchnorm_on_the_device(tmp_path):
    cfg = small_config(tmp_path, method="bn_head", fedbn=True)
    reply = client_round(cfg, {"partition-id": 0}, ArrayRecord(), 1)
    sent = decode(reply.arrays)
    assert sent and all(k.startswith("classifier.") for k in sent), sorted(sent)[:5]
    local = torch.load(tmp_path / "run" / "client_state" / "bn-0.pt", weights_only=True)
    assert local and all("running_mean" in k or "running_var" in k or "num_batches" in k or k.endswith(("weight", "bias"))
                         for k in local)


@pytest.mark.slow
def strategy_for(cfg, tmp_path):
    """The server's strategy as server_app builds it, without a Grid (aggregation only)."""
    from fedpeft.fleet import setup
    from fedpeft.fleet.runlog import RunLog
    from strategies.adapter_fedavg import AdapterFedAvg
    from strategies.aggregation import client_upload
    from strategies.server_app import _examples_cap, _taskedge_numels

    adapter = setup.attach(cfg, cfg.method, cfg.rank, calibration=None)
    template = client_upload(cfg, adapter.delta(), adapter.model)
    return AdapterFedAvg(cfg, RunLog(tmp_path / "log", cfg.to_dict()), template, template,
                         numels=_taskedge_numels(adapter), examples_cap=_examples_cap(cfg))


def test_ffa_clients_upload_only_b_and_the_server_averages_it(tmp_path):
    cfg = small_config(tmp_path, lora_mode="ffa")
    strategy = strategy_for(cfg, tmp_path)
    assert strategy.global_delta and not any("lora_A" in k for k in strategy.global_delta)
    record, _ = encode(strategy.global_delta)
    deltas = [decode(client_round(cfg, {"partition-id": pid}, record, 1).arrays) for pid in (0, 1)]
    merged = strategy._aggregate(deltas, [1.0, 3.0])
    assert merged.keys() == strategy.global_delta.keys()
    key = next(k for k in merged if "lora_B" in k)
    assert not torch.equal(deltas[0][key], deltas[1][key])
    torch.testing.assert_close(merged[key], 0.25 * deltas[0][key] + 0.75 * deltas[1][key])


def test_shared_mask_is_the_mask_of_the_whole_fleets_data_and_clients_upload_values_only(tmp_path):
    from clients.local_update import calibration_round
    from fedpeft.fleet import setup

    cfg = small_config(tmp_path, method="taskedge", taskedge_mask="shared", density=0.05)  # enough entries to tell data apart
    replies = [calibration_round(cfg, {"partition-id": pid}) for pid in (0, 1)]
    assert all(r.info["status"] == "ok" and r.metrics["bytes_up"] == record_bytes(r.arrays) for r in replies)
    parts = [decode(r.arrays) for r in replies]
    sums = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    # Summed statistics give exactly the mask of one calibration over both clients' data.
    both = torch.cat([setup.client_data(cfg, pid).images[: setup.CALIBRATION_EXAMPLES] for pid in (0, 1)])
    from_sums = setup.attach(cfg, "taskedge", None, calibration=sums).delta()
    pooled = setup.attach(cfg, "taskedge", None, calibration=both).delta()
    alone = setup.attach(cfg, "taskedge", None, calibration=both[: setup.CALIBRATION_EXAMPLES]).delta()
    idx = [k for k in pooled if k.endswith(".indices")]
    assert all(torch.equal(from_sums[k], pooled[k]) for k in idx)
    assert any(not torch.equal(alone[k], pooled[k]) for k in idx), "one client's data gives the same mask"
    assert all(from_sums[k].dtype == torch.int32 for k in idx)  # half of int64's bytes on the wire

    strategy = strategy_for(cfg, tmp_path)
    strategy.global_delta = from_sums
    record, _ = encode(from_sums)
    deltas = [decode(client_round(cfg, {"partition-id": pid}, record, 1).arrays) for pid in (0, 1)]
    assert all(not any(k.endswith(".indices") for k in d) for d in deltas)
    merged = strategy._aggregate(deltas, [1.0, 1.0])
    assert all(torch.equal(merged[k], from_sums[k]) for k in idx)
    key = next(k for k in deltas[0] if k.endswith(".values"))
    torch.testing.assert_close(merged[key], (deltas[0][key] + deltas[1][key]) / 2)


def test_server_rejects_bad_sparse_uploads_instead_of_failing(tmp_path):
    cfg = small_config(tmp_path, method="taskedge")
    strategy = strategy_for(cfg, tmp_path)
    good = decode(client_round(cfg, {"partition-id": 0}, ArrayRecord(), 1).arrays)
    strategy.decode_delta(encode(good)[0])
    key = next(k for k in good if k.endswith(".indices") and good[k].numel() >= 2)  # at 0.1% some layers get < 2
    out_of_range = {**good, key: good[key] + 10**8}
    duplicated = {**good, key: torch.zeros_like(good[key])}
    for bad in (out_of_range, duplicated):
        with pytest.raises(UsageError):
            strategy.decode_delta(encode(bad)[0])
