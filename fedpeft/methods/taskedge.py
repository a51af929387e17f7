"""TaskEdge (arXiv 2504.03718): train a sparse, task-aware set of weights.

Importance of weight W_ij = |W_ij| * ||X_j||_2, with X_j the j-th input of the layer over a
calibration batch (for a conv, the j-th element of the unfolded input patch).

Allocation: the density is a budget, k_total = round(density * all target weights). Each layer
gets its share in proportion to its size (largest remainder, so the shares sum to k_total), and
within a layer the share is spread at the neuron level as TaskEdge does: every output neuron gets
floor(share / out) entries, its own top ones by importance, and the leftover entries go to the
neurons whose next-best entry is the most important. At the paper's 0.1% most neurons have a
fan-in under 1,000, so most get no entry at all, and the realised density equals the request to
the nearest entry (the old "at least one per neuron" rule trained 0.47% of MobileNetV2 at 0.1%).

With an N:M pattern the unit is a group instead of an entry: a neuron's fan-in is cut into groups
of M consecutive inputs, a chosen group keeps exactly its top N entries, and the budget counts
about k_total / N groups (a layer's share capped at all its groups, so density tops out at N/M).
The last group of a fan-in that is not a multiple of M has only fan_in mod M inputs and keeps
min(N, fan_in mod M) of them, so the realised density (the adapter's `realised_density`) can fall
slightly short of the request.

Only the masked entries train: each target layer is wrapped by `MaskedLayer`, which keeps the
pre-trained weight frozen and learns a vector of `values` (one per masked entry) added at the
mask's flat indices. The backward computes the gradient of those values only (masked_grad.py:
one gathered dot product per masked entry over the unfolded input), never the dense weight
gradient, so it costs the input's gradient plus 2 x samples x positions FLOPs per entry; the
optimizer's state and the gradient are the size of the mask. `taskedge_lora` learns a LoRA pair
instead and adds its product B @ A only at the masked entries (same kernel: the gradient reaches
A and B through the gathered values).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.errors import require
from fedpeft.methods.base import Adapter, Delta, Method
from fedpeft.methods.layers import dense_layers, freeze, set_submodule
from fedpeft.methods.masked_grad import masked_forward, supports_sparse_grad, updated_weight
from fedpeft.models import head_of

#: THE TaskEdge density: the paper's 0.1%. CLI help and configs import it rather than repeat it.
DEFAULT_DENSITY = 0.001
#: taskedge_lora's default: its dense LoRA pair is cheap, so a denser mask pays off.
DEFAULT_LORA_DENSITY = 0.01

# Flat indices travel as int32 (half of int64's bytes); torch's indexing wants int64 in memory.
INDEX_DTYPE = torch.int32


def parse_nm(value) -> tuple[int, int] | None:
    """'2:4' or (2, 4) -> (2, 4); None/'' -> None."""
    if value in (None, "", "none"):
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
        require(match is not None, f"nm: expected N:M such as 2:4, got {value!r}")
        value = (int(match.group(1)), int(match.group(2)))
    n, m = (int(v) for v in value)
    require(0 < n <= m, f"nm: need 0 < N <= M in N:M, got {n}:{m}")
    return n, m


# -- importance ---------------------------------------------------------------------------------
def input_square_sums(model: nn.Module, layers: dict[str, nn.Module], calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum of squares of every input element of each layer over the calibration batch, shape (fan_in,).

    Sums from several clients add up to the sums over the union of their batches, so a server can
    build one mask from every client's data without seeing any of it (the shared-mask mode)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float()
            if isinstance(module, nn.Conv2d):
                # Sum of squares of each unfolded patch element over positions and samples.
                sq = F.unfold(x * x, module.kernel_size, module.dilation, module.padding, module.stride)
                s = sq.sum(dim=(0, 2))
            else:
                s = (x * x).reshape(-1, x.shape[-1]).sum(dim=0)
            sums[name] = sums.get(name, 0) + s
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(calibration)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums


def target_layers(model: nn.Module, method: "TaskEdge") -> dict[str, nn.Module]:
    """The conv/linear layers TaskEdge masks (the head too when it is not trained densely)."""
    return dense_layers(model, include_head=not method.train_head)


def calibration_sums(model: nn.Module, method: "TaskEdge", images: torch.Tensor) -> dict[str, torch.Tensor]:
    """`input_square_sums` over `method`'s target layers of the (unwrapped, pre-trained) model."""
    return input_square_sums(model, target_layers(model, method), images)


