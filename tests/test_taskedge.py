"""TaskEdge's budget and N:M masks, and train()'s guard against batches BatchNorm cannot use."""
import json

import pytest
import torch

from fedpeft.cli import main
from fedpeft.errors import UsageError
from fedpeft.methods import make_method
from fedpeft.methods.taskedge import DEFAULT_DENSITY, neuron_mask
from fedpeft.models import build_model
from fedpeft.train import train

FAST = ["--model", "mobilenet_v2_035", "--pretrain-epochs", "1"]


def model(name: str) -> torch.nn.Module:
    return build_model(name, num_classes=10, input_size=32, seed=1).eval()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and "RuntimeWarning" not in line]


# -- train(): batches of one ------------------------------------------------------------------
@pytest.mark.timeout(60)  # the old loop never ended here
@pytest.mark.parametrize("method", ["bn_head", "fft"])
def test_batch_size_one_with_bn_statistics_is_refused(method):
    adapter = make_method(method).attach(model("mobilenet_v2_035"))
    x, y = torch.rand(3, 3, 32, 32), torch.arange(3)
    with pytest.raises(UsageError, match=f"^batch_size: {method} trains BatchNorm statistics, "
                                         "which need batches of at least 2; got 1$"):
        train(adapter, x, y, batch_size=1)


@pytest.mark.timeout(60)
def test_one_example_partition_with_bn_statistics_is_refused():
    adapter = make_method("bn_head").attach(model("mobilenet_v2_035"))
    with pytest.raises(UsageError, match="^data: bn_head trains BatchNorm statistics.*only 1 example"):
        train(adapter, torch.rand(1, 3, 32, 32), torch.tensor([3]), batch_size=32)


@pytest.mark.timeout(60)
def test_trailing_batch_of_one_is_skipped_within_the_epoch():
    """5 examples in batches of 2: an epoch is two steps, not a third borrowed from another pass."""
    x, y = torch.rand(5, 3, 32, 32), torch.arange(5)
    bn = train(make_method("bn_head").attach(model("mobilenet_v2_035")), x, y, epochs=1, batch_size=2)
    assert (bn.steps, bn.examples) == (2, 4)
    plain = train(make_method("taskedge", density=0.01).attach(model("mobilenet_v2_035")), x[:3], y[:3], batch_size=2)
    assert (plain.steps, plain.examples) == (2, 3)  # BN frozen: the batch of one trains


@pytest.mark.timeout(300)  # the old code pretrained, then never ended
def test_finetune_bn_head_batch_size_one_fails_before_any_work(tmp_path, capsys):
    code = main(["finetune", *FAST, "--method", "bn_head", "--batch-size", "1", "--cache-dir", str(tmp_path)])
    assert code == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == ["fedpeft finetune: error: batch_size: bn_head trains BatchNorm statistics, "
                     "which need batches of at least 2; got 1"], lines
    assert not (tmp_path / "pretrain").exists()  # refused before pretraining


