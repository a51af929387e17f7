"""Memory traffic per op (fedpeft.profiling.traffic) and the roofline device time built on it."""
import re

import pytest
import torch
from torch import nn

import fedpeft  # noqa: F401  (torchvision shim)
from fedpeft.devices import Device, compute_time_s, load_catalog, roofline_time_s
from fedpeft.fleet.clock import client_timing
from fedpeft.profiling.traffic import INTENSITY_EDGES, TrafficMode, bucket_of, count_step_traffic

F32 = 4  # bytes per float32


def test_conv_and_linear_bytes_are_inputs_read_plus_outputs_written():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 3 * 3, 4))
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad(), TrafficMode() as mode:
        model(x)
    conv = F32 * (2 * 2 * 5 * 5 + 3 * 2 * 3 * 3 + 3 + 2 * 3 * 3 * 3)  # x, weight, bias read; output written
    linear = F32 * (4 + 2 * 27 + 27 * 4 + 2 * 4)  # addmm: bias, input, weight^T (a view) read; output written
    assert mode.bytes["forward"] == conv + linear  # flatten and t() are views: no bytes
    assert mode.flops["forward"] == 2 * (2 * 3 * 3 * 3 * 2 * 3 * 3) + 2 * (2 * 27 * 4)
    assert mode.ops["forward"] == 2


def test_step_traffic_has_every_phase_and_buckets_that_add_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    count_step_traffic(model, opt, x, y)  # warm-up: the optimizer state exists from now on
    t = count_step_traffic(model, opt, x, y)
    assert t.forward > 0 and t.backward > 0 and t.optimizer > 0
    d = t.to_dict()
    assert d["total"] == d["forward"] + d["backward"] + d["optimizer"] == sum(d["bucket_bytes"])
    assert len(d["bucket_bytes"]) == len(d["bucket_flops"]) == len(INTENSITY_EDGES)
    params = sum(p.numel() for p in model.parameters())
    assert t.optimizer >= 4 * F32 * params  # AdamW reads and writes at least param, grad and 2 moments


def test_bucket_of_orders_ops_by_intensity():
    assert bucket_of(0, 100) == 0  # no counted FLOPs: the memory-bound bucket
    assert bucket_of(1, 10 ** 6) == 0  # below the lowest edge
    assert bucket_of(100, 100) == INTENSITY_EDGES.index(1.0)
    assert bucket_of(10 ** 9, 1) == len(INTENSITY_EDGES) - 1


def traffic(flops_bytes: dict[int, tuple[int, int]]) -> dict:
    f, b = [0] * len(INTENSITY_EDGES), [0] * len(INTENSITY_EDGES)
    for i, (fl, by) in flops_bytes.items():
        f[i], b[i] = fl, by
    return {"bucket_flops": f, "bucket_bytes": b, "total": sum(b)}


def test_roofline_is_the_max_per_bucket_and_flops_over_f_when_compute_bound():
    F, B = 1e9, 1e8  # ridge: 10 FLOP/byte
    compute_bound = traffic({15: (2e9, 1e6), 12: (1e9, 5e6)})  # 2000 and 200 FLOP/byte
    assert roofline_time_s(3e9, compute_bound, F, B) == pytest.approx(3e9 / F)
    memory_bound = traffic({0: (0, 4e8), 3: (1e6, 1e8)})
    assert roofline_time_s(1e6, memory_bound, F, B) == pytest.approx((4e8 + 1e8) / B)
    mixed = traffic({15: (2e9, 1e6), 0: (0, 3e8)})
    assert roofline_time_s(2e9, mixed, F, B) == pytest.approx(2.0 + 3.0)  # each bucket bound by its own roof
    # FLOPs the op formulas miss (element-wise, analytic) join bucket 0, where the bytes dominate here
    assert roofline_time_s(2e9 + 1e6, mixed, F, B) == pytest.approx(2.0 + 3.0)


