"""``calibexport calibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from calibexport.cli.app import CONFIG_HELP, MODEL_HELP, WEIGHTS_HELP, app, user_errors


@app.command()
@user_errors
def calibrate(
    model: Path = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Images: a folder, a .npy/.npz array, or 'digits' (also digits:train, digits:test, "
        "digits:all).",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output table eta.npy; the sidecar eta.json is written beside it."
    ),
    num_samples: int = typer.Option(
        64, "--num-samples", "-n",
        help="Network evaluations per timestep (the pilot count with --target-se).",
    ),
    estimator: Optional[str] = typer.Option(
        None, help="naive, control_variate, regression, regression_pixel or antithetic "
        "(default: control_variate); docs/calibration.md compares them.",
    ),
    target_se: Optional[float] = typer.Option(
        None, "--target-se", help="Sample until every row's relative standard error "
        "||SE_k|| / ||eta_k|| is below this value (for example 0.2), giving noisier rows more "
        "samples.",
    ),
    max_samples: Optional[int] = typer.Option(
        None, "--max-samples", help="Largest number of evaluations per timestep with "
        "--target-se (default 16384).",
    ),
    common_noise: bool = typer.Option(
        False, "--common-noise", help="Reuse the same draws (x0, e) at every timestep, which "
        "correlates the errors of neighbouring rows (per-row standard errors are unchanged).",
    ),
    batch_size: int = typer.Option(256, help="Network evaluations per batch."),
    seed: int = typer.Option(0, help="Random seed for data draws and noise."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: str = typer.Option("ema", "--weights", help=WEIGHTS_HELP),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="Evaluate shard I of N (I/N, 1-based) and write its partial sums "
        "(OUT.shard-I-of-N.npz beside an OUT.npy, or OUT itself if it ends in .npz); combine "
        "all shards with `calibexport merge`."
    ),
) -> None:
    """Estimate eta[t] = E[eps_theta(x_t, t)] for every model timestep, with standard errors."""
    from calibexport.calibration_tables.calibrate import calibrate_to_file

    calibrate_to_file(model=model, data=data, out=out, num_samples=num_samples,
                      estimator=estimator, batch_size=batch_size, seed=seed, config=config,
                      weights=weights, shard=shard, common_noise=common_noise,
                      target_se=target_se, max_samples=max_samples)
