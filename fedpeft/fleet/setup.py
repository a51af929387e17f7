"""What client and server both build from the run config: the task, the pre-trained model, the
adapter (seeded, so every client and the server start from the same adapter init)."""
from __future__ import annotations

import copy
import functools
from pathlib import Path
import json

import torch

from fedpeft.data.datasets import ImageDataset
from fedpeft.data.partition import partition_for
from fedpeft.data.tasks import Task, make_task
from fedpeft.fleet.config import RunConfig
from fedpeft.methods import Adapter, make_method
from fedpeft.models import build_model
from fedpeft.pretrain import pretrained_checkpoint

CALIBRATION_EXAMPLES = 64


@functools.lru_cache(maxsize=2)
def _task(frozen: str) -> Task:
    cfg = json.loads(frozen)
    common = {"dataset": cfg["dataset"], "seed": cfg["seed"], "root": cfg["data_dir"] or None, "size": cfg["input_size"]}
    if cfg["task"] == "shift":
        return make_task("shift", corruption=cfg["corruption"], severity=cfg["severity"], **common)
    return make_task("unseen", **common)


def task_for(cfg: RunConfig) -> Task:
    keys = ("dataset", "seed", "data_dir", "input_size", "task", "corruption", "severity")
    return _task(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True))


def checkpoint_for(cfg: RunConfig, log=None):
    return pretrained_checkpoint(cfg.model, task_for(cfg), input_size=cfg.input_size, epochs=cfg.pretrain_epochs or None,
                                 lr=cfg.pretrain_lr or None, seed=cfg.seed, cache=cfg.cache_dir or None, log=log,
                                 schedule=cfg.pretrain_schedule)


def pretrained_model(cfg: RunConfig) -> torch.nn.Module:
    """A fresh copy of the pre-trained model. Built (and the checkpoint read) once per process and
    file version, then deep-copied: every virtual client a Ray worker runs needs the same model,
    and a copy costs a fraction of a build. The global RNG is left exactly as a build leaves it
    (the head of a checkpoint with fewer classes is drawn from it), so results do not depend on
    whether the copy came from the cache."""
    task = task_for(cfg)
    path = Path(checkpoint_for(cfg))
    stat = path.stat()
    template, rng_after_build = _pretrained_template(cfg.model, task.num_classes, cfg.input_size, str(path.resolve()),
                                                     stat.st_mtime_ns, stat.st_size, cfg.seed)
    torch.set_rng_state(rng_after_build)
    return copy.deepcopy(template)


@functools.lru_cache(maxsize=2)
def _pretrained_template(model: str, num_classes: int, input_size: int, checkpoint: str, mtime_ns: int, size: int,
                         seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """(model, RNG state right after building it); callers only ever get deep copies of the model."""
    built = build_model(model, num_classes=num_classes, input_size=input_size, checkpoint=checkpoint, seed=seed)
    return built, torch.get_rng_state()


def clear_caches() -> None:
    """Forget every per-process cache of this module (tests; a long-lived process that wants memory back)."""
    for cached in (_task, _pretrained_template, _fleet):
        cached.cache_clear()


def attach(cfg: RunConfig, method: str, rank: int | None, calibration: torch.Tensor | None) -> Adapter:
    model = pretrained_model(cfg)
    torch.manual_seed(cfg.seed)  # identical adapter init (LoRA's A, ...) on every node
    return make_method(method, **cfg.method_hparams(method, rank)).attach(model, calibration=calibration)


def client_data(cfg: RunConfig, partition_id: int) -> ImageDataset:
    target = task_for(cfg).target_train
    indices = partition_for(target.labels, partition_id, cfg.num_clients, scheme=cfg.partition,
                            alpha=cfg.dirichlet_alpha, seed=cfg.seed)
    return target.subset(indices)


def fleet_for(cfg: RunConfig) -> list:
    """The fleet's clients (fedpeft.devices.ClientSpec): the fleet file's, else the default mix.
    Read once per process and file version: every client round and server round asks for it."""
    if not cfg.fleet:
        return list(_fleet("", 0, cfg.num_clients, cfg.seed))
    stat = Path(cfg.fleet).stat()
    return list(_fleet(str(Path(cfg.fleet).resolve()), stat.st_mtime_ns, stat.st_size, 0))


@functools.lru_cache(maxsize=8)
def _fleet(path: str, mtime_ns: int, size_or_clients: int, seed: int) -> tuple:
    from fedpeft.devices import default_fleet, load_fleet

    return tuple(load_fleet(path) if path else default_fleet(size_or_clients, seed=seed))


def fleet_requests(cfg: RunConfig) -> set[tuple[str, int | None]]:
    """The (method, rank) pairs that fleet entries request beside the run's own."""
    return {(s.method, s.rank) for s in fleet_for(cfg) if s.method}


def request_of(cfg: RunConfig, client_id: int) -> tuple[str, int | None]:
    """(method, rank) simulated client `client_id` asks for: its fleet entry's, else the run's
    (rank None: the run's)."""
    fleet = fleet_for(cfg)
    spec = fleet[client_id] if 0 <= client_id < len(fleet) else None
    return (spec.method, spec.rank) if spec is not None and spec.method else (cfg.method, None)
