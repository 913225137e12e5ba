"""SparseSubspace (SSVI): compact storage, the remove-and-add schedule, exact resume, the CLI recipe."""

from __future__ import annotations

import csv
import io
import json
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

import pyro_sparse as ps
from pyro_sparse import cli
from pyro_sparse.guides.meanfield import CompactSite, MeanFieldSite
from pyro_sparse.guides.subspace import dense_trainable_bytes, folded_normal_snr, trainable_bytes
from pyro_sparse.infer.elbo import negative_elbo
from pyro_sparse.infer.svi import make_adam
from pyro_sparse.sparse import export


def digits_model(digits, **kwargs):
    return ps.BayesianNetwork(ps.nets.mlp(64, (100,), 10), dataset_size=len(digits.train), **kwargs)


def conv_model(dataset_size=100):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    return ps.BayesianNetwork(net, dataset_size=dataset_size)


def test_digits_at_density_01_is_accurate_and_sparse_at_every_step(digits):
    model = digits_model(digits)
    guide = ps.guides.SparseSubspace(model, density=0.1, update_every=20)
    counts = guide.active_counts()
    assert counts == {"1.weight": 640, "3.weight": 100} and guide.dense_layers == ()  # mlp: "first" is not a conv
    steps = []

    def check(state):
        assert state.guide.sparsity >= 0.89
        assert state.guide.active_counts() == counts
        steps.append(state.global_step)

    history = ps.fit(model, guide, digits.train, epochs=30, seed=0, callbacks=[type("C", (), {"on_step_end": (
        lambda self, state: check(state))})()])
    assert len(steps) == 30 * 22
    results = ps.evaluate(model, guide, digits.test, num_samples=32)
    assert results["accuracy"] >= 0.9, results
    assert results["sparsity"] == pytest.approx(0.9) and results["active_weights"] == 740
    # updates every 20 steps until 75 % of the 660 steps, each moving r_t of every layer
    assert [entry["step"] for entry in guide.update_log] == list(range(20, 495, 20))
    assert sum(record["support_changes"] for record in history) == sum(e["moved"] for e in guide.update_log)
    first = guide.update_log[0]
    assert first["layers"]["1.weight"] == round(guide.drop_rate(20, 660) * 640) == 191
    assert guide.update_log[-1]["moved"] < first["moved"]  # the cosine schedule decays
    for _, site in guide.named_sites():  # sampled weights are exactly zero off the support
        assert isinstance(site, CompactSite)
    draw = guide.sample_weights()
    assert all(int((draw[name] != 0).sum()) == count for name, count in counts.items())


def test_compact_storage_equals_the_masked_dense_core():
    """Same μ, ρ on the same support: identical moments, KL and gradients as a masked MeanFieldSite."""
    model = ps.BayesianNetwork(ps.nets.mlp(5, (7,), 3), prior=ps.priors.SpikeAndSlab(1.0, 0.05, 0.3),
                               dataset_size=10)
    mask = torch.rand(7, 5) < 0.4
    dense = ps.MeanField(model, init_scale=0.1)
    dense.set_mask("1.weight", mask)
    compact = ps.MeanField(model, init_scale=0.1, compact={"1.weight": mask})
    site = compact.site("1.weight")
    assert isinstance(site, CompactSite) and site.loc.shape == (int(mask.sum()),)
    assert torch.equal(site.mask, mask) and compact.active_counts() == dense.active_counts()
    with torch.no_grad():
        site.rho.copy_(torch.randn_like(site.rho) - 2)
        dense.site("1.weight").rho.view(-1)[site.index] = site.rho
    for prior in (model.prior, ps.priors.Gaussian(0.7)):
        (m_dense, kl_dense), (m_compact, kl_compact) = dense.moments_and_kl(prior), compact.moments_and_kl(prior)
        assert torch.allclose(kl_dense, kl_compact)
        for field in ("loc", "scale", "var"):
            assert torch.allclose(getattr(m_dense["1.weight"], field), getattr(m_compact["1.weight"], field))
        grads_dense = torch.autograd.grad(kl_dense + m_dense["1.weight"].var.sum(), dense.site("1.weight").rho)
        grads_compact = torch.autograd.grad(kl_compact + m_compact["1.weight"].var.sum(), site.rho)
        assert torch.allclose(grads_dense[0].view(-1)[site.index], grads_compact[0])
    # a Pyro guide like any other: samples are zero off the support
    trace = poutine.trace(compact).get_trace()
    assert torch.all(trace.nodes["1.weight"]["value"][~mask] == 0)
    # set_mask moves the support: kept weights keep (μ, ρ), new ones μ = 0, ρ = mean of the kept
    new_mask = mask.clone()
    kept_pos, gone_pos = mask.flatten().nonzero()[0, 0], mask.flatten().nonzero()[1, 0]
    new_pos = (~mask).flatten().nonzero()[0, 0]
    new_mask.view(-1)[gone_pos], new_mask.view(-1)[new_pos] = False, True
    loc_before = site.variational()[0].detach().clone()
    rho_before = {int(p): float(r) for p, r in zip(site.index, site.rho.detach(), strict=True)}
    compact.set_mask("1.weight", new_mask)
    assert torch.equal(site.mask, new_mask) and site.loc.shape == (int(mask.sum()),)
    loc_after = site.variational()[0].detach().view(-1)
    assert loc_after[kept_pos] == loc_before.view(-1)[kept_pos] and loc_after[new_pos] == 0
    expected_rho = sum(v for p, v in rho_before.items() if p != int(gone_pos)) / (len(rho_before) - 1)
    assert float(site.rho.detach()[(site.index == new_pos).nonzero()[0, 0]]) == pytest.approx(expected_rho, rel=1e-5)
    compact.set_mask("1.weight", torch.ones(7, 5, dtype=torch.bool))  # another size: parameters replaced
    assert site.is_dense() and site.loc.shape == (35,) and compact.sparsity == 0.0


