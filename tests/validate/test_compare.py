from pathlib import Path

import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.validate.compare import (
    LEVELS,
    TOLERANCE_PRESETS,
    Tolerance,
    apply_overrides,
    error_stats,
    parse_tolerance_override,
    preset_tolerances,
    run_check,
)


def test_identical_arrays_have_zero_error():
    reference = np.random.default_rng(0).standard_normal((3, 2, 4, 4))
    stats = error_stats(reference.copy(), reference, Tolerance(0.0, 0.0))
    assert stats.max_abs == 0.0
    assert stats.p99_rel == 0.0
    assert stats.smallest_passing_atol == 0.0
    assert stats.smallest_passing_rtol == 0.0
    assert stats.cosine_similarity == pytest.approx(1.0)


def test_statistics_match_numpy():
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((5, 1, 3, 3)) + 3.0
    actual = reference + rng.normal(0, 1e-3, reference.shape)
    stats = error_stats(actual, reference, Tolerance(0.0, 0.0))
    diff = np.abs(actual - reference)
    assert stats.max_abs == pytest.approx(diff.max())
    assert stats.mean_abs == pytest.approx(diff.mean())
    assert stats.p99_abs == pytest.approx(np.percentile(diff, 99))
    assert stats.max_rel == pytest.approx((diff / np.abs(reference)).max())
    assert stats.mean_rel == pytest.approx((diff / np.abs(reference)).mean())
    cosine = np.dot(actual.ravel(), reference.ravel()) / (
        np.linalg.norm(actual) * np.linalg.norm(reference))
    assert stats.cosine_similarity == pytest.approx(cosine)


def test_smallest_passing_atol_is_tight():
    reference = np.zeros((4, 1, 2, 2))
    actual = reference.copy()
    actual[2, 0, 1, 1] = 3e-4
    tolerance = Tolerance(atol=1e-4, rtol=0.0)
    check = run_check("c", "evaluation", "", actual, reference, tolerance,
                      timesteps=np.array([5, 6, 7, 8]))
    assert not check.passed
    assert check.stats.smallest_passing_atol == pytest.approx(3e-4)
    assert check.worst_timestep == 7.0
    loose = run_check("c", "evaluation", "", actual, reference, Tolerance(atol=3e-4, rtol=0.0))
    assert loose.passed


def test_smallest_passing_rtol_uses_check_atol():
    reference = np.full((2, 1, 1, 2), 2.0)
    actual = reference.copy()
    actual[1, 0, 0, 1] = 2.01
    stats = error_stats(actual, reference, Tolerance(atol=0.002, rtol=0.0))
    assert stats.smallest_passing_rtol == pytest.approx((0.01 - 0.002) / 2.0)
    check = run_check("c", "evaluation", "", actual, reference,
                      Tolerance(atol=0.002, rtol=stats.smallest_passing_rtol * 1.0001))
    assert check.passed


def test_smallest_passing_rtol_is_infinite_at_zero_reference():
    reference = np.zeros((1, 1, 1, 1))
    stats = error_stats(reference + 1.0, reference, Tolerance(atol=0.5, rtol=0.0))
    assert stats.smallest_passing_rtol == np.inf


def test_rtol_scales_with_reference():
    reference = np.full((2, 1, 1, 1), 100.0)
    actual = reference + 0.05
    check = run_check("c", "evaluation", "", actual, reference, Tolerance(atol=0.0, rtol=1e-3))
    assert check.passed
    assert check.stats.smallest_passing_atol == 0.0


def test_nan_fails_even_with_huge_tolerance():
    reference = np.zeros((2, 1, 2, 2))
    actual = reference.copy()
    actual[1, 0, 0, 0] = np.nan
    actual[1, 0, 0, 1] = np.inf
    check = run_check("c", "evaluation", "", actual, reference, Tolerance(atol=1e9, rtol=1e9),
                      timesteps=np.array([0.0, 42.0]))
    assert check.stats.nan_count == 1
    assert check.stats.inf_count == 1
    assert not check.passed
    assert check.worst_timestep == 42.0
    assert check.stats.max_abs == 0.0
    assert check.stats.smallest_passing_atol == np.inf
    assert "NaN 1, Inf 1" in check.failure_message()
    assert "timestep 42" in check.failure_message()


