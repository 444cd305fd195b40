"""``calibexport build``."""

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
def build(
    model: Path = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    eta: Path = typer.Option(..., "--eta", "-e", help="eta table (.npy, float32 [T, C, H, W])."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Artifact directory (default: build/<model file stem>)."
    ),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: str = typer.Option("ema", "--weights", help=WEIGHTS_HELP),
    exporter: Optional[str] = typer.Option(
        None, help="torch ONNX exporter: dynamo or torchscript (default: dynamo, or torchscript "
        "for TorchScript archives). Recorded in the manifest.",
    ),
    opset: Optional[int] = typer.Option(
        None, help="ONNX opset (default: the exporter's). Recorded in the manifest."
    ),
    precision: str = typer.Option(
        "fp32", "--precision", help="fp32, or fp16 with the timestep embedding, normalization, "
        "softmax and eta subtraction kept in fp32 (a NaN/Inf scan over all timesteps runs).",
    ),
    optimize: bool = typer.Option(
        True, "--optimize/--no-optimize", help="Fold constants and infer shapes in the graph."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing artifact directory."
    ),
    validate: bool = typer.Option(
        True, "--validate/--no-validate", help="Run parity checks after the build."
    ),
    allow_mismatch: bool = typer.Option(
        False, "--allow-mismatch", help="Accept an eta table estimated for other weights."
    ),
    tolerance: Optional[str] = typer.Option(
        None, "--tolerance", help="Parity tolerance preset: fp32-cpu, fp32-gpu or fp16 (default: fp16 for "
        "fp16 builds, else fp32-cpu).",
    ),
    batch_sizes: Optional[str] = typer.Option(
        None, "--batch-sizes", help="TensorRT optimization profile MIN,OPT,MAX: the engine "
        "accepts batch sizes MIN..MAX and is tuned for OPT (default: 1,8,64)."
    ),
    engine: bool = typer.Option(
        True, "--engine/--no-engine", help="Build a TensorRT engine where TensorRT 10+ and an "
        "NVIDIA GPU are present."
    ),
    engine_cache: Optional[Path] = typer.Option(
        None, "--engine-cache", help="Directory of built TensorRT engines, reused when every "
        "engine field (GPU, TensorRT, batch sizes, ONNX, eta) matches."
    ),
) -> None:
    """Export the network to ONNX with eta folded in, write the manifest and validate."""
    from calibexport.exporter.build import BuildOptions, ParityFailed, build_artifact
    from calibexport.exporter.engine_cache import BatchProfile

    if batch_sizes is not None:
        # Reject a malformed profile before the export, which can take minutes.
        BatchProfile.parse(batch_sizes)

    out = out or Path("build") / model.stem
    options = BuildOptions(model=model, eta=eta, out=out, config=config, weights=weights,
                           exporter=exporter, opset=opset, overwrite=overwrite, validate=validate,
                           allow_mismatch=allow_mismatch, tolerance_preset=tolerance,
                           precision=precision, optimize=optimize,
                           batch_sizes=batch_sizes, engine=engine, engine_cache=engine_cache)
    try:
        result = build_artifact(options)
    except ParityFailed as failure:
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(EXIT_PARITY_FAILED) from None
    if result.report is not None:
        typer.echo((out / "parity.md").read_text())
    typer.echo(f"Artifact written to {out}")
