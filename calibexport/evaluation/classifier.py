"""A small CNN classifier of 16x16 digits whose penultimate layer gives features for the
Frechet distance, as the Inception network does for FID on natural images.

The classifier takes images in [-1, 1] (the diffusion model's range) at ``RESOLUTION`` x
``RESOLUTION``. Weights are saved as safetensors with a JSON sidecar that records the
architecture, the training settings and the held-out accuracy.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibexport.errors import CalibexportError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

RESOLUTION = 16
NUM_CLASSES = 10
#: Width of the penultimate layer, the feature dimension.
FEATURE_DIM = 64
#: Default location of the classifier that ships with the digits example.
DEFAULT_CLASSIFIER = Path("examples/digits/classifier.safetensors")
SIDECAR_FORMAT = "calibexport.digits_classifier"


def _build_module() -> torch.nn.Module:
    import torch
    from torch import nn

    class DigitsClassifier(nn.Module):
        """Two 3x3 conv layers with 2x2 max pooling, a 64-unit hidden layer, 10 logits."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.hidden = nn.Linear(32 * (RESOLUTION // 4) ** 2, FEATURE_DIM)
            self.logits = nn.Linear(FEATURE_DIM, NUM_CLASSES)

        def features(self, x: torch.Tensor) -> torch.Tensor:
            """Return the penultimate activations [B, FEATURE_DIM] (after ReLU)."""
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            return torch.relu(self.hidden(x.flatten(1)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits(self.features(x))

    return DigitsClassifier()


def digits_labels(split: str) -> np.ndarray:
    """Return the class labels of the digits ``split``, in the order ``load_digits`` returns.

    The split is the fixed permutation of ``calibexport.calibration_tables.data``: the first
    ``DIGITS_HOLDOUT`` permuted images are ``test`` and the rest ``train``.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    from calibexport.calibration_tables.data import DIGITS_HOLDOUT, DIGITS_SPLIT_SEED

    target = sklearn_digits().target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(target))
    if split == "train":
        return target[order[DIGITS_HOLDOUT:]]
    if split == "test":
        return target[order[:DIGITS_HOLDOUT]]
    if split == "all":
        return target
    raise CalibexportError(f"unknown digits split {split!r}; valid: train, test, all.")


def _shift_batch(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background (-1)."""
    import torch

    if max_shift == 0:
        return images
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    shifts = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    size = images.shape[-1]
    shifted = torch.empty_like(images)
    # One slice per distinct (dy, dx) pair instead of one per image.
    for dy, dx in torch.unique(shifts, dim=0).tolist():
        chosen = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
        shifted[chosen] = padded[chosen, :, dy : dy + size, dx : dx + size]
    return shifted


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_shift: int = 1,
    seed: int = 0,
) -> torch.nn.Module:
    """Train the classifier with Adam on images [N, 1, 16, 16] in [-1, 1] and labels [N].

    Each batch is augmented by random translations of up to ``max_shift`` pixels, so features
    do not hinge on exact pixel positions. Returns the module in eval mode.
    """
    import torch

    _check_images(images)
    if len(labels) != len(images):
        raise CalibexportError(f"got {len(images)} images but {len(labels)} labels.")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    module = _build_module()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    start = time.perf_counter()
    module.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        total = 0.0
        for first in range(0, len(order), batch_size):
            index = order[first : first + batch_size]
            x = _shift_batch(x_all[index], generator, max_shift)
            loss = torch.nn.functional.cross_entropy(module(x), y_all[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        schedule.step()
        logger.debug("epoch %d/%d loss %.4f", epoch + 1, epochs, total / len(order))
    logger.info("Trained the digits classifier in %.1fs (%d epochs).", time.perf_counter() - start,
                epochs)
    return module.eval()


def _check_images(images: np.ndarray) -> None:
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[1:] != (1, RESOLUTION, RESOLUTION):
        raise CalibexportError(
            f"the digits classifier takes images [N, 1, {RESOLUTION}, {RESOLUTION}], got shape "
            f"{list(shape)}; evaluate it only on 16x16 single-channel data."
        )


def _batched(module: torch.nn.Module, images: np.ndarray, batch_size: int, head: str) -> np.ndarray:
    import torch

    _check_images(images)
    outputs = []
    with torch.inference_mode():
        for first in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[first : first + batch_size],
                                                      dtype=np.float32))
            outputs.append(getattr(module, head)(x).double().numpy())
    return np.concatenate(outputs, axis=0)


def classifier_features(module: torch.nn.Module, images: np.ndarray,
                        batch_size: int = 500) -> np.ndarray:
    """Return the penultimate-layer features [N, FEATURE_DIM] (float64) of images in [-1, 1]."""
    return _batched(module, images, batch_size, "features")


def accuracy(module: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Return the fraction of ``images`` whose predicted class equals ``labels``."""
    logits = _batched(module, images, 500, "forward")
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def save_classifier(module: torch.nn.Module, path: str | Path, record: dict[str, Any]) -> None:
    """Write the weights to ``path`` (safetensors) and ``record`` to the same name with .json."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in module.state_dict().items()}
    save_file(state, str(path))
    sidecar = {"format": SIDECAR_FORMAT, "resolution": RESOLUTION, "feature_dim": FEATURE_DIM,
               **record}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")


def load_classifier(path: str | Path) -> torch.nn.Module:
    """Load classifier weights saved by ``save_classifier``; the module is in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CalibexportError(
            f"classifier weights {path} not found; train them with "
            "`python examples/train_classifier.py` or pass --classifier PATH."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CalibexportError(f"cannot read classifier weights {path}: {error}.") from error
    module = _build_module()
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise CalibexportError(
            f"{path} does not contain digits classifier weights ({first_line}); pass the file "
            "written by examples/train_classifier.py."
        ) from error
    return module.eval()