# -- N:M ----------------------------------------------------------------------------------------
def test_partial_group_keeps_only_its_real_entries():
    """fan_in 5 under 2:4: groups {0..3} and {4}; the second can give only column 4."""
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.2, 0.5], [0.3, 0.1, 0.2, 0.4, 0.0]])
    flat = neuron_mask(scores, budget=4, nm=(2, 4))  # every group of both rows
    assert flat.tolist() == [1, 2, 4, 5 + 0, 5 + 3, 5 + 4]


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_nm_beyond_the_last_group_trains_with_valid_masks(name):
    n, m = 4, 8  # mobilenet_v2's first conv has fan_in 27 = 3 * 8 + 3, resnet18's 147 = 18 * 8 + 3
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32, generator=gen), torch.arange(8) % 10
    adapter = make_method("taskedge", density=0.5, nm=f"{n}:{m}").attach(model(name), calibration=x)
    partial_seen = 0
    for layer_name, layer in adapter.layers.items():
        idx, numel, fan_in = layer.indices, layer.base.weight.numel(), layer.base.weight[0].numel()
        assert idx.numel() > 0 and idx.unique().numel() == idx.numel(), layer_name
        assert 0 <= int(idx.min()) and int(idx.max()) < numel, layer_name
        rows, cols = idx // fan_in, idx % fan_in
        groups = -(-fan_in // m)
        per_group = torch.bincount(rows * groups + cols // m, minlength=layer.base.weight.shape[0] * groups)
        last = torch.arange(per_group.numel()) % groups == groups - 1
        full = ~last if fan_in % m else torch.ones_like(last)
        assert set(per_group[full & (per_group > 0)].tolist()) == {n}, layer_name
        if fan_in % m:
            partial = per_group[last & (per_group > 0)]
            assert set(partial.tolist()) <= {min(n, fan_in % m)}, layer_name
            partial_seen += partial.numel()
    assert partial_seen > 0  # the case that used to pick padding was exercised
    result = train(adapter, x[:4], y[:4], epochs=1, batch_size=2)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.loss))
    assert any(layer.values.abs().sum() > 0 for layer in adapter.layers.values())


# -- the density budget ---------------------------------------------------------------------
@pytest.mark.parametrize("name, density", [("mobilenet_v2", 0.001), ("mobilenet_v2", 0.003), ("resnet18", 0.001)])
def test_global_budget_is_honoured_at_low_density(name, density, batch):
    x, _ = batch
    adapter = make_method("taskedge", density=density).attach(model(name), calibration=x)
    masked = sum(layer.indices.numel() for layer in adapter.layers.values())
    total = sum(layer.base.weight.numel() for layer in adapter.layers.values())
    assert 0.95 * density <= masked / total <= 1.05 * density
    assert adapter.realised_density == masked / total
    neurons_without = 0
    for layer_name, layer in adapter.layers.items():
        rows = layer.indices // layer.base.weight[0].numel()
        counts = torch.bincount(rows, minlength=layer.base.weight.shape[0])
        assert counts.max() - counts.min() <= 1, layer_name  # spread evenly over the neurons
        neurons_without += int((counts == 0).sum())
    assert neurons_without > 0  # the budget, not "one entry per neuron", decides


def test_default_density_is_the_papers_and_profile_json_reports_the_realised_one(tmp_path, capsys):
    assert DEFAULT_DENSITY == 0.001 and make_method("taskedge").density == DEFAULT_DENSITY
    argv = ["profile", "--model", "mobilenet_v2", "--method", "taskedge", "--batch-size", "2", "--format", "json",
            "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["hparams"]["density"] == DEFAULT_DENSITY
    assert 0.00095 <= first["realised_density"] <= 0.00105
    assert main(argv) == 0  # from the cache, still reported
    again = json.loads(capsys.readouterr().out)
    assert again["cached"] and again["realised_density"] == first["realised_density"]


def test_finetune_reports_realised_density(tmp_path, capsys):
    argv = ["finetune", *FAST, "--method", "taskedge", "--density", "0.01", "--epochs", "1",
            "--batch-size", "256", "--cache-dir", str(tmp_path), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0095 <= out["realised_density"] <= 0.0105 and out["steps"] > 0


def test_one_density_default_everywhere(tmp_path):
    """A fleet's TaskEdge uses the method's own default density, as finetune and profile do."""
    from fedpeft.fleet.config import RunConfig
    from fedpeft.methods import make_method
    from fedpeft.methods.taskedge import DEFAULT_DENSITY, DEFAULT_LORA_DENSITY

    cfg = RunConfig(method="taskedge")
    assert "density" not in cfg.method_hparams()
    assert make_method("taskedge", **cfg.method_hparams()).density == DEFAULT_DENSITY
    assert make_method("taskedge_lora", **cfg.method_hparams("taskedge_lora")).density == DEFAULT_LORA_DENSITY
    assert RunConfig(method="taskedge", density=0.05).method_hparams()["density"] == 0.05