def importance(weight: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """|W| * ||X||, as a (out, fan_in) matrix. Without calibration data: |W| alone."""
    w = weight.detach().abs().reshape(weight.shape[0], -1)
    return w * norms.reshape(1, -1) if norms is not None else w


# -- allocation ---------------------------------------------------------------------------------
def apportion(quotas: list[float], total: int) -> list[int]:
    """Integers summing to `total` (the rounded sum of `quotas`), each its quota's floor or ceil:
    the floors, plus one for the largest fractional parts (ties to the earlier)."""
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: counts[i] - quotas[i])
    for i in order[: max(0, total - sum(counts))]:
        counts[i] += 1
    return counts


def unit_scores(scores: torch.Tensor, nm: tuple[int, int] | None):
    """What the budget is counted in, per neuron: entries, or N:M groups.

    Returns (score of each unit (out, units), and for N:M the top-N column of each group
    (out, groups, N), where a column >= fan_in is padding of the last, partial group)."""
    if nm is None:
        return scores, None
    n, m = nm
    out, fan_in = scores.shape
    # -inf padding ranks below every real entry, so a partial group's real entries come first.
    padded = F.pad(scores, (0, (-fan_in) % m), value=-math.inf).view(out, -1, m)
    top = padded.topk(n, dim=2)
    cols = top.indices + torch.arange(padded.shape[1]).view(1, -1, 1) * m
    return top.values.clamp_min(0).sum(dim=2), cols  # padding adds nothing to a group's score


def layer_budgets(shapes: dict[str, tuple[int, int]], density: float, nm: tuple[int, int] | None) -> dict[str, int]:
    """Units (entries, or N:M groups) per layer: k_total spread over layers in proportion to size."""
    quotas = []
    for out, fan_in in shapes.values():
        if nm is None:
            quotas.append(density * out * fan_in)
        else:
            n, m = nm
            quotas.append(min(density * out * fan_in / n, out * math.ceil(fan_in / m)))
    return dict(zip(shapes, apportion(quotas, round(sum(quotas)))))


def neuron_counts(units: torch.Tensor, budget: int) -> torch.Tensor:
    """Units per neuron (row): `budget` spread evenly, the leftover to the rows whose next-best
    unit scores highest, so with budget < rows some neurons get none."""
    out, available = units.shape
    if not 0 <= budget <= out * available:  # layer_budgets caps every share; this is a bug, not input
        raise ValueError(f"budget {budget} outside [0, {out * available}]")
    base, extra = divmod(budget, out)
    counts = torch.full((out,), base, dtype=torch.int64)
    if extra:
        next_best = units.topk(base + 1, dim=1).values[:, base]
        counts[next_best.topk(extra).indices] += 1
    return counts


def neuron_mask(scores: torch.Tensor, budget: int, nm: tuple[int, int] | None) -> torch.Tensor:
    """Sorted flat indices into the (out, fan_in) matrix: `budget` units spread over the neurons,
    each neuron taking its own best ones (N:M: its best groups, N entries each)."""
    out, fan_in = scores.shape
    units, group_cols = unit_scores(scores, nm)
    counts = neuron_counts(units, budget)
    top = int(counts.max()) if out else 0
    chosen = units.topk(top, dim=1).indices  # (out, top), best first
    keep = torch.arange(top).view(1, -1) < counts.view(-1, 1)
    if nm is None:
        cols = chosen
    else:
        n = nm[0]
        cols = group_cols.gather(1, chosen.unsqueeze(-1).expand(-1, -1, n)).reshape(out, -1)
        keep = keep.repeat_interleave(n, dim=1) & (cols < fan_in)  # never a padding column
    rows = torch.arange(out).view(-1, 1).expand_as(cols)
    return (rows * fan_in + cols)[keep].sort().values


