"""Every method trains for real, touches nothing else, and its delta reproduces the trained model."""
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.methods import METHODS, make_method
from fedpeft.methods.layers import is_batchnorm
from fedpeft.models import build_model

MODELS = ["mobilenet_v2", "resnet18"]
# Denser TaskEdge masks than the 0.1% default, so a few steps visibly move the loss.
HPARAMS = {"taskedge": {"density": 0.05}, "taskedge_lora": {"density": 0.05}}


def pretrained(name: str) -> nn.Module:
    """A stand-in for a pre-trained model: fixed weights and BatchNorm statistics that are not the defaults."""
    model = build_model(name, num_classes=10, input_size=32, seed=1)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    return model.eval()


def bn_buffer_names(model: nn.Module) -> set[str]:
    return {f"{m}.{b}" for m, mod in model.named_modules() if is_batchnorm(mod) for b, _ in mod.named_buffers()}


def train_steps(adapter, x, y, steps=6, lr=5e-3):
    opt = adapter.optimizer(lr=lr)
    adapter.train_mode()
    for _ in range(steps):
        loss = F.cross_entropy(adapter.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def fixed_batch_loss(adapter, x, y):
    adapter.train_mode()
    with torch.no_grad():
        return F.cross_entropy(adapter.model(x), y).item()


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_method_trains_only_its_tensors_and_delta_reproduces_model(method_name, model_name, batch):
    x, y = batch
    model = pretrained(model_name)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    live = dict(model.state_dict(keep_vars=True))  # the tensor objects, still inside any wrapper later
    bn_buffers = bn_buffer_names(model)

    adapter = make_method(method_name, **HPARAMS.get(method_name, {})).attach(model, calibration=x)
    trained_originals = {k for k, t in live.items() if isinstance(t, nn.Parameter) and t.requires_grad}
    if adapter.trains_bn_stats:
        trained_originals |= bn_buffers
    loss_before = fixed_batch_loss(adapter, x, y)
    train_steps(adapter, x, y)
    loss_after = fixed_batch_loss(adapter, x, y)
    assert loss_after < loss_before, f"{method_name}: loss {loss_before:.4f} -> {loss_after:.4f}"

    # Everything the method does not train is bit-identical.
    untouched = [k for k in live if k not in trained_originals]
    if method_name != "fft":
        assert untouched, "a PEFT method must leave some tensors alone"
    for key in untouched:
        assert torch.equal(live[key].detach(), before[key]), f"{method_name} changed frozen tensor {key}"

    # The delta holds exactly the trained tensors: its bytes are theirs (+ sparse indices / BN statistics).
    delta = adapter.delta()
    expected = sum(p.numel() * p.element_size() for p in adapter.trainable().values())
    if adapter.trains_bn_stats:
        expected += sum(live[k].numel() * live[k].element_size() for k in bn_buffers)
    if method_name == "fft":
        expected = sum(t.numel() * t.element_size() for t in before.values())
    expected += sum(t.numel() * t.element_size() for k, t in delta.items() if k.endswith(".indices"))
    assert adapter.delta_bytes() == expected

    # Applying the delta to a fresh pre-trained copy reproduces the trained model.
    fresh = make_method(method_name, **HPARAMS.get(method_name, {})).attach(pretrained(model_name))
    fresh.load_delta(delta)
    adapter.model.eval()
    fresh.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(x), adapter.model(x), atol=1e-6, rtol=0)
        assert not torch.allclose(pretrained(model_name)(x), adapter.model(x), atol=1e-6), "training changed nothing"


def test_bn_head_trains_exactly_bn_affine_and_head():
    model = pretrained("mobilenet_v2")
    expected = sum(p.numel() for m in model.modules() if is_batchnorm(m) for p in m.parameters())
    expected += model.classifier[1].weight.numel() + model.classifier[1].bias.numel()
    adapter = make_method("bn_head").attach(model)
    assert adapter.num_trainable() == expected


