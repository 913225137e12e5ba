"""The package's own exceptions: each names what went wrong and what to do about it.

They subclass the built-in exception a caller would already catch (``ValueError``, ``RuntimeError``),
so code written against earlier versions keeps working. The CLI turns each into exit status 2 and
one line on stderr.
"""

from __future__ import annotations

import os
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used: missing, truncated, corrupt, not ours, written by
    another package version or checkpoint format, or holding something other than tensors and plain data.

    Attributes:
        path: the file.
        reason: why it was refused (one line).
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path} refused: {reason}")


class TrainingDiverged(RuntimeError):
    """A training or sampling loop met a non-finite loss, parameter or hyperparameter.

    The loop stops before it writes anything, so the last checkpoint on disk is the last good state.

    Attributes:
        where: "epoch E" or "epoch E, step S" (1-based) where the non-finite value appeared.
        what: what was non-finite ("the loss is nan", "the weights of chain 1 are not finite", ...).
        option: the API argument that sets the step size ("lr", "step_size"); the CLI maps it to ``--lr``.
        checkpoint: the last good checkpoint (None if the loop was not checkpointing or had not written one).
    """

    def __init__(self, where: str, what: str, option: str, checkpoint: str | os.PathLike | None = None):
        self.where, self.what, self.option = where, what, option
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        super().__init__(self.describe(option))

    def describe(self, option_name: str, resumable: bool = False) -> str:
        """The one-line message, naming the step-size option as ``option_name`` (e.g. ``"--lr"``);
        ``resumable``: the step size may change on resume, so the intact checkpoint can go on."""
        intact = self.checkpoint is not None and self.checkpoint.is_file()
        kept = f"the last good checkpoint {self.checkpoint} is intact" if intact else "no checkpoint was written"
        then = "continue with --resume" if intact and resumable else "start again"
        return f"training diverged at {self.where}: {self.what}; {kept}; lower {option_name} and {then}"


class UnitAnalysisError(ValueError):
    """Structured (unit-level) sparsity asked of a network whose units cannot be found or removed:
    ``torch.fx`` cannot trace it, or no layer has removable units. The message says why and what to
    use instead (weight-level sparsity)."""


__all__ = ["CheckpointError", "TrainingDiverged", "UnitAnalysisError"]