def test_nonfinite_reference_fails():
    reference = np.zeros((2, 1, 1, 1))
    reference[0] = np.nan
    check = run_check("c", "evaluation", "", np.zeros_like(reference), reference,
                      Tolerance(atol=1.0, rtol=1.0))
    assert check.stats.reference_nonfinite_count == 1
    assert not check.passed


def test_shape_mismatch_is_rejected():
    with pytest.raises(CalibexportError, match=r"shape \[2, 1\] differs .* \[3, 1\]"):
        error_stats(np.zeros((2, 1)), np.zeros((3, 1)), Tolerance(0.0, 0.0))


def test_failure_message_names_error_and_timestep():
    reference = np.zeros((3, 1, 1, 1))
    actual = reference.copy()
    actual[1] = 2e-3
    check = run_check("evaluation/x", "evaluation", "", actual, reference,
                      Tolerance(atol=1e-4, rtol=0.0), timesteps=np.array([10.0, 37.0, 50.0]))
    message = check.failure_message()
    assert "max abs error 0.002 at timestep 37" in message
    assert "smallest passing atol is 0.002" in message
    assert check.to_dict()["failure_message"] == message


def test_presets_cover_every_level():
    for name, tolerances in TOLERANCE_PRESETS.items():
        assert set(tolerances) == set(LEVELS), name
        assert tolerances["trajectory"].atol >= tolerances["evaluation"].atol, name


def test_presets_match_documentation():
    docs = Path(__file__).parents[2] / "docs" / "validation.md"
    rows = {}
    for line in docs.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].strip("`") in TOLERANCE_PRESETS:
            rows[cells[0].strip("`")] = cells[1:]
    assert set(rows) == set(TOLERANCE_PRESETS)
    for name, cells in rows.items():
        for level, cell in zip(LEVELS, cells):
            atol, rtol = (float(value) for value in cell.split("/"))
            assert Tolerance(atol, rtol) == TOLERANCE_PRESETS[name][level], (name, level)


def test_preset_copy_is_independent():
    copy = preset_tolerances("fp32-cpu")
    copy["evaluation"] = Tolerance(1.0, 1.0)
    assert TOLERANCE_PRESETS["fp32-cpu"]["evaluation"].atol == 1e-4


def test_unknown_preset_lists_choices():
    with pytest.raises(CalibexportError, match="unknown tolerance preset 'fp64'.*fp32-gpu, fp16"):
        preset_tolerances("fp64")


@pytest.mark.parametrize("text, levels, value", [
    ("1e-3", LEVELS, 1e-3),
    ("trajectory=0.5", ("trajectory",), 0.5),
    ("samples = 0", ("samples",), 0.0),
])
def test_parse_override(text, levels, value):
    assert parse_tolerance_override(text, "--atol") == (levels, value)


@pytest.mark.parametrize("text, match", [
    ("steps=1e-3", "unknown level 'steps'"),
    ("abc", "is not a number"),
    ("evaluation=", "is not a number"),
    ("-1e-3", "finite number >= 0"),
    ("nan", "finite number >= 0"),
])
def test_parse_override_rejects(text, match):
    with pytest.raises(CalibexportError, match=match):
        parse_tolerance_override(text, "--atol")


def test_apply_overrides_changes_named_levels_only():
    tolerances, overrides = apply_overrides(preset_tolerances("fp32-cpu"), ["samples=0.5"],
                                            ["2e-2"])
    assert tolerances["samples"] == Tolerance(atol=0.5, rtol=2e-2)
    assert tolerances["evaluation"] == Tolerance(atol=1e-4, rtol=2e-2)
    assert overrides == {"samples": {"atol": 0.5, "rtol": 2e-2},
                         "evaluation": {"rtol": 2e-2}, "trajectory": {"rtol": 2e-2}}