def test_lora_counts_r_times_in_plus_out_per_layer():
    rank = 4
    model = pretrained("mobilenet_v2")
    pointwise = model.features[1].conv[1]  # a 1x1 conv, 32 -> 16
    adapter = make_method("lora", rank=rank, train_head=False).attach(model)
    params = dict(adapter.model.named_parameters())
    name = "base_model.model.features.1.conv.1"
    count = params[f"{name}.lora_A.default.weight"].numel() + params[f"{name}.lora_B.default.weight"].numel()
    assert count == rank * (pointwise.in_channels + pointwise.out_channels)
    head = "base_model.model.classifier.1"
    assert params[f"{head}.lora_A.default.weight"].numel() + params[f"{head}.lora_B.default.weight"].numel() == rank * (1280 + 10)


def test_depthwise_lora_adds_r_times_c_plus_k2_per_depthwise_conv():
    rank = 4
    model = pretrained("mobilenet_v2")
    dw = model.features[2].conv[1][0]  # 96-channel 3x3 depthwise
    assert dw.groups == dw.in_channels == 96
    adapter = make_method("lora", rank=rank, depthwise=True).attach(model)
    delta = adapter.delta()
    size = delta["features.2.conv.1.0.dw_lora_A"].numel() + delta["features.2.conv.1.0.dw_lora_B"].numel()
    assert size == rank * (96 + 9)


@pytest.mark.parametrize("density", [0.01, 0.05])
def test_taskedge_density_and_even_spread_over_neurons(density, batch):
    x, _ = batch
    adapter = make_method("taskedge", density=density).attach(pretrained("resnet18"), calibration=x)
    assert abs(adapter.realised_density - density) <= 0.01 * density
    for name, layer in adapter.layers.items():
        rows = layer.indices // layer.base.weight[0].numel()
        counts = torch.bincount(rows, minlength=layer.base.weight.shape[0])
        assert counts.max() - counts.min() <= 1 and counts.max() >= 1, name


def test_taskedge_nm_masks_have_exactly_n_of_every_m_chosen_block(batch):
    x, _ = batch
    adapter = make_method("taskedge", density=0.1, nm="2:4").attach(pretrained("resnet18"), calibration=x)
    for name, layer in adapter.layers.items():
        fan_in = layer.base.weight[0].numel()
        rows, cols = layer.indices // fan_in, layer.indices % fan_in
        blocks = rows * ((fan_in + 3) // 4) + cols // 4
        per_block = torch.bincount(blocks)
        assert set(per_block[per_block > 0].tolist()) == {2}, name


def test_taskedge_importance_uses_activations(batch):
    """Scaling one input channel of the calibration data moves the mask toward it."""
    x, _ = batch
    model = pretrained("resnet18")
    plain = make_method("taskedge", density=0.01).attach(model, calibration=x)
    loud = x.clone()
    loud[:, 0] *= 50.0
    shifted = make_method("taskedge", density=0.01).attach(pretrained("resnet18"), calibration=loud)
    first_conv_cols = lambda a: a.layers["conv1"].indices % 147  # noqa: E731
    red = lambda cols: (cols < 49).float().mean().item()  # noqa: E731  (channel 0's 7x7 patch elements)
    assert red(first_conv_cols(shifted)) > red(first_conv_cols(plain))


@pytest.mark.parametrize("method_name", ["lora", "dora"])
def test_peft_export_loads_with_plain_peft(method_name, batch):
    from peft import PeftModel

    x, y = batch
    adapter = make_method(method_name).attach(pretrained("mobilenet_v2"))
    train_steps(adapter, x, y, steps=3)
    with tempfile.TemporaryDirectory() as tmp:
        adapter.export_peft(tmp)
        loaded = PeftModel.from_pretrained(pretrained("mobilenet_v2"), tmp)
        adapter.model.eval()
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), adapter.model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "name, hparams, field",
    [
        ("lora", {"rank": 0}, "rank"),
        ("galore", {"rank": -1}, "rank"),
        ("taskedge", {"density": 0.0}, "density"),
        ("taskedge", {"density": 1.5}, "density"),
        ("taskedge", {"nm": "5:4"}, "nm"),
        ("nope", {}, "method"),
    ],
)
def test_bad_hyperparameters_name_the_field(name, hparams, field):
    from fedpeft.errors import UsageError

    with pytest.raises(UsageError, match=f"^{field}"):
        make_method(name, **hparams)
