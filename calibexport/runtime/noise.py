"""Initial noise seeded per sample, so a sample does not depend on the batch it ran in."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calibexport.errors import CalibexportError


def initial_noise(
    seed: int, indices: Sequence[int] | np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Draw x_T ~ N(0, I) for the samples ``indices``: float32 [len(indices), *shape].

    Sample ``i`` comes from ``np.random.default_rng(np.random.SeedSequence([seed, i]))``, so it is
    the same whichever batch contains it and wherever it sits in that batch.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CalibexportError(f"seed={seed!r} is invalid; use a non-negative integer.")
    index_array = np.asarray(indices)
    integer = np.issubdtype(index_array.dtype, np.integer)
    if index_array.ndim != 1 or (index_array.size and not integer):
        raise CalibexportError(
            f"indices must be a 1-D sequence of integers, got {index_array.dtype} with shape "
            f"{list(index_array.shape)}."
        )
    if index_array.size and index_array.min() < 0:
        raise CalibexportError(
            f"indices must be non-negative, got {int(index_array.min())}; sample indices "
            f"count from 0."
        )
    shape = tuple(int(n) for n in shape)
    noise = np.empty((len(index_array), *shape), dtype=np.float32)
    for row, index in enumerate(index_array.tolist()):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), index]))
        rng.standard_normal(shape, dtype=np.float32, out=noise[row])
    return noise
