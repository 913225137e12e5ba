"""Unit-level sparse-subspace VI (``SparseSubspace(structure="unit")``) and compact training (``infer.compact``)."""

from __future__ import annotations

import pyro
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyro_sparse as ps
from pyro_sparse.guides.meanfield import CompactSite
from pyro_sparse.guides.unit_scores import unit_scores
from pyro_sparse.infer.compact import compact_network, dense_units
from pyro_sparse.infer.elbo import negative_elbo
from pyro_sparse.infer.svi import make_adam
from pyro_sparse.sparse import export
from pyro_sparse.units import weight_masks


class TinyResNet(nn.Module):
    """A stem conv + BatchNorm, one residual block (channels tied by the addition), a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x):
        x = self.stem(x)
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(out + x))


NETS = {
    "mlp": (lambda: ps.nets.mlp(12, (10, 8), 3), (12,)),
    "lenet5": (lambda: ps.nets.lenet5(1, 3, 12), (1, 12, 12)),
    "resnet": (TinyResNet, (1, 6, 6)),
}


def make(net_name: str, lrt: str = "none", guide: str = "ssvi", seed: int = 0):
    torch.manual_seed(seed)
    build, shape = NETS[net_name]
    model = ps.BayesianNetwork(build(), dataset_size=50, local_reparameterization=lrt)
    if guide == "ssvi":
        q = ps.guides.SparseSubspace(model, density=0.5, structure="unit", dense_layers=(), init_scale=0.05)
    else:  # SNRPruned after unit pruning, with some weights pruned inside the kept units as well
        q = ps.guides.SNRPruned(model, init_scale=0.05)
        with torch.no_grad():
            for _, site in q.named_sites():
                site.rho.add_(torch.rand_like(site.rho))
        q.prune(sparsity=0.4, structure="unit")
        q.prune(sparsity=0.2)
    with torch.no_grad():  # distinct deterministic parameters, so that every gather shows
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(9, *shape)
    y = torch.randint(0, 3, (9,))
    return model, q, x, y


def scattered_noise(model, guide):
    """Draw, in site order, the noise the compact objective draws (shape = the active block) and put it
    at the block's positions of a zero tensor of the full weight's shape: site name -> (full shape)."""
    groups = model.unit_groups()
    paths = {name: site.module_path for name, site in model.sites.items()}
    masks = weight_masks(model.net, groups, guide.unit_masks(), paths)
    noise = {}
    for name, site in model.sites.items():
        block = masks.get(name, torch.ones(site.shape, dtype=torch.bool))
        full = torch.zeros(site.shape)
        full.view(-1)[block.view(-1).nonzero().squeeze(1)] = torch.randn(int(block.sum()))
        noise[name] = full
    return noise


def reference_loss(model, guide, x, y, noise):
    """−ELBO / N of the masked *dense* network with weights μ + σ ε (ε given), computed without infer.compact."""
    moments, kl = guide.moments_and_kl(model.prior)
    weights = {name: q.loc + q.scale * noise[name] for name, q in moments.items()}
    output = model.apply(x, weights)
    return -model.likelihood.log_prob(output, y).mean() + kl / model.dataset_size


def gradients(model, guide, loss):
    params = [*guide.parameters(), *model.parameters()]
    return [g if g is not None else torch.zeros_like(p) for p, g in
            zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True)]


@pytest.mark.parametrize("net_name", ["mlp", "lenet5", "resnet"])
@pytest.mark.parametrize("guide_kind", ["ssvi", "snr"])
def test_compact_objective_equals_the_masked_dense_objective(net_name, guide_kind):
    """Weights drawn (no LRT) with the same ε: the loss and every gradient (μ, ρ, biases, BatchNorm γ, β) agree."""
    model, guide, x, y = make(net_name, guide=guide_kind)
    assert guide.unit_masks() and compact_network(model, guide) is not None
    model.train()
    running = {name: buffer.clone() for name, buffer in model.named_buffers() if "running" in name}
    torch.manual_seed(3)
    compact = negative_elbo(model, guide, x, y).loss
    compact_grads = gradients(model, guide, compact)
    compact_running = {name: buffer.clone() for name, buffer in model.named_buffers() if "running" in name}
    for name, buffer in model.named_buffers():  # the reference starts from the same statistics
        if name in running:
            buffer.copy_(running[name])
    torch.manual_seed(3)
    noise = scattered_noise(model, guide)
    dense = reference_loss(model, guide, x, y, noise)
    dense_grads = gradients(model, guide, dense)
    assert torch.allclose(compact, dense, atol=1e-5, rtol=1e-5)
    for a, b in zip(compact_grads, dense_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    keep = guide.unit_masks()
    for group_name, group in model.unit_groups().items():  # BatchNorm statistics of the kept channels
        for norm in group.norms:
            kept = keep.get(group_name, torch.ones(group.size, dtype=torch.bool))
            for stat in ("running_mean", "running_var"):
                key = f"net.{norm}.{stat}"
                assert not torch.equal(compact_running[key][kept], running[key][kept])
                assert torch.allclose(compact_running[key][kept], model.get_buffer(key)[kept], atol=1e-6)
    model.eval()  # and in eval mode (running statistics), the mean network
    with torch.no_grad():
        means = guide.mean_weights()
        network = compact_network(model, guide)
        small = network.moments_and_kl(guide, model.prior)[0]
        out_compact = network.apply(x, {name: q.loc for name, q in small.items()})
        assert torch.allclose(out_compact, model.apply(x, means), atol=1e-5)


def test_compact_objective_with_local_reparameterization_equals_a_hand_written_mlp():
    """LRT on (the default): pre-activations N(x·μ, x²·σ²) of the active units only; the same noise, the
    same loss and gradients as the masked dense network written out by hand."""
    model, guide, x, y = make("mlp", lrt="auto")
    layers = [("1.weight", model.net[1]), ("3.weight", model.net[3]), ("5.weight", model.net[5])]
    keep = {name: mask for name, mask in guide.unit_masks().items()}
    torch.manual_seed(5)
    compact = negative_elbo(model, guide, x, y).loss
    compact_grads = gradients(model, guide, compact)
    torch.manual_seed(5)
    moments, kl = guide.moments_and_kl(model.prior)
    h = x
    for position, (name, layer) in enumerate(layers):
        kept = keep.get(name.removesuffix(".weight"), torch.ones(layer.out_features, dtype=torch.bool))
        bias = layer.bias * kept
        mean = F.linear(h, moments[name].loc, bias)
        var = F.linear(h * h, moments[name].var)
        noise = torch.zeros_like(mean)
        noise[:, kept] = torch.randn(len(x), int(kept.sum()))
        h = mean + (var + 1e-16).sqrt() * noise
        if position < 2:
            h = torch.relu(h)
    dense = F.cross_entropy(h, y) + kl / model.dataset_size
    assert torch.allclose(compact, dense, atol=1e-5)
    for a, b in zip(compact_grads, gradients(model, guide, dense), strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def digits_unit_model(digits, hidden=(100,), density=0.5, **kwargs):
    model = ps.BayesianNetwork(ps.nets.mlp(64, hidden, 10), dataset_size=len(digits.train))
    return model, ps.guides.SparseSubspace(model, density=density, structure="unit", **kwargs)


def test_a_unit_move_keeps_the_support_size_and_carries_adam_state_with_the_weights(digits):
    torch.manual_seed(0)
    model, guide = digits_unit_model(digits, hidden=(32, 16))
    assert {name: int(mask.sum()) for name, mask in guide.unit_masks().items()} == {"1": 16, "3": 8}
    counts = guide.active_counts()
    assert counts == {"1.weight": 16 * 64, "3.weight": 8 * 16, "5.weight": 10 * 8}
    optimizer = make_adam([*guide.parameters(), *model.parameters()], 1e-2)
    x, y = digits.train.tensors[0][:128], digits.train.tensors[1][:128]
    for _ in range(5):
        loss = negative_elbo(model, guide, x, y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    site = guide.site("3.weight")
    before = {int(p): (float(m), float(r), float(a)) for p, m, r, a in
              zip(site.index, site.loc.detach(), site.rho.detach(), optimizer.state[site.loc]["exp_avg"], strict=True)}
    keep_before = {name: mask.clone() for name, mask in guide.unit_masks().items()}
    scores = unit_scores(guide, "energy")

    network = compact_network(model, guide)
    assert compact_network(model, guide) is network  # cached while the support stays
    with dense_units():
        assert compact_network(model, guide) is None
    moved = guide.update_support(0.25, (x, y), optimizer, step=5)
    assert compact_network(model, guide) is not network  # rebuilt when it moves
    keep = guide.unit_masks()
    assert moved == 4 + 2 and guide.active_counts() == counts
    for name, mask in keep.items():
        assert int(mask.sum()) == int(keep_before[name].sum())
        removed = keep_before[name] & ~mask
        active = keep_before[name].nonzero().squeeze(1)
        lowest = active[torch.topk(scores[name][active], int(removed.sum()), largest=False).indices]
        assert set(removed.nonzero().squeeze(1).tolist()) == set(lowest.tolist())
    for _, site_ in guide.named_sites():  # supports: the blocks of the active units, stored row-major
        assert isinstance(site_, CompactSite) and torch.equal(site_.index, site_.index.sort().values)
    network = compact_network(model, guide)
    assert all(gather.view for gather in network.sites.values())
    rows, columns = keep["3"], keep["1"]
    assert torch.equal(site.mask, rows[:, None] & columns[None, :])
    state = optimizer.state[site.loc]
    new_rows, new_columns = rows & ~keep_before["3"], columns & ~keep_before["1"]
    for slot, position in enumerate(site.index.tolist()):
        row, column = divmod(position, 32)
        if position in before:  # stayed active: μ, ρ and Adam's moment moved with it
            loc, rho, exp_avg = before[position]
            now = (float(site.loc.detach()[slot]), float(site.rho.detach()[slot]), float(state["exp_avg"][slot]))
            assert now == (loc, rho, exp_avg)
        else:
            assert float(state["exp_avg"][slot]) == 0.0 and float(state["exp_avg_sq"][slot]) > 0
            if new_columns[column]:  # outgoing weight of a new unit: 0 (the mean output does not change)
                assert float(site.loc.detach()[slot]) == 0.0
            else:  # incoming weight of a new unit: the network's initial weight, rescaled
                assert new_rows[row]
                initial = float(model.initial_value("3.weight")[row, column]) * (32 / 16) ** 0.5
                assert float(site.loc.detach()[slot]) == pytest.approx(initial, rel=1e-5)
    added = (rows & ~keep_before["3"]).nonzero().squeeze(1)
    assert torch.all(model.net[3].bias[added] == 0)  # a new unit's bias starts at 0
    loss = negative_elbo(model, guide, x, y).loss  # training goes on, on the new support
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(site.loc).all() and guide.active_counts() == counts


def test_unit_ssvi_on_digits_is_accurate_with_a_constant_support(digits):
    torch.manual_seed(0)
    model, guide = digits_unit_model(digits, density=0.5, update_every=20)
    units = {name: int(mask.sum()) for name, mask in guide.unit_masks().items()}
    counts = guide.active_counts()
    assert units == {"1": 50} and counts == {"1.weight": 3200, "3.weight": 500}

    class Check:
        def on_step_end(self, state):
            assert {name: int(mask.sum()) for name, mask in state.guide.unit_masks().items()} == units
            assert state.guide.active_counts() == counts

    history = ps.fit(model, guide, digits.train, epochs=30, seed=0, callbacks=[Check()], progress=False)
    results = ps.evaluate(model, guide, digits.test, num_samples=32)
    assert results["accuracy"] >= 0.95, results  # measured 0.973 (seed 0)
    assert results["sparsity"] == pytest.approx(0.5) and results["active_weights"] == 3700
    assert [entry["step"] for entry in guide.update_log] == list(range(20, 495, 20))
    assert sum(record["support_changes"] for record in history) == sum(e["moved"] for e in guide.update_log) > 0
    assert guide.update_log[0]["layers"] == {"1": round(guide.drop_rate(20, 660) * 50)}


def test_resumed_unit_run_equals_uninterrupted_run(digits, tmp_path):
    data = digits.subsample(train=400, test=50, seed=0)

    class Crash(Exception):
        pass

    def crash_after_two_epochs(state):
        if state.epoch == 2:
            raise Crash

    def run(path, resume=False, callbacks=()):
        torch.manual_seed(1)
        model = ps.BayesianNetwork(ps.nets.mlp(64, (32, 16), 10), dataset_size=400)
        guide = ps.guides.SparseSubspace(model, density=0.5, update_every=3, structure="unit")
        history = ps.fit(model, guide, data.train, epochs=4, seed=0, checkpoint=path, resume=resume,
                         callbacks=callbacks, progress=False)
        return model, guide, history

    model_full, full, history_full = run(tmp_path / "full.pt")
    with pytest.raises(Crash):
        run(tmp_path / "part.pt", callbacks=[crash_after_two_epochs])
    model_resumed, resumed, history_resumed = run(tmp_path / "part.pt", resume=True)
    assert resumed.update_log == full.update_log and len(full.update_log) == 6
    assert full.unit_masks().keys() == resumed.unit_masks().keys()
    for name, mask in full.unit_masks().items():
        assert torch.equal(mask, resumed.unit_masks()[name])
    for (_, a), (_, b) in zip(full.named_sites(), resumed.named_sites(), strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.loc, b.loc) and torch.equal(a.rho, b.rho)
    for a, b in zip(model_full.parameters(), model_resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in history_full]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in history_resumed]


def test_step_support_in_a_pyro_svi_loop(digits):
    torch.manual_seed(0)
    pyro.clear_param_store()
    model, guide = digits_unit_model(digits, hidden=(32,), density=0.5, update_every=2)
    x, y = digits.train.tensors[0][:64], digits.train.tensors[1][:64]
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.TraceMeanField_ELBO())
    counts = guide.active_counts()
    for step in range(1, 9):
        assert torch.isfinite(torch.tensor(svi.step(x, y)))
        guide.step_support(step, 10, x, y, optimizer=svi.optim)
    assert [entry["step"] for entry in guide.update_log] == [2, 4, 6] and guide.active_counts() == counts
    trace = pyro.poutine.trace(guide).get_trace()  # samples are zero off the active units
    removed = ~guide.unit_masks()["1"]
    assert torch.all(trace.nodes["1.weight"]["value"][removed] == 0)
    assert torch.all(trace.nodes["3.weight"]["value"][:, removed] == 0)


def test_export_of_a_unit_guide_is_the_smaller_network(digits):
    torch.manual_seed(0)
    data = digits.subsample(train=300, seed=0)
    model, guide = digits_unit_model(data, hidden=(40, 20), density=0.25)
    ps.fit(model, guide, data.train, epochs=2, seed=0, progress=False)
    x = digits.test.tensors[0][:64]
    for layout in ("dense", "auto"):
        net = export(model, guide, layout=layout)
        shapes = [tuple(layer.weight.shape) for layer in net.modules() if isinstance(layer, nn.Linear)]
        assert shapes == [(10, 64), (5, 10), (10, 5)]
        with torch.no_grad():
            assert (net(x) - model.apply(x, guide.mean_weights())).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "model_kind, kwargs, match",
    [
        ("network", {"structure": "foo"}, "structure must be one of weight, unit; got 'foo'"),
        ("pyro", {"structure": "unit"}, "structure='unit' needs a ps.BayesianNetwork"),
        ("network", {"structure": "unit", "growth": "gradient"}, "growth of structure='unit' must be 'random'"),
        ("network", {"structure": "unit", "removal": "folded_snr"}, "removal of structure='unit' must be one of"),
        ("network", {"structure": "unit", "layer_density": "erk"}, "layer_density of structure='unit'"),
        ("output_only", {"structure": "unit"}, "the network has no removable units"),
    ],
)
def test_bad_arguments_give_one_clear_error(model_kind, kwargs, match):
    if model_kind == "pyro":
        def model(x, y=None):
            w = pyro.sample("w", pyro.distributions.Normal(0.0, 1.0).expand([3]).to_event(1))
            return pyro.sample("obs", pyro.distributions.Normal(x @ w, 1.0).to_event(1), obs=y)
    else:
        net = nn.Linear(4, 3) if model_kind == "output_only" else ps.nets.mlp(4, (5,), 3)
        model = ps.BayesianNetwork(net, dataset_size=10)
    with pytest.raises(ValueError, match=match):
        ps.guides.SparseSubspace(model, **kwargs)
