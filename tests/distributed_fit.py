"""Run by tests/test_distributed.py, under ``torchrun`` (several processes) or alone: ``ps.fit`` of the three
VI methods on digits, each process saving what it ends with to OUT/<method>-rank<r>.pt.

    python tests/distributed_fit.py OUT BATCH EPOCHS [--methods vi,snr,ssvi] [--die-after EPOCH] [--resume]

Each process starts from a different random initialisation (``torch.manual_seed(rank)``): ``fit`` must make
them equal (process 0's). ``--die-after E`` makes process 1 exit hard at the end of epoch E, before its
checkpoint; ``--disagree`` gives process 1 another learning rate.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import pyro_sparse as ps


def guide_for(method: str, model: ps.BayesianNetwork):
    if method == "vi":
        return ps.MeanField(model)
    if method == "snr":
        return ps.SNRPruned(model)
    return ps.SparseSubspace(model, density=0.3, update_every=5)


def em_run(data, args, rank: int) -> None:
    """EM-SGHMC, 4 chains dealt out to the processes, on 400 digits; every process saves the whole result."""
    train = data.subsample(train=400, test=10).train
    prior = ps.priors.SpikeAndSlab(1.0, 0.01, 0.5)
    torch.manual_seed(rank)  # each process its own start: em_sghmc must use process 0's model
    model = ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), prior=prior, dataset_size=400)

    def die(row):
        if args.die_after is not None and rank == 1 and row["epoch"] == args.die_after:
            os._exit(3)

    result = ps.em_sghmc(model, train, target_sparsity=0.5, chains=4, samples=4, epochs=args.epochs,
                         batch_size=args.batch, seed=0, checkpoint=args.out / "em.pt", resume=args.resume, callback=die)
    torch.save({"samples": result.posterior.samples, "inclusion": result.inclusion_probability, "masks": result.masks,
                "history": [row["neg_log_joint"] for row in result.history],
                "prior": {name: value.clone() for name, value in prior.named_buffers()}},
               args.out / f"em-rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("batch", type=int)
    parser.add_argument("epochs", type=int)
    parser.add_argument("--methods", default="vi,snr,ssvi")
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--disagree", action="store_true", help="process 1 asks for another learning rate")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    data = ps.data.load("digits")
    for method in args.methods.split(","):
        if method == "em":
            em_run(data, args, rank)
            continue
        torch.manual_seed(rank)
        model = ps.BayesianNetwork(ps.nets.mlp(64, (32,), 10), dataset_size=len(data.train))
        guide = guide_for(method, model)

        def die(state, method=method):
            if args.die_after is not None and rank == 1 and state.epoch + 1 == args.die_after:
                os._exit(3)  # after this epoch's hooks, before its checkpoint: the last good one is epoch - 1

        lr = 0.02 if args.disagree and rank == 1 else 0.01
        history = ps.fit(model, guide, data.train, epochs=args.epochs, batch_size=args.batch, lr=lr, seed=0,
                         checkpoint=args.out / f"{method}.pt", resume=args.resume, callbacks=[die])
        if method == "snr":
            guide.prune(sparsity=0.5)
        model.eval()
        accuracy = ps.evaluate(model, guide, data.test, num_samples=16)["accuracy"]
        torch.save({"guide": guide.state_dict(), "model": model.state_dict(), "loss": history.column("loss"),
                    "masks": guide.masks(), "accuracy": accuracy}, args.out / f"{method}-rank{rank}.pt")
    if torch.distributed.is_initialized():  # leave the group together (a process exiting alone may abort)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
