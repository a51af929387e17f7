"""Profiling: FLOPs against closed forms, memory against hand-computed sizes, method costs, cache."""
import json
import time

import pytest
import torch
from torch import nn

import fedpeft.profiling as profiling
from fedpeft.profiling import CATEGORIES, profile_step
import fedpeft.profiling.cache as cache_module
from fedpeft.profiling.cache import ProfileCache, cache_key
from fedpeft.profiling.flops import (
    ADAMW_FLOPS_PER_ELEMENT,
    count_step_flops,
    dora_norm_flops,
    layer_flops,
    optimizer_analytic_flops,
    svd_flops,
)
from fedpeft.profiling.memory import measure_step_memory


# -- FLOPs of single layers ------------------------------------------------------------------
def conv_forward(n, c_out, c_in_per_group, k, ho, wo):
    return 2 * n * ho * wo * c_out * c_in_per_group * k * k


@pytest.mark.parametrize("input_grad", [True, False])
def test_dense_conv_flops_equal_closed_form(input_grad):
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
    fw, bw = layer_flops(conv, torch.randn(2, 16, 8, 8), input_requires_grad=input_grad)
    expected = conv_forward(2, 24, 16, 3, 8, 8)
    assert fw == expected
    assert bw == (2 if input_grad else 1) * expected
    # a dense conv (groups = 1) is counted the same in both conventions
    assert layer_flops(conv, torch.randn(2, 16, 8, 8), "paper", input_requires_grad=input_grad) == (fw, bw)


@pytest.mark.parametrize("input_grad", [True, False])
def test_depthwise_conv_flops_equal_closed_form(input_grad):
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    x = torch.randn(1, 32, 8, 8)
    fw, bw = layer_flops(conv, x, input_requires_grad=input_grad)
    expected = conv_forward(1, 32, 1, 3, 8, 8)
    assert fw == expected == 36_864
    # weight gradient = forward cost; input gradient (only when needed) = forward cost
    assert bw == (2 if input_grad else 1) * expected


def test_paper_convention_inflates_depthwise_weight_gradient_by_groups():
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    x = torch.randn(1, 32, 8, 8)
    fw, bw = layer_flops(conv, x, "paper")
    assert fw == 36_864
    assert bw == 36_864 + 32 * 36_864 == 1_216_512  # grad_input right, grad_weight x groups
    _, bw_no_input_grad = layer_flops(conv, x, "paper", input_requires_grad=False)
    assert bw_no_input_grad == 32 * 36_864


def test_grouped_conv_flops():
    conv = nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False)  # 4 input channels per group
    fw, bw = layer_flops(conv, torch.randn(2, 16, 6, 6))
    assert fw == conv_forward(2, 32, 4, 3, 6, 6)
    assert bw == 2 * fw


@pytest.mark.parametrize("input_grad", [True, False])
def test_linear_flops_equal_closed_form(input_grad):
    layer = nn.Linear(20, 30)
    fw, bw = layer_flops(layer, torch.randn(5, 20), input_requires_grad=input_grad)
    assert fw == 2 * 5 * 20 * 30
    assert bw == (2 if input_grad else 1) * fw


# -- optimizer FLOPs ------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def test_adamw_optimizer_flops_per_element():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    n = sum(p.numel() for p in model.parameters())
    flops = count_step_flops(model, opt, x, y)
    assert flops.optimizer == ADAMW_FLOPS_PER_ELEMENT * n
    assert flops.forward == 2 * 8 * (64 * 128 + 128 * 10)
    # the input needs no gradient: first layer backward = weight gradient only
    assert flops.backward == 2 * 8 * 64 * 128 + 2 * (2 * 8 * 128 * 10)
    decayed = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    assert optimizer_analytic_flops(decayed).elementwise == (ADAMW_FLOPS_PER_ELEMENT + 1) * n


