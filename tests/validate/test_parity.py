"""Parity levels on real PyTorch backends: a perturbed eta table against the original one."""

from __future__ import annotations

import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.runtime.eta_table import EtaTable, load_eta_table
from calibexport.runtime.schedule import schedule_from_spec
from calibexport.runtime.solvers import METHODS
from calibexport.validate.compare import preset_tolerances
from calibexport.validate.parity import (
    FULL_RUNS,
    QUICK_RUNS,
    ParityConfig,
    SamplingRun,
    parse_runs,
    plan_evaluations,
    run_parity,
)


@pytest.fixture(scope="module")
def tiny(tiny_model, tiny_eta):
    import torch

    from calibexport.models.loaders import load_model

    torch.set_num_threads(1)
    loaded = load_model(tiny_model)
    return loaded.module, load_eta_table(tiny_eta), schedule_from_spec(loaded.spec.schedule)


def backend(module, values: np.ndarray):
    from calibexport.validate.torch_reference import TorchCalibratedBackend

    return TorchCalibratedBackend(module, EtaTable(values), (1, 8, 8))


def config(runs=(SamplingRun("singlestep", 2, 6),), **kwargs) -> ParityConfig:
    return ParityConfig(tolerances=preset_tolerances("fp32-cpu"), tolerance_preset="fp32-cpu",
                        runs=runs, **kwargs)


def test_full_runs_cover_every_method_and_order():
    offered = {(run.method, run.order) for run in FULL_RUNS}
    for method in ("singlestep", "multistep"):
        for order in (1, 2, 3):
            assert (method, order) in offered
    assert {run.method for run in FULL_RUNS} == set(METHODS)


def test_parse_runs_sets_and_lists():
    assert parse_runs("full") == FULL_RUNS
    assert parse_runs("quick") == QUICK_RUNS
    assert parse_runs("ddim:1:5, multistep:3:7") == (SamplingRun("ddim", 1, 5),
                                                     SamplingRun("multistep", 3, 7))


@pytest.mark.parametrize("text, match", [
    ("fast", "item 'fast' is invalid"),
    ("singlestep:2", "item 'singlestep:2' is invalid"),
    ("singlestep:2:4:1", "must be METHOD:ORDER:NFE"),
    ("ddim:2:10", "method 'ddim' is first order"),
    ("euler:1:10", "unknown method 'euler'"),
    ("singlestep:1:0", "steps=0 is invalid"),
])
def test_parse_runs_rejects(text, match):
    with pytest.raises(CalibexportError, match=match):
        parse_runs(text)


def test_plan_covers_every_row_and_both_ends():
    cases = {case.name: case for case in plan_evaluations(100, (1, 8, 8), False, config())}
    assert sorted(cases["evaluation/integer_timesteps"].timesteps) == list(range(100))
    fractional = cases["evaluation/non_integer_timesteps"].timesteps
    assert 0.0 in fractional
    assert 99.0 in fractional
    assert np.any(fractional != np.round(fractional))
    outside = cases["evaluation/out_of_range_timesteps"].timesteps
    assert outside.min() < 0
    assert outside.max() > 99
    assert cases["evaluation/batch_1"].batch_size == 1


def test_plan_uses_dense_grid_for_large_tables():
    cases = plan_evaluations(5000, (1, 2, 2), False, config(max_rows=300))
    rows = np.sort(cases[0].timesteps)
    assert len(rows) == 300
    assert rows[0] == 0.0
    assert rows[-1] == 4999.0


def test_plan_skips_non_integer_for_integer_models():
    names = [case.name for case in plan_evaluations(100, (1, 8, 8), True, config())]
    assert names == ["evaluation/integer_timesteps", "evaluation/batch_1"]


def test_plan_inputs_differ_between_cases():
    cases = plan_evaluations(100, (1, 8, 8), False, config())
    assert not np.array_equal(cases[0].x[:4], cases[1].x[:4])


def test_identical_backends_pass(tiny):
    module, table, schedule = tiny
    result = run_parity(backend(module, table.values), backend(module, table.values), schedule,
                        100, config())
    assert result.passed
    assert [c.level for c in result.checks].count("trajectory") == 1
    samples = next(c for c in result.checks if c.level == "samples")
    assert samples.details["psnr_db"] == np.inf


def test_eta_shift_names_the_row(tiny):
    module, table, schedule = tiny
    shifted = table.values.copy()
    shifted[37] += 1e-3
    result = run_parity(backend(module, shifted), backend(module, table.values), schedule, 100,
                        config())
    checks = {c.name: c for c in result.checks}
    integer = checks["evaluation/integer_timesteps"]
    assert not integer.passed
    assert integer.worst_timestep == 37.0
    assert integer.stats.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert integer.details["largest_errors"][0]["timestep"] == 37.0
    assert integer.details["largest_errors"][1]["max_abs"] < 1e-5
    # Non-integer times between rows 36 and 38 blend the shifted row in.
    assert checks["evaluation/batch_1"].passed


def test_trajectory_names_first_failing_step(tiny):
    module, table, schedule = tiny
    run = SamplingRun("multistep", 2, 5)
    # A shift of every row moves every step; the first step already exceeds the tolerance.
    result = run_parity(backend(module, table.values + 0.05), backend(module, table.values),
                        schedule, 100, config(runs=(run,)))
    checks = {c.name: c for c in result.checks}
    trajectory = checks[f"trajectory/{run.name}"]
    assert not trajectory.passed
    assert len(trajectory.details["per_step_max_abs"]) == 5
    first = trajectory.details["first_failing_step"]
    assert first["step"] == 1
    assert first["from_timestep"] == pytest.approx(99.0)
    assert first["to_timestep"] == trajectory.details["step_timesteps"][0]
    assert "first exceeded the tolerance after step 1" in trajectory.failure_message()
    samples = checks[f"samples/{run.name}"]
    assert not samples.passed
    assert np.isfinite(samples.details["psnr_db"])
    assert samples.worst_timestep == samples.details["largest_growth_step"]["to_timestep"]
    assert f"timestep {samples.worst_timestep:g}" in samples.failure_message()


def test_checks_are_ordered_by_level(tiny):
    module, table, schedule = tiny
    runs = (SamplingRun("ddim", 1, 3), SamplingRun("singlestep", 1, 3))
    result = run_parity(backend(module, table.values), backend(module, table.values), schedule,
                        100, config(runs=runs, max_rows=10, num_non_integer=2))
    levels = [c.level for c in result.checks]
    assert levels == sorted(levels, key=("evaluation", "trajectory", "samples").index)
    assert [c.name for c in result.checks if c.level == "samples"] == [
        "samples/ddim_order1_nfe3", "samples/singlestep_order1_nfe3"]
