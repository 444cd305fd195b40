"""Gaussian data: the one case where the noise prediction and the ODE flow are known exactly.

For data x0 ~ N(mean, std^2) independently per element, the VP marginal is
x_t ~ N(alpha_t mean, alpha_t^2 std^2 + sigma_t^2), so the exact noise prediction is

    eps*(x_t, t) = sigma_t (x_t - alpha_t mean) / (alpha_t^2 std^2 + sigma_t^2)

and the probability-flow ODE keeps the standardised value (x_t - alpha_t mean) / s_t fixed, with
s_t = sqrt(alpha_t^2 std^2 + sigma_t^2). ``mean`` and ``std`` broadcast against [B, C, H, W]
(for example shape [C, 1, 1] for per-channel values).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GaussianData:
    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return (self.mean + self.std * rng.standard_normal(shape)).astype(np.float32)

    def marginal_std(self, alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        return np.sqrt(alpha**2 * self.std**2 + sigma**2)

    def eps(self, x: np.ndarray, alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """Exact noise prediction; ``alpha`` and ``sigma`` broadcast against x (e.g. [B, 1, 1, 1])."""
        return sigma * (x - alpha * self.mean) / (alpha**2 * self.std**2 + sigma**2)

    def flow(
        self, x_s: np.ndarray, alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float
    ) -> np.ndarray:
        """Exact probability-flow ODE map from time s to time t."""
        scale = self.marginal_std(alpha_t, sigma_t) / self.marginal_std(alpha_s, sigma_s)
        return alpha_t * self.mean + scale * (x_s - alpha_s * self.mean)
