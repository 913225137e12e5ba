"""SNR pruning: acceptance on digits, exact zeros in every sample, gradient and optimizer step,
masks through checkpoints and resume, scopes, the paper's setting, bad input, and the CLI recipe."""

from __future__ import annotations

import copy
import csv
import json
import math

import pyro
import pytest
import torch
from test_cli import REQUIRED_KEYS

import pyro_sparse as ps
from pyro_sparse import cli
from pyro_sparse.guides import PAPER_SETTING, SNRPruned, snr_sweep
from pyro_sparse.infer.elbo import negative_elbo

SNR_KEYS = {"target_sparsity", "accuracy_before_pruning", "nll_before_pruning", "ece_before_pruning",
            "finetune_epochs", "scope"}


def _model(digits: ps.data.Dataset) -> ps.BayesianNetwork:
    return ps.BayesianNetwork(ps.nets.mlp(64, (100,), 10), dataset_size=len(digits.train))


@pytest.fixture(scope="module")
def trained(digits):
    """Dense VI on digits, mlp 64-100-10, 30 epochs (seeded): (model, guide, dense test accuracy)."""
    torch.manual_seed(0)
    model = _model(digits)
    guide = SNRPruned(model)
    ps.fit(model, guide, digits.train, epochs=30, seed=0)
    torch.manual_seed(0)
    return model, guide, ps.evaluate(model, guide, digits.test, num_samples=32)["accuracy"]


def _copies(trained):
    model, guide, accuracy = trained
    return copy.deepcopy(model), copy.deepcopy(guide), accuracy


def _assert_zero_where_pruned(guide: SNRPruned, weights: dict[str, torch.Tensor]) -> None:
    for name, mask in guide.masks().items():
        value = weights[name]
        assert bool((value[..., ~mask] == 0).all()), name
        assert bool((value[..., mask] != 0).all()), name


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_80_percent_and_finetune_loses_at_most_one_point_on_digits(trained, digits, scope):
    model, guide, dense_accuracy = _copies(trained)
    assert dense_accuracy >= 0.96
    guide.prune(sparsity=0.8, scope=scope)
    assert guide.sparsity == pytest.approx(0.8, abs=1e-12)
    torch.manual_seed(0)
    pruned_only = ps.evaluate(model, guide, digits.test, num_samples=32)
    ps.fit(model, guide, digits.train, epochs=5, seed=0)
    torch.manual_seed(0)
    results = ps.evaluate(model, guide, digits.test, num_samples=32)
    assert results["sparsity"] == pytest.approx(0.8, abs=1e-12) and results["active_weights"] == 1480
    assert results["accuracy"] >= dense_accuracy - 0.01, (dense_accuracy, results)
    assert results["accuracy"] >= pruned_only["accuracy"]  # fine-tuning recovers what pruning lost

    # μ = σ = 0 at pruned weights: stored, in q, in every draw (ours and Pyro's), and after fine-tuning
    for name, site in guide.named_sites():
        assert bool((site.loc[~site.mask] == 0).all())
        loc, scale = guide.moments()[name]
        assert bool((loc[~site.mask] == 0).all()) and bool((scale[~site.mask] == 0).all())
    for _ in range(3):
        _assert_zero_where_pruned(guide, guide.sample_weights())
    trace = pyro.poutine.trace(guide).get_trace()
    _assert_zero_where_pruned(guide, {name: trace.nodes[name]["value"] for name in guide.site_info})
    x = digits.test.tensors[0][:20]
    samples = pyro.infer.Predictive(model, guide=guide, num_samples=4, return_sites=list(guide.site_info))(x)
    _assert_zero_where_pruned(guide, {name: value.squeeze(1) for name, value in samples.items()})


