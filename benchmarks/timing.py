"""The one timing helper of the step-time benchmarks (step_time.py, ssvi.py --part steps, em_sghmc.py --part step).

CUDA runs asynchronously: a step's Python call returns once its kernels are queued, not when they have run. So
``timed`` waits for the device before starting the clock (the previous step's kernels must not be counted) and
again before stopping it (this step's must be). On the CPU it is a plain wall-clock measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for every kernel queued on ``device`` (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Milliseconds ``fn()`` takes on ``device``, its queued CUDA work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3
