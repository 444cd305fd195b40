"""Train the bundled demo model: a small DDPM UNet on scikit-learn's handwritten digits.

Run from the repository root (about 15-20 minutes on 2 CPU cores):

    .venv/bin/python examples/train_digits.py --out examples/digits/digits.safetensors

The script is deterministic for a given seed, thread count and torch build. It writes the EMA
weights in calibexport's native format (safetensors plus a JSON config with the final loss).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from calibexport.calibration_tables.data import load_digits
from calibexport.models import DDPMUNet, get_preset
from calibexport.models.native_format import save_native
from calibexport.runtime.schedule import schedule_from_spec

logger = logging.getLogger("train_digits")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("examples/digits/digits.safetensors"))
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def learning_rate(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    spec = get_preset("digits")
    schedule = schedule_from_spec(spec.schedule)
    alpha, sigma = schedule.alpha_sigma_at_timesteps()
    alpha_t = torch.tensor(alpha, dtype=torch.float32)
    sigma_t = torch.tensor(sigma, dtype=torch.float32)

    data = torch.from_numpy(load_digits("train", spec.unet.resolution))
    model = DDPMUNet(spec.unet)
    ema = DDPMUNet(spec.unet)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)

    logger.info(
        "Training on %d digits images for %d steps, batch %d",
        len(data),
        args.steps,
        args.batch_size,
    )
    start = time.perf_counter()
    recent: list[float] = []
    for step in range(args.steps):
        # Denoising score matching: predict e from x_t = alpha_t x0 + sigma_t e at a random step.
        index = torch.randint(0, len(data), (args.batch_size,), generator=generator)
        x0 = data[index]
        timestep = torch.randint(0, schedule.num_timesteps, (args.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = alpha_t[timestep, None, None, None] * x0 + sigma_t[timestep, None, None, None] * noise
        loss = (model(x_t, timestep) - noise).pow(2).mean()

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), model.parameters()):
                ema_param.lerp_(param, 1.0 - args.ema_decay)

        recent.append(loss.item())
        if (step + 1) % 200 == 0 or step + 1 == args.steps:
            logger.info(
                "step %d/%d loss %.4f (mean of last %d) %.0fs",
                step + 1,
                args.steps,
                np.mean(recent),
                len(recent),
                time.perf_counter() - start,
            )
            final_loss = float(np.mean(recent))
            recent = []

    training = {
        "data": "scikit-learn digits, train split (1617 images), 16x16 bilinear, [-1, 1]",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "seed": args.seed,
        "final_loss": round(final_loss, 5),
        "final_loss_note": "mean eps MSE of the online weights over the last 200 steps",
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    save_native(args.out, ema.state_dict(), spec, extra=training)
    logger.info("Saved EMA weights to %s (final loss %.4f). Done.", args.out, final_loss)


if __name__ == "__main__":
    main()
