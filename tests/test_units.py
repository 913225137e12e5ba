"""Structured sparsity: the units of a network, removing them exactly, and exports with fewer units."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pyro
import pytest
import torch
from torch import nn

import pyro_sparse as ps
from pyro_sparse.errors import UnitAnalysisError
from pyro_sparse.sparse import SparseLinear, export, save
from pyro_sparse.units import Reader, slice_network, unit_groups, weight_masks


def _tiny_resnet() -> nn.Module:
    return ps.nets.ResNet((4, 8), (2, 1), num_classes=3, in_channels=3)


def _randomly_pruned(net: nn.Module) -> tuple[ps.BayesianNetwork, ps.MeanField]:
    """A model of ``net`` (BatchNorm running statistics made non-trivial) and a guide without a random half
    of every unit group (each keeps its first unit)."""
    model = ps.BayesianNetwork(net, dataset_size=100)
    for module in model.net.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.running_mean), nn.init.uniform_(module.running_var, 0.5, 2.0)
    guide = ps.MeanField(model)
    for name, spec in guide.unit_groups().items():
        keep = torch.rand(spec.size) < 0.5
        keep[0] = True
        guide.set_unit_mask(name, keep)
    return model, guide


# ----------------------------------------------------------------------------------------------
# Finding the units
# ----------------------------------------------------------------------------------------------
def test_mlp_and_lenet_units_exclude_the_output_layer():
    mlp = unit_groups(ps.nets.mlp(784, (400, 300), 10))
    assert {name: group.size for name, group in mlp.items()} == {"1": 400, "3": 300}
    assert mlp["3"].readers == (Reader("5"),)
    lenet = unit_groups(ps.nets.lenet5())
    assert {name: group.size for name, group in lenet.items()} == {"0": 6, "3": 16, "7": 120, "9": 84}
    assert lenet["3"].readers == (Reader("7", flattened=True),)  # 16 channels x 5 x 5 -> 400 columns


def test_channels_tied_by_residual_additions_form_one_group():
    groups = unit_groups(ps.nets.resnet20())
    stem = groups["stem.0"]  # identity shortcuts tie the stem to every block output of the first stage
    assert stem.producers == ("stem.0", "stages.0.0.conv2", "stages.0.1.conv2", "stages.0.2.conv2")
    assert stem.norms == ("stem.1", "stages.0.0.bn2", "stages.0.1.bn2", "stages.0.2.bn2")
    second = groups["stages.1.0.conv2"]  # a 1x1 projection shortcut joins its stage's group
    assert "stages.1.0.shortcut.0" in second.producers and "stages.1.0.shortcut.1" in second.norms
    assert groups["stages.2.0.conv2"].readers[-1] == Reader("fc", flattened=True)
    assert all(group.size in (16, 32, 64) for group in groups.values()) and len(groups) == 12


class _SigmoidNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(4, 3), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.sigmoid(self.a(x))  # sigmoid(0) = 1/2: a removed unit would not be zero
        return self.out(torch.cat([self.b(h), self.c(x)], 1))  # concatenation is not followed


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.b(self.a(x))


def test_units_the_analysis_cannot_follow_are_left_alone():
    assert unit_groups(_SigmoidNet()) == {}
    model = ps.BayesianNetwork(_SigmoidNet(), dataset_size=10)
    with pytest.raises(UnitAnalysisError, match="no removable units"):
        ps.guides.SNRPruned(model).unit_groups()
    with pytest.raises(UnitAnalysisError, match="could not trace"):
        ps.BayesianNetwork(_Branchy(), dataset_size=10).unit_groups()


@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet"])
def test_sliced_network_computes_the_network_with_removed_units_zeroed(name):
    """Independent check: zero the removed units in the full network by hand (rows, bias, BatchNorm γ/β),
    and compare with the smaller network cut out by slice_network."""
    net, x = {"mlp": (ps.nets.mlp(20, (30, 12), 4), torch.randn(6, 20)),
              "lenet5": (ps.nets.lenet5(), torch.randn(6, 1, 28, 28)),
              "resnet": (_tiny_resnet(), torch.randn(6, 3, 16, 16))}[name]
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.running_mean), nn.init.uniform_(module.running_var, 0.5, 2.0)
            nn.init.normal_(module.weight), nn.init.normal_(module.bias)
    net.eval()
    groups = unit_groups(net)
    keep = {group: torch.rand(spec.size) < 0.6 for group, spec in groups.items()}
    for mask in keep.values():
        mask[0] = True
    full = copy.deepcopy(net)
    with torch.no_grad():
        for group, mask in keep.items():
            for path in (*groups[group].producers, *groups[group].norms):
                module = full.get_submodule(path)
                for attribute in ("weight", "bias"):
                    tensor = getattr(module, attribute)
                    if tensor is not None:
                        tensor[~mask] = 0.0
        small = slice_network(net, groups, keep).eval()
        assert (small(x) - full(x)).abs().max() <= 1e-5
    removed = sum(int((~mask).sum()) for mask in keep.values())
    assert removed > 0 and sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())


def test_weight_masks_cover_rows_of_producers_and_columns_of_readers():
    net = ps.nets.lenet5()
    groups = unit_groups(net)
    keep = {"3": torch.arange(16) % 2 == 0}
    masks = weight_masks(net, groups, keep, {"3.weight": "3", "7.weight": "7"})
    assert masks["3.weight"][1].sum() == 0 and masks["3.weight"][0].all()
    assert masks["7.weight"][:, 25:50].sum() == 0 and masks["7.weight"][:, :25].all()  # channel 1 = columns 25-49


# ----------------------------------------------------------------------------------------------
# Removing units in a guide and the model
# ----------------------------------------------------------------------------------------------
def test_a_removed_unit_takes_its_weights_bias_and_readers_inputs(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (20, 10), 10), dataset_size=len(digits.train))
    guide = ps.guides.SNRPruned(model)
    keep = torch.ones(20, dtype=torch.bool)
    keep[[3, 7]] = False
    guide.set_unit_mask("1", keep)
    assert not guide.site("1.weight").mask[[3, 7]].any() and guide.site("1.weight").mask[keep].all()
    assert not guide.site("3.weight").mask[:, [3, 7]].any()
    assert guide.unit_counts() == (30, 28)
    # the model's removed units output exactly zero: their bias has no gradient
    x, y = digits.train.tensors
    loss = ps.infer.negative_elbo(model, guide, x[:32], y[:32]).loss
    loss.backward()
    bias = model.net.get_parameter("1.bias")
    assert torch.equal(bias.grad[[3, 7]], torch.zeros(2)) and bias.grad[keep].abs().sum() > 0
    # Pyro's own ELBO runs on the unit-pruned model and guide
    assert torch.isfinite(torch.tensor(pyro.infer.TraceMeanField_ELBO().loss(model, guide, x[:32], y[:32])))
    # a unit that comes back gets its weights back
    guide.set_unit_mask("1", torch.ones(20, dtype=torch.bool))
    assert guide.site("1.weight").mask.all() and guide.site("3.weight").mask.all() and guide.unit_masks() == {}


def test_set_unit_mask_refuses_bad_masks(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (20,), 10), dataset_size=len(digits.train))
    guide = ps.MeanField(model)
    with pytest.raises(ValueError, match="no unit group 'fc1'"):
        guide.set_unit_mask("fc1", torch.ones(20, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must have shape \(20,\)"):
        guide.set_unit_mask("1", torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep at least one unit"):
        guide.set_unit_mask("1", torch.zeros(20, dtype=torch.bool))


@pytest.fixture(scope="module")
def trained_mlp(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (64, 64), 10), dataset_size=len(digits.train))
    guide = ps.guides.SNRPruned(model)
    ps.fit(model, guide, digits.train, epochs=15, seed=0, progress=False)
    return model, guide


def _pruned_copy(model, guide):
    model = copy.deepcopy(model)
    copy_of_guide = ps.guides.SNRPruned(model)
    copy_of_guide.load_state_dict(guide.state_dict())
    return model, copy_of_guide


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unit_pruning_removes_the_exact_fraction_and_keeps_accuracy(trained_mlp, digits, scope):
    model, guide = _pruned_copy(*trained_mlp)
    dense_accuracy = ps.evaluate(model, guide, digits.test, num_samples=8)["accuracy"]
    selected = guide.prune(sparsity=0.75, structure="unit", scope=scope)
    assert sum(int(mask.sum()) for mask in selected.values()) == 96
    assert guide.unit_counts() == (128, 32)
    if scope == "layer":
        assert all(int(mask.sum()) == 48 for mask in selected.values())
    ps.fit(model, guide, digits.train, epochs=5, seed=0, progress=False)
    assert guide.unit_counts() == (128, 32)  # fine-tuning keeps removed units removed
    accuracy = ps.evaluate(model, guide, digits.test, num_samples=8)["accuracy"]
    assert accuracy >= dense_accuracy - 0.05 and accuracy >= 0.92


def test_unit_scores_rank_units_by_their_incoming_weights(trained_mlp):
    _, guide = trained_mlp
    for score in ("energy", "mean_snr"):
        scores = guide.unit_scores(score)
        assert set(scores) == {"1", "3"}
        assert all(value.shape == (64,) and (value > 0).all() for value in scores.values())
    site = guide.site("1.weight")
    loc, scale = site.loc.detach(), site.scale().detach()
    expected = ((loc**2).sum(1) / (scale**2).sum(1)).sqrt()
    assert torch.allclose(guide.unit_scores("energy")["1"], expected)
    with pytest.raises(ValueError, match="unit_score must be one of"):
        guide.unit_scores("l1")


def test_unit_pruning_only_removes_and_survives_a_state_dict_round_trip(trained_mlp):
    model, guide = _pruned_copy(*trained_mlp)
    guide.prune(sparsity=0.5, structure="unit")
    first = {name: mask.clone() for name, mask in guide.unit_masks().items()}
    guide.prune(sparsity=0.25, structure="unit")  # a smaller target removes nothing more
    assert all(torch.equal(first[name], mask) for name, mask in guide.unit_masks().items())
    fresh = ps.guides.SNRPruned(model)
    fresh.load_state_dict(guide.state_dict())
    assert {k: v.tolist() for k, v in fresh.unit_masks().items()} == {k: v.tolist() for k, v in first.items()}
    assert fresh.sparsity == guide.sparsity
    with pytest.raises(ValueError, match="structure must be one of"):
        guide.prune(sparsity=0.5, structure="channel")


# ----------------------------------------------------------------------------------------------
# Export to a smaller network
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["dense", "sparse", "auto"])
def test_unit_pruned_mlp_exports_to_a_smaller_network_with_the_same_logits(trained_mlp, digits, layout):
    model, guide = _pruned_copy(*trained_mlp)
    guide.prune(sparsity=0.5, structure="unit")
    guide.prune(sparsity=0.85)  # weight-level pruning inside the kept units as well
    x = digits.test.tensors[0]
    exported = export(model, guide, layout=layout, batch_size=256)
    linears = [m for m in exported.modules() if isinstance(m, nn.Linear | SparseLinear)]
    kept = {name: int(mask.sum()) for name, mask in guide.unit_masks().items()}
    assert [(m.in_features, m.out_features) for m in linears] == [(64, kept["1"]), (kept["1"], kept["3"]),
                                                                  (kept["3"], 10)]
    if layout == "sparse":  # every layer with pruned weights left inside the kept units is stored sparsely
        assert isinstance(linears[0], SparseLinear)
        assert all(isinstance(m, SparseLinear) or bool((m.weight != 0).all()) for m in linears)
    with torch.no_grad():
        assert (exported(x) - model.apply(x, guide.mean_weights())).abs().max() <= 1e-4


def test_unit_pruned_lenet_and_resnet_export_with_fewer_channels(digits):
    for net, x in ((ps.nets.lenet5(), torch.randn(8, 1, 28, 28)), (_tiny_resnet(), torch.randn(8, 3, 16, 16))):
        model, guide = _randomly_pruned(net)
        model.eval()
        exported = export(model, guide, layout="dense")
        convs = [m for m in exported.modules() if isinstance(m, nn.Conv2d)]
        originals = [m for m in model.net.modules() if isinstance(m, nn.Conv2d)]
        assert sum(m.weight.numel() for m in convs) < sum(m.weight.numel() for m in originals)
        with torch.no_grad():
            assert (exported(x) - model.apply(x, guide.mean_weights())).abs().max() <= 1e-4


def test_saved_unit_export_runs_with_torch_alone(trained_mlp, digits, tmp_path):
    model, guide = _pruned_copy(*trained_mlp)
    guide.prune(sparsity=0.75, structure="unit")
    x = digits.test.tensors[0][:50]
    save(export(model, guide), tmp_path / "small.pt2", x[:2])
    torch.save(x, tmp_path / "x.pt")
    torch.save(model.apply(x, guide.mean_weights()).detach(), tmp_path / "expected.pt")
    script = (
        "import sys; sys.modules['pyro'] = None; sys.modules['pyro_sparse'] = None\n"
        "import torch\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        f"net = torch.export.load({str(tmp_path / 'small.pt2')!r}).module()\n"
        "assert (net(x) - expected).abs().max() <= 1e-4\n"
        "print(sum(p.numel() for p in net.state_dict().values()))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 0.4 * sum(site.numel for site in model.sites.values())


def test_speedups_and_unit_counts(trained_mlp, digits):
    model, guide = _pruned_copy(*trained_mlp)
    assert ps.sparse.unit_counts(model, guide) == (128, 128)
    guide.prune(sparsity=0.75, structure="unit")
    assert ps.sparse.unit_counts(model, guide) == (128, 32)
    ratios = ps.sparse.speedups(model, guide, digits.test.tensors[0], batch_sizes=(1, 512), rounds=5)
    assert set(ratios) == {1, 512} and all(ratio > 0 for ratio in ratios.values())
    assert ps.sparse.unit_counts(ps.BayesianNetwork(_Branchy(), dataset_size=5), ps.MeanField(
        ps.BayesianNetwork(_Branchy(), dataset_size=5))) == (0, 0)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def test_cli_unit_run_reports_units_and_measured_speedups(tmp_path, capsys):
    import json

    from pyro_sparse import cli

    assert cli.main(["train", "--method", "snr", "--structure", "unit", "--epochs", "3", "--samples", "4",
                     "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["structure"] == "unit" and record["units_total"] == 100 and record["units_active"] == 25
    assert record["export_speedup_batch_1"] > 0 and record["export_speedup_batch_1024"] > 0
    assert record["export_bytes"] < 0.5 * record["dense_export_bytes"]
    capsys.readouterr()
    assert cli.main(["evaluate", str(tmp_path)]) == 0  # the restored guide has its removed units
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["sparsity"] == record["sparsity"] and abs(evaluated["accuracy"] - record["accuracy"]) < 0.05


def test_cli_refuses_structure_where_it_does_not_apply(tmp_path, capsys):
    from pyro_sparse import cli

    assert cli.main(["train", "--method", "vi", "--structure", "unit", "--out", str(tmp_path)]) == 2
    assert "--structure does not apply to --method vi" in capsys.readouterr().err


def test_bayesian_biases_and_batchnorm_lose_the_removed_units_too():
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model = ps.BayesianNetwork(net, include="*", dataset_size=50)  # biases and BatchNorm γ, β are sites too
    guide = ps.MeanField(model)
    keep = torch.tensor([True, False, True, True, False, True, True, True])
    guide.set_unit_mask("0", keep)
    masks = guide.masks()
    assert torch.equal(masks["0.bias"], keep) and torch.equal(masks["1.weight"], keep)
    assert torch.equal(masks["1.bias"], keep) and torch.equal(masks["3.weight"], keep.expand(3, 8))
    x = torch.randn(5, 6)
    model.eval()
    exported = export(model, guide, layout="dense")
    assert exported[0].out_features == 6 and exported[1].num_features == 6 and exported[3].in_features == 6
    with torch.no_grad():
        assert (exported(x) - model.apply(x, guide.mean_weights())).abs().max() <= 1e-5


def test_cli_horseshoe_prunes_units_by_posterior_scale(tmp_path, capsys):
    import json

    from pyro_sparse import cli

    assert cli.main(["train", "--method", "snr", "--prior", "horseshoe", "--structure", "unit", "--epochs", "6",
                     "--samples", "8", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["prior"] == "horseshoe" and record["scope"] == "layer" and record["units_active"] == 25
    assert record["accuracy"] > 0.85
    assert cli.main(["train", "--method", "em-sghmc", "--prior", "horseshoe", "--out", str(tmp_path / "em")]) == 2
    assert "--method em-sghmc needs --prior spike-slab" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ssvi", "em-sghmc"])
def test_cli_unit_runs_of_ssvi_and_em_sghmc_export_fewer_units(tmp_path, method):
    import json

    from pyro_sparse import cli

    density = ["--density", "0.5"] if method == "ssvi" else []
    assert cli.main(["train", "--method", method, "--structure", "unit", "--epochs", "4", "--samples", "4",
                     *density, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["structure"] == "unit" and record["units_total"] == 100
    assert record["units_active"] == (50 if method == "ssvi" else 25)
    assert record["export_bytes"] < 0.6 * record["dense_export_bytes"] and record["accuracy"] > 0.8


# ----------------------------------------------------------------------------------------------
# Edge cases found in review
# ----------------------------------------------------------------------------------------------
def test_an_activation_that_moves_zero_leaves_its_units_alone():
    relu6 = nn.Sequential(nn.Linear(4, 5), nn.ReLU6(), nn.Linear(5, 2))
    shifted = nn.Sequential(nn.Linear(4, 5), nn.Hardtanh(0.1, 1.0), nn.Linear(5, 2))  # maps 0 to 0.1
    assert list(unit_groups(relu6)) == ["0"] and unit_groups(shifted) == {}
    assert unit_groups(nn.Sequential(nn.Linear(4, 5), nn.AlphaDropout(0.1), nn.Linear(5, 2))) == {}


def test_unit_ssvi_leaves_deterministic_groups_and_groups_of_dense_layers_whole():
    model = ps.BayesianNetwork(ps.nets.mlp(12, (10, 8), 3), dataset_size=40, exclude=["1.weight", "1.bias"])
    guide = ps.guides.SparseSubspace(model, density=0.5, structure="unit", dense_layers=(), update_every=2)
    assert set(guide.unit_masks()) == {"3"}  # group "1" has no Bayesian producer: no posterior to rank it by
    x, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    ps.fit(model, guide, (x, y), epochs=3, batch_size=8, progress=False)  # support moves without a KeyError
    assert guide.update_log and guide.unit_counts() == (18, 14)
    dense_output = ps.guides.SparseSubspace(ps.BayesianNetwork(ps.nets.mlp(12, (10, 8), 3), dataset_size=40),
                                            density=0.5, structure="unit", dense_layers=("5.weight",))
    assert set(dense_output.unit_masks()) == {"1"} and bool(dense_output.site("5.weight").mask.all())


def test_grown_units_of_a_horseshoe_network_start_on_the_scale_of_the_initial_ones():
    model = ps.BayesianNetwork(ps.nets.mlp(50, (40, 30), 3), prior=ps.priors.NodeHorseshoe(), dataset_size=40)
    guide = ps.guides.SparseSubspace(model, density=0.5, structure="unit", dense_layers=())
    keep = guide.unit_keep_mask("1")
    added, removed = (~keep).nonzero().squeeze(1)[:3], keep.nonzero().squeeze(1)[:3]
    moved = keep.clone()
    moved[added], moved[removed] = True, False
    mask = weight_masks(model.net, model.unit_groups(), {"1": moved, "3": guide.unit_keep_mask("3")},
                        {"1.weight": "1"})["1.weight"]
    grown = guide.grow_values("1.weight", mask, {"1": added})[added]
    kept = guide.site("1.weight").variational()[0][keep.nonzero().squeeze(1)[-1]].detach()
    ratio = grown.pow(2).mean().sqrt() / kept.pow(2).mean().sqrt()  # β of both: w / τ̃, not w
    assert 0.5 < float(ratio) < 2.0


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_predictions_of_a_unit_pruned_guide_run_the_smaller_network_with_the_same_outputs(name, digits):
    from pyro_sparse.infer.compact import dense_units
    from pyro_sparse.posterior import predict_draws

    net, x = ((ps.nets.mlp(64, (40, 30), 10), digits.test.tensors[0][:64]) if name == "mlp"
              else (_tiny_resnet(), torch.randn(16, 3, 16, 16)))
    model, guide = _randomly_pruned(net)
    draws = [guide.sample_weights() for _ in range(3)]
    compact = predict_draws(model, draws, x)
    with dense_units():  # the masked full network, as an independent computation
        full = predict_draws(model, draws, x)
    assert (compact.outputs - full.outputs).abs().max() <= 1e-5
    assert ps.posterior._compact_network(model) is not None
