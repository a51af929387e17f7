"""Pre-training on the source task, cached on disk: the model every client starts from."""
from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import torch

from fedpeft.data.tasks import Task
from fedpeft.methods import make_method
from fedpeft.models import build_model
from fedpeft.paths import atomic_write_bytes, cache_dir
from fedpeft.train import evaluate, train


def _source_labels(task: Task) -> torch.Tensor:
    """Source labels as 0..len(source_classes)-1, the source model's own head."""
    lookup = torch.full((task.num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(task.source_classes)] = torch.arange(len(task.source_classes))
    return lookup[task.source_train.labels]


def checkpoint_key(model: str, task: Task, input_size: int, epochs: int, lr: float, batch_size: int, seed: int) -> dict:
    return {
        "model": model, "task": task.name, "source_classes": list(task.source_classes),
        "source_examples": len(task.source_train), "input_size": input_size, "epochs": epochs,
        "lr": lr, "batch_size": batch_size, "seed": seed, "torch": torch.__version__,
    }


def pretrained_checkpoint(
    model: str,
    task: Task,
    input_size: int = 32,
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    cache: str | Path | None = None,
    log=None,
) -> Path:
    """Path of the source-task checkpoint, training it first unless the cache has it."""
    key = checkpoint_key(model, task, input_size, epochs, lr, batch_size, seed)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir(cache) / "pretrain" / f"{model}-{task.name}-{digest}.pt"
    if path.is_file():
        return path
    log = log or (lambda msg: print(msg, file=sys.stderr))
    torch.manual_seed(seed)
    net = build_model(model, num_classes=len(task.source_classes), input_size=input_size, seed=seed)
    adapter = make_method("fft").attach(net)
    optimizer = adapter.optimizer(lr=lr)
    labels = _source_labels(task)
    for epoch in range(epochs):
        result = train(adapter, task.source_train.images, labels, batch_size=batch_size, seed=seed + epoch, optimizer=optimizer)
        log(f"pretrain {model} epoch {epoch + 1}/{epochs}: loss {result.loss:.3f} train acc {result.accuracy:.3f}")
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    path.with_suffix(".json").write_text(json.dumps(key, indent=2))
    return path


def source_accuracy(model: torch.nn.Module, task: Task) -> float:
    return evaluate(model, task.source_train.images, _source_labels(task)).accuracy
