"""Torch-free runtime: noise schedules, DPM-Solver and DDIM, and eps backends.

Imports numpy and the chosen backend only, so it can be embedded in production applications::

    from calibexport.runtime import Sampler
    with Sampler.from_artifact("build/digits") as sampler:
        images = sampler.sample(16, steps=20, order=3, method="singlestep", seed=0)
"""

from __future__ import annotations

from typing import Any

__all__ = ["Sampler", "solve", "schedule_from_spec", "load_eta_table"]

_LAZY = {
    "Sampler": "calibexport.runtime.sampler",
    "solve": "calibexport.runtime.solvers",
    "schedule_from_spec": "calibexport.runtime.schedule",
    "load_eta_table": "calibexport.runtime.eta_table",
}


def __getattr__(name: str) -> Any:
    # Submodules load on first use, so importing one part never pulls in the others.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calibexport.runtime' has no attribute {name!r}")
