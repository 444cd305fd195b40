"""``calibexport validate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperCommand

from calibexport.cli.app import (
    CONFIG_HELP,
    EXIT_PARITY_FAILED,
    MODEL_HELP,
    WEIGHTS_HELP,
    app,
    user_errors,
)


# typer 0.2x ships its own copy of click; its UsageError is the base class of typer.BadParameter.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class OneLineUsageErrors(TyperCommand):
    """Print a command-line usage error as a single ``Error: ...`` line (exit code 2)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except _UsageError as error:
            # Without a context, click prints the message alone, without the usage lines.
            error.ctx = None
            raise


@app.command(cls=OneLineUsageErrors)
@user_errors
def validate(
    artifact: Path = typer.Option(
        ..., "--artifact", "-a", help="Artifact directory written by build."
    ),
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help=MODEL_HELP + " Default: the one in the manifest."
    ),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    tolerance: str = typer.Option(
        "auto", "--tolerance",
        help="Tolerance preset: fp32-cpu, fp32-gpu, fp16, or auto (from the model's input "
        "precision and --provider).",
    ),
    atol: List[str] = typer.Option(
        [], "--atol", metavar="[LEVEL=]VALUE",
        help="Override the absolute tolerance of every level, or of one level (evaluation, "
        "trajectory, samples) with LEVEL=VALUE. Repeatable.",
    ),
    rtol: List[str] = typer.Option(
        [], "--rtol", metavar="[LEVEL=]VALUE",
        help="Override the relative tolerance, as --atol does.",
    ),
    runs: Optional[str] = typer.Option(
        None, "--runs",
        help="Sampling runs compared step by step: full (every solver method and order, the "
        "default), quick (two runs) or METHOD:ORDER:NFE,... e.g. singlestep:3:20,ddim:1:10.",
    ),
    provider: str = typer.Option("cpu", "--provider", help="ONNX Runtime provider: cpu or cuda."),
    backend: str = typer.Option(
        "onnxruntime", "--backend",
        help="What to validate: onnxruntime (model.onnx) or tensorrt (model.plan, compared with "
        "PyTorch and with ONNX Runtime on the CPU; reports in REPORT_DIR/tensorrt-vs-*/).",
    ),
    tf32: bool = typer.Option(
        False, "--tf32/--no-tf32", help="Let the CUDA provider use TF32 (off by default)."
    ),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Noise seed of all inputs (default 0)."
    ),
    num_samples: Optional[int] = typer.Option(
        None, "--num-samples", help="Samples per sampling run (default 4)."
    ),
    max_rows: Optional[int] = typer.Option(
        None, "--max-rows",
        help="Evaluate every eta table row when the table has at most this many rows, else an "
        "evenly spaced grid of this many (default 1000).",
    ),
    report_dir: Optional[Path] = typer.Option(
        None, "--report-dir", help="Where to write parity.* (default: the artifact directory)."
    ),
    save_inputs: Optional[Path] = typer.Option(
        None, "--save-inputs", metavar="DIR",
        help="Write the model inputs and reference outputs in Polygraphy's JSON formats to DIR "
        "(inputs.json, outputs.json, iterations.json) for `polygraphy run --load-inputs`.",
    ),
    save_reference: Optional[Path] = typer.Option(
        None, "--save-reference", metavar="FILE.json",
        help="Also save the PyTorch reference inputs and outputs, for --reference elsewhere.",
    ),
    reference: Optional[Path] = typer.Option(
        None, "--reference", metavar="FILE.json",
        help="Compare with outputs saved by --save-reference (for example on a CPU host) "
        "instead of PyTorch.",
    ),
) -> None:
    """Check the ONNX model against its reference at three levels; exit 1 when a check fails.

    Writes parity.json, parity.md and parity.xml (JUnit) and prints parity.md. Exit codes: 0 all
    checks passed, 1 a parity check failed, 2 bad usage or input.
    """
    from calibexport.errors import CalibexportError
    from calibexport.validate.run import ValidateOptions, check_options, validate_directory

    options = ValidateOptions(
        tolerance_preset=tolerance, atol=list(atol), rtol=list(rtol), runs=runs,
        provider=provider, tf32=tf32, seed=seed, num_samples=num_samples, max_rows=max_rows,
        save_inputs=save_inputs, save_reference=save_reference, reference=reference,
    )
    check_options(options)
    if backend not in ("onnxruntime", "tensorrt"):
        raise CalibexportError(f"unknown backend {backend!r}; valid backends: onnxruntime, "
                               "tensorrt.")
    loaded: Any = None
    if reference is not None and (model, config, weights) != (None, None, None):
        raise CalibexportError("--model, --config and --weights cannot be combined with "
                               "--reference, because no PyTorch model is used; drop them.")
    if model is not None:
        from calibexport.models.loaders import load_model

        loaded = load_model(model, config=config, weights=weights or "ema")
    if backend == "tensorrt":
        from calibexport.exporter.tensorrt_engine import validate_tensorrt_artifact

        validation = validate_tensorrt_artifact(artifact, loaded=loaded, options=options,
                                                report_dir=report_dir)
        typer.echo(validation.markdown(), nl=False)
        if not validation.passed:
            raise typer.Exit(EXIT_PARITY_FAILED)
        return
    report = validate_directory(artifact, loaded=loaded, report_dir=report_dir, options=options)
    typer.echo((Path(report_dir or artifact) / "parity.md").read_text(), nl=False)
    if report["status"] != "PASSED":
        raise typer.Exit(EXIT_PARITY_FAILED)
