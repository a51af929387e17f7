"""FLOPs of one training step: forward, backward, optimizer (integers).

Forward and backward are counted by torch's own `torch.utils.flop_counter.FlopCounterMode` on the
real step. Its stock `convolution_backward` formula ignores `groups` in the weight-gradient term,
so a grouped/depthwise conv's weight gradient is counted `groups` times too large (a 32-channel
3x3 depthwise conv on 8x8: 1,216,512 backward FLOPs reported, 73,728 true). The "exact"
convention passes a correct formula through `custom_mapping`; the "paper" convention keeps the
stock one, which is what the seed paper (arXiv 2507.23536) used through the same PyTorch tool.

FlopCounterMode counts matmul/conv/attention work only (2 FLOPs per multiply-add; bias adds,
normalisation and activations are not counted), and nothing of the optimizer's element-wise
update. The optimizer term is therefore:
  * the matmuls the optimizer step runs, counted by the mode (GaLore's projection of each
    gradient and its projection back: 2 matmuls per projected matrix, 2*m*n*r FLOPs each);
  * Adam's element-wise update, counted analytically per element from the code torch / galore
    run (see ADAMW_FLOPS_PER_ELEMENT, galore_elementwise_flops);
  * GaLore's SVD (`torch.linalg.svd` is not counted by the mode) amortised over update_proj_gap.

Masked/sparse adapters (TaskEdge) scatter their trained values into the frozen weight in the
forward, and in the backward add them again (the input's gradient needs the updated weight)
and compute the gradient only at the masked entries (fedpeft/methods/masked_grad.py). That
gradient is a `bmm` of gathered rows, which the mode counts (2 FLOPs per entry, sample and output
position); the input's gradient is a `convolution_backward` without the weight term, counted by
the mode too. Index ops are not counted by the mode, so `masking_flops` adds 1 FLOP per masked
entry to the forward and 1 to the backward (see `count_masked_entries`).
DoRA (peft's `use_dora`) recomputes, in every training forward of each adapted weight W
(C_out rows), its column-wise norm ||W + s * B @ A|| and rescales the layer by magnitude / norm
(peft/tuners/lora/dora.py; caching is off in training). The mode counts the B @ A product (an
`mm`; for Linear layers peft builds it as lora_B(lora_A(eye(C_in))), 2*C_in*C_in*r +
2*C_in*r*C_out FLOPs) but none of the element-wise norm work, so `dora_norm_flops` adds:
  forward, per element of W: s * (B @ A) 1, W + that 1, square 1, sum 1 = 4 (DORA_FLOPS_PER_WEIGHT);
          per row: sqrt 1, magnitude / norm 1 = 2 (DORA_FLOPS_PER_ROW);
  backward: peft detaches the norm (DoRA paper, section 4.3), so no gradient flows through the
          norm or B @ A inside it; the magnitude's gradient goes through magnitude / norm: 1
          division per row (DORA_BACKWARD_FLOPS_PER_ROW).
The rescaling of the layer's output by magnitude / norm is activation-level element-wise work,
left out like LoRA's own `scaling * B(A(x))` and every other element-wise op on activations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

aten = torch.ops.aten

CONVENTIONS = ("exact", "paper")

#: torch.optim.Adam/AdamW (single-tensor and foreach paths, non-capturable), per trained element:
#:   exp_avg.lerp_(grad, 1-b1)                         3  (sub, mul, add)
#:   exp_avg_sq.mul_(b2).addcmul_(grad, grad, 1-b2)    4  (mul; mul, mul, add)
#:   denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)  3  (sqrt, div, add)
#:   param.addcdiv_(exp_avg, denom, -step_size)        3  (div, mul, add)
#: = 13, plus 1 (param.mul_(1 - lr*wd)) when weight_decay != 0. One FLOP per arithmetic op,
#: sqrt and div included (they cost more cycles; FLOP counts conventionally ignore that).
ADAMW_FLOPS_PER_ELEMENT = 13

#: DoRA's weight norm, element-wise work the mode does not see (module docstring).
DORA_FLOPS_PER_WEIGHT = 4
DORA_FLOPS_PER_ROW = 2
DORA_BACKWARD_FLOPS_PER_ROW = 1


def conv_backward_flop_exact(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
    _output_padding, groups, output_mask, out_shape=None, **kwargs,
) -> int:
    """`aten.convolution_backward` FLOPs, grouped convolutions included.

    grad_input = conv_transpose(grad_out, weight): torch's formula is already right, because the
    weight shape carries C_in/groups. grad_weight = conv(input, grad_out) per group: torch counts
    it over all C_in x C_out channel pairs, `groups` times the pairs that really exist, so that
    term is divided by `groups` (exactly divisible: C_in, or C_out for transposed, is a multiple).
    For a conv with N, C_out, Ho, Wo output and k x k kernel this gives
    2*N*Ho*Wo*C_out*(C_in/groups)*k*k for each of the two gradients, i.e. the forward cost.
    """

    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])

    flops = 0
    if output_mask[0]:
        grad_input_shape = out_shape[0]
        flops += conv_flop_count(grad_out_shape, w_shape, grad_input_shape, not transposed)
    if output_mask[1]:
        grad_weight_shape = out_shape[1]
        if transposed:
            stock = conv_flop_count(t(grad_out_shape), t(x_shape), t(grad_weight_shape), transposed=False)
        else:
            stock = conv_flop_count(t(x_shape), t(grad_out_shape), t(grad_weight_shape), transposed=False)
        flops += stock // groups
    return flops


def flop_counter(convention: str = "exact") -> FlopCounterMode:
    """A silent FlopCounterMode for `convention` ("exact": groups-aware conv backward; "paper": stock)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"flop convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
    mapping = {aten.convolution_backward: conv_backward_flop_exact} if convention == "exact" else {}
    return FlopCounterMode(display=False, custom_mapping=mapping)


