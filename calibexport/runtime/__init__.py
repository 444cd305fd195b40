"""Torch-free runtime: noise schedules, DPM-Solver and DDIM, and eps backends.

Imports numpy and the chosen backend only, so it can be embedded in production applications::

    from calibexport.runtime import Sampler
    with Sampler.from_artifact("build/digits") as sampler:
        images = sampler.sample(16, steps=20, order=3, method="singlestep", seed=0)
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Sampler": "calibexport.runtime.sampler",
    "solve": "calibexport.runtime.solvers",
    "StepInfo": "calibexport.runtime.solvers",
    "EpsFn": "calibexport.runtime.solvers",
    "METHODS": "calibexport.runtime.solvers",
    "count_nfe": "calibexport.runtime.solvers",
    "singlestep_orders": "calibexport.runtime.solvers",
    "multistep_orders": "calibexport.runtime.solvers",
    "SPACINGS": "calibexport.runtime.spacing",
    "time_grid": "calibexport.runtime.spacing",
    "initial_noise": "calibexport.runtime.noise",
    "schedule_from_spec": "calibexport.runtime.schedule",
    "DiscreteVPSchedule": "calibexport.runtime.schedule",
    "LinearVPSchedule": "calibexport.runtime.schedule",
    "load_eta_table": "calibexport.runtime.eta_table",
    "EtaTable": "calibexport.runtime.eta_table",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    # Submodules load on first use, so importing one part never pulls in the others.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calibexport.runtime' has no attribute {name!r}")
