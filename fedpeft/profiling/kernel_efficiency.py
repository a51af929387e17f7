"""How close a machine's kernels come to the roofline, per op class, measured by microbenchmarks.

The roofline (fedpeft.devices.roofline_time_s) assumes every op runs at the machine's sustained
FLOP/s F or memory bandwidth B, whichever binds. Real CPU kernels at the small shapes of edge
training do not: a depthwise conv's weight gradient at 32x32 runs ~30x below its roofline, BatchNorm ~5x,
and every op pays a fixed cost (dispatch, allocation) however small it is. This module measures,
on the machine it runs on,

  overhead_s[c]   for each op class c (fedpeft.profiling.traffic.OP_CLASSES): the time of one
                  class-c op with next to no work (dispatch, allocation, the kernel library's
                  set-up: ~1 us for an add, tens of us for a CPU conv), charged once per kernel
                  (an op, or each gradient of a conv backward: traffic.op_parts);
  efficiency[c]   the roofline time of a set of class-c ops at generic CNN shapes over their
                  measured time less their overhead, so 1.0 = at the roof, 0.1 = ten times slower;

and predicts a step from its profile's per-class traffic:

  time = sum over intensity buckets of max(sum_c flops_cb / e_c / F, sum_c bytes_cb / e_c / B)
         + sum_c kernels_c x overhead_s[c]

With every efficiency 1 and no overhead this is exactly the roofline. The microbenchmarks use a
ladder of shapes not taken from any model, batch 32: (channels, map size) = (32, 16), (64, 8),
(128, 4), (256, 2), (512, 1), the pattern of a CNN at a small input (channels double as the map
halves; every rung of a 3x3 conv has the same FLOPs), with a 4x wider layer per rung (bottleneck
and inverted-residual blocks): dense 3x3 c -> c and 1x1 c -> 4c -> c convs, 3x3 and 5x5 depthwise
convs on 4c channels, matmuls of a batch of 32 rows, BatchNorm on 4c channels, element-wise ops
on the wide activations and torch's AdamW on the rungs' weights. They never time a model's step, so
a step predicted with them is a prediction, not a fit. Everything runs on the calling thread;
set torch.set_num_threads(1) first to measure one core, as experiments/benchmarks/step_time.py does.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch

from fedpeft.profiling.traffic import INTENSITY_EDGES, OP_CLASSES, TrafficMode

aten = torch.ops.aten
RUNGS = ((32, 16), (64, 8), (128, 4), (256, 2), (512, 1))  # (channels, map size)
TINY_RUNG = (2, 2)  # 8 channels on the wide layers, a 2x2 map: an op's fixed cost, next to no work
BATCH = 32


def calibrated_time_s(total_flops: float, traffic: Mapping, flops_per_s: float, bytes_per_s: float,
                      efficiency: Mapping[str, float], overhead_s: float | Mapping[str, float] = 0.0) -> float:
    """Seconds of a step whose profile `traffic` holds per-class buckets (class_bucket_flops/bytes,
    class_kernels), on a machine with roofs F, B, class efficiencies and a fixed cost per kernel call
    (seconds, one for every class or per class).

    The step's FLOPs the op formulas do not count (total_flops minus the buckets') join class
    "other", bucket 0, as in the roofline. A class missing from `efficiency` counts as 1, one
    missing from a per-class `overhead_s` as 0."""
    n = len(INTENSITY_EDGES)
    work_f, work_b = [0.0] * n, [0.0] * n
    for c, flops in traffic["class_bucket_flops"].items():
        e = float(efficiency.get(c, 1.0))
        for i, (f, b) in enumerate(zip(flops, traffic["class_bucket_bytes"][c])):
            work_f[i] += f / e
            work_b[i] += b / e
    counted = sum(sum(v) for v in traffic["class_bucket_flops"].values())
    work_f[0] += max(0.0, float(total_flops) - counted) / float(efficiency.get("other", 1.0))
    per_op = overhead_s if isinstance(overhead_s, Mapping) else {c: overhead_s for c in traffic["class_kernels"]}
    fixed = sum(n * float(per_op.get(c, 0.0)) for c, n in traffic["class_kernels"].items())
    return sum(max(f / flops_per_s, b / bytes_per_s) for f, b in zip(work_f, work_b)) + fixed


def median_thread_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median CPU seconds of this thread per call of `fn`, over `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen)


def _conv_cases(gen, depthwise: bool, rungs):
    """(input, weight, padding, groups) per rung: depthwise 3x3 and 5x5 on 4c channels (the expanded
    width they sit on); dense 3x3 c -> c and the 1x1 pair c -> 4c -> c (expansion, projection)."""
    cases = []
    for c, s in rungs:
        if depthwise:
            x = _rand(BATCH, 4 * c, s, s, gen=gen)
            cases += [(x, _rand(4 * c, 1, k, k, gen=gen), k // 2, 4 * c) for k in (3, 5)]
        else:
            x, wide = _rand(BATCH, c, s, s, gen=gen), _rand(BATCH, 4 * c, s, s, gen=gen)
            cases += [(x, _rand(c, c, 3, 3, gen=gen), 1, 1), (x, _rand(4 * c, c, 1, 1, gen=gen), 0, 1),
                      (wide, _rand(c, 4 * c, 1, 1, gen=gen), 0, 1)]
    return cases


def _conv_forward(cases):
    def run():
        for x, w, p, g in cases:
            aten.convolution(x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], g)
    return run


def _conv_backward(cases, mask):
    """One gradient of each case's conv: mask [True, False, False] the input's, [False, True, False]
    the weight's."""
    # stride 1, same padding: the output has the input's map size and the weight's channels
    grads = [torch.ones(x.shape[0], w.shape[0], *x.shape[2:]) for x, w, *_ in cases]

    def run():
        for go, (x, w, p, g) in zip(grads, cases):
            aten.convolution_backward(go, x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], g, mask)
    return run


