"""Op classes in the step's traffic and the kernel-efficiency calibrated device time
(fedpeft.profiling.traffic.op_class, fedpeft.profiling.kernel_efficiency)."""
import pytest
import torch
from torch import nn

import fedpeft  # noqa: F401  (torchvision shim)
from fedpeft.devices import roofline_time_s
from fedpeft.profiling.kernel_efficiency import calibrated_time_s, measure_kernel_efficiency
from fedpeft.profiling.traffic import OP_CLASSES, count_step_traffic


def tiny_step_traffic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=8),  # depthwise
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    count_step_traffic(model, opt, x, y)  # warm-up: the optimizer state exists from now on
    return count_step_traffic(model, opt, x, y).to_dict()


def test_ops_land_in_their_class_and_the_classes_add_up_to_the_step():
    t = tiny_step_traffic()
    kernels = t["class_kernels"]
    assert set(kernels) == set(OP_CLASSES)
    assert kernels["conv"] == 1 and kernels["depthwise_conv"] == 1  # groups > 1: the depthwise class
    assert kernels["conv_grad_input"] == 0 and kernels["conv_grad_weight"] == 1  # the input needs no gradient
    assert kernels["depthwise_grad_input"] == kernels["depthwise_grad_weight"] == 1  # one op, two kernels
    assert kernels["batch_norm"] == 2  # native_batch_norm and its backward
    assert kernels["matmul"] >= 2  # the linear layer's addmm and its weight/input gradients' mm
    assert kernels["other"] > 0 and sum(kernels.values()) == t["ops"] + 1  # + the depthwise backward's 2nd
    for key, per_class in (("bucket_flops", "class_bucket_flops"), ("bucket_bytes", "class_bucket_bytes")):
        summed = [sum(t[per_class][c][i] for c in OP_CLASSES) for i in range(len(t[key]))]
        assert summed == t[key]
    assert sum(t["class_bucket_bytes"]["depthwise_grad_weight"]) > 0
    assert sum(t["class_bucket_flops"]["other"]) == 0  # the FLOP formulas count matmul and conv only


def test_calibrated_time_with_unit_efficiency_and_no_overhead_is_the_roofline():
    t = tiny_step_traffic()
    counted = sum(t["bucket_flops"])
    ones = {c: 1.0 for c in OP_CLASSES}
    for F, B in ((1e9, 1e8), (1e11, 1e10), (5e10, 1e11)):
        for total in (counted, counted + 10 ** 6):  # FLOPs the formulas miss join bucket 0 in both
            assert calibrated_time_s(total, t, F, B, ones, 0.0) == pytest.approx(roofline_time_s(total, t, F, B))
    base = calibrated_time_s(counted, t, 1e9, 1e8, ones, 0.0)
    assert calibrated_time_s(counted, t, 1e9, 1e8, ones, 1e-6) == pytest.approx(base + sum(t["class_kernels"].values()) * 1e-6)
    per_class = {"conv": 1e-3, "other": 1e-6}  # classes not named cost nothing per op
    assert calibrated_time_s(counted, t, 1e9, 1e8, ones, per_class) == pytest.approx(
        base + t["class_kernels"]["conv"] * 1e-3 + t["class_kernels"]["other"] * 1e-6)
    slow_dw = calibrated_time_s(counted, t, 1e9, 1e8, {**ones, "depthwise_grad_weight": 0.1}, 0.0)
    assert slow_dw > base  # a class below its roof takes longer


def test_microbenchmarks_measure_every_class_and_find_the_depthwise_weight_gradient_far_below_its_roof():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        k = measure_kernel_efficiency(1e11, 2e10, repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert set(k["efficiency"]) == set(k["overhead_s"]) == set(OP_CLASSES)
    assert all(0 < o < 1e-3 for o in k["overhead_s"].values())
    assert all(e > 0 and k["classes"][c]["kernels"] > 0 for c, e in k["efficiency"].items())
    # the effect the calibration exists for: a CPU's depthwise weight gradient runs far below the dense conv's rate
    assert k["efficiency"]["depthwise_grad_weight"] < 0.5 * k["efficiency"]["conv_grad_weight"]


def test_a_profile_carries_its_traffic_per_op_class():
    from fedpeft.profiling import profile_step

    cost = profile_step("mobilenet_v2_035", "bn_head", input_size=32, batch_size=4)
    traffic = cost.to_dict()["traffic"]
    assert set(traffic["class_kernels"]) == set(OP_CLASSES)
    assert sum(traffic["class_kernels"].values()) >= traffic["ops"]
    assert traffic["class_kernels"]["depthwise_conv"] > 0 and traffic["class_kernels"]["batch_norm"] > 0
    assert sum(sum(v) for v in traffic["class_bucket_bytes"].values()) == traffic["total"]
