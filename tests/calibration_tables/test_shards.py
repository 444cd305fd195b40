"""Shards: batch plans, partial-sum files and merges equal to a single-process estimate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calibexport.calibration_tables.estimate import estimate_eta, uniform_ranges
from calibexport.calibration_tables.shards import (
    BatchPlan,
    PartialSums,
    Shard,
    estimate_partial,
    finalize,
    load_partial,
    merge_partials,
    save_partial,
    shard_file_path,
)
from calibexport.errors import CalibexportError
from calibexport.models import DDPMUNet, UNetConfig
from calibexport.runtime.schedule import DiscreteVPSchedule

torch.set_num_threads(1)

SCHEDULE = DiscreteVPSchedule.linear(beta_start=1e-3, beta_end=0.3, num_timesteps=12)


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    config = UNetConfig(resolution=8, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                        num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return DDPMUNet(config).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32)


def run_shards(unet, images, count: int, **options) -> list[PartialSums]:
    return [estimate_partial(unet, SCHEDULE, images, shard=Shard(index, count), progress=False,
                             **options) for index in range(count)]


def merged_estimate(partials: list[PartialSums]):
    total = partials[0].sums
    for partial in partials[1:]:
        total = total + partial.sums
    return finalize(PartialSums(total, partials[0].metadata))


def test_shard_parse_one_based() -> None:
    shard = Shard.parse("2/4")

    assert shard.index == 1
    assert shard.count == 4
    assert shard.label == "2/4"


@pytest.mark.parametrize("text", ["0/4", "5/4", "1-4", "a/b", "2/0"])
def test_shard_parse_rejects(text: str) -> None:
    with pytest.raises(CalibexportError, match="invalid shard"):
        Shard.parse(text)


@pytest.mark.parametrize("num_samples, batch_size, count", [(64, 256, 3), (70, 50, 4),
                                                            (5, 33, 2), (3, 7, 5)])
def test_plan_shards_cover_stream(num_samples: int, batch_size: int, count: int) -> None:
    plan = BatchPlan(uniform_ranges(40, num_samples), batch_size)
    bounds = plan.shard_bounds(count)
    parts = [plan.shard_ranges(Shard(index, count))[0] for index in range(count)]
    covered = np.zeros(40, dtype=np.int64)
    for ranges in parts:
        covered += ranges[:, 1] - ranges[:, 0]

    assert bounds[0] == 0
    assert bounds[-1] == plan.num_batches
    assert all(left <= right for left, right in zip(bounds, bounds[1:]))
    assert np.array_equal(covered, np.full(40, num_samples))


def test_plan_moves_bounds_to_row_starts() -> None:
    # 10 rows x 30 samples in batches of 20: a row starts at every third batch boundary, so
    # the even split at batch 7.5 moves to batch 9 (within the slack of one batch of 8).
    plan = BatchPlan(uniform_ranges(10, 30), 20)

    assert plan.shard_bounds(2) == [0, 9, 15]


def test_plan_keeps_row_offsets() -> None:
    ranges = np.array([[10, 20], [0, 0], [64, 70]])
    plan = BatchPlan(ranges, 4)
    first = plan.shard_ranges(Shard(0, 2))[0]
    second = plan.shard_ranges(Shard(1, 2))[0]

    assert first.tolist() == [[10, 18], [0, 0], [0, 0]]
    assert second.tolist() == [[18, 20], [0, 0], [64, 70]]


@pytest.mark.parametrize("estimator, num_samples, batch_size, count", [
    ("control_variate", 8, 32, 3),
    ("control_variate", 70, 50, 2),
    ("naive", 6, 7, 4),
    ("antithetic", 8, 12, 3),
    ("regression", 5, 33, 2),
])
def test_merge_equals_single_process(unet, images, estimator, num_samples, batch_size, count):
    options = {"estimator": estimator, "num_samples": num_samples, "batch_size": batch_size}
    single = estimate_eta(unet, SCHEDULE, images, progress=False, **options)
    merged = merged_estimate(run_shards(unet, images, count, **options))

    assert np.array_equal(merged.eta, single.eta)
    assert np.array_equal(merged.standard_error, single.standard_error)
    assert merged.num_samples == single.num_samples


def test_rows_in_one_shard_have_equal_sums(unet, images) -> None:
    from calibexport.calibration_tables.estimate import accumulate_row_sums, table_coefficients

    alpha, sigma = table_coefficients(SCHEDULE)
    single = accumulate_row_sums(unet, images, alpha, sigma, uniform_ranges(12, 8),
                                 estimator="control_variate", batch_size=16)
    partials = run_shards(unet, images, 3, num_samples=8, batch_size=16)
    total = partials[0].sums + partials[1].sums + partials[2].sums

    assert np.array_equal(total.sums, single.sums)
    assert np.array_equal(total.squares, single.squares)
    assert np.array_equal(total.counts, single.counts)


def test_common_noise_shards_match(unet, images) -> None:
    options = {"num_samples": 6, "batch_size": 10, "common_noise": True}
    single = estimate_eta(unet, SCHEDULE, images, progress=False, **options)
    merged = merged_estimate(run_shards(unet, images, 2, **options))

    assert np.array_equal(merged.eta, single.eta)
    assert merged.common_noise


def test_partial_metadata(unet, images) -> None:
    partial = run_shards(unet, images, 2, num_samples=4, batch_size=16)[1]

    assert partial.metadata["shard"] == 1
    assert partial.metadata["num_shards"] == 2
    assert partial.metadata["estimator"] == "control_variate"
    assert partial.metadata["num_rows"] == 12
    assert partial.metadata["schedule"] == SCHEDULE.to_spec()


def test_shard_file_path() -> None:
    shard = Shard(1, 4)

    assert shard_file_path(Path("out/eta.npy"), shard) == Path("out/eta.shard-2-of-4.npz")
    assert shard_file_path(Path("out/part.npz"), shard) == Path("out/part.npz")
    assert shard_file_path(Path("out"), shard) == Path("out/eta.shard-2-of-4.npz")


@pytest.fixture(scope="module")
def shard_files(unet, images, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("shards")
    partials = run_shards(unet, images, 3, num_samples=4, batch_size=16, estimator="regression")
    return [save_partial(folder / f"part{index}.npz", partial)
            for index, partial in enumerate(partials)]


def test_partial_file_round_trip(shard_files: list[Path]) -> None:
    partial = load_partial(shard_files[0])

    assert partial.sums.estimator == "regression"
    assert partial.sums.cross is not None
    assert partial.metadata["format"] == "calibexport.eta_partial_sums"


def test_merge_files_any_order(unet, images, shard_files: list[Path]) -> None:
    merged = merge_partials(list(reversed(shard_files)))
    single = estimate_eta(unet, SCHEDULE, images, num_samples=4, batch_size=16,
                          estimator="regression", progress=False)

    assert np.array_equal(finalize(merged).eta, single.eta)
    assert merged.metadata["merged_from"] == [str(path) for path in shard_files]


def test_merge_rejects_missing_shard(shard_files: list[Path]) -> None:
    with pytest.raises(CalibexportError, match=r"shards 2/3 are missing"):
        merge_partials([shard_files[0], shard_files[2]])


def test_merge_rejects_repeated_shard(shard_files: list[Path]) -> None:
    with pytest.raises(CalibexportError, match=r"part1.npz and .*part1.npz are both shard 2/3"):
        merge_partials([shard_files[0], shard_files[1], shard_files[1], shard_files[2]])


def test_merge_rejects_other_run(tmp_path: Path, shard_files: list[Path]) -> None:
    other = load_partial(shard_files[1])
    other.metadata["seed"] = 7
    path = save_partial(tmp_path / "other.npz", other)

    with pytest.raises(CalibexportError, match=r"other.npz and .*part0.npz come from different "
                                               r"runs: seed is 7"):
        merge_partials([shard_files[0], path, shard_files[2]])


def test_merge_rejects_incomplete_counts(tmp_path: Path, shard_files: list[Path]) -> None:
    short = load_partial(shard_files[2])
    short.sums.counts[-1] -= 1
    path = save_partial(tmp_path / "short.npz", short)

    with pytest.raises(CalibexportError, match=r"row 11 3 evaluations, expected 4"):
        merge_partials([shard_files[0], shard_files[1], path])


def test_merge_rejects_other_files(tmp_path: Path) -> None:
    table = tmp_path / "table.npz"
    np.savez(table, eta=np.zeros(3))
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip file")
    stale = tmp_path / "stale.npz"
    np.savez(stale, counts=np.zeros(2), sums=np.zeros(2), squares=np.zeros(2),
             metadata=np.array(json.dumps({"format": "something else"})))

    with pytest.raises(CalibexportError, match=r"table.npz is not a partial-sum file"):
        merge_partials([table])
    with pytest.raises(CalibexportError, match=r"cannot read partial sums .*broken.npz"):
        merge_partials([broken])
    with pytest.raises(CalibexportError, match=r"stale.npz has format 'something else'"):
        merge_partials([stale])
    with pytest.raises(CalibexportError, match="no partial-sum files given"):
        merge_partials([])


def test_linear_schedule_shards_match(unet, images) -> None:
    from calibexport.runtime.schedule import LinearVPSchedule

    # The continuous schedule with model time 15 * max(t - 1/15, 0): one row per time 0..14.
    schedule = LinearVPSchedule(timestep_scale=15.0, t_shift=1.0 / 15.0)
    options = {"num_samples": 4, "batch_size": 12}
    single = estimate_eta(unet, schedule, images, progress=False, **options)
    partials = [estimate_partial(unet, schedule, images, shard=Shard(index, 2), progress=False,
                                 **options) for index in range(2)]

    assert single.eta.shape == (15, 1, 8, 8)
    assert np.array_equal(merged_estimate(partials).eta, single.eta)
    assert partials[0].metadata["schedule"]["kind"] == "linear"


def test_calibrate_shard_reruns_onto_same_file(tmp_path: Path, tiny_model: Path) -> None:
    from calibexport.calibration_tables.calibrate import calibrate_to_file

    data = tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32))
    out = tmp_path / "part.npz"
    options = dict(model=tiny_model, data=str(data), out=out, num_samples=2, batch_size=50,
                   progress=False, shard="1/4")
    calibrate_to_file(**options)
    first = load_partial(out)
    calibrate_to_file(**options)
    second = load_partial(out)
    np.testing.assert_array_equal(first.sums.evaluations, second.sums.evaluations)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.npy", "part.npz"]


def test_calibrate_shard_rejects_directory_out(tmp_path: Path, tiny_model: Path) -> None:
    from calibexport.calibration_tables.calibrate import calibrate_to_file

    out = tmp_path / "part.npz"
    out.mkdir()
    with pytest.raises(CalibexportError, match="it is a directory"):
        calibrate_to_file(model=tiny_model, data="digits", out=out, num_samples=2,
                          progress=False, shard="1/4")
