"""Training from a DataLoader: every method streams augmented CIFAR-shaped batches, resumes exactly, and
evaluates a loader as it evaluates tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import pyro_sparse as ps
from pyro_sparse.loaders import CropFlip, training_loader


def cifar_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated 3×32×32 colour images of 3 classes (CIFAR-10 is not available offline): class k has a
    brighter channel k, which survives crops and flips."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=generator)
    x = 0.5 * torch.randn(n, 3, 32, 32, generator=generator)
    x[torch.arange(n), y] += 1.0
    return x, y


def small_convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_every_method_trains_on_an_augmenting_dataloader():
    x, y = cifar_like(96, seed=0)
    x_test, y_test = cifar_like(300, seed=1)
    seen = []

    class RecordBatches:
        def on_step_end(self, state):
            seen.append(state.batch[0])

    torch.manual_seed(0)
    results = {}
    for method in ("vi", "snr", "ssvi"):
        model = ps.BayesianNetwork(small_convnet(), dataset_size=96)
        guide = {"vi": ps.MeanField, "snr": ps.SNRPruned,
                 "ssvi": lambda m: ps.SparseSubspace(m, density=0.5, update_every=6)}[method](model)
        loader = training_loader((x, y), batch_size=32, augment=True, seed=0)
        history = ps.fit(model, guide, loader, epochs=20, lr=0.03, seed=0, callbacks=[RecordBatches()])
        assert len(history) == 20 and all(torch.isfinite(torch.tensor(row["loss"])) for row in history)
        if method == "snr":
            guide.prune(sparsity=0.5)
        if method == "ssvi":
            assert guide.update_log and guide.update_log[0]["moved"] > 0  # the support moved between batches
        model.eval()
        results[method] = ps.evaluate(model, guide, (x_test, y_test), num_samples=8)
    prior = ps.priors.SpikeAndSlab(1.0, 0.01, 0.5)
    model = ps.BayesianNetwork(small_convnet(), prior=prior, dataset_size=96)
    em = ps.em_sghmc(model, training_loader((x, y), batch_size=32, augment=True, seed=0), target_sparsity=0.5,
                     chains=2, samples=4, epochs=40, step_size=3e-3, seed=0)
    model.eval()
    results["em-sghmc"] = ps.evaluate(model, em.posterior, (x_test, y_test))
    assert em.history[-1]["sparsity"] == pytest.approx(0.5, abs=0.02)
    for method, metrics in results.items():
        assert metrics["accuracy"] > 0.7, (method, metrics)  # chance: 1/3
    assert results["snr"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    # the batches were augmented: most images are shifted or mirrored copies, not the stored ones
    stored = {tuple(image.flatten()[:8].tolist()) for image in x}
    first = seen[0]
    assert sum(tuple(image.flatten()[:8].tolist()) in stored for image in first) < len(first) // 2


def test_crop_flip_keeps_shape_and_content_and_is_seeded():
    x, y = cifar_like(4, seed=2)
    dataset = CropFlip(TensorDataset(x, y))
    torch.manual_seed(5)
    first = [dataset[i][0] for i in range(4)]
    torch.manual_seed(5)
    again = [dataset[i][0] for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    for image, original in zip(first, x, strict=True):
        assert image.shape == (3, 32, 32)
        # a crop of the zero-padded image: the centre 24×24 of the original appears in it, maybe mirrored
        centre = original[:, 4:28, 4:28]
        windows = [image[:, i: i + 24, j: j + 24] for i in range(9) for j in range(9)]
        assert any(torch.equal(w, centre) or torch.equal(w, centre.flip(-1)) for w in windows)


def test_fit_on_an_augmenting_loader_with_workers_resumes_exactly(tmp_path):
    x, y = cifar_like(64, seed=3)

    def run(epochs, path, resume):
        torch.manual_seed(0)
        model = ps.BayesianNetwork(small_convnet(), dataset_size=64, name="stream-model")
        guide = ps.MeanField(model, name="stream-guide")
        loader = training_loader((x, y), batch_size=16, augment=True, workers=2, seed=4)
        history = ps.fit(model, guide, loader, epochs=epochs, seed=1, checkpoint=path, resume=resume)
        return guide, history

    guide_a, history_a = run(4, tmp_path / "a.pt", resume=False)
    run(2, tmp_path / "b.pt", resume=False)
    guide_b, history_b = run(4, tmp_path / "b.pt", resume=True)
    for (name, a), b in zip(guide_a.state_dict().items(), guide_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [row["loss"] for row in history_a] == [row["loss"] for row in history_b]


def test_em_sghmc_on_a_dataloader_resumes_exactly_and_evaluates_a_loader_like_tensors(digits, tmp_path):
    data = digits.subsample(train=300, test=200)
    settings = dict(target_sparsity=0.5, chains=2, samples=3, epochs=6, seed=2)

    def model():
        return ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), prior=ps.priors.SpikeAndSlab(1.0, 0.01, 0.5),
                                  dataset_size=300)

    class Stop(Exception):
        pass

    def stop_at_three(row):
        if row["epoch"] == 3:
            raise Stop

    torch.manual_seed(0)
    whole = ps.em_sghmc(model(), training_loader(data.train, 50, seed=7), **settings)
    torch.manual_seed(0)
    with pytest.raises(Stop):
        ps.em_sghmc(model(), training_loader(data.train, 50, seed=7), **settings, checkpoint=tmp_path / "em.pt",
                    callback=stop_at_three)
    torch.manual_seed(0)
    trained = model()
    resumed = ps.em_sghmc(trained, training_loader(data.train, 50, seed=7), **settings, checkpoint=tmp_path / "em.pt",
                          resume=True)
    for name in whole.posterior.samples:
        assert torch.equal(whole.posterior.samples[name], resumed.posterior.samples[name]), name

    trained.eval()
    on_tensors = ps.evaluate(trained, resumed.posterior, data.test)
    test_loader = DataLoader(data.test, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    on_loader = ps.evaluate(trained, resumed.posterior, test_loader)
    for key in ("accuracy", "nll", "ece", "brier", "sparsity"):
        assert on_loader[key] == pytest.approx(on_tensors[key], rel=1e-5, abs=1e-7), key
    predicted = resumed.posterior.predict(DataLoader(data.test, batch_size=64), num_samples=6)
    assert predicted.shape == (6, 200, 10)
    assert torch.allclose(predicted, resumed.posterior.predict(data.test.tensors[0], num_samples=6), atol=1e-5)


def test_loaders_fit_cannot_take_are_refused_with_the_way_out(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (8,), 10), dataset_size=100)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(digits.train.tensors[0][:100], digits.train.tensors[1][:100], strict=True)

    with pytest.raises(TypeError, match="without a length.*__len__"):
        ps.fit(model, ps.MeanField(model), DataLoader(Stream(), batch_size=10), epochs=1)

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return {"image": digits.train.tensors[0][index], "label": digits.train.tensors[1][index]}

    with pytest.raises(TypeError, match=r"must yield \(x, y\) pairs, it yielded a dict"):
        ps.fit(model, ps.MeanField(model), DataLoader(Dicts(), batch_size=5), epochs=1)
    with pytest.raises(ValueError, match="colour images.*without --augment"):
        training_loader(digits.train, 32, augment=True)


def test_cli_trains_with_workers_and_bf16_and_refuses_augment_on_grey_images(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "pyro_sparse.cli", "train", "--method", "vi", "--epochs", "2",
                           "--workers", "1", "--precision", "bf16", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "bf16" in (out / "history.csv").read_text().splitlines()[1]
    em = subprocess.run([sys.executable, "-m", "pyro_sparse.cli", "train", "--method", "em-sghmc", "--precision",
                         "bf16", "--out", str(tmp_path / "em")], capture_output=True, text=True)
    assert em.returncode == 2 and "--precision does not apply to --method em-sghmc" in em.stderr
    refused = subprocess.run([sys.executable, "-m", "pyro_sparse.cli", "train", "--augment", "--epochs", "1",
                              "--out", str(tmp_path / "other")], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "colour images" in refused.stderr and not (tmp_path / "other").exists()


def test_a_loaders_sampler_sets_n_and_sharding_refuses_what_it_cannot_keep(digits):
    from torch.utils.data import SubsetRandomSampler

    from pyro_sparse.batches import LoaderBatches
    from pyro_sparse.distributed import World

    subset = DataLoader(digits.train, batch_size=10, sampler=SubsetRandomSampler(range(200)))
    source = LoaderBatches(subset)
    assert source.dataset_size == 200 and source.steps_per_epoch == 20  # N counts what an epoch draws
    with pytest.raises(ValueError, match="cannot keep this loader's own SubsetRandomSampler"):
        source.shard(World(rank=0, size=2), seed=0)
    shuffled = LoaderBatches(DataLoader(digits.train, batch_size=100, shuffle=True))
    shuffled.shard(World(rank=1, size=2), seed=0)
    assert shuffled.steps_per_epoch == 7  # 1347 examples: 674 for process 1, in batches of 100
    seen = torch.cat([y for _, y in shuffled.epoch()])
    assert len(seen) == 674
