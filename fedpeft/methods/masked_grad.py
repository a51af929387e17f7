"""A masked conv/linear whose backward computes the weight gradient only at the masked entries.

TaskEdge trains a few entries of each frozen weight W: the layer computes with W + scatter(values).
Autograd through that scatter would build the dense gradient dL/dW (as costly as the layer's
forward: fft's backward) only to gather a handful of its entries. `masked_forward` instead runs
`MaskedWeightFn`, whose backward computes, for each masked entry e = (o, j) of the (out, fan_in)
weight matrix,

    dL/dv_e = sum over samples n and output positions p of  grad_out[n, o, p] * X[n, j, p]

with X the unfolded input (X[n, j, p]: the input element weight column j multiplies at output
position p; for a conv, input channel c(o, j) shifted by the kernel offset of j; for a Linear,
input feature j). Each entry's two rows are gathered (grad_out's channel o; the input's channel c,
zero-padded, then the strided window of the offset) and multiplied as one batched dot product, a
`bmm` of (E, 1, M) by (E, M, 1) with M = samples x positions, so FlopCounterMode counts its real
2*E*M FLOPs. Entries go in chunks so a gathered temporary holds at most CHUNK_ELEMENTS values.
No (out, fan_in) gradient exists at any time. The input's gradient is the usual one
(conv_transpose, or grad_out @ W) with the updated weight.

No dense copy of the weight is made either: the forward and the backward add the values into the
frozen weight in place for the one convolution that needs them and then write the saved original
entries back (`values_added`), so the weight is bit-identical afterwards. A copy per layer and
step (W + scatter(values)) cost resnet18 a 9 MiB temporary per 3x3 layer, 12% more peak memory
than LoRA, and a third of its step time in allocation and copying.

Grouped and depthwise convs, strides, dilations and zero padding are handled; N:M masks are just
another index set. Convs with string padding ('same') or a non-zero padding mode, and weights
that are not contiguous, are not: the caller uses the dense path for them (`supports_sparse_grad`).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

#: Most values one gathered temporary may hold (256 KiB in float32): bounds the backward's extra memory
#: (at 1 << 20, 4 MiB temporaries put resnet18's backward peak 1.02x above LoRA's; at 1 << 16 0.97x).
CHUNK_ELEMENTS = 1 << 16


def supports_sparse_grad(layer: nn.Module) -> bool:
    """True for Linear and for Conv2d with numeric zero padding (what the sparse backward handles),
    with a contiguous weight (`values_added` edits it in place through a flat view)."""
    if not layer.weight.is_contiguous():
        return False
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str))


def updated_weight(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """W with `values` added at the flat `indices` (a new tensor; W is left as it is)."""
    return weight.reshape(-1).index_add(0, indices, values.to(weight.dtype)).view_as(weight)


@contextmanager
def values_added(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor):
    """Inside the block the frozen `weight` holds W + values at `indices`; after it, exactly W again.

    The original entries are saved and copied back (not subtracted: (w + v) - v need not be w in
    floating point). `indices` must be unique, as TaskEdge's masks are."""
    flat = weight.detach().view(-1)
    original = flat[indices]
    flat.index_add_(0, indices, values.detach().to(flat.dtype))
    try:
        yield weight
    finally:
        flat.index_copy_(0, indices, original)


