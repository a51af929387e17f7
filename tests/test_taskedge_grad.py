"""TaskEdge's sparse backward: the gradient only at the mask, equal to the dense one there."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.methods import make_method
from fedpeft.methods import masked_grad
from fedpeft.methods.taskedge import MaskedLayer, neuron_mask
from fedpeft.models import build_model
from fedpeft.profiling.flops import count_step_flops, layer_flops


def dense_reference(layer: MaskedLayer, x: torch.Tensor) -> torch.Tensor:
    """The old path: autograd through W + scatter(values), which builds the dense dL/dW."""
    b = layer.base
    if isinstance(b, nn.Conv2d):
        return F.conv2d(x, layer.weight(), b.bias, b.stride, b.padding, b.dilation, b.groups)
    return F.linear(x, layer.weight(), b.bias)


class DenseMaskedLayer(MaskedLayer):
    forward = dense_reference


def masked(base: nn.Module, k: int, nm=None, seed=0) -> MaskedLayer:
    gen = torch.Generator().manual_seed(seed)
    for p in base.parameters():
        p.requires_grad_(False)
    scores = torch.rand(base.weight.shape[0], base.weight[0].numel(), generator=gen)
    layer = MaskedLayer(base, neuron_mask(scores, k, nm))
    with torch.no_grad():
        layer.values.normal_(generator=gen)
    return layer


LAYERS = {
    "conv1x1": (lambda: nn.Conv2d(8, 16, 1), (4, 8, 6, 6)),
    "conv1x1_stride2": (lambda: nn.Conv2d(8, 16, 1, stride=2, bias=False), (4, 8, 7, 7)),
    "conv3x3": (lambda: nn.Conv2d(8, 16, 3, padding=1), (4, 8, 7, 7)),
    "conv3x3_strided_dilated": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2), (3, 8, 9, 7)),
    "conv_rect": (lambda: nn.Conv2d(6, 8, (1, 3), stride=(2, 1), padding=(0, 1)), (3, 6, 7, 5)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (4, 8, 7, 7)),
    "grouped": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4), (4, 8, 7, 7)),
    "linear": (lambda: nn.Linear(12, 7), (5, 12)),
    "linear_3d": (lambda: nn.Linear(12, 7), (3, 5, 12)),
}


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["unstructured", "nm2:4"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_masked_gradient_equals_dense_gradient_at_the_mask(kind, nm):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    sparse = masked(make(), k=6, nm=nm)
    dense = copy.deepcopy(sparse)
    dense.__class__ = DenseMaskedLayer
    x = torch.randn(*shape)
    frozen = sparse.base.weight.clone()
    xs, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ys, yd = sparse(xs), dense(xd)
    grad_out = torch.randn_like(ys)
    ys.backward(grad_out)
    yd.backward(grad_out)
    assert sparse.indices.numel() > 0
    assert torch.equal(sparse.base.weight, frozen)  # values added in place for the convolution, then undone
    torch.testing.assert_close(ys, yd)
    torch.testing.assert_close(sparse.values.grad, dense.values.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-5, atol=1e-5)


def test_chunks_cover_every_entry(monkeypatch):
    """A chunk budget of one entry at a time gives the same gradient as one chunk."""
    layer = masked(nn.Conv2d(8, 16, 3, padding=1), k=40)
    x = torch.randn(2, 8, 5, 5)
    grads = []
    for budget in (1, 1 << 20):
        monkeypatch.setattr(masked_grad, "CHUNK_ELEMENTS", budget)
        layer.values.grad = None
        layer(x).square().sum().backward()
        grads.append(layer.values.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_no_dense_weight_gradient_is_computed():
    """The backward runs no weight-gradient convolution: only the input's gradient and the gathered dots."""
    layer = masked(nn.Conv2d(16, 32, 3, padding=1), k=10)
    x = torch.randn(4, 16, 8, 8)
    _, bw = layer_flops(layer, x)
    dense_input_grad = 2 * 4 * 8 * 8 * 32 * 16 * 9  # conv_transpose, the forward's cost
    gathered = 2 * layer.indices.numel() * 4 * 8 * 8  # one multiply-add per sample and position
    assert bw == dense_input_grad + gathered
    _, bw_first = layer_flops(layer, x, input_requires_grad=False)  # a first layer: no input gradient
    assert bw_first == gathered


@pytest.mark.parametrize("method,kwargs", [("taskedge", {"density": 0.02}),
                                           ("taskedge", {"density": 0.05, "nm": "2:4"}),
                                           ("taskedge_lora", {})])
def test_training_matches_the_dense_gradient_path(method, kwargs):
    """A few Adam steps with the sparse backward leave the model as the dense-gradient path does."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32, generator=gen), torch.arange(8) % 10
    base = build_model("mobilenet_v2_035", num_classes=10, input_size=32, seed=1)
    adapters = []
    for dense in (False, True):
        torch.manual_seed(0)  # taskedge_lora's A starts random: the same in both runs
        adapter = make_method(method, **kwargs).attach(copy.deepcopy(base), calibration=x)
        if dense:
            for layer in adapter.layers.values():
                layer.__class__ = DenseMaskedLayer
        adapter.train_mode()
        opt = adapter.optimizer(lr=1e-2)
        for step in range(3):
            torch.manual_seed(step)  # the classifier's dropout draws the same mask in both runs
            opt.zero_grad()
            F.cross_entropy(adapter.model(x), y).backward()
            opt.step()
        adapters.append(adapter)
    sparse, dense = adapters
    for key, value in sparse.delta().items():
        torch.testing.assert_close(value, dense.delta()[key], rtol=1e-4, atol=1e-7, msg=key)
    assert any(v.abs().sum() > 0 for k, v in sparse.delta().items() if k.endswith(".values") or "lora_B" in k)
    sparse.model.eval(), dense.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse.model(x), dense.model(x), rtol=1e-5, atol=1e-6)


def test_profiled_backward_falls_below_fft_by_the_weight_gradient():
    """fft's backward = input gradients + every conv's dense weight gradient (+ the head's, which
    TaskEdge trains too); TaskEdge's drops the convs' weight gradients and adds, per masked layer,
    its gathered dots (2 FLOPs per entry, sample and position) and the masking's 1 per entry."""
    gen = torch.Generator().manual_seed(0)
    n = 4
    x, y = torch.rand(n, 3, 32, 32, generator=gen), torch.arange(n) % 10
    model = build_model("mobilenet_v2_035", num_classes=10, input_size=32, seed=1)
    positions = {}  # conv name -> output positions per sample
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: positions.__setitem__(name, o.shape[2] * o.shape[3]))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    costs = {}
    for method in ("fft", "taskedge"):
        adapter = make_method(method).attach(copy.deepcopy(model), calibration=x)
        adapter.train_mode()
        opt = adapter.optimizer(lr=1e-3)
        F.cross_entropy(adapter.model(x), y).backward()
        opt.step()
        costs[method] = count_step_flops(adapter.model, opt, x, y)
        if method == "taskedge":
            layers = adapter.layers
    weight_grads = sum(2 * n * positions[name] * m.weight.numel()
                       for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
    gathered = sum(2 * layer.indices.numel() * n * positions[name] for name, layer in layers.items())
    entries = sum(layer.indices.numel() for layer in layers.values())
    assert gathered > 0
    assert costs["taskedge"].detail["by_op"]["aten.bmm"] == gathered  # counted by the mode
    assert costs["fft"].backward - costs["taskedge"].backward == weight_grads - gathered - entries
    assert costs["taskedge"].backward < 0.6 * costs["fft"].backward
