"""Registry of the edge models, head replacement and checkpoint loading.

Builders are torchvision's own. Weights start random unless a checkpoint path is given
(`fedpeft pretrain` makes one) or ImageNet weights are asked for and can be downloaded.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import fedpeft  # noqa: F401  (torchvision shim before torchvision)
import torch
import torchvision
from torch import nn

from fedpeft.errors import UsageError, choice, require


def _vit_tiny(num_classes: int, input_size: int) -> nn.Module:
    # A ViT small enough for an edge device (the seed paper's open question on lightweight
    # transformers): 4 layers, 3 heads, width 192, patches of 1/8 of the image side.
    patch = max(4, input_size // 8)
    require(input_size % patch == 0, f"input_size: vit_tiny needs a multiple of {patch}, got {input_size}")
    return torchvision.models.VisionTransformer(
        image_size=input_size, patch_size=patch, num_layers=4, num_heads=3,
        hidden_dim=192, mlp_dim=768, num_classes=num_classes,
    )


def _tv(builder: str, **kwargs) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, input_size: int) -> nn.Module:
        return getattr(torchvision.models, builder)(weights=None, num_classes=num_classes, **kwargs)

    return build


#: name -> builder(num_classes, input_size)
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "mobilenet_v2": _tv("mobilenet_v2"),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "mobilenet_v3_large": _tv("mobilenet_v3_large"),
    "resnet18": _tv("resnet18"),
    "vit_tiny": _vit_tiny,
    # A narrow MobileNetV2 (width 0.35) for fleets of many simulated clients and fast tests.
    "mobilenet_v2_035": _tv("mobilenet_v2", width_mult=0.35),
}

_IMAGENET_WEIGHTS = {
    "mobilenet_v2": "MobileNet_V2_Weights",
    "mobilenet_v3_small": "MobileNet_V3_Small_Weights",
    "mobilenet_v3_large": "MobileNet_V3_Large_Weights",
    "resnet18": "ResNet18_Weights",
}

# Smallest input side each family accepts (five stride-2 stages; ViT needs whole patches).
MIN_INPUT_SIZE = {name: 32 for name in MODELS}


def head_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head's qualified name and module."""
    for name in ("classifier.3", "classifier.1", "fc", "heads.head"):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return name, module
    raise UsageError(f"model: cannot find a Linear classifier head in {type(model).__name__}")


def replace_head(model: nn.Module, num_classes: int, seed: int = 0) -> nn.Module:
    """Swap the classifier for a fresh one with `num_classes` outputs (deterministic for a seed)."""
    require(num_classes >= 2, f"num_classes: must be >= 2, got {num_classes}")
    name, old = head_of(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    new = nn.Linear(old.in_features, num_classes)
    torch.random.set_rng_state(generator_state)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def build_model(
    name: str,
    num_classes: int = 10,
    input_size: int = 32,
    checkpoint: str | Path | None = None,
    imagenet: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Build `name` for `num_classes`; load a checkpoint (any head size) or ImageNet weights."""
    choice("model", name, MODELS)
    require(num_classes >= 2, f"num_classes: must be >= 2, got {num_classes}")
    require(input_size >= MIN_INPUT_SIZE[name], f"input_size: {name} needs >= {MIN_INPUT_SIZE[name]}, got {input_size}")
    torch.manual_seed(seed)
    if imagenet:
        model = _imagenet_model(name)
        replace_head(model, num_classes, seed)
    else:
        model = MODELS[name](num_classes, input_size)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, seed=seed)
    return model


def _imagenet_model(name: str) -> nn.Module:
    choice("model (with ImageNet weights)", name, _IMAGENET_WEIGHTS)
    weights = getattr(torchvision.models, _IMAGENET_WEIGHTS[name]).DEFAULT
    try:
        return getattr(torchvision.models, name)(weights=weights)
    except (OSError, RuntimeError) as exc:  # urllib's URLError is an OSError
        raise UsageError(
            f"imagenet: could not download torchvision's ImageNet weights for {name} "
            f"({type(exc).__name__}); pass --checkpoint PATH to a local state_dict instead"
        ) from None


def load_checkpoint(model: nn.Module, path: str | Path, seed: int = 0) -> nn.Module:
    """Load a state_dict saved by `fedpeft pretrain` (or any matching one).

    A checkpoint whose head has another number of classes loads everything but the head,
    which stays freshly initialised: that is how a model pre-trained on some classes is
    adapted to a task with more.
    """
    path = Path(path)
    require(path.is_file(), f"checkpoint: no such file {str(path)!r}")
    state = _read_state(path)
    head_name, head = head_of(model)
    ckpt_head = state.get(f"{head_name}.weight")
    if ckpt_head is not None and ckpt_head.shape != head.weight.shape:
        state = {k: v for k, v in state.items() if not k.startswith(head_name + ".")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        require(
            not unexpected and all(k.startswith(head_name + ".") for k in missing),
            f"checkpoint: {path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})",
        )
    else:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise UsageError(f"checkpoint: {path} does not fit this model: {str(exc).splitlines()[0]}") from None
    return model


@functools.lru_cache(maxsize=8)
def _read_state_cached(path: str, mtime: float) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    # Fleets build the same pre-trained model for every client: read the file once per process.
    state = _read_state_cached(str(path.resolve()), path.stat().st_mtime)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v.clone() for k, v in state.items()}


@torch.no_grad()
def with_batch_statistics(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> nn.Module:
    """`model` with BatchNorm running statistics set to `images`' (a cumulative average). A random-
    init network with its default statistics (mean 0, var 1) scales activations down layer by layer
    (logits ~1e-9 on mobilenet_v2), so its gradients vanish; benchmarks and tests that train
    without a pre-trained checkpoint set real statistics first. Returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    model.train()
    for start in range(0, len(images), batch_size):
        model(images[start:start + batch_size])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()