# -- masked layers --------------------------------------------------------------------------------
class MaskedLayer(nn.Module):
    """A frozen conv/linear whose weight gets a trained sparse update at `indices`."""

    def __init__(self, base: nn.Module, indices: torch.Tensor, rank: int | None = None, alpha: float = 1.0):
        super().__init__()
        self.base = base
        self.register_buffer("indices", indices.to(torch.int64))
        self.rank = rank
        if rank is None:
            self.values = nn.Parameter(torch.zeros(indices.numel()))
        else:
            out = base.weight.shape[0]
            self.scaling = alpha / rank
            self.lora_A = nn.Parameter(torch.empty(rank, base.weight[0].numel()))
            self.lora_B = nn.Parameter(torch.zeros(out, rank))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def update_values(self) -> torch.Tensor:
        if self.rank is None:
            return self.values
        return (self.lora_B @ self.lora_A).reshape(-1)[self.indices] * self.scaling

    def weight(self) -> torch.Tensor:
        return updated_weight(self.base.weight, self.indices, self.update_values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        if supports_sparse_grad(b) and not b.weight.requires_grad:
            return masked_forward(b, x, self.indices, self.update_values())
        # Dense path (string padding, padding modes): autograd builds the full weight gradient.
        if isinstance(b, nn.Conv2d):
            return F.conv2d(x, self.weight(), b.bias, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, self.weight(), b.bias)


class TaskEdgeAdapter(Adapter):
    def __init__(self, method: "TaskEdge", model: nn.Module, calibration: torch.Tensor | dict | None):
        """`calibration`: a batch of inputs, or `calibration_sums` already computed (e.g. summed over
        clients by a server); None ranks by |W| alone."""
        super().__init__(method, model)
        head_name = head_of(model)[0]
        layers = target_layers(model, method)
        if isinstance(calibration, dict):
            sums = calibration
        else:
            sums = input_square_sums(model, layers, calibration) if calibration is not None else {}
        norms = {name: s.sqrt() for name, s in sums.items()}
        freeze(model)
        self.layers: dict[str, MaskedLayer] = {}
        nm = method.nm_pair
        shapes = {name: (layer.weight.shape[0], layer.weight[0].numel()) for name, layer in layers.items()}
        budgets = layer_budgets(shapes, method.density, nm)
        for name, layer in layers.items():
            require(layer.weight.numel() < 2**31, f"{name}: {layer.weight.numel()} weights overflow int32 flat indices")
            scores = importance(layer.weight, norms.get(name))
            # A layer whose share rounds to zero keeps an empty mask: every adapter has the same keys.
            masked = MaskedLayer(layer, neuron_mask(scores, budgets[name], nm), method.lora_rank, method.lora_alpha)
            set_submodule(model, name, masked)
            self.layers[name] = masked
        self.head_name = head_name if method.train_head else None
        if self.head_name:
            for p in model.get_submodule(head_name).parameters():
                p.requires_grad_(True)

    def start_from(self, global_delta: Delta) -> None:
        """Start from the global sparse update while keeping this client's own (local-data) mask.

        The global update (the union of every client's entries) is folded into the frozen base
        weight; this client's values start at zero on top of it, and its delta adds back the
        global values at its own entries, so the delta stays relative to the pre-trained model.
        """
        if self.method.lora_rank is not None:
            self.load_delta(global_delta)  # taskedge_lora clients share one dense LoRA pair shape
            return
        self.offsets = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                key = f"{name}.weight"
                if f"{key}.indices" not in global_delta:
                    continue
                g_idx = global_delta[f"{key}.indices"].to(torch.int64)
                g_val = global_delta[f"{key}.values"].to(layer.base.weight.dtype)
                layer.base.weight.view(-1).index_add_(0, g_idx, g_val)
                dense = torch.zeros(layer.base.weight.numel(), dtype=g_val.dtype)
                dense[g_idx] = g_val
                self.offsets[name] = dense[layer.indices]
            if self.head_name:
                for pname, p in self.model.get_submodule(self.head_name).named_parameters():
                    p.copy_(global_delta[f"{self.head_name}.{pname}"])

    # Delta keys: "<layer>.weight.values" (+ ".lora_A"/".lora_B") and "<layer>.weight.indices".
    def delta(self) -> Delta:
        out: Delta = {}
        for name, layer in self.layers.items():
            if layer.rank is None:
                offset = getattr(self, "offsets", {}).get(name)
                values = layer.values.detach()
                out[f"{name}.weight.values"] = (values + offset) if offset is not None else values.clone()
            else:
                out[f"{name}.weight.lora_A"] = layer.lora_A.detach().clone()
                out[f"{name}.weight.lora_B"] = layer.lora_B.detach().clone()
            out[f"{name}.weight.indices"] = layer.indices.to(INDEX_DTYPE)
        if self.head_name:
            for pname, p in self.model.get_submodule(self.head_name).named_parameters():
                out[f"{self.head_name}.{pname}"] = p.detach().clone()
        return out

    def load_delta(self, delta: Delta) -> None:
        """Adopt the delta's masks and values (a fresh adapter need not have computed the same mask)."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                indices = delta[f"{name}.weight.indices"].to(torch.int64)
                layer.indices = indices.clone()
                if layer.rank is None:
                    layer.values = nn.Parameter(delta[f"{name}.weight.values"].clone().float())
                else:
                    layer.lora_A.copy_(delta[f"{name}.weight.lora_A"])
                    layer.lora_B.copy_(delta[f"{name}.weight.lora_B"])
            if self.head_name:
                for pname, p in self.model.get_submodule(self.head_name).named_parameters():
                    p.copy_(delta[f"{self.head_name}.{pname}"])

    @property
    def realised_density(self) -> float:
        """Masked entries over all entries of the target layers (what trains, not what was asked)."""
        masked = sum(layer.indices.numel() for layer in self.layers.values())
        total = sum(layer.base.weight.numel() for layer in self.layers.values())
        return masked / total if total else 0.0

    def density(self) -> float:
        return self.realised_density


@dataclass
class TaskEdge(Method):
    name = "taskedge"
    density: float = DEFAULT_DENSITY
    nm: str | None = None
    train_head: bool = True

    lora_rank = None
    lora_alpha = 1.0

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        return parse_nm(self.nm)

    def validate(self) -> None:
        require(0 < self.density <= 1, f"density: must be in (0, 1], got {self.density}")
        parse_nm(self.nm)

    def attach(self, model: nn.Module, calibration: torch.Tensor | None = None) -> Adapter:
        return TaskEdgeAdapter(self, model, calibration)


@dataclass
class TaskEdgeLoRA(TaskEdge):
    """The LoRA product B @ A, gated by the TaskEdge mask (denser masks pay off here)."""

    name = "taskedge_lora"
    density: float = DEFAULT_LORA_DENSITY
    rank: int = 4
    alpha: float = 4.0

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.rank, int) and self.rank > 0, f"rank: must be a positive integer, got {self.rank}")
        require(self.alpha > 0, f"alpha: must be > 0, got {self.alpha}")

    @property
    def lora_rank(self) -> int:  # type: ignore[override]
        return self.rank

    @property
    def lora_alpha(self) -> float:  # type: ignore[override]
        return self.alpha
