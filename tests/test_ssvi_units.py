"""Unit-level sparse-subspace VI (``SparseSubspace(structure="unit")``) and compact training (``infer.compact``)."""

from __future__ import annotations

import pyro
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyro_sparse as ps
from pyro_sparse.guides.meanfield import CompactSite
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


def scattered_noise(model, guide, sizes):
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
    noise = scattered_noise(model, guide, None)
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
