"""``calibexport validate``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from calibexport.cli.app import (
    CONFIG_HELP,
    EXIT_PARITY_FAILED,
    MODEL_HELP,
    WEIGHTS_HELP,
    app,
    user_errors,
)


@app.command()
@user_errors
def validate(
    artifact: Path = typer.Option(
        ..., "--artifact", "-a", help="Artifact directory written by build."
    ),
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help="Source checkpoint (default: the one in the manifest)."
    ),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    tolerance: str = typer.Option("fp32-cpu", "--tolerance", help="Parity tolerance preset."),
    report_dir: Optional[Path] = typer.Option(
        None, "--report-dir", help="Where to write parity.* (default: the artifact directory)."
    ),
) -> None:
    """Check ONNX Runtime against the PyTorch calibrated model; exit 1 when a check fails."""
    from calibexport.models.loaders import load_model
    from calibexport.validate.run import validate_directory

    loaded = None
    if model is not None:
        loaded = load_model(model, config=config, weights=weights or "ema")
    report = validate_directory(artifact, loaded=loaded, tolerance_preset=tolerance,
                                report_dir=report_dir)
    typer.echo((Path(report_dir or artifact) / "parity.md").read_text())
    if report["status"] != "PASSED":
        raise typer.Exit(EXIT_PARITY_FAILED)
