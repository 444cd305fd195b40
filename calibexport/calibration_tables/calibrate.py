"""``calibexport calibrate``: load a model and data, estimate eta, write eta.npy and eta.json."""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

from calibexport.calibration_tables import distributed
from calibexport.calibration_tables.data import describe_data, load_data
from calibexport.calibration_tables.estimate import estimate_eta
from calibexport.calibration_tables.table_io import build_sidecar, save_eta_table
from calibexport.errors import CalibexportError
from calibexport.models.eps_adapter import as_eps_network
from calibexport.models.loaders import load_model
from calibexport.runtime.eta_table import resolve_table_path
from calibexport.runtime.schedule import schedule_from_spec

logger = logging.getLogger(__name__)


def check_output_folder(folder: Path) -> None:
    """Raise before any estimation when files cannot be created in ``folder``.

    Nothing is created here: the nearest existing ancestor must be a writable directory.
    """
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CalibexportError(
            f"cannot write the output to {folder}: {existing} is not a writable directory; "
            "choose another --out."
        )


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
    shard: str | None = None,
    common_noise: bool = False,
    target_se: float | None = None,
    max_samples: int | None = None,
) -> dict:
    """Estimate the eta table of ``model`` on ``data`` and save it; return the sidecar metadata.

    ``shard`` ``I/N`` evaluates one shard and writes its partial sums instead (see
    ``calibexport.calibration_tables.distributed``); under ``torchrun`` the ranks share the work
    and rank 0 writes the table. ``common_noise``, ``target_se`` and ``max_samples`` are passed
    to ``estimate_eta``; a shard cannot sample to a target, because that needs all rows' sums.
    """
    if shard is not None:
        # A shard writes a .npz file, which resolve_table_path would take for a folder, so a
        # rerun that replaces an existing shard file was rejected.
        shard_path = distributed.shard_file_path(out, distributed.Shard.parse(shard))
        if shard_path.is_dir():
            raise CalibexportError(
                f"cannot write the shard to {shard_path}: it is a directory; pass a file name "
                "ending in .npz or the folder that should contain the shard file."
            )
        check_output_folder(shard_path.parent)
    else:
        check_output_folder(resolve_table_path(out).parent)
    if str(data).split(":")[0] != "digits" and not Path(data).exists():
        raise CalibexportError(
            f"data source '{data}' not found; pass a folder of images, a .npy/.npz file or "
            "'digits' (also digits:train, digits:test, digits:all)."
        )
    loaded = load_model(model, config=config, weights=weights)
    channels, resolution, _ = loaded.spec.image_shape
    images = load_data(data, channels=channels, resolution=resolution)
    schedule = schedule_from_spec(loaded.spec.schedule)
    # eta is estimated in eps units whatever the network predicts.
    network = as_eps_network(loaded.module, loaded.spec.prediction_type, schedule)
    env = distributed.torchrun_env()
    if shard is not None:
        if env is not None:
            raise CalibexportError("--shard cannot run under torchrun, which already splits the "
                                   "work; drop --shard or start a single process.")
        if target_se is not None:
            raise CalibexportError("--target-se needs the sums of all shards after every round; "
                                   "drop --shard, or run under torchrun instead.")
        return distributed.calibrate_shard_to_file(
            loaded, network, images, schedule, describe_data(data, images), out=out,
            shard=distributed.Shard.parse(shard), num_samples=num_samples, estimator=estimator,
            batch_size=batch_size, seed=seed, progress=progress, common_noise=common_noise)
    estimate_function = estimate_eta if env is None else partial(
        distributed.estimate_eta_torchrun, env=env)
    estimate = estimate_function(
        network,
        schedule,
        images,
        num_samples=num_samples,
        estimator=estimator,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        common_noise=common_noise,
        target_se=target_se,
        max_samples=max_samples,
    )
    metadata = build_sidecar(
        estimate,
        schedule=schedule,
        data_description=describe_data(data, images),
        weights_sha256=loaded.weights_sha256,
        extra={"model": loaded.source},
    )
    if env is None or env.rank == 0:
        save_eta_table(out, estimate.eta, metadata)
    return metadata
