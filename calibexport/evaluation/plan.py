"""The grid of solver settings that ``calibexport evaluate`` compares, calibrated and not.

The default grid is the one of Pang et al., "On Calibrating Diffusion Probabilistic Models"
(NeurIPS 2023), Tables 1 and 2: singlestep DPM-Solver of orders 1, 2 and 3 at NFE 10 to 40 in
steps of 5. Two order allocations are offered:

* ``fixed`` (the paper's setting): ``NFE // order`` steps of one order, so the real NFE is
  ``order * floor(NFE / order)``, which the paper marks with a dagger where it differs;
* ``fast``: the fast allocation of DPM-Solver, which spends exactly NFE evaluations with a few
  lower-order steps at the end.

Where the two allocations give the same list of step orders (order 1 always, order 2 at even
NFE), they produce identical samples, so each distinct list is sampled once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from calibexport.errors import CalibexportError
from calibexport.runtime.solvers import count_nfe, singlestep_orders

#: Order allocation name -> solver method of ``calibexport.runtime.solvers.solve``.
SETTINGS = {"fixed": "singlestep_fixed", "fast": "singlestep"}
PAPER_ORDERS = (1, 2, 3)
PAPER_NFES = (10, 15, 20, 25, 30, 35, 40)


@dataclass(frozen=True)
class SolverConfig:
    """One cell of the table: an order allocation, a solver order and a requested NFE."""

    setting: str
    order: int
    nfe: int

    @property
    def method(self) -> str:
        return SETTINGS[self.setting]

    @property
    def actual_nfe(self) -> int:
        """Network evaluations the solver really spends (differs from ``nfe`` for ``fixed``)."""
        return count_nfe(self.nfe, self.order, self.method)

    @property
    def step_orders(self) -> tuple[int, ...]:
        return tuple(singlestep_orders(self.nfe, self.order, fixed=self.setting == "fixed"))

    @property
    def sample_key(self) -> str:
        """Name of the sample set: configs with the same step orders share their samples."""
        orders = self.step_orders
        runs = []
        for order in sorted(set(orders), reverse=True):
            runs.append(f"{order}x{orders.count(order)}")
        # The orders are non-increasing along the steps, so the counts determine the list.
        assert list(orders) == sorted(orders, reverse=True), orders
        return "singlestep-" + "-".join(runs)


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    """Parse a comma-separated list of integers such as ``10,15,20`` (option ``name``)."""
    try:
        values = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise CalibexportError(
            f"--{name} {text!r} is invalid; pass comma-separated integers such as 10,20,30."
        ) from None
    if not values:
        raise CalibexportError(f"--{name} is empty; pass at least one integer.")
    return values


def parse_settings(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of order allocations (``fixed``, ``fast``)."""
    settings = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in settings if item not in SETTINGS]
    if unknown or not settings:
        raise CalibexportError(
            f"--settings {text!r} is invalid; valid allocations: {', '.join(SETTINGS)}."
        )
    return settings


def plan_configs(
    settings: Sequence[str], orders: Sequence[int], nfes: Sequence[int]
) -> list[SolverConfig]:
    """Return the configs of every (setting, order, NFE), in that nesting order."""
    for order in orders:
        if order not in (1, 2, 3):
            raise CalibexportError(f"order {order} is invalid; valid orders: 1, 2, 3.")
    for nfe in nfes:
        if nfe < 1:
            raise CalibexportError(f"NFE {nfe} is invalid; it must be >= 1.")
    for setting in settings:
        if setting not in SETTINGS:
            raise CalibexportError(
                f"unknown setting {setting!r}; valid allocations: {', '.join(SETTINGS)}."
            )
    return [
        SolverConfig(setting, order, nfe)
        for setting in settings
        for order in orders
        for nfe in nfes
    ]


def unique_sample_sets(configs: Sequence[SolverConfig]) -> dict[str, SolverConfig]:
    """Map each distinct sample key to the first config that needs it, in plan order."""
    unique: dict[str, SolverConfig] = {}
    for config in configs:
        unique.setdefault(config.sample_key, config)
    return unique


def network_evaluations(
    configs: Sequence[SolverConfig], num_samples: int, seeds: int, variants: int = 2
) -> int:
    """Return the network evaluations needed for the distinct sample sets of ``variants``."""
    per_sample = sum(config.actual_nfe for config in unique_sample_sets(configs).values())
    return variants * per_sample * num_samples * seeds
