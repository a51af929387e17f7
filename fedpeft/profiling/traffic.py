"""Memory traffic of one training step, per aten op, and its split by arithmetic intensity.

FLOPs alone mispredict step time: a depthwise conv, a BatchNorm or an optimizer update moves far
more bytes per FLOP than a dense conv, so it runs at the memory's pace, not the ALUs'. This
module counts, for every aten op the step dispatches (forward, backward, optimizer), the bytes it
moves: every tensor it reads (inputs) plus every tensor it writes (outputs), each counted
numel x element size (an expanded input, stride 0, counts its distinct elements once); an
indexing op (index_select, gather, index, index_copy_, ...) counts only the elements it indexes. Ops that
only make a view (`OpOverload.is_view`: view, t, transpose, expand, ...) and `detach` move
nothing and count 0. An in-place op (`add_`) reads and writes its target, so counts it twice.
Caches are ignored: this is the traffic a device with no cache reuse between ops would see.

A device turns (FLOPs, bytes) into time with the roofline, per op:

    time = max(flops / F, bytes / B)

F: the device's sustained FLOP/s, B: its memory bandwidth. The ridge point F / B differs per
device, so the profile cannot store per-op times; it stores the step's FLOPs and bytes summed
per *intensity bucket* (ops grouped by FLOPs per byte, buckets a factor 2 wide, INTENSITY_EDGES).
`roofline_time_s` applies max() per bucket, which equals the per-op sum except for ops in the one
bucket that straddles the ridge (there it errs by less than a factor 2 on that bucket's ops).
The FLOPs an op's formula does not count (element-wise work, FlopCounterMode counts matmul/conv
only) sit in bucket 0 with intensity 0: they take bytes / B.

Each op also has a *class* (OP_CLASSES: dense or depthwise/grouped conv, forward or backward,
matmul, batch norm, other), and the buckets are kept per class too (`class_bucket_flops`,
`class_bucket_bytes`; `class_kernels`: kernel calls, see op_parts): real kernels reach their roofs to very different degrees by
class (a CPU's depthwise conv weight gradient at 32x32 runs far below its roofline), and
fedpeft/profiling/kernel_efficiency.py scales each class by an efficiency measured on a machine.
Summed over the classes the per-class buckets are exactly the step's buckets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, shape_wrapper

from fedpeft.devices import roofline_time_s  # noqa: F401  (the device side of the roofline)
from fedpeft.profiling.flops import conv_backward_flop_exact

aten = torch.ops.aten

#: Lower edges of the intensity buckets, FLOPs per byte: bucket 0 holds intensity < 1/64 (and
#: every op without counted FLOPs), bucket i >= 1 holds [EDGES[i], EDGES[i+1]). Factor 2 apart.
INTENSITY_EDGES = (0.0,) + tuple(2.0 ** k for k in range(-6, 11))
PHASES = ("forward", "backward", "optimizer")
_NO_TRAFFIC = {aten.detach.default, aten.alias.default, aten.lift_fresh.default}
_FLOPS = {**flop_registry, aten.convolution_backward: shape_wrapper(conv_backward_flop_exact)}
#: Op classes whose kernels differ in how close they come to the roofline (see op_parts). A conv
#: backward is two kernels, the input gradient and the weight gradient, each its own class.
OP_CLASSES = ("conv", "conv_grad_input", "conv_grad_weight", "depthwise_conv", "depthwise_grad_input",
              "depthwise_grad_weight", "matmul", "batch_norm", "other")
_MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}


def op_class(func, args) -> str:
    """The class (OP_CLASSES) of an aten op other than a conv backward (see op_parts): convs by
    groups (> 1: depthwise/grouped), matmuls, batch norm (forward and backward), everything else
    (element-wise, copies, reductions, the optimizer's updates)."""
    packet = func._overloadpacket
    if packet == aten.convolution:
        return "depthwise_conv" if args[8] > 1 else "conv"
    if packet in _MATMULS:
        return "matmul"
    if "batch_norm" in packet.__name__:
        return "batch_norm"
    return "other"


def op_parts(func, args, kwargs, out) -> list[tuple[str, int, int]]:
    """(class, FLOPs, bytes) of each kernel an aten op runs: one, except a conv backward, which
    runs one per gradient it computes (output_mask): the input gradient reads grad_out and the
    weight and writes grad_input; the weight gradient (with the bias's) reads grad_out and the
    input and writes grad_weight. Their kernels reach very different rates (a CPU's depthwise
    weight gradient is far slower than its input gradient), and a frozen layer runs only the first."""
    formula = _FLOPS.get(func._overloadpacket)
    if func._overloadpacket != aten.convolution_backward:
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        return [(op_class(func, args), flops, op_bytes(args, kwargs, out, func))]
    grad_out, x, w, mask = args[0], args[1], args[2], args[10]
    kind = "depthwise_grad" if args[9] > 1 else "conv_grad"
    outs = [t if isinstance(t, torch.Tensor) else None for t in out]
    parts = []
    if mask[0]:
        flops = int(formula(*args[:10], [True, False, False], out_val=out))
        parts.append((f"{kind}_input", flops, tensor_bytes(grad_out) + tensor_bytes(w) + tensor_bytes(outs[0])))
    if mask[1] or mask[2]:
        flops = int(formula(*args[:10], [False, mask[1], mask[2]], out_val=out))
        written = sum(tensor_bytes(t) for t in outs[1:] if t is not None)
        parts.append((f"{kind}_weight", flops, tensor_bytes(grad_out) + tensor_bytes(x) + written))
    return parts


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements `t` addresses: numel x element size, a broadcast (stride-0) dim once."""
    if t.layout != torch.strided:
        return 0
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            distinct *= size
    return distinct * t.element_size() if t.numel() else 0


#: Ops that read only the elements they gather from their first argument (as many as they write)
_GATHERS = {aten.index_select, aten.gather, aten.index}
#: In-place ops that write their source's elements into their first argument at an index, leaving the
#: rest of it untouched: they move the source (read, written; index_add_ also reads what it adds to)
_SCATTERS = {aten.index_copy_: 2, aten.index_add_: 3, aten.scatter_: 2, aten.scatter_add_: 3}


def op_bytes(args, kwargs, out, func=None) -> int:
    """Bytes one op moves: every tensor argument read plus every tensor result written. An indexing
    op (`func` in _GATHERS, _SCATTERS) touches only the indexed elements of its first argument, not
    all of it: a gather reads what it writes, an in-place scatter moves its source."""
    flat_in, _ = tree_flatten((args, kwargs))
    flat_out, _ = tree_flatten(out)
    packet = getattr(func, "_overloadpacket", None)
    if packet in _GATHERS or packet in _SCATTERS:
        rest, _ = tree_flatten((args[1:], kwargs))  # indices (and a scatter's source)
        moved = sum(tensor_bytes(t) for t in rest if isinstance(t, torch.Tensor))
        if packet in _GATHERS:
            return moved + 2 * sum(tensor_bytes(t) for t in flat_out if isinstance(t, torch.Tensor))
        source = args[-1] if isinstance(args[-1], torch.Tensor) else kwargs.get("src", kwargs.get("source"))
        if isinstance(source, torch.Tensor):
            return moved + (_SCATTERS[packet] - 1) * tensor_bytes(source)
    return sum(tensor_bytes(t) for t in flat_in + flat_out if isinstance(t, torch.Tensor))


def bucket_of(flops: float, nbytes: float) -> int:
    """Index of the intensity bucket of an op with these FLOPs and bytes."""
    if flops <= 0 or nbytes <= 0:
        return 0 if flops <= 0 else len(INTENSITY_EDGES) - 1
    intensity = flops / nbytes
    for i in range(len(INTENSITY_EDGES) - 1, 0, -1):
        if intensity >= INTENSITY_EDGES[i]:
            return i
    return 0


class TrafficMode(TorchDispatchMode):
    """Counts bytes and (matmul/conv) FLOPs of every aten op run under it, by phase and bucket.

    Set `phase` before each part of the step ("forward", "backward", "optimizer")."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.bytes = {p: 0 for p in PHASES}
        self.flops = {p: 0 for p in PHASES}
        self.ops = {p: 0 for p in PHASES}
        self.bucket_flops = [0] * len(INTENSITY_EDGES)
        self.bucket_bytes = [0] * len(INTENSITY_EDGES)
        self.by_op: dict[str, int] = {}
        n = len(INTENSITY_EDGES)
        self.class_kernels = {c: 0 for c in OP_CLASSES}
        self.class_bucket_flops = {c: [0] * n for c in OP_CLASSES}
        self.class_bucket_bytes = {c: [0] * n for c in OP_CLASSES}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _NO_TRAFFIC or getattr(func, "is_view", False):
            return out
        moved = 0
        for cls, flops, nbytes in op_parts(func, args, kwargs, out):
            self.bytes[self.phase] += nbytes
            self.flops[self.phase] += flops
            b = bucket_of(flops, nbytes)
            self.bucket_flops[b] += flops
            self.bucket_bytes[b] += nbytes
            self.class_kernels[cls] += 1
            self.class_bucket_flops[cls][b] += flops
            self.class_bucket_bytes[cls][b] += nbytes
            moved += nbytes
        self.ops[self.phase] += 1
        name = str(func._overloadpacket.__name__)
        self.by_op[name] = self.by_op.get(name, 0) + moved
        return out


@dataclass
class StepTraffic:
    forward: int
    backward: int
    optimizer: int
    ops: int = 0
    #: FLOPs and bytes per intensity bucket (INTENSITY_EDGES); FLOPs: what the op formulas count
    bucket_flops: list = field(default_factory=list)
    bucket_bytes: list = field(default_factory=list)
    by_op: dict = field(default_factory=dict)
    #: per op class (OP_CLASSES): kernel calls (op_parts), and FLOPs and bytes per intensity bucket
    class_kernels: dict = field(default_factory=dict)
    class_bucket_flops: dict = field(default_factory=dict)
    class_bucket_bytes: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.optimizer

    def to_dict(self) -> dict:
        """The profile's `traffic` object (bytes), with the buckets the roofline needs."""
        return {"forward": int(self.forward), "backward": int(self.backward), "optimizer": int(self.optimizer),
                "total": int(self.total), "ops": int(self.ops),
                "intensity_edges": list(INTENSITY_EDGES),
                "bucket_flops": [int(v) for v in self.bucket_flops],
                "bucket_bytes": [int(v) for v in self.bucket_bytes],
                "class_kernels": {c: int(v) for c, v in self.class_kernels.items()},
                "class_bucket_flops": {c: [int(v) for v in vs] for c, vs in self.class_bucket_flops.items()},
                "class_bucket_bytes": {c: [int(v) for v in vs] for c, vs in self.class_bucket_bytes.items()}}


def count_step_traffic(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                       targets: torch.Tensor, loss_fn: Callable = nn.functional.cross_entropy) -> StepTraffic:
    """Run one training step (zero_grad, forward + loss, backward, optimizer step) under TrafficMode.

    Run a warm-up step first so the optimizer state exists (its first step allocates it)."""
    optimizer.zero_grad(set_to_none=True)
    mode = TrafficMode()
    with mode:
        loss = loss_fn(model(inputs), targets)
        mode.phase = "backward"
        loss.backward()
        mode.phase = "optimizer"
        optimizer.step()
    return StepTraffic(mode.bytes["forward"], mode.bytes["backward"], mode.bytes["optimizer"],
                       ops=sum(mode.ops.values()), bucket_flops=mode.bucket_flops,
                       bucket_bytes=mode.bucket_bytes, by_op=dict(mode.by_op), class_kernels=dict(mode.class_kernels),
                       class_bucket_flops=dict(mode.class_bucket_flops),
                       class_bucket_bytes=dict(mode.class_bucket_bytes))
