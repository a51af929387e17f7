"""Local training and evaluation, shared by every method, the CLI and the Flower client."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.errors import choice, require
from fedpeft.fleet.config import DEVICES
from fedpeft.methods.base import Adapter


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps taken
    accuracy: float  # training accuracy over the examples seen
    examples: int  # examples seen (counting repeats over epochs)
    steps: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    examples: int

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' (an error when torch sees no CUDA GPU) or 'auto' (cuda when there is one)."""
    choice("device", name, DEVICES)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        require(torch.cuda.is_available(), f"device: cuda requested, but torch sees no CUDA GPU (torch "
                                           f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                                           "use cpu or auto")
    return torch.device(name)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(len(labels), generator=generator) if generator is not None else torch.arange(len(labels))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield images[idx], labels[idx]


def require_bn_batches(method_name: str, trains_bn_stats: bool, examples: int, batch_size: int) -> None:
    """A method that trains BatchNorm statistics skips batches of one (BatchNorm cannot normalise
    them in train mode); refuse up front when that would leave no batch at all."""
    if not trains_bn_stats:
        return
    why = f"{method_name} trains BatchNorm statistics, which need batches of at least 2"
    require(batch_size >= 2, f"batch_size: {why}; got {batch_size}")
    require(examples >= 2, f"data: {why}; the training partition has only {examples} example")


def usable_batches(examples: int, batch_size: int, trains_bn_stats: bool) -> int:
    """Batches per epoch that make a step (a trailing batch of one is skipped when BN statistics train)."""
    full, rest = divmod(examples, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and not trains_bn_stats) else 0)


def train(
    adapter: Adapter,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    progress=None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train the adapter's model in place. `max_steps` caps the steps (a FLOP budget does that).

    `progress`, if given, is called as progress(step, total_steps, loss) after every step.
    `device`, if given, is where the steps run: the model moves there and back to where it was at
    the end (so its delta is read where it always is); batches follow the model.
    """
    require(len(labels) > 0, "data: no training examples")
    require(batch_size > 0, f"batch_size: must be > 0, got {batch_size}")
    require(epochs > 0, f"epochs: must be > 0, got {epochs}")
    bn_stats = adapter.trains_bn_stats
    require_bn_batches(adapter.method.name, bn_stats, len(labels), batch_size)
    home = _device_of(adapter.model)
    if device is not None:
        require(optimizer is None, "train: pass either device or an optimizer built for the model's device")
        adapter.model.to(device)  # before the optimizer, whose state follows its parameters
    try:
        return _train_steps(adapter, images, labels, epochs, batch_size, lr, max_steps, seed, optimizer, progress)
    finally:
        if device is not None:
            adapter.model.to(home)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _train_steps(adapter, images, labels, epochs, batch_size, lr, max_steps, seed, optimizer, progress) -> TrainResult:
    bn_stats = adapter.trains_bn_stats
    device = _device_of(adapter.model)
    optimizer = optimizer or adapter.optimizer(lr=lr if lr is not None else adapter.method.lr)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = usable_batches(len(labels), batch_size, bn_stats)
    total = min(epochs * steps_per_epoch, max_steps) if max_steps is not None else epochs * steps_per_epoch
    adapter.train_mode()
    loss_sum, correct, seen, step = 0.0, 0, 0, 0
    while step < total:
        stepped = False
        for x, y in batches(images, labels, batch_size, generator):
            if len(y) < 2 and bn_stats:
                continue  # BatchNorm in train mode cannot normalise a batch of one
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = adapter.model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            stepped = True
            loss_sum += loss.item()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            if progress is not None:
                progress(step, total, loss.item())
            if step >= total:
                break
        if not stepped:
            break  # an epoch without a step would repeat forever; the checks above should prevent it
    adapter.model.eval()
    return TrainResult(loss=loss_sum / max(step, 1), accuracy=correct / max(seen, 1), examples=seen, steps=step)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> EvalResult:
    require(len(labels) > 0, "data: no evaluation examples")
    was_training = model.training
    model.eval()
    device = _device_of(model)  # batches follow the model
    loss_sum, correct = 0.0, 0
    for x, y in batches(images, labels, batch_size, generator=None):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    return EvalResult(loss=loss_sum / len(labels), accuracy=correct / len(labels), examples=len(labels))
