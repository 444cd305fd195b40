"""``calibexport fold``: graft the eta subtraction onto an existing ONNX network, without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from calibexport.cli.app import app, user_errors


@app.command()
@user_errors
def fold(
    onnx_path: Path = typer.Option(
        ..., "--onnx", help="Uncalibrated network export: inputs x [B, C, H, W] and a timestep."
    ),
    eta: Path = typer.Option(..., "--eta", "-e", help="eta table (.npy, float32 [T, C, H, W])."),
    out: Path = typer.Option(..., "--out", "-o", help="Calibrated ONNX file to write."),
    timestep_input: Optional[str] = typer.Option(
        None, "--timestep-input",
        help="Name of the timestep input (default: the only rank-0/1 numeric input).",
    ),
    output: Optional[str] = typer.Option(
        None, "--output", help="Name of the output to calibrate (default: the only output)."
    ),
    prediction_type: str = typer.Option(
        "eps", "--prediction-type", help="What the network predicts: eps, x0 or v."
    ),
    schedule: Optional[Path] = typer.Option(
        None, "--schedule", help="JSON schedule spec for x0/v networks (default: from eta.json "
        "or the ONNX metadata).",
    ),
    optimize: bool = typer.Option(
        True, "--optimize/--no-optimize", help="Fold constants and infer shapes in the result."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Fold an eta table into an ONNX noise network: output minus eta[t] in the network's units."""
    from calibexport.exporter.fold_file import fold_file

    result = fold_file(onnx_path, eta, out, timestep_input=timestep_input, output=output,
                       prediction_type=prediction_type,
                       schedule=str(schedule) if schedule is not None else None,
                       optimize=optimize, overwrite=overwrite)
    typer.echo(f"Calibrated {result.prediction_type} network written to {result.out} "
               f"(timestep input {result.timestep_input!r}, {result.timestep_dtype}, "
               f"{result.num_rows} rows).")