def _chunks(total: int, per_entry: int):
    step = max(1, CHUNK_ELEMENTS // max(1, per_entry))
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


def linear_entry_grads(x: torch.Tensor, grad_out: torch.Tensor, indices: torch.Tensor, fan_in: int) -> torch.Tensor:
    """dL/dW at the flat `indices` of a Linear's (out, fan_in) weight, without the dense dL/dW."""
    x_rows = x.reshape(-1, fan_in).t()  # (fan_in, M): row j is input feature j over every sample
    g_rows = grad_out.reshape(-1, grad_out.shape[-1]).t()  # (out, M)
    o, j = indices // fan_in, indices % fan_in
    m = x_rows.shape[1]
    out = grad_out.new_empty(indices.numel())
    for part in _chunks(indices.numel(), m):
        g = g_rows.index_select(0, o[part])
        xs = x_rows.index_select(0, j[part])
        out[part] = torch.bmm(g.unsqueeze(1), xs.unsqueeze(2)).view(-1)
    return out


def conv_entry_grads(
    x: torch.Tensor, grad_out: torch.Tensor, indices: torch.Tensor, weight_shape: torch.Size,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
) -> torch.Tensor:
    """dL/dW at the flat `indices` of a Conv2d's (out, C/groups, kh, kw) weight, without the dense dL/dW."""
    n, _, h, w = x.shape
    _, out_ch, ho, wo = grad_out.shape
    cin_g, kh, kw = weight_shape[1], weight_shape[2], weight_shape[3]
    fan_in = cin_g * kh * kw
    o, j = indices // fan_in, indices % fan_in
    channel = (o // (out_ch // groups)) * cin_g + j // (kh * kw)  # the input channel entry e reads
    dy, dx = (j % (kh * kw)) // kw, j % kw
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    hp, wp = h + 2 * ph, w + 2 * pw
    plain = (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and (ph, pw) == (0, 0)
    # Flat position, in the padded input, that output position p reads at kernel offset (0, 0);
    # entry e reads it shifted by its own offset (dy, dx).
    window = (torch.arange(ho).view(-1, 1) * (sh * wp) + torch.arange(wo).view(1, -1) * sw).view(1, 1, -1)
    shift = (dy * (dh * wp) + dx * dw).view(-1, 1, 1)
    g_rows = grad_out.transpose(0, 1)  # (out, N, Ho, Wo) view
    x_rows = x.transpose(0, 1)  # (C, N, H, W) view
    total = indices.numel()
    result = grad_out.new_empty(total)
    for part in _chunks(total, n * max(hp * wp, ho * wo)):
        e = part.stop - part.start
        g = g_rows.index_select(0, o[part]).reshape(e, 1, n * ho * wo)
        xs = x_rows.index_select(0, channel[part])  # (e, N, H, W)
        if not plain:
            xs = F.pad(xs, (pw, pw, ph, ph)).reshape(e, n, hp * wp)
            xs = xs.gather(2, (shift[part] + window).expand(e, n, ho * wo))
        result[part] = torch.bmm(g, xs.reshape(e, n * ho * wo, 1)).view(e)
    return result


class MaskedWeightFn(torch.autograd.Function):
    """y = layer(x; W + scatter(values at indices)); the backward never forms the dense dL/dW.

    `conv` is (stride, padding, dilation, groups) for a Conv2d, None for a Linear. The frozen
    weight gets no gradient (it must not require one)."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, indices, conv):
        if weight.requires_grad:
            raise ValueError("MaskedWeightFn trains only the masked values: the base weight must be frozen")
        with values_added(weight, indices, values) as w:
            y = F.linear(x, w, bias) if conv is None else F.conv2d(x, w, bias, *conv)
        ctx.save_for_backward(x, values, indices)
        ctx.weight = weight  # not saved for backward: values_added changes it in place (and back)
        ctx.conv = conv
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        weight, conv = ctx.weight, ctx.conv
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[1]:  # before grad_x exists, so its chunks reuse free memory
            if conv is None:
                grad_values = linear_entry_grads(x, grad_out, indices, weight.shape[1])
            else:
                grad_values = conv_entry_grads(x, grad_out, indices, weight.shape, *conv)
            grad_values = grad_values.to(values.dtype)
        if ctx.needs_input_grad[0]:
            with values_added(weight, indices, values) as w:
                if conv is None:
                    grad_x = grad_out @ w
                else:
                    grad_x = torch.nn.grad.conv2d_input(x.shape, w, grad_out, *conv)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum(dim=(0, 2, 3)) if conv is not None else grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_values, None, grad_bias, None, None


def masked_forward(layer: nn.Module, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`layer` (frozen Conv2d/Linear, `supports_sparse_grad`) run with `values` added at `indices`."""
    if isinstance(layer, nn.Conv2d):
        conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
        return MaskedWeightFn.apply(x, values, layer.weight, layer.bias, indices, conv)
    return MaskedWeightFn.apply(x, values, layer.weight, layer.bias, indices, None)
