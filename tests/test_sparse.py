"""Export of pruned models: same logits as the Bayesian model's mean, sparse storage, Pyro-free loading."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import pyro_sparse as ps
from pyro_sparse.sparse import Ensemble, SparseConv, SparseLinear, export, save, storage_bytes


def _prune_by_snr(guide: ps.MeanField, sparsity: float) -> None:
    """Keep the (1 - sparsity) highest-SNR weights of every site (what SNRPruned does, by hand)."""
    for name, site in guide.named_sites():
        snr = (site.loc.abs() / site.scale()).detach().flatten()
        keep = max(1, round((1 - sparsity) * snr.numel()))
        mask = torch.zeros_like(snr, dtype=torch.bool)
        mask[snr.topk(keep).indices] = True
        guide.set_mask(name, mask.reshape(site.mask.shape))


@pytest.fixture(scope="module")
def pruned_mlp(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (100, 50), 10), dataset_size=len(digits.train))
    guide = ps.MeanField(model)
    ps.fit(model, guide, digits.train, epochs=3, seed=0)
    _prune_by_snr(guide, 0.9)
    return model, guide


@pytest.mark.parametrize("layout", ["dense", "sparse", "auto"])
def test_mean_export_reproduces_the_posterior_mean_network(pruned_mlp, digits, layout):
    model, guide = pruned_mlp
    x = digits.test.tensors[0]
    exported = export(model, guide, layout=layout, batch_size=256)
    with torch.no_grad():
        expected = model.apply(x, guide.mean_weights())
        got = exported(x)
    assert (got - expected).abs().max() <= 1e-4
    assert not any(p.requires_grad for p in exported.parameters())
    assert not any(isinstance(m, ps.layers.LocalReparameterization) for m in exported.modules())
    if layout == "sparse":
        sparse_layers = [m for m in exported.modules() if isinstance(m, SparseLinear)]
        assert len(sparse_layers) == 3 and all(m.gather_min_batch == 1 for m in sparse_layers)
        for layer, mask in zip(sparse_layers, guide.masks().values(), strict=True):
            assert layer.nnz == int(mask.sum())
            assert torch.equal(layer.dense_weight() != 0, mask)


def test_sparse_storage_is_several_times_smaller(pruned_mlp):
    model, guide = pruned_mlp
    dense, sparse = export(model, guide, layout="dense"), export(model, guide, layout="sparse")
    assert storage_bytes(dense) > 5 * storage_bytes(sparse)


def test_both_kernels_agree_on_any_batch_shape():
    torch.manual_seed(1)
    weight = torch.randn(7, 33) * (torch.rand(7, 33) < 0.2)
    weight[3] = 0  # an output unit with no inputs
    bias = torch.randn(7)
    for x in (torch.randn(1, 33), torch.randn(5, 33), torch.randn(2, 4, 33), torch.randn(300, 33)):  # 3 blocks
        expected = nn.functional.linear(x, weight, bias)
        for gather_min_batch in (1, None):  # the gather kernel, the cached dense weight
            got = SparseLinear(weight, bias, gather_min_batch)(x)
            assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)


def test_sparse_conv_matches_the_conv():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    x = torch.randn(2, 3, 8, 8)
    sparse = SparseConv(conv, conv.weight)
    assert torch.allclose(sparse(x), conv(x), atol=1e-6)
    assert sparse.values.numel() == int((conv.weight != 0).sum())


def test_samples_export_is_an_ensemble_with_the_guides_support(pruned_mlp, digits):
    model, guide = pruned_mlp
    x = digits.test.tensors[0][:64]
    ensemble = export(model, guide, mode="samples", num_samples=4, layout="sparse")
    assert isinstance(ensemble, Ensemble)
    out = ensemble(x)
    assert out.shape == (4, 64, 10)
    assert not torch.allclose(out[0], out[1])  # different draws
    for member in ensemble.members:
        layers = [m for m in member.modules() if isinstance(m, SparseLinear)]
        for layer, mask in zip(layers, guide.masks().values(), strict=True):
            assert torch.equal(layer.dense_weight() != 0, mask)  # sampled weights are zero exactly where pruned


def test_export_from_stored_samples(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (20,), 10), dataset_size=len(digits.train))
    mask = {name: torch.rand(site.shape) < 0.3 for name, site in model.sites.items()}
    samples = {name: torch.randn(5, *site.shape) * mask[name] for name, site in model.sites.items()}
    posterior = ps.Posterior.from_samples(model, samples)
    x = digits.test.tensors[0][:16]
    mean_net = export(model, posterior, layout="sparse")
    expected = model.apply(x, {name: value.mean(0) for name, value in samples.items()})
    assert torch.allclose(mean_net(x), expected, atol=1e-5)
    ensemble = export(model, posterior, mode="samples", num_samples=3, layout="dense")
    assert torch.allclose(ensemble(x)[2], model.apply(x, {name: value[2] for name, value in samples.items()}))


def test_lenet_export_with_pruned_convolutions():
    data = ps.data.load("digits")
    x = torch.randn(4, 1, 28, 28)
    model = ps.BayesianNetwork(ps.nets.lenet5(), dataset_size=len(data.train))
    guide = ps.MeanField(model)
    _prune_by_snr(guide, 0.8)
    exported = export(model, guide, layout="sparse")
    assert sum(isinstance(m, SparseConv) for m in exported.modules()) == 2
    assert sum(isinstance(m, SparseLinear) for m in exported.modules()) == 3
    with torch.no_grad():
        assert torch.allclose(exported(x), model.apply(x, guide.mean_weights()), atol=1e-4)


def test_saved_export_runs_with_torch_alone(pruned_mlp, digits, tmp_path):
    model, guide = pruned_mlp
    x = digits.test.tensors[0][:100]
    for layout in ("dense", "sparse"):
        assert save(export(model, guide, layout=layout), tmp_path / f"{layout}.pt2", x[:2]) > 0
    torch.save(x, tmp_path / "x.pt")
    expected = model.apply(x, guide.mean_weights()).detach()
    torch.save(expected, tmp_path / "expected.pt")
    script = (
        "import sys; sys.modules['pyro'] = None; sys.modules['pyro_sparse'] = None\n"  # importing either fails
        "import torch\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "for layout in ('dense', 'sparse'):\n"
        f"    net = torch.export.load({str(tmp_path)!r} + f'/{{layout}}.pt2').module()\n"
        "    assert (net(x) - expected).abs().max() <= 1e-4, layout\n"
        "    assert net(x[:1]).shape == (1, 10)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "median"}, "mode must be one of"),
        ({"layout": "csc"}, "layout must be one of"),
        ({"mode": "samples", "num_samples": 0}, "num_samples must be a positive integer"),
    ],
)
def test_bad_export_arguments(pruned_mlp, kwargs, message):
    model, guide = pruned_mlp
    with pytest.raises(ValueError, match=message):
        export(model, guide, **kwargs)


def test_sparse_export_of_an_unpruned_guide_is_an_error(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (20,), 10), dataset_size=len(digits.train))
    guide = ps.MeanField(model)
    with pytest.raises(ValueError, match="needs a pruned posterior"):
        export(model, guide, layout="sparse")
    assert isinstance(export(model, guide, layout="auto")[1], nn.Linear)  # auto: nothing to sparsify
    x = digits.test.tensors[0][:5]
    from_posterior = export(model, ps.Posterior.from_guide(model, guide), layout="dense")  # exports its guide
    assert torch.equal(from_posterior(x), export(model, guide, layout="dense")(x))


def test_export_of_an_em_sghmc_posterior_matches_its_predictions(digits):
    prior = ps.priors.SpikeAndSlab(1.0, 0.001, 0.5)
    model = ps.BayesianNetwork(ps.nets.mlp(64, (32,), 10), prior=prior, dataset_size=len(digits.train))
    result = ps.em_sghmc(model, digits.train, target_sparsity=0.8, chains=2, samples=2, epochs=3, seed=0)
    posterior, x = result.posterior, digits.test.tensors[0][:50]
    ensemble = export(model, posterior, mode="samples", num_samples=posterior.num_stored, layout="sparse")
    assert torch.allclose(ensemble(x), posterior.predict(x, num_samples=posterior.num_stored), atol=1e-4)
    pruned = [int((layer.dense_weight() == 0).sum()) for layer in ensemble.members[0].modules()
              if isinstance(layer, SparseLinear)]
    assert sum(pruned) >= 0.79 * model.num_weights
