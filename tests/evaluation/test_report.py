"""Markdown tables, paired differences and the plot, from a hand-made results dictionary."""

from __future__ import annotations

import json

import pytest

from calibexport.evaluation.report import (
    difference_table,
    distance_table,
    markdown_report,
    mean_and_se,
    paired_differences,
    write_outputs,
)


def _row(setting, order, nfe, actual, calibrated, fds):
    return {"setting": setting, "order": order, "nfe": nfe, "actual_nfe": actual,
            "calibrated": calibrated,
            "metrics": {"pixel": {"fd": fds, "mean_term": [0.1] * len(fds)}}}


@pytest.fixture
def results():
    rows = [
        _row("fixed", 3, 10, 9, False, [5.0, 6.0, 7.0]),
        _row("fixed", 3, 10, 9, True, [4.0, 5.0, 6.5]),
        _row("fixed", 3, 12, 12, False, [3.0, 3.0, 3.0]),
        _row("fixed", 3, 12, 12, True, [3.1, 2.9, 3.3]),
    ]
    return {"rows": rows, "feature_spaces": ["pixel"], "seeds_completed": [0, 1, 2],
            "num_reference": 100, "options": {"num_samples": 50}}


def test_mean_and_se_values():
    mean, se = mean_and_se([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert se == pytest.approx(1.0 / 3**0.5)
    assert mean_and_se([4.0]) == (4.0, None)


def test_paired_differences_per_seed(results):
    assert paired_differences(results, "pixel", "fixed", 3, 10) == pytest.approx([-1, -1, -0.5])


def test_distance_table_marks_real_nfe(results):
    table = distance_table(results, "pixel", "fixed")
    lines = table.splitlines()
    assert lines[0] == "| method | NFE 10 | NFE 12 |"
    assert lines[2].startswith("| DPM-Solver-3 | 6 ± 0.58 †9 | 3 ± 0 |")
    assert lines[3].startswith("| DPM-Solver-3 + calibration | 5.17 ± 0.73 †9 |")


def test_difference_table_bolds_significant(results):
    lines = difference_table(results, "pixel", "fixed").splitlines()
    # NFE 10: mean -0.83, SE 0.17 (significant); NFE 12: mean 0.1, SE 0.12 (not)
    assert lines[2] == "| 3 | **-0.83 ± 0.17** | 0.1 ± 0.12 |"


def test_report_without_calibrated_rows(results):
    results["rows"] = [row for row in results["rows"] if not row["calibrated"]]
    text = markdown_report(results)
    assert "DPM-Solver-3 |" in text
    assert "+ calibration" not in text
    assert "paired" not in text


def test_write_outputs(tmp_path, results):
    paths = write_outputs(results, tmp_path)
    assert [path.name for path in paths] == ["results.json", "results.md", "fd_vs_nfe.png"]
    assert json.loads(paths[0].read_text())["seeds_completed"] == [0, 1, 2]
    assert "Calibrated minus uncalibrated" in paths[1].read_text()
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_mean_term_difference_table(results):
    lines = difference_table(results, "pixel", "fixed", metric="mean_term").splitlines()
    assert lines[2] == "| 3 | 0 ± 0 | 0 ± 0 |"


def test_eta_noise_rows_and_table(results):
    import numpy as np

    from calibexport.evaluation.report import eta_noise_rows, eta_noise_table

    values = np.zeros((20, 1, 2, 2), np.float32)
    values[0] = 0.2
    values[10] = [[[0.3, -0.3], [0.3, -0.3]]]
    rows = eta_noise_rows(values, [0.1] * 20, timesteps=(0, 10, 50))
    assert [row["timestep"] for row in rows] == [0, 10]
    assert rows[0]["rms"] == pytest.approx(0.2)
    assert rows[1]["noise_share"] == pytest.approx(0.01 / 0.09)
    results["eta_noise"] = rows
    assert rows[1]["signal"] == pytest.approx(np.sqrt(0.08))
    assert "| 10 | 0.3 | 0.1 | 0.11 | 0.283 |" in eta_noise_table(results)
    assert "eta table against its standard error" in markdown_report(results)
    assert "se" not in eta_noise_rows(values, None, timesteps=(0,))[0]
