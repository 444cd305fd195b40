"""eta estimation over several processes: ``calibrate --shard I/N`` files and ``torchrun`` ranks.

``calibrate --shard I/N`` writes one shard's partial sums, and ``merge_to_file`` adds the sums of
all shards and writes the table. Under ``torchrun`` (``python -m torch.distributed.run
--nproc_per_node K -m calibexport calibrate ...``) every rank evaluates the batches of shard
``rank/world_size`` and the ranks add their float64 sums with ``all_reduce``, gloo on the CPU
and NCCL when CUDA is available (rank r then uses ``cuda:LOCAL_RANK``). Both give the table of
a single process; see ``calibexport.calibration_tables.shards`` for why.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibexport.calibration_tables.estimate import (
    DEFAULT_ESTIMATOR,
    EtaEstimate,
    RowSums,
    estimate_from_row_sums,
    table_coefficients,
    uniform_ranges,
)
from calibexport.calibration_tables.shards import (
    SUM_ARRAYS,
    PartialSums,
    Shard,
    accumulate_shard,
    estimate_partial,
    finalize,
    merge_partials,
    run_metadata,
    save_partial,
    shard_file_path,
)
from calibexport.errors import CalibexportError

if TYPE_CHECKING:
    import torch

    from calibexport.models.loaders import LoadedModel
    from calibexport.runtime.schedule import VPSchedule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessGroupEnv:
    """The ``torchrun`` environment of this process: RANK, WORLD_SIZE and LOCAL_RANK."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> ProcessGroupEnv | None:
    """Return the ``torchrun`` environment, or None outside ``torchrun`` or with one process."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        env = ProcessGroupEnv(rank=int(os.environ["RANK"]),
                              world_size=int(os.environ["WORLD_SIZE"]),
                              local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    except (KeyError, ValueError) as error:
        raise CalibexportError(
            f"WORLD_SIZE is set but RANK or LOCAL_RANK is missing or invalid ({error!r}); start "
            "the command with torchrun, or unset WORLD_SIZE for a single process."
        ) from error
    if env.world_size <= 1:
        return None
    return env


def calibrate_shard_to_file(
    loaded: LoadedModel,
    network: torch.nn.Module,
    images: np.ndarray,
    schedule: VPSchedule,
    data_description: dict[str, Any],
    *,
    out: Path,
    shard: Shard,
    num_samples: int,
    estimator: str | None,
    batch_size: int,
    seed: int,
    progress: bool,
    common_noise: bool = False,
) -> dict[str, Any]:
    """Evaluate one shard of ``network`` (the eps form of ``loaded``); write and return its sums."""
    partial = estimate_partial(network, schedule, images, num_samples=num_samples, shard=shard,
                               estimator=estimator, batch_size=batch_size, seed=seed,
                               common_noise=common_noise, progress=progress)
    partial.metadata.update(run_metadata(loaded, data_description))
    path = save_partial(shard_file_path(out, shard), partial)
    logger.info("Shard %s written to %s; combine all shards with `calibexport merge`.",
                shard.label, path)
    return partial.metadata


def estimate_eta_torchrun(
    model: torch.nn.Module,
    schedule: VPSchedule,
    data: np.ndarray,
    *,
    env: ProcessGroupEnv,
    num_samples: int,
    estimator: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    common_noise: bool = False,
    target_se: float | None = None,
    max_samples: int | None = None,
) -> EtaEstimate:
    """Run ``estimate_eta`` split over the ``torchrun`` ranks; every rank returns the result.

    Each call of the accumulation (one, or one per round with ``target_se``) evaluates this
    rank's shard of the batches and adds all ranks' sums with ``all_reduce``.
    """
    import torch
    import torch.distributed as dist

    from calibexport.calibration_tables.estimate import _check_arguments

    estimator = DEFAULT_ESTIMATOR if estimator is None else estimator
    _check_arguments(data, num_samples, estimator, batch_size)
    alpha, sigma = table_coefficients(schedule)
    # NOTE: only the gloo path on CPU is covered by tests; the NCCL path has not run on a GPU host.
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device(f"cuda:{env.local_rank}" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    model = model.to(device)
    shard = Shard(env.rank, env.world_size)
    options = {"estimator": estimator, "batch_size": batch_size, "seed": seed,
               "common_noise": common_noise, "progress": progress and env.rank == 0}

    def accumulate(ranges: np.ndarray) -> RowSums:
        sums, _ = accumulate_shard(model, data, alpha, sigma, ranges, shard, **options)
        return all_reduce_row_sums(sums, device)

    start = time.perf_counter()
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    try:
        logger.info("Rank %d of %d joined the %s process group on %s.", env.rank, env.world_size,
                    backend, device)
        if target_se is None:
            sums = accumulate(uniform_ranges(len(alpha), num_samples))
        else:
            from calibexport.calibration_tables.allocation import sample_to_target

            sums = sample_to_target(accumulate, len(alpha), estimator=estimator,
                                    pilot_samples=num_samples, target_se=target_se,
                                    max_samples=max_samples)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    logger.info("Estimated eta on %d ranks in %.1fs (%d evaluations).", env.world_size,
                time.perf_counter() - start, int(sums.evaluations.sum()))
    return estimate_from_row_sums(sums, seed=seed, common_noise=common_noise, target_se=target_se)


def all_reduce_row_sums(sums: RowSums, device: Any) -> RowSums:
    """Add every rank's RowSums arrays with ``all_reduce`` and return the totals."""
    import torch
    import torch.distributed as dist

    reduced = {}
    for name in SUM_ARRAYS:
        array = getattr(sums, name)
        if array is None:
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        reduced[name] = tensor.cpu().numpy()
    return RowSums(sums.estimator, **reduced)


def merge_to_file(paths: list[Path], out: Path) -> dict[str, Any]:
    """Merge the partial-sum files of one run and write ``eta.npy`` and ``eta.json``."""
    merged = merge_partials(paths)
    logger.info("Merged %d shards: %d rows x %d evaluations.", len(paths),
                len(merged.sums.counts), int(merged.sums.evaluations[0]))
    return write_table(merged, out)


def write_table(total: PartialSums, out: Path) -> dict[str, Any]:
    """Write the table of complete sums through ``save_eta_table``; return its sidecar."""
    from calibexport.calibration_tables.table_io import build_sidecar, save_eta_table

    estimate = finalize(total)
    metadata = total.metadata
    extra = dict(metadata.get("extra") or {})
    extra["num_shards"] = metadata["num_shards"]
    sidecar = build_sidecar(estimate, schedule=metadata["schedule"],
                            data_description=metadata.get("data") or {},
                            weights_sha256=metadata.get("model_weights_sha256") or "",
                            extra=extra)
    save_eta_table(out, estimate.eta, sidecar)
    return sidecar
