"""Memory of one training step by category, with torch's own MemTracker.

`torch.distributed._tools.mem_tracker.MemTracker` follows every tensor storage created or
registered while it is active and files it as Parameter, Buffer, Gradient, Activation, Temp
(allocated during backward), Optstate (allocated during `optimizer.step()`, and the optimizer's
state tensors) or Other (registered with `track_external`, here the input batch and labels).

Two things are reported:
  * `peak_bytes` and `by_category`: the breakdown at the true simultaneous peak of the step
    (the categories sum to the peak);
  * `category_max`: each category's own maximum over the step. Their sum is what the seed
    paper (arXiv 2507.23536) reports; it is an upper bound, because the categories do not peak
    at the same moment (activations peak at the end of the forward, gradients at the end of the
    backward).

Parameters are every `nn.Parameter` of the model, trained or frozen: peft-wrapped or masked
models keep their frozen base weights as parameters. `optimizer_state` is what the optimizer
keeps between steps (Adam's moments and step counters, GaLore's projection matrices);
transient buffers allocated inside `optimizer.step()` (Adam's denom, foreach copies, GaLore's
projected gradient) are counted as `temporary`, like the backward's temporaries (stock
MemTracker would file them as optimizer state).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

#: fedpeft name -> MemTracker's category
CATEGORIES = {
    "parameter": _MemRefType.PARAM,
    "buffer": _MemRefType.BUFFER,
    "gradient": _MemRefType.GRAD,
    "activation": _MemRefType.ACT,
    "temporary": _MemRefType.TEMP,
    "optimizer_state": _MemRefType.OPT,
    "other": _MemRefType.OTH,
}


class StepMemTracker(MemTracker):
    """MemTracker that accepts frozen parameters and records each category's maximum.

    Bug worked around (torch 2.x, `MemTracker._track_module_params_and_buffers`): it calls
    `param.register_hook(...)` on every parameter of every module it sees, and PyTorch refuses
    a hook on a tensor that does not require grad ("cannot register a hook on a tensor that
    doesn't require gradient"), so any model with frozen parameters (every PEFT method) crashes
    in its first forward. Here the hooks are installed only where `param.requires_grad`; frozen
    parameters never get a gradient, so nothing is lost.
    """

    def __init__(self) -> None:
        super().__init__()
        self._category_max: dict[torch.device, dict[str, int]] = {}
        # Speed only (no number changes): the stock `_update_snap` runs dict.fromkeys(self._ref_class)
        # on every tracked allocation, and iterating an Enum class is slow; a tuple of its members is not.
        self._ref_class = tuple(self._ref_class)
        self._in_module_hook = False

    # The stock module hooks record a deep-copied memory snapshot per module and phase (for
    # per-module reports; ~a third of a profile's time). Only the step's global peak is used here,
    # so inside those hooks the snapshot is empty; what else they do (tracking each module's
    # parameters, buffers and gradients, the activation-checkpointing flags) is unchanged.
    def get_tracker_snapshot(self, type: str = "current"):  # noqa: A002 - MemTracker's signature
        if self._in_module_hook:
            return {}
        return super().get_tracker_snapshot(type)

    def _without_module_snapshots(hook):
        def wrapped(self, *args):
            self._in_module_hook = True
            try:
                return hook(self, *args)
            finally:
                self._in_module_hook = False
        return wrapped

    _pre_fw_hook = _without_module_snapshots(MemTracker._pre_fw_hook)
    _post_fw_hook = _without_module_snapshots(MemTracker._post_fw_hook)
    _pre_bw_hook = _without_module_snapshots(MemTracker._pre_bw_hook)
    _post_bw_hook = _without_module_snapshots(MemTracker._post_bw_hook)
    del _without_module_snapshots

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        mems = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if not param.requires_grad:  # the fix: no grad hook on frozen parameters
                    continue
                if self._param_to_grad_hook_handles.get(param, None) is not None:
                    continue

                def _grad_hook(grad: torch.Tensor) -> None:
                    self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(_grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: _grad_hook(p.grad)),
                )
        return mems

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
        snap = self._curr_mem_snap.get(winfo.device)
        if snap is None:
            return
        maxima = self._category_max.setdefault(winfo.device, {})
        for reftype in CATEGORIES.values():
            value = snap.get(reftype, 0)
            if value > maxima.get(reftype, 0):
                maxima[reftype] = value

    def _track(self, reftype, t: torch.Tensor) -> None:
        # MemTracker files every allocation made inside optimizer.step() as optimizer state,
        # transient work buffers included (Adam's denom, foreach copies, GaLore's projected
        # gradient and SVD workspace). File them as temporaries; the post-step hook then
        # re-files the tensors the optimizer really keeps (see _track_optimizer_states).
        if reftype == _MemRefType.OPT and self._in_opt:
            reftype = _MemRefType.TEMP
        super()._track(reftype, t)

    def _track_optimizer_states(self, reftype, optimizer: torch.optim.Optimizer) -> None:
        # Also the tensors held by objects in the state (galore-torch keeps its projection
        # matrix in state["projector"].ortho_matrix), not only the state's own tensors.
        for states in optimizer.state.values():
            for val in states.values():
                for t in _tensors_in(val):
                    self._update_and_maybe_create_winfos(t, reftype)

    def _update_peak_stats(self, peak_state) -> None:
        # Only the step's global peak is needed. The stock method also refreshes the local
        # peak of every tracked module after every op (a loop over all modules per op, O(ops x
        # modules): ~70% of the profiling time on MobileNetV2); per-module peaks are not used.
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                self._peak_mem[dev] = dev_snap["Total"]
                self._peak_mem_snap[dev] = dict(dev_snap)

    def reset_peak(self) -> None:
        """Start a new measurement window: peak and category maxima restart from now."""
        self.reset_mod_stats()
        self._peak_mem_snap = self.get_tracker_snapshot("current")
        self._peak_mem = {dev: snap.get("Total", 0) for dev, snap in self._peak_mem_snap.items()}
        self._category_max = {
            dev: {ref: snap.get(ref, 0) for ref in CATEGORIES.values()} for dev, snap in self._peak_mem_snap.items()
        }

    def category_max(self, device: torch.device) -> dict[str, int]:
        maxima = self._category_max.get(device, {})
        return {name: int(maxima.get(ref, 0)) for name, ref in CATEGORIES.items()}


def _tensors_in(value, depth: int = 0):
    """Tensors in an optimizer state value: a tensor, a list/tuple/dict of them, or an object's attributes."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth + 1)
    elif depth < 1 and hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
        for v in vars(value).values():
            yield from _tensors_in(v, depth + 1)


@dataclass
class StepMemory:
    peak_bytes: int
    by_category: dict[str, int]
    category_max: dict[str, int]
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "peak_bytes": int(self.peak_bytes),
            "by_category": {k: int(self.by_category[k]) for k in CATEGORIES},
            "category_max": {k: int(self.category_max[k]) for k in CATEGORIES},
            "category_max_sum": int(sum(self.category_max.values())),
            **self.extra,
        }


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs, targets, loss_fn: Callable) -> torch.Tensor:
    """The step being measured: what a training loop does per batch."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss.detach()


def measure_step_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable = nn.functional.cross_entropy,
    warmup_steps: int = 1,
    before_step: Callable[[], None] | None = None,
) -> StepMemory:
    """Memory by category of one real training step (forward, loss, backward, optimizer step).

    `warmup_steps` steps run first inside the tracker (so the optimizer state, GaLore's
    projector included, exists and is filed as optimizer state); the peak is then reset and one
    step is measured. `before_step` (e.g. `adapter.train_mode`) runs before every step.
    """
    tracker = StepMemTracker()
    tracker.track_external(model, optimizer, inputs, targets)
    device = inputs.device
    with tracker:
        for _ in range(warmup_steps):
            if before_step is not None:
                before_step()
            train_step(model, optimizer, inputs, targets, loss_fn)
        tracker.reset_peak()
        if before_step is not None:
            before_step()
        train_step(model, optimizer, inputs, targets, loss_fn)
    peak = tracker.get_tracker_snapshot("peak").get(device, {})
    by_category = {name: int(peak.get(ref, 0)) for name, ref in CATEGORIES.items()}
    return StepMemory(
        peak_bytes=int(peak.get("Total", sum(by_category.values()))),
        by_category=by_category,
        category_max=tracker.category_max(device),
    )