# -- optimizer work ----------------------------------------------------------------------------

def svd_flops(m: int, n: int) -> int:
    """Thin SVD (U1, S, V) of an m x n matrix: 6*M*K^2 + 20*K^3 FLOPs, M = max(m, n), K = min(m, n).

    Golub & Van Loan, Matrix Computations, table of SVD work ("R-SVD", computing U1, Sigma and
    V): 6mn^2 + 20n^3 for m >= n. That is the O(m n min(m, n)) cost of a LAPACK gesdd-style SVD.
    """
    big, small = max(m, n), min(m, n)
    return 6 * big * small * small + 20 * small ** 3


def _is_galore_group(group: dict) -> bool:
    return "rank" in group and "update_proj_gap" in group


def _galore_matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    # galore-torch projects 2-D gradients; fedpeft's ConvGaLoreProjector views conv kernels as
    # (C_out, C_in*k*k). Both are (shape[0], numel // shape[0]).
    return p.shape[0], p.numel() // p.shape[0]


@dataclass
class OptimizerFlops:
    elementwise: int = 0
    svd_amortised: int = 0
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.elementwise + self.svd_amortised


def optimizer_analytic_flops(optimizer: torch.optim.Optimizer) -> OptimizerFlops:
    """The optimizer work FlopCounterMode cannot see: element-wise update and GaLore's SVD.

    Needs the optimizer state to exist (run one step first): GaLore's moment sizes are read
    from it. Supports torch Adam/AdamW and galore-torch's GaLoreAdamW; anything else raises.
    """
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:  # pragma: no cover - galore-torch is a dependency
        GaLoreAdamW = ()
    out = OptimizerFlops()
    if isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam
        for group in optimizer.param_groups:
            per = ADAMW_FLOPS_PER_ELEMENT + (1 if group.get("weight_decay", 0) else 0)
            if group.get("amsgrad"):
                per += 1  # torch.maximum(max_exp_avg_sq, exp_avg_sq)
            # torch's Adam skips parameters without a gradient
            out.elementwise += per * sum(p.numel() for p in group["params"] if p.requires_grad and p.grad is not None)
        out.detail["formula"] = f"torch Adam/AdamW: {ADAMW_FLOPS_PER_ELEMENT} (+1 with weight decay) per element"
        return out
    if GaLoreAdamW and isinstance(optimizer, GaLoreAdamW):
        svd_full = 0
        svd_by_gap: dict[int, int] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad or p.grad is None:  # galore-torch skips gradient-less params
                    continue
                state = optimizer.state.get(p, {})
                moments = state["exp_avg"].numel() if "exp_avg" in state else p.numel()
                projected = _is_galore_group(group) and p.dim() >= 2
                out.elementwise += galore_elementwise_flops(
                    moments, p.numel(), projected=projected, weight_decay=bool(group.get("weight_decay", 0))
                )
                if projected:
                    m, n = _galore_matrix_shape(p)
                    full = svd_flops(m, n)
                    svd_full += full
                    gap = int(group["update_proj_gap"])
                    svd_by_gap[gap] = svd_by_gap.get(gap, 0) + full
        # amortise the summed SVD work once per refresh interval (not floored per matrix)
        out.svd_amortised = sum(total // gap for gap, total in svd_by_gap.items())
        out.detail["formula"] = "GaLoreAdamW: 10 per moment element + 2 per weight element (+1 scale if projected, +2 with weight decay); SVD 6*M*K^2+20*K^3 / update_proj_gap"
        out.detail["svd_per_refresh"] = svd_full
        return out
    raise NotImplementedError(
        f"optimizer FLOPs: no formula for {type(optimizer).__name__}; supported: torch Adam/AdamW, galore_torch.GaLoreAdamW"
    )


def galore_elementwise_flops(moments: int, weights: int, projected: bool, weight_decay: bool) -> int:
    """galore_torch.AdamW.step per parameter (code in galore_torch/adamw.py).

    On the (possibly projected) moments: exp_avg.mul_.add_(alpha) 3, exp_avg_sq.mul_.addcmul_ 4,
    sqrt().add_(eps) 2, exp_avg / denom 1 = 10 per moment element. On the full weight:
    project_back's `* scale` 1 (projected only), p.add_(norm_grad, alpha) 2, weight decay 2.
    """
    return 10 * moments + weights * (2 + (1 if projected else 0) + (2 if weight_decay else 0))


# -- masked adapters ---------------------------------------------------------------------------

def masked_layers(model: nn.Module) -> list[nn.Module]:
    """Modules that add a trained update at the flat `indices` of a frozen `base` weight (TaskEdge)."""
    found = []
    for module in model.modules():
        idx = getattr(module, "indices", None)
        base = getattr(module, "base", None)
        if isinstance(idx, torch.Tensor) and not idx.is_floating_point() and getattr(base, "weight", None) is not None:
            found.append(module)
    return found


def count_masked_entries(model: nn.Module) -> int:
    return sum(m.indices.numel() for m in masked_layers(model))


def masking_flops(model: nn.Module) -> tuple[int, int]:
    """(forward, backward) FLOPs of masked adapters' scatter/gather, which the mode does not count.

    Per masked entry: the forward adds the value into the frozen weight (index_add: 1; the
    original entry is copied back afterwards, 0), and so does the backward for the input's
    gradient (1); the entries' gradients themselves (gathered dot products) are
    counted by the mode. A masked LoRA (taskedge_lora) also gathers its B @ A product at the mask
    and scales it in the forward (+2), and scales and scatters the gradient back in the backward
    (+2); its B @ A matmul and their gradients are counted by the mode.
    """
    fw = bw = 0
    for module in masked_layers(model):
        n = module.indices.numel()
        per = 1 if getattr(module, "rank", None) is None else 3
        fw += per * n
        bw += per * n
    return fw, bw


# -- DoRA ------------------------------------------------------------------------------------

def dora_layers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(peft LoRA layer, adapter name) for every active, unmerged DoRA adapter in `model`."""
    found = []
    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not isinstance(magnitudes, nn.ModuleDict) or getattr(module, "merged", False):
            continue
        if getattr(module, "disable_adapters", False):
            continue
        use_dora = getattr(module, "use_dora", {})
        for name in getattr(module, "active_adapters", []):
            if use_dora.get(name) and name in magnitudes:
                found.append((module, name))
    return found


def dora_norm_flops(model: nn.Module) -> tuple[int, int]:
    """(forward, backward) FLOPs of DoRA's weight norm that the mode does not count.

    Forward: DORA_FLOPS_PER_WEIGHT per element of each adapted weight plus DORA_FLOPS_PER_ROW
    per output row; backward: DORA_BACKWARD_FLOPS_PER_ROW per row (module docstring).
    """
    fw = bw = 0
    for module, name in dora_layers(model):
        weight = module.get_base_layer().weight
        rows = module.lora_magnitude_vector[name].weight.numel()
        fw += DORA_FLOPS_PER_WEIGHT * weight.numel() + DORA_FLOPS_PER_ROW * rows
        if module.lora_magnitude_vector[name].weight.requires_grad:
            bw += DORA_BACKWARD_FLOPS_PER_ROW * rows
    return fw, bw


# -- one step ----------------------------------------------------------------------------------

@dataclass
class StepFlops:
    forward: int
    backward: int
    optimizer: int
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.optimizer

    def to_dict(self) -> dict:
        return {"forward": int(self.forward), "backward": int(self.backward),
                "optimizer": int(self.optimizer), "total": int(self.total)}


def count_step_flops(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable = nn.functional.cross_entropy,
    convention: str = "exact",
) -> StepFlops:
    """Run one training step under FlopCounterMode and split its FLOPs.

    The forward (model + loss) is counted first, the backward separately (the counter's total
    is read between the phases), then the optimizer step (its matmuls, e.g. GaLore's
    projections) plus the analytic element-wise and SVD work. The work the mode cannot see in
    the forward and backward (masked adapters' scatter/gather, DoRA's weight norm) is added to
    those phases. Run a warm-up step before so the optimizer state exists.
    """
    counter = flop_counter(convention)
    optimizer.zero_grad(set_to_none=True)
    with counter:
        loss = loss_fn(model(inputs), targets)
        forward = counter.get_total_flops()
        loss.backward()
        backward = counter.get_total_flops() - forward
        optimizer.step()
        opt_matmul = counter.get_total_flops() - forward - backward
    analytic = optimizer_analytic_flops(optimizer)
    mask_fw, mask_bw = masking_flops(model)
    dora_fw, dora_bw = dora_norm_flops(model)
    detail = {
        "optimizer_matmul": int(opt_matmul),
        "optimizer_elementwise": int(analytic.elementwise),
        "optimizer_svd_amortised": int(analytic.svd_amortised),
        "masking_forward": int(mask_fw),
        "masking_backward": int(mask_bw),
        "dora_norm_forward": int(dora_fw),
        "dora_norm_backward": int(dora_bw),
        "by_op": {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()},
        **{k: v for k, v in analytic.detail.items() if k == "svd_per_refresh"},
    }
    return StepFlops(forward + mask_fw + dora_fw, backward + mask_bw + dora_bw, opt_matmul + analytic.total, detail)


def layer_flops(
    layer: nn.Module, x: torch.Tensor, convention: str = "exact", input_requires_grad: bool = True
) -> tuple[int, int]:
    """(forward, backward) FLOPs of one layer on `x` (for tests and quick checks)."""
    x = x.detach().requires_grad_(input_requires_grad)
    counter = flop_counter(convention)
    with counter:
        out = layer(x)
        fw = counter.get_total_flops()
        out.sum().backward()
        bw = counter.get_total_flops() - fw
    return fw, bw
