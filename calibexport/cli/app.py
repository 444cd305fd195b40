"""The ``calibexport`` command line (typer).

Exit codes: 0 success, 1 a parity check failed, 2 bad usage or input (the message is printed to
stderr without a traceback).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from calibexport import __version__
from calibexport.errors import CalibexportError

app = typer.Typer(
    name="calibexport",
    help="Calibrate diffusion noise-prediction networks, export them to ONNX with eta folded in, "
    "sample and validate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
logger = logging.getLogger("calibexport.cli")

EXIT_PARITY_FAILED = 1
EXIT_USAGE = 2


def _version(value: bool) -> None:
    if value:
        typer.echo(f"calibexport {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Print CalibexportError messages to stderr and exit 2, without a traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except CalibexportError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was installed at the output path.", err=True)
            raise typer.Exit(130) from None

    return wrapper


MODEL_HELP = "Checkpoint: NAME.safetensors (with NAME.json), a DDIM list checkpoint or a state_dict (.pt/.pth/.ckpt)."
CONFIG_HELP = "Architecture for .pt/.pth files: a preset (celeba64, cifar10, digits), a DDIM YAML or a JSON config."
WEIGHTS_HELP = "Which weights of a DDIM list checkpoint to use: ema or model."


@app.command()
@user_errors
def calibrate(
    model: Path = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: str = typer.Option(..., "--data", "-d", help="Images: a folder, a .npy/.npz array, or 'digits'."),
    out: Path = typer.Option(..., "--out", "-o", help="Output table eta.npy; the sidecar eta.json is written beside it."),
    num_samples: int = typer.Option(64, "--num-samples", "-n", help="Monte Carlo samples per timestep."),
    estimator: Optional[str] = typer.Option(None, help="naive or control_variate (default: control_variate)."),
    batch_size: int = typer.Option(256, help="Network evaluations per batch."),
    seed: int = typer.Option(0, help="Random seed for data draws and noise."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: str = typer.Option("ema", "--weights", help=WEIGHTS_HELP),
) -> None:
    """Estimate eta[t] = E[eps_theta(x_t, t)] for every model timestep, with standard errors."""
    from calibexport.calibration_tables.calibrate import calibrate_to_file

    calibrate_to_file(model=model, data=data, out=out, num_samples=num_samples, estimator=estimator,
                      batch_size=batch_size, seed=seed, config=config, weights=weights)


@app.command()
@user_errors
def build(
    model: Path = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    eta: Path = typer.Option(..., "--eta", "-e", help="eta table (.npy, float32 [T, C, H, W])."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact directory (default: build/<model name>)."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: str = typer.Option("ema", "--weights", help=WEIGHTS_HELP),
    exporter: Optional[str] = typer.Option(None, help="torch ONNX exporter: dynamo or torchscript."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default: the exporter's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing artifact directory."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Run parity checks after the build."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Accept eta estimated for other weights."),
    tolerance: str = typer.Option("fp32-cpu", "--tolerance", help="Parity tolerance preset."),
) -> None:
    """Export the network to ONNX with eta folded in, write the manifest and validate."""
    from calibexport.exporter.build import BuildOptions, ParityFailed, build_artifact

    out = out or Path("build") / model.stem
    options = BuildOptions(model=model, eta=eta, out=out, config=config, weights=weights, exporter=exporter,
                           opset=opset, overwrite=overwrite, validate=validate, allow_mismatch=allow_mismatch,
                           tolerance_preset=tolerance)
    try:
        result = build_artifact(options)
    except ParityFailed as failure:
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(EXIT_PARITY_FAILED) from None
    if result.report is not None:
        typer.echo((out / "parity.md").read_text())
    typer.echo(f"Artifact written to {out}")


@app.command()
@user_errors
def validate(
    artifact: Path = typer.Option(..., "--artifact", "-a", help="Artifact directory written by build."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Source checkpoint (default: from the manifest)."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    tolerance: str = typer.Option("fp32-cpu", "--tolerance", help="Parity tolerance preset."),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Where to write parity.* (default: ARTIFACT)."),
) -> None:
    """Check ONNX Runtime against the PyTorch calibrated model; exit 1 when a check fails."""
    from calibexport.models.loaders import load_model
    from calibexport.validate.run import validate_directory

    loaded = None
    if model is not None:
        loaded = load_model(model, config=config, weights=weights or "ema")
    report = validate_directory(artifact, loaded=loaded, tolerance_preset=tolerance, report_dir=report_dir)
    typer.echo((Path(report_dir or artifact) / "parity.md").read_text())
    if report["status"] != "PASSED":
        raise typer.Exit(EXIT_PARITY_FAILED)


@app.command()
@user_errors
def sample(
    artifact: Path = typer.Option(..., "--artifact", "-a", help="Artifact directory written by build."),
    num_samples: int = typer.Option(64, "-n", "--num-samples", help="Number of images."),
    steps: int = typer.Option(20, help="Network evaluations (NFE)."),
    order: int = typer.Option(3, help="Solver order: 1, 2 or 3."),
    method: str = typer.Option("singlestep", help="singlestep, singlestep_fixed, multistep or ddim."),
    spacing: str = typer.Option("logSNR", help="Time steps: logSNR, time_uniform or time_quadratic."),
    seed: int = typer.Option(0, help="Noise seed; sample i depends only on (seed, i)."),
    batch_size: int = typer.Option(64, help="Images per backend call."),
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid; raw samples go to the same name .npz."),
) -> None:
    """Sample images with DPM-Solver or DDIM from a built artifact (ONNX Runtime)."""
    from calibexport.imaging import save_grid_png
    from calibexport.runtime.sampler import Sampler

    with Sampler.from_artifact(artifact) as sampler:
        images = sampler.sample(num_samples, steps=steps, order=order, method=method, spacing=spacing, seed=seed,
                                batch_size=batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid_png(images, out)
    npz_path = out.with_suffix(".npz")
    settings = {"artifact": str(artifact), "steps": steps, "order": order, "method": method,
                "spacing": spacing, "seed": seed, "num_samples": num_samples}
    np_save_npz(npz_path, images, settings)
    typer.echo(f"Wrote {out} and {npz_path}")


def np_save_npz(path: Path, images: Any, settings: dict[str, Any]) -> None:
    import io

    import numpy as np

    from calibexport.exporter.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, samples=images, settings=np.array(json.dumps(settings)))
    atomic_write_bytes(path, buffer.getvalue())


def main() -> None:
    app()
