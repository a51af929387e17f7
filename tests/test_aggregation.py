import fedpeft  # noqa: F401  (torchvision shim first)

import pytest
import torch

from fedpeft.errors import UsageError
from strategies.aggregation import (
    aggregate, bn_keys, drop_bn, fedavg, lora_effective_update, lora_exact, lora_fedit, lora_ffa,
    lora_pairs, lora_stack, method_family, taskedge_average,
)

A = "base_model.model.features.0.0.lora_A.weight"
B = "base_model.model.features.0.0.lora_B.weight"
LA = "base_model.model.classifier.1.lora_A.weight"
LB = "base_model.model.classifier.1.lora_B.weight"


def conv_lora(rank, seed, out=6, cin=3, k=3, extra=True):
    g = torch.Generator().manual_seed(seed)
    d = {A: torch.randn(rank, cin, k, k, generator=g), B: torch.randn(out, rank, 1, 1, generator=g)}
    if extra:
        d[LA] = torch.randn(rank, 10, generator=g)
        d[LB] = torch.randn(4, rank, generator=g)
        d["base_model.model.classifier.1.bias"] = torch.randn(4, generator=g)
    return d


def product(d, a_key=A, alpha=None):
    return lora_effective_update(d, a_key, lora_alpha=alpha)


# -- FedAvg ----------------------------------------------------------------------------------------

def test_fedavg_weights_by_examples():
    d1 = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(3)}
    d2 = {"w": torch.tensor([4.0, 8.0]), "bn.num_batches_tracked": torch.tensor(7)}
    out = fedavg([d1, d2], [10, 30])
    assert torch.allclose(out["w"], torch.tensor([0.25 * 1 + 0.75 * 4, 0.25 * 2 + 0.75 * 8]))
    assert out["w"].dtype == torch.float32
    assert out["bn.num_batches_tracked"].item() == 7  # integer tensors: max
    # a zero-weight client does not count
    assert torch.equal(fedavg([d1, d2], [5, 0])["w"], d1["w"])


def test_fedavg_rejects_mismatch():
    with pytest.raises(UsageError, match="weights"):
        fedavg([{"w": torch.ones(2)}], [1, 2])
    with pytest.raises(UsageError, match=r"weights\[0\]"):
        fedavg([{"w": torch.ones(2)}], [-1])
    with pytest.raises(UsageError, match="shape"):
        fedavg([{"w": torch.ones(2)}, {"w": torch.ones(3)}], [1, 1])
    with pytest.raises(UsageError, match="missing key"):
        fedavg([{"w": torch.ones(2), "v": torch.ones(1)}, {"w": torch.ones(2)}], [1, 1])


# -- LoRA ------------------------------------------------------------------------------------------

def test_lora_pairs_conv_linear_and_depthwise():
    d = conv_lora(2, 0)
    d["features.1.conv.0.dw_lora_A"] = torch.randn(2, 9)
    d["features.1.conv.0.dw_lora_B"] = torch.randn(16, 2)
    assert lora_pairs(d) == {A: B, LA: LB, "features.1.conv.0.dw_lora_A": "features.1.conv.0.dw_lora_B"}
    del d[B]
    with pytest.raises(UsageError, match="without its lora_B"):
        lora_pairs(d)


def test_fedit_averages_a_and_b_separately():
    d1, d2 = conv_lora(2, 1), conv_lora(2, 2)
    out = lora_fedit([d1, d2], [1, 3])
    assert torch.allclose(out[A], 0.25 * d1[A] + 0.75 * d2[A])
    assert torch.allclose(out[B], 0.25 * d1[B] + 0.75 * d2[B])
    with pytest.raises(UsageError, match="exact or stack"):
        lora_fedit([conv_lora(2, 1), conv_lora(3, 2)], [1, 1])


def test_exact_equal_ranks_reproduces_weighted_mean_of_products():
    d1, d2 = conv_lora(2, 1), conv_lora(2, 2)
    w = [2, 6]
    outs = lora_exact([d1, d2], w, ranks_out=[4, 4])  # rank 4 >= rank of the mean (<= 2 + 2)
    for a_key in (A, LA):
        want = 0.25 * product(d1, a_key) + 0.75 * product(d2, a_key)
        for out in outs:
            assert torch.allclose(product(out, a_key), want, atol=1e-5)
    assert outs[0][A].shape == (4, 3, 3, 3) and outs[0][B].shape == (6, 4, 1, 1)
    assert outs[0][LA].shape == (4, 10) and outs[0][LB].shape == (4, 4)
    # non-LoRA keys are FedAvg'd
    assert torch.allclose(outs[0]["base_model.model.classifier.1.bias"],
                          0.25 * d1["base_model.model.classifier.1.bias"] + 0.75 * d2["base_model.model.classifier.1.bias"])
    # symmetric split: B' = U sqrt(S), A' = sqrt(S) V^T -> column norms of B' equal row norms of A'
    a_mat, b_mat = outs[0][LA].double(), outs[0][LB].double()
    assert torch.allclose(b_mat.norm(dim=0), a_mat.norm(dim=1), atol=1e-5)


