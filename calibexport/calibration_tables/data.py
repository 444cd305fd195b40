"""Data sources for eta estimation: image folders, .npy/.npz arrays and scikit-learn's digits.

Every source returns float32 images ``[N, C, H, W]`` scaled to [-1, 1], the range the
networks were trained on.
"""

from __future__ import annotations

import numpy as np

# Fixed split of scikit-learn's 1797 digits: the demo model trains on the first part of this
# permutation and held-out checks use the rest.
DIGITS_SPLIT_SEED = 20231
DIGITS_HOLDOUT = 180


def load_digits(split: str = "train", resolution: int = 16) -> np.ndarray:
    """Return scikit-learn's handwritten digits as [N, 1, resolution, resolution] in [-1, 1].

    The 8x8 images (values 0..16) are upsampled bilinearly. ``split`` is ``train`` (1617
    images), ``test`` (the 180 held-out images) or ``all``.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sklearn_digits

    from calibexport.errors import CalibexportError

    if split not in ("train", "test", "all"):
        raise CalibexportError(f"unknown digits split {split!r}; valid: train, test, all.")
    images = sklearn_digits().images.astype(np.float32) / 16.0
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    if split == "train":
        images = images[order[DIGITS_HOLDOUT:]]
    elif split == "test":
        images = images[order[:DIGITS_HOLDOUT]]
    tensor = torch.from_numpy(images)[:, None]
    if resolution != 8:
        tensor = F.interpolate(tensor, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (tensor.clamp(0.0, 1.0) * 2.0 - 1.0).numpy().astype(np.float32)