def _train_steps(model, guide, optimizer, x, y, steps):
    for _ in range(steps):
        loss = negative_elbo(model, guide, x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_an_update_adds_fresh_weights_and_restarts_their_adam_state(digits):
    model = digits_model(digits)
    guide = ps.guides.SparseSubspace(model, density=0.2)
    optimizer = make_adam([*guide.parameters(), *model.parameters()], 1e-2)
    x, y = digits.train.tensors
    _train_steps(model, guide, optimizer, x[:128], y[:128], 5)
    site = guide.site("1.weight")
    index_before, loc_before, rho_before = site.index.clone(), site.loc.detach().clone(), site.rho.detach().clone()
    state_before = {key: value.clone() for key, value in optimizer.state[site.loc].items()}
    snr = loc_before.abs() / site.scale().detach()

    moved = guide.update_support(0.25, (x[:128], y[:128]), optimizer, step=5)
    changed = (site.index != index_before).nonzero().squeeze(1)
    k = 1280
    assert len(changed) == round(0.25 * k) and moved == len(changed) + round(0.25 * 200)
    assert guide.active_counts() == {"1.weight": k, "3.weight": 200}
    assert set(changed.tolist()) == set(torch.topk(snr, len(changed), largest=False).indices.tolist())
    assert not set(site.index[changed].tolist()) & set(index_before.tolist())  # added weights were inactive
    assert torch.all(site.loc[changed] == 0)
    kept = torch.ones(k, dtype=torch.bool)
    kept[changed] = False
    assert torch.allclose(site.rho[changed], rho_before[kept].mean().expand(len(changed)))
    assert torch.equal(site.loc[kept], loc_before[kept]) and torch.equal(site.rho[kept], rho_before[kept])
    state = optimizer.state[site.loc]
    for key in ("exp_avg", "exp_avg_sq"):  # Adam restarts at the new slots only (tests/test_vi_correctness.py)
        assert torch.equal(state[key][kept], state_before[key][kept])
    assert torch.all(state["exp_avg_sq"][changed] > 0)
    assert torch.all(optimizer.state[site.rho]["exp_avg"][changed] == 0)
    assert torch.equal(state["step"], state_before["step"])
    _train_steps(model, guide, optimizer, x[:128], y[:128], 3)  # training goes on with the new support
    assert torch.isfinite(site.loc).all() and guide.active_counts()["1.weight"] == k


def test_gradient_growth_picks_the_largest_dense_gradients(digits):
    model = digits_model(digits)
    guide = ps.guides.SparseSubspace(model, density=0.1, removal="random")
    x, y = digits.train.tensors[0][:64], digits.train.tensors[1][:64]
    site = guide.site("3.weight")
    gradient = guide.dense_gradients(x, y)["3.weight"].abs().flatten()
    inactive = ~site.mask.flatten()
    expected = torch.topk(torch.where(inactive, gradient, torch.tensor(-1.0)), 10).indices
    before = set(site.index.tolist())
    guide.update_support(0.1, (x, y))
    assert set(site.index.tolist()) - before == set(expected.tolist())


def test_storage_and_optimizer_state_scale_with_density(digits, tmp_path):
    x, y = digits.train.tensors
    sizes = {}
    for density in (0.1, 1.0):
        model = ps.BayesianNetwork(ps.nets.mlp(64, (400, 400), 10), dataset_size=len(x))
        guide = ps.guides.SparseSubspace(model, density=density) if density < 1 else ps.MeanField(model)
        optimizer = make_adam([*guide.parameters(), *model.parameters()], 1e-3)
        _train_steps(model, guide, optimizer, x[:64], y[:64], 1)
        guide_params = list(guide.parameters())
        actual = trainable_bytes(guide_params, optimizer)
        assert actual == pytest.approx(trainable_bytes(guide_params), abs=64)  # 3 × params + Adam's step counters
        torch.save(guide.state_dict(), tmp_path / f"{density}.pt")
        sizes[density] = (actual, (tmp_path / f"{density}.pt").stat().st_size, dense_trainable_bytes(model))
    ratio = sizes[0.1][0] / sizes[1.0][0]
    assert 0.095 <= ratio <= 0.105  # μ, ρ and Adam's moments of the active weights only
    assert sizes[0.1][1] / sizes[1.0][1] <= 0.25  # checkpoint: values + int64 indices vs dense μ, ρ, mask
    assert sizes[0.1][2] == sizes[1.0][2]


@pytest.mark.parametrize("removal, growth", [("snr", "gradient"), ("random", "random")])
def test_resumed_run_equals_uninterrupted_run(digits, tmp_path, removal, growth):
    data = digits.subsample(train=400, test=50, seed=0)

    class Crash(Exception):
        pass

    def crash_after_two_epochs(state):
        if state.epoch == 2:
            raise Crash

    def run(path, resume=False, callbacks=()):
        torch.manual_seed(1)
        model = ps.BayesianNetwork(ps.nets.mlp(64, (32,), 10), dataset_size=400)
        guide = ps.guides.SparseSubspace(model, density=0.2, update_every=3, removal=removal, growth=growth)
        history = ps.fit(model, guide, data.train, epochs=4, seed=0, checkpoint=path, resume=resume,
                         callbacks=callbacks)
        return guide, history

    full, history_full = run(tmp_path / "full.pt")
    with pytest.raises(Crash):
        run(tmp_path / "part.pt", callbacks=[crash_after_two_epochs])
    resumed, history_resumed = run(tmp_path / "part.pt", resume=True)
    assert resumed.update_log == full.update_log and len(full.update_log) == 6  # steps 3, ..., 18 < 0.75 * 28
    for (_, a), (_, b) in zip(full.named_sites(), resumed.named_sites(), strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.loc, b.loc) and torch.equal(a.rho, b.rho)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in history_full]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in history_resumed]


