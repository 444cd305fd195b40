"""Train the digits classifier whose penultimate layer gives the features of `calibexport evaluate`.

Run from the repository root (under a minute on 2 CPU cores):

    .venv/bin/python examples/train_classifier.py --out examples/digits/classifier.safetensors

It trains on the digits train split (1617 images, 16x16, [-1, 1]) and records the accuracy on
the 180 held-out test images in the JSON sidecar. The result is deterministic for a given seed,
thread count and torch build.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from calibexport.calibration_tables.data import load_digits
from calibexport.evaluation.classifier import (
    RESOLUTION,
    accuracy,
    digits_labels,
    save_classifier,
    train_classifier,
)

logger = logging.getLogger("train_classifier")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("examples/digits/classifier.safetensors"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    train_images, train_labels = load_digits("train", RESOLUTION), digits_labels("train")
    test_images, test_labels = load_digits("test", RESOLUTION), digits_labels("test")
    module = train_classifier(train_images, train_labels, epochs=args.epochs, seed=args.seed)

    record = {
        "data": "scikit-learn digits, train split (1617 images), 16x16 bilinear, [-1, 1]",
        "epochs": args.epochs,
        "seed": args.seed,
        "augmentation": "random translation by up to 1 pixel",
        "train_accuracy": round(accuracy(module, train_images, train_labels), 4),
        "test_accuracy": round(accuracy(module, test_images, test_labels), 4),
        "test_images": int(len(test_images)),
        "parameters": sum(p.numel() for p in module.parameters()),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    save_classifier(module, args.out, record)
    logger.info("Saved %s: test accuracy %.4f on %d images. Done.", args.out,
                record["test_accuracy"], record["test_images"])


if __name__ == "__main__":
    main()
