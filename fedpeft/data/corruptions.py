"""CIFAR-10-C style corruptions in torch (Hendrycks & Dietterich, ICLR 2019).

The parameters are those of the CIFAR version, `make_cifar_c.py` of
github.com/hendrycks/robustness; they are meant for 32 x 32 images, so corrupt before resizing to
a larger model input. Every function works on a float batch N x 3 x H x W in [0, 1] and returns
a new tensor clipped to [0, 1]. Random kinds draw only from the torch.Generator they are given,
never from the global RNG. The original saves uint8 images; here values stay float.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedpeft.errors import UsageError, choice

SEVERITIES = (1, 2, 3, 4, 5)
_CHUNK = 2048  # images processed at a time (bounds temporary memory); part of what a seed fixes

BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_NOISE = (500, 250, 100, 75, 50)
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))


def brightness(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """V channel of HSV + c, clipped. H and S are unchanged, so RGB' = RGB * V'/V exactly
    (a black pixel, V = 0, has S = 0 and becomes grey V')."""
    c = BRIGHTNESS[severity - 1]
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(0.0, 1.0)
    scale = torch.where(v > 0, v_new / v.clamp_min(1e-12), torch.zeros_like(v))
    out = torch.where(v > 0, x * scale, v_new.expand_as(x))
    return out.clamp_(0.0, 1.0)


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(x - mean) * c + mean with the mean per image and per channel."""
    c = CONTRAST[severity - 1]
    means = x.mean(dim=(2, 3), keepdim=True)
    return ((x - means) * c + means).clamp_(0.0, 1.0)


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    c = GAUSSIAN_NOISE[severity - 1]
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return (x + noise * c).clamp_(0.0, 1.0)


def shot_noise(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Poisson(x * c) / c."""
    c = SHOT_NOISE[severity - 1]
    rate = (x * c).to(torch.float64)
    return (torch.poisson(rate, generator=generator) / c).to(x.dtype).clamp_(0.0, 1.0)


def impulse_noise(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Salt and pepper as skimage.util.random_noise(mode='s&p', amount=c): each element (every
    channel on its own) is hit with probability c, then set to 1 or 0 with equal odds."""
    c = IMPULSE_NOISE[severity - 1]
    hit = torch.rand(x.shape, generator=generator) <= c
    salt = torch.rand(x.shape, generator=generator) <= 0.5
    out = x.clone()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def _gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage.gaussian_filter's support
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _depthwise(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel with a 2-d kernel (odd sizes), padding the borders with `mode`."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    h, w = x.shape[-2:]
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"  # reflection needs a pad smaller than the image
    padded = F.pad(x, (pw, pw, ph, ph), mode=mode)
    channels = x.shape[1]
    weight = kernel.to(x.dtype).expand(channels, 1, kh, kw).contiguous()
    return F.conv2d(padded, weight, groups=channels)


def gaussian_blur(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """skimage.filters.gaussian(sigma=c) per channel: truncate 4 sigma, 'nearest' borders."""
    sigma = GAUSSIAN_BLUR[severity - 1]
    k = _gaussian_kernel1d(sigma)
    out = _depthwise(x, k.view(1, -1), mode="replicate")
    out = _depthwise(out, k.view(-1, 1), mode="replicate")
    return out.clamp_(0.0, 1.0)


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """make_cifar_c.py's `disk`: an aliased disk on a 17 x 17 grid (radius <= 8), normalized,
    then cv2.GaussianBlur with a 3 x 3 kernel and sigma = alias_blur; trimmed to its support."""
    if radius <= 8:
        grid = np.arange(-8, 8 + 1)
        ksize = 3
    else:
        grid = np.arange(-math.ceil(radius), math.ceil(radius) + 1)
        ksize = 5
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    # cv2.getGaussianKernel(ksize, sigma): exp(-(i - (ksize-1)/2)^2 / (2 sigma^2)), normalized.
    t = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(t ** 2) / (2 * alias_blur ** 2))
    g /= g.sum()
    # Separable blur. The disk lies well inside the grid for the CIFAR radii, so cv2's border
    # handling never comes into play; zero padding gives the same numbers.
    pad = ksize // 2
    padded = np.pad(disk, pad)
    rows = sum(g[i] * padded[:, i:i + disk.shape[1]] for i in range(ksize))
    blurred = sum(g[i] * rows[i:i + disk.shape[0], :] for i in range(ksize))
    # Trim all-zero borders symmetrically (keeps the kernel centred and odd-sized).
    nz = np.argwhere(blurred > 0)
    centre = blurred.shape[0] // 2
    r = int(np.abs(nz - centre).max()) if len(nz) else 0
    blurred = blurred[centre - r:centre + r + 1, centre - r:centre + r + 1]
    return torch.from_numpy(blurred.astype(np.float32))


def defocus_blur(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """cv2.filter2D of every channel with `disk_kernel` (BORDER_REFLECT_101 = torch 'reflect')."""
    radius, alias_blur = DEFOCUS_BLUR[severity - 1]
    return _depthwise(x, disk_kernel(radius, alias_blur), mode="reflect").clamp_(0.0, 1.0)


CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "brightness": brightness,
    "contrast": contrast,
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
}
NOISE_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise")


def check_severity(severity) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise UsageError(f"severity: must be an integer 1-5, got {severity!r}")
    return int(severity)


def corrupt(images: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption `kind` at `severity` (1-5) to a batch N x 3 x H x W in [0, 1].

    Deterministic for a seed: noise comes from a torch.Generator seeded with `seed`.
    Returns a new float32 tensor in [0, 1]; the input is not modified.
    """
    choice("corruption", kind, CORRUPTIONS)
    severity = check_severity(severity)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UsageError(f"images: expected a tensor N x 3 x H x W in [0, 1], got {shape}")
    fn = CORRUPTIONS[kind]
    generator = torch.Generator().manual_seed(int(seed))
    x = images.detach().to("cpu", torch.float32)
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], _CHUNK):
        out[start:start + _CHUNK] = fn(x[start:start + _CHUNK], severity, generator)
    return out


def corrupt_dataset(ds, kind: str, severity: int, seed: int = 0):
    """A copy of an ImageDataset with corrupted images (same labels and classes)."""
    from fedpeft.data.datasets import ImageDataset

    return ImageDataset(corrupt(ds.images, kind, severity, seed), ds.labels.clone(), list(ds.classes))