@pytest.mark.parametrize("removal", ["snr", "magnitude", "folded_snr", "random"])
@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_every_criterion_trains_with_a_constant_support(digits, removal, growth):
    data = digits.subsample(train=300, test=50, seed=0)
    model = ps.BayesianNetwork(ps.nets.mlp(64, (32,), 10), dataset_size=300)
    guide = ps.guides.SparseSubspace(model, density=0.1, update_every=2, removal=removal, growth=growth)
    counts = guide.active_counts()
    history = ps.fit(model, guide, data.train, epochs=2, seed=0)
    assert guide.active_counts() == counts and len(guide.update_log) == 3
    assert history[0]["support_changes"] > 0 and math.isfinite(history[-1]["loss"])


def test_folded_snr_is_the_folded_normals_snr_and_ranks_like_snr():
    loc = torch.tensor([0.0, 0.3, -1.0, 2.0, 5.0])
    scale = torch.tensor([1.0, 0.5, 1.0, 0.7, 2.0])
    theta = (loc + scale * torch.randn(400_000, 5, dtype=torch.float64)).abs()
    assert torch.allclose(folded_normal_snr(loc, scale).double(), theta.mean(0) / theta.std(0), rtol=1e-2)
    loc, scale = 3 * torch.randn(1000, dtype=torch.float64), torch.rand(1000, dtype=torch.float64) + 0.05
    by_snr = (loc.abs() / scale).argsort()
    assert torch.all(folded_normal_snr(loc, scale)[by_snr].diff() > 0)  # strictly increasing in |μ|/σ


def test_dense_layers_keep_the_first_conv_dense():
    model = conv_model()
    guide = ps.guides.SparseSubspace(model, density=0.1)
    assert guide.dense_layers == ("0.weight",) and isinstance(guide.site("0.weight"), MeanFieldSite)
    assert guide.active_counts() == {"0.weight": 36, "3.weight": 144}
    sparse = ps.guides.SparseSubspace(model, density=0.1, dense_layers=())
    assert sparse.active_counts() == {"0.weight": 4, "3.weight": 144}
    named = ps.guides.SparseSubspace(model, density=0.05, dense_layers=["3.weight"])
    assert named.active_counts() == {"0.weight": 2, "3.weight": 1440}
    moved = guide.update_support(0.5, (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))))
    assert moved == 72 and guide.active_counts()["0.weight"] == 36  # dense layers never move
    assert ps.guides.SparseSubspace(model, density=1e-9).active_counts()["3.weight"] == 1  # at least one


