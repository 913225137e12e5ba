"""Divergence: every loop stops at once with TrainingDiverged, before it writes a checkpoint, so the
last good checkpoint stays on disk, loadable, finite and resumable."""

from __future__ import annotations

import math

import pytest
import torch

import pyro_sparse as ps
from pyro_sparse import checkpoint
from pyro_sparse.errors import TrainingDiverged

HUGE = 1e38
STEPS_PER_EPOCH = 11  # 1347 digits training examples in batches of 128


def _spike_and_slab_model(digits) -> ps.BayesianNetwork:
    return ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), prior=ps.priors.SpikeAndSlab(1.0, 0.01, 0.5),
                              dataset_size=len(digits.train))


def _explodes_after_epoch_1(step: int) -> float:
    """A step-size schedule: a sane ε in the first epoch, an absurd one from the second on."""
    return 1e-3 if step < STEPS_PER_EPOCH else HUGE


def _non_finite_tensors(value, name="") -> list[str]:
    """Names of the floating-point tensors holding NaN or inf in nested dicts / lists / tuples."""
    if isinstance(value, torch.Tensor):
        return [name] if value.is_floating_point() and not torch.isfinite(value).all() else []
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in _non_finite_tensors(item, f"{name}.{key}")]
    if isinstance(value, list | tuple):
        return [bad for key, item in enumerate(value) for bad in _non_finite_tensors(item, f"{name}.{key}")]
    if isinstance(value, float) and not math.isfinite(value):
        return [name]
    return []


def _assert_last_good_checkpoint(path, epoch: int, epochs: int) -> dict:
    saved = checkpoint.load(path)
    assert saved["epoch"] == epoch and saved["epochs"] == epochs
    assert _non_finite_tensors(saved) == []
    return saved


def test_em_sghmc_diverging_in_epoch_2_keeps_the_epoch_1_checkpoint_and_resumes(digits, tmp_path):
    path = tmp_path / "run.pt"
    model = _spike_and_slab_model(digits)
    kwargs = dict(chains=2, samples=2, epochs=4, batch_size=128, seed=0, checkpoint=path)
    with pytest.raises(TrainingDiverged, match=r"training diverged at epoch 2, step \d+: .*chain") as caught:
        ps.em_sghmc(model, digits.train, step_size=_explodes_after_epoch_1, **kwargs)
    error = caught.value
    assert error.option == "step_size" and error.checkpoint == path
    assert f"the last good checkpoint {path} is intact" in str(error)
    assert error.describe("--lr").endswith("lower --lr and start again")
    _assert_last_good_checkpoint(path, epoch=1, epochs=4)
    assert float(model.prior.slab_scale) == 1.0 and float(model.prior.inclusion) == 0.5  # not left NaN

    result = ps.em_sghmc(model, digits.train, step_size=1e-3, resume=True, **kwargs)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert all(torch.isfinite(draws).all() for draws in result.posterior.samples.values())
    _assert_last_good_checkpoint(path, epoch=4, epochs=4)


def test_em_sghmc_is_stopped_within_em_every_steps_and_writes_nothing(digits, tmp_path):
    path = tmp_path / "run.pt"
    with pytest.raises(TrainingDiverged, match="at epoch 1, step [1-5]: ") as caught:
        ps.em_sghmc(_spike_and_slab_model(digits), digits.train, chains=1, samples=2, epochs=2, batch_size=128,
                    step_size=HUGE, em_every=5, target_sparsity=0.0, seed=0, checkpoint=path)
    assert not path.exists()
    assert "no checkpoint was written" in str(caught.value)


def test_dense_sample_sghmc_diverging(digits, tmp_path):
    path = tmp_path / "run.pt"
    model = ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), dataset_size=len(digits.train))
    with pytest.raises(TrainingDiverged, match="at epoch 2, step") as caught:
        ps.sample_sghmc(model, digits.train, chains=2, samples=2, epochs=3, batch_size=128,
                        step_size=_explodes_after_epoch_1, record_every=4, seed=0, checkpoint=path)
    assert caught.value.option == "step_size"
    _assert_last_good_checkpoint(path, epoch=1, epochs=3)


def _mlp_and_guide(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (32,), 10), dataset_size=len(digits.train))
    return model, ps.MeanField(model)


