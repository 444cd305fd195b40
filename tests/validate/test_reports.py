"""parity.json / parity.md / parity.xml rendering from real check results."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from calibexport.validate.compare import Tolerance, run_check
from calibexport.validate.parity import ParityResult, ReferenceOutputs
from calibexport.validate.reports import (
    PARITY_SCHEMA_VERSION,
    parity_to_dict,
    render_junit,
    render_markdown,
    write_reports,
)

TOLERANCES = {"preset": "fp32-cpu", "overrides": {"samples": {"atol": 0.5}},
              "levels": {"evaluation": {"atol": 1e-4, "rtol": 0.0},
                         "trajectory": {"atol": 1e-3, "rtol": 0.0},
                         "samples": {"atol": 0.5, "rtol": 0.0}}}


def make_report(failing_timestep: float | None = 37.0, nan: bool = False) -> dict:
    reference = np.zeros((3, 1, 2, 2))
    actual = reference.copy()
    if failing_timestep is not None:
        actual[1, 0, 0, 0] = 2e-3
    if nan:
        actual[2, 0, 1, 1] = np.nan
    checks = [
        run_check("evaluation/integer_timesteps", "evaluation", "rows", actual, reference,
                  Tolerance(1e-4, 0.0), np.array([10.0, failing_timestep or 20.0, 50.0])),
        run_check("trajectory/ddim_order1_nfe3", "trajectory", "steps", reference, reference,
                  Tolerance(1e-3, 0.0), np.array([60.0, 30.0, 0.0])),
        run_check("samples/ddim_order1_nfe3", "samples", "final", reference, reference,
                  Tolerance(0.5, 0.0), details={"psnr_db": float("inf")}),
    ]
    result = ParityResult(checks, {"seed": 0}, 1.25, ReferenceOutputs({}, [], [], 0, 3),
                          environment={"tf32": False})
    subject = {"deployed": "ONNX Runtime CPUExecutionProvider", "reference": "PyTorch"}
    return parity_to_dict(result, subject, TOLERANCES)


def test_json_has_version_summary_and_levels():
    report = make_report()
    assert report["schema_version"] == PARITY_SCHEMA_VERSION
    assert report["format"] == "calibexport.parity"
    assert report["status"] == "FAILED"
    assert report["summary"]["failed_checks"] == ["evaluation/integer_timesteps"]
    assert report["summary"]["levels"]["evaluation"] == {"checks": 1, "failed": 1}
    assert report["summary"]["levels"]["samples"] == {"checks": 1, "failed": 0}
    assert report["tolerances"] == TOLERANCES


def test_json_is_strict_without_nan_or_infinity(tmp_path):
    report = make_report(nan=True)
    write_reports(report, tmp_path)
    constants = []
    loaded = json.loads((tmp_path / "parity.json").read_text(), parse_constant=constants.append)
    assert constants == []
    check = loaded["checks"][0]
    assert check["stats"]["nan_count"] == 1
    assert check["stats"]["smallest_passing_atol"] is None
    assert loaded["checks"][2]["details"]["psnr_db"] is None


def test_markdown_lists_failures_then_levels():
    markdown = render_markdown(make_report())
    lines = markdown.splitlines()
    assert lines[0] == "## calibexport parity: FAILED"
    failure = next(line for line in lines if line.startswith("- evaluation/integer_timesteps"))
    assert "max abs error 0.002 at timestep 37" in failure
    headings = [line for line in lines if line.startswith("### ")]
    assert headings == ["### Single evaluations: 0/1 passed",
                        "### Sampling trajectories (state after every step): 1/1 passed",
                        "### Final samples: 1/1 passed"]
    row = next(line for line in lines if line.startswith("| `integer_timesteps`"))
    assert "**FAIL**" in row
    assert "| 37 |" in row
    assert "overridden by flags" in markdown
    assert "TF32: off" in markdown


def test_markdown_passed_has_no_failure_list():
    markdown = render_markdown(make_report(failing_timestep=None))
    assert markdown.startswith("## calibexport parity: PASSED")
    assert "Failed checks" not in markdown
    assert markdown.count("| pass |") == 3


def test_junit_has_suite_per_level_and_named_failure():
    root = ET.fromstring(render_junit(make_report()))
    assert root.tag == "testsuites"
    assert root.get("tests") == "3"
    assert root.get("failures") == "1"
    suites = {suite.get("name"): suite for suite in root.findall("testsuite")}
    assert list(suites) == ["parity.evaluation", "parity.trajectory", "parity.samples"]
    cases = suites["parity.evaluation"].findall("testcase")
    assert [case.get("name") for case in cases] == ["evaluation/integer_timesteps"]
    failure = cases[0].find("failure")
    assert "at timestep 37" in failure.get("message")
    assert "0.002" in failure.get("message")
    assert json.loads(failure.text)["worst_timestep"] == 37.0
    properties = {p.get("name"): p.get("value")
                  for p in suites["parity.samples"].find("properties")}
    assert properties == {"tolerance_preset": "fp32-cpu", "atol": "0.5", "rtol": "0",
                          "tf32": "false"}
    assert suites["parity.samples"].find("testcase").find("failure") is None


@pytest.mark.parametrize("name", ["parity.json", "parity.md", "parity.xml"])
def test_write_reports_creates_each_file(tmp_path, name):
    write_reports(make_report(), tmp_path / "reports")
    assert (tmp_path / "reports" / name).stat().st_size > 0