def test_exact_rank_one_clients_full_rank_output_is_exact():
    # two rank-1 updates average to a rank-2 matrix: rank 1 can't hold it, rank 2 reproduces it
    d1, d2 = conv_lora(1, 3, extra=False), conv_lora(1, 4, extra=False)
    want = 0.5 * product(d1) + 0.5 * product(d2)
    r2 = lora_exact([d1, d2], [1, 1], ranks_out=2)
    assert torch.allclose(product(r2), want, atol=1e-5)
    r1 = lora_exact([d1, d2], [1, 1], ranks_out=1)
    s = torch.linalg.svdvals(want)
    best = s[0] * torch.linalg.svd(want).U[:, :1] @ torch.linalg.svd(want).Vh[:1]  # Eckart-Young optimum
    assert torch.allclose(product(r1), best, atol=1e-5)


def test_exact_unequal_ranks_each_client_gets_its_own_rank():
    ds = [conv_lora(2, 5), conv_lora(4, 6), conv_lora(8, 7)]
    w = [1, 1, 2]
    outs = lora_exact(ds, w)  # ranks_out=None -> each client's own rank
    assert [o[A].shape[0] for o in outs] == [2, 4, 8]
    assert [tuple(o[B].shape) for o in outs] == [(6, 2, 1, 1), (6, 4, 1, 1), (6, 8, 1, 1)]
    assert [tuple(o[LB].shape) for o in outs] == [(4, 2), (4, 4), (4, 8)]
    want = sum(p * product(d) for p, d in zip([0.25, 0.25, 0.5], ds))
    # true rank of the conv mean is min(6, 27) = 6 <= 8: the rank-8 client gets it exactly
    assert torch.allclose(product(outs[2]), want, atol=1e-5)
    # lower ranks get the best rank-r approximation (error = tail singular values)
    s = torch.linalg.svdvals(want)
    for o, r in zip(outs[:2], (2, 4)):
        err = torch.linalg.matrix_norm(product(o) - want)
        assert torch.isclose(err, s[r:].norm(), atol=1e-4)
    # rank larger than min(out, in) is zero-padded, still exact
    big = lora_exact(ds, w, ranks_out=[10])[0]
    assert big[A].shape == (10, 3, 3, 3) and torch.allclose(product(big), want, atol=1e-5)


def test_exact_accounts_for_alpha_over_r_scaling():
    alpha = 16.0
    d1, d2 = conv_lora(2, 8, extra=False), conv_lora(4, 9, extra=False)
    want = 0.5 * (alpha / 2) * product(d1) + 0.5 * (alpha / 4) * product(d2)
    outs = lora_exact([d1, d2], [1, 1], ranks_out=[8, 6], lora_alpha=alpha)
    for o, r in zip(outs, (8, 6)):
        assert torch.allclose((alpha / r) * product(o), want, atol=1e-4)
        assert torch.allclose(lora_effective_update(o, A, lora_alpha=alpha), want, atol=1e-4)


def test_ffa_leaves_a_untouched_and_averages_b():
    global_state = conv_lora(2, 10)
    d1, d2 = conv_lora(2, 11), conv_lora(2, 12)
    out = lora_ffa([d1, d2], [1, 1], global_state=global_state)
    assert torch.equal(out[A], global_state[A]) and torch.equal(out[LA], global_state[LA])
    assert out[A] is not global_state[A]
    assert torch.allclose(out[B], 0.5 * (d1[B] + d2[B]))
    # without global_state the (frozen, identical) A of the clients passes through
    d2b = dict(d2, **{A: d1[A], LA: d1[LA]})
    out2 = lora_ffa([d1, d2b], [1, 3])
    assert torch.equal(out2[A], d1[A])
    assert torch.allclose(out2[LB], 0.25 * d1[LB] + 0.75 * d2[LB])
    with pytest.raises(UsageError, match="global_state"):
        lora_ffa([d1, d2], [1, 1])


