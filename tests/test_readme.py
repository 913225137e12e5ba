"""The README's example runs as written (keeps the README true)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block(containing: str) -> str:
    """The README's one Python example that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2
    (block,) = [block for block in blocks if containing in block]
    return block


def test_readme_python_example_runs(capsys):
    namespace: dict = {}
    exec(compile(_python_block("ps.data.load"), str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "'accuracy'" in printed and "'ece'" in printed
    assert namespace["probs"].shape == (450, 10)
    assert namespace["history"][-1]["epoch"] == 30


def test_readme_own_pyro_model_example_keeps_the_true_inputs():
    import pyro
    import torch

    pyro.clear_param_store()
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    namespace: dict = {}
    exec(compile(_python_block("def regression"), str(README), "exec"), namespace)
    assert namespace["guide"].masks()["w"].nonzero().flatten().tolist() == list(range(10))