def test_every_catalog_device_has_a_memory_bandwidth_with_its_source():
    text = (fedpeft.__path__[0] + "/devices.toml")
    lines = open(text, encoding="utf-8").read().splitlines()
    for name, device in load_catalog().items():
        assert device.memory_bytes_per_s is not None and device.memory_bytes_per_s > 0, name
    seen = 0
    for i, line in enumerate(lines):
        if re.match(r"\s*memory_bytes_per_s\s*=", line):
            seen += 1
            comment = []
            j = i - 1
            while j >= 0 and lines[j].startswith("#"):
                comment.insert(0, lines[j])
                j -= 1
            note = " ".join(comment)
            assert re.search(r"[GM]B/s", note), f"line {i + 1}: no bandwidth figure in the comment"
            assert re.search(r"Estimate|data ?sheet|spec|measure", note, re.I), f"line {i + 1}: no source"
    assert seen >= 7  # one per base device (the Pi 4 variants inherit theirs)


def test_memory_bound_model_takes_longer_than_its_flops_alone_on_a_device():
    from fedpeft.profiling import profile_step

    cost = profile_step("mobilenet_v2_035", "bn_head", input_size=32, batch_size=4)
    assert cost.traffic["total"] > 0 and set(cost.to_dict()["traffic"]) >= {"forward", "backward", "optimizer", "total"}
    pi4 = load_catalog()["raspberry_pi_4_4gb"]
    flops_only = cost.total_flops / pi4.flops_per_s
    assert compute_time_s(pi4, cost.total_flops) == pytest.approx(flops_only)  # no traffic: as before
    roofline = compute_time_s(pi4, cost.total_flops, cost.traffic)
    assert roofline > 1.5 * flops_only
    timing = client_timing(pi4, cost.total_flops, 10, 0, 0, traffic_per_step=cost.traffic)
    assert timing.compute_s == pytest.approx(10 * roofline)
    no_bandwidth = Device(**{**pi4.to_dict(), "memory_bytes_per_s": None})
    assert compute_time_s(no_bandwidth, cost.total_flops, cost.traffic) == pytest.approx(flops_only)


def test_a_clients_jsonl_line_with_traffic_plans_roofline_time():
    from fedpeft.fleet.clock import plan_from_record

    board = Device(name="b", ram_train_bytes=10 ** 9, flops_per_s=1e9, uplink_bps=8e6, downlink_bps=8e6, power_w=1.0,
                   availability=1.0, memory_bytes_per_s=1e8)
    step = traffic({15: (1e9, 1e6), 0: (0, 2e8)})  # 1 s of compute-bound work, 2 s of memory-bound work
    rec = {"client_id": 0, "steps": 4, "flops_per_step": 1e9, "bytes_up": 0, "bytes_down": 0}
    assert plan_from_record(rec, board).timing.compute_s == pytest.approx(4 * 1.0)  # no traffic: FLOPs only
    assert plan_from_record({**rec, "traffic_per_step": step}, board).timing.compute_s == pytest.approx(4 * 3.0)


def test_a_device_without_a_bandwidth_round_trips_and_times_by_flops():
    bare = Device(name="x", ram_train_bytes=1, flops_per_s=2.0, uplink_bps=1.0, downlink_bps=1.0, power_w=1.0,
                  availability=1.0)
    assert Device.from_dict(bare.to_dict()) == bare  # to_dict's None for unset optional fields is accepted
    assert compute_time_s(bare, 4.0, traffic({0: (0, 10 ** 9)})) == 2.0


def test_indexing_ops_count_only_the_elements_they_index():
    big = torch.randn(1000, 8)
    rows = torch.tensor([3, 7])
    src = torch.randn(2, 8)
    index_bytes = rows.numel() * rows.element_size()
    with torch.no_grad(), TrafficMode() as mode:
        big.index_select(0, rows)  # reads 2 rows, writes 2 rows
        big.index_copy_(0, rows, src)  # reads src, writes 2 rows of big
        big[rows]  # aten.index: as index_select
    assert mode.ops["forward"] == 3
    assert mode.bytes["forward"] == 3 * (index_bytes + 2 * 2 * 8 * F32)  # not 1000 x 8 x 4 bytes per op
