"""Pre-training on the source task, cached on disk: the model every client starts from.

The models train from scratch on small data (1,347 digits at 32x32), where MobileNetV2 is
fragile: AdamW at a constant 3e-3 (the earlier schedule) made the loss rise after a few epochs,
and SGD at 0.05 diverged. The schedule here is AdamW with a one-cycle learning rate (one epoch of
warm-up to 1e-3, then cosine decay to ~0) over 12 epochs of batches of 32. Shuffling draws only
from a seeded generator, so a checkpoint is a function of its key. The held-out accuracy on the
source task (the clean test set) is logged per epoch and written beside the checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fedpeft.data.tasks import Task
from fedpeft.methods import make_method
from fedpeft.models import build_model
from fedpeft.paths import atomic_write_bytes, cache_dir
from fedpeft.train import batches, evaluate

SCHEDULE = "adamw-onecycle"  # part of the cache key: a new schedule makes new checkpoints
DEFAULT_EPOCHS = 12
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 32
WEIGHT_DECAY = 5e-4


def _source_labels(task: Task, split: str = "train") -> torch.Tensor:
    """Source labels as 0..len(source_classes)-1, the source model's own head."""
    lookup = torch.full((task.num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(task.source_classes)] = torch.arange(len(task.source_classes))
    data = task.source_train if split == "train" else task.source_test
    return lookup[data.labels]


def checkpoint_key(model: str, task: Task, input_size: int, epochs: int, lr: float, batch_size: int, seed: int) -> dict:
    return {
        "model": model, "source": task.source_id, "source_classes": list(task.source_classes),
        "source_examples": len(task.source_train), "input_size": input_size, "epochs": epochs,
        "lr": lr, "batch_size": batch_size, "seed": seed, "schedule": SCHEDULE, "torch": torch.__version__,
    }


def _pretrain(net: torch.nn.Module, task: Task, epochs: int, lr: float, batch_size: int, seed: int, log) -> None:
    images, labels = task.source_train.images, _source_labels(task)
    adapter = make_method("fft").attach(net)
    optimizer = adapter.optimizer(lr=lr, weight_decay=WEIGHT_DECAY)  # AdamW
    steps_per_epoch = -(-len(labels) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=min(0.3, 1 / epochs), div_factor=10)
    generator = torch.Generator().manual_seed(seed)
    adapter.train_mode()
    for epoch in range(epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in batches(images, labels, batch_size, generator):
            if len(y) < 2:
                scheduler.step()
                continue  # BatchNorm cannot normalise a batch of one in train mode
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        held_out = f" test acc {source_accuracy(net, task, 'test'):.3f}" if task.source_test is not None else ""
        log(f"pretrain epoch {epoch + 1}/{epochs}: loss {loss_sum / max(seen, 1):.3f} "
            f"train acc {correct / max(seen, 1):.3f}{held_out}")
        net.train()
    net.eval()


def pretrained_checkpoint(
    model: str,
    task: Task,
    input_size: int = 32,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    cache: str | Path | None = None,
    log=None,
) -> Path:
    """Path of the source-task checkpoint, training it first unless the cache has it."""
    key = checkpoint_key(model, task, input_size, epochs, lr, batch_size, seed)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir(cache) / "pretrain" / f"{model}-{task.source_id.replace(':', '_')}-{digest}.pt"
    if path.is_file():
        return path
    log = log or (lambda msg: print(msg, file=sys.stderr))
    torch.manual_seed(seed)
    net = build_model(model, num_classes=len(task.source_classes), input_size=input_size, seed=seed)
    _pretrain(net, task, epochs, lr, batch_size, seed, lambda msg: log(f"{model}: {msg}"))
    info = dict(key)
    if task.source_test is not None:
        info["source_test_accuracy"] = source_accuracy(net, task, "test")
        log(f"{model}: pretrain source test accuracy {info['source_test_accuracy']:.4f}")
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return path


def source_accuracy(model: torch.nn.Module, task: Task, split: str = "train") -> float:
    """Accuracy of a source-head model on the source task's train or held-out test images."""
    data = task.source_train if split == "train" else task.source_test
    if data is None:
        raise ValueError(f"task {task.name} has no source {split} set")
    return evaluate(model, data.images, _source_labels(task, split)).accuracy