def test_pruned_weights_get_zero_gradients_and_stay_zero_under_any_optimizer(trained, digits):
    model, guide, _ = _copies(trained)
    x, y = digits.train.tensors
    # an optimizer with momentum built up before pruning, and weight decay
    optimizer = torch.optim.AdamW([*guide.parameters(), *model.parameters()], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        negative_elbo(model, guide, x[:64], y[:64]).loss.backward()
        optimizer.step()
    guide.prune(sparsity=0.9, scope="global")
    for step in range(5):
        optimizer.zero_grad()
        negative_elbo(model, guide, x[64 * step : 64 * (step + 1)], y[64 * step : 64 * (step + 1)]).loss.backward()
        for _, site in guide.named_sites():
            assert bool((site.loc.grad[~site.mask] == 0).all()) and bool((site.rho.grad[~site.mask] == 0).all())
        optimizer.step()
        guide.on_step_end(None)  # what fit calls after every step
        for _, site in guide.named_sites():
            assert bool((site.loc[~site.mask] == 0).all())
    assert guide.sparsity == pytest.approx(0.9, abs=1e-12)
    _assert_zero_where_pruned(guide, guide.sample_weights())
    # with fit (a fresh Adam: zero gradient, zero update) the stored μ stays exactly zero too
    ps.fit(model, guide, digits.train, epochs=1, seed=0)
    for _, site in guide.named_sites():
        assert bool((site.loc[~site.mask] == 0).all())


def test_masks_survive_checkpoint_and_resume_equals_uninterrupted(trained, digits, tmp_path):
    model, guide, _ = _copies(trained)
    guide.prune(sparsity=0.85)
    start_model, start_guide = copy.deepcopy(model), copy.deepcopy(guide)
    ps.fit(model, guide, digits.train, epochs=4, seed=1)

    interrupted_model, interrupted_guide = copy.deepcopy(start_model), copy.deepcopy(start_guide)
    path = tmp_path / "finetune.pt"
    ps.fit(interrupted_model, interrupted_guide, digits.train, epochs=2, seed=1, checkpoint=path)
    # a fresh process: an unpruned guide, masks and all come back from the checkpoint
    resumed_model, resumed_guide = copy.deepcopy(trained[0]), SNRPruned(copy.deepcopy(trained[0]))
    assert resumed_guide.sparsity == 0
    history = ps.fit(resumed_model, resumed_guide, digits.train, epochs=4, seed=1, checkpoint=path, resume=True)
    assert len(history) == 4
    assert resumed_guide.sparsity == pytest.approx(0.85, abs=1e-12)
    for key, value in guide.state_dict().items():
        assert torch.equal(resumed_guide.state_dict()[key], value), key


def test_layer_and_global_scope_remove_exact_counts(trained):
    _, dense, _ = trained
    counts = {name: site.mask.numel() for name, site in dense.named_sites()}
    layer = copy.deepcopy(dense)
    layer.prune(sparsity=0.7, scope="layer")
    for row in layer.layer_sparsity():
        assert row["total"] - row["active"] == round(0.7 * counts[row["site"]])
    glob = copy.deepcopy(dense)
    glob.prune(sparsity=0.7, scope="global")
    assert dense.num_weights - glob.num_active == round(0.7 * dense.num_weights)
    per_layer = [row["sparsity"] for row in glob.layer_sparsity()]
    assert max(per_layer) - min(per_layer) > 0.05  # one threshold prunes layers unequally
    snr = dense.snr()
    removed = torch.cat([snr[n][~m].flatten() for n, m in glob.masks().items()])
    kept = torch.cat([snr[n][m].flatten() for n, m in glob.masks().items()])
    assert removed.max() <= kept.min() and glob.pruned_threshold == float(removed.max())
    # a higher target only removes more: the earlier pruned stay pruned
    before = {name: mask.clone() for name, mask in glob.masks().items()}
    glob.prune(sparsity=0.9, scope="global")
    assert all(bool((~before[name] <= ~mask).all()) for name, mask in glob.masks().items())
    assert dense.num_weights - glob.num_active == round(0.9 * dense.num_weights)


def test_ties_keep_the_requested_count_and_threshold_pruning(trained):
    guide = copy.deepcopy(trained[1])
    with torch.no_grad():
        for _, site in guide.named_sites():
            site.loc.fill_(0.5)
            site.rho.fill_(0.0)
            site.rho[:, : site.rho.shape[1] // 2] = 1.0  # two SNR values per site: every weight tied
    guide.prune(sparsity=0.33, scope="global")
    assert guide.num_weights - guide.num_active == round(0.33 * guide.num_weights)

    guide = copy.deepcopy(trained[1])
    snr = guide.snr()
    threshold = float(torch.cat([r.flatten() for r in snr.values()]).median())
    guide.prune(threshold=0.0)
    assert guide.sparsity == 0.0
    guide.prune(threshold=threshold)
    for name, mask in guide.masks().items():
        assert torch.equal(mask, snr[name] >= threshold)
    assert guide.pruned_threshold == threshold


def test_sweep_prunes_copies_and_the_paper_setting_is_worse(trained, digits):
    model, guide, dense_accuracy = trained
    state = copy.deepcopy(guide.state_dict())
    ours = snr_sweep(model, guide, digits, [0.0, 0.8], finetune_epochs=3)
    assert [row["scope"] for row in ours] == ["global", "global"]
    paper = snr_sweep(model, guide, digits, [0.8], **PAPER_SETTING)
    noise = snr_sweep(model, guide, digits, [0.8], **PAPER_SETTING, pruned="noise")
    for key, value in guide.state_dict().items():  # the caller's guide is untouched
        assert torch.equal(value, state[key]), key
    keys = {"target_sparsity", "sparsity", "pruned_fraction", "accuracy", "nll", "ece", "mean_sample_accuracy"}
    assert all(keys <= set(row) for row in ours + paper + noise)
    assert [row["sparsity"] for row in ours] == [0.0, pytest.approx(0.8)]
    assert paper[0]["scope"] == "global" and paper[0]["finetune_epochs"] == 0
    # BPrune's flaw: the "pruned" weights are noise, not zeros: nothing is sparse, and accuracy collapses
    assert noise[0]["sparsity"] == 0.0 and noise[0]["pruned_fraction"] == pytest.approx(0.8)
    assert noise[0]["accuracy"] < paper[0]["accuracy"] - 0.2
    assert ours[1]["accuracy"] >= dense_accuracy - 0.02
    assert all(math.isfinite(row["nll"]) and 0 <= row["ece"] <= 1 for row in ours + paper + noise)

    noisy = copy.deepcopy(guide)
    removed = noisy.prune(sparsity=0.5, pruned="noise")
    for name, site in noisy.named_sites():
        assert bool(site.mask.all())
        scale = site.scale()[removed[name]]
        assert bool((site.loc[removed[name]] == 0).all()) and torch.allclose(scale, torch.tensor(math.log(2.0)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": float("nan")}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": "0.5"}, r"sparsity must be a number in \[0, 1\)"),
        ({"threshold": -1.0}, "threshold must be a finite number >= 0, got -1.0"),
        ({"threshold": float("inf")}, "threshold must be a finite number >= 0"),
        ({}, "give exactly one of threshold= and sparsity="),
        ({"threshold": 1.0, "sparsity": 0.5}, "give exactly one of threshold= and sparsity="),
        ({"sparsity": 0.5, "scope": "network"}, "scope must be one of"),
        ({"sparsity": 0.5, "pruned": "nan"}, "pruned must be one of"),
    ],
)
def test_bad_prune_input_raises_one_clear_error(trained, kwargs, message):
    guide = copy.deepcopy(trained[1])
    with pytest.raises(ValueError, match=message):
        guide.prune(**kwargs)
    assert guide.sparsity == 0.0