def test_stack_is_exact_and_sums_ranks():
    alpha = 8.0
    ds = [conv_lora(2, 13, extra=False), conv_lora(3, 14, extra=False)]
    out = lora_stack(ds, [1, 3], lora_alpha=alpha)
    assert out[A].shape == (5, 3, 3, 3) and out[B].shape == (6, 5, 1, 1)
    want = 0.25 * (alpha / 2) * product(ds[0]) + 0.75 * (alpha / 3) * product(ds[1])
    assert torch.allclose(lora_effective_update(out, A, lora_alpha=alpha), want, atol=1e-4)


# -- TaskEdge --------------------------------------------------------------------------------------

def test_taskedge_average_counts_only_clients_that_trained_the_entry():
    m = "features.3.conv.0.weight"
    d1 = {m + ".values": torch.tensor([1.0, 2.0, 3.0]), m + ".indices": torch.tensor([0, 5, 9])}
    d2 = {m + ".values": torch.tensor([10.0, 20.0]), m + ".indices": torch.tensor([9, 2])}
    d3 = {m + ".values": torch.tensor([100.0]), m + ".indices": torch.tensor([5])}
    out = taskedge_average([d1, d2, d3], [1, 3, 1])
    assert out[m + ".indices"].tolist() == [0, 2, 5, 9]
    assert out[m + ".indices"].dtype == torch.int64
    # 0: only d1 -> 1; 2: only d2 -> 20; 5: d1, d3 equal weight -> 51; 9: d1 w1 3, d2 w3 10 -> 8.25
    assert torch.allclose(out[m + ".values"], torch.tensor([1.0, 20.0, 51.0, 8.25]))


def test_taskedge_average_rejects_bad_sparse_entries():
    m = "conv.weight"
    good = {m + ".values": torch.tensor([1.0]), m + ".indices": torch.tensor([0])}
    with pytest.raises(UsageError, match="duplicate"):
        taskedge_average([good, {m + ".values": torch.ones(2), m + ".indices": torch.tensor([1, 1])}], [1, 1])
    with pytest.raises(UsageError, match="values for"):
        taskedge_average([good, {m + ".values": torch.ones(2), m + ".indices": torch.tensor([1])}], [1, 1])
    with pytest.raises(UsageError, match="numel"):
        taskedge_average([good], [1], numels={m: 0})


# -- FedBN and dispatcher --------------------------------------------------------------------------

def test_drop_bn_removes_bn_keys_only():
    d = {"features.0.1.weight": torch.ones(2), "features.0.1.bias": torch.ones(2),
         "features.0.1.running_mean": torch.ones(2), "features.0.1.running_var": torch.ones(2),
         "features.0.1.num_batches_tracked": torch.tensor(1), "features.0.0.weight": torch.ones(2, 1, 1, 1),
         "classifier.1.weight": torch.ones(3, 2), "classifier.1.bias": torch.ones(3)}
    assert set(drop_bn(d)) == {"features.0.0.weight", "classifier.1.weight", "classifier.1.bias"}
    assert len(bn_keys(d, ["features.0.1"])) == 5
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    assert set(drop_bn(model.state_dict(), model)) == {"0.weight", "0.bias"}


def test_aggregate_dispatch():
    d1, d2 = conv_lora(2, 15), conv_lora(2, 16)
    assert torch.allclose(aggregate("lora", None, [d1, d2], [1, 1])[A], 0.5 * (d1[A] + d2[A]))
    assert len(aggregate("dora", "exact", [d1, d2], [1, 1], ranks_out=[2, 4])) == 2
    assert torch.equal(aggregate("lora", "ffa", [d1, d2], [1, 1], global_state=d1)[A], d1[A])
    assert method_family("taskedge_lora") == "taskedge" and method_family("galore") == "dense"
    with pytest.raises(UsageError, match="aggregation mode for fft"):
        aggregate("fft", "exact", [d1], [1])
    with pytest.raises(UsageError, match="method"):
        aggregate("nope", None, [d1], [1])
    with pytest.raises(UsageError, match="ranks_out"):
        aggregate("lora", "fedit", [d1], [1], ranks_out=[2])
    bn = {"bn.weight": torch.ones(1), "bn.bias": torch.ones(1), "bn.running_mean": torch.ones(1),
          "bn.running_var": torch.ones(1), "head.weight": torch.ones(1)}
    assert set(aggregate("bn_head", None, [bn, bn], [1, 1], fedbn=True)) == {"head.weight"}
