"""``calibexport evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from calibexport.cli.app import CONFIG_HELP, MODEL_HELP, WEIGHTS_HELP, app, user_errors


@app.command()
@user_errors
def evaluate(
    model: Path = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    eta: Path = typer.Option(..., "--eta", "-e", help="eta table (.npy) estimated for the model."),
    out: Path = typer.Option(
        ..., "--out", "-o",
        help="Output folder: results.json, results.md, fd_vs_nfe.png and cached samples.",
    ),
    data: str = typer.Option(
        "digits:all", "--data", "-d",
        help="Reference images for the Frechet distance: a folder, a .npy/.npz array or digits.",
    ),
    orders: str = typer.Option("1,2,3", help="Solver orders, comma-separated."),
    nfe: str = typer.Option("10,15,20,25,30,35,40", help="Requested NFE values, comma-separated."),
    settings: str = typer.Option(
        "fixed,fast",
        help="Order allocations: fixed (NFE // order steps of one order) and/or fast.",
    ),
    seeds: str = typer.Option("0,1,2", help="Noise seeds, comma-separated; one sample set each."),
    variants: str = typer.Option(
        "uncalibrated,calibrated", help="Model variants to sample: uncalibrated and/or calibrated."
    ),
    num_samples: int = typer.Option(
        500, "-n", "--num-samples", help="Samples per seed and config."
    ),
    batch_size: int = typer.Option(250, help="Images per network call."),
    backend: str = typer.Option(
        "onnxruntime", help="onnxruntime (an export of the network in --out) or torch."
    ),
    features: str = typer.Option(
        "classifier,pixel", help="Feature spaces: classifier (digits classifier) and/or pixel."
    ),
    classifier: Optional[Path] = typer.Option(
        None, help="Digits classifier weights (default: examples/digits/classifier.safetensors)."
    ),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the backend."),
    exporter: Optional[str] = typer.Option(
        None, help="torch ONNX exporter for the onnxruntime backend: dynamo (default) or "
        "torchscript."
    ),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    weights: str = typer.Option("ema", "--weights", help=WEIGHTS_HELP),
    allow_mismatch: bool = typer.Option(
        False, "--allow-mismatch", help="Accept an eta table estimated for other weights."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete cached samples made with other settings in --out."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan and the number of network evaluations only."
    ),
) -> None:
    """Compare sample quality with and without calibration over solver orders and NFE.

    Writes a table in the layout of the calibration paper (Frechet distance per order and NFE,
    mean and standard error over seeds) as markdown and JSON, and a plot against NFE. Run it
    under torchrun to share the sampling between ranks.
    """
    from calibexport.evaluation.distributed import rank_context
    from calibexport.evaluation.evaluate import EvaluationOptions, ModelInputs, evaluate_model
    from calibexport.evaluation.plan import parse_int_list, parse_settings, unique_sample_sets

    options = EvaluationOptions(
        settings=parse_settings(settings), orders=parse_int_list(orders, "orders"),
        nfes=parse_int_list(nfe, "nfe"), seeds=parse_int_list(seeds, "seeds"),
        variants=tuple(item.strip() for item in variants.split(",") if item.strip()),
        num_samples=num_samples, batch_size=batch_size,
    )
    spaces = tuple(item.strip() for item in features.split(",") if item.strip())
    if dry_run:
        configs = options.configs()
        typer.echo(
            f"{len(configs)} configs, {len(unique_sample_sets(configs))} distinct sample sets, "
            f"{len(options.calibrated_flags())} variants, {len(options.seeds)} seeds, "
            f"{num_samples} samples: "
            f"{options.network_evaluations()} network evaluations."
        )
        return
    inputs = ModelInputs(model=model, eta=eta, data=data, config=config, weights=weights,
                         allow_mismatch=allow_mismatch)
    context = rank_context()
    try:
        evaluate_model(inputs, options, out, backend=backend, feature_spaces=spaces,
                       classifier=classifier, threads=threads, exporter=exporter,
                       overwrite=overwrite,
                       context=context)
    finally:
        context.close()
    if context.is_main:
        outputs = ("results.md", "results.json", "fd_vs_nfe.png")
        names = ", ".join(str(out / name) for name in outputs)
        typer.echo(f"Wrote {names}")
