"""``calibexport compress``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from calibexport.cli.app import app, user_errors


@app.command()
@user_errors
def compress(
    eta: Path = typer.Option(..., "--eta", "-e", help="Dense eta table (eta.npy) to compress."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Compressed table (.npz); its sidecar .json is written beside it."
    ),
    kind: str = typer.Option(
        "knots", "--kind", help="knots (rows at chosen times, linear in between) or lowrank "
        "(truncated SVD in time)."
    ),
    max_error: Optional[float] = typer.Option(
        None, "--max-error", help="Maximum absolute difference from the full table, in eps units."
    ),
    num_knots: Optional[int] = typer.Option(
        None, "--num-knots", help="Maximum number of knots (knots only)."
    ),
    rank: Optional[int] = typer.Option(None, "--rank", help="Maximum rank (lowrank only)."),
) -> None:
    """Compress an eta table to knots or a low rank in time; build folds the result as it is."""
    from calibexport.calibration_tables.compress import compress_table_file

    metadata = compress_table_file(eta, out, kind=kind, max_error=max_error,
                                   num_knots=num_knots, rank=rank)
    summary = metadata["compression"]
    typer.echo(f"Wrote {out}: {kind}, max abs error {summary['max_abs_error']:.3g}, "
               f"{summary['compressed_bytes']} of {summary['full_bytes']} bytes "
               f"({100 * summary['bytes_ratio']:.1f}%).")
