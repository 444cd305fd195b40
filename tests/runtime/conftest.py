"""Fixtures for the runtime tests: the DDPM schedule and the exact Gaussian problem."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from calibexport.runtime.schedule import DiscreteVPSchedule, VPSchedule
from calibexport.testing.gaussian import GaussianData

EpsFactory = Callable[..., Callable[[np.ndarray, np.ndarray], np.ndarray]]


@pytest.fixture
def ddpm_schedule() -> DiscreteVPSchedule:
    """DDPM linear betas 1e-4..0.02 on 1000 steps."""
    return DiscreteVPSchedule.linear()


@pytest.fixture
def gaussian() -> GaussianData:
    """Two-channel Gaussian data with per-channel mean and standard deviation."""
    return GaussianData(
        mean=np.array([0.5, -0.3]).reshape(2, 1, 1), std=np.array([0.5, 1.0]).reshape(2, 1, 1)
    )


@pytest.fixture
def exact_eps() -> EpsFactory:
    """Build eps_fn(x, t) returning the exact noise prediction (plus an optional offset)."""

    def build(
        schedule: VPSchedule, data: GaussianData, offset: np.ndarray | float = 0.0
    ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        def eps_fn(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            alpha = schedule.alpha(t).reshape(-1, 1, 1, 1)
            sigma = schedule.sigma(t).reshape(-1, 1, 1, 1)
            return (data.eps(x, alpha, sigma) + offset).astype(x.dtype)

        return eps_fn

    return build