def test_pruning_an_untrained_guide_raises(digits):
    guide = SNRPruned(_model(digits))
    with pytest.raises(ValueError, match="never trained"):
        guide.prune(sparsity=0.5)
    with pytest.raises(ValueError, match="finetune_epochs must be an integer >= 0"):
        snr_sweep(_model(digits), guide, digits, [0.5], finetune_epochs=-1)
    with pytest.raises(ValueError, match="guide must be an SNRPruned guide"):
        snr_sweep(_model(digits), ps.MeanField(_model(digits)), digits, [0.5])


def test_cli_snr_run_writes_metrics_tables_plots_and_evaluates(tmp_path, capsys):
    out = tmp_path / "snr"
    args = ["train", "--method", "snr", "--sparsity", "0.8", "--finetune-epochs", "2", "--finetune-lr", "0.003",
            "--epochs", "30", "--samples", "16", "--out", str(out)]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= REQUIRED_KEYS | SNR_KEYS
    assert metrics["method"] == "snr" and metrics["target_sparsity"] == 0.8 and metrics["scope"] == "global"
    assert metrics["sparsity"] == pytest.approx(0.8) and metrics["active_weights"] == 1480
    assert metrics["finetune_epochs"] == 2 and metrics["finetune_lr"] == 0.003 and metrics["inference_flops"] == 1480
    assert metrics["accuracy_before_pruning"] >= 0.95 and metrics["accuracy"] >= 0.95, metrics
    assert metrics["train_flops"] == 3 * 2 * (7400 * 30 + 1480 * 2) * 1347
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["phase"] for row in rows] == ["dense"] * 30 + ["finetune"] * 2
    assert [int(row["epoch"]) for row in rows] == list(range(1, 33))
    with open(out / "layer_sparsity.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(row["site"], int(row["total"])) for row in table] == [("1.weight", 6400), ("3.weight", 1000)]
    assert sum(int(row["active"]) for row in table) == 1480
    assert all(float(row["sparsity"]) == 1 - int(row["active"]) / int(row["total"]) for row in table)
    for name in ("snr_histogram.png", "checkpoint.pt", "dense.pt", "training_curve.png", "reliability.png"):
        assert (out / name).stat().st_size > 0
    capsys.readouterr()

    assert cli.main(["evaluate", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["sparsity"] == pytest.approx(0.8) and again["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.02)

    # --density belongs to ssvi
    assert cli.main(["train", "--method", "snr", "--density", "0.1", "--out", str(tmp_path / "bad")]) == 2
    assert "--density does not apply to --method snr" in capsys.readouterr().err


def test_cli_resume_after_the_dense_phase_equals_an_uninterrupted_run(tmp_path, capsys):
    common = ["train", "--method", "snr", "--epochs", "4", "--finetune-epochs", "2", "--samples", "4"]
    assert cli.main([*common, "--out", str(tmp_path / "a")]) == 0
    # a run that crashed after the dense phase: only dense.pt is there
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "dense.pt").write_bytes((tmp_path / "a" / "dense.pt").read_bytes())
    assert cli.main([*common, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = (ps.checkpoint.load(tmp_path / name / "checkpoint.pt") for name in ("a", "b"))
    assert a["guide"].keys() == b["guide"].keys()
    assert all(torch.equal(a["guide"][key], b["guide"][key]) for key in a["guide"])
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b")]
    assert metrics[0]["target_sparsity"] == 0.8 and metrics[0]["sparsity"] == pytest.approx(0.8)  # the default
    timed = {"train_seconds", "export_speedup_batch_1", "export_speedup_batch_1024"}  # wall-clock measurements
    assert {k: v for k, v in metrics[0].items() if k not in timed} == {
        k: v for k, v in metrics[1].items() if k not in timed}
    capsys.readouterr()
    (tmp_path / "b" / "checkpoint.pt").unlink()
    assert cli.main([*common, "--out", str(tmp_path / "b"), "--resume", "--prior", "spike-slab"]) == 2
    assert "trained with --prior gaussian, this command gives spike-slab" in capsys.readouterr().err
    # without fine-tuning the pruned dense posterior is the checkpoint, and evaluate reads it
    assert cli.main(["train", "--method", "snr", "--epochs", "3", "--finetune-epochs", "0", "--sparsity", "0.5",
                     "--samples", "4", "--out", str(tmp_path / "c")]) == 0
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["finetune_epochs"] == 0 and metrics["sparsity"] == pytest.approx(0.5)
    capsys.readouterr()
    assert cli.main(["evaluate", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.5)
