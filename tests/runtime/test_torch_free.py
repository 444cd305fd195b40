"""The runtime samples from a built artifact in a process where `import torch` fails."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import calibexport.runtime

BLOCK_TORCH = """
import importlib.abc, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

sys.meta_path.insert(0, BlockTorch())
try:
    import torch  # noqa: F401
    raise SystemExit("torch imported although it is blocked")
except ImportError:
    pass

import numpy as np
from calibexport.runtime import Sampler

with Sampler.from_artifact(sys.argv[1]) as sampler:
    images = sampler.sample(3, steps=6, order=3, method="singlestep", seed=0)
assert images.shape == (3, 1, 8, 8), images.shape
assert np.all(np.isfinite(images))
assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules)
print("sampled without torch")
"""


def test_runtime_samples_with_torch_blocked(tiny_artifact):
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(tiny_artifact)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sampled without torch" in result.stdout


def test_runtime_sources_never_import_torch():
    root = Path(calibexport.runtime.__file__).parent
    offenders = []
    for source in root.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{source.name}: {name}" for name in names if name.split(".")[0] == "torch"]
    assert offenders == []