def test_fit_diverging_in_epoch_2_keeps_the_epoch_1_checkpoint_and_resumes_with_a_sane_lr(digits, tmp_path):
    path = tmp_path / "fit.pt"
    model, guide = _mlp_and_guide(digits)

    def absurd_lr_after_epoch_1(state):
        for group in state.optimizer.param_groups:
            group["lr"] = HUGE

    with pytest.raises(TrainingDiverged, match=r"training diverged at epoch 2, step \d+: the loss is") as caught:
        ps.fit(model, guide, digits.train, epochs=3, batch_size=128, seed=0, checkpoint=path,
               callbacks=[absurd_lr_after_epoch_1])
    assert caught.value.option == "lr" and caught.value.checkpoint == path
    saved = _assert_last_good_checkpoint(path, epoch=1, epochs=3)
    assert saved["optimizer"]["param_groups"][0]["lr"] == HUGE  # the callback ran before the save

    history = ps.fit(model, guide, digits.train, epochs=3, batch_size=128, lr=5e-3, seed=0, checkpoint=path,
                     resume=True)  # the lr of this call replaces the checkpoint's
    assert history.column("lr") == [5e-3, 5e-3, 5e-3] and all(math.isfinite(loss) for loss in history.column("loss"))


def test_fit_with_an_absurd_lr_writes_no_checkpoint(digits, tmp_path):
    path = tmp_path / "fit.pt"
    model, guide = _mlp_and_guide(digits)
    with pytest.raises(TrainingDiverged, match="at epoch 1, step ") as caught:
        ps.fit(model, guide, digits.train, epochs=2, batch_size=128, lr=HUGE, seed=0, checkpoint=path)
    assert not path.exists()
    assert caught.value.describe("--lr").endswith("no checkpoint was written; lower --lr and start again")


def test_fit_saves_no_non_finite_parameter_even_when_the_loss_is_finite(digits, tmp_path):
    path = tmp_path / "fit.pt"
    model, guide = _mlp_and_guide(digits)

    def poison_in_epoch_2(state):
        if state.epoch == 1:
            with torch.no_grad():
                guide.site("1.weight").loc[0, 0] = math.nan

    with pytest.raises(TrainingDiverged, match=r"at epoch 2, step 11: guide\.sites\.1__weight\.loc is not finite"):
        ps.fit(model, guide, digits.train, epochs=3, batch_size=128, seed=0, checkpoint=path,
               callbacks=[poison_in_epoch_2])
    _assert_last_good_checkpoint(path, epoch=1, epochs=3)


def test_epoch_hooks_never_see_a_diverged_state(digits):
    """A step hook poisons a mean; the epoch hooks (a user's callback that might save) must not run."""
    model, guide = _mlp_and_guide(digits)
    seen = []

    def poison(state):
        if state.epoch == 1 and state.step == state.steps_per_epoch - 1:
            with torch.no_grad():
                guide.site("1.weight").loc[0, 0] = math.nan

    class Saver:
        on_step_end = staticmethod(poison)

        def on_epoch_end(self, state):
            seen.append(state.epoch)

    with pytest.raises(TrainingDiverged, match="epoch 2"):
        ps.fit(model, guide, digits.train, epochs=3, batch_size=128, seed=0, callbacks=[Saver()])
    assert seen == [0]


def test_a_checkpoint_path_that_is_a_folder_is_refused_before_training(digits, tmp_path):
    model, guide = _mlp_and_guide(digits)
    with pytest.raises(ValueError, match="is a folder: give the path of a file in it"):
        ps.fit(model, guide, digits.train, epochs=1, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="is a folder: give the path of a file in it"):
        ps.em_sghmc(_spike_and_slab_model(digits), digits.train, epochs=2, samples=2, checkpoint=tmp_path)


@pytest.mark.parametrize("field, value", [("shuffle_rng", 5), ("epoch", "x"), ("history", {}), ("model", 5)])
def test_fit_refuses_a_well_formed_checkpoint_with_wrong_contents(digits, tmp_path, field, value):
    path = tmp_path / "fit.pt"
    model, guide = _mlp_and_guide(digits)
    ps.fit(model, guide, digits.train, epochs=1, batch_size=128, seed=0, checkpoint=path)
    state = checkpoint.load(path)
    state[field] = value
    path.write_bytes(checkpoint.encode(state))
    with pytest.raises(ps.errors.CheckpointError, match="fit.pt refused"):
        ps.fit(model, guide, digits.train, epochs=2, batch_size=128, seed=0, checkpoint=path, resume=True)