def test_erk_spreads_the_same_budget_towards_small_layers():
    model = ps.BayesianNetwork(ps.nets.lenet5(), dataset_size=10)
    uniform = ps.guides.SparseSubspace(model, density=0.1)
    erk = ps.guides.SparseSubspace(model, density=0.1, layer_density="erk")
    assert erk.num_active == pytest.approx(uniform.num_active, abs=3)  # the same total
    assert erk.active_counts()["0.weight"] == 150  # the dense first conv is outside the budget
    counts, sizes = erk.active_counts(), {name: site.numel for name, site in model.sites.items()}
    scores = {name: sum(site.shape) / site.numel for name, site in model.sites.items()}
    ratios = [counts[name] / sizes[name] / scores[name] for name in ("3.weight", "7.weight", "9.weight", "11.weight")]
    assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=0.01)  # density ∝ Σ dims / Π dims
    tiny = ps.BayesianNetwork(ps.nets.mlp(4, (3,), 2), dataset_size=10)
    assert ps.guides.SparseSubspace(tiny, density=0.9, layer_density="erk").active_counts() == {
        "1.weight": 10, "3.weight": 6}  # capped at dense: the other layer takes the rest


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"density": 0.0}, r"density must be a number in \(0, 1\]"),
        ({"density": 1.5}, r"density must be a number in \(0, 1\]"),
        ({"density": float("nan")}, r"density must be a number in \(0, 1\]"),
        ({"update_every": 0}, "update_every must be a positive integer"),
        ({"update_every": 2.5}, "update_every must be a positive integer"),
        ({"drop_fraction": 1.0}, r"drop_fraction must be a number in \[0, 1\)"),
        ({"stop_fraction": 0.0}, r"stop_fraction must be a number in \(0, 1\]"),
        ({"removal": "hessian"}, "removal must be one of snr, magnitude, folded_snr, random; got 'hessian'"),
        ({"growth": "momentum"}, "growth must be one of gradient, random; got 'momentum'"),
        ({"dense_layers": ("last",)}, "dense_layers: unknown layer 'last'"),
        ({"layer_density": "dense"}, "layer_density must be one of uniform, erk; got 'dense'"),
    ],
)
def test_bad_input_gives_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ps.guides.SparseSubspace(conv_model(), **kwargs)


def test_cli_trains_ssvi_and_writes_its_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "ssvi", "--density", "0.1", "--update-every", "50", "--epochs", "7",
            "--samples", "8", "--out", str(out)]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ssvi" and metrics["density"] == 0.1 and metrics["sparsity"] == pytest.approx(0.9)
    assert metrics["active_weights"] == 740 and metrics["support_updates"] == 2  # steps 50, 100 < 0.75 * 154
    dense_flops = 3 * 7400 * 2 * 1347 * 7
    assert metrics["train_flops_dense_vi"] == dense_flops
    assert metrics["train_flops"] == 3 * 740 * 2 * 1347 * 7 + 2 * 64 * 3 * 7400  # + two dense gradients
    assert metrics["train_flops"] <= 0.12 * dense_flops
    assert metrics["trainable_bytes"] <= 0.25 * metrics["trainable_bytes_dense"]
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and sum(int(row["support_changes"]) for row in rows) == metrics["support_changes"] > 0
    updates = list(csv.DictReader(io.StringIO((out / "support_updates.csv").read_text())))
    assert [row["step"] for row in updates] == ["50", "50", "100", "100"]
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), "--samples", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.9)
    assert cli.main(["train", "--method", "ssvi", "--sparsity", "0.9", "--out", str(tmp_path / "bad")]) == 2
    assert "--sparsity does not apply to --method ssvi" in capsys.readouterr().err


def test_the_guide_works_with_predictive_posterior_and_export(digits):
    model = digits_model(digits)
    guide = ps.guides.SparseSubspace(model, density=0.1)
    x = digits.test.tensors[0][:16]
    samples = pyro.infer.Predictive(model, guide=guide, num_samples=3)(x)
    support = guide.masks()["1.weight"]
    assert samples["1.weight"].shape == (3, 1, 100, 64) and torch.all(samples["1.weight"][..., ~support] == 0)
    net = export(model, guide, mode="mean", layout="dense")
    with torch.no_grad():
        assert torch.allclose(net(x), model.apply(x, guide.mean_weights()), atol=1e-6)
    assert ps.Posterior.from_guide(model, guide).active_counts() == guide.active_counts()