def test_galore_optimizer_counts_projections_and_amortised_svd():
    from galore_torch import GaLoreAdamW

    model = nn.Linear(64, 32, bias=False)  # weight 32 x 64
    rank, gap = 4, 10
    opt = GaLoreAdamW([{"params": [model.weight], "rank": rank, "update_proj_gap": gap, "scale": 0.25,
                        "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
    x, y = torch.randn(8, 64), torch.randint(0, 32, (8,))
    count_step_flops(model, opt, x, y)  # warm-up: state + projector
    flops = count_step_flops(model, opt, x, y)
    m, n = 32, 64  # m < n: left projection P^T G (r x n) and back P (m x r) @ (r x n)
    projections = 2 * (2 * m * n * rank)
    assert flops.detail["optimizer_matmul"] == projections
    assert flops.detail["optimizer_svd_amortised"] == svd_flops(m, n) // gap
    assert svd_flops(m, n) == 6 * 64 * 32 * 32 + 20 * 32 ** 3
    moments = rank * n
    assert flops.detail["optimizer_elementwise"] == 10 * moments + 3 * m * n
    assert flops.optimizer == projections + svd_flops(m, n) // gap + 10 * moments + 3 * m * n


def test_galore_svd_is_summed_before_amortising():
    from galore_torch import GaLoreAdamW

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 64, bias=False))  # 32x64 and 64x32
    gap = 10
    opt = GaLoreAdamW([{"params": list(model.parameters()), "rank": 4, "update_proj_gap": gap, "scale": 0.25,
                        "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
    count_step_flops(model, opt, torch.randn(8, 64), torch.randint(0, 64, (8,)))
    svd = svd_flops(32, 64)
    assert svd % gap != 0  # so flooring per matrix would lose FLOPs
    assert optimizer_analytic_flops(opt).svd_amortised == 2 * svd // gap == 2 * (svd // gap) + 1


def test_optimizer_flops_skip_parameters_without_gradient():
    torch.manual_seed(0)
    used, unused = nn.Linear(64, 10), nn.Linear(64, 10)  # `unused` gets no gradient: Adam skips it
    opt = torch.optim.AdamW([*used.parameters(), *unused.parameters()], lr=1e-3, weight_decay=0.0)
    flops = count_step_flops(used, opt, torch.randn(8, 64), torch.randint(0, 10, (8,)))
    assert flops.optimizer == ADAMW_FLOPS_PER_ELEMENT * (64 * 10 + 10)


# -- DoRA's weight norm ------------------------------------------------------------------------
class _ConvFC(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # weight 8 x 3 x 3 x 3
        self.fc = nn.Linear(8 * 4 * 4, 5)  # weight 5 x 128

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _peft_step_flops(use_dora: bool, rank: int = 2):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_ConvFC(), LoraConfig(r=rank, lora_alpha=4, target_modules=["conv", "fc"],
                                                 use_dora=use_dora))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    x, y = torch.randn(2, 3, 4, 4), torch.randint(0, 5, (2,))
    return model, count_step_flops(model, opt, x, y)


def test_dora_step_exceeds_lora_by_matmul_and_analytic_norm_work():
    r = 2
    lora_model, lora = _peft_step_flops(False, r)
    dora_model, dora = _peft_step_flops(True, r)
    weights = 8 * 3 * 3 * 3 + 5 * 128  # every adapted weight element
    rows = 8 + 5  # output rows: one magnitude each
    norm_forward = 4 * weights + 2 * rows  # scale, add, square, sum per element; sqrt, magnitude/norm per row
    norm_backward = rows  # the norm is detached; the magnitude's gradient: 1 division per row
    assert dora_norm_flops(dora_model) == (norm_forward, norm_backward)
    assert dora_norm_flops(lora_model) == (0, 0)
    assert dora.detail["dora_norm_forward"] == norm_forward and lora.detail["dora_norm_forward"] == 0
    # B @ A, which the mode counts: the conv's mm (8 x r)(r x 27); the Linear's lora_B(lora_A(eye(128)))
    ba_matmuls = 2 * 8 * r * 27 + (2 * 128 * 128 * r + 2 * 128 * r * 5)
    assert dora.forward - lora.forward == ba_matmuls + norm_forward
    assert dora.backward - lora.backward == norm_backward
    assert dora.optimizer - lora.optimizer == ADAMW_FLOPS_PER_ELEMENT * rows  # the magnitudes train too


# -- memory ---------------------------------------------------------------------------------
def test_mlp_adamw_memory_matches_hand_computed_sizes():
    model = _mlp()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    mem = measure_step_memory(model, opt, x, y)
    param_bytes = sum(p.numel() * 4 for p in params)  # float32
    assert param_bytes == (64 * 128 + 128 + 128 * 10 + 10) * 4
    assert mem.by_category["parameter"] == mem.category_max["parameter"] == param_bytes
    assert mem.category_max["gradient"] == param_bytes
    # exp_avg + exp_avg_sq per parameter, plus torch's 4-byte float32 `step` counter per tensor
    assert mem.category_max["optimizer_state"] == 2 * param_bytes + 4 * len(params)
    assert mem.by_category["other"] == x.numel() * 4 + y.numel() * 8  # the batch
    assert sum(mem.by_category.values()) == mem.peak_bytes
    assert mem.peak_bytes <= sum(mem.category_max.values())
    assert set(mem.by_category) == set(CATEGORIES)


def test_memory_tracker_accepts_frozen_parameters():
    model = _mlp()
    model[0].weight.requires_grad_(False)  # stock MemTracker crashes here (grad hook on a frozen param)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    mem = measure_step_memory(model, opt, torch.randn(8, 64), torch.randint(0, 10, (8,)))
    trainable_bytes = sum(p.numel() * 4 for p in trainable)
    assert mem.by_category["parameter"] == sum(p.numel() * 4 for p in model.parameters())  # frozen ones count
    assert mem.category_max["gradient"] == trainable_bytes
    assert mem.category_max["optimizer_state"] == 2 * trainable_bytes + 4 * len(trainable)


# -- methods on a real model ------------------------------------------------------------------
CONTRACT_MEMORY = {"parameter", "buffer", "gradient", "activation", "temporary", "optimizer_state", "other"}


@pytest.fixture(scope="module")
def mobilenet_costs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("profiles")
    costs = {}
    for method in ("fft", "bn_head", "lora", "taskedge", "galore"):
        costs[method] = profile_step("mobilenet_v2", method, {"rank": 4, "alpha": 4}, 32, 8, 10, cache_dir=str(cache))
    return costs


def test_peft_methods_need_far_less_gradient_and_optimizer_memory(mobilenet_costs):
    fft = mobilenet_costs["fft"]
    for method in ("lora", "bn_head", "taskedge"):
        cost = mobilenet_costs[method]
        assert cost.memory["category_max"]["gradient"] < 0.2 * fft.memory["category_max"]["gradient"], method
        assert cost.memory["category_max"]["optimizer_state"] < 0.1 * fft.memory["category_max"]["optimizer_state"], method
        assert cost.params_trainable < 0.1 * fft.params_trainable
        assert cost.payload_bytes < 0.1 * fft.payload_bytes
        assert cost.memory["peak_bytes"] < fft.memory["peak_bytes"]
    # GaLore trains every weight but keeps low-rank moments
    galore = mobilenet_costs["galore"]
    assert galore.params_trainable == fft.params_trainable
    assert galore.memory["category_max"]["optimizer_state"] < 0.5 * fft.memory["category_max"]["optimizer_state"]
    assert galore.flops_detail["exact"]["optimizer_svd_amortised"] > 0


def test_step_cost_contract(mobilenet_costs):
    d = mobilenet_costs["lora"].to_dict()
    for key in ("model", "method", "params_total", "params_trainable", "payload_bytes", "memory", "flops"):
        assert key in d
    assert set(d["memory"]["by_category"]) == set(d["memory"]["category_max"]) == CONTRACT_MEMORY
    assert set(d["flops"]) >= {"forward", "backward", "optimizer", "total"}
    assert all(isinstance(v, int) for v in d["flops"].values())
    assert d["flops"]["total"] == d["flops"]["forward"] + d["flops"]["backward"] + d["flops"]["optimizer"]
    assert sum(d["memory"]["by_category"].values()) == d["memory"]["peak_bytes"]
    json.dumps(d)


def test_paper_convention_inflates_mobilenet_backward(mobilenet_costs):
    fft = mobilenet_costs["fft"]
    exact, paper = fft.flops_by_convention["exact"], fft.flops_by_convention["paper"]
    assert paper["forward"] == exact["forward"]
    assert paper["backward"] > 5 * exact["backward"]  # depthwise weight gradients x groups
    assert exact["backward"] <= 2 * exact["forward"]


# -- speed and cache ------------------------------------------------------------------------
def test_profile_takes_seconds_and_repeat_is_served_from_cache(tmp_path, monkeypatch):
    runs = profiling.PROFILE_RUNS
    start = time.perf_counter()
    first = profile_step("mobilenet_v2", "lora", {"rank": 4}, 32, 8, 10, cache_dir=str(tmp_path))
    took = time.perf_counter() - start
    assert took < 60, f"profiling took {took:.1f} s"
    assert profiling.PROFILE_RUNS == runs + 1 and not first.cached
    files = list((tmp_path / "profiles").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["method"] == "lora"
    assert not list((tmp_path / "profiles").glob("*.tmp"))  # atomic write left no temp file

    def no_profiling(*args, **kwargs):
        raise AssertionError("a cached query must not profile")

    monkeypatch.setattr(profiling, "_profile", no_profiling)
    start = time.perf_counter()
    for _ in range(1000):
        again = profile_step("mobilenet_v2", "lora", {"rank": 4}, 32, 8, 10, cache_dir=str(tmp_path))
    per_hit = (time.perf_counter() - start) / 1000
    assert per_hit < 1e-3, f"cache hit took {per_hit * 1e6:.0f} us"
    assert again.cached and again.to_dict()["memory"] == first.to_dict()["memory"]
    # the hyper-parameters' defaults are part of the key: rank 4 given or defaulted is one entry
    assert profile_step("mobilenet_v2", "lora", {}, 32, 8, 10, cache_dir=str(tmp_path)).cached
    # a float field given as an int is the same entry (alpha defaults to 4.0), on disk too
    monkeypatch.setattr(profiling, "_HITS", {})
    assert profile_step("mobilenet_v2", "lora", {"rank": 4, "alpha": 4}, 32, 8, 10, cache_dir=str(tmp_path)).cached
    assert profile_step("mobilenet_v2", "lora", {"rank": 4, "alpha": 4.0}, 32, 8, 10, cache_dir=str(tmp_path)).cached
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1
    # the other convention comes from the same record
    assert profile_step("mobilenet_v2", "lora", {"rank": 4}, 32, 8, 10, cache_dir=str(tmp_path),
                        convention="paper").flops == first.flops_by_convention["paper"]

    # a fresh process (empty in-memory dicts) reads the JSON file, still without profiling
    monkeypatch.setattr(profiling, "_HITS", {})
    monkeypatch.setattr(cache_module, "_CACHES", {})
    from_disk = profile_step("mobilenet_v2", "lora", {"rank": 4}, 32, 8, 10, cache_dir=str(tmp_path))
    assert from_disk.cached and from_disk.to_dict()["flops"] == first.to_dict()["flops"]

    # anything that changes the result is a different key: this one must profile
    with pytest.raises(AssertionError, match="must not profile"):
        profile_step("mobilenet_v2", "lora", {"rank": 8}, 32, 8, 10, cache_dir=str(tmp_path))
    with pytest.raises(AssertionError, match="must not profile"):
        profile_step("mobilenet_v2", "lora", {"rank": 4}, 32, 4, 10, cache_dir=str(tmp_path))


def test_int_and_float_hparams_give_one_key():
    from fedpeft.methods import make_method

    as_int, as_float = make_method("lora", rank=4, alpha=4), make_method("lora", rank=4, alpha=4.0)
    assert cache_key({"h": as_int.hparams()}) != cache_key({"h": as_float.hparams()})  # the bug, unnormalised
    for method in (as_int, as_float):
        profiling.normalise_hparams(method)
    assert as_int.alpha == 4.0 and isinstance(as_int.alpha, float) and as_int.rank == 4 and isinstance(as_int.rank, int)
    assert cache_key({"h": as_int.hparams()}) == cache_key({"h": as_float.hparams()})
    galore = make_method("galore", scale=1)
    profiling.normalise_hparams(galore)
    assert isinstance(galore.scale, float) and isinstance(galore.update_proj_gap, int)


def test_key_holds_library_versions_and_costs_do_not_share_the_cached_record(tmp_path, monkeypatch):
    assert set(profiling.library_versions()) == {"torch", "torchvision", "peft", "galore-torch"}
    first = profile_step("mobilenet_v2", "bn_head", {}, 32, 8, 10, cache_dir=str(tmp_path))
    record = json.loads(next((tmp_path / "profiles").glob("*.json")).read_text())
    assert record["key_fields"]["peft"] == profiling.library_versions()["peft"]
    assert record["key_fields"]["galore-torch"] == profiling.library_versions()["galore-torch"]
    peak = first.memory["peak_bytes"]
    first.memory["peak_bytes"] = -1
    first.memory["by_category"]["activation"] = -1
    first.flops_by_convention["exact"]["total"] = -1
    monkeypatch.setattr(profiling, "_HITS", {})  # go to the cache's record
    again = profile_step("mobilenet_v2", "bn_head", {}, 32, 8, 10, cache_dir=str(tmp_path))
    assert again.cached and again.memory["peak_bytes"] == peak
    assert again.memory["by_category"]["activation"] != -1 and again.flops_by_convention["exact"]["total"] > 0


def test_cache_key_and_corrupt_file(tmp_path):
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})
    cache = ProfileCache(tmp_path)
    key = cache_key({"x": 1})
    cache.directory.mkdir(parents=True)
    cache.path(key).write_text("{not json")
    assert cache.get(key) is None  # unreadable: a miss, not a crash
    cache.put(key, {"v": 1})
    assert ProfileCache(tmp_path).get(key)["v"] == 1


def test_bad_input_raises_usage_error(tmp_path):
    from fedpeft.errors import UsageError

    for args, message in [
        (("nope", "lora"), "model"),
        (("mobilenet_v2", "nope"), "method"),
        (("mobilenet_v2", "lora", {}, 0), "input_size"),
        (("mobilenet_v2", "lora", {}, 32, 0), "batch_size"),
        (("mobilenet_v2", "lora", {}, 8), "input_size"),
    ]:
        with pytest.raises(UsageError, match=message):
            profile_step(*args, cache_dir=str(tmp_path))
