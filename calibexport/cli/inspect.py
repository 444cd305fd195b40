"""``calibexport inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from calibexport.cli.app import CONFIG_HELP, MODEL_HELP, WEIGHTS_HELP, app, user_errors


@app.command()
@user_errors
def inspect(
    table: Path = typer.Argument(..., help="eta.npy (or a compressed .npz, or their folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the plots and summary.md."),
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help=MODEL_HELP + " Given a model, the loss decrease of "
        "calibration is measured on --data and compared with (1/2)||eta_t||^2.",
    ),
    data: str = typer.Option("digits:test", "--data", "-d", help="Held-out images for the "
                             "loss check: a folder, a .npy/.npz array, or digits:test."),
    rows: Optional[str] = typer.Option(
        None, "--rows", help="Table rows to draw as heat maps, comma-separated (default: six "
        "rows from first to last).",
    ),
    points: int = typer.Option(20, "--points", help="Timesteps of the loss check."),
    repeats: int = typer.Option(2, "--repeats", help="Noise draws per held-out image and "
                                "timestep in the loss check."),
    seed: int = typer.Option(0, help="Random seed for the loss check's noise."),
    batch_size: int = typer.Option(256, help="Network evaluations per batch."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: str = typer.Option("ema", "--weights", help=WEIGHTS_HELP),
) -> None:
    """Plot an eta table and, with --model, check the loss decrease it predicts."""
    from calibexport.calibration_tables.inspect import inspect_table
    from calibexport.errors import CalibexportError

    heatmap_rows = None
    if rows is not None:
        try:
            heatmap_rows = [int(value) for value in rows.split(",") if value.strip()]
        except ValueError:
            raise CalibexportError(
                f"--rows must be comma-separated integers such as 0,250,999, got {rows!r}."
            ) from None
    inspect_table(table, out, model=model, data=data, config=config, weights=weights,
                  heatmap_rows=heatmap_rows, identity_points=points, repeats=repeats, seed=seed,
                  batch_size=batch_size)
    typer.echo((out / "summary.md").read_text(encoding="utf-8"), nl=False)