def _matmul(gen, rungs):
    pairs = []
    for c, _ in rungs:
        x, w = _rand(BATCH, c, gen=gen), _rand(c, 2 * c, gen=gen)
        pairs += [(x, w), (_rand(2 * c, BATCH, gen=gen), x)]  # forward; a weight gradient (c_out x batch) @ (batch x c)
    return lambda: [aten.mm(a, b) for a, b in pairs]


def _batch_norm(gen, rungs):
    cases = []
    for c, s in rungs:
        x = _rand(BATCH, 4 * c, s, s, gen=gen)  # 4x: BatchNorm also sits on the expanded (wide) layers
        w, b = torch.ones(4 * c), torch.zeros(4 * c)
        cases.append((x, w, b, torch.zeros(4 * c), torch.ones(4 * c)))

    def run():
        for x, w, b, rm, rv in cases:
            out, mean, invstd = aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
            aten.native_batch_norm_backward(out, x, w, rm, rv, mean, invstd, True, 1e-5, [True, True, True])
    return run


def _elementwise(gen, rungs):
    """An activation's forward and backward, a residual add and a copy at each rung's wide layer;
    torch's AdamW (single-tensor, as a client's optimizer runs on CPU) on the rungs' weights."""
    acts = [_rand(BATCH, 4 * c, s, s, gen=gen) for c, s in rungs]
    params = []
    for c, _ in rungs:
        params += [_rand(c, c, 3, 3, gen=gen), _rand(4 * c, c, 1, 1, gen=gen), _rand(c, 4 * c, 1, 1, gen=gen),
                   _rand(4 * c, gen=gen)]
    params = [torch.nn.Parameter(p) for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=False)

    def run():
        for a in acts:
            y = aten.relu(a)
            aten.threshold_backward(a, y, 0.0)
            aten.add(a, y)
            aten.clone(a)
        optimizer.step()
    return run


def _benchmarks(gen, rungs) -> dict[str, Callable[[], object]]:
    dense, depthwise = _conv_cases(gen, False, rungs), _conv_cases(gen, True, rungs)
    to_input, to_weight = [True, False, False], [False, True, False]
    return {"conv": _conv_forward(dense), "conv_grad_input": _conv_backward(dense, to_input),
            "conv_grad_weight": _conv_backward(dense, to_weight), "depthwise_conv": _conv_forward(depthwise),
            "depthwise_grad_input": _conv_backward(depthwise, to_input),
            "depthwise_grad_weight": _conv_backward(depthwise, to_weight),
            "matmul": _matmul(gen, rungs), "batch_norm": _batch_norm(gen, rungs), "other": _elementwise(gen, rungs)}


def _counted(cls: str, run: Callable[[], object], flops_per_s: float, bytes_per_s: float) -> tuple[int, float]:
    """Kernel calls and roofline seconds of one call of a class's microbenchmark (TrafficMode)."""
    with TrafficMode() as mode:
        run()
    stray = [c for c in OP_CLASSES if c != cls and mode.class_kernels[c]]
    if stray:  # the microbenchmark of a class must run that class's ops only
        raise RuntimeError(f"kernel microbenchmark {cls!r} ran ops of class(es) {stray}")
    roof = sum(max(f / flops_per_s, b / bytes_per_s)
               for f, b in zip(mode.class_bucket_flops[cls], mode.class_bucket_bytes[cls]))
    return mode.class_kernels[cls], roof


def measure_kernel_efficiency(flops_per_s: float, bytes_per_s: float, repeats: int = 5) -> dict:
    """Each class's fixed cost per kernel call and efficiency on this machine, against roofs F and B.

    Overhead of class c: the time per kernel call of c's microbenchmark on TINY_RUNG (8 wide channels on a
    2x2 map, batch 32: no work to speak of, so what is left is the op's fixed cost: dispatch,
    allocation, the kernel library's set-up, which for a CPU conv is tens of microseconds).
    Efficiency of class c: the roofline seconds of c's microbenchmark on RUNGS over its measured
    seconds less its kernel calls' overhead.

    Returns {"overhead_s": {class: s}, "efficiency": {class: e}, "classes": {class: {kernels, seconds,
    roofline_s}}}."""
    gen = torch.Generator().manual_seed(0)
    result = {"overhead_s": {}, "efficiency": {}, "classes": {}}
    tiny = _benchmarks(gen, (TINY_RUNG,))
    for cls, run in _benchmarks(gen, RUNGS).items():
        tiny_kernels, _ = _counted(cls, tiny[cls], flops_per_s, bytes_per_s)
        overhead = median_thread_time(tiny[cls], repeats) / tiny_kernels
        kernels, roof = _counted(cls, run, flops_per_s, bytes_per_s)
        seconds = median_thread_time(run, repeats)
        work = max(seconds - kernels * overhead, 0.05 * seconds)  # the overhead never explains it all
        result["overhead_s"][cls] = overhead
        result["efficiency"][cls] = roof / work
        result["classes"][cls] = {"kernels": kernels, "seconds": seconds, "roofline_s": roof}
    return result
