"""``calibexport sample``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from calibexport.cli.app import app, user_errors


@app.command()
@user_errors
def sample(
    artifact: Path = typer.Option(
        ..., "--artifact", "-a", help="Artifact directory written by build."
    ),
    num_samples: int = typer.Option(64, "-n", "--num-samples", help="Number of images."),
    steps: int = typer.Option(20, help="Network evaluations (NFE)."),
    order: Optional[int] = typer.Option(
        None, help="Solver order: 1, 2 or 3 (default: 3, or 1 for ddim)."
    ),
    method: str = typer.Option(
        "singlestep", help="singlestep, singlestep_fixed, multistep or ddim."
    ),
    spacing: str = typer.Option(
        "logSNR", help="Time step spacing: logSNR, time_uniform or time_quadratic."
    ),
    seed: int = typer.Option(0, help="Noise seed; sample i depends only on (seed, i)."),
    batch_size: int = typer.Option(64, help="Images per backend call."),
    t_end: Optional[float] = typer.Option(
        None, "--t-end",
        help="Solver time where sampling stops, in (0, 1) (default: the schedule's, 1/N for a "
        "discrete schedule with N steps).",
    ),
    out: Path = typer.Option(
        Path("samples.png"), "--out", "-o",
        help="PNG grid; the raw samples go to the same name with .npz.",
    ),
) -> None:
    """Sample images with DPM-Solver or DDIM from a built artifact (ONNX Runtime)."""
    if order is None:
        order = 1 if method == "ddim" else 3
    from calibexport.imaging import save_grid_png
    from calibexport.runtime.sampler import Sampler

    with Sampler.from_artifact(artifact) as sampler:
        images = sampler.sample(num_samples, steps=steps, order=order, method=method,
                                spacing=spacing, seed=seed, batch_size=batch_size, t_end=t_end)
    save_grid_png(images, out)
    npz_path = out.with_suffix(".npz")
    settings = {"artifact": str(artifact), "steps": steps, "order": order, "method": method,
                "spacing": spacing, "seed": seed, "num_samples": num_samples, "t_end": t_end}
    save_samples_npz(npz_path, images, settings)
    typer.echo(f"Wrote {out} and {npz_path}")


def save_samples_npz(path: Path, images: np.ndarray, settings: dict[str, Any]) -> None:
    """Write raw samples and the settings that produced them (as JSON text) atomically."""
    from calibexport.exporter.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, samples=images, settings=np.array(json.dumps(settings)))
    atomic_write_bytes(path, buffer.getvalue())
