"""``calibexport merge``."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from calibexport.cli.app import app, user_errors


@app.command()
@user_errors
def merge(
    shards: List[Path] = typer.Argument(
        ..., help="Partial-sum files of every shard of one run (calibrate --shard I/N)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output table eta.npy; the sidecar eta.json is written beside it."
    ),
) -> None:
    """Add the partial sums of all shards and write the table a single process would write."""
    from calibexport.calibration_tables.distributed import merge_to_file

    metadata = merge_to_file(list(shards), out)
    typer.echo(f"Merged {len(shards)} shards into {out} (eta sha256 "
               f"{metadata['eta_sha256'][:16]}...).")
