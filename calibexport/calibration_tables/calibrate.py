"""``calibexport calibrate``: load a model and data, estimate eta, write eta.npy and eta.json."""

from __future__ import annotations

import logging
from pathlib import Path

from calibexport.calibration_tables.data import describe_data, load_data
from calibexport.calibration_tables.estimate import estimate_eta
from calibexport.calibration_tables.table_io import build_sidecar, save_eta_table
from calibexport.models.eps_adapter import as_eps_network
from calibexport.models.loaders import load_model
from calibexport.runtime.schedule import schedule_from_spec

logger = logging.getLogger(__name__)


def calibrate_to_file(
    *,
    model: Path,
    data: str,
    out: Path,
    num_samples: int,
    estimator: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    config: str | None = None,
    weights: str = "ema",
    progress: bool = True,
) -> dict:
    """Estimate the eta table of ``model`` on ``data`` and save it; return the sidecar metadata."""
    loaded = load_model(model, config=config, weights=weights)
    channels, resolution, _ = loaded.spec.image_shape
    images = load_data(data, channels=channels, resolution=resolution)
    schedule = schedule_from_spec(loaded.spec.schedule)
    # eta is estimated in eps units whatever the network predicts.
    network = as_eps_network(loaded.module, loaded.spec.prediction_type, schedule)
    estimate = estimate_eta(
        network,
        schedule,
        images,
        num_samples=num_samples,
        estimator=estimator,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    metadata = build_sidecar(
        estimate,
        schedule=schedule,
        data_description=describe_data(data, images),
        weights_sha256=loaded.weights_sha256,
        extra={"model": loaded.source},
    )
    save_eta_table(out, estimate.eta, metadata)
    return metadata
